/**
 * Exactly once through the proxy (SPEC §3, as `test/processes/cluster.test.ts` proves it for the Express example):
 * four proxy processes share one Redis in front of one Python service that knows nothing of keys. 400 concurrent
 * calls over 50 keys, each key sent to every proxy, each call made with `idempotentFetch` (its key, retries on
 * 409 after Retry-After): the service runs each key once, and every call ends with that run's response. The same,
 * smaller, on the SQL backends.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotentFetch } from '../../src/client.js';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../support/redis.js';
import {
  dropMysqlTable,
  dropPostgresTable,
  MYSQL_URL,
  mysqlPool,
  POSTGRES_URL,
  postgresPool,
  requireMysql,
  requirePostgres,
  requireSqlite,
  sqliteDirectory,
  uniqueTable,
} from '../support/sql.js';
import {
  firstRunAndRepeat,
  type ProxyProcess,
  startProxy,
  startUpstream,
  type Upstream,
} from './processes.js';

interface Call {
  key: string;
  proxy: ProxyProcess;
  status: number;
  replayed: string | null;
  location: string | null;
  text: string;
  attempts: number;
  /** The longest wait before a retry, in ms. */
  waited: number;
}

interface Order {
  key: string;
  run: number;
  total: number;
  body: string;
}

/**
 * Sends `perKey` calls for each of `keys` keys at once, call j of key k to proxy (k + j) % n, and checks that
 * the upstream ran each key once and that every call got that run's response.
 */
async function exactlyOnce(
  proxies: ProxyProcess[],
  upstream: Upstream,
  label: string,
  keys: number,
  perKey: number,
) {
  const started = performance.now();
  const calls = await Promise.all(
    Array.from({ length: keys * perKey }, async (_, i): Promise<Call> => {
      const k = Math.floor(i / perKey);
      const key = `${label}-${k}`;
      const proxy = proxies[(k + (i % perKey)) % proxies.length]!;
      let attempts = 0;
      let waited = 0;
      const response = await idempotentFetch(
        `${proxy.url}/orders?delay=50`,
        {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ item: key }),
        },
        {
          key,
          maxAttempts: 30,
          maxDelayMs: 500,
          onRetry: (retry) => {
            attempts++;
            waited = Math.max(waited, retry.delayMs);
          },
        },
      );
      return {
        key,
        proxy,
        status: response.status,
        replayed: response.headers.get('idempotent-replayed'),
        location: response.headers.get('location'),
        text: await response.text(),
        attempts: attempts + 1,
        waited,
      };
    }),
  );
  const elapsedMs = performance.now() - started;

  const counts = await upstream.counts();
  const byKey = new Map<string, Call[]>();
  for (const call of calls) byKey.set(call.key, [...(byKey.get(call.key) ?? []), call]);
  expect(byKey.size).toBe(keys);
  const totals = new Set<number>();
  for (const [key, group] of byKey) {
    expect(counts[key], key).toBe(1);
    expect(new Set(group.map((call) => call.proxy)).size).toBe(Math.min(perKey, proxies.length));
    const [first] = group;
    for (const call of group) {
      expect(call.status, `${key}: ${call.text}`).toBe(201);
      expect(call.text, key).toBe(first!.text);
      expect(call.location, key).toBe(first!.location);
    }
    expect(
      group.filter((call) => call.replayed === null),
      key,
    ).toHaveLength(1);
    expect(
      group.filter((call) => call.replayed === 'true'),
      key,
    ).toHaveLength(perKey - 1);
    const order = JSON.parse(first!.text) as Order;
    expect(order).toMatchObject({ key, run: 1, body: JSON.stringify({ item: key }) });
    expect(first!.location).toBe(`/orders/${order.total}`);
    totals.add(order.total);
  }
  expect(totals.size).toBe(keys);
  // Every proxy served its share, and logged each of its requests.
  for (const proxy of proxies) {
    const lines = proxy.lines().filter((line) => line.msg === 'request' && String(line.path) === '/orders');
    expect(lines.length).toBeGreaterThanOrEqual(calls.filter((call) => call.proxy === proxy).length);
  }
  const retried = calls.reduce((sum, call) => sum + call.attempts - 1, 0);
  console.info(
    `proxy cluster (${label}): ${calls.length} calls through ${proxies.length} proxies in ${elapsedMs.toFixed(0)} ms, ` +
      `${retried} retries, at most ${Math.max(...calls.map((call) => call.attempts))} attempts per call, ` +
      `longest wait ${Math.max(...calls.map((call) => call.waited))} ms`,
  );
}

async function stopAll(proxies: ProxyProcess[]) {
  const results = await Promise.all(proxies.splice(0).map((proxy) => proxy.stop()));
  for (const result of results) expect(result).toEqual({ code: 0, signal: null });
}

const redisUp = await requireRedis('Exactly once through the proxy on Redis');

describe.runIf(redisUp)('four proxies sharing Redis in front of a Python service', () => {
  const prefix = uniquePrefix('proxy-cluster');
  const proxies: ProxyProcess[] = [];
  let upstream: Upstream;
  let redis: Redis;

  beforeAll(async () => {
    redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 });
    redis.on('error', () => {});
    await redis.connect();
    upstream = await startUpstream();
    proxies.push(
      ...(await Promise.all(
        Array.from({ length: 4 }, () =>
          startProxy(['--upstream', upstream.url, '--backend', REDIS_URL], { IDEMPOTENCY_PREFIX: prefix }),
        ),
      )),
    );
  }, 60_000);

  afterAll(async () => {
    await stopAll(proxies);
    await upstream?.stop();
    if (redis !== undefined) {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    }
  });

  it('runs each key once and gives every call that run’s response', async () => {
    for (const proxy of proxies) expect(proxy.started).toMatchObject({ backend: 'RedisBackend' });
    await exactlyOnce(proxies, upstream, 'redis', 50, 8);
    // The keys live under the proxies' prefix, and nowhere else.
    expect((await redis.keys(`${prefix}*`)).length).toBeGreaterThanOrEqual(50);
  });
});

const postgresUp = await requirePostgres('Exactly once through the proxy on PostgreSQL');
const mysqlUp = await requireMysql('Exactly once through the proxy on MySQL');
const sqliteUp = await requireSqlite('Exactly once through the proxy on SQLite');

describe('two proxies sharing a SQL backend', () => {
  let upstream: Upstream;

  beforeAll(async () => {
    upstream = await startUpstream();
  });

  afterAll(async () => {
    await upstream?.stop();
  });

  async function twoProxies(backend: string, table: string, label: string) {
    const proxies = await Promise.all(
      [0, 1].map(() => startProxy(['--upstream', upstream.url, '--backend', backend, '--table', table])),
    );
    try {
      await exactlyOnce(proxies, upstream, label, 10, 4);
    } finally {
      await stopAll(proxies);
    }
  }

  it.runIf(postgresUp)('PostgreSQL: runs each key once', async () => {
    const table = uniqueTable('proxy');
    try {
      await twoProxies(POSTGRES_URL, table, `pg-${table}`);
    } finally {
      const pool = postgresPool();
      await dropPostgresTable(pool, table);
      await pool.end();
    }
  });

  it.runIf(postgresUp)(
    'PostgreSQL with --on-conflict wait: a repeat on another proxy waits for the run',
    async () => {
      const table = uniqueTable('proxy_wait');
      const [a, b] = await Promise.all(
        [0, 1].map(() =>
          startProxy([
            '--upstream',
            upstream.url,
            '--backend',
            POSTGRES_URL,
            '--table',
            table,
            '--on-conflict',
            'wait',
          ]),
        ),
      );
      try {
        const key = `wait-${table}`;
        const { done, repeat } = await firstRunAndRepeat(a!, b!, key);
        expect(done.status).toBe(201);
        expect(repeat).toMatchObject({ status: 201, replayed: 'true', text: done.text });
        // Woken by the notification as the first run was stored, not by a poll seconds later.
        expect(repeat.at - done.at).toBeLessThan(500);
        expect((await upstream.counts())[key]).toBe(1);
        // The log line is written as the response ends, and read from the child's stdout a little later.
        await expect
          .poll(() => b!.lines().find((line) => line.msg === 'request'))
          .toMatchObject({ outcome: 'replayed' });
      } finally {
        await stopAll([a!, b!]);
        const pool = postgresPool();
        await dropPostgresTable(pool, table);
        await pool.end();
      }
    },
  );

  it.runIf(mysqlUp)('MariaDB/MySQL: runs each key once', async () => {
    const table = uniqueTable('proxy');
    try {
      await twoProxies(MYSQL_URL, table, `my-${table}`);
    } finally {
      const pool = mysqlPool();
      await dropMysqlTable(pool, table);
      await pool.end();
    }
  });

  it.runIf(sqliteUp)('SQLite: runs each key once', async () => {
    const directory = sqliteDirectory('proxy');
    try {
      await twoProxies(`sqlite:${directory.path('keys.db')}`, 'idempotency_keys', `sqlite-${Date.now()}`);
    } finally {
      directory.remove();
    }
  });
});
