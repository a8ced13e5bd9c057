/**
 * The Fastify plugin: the adapter contract on memory and Redis, then what only Fastify has (per-route options,
 * `inject()`, encapsulation, hooks seeing replays, `request.idempotency`).
 */
import { describe } from 'vitest';
import { createFastifyServerFactory } from '../support/fastify.js';
import { createMemoryBackend } from '../support/http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('Fastify 5, MemoryBackend', {
  createServer: createFastifyServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('Fastify adapter contract on RedisBackend');
describe.runIf(redisUp)('Fastify adapter on RedisBackend', () => {
  describeAdapterContract('Fastify 5, ioredis', {
    createServer: createFastifyServerFactory(),
    createBackend: () => createIoredisBackend('fastify'),
  });
});
