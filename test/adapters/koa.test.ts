/**
 * The Koa middleware: the adapter contract on Koa 2 and Koa 3, with `@koa/bodyparser` before and after the
 * middleware, on memory and Redis; then what only Koa has (`ctx.body` kinds serialised as Koa does, redirects,
 * `ctx.state.idempotency`).
 */
import Koa from 'koa';
import { describe } from 'vitest';
import { createMemoryBackend } from '../support/http.js';
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
