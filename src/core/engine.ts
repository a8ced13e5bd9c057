import { type Sha256, webSha256 } from './digest.js';
import { IdempotencyError } from './errors.js';
import { computeFingerprint, type RequestBody, requestTarget } from './fingerprint.js';
import { hasControlCharacter, hasSeveralValues, isUuid4, unquoteKey } from './key.js';
import { LeaseList } from './leases.js';
import { isEventStream } from './media-type.js';
import {
  type IdempotencyEvent,
  type IdempotencyOptions,
  type IdempotencyOutcome,
  type ResolvedOptions,
  resolveOptions,
} from './options.js';
import { type EngineReply, errorReply, headerValue, storedHeaders } from './responses.js';
import type {
  AcquireResult,
  Awaitable,
  Backend,
  BackendTransaction,
  HeaderPair,
  IdempotencyRecord,
  KeyState,
  StoredResponse,
  TextBodyResponse,
  TransactionalBackend,
} from './types.js';
import { TEXT_BODIES } from './types.js';
import { utf8, utf8FitsIn } from './utf8.js';

/** The request passes through untouched: fail-open after a backend error. */
export interface PassResult {
  readonly kind: 'pass';
}

/**
 * What a handler may know of its request's idempotency: the key it runs under, and a signal that tells it when to
 * stop. Each adapter hands it over its own way (`idempotencyOf(req)` for Express and `node:http`).
 */
export interface RequestIdempotency {
  /** The idempotency key as received (unquoted from its RFC 8941 form). */
  readonly key: string;
  /**
   * Aborted when this request's lease is lost (another request may now run with the same key), with an
   * `IdempotencyError` of code `ERR_IDEMPOTENCY_LEASE_LOST` as its reason: pass it to long work (`fetch`,
   * database calls) so that a handler outliving a long backend outage stops instead of running beside its
   * successor. Never aborted while the lease is held.
   */
  readonly signal: AbortSignal;
  /**
   * With a transactional backend (`new PostgresBackend({ pool, transactional: true })`): the connection the
   * request's transaction runs on (a `pg` `PoolClient`). Write through it, and the writes commit together with the
   * stored response, or roll back with it. `undefined` otherwise.
   */
  readonly db: unknown;
}

/**
 * A request that holds its key's lock and may run. The adapter runs the handler and hands its outcome to the
 * engine: {@link IdempotencyEngine.finish} with the response, {@link IdempotencyEngine.fail} when the handler
 * threw, {@link IdempotencyEngine.clientLeft} when the client went away meanwhile.
 */
export class Ticket implements RequestIdempotency {
  readonly kind = 'proceed';
  /** Set once the ticket is finished or failed; both happen once. */
  settled = false;
  /** When the client went away (`Date.now()`), if it did before its response was complete. */
  clientGoneAt: number | undefined;
  /** The lease was lost (another request took the key over) or could not be confirmed for a whole lease. */
  leaseLost = false;
  /** When the lease was last taken or renewed (`Date.now()`). */
  renewedAt = Date.now();
  /** The request's transaction, with a transactional backend, until it commits or rolls back. */
  transaction: BackendTransaction | undefined;
  /** What the handler writes through: the transaction's connection (see {@link RequestIdempotency.db}). */
  db: unknown;
  /** Milliseconds spent waiting for the backend on this request's behalf, for events. */
  backendMs = 0;
  /** When the current store or release was sent (`performance.now()`). */
  writeStartedAt = 0;
  /** Where the engine's list of leases to renew holds this request; `-1` when it does not. @internal */
  leaseSlot = -1;
  #controller: AbortController | undefined;

  constructor(
    /** The idempotency key as received. */
    readonly key: string,
    /** The namespaced key handed to the backend. */
    readonly storageKey: string,
    /** The backend's fencing token. */
    readonly token: string,
    readonly fingerprint: string,
    readonly method: string,
    /** `performance.now()` when the middleware saw the request. */
    readonly startedAt: number,
  ) {}

  /**
   * Aborted when this request's lease is lost: another request may now run with the same key, so a handler that
   * is still working (after a long backend outage, say) should stop. Made on first use.
   */
  get signal(): AbortSignal {
    this.#controller ??= new AbortController();
    if (this.leaseLost && !this.#controller.signal.aborted) this.#abort();
    return this.#controller.signal;
  }

  /** Marks the lease lost and aborts {@link signal}. */
  loseLease(): void {
    if (this.leaseLost) return;
    this.leaseLost = true;
    if (this.#controller !== undefined) this.#abort();
  }

  #abort(): void {
    this.#controller!.abort(
      new IdempotencyError('ERR_IDEMPOTENCY_LEASE_LOST', 'The idempotency lease of this request was lost'),
    );
  }
}

/** What {@link IdempotencyEngine.begin} decides: send a reply, run the handler, or pass through. */
export type BeginResult = EngineReply | Ticket | PassResult;

/**
 * A response as the handler finished it, handed to {@link IdempotencyEngine.finish}.
 */
export interface FinishedResponse {
  readonly status: number;
  /** The headers the handler (and middleware after this one) set; lower-case names, repeated names repeated. */
  readonly headers: readonly HeaderPair[];
  /**
   * The whole body: its bytes, or the string it is sent as (its UTF-8, lone surrogates as U+FFFD, which is what
   * Node.js and fetch's `Response` send for a string); `undefined` when the adapter did not keep it:
   * {@link IdempotencyEngine.plan} said `'stream'`, or it grew past {@link IdempotencyEngine.maxResponseBytes}.
   */
  readonly body: Uint8Array | string | undefined;
}

/**
 * What an adapter does with a response body once its status and type are known: `'store'` keeps the body (up to
 * `maxResponseBytes`) and holds the response back until {@link IdempotencyEngine.finish} settles; `'stream'`
 * sends it as it comes, holding back only its end until `finish` settles.
 */
export type ResponsePlan = 'store' | 'stream';

/** Adapter-level settings of the engine, not user options. */
export interface EngineRuntime {
  /** SHA-256 for fingerprints and event key hashes. @default Web Crypto's, asynchronous */
  sha256?: Sha256;
}

const PASS: PassResult = Object.freeze({ kind: 'pass' });
const NO_DURATION = -1;
/** Longest delay a timer accepts; past it, Node.js fires `setInterval` every millisecond instead. */
const MAX_TIMER_DELAY_MS = 2 ** 31 - 1;
/**
 * Waits before each new attempt of a store or release that failed: about 1.3 s in all, while the lease is still
 * renewed. A response waits for them, so that a client that retries after receiving it finds the outcome.
 */
const RETRY_DELAYS_MS: readonly number[] = [50, 250, 1000];
/**
 * After those, the response goes out and the write is tried again in the background, this long after the last
 * attempt, doubling, for as long as the lease would last: a backend that comes back within it (a Redis restart)
 * gets the response stored, or the key released, instead of leaving retries at 409 until the lease lapses.
 */
const BACKGROUND_RETRY_FIRST_MS = 2000;
/** How often `onConflict: 'wait'` looks again at a key whose backend cannot tell when it changes. */
const WAIT_POLL_MS = 200;
/** How many key hashes taken ahead (asynchronous hashing with `onEvent`) are kept for the events to come. */
const KEY_HASHES_KEPT = 1024;
/** Weight of the newest duration in the running estimate behind `Retry-After`. */
const DURATION_WEIGHT = 0.2;
/** Without `onEvent`, backend failures are reported as a process warning at most this often. */
const BACKEND_WARNING_INTERVAL_MS = 60_000;
/** The outcomes that are backend failures, warned of when nobody observes events. */
type UnobservedFailure = 'backend-error' | 'store-failed' | 'lease-lost';
const UNOBSERVED_FAILURES: ReadonlySet<IdempotencyOutcome> = new Set<UnobservedFailure>([
  'backend-error',
  'store-failed',
  'lease-lost',
]);

/** Whether a backend answered asynchronously; synchronous answers skip a microtask hop. */
export function isPromise<T>(value: Awaitable<T>): value is Promise<T> {
  return typeof (value as Promise<T> | null)?.then === 'function';
}

/**
 * The framework-agnostic core: every rule of the request flow lives here, and adapters only translate.
 *
 * An adapter calls, in order: {@link handles} (method), {@link readKey} (header), then reads the body and calls
 * {@link begin}. It sends an {@link EngineReply} as it is, passes a `pass` result through, and for a
 * {@link Ticket} runs the handler, asks {@link plan} once the status and type are known, and hands the finished
 * response to {@link finish} (or reports {@link fail} / {@link clientLeft}). It sends the response's last byte
 * only after `finish` settles.
 *
 * @example
 * ```ts
 * const engine = new IdempotencyEngine({ backend: new MemoryBackend() });
 * if (engine.handles(request.method)) {
 *   const key = engine.readKey(request.method, request.headers.get(engine.headerName));
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

  readonly #sha256: Sha256;
  /** Whether the backend takes a body sent as a string as that string: see {@link TEXT_BODIES}. */
  readonly #textBodies: boolean;
  /** Whether events are reported, so that backend times are measured (see {@link #clock}). */
  readonly #timed: boolean;
  readonly #missingKey: EngineReply;
  readonly #severalKeys: EngineReply;
  readonly #notUuid4: EngineReply;
  readonly #tooLong: EngineReply;
  readonly #badCharacters: EngineReply;
  readonly #emptyKey: EngineReply;
  readonly #bodyTooLarge: EngineReply;
  readonly #unavailable: EngineReply;
  readonly #internalError: EngineReply;
  readonly #leases = new LeaseList<Ticket>();
  #renewTimer: ReturnType<typeof setInterval> | undefined;
  /** Running estimate of how long a first run takes here, in ms: the `Retry-After` hint while one runs. */
  #typicalRunMs: number | undefined;
  /** The backend, when it opens a transaction for every request that runs. */
  readonly #transactional: TransactionalBackend | undefined;
  /** Key hashes taken ahead by {@link begin} when hashing is asynchronous, the most recent first to stay. */
  readonly #keyHashes = new Map<string, string>();
  /**
   * Requests a store of which answered `true` after it had timed out: a later attempt that finds the key no longer
   * locked found its own record, not another request's, and is no lost lease.
   */
  readonly #storedLate = new WeakSet<Ticket>();
  /**
   * Requests an attempt of whose store failed (rejected, or timed out): it may have landed with its answer lost
   * (the backend died or the connection dropped right after running it). A later attempt then finds the key
   * holding a record instead of the lock and is refused; {@link #ownRecordStored} tells its own record from
   * another request's.
   */
  readonly #storeFailed = new WeakSet<Ticket>();
  /** When the last unobserved backend failure was warned of ({@link #warnUnobserved}), and how many came since. */
  #lastWarnedAt = Number.NEGATIVE_INFINITY;
  #failuresSinceWarning = 0;

  constructor(options: IdempotencyOptions<Req>, runtime: EngineRuntime = {}) {
    const resolved = resolveOptions(options);
    this.options = resolved;
    this.#sha256 = runtime.sha256 ?? webSha256;
    this.#timed = resolved.onEvent !== undefined;
    this.#textBodies = (resolved.backend as { [TEXT_BODIES]?: unknown })[TEXT_BODIES] === true;
    const backend = resolved.backend as Partial<TransactionalBackend>;
    this.#transactional =
      backend.transactional === true && typeof backend.openTransaction === 'function'
        ? (backend as TransactionalBackend)
        : undefined;
    this.headerName = resolved.headerNameLower;
    this.replayHeaderKey = resolved.replayHeaderKey;
    this.needsBody = resolved.fingerprint === true;
    const name = resolved.headerName;
    const format = resolved.errorFormat;
    this.#missingKey = errorReply(format, 400, `'${name}' header is required`);
    this.#severalKeys = errorReply(
      format,
      400,
      `'${name}' header must be sent once, with one key (a key containing a comma must be a quoted string)`,
    );
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
    this.#internalError = errorReply(format, 500, 'Internal Server Error');
  }

  /** Whether the method is one the middleware handles; any other request passes through untouched. */
  handles(method: string): boolean {
    const methods = this.options.applicableMethods;
    return methods.has(method) || methods.has(method.toUpperCase());
  }

  /**
   * Reads the key header's value. Returns the key (unquoted from RFC 8941 form), a 400/422 reply for a missing
   * (when `required`), repeated or invalid key, or `undefined` when there is no key and the request passes
   * through. Several header lines arrive as an array, or joined with commas (Node.js and the Fetch API both
   * join them): either is refused, since no one key can be picked from them safely.
   */
  readKey(
    method: string,
    header: string | readonly string[] | null | undefined,
  ): string | EngineReply | undefined {
    let raw: string | null | undefined;
    if (typeof header === 'string' || header === null || header === undefined) raw = header;
    else if (header.length > 1) return this.#invalidKey(method, this.#severalKeys);
    else raw = header[0];
    if (raw === undefined || raw === null || raw === '') {
      if (!this.options.required) return undefined;
      this.#emit('missing-key', undefined, method, 400, NO_DURATION);
      return this.#missingKey;
    }
    if (hasSeveralValues(raw)) return this.#invalidKey(method, this.#severalKeys);
    const key = unquoteKey(raw);
    const { enforceUuid4Formatting, maxKeyLength } = this.options;
    const tooLong = key.length > maxKeyLength;
    // A v4 UUID is neither empty nor holds a control character: when UUIDs are enforced, one test answers for all.
    const uuid = enforceUuid4Formatting && isUuid4(key);
    if (uuid && !tooLong) return key;
    const invalid = tooLong
      ? this.#tooLong
      : key === ''
        ? this.#emptyKey
        : hasControlCharacter(key)
          ? this.#badCharacters
          : enforceUuid4Formatting && !uuid
            ? this.#notUuid4
            : undefined;
    return invalid === undefined ? key : this.#invalidKey(method, invalid);
  }

  /**
   * Looks the key up and takes its lock in one backend call (SPEC §2 step 4). `url` is the path with its query
   * string (an absolute URL is cut down to that); `body` is what the fingerprint hashes. `startedAt` (from
   * `performance.now()`) times events. `contentType`, the request's, lets the fingerprint hash a multipart body
   * with a fixed boundary in place of the one the client drew for this attempt.
   *
   * Throws, before any backend call, when `scope` or a `fingerprint` function throws or `scope` returns
   * something other than a string or `undefined`: the adapter answers 500, and the key is never looked up in
   * another namespace than the one intended.
   */
  begin(
    req: Req,
    method: string,
    url: string,
    key: string,
    body: RequestBody,
    startedAt: number,
    contentType?: string,
  ): Awaitable<BeginResult> {
    const storageKey = this.#storageKey(req, key);
    const fingerprint = this.#fingerprint(req, method, url, body, contentType);
    // An asynchronous hash (Web Crypto) of the key for events is taken now, beside the fingerprint, so that this
    // request's event is reported before its response goes out, as with a synchronous hash.
    const keyHash = this.options.onEvent === undefined ? undefined : this.#sha256([storageKey]);
    if (isPromise(keyHash)) {
      return Promise.all([fingerprint, keyHash]).then(([value, hash]) => {
        this.#rememberKeyHash(storageKey, hash);
        return this.#acquire(key, storageKey, value, method, startedAt);
      });
    }
    if (keyHash !== undefined) this.#rememberKeyHash(storageKey, keyHash);
    if (isPromise(fingerprint)) {
      return fingerprint.then((value) => this.#acquire(key, storageKey, value, method, startedAt));
    }
    return this.#acquire(key, storageKey, fingerprint, method, startedAt);
  }

  #rememberKeyHash(storageKey: string, hash: string): void {
    const hashes = this.#keyHashes;
    if (hashes.size >= KEY_HASHES_KEPT) hashes.delete(hashes.keys().next().value!);
    hashes.set(storageKey, hash);
  }

  /**
   * Whether to keep a response's body for storing (`'store'`) or send it as it comes (`'stream'`), from its
   * status and `Content-Type`. Adapters ask as soon as the head is known.
   */
  plan(status: number, contentType: string | undefined): ResponsePlan {
    return this.#storable(status, contentType) ? 'store' : 'stream';
  }

  /** Largest request body an adapter reads for the fingerprint; see {@link bodyTooLarge}. */
  get maxRequestBytes(): number {
    return this.options.maxRequestBytes;
  }

  /** Largest body an adapter keeps for storing; past it, the response streams and its body is not stored. */
  get maxResponseBytes(): number {
    return this.options.maxResponseBytes;
  }

  /**
   * The 413 reply for a request body over `maxRequestBytes`. It closes the connection, since the rest of the
   * body is left unread.
   */
  bodyTooLarge(method: string, startedAt: number): EngineReply {
    this.#emit('body-too-large', undefined, method, 413, startedAt);
    return this.#bodyTooLarge;
  }

  /** The 500 an adapter sends when the handler failed before it started its response, in `errorFormat`. */
  get internalError(): EngineReply {
    return this.#internalError;
  }

  /**
   * The handler finished its response: stores it and ends the lock in one fenced call, or releases the key, or
   * keeps it as completed without a body, by SPEC §2 step 5. Never throws or rejects. A store that fails is
   * retried a few times while the lease is still renewed; if it never succeeds the key is not released (a
   * request that ran is never forgotten) and its lease lapses after `lockTimeout`.
   *
   * Send the response's last byte only after the returned promise (if any) settles, so that a client that
   * received it and retries finds the outcome, never a 409.
   */
  finish(ticket: Ticket, response: FinishedResponse): Awaitable<void> {
    if (!this.#settle(ticket)) return;
    const { status, body } = response;
    const headers = storedHeaders(response.headers);
    const contentType = headerValue(headers, 'content-type');
    const storable = this.#storable(status, contentType);
    // A storable response is never an event stream: no content-type matcher accepts one.
    const eventStream = !storable && isEventStream(contentType);
    if (!storable && !eventStream) {
      // A server error after the client left may be the handler giving up because of the disconnect: its
      // outcome is unknown, so the key waits out its lease rather than inviting a second run.
      if (status >= 500 && ticket.clientGoneAt !== undefined) return this.#abandon(ticket, status);
      return this.#release(ticket, status);
    }
    this.#learnDuration(ticket);
    if (body === undefined || !this.#fits(body) || eventStream) {
      if (!this.options.rememberUnstored) return this.#release(ticket, status);
      return this.#complete(ticket, null, status, 'remembered');
    }
    // Typed as bytes, as every backend takes them; a text body only reaches a backend marked for it.
    const stored = { status, headers, body: this.#bodyToStore(body) } as StoredResponse;
    return this.#complete(ticket, stored, status, 'executed');
  }

  #fits(body: Uint8Array | string): boolean {
    const limit = this.options.maxResponseBytes;
    return typeof body === 'string' ? utf8FitsIn(body, limit) : body.byteLength <= limit;
  }

  /**
   * A body as the backend takes it: a string as it is for a backend that encodes it itself ({@link TEXT_BODIES}),
   * its UTF-8 bytes for any other.
   */
  #bodyToStore(body: Uint8Array | string): TextBodyResponse['body'] {
    return typeof body === 'string' && !this.#textBodies ? utf8(body) : body;
  }

  /**
   * The handler threw (or its promise rejected) before it finished its response. While its client is there the
   * key is released, so that a retry runs again; once its client has gone away, the failure may be the handler
   * reacting to the disconnect, so the key is left to lapse with its lease instead. Never throws or rejects.
   */
  fail(ticket: Ticket): Awaitable<void> {
    if (!this.#settle(ticket)) return;
    if (ticket.clientGoneAt !== undefined) return this.#abandon(ticket, undefined);
    return this.#release(ticket, 500);
  }

  /**
   * The client went away before its response was complete. Nothing changes for the request: it keeps its lock,
   * the lease is renewed, and its response is stored when the handler finishes. Only a handler that has not
   * finished within `lockTimeout` of the client leaving stops being renewed, so that its key is freed one lease
   * later at most.
   */
  clientLeft(ticket: Ticket): void {
    ticket.clientGoneAt ??= Date.now();
  }

  #invalidKey(method: string, reply: EngineReply): EngineReply {
    this.#emit('invalid-key', undefined, method, reply.status, NO_DURATION);
    return reply;
  }

  #storageKey(req: Req, key: string): string {
    const scopeOf = this.options.scope;
    const scope = scopeOf === undefined ? undefined : scopeOf(req);
    if (scope !== undefined && typeof scope !== 'string') {
      throw new IdempotencyError(
        'ERR_IDEMPOTENCY_SCOPE',
        `The \`scope\` function must return a string or undefined, but returned ${scope === null ? 'null' : typeof scope}`,
      );
    }
    return storageKeyOf(key, scope);
  }

  #fingerprint(
    req: Req,
    method: string,
    url: string,
    body: RequestBody,
    contentType: string | undefined,
  ): Awaitable<string> {
    const fingerprint = this.options.fingerprint;
    if (fingerprint === true) {
      return computeFingerprint(method, requestTarget(url), body, this.#sha256, contentType);
    }
    if (fingerprint === false) return '';
    return String(fingerprint(req));
  }

  #acquire(
    key: string,
    storageKey: string,
    fingerprint: string,
    method: string,
    startedAt: number,
  ): Awaitable<BeginResult> {
    let answer: Awaitable<AcquireResult>;
    const backend = this.options.backend;
    const sentAt = this.#clock();
    try {
      answer = backend.acquire(storageKey, fingerprint, this.options.lockTimeoutMs);
    } catch (error) {
      return this.#acquireFailed(error, storageKey, method, startedAt);
    }
    if (!isPromise(answer)) {
      return this.#decide(
        answer,
        key,
        storageKey,
        fingerprint,
        method,
        startedAt,
        false,
        this.#clock() - sentAt,
      );
    }
    answer = this.#bounded(answer, releaseLateLock(backend, storageKey));
    return answer.then(
      (result) =>
        this.#decide(result, key, storageKey, fingerprint, method, startedAt, false, this.#clock() - sentAt),
      (error) => this.#acquireFailed(error, storageKey, method, startedAt),
    );
  }

  #decide(
    result: AcquireResult,
    key: string,
    storageKey: string,
    fingerprint: string,
    method: string,
    startedAt: number,
    waited = false,
    backendMs = 0,
  ): Awaitable<BeginResult> {
    switch (result.state) {
      case 'acquired': {
        const ticket = new Ticket(key, storageKey, result.token, fingerprint, method, startedAt);
        ticket.backendMs = backendMs;
        this.#holdLease(ticket);
        if (this.#transactional !== undefined) return this.#openTransaction(this.#transactional, ticket);
        return ticket;
      }
      case 'completed':
        return this.#replay(result.record.response, key, storageKey, method, startedAt, backendMs);
      case 'in-flight':
        if (this.options.waitOnConflict && !waited) {
          return this.#waitForHolder(key, storageKey, fingerprint, method, startedAt, result.retryAfterMs);
        }
        this.#emit('conflict', storageKey, method, 409, startedAt, undefined, false, backendMs);
        return errorReply(
          this.options.errorFormat,
          409,
          `Request already pending for idempotency key '${key}'`,
          [['retry-after', String(this.#retryAfterSeconds(result.retryAfterMs))]],
        );
      case 'mismatch':
        this.#emit('mismatch', storageKey, method, 422, startedAt, undefined, false, backendMs);
        return errorReply(
          this.options.errorFormat,
          422,
          `Idempotency key '${key}' was already used for a different request`,
        );
    }
  }

  /**
   * `onConflict: 'wait'`: waits for the request that holds the key, up to `waitTimeout`, then answers as the key
   * stands (the replay, a run of its own if the holder released the key, 422, or 409 if it still runs). Each round
   * starts watching the key before it looks again, so that a holder finishing in between is not missed; a backend
   * without `watch` is looked at again every {@link WAIT_POLL_MS}.
   */
  async #waitForHolder(
    key: string,
    storageKey: string,
    fingerprint: string,
    method: string,
    startedAt: number,
    leaseLeftMs: number,
  ): Promise<BeginResult> {
    const backend = this.options.backend;
    const deadline = Date.now() + this.options.waitTimeoutMs;
    for (;;) {
      // A holder that stops renewing sends no notification: its lease's end is a reason to look again too.
      const remaining = Math.min(deadline - Date.now(), leaseLeftMs + 1);
      const stop = new AbortController();
      const watched = backend.watch?.(storageKey, stop.signal);
      const round = watched === undefined ? Math.min(remaining, WAIT_POLL_MS) : remaining;
      const timer = setTimeout(() => stop.abort(), Math.max(0, round));
      const woken =
        watched ??
        new Promise<void>((resolve) =>
          stop.signal.addEventListener('abort', () => resolve(), { once: true }),
        );
      let result: AcquireResult;
      try {
        const answer = backend.acquire(storageKey, fingerprint, this.options.lockTimeoutMs);
        result = isPromise(answer)
          ? await this.#bounded(answer, releaseLateLock(backend, storageKey))
          : answer;
      } catch (error) {
        clearTimeout(timer);
        stop.abort();
        return this.#acquireFailed(error, storageKey, method, startedAt);
      }
      if (result.state !== 'in-flight' || Date.now() >= deadline) {
        clearTimeout(timer);
        stop.abort();
        return this.#decide(result, key, storageKey, fingerprint, method, startedAt, true);
      }
      leaseLeftMs = result.retryAfterMs;
      await woken;
      clearTimeout(timer);
    }
  }

  /**
   * Opens the request's transaction once its lock is held (the lock itself was committed by the acquire, so that
   * duplicates see it). A transaction that cannot be opened is a backend failure: the lock is released, and
   * `onBackendError` decides.
   */
  #openTransaction(backend: TransactionalBackend, ticket: Ticket): Promise<BeginResult> {
    return backend.openTransaction().then(
      (transaction) => {
        ticket.transaction = transaction;
        ticket.db = transaction.client;
        return ticket;
      },
      (error: unknown) => {
        ticket.settled = true;
        this.#leases.delete(ticket);
        Promise.resolve()
          .then(() => backend.release(ticket.storageKey, ticket.token))
          .catch(noop);
        return this.#acquireFailed(error, ticket.storageKey, ticket.method, ticket.startedAt);
      },
    );
  }

  #replay(
    response: StoredResponse | null,
    key: string,
    storageKey: string,
    method: string,
    startedAt: number,
    backendMs: number,
  ): EngineReply {
    if (response === null) {
      this.#emit('not-replayable', storageKey, method, 410, startedAt, undefined, false, backendMs);
      return errorReply(
        this.options.errorFormat,
        410,
        `The request with idempotency key '${key}' already ran, but its response was too large to store or a stream; it cannot be replayed`,
      );
    }
    this.#emit('replayed', storageKey, method, response.status, startedAt, undefined, false, backendMs);
    return {
      kind: 'reply',
      status: response.status,
      headers: [...response.headers, [this.replayHeaderKey, 'true']],
      body: response.body,
      replayed: true,
    };
  }

  /**
   * `Retry-After` for a 409. While the holder is alive (its lease was renewed within the last third of
   * `lockTimeout`, so more than half of it is left) the lease always reads close to `lockTimeout` and says
   * nothing about when the response comes; a retry is invited after about as long as first runs take here (at
   * least 1 s). A lock whose holder stopped renewing advertises its lease's time left, when it lapses.
   */
  #retryAfterSeconds(leaseLeftMs: number): number {
    const leaseLeft = Math.max(1, Math.ceil(leaseLeftMs / 1000));
    if (leaseLeftMs <= this.options.lockTimeoutMs / 2) return leaseLeft;
    const typical = Math.max(1, Math.ceil((this.#typicalRunMs ?? 0) / 1000));
    return Math.min(typical, leaseLeft);
  }

  /**
   * `performance.now()` where a reading is reported (`onEvent` is set), 0 otherwise: the time spent waiting for
   * the backend is only ever reported, and a first run would read the clock four times for nothing.
   */
  #clock(): number {
    return this.#timed ? performance.now() : 0;
  }

  #learnDuration(ticket: Ticket): void {
    const duration = performance.now() - ticket.startedAt;
    this.#typicalRunMs =
      this.#typicalRunMs === undefined
        ? duration
        : this.#typicalRunMs + DURATION_WEIGHT * (duration - this.#typicalRunMs);
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

  #storable(status: number, contentType: string | undefined): boolean {
    return (
      (status < 500 || this.options.cacheServerErrors) &&
      !this.options.releaseStatuses.has(status) &&
      this.options.isCacheableType(contentType)
    );
  }

  #complete(
    ticket: Ticket,
    response: StoredResponse | null,
    status: number,
    outcome: 'executed' | 'remembered',
  ): Awaitable<void> {
    const record: IdempotencyRecord = { fingerprint: ticket.fingerprint, response, createdAt: Date.now() };
    return this.#write(ticket, record, status, outcome, 0);
  }

  #release(ticket: Ticket, status: number): Awaitable<void> {
    return this.#write(ticket, undefined, status, 'not-stored', 0);
  }

  #abandon(ticket: Ticket, status: number | undefined): Awaitable<void> {
    this.#leases.delete(ticket);
    this.#emitFor(ticket, 'abandoned', status);
    return this.#rollBack(ticket);
  }

  /** Rolls the request's transaction back, if it has one still open. */
  #rollBack(ticket: Ticket): Awaitable<void> {
    const transaction = ticket.transaction;
    if (transaction === undefined) return;
    ticket.transaction = undefined;
    return transaction.rollback().catch(noop);
  }

  /**
   * Stores the response in the request's transaction and commits it with the handler's writes. A store the token
   * no longer fences (the lease was lost) rolls everything back. A commit that fails leaves nothing of the request
   * in the database: the key is released (fenced, so a commit that did land is not undone) and a retry runs again.
   */
  #completeInTransaction(
    ticket: Ticket,
    transaction: BackendTransaction,
    record: IdempotencyRecord,
    status: number,
    outcome: IdempotencyOutcome,
  ): Promise<void> {
    ticket.transaction = undefined;
    const { expiryMs } = this.options;
    return transaction.complete(ticket.storageKey, ticket.token, record, expiryMs).then(
      (held) => {
        if (!held)
          return transaction.rollback().then(() => this.#written(ticket, record, false, status, outcome));
        return transaction.commit().then(
          () => this.#written(ticket, record, true, status, outcome),
          (error: unknown) => this.#commitFailed(ticket, transaction, status, error),
        );
      },
      (error: unknown) => this.#commitFailed(ticket, transaction, status, error),
    );
  }

  #commitFailed(
    ticket: Ticket,
    transaction: BackendTransaction,
    status: number,
    error: unknown,
  ): Awaitable<void> {
    this.#emitFor(ticket, 'store-failed', status, backendError(error));
    return transaction
      .rollback()
      .catch(noop)
      .then(() => this.#write(ticket, undefined, status, 'not-stored', 0, false));
  }

  /**
   * One fenced write: a store (`record` given) or a release. A failed one is retried after
   * {@link RETRY_DELAYS_MS} while the lease is still renewed; after the last failure the lease is left to lapse.
   * Synchronous when the backend is and the write succeeds, with nothing allocated for retries then. Never
   * throws or rejects.
   */
  #write(
    ticket: Ticket,
    record: IdempotencyRecord | undefined,
    status: number,
    outcome: IdempotencyOutcome,
    retry: number,
    report = true,
  ): Awaitable<void> {
    const transaction = ticket.transaction;
    if (transaction !== undefined) {
      if (record !== undefined)
        return this.#completeInTransaction(ticket, transaction, record, status, outcome);
      // Nothing of the request is kept: its writes roll back with the transaction, then the key is released.
      const rolledBack = this.#rollBack(ticket);
      if (rolledBack !== undefined)
        return rolledBack.then(() => this.#write(ticket, record, status, outcome, retry));
    }
    const { backend, expiryMs } = this.options;
    ticket.writeStartedAt = this.#clock();
    let result: Awaitable<boolean>;
    try {
      result =
        record === undefined
          ? backend.release(ticket.storageKey, ticket.token)
          : backend.complete(ticket.storageKey, ticket.token, record, expiryMs);
    } catch (error) {
      return this.#writeFailed(ticket, record, status, outcome, retry, error);
    }
    if (!isPromise(result))
      return this.#written(ticket, record, result, status, report ? outcome : undefined);
    return this.#bounded(result, record === undefined ? undefined : this.#lateStore(ticket)).then(
      (held) => this.#written(ticket, record, held, status, report ? outcome : undefined),
      (error: unknown) => this.#writeFailed(ticket, record, status, outcome, retry, error),
    );
  }

  /** `outcome` undefined: already reported (a failed commit, released afterwards). */
  #written(
    ticket: Ticket,
    record: IdempotencyRecord | undefined,
    held: boolean,
    status: number,
    outcome: IdempotencyOutcome | undefined,
  ): Awaitable<void> {
    this.#leases.delete(ticket);
    ticket.backendMs += this.#clock() - ticket.writeStartedAt;
    if (outcome === undefined) return;
    // A release that finds the lock gone is as good as done; a store that does is a lost lease, unless an earlier
    // attempt of it landed (its answer lost): then the record there is its own.
    const stored = held || this.#storedLate.has(ticket);
    if (record !== undefined && !stored && this.#storeFailed.has(ticket)) {
      const own = this.#ownRecordStored(ticket, record);
      if (own !== undefined)
        return own.then((found) => this.#emitFor(ticket, found ? outcome : 'lease-lost', status));
    }
    this.#emitFor(ticket, record === undefined || stored ? outcome : 'lease-lost', status);
  }

  /**
   * Whether the key holds this request's own record (same fingerprint, same `createdAt`), looked up with the
   * backend's optional `inspect`, bounded by `backendTimeout`; `undefined` when the backend cannot tell. Never
   * rejects.
   */
  #ownRecordStored(ticket: Ticket, record: IdempotencyRecord): Promise<boolean> | undefined {
    const { backend } = this.options;
    if (backend.inspect === undefined) return undefined;
    let state: Awaitable<KeyState | undefined>;
    try {
      state = backend.inspect(ticket.storageKey);
    } catch {
      return Promise.resolve(false);
    }
    return this.#bounded(Promise.resolve(state)).then(
      (found) =>
        found?.state === 'completed' &&
        found.fingerprint === record.fingerprint &&
        found.storedAt === record.createdAt,
      () => false,
    );
  }

  /** Notes a store that answered `true` after it timed out (see {@link #storedLate}). */
  #lateStore(ticket: Ticket): (held: boolean) => void {
    return (held) => {
      if (held) this.#storedLate.add(ticket);
    };
  }

  #writeFailed(
    ticket: Ticket,
    record: IdempotencyRecord | undefined,
    status: number,
    outcome: IdempotencyOutcome,
    retry: number,
    error: unknown,
  ): Awaitable<void> {
    if (record !== undefined) this.#storeFailed.add(ticket);
    // A write that did not answer within backendTimeout is not retried while the response waits: the backend is
    // hung, a new attempt would queue behind the first and wait as long, and the response would wait for each.
    if (retry < RETRY_DELAYS_MS.length && !isTimeout(error)) {
      return delay(RETRY_DELAYS_MS[retry]!).then(() =>
        this.#write(ticket, record, status, outcome, retry + 1),
      );
    }
    this.#retryInBackground(ticket, record, status, outcome, error);
  }

  /**
   * Goes on trying a store or release that failed while the response was held, after it went out: fenced by the
   * token like every write, so it never overwrites a request that took the key over. Its outcome is reported
   * when it is known: the stored response (`executed`), or, once the lease would have lapsed, `store-failed` (or
   * `backend-error` for a release), the key left to lapse.
   */
  #retryInBackground(
    ticket: Ticket,
    record: IdempotencyRecord | undefined,
    status: number,
    outcome: IdempotencyOutcome,
    lastError: unknown,
  ): void {
    const giveUpAt = Date.now() + this.options.lockTimeoutMs;
    const giveUp = (error: unknown) => {
      this.#leases.delete(ticket);
      this.#emitFor(
        ticket,
        record === undefined ? 'backend-error' : 'store-failed',
        status,
        backendError(error),
      );
    };
    const attempt = (waitMs: number, error: unknown): void => {
      if (Date.now() + waitMs >= giveUpAt) return giveUp(error);
      const timer = setTimeout(() => {
        let result: Awaitable<boolean>;
        const { backend, expiryMs } = this.options;
        try {
          result =
            record === undefined
              ? backend.release(ticket.storageKey, ticket.token)
              : backend.complete(ticket.storageKey, ticket.token, record, expiryMs);
        } catch (thrown) {
          return attempt(waitMs * 2, thrown);
        }
        (isPromise(result)
          ? this.#bounded(result, record === undefined ? undefined : this.#lateStore(ticket))
          : Promise.resolve(result)
        ).then(
          (held) => this.#written(ticket, record, held, status, outcome),
          (failed: unknown) => attempt(waitMs * 2, failed),
        );
      }, waitMs);
      (timer as { unref?: () => void }).unref?.();
    };
    attempt(BACKGROUND_RETRY_FIRST_MS, lastError);
  }

  /**
   * A backend call that answers within `backendTimeout`, or a rejection with `ERR_IDEMPOTENCY_BACKEND_TIMEOUT`:
   * the middleware bounds a hung backend itself, whatever the client's settings. `late` is given an answer that
   * came after the caller was told of the timeout.
   */
  #bounded<T>(call: Promise<T>, late?: (value: T) => void): Promise<T> {
    const timeoutMs = this.options.backendTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        reject(
          new IdempotencyError(
            'ERR_IDEMPOTENCY_BACKEND_TIMEOUT',
            `The idempotency backend did not answer within ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
      (timer as { unref?: () => void }).unref?.();
      call.then(
        (value) => {
          clearTimeout(timer);
          if (!timedOut) resolve(value);
          else late?.(value);
        },
        (error: unknown) => {
          clearTimeout(timer);
          if (!timedOut) reject(error);
        },
      );
    });
  }

  #settle(ticket: Ticket): boolean {
    if (ticket.settled) return false;
    ticket.settled = true;
    return true;
  }

  /** Renews every running request's lease on one shared timer, a third of `lockTimeout` apart. */
  #holdLease(ticket: Ticket): void {
    this.#leases.add(ticket);
    if (this.#renewTimer !== undefined) return;
    const interval = Math.min(this.options.lockTimeoutMs / 3, MAX_TIMER_DELAY_MS);
    const timer = setInterval(() => this.#renewLeases(), interval);
    (timer as { unref?: () => void }).unref?.();
    this.#renewTimer = timer;
  }

  #renewLeases(): void {
    if (this.#leases.size === 0) {
      clearInterval(this.#renewTimer);
      this.#renewTimer = undefined;
      return;
    }
    const { backend, lockTimeoutMs } = this.options;
    const now = Date.now();
    for (const ticket of this.#leases.snapshot()) {
      // The bound on a handler whose client left: it had a whole lease to finish; now its lease may lapse.
      if (
        !ticket.settled &&
        ticket.clientGoneAt !== undefined &&
        now - ticket.clientGoneAt >= lockTimeoutMs
      ) {
        this.#leases.delete(ticket);
        continue;
      }
      if (now - ticket.renewedAt > lockTimeoutMs) ticket.loseLease();
      const renewed = (held: boolean) => {
        if (held) ticket.renewedAt = Date.now();
        else if (!ticket.settled) {
          ticket.loseLease();
          this.#leases.delete(ticket);
        }
      };
      try {
        const result = backend.renew(ticket.storageKey, ticket.token, lockTimeoutMs);
        if (isPromise(result)) this.#bounded(result).then(renewed, noop);
        else renewed(result);
      } catch {}
    }
  }

  #emitFor(ticket: Ticket, outcome: IdempotencyOutcome, status: number | undefined, error?: unknown): void {
    this.#emit(
      outcome,
      ticket.storageKey,
      ticket.method,
      status,
      ticket.startedAt,
      error,
      ticket.clientGoneAt !== undefined,
      ticket.backendMs,
    );
  }

  /**
   * A backend failure nobody listens to (no `onEvent`) would leave only 503s, requests run without idempotency,
   * or responses not stored, with nothing in the logs: it is reported as a process warning
   * (`IDEMPOTENCY_BACKEND_ERROR`), at most one per {@link BACKEND_WARNING_INTERVAL_MS}, counting those in between.
   * On a runtime without `process.emitWarning`, with `console.warn`.
   */
  #warnUnobserved(outcome: UnobservedFailure, error: unknown): void {
    const now = Date.now();
    if (now - this.#lastWarnedAt < BACKEND_WARNING_INTERVAL_MS) {
      this.#failuresSinceWarning++;
      return;
    }
    const more = this.#failuresSinceWarning;
    this.#lastWarnedAt = now;
    this.#failuresSinceWarning = 0;
    const what =
      outcome === 'store-failed'
        ? 'a response was sent but could not be stored; its key is left to lapse'
        : outcome === 'lease-lost'
          ? 'a response was sent but not stored: its lease had lapsed or its key was forgotten with force, and a retry may have run the key again (a backend unreachable for longer than lockTimeout, or a forget with force by an operator)'
          : this.options.failOpen
            ? 'the backend failed; while it does, requests run without idempotency (onBackendError: fail-open)'
            : 'the backend failed; while it does, requests get 503 (onBackendError: fail-closed)';
    const cause = error === undefined ? '' : `: ${failureMessage(error)}`;
    const since = more > 0 ? ` (${more} more failures since the previous warning)` : '';
    const message = `idempotency-header: ${what}${cause}${since}. Pass onEvent to observe every one.`;
    const runtime = (globalThis as { process?: { emitWarning?: (message: string, options: object) => void } })
      .process;
    if (typeof runtime?.emitWarning === 'function') {
      runtime.emitWarning(message, { code: 'IDEMPOTENCY_BACKEND_ERROR' });
    } else console.warn(message);
  }

  #emit(
    outcome: IdempotencyOutcome,
    storageKey: string | undefined,
    method: string,
    status: number | undefined,
    startedAt: number,
    error?: unknown,
    clientGone?: boolean,
    backendMs?: number,
  ): void {
    const onEvent = this.options.onEvent;
    if (onEvent === undefined) {
      if (UNOBSERVED_FAILURES.has(outcome)) this.#warnUnobserved(outcome as UnobservedFailure, error);
      return;
    }
    const event: IdempotencyEvent = {
      outcome,
      keyHash: undefined,
      method,
      status,
      durationMs: startedAt === NO_DURATION ? 0 : performance.now() - startedAt,
    };
    if (error !== undefined) event.error = error;
    if (clientGone) event.clientGone = true;
    if (backendMs !== undefined) event.backendMs = backendMs;
    const report = () => {
      try {
        onEvent(event);
      } catch {}
    };
    if (storageKey === undefined) return report();
    const known = this.#keyHashes.get(storageKey);
    if (known !== undefined) {
      event.keyHash = known;
      return report();
    }
    const keyHash = this.#sha256([storageKey]);
    if (!isPromise(keyHash)) {
      event.keyHash = keyHash;
      return report();
    }
    keyHash.then((hash) => {
      event.keyHash = hash;
      report();
    }, report);
  }
}

/**
 * The key a backend stores an idempotency key under: the key alone (`-key`), or with its scope, length-prefixed
 * (`<length of scope>:<scope>:<key>`), so that no scope and key pair can spell another pair's storage key.
 */
export function storageKeyOf(key: string, scope?: string): string {
  // Joined rather than concatenated: `+` makes a rope (a V8 cons string) that every later character access walks
  // (the backend hashes the key, compares it, copies it), where `join` writes one flat string.
  return (scope === undefined ? ['-', key] : [scope.length, ':', scope, ':', key]).join('');
}

/** An acquire that succeeds after its caller gave up took a lock nobody will use: it is freed at once. */
function releaseLateLock(backend: Backend, storageKey: string): (late: AcquireResult) => void {
  return (late) => {
    if (late.state === 'acquired') Promise.resolve(backend.release(storageKey, late.token)).catch(noop);
  };
}

function isTimeout(error: unknown): boolean {
  return error instanceof IdempotencyError && error.code === 'ERR_IDEMPOTENCY_BACKEND_TIMEOUT';
}

/**
 * What a backend failure says, with the original error's message when the failure only wraps it.
 */
function failureMessage(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = (error as { cause?: unknown }).cause;
  if (error instanceof IdempotencyError && cause instanceof Error && !error.message.includes(cause.message)) {
    return `${error.message}: ${cause.message}`;
  }
  return error.message;
}

function backendError(error: unknown): IdempotencyError {
  return error instanceof IdempotencyError
    ? error
    : new IdempotencyError('ERR_IDEMPOTENCY_BACKEND', 'The idempotency backend failed', { cause: error });
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function noop(): void {}
