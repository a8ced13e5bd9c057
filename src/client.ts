/**
 * `idempotency-header/client`: the other end of the protocol. A `fetch` that gives each logical call one
 * idempotency key and retries with that same key until the server answers for good, so that a call whose
 * response was lost, or that met a request still running, ends with one execution and its response.
 *
 * Web APIs only (`fetch`, `Request`, `Headers`, `AbortSignal`, `crypto.randomUUID`, timers): it runs on Node.js,
 * Bun, Deno and Cloudflare Workers alike.
 *
 * @packageDocumentation
 */
import { invalidOption } from './core/errors.js';

/** One attempt that is retried, as {@link IdempotentFetchOptions.onRetry} reports it. */
export interface IdempotentRetry {
  /** The idempotency key every attempt of the call carries. */
  readonly key: string;
  /** The attempt that failed: 1 for the first. */
  readonly attempt: number;
  /** How long the client waits before the next attempt, in milliseconds. */
  readonly delayMs: number;
  /** The status that is retried (409, 429, 502, 503 or 504); `undefined` after a network error. */
  readonly status: number | undefined;
  /** What the response's `Retry-After` asked for, in milliseconds; `undefined` when it had none. */
  readonly retryAfterMs: number | undefined;
  /** The network error that is retried; `undefined` after a response. */
  readonly error: unknown;
}

/** The `fetch` the client calls for each attempt: the global one, or any with its signature. */
export type FetchFunction = (input: Request, init?: RequestInit) => Promise<Response>;

/**
 * Options of {@link idempotentFetch} and {@link createIdempotentFetch}.
 *
 * @example
 * ```ts
 * const options: IdempotentFetchOptions = { maxAttempts: 8, onRetry: (retry) => console.warn(retry) };
 * ```
 */
export interface IdempotentFetchOptions {
  /**
   * The `fetch` that sends each attempt. Looked up at each call when not given, so that a `fetch` installed
   * later (a polyfill, a test double) is the one used.
   * @default globalThis.fetch
   */
  fetch?: FetchFunction;
  /**
   * Makes the key of a call that brings none.
   * @default () => crypto.randomUUID() (a v4 UUID)
   */
  generateKey?: () => string;
  /**
   * The request header that carries the key.
   * @default 'Idempotency-Key'
   */
  headerName?: string;
  /**
   * Methods that get a key and retries, compared case-insensitively. Any other request is passed to `fetch` as
   * it is, once.
   * @default ['POST', 'PATCH']
   */
  methods?: readonly string[];
  /**
   * Attempts in all, the first included. When they run out, the last response is returned (or the last network
   * error thrown).
   * @default 5
   */
  maxAttempts?: number;
  /**
   * Milliseconds from the first attempt after which no new attempt starts: a wait that would end later is not
   * taken, and the last response is returned (or the last network error thrown). An attempt in progress is not
   * cut short; pass a `signal` for that.
   * @default 60000
   */
  maxElapsedMs?: number;
  /**
   * The first backoff's ceiling, in milliseconds; it doubles after each attempt. Each wait is drawn uniformly
   * between 0 and the ceiling ("full jitter"), so that clients that failed together do not retry together.
   * @default 100
   */
  baseDelayMs?: number;
  /**
   * The largest backoff ceiling, in milliseconds. A `Retry-After` longer than this is still honoured.
   * @default 10000
   */
  maxDelayMs?: number;
  /** Called before each wait, with the attempt that is retried. Exceptions it throws are swallowed. */
  onRetry?: (retry: IdempotentRetry) => void;
}

/**
 * Options of one call: any of {@link IdempotentFetchOptions}, and its key.
 *
 * @example
 * ```ts
 * await api(url, { method: 'POST', body }, { key: order.id, maxAttempts: 3 });
 * ```
 */
export interface IdempotentCallOptions extends IdempotentFetchOptions {
  /**
   * The key of this call, e.g. an id the application keeps for the operation so that a retry after a restart
   * uses it again. A key the request already carries in its header wins over this; without either, a new key is
   * made with `generateKey`.
   */
  key?: string;
}

/** Default of {@link IdempotentFetchOptions.headerName}. */
export const DEFAULT_CLIENT_HEADER_NAME = 'Idempotency-Key';
/** Default of {@link IdempotentFetchOptions.methods}. */
export const DEFAULT_CLIENT_METHODS: readonly string[] = Object.freeze(['POST', 'PATCH']);
/** Default of {@link IdempotentFetchOptions.maxAttempts}. */
export const DEFAULT_MAX_ATTEMPTS = 5;
/** Default of {@link IdempotentFetchOptions.maxElapsedMs}. */
export const DEFAULT_MAX_ELAPSED_MS = 60_000;
/** Default of {@link IdempotentFetchOptions.baseDelayMs}. */
export const DEFAULT_BASE_DELAY_MS = 100;
/** Default of {@link IdempotentFetchOptions.maxDelayMs}. */
export const DEFAULT_MAX_DELAY_MS = 10_000;

/**
 * The statuses that mean "not done yet, the same request may succeed later", and so are retried with the same
 * key: 409 (the first request with this key is still running), 429 (rate limited), and 502, 503, 504 (a gateway
 * or the server's backend failed before the request ran, or while it ran: the key makes a retry safe either way).
 * Every other status is final, 4xx above all: 400 and 422 will not change on a retry, and 410 says the request
 * ran but its response could not be kept, so a retry would only be refused again.
 */
export const RETRIED_STATUSES: ReadonlySet<number> = new Set([409, 429, 502, 503, 504]);

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** Every option name, from one typed source (a misspelt option is refused rather than ignored). */
const OPTION_NAMES: Record<keyof IdempotentCallOptions, true> = {
  fetch: true,
  generateKey: true,
  headerName: true,
  methods: true,
  maxAttempts: true,
  maxElapsedMs: true,
  baseDelayMs: true,
  maxDelayMs: true,
  onRetry: true,
  key: true,
};

/** Options after validation. */
interface Resolved {
  readonly fetch: FetchFunction | undefined;
  readonly generateKey: () => string;
  readonly headerName: string;
  readonly methods: ReadonlySet<string>;
  readonly maxAttempts: number;
  readonly maxElapsedMs: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
  readonly onRetry: ((retry: IdempotentRetry) => void) | undefined;
}

/**
 * Builds an idempotent `fetch` with options set once: the same signature as `fetch`, plus per-call options
 * (a `key`, or any option to override) as a third argument. Options are checked here, once.
 *
 * @example
 * ```ts
 * import { createIdempotentFetch } from 'idempotency-header/client';
 *
 * const api = createIdempotentFetch({ maxAttempts: 6, onRetry: (r) => console.warn('retrying', r) });
 * const response = await api('https://api.example.com/orders', {
 *   method: 'POST',
 *   headers: { 'content-type': 'application/json' },
 *   body: JSON.stringify({ item: 'book' }),
 * });
 * ```
 */
export function createIdempotentFetch(options: IdempotentFetchOptions = {}): IdempotentFetch {
  // A key belongs to one call: preset, every call would share it and get the first call's response.
  if (options !== null && typeof options === 'object' && 'key' in options) {
    throw invalidOption(
      'key',
      'no key in the preset options (pass it per call)',
      (options as { key: unknown }).key,
    );
  }
  const resolved = resolveClientOptions(options, undefined);
  return function idempotentFetch(input, init, callOptions) {
    if (callOptions === undefined) return send(input, init, resolved, undefined);
    try {
      return send(input, init, resolveClientOptions(callOptions, resolved), keyOption(callOptions.key));
    } catch (error) {
      return Promise.reject(error);
    }
  };
}

/** The function {@link createIdempotentFetch} returns: {@link idempotentFetch} with its options preset. */
export type IdempotentFetch = (
  input: string | URL | Request,
  init?: RequestInit,
  options?: IdempotentCallOptions,
) => Promise<Response>;

/**
 * `fetch` for requests that must not run twice: a POST or PATCH gets an `Idempotency-Key` (a new v4 UUID, or
 * the one it carries already, or `options.key`), and is retried with that same key on network errors and on
 * 409, 429, 502, 503 and 504, with exponential backoff and full jitter, never sooner than `Retry-After` asks.
 * A server with idempotency keys runs it once whatever happens on the way, and every attempt after the first
 * run gets that run's response. A request body that is a stream is read once, and each attempt sends its bytes.
 *
 * Resolves with the first final response (any status not retried, 4xx included), or with the last response
 * when attempts or time run out; rejects with the last network error when every attempt failed that way, or
 * with the signal's reason as soon as `init.signal` aborts. Other methods are passed to `fetch` as they are.
 *
 * @example
 * ```ts
 * import { idempotentFetch } from 'idempotency-header/client';
 *
 * const response = await idempotentFetch('https://api.example.com/payments', {
 *   method: 'POST',
 *   headers: { 'content-type': 'application/json' },
 *   body: JSON.stringify({ amount: 1000 }),
 *   signal: AbortSignal.timeout(30_000),
 * });
 * ```
 */
export function idempotentFetch(
  input: string | URL | Request,
  init?: RequestInit,
  options?: IdempotentCallOptions,
): Promise<Response> {
  try {
    return send(input, init, resolveClientOptions(options ?? {}, undefined), keyOption(options?.key));
  } catch (error) {
    return Promise.reject(error);
  }
}

function resolveClientOptions(options: IdempotentFetchOptions, base: Resolved | undefined): Resolved {
  if (options === null || typeof options !== 'object') throw invalidOption('options', 'an object', options);
  for (const name of Object.keys(options)) {
    if (!Object.hasOwn(OPTION_NAMES, name))
      throw invalidOption(name, 'no such option (check its spelling)', name);
  }
  const headerName = options.headerName ?? base?.headerName ?? DEFAULT_CLIENT_HEADER_NAME;
  if (typeof headerName !== 'string' || !HEADER_NAME.test(headerName)) {
    throw invalidOption('headerName', 'a header name', headerName);
  }
  const methods = options.methods;
  if (
    methods !== undefined &&
    (!Array.isArray(methods) || methods.length === 0 || !methods.every((m) => typeof m === 'string'))
  ) {
    throw invalidOption('methods', 'a non-empty array of HTTP method names', methods);
  }
  return {
    fetch: functionOption('fetch', options.fetch) ?? base?.fetch,
    generateKey: functionOption('generateKey', options.generateKey) ?? base?.generateKey ?? randomKey,
    headerName,
    methods:
      methods === undefined
        ? (base?.methods ?? new Set(DEFAULT_CLIENT_METHODS))
        : new Set(methods.map((method) => method.toUpperCase())),
    maxAttempts: count('maxAttempts', options.maxAttempts, base?.maxAttempts ?? DEFAULT_MAX_ATTEMPTS),
    maxElapsedMs: milliseconds(
      'maxElapsedMs',
      options.maxElapsedMs,
      base?.maxElapsedMs ?? DEFAULT_MAX_ELAPSED_MS,
    ),
    baseDelayMs: milliseconds('baseDelayMs', options.baseDelayMs, base?.baseDelayMs ?? DEFAULT_BASE_DELAY_MS),
    maxDelayMs: milliseconds('maxDelayMs', options.maxDelayMs, base?.maxDelayMs ?? DEFAULT_MAX_DELAY_MS),
    onRetry: functionOption('onRetry', options.onRetry) ?? base?.onRetry,
  };
}

function keyOption(key: unknown): string | undefined {
  if (key === undefined || (typeof key === 'string' && key !== '')) return key;
  throw invalidOption('key', 'a non-empty string', key);
}

function functionOption<F>(name: string, value: F | undefined): F | undefined {
  if (value === undefined || typeof value === 'function') return value;
  throw invalidOption(name, 'a function', value);
}

function count(name: string, value: unknown, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) {
    throw invalidOption(name, 'a positive integer', value);
  }
  return value;
}

function milliseconds(name: string, value: unknown, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || Number.isNaN(value) || value < 0) {
    throw invalidOption(name, 'a number of milliseconds, 0 or more (Infinity for no limit)', value);
  }
  return value;
}

function randomKey(): string {
  return crypto.randomUUID();
}

async function send(
  input: string | URL | Request,
  init: RequestInit | undefined,
  options: Resolved,
  key: string | undefined,
): Promise<Response> {
  const fetchImpl = options.fetch ?? (globalThis.fetch as FetchFunction);
  // The request as fetch would see it: the method, headers and body merged from `input` and `init`, and every
  // invalid argument thrown now, before any attempt.
  const request = new Request(input, init);
  if (!options.methods.has(request.method.toUpperCase())) {
    // Passed on as fetch would have received it (`input` itself may no longer be usable: making `request`
    // took over its body).
    return fetchImpl(request);
  }
  const signal = request.signal;
  signal.throwIfAborted();
  const headers = new Headers(request.headers);
  const callKey = headers.get(options.headerName) || key || options.generateKey();
  headers.set(options.headerName, callKey);
  // Read once, so that every attempt sends the same bytes: a stream can be read only once, and a retry that sent
  // a different (or empty) body would be refused as a different request (422).
  const body = request.body === null ? null : await request.arrayBuffer();
  const startedAt = Date.now();
  for (let attempt = 1; ; attempt++) {
    let response: Response | undefined;
    let failure: unknown;
    try {
      response = await fetchImpl(new Request(request, { headers, body }));
    } catch (error) {
      // A request stopped by its own signal is not a network failure: it ends the call.
      if (signal.aborted) throw signal.reason;
      failure = error;
    }
    if (response !== undefined && !RETRIED_STATUSES.has(response.status)) return response;
    const retryAfterMs = response === undefined ? undefined : retryAfter(response.headers.get('retry-after'));
    const ceiling = Math.min(options.maxDelayMs, options.baseDelayMs * 2 ** (attempt - 1));
    const delayMs = Math.max(Math.floor(Math.random() * ceiling), retryAfterMs ?? 0);
    if (attempt >= options.maxAttempts || Date.now() - startedAt + delayMs > options.maxElapsedMs) {
      if (response !== undefined) return response;
      throw failure;
    }
    // The connection is freed before the wait: an unread body would hold it.
    await response?.body?.cancel().catch(() => {});
    try {
      options.onRetry?.({
        key: callKey,
        attempt,
        delayMs,
        status: response?.status,
        retryAfterMs,
        error: failure,
      });
    } catch {}
    await wait(delayMs, signal);
  }
}

/**
 * `Retry-After` in milliseconds: a number of seconds, or an HTTP date (a date already past is 0). `undefined`
 * when absent or unreadable.
 */
function retryAfter(value: string | null, now: number = Date.now()): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - now);
}

/** Waits `ms`, or rejects with the signal's reason as soon as it aborts. */
function wait(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
