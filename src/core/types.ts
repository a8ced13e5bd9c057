/** A value or a promise of it: backends may answer synchronously (memory) or asynchronously (network). */
export type Awaitable<T> = T | Promise<T>;

/** A header as stored: lower-case name and its value. Repeated headers appear once per value. */
export type HeaderPair = [name: string, value: string];

/** The response the handler produced, as stored and replayed. */
export interface StoredResponse {
  /** HTTP status code. */
  status: number;
  /** Response headers without hop-by-hop headers, `set-cookie`, `date` and `content-length`. */
  headers: HeaderPair[];
  /** The exact body bytes that were sent. */
  body: Uint8Array;
}

/**
 * Set to `true` on a backend that takes a stored response's body as the string the handler sent, when it sent
 * one, instead of its UTF-8 bytes (see {@link TextBodyResponse}): a backend that copies the body into memory of
 * its own (`MemoryBackend`) encodes it there once, where the bytes would have been made only to be copied.
 * @internal
 */
export const TEXT_BODIES: unique symbol = Symbol.for('idempotency-header.text-bodies');

/**
 * A {@link StoredResponse} as a backend marked with {@link TEXT_BODIES} may receive it: its body the string the
 * response was sent as (its bytes are its UTF-8, lone surrogates as U+FFFD), or the bytes.
 * @internal
 */
export type TextBodyResponse = Omit<StoredResponse, 'body'> & { body: Uint8Array | string };

/** A completed request: what a replay needs, and what tells a repeat from a different request. */
export interface IdempotencyRecord {
  /** SHA-256 (hex) of the request's method, path and body, or `''` when fingerprinting is off. */
  fingerprint: string;
  /**
   * The stored response, or `null` for a request that ran to completion but whose response could not be kept
   * (larger than `maxResponseBytes`, or an event stream): a retry is told so and does not run again.
   */
  response: StoredResponse | null;
  /** When the response was stored, in milliseconds since the epoch. */
  createdAt: number;
}

/** The key was free: this request holds the lock until it completes or releases it. */
export interface AcquiredResult {
  readonly state: 'acquired';
  /** Fencing token: `complete`, `release` and `renew` succeed only while it still holds the key. */
  readonly token: string;
}

/** Another request with the same fingerprint holds the lock. */
export interface InFlightResult {
  readonly state: 'in-flight';
  /** Milliseconds left on the holder's lease (used for `Retry-After`). */
  readonly retryAfterMs: number;
}

/** A response is stored for this key and the fingerprints match. */
export interface CompletedResult {
  readonly state: 'completed';
  readonly record: IdempotencyRecord;
}

/** The key is held or completed by a request with a different fingerprint. */
export interface MismatchResult {
  readonly state: 'mismatch';
}

/** The answer of {@link Backend.acquire}. */
export type AcquireResult = AcquiredResult | InFlightResult | CompletedResult | MismatchResult;

/**
 * Where keys, locks and responses live. Every method is one atomic step: there is no window between reading a
 * key's state and changing it in which another request, in this process or another, could slip in.
 *
 * Keys arrive already namespaced by the engine (scope and key); a backend may add its own prefix.
 */
export interface Backend {
  /**
   * Looks the key up and, if it is free (absent, expired, or its lease lapsed), takes the lock for `leaseMs`.
   * A stored record or a live lock with a different fingerprint answers `mismatch`.
   */
  acquire(key: string, fingerprint: string, leaseMs: number): Awaitable<AcquireResult>;
  /**
   * Stores the record and ends the lock in one step, only if `token` still holds the key.
   * `ttlMs` is how long the record lives; `null` keeps it until it is evicted or deleted.
   * @returns `false` when the token no longer holds the key (its lease lapsed and another request took over).
   */
  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): Awaitable<boolean>;
  /**
   * Frees the key, only if `token` still holds it. Calling it twice is harmless.
   * @returns `false` when the token no longer holds the key.
   */
  release(key: string, token: string): Awaitable<boolean>;
  /**
   * Extends the lease of a running request to `leaseMs` from now, only if `token` still holds the key.
   * @returns `false` when the token no longer holds the key.
   */
  renew(key: string, token: string, leaseMs: number): Awaitable<boolean>;
  /**
   * Optional: resolves once the key's lock may have ended (stored, released) — woken by the backend's own
   * notification, in any process — or once `signal` aborts. Never rejects. Used by `onConflict: 'wait'`, which
   * looks the key up again after it resolves. `undefined` (or no `watch` at all): this backend cannot tell, and
   * the key is polled instead.
   */
  watch?(key: string, signal: AbortSignal): Promise<void> | undefined;
  /** Optional, for operators: the key's state, or `undefined` when nothing is held for it. See {@link KeyState}. */
  inspect?(key: string): Awaitable<KeyState | undefined>;
  /**
   * Optional, for operators: deletes the key's record, so that the next request with the key runs again. A lock
   * (a request still running) is deleted only with `force`. Resolves to whether anything was deleted.
   */
  forget?(key: string, force: boolean): Awaitable<boolean>;
}

/** What {@link Backend.inspect} tells of a key. */
export type KeyState = InFlightKeyState | CompletedKeyState;

/** A request with the key is running (or its process died and its lease has not lapsed yet). */
export interface InFlightKeyState {
  readonly state: 'in-flight';
  /** SHA-256 (hex) of the request's method, path and body. */
  readonly fingerprint: string;
  /** Milliseconds left on the lease. */
  readonly leaseLeftMs: number;
}

/** A request with the key ran; its response is stored (or it was remembered without one). */
export interface CompletedKeyState {
  readonly state: 'completed';
  readonly fingerprint: string;
  /** The stored status; `null` for a request remembered without its response (retries get 410). */
  readonly status: number | null;
  /** Milliseconds since the epoch, when it was stored. */
  readonly storedAt: number;
  /** Milliseconds since the epoch, when it expires; `null`: never. */
  readonly expiresAt: number | null;
  /** Bytes of the stored body (0 without one). */
  readonly size: number;
}

/**
 * A database transaction the engine opens for a request that runs, when the backend offers one (a backend with
 * `transactional` on and {@link TransactionalBackend.openTransaction}): the handler writes through
 * {@link BackendTransaction.client}, the engine stores the response in the same transaction, and both commit
 * together, or neither does.
 */
export interface BackendTransaction {
  /** What the handler runs its queries on, inside the transaction (for PostgreSQL, a `pg` `PoolClient`). */
  readonly client: unknown;
  /** {@link Backend.complete}, inside the transaction: fenced by the token the same way. */
  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): Promise<boolean>;
  /** Commits, and gives the connection back. */
  commit(): Promise<void>;
  /** Rolls back, and gives the connection back. Never rejects. */
  rollback(): Promise<void>;
}

/** A backend whose responses can be stored in the same transaction as the handler's own writes. */
export interface TransactionalBackend extends Backend {
  /** On: every request that runs gets a transaction of its own ({@link openTransaction}). */
  readonly transactional: boolean;
  /** Opens a transaction on a connection of its own, for one request. */
  openTransaction(): Promise<BackendTransaction>;
}
