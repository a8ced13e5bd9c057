import { isUtf8 } from 'node:buffer';
import { Readable } from 'node:stream';
import type {
  FastifyInstance,
  FastifyReply,
  FastifyRequest,
  HookHandlerDoneFunction,
  onErrorHookHandler,
} from 'fastify';
import { captureBody, type HeaderRecordValue, handlerHeaders, watchConnection } from '../../core/capture.js';
import { type BeginResult, type IdempotencyEngine, isPromise, type Ticket } from '../../core/engine.js';
import { consumedMultipart, isMultipart, isParsedValue, type RequestBody } from '../../core/fingerprint.js';
import { markHeld } from '../../core/held.js';
import { createMediaTypeMatcher, JSON_MEDIA_TYPES } from '../../core/media-type.js';
import { ownSymbol } from '../../core/own-symbol.js';
import { type EngineReply, headerValue, REMOVED_HEADER } from '../../core/responses.js';
import { hasBody, readRequestBody } from '../node-http/body.js';
import { outHeadersOf } from '../node-http/capture.js';
import { hasContent } from '../node-http/flow.js';

/**
 * What the Fastify plugin and NestJS on Fastify share: the body a request is fingerprinted by and the start of its
 * run ({@link fingerprintBody}, {@link beginRequest}); a request that took its key is marked running
 * ({@link startRun}); the `onSend` hook hands its serialised payload to the engine and lets it out once stored;
 * the `onError` hook marks a handler that failed, so that its key is released. Nothing here loads `fastify` or
 * `fastify-plugin` at run time.
 */

/** An engine whose `scope` and `fingerprint` functions see Fastify's request. */
export type FastifyEngine = IdempotencyEngine<FastifyRequest>;

/** A request running its handler under a key it holds. */
interface Running {
  readonly engine: FastifyEngine;
  readonly ticket: Ticket;
  /** The headers set before the handler ran (by hooks that ran earlier): not stored when left unchanged. */
  readonly before: Record<string, HeaderRecordValue>;
  /** The handler failed: the response on its way is the error handler's. */
  failed: boolean;
}

/**
 * A request's state, kept as properties of the request rather than in a `WeakMap` and a `WeakSet`: an entry of a
 * weak collection made for each young request is an ephemeron that every scavenge processes, a measurable share
 * of Fastify's time per request. Symbols, so that they neither clash with decorations nor show in `Object.keys`.
 */
const RUNNING: unique symbol = Symbol('idempotency-header.running');
/** Set while the request's reply waits in `onSend` for the engine to settle. */
const HOLDING: unique symbol = Symbol('idempotency-header.holding');
/** Set while an engine reply whose body is text passes the `onSend` hooks: see {@link sendFastifyReply}. */
const REPLY_TEXT: unique symbol = Symbol('idempotency-header.reply-text');
type StatefulRequest = FastifyRequest & {
  [RUNNING]?: Running | undefined;
  [HOLDING]?: boolean;
  [REPLY_TEXT]?: ReplyText | undefined;
};

/** The bytes an engine reply was sent with, and the same body as the text `onSend` hooks are given instead. */
interface ReplyText {
  readonly bytes: Buffer;
  readonly text: string;
}

function runningOf(request: FastifyRequest): Running | undefined {
  return (request as StatefulRequest)[RUNNING];
}

function setRunning(request: FastifyRequest, state: Running | undefined): void {
  // Set to `undefined` rather than deleted: a deleted property turns the request into a slow dictionary object.
  (request as StatefulRequest)[RUNNING] = state;
}

function setHolding(request: FastifyRequest, held: boolean): void {
  (request as StatefulRequest)[HOLDING] = held;
}

const EMPTY = new Uint8Array(0);

/**
 * What a keyed request's fingerprint hashes: `parsed` (the body Fastify's parser produced), or, when no parser
 * took the body (`parsed` is nothing or the stream itself, and the stream is unread), its bytes, read and put back
 * for the handler; rejects with `BODY_TOO_LARGE` past `limit` bytes. A multipart body a parser turned into fields
 * is refused: fields hold no trace of the bytes, and two uploads that differ only in their files would look alike.
 */
export function fingerprintBody(
  request: FastifyRequest,
  parsed: RequestBody,
  limit: number,
): RequestBody | Promise<Buffer> {
  const raw = request.raw;
  const leftInStream =
    (parsed === undefined || parsed === raw) && hasBody(raw) && !raw.readableEnded && !raw.readableDidRead;
  if (leftInStream) return readRequestBody(raw, limit);
  // The plugin reads a multipart body in `preParsing` on the routes declared once a multipart parser was
  // registered; a route declared before gets the parser's fields only.
  if (isParsedValue(parsed) && isMultipart(request.headers['content-type'])) {
    return Promise.reject(
      consumedMultipart(
        'register the multipart parser (such as `@fastify/multipart`, awaited) before declaring the routes',
      ),
    );
  }
  return parsed;
}

/**
 * Looks a keyed request's key up and takes its lock: its fingerprint hashes `body` (a multipart body with its own
 * boundary set aside) and `request.url`, the path with its query as sent. Throws as `engine.begin` does.
 */
export function beginRequest(
  engine: FastifyEngine,
  request: FastifyRequest,
  key: string,
  body: RequestBody,
  startedAt: number,
): BeginResult | Promise<BeginResult> {
  const contentType = body instanceof Uint8Array ? request.headers['content-type'] : undefined;
  return engine.begin(request, request.method, request.url, key, body, startedAt, contentType);
}

/** Whether the request's reply waits in `onSend` for the engine to store or release its key. */
export function isHolding(request: FastifyRequest): boolean {
  return (request as StatefulRequest)[HOLDING] === true;
}

/**
 * Marks a request whose key was taken as running its handler: its reply is captured in `onSend`. Headers set so
 * far belong to hooks that ran before and are not stored unless the handler changes them.
 */
export function startRun(
  engine: FastifyEngine,
  request: FastifyRequest,
  reply: FastifyReply,
  ticket: Ticket,
): void {
  setRunning(request, { engine, ticket, before: replyHeaders(reply), failed: false });
  markHeld(request.raw);
  // A reply that goes out without passing `onSend` (hijacked) releases the key; a client that leaves changes nothing.
  watchConnection(reply.raw, engine, ticket);
}

type ReplyHeaders = ReturnType<FastifyReply['getHeaders']>;

/** Where Fastify keeps the headers set on a reply, found once by its symbol's description; `null`: not found. */
let replyHeadersKey: symbol | null | undefined;
const NO_HEADERS = Object.freeze({}) as ReplyHeaders;

/**
 * The reply's headers, as `reply.getHeaders()` gives them, to be read only. From Fastify's own record when it holds
 * them all (nothing was set on `reply.raw` directly): a shared empty record when it is empty, the commonest case
 * before the handler runs, and a plain copy otherwise. `reply.getHeaders()` merges in a copy of the response's
 * headers without a prototype, which V8 clones on its slow path; it remains for another version of Fastify.
 */
function replyHeaders(reply: FastifyReply): ReplyHeaders {
  if (replyHeadersKey === undefined) replyHeadersKey = ownSymbol(reply, 'fastify.reply.headers');
  const own =
    replyHeadersKey === null ? undefined : (reply as unknown as Record<symbol, unknown>)[replyHeadersKey];
  if (typeof own !== 'object' || own === null || hasRawHeaders(reply.raw)) return reply.getHeaders();
  return hasMembers(own) ? ({ ...own } as ReplyHeaders) : NO_HEADERS;
}

/** Whether headers were set on the response itself, told without `getHeaderNames()`'s array when none were. */
function hasRawHeaders(res: FastifyReply['raw']): boolean {
  return outHeadersOf(res) !== null && res.getHeaderNames().length > 0;
}

function hasMembers(record: object): boolean {
  for (const _name in record) return true;
  return false;
}

/**
 * Marks the handler of a running request as failed: the reply on its way is an error handler's, and the key is
 * released before it goes out. `false` when the request was not running (it held no key, or its reply had
 * already reached `onSend`).
 */
export function failRun(request: FastifyRequest): boolean {
  const state = runningOf(request);
  if (state === undefined) return false;
  state.failed = true;
  return true;
}

/** The `onSend` hook: stores the serialised payload of a running request before letting it out. */
function idempotencyOnSend(
  request: FastifyRequest,
  reply: FastifyReply,
  payload: unknown,
  next: (error: Error | null, payload?: unknown) => void,
): void {
  // The reply waits below, so to Fastify it is not sent yet: a handler's promise that resolves meanwhile without
  // having awaited its reply (Nest's `@Redirect()` routes, an async handler that calls `reply.send()` and returns
  // nothing) makes Fastify send again, an empty reply that would go out ahead of the held one, which then fails
  // with ERR_HTTP_HEADERS_SENT as an unhandled rejection. Without the wait the reply would be out, and Fastify
  // would send nothing more: nor is anything sent here.
  if (isHolding(request)) return;
  const state = runningOf(request);
  if (state === undefined || state.ticket.settled) return next(null, asReplyText(request, payload));
  setRunning(request, undefined);
  const status = reply.statusCode;
  const headers = replyHeaders(reply);
  const held = captureReply(state, payload, status, headers);
  if (held === undefined) return next(null, payload);
  // The engine settles later: the reply waits here until it has.
  setHolding(request, true);
  held.then((sent) => {
    setHolding(request, false);
    if (reply.sent) {
      // Taken over by `onError` meanwhile, whose error handling changed the status and headers: restored.
      reply.code(status);
      reply.headers(headers);
    }
    next(null, sent);
  });
}

/** The `onError` hook: marks a failed handler, or keeps Fastify from answering over a reply held in `onSend`. */
const idempotencyOnError: onErrorHookHandler = function idempotencyOnError(
  request,
  reply,
  _error,
  next: HookHandlerDoneFunction,
) {
  if (failRun(request)) return next();
  // The handler failed after its reply reached `onSend`, where it waits for the store. Without the middleware
  // the reply would have gone out already and Fastify would only log the error; marking the reply as taken
  // over keeps Fastify from sending an error response over it.
  if (isHolding(request)) reply.hijack();
  next();
};

/**
 * Sends an engine reply (error, conflict or replay) through `reply`, so that Fastify's `onSend` and `onResponse`
 * hooks and its logging run as for any response. Its headers replace those of the same name set before; removals
 * stored with a replay remove what hooks that ran before set again. The body goes to `reply.send` as bytes, which
 * Fastify sends as they are (a string would pass a route's serializer, and gain a charset); a text body (JSON,
 * `text/*`) that is valid UTF-8 then reaches the other `onSend` hooks as a string, the form Fastify's serializer
 * hands them on a first run, so that a hook which treats the payload as text does to a replay what it did to the
 * first response. Node.js writes the string as UTF-8: the same bytes.
 */
export function sendFastifyReply(reply: FastifyReply, answer: EngineReply): void {
  reply.code(answer.status);
  const headers: Record<string, string | string[]> = {};
  for (const [name, value] of answer.headers) {
    if (name === REMOVED_HEADER) {
      reply.removeHeader(value);
      continue;
    }
    const previous = headers[name];
    headers[name] =
      previous === undefined ? value : Array.isArray(previous) ? [...previous, value] : [previous, value];
  }
  reply.headers(headers);
  const { body } = answer;
  const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  if (isText(answer.headers, bytes)) {
    (reply.request as StatefulRequest)[REPLY_TEXT] = { bytes, text: bytes.toString('utf8') };
  }
  reply.send(bytes);
}

const matchesJson = createMediaTypeMatcher(JSON_MEDIA_TYPES);
const TEXT_TYPE = /^\s*text\//i;

/** Whether a reply's body is text that `onSend` hooks get as a string: JSON or `text/*`, valid UTF-8. */
function isText(headers: EngineReply['headers'], bytes: Buffer): boolean {
  if (bytes.byteLength === 0) return false;
  const contentType = headerValue(headers, 'content-type');
  if (contentType === undefined || !(matchesJson(contentType) || TEXT_TYPE.test(contentType))) return false;
  return isUtf8(bytes);
}

/**
 * The payload the `onSend` hooks after this one get for a request that is not running: an engine reply's text in
 * place of its bytes (see {@link sendFastifyReply}), when they reach this hook unchanged; else the payload itself.
 */
function asReplyText(request: FastifyRequest, payload: unknown): unknown {
  const replyText = (request as StatefulRequest)[REPLY_TEXT];
  if (replyText === undefined) return payload;
  (request as StatefulRequest)[REPLY_TEXT] = undefined;
  return payload === replyText.bytes ? replyText.text : payload;
}

/** Where Fastify keeps an instance's hooks and the instances it contains, found once by their symbols. */
let hooksKey: symbol | null | undefined;
let childrenKey: symbol | null | undefined;

/**
 * Adds the capture's hooks to a Fastify instance: its `onSend` hook ahead of every `onSend` hook registered so far,
 * in the instance and in those it contains (hooks registered later go after it, as Fastify adds them at the end),
 * and its `onError` hook. The payload stored is then the handler's, before any other hook changed it, and every
 * other `onSend` hook changes a replay as it changed the first response, once: one registered before the plugin
 * that wraps or rewrites the payload would otherwise be stored with its change and apply it again on the replay.
 * Where Fastify's hook lists are not found (another version), the `onSend` hook is added the public way.
 */
export function addCaptureHooks(fastify: FastifyInstance): void {
  const lists = onSendLists(fastify, []);
  if (lists === undefined) fastify.addHook('onSend', idempotencyOnSend);
  else for (const list of lists) list.unshift(idempotencyOnSend);
  fastify.addHook('onError', idempotencyOnError);
}

/** The `onSend` hook lists of an instance and of every instance it contains; `undefined` if one is not found. */
function onSendLists(instance: object, lists: unknown[][]): unknown[][] | undefined {
  if (hooksKey === undefined) hooksKey = ownSymbol(instance, 'fastify.hooks');
  if (childrenKey === undefined) childrenKey = ownSymbol(instance, 'fastify.children');
  if (hooksKey === null || childrenKey === null) return undefined;
  const hooks = (instance as Record<symbol, { onSend?: unknown } | undefined>)[hooksKey];
  const children = (instance as Record<symbol, unknown>)[childrenKey];
  if (!Array.isArray(hooks?.onSend) || !Array.isArray(children)) return undefined;
  if (!lists.includes(hooks.onSend)) lists.push(hooks.onSend);
  for (const child of children) {
    if (typeof child !== 'object' || child === null || onSendLists(child, lists) === undefined)
      return undefined;
  }
  return lists;
}

/**
 * Hands the serialised payload to the engine (or, after the handler failed, releases the key), with the reply's
 * `status` and `headers` as `onSend` found them: a
 * string or buffer at once, a stream read whole (or relayed, when it is not stored or outgrows
 * `maxResponseBytes`, its end held until the engine settled). `undefined` when the engine settled at once and the
 * payload goes on as it is (a string or buffer with a synchronous backend: nothing is allocated to wait); else
 * the payload to send once it has.
 */
function captureReply(
  state: Running,
  payload: unknown,
  status: number,
  headers: Readonly<Record<string, HeaderRecordValue>>,
): Promise<unknown> | undefined {
  const { engine, ticket } = state;
  // The handler failed: the error handler's reply goes out once the key is released.
  if (state.failed) return afterSettling(engine.fail(ticket), payload);
  if (typeof payload === 'object' && Object.prototype.toString.call(payload) === '[object Response]') {
    // Fastify applies a `Response`'s status and headers after `onSend`: it is sent as it is, and not stored.
    return afterSettling(engine.fail(ticket), payload);
  }
  const stored = handlerHeaders(headers, state.before);
  const stream = asStream(payload);
  if (stream === undefined) {
    // Node.js sends no body with a 1xx, 204 or 304, whatever the payload; neither does a replay.
    const body =
      !hasContent(status) || payload === null || payload === undefined
        ? EMPTY
        : (payload as string | Uint8Array);
    return afterSettling(engine.finish(ticket, { status, headers: stored, body }), payload);
  }
  return captureBody(engine as IdempotencyEngine<never>, ticket, { status, headers: stored }, stream).then(
    (captured) => {
      if (captured.kind === 'stream') return Readable.from(captured.chunks, { objectMode: false });
      // A stream again, so that Fastify frames it as it would have the handler's (chunked, no length).
      const { body } = captured;
      return Readable.from([Buffer.from(body.buffer, body.byteOffset, body.byteLength)], {
        objectMode: false,
      });
    },
  );
}

/** `undefined` when the engine has settled; else a promise of `payload` once it has. */
function afterSettling(settled: void | Promise<void>, payload: unknown): Promise<unknown> | undefined {
  return isPromise(settled) ? settled.then(() => payload) : undefined;
}

/** A payload's chunks when it is a stream: a Node.js readable, or a web `ReadableStream` (Fastify 5 sends both). */
function asStream(payload: unknown): AsyncIterable<unknown> | undefined {
  if (payload === null || typeof payload !== 'object') return undefined;
  if (typeof (payload as Readable).pipe === 'function') return payload as Readable;
  if (typeof (payload as ReadableStream).getReader === 'function') {
    return Readable.fromWeb(payload as import('node:stream/web').ReadableStream);
  }
  return undefined;
}
