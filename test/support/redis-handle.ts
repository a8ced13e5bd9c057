/** {@link BackendHandle}s on the shared Redis server, for the adapter contract runs of every adapter. */
import { Redis } from 'ioredis';
import { RedisBackend } from '../../src/backends/redis.js';
import type { BackendHandle } from './http.js';
import { deleteKeysWithPrefix, REDIS_URL, uniquePrefix } from './redis.js';

/** A {@link BackendHandle} on Redis, with the prefix its keys live under. */
export interface RedisBackendHandle extends BackendHandle {
  readonly prefix: string;
}

/** A `RedisBackend` on an ioredis client under its own prefix; teardown deletes exactly its keys. */
export async function createIoredisBackend(label: string): Promise<RedisBackendHandle> {
  const redis = new Redis(REDIS_URL, { lazyConnect: true });
  await redis.connect();
  const prefix = uniquePrefix(label);
  return {
    prefix,
    backend: new RedisBackend({ redis, prefix }),
    async teardown() {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    },
  };
}
