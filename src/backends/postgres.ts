import { invalidOption, rejectUnknownOptions } from '../core/errors.js';
import type {
  AcquireResult,
  BackendTransaction,
  IdempotencyRecord,
  KeyState,
  TransactionalBackend,
} from '../core/types.js';
import {
  bodyBuffer,
  contended,
  DEFAULT_SQL_TABLE,
  encodeHeaders,
  fingerprintBytes,
  type HeldRow,
  heldAnswer,
  type InspectRow,
  isToken,
  keyHash,
  keyStateFrom,
  MAX_ACQUIRE_ATTEMPTS,
  newToken,
  operatorStatements,
  parseTableName,
  SetUpOnce,
  SWEEP_BATCH_ROWS,
  SWEEP_CALL_BATCH_ROWS,
  unexpectedRow,
  wholeMilliseconds,
} from './_sql.js';
import { KeyWatchers } from './_watchers.js';

/**
 * The part of a `pg` `Pool` this backend uses: `query(text, values)`, resolving to the rows and the count of rows
 * changed. A `pg` `Client` has it too (its queries then run one at a time).
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * const pool: PgPoolLike = new pg.Pool({ connectionString: process.env.DATABASE_URL });
 * ```
 */
export interface PgPoolLike {
  query(text: string, values?: unknown[]): Promise<PgResultLike>;
  /** A connection of the pool's own, for the transactional mode (`pg`'s `Pool#connect`). */
  connect?(): Promise<PgClientLike>;
}

/**
 * A connection checked out of a `pg` `Pool` (`PoolClient`): what the transactional mode runs a request's
 * transaction on, and hands to the handler.
 *
 * @example
 * ```ts
 * const client: PgClientLike = await pool.connect();
 * ```
 */
export interface PgClientLike {
  query(text: string, values?: unknown[]): Promise<PgResultLike>;
  /** Gives the connection back; with an error, the pool discards it. */
  release(error?: Error | boolean): void;
  /** `pg`'s events: `'notification'` (`{ channel, payload }`) and `'error'`, for `notifications`. */
  on?(event: string, listener: (...args: never[]) => void): unknown;
}

/**
 * What {@link PgPoolLike.query} resolves to: `pg`'s `QueryResult`, as far as this backend reads it.
 *
 * @example
 * ```ts
 * const { rows, rowCount }: PgResultLike = await pool.query('SELECT 1 AS one');
 * ```
 */
export interface PgResultLike {
  rows: unknown[];
  rowCount: number | null;
}

/**
 * Options of {@link PostgresBackend}.
 *
 * @example
 * ```ts
 * const options: PostgresBackendOptions = { pool, table: 'billing.idempotency_keys' };
 * const backend = new PostgresBackend(options);
 * ```
 */
export interface PostgresBackendOptions {
  /**
   * A `pg` `Pool` (or anything with its `query(text, values)`). The backend never imports `pg`, never ends the
   * pool, and rejects with the pool's own errors unchanged. Set `connectionTimeoutMillis` (and a
   * `statement_timeout`) so that an unreachable database fails requests fast instead of queueing them.
   */
  pool: PgPoolLike;
  /**
   * The table, optionally schema-qualified (`'billing.idempotency_keys'`; the schema must exist). Letters,
   * digits and `_` only; it is quoted, so case is kept. Applications sharing a database should each have their
   * own table.
   * @default 'idempotency_keys'
   */
  table?: string;
  /**
   * Whether the first operation creates the table and its index if they do not exist ({@link postgresSchema}).
   * Turn it off when migrations create them and the application's role may not run DDL.
   * @default true
   */
  createTable?: boolean;
  /**
   * Runs every request that holds a key in a transaction of its own, on a connection checked out of `pool`: the
   * handler writes through it (`idempotencyOf(req).db`, a `pg` `PoolClient`), the response is stored in the same
   * transaction, and both commit together before the response is sent. A handler that throws, or a response that
   * is not stored, rolls the handler's writes back with it and frees the key; a process killed mid-handler leaves
   * neither its writes nor a record, and a retry runs once the lease lapses. Costs one pooled connection for as
   * long as each handler runs (size the pool for it), besides the one the lock and the lease renewals use.
   * @default false
   */
  transactional?: boolean;
  /**
   * Announces every stored response and released lock with `NOTIFY`, and listens for them on one connection
   * checked out of `pool` (held for the backend's life), so that duplicates waiting with
   * `onConflict: 'wait'` are woken at once, in any process, instead of polling. Turn it on in every process that
   * shares the table. Costs that one connection, and a notification per store and release.
   * @default false
   */
  notifications?: boolean;
}

/**
 * Default of {@link PostgresBackendOptions.table}.
 *
 * @example
 * ```ts
 * new PostgresBackend({ pool, table: `${DEFAULT_POSTGRES_TABLE}_staging` });
 * ```
 */
export const DEFAULT_POSTGRES_TABLE = DEFAULT_SQL_TABLE;

/**
 * The DDL of the backend's table and its index, for a table name (default {@link DEFAULT_POSTGRES_TABLE}):
 * what the backend runs on first use, for teams that create tables in migrations instead (`createTable: false`).
 *
 * One row per key, keyed by the SHA-256 of the key. A lock has its `token` and its lease's end in `expires_at`;
 * a completed record has no token, its response columns, and its expiry in `expires_at` (`NULL`: kept forever).
 * The index on `expires_at` serves the sweep of expired rows.
 *
 * @example
 * ```ts
 * // in a migration
 * await client.query(postgresSchema('billing.idempotency_keys'));
 * ```
 */
export function postgresSchema(table: string = DEFAULT_POSTGRES_TABLE): string {
  return ddl(parseTableName(table, true));
}

/**
 * {@link postgresSchema} for the default table, as a constant.
 *
 * @example
 * ```ts
 * await pool.query(POSTGRES_SCHEMA);
 * ```
 */
export const POSTGRES_SCHEMA: string = postgresSchema();

function quoted(parts: string[]): string {
  return parts.map((part) => `"${part}"`).join('.');
}

function ddl(parts: string[]): string {
  const table = quoted(parts);
  const index = `"${parts[parts.length - 1]}_expires_at"`;
  return `CREATE TABLE IF NOT EXISTS ${table} (
  key_hash bytea PRIMARY KEY,
  fingerprint bytea NOT NULL,
  token uuid,
  expires_at timestamptz,
  status smallint,
  headers text,
  body bytea,
  created_at bigint
);
CREATE INDEX IF NOT EXISTS ${index} ON ${table} (expires_at);`;
}

/** SQLSTATEs of a table or index created by another process at the same moment (pg_type's unique index, mostly). */
const CREATED_CONCURRENTLY = new Set(['23505', '42P07', '42710']);

/** How `$n::float8` milliseconds become an interval; `NULL` milliseconds give a `NULL` time (kept forever). */
const MS = "* interval '1 millisecond'";

interface Statements {
  readonly create: string;
  readonly acquire: string;
  readonly complete: string;
  readonly release: string;
  /** The notification channel, when notifications are on. */
  readonly channel: string | undefined;
  readonly renew: string;
  readonly sweep: string;
  readonly inspect: string;
  readonly forget: string;
}

// Time is the database's: every statement reads statement_timestamp(), one instant for the whole statement (unlike
// clock_timestamp(), which moves while it runs), taken by the server that all processes share. Process clocks
// never decide whether a lease lapsed.
function statements(parts: string[], notify: boolean): Statements {
  const table = quoted(parts);
  const channel = notify ? `idempotency_${parts.join('_')}`.slice(0, 63) : undefined;
  // With notifications, the write runs in a CTE and the notification is sent only for a row it changed: the
  // statement's row count stays the write's. The payload is the key's hash, in hex, as `watch` listens for it.
  const notifying = (write: string) =>
    channel === undefined
      ? write
      : `WITH done AS (${write} RETURNING key_hash)
SELECT pg_notify('${channel}', encode(key_hash, 'hex')) FROM done`;
  const operator = operatorStatements({
    table,
    key: '$1::bytea',
    force: '$2::boolean',
    live: 'expires_at IS NULL OR expires_at > statement_timestamp()',
    leftMs: 'ceil(extract(epoch FROM expires_at - statement_timestamp()) * 1000)::float8',
    byteLength: 'octet_length',
  });
  return {
    channel,
    inspect: operator.inspect,
    // A forced forget of a lock ends it as a release does: waiters are told, and look again (and run).
    forget: notifying(operator.forget),
    // Runs only when the table is missing, so that an existing table is not locked by every process that starts
    // (CREATE INDEX IF NOT EXISTS takes a lock on the table before it finds the index exists).
    create: `DO $$ BEGIN
IF to_regclass('${table}') IS NULL THEN
${ddl(parts)}
END IF;
END $$`,

    // Atomicity: one statement. `live` reads the key's row if it is held (a lock within its lease, or a record
    // within its expiry). Only if it is not does `taken` write: it inserts the lock, or on conflict takes over
    // the existing row, but only where that row is free (lapsed or expired) as the database sees it once it has
    // locked the row's latest version. So of N concurrent acquires on a free key exactly one inserts or takes
    // over; each other one either read the winner's row in `live` (and answers from it) or, when the winner
    // committed after this statement's snapshot, wrote nothing and read nothing: `acquired` false and no row,
    // a lost race that the caller runs again with a fresh snapshot. A replay or a 409 only reads: no row lock,
    // no write. The body is returned only for a completed record with the same fingerprint.
    // $1 key hash, $2 fingerprint, $3 new token, $4 lease ms.
    acquire: `WITH live AS (
  SELECT fingerprint = $2::bytea AS same,
    token IS NOT NULL AS locked,
    ceil(extract(epoch FROM expires_at - statement_timestamp()) * 1000)::float8 AS left_ms,
    CASE WHEN token IS NULL AND fingerprint = $2::bytea THEN status END AS status,
    CASE WHEN token IS NULL AND fingerprint = $2::bytea THEN headers END AS headers,
    CASE WHEN token IS NULL AND fingerprint = $2::bytea THEN body END AS body,
    created_at
  FROM ${table}
  WHERE key_hash = $1::bytea AND (expires_at IS NULL OR expires_at > statement_timestamp())
), taken AS (
  INSERT INTO ${table} AS held (key_hash, fingerprint, token, expires_at)
  SELECT $1::bytea, $2::bytea, $3::uuid, statement_timestamp() + $4::float8 ${MS}
  WHERE NOT EXISTS (SELECT FROM live)
  ON CONFLICT (key_hash) DO UPDATE
    SET fingerprint = excluded.fingerprint, token = excluded.token, expires_at = excluded.expires_at,
      status = NULL, headers = NULL, body = NULL, created_at = NULL
    WHERE held.expires_at <= statement_timestamp()
  RETURNING 1
)
SELECT EXISTS (SELECT FROM taken) AS acquired, live.*
FROM (VALUES (1)) AS one LEFT JOIN live ON true`,

    // Atomicity: the token check and the write are one UPDATE on the row, so a request whose lease was taken
    // over (new token) or swept (no row) writes nothing; the lock becomes the record in place, with its expiry
    // in the same write. `swept` deletes a bounded batch of other expired rows in the same statement: each
    // complete adds at most one row and deletes up to ${SWEEP_BATCH_ROWS} expired ones, so expired rows cannot
    // pile up, at no extra round trip. SKIP LOCKED: a row another statement is working on is left to it.
    // $1 key hash, $2 token, $3 fingerprint, $4 ttl ms or NULL (kept forever), $5 status or NULL (no response),
    // $6 headers, $7 body, $8 createdAt.
    complete: `WITH swept AS (
  DELETE FROM ${table} WHERE key_hash IN (
    SELECT key_hash FROM ${table}
    WHERE expires_at <= statement_timestamp() AND key_hash <> $1::bytea
    ORDER BY expires_at LIMIT ${SWEEP_BATCH_ROWS}
    FOR UPDATE SKIP LOCKED
  )
)
${notifyingUpdate(
  channel,
  `UPDATE ${table}
SET fingerprint = $3::bytea, token = NULL, expires_at = statement_timestamp() + $4::float8 ${MS},
  status = $5::smallint, headers = $6::text, body = $7::bytea, created_at = $8::bigint
WHERE key_hash = $1::bytea AND token = $2::uuid`,
)}`,

    // Atomicity: the token check and the DELETE are one statement, so a late release cannot free a key another
    // request has taken since; a completed record has no token and is never released.
    release: notifying(`DELETE FROM ${table} WHERE key_hash = $1::bytea AND token = $2::uuid`),

    // Atomicity: the token check and the new lease end are one UPDATE; a lease another request took over (new
    // token) or that was swept is not revived.
    renew: `UPDATE ${table} SET expires_at = statement_timestamp() + $3::float8 ${MS}
WHERE key_hash = $1::bytea AND token = $2::uuid`,

    // One batch of expired rows, oldest first; rows another statement has locked are skipped, not waited for.
    sweep: `DELETE FROM ${table} WHERE key_hash IN (
  SELECT key_hash FROM ${table} WHERE expires_at <= statement_timestamp()
  ORDER BY expires_at LIMIT ${SWEEP_CALL_BATCH_ROWS}
  FOR UPDATE SKIP LOCKED
)`,
  };
}

/**
 * The complete statement's UPDATE, with its notification: it already is a statement with a `WITH` (the sweep),
 * so the notifying part joins that `WITH` rather than nesting another.
 */
function notifyingUpdate(channel: string | undefined, update: string): string {
  if (channel === undefined) return update;
  return `, done AS (${update} RETURNING key_hash)
SELECT pg_notify('${channel}', encode(key_hash, 'hex')) FROM done`;
}

/** The row the acquire statement returns. */
interface AcquireRow extends HeldRow {
  acquired: unknown;
}

/** The option names the constructor takes: any other is refused, as the middleware refuses one. */
const OPTION_NAMES: ReadonlySet<string> = new Set([
  'pool',
  'table',
  'createTable',
  'transactional',
  'notifications',
]);

/**
 * Keeps keys, locks and responses in a PostgreSQL table, next to the application's data, shared by every process
 * that uses the database. Each operation is one statement, one round trip: a first run costs two (acquire,
 * complete), a replay or a 409 one, and a replay only reads. An acquire that loses a race for a free key to a
 * request that committed a moment earlier runs its statement once more.
 *
 * Leases are timed by the database's clock, so processes on machines whose clocks disagree still agree on when a
 * lease lapsed. Expired records and lapsed locks are deleted in small batches by later completes (and by
 * {@link PostgresBackend.sweep}); nothing needs a timer.
 *
 * Works with a `pg` `Pool`, recognised by its `query` method; `pg` is not imported. The table is created on first
 * use unless `createTable` is `false` ({@link postgresSchema} is its DDL). Pool errors reject unchanged.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { PostgresBackend } from 'idempotency-header/postgres';
 *
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, connectionTimeoutMillis: 2000 });
 * pool.on('error', (error) => console.error(error));
 * app.use(idempotencyHeader({ backend: new PostgresBackend({ pool }) }));
 * ```
 */
export class PostgresBackend implements TransactionalBackend {
  /** Whether every request that runs gets a transaction of its own (see {@link PostgresBackendOptions.transactional}). */
  readonly transactional: boolean;
  readonly #pool: PgPoolLike;
  readonly #sql: Statements;
  /** Creates the table once, unless `createTable` is off. */
  readonly #setUp: SetUpOnce;
  /** Who waits for each key (by its hash, in hex) to be stored or released, woken by `LISTEN`. */
  readonly #watchers = new KeyWatchers();
  /** The listening connection, once `LISTEN` was sent; `undefined` until the first {@link watch}. */
  #listening: Promise<PgClientLike> | undefined;
  /** Whether {@link #listening} has resolved: `LISTEN` is in place. */
  #listenReady = false;

  constructor(options: PostgresBackendOptions) {
    rejectUnknownOptions(options, OPTION_NAMES);
    const {
      pool,
      table = DEFAULT_POSTGRES_TABLE,
      createTable = true,
      transactional = false,
      notifications = false,
    } = options ?? ({} as Partial<PostgresBackendOptions>);
    if (typeof pool !== 'object' || pool === null || typeof (pool as PgPoolLike).query !== 'function') {
      throw invalidOption('pool', 'a pg Pool (an object with a query(text, values) method)', pool);
    }
    if (typeof createTable !== 'boolean') throw invalidOption('createTable', 'a boolean', createTable);
    if (typeof transactional !== 'boolean') throw invalidOption('transactional', 'a boolean', transactional);
    if (transactional && typeof pool.connect !== 'function') {
      throw invalidOption('pool', 'a pg Pool with connect(), for the transactional mode', pool);
    }
    if (typeof notifications !== 'boolean') throw invalidOption('notifications', 'a boolean', notifications);
    if (notifications && typeof pool.connect !== 'function') {
      throw invalidOption('pool', 'a pg Pool with connect(), for notifications', pool);
    }
    this.transactional = transactional;
    this.#sql = statements(parseTableName(table, true), notifications);
    this.#pool = pool;
    this.#setUp = new SetUpOnce(() => this.#runCreate(), !createTable);
  }

  async acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    const hash = keyHash(key);
    const fingerprintValue = fingerprintBytes(fingerprint);
    const lease = wholeMilliseconds(leaseMs);
    for (let attempt = 0; attempt < MAX_ACQUIRE_ATTEMPTS; attempt++) {
      const token = newToken();
      const { rows } = await this.#pool.query(this.#sql.acquire, [hash, fingerprintValue, token, lease]);
      const row = rows[0] as AcquireRow | undefined;
      if (row === undefined) throw unexpectedRow('PostgreSQL', 'reply to acquire', rows);
      if (row.acquired === true) return { state: 'acquired', token };
      // No held row and nothing taken: the key changed hands after this statement's snapshot. Look again.
      if (row.same !== null && row.same !== undefined) return heldAnswer(row, fingerprint, 'PostgreSQL');
    }
    throw contended('PostgreSQL');
  }

  async complete(
    key: string,
    token: string,
    record: IdempotencyRecord,
    ttlMs: number | null,
  ): Promise<boolean> {
    return this.#completeOn(this.#pool, key, token, record, ttlMs);
  }

  /**
   * Opens a transaction on a connection of its own, for one request (the transactional mode): the engine hands
   * its connection to the handler, stores the response in it, and commits or rolls back.
   */
  async openTransaction(): Promise<BackendTransaction> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    const client = await this.#pool.connect!();
    try {
      await client.query('BEGIN');
    } catch (error) {
      client.release(error instanceof Error ? error : true);
      throw error;
    }
    let open = true;
    const end = (error?: Error) => {
      open = false;
      client.release(error);
    };
    return {
      client,
      complete: (key, token, record, ttlMs) => this.#completeOn(client, key, token, record, ttlMs),
      async commit() {
        try {
          await client.query('COMMIT');
        } catch (error) {
          end(error instanceof Error ? error : new Error(String(error)));
          throw error;
        }
        end();
      },
      async rollback() {
        if (!open) return;
        try {
          await client.query('ROLLBACK');
          end();
        } catch (error) {
          // A connection that cannot roll back is broken: the pool discards it, and the server rolls back.
          end(error instanceof Error ? error : new Error(String(error)));
        }
      },
    };
  }

  async #completeOn(
    on: PgPoolLike | PgClientLike,
    key: string,
    token: string,
    record: IdempotencyRecord,
    ttlMs: number | null,
  ): Promise<boolean> {
    if (!isToken(token)) return false;
    if (!this.#setUp.done) await this.#setUp.ensure();
    const response = record.response;
    const result = await on.query(this.#sql.complete, [
      keyHash(key),
      token,
      fingerprintBytes(record.fingerprint),
      ttlMs === null ? null : wholeMilliseconds(ttlMs),
      response === null ? null : response.status,
      response === null ? null : encodeHeaders(response.headers),
      response === null ? null : bodyBuffer(response.body),
      Math.round(record.createdAt),
    ]);
    return result.rowCount === 1;
  }

  async release(key: string, token: string): Promise<boolean> {
    if (!isToken(token)) return false;
    if (!this.#setUp.done) await this.#setUp.ensure();
    const result = await this.#pool.query(this.#sql.release, [keyHash(key), token]);
    return result.rowCount === 1;
  }

  async renew(key: string, token: string, leaseMs: number): Promise<boolean> {
    if (!isToken(token)) return false;
    if (!this.#setUp.done) await this.#setUp.ensure();
    const result = await this.#pool.query(this.#sql.renew, [keyHash(key), token, wholeMilliseconds(leaseMs)]);
    return result.rowCount === 1;
  }

  /** The key's state, read in one statement by the database's clock: see {@link Backend.inspect}. */
  async inspect(key: string): Promise<KeyState | undefined> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    const { rows } = await this.#pool.query(this.#sql.inspect, [keyHash(key)]);
    const row = rows[0] as InspectRow | undefined;
    return row === undefined ? undefined : keyStateFrom(row, 'PostgreSQL');
  }

  /**
   * Deletes the key's record, or its lock only with `force` (waking waiters with `notifications` on), in one
   * statement: see {@link Backend.forget}.
   */
  async forget(key: string, force: boolean): Promise<boolean> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    const result = await this.#pool.query(this.#sql.forget, [keyHash(key), force]);
    return result.rowCount === 1;
  }

  /**
   * Resolves once the key may have been stored or released, as announced by `NOTIFY` from any process (with
   * `notifications` on), or once `signal` aborts. Without `notifications`, `undefined`: the key is polled.
   */
  watch(key: string, signal: AbortSignal): Promise<void> | undefined {
    const channel = this.#sql.channel;
    if (channel === undefined) return undefined;
    // Until the connection listens, a notification could pass unheard: a watch begun before `LISTEN` is in place
    // (or failed) wakes its waiter then, to look again.
    const ready = this.#listenReady ? undefined : (this.#listening ?? this.#listen(channel));
    return this.#watchers.watch(keyHash(key).toString('hex'), signal, ready);
  }

  /** Stops listening (with `notifications`) and gives the listening connection back to the pool. */
  async close(): Promise<void> {
    const listening = this.#listening;
    this.#listening = undefined;
    this.#listenReady = false;
    if (listening === undefined) return;
    const client = await listening.catch(() => undefined);
    client?.release(true);
  }

  #listen(channel: string): Promise<PgClientLike> {
    const listening = (async () => {
      const client = await this.#pool.connect!();
      client.on?.('notification', ((message: { channel?: string; payload?: string }) => {
        if (message.channel !== channel || message.payload === undefined) return;
        this.#watchers.wake(message.payload);
      }) as never);
      // A listening connection that breaks is given up; the next watch opens another.
      client.on?.('error', (() => {
        if (this.#listening === listening) {
          this.#listening = undefined;
          this.#listenReady = false;
        }
        client.release(true);
      }) as never);
      try {
        await client.query(`LISTEN "${channel}"`);
      } catch (error) {
        client.release(true);
        throw error;
      }
      this.#listenReady = true;
      return client;
    })();
    listening.catch(() => {
      if (this.#listening === listening) this.#listening = undefined;
    });
    this.#listening = listening;
    return listening;
  }

  /**
   * Deletes every expired record and lapsed lock now, in batches of 1000 rows, and resolves to how many rows it
   * deleted. Not needed for a bounded table (completes sweep as they go); useful from a scheduled job after a
   * burst of traffic followed by silence.
   */
  async sweep(): Promise<number> {
    if (!this.#setUp.done) await this.#setUp.ensure();
    let deleted = 0;
    for (;;) {
      const { rowCount } = await this.#pool.query(this.#sql.sweep);
      deleted += rowCount ?? 0;
      if ((rowCount ?? 0) < SWEEP_CALL_BATCH_ROWS) return deleted;
    }
  }

  async #runCreate(): Promise<void> {
    // Processes starting together race to create the table; the losers' error means it now exists, and running
    // the statement again confirms it.
    for (let attempt = 1; ; attempt++) {
      try {
        await this.#pool.query(this.#sql.create);
        return;
      } catch (error) {
        const code = (error as { code?: unknown } | null)?.code;
        if (attempt >= 3 || typeof code !== 'string' || !CREATED_CONCURRENTLY.has(code)) throw error;
      }
    }
  }
}
