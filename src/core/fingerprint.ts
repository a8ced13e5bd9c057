import { createHash } from 'node:crypto';

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
  const hash = createHash('sha256').update(method).update(' ').update(url).update('\n');
  if (body instanceof Uint8Array) hash.update(body);
  // Other byte containers are raw bodies too: as parsed values they would all serialise to `{}`.
  else if (ArrayBuffer.isView(body))
    hash.update(new Uint8Array(body.buffer, body.byteOffset, body.byteLength));
  else if (body instanceof ArrayBuffer) hash.update(new Uint8Array(body));
  else if (typeof body === 'string') hash.update(body);
  else if (body !== undefined) hash.update(canonicalJson(body));
  return hash.digest('hex');
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
  return createHash('sha256').update(storageKey).digest('hex');
}
