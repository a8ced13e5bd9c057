/**
 * `onConflict: 'wait'` on PostgresBackend with `notifications`: duplicates that arrive while the first request runs
 * wait for it and are woken by `NOTIFY` from the process that ran it (two apps, two pools, one table here), and
 * get the stored response moments after it is stored. Without notifications the waiters poll and still get it.
 */
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { PostgresBackend } from '../../src/backends/postgres.js';
import { listen, send, type TestServer } from '../support/http.js';
import { dropPostgresTable, postgresPool, requirePostgres, uniqueTable } from '../support/sql.js';

const postgresUp = await requirePostgres('PostgresBackend wait mode');

describe.runIf(postgresUp)("PostgresBackend with onConflict: 'wait'", () => {
  const table = uniqueTable('wait_keys');
  const pools: pg.Pool[] = [];
  const backends: PostgresBackend[] = [];
  const servers: TestServer[] = [];
  let runs = 0;
  /** Statements the app of each pool sent, by pool. */
  const statements = new Map<pg.Pool, number>();

  async function app(notifications: boolean): Promise<TestServer> {
    const pool = postgresPool({ max: 10 });
    pools.push(pool);
    statements.set(pool, 0);
    const query = pool.query.bind(pool) as (...args: unknown[]) => Promise<unknown>;
    (pool as unknown as { query: typeof query }).query = (...args: unknown[]) => {
      statements.set(pool, statements.get(pool)! + 1);
      return query(...args);
    };
    const backend = new PostgresBackend({ pool, table, notifications });
    backends.push(backend);
    const application = express();
    application.use(express.json());
    application.use(idempotencyHeader({ backend, onConflict: 'wait', waitTimeout: 10 }));
    application.post('/orders', async (_req, res) => {
      runs++;
      await sleep(1500);
      res.status(201).json({ order: runs });
    });
    const server = await listen(createServer(application));
    servers.push(server);
    return server;
  }

  let holder: TestServer;
  let waiters: TestServer;
  let polling: TestServer;

  beforeAll(async () => {
    holder = await app(true);
    waiters = await app(true);
    polling = await app(false);
  });

  afterAll(async () => {
    await Promise.all(servers.map((server) => server.close()));
    await Promise.all(backends.map((backend) => backend.close()));
    if (pools[0] !== undefined) await dropPostgresTable(pools[0], table);
    await Promise.all(pools.map((pool) => pool.end()));
  });

  it('wakes 50 waiters in another process by NOTIFY, each with the stored response', async () => {
    runs = 0;
    const key = randomUUID();
    const first = send(`${holder.url}/orders`, { key, body: {} });
    await sleep(100);
    const before = statements.get(pools[1]!)!;
    const duplicates = Array.from({ length: 50 }, () => send(`${waiters.url}/orders`, { key, body: {} }));
    const original = await first;
    const results = await Promise.all(duplicates);
    expect(runs).toBe(1);
    for (const result of results) {
      expect(result.status).toBe(201);
      expect(result.headers.get('idempotent-replayed')).toBe('true');
      expect(result.text).toBe(original.text);
    }
    // Woken by the notification, not by polling: about three lookups per waiter over the 1.4 s wait (the first,
    // one once the watch is in place, one when woken; a fourth for those that began before LISTEN was), where
    // polling every 200 ms would have made seven or more.
    const perWaiter = (statements.get(pools[1]!)! - before) / 50;
    expect(perWaiter).toBeLessThanOrEqual(4.2);
  });

  it('lets waiters poll without notifications, and still answers them with the stored response', async () => {
    runs = 0;
    const key = randomUUID();
    const first = send(`${holder.url}/orders`, { key, body: {} });
    await sleep(100);
    const before = statements.get(pools[2]!)!;
    const duplicates = Array.from({ length: 10 }, () => send(`${polling.url}/orders`, { key, body: {} }));
    const original = await first;
    for (const result of await Promise.all(duplicates)) {
      expect(result.headers.get('idempotent-replayed')).toBe('true');
      expect(result.text).toBe(original.text);
    }
    expect(runs).toBe(1);
    expect((statements.get(pools[2]!)! - before) / 10).toBeGreaterThanOrEqual(5);
  });
});
