/**
 * The backends the chaos tests share between processes (Redis on ioredis, PostgreSQL, MariaDB, a SQLite file),
 * each set up for one run: the chaos fixture server's environment to reach it, a backend on the same keys in the
 * test's own process, and the clean-up of what the run created, and only that.
 */
import type { Backend } from '../../../src/core/types.js';
import { REDIS_URL, requireRedis } from '../../support/redis.js';
import { createIoredisBackend } from '../../support/redis-handle.js';
import { MYSQL_URL, POSTGRES_URL, requireMysql, requirePostgres, requireSqlite } from '../../support/sql.js';
import {
  createMysqlBackend,
  createPostgresBackend,
  createSqlitePathBackend,
} from '../../support/sql-backends.js';

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
  /** Sets it up for one run; `label` (letters, digits, `_`) names the run's keys, table or file. */
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
        const { backend, prefix, teardown } = await createIoredisBackend(label);
        return {
          env: { CHAOS_BACKEND: 'ioredis', REDIS_URL, IDEMPOTENCY_PREFIX: prefix },
          backend,
          close: teardown,
        };
      },
    },
    {
      name: 'PostgresBackend',
      reported: 'PostgresBackend',
      enabled: await requirePostgres(`${what} on PostgreSQL`),
      async setup(label) {
        const { backend, table, teardown } = await createPostgresBackend(label);
        return {
          env: { CHAOS_BACKEND: 'postgres', DATABASE_URL: POSTGRES_URL, IDEMPOTENCY_TABLE: table },
          backend,
          close: teardown,
        };
      },
    },
    {
      name: 'MysqlBackend (MariaDB)',
      reported: 'MysqlBackend',
      enabled: await requireMysql(`${what} on MariaDB`),
      async setup(label) {
        const { backend, table, teardown } = await createMysqlBackend(label);
        return {
          env: { CHAOS_BACKEND: 'mysql', MYSQL_URL, IDEMPOTENCY_TABLE: table },
          backend,
          close: teardown,
        };
      },
    },
    {
      name: 'SqliteBackend (a file)',
      reported: 'SqliteBackend',
      enabled: await requireSqlite(`${what} on SQLite`),
      async setup(label) {
        const { backend, path, table, teardown } = await createSqlitePathBackend(label);
        return {
          env: { CHAOS_BACKEND: 'sqlite', SQLITE_PATH: path, IDEMPOTENCY_TABLE: table },
          backend,
          close: teardown,
        };
      },
    },
  ];
}
