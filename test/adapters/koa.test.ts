/**
 * The Koa middleware: the adapter contract on Koa 2 and Koa 3, with `@koa/bodyparser` before and after the
 * middleware, on memory and Redis; then what only Koa has (`ctx.body` kinds serialised as Koa does, redirects,
 * `ctx.state.idempotency`).
 */
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { Readable } from 'node:stream';
import Koa from 'koa';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/koa.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createMemoryBackend, type HttpResult, listen, send, type TestServer } from '../support/http.js';
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

/** Handlers setting `ctx.body` every way Koa takes it, for the differential below. */
const BODIES: Readonly<Record<string, Koa.Middleware>> = {
  'a JSON string': (ctx) => {
    ctx.type = 'json';
    ctx.body = '{ "a" : 1 }';
  },
  'a text string': (ctx) => {
    ctx.body = 'hello';
  },
  'an HTML string': (ctx) => {
    ctx.body = '<p>hello</p>';
  },
  'a Buffer': (ctx) => {
    ctx.body = Buffer.from([0, 1, 2, 255]);
  },
  'a JSON Buffer': (ctx) => {
    ctx.type = 'application/json; charset=utf-8';
    ctx.body = Buffer.from('{"b":2}');
  },
  'an object with a status': (ctx) => {
    ctx.status = 201;
    ctx.set('Location', '/orders/1');
    ctx.body = { id: 1, note: 'café' };
  },
  'an array': (ctx) => {
    ctx.body = [1, 'two', null];
  },
  'a JSON stream': (ctx) => {
    ctx.type = 'json';
    ctx.body = Readable.from(['{"items":', '[1,2]', '}']);
  },
  'a text stream': (ctx) => {
    ctx.body = Readable.from(['one ', 'two']);
  },
  null: (ctx) => {
    ctx.body = null;
  },
  'no body and a status': (ctx) => {
    ctx.status = 202;
  },
  'no body at all': () => {},
  'a redirect': (ctx) => {
    ctx.status = 303;
    ctx.redirect('/orders/1');
  },
  'repeated headers': (ctx) => {
    ctx.set('Link', ['</a>; rel="a"', '</b>; rel="b"']);
    ctx.append('Vary', 'Accept');
    ctx.body = { linked: true };
  },
  'a thrown HTTP error': (ctx) => {
    ctx.throw(400, 'bad order');
  },
};

/** The bodies above that are JSON, so stored by default and replayed. */
const STORED = new Set([
  'a JSON string',
  'a JSON Buffer',
  'an object with a status',
  'an array',
  'a JSON stream',
  'repeated headers',
]);

describe.each(VERSIONS)('%s: ctx.body serialised as Koa does', (_version, KoaClass) => {
  const servers: TestServer[] = [];
  const backends: MemoryBackend[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((server) => server.close()));
    for (const backend of backends.splice(0)) backend.close();
  });

  async function serve(handler: Koa.Middleware, withMiddleware: boolean): Promise<TestServer> {
    const app = new KoaClass();
    app.silent = true;
    if (withMiddleware) {
      const backend = new MemoryBackend();
      backends.push(backend);
      app.use(idempotencyHeader({ backend }));
    }
    app.use(handler);
    const server = await listen(createServer(app.callback()));
    servers.push(server);
    return server;
  }

  const comparable = (result: HttpResult) => ({
    status: result.status,
    headers: [...result.headers].filter(([name]) => name !== 'date' && name !== 'idempotent-replayed'),
    body: result.body.toString('base64'),
  });

  for (const [label, handler] of Object.entries(BODIES)) {
    it(`sends ${label} as bare Koa does, and replays it as first sent when stored`, async () => {
      const bare = await serve(handler, false);
      const wrapped = await serve(handler, true);
      const key = randomUUID();
      const options = { key, body: { item: 'book' }, redirect: 'manual' } as const;
      const expected = comparable(await send(`${bare.url}/orders`, options));
      const first = await send(`${wrapped.url}/orders`, options);
      const framing = (entry: [string, string]) =>
        entry[0] !== 'content-length' && entry[0] !== 'transfer-encoding';
      expect({ ...comparable(first), headers: comparable(first).headers.filter(framing) }).toEqual({
        ...expected,
        headers: expected.headers.filter(framing),
      });
      const retry = await send(`${wrapped.url}/orders`, options);
      expect(retry.headers.get('idempotent-replayed')).toBe(STORED.has(label) ? 'true' : null);
      if (STORED.has(label)) {
        expect(comparable(retry).status).toBe(first.status);
        expect(comparable(retry).body).toBe(comparable(first).body);
        expect(retry.headers.get('content-type')).toBe(first.headers.get('content-type'));
        expect(retry.headers.get('location')).toBe(first.headers.get('location'));
      }
    });
  }

  it('hands the key and lease signal to the handler in ctx.state.idempotency', async () => {
    const server = await serve((ctx) => {
      ctx.body = { key: ctx.state.idempotency?.key, aborted: ctx.state.idempotency?.signal.aborted };
    }, true);
    const key = randomUUID();
    expect(JSON.parse((await send(`${server.url}/orders`, { key, body: {} })).text)).toEqual({
      key,
      aborted: false,
    });
  });
});
