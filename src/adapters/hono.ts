import type { Context, MiddlewareHandler } from 'hono';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { IdempotencyEngine, type RequestIdempotency } from '../core/engine.js';
import type { IdempotencyOptions } from '../core/options.js';
import type { EngineReply } from '../core/responses.js';
import { captureResponse, readBody, responseHeaders, TOO_LARGE } from './web/response.js';

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
 * Mount it after authentication and before the routes it protects. It reads the body for the fingerprint through
 * Hono's body cache (`c.req.arrayBuffer()`), so the handler's `c.req.json()`, `c.req.text()` or a validator read
 * it as usual, up to `maxRequestBytes`. The fingerprint's path is the request URL's path and query string. A
 * handler that throws leaves the key free for a retry; the app's `onError` answers as before.
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
  const engine = new IdempotencyEngine<Context>(options);
  return async function idempotencyHeader(c, next) {
    const method = c.req.method;
    if (!engine.handles(method)) return next();
    const startedAt = performance.now();
    const key = engine.readKey(method, c.req.raw.headers.get(engine.headerName));
    if (key === undefined) return next();
    if (typeof key !== 'string') return reply(c, key);
    let body: Uint8Array | undefined;
    if (engine.needsBody) {
      const read = await readRequestBody(c, engine.maxRequestBytes);
      if (read === TOO_LARGE) return reply(c, engine.bodyTooLarge(method, startedAt));
      body = read;
    }
    const result = await engine.begin(c, method, c.req.url, key, body, startedAt);
    if (result.kind === 'pass') return next();
    if (result.kind === 'reply') return reply(c, result);
    // What middleware mounted before this one set so far: set again by it on a replay, so not stored. A copy:
    // `@hono/node-server`'s own `Response` keeps the very `Headers` it was given, which the handler goes on to fill.
    const before = new Headers(c.newResponse(null).headers);
    c.set('idempotency', result);
    const signal = c.req.raw.signal;
    const clientLeft = () => engine.clientLeft(result);
    signal?.addEventListener('abort', clientLeft, { once: true });
    try {
      await next();
    } finally {
      signal?.removeEventListener('abort', clientLeft);
    }
    // A handler that threw comes back as `c.error`, its response the app's `onError` answer: sent as it is.
    if (c.error !== undefined) return void (await engine.fail(result));
    const response = c.res;
    const sent = await captureResponse(engine, result, response, responseHeaders(response.headers, before));
    // Cleared first, so that Hono does not copy the handler's headers onto their own copy again.
    c.res = undefined;
    c.res = sent;
  };
}

/**
 * Sends an engine reply through `c.body`, as a handler would: headers that middleware mounted before set with
 * `c.header()` stay, the reply's own replace those of the same name.
 */
function reply(c: Context, answer: EngineReply): Response {
  const headers: Record<string, string | string[]> = {};
  for (const [name, value] of answer.headers) {
    const previous = headers[name];
    headers[name] =
      previous === undefined ? value : Array.isArray(previous) ? [...previous, value] : [previous, value];
  }
  if (answer.status === 204 || answer.status === 304) return c.body(null, answer.status, headers);
  headers['content-length'] = String(answer.body.byteLength);
  return c.body(answer.body as Uint8Array<ArrayBuffer>, answer.status as ContentfulStatusCode, headers);
}

/**
 * The request body for the fingerprint, read the way the handler will read it: through Hono's body cache, so
 * that `c.req.json()` and validators find it there. A body that announces no length (chunked) is read from the
 * stream within the limit and put in the cache; a body an earlier middleware read comes from the cache, under
 * that middleware's own limit.
 */
async function readRequestBody(c: Context, limit: number): Promise<Uint8Array | typeof TOO_LARGE> {
  const raw = c.req.raw;
  const length = raw.headers.get('content-length');
  const cache = c.req.bodyCache;
  if (Object.keys(cache).length > 0) return new Uint8Array(await c.req.arrayBuffer());
  if (length !== null && Number(length) > limit) return TOO_LARGE;
  if (length !== null || raw.body === null) {
    const bytes = new Uint8Array(await c.req.arrayBuffer());
    return bytes.byteLength > limit ? TOO_LARGE : bytes;
  }
  const bytes = await readBody(raw.body, limit, null);
  if (bytes !== TOO_LARGE) {
    const exact =
      bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength
        ? bytes.buffer
        : bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    // Hono keeps promises in its cache (typed as the methods that make them).
    (cache as Record<string, unknown>).arrayBuffer = Promise.resolve(exact);
  }
  return bytes;
}
