/**
 * The example's SQL backends: PostgreSQL, MariaDB/MySQL or SQLite, chosen by the environment, each with an order
 * sequence kept in the same database so that every process sharing it counts the same orders. The driver of the
 * chosen database is loaded on demand: running the example on one of them needs none of the others.
 *
 *   IDEMPOTENCY_BACKEND=postgres|mysql|sqlite   picks one (otherwise: the first of the variables below that is set,
 *                                               unless REDIS_URL is set, which the example gives precedence)
 *   DATABASE_URL   PostgreSQL, e.g. postgres://postgres@127.0.0.1:5432/test
 *   MYSQL_URL      MariaDB or MySQL, e.g. mysql://root@127.0.0.1:3306/test
 *   SQLITE_PATH    a SQLite file, e.g. ./idempotency.db
 *   IDEMPOTENCY_TABLE   the backend's table ('idempotency_keys'); the order sequence lives in `<table>_orders`
 */
import type { Backend } from 'idempotency-header';
import { MysqlBackend } from 'idempotency-header/mysql';
import { PostgresBackend } from 'idempotency-header/postgres';
import { SqliteBackend } from 'idempotency-header/sqlite';

/** A SQL backend for the example, with the order sequence next to it. */
export interface SqlSetup {
  /** The backend's class name, as the example reports it. */
  name: string;
  backend: Backend;
  /** The next order number, from a counter row in the database. */
  nextOrderNumber(): Promise<number>;
  /** Closes the connections. */
  close(): Promise<void>;
}

/** SQLSTATEs of a table created by another process at the same moment. */
const CREATED_CONCURRENTLY = new Set(['23505', '42P07']);

/**
 * The SQL backend the environment asks for, or `undefined` when it asks for none (then the example runs on Redis
 * or in memory).
 */
export async function sqlBackendFromEnv(env: NodeJS.ProcessEnv = process.env): Promise<SqlSetup | undefined> {
  const table = env.IDEMPOTENCY_TABLE ?? 'idempotency_keys';
  const orders = `${table}_orders`;
  const choice =
    env.IDEMPOTENCY_BACKEND ??
    (env.REDIS_URL
      ? undefined
      : env.DATABASE_URL
        ? 'postgres'
        : env.MYSQL_URL
          ? 'mysql'
          : env.SQLITE_PATH
            ? 'sqlite'
            : undefined);
  switch (choice) {
    case 'postgres': {
      const { default: pg } = await import('pg');
      const pool = new pg.Pool({ connectionString: env.DATABASE_URL, max: 5, connectionTimeoutMillis: 2000 });
      pool.on('error', (error) => console.error('postgres:', error.message));
      // Processes starting together may race to create the table: the loser's error means it exists now.
      for (let attempt = 1; ; attempt++) {
        try {
          await pool.query(`CREATE TABLE IF NOT EXISTS "${orders}" (id int PRIMARY KEY, n bigint NOT NULL)`);
          break;
        } catch (error) {
          if (attempt >= 3 || !CREATED_CONCURRENTLY.has((error as { code?: string }).code ?? '')) throw error;
        }
      }
      return {
        name: 'PostgresBackend',
        backend: new PostgresBackend({ pool, table }),
        async nextOrderNumber() {
          const { rows } = await pool.query<{ n: string }>(
            `INSERT INTO "${orders}" (id, n) VALUES (1, 1)
             ON CONFLICT (id) DO UPDATE SET n = "${orders}".n + 1 RETURNING n`,
          );
          return Number(rows[0]!.n);
        },
        close: () => pool.end(),
      };
    }
    case 'mysql': {
      const { default: mysql } = await import('mysql2/promise');
      const pool = mysql.createPool({ uri: env.MYSQL_URL, connectionLimit: 5, connectTimeout: 2000 });
      await pool.query(`CREATE TABLE IF NOT EXISTS \`${orders}\` (id INT PRIMARY KEY, n BIGINT NOT NULL)`);
      return {
        name: 'MysqlBackend',
        backend: new MysqlBackend({ pool, table }),
        async nextOrderNumber() {
          // LAST_INSERT_ID(expr) hands the new value back in the statement's own reply, on its own connection.
          const [result] = await pool.query(
            `INSERT INTO \`${orders}\` (id, n) VALUES (1, LAST_INSERT_ID(1))
             ON DUPLICATE KEY UPDATE n = LAST_INSERT_ID(n + 1)`,
          );
          return (result as { insertId: number }).insertId;
        },
        close: () => pool.end(),
      };
    }
    case 'sqlite': {
      const { default: Database } = await import('better-sqlite3');
      // One connection for the backend and the sequence. The busy timeout is set as the file opens, before WAL.
      const db = new Database(env.SQLITE_PATH ?? 'idempotency.db', { timeout: 5000 });
      db.pragma('journal_mode = WAL');
      const backend = new SqliteBackend({ database: db, table });
      db.exec(`CREATE TABLE IF NOT EXISTS "${orders}" (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)`);
      const next = db.prepare(
        `INSERT INTO "${orders}" (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1 RETURNING n`,
      );
      return {
        name: 'SqliteBackend',
        backend,
        async nextOrderNumber() {
          return (next.get() as { n: number }).n;
        },
        async close() {
          db.close();
        },
      };
    }
    case undefined:
      return undefined;
    default:
      throw new Error(`IDEMPOTENCY_BACKEND must be postgres, mysql or sqlite, not ${JSON.stringify(choice)}`);
  }
}
