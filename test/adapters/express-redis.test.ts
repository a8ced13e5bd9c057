/**
 * The adapter contract over HTTP with `RedisBackend` on real Redis (REDIS_URL), through an ioredis client and a
 * node-redis client: every rule the in-memory runs check, with the locks and records living in Redis.
 */
import express from 'express';
import { Redis } from 'ioredis';
import { createClient } from 'redis';
import { describe } from 'vitest';
import { RedisBackend } from '../../src/backends/redis.js';
import { type BackendHandle, createExpressServerFactory, express4 } from '../support/http.js';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../support/redis.js';
import { describeAdapterContract } from './contract.js';

const redisUp = await requireRedis('Express adapter contract on RedisBackend');

/** Each contract test gets its own backend under its own prefix; teardown deletes exactly those keys. */
async function ioredisBackend(): Promise<BackendHandle> {
  const redis = new Redis(REDIS_URL, { lazyConnect: true });
  await redis.connect();
  const prefix = uniquePrefix('express-ioredis');
  return {
    backend: new RedisBackend({ redis, prefix }),
    async teardown() {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    },
  };
}

async function nodeRedisBackend(): Promise<BackendHandle> {
  const redis = await createClient({ url: REDIS_URL }).connect();
  const prefix = uniquePrefix('express-node-redis');
  return {
    backend: new RedisBackend({ redis, prefix }),
    async teardown() {
      const cleaner = new Redis(REDIS_URL);
      await deleteKeysWithPrefix(cleaner, prefix);
      cleaner.disconnect();
      await redis.close();
    },
  };
}

describe.runIf(redisUp)('Express adapter on RedisBackend', () => {
  describeAdapterContract('Express 5, ioredis', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: ioredisBackend,
  });
  describeAdapterContract('Express 5, node-redis', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: nodeRedisBackend,
  });
  describeAdapterContract('Express 4, body parsers after the middleware, ioredis', {
    createServer: createExpressServerFactory(express4, 'after'),
    createBackend: ioredisBackend,
  });
});
