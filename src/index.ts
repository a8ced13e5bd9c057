/**
 * `idempotency-header`: the core. Backends, the engine adapters are built on, and the types and errors they
 * share. Framework adapters live in subpath exports (`idempotency-header/express`, `idempotency-header/node`).
 *
 * @packageDocumentation
 */
export {
  DEFAULT_MAX_ENTRIES,
  DEFAULT_SWEEP_INTERVAL_MS,
  MemoryBackend,
  type MemoryBackendOptions,
} from './backends/memory.js';
export { type BeginResult, IdempotencyEngine, type PassResult, Ticket } from './core/engine.js';
export { IdempotencyError, type IdempotencyErrorCode } from './core/errors.js';
export { canonicalJson, computeFingerprint, type RequestBody } from './core/fingerprint.js';
export { isUuid4, unquoteKey } from './core/key.js';
export {
  DEFAULT_APPLICABLE_METHODS,
  DEFAULT_EXPIRY,
  DEFAULT_IDEMPOTENCY_HEADER_KEY,
  DEFAULT_LOCK_TIMEOUT,
  DEFAULT_MAX_KEY_LENGTH,
  DEFAULT_MAX_REQUEST_BYTES,
  DEFAULT_MAX_RESPONSE_BYTES,
  DEFAULT_REPLAY_HEADER_KEY,
  type IdempotencyEvent,
  type IdempotencyOptions,
  type IdempotencyOutcome,
  type ResolvedOptions,
} from './core/options.js';
export { type EngineReply, storableHeaders } from './core/responses.js';
export type {
  AcquiredResult,
  AcquireResult,
  Awaitable,
  Backend,
  CompletedResult,
  HeaderPair,
  IdempotencyRecord,
  InFlightResult,
  MismatchResult,
  StoredResponse,
} from './core/types.js';
