import type { Context, MiddlewareHandler } from 'hono';
import type { ContentfulStatusCode, StatusCode } from 'hono/utils/http-status';
import { type ClosingResponse, stopWatchingConnection, watchConnection } from '../core/capture.js';
import { IdempotencyEngine, isPromise, type RequestIdempotency, type Ticket } from '../core/engine.js';
import { isHeld, markHeld, markHeldInPlace } from '../core/held.js';
import { type NodeRequestHeaders, nodeRequestHeader } from '../core/key.js';
import type { IdempotencyOptions } from '../core/options.js';
import { type EngineReply, REMOVED_HEADER } from '../core/responses.js';
import type { Awaitable } from '../core/types.js';
import { builtinSha256 } from '../runtime/builtin-sha256.js';
import { captureResponse, isNullBodyStatus, readBody, responseInHand, TOO_LARGE } from './web/response.js';

export type { RequestIdempotency } from '../core/engine.js';

/** Options of the Hono middleware: every engine option, with `scope` and `fingerprint` given Hono's `Context`. */
export type HonoIdempotencyOptions = IdempotencyOptions<Context>;

/**
 * The context variable the middleware sets: `c.get('idempotency')` is the key and lease signal of a request that
 * holds its key, `undefined` for one that passed through without idempotency.
 *
 * @example
 * ```ts
 * const app = new Hono<{ Variables: IdempotencyVariables }>();
 * app.post('/orders', (c) => c.json({ key: c.get('idempotency')?.key }, 201));
 * ```
 */
export interface IdempotencyVariables {
  idempotency: RequestIdempotency | undefined;
}

/** The middleware's environment type, for apps that declare their `Variables`. */
export interface HonoIdempotencyEnv {
  Variables: IdempotencyVariables;
}

/**
 * Hono middleware that makes POST and PATCH endpoints safe to retry with an `Idempotency-Key` header: the first
 * request runs, repeats get the stored response with `Idempotent-Replayed: true`, a repeat while the first still
 * runs gets 409, and a key reused for a different request gets 422. Web-standard APIs only (`Request`,
 * `Response`, `crypto.subtle`): it runs on Node.js (`@hono/node-server`), Bun, Deno and Cloudflare Workers.
 *
 * Mount it after authentication and before the routes it protects. It reads the body's bytes for the fingerprint,
 * up to `maxRequestBytes`, and leaves them for the handler: `c.req.json()`, `c.req.text()`, a validator, and
 * `c.req.raw.json()` or `c.req.raw.body` read it as usual. The fingerprint's path is the request URL's path and
 * query string. A handler that throws leaves the key free for a retry; the app's `onError` answers as before.
 *
 * @example
 * ```ts
 * import { Hono } from 'hono';
 * import { MemoryBackend } from 'idempotency-header';
 * import { idempotencyHeader } from 'idempotency-header/hono';
 *
 * const app = new Hono();
 * app.use('/orders/*', idempotencyHeader({ backend: new MemoryBackend() }));
 * app.post('/orders', async (c) => c.json({ id: crypto.randomUUID(), ...(await c.req.json()) }, 201));
 * ```
 */
export function idempotencyHeader(options: HonoIdempotencyOptions): MiddlewareHandler<HonoIdempotencyEnv> {
  const sha256 = builtinSha256();
  const engine = new IdempotencyEngine<Context>(options, sha256 === undefined ? {} : { sha256 });
  return async function idempotencyHeader(c, next) {
    const method = c.req.method;
    if (!engine.handles(method)) return next();
    const incoming = nodeRequest(c);
    // Another instance of the middleware on this request's path took its key: it handles the request.
    if (isHeld(incoming ?? c.req.raw)) return next();
    const startedAt = performance.now();
    const key = engine.readKey(method, requestHeader(c, incoming, engine.headerName));
    if (key === undefined) return next();
    if (typeof key !== 'string') return reply(c, key);
    let body: Uint8Array | undefined;
    if (engine.needsBody) {
      const read = await readRequestBody(c, incoming, engine.maxRequestBytes);
      if (read === TOO_LARGE) return reply(c, engine.bodyTooLarge(method, startedAt));
      body = read;
    }
    const contentType = body === undefined ? undefined : singleHeader(c, incoming, 'content-type');
    const begun = engine.begin(c, method, requestUrl(c, incoming), key, body, startedAt, contentType);
    const result = isPromise(begun) ? await begun : begun;
    if (result.kind === 'pass') return next();
    if (result.kind === 'reply') return reply(c, result);
    // Both, so that a fetch handler wrapped with `withIdempotency` inside the app sees the mark too. Hono's
    // request is a runtime's `Request` or `@hono/node-server`'s, whose instances share their hidden class.
    markHeldInPlace(c.req.raw);
    if (incoming !== undefined) markHeld(incoming);
    const before = headersSetBefore(c);
    c.set('idempotency', result);
    const unwatch = watchClient(c, engine, result);
    try {
      await next();
    } finally {
      unwatch();
    }
    // A handler that threw comes back as `c.error`, its response the app's `onError` answer: sent as it is.
    if (c.error !== undefined) {
      const failed = engine.fail(result);
      if (isPromise(failed)) await failed;
      return;
    }
    const response = c.res;
    const captured = captureResponse(engine, result, response, before);
    const sent = isPromise(captured) ? await captured : captured;
    if (sent === response) return;
    // Cleared first, so that Hono does not copy the handler's headers onto their own copy again.
    c.res = undefined;
    c.res = sent;
  };
}

/**
 * A request header (`name` in lower case) as `readKey` takes it. On `@hono/node-server` from the `node:http`
 * request's own headers: `c.req.raw.headers` there builds a `Headers` from them on first use, a cost a handler
 * that reads no header never pays. Node.js joins repeated lines with `, `: a value with a comma is read line by
 * line, as `Headers` cannot.
 */
function requestHeader(
  c: Context,
  incoming: NodeRequestHeaders | undefined,
  name: string,
): string | string[] | undefined {
  if (incoming === undefined) return c.req.raw.headers.get(name) ?? undefined;
  return nodeRequestHeader(incoming, name);
}

/** What `@hono/node-server` puts in `c.env.incoming`: the `node:http` request; `undefined` elsewhere. */
function nodeRequest(c: Context): NodeRequest | undefined {
  const incoming = (c.env as { incoming?: Partial<NodeRequest> } | undefined)?.incoming;
  if (typeof incoming?.headers !== 'object' || incoming.headers === null) return undefined;
  return incoming as NodeRequest;
}

/** The `node:http` request's headers, and its target as the request line gave it. */
interface NodeRequest extends NodeRequestHeaders {
  url?: string;
  /** The body, where the host or this middleware read it first: `@hono/node-server` reads it from here then. */
  rawBody?: unknown;
  readableDidRead?: boolean;
  readableEnded?: boolean;
  on?: unknown;
}

/**
 * The request's URL for the fingerprint, which takes its path and query string. On `@hono/node-server` the
 * request line's own target, a path already: `c.req.url` is that target behind a scheme and host, which the
 * fingerprint would only search for and cut off again.
 */
function requestUrl(c: Context, incoming: NodeRequest | undefined): string {
  const target = incoming?.url;
  return typeof target === 'string' && target.charCodeAt(0) === 47 /* / */ ? target : c.req.url;
}

/**
 * A request header Node.js keeps once however often it is sent (`content-length`, `content-type`): read straight
 * from the `node:http` request's headers where there is one.
 */
function singleHeader(
  c: Context,
  incoming: NodeRequestHeaders | undefined,
  name: 'content-length' | 'content-type',
): string | undefined {
  if (incoming === undefined) return c.req.raw.headers.get(name) ?? undefined;
  const value = incoming.headers[name];
  return typeof value === 'string' ? value : undefined;
}

function isNodeResponse(value: unknown): value is ClosingResponse {
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as ClosingResponse).on === 'function' &&
    typeof (value as ClosingResponse).writableFinished === 'boolean'
  );
}

/**
 * Tells the engine if the client goes away while the handler runs; returns what stops watching. On
 * `@hono/node-server` through its `node:http` response (`c.env.outgoing`): reading `c.req.raw.signal` there builds
 * an `AbortController` for every request, which costs more than the rest of a replay. Elsewhere the request's
 * signal.
 */
function watchClient(c: Context, engine: IdempotencyEngine<Context>, ticket: Ticket): () => void {
  const outgoing = (c.env as { outgoing?: unknown } | undefined)?.outgoing;
  if (isNodeResponse(outgoing)) {
    watchConnection(outgoing, engine, ticket);
    return () => stopWatchingConnection(outgoing);
  }
  const left = () => engine.clientLeft(ticket);
  const signal = c.req.raw.signal;
  signal?.addEventListener('abort', left, { once: true });
  return () => signal?.removeEventListener('abort', left);
}

/**
 * What middleware mounted before this one set with `c.header()` so far (`undefined`: nothing): set again by it on
 * a replay, so not stored. Read from a response made the way Hono makes the handler's, without touching `c.res`
 * (reading it would make Hono copy those headers onto a `Response` the handler returns, which it does not do
 * otherwise). A copy where it is needed: `@hono/node-server`'s own `Response` keeps the very `Headers` Hono goes on
 * filling as the handler sets its own.
 */
function headersSetBefore(c: Context): Headers | undefined {
  const probe = c.newResponse(null);
  const inHand = responseInHand(probe);
  const headers = inHand === undefined ? probe.headers : inHand[2];
  if (headers === undefined || headers === null) return undefined;
  if (!(headers instanceof Headers)) return new Headers(headers as ConstructorParameters<typeof Headers>[0]);
  if (headers.keys().next().done) return undefined;
  return inHand === undefined ? headers : new Headers(headers);
}

/**
 * Sends an engine reply through `c.header` and `c.body`, as a handler would: headers that middleware mounted
 * before set stay, the reply's own replace those of the same name, and stored removals remove them. Set with
 * `c.header`, which writes where the handler's own went: once middleware before read `c.res`, Hono copies that
 * response's headers over a returned one, so headers passed to `c.body` would lose to the earlier values.
 */
function reply(c: Context, answer: EngineReply): Response {
  const seen = new Set<string>();
  for (const [name, value] of answer.headers) {
    if (name === REMOVED_HEADER) c.header(value, undefined);
    else {
      c.header(name, value, { append: seen.has(name) });
      seen.add(name);
    }
  }
  if (isNullBodyStatus(answer.status)) return c.body(null, answer.status as StatusCode);
  c.header('content-length', String(answer.body.byteLength));
  return c.body(answer.body as Uint8Array<ArrayBuffer>, answer.status as ContentfulStatusCode);
}

/**
 * The request body's bytes for the fingerprint, left for the handler to read as if nobody had (`c.req.json()`, a
 * validator, `c.req.raw.json()`, `c.req.raw.body`), up to `maxRequestBytes`. A body an earlier middleware read
 * comes from Hono's cache, under that middleware's own limit. The bytes as they came, never text decoded and
 * encoded again: two bodies that differ only in bytes that are not UTF-8 are two requests.
 */
function readRequestBody(
  c: Context,
  incoming: NodeRequest | undefined,
  limit: number,
): Awaitable<Uint8Array | typeof TOO_LARGE> {
  // Hono keeps promises in its cache (typed as the methods that make them).
  const cache = c.req.bodyCache as Record<string, unknown>;
  for (const _read in cache) return c.req.arrayBuffer().then((read) => new Uint8Array(read));
  const length = singleHeader(c, incoming, 'content-length') ?? null;
  // A length of fewer digits than any number past the limit is within it, told without parsing it.
  if (length !== null && 10 ** length.length > limit && Number(length) > limit) return TOO_LARGE;
  return (incoming !== undefined && readNodeBody(incoming, limit)) || readBytes(c, cache, length, limit);
}

/**
 * On `@hono/node-server`: the body read from the `node:http` request and kept as its `rawBody`, which
 * `@hono/node-server` serves every later read of the request from (`c.req.text()`, `c.req.raw.json()`,
 * `c.req.raw.body`, `formData()`), as it does for hosts that read the body first (Google Cloud Functions). A
 * `rawBody` already there is used as it is. `undefined` when the stream is not there to read (not Node.js's, or
 * read by someone else): the body is then read through the `Request`.
 */
function readNodeBody(
  incoming: NodeRequest,
  limit: number,
): Uint8Array | typeof TOO_LARGE | Promise<Uint8Array | typeof TOO_LARGE> | undefined {
  const kept = incoming.rawBody;
  if (kept instanceof Uint8Array) return kept.byteLength > limit ? TOO_LARGE : kept;
  if (
    typeof incoming.on !== 'function' ||
    incoming.readableDidRead !== false ||
    incoming.readableEnded !== false
  ) {
    return undefined;
  }
  const stream = incoming as NodeRequest & NodeStream;
  return new Promise((resolve, reject) => {
    stream[READING] = { chunks: [], size: 0, limit, resolve, reject };
    stream.on('data', onBodyData);
    stream.on('end', onBodyEnd);
    // No `error` listener: Node.js's request emits `error` only to listeners it has, and is then closed, which
    // tells the same (a client gone, or a broken connection). A listener fewer is a measurable share of the read.
    stream.on('close', onBodyClose);
  });
}

/**
 * Where {@link readNodeBody} keeps a read in progress, on the request itself: its listeners are functions shared
 * by every request (`this` is the request), where a closure of each for every request cost more than the read.
 */
const READING = Symbol('idempotency-header.reading');

/** A body read in progress: the chunks so far and the promise to settle. */
interface BodyRead {
  chunks: Uint8Array[];
  size: number;
  limit: number;
  resolve(body: Uint8Array | typeof TOO_LARGE): void;
  reject(error: Error): void;
}

function onBodyData(this: NodeRequest & NodeStream, chunk: Uint8Array): void {
  const read = this[READING];
  if (read === undefined) return;
  read.size += chunk.byteLength;
  if (read.size <= read.limit) return void read.chunks.push(chunk);
  // The rest is left to @hono/node-server, which drains a body its app did not read once the 413 is sent.
  stopReading(this);
  read.resolve(TOO_LARGE);
}

// Once the body is whole, the listeners stay on the request, left with nothing to do: three removals cost more
// than the rest of the reading, and the request is let go with its response.
function onBodyEnd(this: NodeRequest & NodeStream): void {
  const read = this[READING];
  if (read === undefined) return;
  // Set to `undefined` rather than deleted: a deleted property turns the request into a slow dictionary object.
  this[READING] = undefined;
  const { chunks, size } = read;
  // A Buffer, as `@hono/node-server` takes a `rawBody` only as one. Node.js's own: on `@hono/node-server` only.
  const body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size);
  this.rawBody = body;
  read.resolve(body);
}

function onBodyClose(this: NodeRequest & NodeStream): void {
  const read = this[READING];
  if (read === undefined) return;
  stopReading(this);
  read.reject(new Error('The client closed the connection before the request body was complete'));
}

/** Ends a read before the body's end: its listeners removed, so that the rest of the body is not kept. */
function stopReading(stream: NodeRequest & NodeStream): void {
  stream[READING] = undefined;
  stream.off('data', onBodyData);
  stream.off('end', onBodyEnd);
  stream.off('close', onBodyClose);
}

/** What {@link readNodeBody} uses of a `node:http` request as a stream. */
interface NodeStream {
  [READING]?: BodyRead | undefined;
  on(event: string, listener: (...args: never[]) => void): unknown;
  off(event: string, listener: (...args: never[]) => void): unknown;
}

/**
 * The body's bytes through the `Request` (a runtime other than Node.js, or `app.request()`): through Hono's cache
 * for a body with a length, from the stream within the limit otherwise. `c.req.raw` is then a copy holding the
 * bytes, as Hono's `bodyLimit` leaves it, so that the handler can still read it, and the cache offers the text.
 */
async function readBytes(
  c: Context,
  cache: Record<string, unknown>,
  length: string | null,
  limit: number,
): Promise<Uint8Array | typeof TOO_LARGE> {
  const raw = c.req.raw;
  let bytes: Uint8Array | typeof TOO_LARGE;
  if (length !== null || raw.body === null) {
    bytes = new Uint8Array(await c.req.arrayBuffer());
    if (bytes.byteLength > limit) return TOO_LARGE;
  } else {
    bytes = await readBody(raw.body, limit, null);
    if (bytes === TOO_LARGE) return TOO_LARGE;
    const exact =
      bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength
        ? bytes.buffer
        : bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    cache.arrayBuffer = Promise.resolve(exact);
  }
  if (raw.body !== null) c.req.raw = new Request(raw, { body: bytes as Uint8Array<ArrayBuffer> });
  offerText(cache, bytes);
  return bytes;
}

const decoder = new TextDecoder();
/** Bodies up to this size are offered as text decoded at once; larger ones only when read. */
const EAGER_TEXT_BYTES = 16 * 1024;

/**
 * Offers the body as text in Hono's cache, decoded only if read. `c.req.json()` and `c.req.text()` read the
 * cache's text, and when only the bytes are there they make it through a whole new `Response` (a stream and a
 * copy of the body per request). The decoding is the one `Request.text()` does: UTF-8, a byte order mark dropped.
 */
function offerText(cache: Record<string, unknown>, bytes: Uint8Array): void {
  // A small body is decoded at once: cheaper than defining an accessor on the cache for every request.
  if (bytes.byteLength <= EAGER_TEXT_BYTES) {
    cache.text = Promise.resolve(decoder.decode(bytes));
    return;
  }
  let text: unknown;
  Object.defineProperty(cache, 'text', {
    configurable: true,
    enumerable: true,
    get: () => {
      text ??= Promise.resolve(decoder.decode(bytes));
      return text;
    },
    set: (value: unknown) => {
      text = value;
    },
  });
}
