/**
 * NestJS on Express and on Fastify: the adapter contract on memory and Redis. The Nest-specific behaviour
 * (decorators, handlers that return values, exceptions) is in `test/nestjs/`, whose files use decorator syntax.
 */
import { describe } from 'vitest';
import { createMemoryBackend } from '../support/http.js';
import { createNestServerFactory } from '../support/nestjs.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

for (const platform of ['express', 'fastify'] as const) {
  describeAdapterContract(`NestJS 11 on ${platform}, MemoryBackend`, {
    createServer: createNestServerFactory(platform),
    createBackend: createMemoryBackend,
  });
}

const redisUp = await requireRedis('NestJS adapter contract on RedisBackend');
describe.runIf(redisUp)('NestJS adapter on RedisBackend', () => {
  for (const platform of ['express', 'fastify'] as const) {
    describeAdapterContract(`NestJS 11 on ${platform}, ioredis`, {
      createServer: createNestServerFactory(platform),
      createBackend: () => createIoredisBackend(`nestjs-${platform}`),
    });
  }
});
