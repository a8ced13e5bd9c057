/**
 * The fetch adapter, `withIdempotency(handler)`, on Node.js (`@hono/node-server` turns node:http into `Request`s):
 * the adapter contract on memory and Redis, then what only it has (the request body stays readable, streamed
 * `Response` bodies, `getIdempotency`, other arguments passed on).
 */
import { describe } from 'vitest';
import { createFetchServerFactory } from '../support/hono.js';
import { createMemoryBackend } from '../support/http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('fetch withIdempotency on @hono/node-server, MemoryBackend', {
  createServer: createFetchServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('fetch adapter contract on RedisBackend');
describe.runIf(redisUp)('fetch adapter on RedisBackend', () => {
  describeAdapterContract('fetch withIdempotency on @hono/node-server, ioredis', {
    createServer: createFetchServerFactory(),
    createBackend: () => createIoredisBackend('fetch'),
  });
});
