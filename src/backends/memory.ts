import { IdempotencyError, invalidOption } from '../core/errors.js';
import type { AcquireResult, Backend, HeaderPair, IdempotencyRecord, KeyState } from '../core/types.js';
import { KeyWatchers } from './_watchers.js';

/** Options of {@link MemoryBackend}. */
export interface MemoryBackendOptions {
  /**
   * Most keys held at once, completed records and in-flight locks together. Nothing unexpired is ever evicted to
   * make room: when full, a new key is a backend error (`onBackendError`: 503, or the handler runs without
   * idempotency) until records expire.
   * @default 100000
   */
  maxEntries?: number;
  /**
   * Most bytes held at once, counted as the stored bodies, headers, keys and fingerprints plus a fixed overhead
   * per entry. Like `maxEntries`, a bound that refuses new keys rather than evicting records.
   * @default 67108864 (64 MiB)
   */
  maxBytes?: number;
  /**
   * How often expired records and lapsed locks are swept, in milliseconds, so that memory is freed even for keys
   * that are never read again. The timer is `unref()`'d: it never keeps the process alive.
   * @default 60000
   */
  sweepIntervalMs?: number;
}

interface Lock {
  token: string;
  fingerprint: string;
  leaseEndsAt: number;
  bytes: number;
}

/**
 * A stored record, kept flat: every response stored here lives until it expires, often for a day, so each object
 * it is made of is one more the garbage collector promotes and then marks again and again. The record's objects
 * are made again on a replay, which is rarer than a store.
 */
interface Entry {
  readonly fingerprint: string;
  readonly createdAt: number;
  /** `null` for a request remembered without its response. */
  readonly status: number | null;
  /** Header names and values, one after the other. */
  readonly headers: readonly string[];
  readonly body: Uint8Array | null;
  /** `Infinity` for records stored with `expiry: null`. */
  readonly expiresAt: number;
  readonly bytes: number;
}

/** Default of {@link MemoryBackendOptions.maxEntries}. */
export const DEFAULT_MAX_ENTRIES = 100_000;
/** Default of {@link MemoryBackendOptions.maxBytes}: 64 MiB. */
export const DEFAULT_MAX_BYTES = 64 * 1024 * 1024;
/** Default of {@link MemoryBackendOptions.sweepIntervalMs}. */
export const DEFAULT_SWEEP_INTERVAL_MS = 60_000;

/** What an entry costs beyond its strings and body: the map slot, the objects, the numbers. */
const ENTRY_OVERHEAD_BYTES = 160;
/** A full store sweeps before refusing a key, but at most this often, so that a flood does not sweep per request. */
const FULL_SWEEP_INTERVAL_MS = 1000;

const MISMATCH: AcquireResult = Object.freeze({ state: 'mismatch' });

/**
 * Keeps keys, locks and responses in this process's memory. Every operation is one synchronous step with no
 * `await` between reading and writing, so it is atomic within the process.
 *
 * It is bounded by entries and bytes and frees expired records on a timer, but it never evicts an unexpired
 * record or a lock: a record lives until it expires, whatever other clients send. When full, a new key is a
 * backend error.
 *
 * It cannot coordinate several processes: behind a load balancer or in a cluster, use a shared backend
 * (Redis, PostgreSQL, MySQL, SQLite). Records are lost when the process exits.
 *
 * @example
 * ```ts
 * import { MemoryBackend } from 'idempotency-header';
 * const backend = new MemoryBackend({ maxEntries: 500_000, maxBytes: 256 * 1024 * 1024 });
 * ```
 */
export class MemoryBackend implements Backend {
  readonly #maxEntries: number;
  readonly #maxBytes: number;
  readonly #locks = new Map<string, Lock>();
  readonly #records = new Map<string, Entry>();
  readonly #sweepIntervalMs: number;
  /** Started by the first `acquire`: a Cloudflare Worker may not start a timer at its global scope. */
  #sweeper: ReturnType<typeof setInterval> | undefined;
  #closed = false;
  #bytes = 0;
  /** Who waits for each key's lock to end ({@link watch}), woken in this process by complete and release. */
  readonly #watchers = new KeyWatchers();
  #tokenSequence = 0;
  #lastFullSweep = 0;

  constructor(options: MemoryBackendOptions = {}) {
    const {
      maxEntries = DEFAULT_MAX_ENTRIES,
      maxBytes = DEFAULT_MAX_BYTES,
      sweepIntervalMs = DEFAULT_SWEEP_INTERVAL_MS,
    } = options;
    if (!Number.isSafeInteger(maxEntries) || maxEntries < 1) {
      throw invalidOption('maxEntries', 'a positive integer', maxEntries);
    }
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 1) {
      throw invalidOption('maxBytes', 'a positive integer', maxBytes);
    }
    if (!Number.isFinite(sweepIntervalMs) || sweepIntervalMs <= 0) {
      throw invalidOption('sweepIntervalMs', 'a positive number of milliseconds', sweepIntervalMs);
    }
    this.#maxEntries = maxEntries;
    this.#maxBytes = maxBytes;
    this.#sweepIntervalMs = sweepIntervalMs;
  }

  #startSweeper(): void {
    this.#sweeper = setInterval(() => this.sweep(), this.#sweepIntervalMs);
    (this.#sweeper as { unref?: () => void }).unref?.();
  }

  /** Number of keys held: completed records plus in-flight locks. */
  get size(): number {
    return this.#records.size + this.#locks.size;
  }

  /** Bytes held, as counted against `maxBytes`. */
  get bytes(): number {
    return this.#bytes;
  }

  acquire(key: string, fingerprint: string, leaseMs: number): AcquireResult {
    if (this.#sweeper === undefined && !this.#closed) this.#startSweeper();
    const now = Date.now();
    const entry = this.#records.get(key);
    if (entry !== undefined) {
      if (entry.expiresAt > now) {
        if (entry.fingerprint !== fingerprint) return MISMATCH;
        return { state: 'completed', record: recordOf(entry) };
      }
      this.#deleteRecord(key, entry);
    }
    const lock = this.#locks.get(key);
    if (lock !== undefined && lock.leaseEndsAt > now) {
      if (lock.fingerprint !== fingerprint) return MISMATCH;
      return { state: 'in-flight', retryAfterMs: lock.leaseEndsAt - now };
    }
    const bytes = ENTRY_OVERHEAD_BYTES + 2 * (key.length + fingerprint.length);
    if (lock !== undefined) this.#deleteLock(key, lock);
    else this.#makeRoom(bytes, now);
    const token = String(++this.#tokenSequence);
    this.#locks.set(key, { token, fingerprint, leaseEndsAt: now + leaseMs, bytes });
    this.#bytes += bytes;
    return { state: 'acquired', token };
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): boolean {
    const lock = this.#locks.get(key);
    if (lock?.token !== token) return false;
    this.#deleteLock(key, lock);
    this.#wake(key);
    const entry = entryOf(key, record, ttlMs === null ? Number.POSITIVE_INFINITY : Date.now() + ttlMs);
    this.#records.set(key, entry);
    this.#bytes += entry.bytes;
    return true;
  }

  release(key: string, token: string): boolean {
    const lock = this.#locks.get(key);
    if (lock?.token !== token) return false;
    this.#deleteLock(key, lock);
    this.#wake(key);
    return true;
  }

  /** Resolves once the key's lock is completed or released in this backend, or `signal` aborts. */
  watch(key: string, signal: AbortSignal): Promise<void> {
    return this.#watchers.watch(key, signal);
  }

  renew(key: string, token: string, leaseMs: number): boolean {
    const lock = this.#locks.get(key);
    if (lock === undefined || lock.token !== token) return false;
    lock.leaseEndsAt = Date.now() + leaseMs;
    return true;
  }

  /** The key's state: see {@link Backend.inspect}. */
  inspect(key: string): KeyState | undefined {
    const now = Date.now();
    const entry = this.#records.get(key);
    if (entry !== undefined && entry.expiresAt > now) {
      return {
        state: 'completed',
        fingerprint: entry.fingerprint,
        status: entry.status,
        storedAt: entry.createdAt,
        expiresAt: Number.isFinite(entry.expiresAt) ? entry.expiresAt : null,
        size: entry.body?.byteLength ?? 0,
      };
    }
    const lock = this.#locks.get(key);
    if (lock !== undefined && lock.leaseEndsAt > now) {
      return { state: 'in-flight', fingerprint: lock.fingerprint, leaseLeftMs: lock.leaseEndsAt - now };
    }
    return undefined;
  }

  /** Deletes the key's record, and its lock only with `force`: see {@link Backend.forget}. */
  forget(key: string, force: boolean): boolean {
    const now = Date.now();
    const entry = this.#records.get(key);
    if (entry !== undefined) {
      this.#deleteRecord(key, entry);
      // An expired record, not yet swept, was no longer held: as on the other backends, nothing was forgotten.
      return entry.expiresAt > now;
    }
    const lock = this.#locks.get(key);
    if (lock === undefined) return false;
    if (lock.leaseEndsAt <= now) {
      this.#deleteLock(key, lock);
      return false;
    }
    if (!force) return false;
    this.#deleteLock(key, lock);
    this.#wake(key);
    return true;
  }

  /** Drops expired records and lapsed locks. Runs on a timer; call it directly to free memory at once. */
  sweep(): void {
    const now = Date.now();
    for (const [key, entry] of this.#records) if (entry.expiresAt <= now) this.#deleteRecord(key, entry);
    for (const [key, lock] of this.#locks) if (lock.leaseEndsAt <= now) this.#deleteLock(key, lock);
  }

  /** Deletes every key and stops the sweep timer. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#sweeper);
    this.#records.clear();
    this.#locks.clear();
    this.#bytes = 0;
  }

  /**
   * Refuses a new key when the store is full, after sweeping what has expired. A completed record's size is only
   * known when it is stored, so `maxBytes` is checked here, where a key comes in: a store can overshoot it by one
   * response at most (`maxResponseBytes`).
   */
  #makeRoom(bytes: number, now: number): void {
    if (this.#fits(bytes)) return;
    if (now - this.#lastFullSweep >= FULL_SWEEP_INTERVAL_MS) {
      this.#lastFullSweep = now;
      this.sweep();
      if (this.#fits(bytes)) return;
    }
    // Without a stack trace: once the store is full, a flood of fresh keys meets this on every request, and
    // capturing the stack made a refusal cost more than twice a replay (the stack would only ever point here).
    const stackTraceLimit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    const full = new IdempotencyError(
      'ERR_IDEMPOTENCY_BACKEND_FULL',
      `MemoryBackend is full (${this.size} of ${this.#maxEntries} entries, ${this.#bytes} of ${this.#maxBytes} bytes); unexpired records are never evicted`,
    );
    Error.stackTraceLimit = stackTraceLimit;
    throw full;
  }

  #wake(key: string): void {
    this.#watchers.wake(key);
  }

  #fits(bytes: number): boolean {
    return this.size < this.#maxEntries && this.#bytes + bytes <= this.#maxBytes;
  }

  #deleteRecord(key: string, entry: Entry): void {
    this.#records.delete(key);
    this.#bytes -= entry.bytes;
  }

  #deleteLock(key: string, lock: Lock): void {
    this.#locks.delete(key);
    this.#bytes -= lock.bytes;
  }
}

function entryOf(key: string, record: IdempotencyRecord, expiresAt: number): Entry {
  const response = record.response;
  let bytes = ENTRY_OVERHEAD_BYTES + 2 * (key.length + record.fingerprint.length);
  const headers: string[] = [];
  if (response !== null) {
    bytes += response.body.byteLength;
    for (const [name, value] of response.headers) {
      headers.push(name, value);
      bytes += 2 * (name.length + value.length) + 16;
    }
  }
  return {
    fingerprint: record.fingerprint,
    createdAt: record.createdAt,
    status: response === null ? null : response.status,
    headers,
    body: response === null ? null : response.body,
    expiresAt,
    bytes,
  };
}

function recordOf(entry: Entry): IdempotencyRecord {
  const { fingerprint, createdAt, status, body } = entry;
  if (status === null || body === null) return { fingerprint, createdAt, response: null };
  const headers: HeaderPair[] = [];
  for (let i = 0; i < entry.headers.length; i += 2) headers.push([entry.headers[i]!, entry.headers[i + 1]!]);
  return { fingerprint, createdAt, response: { status, headers, body } };
}
