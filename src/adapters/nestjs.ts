import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import {
  applyDecorators,
  type CallHandler,
  type DynamicModule,
  type ExecutionContext,
  HttpException,
  Inject,
  Injectable,
  type InjectionToken,
  Module,
  type ModuleMetadata,
  type NestInterceptor,
  type OnModuleInit,
  type OptionalFactoryDependency,
  SetMetadata,
  UseInterceptors,
} from '@nestjs/common';
import { HttpAdapterHost, Reflector } from '@nestjs/core';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Observable, type Subscriber } from 'rxjs';
import {
  type BeginResult,
  type IdempotencyEngine,
  isPromise,
  type RequestIdempotency,
  type Ticket,
} from '../core/engine.js';
import { IdempotencyError } from '../core/errors.js';
import type { RequestBody } from '../core/fingerprint.js';
import { isHeld } from '../core/held.js';
import { nodeRequestHeader } from '../core/key.js';
import { checkOverrides, type IdempotencyOptions } from '../core/options.js';
import type { EngineReply } from '../core/responses.js';
import {
  addCaptureHooks,
  beginRequest,
  type FastifyEngine,
  failRun,
  fingerprintBody,
  isHolding,
  sendFastifyReply,
  startRun,
} from './fastify/hooks.js';
import { BODY_TOO_LARGE } from './node-http/body.js';
import { failCapture, ticketOf } from './node-http/capture.js';
import { createNodeEngine, handleNodeRequest, sendReply } from './node-http/flow.js';
import { parsedBodyOf } from './node-http/parsed-body.js';

export type { RequestIdempotency } from '../core/engine.js';

/**
 * What `scope` and `fingerprint` functions see by default: the fields Express's and Fastify's requests share.
 * Annotate the function's parameter with your platform's request type (`Request` from `express`, or
 * `FastifyRequest`) to see the rest.
 */
export interface NestRequest {
  readonly method: string;
  /** The path with its query string. */
  readonly url: string;
  readonly headers: IncomingHttpHeaders;
  /** The body Nest's body parser produced. */
  readonly body?: unknown;
}

/** Options of {@link IdempotencyModule.forRoot}: every engine option (see the README's options table). */
export type NestIdempotencyOptions<Req = NestRequest> = IdempotencyOptions<Req>;

/** A route's own options, over the module's: any of them, the backend included. */
export type NestRouteIdempotencyOptions<Req = NestRequest> = Partial<NestIdempotencyOptions<Req>>;

/** Options of {@link IdempotencyModule.forRootAsync}: the module's options from a factory with injected dependencies. */
export interface NestIdempotencyAsyncOptions<Req = NestRequest> extends Pick<ModuleMetadata, 'imports'> {
  /** Builds the options; may be async (e.g. to connect a Redis client first). */
  useFactory: (...args: never[]) => NestIdempotencyOptions<Req> | Promise<NestIdempotencyOptions<Req>>;
  /** Providers handed to `useFactory`, in order. */
  inject?: (InjectionToken | OptionalFactoryDependency)[];
}

/** Injection token of the module's options (what `forRoot` was given, or `forRootAsync`'s factory returned). */
export const IDEMPOTENCY_OPTIONS = 'idempotency-header:options';

/** Metadata key under which {@link Idempotent} stores a handler's or controller's setting. */
export const IDEMPOTENT_METADATA = 'idempotency-header:idempotent';

/** A route's setting: the module's options (`true`), its own over them, or `false` to leave it alone. */
type RouteSetting = boolean | NestRouteIdempotencyOptions<unknown>;

type Engine = IdempotencyEngine<unknown>;

/** The outcome of looking the key up, before the handler runs. */
type Start =
  | { readonly kind: 'pass' }
  | { readonly kind: 'answer'; readonly reply: EngineReply }
  | { readonly kind: 'run'; readonly ticket: Ticket }
  | { readonly kind: 'error'; readonly error: unknown };

/** The minimal view of Nest's HTTP adapter the interceptor uses (`AbstractHttpAdapter`). */
interface HttpAdapter {
  getType(): string;
  getInstance(): unknown;
  reply(response: unknown, body: unknown, statusCode?: number): unknown;
  isHeadersSent(response: unknown): boolean;
}

/** One engine per options object, shared by every interceptor instance Nest makes for them. */
const engines = new WeakMap<object, Engine>();
/** One engine per route setting over the module's options. */
const routeEngines = new WeakMap<object, WeakMap<object, Engine>>();
/** Requests an interceptor took on: a second one bound to the same route (global and per route) leaves them be. */
const handled = new WeakSet<object>();
/** Tickets of requests that hold their key, for {@link idempotencyOf}. */
const tickets = new WeakMap<object, Ticket>();
/** Engine answers waiting for Nest to send the response (replays, conflicts, key errors), by response object. */
const answers = new WeakMap<object, { readonly reply: EngineReply; readonly platform: Platform }>();
/** Adapters whose `reply` sends waiting engine answers. */
const patchedAdapters = new WeakSet<object>();
/** Fastify instances the capture hooks were added to. */
const hookedFastifies = new WeakSet<object>();
/** Whether a handler writes its response itself (`@Res()` or `@Next()` without `passthrough`). */
const selfReplying = new WeakMap<object, boolean>();

type Platform = 'express' | 'fastify';

/**
 * NestJS interceptor that makes POST and PATCH handlers safe to retry with an `Idempotency-Key` header: the first
 * request runs, repeats get the stored response with `Idempotent-Replayed: true`, a repeat while the first still
 * runs gets 409, and a key reused for a different request gets 422. Works on Nest's Express and Fastify
 * platforms, reusing those adapters' response capture: the response Nest sends (the handler's value, or what an
 * exception filter made of an `HttpException`) is stored byte for byte before it goes out.
 *
 * Bind it globally (`{ provide: APP_INTERCEPTOR, useClass: IdempotencyInterceptor }`) to cover every route, or
 * per controller or handler with `@UseInterceptors(IdempotencyInterceptor)` or {@link Idempotent}. It runs after
 * middleware and guards, so authentication comes first; pipes run inside it, so a validation error is stored
 * like any 4xx. A handler that throws anything but an `HttpException` releases the key (Nest answers 500).
 *
 * @example
 * ```ts
 * import { Module } from '@nestjs/common';
 * import { APP_INTERCEPTOR } from '@nestjs/core';
 * import { MemoryBackend } from 'idempotency-header';
 * import { IdempotencyInterceptor, IdempotencyModule } from 'idempotency-header/nestjs';
 *
 * @Module({
 *   imports: [IdempotencyModule.forRoot({ backend: new MemoryBackend() })],
 *   providers: [{ provide: APP_INTERCEPTOR, useClass: IdempotencyInterceptor }],
 *   controllers: [OrdersController],
 * })
 * export class AppModule {}
 * ```
 */
export class IdempotencyInterceptor implements NestInterceptor, OnModuleInit {
  readonly #options: NestIdempotencyOptions<unknown>;
  readonly #engine: Engine;
  readonly #reflector: Reflector;
  readonly #adapterHost: HttpAdapterHost;

  constructor(options: NestIdempotencyOptions<unknown>, reflector: Reflector, adapterHost: HttpAdapterHost) {
    this.#options = options;
    this.#engine = engineFor(options);
    this.#reflector = reflector;
    this.#adapterHost = adapterHost;
    // As early as possible: Nest builds providers in `NestFactory.create`, before `main.ts` registers Fastify
    // plugins and routes, so the capture's hooks are in place before Fastify builds its routes' hook lists (its
    // `onSend` hook goes ahead of the others: a compression hook then compresses what was stored, not the other
    // way round).
    this.onModuleInit();
  }

  /** Prepares the platform (once per app): on Fastify, adds the capture hooks before the app is ready. */
  onModuleInit(): void {
    const adapter = this.#adapterHost.httpAdapter as unknown as HttpAdapter | undefined;
    if (adapter !== undefined) preparePlatform(adapter);
  }

  /** Looks the key up; then answers for the handler (replay, 409, 422, …), or runs it and stores its response. */
  intercept(context: ExecutionContext, next: CallHandler): Observable<unknown> {
    if (context.getType() !== 'http') return next.handle();
    const setting = this.#reflector.getAllAndOverride<RouteSetting | undefined>(IDEMPOTENT_METADATA, [
      context.getHandler(),
      context.getClass(),
    ]);
    if (setting === false) return next.handle();
    const http = context.switchToHttp();
    const req = http.getRequest<object>();
    if (handled.has(req)) return next.handle();
    handled.add(req);
    const adapter = this.#adapterHost.httpAdapter as unknown as HttpAdapter;
    const platform = preparePlatform(adapter);
    const engine =
      setting === undefined || setting === true ? this.#engine : routeEngineFor(this.#options, setting);
    const res = http.getResponse<object>();
    const writesItself = handlerWritesItself(context);
    return new Observable<unknown>((subscriber) => {
      let teardown: (() => void) | undefined;
      let closed = false;
      const started = (start: Start) => {
        if (closed) {
          // Unsubscribed while the key was looked up (the client went away): a key taken is released.
          if (start.kind === 'run') engine.fail(start.ticket);
          return;
        }
        switch (start.kind) {
          case 'pass':
            teardown = forward(next.handle(), subscriber);
            return;
          case 'error':
            subscriber.error(start.error);
            return;
          case 'answer':
            if (writesItself) sendAnswer(platform, res, start.reply);
            else answers.set(res, { reply: start.reply, platform });
            subscriber.next(undefined);
            subscriber.complete();
            return;
          case 'run':
            tickets.set(req, start.ticket);
            teardown = runHandler(platform, engine, start.ticket, req, res, adapter, next, subscriber);
        }
      };
      if (platform === 'express') {
        beginExpress(engine, req as IncomingMessage, res as ServerResponse, started);
      } else beginFastify(engine, req as FastifyRequest, res as FastifyReply, started);
      return () => {
        closed = true;
        teardown?.();
      };
    });
  }
}
Injectable()(IdempotencyInterceptor);
Inject(IDEMPOTENCY_OPTIONS)(IdempotencyInterceptor, undefined, 0);
Inject(Reflector)(IdempotencyInterceptor, undefined, 1);
Inject(HttpAdapterHost)(IdempotencyInterceptor, undefined, 2);

/**
 * Opts a handler or a whole controller in to idempotency, or overrides the module's options for it, or (with
 * `false`) leaves it alone under a global interceptor. `@Idempotent()` and `@Idempotent({ ... })` also bind
 * {@link IdempotencyInterceptor} to what they decorate, so a route needs no global interceptor; when one is bound
 * globally as well, the request is handled once. A handler's setting wins over its controller's.
 *
 * @param options - `true` or nothing: the module's options; an object: those options over the module's (a key
 * spelled wrong throws at once); `false`: no idempotency for this route.
 *
 * @example
 * ```ts
 * @Controller('orders')
 * export class OrdersController {
 *   @Post()
 *   @Idempotent({ required: true })
 *   create(@Body() order: CreateOrder) {
 *     return this.orders.create(order);
 *   }
 *
 *   @Post('webhooks')
 *   @Idempotent(false)
 *   webhook() {}
 * }
 * ```
 */
export function Idempotent<Req = NestRequest>(
  options: boolean | NestRouteIdempotencyOptions<Req> = true,
): ClassDecorator & MethodDecorator {
  if (options === false) return SetMetadata(IDEMPOTENT_METADATA, false);
  if (options === true) {
    return applyDecorators(SetMetadata(IDEMPOTENT_METADATA, true), UseInterceptors(IdempotencyInterceptor));
  }
  if (options === null || typeof options !== 'object') {
    throw new IdempotencyError(
      'ERR_IDEMPOTENCY_OPTION',
      `Invalid @Idempotent() argument: expected true, false or an options object, received ${String(options)}`,
    );
  }
  // Names and values, when the class is declared, as the module's are at start-up: not on the route's first request.
  checkOverrides(options as Partial<IdempotencyOptions<never>>);
  return applyDecorators(SetMetadata(IDEMPOTENT_METADATA, options), UseInterceptors(IdempotencyInterceptor));
}

/**
 * The module that configures idempotency: `forRoot(options)` (or `forRootAsync`) once, in the root module. It is
 * global: {@link IdempotencyInterceptor} can be bound anywhere, and is exported for `APP_INTERCEPTOR`.
 *
 * @example
 * ```ts
 * IdempotencyModule.forRootAsync({
 *   imports: [RedisModule],
 *   inject: [REDIS],
 *   useFactory: (redis: Redis) => ({ backend: new RedisBackend({ redis }), required: true }),
 * });
 * ```
 */
// biome-ignore lint/complexity/noStaticOnlyClass: a Nest module is a class; its configuration is static methods
export class IdempotencyModule {
  /**
   * Configures idempotency with these options; an invalid one fails the app's start, naming it.
   *
   * @example
   * ```ts
   * @Module({ imports: [IdempotencyModule.forRoot({ backend: new MemoryBackend(), expiry: 3600 })] })
   * export class AppModule {}
   * ```
   */
  static forRoot<Req = NestRequest>(options: NestIdempotencyOptions<Req>): DynamicModule {
    return IdempotencyModule.#module([{ provide: IDEMPOTENCY_OPTIONS, useValue: options }], []);
  }

  /**
   * Configures idempotency with options a factory builds, with the providers it names injected.
   *
   * @example
   * ```ts
   * IdempotencyModule.forRootAsync({
   *   inject: [ConfigService],
   *   useFactory: (config: ConfigService) => ({ backend, expiry: config.get('IDEMPOTENCY_EXPIRY') }),
   * });
   * ```
   */
  static forRootAsync<Req = NestRequest>(options: NestIdempotencyAsyncOptions<Req>): DynamicModule {
    return IdempotencyModule.#module(
      [
        {
          provide: IDEMPOTENCY_OPTIONS,
          useFactory: options.useFactory as (...args: unknown[]) => unknown,
          inject: options.inject ?? [],
        },
      ],
      options.imports ?? [],
    );
  }

  static #module(
    providers: DynamicModule['providers'] & object,
    imports: ModuleMetadata['imports'],
  ): DynamicModule {
    return {
      module: IdempotencyModule,
      global: true,
      imports: imports ?? [],
      providers: [...providers, IdempotencyInterceptor],
      exports: [IDEMPOTENCY_OPTIONS, IdempotencyInterceptor],
    };
  }
}
Module({})(IdempotencyModule);

/**
 * The idempotency of a request the interceptor let run: its key, and an `AbortSignal` aborted if its lease is
 * lost (pass it to long work). `undefined` when the interceptor did not handle the request (no key, a method or
 * route not handled).
 *
 * @example
 * ```ts
 * @Post('payments')
 * @Idempotent()
 * async pay(@Req() req: Request, @Body() payment: Payment) {
 *   const { key, signal } = idempotencyOf(req)!;
 *   return this.payments.charge(payment, { idempotencyKey: key, signal });
 * }
 * ```
 */
export function idempotencyOf(request: object): RequestIdempotency | undefined {
  return tickets.get(request);
}

// ---------------------------------------------------------------------------------------------------------------

function engineFor(options: NestIdempotencyOptions<unknown>): Engine {
  if (options === null || typeof options !== 'object') {
    throw new IdempotencyError(
      'ERR_IDEMPOTENCY_OPTION',
      'IdempotencyModule: options must be an object with at least a `backend`',
    );
  }
  let engine = engines.get(options);
  if (engine === undefined) {
    engine = createNodeEngine<unknown>(options);
    engines.set(options, engine);
  }
  return engine;
}

function routeEngineFor(base: NestIdempotencyOptions<unknown>, setting: object): Engine {
  let byRoute = routeEngines.get(base);
  if (byRoute === undefined) {
    byRoute = new WeakMap();
    routeEngines.set(base, byRoute);
  }
  let engine = byRoute.get(setting);
  if (engine === undefined) {
    engine = createNodeEngine<unknown>({ ...base, ...setting });
    byRoute.set(setting, engine);
  }
  return engine;
}

/**
 * Makes the platform ready, once per app: Nest's `reply` sends an engine answer waiting for a response in place of
 * the handler's value (so that interceptors bound outside this one, and Nest's status and headers, run as for any
 * response), and on Fastify the capture hooks are added.
 */
function preparePlatform(adapter: HttpAdapter): Platform {
  const type = adapter.getType();
  if (type !== 'express' && type !== 'fastify') {
    throw new IdempotencyError(
      'ERR_IDEMPOTENCY_OPTION',
      `IdempotencyInterceptor supports Nest's express and fastify platforms, not ${type}`,
    );
  }
  if (!patchedAdapters.has(adapter)) {
    patchedAdapters.add(adapter);
    const reply = adapter.reply;
    adapter.reply = function idempotentReply(this: HttpAdapter, response, body, statusCode) {
      const waiting = answers.get(response as object);
      if (waiting === undefined) return reply.call(this, response, body, statusCode);
      answers.delete(response as object);
      return sendAnswer(waiting.platform, response as object, waiting.reply);
    };
  }
  if (type === 'fastify') {
    const fastify = adapter.getInstance() as FastifyInstance;
    if (!hookedFastifies.has(fastify)) {
      hookedFastifies.add(fastify);
      addCaptureHooks(fastify);
    }
  }
  return type;
}

function sendAnswer(platform: Platform, res: object, reply: EngineReply): void {
  if (platform === 'express') sendReply(res as ServerResponse, reply);
  else sendFastifyReply(res as FastifyReply, reply);
}

/** Nest's own test for a handler that writes its response itself, so that Nest sends nothing after it. */
function handlerWritesItself(context: ExecutionContext): boolean {
  const handler = context.getHandler();
  let writes = selfReplying.get(handler);
  if (writes === undefined) {
    const type = context.getClass();
    const name = methodNameOf(type, handler);
    const metadata = Reflect as unknown as {
      getMetadata(key: string, target: object, property: string): unknown;
    };
    const args = (metadata.getMetadata(ROUTE_ARGS_METADATA, type, name) ?? {}) as object;
    const passthrough = metadata.getMetadata(RESPONSE_PASSTHROUGH_METADATA, type, name) === true;
    writes =
      !passthrough &&
      Object.keys(args).some((key) => {
        const paramType = Number(key.split(':')[0]);
        return paramType === RESPONSE_PARAM || paramType === NEXT_PARAM;
      });
    selfReplying.set(handler, writes);
  }
  return writes;
}

/** The name under which the controller's prototype holds the handler (a function's own name may differ). */
function methodNameOf(type: Function, handler: Function): string {
  const prototype = type.prototype as Record<string, unknown>;
  if (prototype[handler.name] === handler) return handler.name;
  for (let proto: object | null = prototype; proto !== null; proto = Object.getPrototypeOf(proto)) {
    for (const name of Object.getOwnPropertyNames(proto)) {
      if (Object.getOwnPropertyDescriptor(proto, name)?.value === handler) return name;
    }
  }
  return handler.name;
}

// From `@nestjs/common/constants` and its `RouteParamtypes`: stable since Nest 5, read here rather than imported
// from a deep path.
const ROUTE_ARGS_METADATA = '__routeArguments__';
const RESPONSE_PASSTHROUGH_METADATA = '__responsePassthrough__';
const RESPONSE_PARAM = 1;
const NEXT_PARAM = 2;

/** Express: the `node:http` flow (the key, the body for the fingerprint, the lock, the response capture). */
function beginExpress(
  engine: Engine,
  req: IncomingMessage,
  res: ServerResponse,
  started: (start: Start) => void,
) {
  // Taken by an instance of the middleware mounted on the app: it handles the request.
  if (isHeld(req)) return started({ kind: 'pass' });
  const url = (req as IncomingMessage & { originalUrl?: string }).originalUrl ?? req.url ?? '/';
  handleNodeRequest(
    engine as IdempotencyEngine<IncomingMessage>,
    req,
    res,
    url,
    parsedBodyOf(req),
    () => {
      const ticket = ticketOf(res);
      started(ticket === undefined ? { kind: 'pass' } : { kind: 'run', ticket });
    },
    (error) => started({ kind: 'error', error }),
    (_res, reply) => started({ kind: 'answer', reply }),
  );
}

/** Fastify: the key and lock as the Fastify plugin's `preHandler` takes them; the reply is captured in `onSend`. */
function beginFastify(
  engine: Engine,
  request: FastifyRequest,
  reply: FastifyReply,
  started: (start: Start) => void,
) {
  const method = request.method;
  // Taken already: the Fastify plugin registered on Nest's instance took the key.
  if (isHeld(request.raw) || !engine.handles(method)) return started({ kind: 'pass' });
  const startedAt = performance.now();
  const key = engine.readKey(method, nodeRequestHeader(request.raw, engine.headerName));
  if (key === undefined) return started({ kind: 'pass' });
  if (typeof key !== 'string') return started({ kind: 'answer', reply: key });
  if (!engine.needsBody) return beginFastifyWith(engine, request, reply, key, undefined, startedAt, started);
  // A body no parser took (`@fastify/multipart` leaves it to the handler) is read and put back.
  const body = fingerprintBody(request, fastifyBody(request), engine.maxRequestBytes);
  if (!isPromise(body)) return beginFastifyWith(engine, request, reply, key, body, startedAt, started);
  body.then(
    (bytes) => beginFastifyWith(engine, request, reply, key, bytes, startedAt, started),
    (error: unknown) =>
      started(
        error === BODY_TOO_LARGE
          ? { kind: 'answer', reply: engine.bodyTooLarge(method, startedAt) }
          : { kind: 'error', error },
      ),
  );
}

/** Fingerprints the request and takes its key, then tells `started` whether the handler runs. */
function beginFastifyWith(
  engine: Engine,
  request: FastifyRequest,
  reply: FastifyReply,
  key: string,
  body: RequestBody,
  startedAt: number,
  started: (start: Start) => void,
) {
  let result: BeginResult | Promise<BeginResult>;
  try {
    result = beginRequest(engine as FastifyEngine, request, key, body, startedAt);
  } catch (error) {
    return started({ kind: 'error', error });
  }
  const dispatch = (settled: BeginResult) => {
    if (settled.kind === 'pass') return started({ kind: 'pass' });
    if (settled.kind === 'reply') return started({ kind: 'answer', reply: settled });
    startRun(engine as IdempotencyEngine<FastifyRequest>, request, reply, settled);
    started({ kind: 'run', ticket: settled });
  };
  if (isPromise(result)) result.then(dispatch, (error: unknown) => started({ kind: 'error', error }));
  else dispatch(result);
}

/** The raw bytes when Nest kept them (`rawBody: true`), else the body its parser produced. */
function fastifyBody(request: FastifyRequest): RequestBody {
  const rawBody = (request as FastifyRequest & { rawBody?: unknown }).rawBody;
  return rawBody instanceof Uint8Array ? rawBody : (request.body as RequestBody);
}

function forward(source: Observable<unknown>, subscriber: Subscriber<unknown>): () => void {
  const subscription = source.subscribe(subscriber);
  return () => subscription.unsubscribe();
}

/**
 * Runs the handler under the key it holds. Its response is captured wherever Nest sends it from (the handler's
 * value, an exception filter's answer to an `HttpException`). Any other error releases the key first, then goes
 * on to Nest, which answers 500. When Nest stops waiting because its client went away (it does so for a handler
 * that returns an Observable), the handler is left to finish and its response is stored, as SPEC §2 says for a
 * client that left.
 */
function runHandler(
  platform: Platform,
  engine: Engine,
  ticket: Ticket,
  req: object,
  res: object,
  adapter: HttpAdapter,
  next: CallHandler,
  subscriber: Subscriber<unknown>,
): () => void {
  let orphaned = false;
  let ended = false;
  let last: unknown;
  const raw = rawResponse(platform, res);
  const subscription = next.handle().subscribe({
    next(value) {
      last = value;
      if (!orphaned) subscriber.next(value);
    },
    error(error: unknown) {
      ended = true;
      handlerFailed(platform, req, res, error).then(() => {
        if (!orphaned) return subscriber.error(error);
        if (error instanceof HttpException) {
          sendOrphan(adapter, res, raw, exceptionBody(error), error.getStatus());
        } else if (!ticket.settled) engine.fail(ticket);
      });
    },
    complete() {
      ended = true;
      if (!orphaned) subscriber.complete();
      else sendOrphan(adapter, res, raw, last, undefined);
    },
  });
  return () => {
    if (ended) return;
    if (raw.destroyed) orphaned = true;
    else subscription.unsubscribe();
  };
}

function rawResponse(platform: Platform, res: object): ServerResponse {
  return platform === 'express' ? (res as ServerResponse) : (res as FastifyReply).raw;
}

/** Sends what a handler whose client went away produced, so that it is stored (or released) as it would have been. */
function sendOrphan(
  adapter: HttpAdapter,
  res: object,
  raw: ServerResponse,
  body: unknown,
  status?: number,
): void {
  if (raw.headersSent || adapter.isHeadersSent(res)) return;
  try {
    adapter.reply(res, body, status);
  } catch {}
}

/** What Nest's `BaseExceptionFilter` sends for an `HttpException`. */
function exceptionBody(error: HttpException): unknown {
  const body = error.getResponse();
  return typeof body === 'object' && body !== null ? body : { statusCode: error.getStatus(), message: body };
}

/**
 * The handler failed. An `HttpException` is an answer: the exception filter's response is captured and stored or
 * released by its status. Any other error releases the key (or, when the client had gone, leaves it to lapse)
 * before Nest's 500 goes out. A response already on its way (written by the handler itself) is let out first, so
 * that Nest's error handling finds it sent.
 */
function handlerFailed(platform: Platform, req: object, res: object, error: unknown): Promise<void> {
  const answer = error instanceof HttpException;
  if (platform === 'express') {
    const response = res as ServerResponse;
    if (!answer) {
      return new Promise((resolve) => {
        if (!failCapture(response, resolve)) return resolve();
        if (response.destroyed) return resolve();
        response.once('close', resolve);
      });
    }
    return response.headersSent ? untilClosed(response) : Promise.resolve();
  }
  const request = req as FastifyRequest;
  const reply = res as FastifyReply;
  if (isHolding(request) || reply.raw.headersSent) return untilClosed(reply.raw);
  // The error handler's reply passes `onSend`, which releases the key before it lets the reply out.
  if (!answer) failRun(request);
  return Promise.resolve();
}

function untilClosed(res: ServerResponse): Promise<void> {
  if (res.writableFinished || res.destroyed) return Promise.resolve();
  return new Promise((resolve) => res.once('close', () => resolve()));
}
