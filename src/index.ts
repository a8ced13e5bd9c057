/**
 * `idempotency-header`: the core. The in-memory backend, the `Backend` interface and its record types for
 * writing other backends, the engine for writing adapters, the options and event types, and the error class.
 * Framework adapters and the other backends live in subpath exports (`idempotency-header/express`,
 * `idempotency-header/node`, `idempotency-header/redis`, …).
 *
 * @packageDocumentation
 */
export {
  DEFAULT_MAX_BYTES,
  DEFAULT_MAX_ENTRIES,
  DEFAULT_SWEEP_INTERVAL_MS,
  MemoryBackend,
  type MemoryBackendOptions,
} from './backends/memory.js';
export type { Sha256 } from './core/digest.js';
export {
  type BeginResult,
  type EngineRuntime,
  type FinishedResponse,
  IdempotencyEngine,
  type PassResult,
  type RequestIdempotency,
  type ResponsePlan,
  storageKeyOf,
  type Ticket,
} from './core/engine.js';
export { IdempotencyError, type IdempotencyErrorCode } from './core/errors.js';
export type { RequestBody } from './core/fingerprint.js';
export {
  type ForgetOptions,
  type ForgetResult,
  forgetKey,
  inspectKey,
  type KeyLocation,
} from './core/operator.js';
export {
  DEFAULT_APPLICABLE_METHODS,
  DEFAULT_EXPIRY,
  DEFAULT_IDEMPOTENCY_HEADER_KEY,
  DEFAULT_LOCK_TIMEOUT,
  DEFAULT_MAX_KEY_LENGTH,
  DEFAULT_MAX_REQUEST_BYTES,
  DEFAULT_MAX_RESPONSE_BYTES,
  DEFAULT_RELEASE_STATUSES,
  DEFAULT_REPLAY_HEADER_KEY,
  type IdempotencyEvent,
  type IdempotencyOptions,
  type IdempotencyOutcome,
  MIN_LOCK_TIMEOUT,
} from './core/options.js';
export { type EngineReply, REMOVED_HEADER } from './core/responses.js';
export type {
  AcquiredResult,
  AcquireResult,
  Awaitable,
  Backend,
  BackendTransaction,
  CompletedKeyState,
  CompletedResult,
  HeaderPair,
  IdempotencyRecord,
  InFlightKeyState,
  InFlightResult,
  KeyState,
  MismatchResult,
  StoredResponse,
  TransactionalBackend,
} from './core/types.js';
