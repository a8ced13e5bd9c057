import type { IncomingMessage, ServerResponse } from 'node:http';
import { type BeginResult, IdempotencyEngine, isPromise } from '../../core/engine.js';
import { IdempotencyError } from '../../core/errors.js';
import { consumedMultipart, isMultipart, type RequestBody } from '../../core/fingerprint.js';
import { isHeld, markHeldInPlace } from '../../core/held.js';
import { nodeRequestHeader } from '../../core/key.js';
import type { IdempotencyOptions } from '../../core/options.js';
import { type EngineReply, REMOVED_HEADER } from '../../core/responses.js';
import { nodeSha256 } from '../../runtime/node-sha256.js';
import { BODY_TOO_LARGE, hasBody, readRequestBody } from './body.js';
import { captureResponse } from './capture.js';
import { shareHiddenClass } from './dictionary-mode.js';

/**
 * The request flow shared by every adapter built on `node:http` objects (Express, Connect, `node:http` itself):
 * method and key checks, the body for the fingerprint, the engine's decision, and then either its reply or the
 * handler with its response captured.
 */

/** Continues the chain: runs the handler (or the next middleware). */
export type Continue = () => void;
/** Reports an error the middleware cannot answer itself (a failing `scope` function, an unreadable body). */
export type Fail = (error: unknown) => void;
/** Sends the engine's own answer (an error, a conflict, a replay): {@link sendReply} unless the adapter defers it. */
export type Answer = (res: ServerResponse, reply: EngineReply) => void;

/** Marks that no body parser ran: the raw body is read from the request stream (and put back). */
export const READ_STREAM: unique symbol = Symbol('idempotency-header.read-stream');

const EMPTY_BODY = new Uint8Array(0);

/** The engine as adapters on `node:http` objects use it: hashing with `node:crypto`, synchronously. */
export function createNodeEngine<Req>(options: IdempotencyOptions<Req>): IdempotencyEngine<Req> {
  return new IdempotencyEngine<Req>(options, { sha256: nodeSha256 });
}

/**
 * Runs the idempotency flow for one request. `url` is the path with its query string as the application sees
 * it; `body` is what a body parser produced, or {@link READ_STREAM} to read the raw bytes from `req`. `answer`
 * sends the engine's own replies; a framework that writes every response itself (NestJS) hands them over to it.
 */
export function handleNodeRequest<Req extends IncomingMessage>(
  engine: IdempotencyEngine<Req>,
  req: Req,
  res: ServerResponse,
  url: string,
  body: RequestBody | typeof READ_STREAM,
  next: Continue,
  fail: Fail,
  answer: Answer = sendReply,
): void {
  const method = req.method ?? 'GET';
  if (!engine.handles(method)) return next();
  // Express's request and response have a hidden class each of their own: shared from here on, every property
  // access on them (the middleware's, the handler's, Express's and Node.js's) hits V8's caches instead of missing.
  shareHiddenClass(req);
  shareHiddenClass(res);
  // Another instance of the middleware on this request's path took its key: it handles the request.
  if (isHeld(req)) return next();
  const startedAt = performance.now();
  const key = engine.readKey(method, nodeRequestHeader(req, engine.headerName));
  if (key === undefined) return next();
  if (typeof key !== 'string') return answer(res, key);
  if (body !== READ_STREAM || !engine.needsBody) {
    const seen = body === READ_STREAM ? undefined : body;
    return begin(engine, req, res, url, key, seen, startedAt, next, fail, answer);
  }
  if (!hasBody(req)) return begin(engine, req, res, url, key, EMPTY_BODY, startedAt, next, fail, answer);
  if (req.readableEnded)
    return fail(isMultipart(req.headers['content-type']) ? consumedMultipart() : unseenBody());
  const limit = engine.maxRequestBytes;
  if (Number(req.headers['content-length']) > limit) {
    return answer(res, engine.bodyTooLarge(method, startedAt));
  }
  readRequestBody(req, limit).then(
    (bytes) => begin(engine, req, res, url, key, bytes, startedAt, next, fail, answer),
    (error: unknown) => {
      if (error === BODY_TOO_LARGE) return answer(res, engine.bodyTooLarge(method, startedAt));
      fail(
        new IdempotencyError('ERR_IDEMPOTENCY_BODY', 'The request body could not be read', { cause: error }),
      );
    },
  );
}

/**
 * A parser consumed the body without marking the request (as `body-parser` does with `req._body`), so the
 * middleware can see neither the bytes nor a value it may trust to stand for them: two different requests could
 * get one fingerprint. Refused rather than guessed.
 */
function unseenBody(): IdempotencyError {
  return new IdempotencyError(
    'ERR_IDEMPOTENCY_BODY',
    'The request body was consumed by a parser that did not mark the request, so it cannot be fingerprinted: mount the idempotency middleware before that parser, or pass a `fingerprint` function',
  );
}

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
  answer: Answer,
): void {
  let result: BeginResult | Promise<BeginResult>;
  try {
    result = engine.begin(req, req.method ?? 'GET', url, key, body, startedAt, req.headers['content-type']);
  } catch (error) {
    return fail(error);
  }
  if (isPromise(result)) result.then((settled) => dispatch(engine, req, res, settled, next, answer), fail);
  else dispatch(engine, req, res, result, next, answer);
}

function dispatch(
  engine: IdempotencyEngine<never>,
  req: IncomingMessage,
  res: ServerResponse,
  result: BeginResult,
  next: Continue,
  answer: Answer,
): void {
  if (result.kind === 'pass') return next();
  if (result.kind === 'reply') return answer(res, result);
  // On the request itself: its hidden class is shared (see `shareHiddenClass`), which a property keeps.
  markHeldInPlace(req);
  captureResponse(res, engine, result);
  next();
}

/**
 * Writes an engine reply (error, conflict or replay) with its exact body bytes. Its headers are set before the
 * head is written, as a handler sets them: they replace those of the same name that middleware mounted earlier
 * set, and that middleware's `on-headers` hooks (compression, timing) see them as they saw the handler's on the
 * first run. Removals stored with a replay remove what that middleware set again.
 */
export function sendReply(res: ServerResponse, reply: EngineReply): void {
  const grouped = new Map<string, string[]>();
  for (const [name, value] of reply.headers) {
    if (name === REMOVED_HEADER) res.removeHeader(value);
    else if (grouped.has(name)) grouped.get(name)!.push(value);
    else grouped.set(name, [value]);
  }
  for (const [name, values] of grouped) res.setHeader(name, values.length === 1 ? values[0]! : values);
  if (hasContent(reply.status)) res.setHeader('content-length', reply.body.byteLength);
  res.writeHead(reply.status);
  res.end(reply.body);
}

/**
 * Whether a response with this status has content, and so a `Content-Length`: a 1xx, 204 or 304 has none (RFC 9110
 * §8.6 forbids the header on a 1xx or 204; on a 304 it would describe the representation, which is not stored).
 * Node.js sends no body with them, whatever it is given.
 */
export function hasContent(status: number): boolean {
  return status >= 200 && status !== 204 && status !== 304;
}
