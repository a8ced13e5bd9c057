import { captureBody, finishWithBody } from '../../core/capture.js';
import type { IdempotencyEngine, Ticket } from '../../core/engine.js';
import type { EngineReply } from '../../core/responses.js';
import type { HeaderPair } from '../../core/types.js';

/**
 * Web-standard pieces shared by the adapters whose handlers answer with a `Response` (Hono, fetch): replies as
 * `Response`s, the handler's `Response` handed to the engine, and request bodies read within a limit. Only
 * `Request`, `Response`, `Headers` and streams: they run on Node.js, Bun, Deno and Cloudflare Workers alike.
 */

/** Statuses whose responses have no body; a `Response` with one is refused by its constructor. */
const NULL_BODY_STATUSES = new Set([101, 103, 204, 205, 304]);
const EMPTY = new Uint8Array(0);

/** An engine reply (error, conflict or replay) as a `Response`: its status, headers and exact body bytes. */
export function replyResponse(reply: EngineReply): Response {
  const headers = new Headers(reply.headers as HeaderPair[]);
  if (NULL_BODY_STATUSES.has(reply.status)) return new Response(null, { status: reply.status, headers });
  headers.set('content-length', String(reply.body.byteLength));
  return new Response(reply.body as Uint8Array<ArrayBuffer>, { status: reply.status, headers });
}

/**
 * The headers of a handler's response as the engine takes them: every header, less those that middleware
 * mounted before this one had set before the handler ran (`before`) and that the handler left as they were.
 */
export function responseHeaders(headers: Headers, before?: Headers): HeaderPair[] {
  const pairs: HeaderPair[] = [];
  for (const [name, value] of headers) {
    if (before !== undefined && before.get(name) === value) continue;
    pairs.push([name, value]);
  }
  return pairs;
}

/**
 * Hands the handler's `Response` to the engine and returns the `Response` to send: the same status and headers,
 * its body either read whole and stored before anything is sent, or relayed as it comes with its end held back
 * until the engine settled (see `captureBody`). Never rejects.
 */
export async function captureResponse(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  response: Response,
  headers: readonly HeaderPair[],
): Promise<Response> {
  const head = { status: response.status, headers };
  const source = response.body;
  if (source === null || NULL_BODY_STATUSES.has(response.status)) {
    await finishWithBody(engine, ticket, head, EMPTY);
    return response;
  }
  const captured = await captureBody(engine, ticket, head, chunksOf(source));
  const init: ResponseInit = {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  };
  if (captured.kind === 'kept') return new Response(captured.body as Uint8Array<ArrayBuffer>, init);
  return new Response(streamOf(captured.chunks), init);
}

/** A `ReadableStream`'s chunks; stopping early cancels the stream, as a runtime does when its client leaves. */
async function* chunksOf(stream: ReadableStream<Uint8Array>): AsyncGenerator<Uint8Array> {
  const reader = stream.getReader();
  let done = false;
  try {
    for (;;) {
      const next = await reader.read();
      if (next.done) {
        done = true;
        return;
      }
      yield next.value;
    }
  } catch (error) {
    done = true;
    throw error;
  } finally {
    if (!done) await reader.cancel().catch(() => {});
  }
}

/** Chunks as a byte stream pulled one at a time, so that a slow client slows the source down as before. */
function streamOf(chunks: AsyncIterable<Uint8Array>): ReadableStream<Uint8Array> {
  const iterator = chunks[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        const next = await iterator.next();
        if (next.done) controller.close();
        else controller.enqueue(next.value);
      },
      async cancel() {
        await iterator.return?.();
      },
    },
    { highWaterMark: 0 },
  );
}

/** {@link readBody}'s answer for a body over its limit. */
export const TOO_LARGE: unique symbol = Symbol('idempotency-header.too-large');

/**
 * Reads a request body stream whole, or stops (cancelling the stream) once it is over `limit` bytes. A body that
 * announces a larger `Content-Length` is refused without reading it.
 */
export async function readBody(
  stream: ReadableStream<Uint8Array> | null,
  limit: number,
  contentLength: string | null,
): Promise<Uint8Array | typeof TOO_LARGE> {
  // Not awaited: cancelling one branch of a teed stream (`request.clone()`) settles only once both are cancelled.
  if (contentLength !== null && Number(contentLength) > limit) {
    stream?.cancel().catch(() => {});
    return TOO_LARGE;
  }
  if (stream === null) return EMPTY;
  const reader = stream.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const next = await reader.read();
    if (next.done) break;
    size += next.value.byteLength;
    if (size > limit) {
      reader.cancel().catch(() => {});
      return TOO_LARGE;
    }
    chunks.push(next.value);
  }
  if (chunks.length === 1) return chunks[0]!;
  const body = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return body;
}
