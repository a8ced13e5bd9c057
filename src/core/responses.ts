import type { HeaderPair } from './types.js';

/**
 * A response the engine tells an adapter to send instead of running the handler: an error, a conflict, or a
 * replay. The adapter sends `status`, every header of `headers` as it is (the replay header is already among
 * them), a `content-length` of `body`, and `body`.
 */
export interface EngineReply {
  readonly kind: 'reply';
  readonly status: number;
  /** Headers to send, lower-case names, without `content-length`. */
  readonly headers: readonly HeaderPair[];
  readonly body: Uint8Array;
  /** A stored response being replayed (its headers include the replay header). */
  readonly replayed: boolean;
}

const REASONS: Record<number, string> = {
  400: 'Bad Request',
  409: 'Conflict',
  410: 'Gone',
  413: 'Content Too Large',
  422: 'Unprocessable Content',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

const JSON_HEADERS: readonly HeaderPair[] = Object.freeze([['content-type', 'application/json']]);
const PROBLEM_HEADERS: readonly HeaderPair[] = Object.freeze([['content-type', 'application/problem+json']]);
const encoder = new TextEncoder();

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
    body: encoder.encode(JSON.stringify(payload)),
    replayed: false,
  });
}

/**
 * The name of a stored pair that stands for a removal: `[REMOVED_HEADER, name]` says the handler removed a header
 * that middleware mounted before it had set, so a replay removes it too after that middleware set it again. No
 * header can have this name (a `:` is not allowed in one), so it never meets a real header.
 */
export const REMOVED_HEADER = ':removed';

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
 * Whether a header (lower-case name) is stored and replayed: not hop-by-hop, not one that belongs to one response
 * only. For adapters that build the header list themselves and can leave such headers out at once.
 */
export function isStoredHeader(lowerName: string): boolean {
  return !isUnstored(lowerName);
}

/**
 * Membership in `names`, told apart by length first: one bit per length of the names in it (a name of 31 units or
 * more sets the last bit), so that most names are answered without hashing them for the set (a name built per
 * response has no hash yet).
 */
export function setMembership(names: ReadonlySet<string>): (name: string) => boolean {
  const lengths = [...names].reduce((bits, name) => bits | lengthBit(name.length), 0);
  return (name) => (lengths & lengthBit(name.length)) !== 0 && names.has(name);
}

function lengthBit(length: number): number {
  return 1 << Math.min(length, 31);
}

const isUnstored = setMembership(UNSTORED_HEADERS);

/** Whether a header name has no upper-case ASCII letter: a loop, cheaper than a lower-cased copy to compare. */
function isLowerCase(name: string): boolean {
  for (let i = 0; i < name.length; i++) {
    const code = name.charCodeAt(i);
    if (code >= 65 && code <= 90) return false;
  }
  return true;
}

/**
 * The headers of a response as stored: lower-case names, without those a replay must not repeat. A list that is
 * already so (an adapter built it with {@link isStoredHeader}) is returned as it is.
 */
export function storedHeaders(headers: readonly HeaderPair[]): HeaderPair[] {
  for (const [name, value] of headers) {
    if (!isStoredPair(name, value) || !isLowerCase(name)) return filterHeaders(headers);
  }
  return headers as HeaderPair[];
}

function isStoredPair(name: string, value: string): boolean {
  return name === REMOVED_HEADER ? !isUnstored(value) : !isUnstored(name);
}

function filterHeaders(headers: readonly HeaderPair[]): HeaderPair[] {
  const pairs: HeaderPair[] = [];
  for (const [name, value] of headers) {
    const lower = name.toLowerCase();
    if (isStoredPair(lower, value)) pairs.push([lower, value]);
  }
  return pairs;
}

/** The value of a header (lower-case name) in a list of pairs; the first, when it repeats. */
export function headerValue(headers: readonly HeaderPair[], lowerName: string): string | undefined {
  for (const [name, value] of headers) if (name === lowerName) return value;
  return undefined;
}
