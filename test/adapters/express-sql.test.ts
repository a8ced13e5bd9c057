/**
 * The adapter contract over HTTP with the SQL backends on real databases: PostgreSQL (DATABASE_URL), MariaDB or
 * MySQL (MYSQL_URL) and a SQLite file. Every rule the in-memory runs check, with the locks and records living in
 * a table. Each run creates its own table and drops it (or its SQLite file) afterwards.
 */
import express from 'express';
import { describe } from 'vitest';
import { createExpressServerFactory, express4 } from '../support/http.js';
import { requireMysql, requirePostgres, requireSqlite } from '../support/sql.js';
import {
  createMysqlBackend,
  createPostgresBackend,
  createSqliteDatabaseBackend,
  createSqlitePathBackend,
} from '../support/sql-backends.js';
import { describeAdapterContract } from './contract.js';

const postgresUp = await requirePostgres('Express adapter contract on PostgresBackend');
const mysqlUp = await requireMysql('Express adapter contract on MysqlBackend');
const sqliteLoads = await requireSqlite('Express adapter contract on SqliteBackend');

describe.runIf(postgresUp)('Express adapter on PostgresBackend', () => {
  describeAdapterContract('Express 5, PostgreSQL', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: () => createPostgresBackend('express'),
  });
  describeAdapterContract('Express 4, body parsers after the middleware, PostgreSQL', {
    createServer: createExpressServerFactory(express4, 'after'),
    createBackend: () => createPostgresBackend('express'),
  });
});

describe.runIf(mysqlUp)('Express adapter on MysqlBackend', () => {
  describeAdapterContract('Express 5, MariaDB/MySQL', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: () => createMysqlBackend('express'),
  });
  describeAdapterContract('Express 4, body parsers after the middleware, MariaDB/MySQL', {
    createServer: createExpressServerFactory(express4, 'after'),
    createBackend: () => createMysqlBackend('express'),
  });
});

describe.runIf(sqliteLoads)('Express adapter on SqliteBackend', () => {
  describeAdapterContract('Express 5, SQLite file', {
    createServer: createExpressServerFactory(express, 'before'),
    createBackend: () => createSqlitePathBackend('express'),
  });
  describeAdapterContract('Express 4, body parsers after the middleware, SQLite Database', {
    createServer: createExpressServerFactory(express4, 'after'),
    createBackend: () => createSqliteDatabaseBackend('express'),
  });
});
