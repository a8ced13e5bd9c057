/**
 * Redis clients configured to fail fast while the server is away, as RedisBackend's TSDoc and the README show:
 * the outage and store-failure scenarios run on both drivers with exactly these settings.
 */
import { Redis } from 'ioredis';
import { createClient } from 'redis';
import type { RedisClientLike } from '../../src/backends/redis.js';

/** A connected client and how to drop it. */
export interface FailFastClient {
  redis: RedisClientLike;
  close(): void;
}

/** The README's fail-fast configuration of each driver, connected to `url`. */
export const failFastClients: Record<string, (url: string) => Promise<FailFastClient>> = {
  async ioredis(url) {
    const redis = new Redis(url, {
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      commandTimeout: 2000,
      lazyConnect: true,
    });
    redis.on('error', () => {});
    await redis.connect();
    return { redis, close: () => redis.disconnect() };
  },
  async 'node-redis'(url) {
    const redis = createClient({
      url,
      disableOfflineQueue: true,
      pingInterval: 1000,
      socket: { socketTimeout: 3000, reconnectStrategy: (retries) => Math.min(retries * 100, 2000) },
    });
    redis.on('error', () => {});
    await redis.connect();
    return { redis, close: () => redis.destroy() };
  },
};
