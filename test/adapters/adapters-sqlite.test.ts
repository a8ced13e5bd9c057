/**
 * The adapter contract of Fastify, Hono, Koa, fetch, NestJS and `node:http` on SQLite (see `sql-matrix.ts` for
 * which adapter runs on which).
 */
import { describeSqlContracts } from './sql-matrix.js';

describeSqlContracts((backend) => backend === 'sqlite-file' || backend === 'sqlite-database');
