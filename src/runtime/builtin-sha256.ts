import type * as NodeCrypto from 'node:crypto';
import type { Sha256 } from '../core/digest.js';

/** What the engine's SHA-256 needs of `node:crypto`. */
type CryptoModule = Pick<typeof NodeCrypto, 'createHash'> & Partial<Pick<typeof NodeCrypto, 'hash'>>;

/**
 * The engine's SHA-256 on a `node:crypto` module, synchronous. One-shot hashing of a single string
 * (`crypto.hash`, Node.js 20.12+) is less than half the cost of a Hash object fed piece by piece, and most
 * requests hash one string (method, path, parsed body).
 */
export function sha256On(crypto: CryptoModule): Sha256 {
  const { createHash, hash } = crypto;
  const oneShot: (data: string | Uint8Array) => string =
    typeof hash === 'function'
      ? (data) => hash('sha256', data, 'hex')
      : (data) => createHash('sha256').update(data).digest('hex');
  return function nodeSha256(parts) {
    if (parts.length === 1) return oneShot(parts[0]!);
    const joined = joinSmall(parts);
    if (joined !== undefined) return oneShot(joined);
    const digest = createHash('sha256');
    for (const part of parts) digest.update(part);
    return digest.digest('hex');
  };
}

/** Parts up to this many bytes in all are copied into one buffer and hashed in one shot. */
const JOIN_LIMIT = 64 * 1024;
const encoder = new TextEncoder();

/**
 * Where {@link joinSmall} copies the parts: one buffer for the process, grown as needed up to {@link JOIN_LIMIT},
 * since a new one per request (an `ArrayBuffer` with its backing store) cost more than the copy. Safe to share:
 * the parts are hashed synchronously, before anything else can write to it.
 */
let scratch = new Uint8Array(1024);

/**
 * `parts` as one buffer, when they are small: copying a few kilobytes costs less than a Hash object (a request
 * with a raw body hashes its method and path, then the body). `undefined` for larger parts, hashed piece by piece.
 * The bytes are valid until the next call.
 */
function joinSmall(parts: readonly (string | Uint8Array)[]): Uint8Array | undefined {
  let size = 0;
  // A string takes at most 3 bytes of UTF-8 per UTF-16 unit.
  for (const part of parts) size += typeof part === 'string' ? part.length * 3 : part.byteLength;
  if (size > JOIN_LIMIT) return undefined;
  if (size > scratch.byteLength)
    scratch = new Uint8Array(Math.min(JOIN_LIMIT, Math.max(size, scratch.byteLength * 2)));
  const joined = scratch;
  let offset = 0;
  for (const part of parts) {
    if (typeof part === 'string') offset = writeUtf8(part, joined, offset);
    else {
      joined.set(part, offset);
      offset += part.byteLength;
    }
  }
  return joined.subarray(0, offset);
}

/** Strings up to this long are copied by {@link writeUtf8}'s loop when ASCII, rather than by `encodeInto`. */
const SHORT_STRING = 256;

/**
 * Writes `text` as UTF-8 into `into` at `offset`, which has room for it, and returns the offset after it. A short
 * ASCII string (a method and a path) is copied a unit at a time: `encodeInto` and the view it writes through cost
 * some 1 500 instructions a call, several times the loop.
 */
function writeUtf8(text: string, into: Uint8Array, offset: number): number {
  if (text.length <= SHORT_STRING) {
    let at = offset;
    for (let i = 0; i < text.length; i++) {
      const unit = text.charCodeAt(i);
      if (unit >= 0x80) return offset + encoder.encodeInto(text, into.subarray(offset)).written;
      into[at++] = unit;
    }
    return at;
  }
  return offset + encoder.encodeInto(text, into.subarray(offset)).written;
}

let builtin: Sha256 | null | undefined;

/**
 * A synchronous SHA-256 for the web-standard adapters where the runtime has one built in, `undefined` where it
 * has not (they hash with Web Crypto there). Web Crypto's digest is asynchronous: a job on the thread pool and a
 * promise per hash, several times the cost of the hash itself for the few hundred bytes of a fingerprint.
 *
 * Found through `process.getBuiltinModule('crypto')` (Node.js 20.16+, Bun, Deno) rather than an import, so that
 * the adapters import no `node:` module and bundle for Cloudflare Workers and browsers unchanged.
 */
export function builtinSha256(): Sha256 | undefined {
  if (builtin === undefined) {
    builtin = null;
    try {
      const process = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process;
      const crypto = process?.getBuiltinModule?.('crypto') as CryptoModule | undefined;
      if (typeof crypto?.createHash === 'function') builtin = sha256On(crypto);
    } catch {}
  }
  return builtin ?? undefined;
}
