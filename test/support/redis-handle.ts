/** {@link BackendHandle}s on the shared Redis server, for the adapter contract runs of every adapter. */
import { Redis } from 'ioredis';
import { RedisBackend } from '../../src/backends/redis.js';
import type { BackendHandle } from './http.js';
import { deleteKeysWithPrefix, REDIS_URL, uniquePrefix } from './redis.js';

/** A `RedisBackend` on an ioredis client under its own prefix; teardown deletes exactly its keys. */
export async function createIoredisBackend(label: string): Promise<BackendHandle> {
  const redis = new Redis(REDIS_URL, { lazyConnect: true });
  await redis.connect();
  const prefix = uniquePrefix(label);
  return {
    backend: new RedisBackend({ redis, prefix }),
    async teardown() {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    },
  };
}
