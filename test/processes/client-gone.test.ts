/**
 * A client that gives up never causes a second execution, across processes (SPEC §3): two copies of the Express
 * example share a backend (Redis, PostgreSQL, MariaDB/MySQL or a SQLite file, in turn), and placing an order takes
 * 1.5 s. The client asks process A and gives up after 300 ms; its retry with the same key goes to process B,
 * which answers 409 with a short Retry-After while A's handler still runs, and the stored response once it
 * finished. One order is placed, by process A: the order sequence, kept in the same database, counts one.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireRedis, uniquePrefix } from '../support/redis.js';
import { requireMysql, requirePostgres, requireSqlite, uniqueTable } from '../support/sql.js';
import { type ExampleProcess, startExample } from './example-process.js';
import {
  mysqlDatabase,
  postgresDatabase,
  redisDatabase,
  type SharedDatabase,
  sqliteDatabase,
} from './shared-databases.js';

const ORDER_DELAY_MS = 1500;

const DATABASES: { name: string; up: boolean; table: () => string; open: () => SharedDatabase }[] = [
  {
    name: 'Redis',
    up: await requireRedis('A client that leaves, across processes, on Redis'),
    table: () => uniquePrefix('processes-client-gone'),
    open: redisDatabase,
  },
  {
    name: 'PostgreSQL',
    up: await requirePostgres('A client that leaves, across processes, on PostgreSQL'),
    table: () => uniqueTable('client_gone'),
    open: postgresDatabase,
  },
  {
    name: 'MariaDB/MySQL',
    up: await requireMysql('A client that leaves, across processes, on MariaDB/MySQL'),
    table: () => uniqueTable('client_gone'),
    open: mysqlDatabase,
  },
  {
    name: 'SQLite',
    up: await requireSqlite('A client that leaves, across processes, on SQLite'),
    table: () => uniqueTable('client_gone'),
    open: () => sqliteDatabase('client-gone'),
  },
];

for (const { name, up, table: newTable, open } of DATABASES) {
  describe.runIf(up)(`a client that gives up on process A and retries on process B (${name})`, () => {
    const table = newTable();
    let db: SharedDatabase | undefined;
    let a: ExampleProcess | undefined;
    let b: ExampleProcess | undefined;

    beforeAll(async () => {
      db = open();
      const env = { ...db.env(table), ORDER_DELAY_MS: String(ORDER_DELAY_MS) };
      [a, b] = await Promise.all([startExample(env), startExample(env)]);
    }, 60_000);

    afterAll(async () => {
      await Promise.all([a?.stop(), b?.stop()]);
      await db?.cleanup(table);
    });

    it('runs the order once, in process A, and answers the retries on B with 409 then the replay', async () => {
      expect([a!.backend, b!.backend]).toEqual([db!.backend, db!.backend]);
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
      expect(await db!.sequence(table)).toBe(1);
    });
  });
}
