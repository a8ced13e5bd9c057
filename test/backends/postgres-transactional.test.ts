/**
 * PostgresBackend's transactional mode on real PostgreSQL: the handler's own writes (a `payments` table) and the
 * stored response commit in one transaction. Whatever happens, the payments table ends with exactly one row per
 * key: a first run and its replays, a handler that throws after writing, a response that is not stored, 30
 * concurrent duplicates, and a process killed with SIGKILL in the middle of a handler.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import express from 'express';
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader, idempotencyOf } from '../../src/adapters/express.js';
import { PostgresBackend } from '../../src/backends/postgres.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import { listen, send, type TestServer } from '../support/http.js';
import {
  dropPostgresTable,
  POSTGRES_URL,
  postgresPool,
  requirePostgres,
  uniqueTable,
} from '../support/sql.js';

const postgresUp = await requirePostgres('PostgresBackend transactional mode');
const ROOT = fileURLToPath(new URL('../..', import.meta.url));

describe.runIf(postgresUp)('PostgresBackend, transactional mode', () => {
  const table = uniqueTable('tx_keys');
  const paymentsTable = uniqueTable('tx_payments');
  const payments = `"${paymentsTable}"`;
  let pool: pg.Pool;
  let server: TestServer;
  const events: IdempotencyEvent[] = [];

  beforeAll(async () => {
    pool = postgresPool({ max: 40 });
    await pool.query(
      `CREATE TABLE ${payments} (id serial PRIMARY KEY, idempotency_key text NOT NULL, pid integer NOT NULL)`,
    );
    const backend = new PostgresBackend({ pool, table, transactional: true });
    const app = express();
    app.use(express.json());
    app.use(idempotencyHeader({ backend, onEvent: (event) => events.push(event) }));
    app.post('/payments', async (req, res, next) => {
      try {
        const idempotency = idempotencyOf(req)!;
        const db = idempotency.db as pg.PoolClient;
        const { rows } = await db.query(
          `INSERT INTO ${payments} (idempotency_key, pid) VALUES ($1, 0) RETURNING id`,
          [idempotency.key],
        );
        if (req.body?.slow === true) await sleep(200);
        if (req.body?.fail === true) throw new Error('failed after writing the payment');
        if (req.body?.text === true) {
          res.type('text/plain').send(`payment ${rows[0].id}`);
          return;
        }
        res.status(201).json({ payment: rows[0].id });
      } catch (error) {
        next(error);
      }
    });
    app.use((_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
      res.status(500).json({ detail: 'failed' });
    });
    server = await listen(createServer(app));
  });

  afterAll(async () => {
    await server?.close();
    await pool?.query(`DROP TABLE IF EXISTS ${payments}`);
    if (pool !== undefined) await dropPostgresTable(pool, table);
    await pool?.end();
  });

  async function rowsFor(key: string): Promise<number> {
    const { rows } = await pool.query(
      `SELECT count(*)::int AS n FROM ${payments} WHERE idempotency_key = $1`,
      [key],
    );
    return rows[0].n as number;
  }

  it("commits the handler's write with the stored response, and replays without writing again", async () => {
    const key = randomUUID();
    const first = await send(`${server.url}/payments`, { key, body: { amount: 10 } });
    expect(first.status).toBe(201);
    const replay = await send(`${server.url}/payments`, { key, body: { amount: 10 } });
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.text).toBe(first.text);
    expect(await rowsFor(key)).toBe(1);
  });

  it("rolls the handler's write back when it throws after writing, and frees the key", async () => {
    const key = randomUUID();
    expect((await send(`${server.url}/payments`, { key, body: { amount: 10, fail: true } })).status).toBe(
      500,
    );
    expect(await rowsFor(key)).toBe(0);
    const retry = await send(`${server.url}/payments`, { key, body: { amount: 10, fail: true } });
    expect(retry.status).toBe(500);
    expect(await rowsFor(key)).toBe(0);
  });

  it("rolls the handler's write back with a response that is not stored", async () => {
    const key = randomUUID();
    const first = await send(`${server.url}/payments`, { key, body: { text: true } });
    expect(first.status).toBe(200);
    expect(await rowsFor(key)).toBe(0);
    expect(events.at(-1)?.outcome).toBe('not-stored');
  });

  it('writes one row for 30 concurrent duplicates', async () => {
    const key = randomUUID();
    const results = await Promise.all(
      Array.from({ length: 30 }, () =>
        send(`${server.url}/payments`, { key, body: { amount: 5, slow: true } }),
      ),
    );
    const statuses = results.map((result) => result.status);
    expect(statuses.filter((status) => status === 201).length).toBeGreaterThanOrEqual(1);
    expect(statuses.every((status) => status === 201 || status === 409)).toBe(true);
    expect(await rowsFor(key)).toBe(1);
  });

  it('leaves neither a payment nor a record when the process is killed mid-handler; the retry runs once', async () => {
    const key = randomUUID();
    const keysTable = uniqueTable('tx_kill');
    const env = { DATABASE_URL: POSTGRES_URL, IDEMPOTENCY_TABLE: keysTable, PAYMENTS_TABLE: paymentsTable };
    const first = await startPaymentsServer(env);
    try {
      const pending = fetch(`${first.url}/payments`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key, 'x-wait': '1' },
        body: JSON.stringify({}),
      }).catch(() => 'cut');
      // The row is written inside the transaction, not committed: nobody else sees it.
      for (let i = 0; i < 100 && (await lockHeld(keysTable)) === false; i++) await sleep(20);
      await sleep(100);
      first.child.kill('SIGKILL');
      expect(await pending).toBe('cut');
      expect(await rowsFor(key)).toBe(0);
    } finally {
      first.child.kill('SIGKILL');
    }
    const second = await startPaymentsServer(env);
    try {
      const post = () =>
        fetch(`${second.url}/payments`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': key },
          body: JSON.stringify({}),
        });
      // The crashed holder's lock answers 409 until its lease (1 s) lapses; then the retry runs, once.
      let answer = await post();
      const statuses = [answer.status];
      for (let i = 0; i < 40 && answer.status === 409; i++) {
        await sleep(100);
        answer = await post();
        statuses.push(answer.status);
      }
      expect(answer.status, statuses.join(' ')).toBe(201);
      expect(await rowsFor(key)).toBe(1);
      expect((await post()).headers.get('idempotent-replayed')).toBe('true');
      expect(await rowsFor(key)).toBe(1);
    } finally {
      second.child.kill('SIGKILL');
      await dropPostgresTable(pool, keysTable);
    }
  }, 30_000);

  async function lockHeld(keysTable: string): Promise<boolean> {
    try {
      const { rows } = await pool.query(
        `SELECT count(*)::int AS n FROM "${keysTable}" WHERE token IS NOT NULL`,
      );
      return rows[0].n > 0;
    } catch {
      return false;
    }
  }
});

async function startPaymentsServer(
  env: Record<string, string>,
): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/processes/fixtures/payments-server.ts'], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`the payments server did not start:\n${output}`)),
      20_000,
    );
    child.stdout!.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      const match = /listening (\d+)/.exec(output);
      if (match !== null) {
        clearTimeout(timer);
        resolve(`http://127.0.0.1:${match[1]}`);
      }
    });
    child.stderr!.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.once('exit', () => reject(new Error(`the payments server exited:\n${output}`)));
  });
  return { child, url };
}
