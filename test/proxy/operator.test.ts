/**
 * `idempotency-header inspect` and `forget` as operators run them: the command line in a process of its own,
 * against keys that a backend in this process (or a running proxy) wrote to real Redis, PostgreSQL, MariaDB and
 * SQLite. A memory backend cannot be reached from another process, so it is refused.
 */
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MysqlBackend } from '../../src/backends/mysql.js';
import { PostgresBackend } from '../../src/backends/postgres.js';
import { RedisBackend } from '../../src/backends/redis.js';
import { SqliteBackend } from '../../src/backends/sqlite.js';
import { storageKeyOf } from '../../src/core/engine.js';
import type { Backend } from '../../src/core/types.js';
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
import { runCommand, startProxy, startUpstream } from './processes.js';

const redisUp = await requireRedis('inspect and forget on Redis');
const postgresUp = await requirePostgres('inspect and forget on PostgreSQL');
const mysqlUp = await requireMysql('inspect and forget on MariaDB');
const sqliteUp = await requireSqlite('inspect and forget on SQLite');

const FINGERPRINT = 'c'.repeat(64);

/** Runs the command line and parses its one JSON line. */
async function operator(args: string[], env: Record<string, string> = {}) {
  const { code, stdout, stderr } = await runCommand(args, env);
  const lines = stdout.split('\n').filter((line) => line.startsWith('{'));
  return {
    code,
    json: lines.length === 1 ? (JSON.parse(lines[0]!) as Record<string, unknown>) : undefined,
    stderr,
  };
}

/** Stores a completed record (201, 2-byte body, an hour's expiry) and takes a lock, under `scope`. */
async function seed(backend: Backend, scope?: string) {
  const done = randomUUID();
  const running = randomUUID();
  const createdAt = Date.UTC(2024, 0, 2, 3, 4, 5, 678);
  const taken = await backend.acquire(storageKeyOf(done, scope), FINGERPRINT, 30_000);
  if (taken.state !== 'acquired') throw new Error('not acquired');
  const record = {
    fingerprint: FINGERPRINT,
    createdAt,
    response: {
      status: 201,
      headers: [['content-type', 'application/json']] as [string, string][],
      body: Buffer.from('{}'),
    },
  };
  expect(await backend.complete(storageKeyOf(done, scope), taken.token, record, 3_600_000)).toBe(true);
  expect((await backend.acquire(storageKeyOf(running, scope), FINGERPRINT, 30_000)).state).toBe('acquired');
  return { done, running, createdAt };
}

/**
 * The same story on every backend: inspect a record, a lock and nothing; forget refuses the lock, forces it,
 * deletes the record; the key then holds nothing and runs again.
 */
function operatorStory(
  name: string,
  up: boolean,
  open: () => Promise<{ backend: Backend; args: string[]; close(): Promise<void> }>,
) {
  describe.runIf(up)(`inspect and forget on ${name}`, () => {
    let backend: Backend;
    let args: string[];
    let close: () => Promise<void>;

    beforeAll(async () => {
      ({ backend, args, close } = await open());
    });

    afterAll(async () => close?.());

    it('inspects a completed key, a key in flight and an unknown key, with exit codes 0, 0 and 1', async () => {
      const { done, running, createdAt } = await seed(backend, 'tenant-7');
      const completed = await operator(['inspect', done, ...args, '--scope', 'tenant-7']);
      expect(completed.code).toBe(0);
      expect(completed.json).toEqual({
        key: done,
        scope: 'tenant-7',
        keyHash: expect.stringMatching(/^[0-9a-f]{64}$/),
        state: 'completed',
        status: 201,
        fingerprint: FINGERPRINT,
        size: 2,
        storedAt: new Date(createdAt).toISOString(),
        expiresAt: expect.any(String),
      });
      const expiresIn = Date.parse(String(completed.json!.expiresAt)) - Date.now();
      expect(expiresIn).toBeGreaterThan(3_500_000);
      expect(expiresIn).toBeLessThanOrEqual(3_600_000);

      const inFlight = await operator(['inspect', running, ...args, '--scope', 'tenant-7']);
      expect(inFlight.code).toBe(0);
      expect(inFlight.json).toMatchObject({ state: 'in-flight', fingerprint: FINGERPRINT });
      expect(inFlight.json!.leaseLeftMs).toBeGreaterThan(10_000);

      // The same key without its scope is another key.
      const unscoped = await operator(['inspect', done, ...args]);
      expect(unscoped.code).toBe(1);
      expect(unscoped.json).toMatchObject({ key: done, scope: null, state: 'not-found' });
    });

    it('forgets a record (exit 0), refuses a running key (exit 4) unless --force, and finds nothing after', async () => {
      const { done, running } = await seed(backend);
      const refused = await operator(['forget', running, ...args]);
      expect(refused.code).toBe(4);
      expect(refused.json).toMatchObject({ forgotten: false, reason: 'in-flight' });
      expect(refused.stderr).toMatch(/--force/);
      expect((await backend.acquire(storageKeyOf(running), FINGERPRINT, 30_000)).state).toBe('in-flight');

      const forced = await operator(['forget', running, ...args, '--force']);
      expect(forced.code).toBe(0);
      expect(forced.json).toMatchObject({ forgotten: true, was: { state: 'in-flight' } });

      const forgotten = await operator(['forget', done, ...args]);
      expect(forgotten.code).toBe(0);
      expect(forgotten.json).toMatchObject({ forgotten: true, was: { state: 'completed', status: 201 } });
      expect((await operator(['forget', done, ...args])).code).toBe(1);
      expect((await operator(['inspect', done, ...args])).code).toBe(1);
      // Both keys run again.
      expect((await backend.acquire(storageKeyOf(done), FINGERPRINT, 30_000)).state).toBe('acquired');
      expect((await backend.acquire(storageKeyOf(running), FINGERPRINT, 30_000)).state).toBe('acquired');
    });
  });
}

operatorStory('Redis', redisUp, async () => {
  const redis = new Redis(REDIS_URL);
  const prefix = uniquePrefix('operator-cli');
  return {
    backend: new RedisBackend({ redis, prefix }),
    args: ['--backend', REDIS_URL, '--prefix', prefix],
    async close() {
      await deleteKeysWithPrefix(redis, prefix);
      await redis.quit();
    },
  };
});

operatorStory('PostgreSQL', postgresUp, async () => {
  const pool = postgresPool();
  const table = uniqueTable('operator_cli');
  return {
    backend: new PostgresBackend({ pool, table }),
    args: ['--backend', POSTGRES_URL, '--table', table],
    async close() {
      await dropPostgresTable(pool, table);
      await pool.end();
    },
  };
});

operatorStory('MariaDB', mysqlUp, async () => {
  const pool = mysqlPool();
  const table = uniqueTable('operator_cli');
  return {
    backend: new MysqlBackend({ pool, table }),
    args: ['--backend', MYSQL_URL, '--table', table],
    async close() {
      await dropMysqlTable(pool, table);
      await pool.end();
    },
  };
});

operatorStory('SQLite', sqliteUp, async () => {
  const directory = sqliteDirectory('operator-cli');
  const file = directory.path('keys.db');
  const backend = new SqliteBackend({ database: file });
  return {
    backend,
    args: ['--backend', `sqlite:${file}`],
    async close() {
      backend.close();
      directory.remove();
    },
  };
});

describe.runIf(redisUp)('inspect and forget beside a running proxy', () => {
  it('finds what the proxy stored under its --scope-header scope, and forgetting it lets the upstream run again', async () => {
    const prefix = uniquePrefix('operator-proxy');
    const redis = new Redis(REDIS_URL);
    const upstream = await startUpstream();
    const env = {
      IDEMPOTENCY_BACKEND: REDIS_URL,
      IDEMPOTENCY_PREFIX: prefix,
      IDEMPOTENCY_SCOPE_HEADER: 'x-api-key',
    };
    const proxy = await startProxy(['--upstream', upstream.url], env);
    try {
      const key = randomUUID();
      const post = () =>
        fetch(`${proxy.url}/orders`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': key, 'x-api-key': 'secret-1' },
          body: '{"item":1}',
        });
      expect((await post()).status).toBe(201);

      // The operator's command reads the proxy's own environment: backend, prefix, scope headers.
      const found = await operator(['inspect', key, '--header', 'X-Api-Key: secret-1'], env);
      expect(found.code).toBe(0);
      expect(found.json).toMatchObject({ state: 'completed', status: 201 });
      expect(found.json!.scope).toMatch(/^[0-9a-f]{64}$/);
      // The proxy logs the same keyHash for the request.
      expect(proxy.lines().some((line) => line.keyHash === found.json!.keyHash)).toBe(true);
      expect((await operator(['inspect', key, '--header', 'x-api-key: another'], env)).code).toBe(1);

      expect((await operator(['forget', key, '--header', 'x-api-key: secret-1'], env)).code).toBe(0);
      const again = await post();
      expect(again.status).toBe(201);
      expect(again.headers.get('idempotent-replayed')).toBeNull();
      expect((await upstream.counts())[key]).toBe(2);
    } finally {
      await proxy.stop();
      await upstream.stop();
      await deleteKeysWithPrefix(redis, prefix);
      await redis.quit();
    }
  });
});

describe('inspect and forget command lines', () => {
  it('prints help for each command, with its flags and exit codes', async () => {
    for (const command of ['inspect', 'forget']) {
      const { code, stdout } = await runCommand([command, '--help']);
      expect(code).toBe(0);
      expect(stdout).toContain(`idempotency-header ${command} KEY --backend SPEC`);
      expect(stdout).toMatch(/Exit codes: 0 found/);
      expect(/^ {2}--force /m.test(stdout)).toBe(command === 'forget');
    }
    expect((await runCommand(['--help'])).stdout).toMatch(/idempotency-header inspect KEY/);
  });

  it('refuses a missing key, a memory backend, an unknown flag and --header without --scope-header (exit 2)', async () => {
    for (const args of [
      ['inspect', '--backend', REDIS_URL],
      ['inspect', 'k'],
      ['forget', 'k', '--backend', 'memory'],
      ['inspect', 'k', '--backend', REDIS_URL, '--force'],
      ['inspect', 'k', '--backend', REDIS_URL, '--header', 'x-api-key: a'],
      ['inspect', 'k', '--backend', 'postgres://postgres@127.0.0.1:1/test', '--table', 'bad;name'],
    ]) {
      const { code, stderr } = await runCommand(args);
      expect(code, args.join(' ')).toBe(2);
      expect(stderr).toMatch(/^idempotency-header: /);
    }
  });

  it('names the flag at fault: an unknown one even without a value, a switch of forget given to inspect', async () => {
    const cases: [string[], RegExp][] = [
      [['inspect', 'k', '--backend', REDIS_URL, '--bogus'], /Unknown flag --bogus/],
      [['inspect', 'k', '--backend', REDIS_URL, '--force'], /--force is a flag of forget, not of inspect/],
      [['forget', 'k', '--backend', REDIS_URL, '--force=yes'], /--force takes no value/],
      [['inspect', 'k', '--backend'], /--backend needs a value/],
    ];
    for (const [args, message] of cases) {
      const { code, stderr } = await runCommand(args);
      expect(code, args.join(' ')).toBe(2);
      expect(stderr).toMatch(message);
    }
  });

  it.runIf(redisUp)('reads a key after --, dash and all, and takes --no-force as no force', async () => {
    const prefix = uniquePrefix('operator-dash');
    const redis = new Redis(REDIS_URL);
    const backend = new RedisBackend({ redis, prefix });
    const flags = ['--backend', REDIS_URL, '--prefix', prefix];
    try {
      const inspected = await operator(['inspect', ...flags, '--', '-dash']);
      expect(inspected.code).toBe(1);
      expect(inspected.json).toMatchObject({ key: '-dash', state: 'not-found' });
      expect((await backend.acquire(storageKeyOf('held'), FINGERPRINT, 30_000)).state).toBe('acquired');
      expect((await operator(['forget', 'held', ...flags, '--no-force'])).code).toBe(4);
    } finally {
      await deleteKeysWithPrefix(redis, prefix);
      await redis.quit();
    }
  });

  it.runIf(postgresUp && mysqlUp)(
    'never creates a table it is asked to read: a missing one is an error (exit 3)',
    async () => {
      const postgres = postgresPool();
      const mysql = mysqlPool();
      const table = uniqueTable('operator_missing');
      try {
        for (const url of [POSTGRES_URL, MYSQL_URL]) {
          for (const command of ['inspect', 'forget']) {
            const { code, stderr } = await runCommand([command, 'k', '--backend', url, '--table', table]);
            expect(code, `${command} ${url}`).toBe(3);
            expect(stderr).toMatch(/the backend failed: .*(does not exist|doesn't exist)/);
          }
        }
        const pgTables = await postgres.query('SELECT 1 FROM pg_tables WHERE tablename = $1', [table]);
        expect(pgTables.rowCount).toBe(0);
        const [mysqlTables] = await mysql.query('SHOW TABLES LIKE ?', [table]);
        expect(mysqlTables).toEqual([]);
      } finally {
        await dropPostgresTable(postgres, table);
        await dropMysqlTable(mysql, table);
        await postgres.end();
        await mysql.end();
      }
    },
  );

  it.runIf(sqliteUp)('never creates the SQLite file it is asked to read (exit 2, naming it)', async () => {
    const directory = sqliteDirectory('operator-missing');
    try {
      const path = directory.path('typo.db');
      const { code, stderr } = await runCommand(['inspect', 'k', '--backend', `sqlite:${path}`]);
      expect(code).toBe(2);
      expect(stderr).toMatch(/no such file/);
      expect(existsSync(path)).toBe(false);
    } finally {
      directory.remove();
    }
  });

  it.runIf(postgresUp)('exits 3 when the backend cannot be reached', async () => {
    const { code, stderr } = await runCommand([
      'inspect',
      'k',
      '--backend',
      'postgres://postgres@127.0.0.1:1/test',
    ]);
    expect(code).toBe(3);
    expect(stderr).toMatch(/the backend failed/);
  });
});
