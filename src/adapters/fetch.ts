import { IdempotencyEngine, type RequestIdempotency } from '../core/engine.js';
import { isHeld, markHeldInPlace } from '../core/held.js';
import type { IdempotencyOptions } from '../core/options.js';
import { builtinSha256 } from '../runtime/builtin-sha256.js';
import { captureResponse, readBody, replyResponse, TOO_LARGE } from './web/response.js';

export type { RequestIdempotency } from '../core/engine.js';

/** Options of {@link withIdempotency}: every engine option, with `scope` and `fingerprint` given the `Request`. */
export type FetchIdempotencyOptions<Req extends Request = Request> = IdempotencyOptions<Req>;

/**
 * A fetch handler: a `Request` in, a `Response` out. Whatever else the runtime passes (Bun's `server`, Deno's
 * `info`, a Worker's `env` and `ctx`, a Next.js route's `{ params }`) is passed on untouched.
 */
export type FetchHandler<Req extends Request = Request, Rest extends unknown[] = unknown[]> = (
  request: Req,
  ...rest: Rest
) => Response | Promise<Response>;

const running = new WeakMap<Request, RequestIdempotency>();

/**
 * The idempotency of a request that {@link withIdempotency} let through with a key it holds: the key and a signal
 * aborted if its lease is lost. `undefined` for a request that passed through without idempotency (no key, a
 * method that is not handled, or fail-open after a backend error). Keyed by the request object itself, so it
 * works whatever else the runtime passes to the handler.
 *
 * @example
 * ```ts
 * const handler = withIdempotency(async (request) => {
 *   const idempotency = idempotencyOf(request);
 *   await charge(await request.json(), { idempotencyKey: idempotency?.key });
 *   return Response.json({ ok: true }, { status: 201 });
 * }, { backend });
 * ```
 */
export function idempotencyOf(request: Request): RequestIdempotency | undefined {
  return running.get(request);
}

/**
 * Wraps a fetch handler (`(request) => Response`) so that its POST and PATCH requests are safe to retry with an
 * `Idempotency-Key` header: the first request runs, repeats get the stored response with
 * `Idempotent-Replayed: true`, a repeat while the first still runs gets 409, and a key reused for a different
 * request gets 422. For Bun's and Deno's `serve`, Cloudflare Workers and Next.js route handlers; only web-standard
 * APIs, no Node.js module.
 *
 * The handler reads the request body as usual: the wrapper reads a copy (`request.clone()`) for the fingerprint,
 * up to `maxRequestBytes`. The fingerprint's path is the request URL's path and query string. A response body is
 * read whole and stored before it is sent when it is storable, or streamed on otherwise; a handler that throws
 * (or whose body stream fails) leaves the key free for a retry, and its error goes on to the runtime as before.
 *
 * @example
 * ```ts
 * import { MemoryBackend } from 'idempotency-header';
 * import { withIdempotency } from 'idempotency-header/fetch';
 *
 * const handler = withIdempotency(
 *   async (request: Request) => Response.json({ id: crypto.randomUUID() }, { status: 201 }),
 *   { backend: new MemoryBackend() },
 * );
 * Bun.serve({ fetch: handler }); // or Deno.serve(handler), or `export default { fetch: handler }` on Workers
 * ```
 */
export function withIdempotency<Req extends Request = Request, Rest extends unknown[] = unknown[]>(
  handler: FetchHandler<Req, Rest>,
  options: FetchIdempotencyOptions<Req>,
): (request: Req, ...rest: Rest) => Promise<Response> {
  if (typeof handler !== 'function') throw new TypeError('withIdempotency: `handler` must be a function');
  const sha256 = builtinSha256();
  const engine = new IdempotencyEngine<Req>(options, sha256 === undefined ? {} : { sha256 });
  return async function idempotentHandler(request, ...rest) {
    const method = request.method;
    // Another instance on this request's path (a handler wrapped twice) took its key: it handles the request.
    if (!engine.handles(method) || isHeld(request)) return handler(request, ...rest);
    const startedAt = performance.now();
    const key = engine.readKey(method, request.headers.get(engine.headerName));
    if (key === undefined) return handler(request, ...rest);
    if (typeof key !== 'string') return replyResponse(key);
    let body: Uint8Array | undefined;
    if (engine.needsBody && request.body !== null) {
      const read = await readBody(
        request.clone().body,
        engine.maxRequestBytes,
        request.headers.get('content-length'),
      );
      if (read === TOO_LARGE) return replyResponse(engine.bodyTooLarge(method, startedAt));
      body = read;
    }
    const contentType = request.headers.get('content-type') ?? undefined;
    const result = await engine.begin(request, method, request.url, key, body, startedAt, contentType);
    if (result.kind === 'pass') return handler(request, ...rest);
    if (result.kind === 'reply') return replyResponse(result);
    running.set(request, result);
    // A web `Request`, a runtime's or `@hono/node-server`'s: its instances share their hidden class.
    markHeldInPlace(request);
    // The client going away changes nothing for the request; the engine only notes when it happened.
    const clientLeft = () => engine.clientLeft(result);
    request.signal?.addEventListener('abort', clientLeft, { once: true });
    let sent: Response;
    try {
      // Rejects only when the handler failed, or answered with something that is not a `Response`.
      sent = await captureResponse(engine, result, await handler(request, ...rest));
    } catch (error) {
      request.signal?.removeEventListener('abort', clientLeft);
      await engine.fail(result);
      throw error;
    }
    request.signal?.removeEventListener('abort', clientLeft);
    return sent;
  };
}
