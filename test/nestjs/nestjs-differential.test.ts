/**
 * Differential corpus for the NestJS interceptor (SPEC §3, transparent first runs; see
 * `test/support/differential.ts` for what is compared): every case is a route of one Nest controller, written the
 * Nest way (returned values, `@HttpCode`, `@Header`, `@Redirect`, exceptions and exception filters, pipes,
 * `@Res()` with and without `passthrough`, `StreamableFile`), served by bare Nest and by Nest with
 * `IdempotencyModule.forRoot()` and `IdempotencyInterceptor` bound globally, as the README sets them up; on Nest's
 * Express and Fastify platforms, on memory and Redis. Both apps have a Nest middleware of their own (a header
 * before the route) and a global interceptor of their own (a header on the way in, another on the way out).
 */
import 'reflect-metadata';
import { setImmediate as nextTurn, setTimeout as sleep } from 'node:timers/promises';
import {
  type ArgumentMetadata,
  type ArgumentsHost,
  BadRequestException,
  Body,
  type CallHandler,
  Catch,
  Controller,
  type ExceptionFilter,
  type ExecutionContext,
  Get,
  Header,
  HttpCode,
  HttpException,
  HttpStatus,
  Inject,
  Injectable,
  type MiddlewareConsumer,
  Module,
  type NestInterceptor,
  type NestModule,
  NotFoundException,
  type PipeTransform,
  Post,
  Redirect,
  Res,
  StreamableFile,
  type Type,
  UseFilters,
  UseInterceptors,
} from '@nestjs/common';
import { APP_INTERCEPTOR, HttpAdapterHost } from '@nestjs/core';
import type { Response as ExpressResponse } from 'express';
import type { FastifyReply } from 'fastify';
import { delay, type Observable, of, tap } from 'rxjs';
import { describe, expect, it } from 'vitest';
import {
  IdempotencyInterceptor,
  IdempotencyModule,
  Idempotent,
  type NestIdempotencyOptions,
} from '../../src/adapters/nestjs.js';
import {
  chunks,
  describeDifferential,
  differentialBackends,
  failOnUnexpectedErrors,
  type Listening,
  numberedCases,
} from '../support/differential.js';
import { createNestApp, listenNest, type NestPlatform } from '../support/nestjs.js';

failOnUnexpectedErrors();

interface NestCase {
  readonly name: string;
  /** The route writes its response with one platform's own API: the case runs on that platform only. */
  readonly platform?: NestPlatform;
  readonly skip?: string;
}

const CORPUS: NestCase[] = [];

/**
 * Declares a corpus case: the decorated handler is `POST /case/<i>`, `i` its place in the corpus (decorator
 * factories are evaluated in source order, so the corpus reads in the controller's order).
 */
function Case(name: string, details: Omit<NestCase, 'name'> = {}): MethodDecorator {
  const index = CORPUS.push({ name, ...details }) - 1;
  return Post(String(index));
}

const JSON_TYPE = 'application/json';
const largeObject = (size: number) => ({ pad: 'x'.repeat(size) });

/** `body` in 64 KiB pieces. */
function pieces(body: Buffer): Buffer[] {
  const parts: Buffer[] = [];
  for (let offset = 0; offset < body.length; offset += 65_536) {
    parts.push(body.subarray(offset, offset + 65_536));
  }
  return parts;
}

interface Order {
  readonly item: string;
  readonly quantity: number;
}

/**
 * What `ValidationPipe` answers for a DTO with `@IsString() item` and `@Min(5) quantity` (class-validator is not
 * installed here): a `BadRequestException` with the list of messages.
 */
@Injectable()
class BulkOrderPipe implements PipeTransform<unknown, Order> {
  transform(value: unknown, _metadata: ArgumentMetadata): Order {
    const order = value as Partial<Order> | undefined;
    const errors: string[] = [];
    if (typeof order?.item !== 'string') errors.push('item must be a string');
    if (typeof order?.quantity !== 'number' || order.quantity < 5) {
      errors.push('quantity must not be less than 5');
    }
    if (errors.length > 0) throw new BadRequestException(errors);
    return order as Order;
  }
}

/** Lets any order through with its item upper-cased: the handler sees the pipe's value, not the body. */
@Injectable()
class OrderPipe implements PipeTransform<unknown, Order> {
  transform(value: unknown): Order {
    const order = value as Order;
    return { item: order.item.toUpperCase(), quantity: order.quantity };
  }
}

/** A domain error, not an `HttpException`: only its filter knows what to answer. */
class OutOfStock extends Error {
  constructor(readonly item: string) {
    super(`${item} is out of stock`);
  }
}

/** Answers {@link OutOfStock} with a 409 of its own, through the platform-neutral adapter (Nest's documented way). */
@Catch(OutOfStock)
class OutOfStockFilter implements ExceptionFilter {
  constructor(@Inject(HttpAdapterHost) private readonly adapterHost: HttpAdapterHost) {}

  catch(exception: OutOfStock, host: ArgumentsHost): void {
    const { httpAdapter } = this.adapterHost;
    const res = host.switchToHttp().getResponse<object>();
    httpAdapter.setHeader(res, 'x-filter', 'out-of-stock');
    httpAdapter.reply(res, { code: 'out_of_stock', item: exception.item }, HttpStatus.CONFLICT);
  }
}

/** Turns every `HttpException` into RFC 9457 problem details. */
@Catch(HttpException)
class ProblemFilter implements ExceptionFilter {
  catch(exception: HttpException, host: ArgumentsHost): void {
    const res = host.switchToHttp().getResponse<ExpressResponse | FastifyReply>();
    const body = JSON.stringify({ title: exception.message, status: exception.getStatus() });
    if ('raw' in res) {
      res.code(exception.getStatus()).type('application/problem+json').send(body);
    } else {
      res.status(exception.getStatus()).type('application/problem+json').send(body);
    }
  }
}

/**
 * Sets a header after a handler that wrote its response itself, where the platform says the headers are not sent
 * yet: on Fastify `reply.sent` stays false until the body has gone out, though its head went out with `send()`.
 */
@Injectable()
class LateHeaderInterceptor implements NestInterceptor {
  constructor(@Inject(HttpAdapterHost) private readonly adapterHost: HttpAdapterHost) {}

  intercept(context: ExecutionContext, next: CallHandler): Observable<unknown> {
    const res = context.switchToHttp().getResponse<object>();
    const { httpAdapter } = this.adapterHost;
    return next.handle().pipe(
      tap(() => {
        if (!httpAdapter.isHeadersSent(res)) httpAdapter.setHeader(res, 'x-late', 'interceptor');
      }),
    );
  }
}

@Controller('case')
class CorpusController {
  constructor(@Inject(HttpAdapterHost) private readonly adapterHost: HttpAdapterHost) {}

  @Case('a returned object')
  object() {
    return { id: 1, note: 'café' };
  }

  @Case('the parsed request body echoed')
  echo(@Body() body: unknown) {
    return { received: body };
  }

  @Case('a returned array')
  array() {
    return [1, 'two', null];
  }

  @Case('a returned string')
  text() {
    return 'hello';
  }

  @Case('a returned number')
  number() {
    return 42;
  }

  @Case('a returned Buffer')
  buffer() {
    return Buffer.from([0, 1, 2, 255]);
  }

  @Case('a returned null')
  nothing() {
    return null;
  }

  @Case('a returned undefined')
  undefinedValue() {}

  @Case('a returned Promise after awaiting')
  @HttpCode(202)
  async later() {
    await sleep(5);
    return { later: true };
  }

  @Case('a returned Observable')
  observable(): Observable<{ observed: boolean }> {
    return of({ observed: true }).pipe(delay(5));
  }

  @Case('an Observable emitting several values (Nest sends the last)')
  several(): Observable<number> {
    return of(1, 2, 3);
  }

  @Case('@HttpCode(200)')
  @HttpCode(200)
  ok() {
    return { ok: true };
  }

  @Case('@HttpCode(500) and a returned object')
  @HttpCode(500)
  serverError() {
    return { failed: 'softly' };
  }

  @Case('@HttpCode(204) and no value')
  @HttpCode(204)
  noContent() {}

  @Case('@HttpCode(204) and a value the platform drops')
  @HttpCode(204)
  noContentWithValue() {
    return { dropped: true };
  }

  @Case('@Header twice and @HttpCode(202)')
  @HttpCode(202)
  @Header('Cache-Control', 'no-store')
  @Header('Location', '/orders/3')
  accepted() {
    return { id: 3 };
  }

  @Case('@Header Content-Type and a returned JSON string')
  @Header('Content-Type', 'application/json; charset=utf-8')
  jsonString() {
    return '{ "a" : 1 }';
  }

  @Case('@Header Content-Type and a returned JSON Buffer')
  @Header('Content-Type', JSON_TYPE)
  jsonBuffer() {
    return Buffer.from('{"b":2}');
  }

  @Case('@Header overwriting the header the middleware set')
  @Header('x-app', 'handler')
  overwritten() {
    return { overwritten: true };
  }

  // Nest sends a redirect without awaiting the reply: on Fastify the route settles while the reply still waits in
  // the package's onSend hook for the key's release (Redis), and Fastify must not send a second reply then.
  @Case('@Redirect(url, 303)')
  @Redirect('/orders/1', 303)
  redirect() {}

  @Case('@Redirect with the url and status the handler returns')
  @Redirect('/orders/default', 302)
  redirectReturned() {
    return { url: '/orders/9', statusCode: 301 };
  }

  @Case('NotFoundException')
  notFound(): never {
    throw new NotFoundException('no such order');
  }

  @Case('BadRequestException with an object response')
  badRequest(): never {
    throw new BadRequestException({ detail: 'bad order', fields: ['quantity'] });
  }

  @Case('HttpException with a string response (402)')
  paymentRequired(): never {
    throw new HttpException('Payment required', HttpStatus.PAYMENT_REQUIRED);
  }

  @Case('HttpException 429 (not executed: released)')
  tooMany(): never {
    throw new HttpException({ detail: 'slow down' }, HttpStatus.TOO_MANY_REQUESTS);
  }

  @Case('HttpException 503')
  unavailable(): never {
    throw new HttpException({ down: true }, HttpStatus.SERVICE_UNAVAILABLE);
  }

  @Case('HttpException thrown after awaiting')
  async conflictLater(): Promise<never> {
    await sleep(5);
    throw new HttpException({ detail: 'taken' }, HttpStatus.CONFLICT);
  }

  @Case('a domain error answered by a custom exception filter')
  @UseFilters(OutOfStockFilter)
  outOfStock(): never {
    throw new OutOfStock('book');
  }

  @Case('an HttpException turned into problem+json by a custom exception filter')
  @UseFilters(ProblemFilter)
  problem(): never {
    throw new BadRequestException('bad quantity');
  }

  @Case('a thrown plain Error')
  broken(): never {
    throw new Error('the handler failed');
  }

  @Case('a plain Error thrown after awaiting')
  async brokenLater(): Promise<never> {
    await sleep(5);
    throw new Error('the handler failed later');
  }

  @Case('validation failure: a pipe throwing BadRequestException')
  bulkOrder(@Body(BulkOrderPipe) order: Order) {
    return { accepted: order };
  }

  @Case('a pipe transforming the body')
  transformed(@Body(OrderPipe) order: Order) {
    return { order };
  }

  @Case('@Res({ passthrough: true }) with a status and headers')
  passthrough(@Res({ passthrough: true }) res: object) {
    const { httpAdapter } = this.adapterHost;
    httpAdapter.status(res, 201);
    httpAdapter.setHeader(res, 'Location', '/orders/4');
    httpAdapter.setHeader(res, 'Link', '</a>; rel="a"');
    return { id: 4 };
  }

  @Case('cookies set through @Res({ passthrough: true })')
  cookies(@Res({ passthrough: true }) res: object) {
    const { httpAdapter } = this.adapterHost;
    httpAdapter.appendHeader(res, 'Set-Cookie', 'a=1; Path=/');
    httpAdapter.appendHeader(res, 'Set-Cookie', 'b=2; HttpOnly');
    return { cookies: 2 };
  }

  @Case("cookies with Express's res.cookie()", { platform: 'express' })
  expressCookies(@Res({ passthrough: true }) res: ExpressResponse) {
    res.cookie('a', '1', { path: '/' });
    res.cookie('b', '2', { httpOnly: true, sameSite: 'strict' });
    return { cookies: 2 };
  }

  @Case('a header set through @Res({ passthrough: true }), then a plain Error')
  headerThenBroken(@Res({ passthrough: true }) res: object): never {
    this.adapterHost.httpAdapter.setHeader(res, 'x-before-failure', '1');
    throw new Error('failed after setting a header');
  }

  @Case('a header set through @Res({ passthrough: true }), then an HttpException')
  headerThenNotFound(@Res({ passthrough: true }) res: object): never {
    this.adapterHost.httpAdapter.setHeader(res, 'x-before-failure', '1');
    throw new NotFoundException();
  }

  @Case('@Res(): res.status(201).json()', { platform: 'express' })
  expressJson(@Res() res: ExpressResponse) {
    res.status(201).set('Location', '/orders/5').json({ id: 5 });
  }

  @Case('@Res(): res.write() chunks, then res.end()', { platform: 'express' })
  async expressChunks(@Res() res: ExpressResponse) {
    res.status(201).type('json');
    res.write('[');
    for (let i = 0; i < 3; i++) {
      res.write(`${i},`);
      await nextTurn();
    }
    res.end('3]');
  }

  @Case('@Res(): res.write() text chunks', { platform: 'express' })
  async expressTextChunks(@Res() res: ExpressResponse) {
    res.type('text');
    res.write('one ');
    await nextTurn();
    res.end('two');
  }

  @Case('@Res(): res.redirect()', { platform: 'express' })
  expressRedirect(@Res() res: ExpressResponse) {
    res.redirect(303, '/orders/6');
  }

  @Case('@Res(): res.sendStatus(202)', { platform: 'express' })
  expressSendStatus(@Res() res: ExpressResponse) {
    res.sendStatus(202);
  }

  @Case('@Res(): a JSON body, then a plain Error', { platform: 'express' })
  expressJsonThenBroken(@Res() res: ExpressResponse): never {
    res.status(201).json({ sent: true });
    throw new Error('failed after answering');
  }

  @Case('@Res(): reply.code(201).send()', { platform: 'fastify' })
  fastifySend(@Res() reply: FastifyReply) {
    reply.code(201).header('Location', '/orders/5').send({ id: 5 });
  }

  @Case('@Res(): reply.send() of a stream of chunks', { platform: 'fastify' })
  fastifyStream(@Res() reply: FastifyReply) {
    reply
      .code(201)
      .type(JSON_TYPE)
      .send(chunks(['[', '0,', '1,', '2]']));
  }

  @Case('@Res(): reply.hijack(), then reply.raw.write() chunks', { platform: 'fastify' })
  async fastifyHijack(@Res() reply: FastifyReply) {
    reply.hijack();
    reply.raw.writeHead(201, { 'content-type': JSON_TYPE });
    reply.raw.write('[');
    for (let i = 0; i < 3; i++) {
      reply.raw.write(`${i},`);
      await nextTurn();
    }
    reply.raw.end('3]');
  }

  @Case('@Res(): reply.redirect()', { platform: 'fastify' })
  fastifyRedirect(@Res() reply: FastifyReply) {
    reply.redirect('/orders/6', 303);
  }

  @Case('@Res(): a JSON body, then a plain Error', { platform: 'fastify' })
  fastifySendThenBroken(@Res() reply: FastifyReply): never {
    reply.code(201).send({ sent: true });
    throw new Error('failed after answering');
  }

  @Case('@Res(): res.json(), then an interceptor setting a header', { platform: 'express' })
  @UseInterceptors(LateHeaderInterceptor)
  expressLateHeader(@Res() res: ExpressResponse) {
    res.status(201).json({ late: true });
  }

  @Case('@Res(): reply.send() of a stream, then an interceptor setting a header', {
    platform: 'fastify',
    skip:
      'defect: the reply waits in the onSend hook while its stream is read for storing (and while Redis stores ' +
      'any body), and Fastify writes the head only after onSend; reply.sent is false meanwhile, so the header ' +
      "the interceptor sets after the handler's send() reaches the client (and is missing from the replay, " +
      'which has the headers onSend saw), where bare Nest had written the head and dropped it',
  })
  @UseInterceptors(LateHeaderInterceptor)
  fastifyLateHeader(@Res() reply: FastifyReply) {
    reply
      .code(201)
      .type(JSON_TYPE)
      .send(chunks(['{"late":', 'true}']));
  }

  @Case('StreamableFile of a JSON Buffer')
  jsonFile() {
    return new StreamableFile(Buffer.from('{"file":true}'), { type: JSON_TYPE });
  }

  @Case('StreamableFile of bytes, as an attachment')
  attachment() {
    return new StreamableFile(Buffer.from([0, 1, 2, 255]), {
      disposition: 'attachment; filename="order.bin"',
    });
  }

  @Case('StreamableFile of a stream of JSON chunks')
  jsonStream() {
    return new StreamableFile(chunks(['{"items":', '[1,2]', '}']), { type: JSON_TYPE });
  }

  @Case('StreamableFile of a stream that fails midway')
  failingStream() {
    return new StreamableFile(chunks(['{"half":', '[1,'], new Error('stream failed')), { type: JSON_TYPE });
  }

  @Case('a 100 KiB object')
  large() {
    return largeObject(100 * 1024);
  }

  @Case('a 2 MiB object (over maxResponseBytes)')
  huge() {
    return largeObject(2 * 1024 * 1024);
  }

  @Case('a 1.5 MiB StreamableFile in 64 KiB chunks (over maxResponseBytes)')
  hugeStream() {
    const body = Buffer.from(JSON.stringify(largeObject(1536 * 1024)));
    return new StreamableFile(chunks(pieces(body)), { type: JSON_TYPE });
  }

  @Case('a route that opts out with @Idempotent(false)')
  @Idempotent(false)
  optedOut() {
    return { optedOut: true };
  }
}

@Controller()
class PingController {
  @Get('ping')
  ping() {
    return { pong: true };
  }
}

/**
 * The app's own interceptor: a header on the way in, and one on the way out for a handler that returned a value
 * (as logging and tracing interceptors set them). A handler that wrote its response itself (`@Res()`) returns
 * nothing: a header after it would come after its reply (see {@link LateHeaderInterceptor}).
 */
class AppInterceptor implements NestInterceptor {
  constructor(private readonly adapterHost: HttpAdapterHost) {}

  intercept(context: ExecutionContext, next: CallHandler): Observable<unknown> {
    const res = context.switchToHttp().getResponse<object>();
    const { httpAdapter } = this.adapterHost;
    httpAdapter.setHeader(res, 'x-interceptor', 'in');
    return next.handle().pipe(
      tap((value) => {
        if (value !== undefined) httpAdapter.setHeader(res, 'x-after', 'interceptor');
      }),
    );
  }
}

/** The app's module: with `options`, `IdempotencyModule.forRoot(options)` and the interceptor bound globally. */
function corpusModule(options?: NestIdempotencyOptions): Type<NestModule> {
  @Module({
    imports: options === undefined ? [] : [IdempotencyModule.forRoot(options)],
    controllers: [CorpusController, PingController],
    providers: options === undefined ? [] : [{ provide: APP_INTERCEPTOR, useClass: IdempotencyInterceptor }],
  })
  class CorpusModule implements NestModule {
    configure(consumer: MiddlewareConsumer): void {
      consumer
        .apply((_req: unknown, res: { setHeader(name: string, value: string): void }, next: () => void) => {
          res.setHeader('x-app', 'corpus');
          next();
        })
        .forRoutes(CorpusController);
    }
  }
  return CorpusModule;
}

async function nestApp(platform: NestPlatform, options?: NestIdempotencyOptions): Promise<Listening> {
  const app = await createNestApp(platform, corpusModule(options));
  app.useGlobalInterceptors(new AppInterceptor(app.get(HttpAdapterHost)));
  const server = await listenNest(app);
  return { port: Number(new URL(server.url).port), close: () => server.close() };
}

const backends = await differentialBackends('NestJS');

describe('NestJS: the first response equals bare Nest’s, byte for byte', () => {
  it('has a corpus of at least 20 behaviours', () => {
    expect(CORPUS.length).toBeGreaterThanOrEqual(20);
  });

  for (const backendSetup of backends) {
    for (const platform of ['express', 'fastify'] as const) {
      const cases = numberedCases(CORPUS).filter((_, i) => (CORPUS[i]!.platform ?? platform) === platform);
      describeDifferential(`NestJS 11 on ${platform}`, backendSetup, cases, async (backend, onEvent) => ({
        bare: await nestApp(platform),
        idempotent: await nestApp(platform, { backend, onEvent }),
      }));
    }
  }
});
