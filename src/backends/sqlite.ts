import { IdempotencyError, invalidOption, rejectUnknownOptions } from '../core/errors.js';
import type { AcquireResult, Awaitable, Backend, IdempotencyRecord, KeyState } from '../core/types.js';
import {
  bodyBuffer,
  DEFAULT_SQL_TABLE,
  encodeHeaders,
  fingerprintBytes,
  type HeldRow,
  heldAnswer,
  type InspectRow,
  keyHash,
  keyStateFrom,
  newToken,
  operatorStatements,
  parseTableName,
  SWEEP_BATCH_ROWS,
  SWEEP_CALL_BATCH_ROWS,
  unexpectedRow,
  wholeMilliseconds,
} from './_sql.js';

/**
 * The part of a `better-sqlite3` prepared statement this backend uses.
 *
 * @example
 * ```ts
 * const statement: SqliteStatementLike = db.prepare('SELECT 1 AS one');
 * ```
 */
export interface SqliteStatementLike {
  run(...params: unknown[]): { changes: number };
  get(...params: unknown[]): unknown;
}

/**
 * The part of a `better-sqlite3` `Database` this backend uses.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * const db: SqliteDatabaseLike = new Database('idempotency.db');
 * ```
 */
export interface SqliteDatabaseLike {
  prepare(source: string): SqliteStatementLike;
  exec(source: string): unknown;
  pragma(source: string, options?: { simple?: boolean }): unknown;
}

/**
 * Options of {@link SqliteBackend}.
 *
 * @example
 * ```ts
 * const options: SqliteBackendOptions = { database: '/var/lib/myapp/idempotency.db' };
 * const backend = new SqliteBackend(options);
 * ```
 */
export interface SqliteBackendOptions {
  /**
   * A file path, opened (with `better-sqlite3`, loaded on first use) and closed by the backend; or an open
   * `better-sqlite3` `Database`, which the backend uses and leaves open. Every process that shares keys must
   * use the same file, on a local disk (SQLite's locks do not work over network file systems).
   *
   * Either way the backend sets a busy timeout (`busyTimeoutMs`, unless the connection already has one) and
   * then switches the file to WAL mode, in that order: processes opening the file together wait for each other
   * instead of failing with `SQLITE_BUSY`, and readers never block the writer.
   */
  database: SqliteDatabaseLike | string;
  /**
   * The table. Letters, digits and `_` only.
   * @default 'idempotency_keys'
   */
  table?: string;
  /**
   * Whether the first operation creates the table, its index and its sweep trigger if they do not exist
   * ({@link sqliteSchema}).
   * @default true
   */
  createTable?: boolean;
  /**
   * How long a statement waits for another process's write to finish before it fails with `SQLITE_BUSY`, in
   * milliseconds. Set on a connection whose busy timeout is 0; `better-sqlite3` opens connections with 5000.
   * @default 5000
   */
  busyTimeoutMs?: number;
}

/**
 * Default of {@link SqliteBackendOptions.table}.
 *
 * @example
 * ```ts
 * new SqliteBackend({ database, table: `${DEFAULT_SQLITE_TABLE}_v2` });
 * ```
 */
export const DEFAULT_SQLITE_TABLE = DEFAULT_SQL_TABLE;

/**
 * Default of {@link SqliteBackendOptions.busyTimeoutMs}.
 *
 * @example
 * ```ts
 * new SqliteBackend({ database: 'idempotency.db', busyTimeoutMs: 2 * DEFAULT_SQLITE_BUSY_TIMEOUT_MS });
 * ```
 */
export const DEFAULT_SQLITE_BUSY_TIMEOUT_MS = 5000;

/** The database's clock in whole milliseconds since the epoch: one value for the whole statement. */
const NOW_MS = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

/**
 * The DDL of the backend's table, its index and its sweep trigger, for a table name (default
 * {@link DEFAULT_SQLITE_TABLE}): what the backend runs on first use.
 *
 * The trigger is the sweep: when a complete turns a lock into a record, it deletes up to 16 other rows whose
 * lease or expiry has passed, oldest first, in the same statement. Each complete adds at most one row, so expired
 * rows cannot pile up, and nothing needs a timer.
 *
 * @example
 * ```ts
 * db.exec(sqliteSchema('idempotency_keys'));
 * ```
 */
export function sqliteSchema(table: string = DEFAULT_SQLITE_TABLE): string {
  const [name] = parseTableName(table, false) as [string];
  const quotedTable = `"${name}"`;
  return `CREATE TABLE IF NOT EXISTS ${quotedTable} (
  key_hash BLOB NOT NULL PRIMARY KEY,
  fingerprint BLOB NOT NULL,
  token TEXT,
  expires_at INTEGER,
  status INTEGER,
  headers TEXT,
  body BLOB,
  created_at INTEGER
);
CREATE INDEX IF NOT EXISTS "${name}_expires_at" ON ${quotedTable} (expires_at);
CREATE TRIGGER IF NOT EXISTS "${name}_sweep" AFTER UPDATE OF token ON ${quotedTable}
WHEN OLD.token IS NOT NULL AND NEW.token IS NULL
BEGIN
  DELETE FROM ${quotedTable} WHERE key_hash IN (
    SELECT key_hash FROM ${quotedTable}
    WHERE expires_at <= ${NOW_MS} AND key_hash <> NEW.key_hash
    ORDER BY expires_at LIMIT ${SWEEP_BATCH_ROWS}
  );
END;`;
}

/**
 * {@link sqliteSchema} for the default table, as a constant.
 *
 * @example
 * ```ts
 * db.exec(SQLITE_SCHEMA);
 * ```
 */
export const SQLITE_SCHEMA: string = sqliteSchema();

interface Statements {
  readonly acquire: SqliteStatementLike;
  readonly complete: SqliteStatementLike;
  readonly release: SqliteStatementLike;
  readonly renew: SqliteStatementLike;
  readonly sweep: SqliteStatementLike;
  readonly inspect: SqliteStatementLike;
  readonly forget: SqliteStatementLike;
}

// Atomicity: SQLite runs one writing statement at a time per database file, across processes (the write lock),
// and a statement sees its own database state from start to end. So each statement below is one atomic step.
// Time is the database's: unixepoch('subsec') is fixed for the duration of a statement.
function prepare(db: SqliteDatabaseLike, table: string): Statements {
  const t = `"${table}"`;
  // `free`: the existing row's lease lapsed or its record expired. In an UPSERT's SET, every column name means
  // the row's value before the update, so `free` is judged once, on the old row, for every assignment.
  const free = `expires_at <= ${NOW_MS}`;
  const operator = operatorStatements({
    table: t,
    key: '@key',
    force: '@force',
    live: `expires_at IS NULL OR expires_at > ${NOW_MS}`,
    leftMs: `expires_at - ${NOW_MS}`,
    byteLength: 'length',
  });
  return {
    inspect: db.prepare(operator.inspect),
    forget: db.prepare(operator.forget),
    // One statement: inserts the lock, or, on conflict, takes over the row where it is free and leaves it exactly
    // as it was otherwise. RETURNING then gives the row as it is after the statement: this request's token means
    // it holds the key (inserted or taken over); another token or none, the held row to answer from (the body
    // only for a completed record with the same fingerprint). One statement for every outcome, replays included.
    acquire: db.prepare(`INSERT INTO ${t} (key_hash, fingerprint, token, expires_at)
VALUES (@key, @fingerprint, @token, ${NOW_MS} + @lease)
ON CONFLICT (key_hash) DO UPDATE SET
  fingerprint = CASE WHEN ${free} THEN excluded.fingerprint ELSE fingerprint END,
  token = CASE WHEN ${free} THEN excluded.token ELSE token END,
  status = CASE WHEN ${free} THEN NULL ELSE status END,
  headers = CASE WHEN ${free} THEN NULL ELSE headers END,
  body = CASE WHEN ${free} THEN NULL ELSE body END,
  created_at = CASE WHEN ${free} THEN NULL ELSE created_at END,
  expires_at = CASE WHEN ${free} THEN excluded.expires_at ELSE expires_at END
RETURNING token IS @token AS acquired,
  fingerprint = @fingerprint AS same,
  token IS NOT NULL AS locked,
  expires_at - ${NOW_MS} AS left_ms,
  CASE WHEN token IS NULL AND fingerprint = @fingerprint THEN status END AS status,
  CASE WHEN token IS NULL AND fingerprint = @fingerprint THEN headers END AS headers,
  CASE WHEN token IS NULL AND fingerprint = @fingerprint THEN body END AS body,
  created_at`),

    // The token check and the write are one UPDATE, so a request whose lease was taken over (new token) or swept
    // (no row) writes nothing. The lock becomes the record in place, its expiry in the same write (NULL ttl: NULL,
    // kept forever); the sweep trigger fires within this statement.
    complete: db.prepare(`UPDATE ${t}
SET fingerprint = @fingerprint, token = NULL, expires_at = ${NOW_MS} + @ttl,
  status = @status, headers = @headers, body = @body, created_at = @createdAt
WHERE key_hash = @key AND token = @token`),

    // The token check and the DELETE are one statement; a completed record has no token.
    release: db.prepare(`DELETE FROM ${t} WHERE key_hash = @key AND token = @token`),

    // The token check and the new lease end are one UPDATE; a lease taken over or swept is not revived.
    renew: db.prepare(
      `UPDATE ${t} SET expires_at = ${NOW_MS} + @lease WHERE key_hash = @key AND token = @token`,
    ),

    sweep: db.prepare(`DELETE FROM ${t} WHERE key_hash IN (
  SELECT key_hash FROM ${t} WHERE ${free} ORDER BY expires_at LIMIT ${SWEEP_CALL_BATCH_ROWS}
)`),
  };
}

interface AcquireRow extends HeldRow {
  acquired: unknown;
}

/** How `better-sqlite3` is loaded when the backend opens a file itself. */
type DatabaseConstructor = new (
  path: string,
  options: { timeout: number },
) => SqliteDatabaseLike & {
  close(): unknown;
};

/** The option names the constructor takes: any other is refused, as the middleware refuses one. */
const OPTION_NAMES: ReadonlySet<string> = new Set(['database', 'table', 'createTable', 'busyTimeoutMs']);

/**
 * Keeps keys, locks and responses in a SQLite file, shared by every process on one machine that opens the same
 * file: cluster workers, PM2 instances, several containers with the file on a shared local volume. No server to
 * run, and records survive restarts.
 *
 * Each operation is one statement: a first run costs two (acquire, complete), a replay or a 409 one. SQLite lets
 * one statement write at a time, across processes, so each is atomic; every acquire, replays included, takes the
 * write lock for the moment its statement runs. Readers never block in WAL mode, which the backend turns on.
 *
 * With an open `Database` every operation is synchronous, like `better-sqlite3` itself. With a file path, the
 * first operation loads `better-sqlite3` and opens the file; `close()` closes it.
 *
 * @example
 * ```ts
 * import { SqliteBackend } from 'idempotency-header/sqlite';
 *
 * const backend = new SqliteBackend({ database: '/var/lib/myapp/idempotency.db' });
 * app.use(idempotencyHeader({ backend }));
 * ```
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { SqliteBackend } from 'idempotency-header/sqlite';
 *
 * const db = new Database('app.db', { timeout: 5000 });
 * const backend = new SqliteBackend({ database: db });
 * ```
 */
export class SqliteBackend implements Backend {
  readonly #table: string;
  readonly #path: string | undefined;
  readonly #createTable: boolean;
  readonly #busyTimeoutMs: number;
  #db: (SqliteDatabaseLike & { close?(): unknown }) | undefined;
  #sql: Statements | undefined;
  #opening: Promise<Statements> | undefined;
  #closed = false;

  constructor(options: SqliteBackendOptions) {
    rejectUnknownOptions(options, OPTION_NAMES);
    const {
      database,
      table = DEFAULT_SQLITE_TABLE,
      createTable = true,
      busyTimeoutMs = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    } = options ?? ({} as Partial<SqliteBackendOptions>);
    const isPath = typeof database === 'string' && database.length > 0;
    if (!isPath && !isDatabase(database)) {
      throw invalidOption('database', 'a file path or a better-sqlite3 Database', database);
    }
    [this.#table] = parseTableName(table, false) as [string];
    if (typeof createTable !== 'boolean') throw invalidOption('createTable', 'a boolean', createTable);
    if (!Number.isSafeInteger(busyTimeoutMs) || busyTimeoutMs < 0) {
      throw invalidOption('busyTimeoutMs', 'a non-negative integer number of milliseconds', busyTimeoutMs);
    }
    this.#createTable = createTable;
    this.#busyTimeoutMs = busyTimeoutMs;
    this.#path = isPath ? (database as string) : undefined;
    if (!isPath) this.#db = database as SqliteDatabaseLike;
  }

  acquire(key: string, fingerprint: string, leaseMs: number): Awaitable<AcquireResult> {
    return this.#run((sql) => {
      const token = newToken();
      const fingerprintValue = fingerprintBytes(fingerprint);
      const row = sql.acquire.get({
        key: keyHash(key),
        fingerprint: fingerprintValue,
        token,
        lease: wholeMilliseconds(leaseMs),
      }) as AcquireRow | undefined;
      if (row === undefined) throw unexpectedRow('SQLite', 'reply to acquire', row);
      if (row.acquired === 1) return { state: 'acquired', token };
      return heldAnswer(row, fingerprint, 'SQLite');
    });
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): Awaitable<boolean> {
    return this.#run((sql) => {
      const response = record.response;
      const { changes } = sql.complete.run({
        key: keyHash(key),
        token,
        fingerprint: fingerprintBytes(record.fingerprint),
        ttl: ttlMs === null ? null : wholeMilliseconds(ttlMs),
        status: response === null ? null : response.status,
        headers: response === null ? null : encodeHeaders(response.headers),
        body: response === null ? null : bodyBuffer(response.body),
        createdAt: Math.round(record.createdAt),
      });
      return changes === 1;
    });
  }

  release(key: string, token: string): Awaitable<boolean> {
    return this.#run((sql) => sql.release.run({ key: keyHash(key), token }).changes === 1);
  }

  renew(key: string, token: string, leaseMs: number): Awaitable<boolean> {
    return this.#run(
      (sql) => sql.renew.run({ key: keyHash(key), token, lease: wholeMilliseconds(leaseMs) }).changes === 1,
    );
  }

  /**
   * Deletes every expired record and lapsed lock now, in batches of 1000 rows, and returns how many rows it
   * deleted. Not needed for a bounded table (completes sweep as they go); useful after a burst of traffic
   * followed by silence.
   */
  sweep(): Awaitable<number> {
    return this.#run((sql) => {
      let deleted = 0;
      for (;;) {
        const { changes } = sql.sweep.run();
        deleted += changes;
        if (changes < SWEEP_CALL_BATCH_ROWS) return deleted;
      }
    });
  }

  /** The key's state, read in one statement by the database's clock: see {@link Backend.inspect}. */
  inspect(key: string): Awaitable<KeyState | undefined> {
    return this.#run((sql) => {
      const row = sql.inspect.get({ key: keyHash(key) }) as InspectRow | undefined;
      return row === undefined ? undefined : keyStateFrom(row, 'SQLite');
    });
  }

  /** Deletes the key's record, or its lock only with `force`, in one statement: see {@link Backend.forget}. */
  forget(key: string, force: boolean): Awaitable<boolean> {
    return this.#run((sql) => sql.forget.run({ key: keyHash(key), force: force ? 1 : 0 }).changes === 1);
  }

  /** Closes the database if the backend opened it from a path; a `Database` passed in is left open. */
  close(): void {
    this.#closed = true;
    if (this.#path !== undefined) this.#db?.close?.();
    this.#db = undefined;
    this.#sql = undefined;
  }

  /** Runs `step` synchronously once the database is open and set up, or after opening it on first use. */
  #run<T>(step: (sql: Statements) => T): Awaitable<T> {
    const sql = this.#sql ?? (this.#db === undefined ? undefined : this.#setUp(this.#db));
    if (sql !== undefined) return step(sql);
    if (this.#closed) throw closedError();
    this.#opening ??= this.#open().catch((error: unknown) => {
      this.#opening = undefined;
      throw error;
    });
    return this.#opening.then(step);
  }

  async #open(): Promise<Statements> {
    const Database = await loadBetterSqlite3();
    if (this.#closed) throw closedError();
    // better-sqlite3 sets the busy timeout as it opens the file, before anything else runs on it.
    const db = new Database(this.#path!, { timeout: this.#busyTimeoutMs });
    try {
      const sql = await this.#setUpWaiting(db);
      this.#db = db;
      return sql;
    } catch (error) {
      db.close();
      throw error;
    }
  }

  /**
   * {@link #setUp}, tried again within the busy timeout while the file is busy: switching a new file to WAL needs it
   * to itself for a moment, and SQLite answers a process that opens it at the same time with SQLITE_BUSY at once
   * rather than wait where waiting could deadlock.
   */
  async #setUpWaiting(db: SqliteDatabaseLike): Promise<Statements> {
    const deadline = Date.now() + this.#busyTimeoutMs;
    for (;;) {
      try {
        return this.#setUp(db);
      } catch (error) {
        if ((error as { code?: unknown }).code !== 'SQLITE_BUSY' || Date.now() >= deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 5 + Math.random() * 20));
      }
    }
  }

  /** Busy timeout first, then WAL, then the table: each step may wait for another process's lock. */
  #setUp(db: SqliteDatabaseLike): Statements {
    if (Number(db.pragma('busy_timeout', { simple: true })) === 0) {
      db.pragma(`busy_timeout = ${this.#busyTimeoutMs}`);
    }
    if (String(db.pragma('journal_mode', { simple: true })).toLowerCase() !== 'wal') {
      db.pragma('journal_mode = WAL');
    }
    if (this.#createTable) db.exec(sqliteSchema(this.#table));
    this.#sql = prepare(db, this.#table);
    return this.#sql;
  }
}

/** `better-sqlite3` as loaded (or not) by the first backend that opened a path: see {@link loadBetterSqlite3}. */
let betterSqlite3: Promise<DatabaseConstructor> | undefined;

/**
 * `better-sqlite3`, an optional peer dependency, loaded once for the process: an app that has not installed it
 * gets a clear error naming it, the same one on every later operation, without resolving the module again on
 * each request.
 */
function loadBetterSqlite3(): Promise<DatabaseConstructor> {
  betterSqlite3 ??= importBetterSqlite3();
  return betterSqlite3;
}

async function importBetterSqlite3(): Promise<DatabaseConstructor> {
  try {
    const module = (await import('better-sqlite3')) as unknown as { default: DatabaseConstructor };
    return module.default;
  } catch (error) {
    throw new IdempotencyError(
      'ERR_IDEMPOTENCY_BACKEND',
      `SqliteBackend could not load better-sqlite3, which it needs to open a database by path (npm install better-sqlite3): ${(error as Error).message}`,
      { cause: error },
    );
  }
}

function closedError(): IdempotencyError {
  return new IdempotencyError('ERR_IDEMPOTENCY_BACKEND', 'SqliteBackend is closed');
}

function isDatabase(value: unknown): value is SqliteDatabaseLike {
  if (typeof value !== 'object' || value === null) return false;
  const db = value as Partial<Record<keyof SqliteDatabaseLike, unknown>>;
  return typeof db.prepare === 'function' && typeof db.exec === 'function' && typeof db.pragma === 'function';
}
