/**
 * `idempotency-header proxy --on-conflict wait` on Redis: the proxies turn RedisBackend's notifications on, so a
 * repeat sent to another proxy while the first runs is woken by the PUBLISH as the run is stored.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../support/redis.js';
import {
  firstRunAndRepeat,
  type ProxyProcess,
  startProxy,
  startUpstream,
  type Upstream,
} from './processes.js';

const redisUp = await requireRedis('proxy --on-conflict wait on Redis');

describe.runIf(redisUp)('two proxies sharing Redis with --on-conflict wait', () => {
  const prefix = uniquePrefix('proxy-wait');
  let upstream: Upstream;
  let redis: Redis;
  let proxies: ProxyProcess[] = [];

  beforeAll(async () => {
    redis = new Redis(REDIS_URL);
    upstream = await startUpstream();
    proxies = await Promise.all(
      [0, 1].map(() =>
        startProxy(['--upstream', upstream.url, '--backend', REDIS_URL, '--on-conflict', 'wait'], {
          IDEMPOTENCY_PREFIX: prefix,
        }),
      ),
    );
  }, 60_000);

  afterAll(async () => {
    await Promise.all(proxies.map((proxy) => proxy.stop()));
    await upstream?.stop();
    await deleteKeysWithPrefix(redis, prefix);
    await redis.quit();
  });

  it('wakes a repeat on another proxy by PUBLISH as the run is stored', async () => {
    const [a, b] = proxies as [ProxyProcess, ProxyProcess];
    const key = `wait-${prefix}`;
    const { done, repeat } = await firstRunAndRepeat(a, b, key);
    expect(done.status).toBe(201);
    expect(repeat).toMatchObject({ status: 201, replayed: 'true', text: done.text });
    expect(repeat.at - done.at).toBeLessThan(500);
    expect((await upstream.counts())[key]).toBe(1);
    // The waiting proxy listens on the prefix's channel (a subscriber of its own), as it would for any waiter.
    const [, subscribers] = (await redis.call('PUBSUB', 'NUMSUB', `${prefix}notifications`)) as [
      string,
      number,
    ];
    expect(subscribers).toBeGreaterThanOrEqual(1);
  });
});
