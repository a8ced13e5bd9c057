/**
 * The backends the chaos tests share between processes (Redis on ioredis, PostgreSQL, MariaDB, a SQLite file),
 * each set up for one run: the chaos fixture server's environment to reach it, a backend on the same keys in the
 * test's own process, and the clean-up of what the run created, and only that.
 */
import { Redis } from 'ioredis';
import { MysqlBackend } from '../../../src/backends/mysql.js';
import { PostgresBackend } from '../../../src/backends/postgres.js';
import { RedisBackend } from '../../../src/backends/redis.js';
import { SqliteBackend } from '../../../src/backends/sqlite.js';
import type { Backend } from '../../../src/core/types.js';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from '../../support/redis.js';
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
} from '../../support/sql.js';

/** One backend set up for a run. */
export interface SharedBackend {
  /** The fixture server's environment (`fixtures/ledger-server.ts`): which backend, and the run's keys. */
  env: Record<string, string>;
  /** The same backend on the same keys, in this process. */
  backend: Backend;
  /** Deletes what the run created (its keys, table or file), and only that; closes the connections. */
  close(): Promise<void>;
}

export interface SharedBackendKind {
  name: string;
  /** The backend class a fixture server reports. */
  reported: string;
  /** Whether its service answers (or its driver loads); when not, a suite on it is skipped, loudly. */
  enabled: boolean;
  /** Sets it up for one run; `label` names the run's keys, table or file. */
  setup(label: string): Promise<SharedBackend>;
}

/** The shared backends, each checked for: `what` names the tests that need them in the warning when one is down. */
export async function sharedBackends(what: string): Promise<SharedBackendKind[]> {
  return [
    {
      name: 'RedisBackend (ioredis)',
      reported: 'RedisBackend',
      enabled: await requireRedis(`${what} on Redis`),
      async setup(label) {
        const redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 });
        redis.on('error', () => {});
        await redis.connect();
        const prefix = uniquePrefix(label);
        return {
          env: { CHAOS_BACKEND: 'ioredis', REDIS_URL, IDEMPOTENCY_PREFIX: prefix },
          backend: new RedisBackend({ redis, prefix }),
          async close() {
            await deleteKeysWithPrefix(redis, prefix);
            redis.disconnect();
          },
        };
      },
    },
    {
      name: 'PostgresBackend',
      reported: 'PostgresBackend',
      enabled: await requirePostgres(`${what} on PostgreSQL`),
      async setup(label) {
        const pool = postgresPool({ max: 4 });
        const table = uniqueTable(tableLabel(label));
        return {
          env: { CHAOS_BACKEND: 'postgres', DATABASE_URL: POSTGRES_URL, IDEMPOTENCY_TABLE: table },
          backend: new PostgresBackend({ pool, table }),
          async close() {
            await dropPostgresTable(pool, table);
            await pool.end();
          },
        };
      },
    },
    {
      name: 'MysqlBackend (MariaDB)',
      reported: 'MysqlBackend',
      enabled: await requireMysql(`${what} on MariaDB`),
      async setup(label) {
        const pool = mysqlPool({ connectionLimit: 4 });
        const table = uniqueTable(tableLabel(label));
        return {
          env: { CHAOS_BACKEND: 'mysql', MYSQL_URL, IDEMPOTENCY_TABLE: table },
          backend: new MysqlBackend({ pool, table }),
          async close() {
            await dropMysqlTable(pool, table);
            await pool.end();
          },
        };
      },
    },
    {
      name: 'SqliteBackend (a file)',
      reported: 'SqliteBackend',
      enabled: await requireSqlite(`${what} on SQLite`),
      async setup(label) {
        const directory = sqliteDirectory(label);
        const path = directory.path('idempotency.db');
        const table = uniqueTable(tableLabel(label));
        const backend = new SqliteBackend({ database: path, table });
        return {
          env: { CHAOS_BACKEND: 'sqlite', SQLITE_PATH: path, IDEMPOTENCY_TABLE: table },
          backend,
          async close() {
            backend.close();
            directory.remove();
          },
        };
      },
    },
  ];
}

/** A run's label as part of a table name. */
function tableLabel(label: string): string {
  return label.replaceAll('-', '_');
}
