import { storageKeyOf } from './engine.js';
import { IdempotencyError } from './errors.js';
import type { Backend, KeyState } from './types.js';

/** Which key, for {@link inspectKey} and {@link forgetKey}: the key as clients send it, and its scope if any. */
export interface KeyLocation {
  /** The scope the middleware's `scope` function gives the key's requests (a tenant, an account id). */
  scope?: string;
}

/** Options of {@link forgetKey}. */
export interface ForgetOptions extends KeyLocation {
  /** Deletes the key even while a request with it runs (its lock): that request's store will then be refused. */
  force?: boolean;
}

/** What {@link forgetKey} did. */
export type ForgetResult =
  | { readonly forgotten: true; readonly was: KeyState }
  | { readonly forgotten: false; readonly reason: 'not-found' | 'in-flight' };

/**
 * The state of an idempotency key in a backend: in flight (with its lease's time left), completed (status, when
 * stored, when it expires, fingerprint, size), or `undefined` when nothing is held for it.
 *
 * @example
 * ```ts
 * import { inspectKey } from 'idempotency-header';
 * const state = await inspectKey(backend, 'order-123', { scope: 'tenant-42' });
 * ```
 */
export async function inspectKey(
  backend: Backend,
  key: string,
  location: KeyLocation = {},
): Promise<KeyState | undefined> {
  return inspectStorageKey(backend, storageKeyOf(key, location.scope));
}

/**
 * Forgets an idempotency key, so that the next request with it runs again (a stored response that should not be
 * replayed any more). A key whose request still runs is refused (`in-flight`) unless `force` is set.
 *
 * @example
 * ```ts
 * import { forgetKey } from 'idempotency-header';
 * const result = await forgetKey(backend, 'order-123', { scope: 'tenant-42' });
 * if (!result.forgotten) console.log(result.reason);
 * ```
 */
export async function forgetKey(
  backend: Backend,
  key: string,
  options: ForgetOptions = {},
): Promise<ForgetResult> {
  const storageKey = storageKeyOf(key, options.scope);
  const was = await inspectStorageKey(backend, storageKey);
  if (was === undefined) return { forgotten: false, reason: 'not-found' };
  if (was.state === 'in-flight' && options.force !== true) return { forgotten: false, reason: 'in-flight' };
  const deleted = await operatorMethod(backend, 'forget').call(backend, storageKey, options.force === true);
  return deleted ? { forgotten: true, was } : { forgotten: false, reason: 'not-found' };
}

async function inspectStorageKey(backend: Backend, storageKey: string): Promise<KeyState | undefined> {
  return operatorMethod(backend, 'inspect').call(backend, storageKey);
}

function operatorMethod<Name extends 'inspect' | 'forget'>(
  backend: Backend,
  name: Name,
): NonNullable<Backend[Name]> {
  const method = backend[name];
  if (typeof method !== 'function') {
    throw new IdempotencyError('ERR_IDEMPOTENCY_BACKEND', `This backend does not support ${name}()`);
  }
  return method as NonNullable<Backend[Name]>;
}
