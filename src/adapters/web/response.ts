import { captureBody, finishWithBody, type ResponseHead } from '../../core/capture.js';
import { type IdempotencyEngine, isPromise, type Ticket } from '../../core/engine.js';
import { ownSymbol } from '../../core/own-symbol.js';
import { type EngineReply, headerValue, REMOVED_HEADER } from '../../core/responses.js';
import type { Awaitable, HeaderPair } from '../../core/types.js';

/**
 * Web-standard pieces shared by the adapters whose handlers answer with a `Response` (Hono, fetch): replies as
 * `Response`s, the handler's `Response` handed to the engine, and request bodies read within a limit. Only
 * `Request`, `Response`, `Headers` and streams: they run on Node.js, Bun, Deno and Cloudflare Workers alike.
 */

/** Statuses whose responses have no body; a `Response` with one is refused by its constructor. */
const NULL_BODY_STATUSES = new Set([101, 103, 204, 205, 304]);

/** Whether a response of this status has no body: a `Response` is refused one, even an empty one. */
export function isNullBodyStatus(status: number): boolean {
  return NULL_BODY_STATUSES.has(status);
}
const EMPTY = new Uint8Array(0);

/**
 * An engine reply (error, conflict or replay) as a `Response`: its status, headers and exact body bytes. Stored
 * removals have nothing to remove here (no middleware ran before), and are left out.
 */
export function replyResponse(reply: EngineReply): Response {
  // A record keeps the stored order where the runtime writes headers in the order given (`@hono/node-server`); a
  // repeated name is joined as `Headers` would join it (`set-cookie`, the exception, is never stored).
  const headers: Record<string, string> = Object.create(null);
  for (const [name, value] of reply.headers) {
    if (name === REMOVED_HEADER) continue;
    const previous = headers[name];
    headers[name] = previous === undefined ? value : `${previous}, ${value}`;
  }
  if (isNullBodyStatus(reply.status)) return new Response(null, { status: reply.status, headers });
  headers['content-length'] = String(reply.body.byteLength);
  return new Response(reply.body as Uint8Array<ArrayBuffer>, { status: reply.status, headers });
}

/**
 * The headers of a handler's response as the engine takes them: every header (lower-case names), less those that
 * middleware mounted before this one had set before the handler ran (`before`) and that the handler left as they
 * were; those it removed (or dropped by answering with a `Response` of its own) are stored as removals, so that a
 * replay removes them again after that middleware set them.
 */
export function responseHeaders(entries: Iterable<[string, string]>, before?: Headers): HeaderPair[] {
  const pairs: HeaderPair[] = [];
  const names = before === undefined ? undefined : new Set<string>();
  for (const [name, value] of entries) {
    const lower = name.toLowerCase();
    if (before !== undefined) {
      names!.add(lower);
      if (before.get(lower) === value) continue;
    }
    pairs.push([lower, value]);
  }
  if (before !== undefined) {
    for (const [name] of before) if (!names!.has(name)) pairs.push([REMOVED_HEADER, name]);
  }
  return pairs;
}

/**
 * What a `Response` was built with, as `@hono/node-server` keeps it: status, body (a string, bytes, a `Blob`, a
 * stream, or none) and the headers as given (`HeadersInit`, or `undefined`).
 */
export type InHand = readonly [
  status: number,
  body: string | Uint8Array | Blob | ReadableStream<Uint8Array> | null,
  init: unknown,
];

/** The symbol under which `@hono/node-server`'s `Response` keeps what it was built with, once found. */
let inHandKey: symbol | undefined;

/**
 * What a `Response` was built with, while no web `Response` exists behind it: `@hono/node-server`'s own `Response`
 * (which it puts in place of the global one) keeps its status, body and headers under a symbol described as
 * `cache`, writes them to the socket as they are, and builds a web `Response` (with a stream for its body, its
 * headers sorted) only when something reads its body or status text. Reading them here keeps the response exactly
 * as the runtime would have sent it, and spares a stream and a `Response` per request. `undefined` for any other
 * `Response` (other runtimes, other bodies, a shape this does not recognise): it is read through its public API.
 */
export function responseInHand(response: Response): InHand | undefined {
  let key = inHandKey;
  if (key === undefined || !(key in response)) {
    const found = ownSymbol(response, 'cache');
    if (found === null) return undefined;
    key = found;
    inHandKey = key;
  }
  const cache = (response as unknown as Record<symbol, unknown>)[key];
  if (!Array.isArray(cache) || cache.length !== 3 || typeof cache[0] !== 'number') return undefined;
  const body: unknown = cache[1];
  if (
    body === null ||
    typeof body === 'string' ||
    body instanceof Uint8Array ||
    body instanceof Blob ||
    typeof (body as ReadableStream).getReader === 'function'
  ) {
    return cache as unknown as InHand;
  }
  return undefined;
}

/** `@hono/node-server`'s type for a body sent without one. */
const DEFAULT_TYPE = 'text/plain; charset=UTF-8';

/**
 * The header lines `@hono/node-server` writes for a response in hand, in its order: a `Headers` (or a list) gets
 * its default type when it has a body and no `Content-Type`; a plain record goes out as it is; no headers at all
 * get the default type for a body (a `Blob`'s own type is not used).
 */
function inHandHeaders(init: unknown, hasBody: boolean): Iterable<[string, string]> {
  if (init === undefined || init === null) return hasBody ? [['content-type', DEFAULT_TYPE]] : [];
  if (init instanceof Headers || Array.isArray(init)) {
    const headers = init instanceof Headers ? init : new Headers(init as [string, string][]);
    if (!hasBody || headers.has('content-type')) return headers;
    return [...headers, ['content-type', DEFAULT_TYPE]];
  }
  const record = init as Record<string, unknown>;
  const pairs: [string, string][] = [];
  for (const name in record) pairs.push([name, String(record[name])]);
  return pairs;
}

/**
 * Hands the handler's `Response` to the engine and returns the `Response` to send, with the same status and
 * headers. A body in hand (see {@link responseInHand}) that is a string, bytes or a `Blob` is handed over as it
 * is, and the very same `Response` is sent. A streamed body is read: whole, and stored before anything is sent,
 * or relayed as it comes with its end held back until the engine settled (see `captureBody`). `before`: see
 * {@link responseHeaders}. Never rejects for a `Response`. Synchronous when the body is in hand and the engine
 * settled at once (a synchronous backend): no promise to wait for on the commonest path.
 */
export function captureResponse(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  response: Response,
  before?: Headers,
): Response | Promise<Response> {
  const cache = responseInHand(response);
  if (cache === undefined) return captureStreamed(engine, ticket, response, before);
  const [status, body, init] = cache;
  const head = { status, headers: responseHeaders(inHandHeaders(init, body !== null), before) };
  let settled: Awaitable<void>;
  if (body === null || isNullBodyStatus(status)) settled = finishWithBody(engine, ticket, head, EMPTY);
  else if (typeof body === 'string' || body instanceof Uint8Array)
    settled = finishWithBody(engine, ticket, head, body);
  else return captureInHand(engine, ticket, response, head, body, init);
  return isPromise(settled) ? settled.then(() => response) : response;
}

/** A body in hand that is a `Blob` or a stream. */
async function captureInHand(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  response: Response,
  head: ResponseHead,
  body: Blob | ReadableStream<Uint8Array>,
  init: unknown,
): Promise<Response> {
  const { status } = head;
  if (body instanceof Blob) {
    // Read only when it is kept: a `Blob` can be read again, by the runtime when it sends it.
    const keep =
      body.size <= engine.maxResponseBytes &&
      engine.plan(status, headerValue(head.headers, 'content-type')) === 'store';
    const bytes = keep ? new Uint8Array(await body.arrayBuffer()) : undefined;
    await engine.finish(ticket, { status, headers: head.headers, body: bytes });
    return response;
  }
  // A stream: the `Response` sent is built with the headers as they were given, for the runtime to write them
  // in the same order and case. Its status text is not kept: `@hono/node-server` never writes one.
  const captured = await captureBody(engine, ticket, head, chunksOf(body));
  const sent = { status, headers: init as ResponseInit['headers'] };
  if (captured.kind === 'kept') return new Response(streamOfBytes(captured.body), sent);
  return new Response(streamOf(captured.chunks), sent);
}

/** A `Response` whose body is not in hand: read from its stream. */
async function captureStreamed(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  response: Response,
  before?: Headers,
): Promise<Response> {
  const source = response.body;
  const head = { status: response.status, headers: responseHeaders(response.headers, before) };
  if (source === null || isNullBodyStatus(response.status)) {
    await finishWithBody(engine, ticket, head, EMPTY);
    return response;
  }
  const captured = await captureBody(engine, ticket, head, chunksOf(source));
  const init: ResponseInit = {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  };
  // Of the handler's own class, so that the runtime frames it as it would have framed the handler's.
  const Sent = responseClassOf(response);
  if (captured.kind === 'kept') return new Sent(streamOfBytes(captured.body), init);
  return new Sent(streamOf(captured.chunks), init);
}

/**
 * The class to answer with in place of a `Response` whose body is not in hand. `@hono/node-server` puts a class of
 * its own in place of the global `Response` (the platform's is its base class) and writes a response of it that
 * holds its body in hand as it is, a stream chunked; one backed by a platform `Response` instead (as Hono makes one
 * when middleware sets a header on a finished response), or the platform's own, it reads a little first, and gives
 * a `Content-Length` to a body that ends at once. Such a response is answered with the platform's class, so that it
 * is framed as the handler's would have been; anywhere else, with `Response`.
 */
function responseClassOf(response: Response): typeof Response {
  const base: unknown = Object.getPrototypeOf(Response);
  if (typeof base !== 'function' || base === Function.prototype) return Response;
  return response instanceof (base as typeof Response) ? (base as typeof Response) : Response;
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

/**
 * A stored body sent as the stream it came as: a runtime frames a stream as it did the handler's (chunked, unless
 * the handler gave a `Content-Length`), where bytes in hand would get a `Content-Length` of the runtime's own.
 */
function streamOfBytes(bytes: Uint8Array): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      if (bytes.byteLength > 0) controller.enqueue(bytes);
      controller.close();
    },
  });
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
