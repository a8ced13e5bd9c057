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
  const oneShot: (data: string) => string =
    typeof hash === 'function'
      ? (data) => hash('sha256', data, 'hex')
      : (data) => createHash('sha256').update(data).digest('hex');
  return function nodeSha256(parts) {
    if (parts.length === 1 && typeof parts[0] === 'string') return oneShot(parts[0]);
    const digest = createHash('sha256');
    for (const part of parts) digest.update(part);
    return digest.digest('hex');
  };
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
