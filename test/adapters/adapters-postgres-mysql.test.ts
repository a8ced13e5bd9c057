/**
 * The adapter contract of Fastify, Hono, Koa, fetch, NestJS and `node:http` on PostgreSQL and MariaDB/MySQL (see
 * `sql-matrix.ts` for which adapter runs on which).
 */
import { describeSqlContracts } from './sql-matrix.js';

describeSqlContracts((backend) => backend === 'postgres' || backend === 'mysql');
