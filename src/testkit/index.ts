/**
 * `idempotency-header/testkit`: the backend contract suite, for proving that a {@link Backend} of your own
 * (DynamoDB, MongoDB, Cloudflare D1…) behaves as the engine needs. It runs under any test runner you hand it —
 * vitest, `node:test`, Bun, Jest, Mocha — and imports none of them.
 *
 * @example
 * ```ts
 * import * as nodeTest from 'node:test';
 * import { describeBackendContract } from 'idempotency-header/testkit';
 *
 * describeBackendContract('MyBackend', () => ({ backend: new MyBackend() }), nodeTest);
 * ```
 *
 * @module
 */
export type { Backend } from '../core/types.js';
export {
  type BackendContractContext,
  type BackendContractOptions,
  type BackendContractTiming,
  describeBackendContract,
  type TestFunctions,
} from './backend-contract.js';
