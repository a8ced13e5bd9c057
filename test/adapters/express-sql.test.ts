/**
 * The adapter contract over HTTP with the SQL backends on real databases: PostgreSQL (DATABASE_URL), MariaDB or
 * MySQL (MYSQL_URL) and a SQLite file. Every rule the in-memory runs check, with the locks and records living in
 * a table. Each run creates its own table and drops it (or its SQLite file) afterwards.
 */
import { randomUUID } from 'node:crypto';
import Database from 'better-sqlite3';
import express from 'express';
import { describe } from 'vitest';
import { MysqlBackend } from '../../src/backends/mysql.js';
import { PostgresBackend } from '../../src/backends/postgres.js';
import { SqliteBackend } from '../../src/backends/sqlite.js';
import { type BackendHandle, createExpressServerFactory, express4 } from '../support/http.js';
import {
  dropMysqlTable,
  dropPostgresTable,
  mysqlPool,
  postgresPool,
  requireMysql,
  requirePostgres,
  requireSqlite,
  sqliteDirectory,
  uniqueTable,
} from '../support/sql.js';
import { describeAdapterContract } from './contract.js';

const postgresUp = await requirePostgres('Express adapter contract on PostgresBackend');
const mysqlUp = await requireMysql('Express adapter contract on MysqlBackend');
const sqliteLoads = await requireSqlite('Express adapter contract on SqliteBackend');

async function postgresBackend(): Promise<BackendHandle> {
  const pool = postgresPool();
  const table = uniqueTable('express_pg');
  return {
    backend: new PostgresBackend({ pool, table }),
    async teardown() {
      await dropPostgresTable(pool, table);
      await pool.end();
    },
  };
}

async function mysqlBackend(): Promise<BackendHandle> {
  const pool = mysqlPool();
  const table = uniqueTable('express_my');
  return {
    backend: new MysqlBackend({ pool, table }),
    async teardown() {
      await dropMysqlTable(pool, table);
      await pool.end();
    },
  };
}

/** SQLite on a file the backend opens itself, as several processes on one machine would share it. */
async function sqlitePathBackend(): Promise<BackendHandle> {
  const directory = sqliteDirectory('express-sqlite');
  const backend = new SqliteBackend({ database: directory.path('idempotency.db') });
  return {
    backend,
    async teardown() {
      backend.close();
      directory.remove();
    },
  };
}

/** SQLite through a `Database` the application opened: every backend call answers synchronously. */
async function sqliteDatabaseBackend(): Promise<BackendHandle> {
  const directory = sqliteDirectory('express-sqlite-db');
  const db = new Database(directory.path(`${randomUUID()}.db`));
  return {
    backend: new SqliteBackend({ database: db }),
    async teardown() {
      db.close();
      directory.remove();
    },
  };
}

describe.runIf(postgresUp)('Express adapter on PostgresBackend', () => {
  describeAdapterContract('Express 5, PostgreSQL', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: postgresBackend,
  });
  describeAdapterContract('Express 4, body parsers after the middleware, PostgreSQL', {
    createServer: createExpressServerFactory(express4, 'after'),
    createBackend: postgresBackend,
  });
});

describe.runIf(mysqlUp)('Express adapter on MysqlBackend', () => {
  describeAdapterContract('Express 5, MariaDB/MySQL', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: mysqlBackend,
  });
});

describe.runIf(sqliteLoads)('Express adapter on SqliteBackend', () => {
  describeAdapterContract('Express 5, SQLite file', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: sqlitePathBackend,
  });
  describeAdapterContract('Express 4, body parsers after the middleware, SQLite Database', {
    createServer: createExpressServerFactory(express4, 'after'),
    createBackend: sqliteDatabaseBackend,
  });
});
