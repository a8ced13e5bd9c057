/**
 * `onConflict: 'wait'` on RedisBackend with `notifications`: duplicates that arrive while the first request runs
 * wait for it and are woken by the PUBLISH of the process that ran it (two apps, two clients, one prefix here),
 * with ioredis and with node-redis. Without notifications the waiters poll and still get the response. With
 * notifications a first run still costs Redis two commands: the PUBLISH rides inside the complete script.
 */
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import { Cluster, Redis } from 'ioredis';
import { createClient, createCluster } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { type IoredisClientLike, RedisBackend, type RedisClientLike } from '../../src/backends/redis.js';
import { IdempotencyError } from '../../src/core/errors.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import { listen, send, type TestServer } from '../support/http.js';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../support/redis.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';

const redisUp = await requireRedis('RedisBackend wait mode');

/** How long the handler runs: long enough for a poller to look seven times, a notified waiter two or three. */
const HANDLER_MS = 1500;

/**
 * How soon a watch in place is woken by the release or store that announces its key. A watch has no timer: only
 * a message (or its signal) ends it, so this bound only catches a message heard late, not a poll; it is loose, as
 * a loaded machine (CI, every suite at once) took 229 ms for one round trip through an ioredis Cluster.
 */
const WOKEN_WITHIN_MS = 1_000;

/** A watch in place: `woken` settles when a message (or the signal) ends it; `resolved()` says whether it has. */
interface ArmedWatch {
  woken: Promise<void>;
  resolved(): boolean;
}

/**
 * A watch that is in place: the first watch of a backend resolves once its subscription is (so that its waiter
 * looks again), so this watches again until a watch stays pending, which only a message can then resolve.
 */
async function armedWatch(backend: RedisBackend, key: string, signal: AbortSignal): Promise<ArmedWatch> {
  for (;;) {
    let resolved = false;
    const woken = backend.watch(key, signal)!.then(() => {
      resolved = true;
    });
    await sleep(100);
    // Wrapped: an async function returning the promise itself would wait for it.
    if (!resolved) return { woken, resolved: () => resolved };
  }
}

/**
 * Announces the watched key's end (a release, a store, a forget, which must succeed) and expects the watch woken
 * within {@link WOKEN_WITHIN_MS}.
 */
async function expectWokenBy(watch: ArmedWatch, announce: () => Promise<boolean>): Promise<void> {
  const started = performance.now();
  expect(await announce()).toBe(true);
  await watch.woken;
  expect(performance.now() - started).toBeLessThan(WOKEN_WITHIN_MS);
}

describe.runIf(redisUp)("RedisBackend with onConflict: 'wait'", () => {
  const prefix = uniquePrefix('wait');
  const admin = new Redis(REDIS_URL);
  const closers: (() => Promise<unknown>)[] = [];
  const servers: TestServer[] = [];
  let runs = 0;

  /** Lookups (acquires) each app's backend made. */
  interface App {
    server: TestServer;
    backend: RedisBackend;
    lookups(): number;
  }

  async function app(redis: RedisClientLike, notifications: boolean): Promise<App> {
    const backend = new RedisBackend({ redis, prefix, notifications });
    closers.push(() => backend.close());
    let lookups = 0;
    const acquire = backend.acquire.bind(backend);
    backend.acquire = (...args) => {
      lookups++;
      return acquire(...args);
    };
    const application = express();
    application.use(express.json());
    application.use(idempotencyHeader({ backend, onConflict: 'wait', waitTimeout: 10 }));
    application.post('/orders', async (_req, res) => {
      runs++;
      await sleep(HANDLER_MS);
      res.status(201).json({ order: runs });
    });
    const server = await listen(createServer(application));
    servers.push(server);
    return { server, backend, lookups: () => lookups };
  }

  async function ioredis(): Promise<Redis> {
    // As the backend's documentation advises: a client that fails fast, so the subscriber duplicate must wait
    // for its connection before it subscribes.
    const redis = new Redis(REDIS_URL, { enableOfflineQueue: false, maxRetriesPerRequest: 0 });
    redis.on('error', () => {});
    closers.push(() => redis.quit());
    await new Promise((resolve) => redis.once('ready', resolve));
    return redis;
  }

  async function nodeRedis() {
    const client = createClient({ url: REDIS_URL, disableOfflineQueue: true });
    client.on('error', () => {});
    await client.connect();
    closers.push(() => client.close());
    return client;
  }

  let holder: App;
  let ioredisWaiters: App;
  let nodeRedisWaiters: App;
  let polling: App;

  beforeAll(async () => {
    // The connection may be ready before this hook runs: waiting for 'ready' then would wait forever.
    if (admin.status !== 'ready') await new Promise((resolve) => admin.once('ready', resolve));
    holder = await app(await ioredis(), true);
    ioredisWaiters = await app(await ioredis(), true);
    nodeRedisWaiters = await app(await nodeRedis(), true);
    polling = await app(await ioredis(), false);
  });

  afterAll(async () => {
    await Promise.all(servers.map((server) => server.close()));
    for (const close of closers) await close().catch(() => {});
    await deleteKeysWithPrefix(admin, prefix);
    await admin.quit();
  });

  /**
   * Sends one request to the holder, then `count` duplicates to `waiters` while it runs, and checks that the
   * handler ran once and every duplicate got its response. Resolves to the waiters' lookups per duplicate and how
   * long after the original's response the last replay arrived.
   */
  async function waitFor(waiters: App, count: number) {
    runs = 0;
    const key = randomUUID();
    const first = send(`${holder.server.url}/orders`, { key, body: {} });
    await sleep(100);
    const before = waiters.lookups();
    let lastReplayAt = 0;
    const duplicates = Array.from({ length: count }, async () => {
      const result = await send(`${waiters.server.url}/orders`, { key, body: {} });
      lastReplayAt = Math.max(lastReplayAt, performance.now());
      return result;
    });
    const original = await first;
    const originalAt = performance.now();
    const results = await Promise.all(duplicates);
    expect(runs).toBe(1);
    for (const result of results) {
      expect(result.status).toBe(201);
      expect(result.headers.get('idempotent-replayed')).toBe('true');
      expect(result.text).toBe(original.text);
    }
    const measured = { perWaiter: (waiters.lookups() - before) / count, lagMs: lastReplayAt - originalAt };
    if (process.env.SHOW_WAIT === '1') console.log(JSON.stringify(measured));
    return measured;
  }

  it('wakes 50 waiters in another process by PUBLISH (ioredis), each with the stored response', async () => {
    const { perWaiter, lagMs } = await waitFor(ioredisWaiters, 50);
    // Woken by the notification, not by polling: at most four lookups per waiter over the 1.4 s wait (the
    // first, one once the watch is in place, one when woken; a fourth for those that began before the
    // subscription was, which on a loaded machine is about half of them), where polling every 200 ms makes seven
    // or more (nine, measured, in the polling test below).
    expect(perWaiter).toBeLessThanOrEqual(4);
    expect(lagMs).toBeLessThan(1_000);
  });

  it('wakes 50 waiters by PUBLISH with a node-redis client', async () => {
    const { perWaiter, lagMs } = await waitFor(nodeRedisWaiters, 50);
    expect(perWaiter).toBeLessThanOrEqual(4);
    expect(lagMs).toBeLessThan(1_000);
  });

  it('lets waiters poll without notifications, and still answers them with the stored response', async () => {
    const { perWaiter } = await waitFor(polling, 10);
    expect(perWaiter).toBeGreaterThanOrEqual(5);
  });

  it('wakes a waiter when the lock is released (the handler threw), so that it runs itself', async () => {
    const storageKey = `-${randomUUID()}`;
    const taken = await holder.backend.acquire(storageKey, '', 30_000);
    if (taken.state !== 'acquired') throw new Error('not acquired');
    const stop = new AbortController();
    // A fresh backend, subscribing on its first watch, with the client the 50-waiter test used.
    const fresh = new RedisBackend({ redis: await ioredis(), prefix, notifications: true });
    closers.push(() => fresh.close());
    const watch = await armedWatch(fresh, storageKey, stop.signal);
    // A watch is only ever resolved by a message (or its signal, not aborted here): no poll is involved.
    await expectWokenBy(watch, () => holder.backend.release(storageKey, taken.token));
    stop.abort();
  });

  it('wakes a waiter when an operator forces the lock away with forget', async () => {
    const storageKey = `-${randomUUID()}`;
    const taken = await holder.backend.acquire(storageKey, '', 30_000);
    expect(taken.state).toBe('acquired');
    const stop = new AbortController();
    const watch = await armedWatch(nodeRedisWaiters.backend, storageKey, stop.signal);
    await expectWokenBy(watch, () => holder.backend.forget(storageKey, true));
    stop.abort();
  });

  it('does not wake a waiter for another key, and ends a watch when its signal aborts', async () => {
    const storageKey = `-${randomUUID()}`;
    const other = `-${randomUUID()}`;
    const taken = await holder.backend.acquire(other, '', 30_000);
    if (taken.state !== 'acquired') throw new Error('not acquired');
    const stop = new AbortController();
    let woken = false;
    const watch = (await armedWatch(ioredisWaiters.backend, storageKey, stop.signal)).woken.then(() => {
      woken = true;
    });
    expect(await holder.backend.release(other, taken.token)).toBe(true);
    await sleep(100);
    expect(woken).toBe(false);
    stop.abort();
    await watch;
    expect(woken).toBe(true);
  });

  it('keeps a first run at two commands (SET NX GET, EVALSHA) with notifications on', async () => {
    const calls: string[] = [];
    const redis = new Redis(REDIS_URL);
    closers.push(() => redis.quit());
    const counting: IoredisClientLike & { duplicate(): unknown } = {
      callBuffer(command, ...args) {
        calls.push(command);
        return redis.callBuffer(command, ...args);
      },
      duplicate: () => redis.duplicate(),
    };
    const backend = new RedisBackend({ redis: counting, prefix, notifications: true });
    // The first run may load the script (NOSCRIPT, then EVAL) and check the eviction policy: count the second.
    for (let run = 0; run < 2; run++) {
      const key = `-${randomUUID()}`;
      const before = calls.length;
      const taken = await backend.acquire(key, '', 30_000);
      if (taken.state !== 'acquired') throw new Error('not acquired');
      const record = {
        fingerprint: '',
        createdAt: Date.now(),
        response: { status: 201, headers: [], body: Buffer.from('{}') },
      };
      expect(await backend.complete(key, taken.token, record, 60_000)).toBe(true);
      if (run === 1) {
        expect(calls.slice(before).filter((command) => command !== 'CONFIG')).toEqual(['SET', 'EVALSHA']);
      }
    }
  });

  it('subscribes again after its connection drops, and a drop during that SUBSCRIBE leaves no unhandled rejection', async () => {
    // The connection the backend subscribes on, kept hold of to drop it.
    const redis = await ioredis();
    let subscriber: Redis | undefined;
    const duplicate = redis.duplicate.bind(redis);
    redis.duplicate = (...args: Parameters<Redis['duplicate']>) => {
      subscriber = duplicate(...args);
      return subscriber;
    };
    const backend = new RedisBackend({ redis, prefix, notifications: true });
    closers.push(() => backend.close());
    const unhandled: unknown[] = [];
    const heard = (reason: unknown) => unhandled.push(reason);
    process.on('unhandledRejection', heard);
    try {
      const stop = new AbortController();
      await armedWatch(backend, `-${randomUUID()}`, stop.signal);
      if (subscriber === undefined) throw new Error('the backend did not duplicate the client');
      const connection = subscriber;
      // Back from a drop, the SUBSCRIBE is on its way when 'ready' is heard: the connection is lost again before
      // Redis answers, and the client (maxRetriesPerRequest: 0) fails the commands it was waiting on.
      let reconnects = 0;
      connection.on('ready', () => {
        if (++reconnects === 1) connection.stream.destroy();
      });
      connection.disconnect(true);
      for (let waited = 0; reconnects < 2; waited += 20) {
        if (waited > 10_000)
          throw new Error(`the subscriber was back ${reconnects} times in 10 s, not twice`);
        await sleep(20);
      }
      await sleep(200);
      expect(unhandled).toEqual([]);
      // Subscribed again all the same: a release wakes a watch at once.
      const key = `-${randomUUID()}`;
      const taken = await holder.backend.acquire(key, '', 30_000);
      if (taken.state !== 'acquired') throw new Error('not acquired');
      const watch = await armedWatch(backend, key, stop.signal);
      await expectWokenBy(watch, () => holder.backend.release(key, taken.token));
      stop.abort();
    } finally {
      process.off('unhandledRejection', heard);
    }
  });

  it('refuses notifications with a client that cannot be duplicated (a node-redis pool)', () => {
    const pool = { sendCommand: async () => null };
    expect(() => new RedisBackend({ redis: pool, notifications: true })).toThrow(IdempotencyError);
    expect(() => new RedisBackend({ redis: pool, notifications: 'yes' as never })).toThrow(/notifications/);
  });
});

describe.runIf(redisUp)('RedisBackend with notifications', () => {
  // The contract again with the publishing complete and release scripts: they must behave exactly as the plain.
  describeBackendContract(
    'RedisBackend with notifications (ioredis)',
    async () => {
      const redis = new Redis(REDIS_URL);
      const nodeRedis = await createClient({ url: REDIS_URL })
        .on('error', () => {})
        .connect();
      const prefix = uniquePrefix('notify');
      const backend = new RedisBackend({ redis, prefix, notifications: true });
      const peer = new RedisBackend({ redis: nodeRedis, prefix, notifications: true });
      return {
        backend,
        peers: [peer],
        async teardown() {
          await Promise.all([backend.close(), peer.close()]);
          await deleteKeysWithPrefix(redis, prefix);
          await Promise.all([redis.quit(), nodeRedis.close()]);
        },
      };
    },
    { describe, it, beforeAll, afterAll },
  );
});

const privateServers = redisUp && requireRedisServer('RedisBackend notifications across a Redis restart');

describe.runIf(privateServers)('RedisBackend notifications across a Redis restart', () => {
  let server: RedisServer;
  const closers: (() => Promise<unknown>)[] = [];

  beforeAll(async () => {
    server = await startRedisServer();
  });

  afterAll(async () => {
    for (const close of closers) await close().catch(() => {});
    await server?.close();
  });

  it.each(['ioredis', 'node-redis'] as const)(
    'wakes waiters once the subscriber is back (%s), and hears messages again after',
    async (driver) => {
      const prefix = uniquePrefix(`restart-${driver}`);
      let redis: RedisClientLike;
      if (driver === 'ioredis') {
        const client = new Redis(server.url);
        client.on('error', () => {});
        closers.push(async () => client.disconnect());
        redis = client;
      } else {
        const client = createClient({
          url: server.url,
          socket: { reconnectStrategy: () => 100 },
        });
        client.on('error', () => {});
        await client.connect();
        closers.push(async () => client.destroy());
        redis = client;
      }
      const backend = new RedisBackend({ redis, prefix, notifications: true });
      closers.push(() => backend.close());
      const stop = new AbortController();
      const before = await armedWatch(backend, '-before', stop.signal);

      // A message published while the subscriber is away is lost: the waiter is woken once it is back instead.
      await server.stop();
      await sleep(200);
      expect(before.resolved()).toBe(false);
      await server.start();
      await before.woken;

      // Subscribed again: a release wakes a new watch at once.
      const taken = await backend.acquire('-after', '', 30_000);
      if (taken.state !== 'acquired') throw new Error('not acquired');
      const after = await armedWatch(backend, '-after', stop.signal);
      await expectWokenBy(after, () => backend.release('-after', taken.token));
      stop.abort();
    },
  );
});

describe.runIf(privateServers)('RedisBackend notifications on a private one-node cluster', () => {
  let server: RedisServer;
  const closers: (() => Promise<unknown>)[] = [];

  beforeAll(async () => {
    server = await startRedisServer({ cluster: true });
  });

  afterAll(async () => {
    for (const close of closers) await close().catch(() => {});
    await server?.close();
  });

  it.each(['ioredis Cluster', 'node-redis cluster'] as const)(
    'wakes a watch by the release of another instance (%s)',
    async (driver) => {
      let redis: RedisClientLike;
      if (driver === 'ioredis Cluster') {
        const cluster = new Cluster([{ host: '127.0.0.1', port: server.port }]);
        cluster.on('error', () => {});
        await cluster.ping();
        closers.push(async () => cluster.disconnect());
        redis = cluster;
      } else {
        const cluster = createCluster({ rootNodes: [{ url: server.url }] });
        cluster.on('error', () => {});
        await cluster.connect();
        closers.push(() => cluster.close());
        redis = cluster;
      }
      const prefix = uniquePrefix('notify-cluster');
      const holder = new RedisBackend({ redis, prefix, notifications: true });
      const waiter = new RedisBackend({ redis, prefix, notifications: true });
      closers.push(
        () => holder.close(),
        () => waiter.close(),
      );
      const key = `-${randomUUID()}`;
      const taken = await holder.acquire(key, '', 30_000);
      if (taken.state !== 'acquired') throw new Error('not acquired');
      const stop = new AbortController();
      const watch = await armedWatch(waiter, key, stop.signal);
      await expectWokenBy(watch, () => holder.release(key, taken.token));
      stop.abort();
    },
  );
});
