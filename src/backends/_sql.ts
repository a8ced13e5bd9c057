/**
 * What the SQL backends (PostgreSQL, MySQL/MariaDB, SQLite) share: the row layout's encodings, table name checks,
 * tokens, and turning a row into an {@link AcquireResult}. Not a public entry point.
 *
 * Every SQL backend keeps one row per idempotency key:
 *
 * | column        | in flight                   | completed                                         |
 * | ------------- | --------------------------- | ------------------------------------------------- |
 * | `key_hash`    | SHA-256 of the key (32 B)   | same                                              |
 * | `fingerprint` | the request's, as UTF-8     | same                                              |
 * | `token`       | the lock's fencing token    | `NULL`                                            |
 * | `expires_at`  | end of the lease            | end of `expiry`; `NULL` for `expiry: null`        |
 * | `status`      | `NULL`                      | the status; `NULL` for a record without response  |
 * | `headers`     | `NULL`                      | JSON array of `[name, value]` pairs               |
 * | `body`        | `NULL`                      | the body bytes                                    |
 * | `created_at`  | `NULL`                      | `createdAt`, milliseconds since the epoch         |
 *
 * A row whose `expires_at` has passed is free: a lapsed lease or an expired record, taken over by the next
 * acquire or deleted by a sweep.
 */
import { createHash, randomUUID } from 'node:crypto';
import { IdempotencyError, invalidOption } from '../core/errors.js';
import type { AcquireResult, HeaderPair, IdempotencyRecord, KeyState } from '../core/types.js';

/** The table name every SQL backend uses unless told otherwise. */
export const DEFAULT_SQL_TABLE = 'idempotency_keys';

/**
 * Most expired rows one sweep batch deletes. The PostgreSQL and SQLite backends delete up to this many with every
 * `complete`, which adds at most one row, so expired rows are deleted faster than they can pile up.
 */
export const SWEEP_BATCH_ROWS = 16;

/** Most rows one batch of an explicit `sweep()` deletes, so that no statement holds locks on a huge range. */
export const SWEEP_CALL_BATCH_ROWS = 1000;

/**
 * How often an acquire that lost a race is tried again before giving up. A race is lost only when another
 * request changed the key between this one's read and its write; each new attempt sees that change, so a second
 * attempt almost always decides, and reaching this bound means the key is being churned pathologically.
 */
export const MAX_ACQUIRE_ATTEMPTS = 10;

/** One identifier: a letter or underscore, then letters, digits or underscores. */
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** Longest table name part: PostgreSQL's 63-byte identifiers, minus room for the `_expires_at` index suffix. */
const MAX_IDENTIFIER_LENGTH = 48;

/**
 * Checks a table name option and splits it into its parts: `name`, or `schema.name` when `qualified` is allowed.
 * Only plain identifiers are accepted, so that the name can be put into SQL text (quoted) without any escaping.
 */
export function parseTableName(table: unknown, qualified: boolean): string[] {
  const expected = qualified
    ? `a table name (letters, digits and _, at most ${MAX_IDENTIFIER_LENGTH} characters, not starting with a digit), optionally qualified as schema.table`
    : `a table name (letters, digits and _, at most ${MAX_IDENTIFIER_LENGTH} characters, not starting with a digit)`;
  if (typeof table !== 'string') throw invalidOption('table', expected, table);
  const parts = table.split('.');
  if (
    parts.length > (qualified ? 2 : 1) ||
    !parts.every((part) => IDENTIFIER.test(part) && part.length <= MAX_IDENTIFIER_LENGTH)
  ) {
    throw invalidOption('table', expected, table);
  }
  return parts;
}

/**
 * The key's row identity: SHA-256 of its UTF-8 bytes. Fixed-size and binary, so that keys of any length index
 * well, no collation can fold two keys into one (MySQL's case-insensitive, space-trimming defaults), and the raw
 * key, which may carry a tenant or user id, is not stored. It is the same hash `onEvent` reports as `keyHash`,
 * so a log line leads to its row.
 */
export function keyHash(key: string): Buffer {
  return createHash('sha256').update(key, 'utf8').digest();
}

/** A new fencing token: a random UUID, so that tokens never repeat across processes. */
export function newToken(): string {
  return randomUUID();
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Whether `token` has the form {@link newToken} makes; any other string holds no key. */
export function isToken(token: string): boolean {
  return UUID.test(token);
}

/** A token's 16 bytes, for a `BINARY(16)` column; `undefined` for a string that is not a token. */
export function tokenBytes(token: string): Buffer | undefined {
  return isToken(token) ? Buffer.from(token.replaceAll('-', ''), 'hex') : undefined;
}

/** The fingerprint as stored: its UTF-8 bytes, compared byte for byte whatever the database's collation. */
export function fingerprintBytes(fingerprint: string): Buffer {
  return Buffer.from(fingerprint, 'utf8');
}

/** A body as a `Buffer` view over the same memory (drivers bind `Buffer`s as binary), without a copy. */
export function bodyBuffer(body: Uint8Array): Buffer {
  return Buffer.isBuffer(body) ? body : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
}

/** A lease or ttl as whole milliseconds, at least 1: a zero lease would be free the moment it is taken. */
export function wholeMilliseconds(ms: number): number {
  return Math.max(1, Math.ceil(ms));
}

/** Headers as stored: a JSON array of pairs, order and repeated names kept. */
export function encodeHeaders(headers: HeaderPair[]): string {
  return JSON.stringify(headers);
}

/**
 * What an acquire that did not take the key read: the row's state as the database computed it at the statement's
 * instant. The response columns are only filled for a completed record with the same fingerprint.
 */
export interface HeldRow {
  /** The stored fingerprint equals the request's. */
  same: unknown;
  /** The row is a lock (its token is set), not a completed record. */
  locked: unknown;
  /** Milliseconds left on the lease or record, by the database's clock; `NULL` for a record kept forever. */
  left_ms: unknown;
  status: unknown;
  headers: unknown;
  body: unknown;
  created_at: unknown;
}

const MISMATCH: AcquireResult = Object.freeze({ state: 'mismatch' });

/**
 * The answer for a key that is held, from the row the statement returned: mismatch, in flight (with the lease's
 * time left) or the completed record. `fingerprint` is the request's, equal to the stored one when they match.
 */
export function heldAnswer(row: HeldRow, fingerprint: string, database: string): AcquireResult {
  if (!truthy(row.same)) return MISMATCH;
  if (truthy(row.locked)) {
    return { state: 'in-flight', retryAfterMs: Math.max(1, Number(row.left_ms)) };
  }
  return { state: 'completed', record: recordFrom(row, fingerprint, database) };
}

function recordFrom(row: HeldRow, fingerprint: string, database: string): IdempotencyRecord {
  const createdAt = Number(row.created_at);
  if (row.status === null || row.status === undefined) return { fingerprint, createdAt, response: null };
  return {
    fingerprint,
    createdAt,
    response: {
      status: Number(row.status),
      headers: decodeHeaders(row.headers, database),
      body: bytesFrom(row.body, database),
    },
  };
}

/**
 * How one SQL dialect spells what the operator statements ({@link operatorStatements}) need; everything else in
 * them is the same in PostgreSQL, MySQL/MariaDB and SQLite.
 */
export interface OperatorDialect {
  /** The table, quoted. */
  readonly table: string;
  /** The key hash's placeholder (`$1::bytea`, `?`, `@key`). */
  readonly key: string;
  /** The force flag's placeholder, a boolean (`$2::boolean`) or 1/0 (`?`, `@force`). */
  readonly force: string;
  /** The condition of a row that is held: a lock within its lease, or a record within its expiry. */
  readonly live: string;
  /** Milliseconds from the database's now to `expires_at`; `NULL` for a record kept forever. */
  readonly leftMs: string;
  /** The function that gives a BLOB's length in bytes (`octet_length`, `LENGTH`, `length`). */
  readonly byteLength: string;
}

/** The statements behind `inspect` and `forget`, for one dialect. */
export interface OperatorStatements {
  /** Reads the key's row if it is held; parameter: key hash. Rows: {@link InspectRow}. */
  readonly inspect: string;
  /** Deletes the key's row if it is held, a lock only when forced; parameters: key hash, force. */
  readonly forget: string;
}

/**
 * The SQL of the operator API, shared by the SQL backends. Both judge a row by the database's clock, as acquire
 * does, so that they agree with it on whether a lease lapsed: an expired row is "nothing held" to inspect and is
 * left to the sweep by forget. The body itself is never read, only its length.
 */
export function operatorStatements(dialect: OperatorDialect): OperatorStatements {
  const { table, key, force, live, leftMs, byteLength } = dialect;
  return {
    inspect: `SELECT fingerprint, token IS NOT NULL AS locked, ${leftMs} AS left_ms, status,
  ${byteLength}(body) AS size, created_at
FROM ${table} WHERE key_hash = ${key} AND (${live})`,
    // Atomicity: the lock check and the DELETE are one statement, so a key taken by a request between an
    // operator's inspect and this forget is refused unless forced, never deleted from under it by surprise.
    forget: `DELETE FROM ${table} WHERE key_hash = ${key} AND (token IS NULL OR ${force}) AND (${live})`,
  };
}

/** A row of {@link OperatorStatements.inspect}. */
export interface InspectRow {
  fingerprint: unknown;
  locked: unknown;
  left_ms: unknown;
  status: unknown;
  size: unknown;
  created_at: unknown;
}

/**
 * The {@link KeyState} of a held row. Times are given by this process's clock (`storedAt` is the record's
 * `createdAt`, set by the process that stored it), so `expiresAt` is now plus what the database says is left.
 */
export function keyStateFrom(row: InspectRow, database: string, now: number = Date.now()): KeyState {
  const fingerprint = textFrom(row.fingerprint, database);
  const leftMs = row.left_ms === null || row.left_ms === undefined ? null : Number(row.left_ms);
  if (truthy(row.locked)) {
    return { state: 'in-flight', fingerprint, leaseLeftMs: Math.max(1, leftMs ?? 0) };
  }
  return {
    state: 'completed',
    fingerprint,
    status: row.status === null || row.status === undefined ? null : Number(row.status),
    storedAt: Number(row.created_at),
    expiresAt: leftMs === null ? null : now + leftMs,
    size: row.size === null || row.size === undefined ? 0 : Number(row.size),
  };
}

function textFrom(value: unknown, database: string): string {
  if (value instanceof Uint8Array)
    return Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString();
  if (typeof value === 'string') return value;
  throw unexpectedRow(database, 'fingerprint', value);
}

/** Booleans as drivers return them: `true`/`false` (PostgreSQL), `1`/`0` (MySQL, SQLite), perhaps as strings. */
function truthy(value: unknown): boolean {
  return value === true || value === 1 || value === '1' || value === 1n || value === 't';
}

function decodeHeaders(value: unknown, database: string): HeaderPair[] {
  const json = Buffer.isBuffer(value) ? value.toString('utf8') : value;
  if (typeof json !== 'string') throw unexpectedRow(database, 'headers', value);
  const headers: unknown = JSON.parse(json);
  if (!Array.isArray(headers)) throw unexpectedRow(database, 'headers', value);
  return headers as HeaderPair[];
}

function bytesFrom(value: unknown, database: string): Uint8Array {
  if (value instanceof Uint8Array) return value;
  // SQLite hands back a zero-length BLOB as NULL through some drivers; the status says a response was stored.
  if (value === null) return new Uint8Array(0);
  throw unexpectedRow(database, 'body', value);
}

/** The error for a row or reply this package cannot read: a driver configured to transform results, most likely. */
export function unexpectedRow(database: string, what: string, value: unknown): IdempotencyError {
  const shown = Buffer.isBuffer(value) ? `<Buffer ${value.byteLength} bytes>` : typeof value;
  return new IdempotencyError(
    'ERR_IDEMPOTENCY_BACKEND',
    `Unexpected ${what} from ${database}: ${shown}. Is the driver configured to transform results (type parsers, typeCast)?`,
  );
}

/** The error when an acquire kept losing races: see {@link MAX_ACQUIRE_ATTEMPTS}. */
export function contended(database: string): IdempotencyError {
  return new IdempotencyError(
    'ERR_IDEMPOTENCY_BACKEND',
    `${database}: the key changed hands between every read and write of ${MAX_ACQUIRE_ATTEMPTS} attempts to acquire it`,
  );
}

/**
 * A backend's one-time set-up (creating its table, finding out what the server supports): the first caller runs
 * it, concurrent callers share that attempt, and a failed attempt is forgotten so that the next call tries again.
 * `done` is read on every operation, so that a set-up that succeeded costs nothing more.
 */
export class SetUpOnce {
  /** Whether the set-up has succeeded (or was not needed). */
  done: boolean;
  readonly #run: () => Promise<void>;
  #attempt: Promise<void> | undefined;

  constructor(run: () => Promise<void>, done = false) {
    this.#run = run;
    this.done = done;
  }

  /** Runs the set-up, or joins the attempt under way. */
  ensure(): Promise<void> {
    this.#attempt ??= this.#run().then(
      () => {
        this.done = true;
      },
      (error: unknown) => {
        this.#attempt = undefined;
        throw error;
      },
    );
    return this.#attempt;
  }
}
