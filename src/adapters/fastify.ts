import type {
  FastifyContextConfig,
  FastifyInstance,
  FastifyPluginCallback,
  FastifyReply,
  FastifyRequest,
  HookHandlerDoneFunction,
  preParsingHookHandler,
} from 'fastify';
import fp from 'fastify-plugin';
import { type BeginResult, isPromise, type RequestIdempotency } from '../core/engine.js';
import { multipartBoundary, type RequestBody } from '../core/fingerprint.js';
import { isHeld } from '../core/held.js';
import { nodeRequestHeader } from '../core/key.js';
import type { IdempotencyOptions } from '../core/options.js';
import { ownSymbol } from '../core/own-symbol.js';
import {
  addCaptureHooks,
  beginRequest,
  type FastifyEngine,
  fingerprintBody,
  sendFastifyReply as sendReply,
  startRun,
} from './fastify/hooks.js';
import { BODY_TOO_LARGE, hasBody, readRequestBody } from './node-http/body.js';
import { createNodeEngine } from './node-http/flow.js';

export type { RequestIdempotency } from '../core/engine.js';

/** Options of the Fastify plugin: every engine option, with `scope` and `fingerprint` given Fastify's request. */
export type FastifyIdempotencyOptions = IdempotencyOptions<FastifyRequest>;

/** A route's own options, over the plugin's: any of them, the backend included. */
export type FastifyRouteIdempotencyOptions = Partial<FastifyIdempotencyOptions>;

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * This route's idempotency: `false` leaves the route alone (no key is read, nothing stored); an object
     * overrides the plugin's options for this route (`{ required: true }`, another `expiry`, …).
     */
    idempotency?: false | FastifyRouteIdempotencyOptions;
  }
  interface FastifyRequest {
    /**
     * The key and lease signal of a request that holds its idempotency key; `null` for one that passed through
     * without idempotency (no key, a method or route not handled, or fail-open after a backend error).
     */
    idempotency: RequestIdempotency | null;
  }
}

type Engine = FastifyEngine;

/**
 * The plugin: one engine for the plugin's options, one per route that overrides them, and four hooks.
 * `preHandler` (the body is parsed, authentication hooks have run) checks the key and takes the lock, or sends
 * the engine's reply through `reply`; `onSend` (the payload is serialised) hands the response to the engine and
 * lets it out once stored; `onError` marks a handler that failed, so that its key is released.
 */
const plugin: FastifyPluginCallback<FastifyIdempotencyOptions> = function idempotencyHeader(
  fastify: FastifyInstance,
  options: FastifyIdempotencyOptions,
  done: (error?: Error) => void,
) {
  // Fastify's own registration options are not the engine's.
  const { prefix, logLevel, logSerializers, ...pluginOptions } = options as FastifyIdempotencyOptions &
    Record<'prefix' | 'logLevel' | 'logSerializers', unknown>;
  // An invalid option is reported through `done`: thrown here, it would escape `register()` and `ready()` (Fastify
  // calls a callback plugin outside their promises) and crash the process instead.
  let engine: Engine;
  try {
    engine = createNodeEngine<FastifyRequest>(pluginOptions);
  } catch (error) {
    return done(error as Error);
  }
  const routeEngines = new WeakMap<FastifyRouteIdempotencyOptions, Engine>();
  const engineFor = (override: false | FastifyRouteIdempotencyOptions | undefined): Engine | undefined => {
    if (override === undefined) return engine;
    if (override === false) return undefined;
    let routeEngine = routeEngines.get(override);
    if (routeEngine === undefined) {
      routeEngine = createNodeEngine<FastifyRequest>({ ...pluginOptions, ...override });
      routeEngines.set(override, routeEngine);
    }
    return routeEngine;
  };

  // A multipart body that a parser turns into fields holding no trace of its bytes (`@fastify/multipart`'s
  // `attachFieldsToBody`) is read before any parser, and put back for it. Only on the routes of an instance that
  // parses multipart: a `preParsing` hook costs every request it runs for.
  const preParsing: preParsingHookHandler = function idempotencyPreParsing(request, reply, payload, next) {
    const raw = request.raw;
    if (
      payload !== raw ||
      !hasBody(raw) ||
      multipartBoundary(request.headers['content-type']) === undefined
    ) {
      return next(null, payload);
    }
    const engine = engineFor(routeConfig(request)?.idempotency);
    const method = request.method;
    if (engine === undefined || !engine.handles(method) || !engine.needsBody) return next(null, payload);
    // Only a request that carries a key is read: `preHandler` checks the key itself.
    if (!nodeRequestHeader(raw, engine.headerName)) return next(null, payload);
    readRequestBody(raw, engine.maxRequestBytes).then(
      (bytes) => {
        setMultipartBody(request, bytes);
        next(null, payload);
      },
      (error: Error) => {
        if (error !== BODY_TOO_LARGE) return next(error);
        sendReply(reply, engine.bodyTooLarge(method, performance.now()));
      },
    );
  };

  // A route's options are checked when it is declared, as the plugin's are, not on its first request.
  fastify.addHook('onRoute', function idempotencyOnRoute(route) {
    if (engineFor(route.config?.idempotency) === undefined) return;
    if (!this.hasContentTypeParser(MULTIPART_FORM)) return;
    const own = route.preParsing;
    route.preParsing = own === undefined ? [preParsing] : [...(Array.isArray(own) ? own : [own]), preParsing];
  });
  // Registered a second time (in a plugin of its own, say), the decoration is there already.
  if (!fastify.hasRequestDecorator('idempotency')) fastify.decorateRequest('idempotency', null);

  fastify.addHook('preHandler', function idempotencyPreHandler(request, reply, next) {
    // Taken already: by this instance (`reply.callNotFound()` runs the 404 route's `preHandler` hooks for a request
    // that holds its key), or by another (a second registration), which handles it.
    if (isHeld(request.raw)) return next();
    const engine = engineFor(routeConfig(request)?.idempotency);
    const method = request.method;
    if (engine === undefined || !engine.handles(method)) return next();
    const startedAt = performance.now();
    const key = engine.readKey(method, nodeRequestHeader(request.raw, engine.headerName));
    if (key === undefined) return next();
    if (typeof key !== 'string') return sendReply(reply, key);
    if (!engine.needsBody) return begin(engine, request, reply, key, undefined, startedAt, next);
    // The body Fastify parsed (JSON, text, or a Buffer from a raw parser), a multipart body's bytes, or the bytes
    // of a body no parser took (a catch-all parser that leaves the stream to the handler), read and put back.
    const parsed = multipartBodyOf(request) ?? (request.body as RequestBody);
    const body = fingerprintBody(request, parsed, engine.maxRequestBytes);
    if (isPromise(body))
      return beginOnceRead(engine, request, reply, key, body as Promise<Buffer>, startedAt, next);
    begin(engine, request, reply, key, body, startedAt, next);
  });

  addCaptureHooks(fastify);

  done();
};

/** {@link begin} once the body no parser took is read; 413 past `maxRequestBytes`. */
function beginOnceRead(
  engine: Engine,
  request: FastifyRequest,
  reply: FastifyReply,
  key: string,
  reading: Promise<Buffer>,
  startedAt: number,
  next: HookHandlerDoneFunction,
): void {
  reading.then(
    (bytes) => begin(engine, request, reply, key, bytes, startedAt, next),
    (error: Error) => {
      if (error !== BODY_TOO_LARGE) return next(error);
      sendReply(reply, engine.bodyTooLarge(request.method, startedAt));
    },
  );
}

/** Fingerprints the request and takes its key, then lets the handler run or answers for it. */
function begin(
  engine: Engine,
  request: FastifyRequest,
  reply: FastifyReply,
  key: string,
  body: RequestBody,
  startedAt: number,
  next: HookHandlerDoneFunction,
): void {
  let result: BeginResult | Promise<BeginResult>;
  try {
    result = beginRequest(engine, request, key, body, startedAt);
  } catch (error) {
    return next(error as Error);
  }
  if (isPromise(result)) {
    result.then((settled) => dispatch(engine, request, reply, settled, next), next);
  } else dispatch(engine, request, reply, result, next);
}

const MULTIPART_FORM = 'multipart/form-data';

/** A multipart request's body, read in `preParsing` for the fingerprint. */
const MULTIPART_BODY: unique symbol = Symbol('idempotency-header.multipart-body');
type MultipartRequest = FastifyRequest & { [MULTIPART_BODY]?: Buffer };

function setMultipartBody(request: FastifyRequest, bytes: Buffer): void {
  (request as MultipartRequest)[MULTIPART_BODY] = bytes;
}

function multipartBodyOf(request: FastifyRequest): Buffer | undefined {
  return (request as MultipartRequest)[MULTIPART_BODY];
}

/** Where Fastify keeps a request's route context, found once by its symbol's description; `null`: not found. */
let routeContextKey: symbol | null | undefined;

/**
 * The route's `config`, as `request.routeOptions.config` gives it, read from Fastify's route context: the
 * `routeOptions` getter builds an object of a dozen fields on every read, a measurable share of a first run.
 */
function routeConfig(request: FastifyRequest): FastifyContextConfig | undefined {
  if (routeContextKey === undefined) routeContextKey = ownSymbol(request, 'fastify.context');
  const context =
    routeContextKey === null ? undefined : (request as unknown as Record<symbol, unknown>)[routeContextKey];
  if (typeof context !== 'object' || context === null) return request.routeOptions.config;
  return (context as { config?: FastifyContextConfig }).config;
}

function dispatch(
  engine: Engine,
  request: FastifyRequest,
  reply: FastifyReply,
  result: BeginResult,
  next: HookHandlerDoneFunction,
): void {
  if (result.kind === 'pass') return next();
  if (result.kind === 'reply') return sendReply(reply, result);
  startRun(engine, request, reply, result);
  request.idempotency = result;
  next();
}

/**
 * Fastify plugin that makes POST and PATCH routes safe to retry with an `Idempotency-Key` header: the first
 * request runs, repeats get the stored response with `Idempotent-Replayed: true`, a repeat while the first still
 * runs gets 409, and a key reused for a different request gets 422. Wrapped with `fastify-plugin`, so its hooks
 * reach every route registered after it, in any plugin.
 *
 * It works on Fastify's hooks: the key is checked and the lock taken in `preHandler` (after the body is parsed
 * and `onRequest`/`preValidation`/`preHandler` hooks registered before it, such as authentication, ran), and the
 * serialised payload is stored in `onSend` before it goes out. Replays are sent through `reply`, so `onSend` and
 * `onResponse` hooks and logging run for them too. The fingerprint hashes the parsed body (canonical JSON for
 * objects, the bytes of a string or buffer) and `request.url`. A route opts out with
 * `config: { idempotency: false }`, or overrides options with `config: { idempotency: { required: true } }`.
 * Handlers see `request.idempotency` (`{ key, signal }`).
 *
 * @example
 * ```ts
 * import Fastify from 'fastify';
 * import { MemoryBackend } from 'idempotency-header';
 * import { idempotencyHeader } from 'idempotency-header/fastify';
 *
 * const app = Fastify();
 * await app.register(idempotencyHeader, { backend: new MemoryBackend() });
 * app.post('/orders', async (request, reply) => reply.code(201).send({ id: crypto.randomUUID() }));
 * app.post('/webhooks', { config: { idempotency: false } }, async () => ({ ok: true }));
 * ```
 */
export const idempotencyHeader: FastifyPluginCallback<FastifyIdempotencyOptions> = fp(plugin, {
  fastify: '5.x',
  name: 'idempotency-header',
});
