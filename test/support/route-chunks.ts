/**
 * Route bodies for frameworks whose handlers answer with a value (Fastify, Koa, Hono, fetch): the chunks of a
 * {@link RouteResponse} as one payload, a Node.js stream or a web stream, written the way the node:http
 * translation writes them (several chunks a tick apart; an async iterable as it yields).
 */
import { Readable } from 'node:stream';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import type { RouteResponse } from './http.js';

/** The chunks of a route response as one async iterable of bytes; `onWritten` is called after the last. */
async function* chunksOf(response: RouteResponse): AsyncGenerator<Uint8Array> {
  const { chunks = [] } = response;
  if (Symbol.asyncIterator in chunks) {
    for await (const chunk of chunks) yield toBuffer(chunk);
  } else {
    for (const [i, chunk] of chunks.entries()) {
      if (i > 0) await yieldToLoop();
      yield toBuffer(chunk);
    }
  }
  response.onWritten?.();
}

function toBuffer(chunk: string | Uint8Array): Buffer {
  return typeof chunk === 'string'
    ? Buffer.from(chunk)
    : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

/** Whether the response is written in one piece (at most one chunk, not streamed over time). */
function isSingle(response: RouteResponse): boolean {
  const { chunks = [] } = response;
  return !(Symbol.asyncIterator in chunks) && chunks.length <= 1;
}

/**
 * The body as a framework takes it: the one chunk as a Buffer (empty when there is none; `onWritten` is called
 * at once), or a Node.js stream of the chunks.
 */
export function nodeBody(response: RouteResponse): Buffer | Readable {
  if (isSingle(response)) {
    const [chunk] = response.chunks as readonly (string | Uint8Array)[];
    queueMicrotask(() => response.onWritten?.());
    return chunk === undefined ? Buffer.alloc(0) : toBuffer(chunk);
  }
  return Readable.from(chunksOf(response), { objectMode: false });
}

/** The body as a `Response` takes it: the one chunk (or `null`), or a byte stream of the chunks. */
export function webBody(
  response: RouteResponse,
): Uint8Array<ArrayBuffer> | ReadableStream<Uint8Array> | null {
  if (isSingle(response)) {
    const [chunk] = response.chunks as readonly (string | Uint8Array)[];
    queueMicrotask(() => response.onWritten?.());
    return chunk === undefined ? null : new Uint8Array(toBuffer(chunk));
  }
  const iterator = chunksOf(response);
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const next = await iterator.next();
      if (next.done) controller.close();
      else controller.enqueue(new Uint8Array(next.value));
    },
    async cancel() {
      await iterator.return(undefined);
    },
  });
}

/** The response headers as `Headers`, repeated names appended. */
export function webHeaders(response: RouteResponse): Headers {
  const headers = new Headers();
  for (const [name, value] of response.headers ?? []) headers.append(name, value);
  return headers;
}
