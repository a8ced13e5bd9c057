import type { IncomingMessage, OutgoingHttpHeader, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import { type BeginResult, type IdempotencyEngine, isPromise, type Ticket } from '../core/engine.js';
import { IdempotencyError } from '../core/errors.js';
import type { RequestBody } from '../core/fingerprint.js';
import { type EngineReply, storableHeaders } from '../core/responses.js';

/**
 * The request/response plumbing shared by every adapter built on `node:http` objects (Express, Connect,
 * `node:http` itself). Nothing here allocates a closure on the common path: per-request state lives in one
 * object per response, kept in a WeakMap, and the capturing methods are shared functions that look it up.
 */

/** Continues the chain: runs the handler (or the next middleware). */
export type Continue = () => void;
/** Reports an error the middleware cannot answer itself (a failing `scope` function, an unreadable body). */
export type Fail = (error: unknown) => void;

/**
 * Runs the idempotency flow for one request. `url` is the path with its query string as the application sees
 * it; `parsedBody` is what a body parser produced, or {@link READ_STREAM} to read the raw bytes from `req`
 * (they are put back, so a parser mounted later still sees them).
 */
export function handleNodeRequest<Req extends IncomingMessage>(
  engine: IdempotencyEngine<Req>,
  req: Req,
  res: ServerResponse,
  url: string,
  parsedBody: RequestBody | typeof READ_STREAM,
  next: Continue,
  fail: Fail,
): void {
  const method = req.method ?? 'GET';
  if (!engine.handles(method)) return next();
  const startedAt = performance.now();
  const key = engine.readKey(method, req.headers[engine.headerName]);
  if (key === undefined) return next();
  if (typeof key !== 'string') return sendReply(res, key, engine.replayHeaderKey);
  if (parsedBody !== READ_STREAM || !engine.needsBody) {
    return begin(
      engine,
      req,
      res,
      url,
      key,
      parsedBody === READ_STREAM ? undefined : parsedBody,
      startedAt,
      next,
      fail,
    );
  }
  if (!hasBody(req)) return begin(engine, req, res, url, key, EMPTY_BODY, startedAt, next, fail);
  const limit = engine.maxRequestBytes;
  if (Number(req.headers['content-length']) > limit) {
    return sendReply(res, engine.bodyTooLarge(method, startedAt), engine.replayHeaderKey);
  }
  readRequestBody(req, limit).then(
    (body) => begin(engine, req, res, url, key, body, startedAt, next, fail),
    (error: unknown) => {
      if (error === BODY_TOO_LARGE)
        sendReply(res, engine.bodyTooLarge(method, startedAt), engine.replayHeaderKey);
      else
        fail(
          new IdempotencyError('ERR_IDEMPOTENCY_BODY', 'The request body could not be read', {
            cause: error,
          }),
        );
    },
  );
}

/** Rejection of {@link readRequestBody} for a body over its limit (a chunked body that announced no length). */
const BODY_TOO_LARGE = new Error('The request body is over the limit');

/** Marks that no body parser ran: the raw body is read from the request stream. */
export const READ_STREAM: unique symbol = Symbol('idempotency-header.read-stream');

const EMPTY_BODY = new Uint8Array(0);

function begin<Req extends IncomingMessage>(
  engine: IdempotencyEngine<Req>,
  req: Req,
  res: ServerResponse,
  url: string,
  key: string,
  body: RequestBody,
  startedAt: number,
  next: Continue,
  fail: Fail,
): void {
  let result: BeginResult | Promise<BeginResult>;
  try {
    result = engine.begin(req, req.method ?? 'GET', url, key, body, startedAt);
  } catch (error) {
    return fail(error);
  }
  if (isPromise(result)) result.then((settled) => dispatch(engine, res, settled, next), fail);
  else dispatch(engine, res, result, next);
}

function dispatch(
  engine: IdempotencyEngine<never>,
  res: ServerResponse,
  result: BeginResult,
  next: Continue,
): void {
  if (result.kind === 'pass') return next();
  if (result.kind === 'reply') return sendReply(res, result, engine.replayHeaderKey);
  captureResponse(res, engine, result);
  next();
}

/** Writes an engine reply (error, conflict or replay) with its exact body bytes. */
export function sendReply(res: ServerResponse, reply: EngineReply, replayHeaderKey: string): void {
  const headers: string[] = [];
  for (const [name, value] of reply.headers) headers.push(name, value);
  if (reply.replayed) headers.push(replayHeaderKey, 'true');
  headers.push('content-length', String(reply.body.byteLength));
  res.writeHead(reply.status, headers);
  res.end(reply.body);
}

/** Whether the request announces a body: RFC 9112 says only these two headers do. */
function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/**
 * Reads the whole request body, then puts it back at the front of the stream before the stream reports its end,
 * so that a body parser or handler that runs later reads the same bytes as if nobody had touched them. Rejects
 * with {@link BODY_TOO_LARGE} past `limit` bytes, leaving the rest unread.
 */
export function readRequestBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = () => {
      req.removeListener('readable', onReadable);
      req.removeListener('error', onError);
      req.removeListener('aborted', onAborted);
    };
    const onReadable = () => {
      let chunk: Buffer | null;
      // biome-ignore lint/suspicious/noAssignInExpressions: the stream idiom for draining a paused stream
      while ((chunk = req.read()) !== null) {
        chunks.push(chunk);
        size += chunk.length;
        if (size > limit) return onError(BODY_TOO_LARGE);
      }
      // `complete` is set just before the parser pushes the end of the stream, and `read()` returning null after
      // it means every byte is in hand. 'end' is emitted a tick later unless data is unshifted now.
      if (!req.complete) return;
      cleanup();
      const body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size);
      if (body.length > 0) req.unshift(body);
      resolve(body);
    };
    const onError = (error: Error) => {
      cleanup();
      reject(error);
    };
    const onAborted = () => onError(new Error('The client aborted the request'));
    req.on('readable', onReadable);
    req.on('error', onError);
    req.on('aborted', onAborted);
  });
}

const CAPTURING = 0;
const RELEASING = 1;
const DONE = 2;

/**
 * The capture of each response being captured. A WeakMap rather than a property: adding a property to a response
 * goes through V8's slow path (its prototype chain is long and in dictionary mode), a WeakMap entry does not.
 */
const captures = new WeakMap<ServerResponse, ResponseCapture>();

type WriteCallback = (error?: Error | null) => void;
type Write = ServerResponse['write'];
type End = ServerResponse['end'];
type WriteHead = ServerResponse['writeHead'];
/** A replaced method, called with whatever arguments its caller passed. */
type Original = (this: ServerResponse, ...args: unknown[]) => unknown;

/** The status line and headers of a response the handler ended. */
interface HeldHead {
  readonly status: number;
  readonly message: string | undefined;
  readonly headers: OutgoingHttpHeaders;
}

/**
 * Holds a response back while the handler writes it: the status, the headers and every body chunk, until the
 * handler ends it. Then the response is stored (or the key released) and only after that does the first byte go
 * out. A response that turns out not to be storable (its status or type, or growing past `maxResponseBytes`)
 * releases the key and streams from then on.
 */
class ResponseCapture {
  state = CAPTURING;
  chunks: Buffer[] = [];
  size = 0;
  headJudged = false;
  /** `end()` arrived while a release was pending: its callback (or `true` without one). */
  pendingEnd: WriteCallback | true | undefined;
  /**
   * The handler ended the response, which waits for the backend before it goes out. Until then, the status and
   * headers it ended with are kept here, and later writes (an error handler answering a failure that came after
   * the response) are ignored, as they would be once a response is sent.
   */
  endedHead: HeldHead | undefined;

  constructor(
    readonly engine: IdempotencyEngine<never>,
    readonly ticket: Ticket,
    readonly write: Original,
    readonly end: Original,
    readonly writeHead: Original,
  ) {}
}

/**
 * Installs the capture on a response whose request holds the key's lock. The capturing methods stay in place for
 * the rest of the response and hand every call to the methods they replaced once capturing is over.
 *
 * The usual way in is one prototype swap: the response gets a prototype that adds the capturing `write`, `end`
 * and `writeHead` in front of its own (one per original prototype, made once). Assigning three methods to every
 * response costs far more: each assignment of a name its long, dictionary-mode prototype chain already has (an
 * Express response's has five links) goes through the slow path, and measured with callgrind the swap takes
 * about 10 % fewer instructions per request through Express. A response whose methods another middleware has
 * already replaced on the instance (compression, on-headers) is wrapped on the instance instead, so that its
 * wrappers keep working.
 */
export function captureResponse(res: ServerResponse, engine: IdempotencyEngine<never>, ticket: Ticket): void {
  let originals: Originals;
  if (Object.hasOwn(res, 'write') || Object.hasOwn(res, 'end') || Object.hasOwn(res, 'writeHead')) {
    originals = {
      write: res.write as Original,
      end: res.end as Original,
      writeHead: res.writeHead as Original,
    };
    res.write = captureWrite as Write;
    res.end = captureEnd as End;
    res.writeHead = captureWriteHead as WriteHead;
  } else {
    const capturing = capturingPrototypeFor(Object.getPrototypeOf(res) as object);
    originals = capturing;
    Object.setPrototypeOf(res, capturing.prototype);
  }
  captures.set(res, new ResponseCapture(engine, ticket, originals.write, originals.end, originals.writeHead));
  res.on('close', onResponseClose);
}

/** The methods the capturing ones stand in front of. */
interface Originals {
  readonly write: Original;
  readonly end: Original;
  readonly writeHead: Original;
}

/** A prototype that puts the capturing methods in front of `parent`'s, and the methods it puts them in front of. */
interface CapturingPrototype extends Originals {
  readonly prototype: object;
}

const capturingPrototypes = new WeakMap<object, CapturingPrototype>();

function capturingPrototypeFor(parent: object): CapturingPrototype {
  let capturing = capturingPrototypes.get(parent);
  if (capturing === undefined) {
    const methods = parent as ServerResponse;
    const method = (value: unknown): PropertyDescriptor => ({ value, writable: true, configurable: true });
    capturing = {
      prototype: Object.create(parent, {
        write: method(captureWrite),
        end: method(captureEnd),
        writeHead: method(captureWriteHead),
        headersSent: { get: capturedHeadersSentGetter(parent), configurable: true },
      }) as object,
      write: methods.write as Original,
      end: methods.end as Original,
      writeHead: methods.writeHead as Original,
    };
    capturingPrototypes.set(parent, capturing);
  }
  return capturing;
}

/**
 * Node.js sends a response's head with its first write. While that head is held back, the response still reports
 * it as sent, so that code which checks (Express's final handler, after a handler wrote part of a response and
 * then failed) cuts the connection as it would without the middleware, instead of adding an error body to the
 * held bytes. A response the handler ended reports the truth: it is sent as soon as the backend answers.
 * Made once per prototype: the parent's own `headersSent` is looked up here, not on every read.
 */
function capturedHeadersSentGetter(parent: object): (this: ServerResponse) => boolean {
  const parentGetter = findGetter(parent, 'headersSent');
  return function headersSent() {
    const capture = captures.get(this);
    if (capture?.headJudged && capture.state !== DONE && capture.endedHead === undefined) return true;
    return parentGetter === undefined ? false : Boolean(parentGetter.call(this));
  };
}

function findGetter(from: object | null, name: string): (() => unknown) | undefined {
  for (let proto = from; proto !== null; proto = Object.getPrototypeOf(proto)) {
    const descriptor = Object.getOwnPropertyDescriptor(proto, name);
    if (descriptor !== undefined) return descriptor.get;
  }
  return undefined;
}

function captureWriteHead(
  this: ServerResponse,
  statusCode: number,
  reason?: string | OutgoingHttpHeaders | OutgoingHttpHeader[],
  headers?: OutgoingHttpHeaders | OutgoingHttpHeader[],
): ServerResponse {
  const capture = captures.get(this)!;
  if (capture.endedHead !== undefined) return this;
  if (capture.state === DONE)
    return capture.writeHead.call(this, statusCode, reason, headers) as ServerResponse;
  this.statusCode = statusCode;
  if (typeof reason === 'string') this.statusMessage = reason;
  else headers = reason;
  if (Array.isArray(headers)) applyHeaderList(this, headers);
  else if (headers !== undefined)
    for (const name in headers) this.setHeader(name, headers[name] as OutgoingHttpHeader);
  return this;
}

/** `writeHead` accepts a flat `[name, value, ...]` list or a list of pairs; repeated names add values. */
function applyHeaderList(res: ServerResponse, list: readonly OutgoingHttpHeader[]): void {
  const pairs = Array.isArray(list[0]);
  const step = pairs ? 1 : 2;
  for (const name of new Set(collectNames(list, pairs))) res.removeHeader(name);
  for (let i = 0; i < list.length; i += step) {
    const [name, value] = pairs
      ? (list[i] as unknown as [string, string])
      : [list[i] as string, list[i + 1] as string];
    res.appendHeader(name, value);
  }
}

function collectNames(list: readonly OutgoingHttpHeader[], pairs: boolean): string[] {
  const names: string[] = [];
  for (let i = 0; i < list.length; i += pairs ? 1 : 2) {
    names.push(String(pairs ? (list[i] as unknown as [string])[0] : list[i]));
  }
  return names;
}

function captureWrite(
  this: ServerResponse,
  chunk: unknown,
  encoding?: BufferEncoding | WriteCallback,
  callback?: WriteCallback,
): boolean {
  const capture = captures.get(this)!;
  if (typeof encoding === 'function') {
    callback = encoding;
    encoding = undefined;
  }
  if (capture.endedHead !== undefined) {
    if (callback !== undefined) process.nextTick(callback, writeAfterEnd());
    return true;
  }
  if (!capture.headJudged) judgeHead(this, capture);
  if (capture.state === DONE) return capture.write.call(this, chunk, encoding, callback) as boolean;
  hold(this, capture, chunk, encoding);
  if (callback !== undefined) process.nextTick(callback);
  return true;
}

function captureEnd(
  this: ServerResponse,
  chunk?: unknown,
  encoding?: BufferEncoding | WriteCallback,
  callback?: WriteCallback,
): ServerResponse {
  const capture = captures.get(this)!;
  if (typeof chunk === 'function') {
    callback = chunk as WriteCallback;
    chunk = undefined;
  } else if (typeof encoding === 'function') {
    callback = encoding;
    encoding = undefined;
  }
  if (capture.endedHead !== undefined) {
    if (callback !== undefined) this.once('finish', () => callback());
    return this;
  }
  // Judged here and now (a single `end(body)`, the usual case): the status and type cannot have changed since.
  const judgedNow = !capture.headJudged;
  if (judgedNow) judgeHead(this, capture);
  if (capture.state === DONE) {
    capture.end.call(this, chunk, encoding, callback);
    return this;
  }
  if (chunk !== undefined && chunk !== null)
    hold(this, capture, chunk, encoding as BufferEncoding | undefined);
  if (capture.state === RELEASING) {
    capture.pendingEnd = callback ?? true;
    holdHead(this, capture);
    return this;
  }
  // The whole response is in hand and storable so far: store it, and send it only once the store settled, so
  // that a client which received it and retries finds the stored response rather than the lock.
  capture.state = DONE;
  const body = capture.chunks.length === 1 ? capture.chunks[0]! : Buffer.concat(capture.chunks, capture.size);
  const status = this.statusCode;
  const engine = capture.engine;
  const settled =
    judgedNow || engine.isStorable(status, contentTypeOf(this))
      ? engine.commit(capture.ticket, { status, headers: storableHeaders(this.getHeaders()), body })
      : engine.release(capture.ticket, status);
  if (settled === undefined) sendHeld(this, capture, body, callback);
  else {
    holdHead(this, capture);
    settled.then(() => sendHeld(this, capture, body, callback));
  }
  return this;
}

/** Keeps the status and headers the handler ended the response with, while it waits for the backend. */
function holdHead(res: ServerResponse, capture: ResponseCapture): void {
  capture.endedHead = { status: res.statusCode, message: res.statusMessage, headers: res.getHeaders() };
}

/**
 * Puts back the status and headers the handler ended with, undoing changes made after its `end()`. A
 * `Content-Length` added since is corrected rather than removed: removing it would make Node.js send the body
 * chunked, where the handler's own `end()` would have sent its length.
 */
function restoreHead(res: ServerResponse, capture: ResponseCapture, bodyLength: number): void {
  const head = capture.endedHead;
  if (head === undefined) return;
  capture.endedHead = undefined;
  for (const name of res.getHeaderNames()) {
    if (Object.hasOwn(head.headers, name)) continue;
    if (name === 'content-length') res.setHeader(name, bodyLength);
    else res.removeHeader(name);
  }
  for (const name in head.headers) res.setHeader(name, head.headers[name]!);
  res.statusCode = head.status;
  res.statusMessage = head.message as string;
}

function writeAfterEnd(): Error {
  return Object.assign(new Error('write after end'), { code: 'ERR_STREAM_WRITE_AFTER_END' });
}

function sendHeld(
  res: ServerResponse,
  capture: ResponseCapture,
  body: Buffer,
  callback?: WriteCallback,
): void {
  restoreHead(res, capture, body.length);
  capture.end.call(res, body, callback);
}

/** Buffers a chunk; past `maxResponseBytes` the response will not be stored, so the key is released. */
function hold(
  res: ServerResponse,
  capture: ResponseCapture,
  chunk: unknown,
  encoding?: BufferEncoding,
): void {
  const buffer = toBuffer(chunk, encoding);
  capture.chunks.push(buffer);
  capture.size += buffer.length;
  if (capture.state === CAPTURING && capture.size > capture.engine.maxResponseBytes) stream(res, capture);
}

/** Decides from the status and type, at the first write, whether holding the response back is worth it. */
function judgeHead(res: ServerResponse, capture: ResponseCapture): void {
  capture.headJudged = true;
  if (!capture.engine.isStorable(res.statusCode, contentTypeOf(res))) stream(res, capture);
}

/** Gives up storing: releases the key, then sends what was held and lets later writes through. */
function stream(res: ServerResponse, capture: ResponseCapture): void {
  capture.state = RELEASING;
  const released = capture.engine.release(capture.ticket, res.statusCode);
  if (released === undefined) flush(res, capture);
  else released.then(() => flush(res, capture));
}

function flush(res: ServerResponse, capture: ResponseCapture): void {
  capture.state = DONE;
  const { chunks, pendingEnd } = capture;
  capture.chunks = [];
  if (pendingEnd !== undefined) {
    restoreHead(
      res,
      capture,
      chunks.reduce((total, chunk) => total + chunk.length, 0),
    );
    const last = chunks.pop();
    for (const chunk of chunks) capture.write.call(res, chunk);
    capture.end.call(res, last, pendingEnd === true ? undefined : pendingEnd);
    return;
  }
  for (const chunk of chunks) capture.write.call(res, chunk);
}

/** The client went away before the response was complete: free the key so that a retry runs. */
function onResponseClose(this: ServerResponse): void {
  const capture = captures.get(this);
  if (capture !== undefined && capture.state !== DONE) capture.engine.release(capture.ticket, undefined);
}

function contentTypeOf(res: ServerResponse): string | undefined {
  const value = res.getHeader('content-type');
  return value === undefined ? undefined : String(value);
}

function toBuffer(chunk: unknown, encoding?: BufferEncoding): Buffer {
  if (Buffer.isBuffer(chunk)) return chunk;
  if (typeof chunk === 'string') return Buffer.from(chunk, encoding);
  if (chunk instanceof Uint8Array) return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  throw new TypeError('The "chunk" argument must be of type string or an instance of Buffer or Uint8Array');
}

const INTERNAL_ERROR = Buffer.from('{"detail":"Internal Server Error"}');

/**
 * Answers a request whose handler failed: frees the key, drops whatever the handler had written that is still
 * held back, and sends a 500, or cuts the connection when part of the response already went out.
 */
export function failResponse(res: ServerResponse): void {
  const capture = captures.get(res);
  // The handler had ended its response before it failed: that response goes out once the backend settled.
  if (capture?.endedHead !== undefined) return;
  if (capture !== undefined && capture.state !== DONE) {
    capture.state = DONE;
    capture.chunks = [];
    capture.engine.release(capture.ticket, 500);
  }
  if (res.headersSent || res.writableEnded) {
    if (!res.writableEnded) res.destroy();
    return;
  }
  for (const name of res.getHeaderNames()) res.removeHeader(name);
  res.writeHead(500, { 'content-type': 'application/json', 'content-length': INTERNAL_ERROR.length });
  res.end(INTERNAL_ERROR);
}
