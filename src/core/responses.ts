import type { HeaderPair } from './types.js';

/** A response the engine tells an adapter to send instead of running the handler. */
export interface EngineReply {
  readonly kind: 'reply';
  readonly status: number;
  /** Headers to send, without `content-length` (the adapter sets it from `body`). */
  readonly headers: readonly HeaderPair[];
  readonly body: Uint8Array;
  /** A stored response: the adapter adds the replay header with value `true`. */
  readonly replayed: boolean;
}

const REASONS: Record<number, string> = {
  400: 'Bad Request',
  409: 'Conflict',
  413: 'Content Too Large',
  422: 'Unprocessable Content',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

const JSON_HEADERS: readonly HeaderPair[] = Object.freeze([['content-type', 'application/json']]);
const PROBLEM_HEADERS: readonly HeaderPair[] = Object.freeze([['content-type', 'application/problem+json']]);

/** Builds an error reply in the configured format: `{"detail": ...}` JSON, or RFC 9457 problem details. */
export function errorReply(
  format: 'detail' | 'problem',
  status: number,
  detail: string,
  extraHeaders?: readonly HeaderPair[],
): EngineReply {
  const problem = format === 'problem';
  const payload = problem
    ? { type: 'about:blank', title: REASONS[status] ?? 'Error', status, detail }
    : { detail };
  const base = problem ? PROBLEM_HEADERS : JSON_HEADERS;
  return Object.freeze({
    kind: 'reply',
    status,
    headers: extraHeaders === undefined ? base : [...base, ...extraHeaders],
    body: Buffer.from(JSON.stringify(payload)),
    replayed: false,
  });
}

/** Header names never stored or replayed: hop-by-hop headers, and those that belong to one response only. */
const UNSTORED_HEADERS = new Set([
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'set-cookie',
  'date',
  'content-length',
]);

/**
 * Converts response headers as Node.js holds them (`res.getHeaders()`: lower-case names, values that are
 * strings, numbers or arrays) into the stored form, leaving out the headers a replay must not repeat.
 */
export function storableHeaders(
  headers: Record<string, number | string | readonly string[] | undefined>,
): HeaderPair[] {
  const pairs: HeaderPair[] = [];
  for (const name in headers) {
    const value = headers[name];
    if (value === undefined) continue;
    const lower = name.toLowerCase();
    if (UNSTORED_HEADERS.has(lower)) continue;
    if (typeof value === 'object') for (const item of value) pairs.push([lower, item]);
    else pairs.push([lower, typeof value === 'string' ? value : String(value)]);
  }
  return pairs;
}

/** Whether a header (lower-case name) may be stored; for adapters that iterate headers themselves. */
export function isStorableHeader(lowerName: string): boolean {
  return !UNSTORED_HEADERS.has(lowerName);
}
