/**
 * A small backend over a `Map`, correct by default, with switches that each break one promise of the contract
 * the way real backends get it wrong. Several instances may share one store, as processes share a database.
 */
import { randomUUID } from 'node:crypto';
import type {
  AcquireResult,
  Backend,
  HeaderPair,
  IdempotencyRecord,
  KeyState,
} from '../../../src/core/types.js';

/** The ways a backend can be wrong, one switch each. */
export interface Flaws {
  /** acquire() reads, yields to the event loop, then writes: a check-then-set that is not atomic. */
  yieldsBetweenReadAndWrite?: boolean;
  /** Serialises acquire() per key with a mutex of its own instance: atomic in one process, not across two. */
  mutexPerInstance?: boolean;
  /** complete() stores whatever token it is given, as long as the key is locked. */
  unfencedComplete?: boolean;
  /** release() frees the key whatever token it is given. */
  unfencedRelease?: boolean;
  /** renew() extends the lease whatever token it is given. */
  unfencedRenew?: boolean;
  /** A lease never lapses: a crashed holder's key is stuck. */
  leasesNeverLapse?: boolean;
  /** Records never expire. */
  recordsNeverExpire?: boolean;
  /** Records expire at once when stored with `ttlMs: null` (null read as 0). */
  nullTtlIsZero?: boolean;
  /** Keys are normalised to Unicode NFC, so that two different keys meet. */
  normalisesKeys?: boolean;
  /** Bodies are stored as UTF-8 text, so bytes that are not valid UTF-8 are lost. */
  bodiesAsText?: boolean;
  /** Headers come back sorted by name, their order lost. */
  sortsHeaders?: boolean;
  /** retryAfterMs is in seconds. */
  retryAfterInSeconds?: boolean;
  /** Tokens are the key itself: every holder of a key has the same token. */
  tokenIsTheKey?: boolean;
  /** forget() deletes a held lock without `force`. */
  forgetIgnoresForce?: boolean;
  /**
   * Not a defect: leases and records end this many milliseconds late, as in a store whose expiry is coarse or
   * lazy. Safe, but the contract's default waits are too short for it.
   */
  lateExpiryMs?: number;
}

type Entry =
  | { kind: 'lock'; fingerprint: string; token: string; leaseEndsAt: number }
  | { kind: 'record'; record: IdempotencyRecord; body: Uint8Array | string | null; expiresAt: number };

/** The shared storage: what several {@link ToyBackend}s on "one database" have in common. */
export type ToyStore = Map<string, Entry>;

export class ToyBackend implements Backend {
  readonly #store: ToyStore;
  readonly #flaws: Flaws;
  readonly #mutexes = new Map<string, Promise<unknown>>();

  constructor(flaws: Flaws = {}, store: ToyStore = new Map()) {
    this.#flaws = flaws;
    this.#store = store;
  }

  /** Another instance on the same storage. */
  peer(): ToyBackend {
    return new ToyBackend(this.#flaws, this.#store);
  }

  #key(key: string): string {
    return this.#flaws.normalisesKeys ? key.normalize('NFC') : key;
  }

  /** The key's entry, unless its lease lapsed or its record expired. */
  #live(key: string, now = Date.now()): Entry | undefined {
    const entry = this.#store.get(this.#key(key));
    if (entry === undefined) return undefined;
    const late = this.#flaws.lateExpiryMs ?? 0;
    if (entry.kind === 'lock' && entry.leaseEndsAt + late <= now && !this.#flaws.leasesNeverLapse)
      return undefined;
    if (entry.kind === 'record' && entry.expiresAt + late <= now && !this.#flaws.recordsNeverExpire)
      return undefined;
    return entry;
  }

  async acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    if (!this.#flaws.mutexPerInstance) return this.#acquire(key, fingerprint, leaseMs);
    const previous = this.#mutexes.get(key) ?? Promise.resolve();
    const next = previous.then(() => this.#acquire(key, fingerprint, leaseMs));
    this.#mutexes.set(
      key,
      next.catch(() => {}),
    );
    return next;
  }

  async #acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    const now = Date.now();
    const entry = this.#live(key, now);
    if (this.#flaws.yieldsBetweenReadAndWrite) await new Promise((resolve) => setImmediate(resolve));
    if (entry?.kind === 'record') {
      if (entry.record.fingerprint !== fingerprint) return { state: 'mismatch' };
      return { state: 'completed', record: this.#read(entry) };
    }
    if (entry?.kind === 'lock') {
      if (entry.fingerprint !== fingerprint) return { state: 'mismatch' };
      const leftMs = Math.max(1, entry.leaseEndsAt - now);
      return {
        state: 'in-flight',
        retryAfterMs: this.#flaws.retryAfterInSeconds ? Math.ceil(leftMs / 1000) : leftMs,
      };
    }
    const token = this.#flaws.tokenIsTheKey ? key : randomUUID();
    this.#store.set(this.#key(key), { kind: 'lock', fingerprint, token, leaseEndsAt: now + leaseMs });
    return { state: 'acquired', token };
  }

  /** The entry's record as stored: a copy, never the caller's objects. */
  #read(entry: Entry & { kind: 'record' }): IdempotencyRecord {
    const { record, body } = entry;
    if (record.response === null) return { ...record, response: null };
    let headers: HeaderPair[] = record.response.headers.map(([name, value]) => [name, value]);
    if (this.#flaws.sortsHeaders) headers = headers.sort(([a], [b]) => a.localeCompare(b));
    const bytes = typeof body === 'string' ? Buffer.from(body, 'utf8') : Uint8Array.from(body ?? []);
    return { ...record, response: { status: record.response.status, headers, body: bytes } };
  }

  #holds(key: string, token: string, fenced: boolean): boolean {
    const entry = this.#live(key);
    return entry?.kind === 'lock' && (!fenced || entry.token === token);
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): boolean {
    if (!this.#holds(key, token, !this.#flaws.unfencedComplete)) return false;
    const ttl = ttlMs === null && this.#flaws.nullTtlIsZero ? 0 : ttlMs;
    const source = record.response?.body;
    const body =
      source === undefined
        ? null
        : this.#flaws.bodiesAsText
          ? Buffer.from(source).toString('utf8')
          : Uint8Array.from(source);
    this.#store.set(this.#key(key), {
      kind: 'record',
      record: {
        fingerprint: record.fingerprint,
        createdAt: record.createdAt,
        response: record.response && { ...record.response, headers: [...record.response.headers] },
      },
      body,
      expiresAt: ttl === null ? Number.POSITIVE_INFINITY : Date.now() + ttl,
    });
    return true;
  }

  release(key: string, token: string): boolean {
    if (!this.#holds(key, token, !this.#flaws.unfencedRelease)) return false;
    this.#store.delete(this.#key(key));
    return true;
  }

  renew(key: string, token: string, leaseMs: number): boolean {
    if (!this.#holds(key, token, !this.#flaws.unfencedRenew)) return false;
    const entry = this.#live(key);
    if (entry?.kind === 'lock') entry.leaseEndsAt = Date.now() + leaseMs;
    return true;
  }

  inspect(key: string): KeyState | undefined {
    const now = Date.now();
    const entry = this.#live(key, now);
    if (entry === undefined) return undefined;
    if (entry.kind === 'lock') {
      return { state: 'in-flight', fingerprint: entry.fingerprint, leaseLeftMs: entry.leaseEndsAt - now };
    }
    return {
      state: 'completed',
      fingerprint: entry.record.fingerprint,
      status: entry.record.response?.status ?? null,
      storedAt: entry.record.createdAt,
      expiresAt: Number.isFinite(entry.expiresAt) ? entry.expiresAt : null,
      size:
        entry.body === null
          ? 0
          : typeof entry.body === 'string'
            ? Buffer.byteLength(entry.body)
            : entry.body.byteLength,
    };
  }

  forget(key: string, force: boolean): boolean {
    const entry = this.#live(key);
    if (entry === undefined) return false;
    if (entry.kind === 'lock' && !force && !this.#flaws.forgetIgnoresForce) return false;
    this.#store.delete(this.#key(key));
    return true;
  }
}
