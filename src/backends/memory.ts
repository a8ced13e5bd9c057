import { invalidOption } from '../core/errors.js';
import type { AcquireResult, Backend, IdempotencyRecord } from '../core/types.js';

/** Options of {@link MemoryBackend}. */
export interface MemoryBackendOptions {
  /**
   * Most keys held at once. When a new key would exceed it, the least recently used completed records are
   * evicted; in-flight locks are never evicted.
   * @default 10000
   */
  maxEntries?: number;
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
}

interface Entry {
  record: IdempotencyRecord;
  /** `Infinity` for records stored with `expiry: null`. */
  expiresAt: number;
}

/** Default of {@link MemoryBackendOptions.maxEntries}. */
export const DEFAULT_MAX_ENTRIES = 10_000;
/** Default of {@link MemoryBackendOptions.sweepIntervalMs}. */
export const DEFAULT_SWEEP_INTERVAL_MS = 60_000;

const MISMATCH: AcquireResult = Object.freeze({ state: 'mismatch' });

/**
 * Keeps keys, locks and responses in this process's memory. Every operation is one synchronous step with no
 * `await` between reading and writing, so it is atomic within the process.
 *
 * It cannot coordinate several processes: behind a load balancer or in a cluster, use a shared backend
 * (Redis, PostgreSQL, SQLite). Records are lost when the process exits.
 *
 * @example
 * ```ts
 * import { MemoryBackend } from 'idempotency-header';
 * const backend = new MemoryBackend({ maxEntries: 50_000 });
 * ```
 */
export class MemoryBackend implements Backend {
  readonly #maxEntries: number;
  readonly #locks = new Map<string, Lock>();
  /** Insertion order is recency order: a replay moves its record to the end. */
  readonly #records = new Map<string, Entry>();
  readonly #sweeper: NodeJS.Timeout;
  #tokenSequence = 0;

  constructor(options: MemoryBackendOptions = {}) {
    const { maxEntries = DEFAULT_MAX_ENTRIES, sweepIntervalMs = DEFAULT_SWEEP_INTERVAL_MS } = options;
    if (!Number.isInteger(maxEntries) || maxEntries < 1) {
      throw invalidOption('maxEntries', 'a positive integer', maxEntries);
    }
    if (!Number.isFinite(sweepIntervalMs) || sweepIntervalMs <= 0) {
      throw invalidOption('sweepIntervalMs', 'a positive number of milliseconds', sweepIntervalMs);
    }
    this.#maxEntries = maxEntries;
    this.#sweeper = setInterval(() => this.sweep(), sweepIntervalMs);
    this.#sweeper.unref();
  }

  /** Number of keys held: completed records plus in-flight locks. */
  get size(): number {
    return this.#records.size + this.#locks.size;
  }

  acquire(key: string, fingerprint: string, leaseMs: number): AcquireResult {
    const now = Date.now();
    const entry = this.#records.get(key);
    if (entry !== undefined) {
      if (entry.expiresAt > now) {
        if (entry.record.fingerprint !== fingerprint) return MISMATCH;
        this.#records.delete(key);
        this.#records.set(key, entry);
        return { state: 'completed', record: entry.record };
      }
      this.#records.delete(key);
    }
    const lock = this.#locks.get(key);
    if (lock !== undefined && lock.leaseEndsAt > now) {
      if (lock.fingerprint !== fingerprint) return MISMATCH;
      return { state: 'in-flight', retryAfterMs: lock.leaseEndsAt - now };
    }
    const token = String(++this.#tokenSequence);
    this.#locks.set(key, { token, fingerprint, leaseEndsAt: now + leaseMs });
    if (lock === undefined) this.#evictBeyondLimit();
    return { state: 'acquired', token };
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): boolean {
    if (!this.#holds(key, token)) return false;
    this.#locks.delete(key);
    this.#records.set(key, {
      record,
      expiresAt: ttlMs === null ? Number.POSITIVE_INFINITY : Date.now() + ttlMs,
    });
    return true;
  }

  release(key: string, token: string): boolean {
    if (!this.#holds(key, token)) return false;
    this.#locks.delete(key);
    return true;
  }

  renew(key: string, token: string, leaseMs: number): boolean {
    const lock = this.#locks.get(key);
    if (lock === undefined || lock.token !== token) return false;
    lock.leaseEndsAt = Date.now() + leaseMs;
    return true;
  }

  /** Drops expired records and lapsed locks. Runs on a timer; call it directly to free memory at once. */
  sweep(): void {
    const now = Date.now();
    for (const [key, entry] of this.#records) if (entry.expiresAt <= now) this.#records.delete(key);
    for (const [key, lock] of this.#locks) if (lock.leaseEndsAt <= now) this.#locks.delete(key);
  }

  /** Deletes every key and stops the sweep timer. */
  close(): void {
    clearInterval(this.#sweeper);
    this.#records.clear();
    this.#locks.clear();
  }

  /** A lapsed lease still holds its key until someone else takes it over: its holder may yet complete. */
  #holds(key: string, token: string): boolean {
    return this.#locks.get(key)?.token === token;
  }

  #evictBeyondLimit(): void {
    let excess = this.size - this.#maxEntries;
    if (excess <= 0) return;
    for (const key of this.#records.keys()) {
      this.#records.delete(key);
      if (--excess === 0) return;
    }
  }
}
