import { Readable } from 'node:stream';
import type {
  FastifyInstance,
  FastifyPluginCallback,
  FastifyReply,
  FastifyRequest,
  HookHandlerDoneFunction,
} from 'fastify';
import fp from 'fastify-plugin';
import { captureBody, finishWithBody, type HeaderRecordValue, handlerHeaders } from '../core/capture.js';
import {
  type BeginResult,
  type IdempotencyEngine,
  isPromise,
  type RequestIdempotency,
  type Ticket,
} from '../core/engine.js';
import type { RequestBody } from '../core/fingerprint.js';
import type { IdempotencyOptions } from '../core/options.js';
import { type EngineReply, REMOVED_HEADER } from '../core/responses.js';
import { createNodeEngine, keyHeader } from './node-http/flow.js';

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

type Engine = IdempotencyEngine<FastifyRequest>;

/** A request running its handler under a key it holds. */
interface Running {
  readonly engine: Engine;
  readonly ticket: Ticket;
  /** The headers set before the handler ran (by hooks that ran earlier): not stored when left unchanged. */
  readonly before: Record<string, HeaderRecordValue>;
  /** The handler failed: the response on its way is Fastify's error handler's. */
  failed: boolean;
}

const running = new WeakMap<FastifyRequest, Running>();
/** Requests whose reply waits in `onSend` for the engine to settle. */
const holding = new WeakSet<FastifyRequest>();

const EMPTY = new Uint8Array(0);

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
  const engine = createNodeEngine<FastifyRequest>(pluginOptions);
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

  // A route's options are checked when it is declared, as the plugin's are, not on its first request.
  fastify.addHook('onRoute', (route) => {
    engineFor(route.config?.idempotency);
  });
  fastify.decorateRequest('idempotency', null);

  fastify.addHook('preHandler', function idempotencyPreHandler(request, reply, next) {
    // `reply.callNotFound()` runs the 404 route's `preHandler` hooks for a request that already holds its key.
    if (running.has(request)) return next();
    const engine = engineFor(request.routeOptions.config?.idempotency);
    const method = request.method;
    if (engine === undefined || !engine.handles(method)) return next();
    const startedAt = performance.now();
    const key = engine.readKey(method, keyHeader(request.raw, engine.headerName));
    if (key === undefined) return next();
    if (typeof key !== 'string') return sendReply(reply, key);
    let result: BeginResult | Promise<BeginResult>;
    try {
      // The body Fastify parsed (JSON, text, or a Buffer from a raw parser); the path with its query, as sent.
      const body = engine.needsBody ? (request.body as RequestBody) : undefined;
      result = engine.begin(request, method, request.url, key, body, startedAt);
    } catch (error) {
      return next(error as Error);
    }
    if (isPromise(result)) {
      result.then((settled) => dispatch(engine, request, reply, settled, next), next);
    } else dispatch(engine, request, reply, result, next);
  });

  fastify.addHook('onSend', function idempotencyOnSend(request, reply, payload, next) {
    const state = running.get(request);
    if (state === undefined || state.ticket.settled) return next(null, payload);
    running.delete(request);
    if (state.failed) return settleThen(state.engine.fail(state.ticket), () => next(null, payload));
    holding.add(request);
    const status = reply.statusCode;
    const headers = reply.getHeaders();
    captureReply(state, reply, payload, (sent) => {
      holding.delete(request);
      if (reply.sent) {
        // Taken over by `onError` meanwhile, whose error handling changed the status and headers: restored.
        reply.code(status);
        reply.headers(headers);
      }
      next(null, sent);
    });
  });

  fastify.addHook('onError', function idempotencyOnError(request, reply, _error, next) {
    const state = running.get(request);
    if (state !== undefined) state.failed = true;
    // The handler failed after its reply reached `onSend`, where it waits for the store. Without the middleware
    // the reply would have gone out already and Fastify would only log the error; marking the reply as taken
    // over keeps Fastify from sending an error response over it.
    else if (holding.has(request)) reply.hijack();
    next();
  });

  done();
};

function dispatch(
  engine: Engine,
  request: FastifyRequest,
  reply: FastifyReply,
  result: BeginResult,
  next: HookHandlerDoneFunction,
): void {
  if (result.kind === 'pass') return next();
  if (result.kind === 'reply') return sendReply(reply, result);
  const ticket = result;
  running.set(request, { engine, ticket, before: reply.getHeaders(), failed: false });
  request.idempotency = ticket;
  const res = reply.raw;
  res.once('close', () => {
    if (ticket.settled) return;
    // Gone out without passing `onSend` (a hijacked reply): nothing to store, the key is released.
    if (res.writableFinished) engine.fail(ticket);
    // The client went away: nothing changes, the handler goes on and its response is stored when it is sent.
    else engine.clientLeft(ticket);
  });
  next();
}

/**
 * Sends an engine reply (error, conflict or replay) through `reply`, so that Fastify's `onSend` and `onResponse`
 * hooks and its logging run as for any response. Its headers replace those of the same name set before; removals
 * stored with a replay remove what hooks that ran before set again.
 */
function sendReply(reply: FastifyReply, answer: EngineReply): void {
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
  reply.send(Buffer.from(body.buffer, body.byteOffset, body.byteLength));
}

/**
 * Hands the serialised payload to the engine: a string or buffer at once, a stream read whole (or relayed, when it
 * is not stored or outgrows `maxResponseBytes`, its end held until the engine settled).
 */
function captureReply(
  state: Running,
  reply: FastifyReply,
  payload: unknown,
  next: (payload: unknown) => void,
): void {
  const { engine, ticket } = state;
  const status = reply.statusCode;
  const head = { status, headers: handlerHeaders(reply.getHeaders(), state.before) };
  if (Object.prototype.toString.call(payload) === '[object Response]') {
    // Fastify applies a `Response`'s status and headers after `onSend`: it is sent as it is, and not stored.
    return settleThen(engine.fail(ticket), () => next(payload));
  }
  const stream = asStream(payload);
  if (stream === undefined) {
    // Node.js sends no body with a 204 or a 304, whatever the payload; neither does a replay.
    const body =
      status === 204 || status === 304 || payload === null || payload === undefined
        ? EMPTY
        : typeof payload === 'string'
          ? Buffer.from(payload)
          : (payload as Uint8Array);
    return settleThen(finishWithBody(engine as IdempotencyEngine<never>, ticket, head, body), () =>
      next(payload),
    );
  }
  captureBody(engine as IdempotencyEngine<never>, ticket, head, stream).then((captured) => {
    if (captured.kind === 'kept') {
      const { body } = captured;
      next(Buffer.from(body.buffer, body.byteOffset, body.byteLength));
    } else next(Readable.from(captured.chunks, { objectMode: false }));
  });
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

function settleThen(settled: void | Promise<void>, then: () => void): void {
  if (isPromise(settled)) settled.then(then);
  else then();
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
