import * as crypto from 'node:crypto';

const { createHash } = crypto;

/** `crypto.hash` (Node.js 20.12+), with the equivalent Hash object on older 20.x releases. */
const oneShotHash: (algorithm: string, data: string, encoding: 'hex') => string =
  typeof crypto.hash === 'function'
    ? crypto.hash
    : (algorithm, data, encoding) => createHash(algorithm).update(data).digest(encoding);

/**
 * A request body as an adapter sees it: the raw bytes (a `Uint8Array`, or any `ArrayBuffer` or view of one)
 * when it read the stream itself, or the value a body parser produced (`req.body`) when one ran first.
 * `undefined` means no body.
 */
export type RequestBody = Uint8Array | string | object | null | undefined;

/**
 * SHA-256 (hex) over the method, the path with its query string, and the body. Raw bytes are hashed as they
 * are; a string as UTF-8; a parsed value in a canonical JSON form with object keys sorted, so that the same
 * document always gives the same fingerprint whatever the order its keys arrived in.
 */
export function computeFingerprint(method: string, url: string, body: RequestBody): string {
  const head = `${method} ${url}\n`;
  // One-shot hashing of a string is less than half the cost of a Hash object fed piece by piece: this runs on
  // every request that carries a key, and most bodies are parsed JSON.
  if (body === undefined) return oneShotHash('sha256', head, 'hex');
  if (typeof body === 'string') return oneShotHash('sha256', head + body, 'hex');
  const bytes = rawBytes(body);
  if (bytes === undefined) return oneShotHash('sha256', head + canonicalJson(body), 'hex');
  return createHash('sha256').update(head).update(bytes).digest('hex');
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

/** SHA-256 (hex) of a scoped key: what events carry instead of the raw key. */
export function hashKey(storageKey: string): string {
  return oneShotHash('sha256', storageKey, 'hex');
}
