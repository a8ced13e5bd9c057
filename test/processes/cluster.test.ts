/**
 * Exactly once across processes (SPEC §3): four copies of the Express example, each its own Node.js process with
 * its own Redis connection, share one Redis. 400 concurrent requests over 50 keys, every key sent to every
 * process, each client retrying its 409s: every key's handler runs once, in one process, and every client ends
 * with that run's response, byte for byte.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../support/redis.js';
import { postJson, postWithRetries, type RetriedAnswer } from './client.js';
import { type ExampleProcess, startExample } from './example-process.js';

const redisUp = await requireRedis('Exactly-once across processes');

const PROCESSES = 4;
const KEYS = 50;
const REQUESTS_PER_KEY = 8;
const WARMUP_REQUESTS = 4;
const RETRY = { maxWaitMs: 200, maxAttempts: 100 };

interface Sent {
  key: string;
  item: string;
  /** The process the request went to. */
  server: ExampleProcess;
  answer: RetriedAnswer;
}

interface Order {
  number: number;
  item: string | null;
  pid: number;
}

describe.runIf(redisUp)('the Express example, 4 processes sharing Redis', () => {
  const prefix = uniquePrefix('processes-cluster');
  const processes: ExampleProcess[] = [];
  let redis: Redis | undefined;

  beforeAll(async () => {
    redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 });
    redis.on('error', () => {});
    await redis.connect();
    const started = await Promise.allSettled(
      Array.from({ length: PROCESSES }, () =>
        startExample({ REDIS_URL, IDEMPOTENCY_PREFIX: prefix }).then((child) => {
          processes.push(child);
          return child;
        }),
      ),
    );
    const failure = started.find((result) => result.status === 'rejected');
    if (failure !== undefined) throw (failure as PromiseRejectedResult).reason;
    // Warm every process up (connection, middleware, script cache) without running the handler: PATCH is handled
    // by the middleware, but no route answers it, so the 404 is not stored and the key is released.
    await Promise.all(
      processes.flatMap((child) =>
        Array.from({ length: WARMUP_REQUESTS }, async (_, i) => {
          const warmup = await fetch(child.url, {
            method: 'PATCH',
            headers: { 'idempotency-key': `warmup-${child.pid}-${i}` },
          });
          await warmup.arrayBuffer();
          expect(warmup.status).toBe(404);
        }),
      ),
    );
  });

  afterAll(async () => {
    await Promise.all(processes.map((child) => child.stop()));
    if (redis !== undefined) {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    }
  });

  it('runs each key once and gives every client that run’s response', async () => {
    expect(processes.map((child) => child.backend)).toEqual(Array(PROCESSES).fill('RedisBackend'));
    expect(new Set(processes.map((child) => child.url)).size).toBe(PROCESSES);

    // Request j of key k goes to process (k + j) % 4: every key reaches every process twice, each process is the
    // first to receive a quarter of the keys, and all 400 requests are in flight at once.
    const started = performance.now();
    const sent = await Promise.all(
      Array.from({ length: KEYS * REQUESTS_PER_KEY }, async (_, i): Promise<Sent> => {
        const k = Math.floor(i / REQUESTS_PER_KEY);
        const j = i % REQUESTS_PER_KEY;
        const key = `order-${k}`;
        const item = `item-${k}`;
        const server = processes[(k + j) % PROCESSES]!;
        const answer = await postWithRetries(server.url, key, { item }, RETRY);
        return { key, item, server, answer };
      }),
    );
    const elapsedMs = performance.now() - started;

    const byKey = new Map<string, Sent[]>();
    for (const request of sent) byKey.set(request.key, [...(byKey.get(request.key) ?? []), request]);
    expect(byKey.size).toBe(KEYS);
    const orders: Order[] = [];
    for (const [key, requests] of byKey) {
      expect(requests).toHaveLength(REQUESTS_PER_KEY);
      expect(new Set(requests.map((request) => request.server)).size).toBe(PROCESSES);
      for (const { answer } of requests) {
        expect(answer.status, `${key}: ${answer.text}`).toBe(201);
        // Every 409 on the way was the documented conflict answer.
        for (const conflict of answer.conflicts) {
          expect(JSON.parse(conflict.text)).toEqual({
            detail: `Request already pending for idempotency key '${key}'`,
          });
          expect(Number(conflict.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
        }
      }
      // The first run and its replays agree byte for byte, headers included.
      const [first] = requests;
      for (const { answer } of requests) {
        expect(answer.text, key).toBe(first!.answer.text);
        expect(answer.headers.get('location'), key).toBe(first!.answer.headers.get('location'));
        expect(answer.headers.get('content-type'), key).toBe(first!.answer.headers.get('content-type'));
      }
      // Exactly one client got the run itself; the seven others got replays.
      const replayed = requests.map(({ answer }) => answer.headers.get('idempotent-replayed'));
      expect(
        replayed.filter((value) => value === null),
        key,
      ).toHaveLength(1);
      expect(
        replayed.filter((value) => value === 'true'),
        key,
      ).toHaveLength(REQUESTS_PER_KEY - 1);

      const order = JSON.parse(first!.answer.text) as Order;
      expect(order.item).toBe(requests[0]!.item);
      expect(first!.answer.headers.get('location')).toBe(`/orders/${order.number}`);
      orders.push(order);
    }

    // 50 runs in all: 50 distinct order numbers, and the shared sequence counted exactly 50.
    expect(orders.map((order) => order.number).sort((a, b) => a - b)).toEqual(
      Array.from({ length: KEYS }, (_, i) => i + 1),
    );
    expect(await redis!.get(`${prefix}example:order-sequence`)).toBe(String(KEYS));

    // The answers came from all four processes, and the body names the process that ran the handler: the one
    // non-replayed answer of a key came from the process that ran it, and the key's six requests sent to the
    // other three processes were replays of a run made elsewhere. Which process wins a key's race is up to the
    // scheduler (one process can win nearly all of them), so that every process can run a key is checked below.
    const pids = processes.map((child) => child.pid);
    for (const child of processes) {
      expect(sent.filter(({ server }) => server === child)).toHaveLength(
        (KEYS * REQUESTS_PER_KEY) / PROCESSES,
      );
    }
    for (const order of orders) expect(pids).toContain(order.pid);
    let replayedFromElsewhere = 0;
    for (const { server, answer } of sent) {
      const { pid } = JSON.parse(answer.text) as Order;
      if (answer.headers.get('idempotent-replayed') === null) expect(pid).toBe(server.pid);
      else if (pid !== server.pid) replayedFromElsewhere++;
    }
    expect(replayedFromElsewhere).toBe(KEYS * (REQUESTS_PER_KEY - REQUESTS_PER_KEY / PROCESSES));

    const conflicts = sent.reduce((sum, { answer }) => sum + answer.conflicts.length, 0);
    const maxAttempts = Math.max(...sent.map(({ answer }) => answer.attempts));
    const runsPerProcess = processes.map((child) => orders.filter((order) => order.pid === child.pid).length);
    console.info(
      `cluster: ${sent.length} requests in ${elapsedMs.toFixed(0)} ms, ${conflicts} conflicts (409) retried, ` +
        `at most ${maxAttempts} attempts per request, runs per process ${runsPerProcess.join('/')}`,
    );
  });

  it('replays every key afterwards from any process, and runs a new key in whichever process gets it', async () => {
    for (const [index, child] of processes.entries()) {
      const replay = await postJson(child.url, `order-${index}`, { item: `item-${index}` });
      expect(replay.status).toBe(201);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
    }
    expect(await redis!.get(`${prefix}example:order-sequence`)).toBe(String(KEYS));

    // Each process runs the handler itself for a key only it receives.
    for (const [index, child] of processes.entries()) {
      const key = `single-${index}`;
      const first = await postJson(child.url, key, { item: key });
      expect(first.status).toBe(201);
      expect(first.headers.get('idempotent-replayed')).toBeNull();
      expect(JSON.parse(first.text)).toEqual({ number: KEYS + index + 1, item: key, pid: child.pid });
      const other = processes[(index + 1) % PROCESSES]!;
      const replay = await postJson(other.url, key, { item: key });
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(replay.text).toBe(first.text);
    }
    expect(await redis!.get(`${prefix}example:order-sequence`)).toBe(String(KEYS + PROCESSES));
  });
});
