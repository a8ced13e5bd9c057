/**
 * The SQL backends as the adapter contract takes them (a {@link BackendHandle}): each on its own table or SQLite
 * file, dropped or removed afterwards.
 */
import { randomUUID } from 'node:crypto';
import Database from 'better-sqlite3';
import { MysqlBackend } from '../../src/backends/mysql.js';
import { PostgresBackend } from '../../src/backends/postgres.js';
import { SqliteBackend } from '../../src/backends/sqlite.js';
import type { BackendHandle } from './http.js';
import {
  dropMysqlTable,
  dropPostgresTable,
  mysqlPool,
  postgresPool,
  sqliteDirectory,
  uniqueTable,
} from './sql.js';

/** A {@link BackendHandle} on a SQL database, with the table its keys live in. */
export interface SqlBackendHandle extends BackendHandle {
  readonly table: string;
}

/** A {@link SqlBackendHandle} on a SQLite file, with the file's path. */
export interface SqliteFileHandle extends SqlBackendHandle {
  readonly path: string;
}

/** `PostgresBackend` on a pool of its own, on a table named after `label`. */
export async function createPostgresBackend(label: string): Promise<SqlBackendHandle> {
  const pool = postgresPool();
  const table = uniqueTable(`${label}_pg`);
  return {
    table,
    backend: new PostgresBackend({ pool, table }),
    async teardown() {
      await dropPostgresTable(pool, table);
      await pool.end();
    },
  };
}

/** `MysqlBackend` on a pool of its own, on a table named after `label`. */
export async function createMysqlBackend(label: string): Promise<SqlBackendHandle> {
  const pool = mysqlPool();
  const table = uniqueTable(`${label}_my`);
  return {
    table,
    backend: new MysqlBackend({ pool, table }),
    async teardown() {
      await dropMysqlTable(pool, table);
      await pool.end();
    },
  };
}

/** SQLite on a file the backend opens itself, as several processes on one machine would share it. */
export async function createSqlitePathBackend(label: string): Promise<SqliteFileHandle> {
  const directory = sqliteDirectory(`${label}-sqlite`);
  const path = directory.path('idempotency.db');
  const table = uniqueTable(`${label}_sq`);
  const backend = new SqliteBackend({ database: path, table });
  return {
    path,
    table,
    backend,
    async teardown() {
      backend.close();
      directory.remove();
    },
  };
}

/** SQLite through a `Database` the application opened: every backend call answers synchronously. */
export async function createSqliteDatabaseBackend(label: string): Promise<BackendHandle> {
  const directory = sqliteDirectory(`${label}-sqlite-db`);
  const db = new Database(directory.path(`${randomUUID()}.db`));
  return {
    backend: new SqliteBackend({ database: db }),
    async teardown() {
      db.close();
      directory.remove();
    },
  };
}
