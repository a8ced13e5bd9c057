import { IdempotencyError } from './errors.js';
import { computeFingerprint, hashKey, type RequestBody } from './fingerprint.js';
import { hasControlCharacter, isUuid4, unquoteKey } from './key.js';
import {
  type IdempotencyEvent,
  type IdempotencyOptions,
  type IdempotencyOutcome,
  type ResolvedOptions,
  resolveOptions,
} from './options.js';
import { type EngineReply, errorReply } from './responses.js';
import type { AcquireResult, Awaitable, StoredResponse } from './types.js';

/** The request passes through untouched: fail-open after a backend error. */
export interface PassResult {
  readonly kind: 'pass';
}

/** The request should run: this request holds the key's lock until {@link IdempotencyEngine.commit} or release. */
export class Ticket {
  readonly kind = 'proceed';
  /** Set once the ticket is committed or released; both are idempotent. */
  settled = false;

  constructor(
    /** The namespaced key handed to the backend. */
    readonly storageKey: string,
    /** The backend's fencing token. */
    readonly token: string,
    readonly fingerprint: string,
    readonly method: string,
    readonly startedAt: number,
  ) {}
}

/** What {@link IdempotencyEngine.begin} decides: send a reply, run the handler, or pass through. */
export type BeginResult = EngineReply | Ticket | PassResult;

const PASS: PassResult = Object.freeze({ kind: 'pass' });
const NO_DURATION = -1;
/** Longest delay a Node.js timer accepts; past it, `setInterval` fires every millisecond instead. */
const MAX_TIMER_DELAY_MS = 2 ** 31 - 1;

/** Whether a backend answered asynchronously; synchronous answers skip a microtask hop. */
export function isPromise<T>(value: Awaitable<T>): value is Promise<T> {
  return typeof (value as Promise<T> | null)?.then === 'function';
}

/**
 * The framework-agnostic core: every rule of the request flow lives here, and adapters only translate.
 *
 * An adapter calls, in order: {@link handles} (method), {@link readKey} (header), then reads the body and calls
 * {@link begin}. It sends an {@link EngineReply}, runs the handler for a {@link Ticket} and hands the captured
 * response to {@link commit} (storable) or {@link release} (anything else), and passes a `pass` result through.
 *
 * @example
 * ```ts
 * const engine = new IdempotencyEngine({ backend: new MemoryBackend() });
 * if (engine.handles(req.method)) {
 *   const key = engine.readKey(req.method, req.headers[engine.headerName]);
 *   // string: a valid key; EngineReply: send it (400/422); undefined: pass through
 * }
 * ```
 */
export class IdempotencyEngine<Req = unknown> {
  /** The validated options. */
  readonly options: ResolvedOptions<Req>;
  /** The key header's name in lower case, as Node.js presents incoming headers. */
  readonly headerName: string;
  /** The replay header's name as configured. */
  readonly replayHeaderKey: string;
  /** Whether {@link begin} needs the request body: only when the built-in fingerprint is on. */
  readonly needsBody: boolean;

  readonly #missingKey: EngineReply;
  readonly #notUuid4: EngineReply;
  readonly #tooLong: EngineReply;
  readonly #badCharacters: EngineReply;
  readonly #emptyKey: EngineReply;
  readonly #bodyTooLarge: EngineReply;
  readonly #unavailable: EngineReply;
  readonly #leases = new Set<Ticket>();
  #renewTimer: NodeJS.Timeout | undefined;

  constructor(options: IdempotencyOptions<Req>) {
    const resolved = resolveOptions(options);
    this.options = resolved;
    this.headerName = resolved.headerNameLower;
    this.replayHeaderKey = resolved.replayHeaderKey;
    this.needsBody = resolved.fingerprint === true;
    const name = resolved.headerName;
    const format = resolved.errorFormat;
    this.#missingKey = errorReply(format, 400, `'${name}' header is required`);
    this.#notUuid4 = errorReply(format, 422, `'${name}' header value must be formatted as a v4 UUID`);
    this.#tooLong = errorReply(
      format,
      422,
      `'${name}' header value must be at most ${resolved.maxKeyLength} characters`,
    );
    this.#badCharacters = errorReply(
      format,
      422,
      `'${name}' header value must not contain control characters`,
    );
    this.#emptyKey = errorReply(format, 422, `'${name}' header value must not be empty`);
    this.#bodyTooLarge = errorReply(
      format,
      413,
      `Request body exceeds the ${resolved.maxRequestBytes}-byte limit for requests with an '${name}' header`,
      [['connection', 'close']],
    );
    this.#unavailable = errorReply(format, 503, 'Idempotency backend unavailable; retry later');
  }

  /** Whether the method is one the middleware handles; any other request passes through untouched. */
  handles(method: string): boolean {
    const methods = this.options.applicableMethods;
    return methods.has(method) || methods.has(method.toUpperCase());
  }

  /**
   * Reads the key header's value. Returns the key (unquoted from RFC 8941 form), a 400/422 reply for a missing
   * (when `required`) or invalid key, or `undefined` when there is no key and the request passes through.
   */
  readKey(
    method: string,
    header: string | readonly string[] | null | undefined,
  ): string | EngineReply | undefined {
    const raw = typeof header === 'string' ? header : header?.[0];
    if (raw === undefined || raw === null || raw === '') {
      if (!this.options.required) return undefined;
      this.#emit('missing-key', undefined, method, 400, NO_DURATION);
      return this.#missingKey;
    }
    const key = unquoteKey(raw);
    const invalid =
      key.length > this.options.maxKeyLength
        ? this.#tooLong
        : key === ''
          ? this.#emptyKey
          : hasControlCharacter(key)
            ? this.#badCharacters
            : this.options.enforceUuid4Formatting && !isUuid4(key)
              ? this.#notUuid4
              : undefined;
    if (invalid === undefined) return key;
    this.#emit('invalid-key', undefined, method, 422, NO_DURATION);
    return invalid;
  }

  /**
   * Looks the key up and takes its lock in one backend call (SPEC §2 step 4). `url` is the path with its query
   * string; `body` is what {@link computeFingerprint} hashes. `startedAt` (from `performance.now()`) times events.
   */
  begin(
    req: Req,
    method: string,
    url: string,
    key: string,
    body: RequestBody,
    startedAt: number,
  ): Awaitable<BeginResult> {
    const options = this.options;
    const scope = options.scope === undefined ? undefined : options.scope(req);
    // Length-prefixed, so that no scope and key pair can spell another pair's storage key.
    const storageKey = scope === undefined || scope === null ? `-${key}` : `${scope.length}:${scope}:${key}`;
    const fingerprint =
      options.fingerprint === true
        ? computeFingerprint(method, url, body)
        : options.fingerprint === false
          ? ''
          : String(options.fingerprint(req));
    let answer: Awaitable<AcquireResult>;
    try {
      answer = options.backend.acquire(storageKey, fingerprint, options.lockTimeoutMs);
    } catch (error) {
      return this.#acquireFailed(error, storageKey, method, startedAt);
    }
    if (!isPromise(answer)) return this.#decide(answer, key, storageKey, fingerprint, method, startedAt);
    return answer.then(
      (result) => this.#decide(result, key, storageKey, fingerprint, method, startedAt),
      (error) => this.#acquireFailed(error, storageKey, method, startedAt),
    );
  }

  /**
   * Whether a response with this status and `Content-Type` may be stored. Adapters ask as soon as the headers
   * are known, to stream responses that will not be stored instead of holding them back.
   */
  isStorable(status: number, contentType: string | undefined): boolean {
    return (status < 500 || this.options.cacheServerErrors) && this.options.isCacheableType(contentType);
  }

  /** Largest request body an adapter reads for the fingerprint; see {@link bodyTooLarge}. */
  get maxRequestBytes(): number {
    return this.options.maxRequestBytes;
  }

  /**
   * The 413 reply for a request body over `maxRequestBytes`. It closes the connection, since the rest of the
   * body is left unread.
   */
  bodyTooLarge(method: string, startedAt: number): EngineReply {
    this.#emit('body-too-large', undefined, method, 413, startedAt);
    return this.#bodyTooLarge;
  }

  /** Largest body the adapter should hold back for storing; past it the response streams and is not stored. */
  get maxResponseBytes(): number {
    return this.options.maxResponseBytes;
  }

  /**
   * Stores the response and ends the lock in one fenced backend call. Never throws: a failed or refused store
   * is reported through `onEvent`, and the caller sends the response either way. Send only after it settles.
   */
  commit(ticket: Ticket, response: StoredResponse): Awaitable<void> {
    if (!this.#settle(ticket)) return;
    const record = { fingerprint: ticket.fingerprint, response, createdAt: Date.now() };
    let stored: Awaitable<boolean>;
    try {
      stored = this.options.backend.complete(ticket.storageKey, ticket.token, record, this.options.expiryMs);
    } catch (error) {
      return this.#commitFailed(ticket, error, response.status);
    }
    if (!isPromise(stored)) return this.#committed(ticket, stored, response.status);
    return stored.then(
      (ok) => this.#committed(ticket, ok, response.status),
      (error) => this.#commitFailed(ticket, error, response.status),
    );
  }

  /**
   * Frees the key so that a retry runs again: the response is not storable, the handler threw, or the client
   * went away. Never throws; idempotent. For a response that is sent, send its last byte only after it settles.
   */
  release(ticket: Ticket, status: number | undefined): Awaitable<void> {
    if (!this.#settle(ticket)) return;
    let released: Awaitable<boolean>;
    try {
      released = this.options.backend.release(ticket.storageKey, ticket.token);
    } catch (error) {
      return this.#releaseFailed(ticket, error, status);
    }
    if (!isPromise(released)) return this.#emitFor(ticket, 'not-stored', status);
    return released.then(
      () => this.#emitFor(ticket, 'not-stored', status),
      (error) => this.#releaseFailed(ticket, error, status),
    );
  }

  #decide(
    result: AcquireResult,
    key: string,
    storageKey: string,
    fingerprint: string,
    method: string,
    startedAt: number,
  ): BeginResult {
    switch (result.state) {
      case 'acquired': {
        const ticket = new Ticket(storageKey, result.token, fingerprint, method, startedAt);
        this.#holdLease(ticket);
        return ticket;
      }
      case 'completed': {
        const response = result.record.response;
        this.#emit('replayed', storageKey, method, response.status, startedAt);
        return {
          kind: 'reply',
          status: response.status,
          headers: response.headers,
          body: response.body,
          replayed: true,
        };
      }
      case 'in-flight': {
        this.#emit('conflict', storageKey, method, 409, startedAt);
        const retryAfter = String(Math.max(1, Math.ceil(result.retryAfterMs / 1000)));
        return errorReply(
          this.options.errorFormat,
          409,
          `Request already pending for idempotency key '${key}'`,
          [['retry-after', retryAfter]],
        );
      }
      case 'mismatch':
        this.#emit('mismatch', storageKey, method, 422, startedAt);
        return errorReply(
          this.options.errorFormat,
          422,
          `Idempotency key '${key}' was already used for a different request`,
        );
    }
  }

  #acquireFailed(error: unknown, storageKey: string, method: string, startedAt: number): BeginResult {
    const failOpen = this.options.failOpen;
    this.#emit(
      'backend-error',
      storageKey,
      method,
      failOpen ? undefined : 503,
      startedAt,
      backendError(error),
    );
    return failOpen ? PASS : this.#unavailable;
  }

  #committed(ticket: Ticket, stored: boolean, status: number): void {
    this.#emitFor(ticket, stored ? 'executed' : 'lease-lost', status);
  }

  #commitFailed(ticket: Ticket, error: unknown, status: number): Awaitable<void> {
    this.#emitFor(ticket, 'backend-error', status, backendError(error));
    // The store failed, so the lock may still be held: free it so that the key does not wait out its lease.
    try {
      const released = this.options.backend.release(ticket.storageKey, ticket.token);
      if (isPromise(released)) return released.then(noop, noop);
    } catch {}
  }

  #releaseFailed(ticket: Ticket, error: unknown, status: number | undefined): void {
    this.#emitFor(ticket, 'backend-error', status, backendError(error));
  }

  #settle(ticket: Ticket): boolean {
    if (ticket.settled) return false;
    ticket.settled = true;
    this.#leases.delete(ticket);
    return true;
  }

  /** Renews every running request's lease on one shared timer, a third of `lockTimeout` apart. */
  #holdLease(ticket: Ticket): void {
    this.#leases.add(ticket);
    if (this.#renewTimer !== undefined) return;
    const interval = Math.min(this.options.lockTimeoutMs / 3, MAX_TIMER_DELAY_MS);
    this.#renewTimer = setInterval(() => this.#renewLeases(), interval);
    this.#renewTimer.unref();
  }

  #renewLeases(): void {
    if (this.#leases.size === 0) {
      clearInterval(this.#renewTimer);
      this.#renewTimer = undefined;
      return;
    }
    const { backend, lockTimeoutMs } = this.options;
    for (const ticket of this.#leases) {
      try {
        const renewed = backend.renew(ticket.storageKey, ticket.token, lockTimeoutMs);
        // A lost lease needs no action here: the fenced commit will refuse and report `lease-lost`.
        if (isPromise(renewed)) renewed.catch(noop);
      } catch {}
    }
  }

  #emitFor(ticket: Ticket, outcome: IdempotencyOutcome, status: number | undefined, error?: unknown): void {
    this.#emit(outcome, ticket.storageKey, ticket.method, status, ticket.startedAt, error);
  }

  #emit(
    outcome: IdempotencyOutcome,
    storageKey: string | undefined,
    method: string,
    status: number | undefined,
    startedAt: number,
    error?: unknown,
  ): void {
    const onEvent = this.options.onEvent;
    if (onEvent === undefined) return;
    const event: IdempotencyEvent = {
      outcome,
      keyHash: storageKey === undefined ? undefined : hashKey(storageKey),
      method,
      status,
      durationMs: startedAt === NO_DURATION ? 0 : performance.now() - startedAt,
    };
    if (error !== undefined) event.error = error;
    try {
      onEvent(event);
    } catch {}
  }
}

function backendError(error: unknown): IdempotencyError {
  return error instanceof IdempotencyError
    ? error
    : new IdempotencyError('ERR_IDEMPOTENCY_BACKEND', 'The idempotency backend failed', { cause: error });
}

function noop(): void {}
