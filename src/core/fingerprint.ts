import type { Sha256 } from './digest.js';
import { IdempotencyError } from './errors.js';
import type { Awaitable } from './types.js';

/**
 * A request body as an adapter sees it: the raw bytes (a `Uint8Array`, or any `ArrayBuffer` or view of one)
 * when it read the stream itself, or the value a body parser produced (`req.body`) when one ran first.
 * `undefined` means no body.
 */
export type RequestBody = Uint8Array | string | object | null | undefined;

/**
 * SHA-256 (hex) over the method, the request target (path with its query string, see {@link requestTarget}),
 * and the body. Raw bytes are hashed as they are; a string as UTF-8; a parsed value in a canonical JSON form
 * with object keys sorted, so that the same document always gives the same fingerprint whatever the order its
 * keys arrived in. A raw body that is already canonical JSON hashes like its parsed value.
 */
export function computeFingerprint(
  method: string,
  target: string,
  body: RequestBody,
  sha256: Sha256,
  contentType?: string,
): Awaitable<string> {
  if (body === undefined) return sha256([`${method} ${target}\n`]);
  if (typeof body === 'string') return sha256([`${method} ${target}\n${body}`]);
  const bytes = rawBytes(body);
  if (bytes === undefined) return sha256([`${method} ${target}\n${canonicalJson(body)}`]);
  const boundary = multipartBoundary(contentType);
  // Beside bytes, the head goes in pieces, each a flat string: joined, it would be a rope, flattened only to be
  // copied.
  if (boundary === undefined) return sha256([method, ' ', target, '\n', bytes]);
  return sha256([method, ' ', target, '\n', ...withBoundary(bytes, boundary, FINGERPRINT_BOUNDARY)]);
}

/**
 * The boundary a multipart body is hashed with, in place of its own: a client encodes a form again for each
 * attempt (undici's `fetch` and axios draw a new boundary each time), and a retry of the same form is the
 * same request.
 */
const FINGERPRINT_BOUNDARY = 'idempotency-header-boundary';

const MULTIPART = /^\s*multipart\//i;
const BOUNDARY_PARAMETER = /;\s*boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))/i;

/**
 * Whether a `Content-Type` is multipart (`multipart/form-data`, any `multipart/*`). A parser that consumed such a
 * body leaves its fields, not its files: the fingerprint cannot be taken from what it parsed.
 */
export function isMultipart(contentType: string | undefined): boolean {
  if (contentType === undefined) return false;
  // A type that starts with a letter other than `m` is told without the expression: most requests' are.
  const first = contentType.charCodeAt(0) | 0x20;
  if (first >= 0x61 && first <= 0x7a && first !== 0x6d) return false;
  return MULTIPART.test(contentType);
}

/**
 * The error for a multipart body a parser consumed before the adapter could read it: what the parser left (its
 * fields) holds no trace of the files, and two uploads that differ only in their files would look alike.
 * `remedy` says, in the framework's terms, how to let the adapter read the body first.
 */
export function consumedMultipart(
  remedy = 'mount the idempotency middleware before that parser',
): IdempotencyError {
  return new IdempotencyError(
    'ERR_IDEMPOTENCY_BODY',
    `The multipart request body was consumed by a parser before the idempotency middleware could read it, and what the parser left holds no trace of its files, so it cannot be fingerprinted: ${remedy}, or pass a \`fingerprint\` function`,
  );
}

/** The `boundary` parameter of a multipart `Content-Type` (RFC 2046), or `undefined` for any other type. */
export function multipartBoundary(contentType: string | undefined): string | undefined {
  if (contentType === undefined || !isMultipart(contentType)) return undefined;
  const match = BOUNDARY_PARAMETER.exec(contentType);
  return match === null ? undefined : (match[1] ?? match[2]);
}

const encoder = new TextEncoder();

/**
 * A multipart body's bytes as pieces, with each delimiter (`--` and the boundary) written with `replacement` as
 * its boundary: views of the body between the delimiters, nothing copied.
 */
export function withBoundary(bytes: Uint8Array, boundary: string, replacement: string): Uint8Array[] {
  const delimiter = encoder.encode(`--${boundary}`);
  const replaced = encoder.encode(`--${replacement}`);
  const pieces: Uint8Array[] = [];
  let from = 0;
  for (let at = indexOfBytes(bytes, delimiter, 0); at !== -1; at = indexOfBytes(bytes, delimiter, from)) {
    pieces.push(bytes.subarray(from, at), replaced);
    from = at + delimiter.byteLength;
  }
  pieces.push(bytes.subarray(from));
  return pieces;
}

/** Where `needle` first occurs in `haystack` at or after `from`; -1 if it does not. */
function indexOfBytes(haystack: Uint8Array, needle: Uint8Array, from: number): number {
  const last = haystack.byteLength - needle.byteLength;
  for (
    let at = haystack.indexOf(needle[0]!, from);
    at !== -1 && at <= last;
    at = haystack.indexOf(needle[0]!, at + 1)
  ) {
    let matched = 1;
    while (matched < needle.byteLength && haystack[at + matched] === needle[matched]) matched++;
    if (matched === needle.byteLength) return at;
  }
  return -1;
}

/**
 * The request target as every adapter hashes it: the path with its query string, exactly as sent. An absolute
 * URL (what `Request.url` holds on fetch-style runtimes) is cut down to that form, so that a service on Express
 * and one on Hono that share a backend compute the same fingerprint for the same request.
 */
export function requestTarget(url: string): string {
  if (url.charCodeAt(0) === 47 /* / */) return url;
  const scheme = url.indexOf('://');
  if (scheme === -1) return url;
  const path = url.indexOf('/', scheme + 3);
  if (path === -1) {
    const query = url.indexOf('?', scheme + 3);
    return query === -1 ? '/' : `/${url.slice(query)}`;
  }
  const hash = url.indexOf('#', path);
  return hash === -1 ? url.slice(path) : url.slice(path, hash);
}

/**
 * Whether a body is a value a parser produced (an object or array of fields), rather than the body's own bytes or
 * text.
 */
export function isParsedValue(body: RequestBody): boolean {
  return typeof body === 'object' && body !== null && rawBytes(body) === undefined;
}

/** The bytes of a raw body; other byte containers count too, as parsed values they would all serialise to `{}`. */
function rawBytes(body: object | null): Uint8Array | undefined {
  if (body instanceof Uint8Array) return body;
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  return undefined;
}

/**
 * JSON with object keys sorted at every depth; `undefined` members are left out, as `JSON.stringify` does.
 *
 * A parsed body is made of plain objects and arrays, most often already in order or a few keys away from it: it
 * is then serialised by one native `JSON.stringify` of the value itself, or of a copy with its keys inserted in
 * order, several times faster than building the string here. Anything else (a `toJSON`, a class instance, an
 * integer-like key, which objects always list first) is written member by member, as is a value nested deeper
 * than the call stack goes.
 */
export function canonicalJson(value: unknown): string {
  try {
    const ordered = inKeyOrder(value);
    if (ordered === UNORDERABLE) return canonicalJsonByMember(value);
    return JSON.stringify(ordered) ?? 'null';
  } catch (error) {
    // Nested deeper than the call stack goes: a body parser accepts `[[[…]]]` thousands deep in a few kilobytes.
    if (error instanceof RangeError) return canonicalJsonByMember(value);
    throw error;
  }
}

/** What {@link inKeyOrder} returns for a value `JSON.stringify` cannot be trusted to write in canonical form. */
const UNORDERABLE: unique symbol = Symbol('unorderable');

/**
 * `value` itself when every object in it is a plain object with its keys in code-unit order, a copy with the
 * keys of each object inserted in that order otherwise, or {@link UNORDERABLE}: `JSON.stringify` writes keys in
 * insertion order, except integer-like keys, which come first.
 */
function inKeyOrder(value: unknown): unknown {
  if (value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return itemsInKeyOrder(value);
  const prototype = Object.getPrototypeOf(value);
  if (prototype !== Object.prototype && prototype !== null) return UNORDERABLE;
  const record = value as Record<string, unknown>;
  if (typeof record.toJSON === 'function') return UNORDERABLE;
  const names = Object.keys(record);
  let sorted = true;
  for (let i = 1; i < names.length && sorted; i++) sorted = names[i - 1]! < names[i]!;
  if (!sorted) names.sort();
  let copy: Record<string, unknown> | undefined;
  for (let i = 0; i < names.length; i++) {
    const name = names[i]!;
    // A `__proto__` key would set a copy's prototype; integer-like keys would not stay where a copy puts them.
    if (name === '__proto__' || (!sorted && isDigit(name.charCodeAt(0)))) return UNORDERABLE;
    const member = record[name];
    const ordered = inKeyOrder(member);
    if (ordered === UNORDERABLE) return UNORDERABLE;
    // In order and unchanged so far: no copy is needed yet.
    if (sorted && copy === undefined && Object.is(ordered, member)) continue;
    if (copy === undefined) copy = sorted ? copyFirst(record, names, i) : {};
    copy[name] = ordered;
  }
  return copy ?? record;
}

/** The first `count` members of `record`, in order: the start of a copy of an object whose keys are in order. */
function copyFirst(
  record: Record<string, unknown>,
  names: readonly string[],
  count: number,
): Record<string, unknown> {
  const copy: Record<string, unknown> = {};
  for (let i = 0; i < count; i++) copy[names[i]!] = record[names[i]!];
  return copy;
}

function itemsInKeyOrder(items: readonly unknown[]): unknown {
  if (typeof (items as { toJSON?: unknown }).toJSON === 'function') return UNORDERABLE;
  let copy: unknown[] | undefined;
  for (let i = 0; i < items.length; i++) {
    const item = items[i];
    const ordered = inKeyOrder(item);
    if (ordered === UNORDERABLE) return UNORDERABLE;
    if (!Object.is(ordered, item)) {
      copy ??= items.slice();
      copy[i] = ordered;
    }
  }
  return copy ?? items;
}

function isDigit(code: number): boolean {
  return code >= 48 && code <= 57;
}

/** {@link canonicalJsonByMember}'s mark for no value waiting to be written. */
const NOTHING: unique symbol = Symbol('nothing');

/** An array or object being written by {@link canonicalJsonByMember}: where it is up to. */
type OpenValue =
  | { readonly items: readonly unknown[]; next: number }
  | {
      readonly record: Record<string, unknown>;
      readonly names: readonly string[];
      next: number;
      first: boolean;
    };

/**
 * {@link canonicalJson}, written member by member with a stack of its own rather than the call stack, so that no
 * depth of nesting is too deep: for values `JSON.stringify` would not write in key order, and those nested too
 * deeply for {@link inKeyOrder} to recurse into. A value that contains itself cannot be written, and is refused.
 */
export function canonicalJsonByMember(value: unknown): string {
  const open: OpenValue[] = [];
  const onPath = new Set<object>();
  let out = '';
  let pending: unknown = value;
  for (;;) {
    if (pending !== NOTHING) {
      let current = pending;
      pending = NOTHING;
      while (current !== null && typeof current === 'object') {
        const toJson = (current as { toJSON?: () => unknown }).toJSON;
        if (typeof toJson !== 'function') break;
        current = toJson.call(current);
      }
      if (current === null || typeof current !== 'object') out += JSON.stringify(current) ?? 'null';
      else {
        if (onPath.has(current)) {
          throw new IdempotencyError(
            'ERR_IDEMPOTENCY_BODY',
            'The parsed request body contains itself, so it cannot be fingerprinted: pass a `fingerprint` function',
          );
        }
        onPath.add(current);
        if (Array.isArray(current)) {
          out += '[';
          open.push({ items: current, next: 0 });
        } else {
          const record = current as Record<string, unknown>;
          out += '{';
          open.push({ record, names: Object.keys(record).sort(), next: 0, first: true });
        }
      }
    }
    const top = open.at(-1);
    if (top === undefined) return out;
    if ('items' in top) {
      if (top.next === top.items.length) {
        out += ']';
        onPath.delete(top.items);
        open.pop();
        continue;
      }
      const item = top.items[top.next];
      if (top.next++ > 0) out += ',';
      if (isSkipped(item)) out += 'null';
      else pending = item;
      continue;
    }
    while (top.next < top.names.length && isSkipped(top.record[top.names[top.next]!])) top.next++;
    if (top.next === top.names.length) {
      out += '}';
      onPath.delete(top.record);
      open.pop();
      continue;
    }
    const name = top.names[top.next++]!;
    out += `${top.first ? '' : ','}${JSON.stringify(name)}:`;
    top.first = false;
    pending = top.record[name];
  }
}

/** Members `JSON.stringify` leaves out of an object, and writes as `null` in an array. */
function isSkipped(value: unknown): boolean {
  return value === undefined || typeof value === 'function' || typeof value === 'symbol';
}
