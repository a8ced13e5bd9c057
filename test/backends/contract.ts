/**
 * The contract every {@link Backend} must pass, races and lease expiry included. A backend's test file calls
 * {@link describeBackendContract} once per configuration, then adds the tests that only make sense for it.
 *
 * Every test works on its own random keys, so suites may share a server (and run beside other suites) without
 * seeing each other's keys. Backend methods may answer synchronously or with a promise: every call is awaited.
 *
 * Deliberately left open: whether a lease that lapsed but that nobody took over still lets its holder complete,
 * release or renew. MemoryBackend says yes (the lock stays until replaced); RedisBackend says no (the lock's key
 * expired with its lease). Both are safe; the engine must treat `false` as "lease lost" either way.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { storageKeyOf } from '../../src/core/engine.js';
import { forgetKey, inspectKey } from '../../src/core/operator.js';
import type {
  AcquiredResult,
  AcquireResult,
  Backend,
  CompletedKeyState,
  CompletedResult,
  IdempotencyRecord,
  InFlightKeyState,
  InFlightResult,
  KeyState,
  StoredResponse,
} from '../../src/core/types.js';

/** What a contract run needs: the backend under test and how to dispose of it. */
export interface BackendContractContext {
  /** The backend under test. It is shared by every test of the run. */
  backend: Backend;
  /** Called once after the last test: close clients, delete the run's keys, stop timers. */
  teardown(): Promise<void>;
}

/** A lease long enough never to lapse during a test. */
const LONG_LEASE_MS = 30_000;
/** A lease that lapses within a test. */
const SHORT_LEASE_MS = 150;
/** A record expiry that passes within a test. */
const SHORT_TTL_MS = 200;
/** How long to wait for a short lease or ttl to be over, with a margin for timer and clock granularity. */
const LAPSE_WAIT_MS = 350;

const FINGERPRINT = 'a'.repeat(64);
const OTHER_FINGERPRINT = 'b'.repeat(64);

/** A fresh key, unique to one test. */
function newKey(label = 'key'): string {
  return `${label}:${randomUUID()}`;
}

/** A record with a small JSON body; `body` replaces it. */
function makeRecord(
  body: Uint8Array = Buffer.from('{"id":1}'),
  fingerprint = FINGERPRINT,
): IdempotencyRecord & { response: StoredResponse } {
  return {
    fingerprint,
    createdAt: Date.now(),
    response: {
      status: 201,
      headers: [
        ['content-type', 'application/json; charset=utf-8'],
        ['location', '/orders/1'],
      ],
      body,
    },
  };
}

function expectAcquired(result: AcquireResult): string {
  expect(result.state).toBe('acquired');
  const { token } = result as AcquiredResult;
  expect(typeof token).toBe('string');
  expect(token.length).toBeGreaterThan(0);
  return token;
}

function expectInFlight(result: AcquireResult): number {
  expect(result.state).toBe('in-flight');
  return (result as InFlightResult).retryAfterMs;
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Asserts that `result` replays exactly `expected`: fingerprint, time, status, headers in order, body bytes. */
function expectCompletedWith(result: AcquireResult, expected: IdempotencyRecord): void {
  expect(result.state).toBe('completed');
  const { record } = result as CompletedResult;
  expect(record.fingerprint).toBe(expected.fingerprint);
  expect(record.createdAt).toBe(expected.createdAt);
  if (expected.response === null) {
    expect(record.response).toBeNull();
    return;
  }
  expect(record.response).not.toBeNull();
  if (record.response === null) return;
  expect(record.response.status).toBe(expected.response.status);
  expect(record.response.headers).toEqual(expected.response.headers);
  expect(record.response.body).toBeInstanceOf(Uint8Array);
  expect(record.response.body.byteLength).toBe(expected.response.body.byteLength);
  // Compared as buffers rather than with toEqual: a 200 KB diff helps nobody, and the check is exact.
  expect(asBuffer(record.response.body).equals(asBuffer(expected.response.body))).toBe(true);
}

/**
 * Registers the backend contract suite.
 *
 * @param name - names the run in the report, e.g. `'MemoryBackend'` or `'RedisBackend (ioredis)'`.
 * @param setup - called once before the run's first test; returns the backend and its teardown.
 *
 * @example
 * ```ts
 * describeBackendContract('MemoryBackend', async () => {
 *   const backend = new MemoryBackend();
 *   return { backend, teardown: async () => backend.close() };
 * });
 * ```
 */
export function describeBackendContract(name: string, setup: () => Promise<BackendContractContext>): void {
  describe(`${name} (backend contract)`, () => {
    let context: BackendContractContext | undefined;
    /** The backend under test; only valid inside a test. */
    let backend: Backend;

    beforeAll(async () => {
      context = await setup();
      backend = context.backend;
    });

    afterAll(async () => {
      await context?.teardown();
    });

    /** Acquires a fresh key with a long lease and returns it with its token. */
    async function lockedKey(label?: string): Promise<{ key: string; token: string }> {
      const key = newKey(label);
      const token = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      return { key, token };
    }

    /** Acquires, completes and returns a fresh key with its record. */
    async function completedKey(record: IdempotencyRecord = makeRecord(), ttlMs: number | null = 60_000) {
      const { key, token } = await lockedKey();
      expect(await backend.complete(key, token, record, ttlMs)).toBe(true);
      return { key, record };
    }

    describe('acquire', () => {
      it('takes a free key and returns a token', async () => {
        const key = newKey();
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('lets exactly one of 50 parallel acquires on one key win and answers the other 49 in-flight', async () => {
        const key = newKey('race');
        const results = await Promise.all(
          Array.from({ length: 50 }, async () => backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)),
        );
        const counts = { acquired: 0, 'in-flight': 0, completed: 0, mismatch: 0 };
        for (const result of results) counts[result.state]++;
        expect(counts).toEqual({ acquired: 1, 'in-flight': 49, completed: 0, mismatch: 0 });
      });

      it('gives every acquire of a free key a different token', async () => {
        const tokens = new Set<string>();
        for (let i = 0; i < 20; i++) {
          const { key, token } = await lockedKey();
          tokens.add(token);
          expect(await backend.release(key, token)).toBe(true);
          tokens.add(expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)));
        }
        expect(tokens.size).toBe(40);
      });

      it('answers in-flight with retryAfterMs within (0, leaseMs] while the key is held', async () => {
        const key = newKey();
        const leaseMs = 5_000;
        expectAcquired(await backend.acquire(key, FINGERPRINT, leaseMs));
        const retryAfterMs = expectInFlight(await backend.acquire(key, FINGERPRINT, leaseMs));
        expect(retryAfterMs).toBeGreaterThan(0);
        expect(retryAfterMs).toBeLessThanOrEqual(leaseMs);
        // Freshly taken: most of the lease is left (a lenient bound, to tell ms from seconds).
        expect(retryAfterMs).toBeGreaterThan(leaseMs / 2);
      });

      it('answers mismatch to a different fingerprint while the key is in flight', async () => {
        const { key } = await lockedKey();
        expect(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS)).toEqual({ state: 'mismatch' });
        // The holder is undisturbed.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('answers completed with the exact stored record to the same fingerprint', async () => {
        const { key, record } = await completedKey();
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
        // A replay does not consume the record.
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('answers mismatch to a different fingerprint once the key is completed', async () => {
        const { key, record } = await completedKey();
        expect(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS)).toEqual({ state: 'mismatch' });
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('treats an empty fingerprint (fingerprinting off) like any other value', async () => {
        const record = makeRecord(undefined, '');
        const key = newKey();
        const token = expectAcquired(await backend.acquire(key, '', LONG_LEASE_MS));
        expect(await backend.complete(key, token, record, 60_000)).toBe(true);
        expectCompletedWith(await backend.acquire(key, '', LONG_LEASE_MS), record);
        expect(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)).toEqual({ state: 'mismatch' });
      });

      it("keeps keys that differ only by ':' or unicode characters apart", async () => {
        const base = randomUUID();
        const keys = [
          `${base}`,
          `${base}:`,
          `${base}:a`,
          `${base}a:`,
          `${base}::a`,
          `${base}:a:`,
          `:${base}a`,
          `${base}:é`, // U+00E9, NFC
          `${base}:e\u0301`, // e + combining acute, NFD
          `${base}:Ã©`, // the UTF-8 bytes of é read as latin1, as a header may arrive
          `${base}:É`,
          `${base}:😀`,
          `${base}:\u{1F601}`,
          `${base}:日本`,
          `${base}:\u0000`,
          `${base}: `,
        ];
        expect(new Set(keys).size).toBe(keys.length);
        const records = new Map<string, IdempotencyRecord>();
        for (const [i, key] of keys.entries()) {
          const token = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
          const record = makeRecord(Buffer.from(`{"key":${i}}`));
          records.set(key, record);
          expect(await backend.complete(key, token, record, 60_000)).toBe(true);
        }
        for (const key of keys) {
          expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), records.get(key)!);
        }
      });
    });

    describe('leases', () => {
      it('lets a new acquire take over a lapsed lease with a new token and fences the old token out', async () => {
        const key = newKey();
        const oldToken = expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        await sleep(LAPSE_WAIT_MS);
        const newToken = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        expect(newToken).not.toBe(oldToken);

        expect(await backend.renew(key, oldToken, LONG_LEASE_MS)).toBe(false);
        expect(await backend.complete(key, oldToken, makeRecord(Buffer.from('stale')), 60_000)).toBe(false);
        expect(await backend.release(key, oldToken)).toBe(false);

        // The new holder still holds the key, and its own write goes through.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        const record = makeRecord(Buffer.from('fresh'));
        expect(await backend.complete(key, newToken, record, 60_000)).toBe(true);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('lets a different fingerprint take over a lapsed lease', async () => {
        const key = newKey();
        expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        await sleep(LAPSE_WAIT_MS);
        expectAcquired(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });

      it('extends the lease with renew so the key is still in flight after the original lease would have lapsed', async () => {
        const key = newKey();
        const token = expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        expect(await backend.renew(key, token, 5_000)).toBe(true);
        await sleep(LAPSE_WAIT_MS);
        const retryAfterMs = expectInFlight(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        expect(retryAfterMs).toBeGreaterThan(SHORT_LEASE_MS);
        expect(retryAfterMs).toBeLessThanOrEqual(5_000);
        // The renewed holder still completes.
        expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(true);
      });

      it('returns false from renew with a token that does not hold the key, and leaves the lease alone', async () => {
        const { key } = await lockedKey();
        expect(await backend.renew(key, 'not-the-token', LONG_LEASE_MS)).toBe(false);
        expect(await backend.renew(newKey(), 'not-the-token', LONG_LEASE_MS)).toBe(false);
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('returns false from renew on a completed key and keeps the record', async () => {
        const { key, token } = await lockedKey();
        const record = makeRecord();
        expect(await backend.complete(key, token, record, 60_000)).toBe(true);
        expect(await backend.renew(key, token, LONG_LEASE_MS)).toBe(false);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });
    });

    describe('release', () => {
      it('frees the key so the next acquire wins, and a second release with the same token is harmless', async () => {
        const { key, token } = await lockedKey();
        expect(await backend.release(key, token)).toBe(true);
        const next = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        expect(next).not.toBe(token);

        expect(await backend.release(key, token)).toBe(false);
        // The second release did not free the new holder's key.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        expect(await backend.release(key, next)).toBe(true);
        expect(await backend.release(key, next)).toBe(false);
      });

      it('returns false for a token that does not hold the key and keeps the lock', async () => {
        const { key } = await lockedKey();
        expect(await backend.release(key, 'not-the-token')).toBe(false);
        expect(await backend.release(newKey(), 'not-the-token')).toBe(false);
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('returns false on a completed key and keeps the record', async () => {
        const { key, token } = await lockedKey();
        const record = makeRecord();
        expect(await backend.complete(key, token, record, 60_000)).toBe(true);
        expect(await backend.release(key, token)).toBe(false);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('lets a different fingerprint take a released key', async () => {
        const { key, token } = await lockedKey();
        expect(await backend.release(key, token)).toBe(true);
        expectAcquired(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });
    });

    describe('complete', () => {
      it('round-trips a body with all 256 byte values byte for byte', async () => {
        const body = Uint8Array.from({ length: 512 }, (_, i) => (i * 7 + 3) % 256);
        expect(new Set(body).size).toBe(256);
        const { key, record } = await completedKey(makeRecord(body));
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a 200 KB random body byte for byte', async () => {
        const { key, record } = await completedKey(makeRecord(randomBytes(200 * 1024)));
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a body that is a view into a larger buffer', async () => {
        const backing = Buffer.from('xxxx{"inner":true}yyyy');
        const body = new Uint8Array(backing.buffer, backing.byteOffset + 4, backing.byteLength - 8);
        const { key } = await completedKey(makeRecord(body));
        const result = await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS);
        expect(result.state).toBe('completed');
        expect(asBuffer((result as CompletedResult).record.response!.body).toString()).toBe('{"inner":true}');
      });

      it('round-trips an empty body', async () => {
        const { key, record } = await completedKey(makeRecord(new Uint8Array(0)));
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips status and headers, repeated names included, in order', async () => {
        const record: IdempotencyRecord = {
          fingerprint: FINGERPRINT,
          createdAt: Date.now(),
          response: {
            status: 202,
            headers: [
              ['link', '</a>; rel="next"'],
              ['content-type', 'application/json'],
              ['link', '</b>; rel="prev"'],
              ['x-empty', ''],
              ['x-note', 'café, "quoted", \\backslash'],
              ['link', '</c>; rel="last"'],
            ],
            body: Buffer.from('{}'),
          },
        };
        const { key } = await completedKey(record);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a record without headers', async () => {
        const record = makeRecord();
        record.response.headers = [];
        record.response.status = 204;
        const { key } = await completedKey(record);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a record remembered without its response (response: null)', async () => {
        const record: IdempotencyRecord = { fingerprint: FINGERPRINT, createdAt: Date.now(), response: null };
        const { key } = await completedKey(record);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
        expect((await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS)).state).toBe('mismatch');
      });

      it('frees the key once a short ttl has passed, so acquire wins again', async () => {
        const { key } = await completedKey(makeRecord(), SHORT_TTL_MS);
        expect((await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)).state).toBe('completed');
        await sleep(SHORT_TTL_MS + LAPSE_WAIT_MS);
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('keeps a record stored with ttlMs null after a short ttl beside it has expired', async () => {
        const shortLived = await completedKey(makeRecord(), SHORT_TTL_MS);
        const forever = await completedKey(makeRecord(), null);
        await sleep(SHORT_TTL_MS + LAPSE_WAIT_MS);
        expectAcquired(await backend.acquire(shortLived.key, FINGERPRINT, LONG_LEASE_MS));
        expectCompletedWith(await backend.acquire(forever.key, FINGERPRINT, LONG_LEASE_MS), forever.record);
      });

      it('returns false for a wrong token and stores nothing', async () => {
        const { key, token } = await lockedKey();
        expect(await backend.complete(key, 'not-the-token', makeRecord(), 60_000)).toBe(false);
        // Still held by the real token, and nothing was stored.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        expect(await backend.release(key, token)).toBe(true);
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('returns false for a key that was never acquired and stores nothing', async () => {
        const key = newKey();
        expect(await backend.complete(key, 'not-the-token', makeRecord(), 60_000)).toBe(false);
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('ends the lock, so a second complete with the same token returns false and keeps the first record', async () => {
        const { key, token } = await lockedKey();
        const first = makeRecord(Buffer.from('first'));
        expect(await backend.complete(key, token, first, 60_000)).toBe(true);
        expect(await backend.complete(key, token, makeRecord(Buffer.from('second')), 60_000)).toBe(false);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), first);
      });

      it('lets exactly one of two racing completes with different tokens win, and only its holder', async () => {
        const key = newKey();
        const stale = expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        await sleep(LAPSE_WAIT_MS);
        const current = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        const staleRecord = makeRecord(Buffer.from('stale'));
        const currentRecord = makeRecord(Buffer.from('current'));
        const [staleWrote, currentWrote] = await Promise.all([
          backend.complete(key, stale, staleRecord, 60_000),
          backend.complete(key, current, currentRecord, 60_000),
        ]);
        expect([staleWrote, currentWrote]).toEqual([false, true]);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), currentRecord);
      });
    });

    // The operator API (inspect, forget): self-contained, so that it can move with the suite as one block.
    describe('inspect and forget (operator API)', () => {
      /** The backend's operator methods; a backend of this project must have both. */
      function operator() {
        const { inspect, forget } = backend;
        if (inspect === undefined || forget === undefined)
          throw new Error('inspect() or forget() is missing');
        return {
          inspect: async (key: string): Promise<KeyState | undefined> => inspect.call(backend, key),
          forget: async (key: string, force = false): Promise<boolean> => forget.call(backend, key, force),
        };
      }

      /** How far a backend's clock (a database's) and rounding may put an expiry from this process's estimate. */
      const CLOCK_SLACK_MS = 1_000;

      it('finds nothing for a key never used', async () => {
        expect(await operator().inspect(newKey())).toBeUndefined();
      });

      it('tells a lock in flight with its fingerprint and the lease left', async () => {
        const key = newKey();
        expectAcquired(await backend.acquire(key, FINGERPRINT, 5_000));
        const state = (await operator().inspect(key)) as InFlightKeyState;
        expect(state).toEqual({
          state: 'in-flight',
          fingerprint: FINGERPRINT,
          leaseLeftMs: expect.any(Number),
        });
        expect(state.leaseLeftMs).toBeGreaterThan(2_500);
        expect(state.leaseLeftMs).toBeLessThanOrEqual(5_000);
      });

      it('tells a completed key with its status, fingerprint, times and body size', async () => {
        const body = randomBytes(200 * 1024);
        const record = makeRecord(body);
        const { key } = await completedKey(record, 60_000);
        const state = (await operator().inspect(key)) as CompletedKeyState;
        expect(state).toEqual({
          state: 'completed',
          fingerprint: FINGERPRINT,
          status: 201,
          storedAt: record.createdAt,
          expiresAt: expect.any(Number),
          size: body.byteLength,
        });
        expect(Math.abs(state.expiresAt! - (Date.now() + 60_000))).toBeLessThan(CLOCK_SLACK_MS);
        // Inspecting reads, and changes nothing: the record still replays.
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('tells a record kept forever (expiresAt null), one without its response (status null, size 0), and an empty body', async () => {
        const forever = await completedKey(makeRecord(), null);
        expect(await operator().inspect(forever.key)).toMatchObject({ state: 'completed', expiresAt: null });
        const unstored: IdempotencyRecord = {
          fingerprint: OTHER_FINGERPRINT,
          createdAt: 1_000,
          response: null,
        };
        const { key, token } = await lockedKey();
        expect(await backend.complete(key, token, unstored, 60_000)).toBe(true);
        expect(await operator().inspect(key)).toMatchObject({
          state: 'completed',
          fingerprint: OTHER_FINGERPRINT,
          status: null,
          storedAt: 1_000,
          size: 0,
        });
        const empty = await completedKey(makeRecord(new Uint8Array(0)));
        expect(await operator().inspect(empty.key)).toMatchObject({ status: 201, size: 0 });
      });

      it('finds nothing once a lease lapsed or a record expired', async () => {
        const lapsed = newKey();
        expectAcquired(await backend.acquire(lapsed, FINGERPRINT, SHORT_LEASE_MS));
        const expired = await completedKey(makeRecord(), SHORT_TTL_MS);
        await sleep(SHORT_TTL_MS + LAPSE_WAIT_MS);
        expect(await operator().inspect(lapsed)).toBeUndefined();
        expect(await operator().inspect(expired.key)).toBeUndefined();
        expect(await operator().forget(expired.key, true)).toBe(false);
      });

      it('forgets a completed key, so that the next acquire runs again', async () => {
        const { key } = await completedKey();
        expect(await operator().forget(key)).toBe(true);
        expect(await operator().inspect(key)).toBeUndefined();
        expect(await operator().forget(key)).toBe(false);
        expectAcquired(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });

      it('refuses to forget a lock unless forced, and a forced forget fences its holder out', async () => {
        const { key, token } = await lockedKey();
        expect(await operator().forget(key)).toBe(false);
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        expect(await operator().forget(key, true)).toBe(true);
        expect(await operator().inspect(key)).toBeUndefined();
        // The holder's late store is refused, and the key is free for the next request.
        expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(false);
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('lets exactly one of 20 parallel forgets of one record delete it', async () => {
        const { key } = await completedKey();
        const results = await Promise.all(Array.from({ length: 20 }, async () => operator().forget(key)));
        expect(results.filter(Boolean)).toHaveLength(1);
      });

      it('reaches keys by scope through inspectKey and forgetKey, and keeps scopes apart', async () => {
        const key = randomUUID();
        const tenantA = storageKeyOf(key, 'tenant-a');
        const token = expectAcquired(await backend.acquire(tenantA, FINGERPRINT, LONG_LEASE_MS));
        expect(await backend.complete(tenantA, token, makeRecord(), 60_000)).toBe(true);
        expectAcquired(await backend.acquire(storageKeyOf(key, 'tenant-b'), FINGERPRINT, LONG_LEASE_MS));

        expect(await inspectKey(backend, key, { scope: 'tenant-a' })).toMatchObject({ state: 'completed' });
        expect(await inspectKey(backend, key, { scope: 'tenant-b' })).toMatchObject({ state: 'in-flight' });
        expect(await inspectKey(backend, key)).toBeUndefined();

        expect(await forgetKey(backend, key, { scope: 'tenant-b' })).toEqual({
          forgotten: false,
          reason: 'in-flight',
        });
        expect(await forgetKey(backend, key, { scope: 'tenant-a' })).toMatchObject({
          forgotten: true,
          was: { state: 'completed', status: 201 },
        });
        expect(await forgetKey(backend, key, { scope: 'tenant-a' })).toEqual({
          forgotten: false,
          reason: 'not-found',
        });
        expect(await forgetKey(backend, key, { scope: 'tenant-b', force: true })).toMatchObject({
          forgotten: true,
        });
      });
    });
  });
}
