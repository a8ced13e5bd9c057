/**
 * Every backend refuses an option name it does not know at construction, naming it, as the middleware does: a
 * misspelt `prefix` or `table` would otherwise put the keys under the default one in silence.
 */
import { Redis } from 'ioredis';
import mysql from 'mysql2/promise';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { MysqlBackend } from '../../src/backends/mysql.js';
import { PostgresBackend } from '../../src/backends/postgres.js';
import { RedisBackend } from '../../src/backends/redis.js';
import { SqliteBackend } from '../../src/backends/sqlite.js';
import { IdempotencyError } from '../../src/core/errors.js';
import { REDIS_URL } from '../support/redis.js';
import { MYSQL_URL, POSTGRES_URL } from '../support/sql.js';

// Clients that connect only when used: constructing a backend sends nothing.
const redis = new Redis(REDIS_URL, { lazyConnect: true });
const postgres = new pg.Pool({ connectionString: POSTGRES_URL });
const mariadb = mysql.createPool({ uri: MYSQL_URL });

afterAll(async () => {
  redis.disconnect();
  await postgres.end();
  await mariadb.end();
});

const CASES: readonly [string, () => unknown, string][] = [
  ['MemoryBackend', () => new MemoryBackend({ maxEntrys: 5 } as never), 'maxEntrys'],
  ['RedisBackend', () => new RedisBackend({ redis, prefx: 'billing:' } as never), 'prefx'],
  ['PostgresBackend', () => new PostgresBackend({ pool: postgres, tabel: 'x' } as never), 'tabel'],
  ['MysqlBackend', () => new MysqlBackend({ pool: mariadb, tabel: 'x' } as never), 'tabel'],
  ['SqliteBackend', () => new SqliteBackend({ database: ':memory:', tabel: 'x' } as never), 'tabel'],
];

describe('backend option names', () => {
  it.each(CASES)('%s refuses a misspelt option, naming it', (_name, construct, misspelt) => {
    let error: unknown;
    try {
      construct();
    } catch (caught) {
      error = caught;
    }
    expect(error).toBeInstanceOf(IdempotencyError);
    expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_OPTION');
    expect((error as Error).message).toContain(`\`${misspelt}\``);
    expect((error as Error).message).toContain('no such option');
  });

  it('takes every documented option', () => {
    new MemoryBackend({ maxEntries: 5, maxBytes: 1_000_000, sweepIntervalMs: 1000 }).close();
    new RedisBackend({ redis, prefix: 'p:', notifications: false });
    new PostgresBackend({
      pool: postgres,
      table: 't',
      createTable: false,
      transactional: false,
      notifications: false,
    });
    new MysqlBackend({ pool: mariadb, table: 't', createTable: false, returning: false });
    new SqliteBackend({ database: ':memory:', table: 't', createTable: false, busyTimeoutMs: 100 }).close();
  });
});
