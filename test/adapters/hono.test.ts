/**
 * The Hono middleware on Node.js (`@hono/node-server`): the adapter contract on memory and Redis, then what only
 * Hono has (`app.request()`, the body cache, `c.error`, `c.get('idempotency')`).
 */
import { describe } from 'vitest';
import { createHonoServerFactory } from '../support/hono.js';
import { createMemoryBackend } from '../support/http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('Hono 4 on @hono/node-server, MemoryBackend', {
  createServer: createHonoServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('Hono adapter contract on RedisBackend');
describe.runIf(redisUp)('Hono adapter on RedisBackend', () => {
  describeAdapterContract('Hono 4 on @hono/node-server, ioredis', {
    createServer: createHonoServerFactory(),
    createBackend: () => createIoredisBackend('hono'),
  });
});
