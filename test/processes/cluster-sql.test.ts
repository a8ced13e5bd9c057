/**
 * Exactly once across processes (SPEC §3) on the SQL backends: for PostgreSQL, MariaDB/MySQL and SQLite in turn,
 * four copies of the Express example, each its own Node.js process with its own connections, share one table.
 * 400 concurrent requests over 50 keys, every key sent to every process, each client retrying its 409s: every
 * key's handler runs once, in one process, and every client ends with that run's response, byte for byte.
 *
 * The order sequence the handler counts with lives in the same database (`<table>_orders`), so its final value
 * is the number of executions across all processes. Each run creates its own tables (or SQLite file) and drops
 * only those.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireMysql, requirePostgres, requireSqlite, uniqueTable } from '../support/sql.js';
import { postWithRetries, type RetriedAnswer } from './client.js';
import { type ExampleProcess, startExample } from './example-process.js';
import { mysqlDatabase, postgresDatabase, type SharedDatabase, sqliteDatabase } from './shared-databases.js';

const postgresUp = await requirePostgres('Exactly-once across processes on PostgreSQL');
const mysqlUp = await requireMysql('Exactly-once across processes on MariaDB/MySQL');
const sqliteLoads = await requireSqlite('Exactly-once across processes on SQLite');

const PROCESSES = 4;
const KEYS = 50;
const REQUESTS_PER_KEY = 8;
const WARMUP_REQUESTS = 4;
const RETRY = { maxWaitMs: 200, maxAttempts: 100 };

interface Sent {
  key: string;
  item: string;
  server: ExampleProcess;
  answer: RetriedAnswer;
}

interface Order {
  number: number;
  item: string | null;
  pid: number;
}

function describeCluster(name: string, enabled: boolean, database: () => SharedDatabase): void {
  describe.runIf(enabled)(`the Express example, 4 processes sharing ${name}`, () => {
    const processes: ExampleProcess[] = [];
    const table = uniqueTable('cluster');
    let db: SharedDatabase;

    beforeAll(async () => {
      db = database();
      const started = await Promise.allSettled(
        Array.from({ length: PROCESSES }, () =>
          startExample(db.env(table)).then((child) => {
            processes.push(child);
            return child;
          }),
        ),
      );
      const failure = started.find((result) => result.status === 'rejected');
      if (failure !== undefined) throw (failure as PromiseRejectedResult).reason;
      // Warm every process up at once (connections, and the backend's table created on first use by all four
      // together) without running the handler: no route answers PATCH, so the 404 is not stored.
      await Promise.all(
        processes.flatMap((child) =>
          Array.from({ length: WARMUP_REQUESTS }, async (_, i) => {
            const warmup = await fetch(child.url, {
              method: 'PATCH',
              headers: { 'idempotency-key': `warmup-${child.pid}-${i}` },
            });
            await warmup.arrayBuffer();
            expect(warmup.status, child.output()).toBe(404);
          }),
        ),
      );
    }, 60_000);

    afterAll(async () => {
      await Promise.all(processes.map((child) => child.stop()));
      await db?.cleanup(table);
    });

    it('runs each key once and gives every client that run’s response', async () => {
      expect(processes.map((child) => child.backend)).toEqual(Array(PROCESSES).fill(db.backend));

      // Request j of key k goes to process (k + j) % 4: every key reaches every process twice, each process is
      // the first to receive a quarter of the keys, and all 400 requests are in flight at once.
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
        expect(new Set(requests.map((request) => request.server)).size).toBe(PROCESSES);
        for (const { answer } of requests) {
          expect(answer.status, `${key}: ${answer.text}`).toBe(201);
          for (const conflict of answer.conflicts) {
            expect(JSON.parse(conflict.text)).toEqual({
              detail: `Request already pending for idempotency key '${key}'`,
            });
            expect(Number(conflict.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
          }
        }
        const [first] = requests;
        for (const { answer } of requests) {
          expect(answer.text, key).toBe(first!.answer.text);
          expect(answer.headers.get('location'), key).toBe(first!.answer.headers.get('location'));
        }
        // Exactly one client got the run itself; the seven others got replays.
        const replayed = requests.map(({ answer }) => answer.headers.get('idempotent-replayed'));
        expect(replayed.filter((value) => value === null)).toHaveLength(1);
        expect(replayed.filter((value) => value === 'true')).toHaveLength(REQUESTS_PER_KEY - 1);
        const order = JSON.parse(first!.answer.text) as Order;
        expect(order.item).toBe(requests[0]!.item);
        orders.push(order);
      }

      // 50 executions in all: 50 distinct order numbers, and the shared sequence counted exactly 50.
      expect(orders.map((order) => order.number).sort((a, b) => a - b)).toEqual(
        Array.from({ length: KEYS }, (_, i) => i + 1),
      );
      expect(await db.sequence(table)).toBe(KEYS);

      // The non-replayed answer of a key came from the process that ran it.
      const pids = processes.map((child) => child.pid);
      for (const order of orders) expect(pids).toContain(order.pid);
      for (const { server, answer } of sent) {
        if (answer.headers.get('idempotent-replayed') === null) {
          expect((JSON.parse(answer.text) as Order).pid).toBe(server.pid);
        }
      }

      const conflicts = sent.reduce((sum, { answer }) => sum + answer.conflicts.length, 0);
      const runsPerProcess = processes.map(
        (child) => orders.filter((order) => order.pid === child.pid).length,
      );
      console.info(
        `${name} cluster: ${sent.length} requests in ${elapsedMs.toFixed(0)} ms, ${conflicts} conflicts (409) ` +
          `retried, runs per process ${runsPerProcess.join('/')}`,
      );
    }, 120_000);
  });
}

describeCluster('PostgreSQL', postgresUp, postgresDatabase);
describeCluster('MariaDB/MySQL', mysqlUp, mysqlDatabase);
describeCluster('SQLite', sqliteLoads, () => sqliteDatabase('cluster-sqlite'));
