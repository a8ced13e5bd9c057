import type { Awaitable } from './types.js';

/**
 * SHA-256 (lower-case hex) over the concatenation of `parts`, strings taken as UTF-8. The engine hashes through
 * this so that it runs on any runtime: adapters on Node.js pass a synchronous one built on `node:crypto`
 * (a hash per request without a microtask hop), web-standard adapters use {@link webSha256}.
 */
export type Sha256 = (parts: readonly (string | Uint8Array)[]) => Awaitable<string>;

const encoder = new TextEncoder();
const HEX = Array.from({ length: 256 }, (_, byte) => byte.toString(16).padStart(2, '0'));

/** {@link Sha256} on Web Crypto (`crypto.subtle`): Node.js, Bun, Deno, Cloudflare Workers and browsers. */
export const webSha256: Sha256 = async function webSha256(parts) {
  const digest = await crypto.subtle.digest('SHA-256', concatParts(parts));
  return toHex(new Uint8Array(digest));
};

function concatParts(parts: readonly (string | Uint8Array)[]): Uint8Array<ArrayBuffer> {
  const bytes = parts.map((part) => (typeof part === 'string' ? encoder.encode(part) : part));
  const out = new Uint8Array(bytes.reduce((total, part) => total + part.byteLength, 0));
  let offset = 0;
  for (const part of bytes) {
    out.set(part, offset);
    offset += part.byteLength;
  }
  return out;
}

function toHex(bytes: Uint8Array): string {
  let out = '';
  for (const byte of bytes) out += HEX[byte];
  return out;
}
