/**
 * Helpers for tests that need the shared PostgreSQL (`DATABASE_URL`) or MariaDB/MySQL (`MYSQL_URL`) server, or a
 * SQLite file.
 *
 * Tests never touch tables they did not create: each run works in its own {@link uniqueTable} and drops only that
 * table ({@link dropPostgresTable}, {@link dropMysqlTable}); SQLite files live in their own temporary directory.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mysql from 'mysql2/promise';
import pg from 'pg';
import { IS_CI } from './redis.js';

/** The PostgreSQL server the tests use: `DATABASE_URL`, or the local default (user postgres, database test). */
export const POSTGRES_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

/** The MariaDB or MySQL server the tests use: `MYSQL_URL`, or the local default (root, database test). */
export const MYSQL_URL = process.env.MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test';

/** A table name unique to this run: `label` plus random hex, a valid unquoted identifier everywhere. */
export function uniqueTable(label = 'test'): string {
  return `idem_${label}_${randomBytes(6).toString('hex')}`;
}

/** A `pg` pool on {@link POSTGRES_URL} that fails fast when the server is away. */
export function postgresPool(options: pg.PoolConfig = {}): pg.Pool {
  const pool = new pg.Pool({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 2000, ...options });
  pool.on('error', () => {});
  return pool;
}

/** A `mysql2/promise` pool on {@link MYSQL_URL}. */
export function mysqlPool(options: mysql.PoolOptions = {}): mysql.Pool {
  return mysql.createPool({ uri: MYSQL_URL, connectTimeout: 2000, ...options });
}

async function postgresAnswers(): Promise<boolean> {
  const client = new pg.Client({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 2000 });
  client.on('error', () => {});
  try {
    await client.connect();
    await client.query('SELECT 1');
    return true;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => {});
  }
}

async function mysqlAnswers(): Promise<boolean> {
  try {
    const connection = await mysql.createConnection({ uri: MYSQL_URL, connectTimeout: 2000 });
    try {
      await connection.query('SELECT 1');
      return true;
    } finally {
      await connection.end().catch(() => {});
    }
  } catch {
    return false;
  }
}

function missing(suite: string, message: string): false {
  const text = `${suite}: ${message}`;
  if (IS_CI) throw new Error(`${text} On CI (CI=true) a missing database fails the run.`);
  console.warn(`\n⚠️  SKIPPED ${text}\n`);
  return false;
}

/**
 * Decides whether a PostgreSQL suite runs: `true` when {@link POSTGRES_URL} answers. When it does not, on CI
 * (`CI=true`) this throws, failing the run; elsewhere it warns loudly and returns `false` so the suite is skipped.
 */
export async function requirePostgres(suite: string): Promise<boolean> {
  if (await postgresAnswers()) return true;
  return missing(
    suite,
    `no PostgreSQL answers at ${POSTGRES_URL}. Start one (e.g. \`docker run -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test postgres:16\`) or set DATABASE_URL to run these tests.`,
  );
}

/** Like {@link requirePostgres}, for {@link MYSQL_URL}. */
export async function requireMysql(suite: string): Promise<boolean> {
  if (await mysqlAnswers()) return true;
  return missing(
    suite,
    `no MariaDB or MySQL answers at ${MYSQL_URL}. Start one (e.g. \`docker run -p 3306:3306 -e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -e MARIADB_DATABASE=test mariadb:11\`) or set MYSQL_URL to run these tests.`,
  );
}

/** Whether `better-sqlite3`'s native module loads; like {@link requirePostgres} when it does not. */
export async function requireSqlite(suite: string): Promise<boolean> {
  try {
    const { default: Database } = await import('better-sqlite3');
    new Database(':memory:').close();
    return true;
  } catch (error) {
    return missing(
      suite,
      `better-sqlite3 does not load (${(error as Error).message}); run \`npm rebuild better-sqlite3\`.`,
    );
  }
}

/** Drops `table` if it exists (and only it). */
export async function dropPostgresTable(pool: pg.Pool, table: string): Promise<void> {
  await pool.query(
    `DROP TABLE IF EXISTS ${table
      .split('.')
      .map((part) => `"${part}"`)
      .join('.')}`,
  );
}

/** Drops `table` if it exists (and only it). */
export async function dropMysqlTable(pool: mysql.Pool, table: string): Promise<void> {
  await pool.query(
    `DROP TABLE IF EXISTS ${table
      .split('.')
      .map((part) => `\`${part}\``)
      .join('.')}`,
  );
}

/** A temporary directory for SQLite files, and its removal. */
export function sqliteDirectory(label = 'sqlite'): { path: (file: string) => string; remove: () => void } {
  const directory = mkdtempSync(join(tmpdir(), `idempotency-${label}-`));
  return {
    path: (file) => join(directory, file),
    remove: () => rmSync(directory, { recursive: true, force: true }),
  };
}
