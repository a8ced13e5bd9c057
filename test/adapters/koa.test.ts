/**
 * The Koa middleware: the adapter contract on Koa 2 and Koa 3, with `@koa/bodyparser` before and after the
 * middleware, on memory and Redis; then what only Koa has (`ctx.state.idempotency`). Every kind of `ctx.body`,
 * compared with bare Koa byte for byte, is in `koa-differential.test.ts`.
 */
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { bodyParser } from '@koa/bodyparser';
import Koa from 'koa';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/koa.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createMemoryBackend, listen, postRaw, send, type TestServer } from '../support/http.js';
import { createKoaServerFactory, type KoaModule, koa3 } from '../support/koa.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

const VERSIONS: readonly (readonly [string, KoaModule])[] = [
  ['Koa 2', Koa],
  ['Koa 3', koa3],
];

for (const [version, KoaClass] of VERSIONS) {
  for (const parser of ['before', 'after'] as const) {
    describeAdapterContract(`${version}, body parser ${parser} the middleware, MemoryBackend`, {
      createServer: createKoaServerFactory(KoaClass, parser),
      createBackend: createMemoryBackend,
    });
  }
}

const redisUp = await requireRedis('Koa adapter contract on RedisBackend');
describe.runIf(redisUp)('Koa adapter on RedisBackend', () => {
  describeAdapterContract('Koa 3, body parser before the middleware, ioredis', {
    createServer: createKoaServerFactory(koa3, 'before'),
    createBackend: () => createIoredisBackend('koa'),
  });
  describeAdapterContract('Koa 2, body parser after the middleware, ioredis', {
    createServer: createKoaServerFactory(Koa, 'after'),
    createBackend: () => createIoredisBackend('koa'),
  });
});

describe.each(VERSIONS)('%s: what only Koa has', (_version, KoaClass) => {
  const servers: TestServer[] = [];
  const backends: MemoryBackend[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((server) => server.close()));
    for (const backend of backends.splice(0)) backend.close();
  });

  async function serve(handler: Koa.Middleware): Promise<TestServer> {
    const app = new KoaClass();
    app.silent = true;
    const backend = new MemoryBackend();
    backends.push(backend);
    app.use(idempotencyHeader({ backend }));
    app.use(handler);
    const server = await listen(createServer(app.callback()));
    servers.push(server);
    return server;
  }

  it('hands the key and lease signal to the handler in ctx.state.idempotency', async () => {
    const server = await serve((ctx) => {
      ctx.body = { key: ctx.state.idempotency?.key, aborted: ctx.state.idempotency?.signal.aborted };
    });
    const key = randomUUID();
    expect(JSON.parse((await send(`${server.url}/orders`, { key, body: {} })).text)).toEqual({
      key,
      aborted: false,
    });
  });

  it('leaves an empty chunked body to a body parser mounted after it, as bare Koa does', async () => {
    const app = new KoaClass();
    app.silent = true;
    const backend = new MemoryBackend();
    backends.push(backend);
    app.use(idempotencyHeader({ backend }));
    app.use(bodyParser());
    let runs = 0;
    app.use((ctx) => {
      ctx.status = 201;
      ctx.body = { run: ++runs, body: (ctx.request as { body?: unknown }).body ?? null };
    });
    const server = await listen(createServer(app.callback()));
    servers.push(server);
    const result = await postRaw(`${server.url}/orders`, {
      'content-type': 'application/json',
      'transfer-encoding': 'chunked',
      'idempotency-key': randomUUID(),
    });
    expect(result).toEqual({ status: 201, text: '{"run":1,"body":{}}' });
  });

  it('refuses a multipart body a parser mounted first consumed, rather than fingerprinting its fields without its files', async () => {
    const app = new KoaClass();
    app.silent = true;
    const backend = new MemoryBackend();
    backends.push(backend);
    // As koa-body with `multipart: true` does: the stream read, the fields in ctx.request.body, the files elsewhere.
    app.use(async (ctx, next) => {
      for await (const _chunk of ctx.req);
      (ctx.request as { body?: unknown }).body = { note: 'scan' };
      await next();
    });
    app.use(async (ctx, next) => {
      try {
        await next();
      } catch (error) {
        ctx.status = 500;
        ctx.body = { code: (error as { code?: string }).code, message: (error as Error).message };
      }
    });
    app.use(idempotencyHeader({ backend }));
    let runs = 0;
    app.use((ctx) => {
      ctx.status = 201;
      ctx.body = { run: ++runs };
    });
    const server = await listen(createServer(app.callback()));
    servers.push(server);
    const boundary = '----formdata-undici-0123';
    const result = await send(`${server.url}/uploads`, {
      key: randomUUID(),
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
      body: `--${boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nscan\r\n--${boundary}--\r\n`,
    });
    expect([result.status, JSON.parse(result.text)]).toEqual([
      500,
      {
        code: 'ERR_IDEMPOTENCY_BODY',
        message: expect.stringMatching(
          /multipart.*files.*mount the idempotency middleware before that parser/,
        ),
      },
    ]);
    expect(runs).toBe(0);
  });
});
