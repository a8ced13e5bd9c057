import { invalidOption, rejectUnknownOptions } from '../core/errors.js';
import type { AcquireResult, Backend, IdempotencyRecord, KeyState } from '../core/types.js';
import {
  bodyBuffer,
  contended,
  DEFAULT_SQL_TABLE,
  encodeHeaders,
  fingerprintBytes,
  type HeldRow,
  heldAnswer,
  type InspectRow,
  keyHash,
  keyStateFrom,
  MAX_ACQUIRE_ATTEMPTS,
  newToken,
  operatorStatements,
  parseTableName,
  SetUpOnce,
  SWEEP_BATCH_ROWS,
  SWEEP_CALL_BATCH_ROWS,
  tokenBytes,
  unexpectedRow,
  wholeMilliseconds,
} from './_sql.js';

/**
 * The options object this backend passes to {@link MysqlPoolLike.query}: the SQL, and `rowsAsArray: false` so
 * that rows come back as objects whatever the pool's own setting.
 *
 * @example
 * ```ts
 * const [rows] = await pool.query({ sql: 'SELECT 1 AS one', rowsAsArray: false } satisfies MysqlQueryOptions);
 * ```
 */
export interface MysqlQueryOptions {
  sql: string;
  rowsAsArray?: boolean;
}

/**
 * The part of a `mysql2/promise` `Pool` this backend uses: `query(options, values)`, resolving to
 * `[rows or result header, fields]`. A `mysql2/promise` `Connection` has it too.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * const pool: MysqlPoolLike = mysql.createPool(process.env.MYSQL_URL!);
 * ```
 */
export interface MysqlPoolLike {
  query(options: MysqlQueryOptions, values?: unknown[]): Promise<[unknown, unknown]>;
}

/**
 * Options of {@link MysqlBackend}.
 *
 * @example
 * ```ts
 * const options: MysqlBackendOptions = { pool, table: 'idempotency_keys' };
 * const backend = new MysqlBackend(options);
 * ```
 */
export interface MysqlBackendOptions {
  /**
   * A `mysql2/promise` pool (`mysql.createPool(...)`, or the callback pool's `.promise()`; a callback pool is
   * converted with its own `.promise()`). The backend never imports `mysql2`, never ends the pool, and rejects
   * with the pool's own errors unchanged. Set `connectTimeout` so that an unreachable server fails requests fast.
   */
  pool: MysqlPoolLike;
  /**
   * The table, optionally qualified by its database (`'billing.idempotency_keys'`). Letters, digits and `_`
   * only. Applications sharing a database should each have their own table.
   * @default 'idempotency_keys'
   */
  table?: string;
  /**
   * Whether the first operation creates the table if it does not exist ({@link mysqlSchema}). Turn it off when
   * migrations create it and the application's user may not run DDL.
   * @default true
   */
  createTable?: boolean;
  /**
   * Whether `acquire` is one `INSERT … ON DUPLICATE KEY UPDATE … RETURNING` statement for every outcome, replays
   * included (MariaDB 10.5+), or an `INSERT` followed by a read when the key exists (MySQL, which has no
   * `RETURNING`). Detected from the server's `VERSION()` on first use; set it to skip that query.
   * @default detected: `true` on MariaDB, `false` on MySQL
   */
  returning?: boolean;
}

/**
 * Default of {@link MysqlBackendOptions.table}.
 *
 * @example
 * ```ts
 * new MysqlBackend({ pool, table: `${DEFAULT_MYSQL_TABLE}_staging` });
 * ```
 */
export const DEFAULT_MYSQL_TABLE = DEFAULT_SQL_TABLE;

/**
 * The DDL of the backend's table, for a table name (default {@link DEFAULT_MYSQL_TABLE}): what the backend runs on
 * first use, for teams that create tables in migrations instead (`createTable: false`).
 *
 * Every column that is compared is binary: the key as its SHA-256 in `BINARY(32)`, the fingerprint and token as
 * bytes. MySQL's and MariaDB's default collations compare text case-insensitively and ignore trailing spaces, so
 * keys `abc`, `ABC` and `abc ` would otherwise be one key. Times are UTC (`UTC_TIMESTAMP(3)`), whatever the
 * session's `time_zone`.
 *
 * @example
 * ```ts
 * // in a migration
 * await connection.query(mysqlSchema('idempotency_keys'));
 * ```
 */
export function mysqlSchema(table: string = DEFAULT_MYSQL_TABLE): string {
  return ddl(quoted(parseTableName(table, true)));
}

/**
 * {@link mysqlSchema} for the default table, as a constant.
 *
 * @example
 * ```ts
 * await pool.query(MYSQL_SCHEMA);
 * ```
 */
export const MYSQL_SCHEMA: string = mysqlSchema();

function quoted(parts: string[]): string {
  return parts.map((part) => `\`${part}\``).join('.');
}

function ddl(table: string): string {
  return `CREATE TABLE IF NOT EXISTS ${table} (
  key_hash BINARY(32) NOT NULL,
  fingerprint BLOB NOT NULL,
  token BINARY(16) NULL,
  expires_at DATETIME(3) NULL,
  status SMALLINT UNSIGNED NULL,
  headers MEDIUMBLOB NULL,
  body LONGBLOB NULL,
  created_at BIGINT NULL,
  PRIMARY KEY (key_hash),
  KEY expires_at (expires_at)
) ENGINE=InnoDB`;
}

/** `ER_DUP_ENTRY`, in MySQL and MariaDB alike: the INSERT met an existing row for the key. */
const ER_DUP_ENTRY = 1062;

/** A background sweep runs after every this many completes of one backend. */
const SWEEP_EVERY_COMPLETES = 8;

/**
 * Rows one background sweep deletes at most: as many as {@link SWEEP_EVERY_COMPLETES} completes would each sweep
 * on PostgreSQL, so expired rows are deleted far faster than completes add rows.
 */
const BACKGROUND_SWEEP_ROWS = SWEEP_EVERY_COMPLETES * SWEEP_BATCH_ROWS;

/** `UTC_TIMESTAMP(3)` plus a parameter's microseconds ({@link micro}); `NULL` gives a `NULL` time (kept forever). */
const LEASE_END = 'UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND';

interface Statements {
  readonly create: string;
  readonly upsert: string;
  readonly insert: string;
  readonly read: string;
  readonly takeOver: string;
  readonly complete: string;
  readonly release: string;
  readonly renew: string;
  readonly expired: string;
  readonly deleteExpired: string;
  readonly inspect: string;
  readonly forget: string;
}

// Time is the database's: UTC_TIMESTAMP(3) is the statement's start, one instant for the whole statement, read
// from the server that all processes share. Process clocks never decide whether a lease lapsed.
//
// Acquire on MariaDB is one statement (`upsert`): MariaDB's INSERT … RETURNING returns the row on the
// ON DUPLICATE KEY UPDATE path too. MySQL has no RETURNING, and only a SELECT returns rows, so no single statement
// can both take a free key and hand back a stored response. There acquire tries the write first (`insert`), which
// is all a first run needs, and reads only when the key exists (`read`, then `takeOver` for a free row): a first
// run costs two round trips (insert, complete), a replay or a 409 two (insert refused, read), a takeover three.
function statements(table: string): Statements {
  const free = 'expires_at <= UTC_TIMESTAMP(3)';
  const operator = operatorStatements({
    table,
    key: '?',
    force: '?',
    live: 'expires_at IS NULL OR expires_at > UTC_TIMESTAMP(3)',
    leftMs: '(TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), expires_at) + 999) DIV 1000',
    byteLength: 'LENGTH',
  });
  return {
    ...operator,
    create: ddl(table),

    // Atomicity: one statement under the row's exclusive lock (ON DUPLICATE KEY UPDATE locks the existing row
    // before it updates it), so of N concurrent acquires exactly one inserts or takes over. On a duplicate it
    // takes the row over where it is free and otherwise assigns every column its own value, which InnoDB
    // recognises as no change; RETURNING then gives the row as it is after the statement, in every case. MySQL
    // and MariaDB assign left to right, each assignment seeing the ones before it: expires_at, which `free`
    // reads, is assigned last, so every assignment judges the row as it was. Parameters: key hash, fingerprint,
    // token, lease µs; then token, fingerprint (×4) for RETURNING.
    upsert: `INSERT INTO ${table} (key_hash, fingerprint, token, expires_at) VALUES (?, ?, ?, ${LEASE_END})
ON DUPLICATE KEY UPDATE
  fingerprint = IF(${free}, VALUES(fingerprint), fingerprint),
  token = IF(${free}, VALUES(token), token),
  status = IF(${free}, NULL, status),
  headers = IF(${free}, NULL, headers),
  body = IF(${free}, NULL, body),
  created_at = IF(${free}, NULL, created_at),
  expires_at = IF(${free}, VALUES(expires_at), expires_at)
RETURNING token <=> ? AS acquired,
  fingerprint = ? AS same,
  token IS NOT NULL AS locked,
  (TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), expires_at) + 999) DIV 1000 AS left_ms,
  CASE WHEN token IS NULL AND fingerprint = ? THEN status END AS status,
  CASE WHEN token IS NULL AND fingerprint = ? THEN headers END AS headers,
  CASE WHEN token IS NULL AND fingerprint = ? THEN body END AS body,
  created_at`,

    // Atomicity: the primary key lets exactly one of N concurrent INSERTs of a key succeed; the others fail with
    // ER_DUP_ENTRY and read the row.
    insert: `INSERT INTO ${table} (key_hash, fingerprint, token, expires_at) VALUES (?, ?, ?, ${LEASE_END})`,

    // A plain consistent read: no locks. Whether the row is free is judged by the server's clock in the same
    // statement. The response columns are read only for a completed record with the same fingerprint.
    read: `SELECT fingerprint = ? AS same,
  token IS NOT NULL AS locked,
  expires_at IS NULL OR expires_at > UTC_TIMESTAMP(3) AS live,
  (TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), expires_at) + 999) DIV 1000 AS left_ms,
  CASE WHEN token IS NULL AND fingerprint = ? THEN status END AS status,
  CASE WHEN token IS NULL AND fingerprint = ? THEN headers END AS headers,
  CASE WHEN token IS NULL AND fingerprint = ? THEN body END AS body,
  created_at
FROM ${table} WHERE key_hash = ?`,

    // Atomicity: an UPDATE reads the row's latest version under its row lock, so of N concurrent takeovers of a
    // free row exactly one still finds it free and matches; the others match nothing, and read again.
    takeOver: `UPDATE ${table}
SET fingerprint = ?, token = ?, expires_at = ${LEASE_END},
  status = NULL, headers = NULL, body = NULL, created_at = NULL
WHERE key_hash = ? AND expires_at <= UTC_TIMESTAMP(3)`,

    // Atomicity: the token check and the write are one UPDATE on the row, so a request whose lease was taken over
    // (new token) or swept (no row) writes nothing; the lock becomes the record in place, its expiry in the same
    // write. MySQL assigns left to right, but the WHERE clause is judged before any assignment.
    complete: `UPDATE ${table}
SET fingerprint = ?, token = NULL, expires_at = ${LEASE_END},
  status = ?, headers = ?, body = ?, created_at = ?
WHERE key_hash = ? AND token = ?`,

    // Atomicity: the token check and the DELETE are one statement; a completed record has no token.
    release: `DELETE FROM ${table} WHERE key_hash = ? AND token = ?`,

    // Atomicity: the token check and the new lease end are one UPDATE; a lease taken over or swept is not revived.
    renew: `UPDATE ${table} SET expires_at = ${LEASE_END} WHERE key_hash = ? AND token = ?`,

    // A sweep reads candidates without locks, then deletes them by primary key, still only if expired by then.
    // Deleting by a range of the expires_at index instead would lock that range and could deadlock with a
    // concurrent acquire (which locks the primary key first); by primary key, locks are taken in the same order.
    expired: `SELECT key_hash FROM ${table} WHERE expires_at <= UTC_TIMESTAMP(3) ORDER BY expires_at LIMIT ?`,
    deleteExpired: `DELETE FROM ${table} WHERE key_hash IN (?) AND expires_at <= UTC_TIMESTAMP(3)`,
  };
}

/** What `query` resolves to for INSERT, UPDATE and DELETE. */
interface ResultHeader {
  affectedRows?: unknown;
  info?: unknown;
}

/** What the read statement returns. */
interface ReadRow extends HeldRow {
  live: unknown;
}

/** What the upsert statement returns. */
interface AcquireRow extends HeldRow {
  acquired: unknown;
}

/** The option names the constructor takes: any other is refused, as the middleware refuses one. */
const OPTION_NAMES: ReadonlySet<string> = new Set(['pool', 'table', 'createTable', 'returning']);

/**
 * Keeps keys, locks and responses in a MySQL 8 or MariaDB 10.11+ table (InnoDB), next to the application's data,
 * shared by every process that uses the database.
 *
 * Round trips on MariaDB: one statement per step, as on PostgreSQL: a first run costs two (acquire, complete), a
 * replay or a 409 one (`INSERT … ON DUPLICATE KEY UPDATE … RETURNING`, which takes the row's lock for a moment).
 * On MySQL, which has no `RETURNING`, a first run also costs two (insert the lock, complete), but a replay or a 409
 * costs two (the insert is refused, then the row is read), and taking over a lapsed lease three. After every
 * eighth complete, a sweep of expired rows runs in the background, off the request's path.
 *
 * Leases are timed by the database's clock (UTC). Keys are stored as their SHA-256 in a `BINARY(32)` primary
 * key, so keys that differ only in case or trailing spaces never meet. Works with a `mysql2/promise` pool,
 * recognised by its `query` method; `mysql2` is not imported. The table is created on first use unless
 * `createTable` is `false` ({@link mysqlSchema} is its DDL). Pool errors reject unchanged.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * import { MysqlBackend } from 'idempotency-header/mysql';
 *
 * const pool = mysql.createPool({ uri: process.env.MYSQL_URL, connectTimeout: 2000 });
 * app.use(idempotencyHeader({ backend: new MysqlBackend({ pool }) }));
 * ```
 */
export class MysqlBackend implements Backend {
  readonly #pool: MysqlPoolLike;
  readonly #sql: Statements;
  readonly #createTable: boolean;
  /** Whether acquire uses {@link Statements.upsert}; `undefined` until detected. */
  #returning: boolean | undefined;
  /** Whether the table exists and `#returning` is known. */
  /** Creates the table and finds out whether the server has RETURNING, once. */
  readonly #setUp: SetUpOnce;
  #completes = 0;
  #sweeping = false;

  constructor(options: MysqlBackendOptions) {
    rejectUnknownOptions(options, OPTION_NAMES);
    const {
      pool,
      table = DEFAULT_MYSQL_TABLE,
      createTable = true,
      returning,
    } = options ?? ({} as Partial<MysqlBackendOptions>);
    const promisePool = promiseApi(pool);
    if (promisePool === undefined) {
      throw invalidOption(
        'pool',
        'a mysql2/promise Pool (an object with a query(options, values) method)',
        pool,
      );
    }
    if (typeof createTable !== 'boolean') throw invalidOption('createTable', 'a boolean', createTable);
    if (returning !== undefined && typeof returning !== 'boolean') {
      throw invalidOption('returning', 'a boolean, or undefined to detect it', returning);
    }
    this.#sql = statements(quoted(parseTableName(table, true)));
    this.#pool = promisePool;
    this.#createTable = createTable;
    this.#returning = returning;
    this.#setUp = new SetUpOnce(() => this.#runSetUp(), !createTable && returning !== undefined);
  }

  async acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    const hash = keyHash(key);
    const fingerprintValue = fingerprintBytes(fingerprint);
    const lease = micro(leaseMs);
    if (this.#returning) {
      const token = newToken();
      const tokenValue = tokenBytes(token);
      const rows = await this.#query(this.#sql.upsert, [
        hash,
        fingerprintValue,
        tokenValue,
        lease,
        tokenValue,
        fingerprintValue,
        fingerprintValue,
        fingerprintValue,
        fingerprintValue,
      ]);
      const row = Array.isArray(rows) ? (rows[0] as AcquireRow | undefined) : undefined;
      if (row === undefined) throw unexpectedRow('MariaDB', 'reply to acquire', rows);
      if (Number(row.acquired) === 1) return { state: 'acquired', token };
      return heldAnswer(row, fingerprint, 'MariaDB');
    }
    for (let attempt = 0; attempt < MAX_ACQUIRE_ATTEMPTS; attempt++) {
      const token = newToken();
      const tokenValue = tokenBytes(token);
      try {
        await this.#query(this.#sql.insert, [hash, fingerprintValue, tokenValue, lease]);
        return { state: 'acquired', token };
      } catch (error) {
        if ((error as { errno?: unknown } | null)?.errno !== ER_DUP_ENTRY) throw error;
      }
      const rows = await this.#query(this.#sql.read, [
        fingerprintValue,
        fingerprintValue,
        fingerprintValue,
        fingerprintValue,
        hash,
      ]);
      if (!Array.isArray(rows)) throw unexpectedRow('MySQL', 'reply to acquire', rows);
      const row = rows[0] as ReadRow | undefined;
      // Deleted since the insert met it (released or swept): insert again.
      if (row === undefined) continue;
      if (Number(row.live) === 1) return heldAnswer(row, fingerprint, 'MySQL');
      const header = await this.#query(this.#sql.takeOver, [fingerprintValue, tokenValue, lease, hash]);
      if (matchedRows(header) === 1) return { state: 'acquired', token };
      // Another request took the free row first: read it again.
    }
    throw contended('MySQL');
  }

  async complete(
    key: string,
    token: string,
    record: IdempotencyRecord,
    ttlMs: number | null,
  ): Promise<boolean> {
    const tokenValue = tokenBytes(token);
    if (tokenValue === undefined) return false;
    if (!this.#setUp.done) await this.#setUp.ensure();
    const response = record.response;
    const header = await this.#query(this.#sql.complete, [
      fingerprintBytes(record.fingerprint),
      ttlMs === null ? null : micro(ttlMs),
      response === null ? null : response.status,
      response === null ? null : Buffer.from(encodeHeaders(response.headers), 'utf8'),
      response === null ? null : bodyBuffer(response.body),
      Math.round(record.createdAt),
      keyHash(key),
      tokenValue,
    ]);
    const stored = matchedRows(header) === 1;
    if (stored && ++this.#completes % SWEEP_EVERY_COMPLETES === 0) this.#sweepInBackground();
    return stored;
  }

  async release(key: string, token: string): Promise<boolean> {
    const tokenValue = tokenBytes(token);
    if (tokenValue === undefined) return false;
    if (!this.#setUp.done) await this.#setUp.ensure();
    return matchedRows(await this.#query(this.#sql.release, [keyHash(key), tokenValue])) === 1;
  }

  async renew(key: string, token: string, leaseMs: number): Promise<boolean> {
    const tokenValue = tokenBytes(token);
    if (tokenValue === undefined) return false;
    if (!this.#setUp.done) await this.#setUp.ensure();
    const header = await this.#query(this.#sql.renew, [micro(leaseMs), keyHash(key), tokenValue]);
    return matchedRows(header) === 1;
  }

  /** The key's state, read in one statement by the database's clock: see {@link Backend.inspect}. */
  async inspect(key: string): Promise<KeyState | undefined> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    const rows = await this.#query(this.#sql.inspect, [keyHash(key)]);
    if (!Array.isArray(rows)) throw unexpectedRow('MySQL', 'reply to inspect', rows);
    const row = rows[0] as InspectRow | undefined;
    return row === undefined ? undefined : keyStateFrom(row, 'MySQL');
  }

  /** Deletes the key's record, or its lock only with `force`, in one statement: see {@link Backend.forget}. */
  async forget(key: string, force: boolean): Promise<boolean> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    return matchedRows(await this.#query(this.#sql.forget, [keyHash(key), force ? 1 : 0])) === 1;
  }

  /**
   * Deletes every expired record and lapsed lock now, in batches of 1000 rows, and resolves to how many rows it
   * deleted. Not needed for a bounded table (a background sweep follows every eighth complete); useful from a
   * scheduled job after a burst of traffic followed by silence.
   */
  async sweep(): Promise<number> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    let deleted = 0;
    for (;;) {
      const { found, removed } = await this.#sweepBatch(SWEEP_CALL_BATCH_ROWS);
      deleted += removed;
      if (found < SWEEP_CALL_BATCH_ROWS) return deleted;
    }
  }

  async #sweepBatch(limit: number): Promise<{ found: number; removed: number }> {
    const rows = await this.#query(this.#sql.expired, [limit]);
    if (!Array.isArray(rows) || rows.length === 0) return { found: 0, removed: 0 };
    const hashes = rows.map((row) => (row as { key_hash: unknown }).key_hash);
    const header = await this.#query(this.#sql.deleteExpired, [hashes]);
    return { found: rows.length, removed: matchedRows(header) };
  }

  /** One bounded batch, at most one at a time per backend; a failure is left for the next sweep to make up. */
  #sweepInBackground(): void {
    if (this.#sweeping) return;
    this.#sweeping = true;
    this.#sweepBatch(BACKGROUND_SWEEP_ROWS)
      .catch(() => {})
      .finally(() => {
        this.#sweeping = false;
      });
  }

  async #query(sql: string, values: unknown[]): Promise<unknown> {
    const [result] = await this.#pool.query({ sql, rowsAsArray: false }, values);
    return result;
  }

  async #runSetUp(): Promise<void> {
    if (this.#createTable) await this.#pool.query({ sql: this.#sql.create });
    if (this.#returning === undefined) {
      const rows = await this.#query('SELECT VERSION() AS version', []);
      const version = Array.isArray(rows)
        ? (rows[0] as { version?: unknown } | undefined)?.version
        : undefined;
      // INSERT … RETURNING came with MariaDB 10.5; this backend supports 10.11 and later.
      this.#returning = String(version).includes('MariaDB');
    }
  }
}

/** Whole milliseconds (at least 1) as microseconds, the finest INTERVAL unit both servers share. */
function micro(ms: number): number {
  return wholeMilliseconds(ms) * 1000;
}

/** The pool's promise API: the pool itself, or a callback pool's `.promise()`; `undefined` for anything else. */
function promiseApi(pool: unknown): MysqlPoolLike | undefined {
  if (typeof pool !== 'object' || pool === null) return undefined;
  const candidate = pool as { query?: unknown; promise?: unknown };
  // mysql2's callback pool and connection have a `promise()` method returning their promise wrapper.
  if (typeof candidate.promise === 'function')
    return promiseApi((candidate.promise as () => unknown).call(pool));
  return typeof candidate.query === 'function' ? (pool as MysqlPoolLike) : undefined;
}

/**
 * Rows an UPDATE or DELETE matched. mysql2 connects with CLIENT_FOUND_ROWS by default, so `affectedRows` counts
 * matched rows; a pool configured without it counts changed rows instead, and a renewal that set the same lease
 * end (within the same millisecond) would read as lost. The server's info line says how many rows matched.
 */
function matchedRows(header: unknown): number {
  const { affectedRows, info } = (header ?? {}) as ResultHeader;
  if (typeof info === 'string') {
    const matched = /Rows matched:\s*(\d+)/i.exec(info);
    if (matched !== null) return Number(matched[1]);
  }
  if (typeof affectedRows !== 'number') throw unexpectedRow('MySQL', 'result', header);
  return affectedRows;
}
