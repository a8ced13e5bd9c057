import type { Sha256 } from './digest.js';
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
): Awaitable<string> {
  const head = `${method} ${target}\n`;
  if (body === undefined) return sha256([head]);
  if (typeof body === 'string') return sha256([head + body]);
  const bytes = rawBytes(body);
  if (bytes === undefined) return sha256([head + canonicalJson(body)]);
  return sha256([head, bytes]);
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

/** The bytes of a raw body; other byte containers count too, as parsed values they would all serialise to `{}`. */
function rawBytes(body: object | null): Uint8Array | undefined {
  if (body instanceof Uint8Array) return body;
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  return undefined;
}

/** JSON with object keys sorted at every depth; `undefined` members are left out, as `JSON.stringify` does. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  const withToJson = value as { toJSON?: () => unknown };
  if (typeof withToJson.toJSON === 'function') return canonicalJson(withToJson.toJSON());
  if (Array.isArray(value)) {
    let out = '[';
    for (let i = 0; i < value.length; i++) out += (i === 0 ? '' : ',') + canonicalJsonMember(value[i]);
    return `${out}]`;
  }
  const record = value as Record<string, unknown>;
  let out = '{';
  let first = true;
  for (const name of Object.keys(record).sort()) {
    const member = record[name];
    if (member === undefined || typeof member === 'function' || typeof member === 'symbol') continue;
    out += `${first ? '' : ','}${JSON.stringify(name)}:${canonicalJson(member)}`;
    first = false;
  }
  return `${out}}`;
}

function canonicalJsonMember(value: unknown): string {
  return value === undefined || typeof value === 'function' || typeof value === 'symbol'
    ? 'null'
    : canonicalJson(value);
}
