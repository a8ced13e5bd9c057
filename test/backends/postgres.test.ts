/**
 * PostgresBackend against real PostgreSQL (DATABASE_URL): the backend contract, then what only this backend
 * promises: the table on first use and its DDL, one round trip per step, the database's clock, a bounded table,
 * the key stored as its SHA-256, and errors passed through unchanged. Every run works in tables of its own and
 * drops only those.
 */
import { createHash, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  DEFAULT_POSTGRES_TABLE,
  type PgPoolLike,
  POSTGRES_SCHEMA,
  PostgresBackend,
  postgresSchema,
} from '../../src/backends/postgres.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { AcquireResult, IdempotencyRecord } from '../../src/core/types.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import { dropPostgresTable, postgresPool, requirePostgres, uniqueTable } from '../support/sql.js';

const postgresUp = await requirePostgres('PostgresBackend tests');

const FINGERPRINT = 'f'.repeat(64);
const LEASE_MS = 30_000;

function makeRecord(body: Uint8Array = Buffer.from('{"ok":true}')): IdempotencyRecord {
  return {
    fingerprint: FINGERPRINT,
    createdAt: Date.now(),
    response: { status: 201, headers: [['content-type', 'application/json']], body },
  };
}

function tokenOf(result: AcquireResult): string {
  if (result.state !== 'acquired') throw new Error(`expected acquired, got ${result.state}`);
  return result.token;
}

/** A pool that records every statement it sends: one `query` call is one round trip. */
function countingPool(pool: pg.Pool): { pool: PgPoolLike; calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    pool: {
      query(text, values) {
        calls.push(text);
        return pool.query(text, values);
      },
    },
  };
}

async function rowCount(pool: pg.Pool, table: string): Promise<number> {
  const { rows } = await pool.query<{ count: string }>(`SELECT count(*) FROM "${table}"`);
  return Number(rows[0]!.count);
}

async function tableExists(pool: pg.Pool, table: string): Promise<boolean> {
  const { rows } = await pool.query<{ oid: string | null }>('SELECT to_regclass($1) AS oid', [`"${table}"`]);
  return rows[0]!.oid !== null;
}

describe.runIf(postgresUp)('PostgresBackend', () => {
  describeBackendContract(
    'PostgresBackend',
    async () => {
      const pool = postgresPool();
      // A second pool on the same table: the races spread over both, as over two processes.
      const peerPool = postgresPool();
      const table = uniqueTable('pg_contract');
      return {
        backend: new PostgresBackend({ pool, table }),
        peers: [new PostgresBackend({ pool: peerPool, table })],
        async teardown() {
          await dropPostgresTable(pool, table);
          await Promise.all([pool.end(), peerPool.end()]);
        },
      };
    },
    { describe, it, beforeAll, afterAll },
    { requires: ['inspect', 'forget'] },
  );

  describe('on the shared server', () => {
    let pool: pg.Pool;
    /** Tables this describe created; dropped after it. */
    const tables: string[] = [];

    function newTable(label: string): string {
      const table = uniqueTable(label);
      tables.push(table);
      return table;
    }

    beforeAll(() => {
      pool = postgresPool({ max: 4 });
    });

    afterEach(() => {
      vi.restoreAllMocks();
    });

    afterAll(async () => {
      for (const table of tables) await dropPostgresTable(pool, table);
      await pool.end();
    });

    describe('the table', () => {
      it('is created on first use with the exported DDL, and nothing is created before', async () => {
        const table = newTable('pg_create');
        const backend = new PostgresBackend({ pool, table });
        expect(await tableExists(pool, table)).toBe(false);
        tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        expect(await tableExists(pool, table)).toBe(true);
        const { rows } = await pool.query<{ column_name: string; data_type: string }>(
          `SELECT column_name, data_type FROM information_schema.columns
           WHERE table_name = $1 ORDER BY ordinal_position`,
          [table],
        );
        expect(rows.map((row) => `${row.column_name} ${row.data_type}`)).toEqual([
          'key_hash bytea',
          'fingerprint bytea',
          'token uuid',
          'expires_at timestamp with time zone',
          'status smallint',
          'headers text',
          'body bytea',
          'created_at bigint',
        ]);
        const indexes = await pool.query<{ indexname: string }>(
          'SELECT indexname FROM pg_indexes WHERE tablename = $1 ORDER BY indexname',
          [table],
        );
        expect(indexes.rows.map((row) => row.indexname)).toEqual([`${table}_expires_at`, `${table}_pkey`]);
        // Running the exported DDL on the existing table is harmless, as in a migration run twice.
        await pool.query(postgresSchema(table));
      });

      it('exports the DDL for the default table and for any valid name', () => {
        expect(DEFAULT_POSTGRES_TABLE).toBe('idempotency_keys');
        expect(POSTGRES_SCHEMA).toBe(postgresSchema());
        expect(POSTGRES_SCHEMA).toContain('CREATE TABLE IF NOT EXISTS "idempotency_keys"');
        expect(postgresSchema('billing.keys')).toContain('CREATE TABLE IF NOT EXISTS "billing"."keys"');
        expect(postgresSchema('billing.keys')).toContain('"keys_expires_at" ON "billing"."keys"');
        expect(() => postgresSchema('bad-name')).toThrow(IdempotencyError);
      });

      it('is created by many backends starting at once, each with its own pool, without an error', async () => {
        const table = newTable('pg_create_race');
        const pools = Array.from({ length: 6 }, () => postgresPool({ max: 1 }));
        try {
          const results = await Promise.all(
            pools.map((own) =>
              new PostgresBackend({ pool: own, table }).acquire(randomUUID(), FINGERPRINT, 1000),
            ),
          );
          expect(results.map((result) => result.state)).toEqual(Array(6).fill('acquired'));
        } finally {
          await Promise.all(pools.map((own) => own.end()));
        }
      });

      it('lives in the schema a qualified name names', async () => {
        const schema = uniqueTable('pg_schema');
        await pool.query(`CREATE SCHEMA "${schema}"`);
        try {
          const backend = new PostgresBackend({ pool, table: `${schema}.keys` });
          const key = randomUUID();
          const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
          expect((await backend.acquire(key, FINGERPRINT, LEASE_MS)).state).toBe('completed');
          const { rows } = await pool.query(`SELECT count(*)::int AS count FROM "${schema}"."keys"`);
          expect(rows[0].count).toBe(1);
        } finally {
          await pool.query(`DROP SCHEMA "${schema}" CASCADE`);
        }
      });

      it('is not created with createTable: false, and the driver error for the missing table comes through unchanged', async () => {
        const table = newTable('pg_no_create');
        const backend = new PostgresBackend({ pool, table, createTable: false });
        const error = await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS).catch((caught) => caught);
        expect(error).not.toBeInstanceOf(IdempotencyError);
        expect(error).toMatchObject({ code: '42P01' }); // undefined_table
        expect(await tableExists(pool, table)).toBe(false);
        // Created by a migration, it works.
        await pool.query(postgresSchema(table));
        tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
      });
    });

    describe('round trips', () => {
      it('costs one statement per step: 2 for a first run, 1 for a replay, a 409, a renewal or a release', async () => {
        const table = newTable('pg_trips');
        const { pool: counting, calls } = countingPool(pool);
        const backend = new PostgresBackend({ pool: counting, table });
        const trips = async (step: () => Promise<unknown>) => {
          const before = calls.length;
          await step();
          return calls.length - before;
        };

        // The first operation also creates the table: one more statement, once.
        expect(await trips(() => backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS))).toBe(2);
        expect(calls[0]).toMatch(/^DO \$\$/);

        const key = randomUUID();
        let token = '';
        const firstRun = await trips(async () => {
          token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          expect(await backend.renew(key, token, LEASE_MS)).toBe(true);
          expect(await backend.release(key, token)).toBe(true);
        });
        expect(firstRun).toBe(3); // acquire, renew, release
        expect(
          await trips(async () => {
            token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          }),
        ).toBe(1);
        expect(await trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // 409
        expect(await trips(() => backend.complete(key, token, makeRecord(), 60_000))).toBe(1);
        expect(await trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // replay
        expect(await trips(() => backend.acquire(key, 'other', LEASE_MS))).toBe(1); // mismatch

        // A first run end to end: acquire + complete.
        const next = randomUUID();
        expect(
          await trips(async () => {
            const held = tokenOf(await backend.acquire(next, FINGERPRINT, LEASE_MS));
            expect(await backend.complete(next, held, makeRecord(), 60_000)).toBe(true);
          }),
        ).toBe(2);

        // Taking over a lapsed lease is the same single statement.
        const lapsing = randomUUID();
        tokenOf(await backend.acquire(lapsing, FINGERPRINT, 50));
        await sleep(150);
        expect(await trips(async () => tokenOf(await backend.acquire(lapsing, FINGERPRINT, LEASE_MS)))).toBe(
          1,
        );

        // A token that is not one of ours never reaches the database.
        expect(await trips(() => backend.release(key, 'not-a-token'))).toBe(0);
      });

      it('runs the statement of an acquire that lost a race once more, and only then', async () => {
        const table = newTable('pg_trips_race');
        const { pool: counting, calls } = countingPool(pool);
        const backend = new PostgresBackend({ pool: counting, table });
        tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        const before = calls.length;
        const key = randomUUID();
        const results = await Promise.all(
          Array.from({ length: 50 }, () => backend.acquire(key, FINGERPRINT, LEASE_MS)),
        );
        expect(results.filter((result) => result.state === 'acquired')).toHaveLength(1);
        const statements = calls.length - before;
        expect(statements).toBeGreaterThanOrEqual(50);
        expect(statements).toBeLessThanOrEqual(100);
      });
    });

    describe('storage', () => {
      it('keys each row by the SHA-256 of the key and stores the raw key nowhere', async () => {
        const table = newTable('pg_hash');
        const backend = new PostgresBackend({ pool, table });
        const key = `-tenant-42:${randomUUID()}`;
        const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
        expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
        const { rows } = await pool.query(
          `SELECT encode(key_hash, 'hex') AS hash, t::text AS whole FROM "${table}" AS t`,
        );
        expect(rows).toHaveLength(1);
        expect(rows[0].hash).toBe(createHash('sha256').update(key).digest('hex'));
        expect(rows[0].whole).not.toContain('tenant-42');
      });

      it('stores a record without its response and answers it as completed with response null', async () => {
        const table = newTable('pg_no_response');
        const backend = new PostgresBackend({ pool, table });
        const key = randomUUID();
        const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
        const createdAt = Date.now();
        expect(
          await backend.complete(key, token, { fingerprint: FINGERPRINT, createdAt, response: null }, 60_000),
        ).toBe(true);
        expect(await backend.acquire(key, FINGERPRINT, LEASE_MS)).toEqual({
          state: 'completed',
          record: { fingerprint: FINGERPRINT, createdAt, response: null },
        });
        expect(await backend.acquire(key, 'other', LEASE_MS)).toEqual({ state: 'mismatch' });
      });
    });

    describe('time', () => {
      it("judges leases by the database's clock, whatever the process's clock says", async () => {
        const table = newTable('pg_clock');
        const backend = new PostgresBackend({ pool, table });
        const key = randomUUID();
        tokenOf(await backend.acquire(key, FINGERPRINT, 300));
        // A process whose clock runs an hour ahead still sees the lease held…
        const realNow = Date.now;
        vi.spyOn(Date, 'now').mockImplementation(() => realNow() + 3_600_000);
        const held = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(held.state).toBe('in-flight');
        // …and one whose clock runs an hour behind sees it lapse on time.
        vi.spyOn(Date, 'now').mockImplementation(() => realNow() - 3_600_000);
        await sleep(400);
        tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
      });
    });

    describe('sweeping', () => {
      it('keeps the row count bounded under a stream of expiring keys and crashed holders', async () => {
        const table = newTable('pg_sweep');
        const backend = new PostgresBackend({ pool, table });
        const forever = randomUUID();
        const foreverToken = tokenOf(await backend.acquire(forever, FINGERPRINT, LEASE_MS));
        expect(await backend.complete(forever, foreverToken, makeRecord(), null)).toBe(true);

        const KEYS = 300;
        let most = 0;
        for (let i = 0; i < KEYS; i++) {
          const key = `stream-${i}-${randomUUID()}`;
          if (i % 10 === 0) {
            // A holder that crashed: its short lease lapses, and nobody ever completes or releases it.
            tokenOf(await backend.acquire(key, FINGERPRINT, 20));
            continue;
          }
          const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          expect(await backend.complete(key, token, makeRecord(), 20)).toBe(true);
          if (i % 25 === 0) most = Math.max(most, await rowCount(pool, table));
        }
        most = Math.max(most, await rowCount(pool, table));
        console.info(`PostgresBackend: at most ${most} rows while streaming ${KEYS} expiring keys`);
        expect(most).toBeLessThan(60);

        // An explicit sweep empties what expired since, and keeps the record stored forever.
        await sleep(50);
        expect(await backend.sweep()).toBeGreaterThan(0);
        expect(await rowCount(pool, table)).toBe(1);
        expect((await backend.acquire(forever, FINGERPRINT, LEASE_MS)).state).toBe('completed');
      });

      it('never sweeps a live lock or an unexpired record', async () => {
        const table = newTable('pg_sweep_live');
        const backend = new PostgresBackend({ pool, table });
        const locked = randomUUID();
        tokenOf(await backend.acquire(locked, FINGERPRINT, LEASE_MS));
        const done = randomUUID();
        const token = tokenOf(await backend.acquire(done, FINGERPRINT, LEASE_MS));
        expect(await backend.complete(done, token, makeRecord(), 60_000)).toBe(true);
        expect(await backend.sweep()).toBe(0);
        expect((await backend.acquire(locked, FINGERPRINT, LEASE_MS)).state).toBe('in-flight');
        expect((await backend.acquire(done, FINGERPRINT, LEASE_MS)).state).toBe('completed');
      });
    });

    describe('concurrency across pools', () => {
      it('lets exactly one of 50 acquires spread over two pools win', async () => {
        const table = newTable('pg_two_pools');
        const other = postgresPool({ max: 4 });
        try {
          const backends = [
            new PostgresBackend({ pool, table }),
            new PostgresBackend({ pool: other, table }),
          ];
          const key = randomUUID();
          const results = await Promise.all(
            Array.from({ length: 50 }, (_, i) => backends[i % 2]!.acquire(key, FINGERPRINT, LEASE_MS)),
          );
          const states = results.map((result) => result.state);
          expect(states.filter((state) => state === 'acquired')).toHaveLength(1);
          expect(states.filter((state) => state === 'in-flight')).toHaveLength(49);
        } finally {
          await other.end();
        }
      });
    });

    describe('errors', () => {
      it('rejects with the pool’s own error, unchanged', async () => {
        const boom = new Error('connection refused');
        const failing: PgPoolLike = { query: async () => Promise.reject(boom) };
        const backend = new PostgresBackend({ pool: failing, createTable: false });
        await expect(backend.acquire('k', FINGERPRINT, LEASE_MS)).rejects.toBe(boom);
        await expect(backend.complete('k', randomUUID(), makeRecord(), 1000)).rejects.toBe(boom);
        await expect(backend.release('k', randomUUID())).rejects.toBe(boom);
        await expect(backend.renew('k', randomUUID(), 1000)).rejects.toBe(boom);
      });

      it('rejects when the pool throws synchronously instead of returning a rejected promise', async () => {
        const backend = new PostgresBackend({
          pool: {
            query() {
              throw new Error('sync boom');
            },
          },
        });
        await expect(backend.acquire('k', FINGERPRINT, LEASE_MS)).rejects.toThrow('sync boom');
      });

      it('retries creating the table after a failed attempt', async () => {
        const table = newTable('pg_create_retry');
        let fail = true;
        const flaky: PgPoolLike = {
          query(text, values) {
            if (fail) {
              fail = false;
              return Promise.reject(new Error('transient'));
            }
            return pool.query(text, values);
          },
        };
        const backend = new PostgresBackend({ pool: flaky, table });
        await expect(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS)).rejects.toThrow('transient');
        tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
      });
    });
  });

  describe('options', () => {
    const pool: PgPoolLike = { query: async () => ({ rows: [], rowCount: 0 }) };

    it.each([
      ['undefined', undefined],
      ['null', null],
      ['a connection string', 'postgres://localhost/test'],
      ['an object without query', {}],
    ])('rejects %s as pool with an error naming pool', (_label, value) => {
      expect(() => new PostgresBackend({ pool: value } as never)).toThrow(/`pool`/);
    });

    it('rejects a missing options object with an error naming pool', () => {
      expect(() => new (PostgresBackend as new (options?: unknown) => PostgresBackend)()).toThrow(/`pool`/);
    });

    it.each([
      ['a name with a dash', 'idempotency-keys'],
      ['a name starting with a digit', '1keys'],
      ['three parts', 'a.b.c'],
      ['an empty string', ''],
      ['a quote', 'keys"; DROP TABLE users; --'],
      ['a name longer than 48 characters', 'k'.repeat(49)],
      ['a number', 42],
    ])('rejects %s as table with ERR_IDEMPOTENCY_OPTION naming table', (_label, table) => {
      let error: unknown;
      try {
        new PostgresBackend({ pool, table: table as string });
      } catch (caught) {
        error = caught;
      }
      expect(error).toBeInstanceOf(IdempotencyError);
      expect(error).toMatchObject({
        code: 'ERR_IDEMPOTENCY_OPTION',
        message: expect.stringContaining('`table`'),
      });
    });

    it('rejects a createTable that is not a boolean', () => {
      expect(() => new PostgresBackend({ pool, createTable: 'yes' as never })).toThrow(/`createTable`/);
    });

    it('accepts a schema-qualified table and names with capitals and underscores', () => {
      expect(() => new PostgresBackend({ pool, table: 'billing.Idempotency_Keys_2' })).not.toThrow();
    });
  });
});
