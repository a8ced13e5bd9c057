/** What {@link utf8} needs of Node.js's `Buffer`, found as a global so that no `node:` module is imported. */
interface BufferGlobal {
  from(text: string): Uint8Array;
}

const encoder = new TextEncoder();
const NodeBuffer = (globalThis as { Buffer?: Partial<BufferGlobal> }).Buffer;

/**
 * The UTF-8 bytes of a string. `Buffer.from` where the runtime has it (Node.js, Bun): a slice of a shared pool
 * for short strings, several times cheaper than `TextEncoder.encode`, which makes a new `ArrayBuffer` each time;
 * `TextEncoder` elsewhere. A store that keeps the bytes in memory copies such a slice (see `MemoryBackend`).
 */
export const utf8: (text: string) => Uint8Array =
  typeof NodeBuffer?.from === 'function'
    ? (NodeBuffer.from.bind(NodeBuffer) as (text: string) => Uint8Array)
    : (text) => encoder.encode(text);

/**
 * Whether the UTF-8 of `text` (lone surrogates written as U+FFFD, as `Buffer`, `TextEncoder` and Node.js's
 * `res.end(text)` write them) takes at most `limit` bytes. Counted only when the string is long enough to matter:
 * a code unit never takes more than 3 bytes.
 */
export function utf8FitsIn(text: string, limit: number): boolean {
  if (text.length * 3 <= limit) return true;
  if (text.length > limit) return false;
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit < 0x80) bytes += 1;
    else if (unit < 0x800) bytes += 2;
    else if (unit >= 0xd800 && unit <= 0xdbff && isLowSurrogate(text.charCodeAt(i + 1))) {
      bytes += 4;
      i++;
    } else bytes += 3;
    if (bytes > limit) return false;
  }
  return true;
}

function isLowSurrogate(unit: number): boolean {
  return unit >= 0xdc00 && unit <= 0xdfff;
}
