import { IdempotencyError, invalidOption, rejectUnknownOptions } from '../core/errors.js';
import {
  type AcquireResult,
  type Backend,
  type IdempotencyRecord,
  type KeyState,
  TEXT_BODIES,
} from '../core/types.js';
import { RecordArena } from './_arena.js';
import { KeyIndex, type KeyOwner } from './_key-index.js';
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
   * Most bytes held at once, counted as each record's bytes (body, headers and fingerprint, in a cell at most a
   * fifth larger), its key, and a fixed overhead per entry, plus the cells of the records' buffers that no record
   * uses at the moment. Like `maxEntries`, a bound that refuses new keys rather than evicting records.
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
 * A key's lock while its request runs. Once the response is stored, the key's entry is the record's handle in the
 * {@link RecordArena} instead: a number, not an object, since a record lives until it expires, often for a day,
 * and objects that live long are what the garbage collector pays for.
 */
class Lock {
  constructor(
    readonly key: string,
    /** Its number among the locks held: its entry in the index is `~id`, a negative number. */
    readonly id: number,
    /** Fencing token of the request running under the key. */
    readonly token: string,
    readonly fingerprint: string,
    /** The lease's end. */
    public endsAt: number,
    readonly bytes: number,
  ) {}
}

/** A key's lock, or its record's handle in the arena. */
type Entry = Lock | number;

/** Default of {@link MemoryBackendOptions.maxEntries}. */
export const DEFAULT_MAX_ENTRIES = 100_000;
/** Default of {@link MemoryBackendOptions.maxBytes}: 64 MiB. */
export const DEFAULT_MAX_BYTES = 64 * 1024 * 1024;
/** Default of {@link MemoryBackendOptions.sweepIntervalMs}. */
export const DEFAULT_SWEEP_INTERVAL_MS = 60_000;

/** What an entry costs beyond its key and its lock or record: its slots in the index, the lock object. */
const ENTRY_OVERHEAD_BYTES = 96;
/** A full store sweeps before refusing a key, but at most this often, so that a flood does not sweep per request. */
const FULL_SWEEP_INTERVAL_MS = 1000;

const MISMATCH: AcquireResult = Object.freeze({ state: 'mismatch' });

/** The option names the constructor takes: any other is refused, as the middleware refuses one. */
const OPTION_NAMES: ReadonlySet<string> = new Set(['maxEntries', 'maxBytes', 'sweepIntervalMs']);

/**
 * Keeps keys, locks and responses in this process's memory. Every operation is one synchronous step with no
 * `await` between reading and writing, so it is atomic within the process.
 *
 * It is bounded by entries and bytes and frees expired records on a timer, but it never evicts an unexpired
 * record or a lock: a record lives until it expires, whatever other clients send. When full, a new key is a
 * backend error.
 *
 * Stored records are kept as bytes in shared buffers, not as objects (see `RecordArena`): a record lives as long
 * as its expiry, and long-lived objects are what every garbage collection pays for.
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
  /**
   * A body sent as text is encoded once, into the record's cell (see `TEXT_BODIES`); not for a subclass that
   * overrides `complete`, which is handed the bytes its type promises. @internal
   */
  get [TEXT_BODIES](): boolean {
    return this.complete === MemoryBackend.prototype.complete;
  }
  readonly #maxEntries: number;
  readonly #maxBytes: number;
  /**
   * Each key's entry: its record's handle (zero or more), or `~id` of its lock (negative). One index, so that a
   * lock turns into its record in place.
   */
  readonly #entries: KeyIndex;
  /** The locks held, by id; the ids of the free places among them. */
  #locks: (Lock | undefined)[] = [];
  #freeLockIds: number[] = [];
  /** The records' bytes, each with its key. */
  readonly #records: RecordArena;
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
    rejectUnknownOptions(options, OPTION_NAMES);
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
    // Buffers of at most a sixteenth of the bound, so that the cells a buffer holds unused stay a small part of it.
    this.#records = new RecordArena(maxBytes / 16);
    this.#entries = new KeyIndex(this.#keyOwner());
    this.#sweepIntervalMs = sweepIntervalMs;
  }

  /** How the index finds the key of an entry: in the lock, or in the record's cell. */
  #keyOwner(): KeyOwner {
    const records = this.#records;
    return {
      isKeyOf: (value, key) => (value < 0 ? this.#locks[~value]!.key === key : records.hasKey(value, key)),
      keyOf: (value) => (value < 0 ? this.#locks[~value]!.key : records.key(value)),
    };
  }

  /** The key's lock or record handle. */
  #entryOf(key: string): Entry | undefined {
    const value = this.#entries.get(key);
    return value === undefined || value >= 0 ? value : this.#locks[~value];
  }

  #newLock(key: string, token: string, fingerprint: string, endsAt: number, bytes: number): Lock {
    const id = this.#freeLockIds.pop() ?? this.#locks.length;
    const lock = new Lock(key, id, token, fingerprint, endsAt, bytes);
    this.#locks[id] = lock;
    this.#entries.set(key, ~id);
    return lock;
  }

  #dropLock(lock: Lock): void {
    this.#locks[lock.id] = undefined;
    this.#freeLockIds.push(lock.id);
  }

  #startSweeper(): void {
    this.#sweeper = setInterval(() => this.sweep(), this.#sweepIntervalMs);
    (this.#sweeper as { unref?: () => void }).unref?.();
  }

  /** Number of keys held: completed records plus in-flight locks. */
  get size(): number {
    return this.#entries.size;
  }

  /**
   * Bytes held by records and locks. What is counted against `maxBytes` is this plus the cells of the records'
   * buffers that no record uses at the moment (freed, or not used yet): memory held all the same.
   */
  get bytes(): number {
    return this.#bytes;
  }

  acquire(key: string, fingerprint: string, leaseMs: number): AcquireResult {
    if (this.#sweeper === undefined && !this.#closed) this.#startSweeper();
    const now = Date.now();
    const held = this.#entryOf(key);
    const bytes = lockBytes(key, fingerprint);
    if (held === undefined) this.#makeRoom(bytes, now);
    else if (typeof held === 'number') {
      const records = this.#records;
      if (records.expiresAt(held) > now) {
        if (!records.hasFingerprint(held, fingerprint)) return MISMATCH;
        return { state: 'completed', record: records.read(held, fingerprint) };
      }
    } else if (held.endsAt > now) {
      if (held.fingerprint !== fingerprint) return MISMATCH;
      return { state: 'in-flight', retryAfterMs: held.endsAt - now };
    }
    // A lapsed lock or an expired record is replaced where it is: the key count does not grow. It is freed once
    // replaced, as the index reads its key until then.
    const token = String(++this.#tokenSequence);
    this.#newLock(key, token, fingerprint, now + leaseMs, bytes);
    if (held !== undefined) this.#free(held);
    this.#bytes += bytes;
    return { state: 'acquired', token };
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): boolean {
    const lock = this.#lockOf(key, token);
    if (lock === undefined) return false;
    const expiresAt = ttlMs === null ? Number.POSITIVE_INFINITY : Date.now() + ttlMs;
    const handle = this.#records.store(key, record, expiresAt);
    this.#entries.set(key, handle);
    this.#dropLock(lock);
    this.#bytes += recordBytes(this.#records.bytesOf(handle)) - lock.bytes;
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
    const held = this.#entryOf(key);
    if (held === undefined || !this.#isHeld(held, now)) return undefined;
    if (typeof held !== 'number')
      return { state: 'in-flight', fingerprint: held.fingerprint, leaseLeftMs: held.endsAt - now };
    const records = this.#records;
    const expiresAt = records.expiresAt(held);
    return {
      state: 'completed',
      fingerprint: records.fingerprint(held),
      status: records.status(held),
      storedAt: records.createdAt(held),
      expiresAt: Number.isFinite(expiresAt) ? expiresAt : null,
      size: records.bodyLength(held),
    };
  }

  /** Deletes the key's record, and its lock only with `force`: see {@link Backend.forget}. */
  forget(key: string, force: boolean): boolean {
    const held = this.#entryOf(key);
    if (held === undefined) return false;
    // An expired record or a lapsed lock, not yet swept, was no longer held: as on the other backends, nothing
    // was forgotten.
    if (!this.#isHeld(held, Date.now())) {
      this.#delete(key, held);
      return false;
    }
    const locked = typeof held !== 'number';
    if (locked && !force) return false;
    this.#delete(key, held);
    if (locked) this.#wake(key);
    return true;
  }

  /**
   * Drops expired records and lapsed locks, and gives back the buffers their records no longer use. Runs on a
   * timer; call it directly to free memory at once.
   */
  sweep(): void {
    const now = Date.now();
    const records = this.#records;
    for (const value of this.#entries.values()) {
      const held = value >= 0 ? value : this.#locks[~value]!;
      if (this.#isHeld(held, now)) continue;
      this.#delete(typeof held === 'number' ? records.key(held) : held.key, held);
    }
    records.releaseEmptySlabs();
  }

  /** Deletes every key and stops the sweep timer. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#sweeper);
    this.#entries.clear();
    this.#locks = [];
    this.#freeLockIds = [];
    this.#records.clear();
    this.#bytes = 0;
  }

  /**
   * Refuses a new key when the store is full, after sweeping what has expired. A completed record's size is only
   * known when it is stored, so `maxBytes` is checked here, where a key comes in: a store can overshoot it by one
   * response (`maxResponseBytes`) or one buffer of cells (a sixteenth of `maxBytes`, 256 KiB at most) at most.
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
      `MemoryBackend is full (${this.size} of ${this.#maxEntries} entries, ${this.#heldBytes()} of ${this.#maxBytes} bytes); unexpired records are never evicted`,
    );
    Error.stackTraceLimit = stackTraceLimit;
    throw full;
  }

  #wake(key: string): void {
    this.#watchers.wake(key);
  }

  #fits(bytes: number): boolean {
    return this.size < this.#maxEntries && this.#heldBytes() + bytes <= this.#maxBytes;
  }

  /** Memory held: {@link bytes}, and the cells of the records' buffers that no record uses. */
  #heldBytes(): number {
    return this.#bytes + this.#records.idleBytes;
  }

  /** The key's lock, if `token` holds it (a lapsed lease included, until another request takes the key). */
  #lockOf(key: string, token: string): Lock | undefined {
    const held = this.#entryOf(key);
    return typeof held === 'object' && held.token === token ? held : undefined;
  }

  /** Whether a lock's lease or a record's expiry is still running. */
  #isHeld(held: Entry, now: number): boolean {
    return (typeof held === 'number' ? this.#records.expiresAt(held) : held.endsAt) > now;
  }

  #delete(key: string, held: Entry): void {
    this.#entries.delete(key);
    this.#free(held);
  }

  /** Frees a lock or a record and its bytes; its key's entry is deleted or replaced by the caller, first. */
  #free(held: Entry): void {
    if (typeof held === 'number') {
      this.#bytes -= recordBytes(this.#records.bytesOf(held));
      this.#records.free(held);
    } else {
      this.#bytes -= held.bytes;
      this.#dropLock(held);
    }
  }
}

/** What a lock costs against `maxBytes`: the entry, the key and the fingerprint. */
function lockBytes(key: string, fingerprint: string): number {
  return ENTRY_OVERHEAD_BYTES + 2 * (key.length + fingerprint.length);
}

/** What a record costs against `maxBytes`: the entry, and the record's cell or buffer (its key included). */
function recordBytes(cellBytes: number): number {
  return ENTRY_OVERHEAD_BYTES + cellBytes;
}
