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

/**
 * A key's lock, and then, in the same object, its record: every response stored here lives until it expires,
 * often for a day, so each object it is made of is one more the garbage collector promotes and then marks again
 * and again. Completing a lock fills in its record where it is, with no second object and no second map write.
 * The record's objects are made again on a replay, which is rarer than a store.
 */
class Slot {
  /** Fencing token of the request running under the key; `''` once the record is stored. */
  token: string;
  fingerprint: string;
  /** The lease's end while locked; the record's expiry once stored (`Infinity` for `expiry: null`). */
  endsAt: number;
  bytes: number;
  createdAt = 0;
  /** `null` for a request remembered without its response (and while locked). */
  status: number | null = null;
  /**
   * Header names and values, one after the other: joined by line feeds into one string (one object to keep rather
   * than a list and its strings), or as a list when one of them holds a line feed (which Node.js and the Fetch API
   * never let through, but a backend's caller might).
   */
  headers: string | readonly string[] = '';
  body: Uint8Array | null = null;

  constructor(token: string, fingerprint: string, leaseEndsAt: number, bytes: number) {
    this.token = token;
    this.fingerprint = fingerprint;
    this.endsAt = leaseEndsAt;
    this.bytes = bytes;
  }

  get locked(): boolean {
    return this.token !== '';
  }
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
  /** Each key's lock or record: one map, so that a lock turns into its record in place. */
  readonly #entries = new Map<string, Slot>();
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
    return this.#entries.size;
  }

  /** Bytes held, as counted against `maxBytes`. */
  get bytes(): number {
    return this.#bytes;
  }

  acquire(key: string, fingerprint: string, leaseMs: number): AcquireResult {
    if (this.#sweeper === undefined && !this.#closed) this.#startSweeper();
    const now = Date.now();
    const held = this.#entries.get(key);
    const bytes = baseBytes(key, fingerprint);
    if (held === undefined) this.#makeRoom(bytes, now);
    else if (held.endsAt > now) {
      if (held.fingerprint !== fingerprint) return MISMATCH;
      if (held.locked) return { state: 'in-flight', retryAfterMs: held.endsAt - now };
      return { state: 'completed', record: recordOf(held) };
    } else this.#bytes -= held.bytes;
    // A lapsed lock or an expired record is replaced where it is: the key count does not grow.
    const token = String(++this.#tokenSequence);
    this.#entries.set(key, new Slot(token, fingerprint, now + leaseMs, bytes));
    this.#bytes += bytes;
    return { state: 'acquired', token };
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): boolean {
    const lock = this.#lockOf(key, token);
    if (lock === undefined) return false;
    const before = lock.bytes;
    storeRecord(lock, key, record, ttlMs === null ? Number.POSITIVE_INFINITY : Date.now() + ttlMs);
    this.#bytes += lock.bytes - before;
    this.#wake(key);
    return true;
  }

  release(key: string, token: string): boolean {
    const lock = this.#lockOf(key, token);
    if (lock === undefined) return false;
    this.#delete(key, lock);
    this.#wake(key);
    return true;
  }

  /** Resolves once the key's lock is completed or released in this backend, or `signal` aborts. */
  watch(key: string, signal: AbortSignal): Promise<void> {
    return this.#watchers.watch(key, signal);
  }

  renew(key: string, token: string, leaseMs: number): boolean {
    const lock = this.#lockOf(key, token);
    if (lock === undefined) return false;
    lock.endsAt = Date.now() + leaseMs;
    return true;
  }

  /** The key's state: see {@link Backend.inspect}. */
  inspect(key: string): KeyState | undefined {
    const now = Date.now();
    const held = this.#entries.get(key);
    if (held === undefined || !isHeld(held, now)) return undefined;
    if (held.locked)
      return { state: 'in-flight', fingerprint: held.fingerprint, leaseLeftMs: held.endsAt - now };
    return {
      state: 'completed',
      fingerprint: held.fingerprint,
      status: held.status,
      storedAt: held.createdAt,
      expiresAt: Number.isFinite(held.endsAt) ? held.endsAt : null,
      size: held.body?.byteLength ?? 0,
    };
  }

  /** Deletes the key's record, and its lock only with `force`: see {@link Backend.forget}. */
  forget(key: string, force: boolean): boolean {
    const held = this.#entries.get(key);
    if (held === undefined) return false;
    // An expired record or a lapsed lock, not yet swept, was no longer held: as on the other backends, nothing
    // was forgotten.
    if (!isHeld(held, Date.now())) {
      this.#delete(key, held);
      return false;
    }
    if (held.locked && !force) return false;
    this.#delete(key, held);
    if (held.locked) this.#wake(key);
    return true;
  }

  /** Drops expired records and lapsed locks. Runs on a timer; call it directly to free memory at once. */
  sweep(): void {
    const now = Date.now();
    for (const [key, held] of this.#entries) if (!isHeld(held, now)) this.#delete(key, held);
  }

  /** Deletes every key and stops the sweep timer. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#sweeper);
    this.#entries.clear();
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

  /** The key's lock, if `token` holds it (a lapsed lease included, until another request takes the key). */
  #lockOf(key: string, token: string): Slot | undefined {
    const held = this.#entries.get(key);
    // A stored record's token is '', which no request holds.
    return held !== undefined && held.token === token ? held : undefined;
  }

  #delete(key: string, held: Slot): void {
    this.#entries.delete(key);
    this.#bytes -= held.bytes;
  }
}

/** What a key costs against `maxBytes` before any response: the entry, the key and the fingerprint. */
function baseBytes(key: string, fingerprint: string): number {
  return ENTRY_OVERHEAD_BYTES + 2 * (key.length + fingerprint.length);
}

/** Whether a lock's lease or a record's expiry is still running. */
function isHeld(held: Slot, now: number): boolean {
  return held.endsAt > now;
}

/** Turns a lock into its record, in place: the token is cleared, so that its holder can no longer write. */
function storeRecord(slot: Slot, key: string, record: IdempotencyRecord, expiresAt: number): void {
  const response = record.response;
  let bytes = baseBytes(key, record.fingerprint);
  const headers: string[] = [];
  let lineFeed = false;
  if (response !== null) {
    bytes += response.body.byteLength;
    for (const [name, value] of response.headers) {
      headers.push(name, value);
      bytes += 2 * (name.length + value.length) + 16;
      lineFeed ||= name.includes('\n') || value.includes('\n');
    }
  }
  slot.token = '';
  slot.fingerprint = record.fingerprint;
  slot.endsAt = expiresAt;
  slot.bytes = bytes;
  slot.createdAt = record.createdAt;
  slot.status = response === null ? null : response.status;
  slot.headers = lineFeed ? headers : headers.join('\n');
  slot.body = response === null ? null : ownBytes(response.body);
}

/**
 * The body as bytes of its own. A view into a larger buffer (a slice of Node.js's shared pool, where a short
 * `Buffer.from` puts its bytes) would keep the whole buffer alive as long as the record, memory that `maxBytes`
 * does not count.
 */
function ownBytes(body: Uint8Array): Uint8Array {
  return body.byteOffset === 0 && body.byteLength === body.buffer.byteLength ? body : new Uint8Array(body);
}

function recordOf(entry: Slot): IdempotencyRecord {
  const { fingerprint, createdAt, status, body } = entry;
  if (status === null || body === null) return { fingerprint, createdAt, response: null };
  const list = typeof entry.headers === 'string' ? splitHeaders(entry.headers) : entry.headers;
  const headers: HeaderPair[] = [];
  for (let i = 0; i + 1 < list.length; i += 2) headers.push([list[i]!, list[i + 1]!]);
  return { fingerprint, createdAt, response: { status, headers, body } };
}

function splitHeaders(joined: string): string[] {
  return joined === '' ? [] : joined.split('\n');
}
