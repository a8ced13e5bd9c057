/**
 * The contract every {@link Backend} must pass, races and lease expiry included, as a suite that registers itself
 * with whichever test runner the caller hands it: vitest, `node:test`, Bun's `bun:test`, Jest, Mocha. Nothing
 * here imports a test runner; assertions go through `node:assert/strict`, which Node.js, Bun and Deno all have.
 *
 * Every test works on its own random keys, so runs may share a server (and run beside other suites) without
 * seeing each other's keys. Backend methods may answer synchronously or with a promise: every call is awaited.
 *
 * Deliberately left open: whether a lease that lapsed but that nobody took over still lets its holder complete,
 * release or renew. MemoryBackend says yes (the lock stays until replaced); RedisBackend says no (the lock's key
 * expired with its lease). Both are safe; the engine treats `false` as "lease lost" either way.
 */
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { storageKeyOf } from '../core/engine.js';
import { forgetKey, inspectKey } from '../core/operator.js';
import { MAX_SECONDS } from '../core/options.js';
import type {
  AcquireResult,
  Awaitable,
  Backend,
  CompletedKeyState,
  IdempotencyRecord,
  InFlightKeyState,
  KeyState,
  StoredResponse,
} from '../core/types.js';

/** What one contract run needs: the backend under test and how to dispose of it. */
export interface BackendContractContext {
  /** The backend under test. It is shared by every test of the run. */
  backend: Backend;
  /**
   * Optional: more instances of the same backend on the same storage, each with a client (connection, pool,
   * database handle) of its own, the way several processes would share it. When given, the races spread their
   * calls over `backend` and every peer, so a backend whose atomicity only holds inside one instance (an
   * in-process mutex around a read and a write) fails them; and a case checks that each instance sees the
   * others' locks and records. Without peers, that case is skipped.
   */
  peers?: readonly Backend[];
  /** Called once after the run's last test: close clients, delete the run's keys, stop timers. */
  teardown?(): Awaitable<void>;
}

/**
 * How long the timing cases wait. The defaults suit a backend with millisecond expiry; a backend whose clock is
 * coarser (expiry in whole seconds, a lazy TTL) needs longer ones, e.g. `{ shortLeaseMs: 1500, shortTtlMs: 1500,
 * lapseWaitMs: 2500 }`.
 */
export interface BackendContractTiming {
  /**
   * A lease that lapses within a test.
   * @default 150
   */
  shortLeaseMs?: number;
  /**
   * A record expiry that passes within a test.
   * @default 200
   */
  shortTtlMs?: number;
  /**
   * How long to wait for a short lease to lapse (and, added to `shortTtlMs`, for a short expiry to pass), with a
   * margin for timer and clock granularity. Must be longer than `shortLeaseMs`.
   * @default 350
   */
  lapseWaitMs?: number;
  /**
   * Longest a single backend call may take to settle. A call that never settles fails its case with a message
   * naming the method, rather than timing the whole test out (vitest) or cancelling the cases after it
   * (`node:test`). Keep it below the runner's own test timeout.
   * @default 3000
   */
  callTimeoutMs?: number;
}

/** Options of {@link describeBackendContract}. */
export interface BackendContractOptions {
  /** How long the timing cases wait: see {@link BackendContractTiming}. */
  timing?: BackendContractTiming;
  /**
   * How many `acquire()` calls race for one key; exactly one must win.
   * @default 50
   */
  concurrency?: number;
  /**
   * Optional methods the backend must have: their cases fail, instead of being skipped, when it lacks them.
   * @default []
   */
  requires?: readonly ('inspect' | 'forget')[];
}

/**
 * The test runner's functions the suite registers itself with. Pass the runner's module as it is —
 * `import * as vitest from 'vitest'`, `import * as nodeTest from 'node:test'`, `import * as bunTest from
 * 'bun:test'` — or an object with the four functions. The once-per-run hooks are taken from `beforeAll` /
 * `afterAll` (vitest, Jest, Bun) or `before` / `after` (`node:test`, Mocha), whichever is there.
 *
 * A test whose case does not apply to the backend (an optional method it lacks) calls the test context's
 * `skip()` when the runner passes one (vitest, `node:test`) and otherwise simply passes.
 */
export interface TestFunctions {
  /** Registers a group of tests: `describe(name, body)`. */
  describe(name: string, body: () => void): unknown;
  /** Registers one test: `it(name, body)`; `body` receives the runner's test context, if any. */
  it(name: string, body: (context: unknown) => Promise<void>): unknown;
  /** Runs `fn` once before the group's first test (vitest, Jest, Bun). */
  beforeAll?(fn: () => Promise<void>): unknown;
  /** Runs `fn` once after the group's last test (vitest, Jest, Bun). */
  afterAll?(fn: () => Promise<void>): unknown;
  /** Runs `fn` once before the group's first test (`node:test`, Mocha). */
  before?(fn: () => Promise<void>): unknown;
  /** Runs `fn` once after the group's last test (`node:test`, Mocha). */
  after?(fn: () => Promise<void>): unknown;
}

const DEFAULT_TIMING: Required<BackendContractTiming> = {
  shortLeaseMs: 150,
  shortTtlMs: 200,
  lapseWaitMs: 350,
  callTimeoutMs: 3_000,
};
/** A lease long enough never to lapse during a test. */
const LONG_LEASE_MS = 30_000;
/** How long a record lives when a test does not care. */
const TTL_MS = 60_000;

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

/** Describes an answer for a failure message without dumping a 200 KB body. */
function show(value: unknown): string {
  return JSON.stringify(value, (_, item) =>
    item instanceof Uint8Array ? `<${item.byteLength} bytes>` : item === undefined ? '<undefined>' : item,
  );
}

function expectAcquired(result: AcquireResult): string {
  assert.equal(result?.state, 'acquired', `expected acquire() to answer acquired, got ${show(result)}`);
  if (result.state !== 'acquired') throw new Error('unreachable');
  assert.equal(typeof result.token, 'string', `the token must be a string, got ${show(result.token)}`);
  assert.ok(result.token.length > 0, 'the token must not be empty');
  return result.token;
}

function expectInFlight(result: AcquireResult): number {
  assert.equal(result?.state, 'in-flight', `expected acquire() to answer in-flight, got ${show(result)}`);
  if (result.state !== 'in-flight') throw new Error('unreachable');
  assert.equal(typeof result.retryAfterMs, 'number', 'retryAfterMs must be a number');
  return result.retryAfterMs;
}

function expectMismatch(result: AcquireResult): void {
  assert.equal(result?.state, 'mismatch', `expected acquire() to answer mismatch, got ${show(result)}`);
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Asserts that `result` replays exactly `expected`: fingerprint, time, status, headers in order, body bytes. */
function expectCompletedWith(result: AcquireResult, expected: IdempotencyRecord): void {
  assert.equal(result?.state, 'completed', `expected acquire() to answer completed, got ${show(result)}`);
  if (result.state !== 'completed') throw new Error('unreachable');
  const { record } = result;
  assert.equal(record.fingerprint, expected.fingerprint, 'the stored fingerprint');
  assert.equal(record.createdAt, expected.createdAt, 'the stored createdAt');
  if (expected.response === null) {
    assert.equal(
      record.response,
      null,
      'a record stored without its response must come back with response null',
    );
    return;
  }
  assert.ok(record.response !== null && record.response !== undefined, 'the stored response is missing');
  assert.equal(record.response.status, expected.response.status, 'the stored status');
  // Compared as plain pairs: a backend may hand back arrays of its own making.
  assert.deepEqual(
    Array.from(record.response.headers, ([name, value]) => [name, value]),
    expected.response.headers.map(([name, value]) => [name, value]),
    'the stored headers, in order',
  );
  assert.ok(record.response.body instanceof Uint8Array, 'the stored body must be a Uint8Array');
  assert.equal(record.response.body.byteLength, expected.response.body.byteLength, 'the stored body length');
  // Compared as buffers rather than deeply: a 200 KB diff helps nobody, and the check is exact.
  assert.ok(
    asBuffer(record.response.body).equals(asBuffer(expected.response.body)),
    'the stored body bytes differ from the ones completed',
  );
}

/** The methods of a backend the contract calls. */
const BACKEND_METHODS = ['acquire', 'complete', 'release', 'renew', 'inspect', 'forget', 'close'] as const;

/**
 * The backend with each of its methods bounded: a call whose promise has not settled within `ms` rejects, naming
 * the method. Its timer is not `unref()`'d: `node:test` would otherwise find the event loop empty while a case waits
 * on a promise that never settles, and cancel every case after it without saying why. Methods the backend lacks
 * stay absent, so that the optional ones are told apart as before.
 */
function withCallTimeout(backend: Backend, ms: number): Backend {
  const bounded: Record<string, unknown> = {};
  for (const name of BACKEND_METHODS) {
    const method = (backend as unknown as Record<string, unknown>)[name];
    if (typeof method !== 'function') continue;
    bounded[name] = (...args: unknown[]) => {
      const result: unknown = method.apply(backend, args);
      if (!isPromiseLike(result)) return result;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`${name}() did not settle within ${ms} ms (timing.callTimeoutMs)`)),
          ms,
        );
        result.then(
          (value) => {
            clearTimeout(timer);
            resolve(value);
          },
          (error: unknown) => {
            clearTimeout(timer);
            reject(error);
          },
        );
      });
    };
  }
  return bounded as unknown as Backend;
}

function isPromiseLike(value: unknown): value is PromiseLike<unknown> {
  return typeof (value as PromiseLike<unknown> | null)?.then === 'function';
}

/** Marks the running test skipped when the runner can (vitest's `skip()` throws; `node:test`'s returns). */
function skipTest(context: unknown, reason: string): void {
  const skip = (context as { skip?: unknown } | null | undefined)?.skip;
  if (typeof skip === 'function') skip.call(context, reason);
}

/** `value` must be a positive finite number; names the option otherwise. */
function positive(name: string, value: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new TypeError(
      `describeBackendContract: ${name} must be a positive number of milliseconds, got ${value}`,
    );
  }
  return value;
}

/**
 * Registers the backend contract suite: every promise the engine relies on from a {@link Backend}, with real
 * races (50 parallel `acquire()` on one key, exactly one wins), fencing by token, lease lapse and takeover,
 * renewal, record expiry, byte-exact round trips; and, for a backend with the optional operator methods,
 * `inspect()` and `forget()`. Call it once per backend configuration, at the top level of a test file or inside a
 * `describe`; every test is registered under `"<name> (backend contract)"`.
 *
 * A third-party backend (DynamoDB, MongoDB, Cloudflare D1…) proves it conforms by passing it.
 *
 * @param name - names the run in the report, e.g. `'MemoryBackend'` or `'DynamoBackend (local)'`.
 * @param setup - called once before the run's first test; returns the backend (and optional peers and teardown).
 * @param test - the test runner's `describe`, `it` and once-per-run hooks: see {@link TestFunctions}.
 * @param options - timing and race size: see {@link BackendContractOptions}.
 *
 * @example With vitest
 * ```ts
 * import * as vitest from 'vitest';
 * import { describeBackendContract } from 'idempotency-header/testkit';
 *
 * describeBackendContract('MyBackend', async () => {
 *   const backend = new MyBackend(await connect());
 *   return { backend, teardown: () => backend.close() };
 * }, vitest);
 * ```
 *
 * @example With node:test (`node --test`)
 * ```ts
 * import * as nodeTest from 'node:test';
 * import { describeBackendContract } from 'idempotency-header/testkit';
 *
 * describeBackendContract('MyBackend', async () => ({ backend: new MyBackend(await connect()) }), nodeTest);
 * ```
 */
export function describeBackendContract(
  name: string,
  setup: () => Awaitable<BackendContractContext>,
  test: TestFunctions,
  options: BackendContractOptions = {},
): void {
  const timing = { ...DEFAULT_TIMING, ...options.timing };
  const SHORT_LEASE_MS = positive('timing.shortLeaseMs', timing.shortLeaseMs);
  const SHORT_TTL_MS = positive('timing.shortTtlMs', timing.shortTtlMs);
  const LAPSE_WAIT_MS = positive('timing.lapseWaitMs', timing.lapseWaitMs);
  const CALL_TIMEOUT_MS = positive('timing.callTimeoutMs', timing.callTimeoutMs);
  if (LAPSE_WAIT_MS <= SHORT_LEASE_MS) {
    throw new TypeError(
      `describeBackendContract: timing.lapseWaitMs (${LAPSE_WAIT_MS}) must be longer than timing.shortLeaseMs (${SHORT_LEASE_MS})`,
    );
  }
  /** A renewed lease: long enough to outlive a lapse wait several times over. */
  const RENEWED_LEASE_MS = Math.max(5_000, LAPSE_WAIT_MS * 4);
  const CONCURRENCY = Math.floor(positive('concurrency', options.concurrency ?? 50));
  const requires = new Set(options.requires ?? []);

  const { describe } = test;
  const register = test.it as (name: string, body: (...args: unknown[]) => Promise<void>) => unknown;
  const beforeAll = test.beforeAll ?? test.before;
  const afterAll = test.afterAll ?? test.after;
  /**
   * Registers a test whose body takes no declared parameter (`length` 0): Jest, Bun and Mocha read a body with one
   * as taking a `done` callback and wait for it. The context a runner passes (vitest, `node:test`) is still handed on.
   */
  const it = (name: string, body: (context: unknown) => Promise<void>): unknown =>
    register(name, (...args: unknown[]) => body(args[0]));
  if (typeof describe !== 'function' || typeof register !== 'function') {
    throw new TypeError('describeBackendContract: the test functions must include describe and it');
  }
  if (typeof beforeAll !== 'function' || typeof afterAll !== 'function') {
    throw new TypeError(
      'describeBackendContract: the test functions must include beforeAll and afterAll (vitest, Jest, Bun) ' +
        'or before and after (node:test, Mocha)',
    );
  }

  describe(`${name} (backend contract)`, () => {
    let context: BackendContractContext | undefined;
    let setupError: unknown;

    beforeAll.call(test, async () => {
      try {
        context = await setup();
      } catch (error) {
        setupError = error;
        throw error;
      }
      assert.ok(context?.backend, 'setup() must resolve to { backend }');
      context = {
        ...context,
        backend: withCallTimeout(context.backend, CALL_TIMEOUT_MS),
        ...(context.peers === undefined
          ? {}
          : { peers: context.peers.map((peer) => withCallTimeout(peer, CALL_TIMEOUT_MS)) }),
      };
    });

    afterAll.call(test, async () => {
      await context?.teardown?.();
    });

    /** The backend under test; only valid inside a test. */
    function current(): Backend {
      if (context === undefined) {
        throw new Error(`the contract's setup() did not complete${setupError ? `: ${setupError}` : ''}`, {
          cause: setupError,
        });
      }
      return context.backend;
    }

    /** The backend and its peers: the instances a race spreads its calls over. */
    function instances(): Backend[] {
      return [current(), ...(context?.peers ?? [])];
    }

    /** Acquires a fresh key with a long lease and returns it with its token. */
    async function lockedKey(label?: string): Promise<{ key: string; token: string }> {
      const key = newKey(label);
      const token = expectAcquired(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS));
      return { key, token };
    }

    /** Acquires, completes and returns a fresh key with its record. */
    async function completedKey(record: IdempotencyRecord = makeRecord(), ttlMs: number | null = TTL_MS) {
      const { key, token } = await lockedKey();
      assert.equal(
        await current().complete(key, token, record, ttlMs),
        true,
        'complete() with the holding token',
      );
      return { key, record };
    }

    describe('acquire', () => {
      it('takes a free key and returns a token', async () => {
        expectAcquired(await current().acquire(newKey(), FINGERPRINT, LONG_LEASE_MS));
      });

      it(`lets exactly one of ${CONCURRENCY} parallel acquires on one key win and answers the other ${CONCURRENCY - 1} in-flight`, async () => {
        const key = newKey('race');
        const all = instances();
        const results = await Promise.all(
          Array.from({ length: CONCURRENCY }, async (_, i) =>
            all[i % all.length]!.acquire(key, FINGERPRINT, LONG_LEASE_MS),
          ),
        );
        const counts = { acquired: 0, 'in-flight': 0, completed: 0, mismatch: 0 };
        for (const result of results) counts[result.state]++;
        assert.deepEqual(counts, { acquired: 1, 'in-flight': CONCURRENCY - 1, completed: 0, mismatch: 0 });
      });

      it('gives every acquire of a free key a different token', async () => {
        const backend = current();
        const tokens = new Set<string>();
        for (let i = 0; i < 20; i++) {
          const { key, token } = await lockedKey();
          tokens.add(token);
          assert.equal(await backend.release(key, token), true, 'release() with the holding token');
          tokens.add(expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)));
        }
        assert.equal(tokens.size, 40, 'distinct tokens out of 40 acquires');
      });

      it('answers in-flight with retryAfterMs within (0, leaseMs] while the key is held', async () => {
        const backend = current();
        const key = newKey();
        const leaseMs = 5_000;
        expectAcquired(await backend.acquire(key, FINGERPRINT, leaseMs));
        const retryAfterMs = expectInFlight(await backend.acquire(key, FINGERPRINT, leaseMs));
        assert.ok(retryAfterMs > 0, `retryAfterMs ${retryAfterMs} must be > 0`);
        assert.ok(retryAfterMs <= leaseMs, `retryAfterMs ${retryAfterMs} must be <= the lease, ${leaseMs}`);
        // Freshly taken: most of the lease is left (a lenient bound, to tell ms from seconds).
        assert.ok(retryAfterMs > leaseMs / 2, `retryAfterMs ${retryAfterMs} must be > ${leaseMs / 2}`);
      });

      it('answers mismatch to a different fingerprint while the key is in flight', async () => {
        const backend = current();
        const { key } = await lockedKey();
        expectMismatch(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
        // The holder is undisturbed.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('answers completed with the exact stored record to the same fingerprint', async () => {
        const backend = current();
        const { key, record } = await completedKey();
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
        // A replay does not consume the record.
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('answers mismatch to a different fingerprint once the key is completed', async () => {
        const backend = current();
        const { key, record } = await completedKey();
        expectMismatch(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('treats an empty fingerprint (fingerprinting off) like any other value', async () => {
        const backend = current();
        const record = makeRecord(undefined, '');
        const key = newKey();
        const token = expectAcquired(await backend.acquire(key, '', LONG_LEASE_MS));
        assert.equal(
          await backend.complete(key, token, record, TTL_MS),
          true,
          'complete() with the holding token',
        );
        expectCompletedWith(await backend.acquire(key, '', LONG_LEASE_MS), record);
        expectMismatch(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it("keeps keys that differ only by ':' or unicode characters apart", async () => {
        const backend = current();
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
        assert.equal(new Set(keys).size, keys.length);
        const records = new Map<string, IdempotencyRecord>();
        for (const [i, key] of keys.entries()) {
          const token = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
          const record = makeRecord(Buffer.from(`{"key":${i}}`));
          records.set(key, record);
          assert.equal(
            await backend.complete(key, token, record, TTL_MS),
            true,
            `complete() of key ${show(key)}`,
          );
        }
        for (const key of keys) {
          expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), records.get(key)!);
        }
      });
    });

    describe('leases', () => {
      it('lets a new acquire take over a lapsed lease with a new token and fences the old token out', async () => {
        const backend = current();
        const key = newKey();
        const oldToken = expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        await sleep(LAPSE_WAIT_MS);
        const newToken = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        assert.notEqual(newToken, oldToken, 'the takeover must get a new token');

        assert.equal(await backend.renew(key, oldToken, LONG_LEASE_MS), false, 'renew() with the old token');
        assert.equal(
          await backend.complete(key, oldToken, makeRecord(Buffer.from('stale')), TTL_MS),
          false,
          'complete() with the old token',
        );
        assert.equal(await backend.release(key, oldToken), false, 'release() with the old token');

        // The new holder still holds the key, and its own write goes through.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        const record = makeRecord(Buffer.from('fresh'));
        assert.equal(
          await backend.complete(key, newToken, record, TTL_MS),
          true,
          'complete() with the new token',
        );
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('lets a different fingerprint take over a lapsed lease', async () => {
        const backend = current();
        const key = newKey();
        expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        await sleep(LAPSE_WAIT_MS);
        expectAcquired(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });

      it('extends the lease with renew so the key is still in flight after the original lease would have lapsed', async () => {
        const backend = current();
        const key = newKey();
        const token = expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        assert.equal(
          await backend.renew(key, token, RENEWED_LEASE_MS),
          true,
          'renew() with the holding token',
        );
        await sleep(LAPSE_WAIT_MS);
        const retryAfterMs = expectInFlight(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        assert.ok(retryAfterMs > SHORT_LEASE_MS, `retryAfterMs ${retryAfterMs} must be > ${SHORT_LEASE_MS}`);
        assert.ok(
          retryAfterMs <= RENEWED_LEASE_MS,
          `retryAfterMs ${retryAfterMs} must be <= ${RENEWED_LEASE_MS}`,
        );
        // The renewed holder still completes.
        assert.equal(
          await backend.complete(key, token, makeRecord(), TTL_MS),
          true,
          'complete() after renew()',
        );
      });

      it('returns false from renew with a token that does not hold the key, and leaves the lease alone', async () => {
        const backend = current();
        const { key } = await lockedKey();
        assert.equal(
          await backend.renew(key, 'not-the-token', LONG_LEASE_MS),
          false,
          'renew() with a token that does not hold the key',
        );
        assert.equal(
          await backend.renew(newKey(), 'not-the-token', LONG_LEASE_MS),
          false,
          'renew() of a key never acquired',
        );
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('returns false from renew on a completed key and keeps the record', async () => {
        const backend = current();
        const { key, token } = await lockedKey();
        const record = makeRecord();
        assert.equal(
          await backend.complete(key, token, record, TTL_MS),
          true,
          'complete() with the holding token',
        );
        assert.equal(await backend.renew(key, token, LONG_LEASE_MS), false, 'renew() after complete()');
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });
    });

    describe('release', () => {
      it('frees the key so the next acquire wins, and a second release with the same token is harmless', async () => {
        const backend = current();
        const { key, token } = await lockedKey();
        assert.equal(await backend.release(key, token), true, 'release() with the holding token');
        const next = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        assert.notEqual(next, token, 'the next holder must get a new token');

        assert.equal(await backend.release(key, token), false, 'a second release() with the first token');
        // The second release did not free the new holder's key.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        assert.equal(await backend.release(key, next), true, 'release() with the holding token');
        assert.equal(await backend.release(key, next), false, 'a second release() with the same token');
      });

      it('returns false for a token that does not hold the key and keeps the lock', async () => {
        const backend = current();
        const { key } = await lockedKey();
        assert.equal(await backend.release(key, 'not-the-token'), false);
        assert.equal(await backend.release(newKey(), 'not-the-token'), false);
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('returns false on a completed key and keeps the record', async () => {
        const backend = current();
        const { key, token } = await lockedKey();
        const record = makeRecord();
        assert.equal(
          await backend.complete(key, token, record, TTL_MS),
          true,
          'complete() with the holding token',
        );
        assert.equal(await backend.release(key, token), false, 'release() after complete()');
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('lets a different fingerprint take a released key', async () => {
        const backend = current();
        const { key, token } = await lockedKey();
        assert.equal(await backend.release(key, token), true, 'release() with the holding token');
        expectAcquired(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });
    });

    describe('complete', () => {
      it('round-trips a body with all 256 byte values byte for byte', async () => {
        const body = Uint8Array.from({ length: 512 }, (_, i) => (i * 7 + 3) % 256);
        assert.equal(new Set(body).size, 256);
        const { key, record } = await completedKey(makeRecord(body));
        expectCompletedWith(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a 200 KB random body byte for byte', async () => {
        const { key, record } = await completedKey(makeRecord(randomBytes(200 * 1024)));
        expectCompletedWith(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a body that is a view into a larger buffer', async () => {
        const backing = Buffer.from('xxxx{"inner":true}yyyy');
        const body = new Uint8Array(backing.buffer, backing.byteOffset + 4, backing.byteLength - 8);
        const { key } = await completedKey(makeRecord(body));
        const result = await current().acquire(key, FINGERPRINT, LONG_LEASE_MS);
        assert.equal(result.state, 'completed');
        if (result.state !== 'completed') return;
        assert.ok(result.record.response !== null, 'the stored response is missing');
        assert.equal(asBuffer(result.record.response.body).toString(), '{"inner":true}');
      });

      it('round-trips an empty body', async () => {
        const { key, record } = await completedKey(makeRecord(new Uint8Array(0)));
        expectCompletedWith(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
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
        expectCompletedWith(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a record without headers', async () => {
        const record = makeRecord();
        record.response.headers = [];
        record.response.status = 204;
        const { key } = await completedKey(record);
        expectCompletedWith(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('round-trips a record remembered without its response (response: null)', async () => {
        const backend = current();
        const record: IdempotencyRecord = { fingerprint: FINGERPRINT, createdAt: Date.now(), response: null };
        const { key } = await completedKey(record);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
        expectMismatch(await backend.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });

      it('frees the key once a short ttl has passed, so acquire wins again', async () => {
        const backend = current();
        const { key } = await completedKey(makeRecord(), SHORT_TTL_MS);
        assert.equal((await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)).state, 'completed');
        await sleep(SHORT_TTL_MS + LAPSE_WAIT_MS);
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('stores a record and holds a lease for the longest time the options accept (100 years)', async () => {
        const backend = current();
        const longest = MAX_SECONDS * 1000;
        const key = newKey();
        const token = expectAcquired(await backend.acquire(key, FINGERPRINT, longest));
        assert.equal((await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS)).state, 'in-flight');
        assert.equal(
          await backend.renew(key, token, longest),
          true,
          'renew() of a 100-year lease with the holding token',
        );
        const record = makeRecord();
        assert.equal(
          await backend.complete(key, token, record, longest),
          true,
          'complete() with a 100-year ttl and the holding token',
        );
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('keeps a record stored with ttlMs null after a short ttl beside it has expired', async () => {
        const backend = current();
        const shortLived = await completedKey(makeRecord(), SHORT_TTL_MS);
        const forever = await completedKey(makeRecord(), null);
        await sleep(SHORT_TTL_MS + LAPSE_WAIT_MS);
        expectAcquired(await backend.acquire(shortLived.key, FINGERPRINT, LONG_LEASE_MS));
        expectCompletedWith(await backend.acquire(forever.key, FINGERPRINT, LONG_LEASE_MS), forever.record);
      });

      it('returns false for a wrong token and stores nothing', async () => {
        const backend = current();
        const { key, token } = await lockedKey();
        assert.equal(await backend.complete(key, 'not-the-token', makeRecord(), TTL_MS), false);
        // Still held by the real token, and nothing was stored.
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        assert.equal(await backend.release(key, token), true, 'release() with the holding token');
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('returns false for a key that was never acquired and stores nothing', async () => {
        const backend = current();
        const key = newKey();
        assert.equal(await backend.complete(key, 'not-the-token', makeRecord(), TTL_MS), false);
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('ends the lock, so a second complete with the same token returns false and keeps the first record', async () => {
        const backend = current();
        const { key, token } = await lockedKey();
        const first = makeRecord(Buffer.from('first'));
        assert.equal(
          await backend.complete(key, token, first, TTL_MS),
          true,
          'complete() with the holding token',
        );
        assert.equal(await backend.complete(key, token, makeRecord(Buffer.from('second')), TTL_MS), false);
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), first);
      });

      it('lets exactly one of two racing completes with different tokens win, and only its holder', async () => {
        const backend = current();
        const all = instances();
        const key = newKey();
        const stale = expectAcquired(await backend.acquire(key, FINGERPRINT, SHORT_LEASE_MS));
        await sleep(LAPSE_WAIT_MS);
        const current_ = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        const staleRecord = makeRecord(Buffer.from('stale'));
        const currentRecord = makeRecord(Buffer.from('current'));
        const [staleWrote, currentWrote] = await Promise.all([
          all[all.length - 1]!.complete(key, stale, staleRecord, TTL_MS),
          backend.complete(key, current_, currentRecord, TTL_MS),
        ]);
        assert.deepEqual([staleWrote, currentWrote], [false, true], '[stale complete(), current complete()]');
        expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), currentRecord);
      });
    });

    describe('peers (other instances on the same storage)', () => {
      it("sees the other instances' locks, records, releases and expiries", async (testContext) => {
        const peers = context?.peers ?? [];
        if (peers.length === 0) return skipTest(testContext, 'no peers given');
        for (const peer of peers) {
          const backend = current();
          // A lock taken through one instance holds against another.
          const { key, token } = await lockedKey('peer');
          expectInFlight(await peer.acquire(key, FINGERPRINT, LONG_LEASE_MS));
          expectMismatch(await peer.acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
          // The holder's token works through any instance: fencing is in the storage, not in the client.
          assert.equal(await peer.renew(key, token, LONG_LEASE_MS), true, 'renew() through a peer');
          const record = makeRecord(Buffer.from('{"peer":true}'));
          assert.equal(await peer.complete(key, token, record, TTL_MS), true, 'complete() through a peer');
          expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
          // A release through one instance frees the key for another.
          const other = await lockedKey('peer');
          assert.equal(await peer.release(other.key, other.token), true, 'release() through a peer');
          expectAcquired(await peer.acquire(other.key, FINGERPRINT, LONG_LEASE_MS));
        }
      });
    });

    // The operator API (Backend.inspect, Backend.forget): run when the backend has the methods (or when
    // `requires` names them), skipped otherwise.
    describe('inspect and forget (optional operator API)', () => {
      /** How far a backend's clock (a database's) and rounding may put an expiry from this process's estimate. */
      const CLOCK_SLACK_MS = 1_000;

      /**
       * The backend's operator methods, when it has those the case needs. When it lacks one, the case is skipped
       * (and `undefined` returned), or fails if `options.requires` names the method.
       */
      function operator(testContext: unknown, ...needs: ('inspect' | 'forget')[]) {
        const backend = current();
        const missing = needs.filter((method) => typeof backend[method] !== 'function');
        if (missing.length > 0) {
          const required = needs.filter((method) => requires.has(method));
          for (const method of missing) {
            if (requires.has(method))
              assert.fail(`the backend has no ${method}(), which options.requires names`);
          }
          // A case that checks a required method through one the backend lacks cannot be skipped in silence.
          if (required.length > 0) {
            assert.fail(
              `this case checks ${required.join('() and ')}(), which options.requires names, through ` +
                `${missing.join('() and ')}(), which the backend lacks: it needs ${missing.join('() and ')}() as well`,
            );
          }
          skipTest(testContext, `the backend has no ${missing.join('() or ')}()`);
          return undefined;
        }
        return {
          inspect: async (key: string): Promise<KeyState | undefined> => backend.inspect!(key),
          forget: async (key: string, force = false): Promise<boolean> => backend.forget!(key, force),
        };
      }

      it('finds nothing for a key never used', async (testContext) => {
        const op = operator(testContext, 'inspect');
        if (op === undefined) return;
        assert.equal(await op.inspect(newKey()), undefined);
      });

      it('tells a lock in flight with its fingerprint and the lease left', async (testContext) => {
        const op = operator(testContext, 'inspect');
        if (op === undefined) return;
        const key = newKey();
        expectAcquired(await current().acquire(key, FINGERPRINT, 5_000));
        const state = (await op.inspect(key)) as InFlightKeyState;
        assert.equal(state?.state, 'in-flight', `inspect() of a held key, got ${show(state)}`);
        assert.equal(typeof state.leaseLeftMs, 'number', 'leaseLeftMs must be a number');
        assert.deepEqual(
          { ...state },
          { state: 'in-flight', fingerprint: FINGERPRINT, leaseLeftMs: state.leaseLeftMs },
          'inspect() of a held key',
        );
        assert.ok(
          state.leaseLeftMs > 2_500 && state.leaseLeftMs <= 5_000,
          `leaseLeftMs ${state.leaseLeftMs} must be within (2500, 5000]`,
        );
      });

      it('tells a completed key with its status, fingerprint, times and body size', async (testContext) => {
        const op = operator(testContext, 'inspect');
        if (op === undefined) return;
        const body = randomBytes(200 * 1024);
        const record = makeRecord(body);
        const { key } = await completedKey(record, TTL_MS);
        const state = (await op.inspect(key)) as CompletedKeyState;
        assert.equal(state?.state, 'completed', `inspect() of a completed key, got ${show(state)}`);
        assert.equal(
          typeof state.expiresAt,
          'number',
          `expiresAt must be a number, got ${show(state.expiresAt)}`,
        );
        assert.deepEqual(
          { ...state },
          {
            state: 'completed',
            fingerprint: FINGERPRINT,
            status: 201,
            storedAt: record.createdAt,
            expiresAt: state.expiresAt,
            size: body.byteLength,
          },
          'inspect() of a completed key',
        );
        const expected = Date.now() + TTL_MS;
        assert.ok(
          Math.abs(state.expiresAt! - expected) < CLOCK_SLACK_MS,
          `expiresAt ${state.expiresAt} must be within ${CLOCK_SLACK_MS} ms of ${expected}`,
        );
        // Inspecting reads, and changes nothing: the record still replays.
        expectCompletedWith(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
      });

      it('tells a record kept forever (expiresAt null), one without its response (status null, size 0), and an empty body', async (testContext) => {
        const op = operator(testContext, 'inspect');
        if (op === undefined) return;
        const backend = current();
        const forever = await completedKey(makeRecord(), null);
        const foreverState = (await op.inspect(forever.key)) as CompletedKeyState;
        assert.equal(foreverState?.state, 'completed');
        assert.equal(foreverState.expiresAt, null, 'expiresAt of a record stored with ttlMs null');

        const unstored: IdempotencyRecord = {
          fingerprint: OTHER_FINGERPRINT,
          createdAt: 1_000,
          response: null,
        };
        const { key, token } = await lockedKey();
        assert.equal(await backend.complete(key, token, unstored, TTL_MS), true);
        const unstoredState = (await op.inspect(key)) as CompletedKeyState;
        assert.equal(unstoredState?.state, 'completed');
        assert.equal(unstoredState.fingerprint, OTHER_FINGERPRINT);
        assert.equal(unstoredState.status, null, 'status of a record without its response');
        assert.equal(unstoredState.storedAt, 1_000, "storedAt is the record's createdAt");
        assert.equal(unstoredState.size, 0, 'size of a record without its response');

        const empty = await completedKey(makeRecord(new Uint8Array(0)));
        const emptyState = (await op.inspect(empty.key)) as CompletedKeyState;
        assert.equal(emptyState?.status, 201);
        assert.equal(emptyState.size, 0, 'size of an empty body');
      });

      it('finds nothing once a lock is released, its lease lapsed or its record expired', async (testContext) => {
        const op = operator(testContext, 'inspect', 'forget');
        if (op === undefined) return;
        const backend = current();
        const released = await lockedKey();
        assert.equal(await backend.release(released.key, released.token), true);
        assert.equal(await op.inspect(released.key), undefined, 'inspect() of a released key');

        const lapsed = newKey();
        expectAcquired(await backend.acquire(lapsed, FINGERPRINT, SHORT_LEASE_MS));
        const expired = await completedKey(makeRecord(), SHORT_TTL_MS);
        await sleep(SHORT_TTL_MS + LAPSE_WAIT_MS);
        assert.equal(await op.inspect(lapsed), undefined, 'inspect() of a lapsed lease');
        assert.equal(await op.inspect(expired.key), undefined, 'inspect() of an expired record');
        // Nothing was held any more, even where the expired record is still kept until a sweep.
        assert.equal(await op.forget(expired.key, true), false, 'forget() of an expired record');
        assert.equal(await op.forget(lapsed, true), false, 'forget() of a lapsed lock');
        assert.equal(
          await op.inspect(expired.key),
          undefined,
          'inspect() after forget() of an expired record',
        );
        expectAcquired(await backend.acquire(expired.key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('changes nothing by inspecting: a lock stays held', async (testContext) => {
        const op = operator(testContext, 'inspect');
        if (op === undefined) return;
        const { key, token } = await lockedKey();
        await op.inspect(key);
        expectInFlight(await current().acquire(key, FINGERPRINT, LONG_LEASE_MS));
        assert.equal(await current().release(key, token), true, 'the holder still holds the key');
      });

      it('forgets a completed key, so that the next acquire runs again', async (testContext) => {
        const op = operator(testContext, 'inspect', 'forget');
        if (op === undefined) return;
        const { key } = await completedKey();
        assert.equal(await op.forget(key), true, 'forget() of a completed key');
        assert.equal(await op.inspect(key), undefined, 'inspect() of a forgotten key');
        assert.equal(await op.forget(key), false, 'a second forget()');
        expectAcquired(await current().acquire(key, OTHER_FINGERPRINT, LONG_LEASE_MS));
      });

      it('refuses to forget a lock unless forced, and a forced forget fences its holder out', async (testContext) => {
        const op = operator(testContext, 'inspect', 'forget');
        if (op === undefined) return;
        const backend = current();
        const { key, token } = await lockedKey();
        assert.equal(await op.forget(key), false, 'forget() of a held lock without force');
        expectInFlight(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
        assert.equal(await op.forget(key, true), true, 'forget() of a held lock with force');
        assert.equal(await op.inspect(key), undefined, 'inspect() after a forced forget()');
        // The holder's late store is refused, and the key is free for the next request.
        assert.equal(
          await backend.complete(key, token, makeRecord(), TTL_MS),
          false,
          "the old holder's complete()",
        );
        expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
      });

      it('lets exactly one of 20 parallel forgets of one record delete it', async (testContext) => {
        if (operator(testContext, 'forget') === undefined) return;
        const { key } = await completedKey();
        const all = instances().filter((instance) => typeof instance.forget === 'function');
        const results = await Promise.all(
          Array.from({ length: 20 }, async (_, i) => all[i % all.length]!.forget!(key, false)),
        );
        assert.equal(results.filter(Boolean).length, 1, 'forgets that answered true');
      });

      it('forgets only the key it is given', async (testContext) => {
        const op = operator(testContext, 'forget');
        if (op === undefined) return;
        const backend = current();
        const base = newKey();
        const stored: { key: string; record: IdempotencyRecord }[] = [];
        for (const key of [base, `${base}:`, `${base}:a`, base.slice(0, -1)]) {
          const token = expectAcquired(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS));
          const record = makeRecord(Buffer.from(JSON.stringify({ key })));
          assert.equal(
            await backend.complete(key, token, record, TTL_MS),
            true,
            'complete() with the holding token',
          );
          stored.push({ key, record });
        }
        assert.equal(await op.forget(base, true), true);
        expectAcquired(await backend.acquire(base, FINGERPRINT, LONG_LEASE_MS));
        for (const { key, record } of stored.slice(1)) {
          expectCompletedWith(await backend.acquire(key, FINGERPRINT, LONG_LEASE_MS), record);
        }
      });

      it('reaches keys by scope through inspectKey and forgetKey, and keeps scopes apart', async (testContext) => {
        if (operator(testContext, 'inspect', 'forget') === undefined) return;
        const backend = current();
        const key = randomUUID();
        const tenantA = storageKeyOf(key, 'tenant-a');
        const token = expectAcquired(await backend.acquire(tenantA, FINGERPRINT, LONG_LEASE_MS));
        assert.equal(await backend.complete(tenantA, token, makeRecord(), TTL_MS), true);
        expectAcquired(await backend.acquire(storageKeyOf(key, 'tenant-b'), FINGERPRINT, LONG_LEASE_MS));

        assert.equal((await inspectKey(backend, key, { scope: 'tenant-a' }))?.state, 'completed');
        assert.equal((await inspectKey(backend, key, { scope: 'tenant-b' }))?.state, 'in-flight');
        assert.equal(await inspectKey(backend, key), undefined, 'the key without a scope');

        assert.deepEqual(await forgetKey(backend, key, { scope: 'tenant-b' }), {
          forgotten: false,
          reason: 'in-flight',
        });
        const forgotten = await forgetKey(backend, key, { scope: 'tenant-a' });
        assert.equal(forgotten.forgotten, true, `forgetKey() of tenant-a, got ${show(forgotten)}`);
        if (forgotten.forgotten) {
          assert.equal(forgotten.was.state, 'completed');
          assert.equal((forgotten.was as CompletedKeyState).status, 201);
        }
        assert.deepEqual(await forgetKey(backend, key, { scope: 'tenant-a' }), {
          forgotten: false,
          reason: 'not-found',
        });
        assert.equal((await forgetKey(backend, key, { scope: 'tenant-b', force: true })).forgotten, true);
      });
    });
  });
}
