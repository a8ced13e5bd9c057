import type { NextFunction, Request, Response } from 'express';
import { IdempotencyEngine } from '../core/engine.js';
import type { RequestBody } from '../core/fingerprint.js';
import type { IdempotencyOptions } from '../core/options.js';
import { handleNodeRequest, READ_STREAM } from './_node-http.js';

/** Options of the Express middleware: every engine option, with `scope` and `fingerprint` given Express's request. */
export type ExpressIdempotencyOptions = IdempotencyOptions<Request>;

/** The middleware function {@link idempotencyHeader} returns. */
export type ExpressIdempotencyMiddleware = (req: Request, res: Response, next: NextFunction) => void;

/**
 * Express 4/5 (and Connect) middleware that makes POST and PATCH endpoints safe to retry with an
 * `Idempotency-Key` header: the first request runs, repeats get the stored response with
 * `Idempotent-Replayed: true`, a repeat while the first still runs gets 409, and a key reused for a different
 * request gets 422.
 *
 * Mount it before the routes it protects. It works before or after a body parser: after `express.json()` the
 * fingerprint hashes the parsed body in canonical JSON form; before it, the raw bytes, which it reads and puts
 * back for the parser. The path in the fingerprint is `req.originalUrl`, so mounting under a router does not
 * change it.
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
  const engine = new IdempotencyEngine<Request>(options);
  return function idempotencyHeader(req, res, next) {
    handleNodeRequest(engine, req, res, req.originalUrl ?? req.url, parsedBodyOf(req), next, next);
  };
}

/** A body parser ran when it marked the request (`body-parser` sets `_body`) or consumed its stream. */
function parsedBodyOf(req: Request): RequestBody | typeof READ_STREAM {
  return (req as Request & { _body?: boolean })._body === true || req.readableEnded ? req.body : READ_STREAM;
}
