/**
 * MysqlBackend against a real MariaDB or MySQL server (MYSQL_URL): the backend contract with the statements the
 * server calls for (one INSERT … RETURNING on MariaDB), with the MySQL statements (INSERT, then a read), and with
 * those on a pool configured against them (rows as arrays, no CLIENT_FOUND_ROWS); then what only this backend
 * promises: binary keys (case and trailing spaces matter), the table on first use, round trips, the database's
 * UTC clock whatever the session's time zone, a bounded table, and errors passed through unchanged. Every run
 * works in tables of its own and drops only those.
 */
import { createHash, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import mysql from 'mysql2';
import type { Pool } from 'mysql2/promise';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  DEFAULT_MYSQL_TABLE,
  MYSQL_SCHEMA,
  MysqlBackend,
  type MysqlPoolLike,
  mysqlSchema,
} from '../../src/backends/mysql.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { AcquireResult, CompletedResult, IdempotencyRecord } from '../../src/core/types.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import { dropMysqlTable, MYSQL_URL, mysqlPool, requireMysql, uniqueTable } from '../support/sql.js';

const mysqlUp = await requireMysql('MysqlBackend tests');

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
function countingPool(pool: Pool): { pool: MysqlPoolLike; calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    pool: {
      query(options, values) {
        calls.push(options.sql);
        return pool.query(options, values);
      },
    },
  };
}

async function rowCount(pool: Pool, table: string): Promise<number> {
  const [rows] = await pool.query(`SELECT COUNT(*) AS count FROM \`${table}\``);
  return Number((rows as { count: number }[])[0]!.count);
}

describe.runIf(mysqlUp)('MysqlBackend', () => {
  const contractTest = { describe, it, beforeAll, afterAll };
  /** Every backend of this project has the operator methods: their cases must run, never be skipped. */
  const contractOptions = { requires: ['inspect', 'forget'] } as const;

  describeBackendContract(
    'MysqlBackend',
    async () => {
      const pool = mysqlPool();
      // A second pool on the same table, with the other statements: the races spread over both.
      const peerPool = mysqlPool();
      const table = uniqueTable('my_contract');
      return {
        backend: new MysqlBackend({ pool, table }),
        peers: [new MysqlBackend({ pool: peerPool, table, returning: false })],
        async teardown() {
          await dropMysqlTable(pool, table);
          await Promise.all([pool.end(), peerPool.end()]);
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describeBackendContract(
    'MysqlBackend with the MySQL statements (returning: false)',
    async () => {
      const pool = mysqlPool();
      const table = uniqueTable('my_contract_mysql');
      return {
        backend: new MysqlBackend({ pool, table, returning: false }),
        async teardown() {
          await dropMysqlTable(pool, table);
          await pool.end();
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describeBackendContract(
    'MysqlBackend with the MySQL statements on a pool with rowsAsArray and without CLIENT_FOUND_ROWS',
    async () => {
      const pool = mysqlPool({ rowsAsArray: true, flags: ['-FOUND_ROWS'] });
      const table = uniqueTable('my_contract_flags');
      return {
        backend: new MysqlBackend({ pool, table, returning: false }),
        async teardown() {
          await dropMysqlTable(pool, table);
          await pool.end();
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describe('on the shared server', () => {
    let pool: Pool;
    const tables: string[] = [];

    function newTable(label: string): string {
      const table = uniqueTable(label);
      tables.push(table);
      return table;
    }

    beforeAll(() => {
      pool = mysqlPool({ connectionLimit: 4 });
    });

    afterEach(() => {
      vi.restoreAllMocks();
    });

    afterAll(async () => {
      for (const table of tables) await dropMysqlTable(pool, table);
      await pool.end();
    });

    describe('keys', () => {
      it('keeps keys that differ only in case or trailing spaces apart', async () => {
        const backend = new MysqlBackend({ pool, table: newTable('my_keys') });
        const base = randomUUID();
        const keys = [
          `abc-${base}`,
          `ABC-${base}`,
          `Abc-${base}`,
          `abc-${base} `,
          `abc-${base}  `,
          `abc-${base}\t`,
          `abc-${base}\u00a0`,
          `äbc-${base}`,
          `a\u0308bc-${base}`,
        ];
        for (const [i, key] of keys.entries()) {
          const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          expect(await backend.complete(key, token, makeRecord(Buffer.from(`{"key":${i}}`)), 60_000)).toBe(
            true,
          );
        }
        for (const [i, key] of keys.entries()) {
          const result = (await backend.acquire(key, FINGERPRINT, LEASE_MS)) as CompletedResult;
          expect(result.state).toBe('completed');
          expect(Buffer.from(result.record.response!.body).toString()).toBe(`{"key":${i}}`);
        }
      });

      it('compares fingerprints byte for byte, case and trailing spaces included', async () => {
        const backend = new MysqlBackend({ pool, table: newTable('my_fingerprints') });
        const key = randomUUID();
        tokenOf(await backend.acquire(key, 'abc', LEASE_MS));
        expect((await backend.acquire(key, 'ABC', LEASE_MS)).state).toBe('mismatch');
        expect((await backend.acquire(key, 'abc ', LEASE_MS)).state).toBe('mismatch');
        expect((await backend.acquire(key, 'abc', LEASE_MS)).state).toBe('in-flight');
      });

      it('keys each row by the SHA-256 of the key and stores the raw key nowhere', async () => {
        const table = newTable('my_hash');
        const backend = new MysqlBackend({ pool, table });
        const key = `-tenant-42:${randomUUID()}`;
        const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
        expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
        const [rows] = await pool.query(
          `SELECT HEX(key_hash) AS hash, CONCAT_WS('|', fingerprint, token, headers, body) AS whole FROM \`${table}\``,
        );
        const [row] = rows as { hash: string; whole: Buffer | string }[];
        expect(row!.hash.toLowerCase()).toBe(createHash('sha256').update(key).digest('hex'));
        expect(String(row!.whole)).not.toContain('tenant-42');
      });
    });

    describe('the table', () => {
      it('is created on first use with the exported DDL: binary key, fingerprint and token', async () => {
        const table = newTable('my_create');
        const backend = new MysqlBackend({ pool, table });
        const [before] = await pool.query('SHOW TABLES LIKE ?', [table]);
        expect(before).toHaveLength(0);
        tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        const [columns] = await pool.query(
          `SELECT COLUMN_NAME AS name, COLUMN_TYPE AS type FROM information_schema.COLUMNS
           WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION`,
          [table],
        );
        expect(
          (columns as { name: string; type: string }[]).map(({ name, type }) => `${name} ${type}`),
        ).toEqual([
          'key_hash binary(32)',
          'fingerprint blob',
          'token binary(16)',
          'expires_at datetime(3)',
          'status smallint(5) unsigned',
          'headers mediumblob',
          'body longblob',
          'created_at bigint(20)',
        ]);
        await pool.query(mysqlSchema(table));
      });

      it('exports the DDL for the default table and for any valid name', () => {
        expect(DEFAULT_MYSQL_TABLE).toBe('idempotency_keys');
        expect(MYSQL_SCHEMA).toBe(mysqlSchema());
        expect(MYSQL_SCHEMA).toContain('CREATE TABLE IF NOT EXISTS `idempotency_keys`');
        expect(mysqlSchema('app.keys')).toContain('CREATE TABLE IF NOT EXISTS `app`.`keys`');
        expect(() => mysqlSchema('bad name')).toThrow(IdempotencyError);
      });

      it('is created by many backends starting at once, each with its own pool, without an error', async () => {
        const table = newTable('my_create_race');
        const pools = Array.from({ length: 6 }, () => mysqlPool({ connectionLimit: 1 }));
        try {
          const results = await Promise.all(
            pools.map((own) =>
              new MysqlBackend({ pool: own, table }).acquire(randomUUID(), FINGERPRINT, 1000),
            ),
          );
          expect(results.map((result) => result.state)).toEqual(Array(6).fill('acquired'));
        } finally {
          await Promise.all(pools.map((own) => own.end()));
        }
      });

      it('is not created with createTable: false, and the driver error comes through unchanged', async () => {
        const table = newTable('my_no_create');
        const backend = new MysqlBackend({ pool, table, createTable: false });
        const error = await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS).catch((caught) => caught);
        expect(error).not.toBeInstanceOf(IdempotencyError);
        expect(error).toMatchObject({ code: 'ER_NO_SUCH_TABLE' });
        await pool.query(mysqlSchema(table));
        tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
      });
    });

    describe('round trips', () => {
      it('costs one statement per step on MariaDB: 2 per first run, 1 per replay, 409, renewal or release', async () => {
        const table = newTable('my_trips');
        const { pool: counting, calls } = countingPool(pool);
        const backend = new MysqlBackend({ pool: counting, table });
        const trips = async (step: () => Promise<unknown>) => {
          const before = calls.length;
          await step();
          return calls.length - before;
        };

        // The first operation also creates the table and asks the server's version: two more statements, once.
        expect(await trips(() => backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS))).toBe(3);
        expect(calls[0]).toMatch(/^CREATE TABLE IF NOT EXISTS/);
        expect(calls[1]).toBe('SELECT VERSION() AS version');
        expect(calls[2]).toMatch(/RETURNING/);

        const key = randomUUID();
        let token = '';
        expect(
          await trips(async () => {
            token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          }),
        ).toBe(1);
        expect(await trips(() => backend.renew(key, token, LEASE_MS))).toBe(1);
        expect(await trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // 409
        expect(await trips(() => backend.complete(key, token, makeRecord(), 60_000))).toBe(1);
        expect(await trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // replay
        expect(await trips(() => backend.acquire(key, 'other', LEASE_MS))).toBe(1); // mismatch

        const released = randomUUID();
        const held = tokenOf(await backend.acquire(released, FINGERPRINT, LEASE_MS));
        expect(await trips(() => backend.release(released, held))).toBe(1);

        const lapsing = randomUUID();
        tokenOf(await backend.acquire(lapsing, FINGERPRINT, 50));
        await sleep(150);
        expect(await trips(async () => tokenOf(await backend.acquire(lapsing, FINGERPRINT, LEASE_MS)))).toBe(
          1,
        );

        expect(await trips(() => backend.release(key, 'not-a-token'))).toBe(0);
      });

      it('costs 2 per first run, 2 per replay or 409 and 3 per takeover with the MySQL statements', async () => {
        const table = newTable('my_trips_mysql');
        const { pool: counting, calls } = countingPool(pool);
        const backend = new MysqlBackend({ pool: counting, table, returning: false });
        const trips = async (step: () => Promise<unknown>) => {
          const before = calls.length;
          await step();
          return calls.length - before;
        };

        // The first operation also creates the table; told there is no RETURNING, it asks no version.
        expect(await trips(() => backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS))).toBe(2);
        expect(calls[0]).toMatch(/^CREATE TABLE IF NOT EXISTS/);

        const key = randomUUID();
        let token = '';
        expect(
          await trips(async () => {
            token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          }),
        ).toBe(1);
        expect(await trips(() => backend.renew(key, token, LEASE_MS))).toBe(1);
        expect(await trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(2); // 409
        expect(await trips(() => backend.complete(key, token, makeRecord(), 60_000))).toBe(1);
        expect(await trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(2); // replay
        expect(await trips(() => backend.acquire(key, 'other', LEASE_MS))).toBe(2); // mismatch

        const released = randomUUID();
        const held = tokenOf(await backend.acquire(released, FINGERPRINT, LEASE_MS));
        expect(await trips(() => backend.release(released, held))).toBe(1);

        const lapsing = randomUUID();
        tokenOf(await backend.acquire(lapsing, FINGERPRINT, 50));
        await sleep(150);
        expect(await trips(async () => tokenOf(await backend.acquire(lapsing, FINGERPRINT, LEASE_MS)))).toBe(
          3,
        );
      });

      it('sweeps in the background after every eighth complete, off the request path', async () => {
        const table = newTable('my_trips_sweep');
        const { pool: counting, calls } = countingPool(pool);
        const backend = new MysqlBackend({ pool: counting, table });
        for (let i = 0; i < 8; i++) {
          const key = randomUUID();
          const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          const before = calls.length;
          expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
          // The complete itself is one statement; the eighth starts the sweep's SELECT without waiting for it.
          expect(calls.slice(before)).toHaveLength(i === 7 ? 2 : 1);
        }
        expect(calls.at(-1)).toMatch(/^SELECT key_hash FROM/);
      });
    });

    describe('time', () => {
      it("judges leases by the database's UTC clock, whatever the process's clock or the session's time zone", async () => {
        const table = newTable('my_clock');
        const tokyo = mysql.createPool({ uri: MYSQL_URL, connectionLimit: 2 });
        tokyo.on('connection', (connection) => connection.query("SET time_zone = '+09:00'"));
        const honolulu = mysql.createPool({ uri: MYSQL_URL, connectionLimit: 2 });
        honolulu.on('connection', (connection) => connection.query("SET time_zone = '-10:00'"));
        try {
          const first = new MysqlBackend({ pool: tokyo.promise(), table });
          const second = new MysqlBackend({ pool: honolulu.promise(), table });
          const key = randomUUID();
          tokenOf(await first.acquire(key, FINGERPRINT, 400));
          const realNow = Date.now;
          vi.spyOn(Date, 'now').mockImplementation(() => realNow() + 3_600_000);
          const held = await second.acquire(key, FINGERPRINT, LEASE_MS);
          expect(held.state).toBe('in-flight');
          expect((held as { retryAfterMs: number }).retryAfterMs).toBeLessThanOrEqual(400);
          vi.spyOn(Date, 'now').mockImplementation(() => realNow() - 3_600_000);
          await sleep(500);
          tokenOf(await second.acquire(key, FINGERPRINT, LEASE_MS));
        } finally {
          await Promise.all([tokyo.promise().end(), honolulu.promise().end()]);
        }
      });
    });

    describe('sweeping', () => {
      it('keeps the row count bounded under a stream of expiring keys and crashed holders', async () => {
        const table = newTable('my_sweep');
        const backend = new MysqlBackend({ pool, table });
        const forever = randomUUID();
        const foreverToken = tokenOf(await backend.acquire(forever, FINGERPRINT, LEASE_MS));
        expect(await backend.complete(forever, foreverToken, makeRecord(), null)).toBe(true);

        const KEYS = 300;
        let most = 0;
        for (let i = 0; i < KEYS; i++) {
          const key = `stream-${i}-${randomUUID()}`;
          if (i % 10 === 0) {
            tokenOf(await backend.acquire(key, FINGERPRINT, 20));
            continue;
          }
          const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
          expect(await backend.complete(key, token, makeRecord(), 20)).toBe(true);
          if (i % 25 === 0) most = Math.max(most, await rowCount(pool, table));
        }
        most = Math.max(most, await rowCount(pool, table));
        console.info(`MysqlBackend: at most ${most} rows while streaming ${KEYS} expiring keys`);
        expect(most).toBeLessThan(80);

        await sleep(50);
        expect(await backend.sweep()).toBeGreaterThan(0);
        expect(await rowCount(pool, table)).toBe(1);
        expect((await backend.acquire(forever, FINGERPRINT, LEASE_MS)).state).toBe('completed');
      });

      it('never sweeps a live lock or an unexpired record', async () => {
        const backend = new MysqlBackend({ pool, table: newTable('my_sweep_live') });
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

    describe('storage', () => {
      it('stores a record without its response and answers it as completed with response null', async () => {
        const backend = new MysqlBackend({ pool, table: newTable('my_no_response') });
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
      });

      it('round-trips a 1 MiB body', async () => {
        const backend = new MysqlBackend({ pool, table: newTable('my_big') });
        const key = randomUUID();
        const body = Buffer.alloc(1024 * 1024, 7);
        const token = tokenOf(await backend.acquire(key, FINGERPRINT, LEASE_MS));
        expect(await backend.complete(key, token, makeRecord(body), 60_000)).toBe(true);
        const result = (await backend.acquire(key, FINGERPRINT, LEASE_MS)) as CompletedResult;
        expect(Buffer.from(result.record.response!.body).equals(body)).toBe(true);
      });
    });

    describe.each([
      ['MariaDB statement', undefined],
      ['MySQL statements', false],
    ] as const)('concurrency across pools (%s)', (_label, returning) => {
      it('lets exactly one of 50 acquires spread over two pools win', async () => {
        const table = newTable('my_two_pools');
        const other = mysqlPool({ connectionLimit: 4 });
        try {
          const backends = [
            new MysqlBackend({ pool, table, returning }),
            new MysqlBackend({ pool: other, table, returning }),
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

      it('lets exactly one of 20 racing takeovers of a lapsed lease win', async () => {
        const backend = new MysqlBackend({ pool, table: newTable('my_takeover_race'), returning });
        const key = randomUUID();
        tokenOf(await backend.acquire(key, FINGERPRINT, 30));
        await sleep(100);
        const results = await Promise.all(
          Array.from({ length: 20 }, () => backend.acquire(key, FINGERPRINT, LEASE_MS)),
        );
        expect(results.filter((result) => result.state === 'acquired')).toHaveLength(1);
      });
    });

    describe('pools', () => {
      it('accepts a callback pool and uses its promise API', async () => {
        const callbackPool = mysql.createPool({ uri: MYSQL_URL, connectionLimit: 1 });
        try {
          const backend = new MysqlBackend({ pool: callbackPool as never, table: newTable('my_callback') });
          tokenOf(await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        } finally {
          await callbackPool.promise().end();
        }
      });
    });

    describe('errors', () => {
      it('rejects with the pool’s own error, unchanged', async () => {
        const boom = new Error('connection refused');
        const failing: MysqlPoolLike = { query: async () => Promise.reject(boom) };
        const backend = new MysqlBackend({ pool: failing, createTable: false });
        await expect(backend.acquire('k', FINGERPRINT, LEASE_MS)).rejects.toBe(boom);
        await expect(backend.complete('k', randomUUID(), makeRecord(), 1000)).rejects.toBe(boom);
        await expect(backend.release('k', randomUUID())).rejects.toBe(boom);
        await expect(backend.renew('k', randomUUID(), 1000)).rejects.toBe(boom);
      });
    });
  });

  describe('options', () => {
    const pool: MysqlPoolLike = { query: async () => [[], []] };

    it.each([
      ['undefined', undefined],
      ['null', null],
      ['a connection string', 'mysql://root@localhost/test'],
      ['an object without query', {}],
    ])('rejects %s as pool with an error naming pool', (_label, value) => {
      expect(() => new MysqlBackend({ pool: value } as never)).toThrow(/`pool`/);
    });

    it.each([
      ['a name with a dash', 'idempotency-keys'],
      ['three parts', 'a.b.c'],
      ['a backtick', 'keys`; DROP TABLE users; --'],
      ['a number', 42],
    ])('rejects %s as table with ERR_IDEMPOTENCY_OPTION naming table', (_label, table) => {
      expect(() => new MysqlBackend({ pool, table: table as string })).toThrow(
        expect.objectContaining({
          code: 'ERR_IDEMPOTENCY_OPTION',
          message: expect.stringContaining('`table`'),
        }),
      );
    });

    it('rejects a createTable that is not a boolean', () => {
      expect(() => new MysqlBackend({ pool, createTable: 1 as never })).toThrow(/`createTable`/);
    });

    it('rejects a returning that is not a boolean', () => {
      expect(() => new MysqlBackend({ pool, returning: 'yes' as never })).toThrow(/`returning`/);
    });
  });
});
