import { Readable, Stream } from 'node:stream';
import type { Context, Middleware, Next } from 'koa';
import { captureBody, finishWithBody, handlerHeaders, watchConnection } from '../core/capture.js';
import type { IdempotencyEngine, RequestIdempotency, Ticket } from '../core/engine.js';
import { IdempotencyError } from '../core/errors.js';
import { consumedMultipart, isMultipart, type RequestBody } from '../core/fingerprint.js';
import { isHeld, markHeld } from '../core/held.js';
import { nodeRequestHeader } from '../core/key.js';
import type { IdempotencyOptions } from '../core/options.js';
import { type EngineReply, REMOVED_HEADER } from '../core/responses.js';
import type { HeaderPair } from '../core/types.js';
import { BODY_TOO_LARGE, hasBody, readRequestBody } from './node-http/body.js';
import { createNodeEngine } from './node-http/flow.js';

export type { RequestIdempotency } from '../core/engine.js';

declare module 'koa' {
  interface DefaultState {
    /**
     * The key and lease signal of a request that holds its idempotency key; `undefined` for one that passed
     * through without idempotency.
     */
    idempotency?: RequestIdempotency;
  }
}

/** Options of the Koa middleware: every engine option, with `scope` and `fingerprint` given Koa's `ctx`. */
export type KoaIdempotencyOptions = IdempotencyOptions<Context>;

/** Statuses Koa sends without a body (and without `Content-Type`), whatever `ctx.body` holds. */
const EMPTY_STATUSES = new Set([204, 205, 304]);
const EMPTY = new Uint8Array(0);
const TEXT_TYPE: HeaderPair = ['content-type', 'text/plain; charset=utf-8'];

/**
 * Koa 2/3 middleware that makes POST and PATCH endpoints safe to retry with an `Idempotency-Key` header: the
 * first request runs, repeats get the stored response with `Idempotent-Replayed: true`, a repeat while the first
 * still runs gets 409, and a key reused for a different request gets 422.
 *
 * Mount it after authentication and before the routes it protects, either side of a body parser: after one
 * (`@koa/bodyparser`, `koa-body`), the fingerprint hashes the raw text it kept (`ctx.request.rawBody`) or else the
 * parsed body in canonical JSON form; before one, it reads the raw bytes from the stream and puts them back for the
 * parser. The path in the fingerprint is `ctx.originalUrl`. Once the handler (and the middleware after this one)
 * finished, the response is serialised as Koa will send it (status, type, bytes of a string, buffer, stream or JSON
 * body) and stored before this middleware returns; replays go out through `ctx`, so middleware mounted before
 * handles them as any response. Handlers see `ctx.state.idempotency` (`{ key, signal }`).
 *
 * @example
 * ```ts
 * import Koa from 'koa';
 * import { bodyParser } from '@koa/bodyparser';
 * import { MemoryBackend } from 'idempotency-header';
 * import { idempotencyHeader } from 'idempotency-header/koa';
 *
 * const app = new Koa();
 * app.use(bodyParser());
 * app.use(idempotencyHeader({ backend: new MemoryBackend() }));
 * app.use((ctx) => {
 *   ctx.status = 201;
 *   ctx.body = { id: crypto.randomUUID(), item: ctx.request.body.item };
 * });
 * ```
 */
export function idempotencyHeader(options: KoaIdempotencyOptions): Middleware {
  const engine = createNodeEngine<Context>(options);
  return async function idempotencyHeader(ctx: Context, next: Next): Promise<void> {
    const method = ctx.method;
    // Another instance of the middleware on this request's path took its key: it handles the request.
    if (!engine.handles(method) || isHeld(ctx.req)) return next();
    const startedAt = performance.now();
    const key = engine.readKey(method, nodeRequestHeader(ctx.req, engine.headerName));
    if (key === undefined) return next();
    if (typeof key !== 'string') return reply(ctx, key);
    let body: RequestBody;
    if (engine.needsBody) {
      const read = await requestBody(ctx, engine.maxRequestBytes);
      if (read === BODY_TOO_LARGE) return reply(ctx, engine.bodyTooLarge(method, startedAt));
      body = read;
    }
    const result = await engine.begin(
      ctx,
      method,
      ctx.originalUrl,
      key,
      body,
      startedAt,
      ctx.req.headers['content-type'],
    );
    if (result.kind === 'pass') return next();
    if (result.kind === 'reply') return reply(ctx, result);
    const ticket = result;
    markHeld(ctx.req);
    const res = ctx.res;
    // What middleware mounted before this one set so far: set again by it on a replay, so not stored.
    const before = res.getHeaders();
    ctx.state.idempotency = ticket;
    // The client going away changes nothing: the handler goes on and its response is stored all the same.
    watchConnection(res, engine, ticket);
    try {
      await next();
    } catch (error) {
      await engine.fail(ticket);
      throw error;
    }
    await finishResponse(
      engine as IdempotencyEngine<never>,
      ticket,
      ctx,
      handlerHeaders(res.getHeaders(), before),
    );
  };
}

/**
 * The body for the fingerprint: the raw text a parser kept, the value it parsed, or the raw bytes read from the
 * stream (and put back for a parser or handler after this middleware).
 */
async function requestBody(ctx: Context, limit: number): Promise<RequestBody | typeof BODY_TOO_LARGE> {
  const request = ctx.request as Context['request'] & { body?: unknown; rawBody?: unknown };
  if (typeof request.rawBody === 'string') return request.rawBody;
  const req = ctx.req;
  if (!hasBody(req)) return EMPTY;
  // A parser that ran first took the stream and left the value it parsed; one that skipped this content type
  // (`@koa/bodyparser` leaves `{}` then) left the stream as it was, and the bytes are read from it.
  if (req.readableEnded) {
    if (isMultipart(req.headers['content-type'])) throw consumedMultipart();
    if (request.body !== undefined) return request.body as RequestBody;
    throw new IdempotencyError(
      'ERR_IDEMPOTENCY_BODY',
      'The request body was consumed by a middleware that left neither `ctx.request.body` nor `ctx.request.rawBody`, so it cannot be fingerprinted: mount the idempotency middleware before it, or pass a `fingerprint` function',
    );
  }
  if (Number(req.headers['content-length']) > limit) return BODY_TOO_LARGE;
  try {
    return await readRequestBody(req, limit);
  } catch (error) {
    if (error === BODY_TOO_LARGE) return BODY_TOO_LARGE;
    throw new IdempotencyError('ERR_IDEMPOTENCY_BODY', 'The request body could not be read', {
      cause: error,
    });
  }
}

/**
 * Sends an engine reply (error, conflict or replay) through `ctx`, so that middleware mounted before handles it
 * as any response. Its headers replace those of the same name set before.
 */
function reply(ctx: Context, answer: EngineReply): void {
  ctx.status = answer.status;
  const seen = new Set<string>();
  for (const [name, value] of answer.headers) {
    // A stored removal: the handler removed what middleware mounted before set, and that middleware set it again.
    if (name === REMOVED_HEADER) ctx.remove(value);
    else if (seen.has(name)) ctx.append(name, value);
    else ctx.set(name, value);
    seen.add(name);
  }
  const { body } = answer;
  ctx.body = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
}

/**
 * Hands the response to the engine as Koa's `respond()` will send it, and waits until the engine settled, so that
 * it is stored before any byte goes out. A stream body is read whole when it is stored (and replaced by a stream
 * of its bytes), or relayed with its end held back otherwise.
 */
async function finishResponse(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  ctx: Context,
  headers: HeaderPair[],
): Promise<void> {
  // The application answers on `ctx.res` itself: its response cannot be seen here, so it is not stored.
  if (ctx.respond === false) return engine.fail(ticket);
  const status = ctx.status;
  const body: unknown = ctx.body;
  if (EMPTY_STATUSES.has(status) || ctx.method === 'HEAD') {
    const head = { status, headers: EMPTY_STATUSES.has(status) ? withoutType(headers) : headers };
    return finishWithBody(engine, ticket, head, EMPTY);
  }
  if (body === null || body === undefined) {
    if ((ctx.response as { _explicitNullBody?: boolean })._explicitNullBody) {
      return finishWithBody(engine, ticket, { status, headers: withoutType(headers) }, EMPTY);
    }
    // Koa answers with the status message as text.
    const text = ctx.req.httpVersionMajor >= 2 ? String(status) : ctx.message || String(status);
    const head = { status, headers: [...withoutType(headers), TEXT_TYPE] };
    return finishWithBody(engine, ticket, head, text);
  }
  const head = { status, headers };
  if (typeof body === 'string') return finishWithBody(engine, ticket, head, body);
  if (Buffer.isBuffer(body)) return finishWithBody(engine, ticket, head, body);
  const stream = bodyStream(ctx, body);
  if (stream === undefined) return finishWithBody(engine, ticket, head, JSON.stringify(body));
  // Koa gives a `Blob` (and a `Response` that has one) a `Content-Length`, and a stream none: chunked.
  const withLength = ctx.res.hasHeader('content-length');
  const captured = await captureWithoutEarlyErrors(ctx, () => captureBody(engine, ticket, head, stream));
  if (captured.kind === 'kept') {
    // Framed as Koa would have framed the handler's body: bytes get their length, a stream of them goes chunked.
    const bytes = Buffer.from(captured.body.buffer, captured.body.byteOffset, captured.body.byteLength);
    ctx.body = withLength ? bytes : Readable.from([bytes], { objectMode: false });
  } else {
    // Read as the client reads, no further ahead: the bytes already read go out before a failure of the source
    // reaches Koa, which answers a failure before the first byte with a 500 and leaves one after it cut short.
    ctx.body = Readable.from(captured.chunks, { objectMode: false, highWaterMark: 0 });
  }
  // Setting a body sets a status only when none was set explicitly; it was already this one.
  ctx.status = status;
}

/**
 * Runs `capture` with the context's error handling held back. Koa 2 listens for a failure of a stream body from
 * the moment it is set, and answers it at once: while the middleware reads the body, before anything was sent,
 * that would be a complete 500 where Koa, relaying the stream itself, would have begun the response and cut it.
 * The failure reaches Koa later, at the same point of the relayed body.
 */
async function captureWithoutEarlyErrors<T>(ctx: Context, capture: () => Promise<T>): Promise<T> {
  const own = Object.getOwnPropertyDescriptor(ctx, 'onerror');
  ctx.onerror = () => {};
  try {
    return await capture();
  } finally {
    if (own === undefined) delete (ctx as Partial<Context>).onerror;
    else Object.defineProperty(ctx, 'onerror', own);
  }
}

/**
 * The chunks of a body Koa streams: a Node.js stream, or on Koa 3 a `Blob`, a `ReadableStream` or a `Response`.
 * Koa 2 streams only instances of Node.js's `Stream`, and sends anything else as JSON.
 */
function bodyStream(ctx: Context, body: unknown): AsyncIterable<unknown> | undefined {
  if (typeof body !== 'object' || body === null) return undefined;
  // Koa 3 added `ctx.response.back()` along with web bodies.
  const koa3 = typeof (ctx.response as { back?: unknown }).back === 'function';
  if (!koa3) return body instanceof Stream ? (body as Readable) : undefined;
  if (typeof (body as Readable).pipe === 'function') return body as Readable;
  const web = body as { getReader?: unknown; stream?: unknown; body?: unknown; arrayBuffer?: unknown };
  if (typeof web.getReader === 'function') return Readable.fromWeb(body as never);
  if (typeof web.stream === 'function' && typeof web.arrayBuffer === 'function') {
    return Readable.fromWeb((body as Blob).stream() as never);
  }
  if (body instanceof Response)
    return body.body === null ? Readable.from([]) : Readable.fromWeb(body.body as never);
  return undefined;
}

function withoutType(headers: HeaderPair[]): HeaderPair[] {
  return headers.filter(([name]) => name !== 'content-type');
}
