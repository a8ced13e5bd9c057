/**
 * The backend contract suite now lives in the package, as `idempotency-header/testkit` (src/testkit), so that a
 * backend of any project can run it. This file keeps the old call for code written against it:
 * `describeBackendContract(name, setup)` under vitest.
 */
import { afterAll, beforeAll, describe, it } from 'vitest';
import {
  type BackendContractContext,
  type BackendContractOptions,
  describeBackendContract as describeWith,
} from '../../src/testkit/index.js';

export type { BackendContractContext, BackendContractOptions };

/** Registers the backend contract suite with vitest: see the testkit's `describeBackendContract`. */
export function describeBackendContract(
  name: string,
  setup: () => BackendContractContext | Promise<BackendContractContext>,
  options?: BackendContractOptions,
): void {
  describeWith(name, setup, { describe, it, beforeAll, afterAll }, options);
}
