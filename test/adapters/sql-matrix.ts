/**
 * Which adapter runs the adapter contract on which SQL backend (Express's runs are in `express-sql.test.ts`):
 * each adapter on an asynchronous backend that opens a transaction per request (PostgreSQL or MariaDB/MySQL) and on
 * SQLite, through a `Database` the app opened (every call answered synchronously) or on a file the backend opens
 * on first use; every backend meets several adapters. Split over two test files, so that the runs share the
 * workers. Each run creates its own table and drops it (or its SQLite file) afterwards.
 */
import Koa from 'koa';
import { describe } from 'vitest';
import { createFastifyServerFactory } from '../support/fastify.js';
import { createFetchServerFactory, createHonoServerFactory } from '../support/hono.js';
import { type BackendHandle, createNodeServerFactory, type ServerFactory } from '../support/http.js';
import { createKoaServerFactory, koa3 } from '../support/koa.js';
import { createNestServerFactory } from '../support/nestjs.js';
import { requireMysql, requirePostgres, requireSqlite } from '../support/sql.js';
import {
  createMysqlBackend,
  createPostgresBackend,
  createSqliteDatabaseBackend,
  createSqlitePathBackend,
} from '../support/sql-backends.js';
import { describeAdapterContract } from './contract.js';

const postgresUp = await requirePostgres('Adapter contracts on PostgresBackend');
const mysqlUp = await requireMysql('Adapter contracts on MysqlBackend');
const sqliteLoads = await requireSqlite('Adapter contracts on SqliteBackend');

export type SqlBackend = 'postgres' | 'mysql' | 'sqlite-file' | 'sqlite-database';

const BACKENDS: Record<
  SqlBackend,
  { name: string; up: boolean; create: (label: string) => Promise<BackendHandle> }
> = {
  postgres: { name: 'PostgreSQL', up: postgresUp, create: createPostgresBackend },
  mysql: { name: 'MariaDB/MySQL', up: mysqlUp, create: createMysqlBackend },
  'sqlite-file': { name: 'SQLite file', up: sqliteLoads, create: createSqlitePathBackend },
  'sqlite-database': { name: 'SQLite Database', up: sqliteLoads, create: createSqliteDatabaseBackend },
};

interface AdapterUnderTest {
  name: string;
  /** Table and file names of its runs. */
  label: string;
  createServer: ServerFactory;
  backends: SqlBackend[];
}

const ADAPTERS: AdapterUnderTest[] = [
  {
    name: 'Fastify 5',
    label: 'fastify',
    createServer: createFastifyServerFactory(),
    backends: ['postgres', 'mysql', 'sqlite-file'],
  },
  {
    name: 'Hono 4 on @hono/node-server',
    label: 'hono',
    createServer: createHonoServerFactory(),
    backends: ['postgres', 'sqlite-database'],
  },
  {
    name: 'Koa 3, body parser before the middleware',
    label: 'koa',
    createServer: createKoaServerFactory(koa3, 'before'),
    backends: ['postgres', 'sqlite-file'],
  },
  {
    name: 'Koa 2, body parser after the middleware',
    label: 'koa2',
    createServer: createKoaServerFactory(Koa, 'after'),
    backends: ['mysql', 'sqlite-database'],
  },
  {
    name: 'fetch withIdempotency on @hono/node-server',
    label: 'fetch',
    createServer: createFetchServerFactory(),
    backends: ['postgres', 'sqlite-file'],
  },
  {
    name: 'NestJS 11 on express',
    label: 'nest_express',
    createServer: createNestServerFactory('express'),
    backends: ['postgres', 'sqlite-file'],
  },
  {
    name: 'NestJS 11 on fastify',
    label: 'nest_fastify',
    createServer: createNestServerFactory('fastify'),
    backends: ['mysql', 'sqlite-database'],
  },
  {
    name: 'node:http withIdempotency',
    label: 'node',
    createServer: createNodeServerFactory(),
    backends: ['postgres', 'mysql', 'sqlite-database'],
  },
];

/** Declares the contract runs of every adapter on the backends `which` accepts. */
export function describeSqlContracts(which: (backend: SqlBackend) => boolean): void {
  for (const { name, label, createServer, backends } of ADAPTERS) {
    const chosen = backends.filter(which);
    if (chosen.length === 0) continue;
    describe(`${name} on the SQL backends`, () => {
      for (const kind of chosen) {
        const backend = BACKENDS[kind];
        describe.runIf(backend.up)(backend.name, () => {
          describeAdapterContract(`${name}, ${backend.name}`, {
            createServer,
            createBackend: () => backend.create(label),
          });
        });
      }
    });
  }
}
