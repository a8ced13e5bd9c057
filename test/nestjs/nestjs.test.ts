/**
 * What only NestJS has, on Express and on Fastify: `@Idempotent()` opting routes in, out and overriding options,
 * handlers that return values (objects, Promises, Observables) sent by Nest itself, `HttpException`s and other
 * errors, a client that leaves while an Observable handler runs, and `idempotencyOf()`.
 */
import 'reflect-metadata';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import multipart from '@fastify/multipart';
import {
  Body,
  Controller,
  Get,
  Header,
  HttpCode,
  HttpException,
  Module,
  NotFoundException,
  Post,
  Req,
  type Type,
} from '@nestjs/common';
import { APP_INTERCEPTOR } from '@nestjs/core';
import type { NestFastifyApplication } from '@nestjs/platform-fastify';
import type { FastifyRequest } from 'fastify';
import { delay, from, map, type Observable, of } from 'rxjs';
import { afterEach, describe, expect, it } from 'vitest';
import {
  IdempotencyInterceptor,
  IdempotencyModule,
  Idempotent,
  idempotencyOf,
  type NestIdempotencyOptions,
} from '../../src/adapters/nestjs.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { type HttpResult, send, type TestServer } from '../support/http.js';
import { createNestApp, listenNest, type NestPlatform } from '../support/nestjs.js';

/** A promise with its resolver outside (`Promise.withResolvers` is Node.js 22+). */
function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((done) => {
    resolve = done;
  });
  return { promise, resolve };
}

/** Counts runs per route; `gate` holds `/orders/slow` until released. */
class Runs {
  readonly counts = new Map<string, number>();
  gate = deferred();
  started = deferred();

  run(name: string): number {
    const count = (this.counts.get(name) ?? 0) + 1;
    this.counts.set(name, count);
    return count;
  }

  of(name: string): number {
    return this.counts.get(name) ?? 0;
  }
}

let runs = new Runs();

@Controller('orders')
class OrdersController {
  @Post()
  @Header('x-handler', 'orders')
  create(@Body() body: { item: string }) {
    return { item: body.item, run: runs.run('create') };
  }

  @Post('promise')
  async viaPromise(@Req() req: object) {
    await new Promise((resolve) => setTimeout(resolve, 5));
    return { run: runs.run('promise'), key: idempotencyOf(req)?.key ?? null };
  }

  @Post('observable')
  viaObservable(): Observable<{ run: number }> {
    return of(null).pipe(
      delay(5),
      map(() => ({ run: runs.run('observable') })),
    );
  }

  @Post('slow-observable')
  slowObservable(): Observable<{ run: number }> {
    runs.started.resolve();
    return from(runs.gate.promise).pipe(map(() => ({ run: runs.run('slow-observable') })));
  }

  @Post('slow')
  async slow() {
    runs.started.resolve();
    await runs.gate.promise;
    return { run: runs.run('slow') };
  }

  @Post('missing')
  missing(): never {
    runs.run('missing');
    throw new NotFoundException('no such order');
  }

  @Post('too-many')
  tooMany(): never {
    runs.run('too-many');
    throw new HttpException({ detail: 'slow down' }, 429);
  }

  @Post('broken')
  broken(): never {
    runs.run('broken');
    throw new Error('the handler failed on purpose');
  }

  @Post('unguarded')
  @Idempotent(false)
  unguarded() {
    return { run: runs.run('unguarded') };
  }

  @Post('strict')
  @Idempotent({ required: true })
  @HttpCode(200)
  strict() {
    return { run: runs.run('strict') };
  }

  @Get()
  list() {
    return { run: runs.run('list') };
  }
}

/** Not covered by a global interceptor: only its `@Idempotent()` handler is. */
@Controller('opt-in')
class OptInController {
  @Post('on')
  @Idempotent()
  on() {
    return { run: runs.run('opt-in on') };
  }

  @Post('off')
  off() {
    return { run: runs.run('opt-in off') };
  }
}

/** A controller-wide setting, and a handler that overrides it. */
@Controller('scoped')
@Idempotent({ expiry: 60, required: true })
class ScopedController {
  @Post('inherits')
  inherits() {
    return { run: runs.run('scoped inherits') };
  }

  @Post('overrides')
  @Idempotent({ required: false })
  overrides() {
    return { run: runs.run('scoped overrides') };
  }
}

function moduleWith(
  options: NestIdempotencyOptions,
  global: boolean,
  controllers: Type<unknown>[],
): Type<unknown> {
  @Module({
    imports: [IdempotencyModule.forRoot(options)],
    controllers,
    providers: global ? [{ provide: APP_INTERCEPTOR, useClass: IdempotencyInterceptor }] : [],
  })
  class AppModule {}
  return AppModule;
}

describe.each(['express', 'fastify'] as const)('NestJS on %s', (platform: NestPlatform) => {
  const servers: TestServer[] = [];
  const backends: MemoryBackend[] = [];

  afterEach(async () => {
    runs.gate.resolve();
    await Promise.all(servers.splice(0).map((server) => server.close()));
    for (const backend of backends.splice(0)) backend.close();
    runs = new Runs();
  });

  async function start(
    options: Partial<NestIdempotencyOptions> = {},
    { global = true, controllers = [OrdersController, OptInController, ScopedController] } = {},
  ): Promise<(path: string, key?: string, body?: object) => Promise<HttpResult>> {
    const backend = new MemoryBackend();
    backends.push(backend);
    const app = await createNestApp(platform, moduleWith({ backend, ...options }, global, controllers));
    const server = await listenNest(app);
    servers.push(server);
    return (path, key, body = { item: 'book' }) => send(server.url + path, { key, body });
  }

  function expectReplayOf(replay: HttpResult, first: HttpResult): void {
    expect(first.headers.get('idempotent-replayed')).toBeNull();
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.status).toBe(first.status);
    expect(replay.body.equals(first.body)).toBe(true);
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
  }

  describe('handlers that return values', () => {
    it("stores what Nest sends for a returned object, with the route's status and @Header, and replays it", async () => {
      const post = await start();
      const key = randomUUID();
      const first = await post('/orders', key);
      expect(first.status).toBe(201);
      expect(first.headers.get('x-handler')).toBe('orders');
      expect(JSON.parse(first.text)).toEqual({ item: 'book', run: 1 });
      const replay = await post('/orders', key);
      expectReplayOf(replay, first);
      expect(replay.headers.get('x-handler')).toBe('orders');
      expect(runs.of('create')).toBe(1);
    });

    it.each([
      ['a Promise', '/orders/promise', 'promise'],
      ['an Observable', '/orders/observable', 'observable'],
    ])('stores the value of %s and replays it', async (_, path, name) => {
      const post = await start();
      const key = randomUUID();
      const first = await post(path, key);
      expect(first.status).toBe(201);
      expectReplayOf(await post(path, key), first);
      expect(runs.of(name)).toBe(1);
    });

    it('answers 409 through Nest while the first request runs, then replays', async () => {
      const post = await start();
      const key = randomUUID();
      const first = post('/orders/slow', key);
      await runs.started.promise;
      const conflict = await post('/orders/slow', key);
      expect(conflict.status).toBe(409);
      expect(conflict.text).toBe(`{"detail":"Request already pending for idempotency key '${key}'"}`);
      expect(Number(conflict.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
      runs.gate.resolve();
      const done = await first;
      expect(done.status).toBe(201);
      expectReplayOf(await post('/orders/slow', key), done);
      expect(runs.of('slow')).toBe(1);
    });

    it('answers 422 to the same key with another body', async () => {
      const post = await start();
      const key = randomUUID();
      expect((await post('/orders', key, { item: 'book' })).status).toBe(201);
      const mismatch = await post('/orders', key, { item: 'pen' });
      expect(mismatch.status).toBe(422);
      expect(runs.of('create')).toBe(1);
    });

    it('hands the key to the handler through idempotencyOf(request)', async () => {
      const post = await start();
      const key = randomUUID();
      expect(JSON.parse((await post('/orders/promise', key)).text)).toEqual({ run: 1, key });
      expect(JSON.parse((await post('/orders/promise', undefined)).text)).toEqual({ run: 2, key: null });
    });
  });

  describe('exceptions', () => {
    it("stores an HttpException's 4xx as Nest's exception filter sends it, and replays it", async () => {
      const post = await start();
      const key = randomUUID();
      const first = await post('/orders/missing', key);
      expect(first.status).toBe(404);
      expect(JSON.parse(first.text)).toMatchObject({ statusCode: 404, message: 'no such order' });
      expectReplayOf(await post('/orders/missing', key), first);
      expect(runs.of('missing')).toBe(1);
    });

    it('releases the key for an HttpException whose status means "not executed" (429)', async () => {
      const post = await start();
      const key = randomUUID();
      expect((await post('/orders/too-many', key)).status).toBe(429);
      const again = await post('/orders/too-many', key);
      expect(again.status).toBe(429);
      expect(again.headers.get('idempotent-replayed')).toBeNull();
      expect(runs.of('too-many')).toBe(2);
    });

    it('answers 500 for any other error and releases the key, even with cacheServerErrors', async () => {
      const post = await start({ cacheServerErrors: true });
      const key = randomUUID();
      const first = await post('/orders/broken', key);
      expect(first.status).toBe(500);
      expect(JSON.parse(first.text)).toEqual({ statusCode: 500, message: 'Internal server error' });
      const again = await post('/orders/broken', key);
      expect(again.status).toBe(500);
      expect(again.headers.get('idempotent-replayed')).toBeNull();
      expect(runs.of('broken')).toBe(2);
    });
  });

  describe('@Idempotent()', () => {
    it('leaves a route marked @Idempotent(false) alone under a global interceptor', async () => {
      const post = await start();
      const key = randomUUID();
      await post('/orders/unguarded', key);
      const again = await post('/orders/unguarded', key);
      expect(again.headers.get('idempotent-replayed')).toBeNull();
      expect(runs.of('unguarded')).toBe(2);
    });

    it("overrides the module's options for a route", async () => {
      const post = await start();
      const missing = await post('/orders/strict', undefined);
      expect(missing.status).toBe(400);
      expect(missing.text).toBe(`{"detail":"'Idempotency-Key' header is required"}`);
      const key = randomUUID();
      const first = await post('/orders/strict', key);
      expect(first.status).toBe(200);
      expectReplayOf(await post('/orders/strict', key), first);
      expect(runs.of('strict')).toBe(1);
    });

    it("applies a controller's setting to its handlers, and a handler's own over it", async () => {
      const post = await start();
      expect((await post('/scoped/inherits', undefined)).status).toBe(400);
      expect((await post('/scoped/overrides', undefined)).status).toBe(201);
      const key = randomUUID();
      await post('/scoped/inherits', key);
      expect((await post('/scoped/inherits', key)).headers.get('idempotent-replayed')).toBe('true');
    });

    it('opts a handler in without a global interceptor, and leaves the others alone', async () => {
      const post = await start({}, { global: false });
      const key = randomUUID();
      const first = await post('/opt-in/on', key);
      expectReplayOf(await post('/opt-in/on', key), first);
      const other = randomUUID();
      await post('/opt-in/off', other);
      expect((await post('/opt-in/off', other)).headers.get('idempotent-replayed')).toBeNull();
      expect(runs.of('opt-in on')).toBe(1);
      expect(runs.of('opt-in off')).toBe(2);
      // Without the global interceptor, `/orders` is not covered either.
      await post('/orders', other);
      expect((await post('/orders', other)).headers.get('idempotent-replayed')).toBeNull();
    });

    it('handles a request once when the interceptor is bound globally and by @Idempotent()', async () => {
      const post = await start();
      const key = randomUUID();
      const first = await post('/opt-in/on', key);
      expect(first.status).toBe(201);
      expectReplayOf(await post('/opt-in/on', key), first);
      expect(runs.of('opt-in on')).toBe(1);
    });

    it('leaves methods outside applicableMethods untouched', async () => {
      const post = await start();
      const server = servers.at(-1)!;
      const key = randomUUID();
      for (let i = 0; i < 2; i++) {
        const result = await send(`${server.url}/orders`, { method: 'GET', key });
        expect(result.headers.get('idempotent-replayed')).toBeNull();
      }
      expect(runs.of('list')).toBe(2);
      void post;
    });

    it('refuses a misspelt option at once', () => {
      expect(() => Idempotent({ requird: true } as never)).toThrow(/requird/);
    });

    it('refuses an invalid value at once, naming the option, rather than on the route’s first request', () => {
      expect(() => Idempotent({ expiry: -1 })).toThrow(/Invalid option `expiry`/);
      expect(() => Idempotent({ lockTimeout: 0 })).toThrow(/Invalid option `lockTimeout`/);
      expect(() => Idempotent({ errorFormat: 'xml' } as never)).toThrow(/Invalid option `errorFormat`/);
      expect(() => Idempotent({ expiry: 60, required: true })).not.toThrow();
    });
  });

  describe('a client that leaves', () => {
    it('keeps an Observable handler running after Nest lets go of it, stores its response, and never runs it twice', async () => {
      const post = await start();
      const server = servers.at(-1)!;
      const key = randomUUID();
      const controller = new AbortController();
      const gone = send(`${server.url}/orders/slow-observable`, {
        key,
        body: { item: 'book' },
        signal: controller.signal,
      }).catch(() => undefined);
      await runs.started.promise;
      controller.abort();
      await gone;
      await sleep(50);
      const meanwhile = await post('/orders/slow-observable', key);
      expect(meanwhile.status).toBe(409);
      runs.gate.resolve();
      let replay: HttpResult | undefined;
      for (let i = 0; i < 40; i++) {
        replay = await post('/orders/slow-observable', key);
        if (replay.status !== 409) break;
        await sleep(50);
      }
      expect(replay!.status).toBe(201);
      expect(replay!.headers.get('idempotent-replayed')).toBe('true');
      expect(JSON.parse(replay!.text)).toEqual({ run: 1 });
      expect(runs.of('slow-observable')).toBe(1);
    });
  });
});

describe('NestJS on fastify with @fastify/multipart', () => {
  @Controller('uploads')
  class UploadsController {
    @Post()
    async upload(@Req() request: FastifyRequest): Promise<{ run: number; file: string }> {
      const file = await request.file();
      return { run: ++uploads.runs, file: (await file!.toBuffer()).toString() };
    }
  }
  const uploads = { runs: 0 };
  const servers: TestServer[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((server) => server.close()));
    uploads.runs = 0;
  });

  it('fingerprints an upload the handler reads itself by its bytes: a retry replays, another file gets 422', async () => {
    const backend = new MemoryBackend();
    const app = (await createNestApp(
      'fastify',
      moduleWith({ backend }, true, [UploadsController]),
    )) as NestFastifyApplication;
    // The test app parses multipart bodies into Buffers; @fastify/multipart brings its own parser.
    app.getHttpAdapter().getInstance().removeContentTypeParser('multipart/form-data');
    await app.register(multipart as never);
    const server = await listenNest(app);
    servers.push(server);
    const form = (boundary: string, file: string) =>
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n` +
          `Content-Type: application/octet-stream\r\n\r\n${file}\r\n--${boundary}--\r\n`,
      );
    const upload = (key: string, boundary: string, file: string) =>
      send(`${server.url}/uploads`, {
        key,
        headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
        body: form(boundary, file),
      });
    const key = randomUUID();
    const first = await upload(key, '----formdata-undici-01', 'first');
    expect([first.status, JSON.parse(first.text)]).toEqual([201, { run: 1, file: 'first' }]);
    const replay = await upload(key, '----formdata-undici-02', 'first');
    expect([replay.status, replay.headers.get('idempotent-replayed'), replay.text]).toEqual([
      201,
      'true',
      first.text,
    ]);
    expect((await upload(key, '----formdata-undici-03', 'other')).status).toBe(422);
    expect(uploads.runs).toBe(1);
    backend.close();
  });
});
