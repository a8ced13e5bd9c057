import { invalidOption, rejectUnknownOptions } from './errors.js';
import { createMediaTypeMatcher, JSON_MEDIA_TYPES, type MediaTypeMatcher } from './media-type.js';
import type { Backend } from './types.js';

/**
 * What happened to a request the middleware handled; see {@link IdempotencyEvent}.
 *
 * - `executed`: the handler ran and its response is stored.
 * - `replayed`: a stored response was sent again (the handler did not run).
 * - `conflict`: 409, the first request with this key is still running.
 * - `mismatch`: 422, the key was used for a different request.
 * - `invalid-key`: 400 or 422, a malformed key (or several key headers).
 * - `missing-key`: 400, no key and `required` is on.
 * - `body-too-large`: 413, a request body over `maxRequestBytes`.
 * - `not-stored`: the handler ran, its response was not stored and the key was released (a type outside
 *   `cacheableContentTypes`, a 5xx, a status in `releaseStatuses`, or the handler threw), so a retry runs again.
 * - `remembered`: the handler ran to completion, its response was too large to store or an event stream; the
 *   key is kept as completed and a retry gets 410.
 * - `not-replayable`: 410, a retry of a `remembered` key.
 * - `store-failed`: the handler ran but its response could not be stored after several attempts; the key is not
 *   released, so retries get 409 until the lease lapses (`lockTimeout`).
 * - `abandoned`: the handler failed (threw, or answered 5xx) after its client had gone away; the key is not
 *   released, its lease lapses after `lockTimeout`.
 * - `backend-error`: the backend failed on lookup (503 or fail-open) or on release.
 * - `lease-lost`: the handler ran, but its lease had lapsed and another request took the key over, so its store
 *   was refused.
 */
export type IdempotencyOutcome =
  | 'executed'
  | 'replayed'
  | 'conflict'
  | 'mismatch'
  | 'invalid-key'
  | 'missing-key'
  | 'not-stored'
  | 'backend-error'
  | 'lease-lost'
  | 'body-too-large'
  | 'remembered'
  | 'not-replayable'
  | 'store-failed'
  | 'abandoned';

/** Reported once per handled request through {@link IdempotencyOptions.onEvent}: for logs and metrics. */
export interface IdempotencyEvent {
  /** What happened. */
  outcome: IdempotencyOutcome;
  /** SHA-256 (hex) of the scoped key; never the raw key. `undefined` when no usable key was sent. */
  keyHash: string | undefined;
  /** Request method. */
  method: string;
  /** Status sent to the client; `undefined` when none was sent (client went away, or fail-open). */
  status: number | undefined;
  /** Milliseconds from the middleware seeing the request to the outcome. */
  durationMs: number;
  /** The backend error, for `backend-error` and `store-failed`. */
  error?: unknown;
  /** Milliseconds spent waiting for the backend on the request's behalf (lookup, store or release). */
  backendMs?: number;
  /**
   * `true` when the client had gone away (timed out, disconnected) before its response was complete. The
   * request still ran to the end and its outcome stands: a retry gets 409 meanwhile and the replay after.
   */
  clientGone?: boolean;
}

/**
 * Options shared by every adapter. `Req` is the framework's request type, handed to `scope` and `fingerprint`.
 *
 * @example
 * ```ts
 * const options: IdempotencyOptions<express.Request> = {
 *   backend: new MemoryBackend(),
 *   scope: (req) => req.get('authorization'),
 * };
 * ```
 */
export interface IdempotencyOptions<Req = unknown> {
  /** Where keys, locks and responses live. */
  backend: Backend;
  /**
   * Request header that carries the key; matched case-insensitively.
   * @default 'Idempotency-Key'
   */
  idempotencyHeaderKey?: string;
  /**
   * Header set to `true` on replayed responses.
   * @default 'Idempotent-Replayed'
   */
  replayHeaderKey?: string;
  /**
   * Answer 422 to keys that are not version 4 UUIDs.
   * @default false
   */
  enforceUuid4Formatting?: boolean;
  /**
   * Seconds a completed response is replayed for, at most 100 years; `null` keeps it forever.
   * @default 86400
   */
  expiry?: number | null;
  /**
   * Methods the middleware handles, compared case-insensitively; every other method passes through untouched.
   * @default ['POST', 'PATCH']
   */
  applicableMethods?: readonly string[];
  /**
   * Answer 400 to an applicable request without the header, instead of passing it through.
   * @default false
   */
  required?: boolean;
  /**
   * Tells a repeat from a different request under the same key (which gets 422). On by default: a SHA-256 of the
   * method, the path with its query string and the body. `false` turns it off; a function replaces it.
   * @default true
   */
  fingerprint?: boolean | ((req: Req) => string);
  /** Namespaces keys, e.g. by tenant, user or API key id, so that two clients' keys never meet. */
  scope?: (req: Req) => string | undefined;
  /**
   * Seconds of the in-flight lock's lease, at least 1 and at most 100 years. It is renewed every third of it
   * while the handler runs, so it lapses only when the process holding it died (or, once the client has gone
   * away, when the handler has not finished within another `lockTimeout`); then a retry runs.
   * @default 60
   */
  lockTimeout?: number;
  /**
   * Longest key accepted; longer keys get 422.
   * @default 255
   */
  maxKeyLength?: number;
  /**
   * Which responses are stored, by media type: a list of patterns (`application/json`, `text/*`,
   * `*\/*+json`, `*\/*`), or `'*'` for every type except `text/event-stream`.
   * @default ['application/json', '*\/*+json']
   */
  cacheableContentTypes?: '*' | readonly string[];
  /**
   * Store 5xx responses too. Off: the key is released and a retry runs again.
   * @default false
   */
  cacheServerErrors?: boolean;
  /**
   * Statuses that mean "not executed, try again": such a response is not stored and the key is released, so a
   * rate limiter or an authentication check mounted after the middleware cannot pin a stale refusal on the key.
   * @default [401, 403, 407, 408, 425, 429]
   */
  releaseStatuses?: readonly number[];
  /**
   * Largest response body stored, in bytes. A larger response is sent as it comes and its body is not stored;
   * what happens to its key is `unstoredResponses`.
   * @default 1048576
   */
  maxResponseBytes?: number;
  /**
   * A response that ran to completion but whose body cannot be stored (over `maxResponseBytes`, or
   * `text/event-stream`): `'remember'` keeps the key as completed, so a retry gets 410 and the handler does not
   * run twice; `'release'` frees the key, so a retry runs the handler again.
   * @default 'remember'
   */
  unstoredResponses?: 'remember' | 'release';
  /**
   * Largest request body read for the fingerprint, in bytes, when the middleware reads the body itself (no body
   * parser ran before it; always for `node:http`). A larger body gets 413 before any backend call, so a huge
   * upload cannot exhaust memory. A parser mounted before the middleware applies its own limit instead.
   * @default 1048576
   */
  maxRequestBytes?: number;
  /**
   * When the backend fails: `'fail-closed'` answers 503; `'fail-open'` runs the handler without idempotency.
   * @default 'fail-closed'
   */
  onBackendError?: 'fail-closed' | 'fail-open';
  /**
   * A repeat that arrives while the first request with its key is still running: `'reject'` answers 409 at once
   * (with `Retry-After`); `'wait'` waits up to `waitTimeout` for the first to finish and answers with its stored
   * response (or runs, if the first released the key), and 409 only after the wait. Waiters are woken by the
   * backend's notification where it has one (memory; Redis and PostgreSQL with `notifications: true`), else by
   * polling.
   * @default 'reject'
   */
  onConflict?: 'reject' | 'wait';
  /**
   * Seconds a repeat waits with `onConflict: 'wait'` before it gets 409.
   * @default 10
   */
  waitTimeout?: number;
  /**
   * Seconds a backend call may take before it counts as failed (`onBackendError` then applies; a store or release
   * is tried again): the middleware bounds a hung backend itself, whatever its client's settings. A lock taken by
   * an acquire that answers too late is released at once.
   * @default 2
   */
  backendTimeout?: number;
  /**
   * Error bodies: `'detail'` sends `{"detail": "..."}` as `application/json`; `'problem'` sends RFC 9457
   * `application/problem+json`.
   * @default 'detail'
   */
  errorFormat?: 'detail' | 'problem';
  /**
   * Called once per handled request with its outcome. Exceptions it throws are swallowed. Without it, backend
   * failures (`backend-error`, `store-failed`, `lease-lost`) are reported as a process warning
   * (`IDEMPOTENCY_BACKEND_ERROR`), at most one a minute, so that they never go unseen.
   */
  onEvent?: (event: IdempotencyEvent) => void;
}

/** Default of {@link IdempotencyOptions.idempotencyHeaderKey}. */
export const DEFAULT_IDEMPOTENCY_HEADER_KEY = 'Idempotency-Key';
/** Default of {@link IdempotencyOptions.replayHeaderKey}. */
export const DEFAULT_REPLAY_HEADER_KEY = 'Idempotent-Replayed';
/** Default of {@link IdempotencyOptions.expiry}, in seconds. */
export const DEFAULT_EXPIRY = 86_400;
/** Default of {@link IdempotencyOptions.applicableMethods}. */
export const DEFAULT_APPLICABLE_METHODS: readonly string[] = Object.freeze(['POST', 'PATCH']);
/** Default of {@link IdempotencyOptions.lockTimeout}, in seconds. */
export const DEFAULT_LOCK_TIMEOUT = 60;
/** Default of {@link IdempotencyOptions.maxKeyLength}. */
export const DEFAULT_MAX_KEY_LENGTH = 255;
/** Default of {@link IdempotencyOptions.maxRequestBytes}: 1 MiB. */
export const DEFAULT_MAX_REQUEST_BYTES = 1_048_576;
/** Default of {@link IdempotencyOptions.maxResponseBytes}: 1 MiB. */
export const DEFAULT_MAX_RESPONSE_BYTES = 1_048_576;
/** Default of {@link IdempotencyOptions.waitTimeout}, in seconds. */
export const DEFAULT_WAIT_TIMEOUT = 10;
/** Default of {@link IdempotencyOptions.backendTimeout}, in seconds. */
export const DEFAULT_BACKEND_TIMEOUT = 2;
/** Default of {@link IdempotencyOptions.releaseStatuses}. */
export const DEFAULT_RELEASE_STATUSES: readonly number[] = Object.freeze([401, 403, 407, 408, 425, 429]);
/** Shortest `lockTimeout` accepted, in seconds: the lease is renewed every third of it, which must be reliable. */
export const MIN_LOCK_TIMEOUT = 1;

/** Options after validation, in the units the engine works in. */
export interface ResolvedOptions<Req> {
  backend: Backend;
  headerName: string;
  /** Lower-cased, as Node.js presents incoming header names. */
  headerNameLower: string;
  replayHeaderKey: string;
  enforceUuid4Formatting: boolean;
  expiryMs: number | null;
  applicableMethods: ReadonlySet<string>;
  required: boolean;
  fingerprint: boolean | ((req: Req) => string);
  scope: ((req: Req) => string | undefined) | undefined;
  lockTimeoutMs: number;
  maxKeyLength: number;
  isCacheableType: MediaTypeMatcher;
  cacheServerErrors: boolean;
  releaseStatuses: ReadonlySet<number>;
  maxResponseBytes: number;
  rememberUnstored: boolean;
  maxRequestBytes: number;
  failOpen: boolean;
  backendTimeoutMs: number;
  waitOnConflict: boolean;
  waitTimeoutMs: number;
  errorFormat: 'detail' | 'problem';
  onEvent: ((event: IdempotencyEvent) => void) | undefined;
}

/**
 * Every option name, from one typed source: adding an option to {@link IdempotencyOptions} without listing it
 * here (or listing one that does not exist) fails the type check.
 */
const OPTION_NAMES: Record<keyof IdempotencyOptions, true> = {
  backend: true,
  idempotencyHeaderKey: true,
  replayHeaderKey: true,
  enforceUuid4Formatting: true,
  expiry: true,
  applicableMethods: true,
  required: true,
  fingerprint: true,
  scope: true,
  lockTimeout: true,
  maxKeyLength: true,
  cacheableContentTypes: true,
  cacheServerErrors: true,
  releaseStatuses: true,
  maxResponseBytes: true,
  unstoredResponses: true,
  maxRequestBytes: true,
  onBackendError: true,
  backendTimeout: true,
  onConflict: true,
  waitTimeout: true,
  errorFormat: true,
  onEvent: true,
};

/** The option names, for adapters that take options of their own beside these. */
export const KNOWN_OPTIONS: ReadonlySet<string> = new Set(Object.keys(OPTION_NAMES));

/** An RFC 9110 token: what a header name may consist of. */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/**
 * The media type patterns the matcher understands: `type/subtype`, `type/*`, `*\/*` and `*\/*+suffix`. A `*`
 * anywhere else (`application/*+json`, `*\/json`) would be compared literally and silently match nothing.
 */
const MEDIA_TYPE_PATTERN =
  /^(?:[!#$%&'+.^_`|~0-9A-Za-z-]+\/(?:[!#$%&'+.^_`|~0-9A-Za-z-]+|\*)|\*\/\*(?:\+[!#$%&'+.^_`|~0-9A-Za-z-]+)?)$/;
const METHOD = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/**
 * Validates every option once, at construction, and converts it to the engine's units. Throws
 * `IdempotencyError` (`ERR_IDEMPOTENCY_OPTION`) naming the first invalid option and the value it got.
 */
export function resolveOptions<Req>(options: IdempotencyOptions<Req>): ResolvedOptions<Req> {
  if (options === null || typeof options !== 'object') throw invalidOption('options', 'an object', options);
  rejectUnknownOptions(options, KNOWN_OPTIONS);
  const headerName = headerNameOption(
    'idempotencyHeaderKey',
    options.idempotencyHeaderKey,
    DEFAULT_IDEMPOTENCY_HEADER_KEY,
  );
  return {
    backend: backendOption(options.backend),
    headerName,
    headerNameLower: headerName.toLowerCase(),
    replayHeaderKey: headerNameOption('replayHeaderKey', options.replayHeaderKey, DEFAULT_REPLAY_HEADER_KEY),
    enforceUuid4Formatting: booleanOption('enforceUuid4Formatting', options.enforceUuid4Formatting, false),
    expiryMs: expiryOption(options.expiry),
    applicableMethods: methodsOption(options.applicableMethods),
    required: booleanOption('required', options.required, false),
    fingerprint: fingerprintOption(options.fingerprint),
    scope: functionOption('scope', options.scope),
    lockTimeoutMs: lockTimeoutOption(options.lockTimeout),
    maxKeyLength: positiveInteger('maxKeyLength', options.maxKeyLength, DEFAULT_MAX_KEY_LENGTH),
    isCacheableType: createMediaTypeMatcher(contentTypesOption(options.cacheableContentTypes)),
    cacheServerErrors: booleanOption('cacheServerErrors', options.cacheServerErrors, false),
    releaseStatuses: statusesOption(options.releaseStatuses),
    maxResponseBytes: positiveInteger(
      'maxResponseBytes',
      options.maxResponseBytes,
      DEFAULT_MAX_RESPONSE_BYTES,
    ),
    rememberUnstored:
      oneOf('unstoredResponses', options.unstoredResponses, ['remember', 'release'] as const) === 'remember',
    maxRequestBytes: positiveInteger('maxRequestBytes', options.maxRequestBytes, DEFAULT_MAX_REQUEST_BYTES),
    failOpen:
      oneOf('onBackendError', options.onBackendError, ['fail-closed', 'fail-open'] as const) === 'fail-open',
    backendTimeoutMs:
      positiveSeconds('backendTimeout', options.backendTimeout, DEFAULT_BACKEND_TIMEOUT) * 1000,
    waitOnConflict: oneOf('onConflict', options.onConflict, ['reject', 'wait'] as const) === 'wait',
    waitTimeoutMs: positiveSeconds('waitTimeout', options.waitTimeout, DEFAULT_WAIT_TIMEOUT) * 1000,
    errorFormat: oneOf('errorFormat', options.errorFormat, ['detail', 'problem'] as const),
    onEvent: functionOption('onEvent', options.onEvent),
  };
}

/** Stands in for the backend of options that are checked but never used to run: see {@link checkOverrides}. */
const UNUSED_BACKEND: Backend = {
  acquire: unused,
  complete: unused,
  release: unused,
  renew: unused,
};

function unused(): never {
  throw new Error('This backend only stands in while options are checked');
}

/**
 * Checks options that override others later (a route's own, merged with its module's on first use) as
 * {@link resolveOptions} checks a whole set: names and values, so that a bad one fails where it is written, not on
 * the route's first request. Without a `backend` of their own, the module's is assumed.
 */
export function checkOverrides(overrides: Partial<IdempotencyOptions<never>>): void {
  resolveOptions({ backend: UNUSED_BACKEND, ...overrides });
}

function backendOption(backend: unknown): Backend {
  const candidate = backend as Partial<Backend> | null | undefined;
  if (
    candidate === null ||
    typeof candidate !== 'object' ||
    typeof candidate.acquire !== 'function' ||
    typeof candidate.complete !== 'function' ||
    typeof candidate.release !== 'function' ||
    typeof candidate.renew !== 'function'
  ) {
    throw invalidOption(
      'backend',
      'a Backend (an object with acquire, complete, release and renew)',
      backend,
    );
  }
  return candidate as Backend;
}

function headerNameOption(name: string, value: unknown, fallback: string): string {
  if (value === undefined) return fallback;
  if (typeof value !== 'string' || !HEADER_NAME.test(value))
    throw invalidOption(name, 'a header name', value);
  return value;
}

function booleanOption(name: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') throw invalidOption(name, 'true or false', value);
  return value;
}

function expiryOption(value: unknown): number | null {
  if (value === null) return null;
  return (
    positiveSeconds('expiry', value, DEFAULT_EXPIRY, 'a positive number of seconds, or null for forever') *
    1000
  );
}

function lockTimeoutOption(value: unknown): number {
  const seconds = positiveSeconds(
    'lockTimeout',
    value,
    DEFAULT_LOCK_TIMEOUT,
    `a number of seconds, at least ${MIN_LOCK_TIMEOUT}`,
  );
  if (seconds < MIN_LOCK_TIMEOUT) {
    throw invalidOption(
      'lockTimeout',
      `a number of seconds, at least ${MIN_LOCK_TIMEOUT}, at most ${MAX_SECONDS} (100 years)`,
      value,
    );
  }
  return seconds * 1000;
}

function statusesOption(value: unknown): ReadonlySet<number> {
  if (value === undefined) return new Set(DEFAULT_RELEASE_STATUSES);
  if (
    !Array.isArray(value) ||
    !value.every((status) => Number.isInteger(status) && status >= 100 && status <= 999)
  ) {
    throw invalidOption('releaseStatuses', 'an array of HTTP status codes (100-999)', value);
  }
  return new Set(value as number[]);
}

/**
 * Longest time an option accepts, in seconds: 100 years. A longer one cannot be stored by every backend (a MySQL
 * `DATETIME` ends in 9999, Redis counts milliseconds in 64 bits), and a store that fails leaves a request that ran
 * to run again once its lease lapses; `expiry: null` is what keeps a response forever.
 */
export const MAX_SECONDS = 100 * 365.25 * 24 * 60 * 60;

function positiveSeconds(
  name: string,
  value: unknown,
  fallback: number,
  expected = 'a positive number of seconds',
) {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > MAX_SECONDS)
    throw invalidOption(name, `${expected}, at most ${MAX_SECONDS} (100 years)`, value);
  return value;
}

function positiveInteger(name: string, value: unknown, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw invalidOption(name, 'a positive integer', value);
  }
  return value;
}

function methodsOption(value: unknown): ReadonlySet<string> {
  const methods = value === undefined ? DEFAULT_APPLICABLE_METHODS : value;
  if (
    !Array.isArray(methods) ||
    methods.length === 0 ||
    !methods.every((m) => typeof m === 'string' && METHOD.test(m))
  ) {
    throw invalidOption('applicableMethods', 'a non-empty array of HTTP method names', value);
  }
  return new Set(methods.map((method: string) => method.toUpperCase()));
}

function fingerprintOption<Req>(value: unknown): boolean | ((req: Req) => string) {
  if (value === undefined) return true;
  if (typeof value === 'boolean' || typeof value === 'function')
    return value as boolean | ((req: Req) => string);
  throw invalidOption('fingerprint', 'true, false or a function (req) => string', value);
}

function functionOption<F>(name: string, value: F | undefined): F | undefined {
  if (value === undefined || typeof value === 'function') return value;
  throw invalidOption(name, 'a function', value);
}

function contentTypesOption(value: unknown): '*' | readonly string[] {
  if (value === undefined) return JSON_MEDIA_TYPES;
  if (value === '*') return value;
  if (
    Array.isArray(value) &&
    value.every((t) => typeof t === 'string' && MEDIA_TYPE_PATTERN.test(t.trim()))
  ) {
    return value;
  }
  throw invalidOption(
    'cacheableContentTypes',
    "'*' or an array of media types such as 'application/json'",
    value,
  );
}

function oneOf<const T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  if (value === undefined) return allowed[0]!;
  if (allowed.includes(value as T)) return value as T;
  throw invalidOption(name, allowed.map((a) => `'${a}'`).join(' or '), value);
}
