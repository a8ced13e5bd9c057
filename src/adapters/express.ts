import { subscribe } from 'node:diagnostics_channel';
import type { ServerResponse } from 'node:http';
import type { NextFunction, Request, Response } from 'express';
import type { RequestIdempotency } from '../core/engine.js';
import type { IdempotencyOptions } from '../core/options.js';
import { markHandlerFailed, ticketOf } from './node-http/capture.js';
import { createNodeEngine, handleNodeRequest } from './node-http/flow.js';
import { parsedBodyOf } from './node-http/parsed-body.js';

/** Options of the Express middleware: every engine option, with `scope` and `fingerprint` given Express's request. */
export type ExpressIdempotencyOptions = IdempotencyOptions<Request>;
export type { RequestIdempotency } from '../core/engine.js';

/** The middleware function {@link idempotencyHeader} returns. */
export type ExpressIdempotencyMiddleware = (req: Request, res: Response, next: NextFunction) => void;

/**
 * Express 4/5 (and Connect) middleware that makes POST and PATCH endpoints safe to retry with an
 * `Idempotency-Key` header: the first request runs, repeats get the stored response with
 * `Idempotent-Replayed: true`, a repeat while the first still runs gets 409, and a key reused for a different
 * request gets 422.
 *
 * Mount it after authentication and before the routes it protects. It works before or after a body parser:
 * before it, the fingerprint hashes the raw bytes, which it reads and puts back for the parser; after Express's
 * parsers (`express.json()`, `express.urlencoded()`, `express.text()`, `express.raw()`), the raw bytes if the
 * parser's `verify` kept them as `req.rawBody`, or else the parsed body in canonical JSON form. The path in
 * the fingerprint is `req.originalUrl`, so mounting under a router does not change it.
 *
 * @example
 * ```ts
 * import express from 'express';
 * import { MemoryBackend } from 'idempotency-header';
 * import { idempotencyHeader } from 'idempotency-header/express';
 *
 * const app = express();
 * app.use(express.json());
 * app.use(idempotencyHeader({ backend: new MemoryBackend() }));
 * app.post('/orders', (req, res) => res.status(201).json({ id: crypto.randomUUID() }));
 * ```
 */
export function idempotencyHeader(options: ExpressIdempotencyOptions): ExpressIdempotencyMiddleware {
  const engine = createNodeEngine<Request>(options);
  watchHandlerErrors();
  return function idempotencyHeader(req, res, next) {
    handleNodeRequest(engine, req, res, req.originalUrl ?? req.url, parsedBodyOf(req), next, next);
  };
}

/**
 * The idempotency of a request the middleware let run: its key, and an `AbortSignal` aborted if its lease is
 * lost (pass it to long work, so that a handler outliving a long backend outage stops instead of running beside
 * the request that took its key over). `undefined` when the middleware did not handle the request.
 *
 * @example
 * ```ts
 * app.post('/payments', async (req, res) => {
 *   const { key, signal } = idempotencyOf(req)!;
 *   const charge = await payments.charge(req.body, { idempotencyKey: key, signal });
 *   res.status(201).json(charge);
 * });
 * ```
 */
export function idempotencyOf(req: Request): RequestIdempotency | undefined {
  return ticketOf(req.res);
}

/**
 * Where Express 5's router (`router` 2.3 and later) reports an error at its origin: a handler or middleware that
 * throws, rejects, or passes an error to `next`. Express's error handling answers such a request, and the middleware
 * cannot tell that answer from one the handler sent: it learns of the failure here, so that the key is released
 * and the answer not stored, whatever its status (a 500 with `cacheServerErrors`, a 4xx an error handler maps an
 * error to), as a handler that throws is treated everywhere else. Express 4's router reports nothing.
 */
const ROUTER_ERRORS = 'tracing:express.router.request:error';

let watchingHandlerErrors = false;

function watchHandlerErrors(): void {
  if (watchingHandlerErrors) return;
  watchingHandlerErrors = true;
  subscribe(ROUTER_ERRORS, (message) => {
    const res = (message as { res?: unknown } | null)?.res;
    if (typeof res === 'object' && res !== null) markHandlerFailed(res as ServerResponse);
  });
}
