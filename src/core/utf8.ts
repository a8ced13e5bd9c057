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
