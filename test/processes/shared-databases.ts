/**
 * The databases that copies of the Express example share across processes, as the process tests set them up: the
 * example's environment for one, the order sequence it counts executions with (in the same database), and the
 * clean-up of what the run created, and only that.
 */
import { Redis } from 'ioredis';
import { deleteKeysWithPrefix, REDIS_URL } from '../support/redis.js';
import {
  dropMysqlTable,
  dropPostgresTable,
  MYSQL_URL,
  mysqlPool,
  POSTGRES_URL,
  postgresPool,
  sqliteDirectory,
} from '../support/sql.js';

/** One database for a run, named by `table` (a table name, or the key prefix on Redis). */
export interface SharedDatabase {
  /** The backend class the example must report. */
  backend: string;
  /** The example's environment: which backend, where, which table. */
  env(table: string): Record<string, string>;
  /** The order sequence's value: how many times any process ran the handler. */
  sequence(table: string): Promise<number>;
  /** Drops the run's tables, keys or file, and closes connections. */
  cleanup(table: string): Promise<void>;
}

export function postgresDatabase(): SharedDatabase {
  const pool = postgresPool();
  return {
    backend: 'PostgresBackend',
    env: (table) => ({
      IDEMPOTENCY_BACKEND: 'postgres',
      DATABASE_URL: POSTGRES_URL,
      IDEMPOTENCY_TABLE: table,
    }),
    async sequence(table) {
      const { rows } = await pool.query(`SELECT n FROM "${table}_orders" WHERE id = 1`);
      return Number(rows[0]?.n);
    },
    async cleanup(table) {
      await dropPostgresTable(pool, table);
      await dropPostgresTable(pool, `${table}_orders`);
      await pool.end();
    },
  };
}

export function mysqlDatabase(): SharedDatabase {
  const pool = mysqlPool();
  return {
    backend: 'MysqlBackend',
    env: (table) => ({ IDEMPOTENCY_BACKEND: 'mysql', MYSQL_URL, IDEMPOTENCY_TABLE: table }),
    async sequence(table) {
      const [rows] = await pool.query(`SELECT n FROM \`${table}_orders\` WHERE id = 1`);
      return Number((rows as { n: number }[])[0]?.n);
    },
    async cleanup(table) {
      await dropMysqlTable(pool, table);
      await dropMysqlTable(pool, `${table}_orders`);
      await pool.end();
    },
  };
}

/** A SQLite file in a directory of the run's own, removed with it. */
export function sqliteDatabase(label: string): SharedDatabase {
  const directory = sqliteDirectory(label);
  const path = directory.path('idempotency.db');
  return {
    backend: 'SqliteBackend',
    env: (table) => ({ IDEMPOTENCY_BACKEND: 'sqlite', SQLITE_PATH: path, IDEMPOTENCY_TABLE: table }),
    async sequence(table) {
      const { default: Database } = await import('better-sqlite3');
      const db = new Database(path, { readonly: true });
      try {
        return (db.prepare(`SELECT n FROM "${table}_orders" WHERE id = 1`).get() as { n: number }).n;
      } finally {
        db.close();
      }
    },
    async cleanup() {
      directory.remove();
    },
  };
}

/** Redis, the example's default backend; `table` is the run's key prefix. */
export function redisDatabase(): SharedDatabase {
  const redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 });
  redis.on('error', () => {});
  return {
    backend: 'RedisBackend',
    env: (prefix) => ({ REDIS_URL, IDEMPOTENCY_PREFIX: prefix }),
    async sequence(prefix) {
      return Number(await redis.get(`${prefix}example:order-sequence`));
    },
    async cleanup(prefix) {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    },
  };
}
