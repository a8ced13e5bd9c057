/**
 * Stable codes of {@link IdempotencyError}:
 * - `ERR_IDEMPOTENCY_OPTION`: an option is invalid (thrown at construction).
 * - `ERR_IDEMPOTENCY_BACKEND`: the backend failed or could not be reached; `cause` holds the original error.
 * - `ERR_IDEMPOTENCY_BACKEND_TIMEOUT`: the backend did not answer within `backendTimeout`; handled like any
 *   backend failure.
 * - `ERR_IDEMPOTENCY_BACKEND_FULL`: `MemoryBackend` holds as many keys or bytes as it may; handled like any
 *   backend failure (`onBackendError`).
 * - `ERR_IDEMPOTENCY_BODY`: the request body could not be read.
 * - `ERR_IDEMPOTENCY_SCOPE`: the `scope` function returned something other than a string or `undefined`.
 * - `ERR_IDEMPOTENCY_LEASE_LOST`: the reason of a request's lease signal once its lease is lost.
 */
export type IdempotencyErrorCode =
  | 'ERR_IDEMPOTENCY_OPTION'
  | 'ERR_IDEMPOTENCY_BACKEND'
  | 'ERR_IDEMPOTENCY_BACKEND_TIMEOUT'
  | 'ERR_IDEMPOTENCY_BACKEND_FULL'
  | 'ERR_IDEMPOTENCY_BODY'
  | 'ERR_IDEMPOTENCY_SCOPE'
  | 'ERR_IDEMPOTENCY_LEASE_LOST';

/**
 * The one error class of this package. Protocol outcomes (400, 409, 422, replays) are not errors; this is thrown
 * for misconfiguration and reported (through `onEvent` and the 503 path) for backend failures.
 *
 * @example
 * ```ts
 * try {
 *   idempotencyHeader({ backend, expiry: -1 });
 * } catch (error) {
 *   if (error instanceof IdempotencyError && error.code === 'ERR_IDEMPOTENCY_OPTION') console.error(error.message);
 * }
 * ```
 */
export class IdempotencyError extends Error {
  /** A stable code to branch on; messages may change, codes do not. */
  readonly code: IdempotencyErrorCode;

  constructor(code: IdempotencyErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'IdempotencyError';
    this.code = code;
  }
}

/**
 * Throws the construction-time error for an option name `known` does not hold, as the middleware does: a
 * misspelt name (`prefx`, `tabel`) would otherwise be ignored and its default used in silence.
 */
export function rejectUnknownOptions(options: object | null | undefined, known: ReadonlySet<string>): void {
  if (options === null || typeof options !== 'object') return;
  for (const name of Object.keys(options)) {
    if (!known.has(name)) throw invalidOption(name, 'no such option (check its spelling)', name);
  }
}

/** Builds the construction-time error for an invalid option, naming it and the value it received. */
export function invalidOption(name: string, expected: string, received: unknown): IdempotencyError {
  return new IdempotencyError(
    'ERR_IDEMPOTENCY_OPTION',
    `Invalid option \`${name}\`: expected ${expected}, received ${describe(received)}.`,
  );
}

function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'function') return 'a function';
  if (Array.isArray(value)) return 'an array';
  if (value === null) return 'null';
  if (typeof value === 'object') return 'an object';
  return String(value);
}
