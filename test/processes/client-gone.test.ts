/**
 * A client that gives up never causes a second execution, across processes (SPEC §3): two copies of the Express
 * example share Redis, and placing an order takes 1.5 s. The client asks process A and gives up after 300 ms;
 * its retry with the same key goes to process B, which answers 409 with a short Retry-After while A's handler
 * still runs, and the stored response once it finished. One order is placed, by process A.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../support/redis.js';
import { type ExampleProcess, startExample } from './example-process.js';

const redisUp = await requireRedis('A client that leaves, across processes');

const ORDER_DELAY_MS = 1500;

describe.runIf(redisUp)('a client that gives up on process A and retries on process B', () => {
  const prefix = uniquePrefix('processes-client-gone');
  let a: ExampleProcess | undefined;
  let b: ExampleProcess | undefined;
  let redis: Redis | undefined;

  beforeAll(async () => {
    redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 });
    redis.on('error', () => {});
    await redis.connect();
    const env = { REDIS_URL, IDEMPOTENCY_PREFIX: prefix, ORDER_DELAY_MS: String(ORDER_DELAY_MS) };
    [a, b] = await Promise.all([startExample(env), startExample(env)]);
  }, 60_000);

  afterAll(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    if (redis !== undefined) {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    }
  });

  it('runs the order once, in process A, and answers the retries on B with 409 then the replay', async () => {
    const key = randomUUID();
    const post = (url: string, signal?: AbortSignal) =>
      fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
        body: JSON.stringify({ item: 'book' }),
        signal,
      });
    const startedAt = Date.now();
    const gaveUp = await post(a!.url, AbortSignal.timeout(300)).then(
      () => false,
      () => true,
    );
    expect(gaveUp).toBe(true);

    const statuses: string[] = [];
    let answer: Response | undefined;
    while (Date.now() - startedAt < 10_000) {
      const response = await post(b!.url);
      statuses.push(`${response.status} retry-after=${response.headers.get('retry-after')}`);
      if (response.status !== 409) {
        answer = response;
        break;
      }
      await response.arrayBuffer();
      expect(Number(response.headers.get('retry-after'))).toBeLessThanOrEqual(2);
      await sleep(Number(response.headers.get('retry-after')) * 1000);
    }
    const log = `${a!.output()}\n${b!.output()}\n${statuses.join('\n')}`;
    expect(answer?.status, log).toBe(201);
    expect(answer!.headers.get('idempotent-replayed')).toBe('true');
    const order = (await answer!.json()) as { number: number; pid: number };
    expect(order.pid).toBe(a!.pid);
    expect(statuses[0]).toMatch(/^409/);
    // The client had its order within the handler's time plus a second or two of Retry-After.
    expect(Date.now() - startedAt).toBeLessThan(ORDER_DELAY_MS + 2500);
    // One order was placed: the shared sequence counted exactly one.
    expect(Number(await redis!.get(`${prefix}example:order-sequence`))).toBe(1);
  });
});
