/**
 * SqliteBackend on real SQLite files (better-sqlite3): the backend contract with a `Database` passed in and with
 * a path the backend opens, then what only this backend promises: WAL with a busy timeout set first, one
 * statement per step, synchronous answers, a bounded table, and several processes racing on one file. Every
 * file lives in a temporary directory of its own, removed afterwards.
 */
import { spawn } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
  DEFAULT_SQLITE_TABLE,
  SQLITE_SCHEMA,
  SqliteBackend,
  type SqliteDatabaseLike,
  sqliteSchema,
} from '../../src/backends/sqlite.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { AcquireResult, Awaitable, IdempotencyRecord } from '../../src/core/types.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import { requireSqlite, sqliteDirectory } from '../support/sql.js';

const sqliteLoads = await requireSqlite('SqliteBackend tests');

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const FINGERPRINT = 'f'.repeat(64);
const LEASE_MS = 30_000;

function makeRecord(body: Uint8Array = Buffer.from('{"ok":true}')): IdempotencyRecord {
  return {
    fingerprint: FINGERPRINT,
    createdAt: Date.now(),
    response: { status: 201, headers: [['content-type', 'application/json']], body },
  };
}

function tokenOf(result: Awaitable<AcquireResult>): string {
  if (result instanceof Promise) throw new Error('expected a synchronous answer');
  if (result.state !== 'acquired') throw new Error(`expected acquired, got ${result.state}`);
  return result.token;
}

/** A database that records every statement it runs and every pragma: the SQLite meaning of a round trip. */
function countingDatabase(db: Database.Database): { db: SqliteDatabaseLike; calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    db: {
      prepare(source) {
        const statement = db.prepare(source);
        return {
          run(...params) {
            calls.push(source);
            return statement.run(...params);
          },
          get(...params) {
            calls.push(source);
            return statement.get(...params);
          },
        };
      },
      exec(source) {
        calls.push(source);
        return db.exec(source);
      },
      pragma(source, options) {
        calls.push(`PRAGMA ${source}`);
        return db.pragma(source, options);
      },
    },
  };
}

function rowCount(db: Database.Database, table = DEFAULT_SQLITE_TABLE): number {
  return (db.prepare(`SELECT count(*) AS count FROM "${table}"`).get() as { count: number }).count;
}

/** Runs `node --import tsx <args>` from the repository root; resolves with its stdout, rejects on failure. */
function runNode(args: string[], onStdout?: (text: string) => void): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      onStdout?.(stdout);
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    child.once('error', reject);
    child.once('exit', (code) => {
      if (code === 0) resolve(stdout);
      else reject(new Error(`node ${args.join(' ')} exited with ${code}:\n${stderr}`));
    });
  });
}

describe.runIf(sqliteLoads)('SqliteBackend', () => {
  const directory = sqliteDirectory('sqlite-backend');

  afterAll(() => {
    directory.remove();
  });

  const contractTest = { describe, it, beforeAll, afterAll };
  /** Every backend of this project has the operator methods: their cases must run, never be skipped. */
  const contractOptions = { requires: ['inspect', 'forget'] } as const;

  describeBackendContract(
    'SqliteBackend with a Database',
    async () => {
      const db = new Database(directory.path(`contract-${randomUUID()}.db`));
      return {
        backend: new SqliteBackend({ database: db }),
        async teardown() {
          db.close();
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describeBackendContract(
    'SqliteBackend with a path',
    async () => {
      const path = directory.path(`contract-${randomUUID()}.db`);
      const backend = new SqliteBackend({ database: path });
      // A second connection to the same file, as another process would open it.
      const peer = new SqliteBackend({ database: path });
      return {
        backend,
        peers: [peer],
        async teardown() {
          backend.close();
          peer.close();
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describe('opening', () => {
    it('opens a path itself with a busy timeout and in WAL mode, and closes it on close()', async () => {
      const path = directory.path(`open-${randomUUID()}.db`);
      const backend = new SqliteBackend({ database: path, busyTimeoutMs: 1234 });
      // The first operation loads better-sqlite3 and opens the file: asynchronous, once.
      const first = backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS);
      expect(first).toBeInstanceOf(Promise);
      expect((await first).state).toBe('acquired');
      // From then on, answers are synchronous.
      expect(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS)).not.toBeInstanceOf(Promise);

      const reader = new Database(path, { readonly: true });
      try {
        expect(reader.pragma('journal_mode', { simple: true })).toBe('wal');
        expect(rowCount(reader)).toBe(2);
      } finally {
        reader.close();
      }
      backend.close();
      expect(() => backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS)).toThrow(
        expect.objectContaining({ code: 'ERR_IDEMPOTENCY_BACKEND' }),
      );
    });

    it('sets the busy timeout before switching a Database passed in to WAL, and leaves the Database open', () => {
      const raw = new Database(directory.path(`passed-${randomUUID()}.db`), { timeout: 0 });
      try {
        const { db, calls } = countingDatabase(raw);
        const backend = new SqliteBackend({ database: db });
        tokenOf(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        const pragmas = calls.filter((call) => call.startsWith('PRAGMA'));
        expect(pragmas).toEqual([
          'PRAGMA busy_timeout',
          `PRAGMA busy_timeout = ${DEFAULT_SQLITE_BUSY_TIMEOUT_MS}`,
          'PRAGMA journal_mode',
          'PRAGMA journal_mode = WAL',
        ]);
        expect(raw.pragma('busy_timeout', { simple: true })).toBe(DEFAULT_SQLITE_BUSY_TIMEOUT_MS);
        expect(raw.pragma('journal_mode', { simple: true })).toBe('wal');
        backend.close();
        expect(raw.open).toBe(true);
      } finally {
        raw.close();
      }
    });

    it("keeps a Database's own busy timeout", () => {
      const raw = new Database(directory.path(`own-timeout-${randomUUID()}.db`), { timeout: 250 });
      try {
        tokenOf(new SqliteBackend({ database: raw }).acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        expect(raw.pragma('busy_timeout', { simple: true })).toBe(250);
      } finally {
        raw.close();
      }
    });

    it('rejects on first use when better-sqlite3 cannot open the path, and tries again on the next call', async () => {
      const backend = new SqliteBackend({ database: directory.path('missing-directory/x.db') });
      await expect(backend.acquire('k', FINGERPRINT, LEASE_MS)).rejects.toThrow(/Cannot open database/);
      await expect(backend.acquire('k', FINGERPRINT, LEASE_MS)).rejects.toThrow(/Cannot open database/);
    });
  });

  describe('the table', () => {
    it('is created on first use with the exported DDL: table, index and sweep trigger', () => {
      const db = new Database(directory.path(`ddl-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db, table: 'keys_v2' });
        const objects = () =>
          (
            db
              .prepare("SELECT type, name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
              .all() as {
              type: string;
              name: string;
            }[]
          ).map(({ type, name }) => `${type} ${name}`);
        expect(objects()).toEqual([]);
        tokenOf(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        expect(objects()).toEqual(['table keys_v2', 'index keys_v2_expires_at', 'trigger keys_v2_sweep']);
        db.exec(sqliteSchema('keys_v2'));
        expect(SQLITE_SCHEMA).toBe(sqliteSchema());
        expect(SQLITE_SCHEMA).toContain('CREATE TABLE IF NOT EXISTS "idempotency_keys"');
      } finally {
        db.close();
      }
    });

    it('is not created with createTable: false, and the SQLite error comes through unchanged', () => {
      const db = new Database(directory.path(`no-create-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db, createTable: false });
        expect(() => backend.acquire('k', FINGERPRINT, LEASE_MS)).toThrow(/no such table/);
        db.exec(SQLITE_SCHEMA);
        tokenOf(backend.acquire('k', FINGERPRINT, LEASE_MS));
      } finally {
        db.close();
      }
    });
  });

  describe('statements', () => {
    it('runs one statement per step: 2 for a first run, 1 for a replay, a 409, a renewal or a release', () => {
      const raw = new Database(directory.path(`trips-${randomUUID()}.db`));
      try {
        const { db, calls } = countingDatabase(raw);
        const backend = new SqliteBackend({ database: db });
        const trips = (step: () => unknown) => {
          const before = calls.length;
          step();
          return calls.length - before;
        };
        // Set-up on first use: two pragmas read, WAL switched on, the DDL; then the acquire itself.
        expect(trips(() => tokenOf(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS)))).toBe(5);

        const key = randomUUID();
        let token = '';
        expect(
          trips(() => {
            token = tokenOf(backend.acquire(key, FINGERPRINT, LEASE_MS));
          }),
        ).toBe(1);
        expect(trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // 409
        expect(trips(() => backend.renew(key, token, LEASE_MS))).toBe(1);
        expect(trips(() => backend.complete(key, token, makeRecord(), 60_000))).toBe(1);
        expect(trips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // replay
        expect(trips(() => backend.acquire(key, 'other', LEASE_MS))).toBe(1); // mismatch

        const released = randomUUID();
        const held = tokenOf(backend.acquire(released, FINGERPRINT, LEASE_MS));
        expect(trips(() => backend.release(released, held))).toBe(1);

        const next = randomUUID();
        expect(
          trips(() => {
            const nextToken = tokenOf(backend.acquire(next, FINGERPRINT, LEASE_MS));
            expect(backend.complete(next, nextToken, makeRecord(), 60_000)).toBe(true);
          }),
        ).toBe(2);
      } finally {
        raw.close();
      }
    });

    it('answers synchronously with a Database passed in', () => {
      const db = new Database(directory.path(`sync-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db });
        const key = randomUUID();
        const token = tokenOf(backend.acquire(key, FINGERPRINT, LEASE_MS));
        expect(backend.renew(key, token, LEASE_MS)).toBe(true);
        expect(backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
        const replay = backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(replay).not.toBeInstanceOf(Promise);
        expect((replay as AcquireResult).state).toBe('completed');
        expect(backend.release(key, token)).toBe(false);
      } finally {
        db.close();
      }
    });
  });

  describe('storage', () => {
    it('keys each row by the SHA-256 of the key and stores the raw key nowhere', () => {
      const db = new Database(directory.path(`hash-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db });
        const key = `-tenant-42:${randomUUID()}`;
        const token = tokenOf(backend.acquire(key, FINGERPRINT, LEASE_MS));
        expect(backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
        const row = db
          .prepare(`SELECT hex(key_hash) AS hash, quote(fingerprint) || token || headers || quote(body) AS whole
            FROM "${DEFAULT_SQLITE_TABLE}"`)
          .get() as { hash: string; whole: string | null };
        expect(row.hash.toLowerCase()).toBe(createHash('sha256').update(key).digest('hex'));
        expect(String(row.whole)).not.toContain('tenant-42');
      } finally {
        db.close();
      }
    });

    it('stores a record without its response and answers it as completed with response null', () => {
      const db = new Database(directory.path(`no-response-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db });
        const key = randomUUID();
        const token = tokenOf(backend.acquire(key, FINGERPRINT, LEASE_MS));
        const createdAt = Date.now();
        expect(
          backend.complete(key, token, { fingerprint: FINGERPRINT, createdAt, response: null }, 60_000),
        ).toBe(true);
        expect(backend.acquire(key, FINGERPRINT, LEASE_MS)).toEqual({
          state: 'completed',
          record: { fingerprint: FINGERPRINT, createdAt, response: null },
        });
      } finally {
        db.close();
      }
    });
  });

  describe('sweeping', () => {
    it('keeps the row count bounded under a stream of expiring keys and crashed holders', async () => {
      const db = new Database(directory.path(`sweep-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db });
        const forever = randomUUID();
        expect(
          backend.complete(
            forever,
            tokenOf(backend.acquire(forever, FINGERPRINT, LEASE_MS)),
            makeRecord(),
            null,
          ),
        ).toBe(true);
        const KEYS = 300;
        let most = 0;
        for (let i = 0; i < KEYS; i++) {
          const key = `stream-${i}-${randomUUID()}`;
          if (i % 10 === 0) {
            tokenOf(backend.acquire(key, FINGERPRINT, 5));
          } else {
            const token = tokenOf(backend.acquire(key, FINGERPRINT, LEASE_MS));
            expect(backend.complete(key, token, makeRecord(), 5)).toBe(true);
          }
          most = Math.max(most, rowCount(db));
          // Let time pass, as between requests: SQLite answers in microseconds, faster than any expiry.
          await sleep(1);
        }
        console.info(`SqliteBackend: at most ${most} rows while streaming ${KEYS} expiring keys`);
        expect(most).toBeLessThan(60);
        await sleep(20);
        expect(backend.sweep()).toBeGreaterThan(0);
        expect(rowCount(db)).toBe(1);
        expect((backend.acquire(forever, FINGERPRINT, LEASE_MS) as AcquireResult).state).toBe('completed');
      } finally {
        db.close();
      }
    });

    it('never sweeps a live lock or an unexpired record', () => {
      const db = new Database(directory.path(`sweep-live-${randomUUID()}.db`));
      try {
        const backend = new SqliteBackend({ database: db });
        const locked = randomUUID();
        tokenOf(backend.acquire(locked, FINGERPRINT, LEASE_MS));
        const done = randomUUID();
        expect(
          backend.complete(done, tokenOf(backend.acquire(done, FINGERPRINT, LEASE_MS)), makeRecord(), 60_000),
        ).toBe(true);
        expect(backend.sweep()).toBe(0);
        expect((backend.acquire(locked, FINGERPRINT, LEASE_MS) as AcquireResult).state).toBe('in-flight');
        expect((backend.acquire(done, FINGERPRINT, LEASE_MS) as AcquireResult).state).toBe('completed');
      } finally {
        db.close();
      }
    });
  });

  describe('several processes', () => {
    it('waits for another process’s write lock instead of failing with SQLITE_BUSY', async () => {
      const path = directory.path(`busy-${randomUUID()}.db`);
      const db = new Database(path);
      try {
        const backend = new SqliteBackend({ database: db });
        tokenOf(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        let locked: () => void = () => {};
        const lockTaken = new Promise<void>((resolve) => {
          locked = resolve;
        });
        const holder = runNode(
          [
            '-e',
            `const D = require('better-sqlite3'); const db = new D(${JSON.stringify(path)});
             db.exec('BEGIN IMMEDIATE'); console.log('locked');
             setTimeout(() => { db.exec('COMMIT'); db.close(); }, 400);`,
          ],
          (stdout) => {
            if (stdout.includes('locked')) locked();
          },
        );
        await lockTaken;
        const started = performance.now();
        tokenOf(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
        expect(performance.now() - started).toBeGreaterThan(200);
        await holder;
      } finally {
        db.close();
      }
    });

    it('lets 4 processes opening a new file at once and racing over 2000 keys win each key exactly once', async () => {
      const path = directory.path(`processes-${randomUUID()}.db`);
      const KEYS = 2000;
      const children = Array.from({ length: 4 }, (_, p) =>
        spawn(
          process.execPath,
          [
            '--import',
            'tsx',
            'test/backends/fixtures/sqlite-acquirer.ts',
            path,
            DEFAULT_SQLITE_TABLE,
            String(KEYS),
            String(p * 5),
          ],
          { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] },
        ),
      );
      const outputs = children.map((child) => {
        let stdout = '';
        let stderr = '';
        child.stdout.on('data', (chunk: Buffer) => {
          stdout += chunk.toString();
        });
        child.stderr.on('data', (chunk: Buffer) => {
          stderr += chunk.toString();
        });
        const ready = new Promise<void>((resolve, reject) => {
          const onData = () => {
            if (!stdout.startsWith('ready\n')) return;
            child.stdout.off('data', onData);
            resolve();
          };
          child.stdout.on('data', onData);
          child.once('exit', (code) => reject(new Error(`exited with ${code} before ready:\n${stderr}`)));
        });
        const done = new Promise<string>((resolve, reject) => {
          child.once('exit', (code) => {
            if (code === 0) resolve(stdout.slice('ready\n'.length));
            else reject(new Error(`exited with ${code}:\n${stderr}`));
          });
        });
        return { ready, done };
      });
      try {
        // Every process has started and loaded its modules; then all of them go at once.
        await Promise.all(outputs.map(({ ready }) => ready));
        for (const child of children) child.stdin.write('go\n');
        const results = (await Promise.all(outputs.map(({ done }) => done))).map(
          (output) => JSON.parse(output) as { won: string[]; states: Record<string, number> },
        );
        const won = results.flatMap((result) => result.won);
        expect(won).toHaveLength(KEYS);
        expect(new Set(won).size).toBe(KEYS);
        for (const { states } of results) {
          expect((states.acquired ?? 0) + (states['in-flight'] ?? 0)).toBe(KEYS);
        }
        console.info(
          `SqliteBackend: keys won per process ${results.map((result) => result.won.length).join('/')}`,
        );
      } finally {
        for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
      }
    }, 60_000);
  });

  describe('options', () => {
    let db: Database.Database;

    beforeAll(() => {
      db = new Database(':memory:');
      return () => db.close();
    });

    it.each([
      ['undefined', undefined],
      ['null', null],
      ['an empty path', ''],
      ['an object without prepare', {}],
      ['a number', 3],
    ])('rejects %s as database with an error naming database', (_label, value) => {
      expect(() => new SqliteBackend({ database: value } as never)).toThrow(/`database`/);
    });

    it.each([
      ['a qualified name', 'main.keys'],
      ['a name with a dash', 'idempotency-keys'],
      ['a quote', 'keys"; DROP TABLE users; --'],
    ])('rejects %s as table with ERR_IDEMPOTENCY_OPTION naming table', (_label, table) => {
      expect(() => new SqliteBackend({ database: db, table })).toThrow(
        expect.objectContaining({
          code: 'ERR_IDEMPOTENCY_OPTION',
          message: expect.stringContaining('`table`'),
        }),
      );
    });

    it.each([
      ['negative', -1],
      ['fractional', 1.5],
      ['a string', '1000'],
    ])('rejects a %s busyTimeoutMs', (_label, busyTimeoutMs) => {
      expect(() => new SqliteBackend({ database: db, busyTimeoutMs: busyTimeoutMs as number })).toThrow(
        IdempotencyError,
      );
    });

    it('works on an in-memory database (one connection, no WAL)', () => {
      const backend = new SqliteBackend({ database: db });
      tokenOf(backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS));
    });
  });
});
