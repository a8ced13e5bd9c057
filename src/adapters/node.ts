import type { IncomingMessage, ServerResponse } from 'node:http';
import type { IdempotencyEngine, RequestIdempotency } from '../core/engine.js';
import type { IdempotencyOptions } from '../core/options.js';
import { ticketOf } from './node-http/capture.js';
import { failResponse } from './node-http/fallback.js';
import { createNodeEngine, handleNodeRequest, READ_STREAM } from './node-http/flow.js';

/** A `node:http` request listener, synchronous or async. */
export type RequestListener<
  Req extends IncomingMessage = IncomingMessage,
  Res extends ServerResponse = ServerResponse,
> = (req: Req, res: Res) => unknown;

/** Options of {@link withIdempotency}: every engine option, plus how handler failures are reported. */
export interface NodeIdempotencyOptions<Req extends IncomingMessage = IncomingMessage>
  extends IdempotencyOptions<Req> {
  /**
   * Called when the listener throws or its promise rejects. The key is released (or, when the client had gone
   * away, left to lapse with its lease), and a 500 in the configured `errorFormat` is sent, or the connection cut
   * when part of the response had gone out already.
   * @default logs the error with `console.error`
   */
  onHandlerError?: (error: unknown, req: Req) => void;
}

/**
 * Wraps a `node:http` request listener so that its POST and PATCH requests are safe to retry with an
 * `Idempotency-Key` header. The listener reads the request body as usual: the wrapper reads it for the
 * fingerprint and puts it back first.
 *
 * @example
 * ```ts
 * import { createServer } from 'node:http';
 * import { MemoryBackend } from 'idempotency-header';
 * import { withIdempotency } from 'idempotency-header/node';
 *
 * const listener = withIdempotency((req, res) => {
 *   res.writeHead(201, { 'content-type': 'application/json' });
 *   res.end(JSON.stringify({ id: crypto.randomUUID() }));
 * }, { backend: new MemoryBackend() });
 * createServer(listener).listen(3000);
 * ```
 */
export function withIdempotency<
  Req extends IncomingMessage = IncomingMessage,
  Res extends ServerResponse = ServerResponse,
>(listener: RequestListener<Req, Res>, options: NodeIdempotencyOptions<Req>): (req: Req, res: Res) => void {
  if (typeof listener !== 'function') throw new TypeError('withIdempotency: `listener` must be a function');
  const { onHandlerError = logHandlerError, ...engineOptions } =
    options ?? ({} as NodeIdempotencyOptions<Req>);
  const engine = createNodeEngine<Req>(engineOptions);
  const handlerFailed = (error: unknown, req: Req, res: Res) => {
    failResponse(res, engine as IdempotencyEngine<never>);
    try {
      onHandlerError(error, req);
    } catch {}
  };
  const run = (req: Req, res: Res) => {
    responses.set(req, res);
    try {
      const result = listener(req, res);
      if (isThenable(result)) result.then(undefined, (error: unknown) => handlerFailed(error, req, res));
    } catch (error) {
      handlerFailed(error, req, res);
    }
  };
  return function idempotentListener(req, res) {
    handleNodeRequest(
      engine,
      req,
      res,
      req.url ?? '/',
      READ_STREAM,
      () => run(req, res),
      (error) => handlerFailed(error, req, res),
    );
  };
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof (value as PromiseLike<unknown> | null)?.then === 'function';
}

function logHandlerError(error: unknown): void {
  console.error('idempotency-header: the request listener failed', error);
}

export type { RequestIdempotency } from '../core/engine.js';

/** The response of each request the wrapper let run, for {@link idempotencyOf}. */
const responses = new WeakMap<IncomingMessage, ServerResponse>();

/**
 * The idempotency of a request the wrapper let run: its key, and an `AbortSignal` aborted if its lease is lost.
 * `undefined` when the wrapper did not handle the request.
 *
 * @example
 * ```ts
 * const listener = withIdempotency(async (req, res) => {
 *   const { key, signal } = idempotencyOf(req)!;
 *   await fetch('https://ledger.example/entries', { method: 'POST', signal, headers: { 'idempotency-key': key } });
 *   res.writeHead(201, { 'content-type': 'application/json' }).end('{}');
 * }, { backend });
 * ```
 */
export function idempotencyOf(req: IncomingMessage): RequestIdempotency | undefined {
  return ticketOf(responses.get(req));
}
