import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { hashKey } from '../../src/backends/_key-index.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { IdempotencyRecord } from '../../src/core/types.js';
import { describeBackendContract } from '../../src/testkit/index.js';

describeBackendContract(
  'MemoryBackend',
  () => {
    const backend = new MemoryBackend();
    return { backend, teardown: () => backend.close() };
  },
  { describe, it, beforeAll, afterAll },
  { requires: ['inspect', 'forget'] },
);

const FINGERPRINT = 'f'.repeat(64);
const LEASE_MS = 30_000;

function record(body: string | Uint8Array): IdempotencyRecord {
  return {
    fingerprint: FINGERPRINT,
    createdAt: Date.now(),
    response: {
      status: 200,
      headers: [['content-type', 'application/json']],
      body: typeof body === 'string' ? Buffer.from(body) : body,
    },
  };
}

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** Memory held in `ArrayBuffer`s, where `MemoryBackend` keeps its records, once garbage is collected. */
function arrayBuffersHeld(): number {
  gc();
  gc();
  return process.memoryUsage().arrayBuffers;
}

function captureError(run: () => unknown): unknown {
  try {
    run();
  } catch (error) {
    return error;
  }
  throw new Error('expected it to throw');
}

describe('MemoryBackend', () => {
  const backends: MemoryBackend[] = [];
  function create(options?: ConstructorParameters<typeof MemoryBackend>[0]): MemoryBackend {
    const backend = new MemoryBackend(options);
    backends.push(backend);
    return backend;
  }
  afterEach(() => {
    for (const backend of backends.splice(0)) backend.close();
  });

  /** Acquires and completes `key` (body: the key, or `body`); by default the record never expires on its own. */
  function store(backend: MemoryBackend, key: string, ttlMs: number | null = null, body?: Uint8Array): void {
    const result = backend.acquire(key, FINGERPRINT, LEASE_MS);
    if (result.state !== 'acquired') throw new Error(`expected to acquire ${key}, got ${result.state}`);
    expect(backend.complete(key, result.token, record(body ?? key), ttlMs)).toBe(true);
  }

  describe('bounds', () => {
    it('never evicts an unexpired record: when full, a new key is a backend error', () => {
      const backend = create({ maxEntries: 3 });
      store(backend, 'k1');
      store(backend, 'k2');
      store(backend, 'k3');
      expect(backend.size).toBe(3);
      const error = captureError(() => backend.acquire('k4', FINGERPRINT, LEASE_MS));
      expect(error).toBeInstanceOf(IdempotencyError);
      expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND_FULL');
      expect((error as IdempotencyError).message).toMatch(/never evicted/);
      for (const key of ['k1', 'k2', 'k3'])
        expect(backend.acquire(key, FINGERPRINT, LEASE_MS).state).toBe('completed');
    });

    it('never evicts a lock either, and still lets every holder complete', () => {
      const backend = create({ maxEntries: 3 });
      const tokens = ['a', 'b', 'c'].map((key) => {
        const result = backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(result.state).toBe('acquired');
        return result.state === 'acquired' ? result.token : '';
      });
      expect(() => backend.acquire('d', FINGERPRINT, LEASE_MS)).toThrow(IdempotencyError);
      ['a', 'b', 'c'].forEach((key, i) => {
        expect(backend.complete(key, tokens[i]!, record(key), null)).toBe(true);
      });
      expect(backend.size).toBe(3);
    });

    it('makes room by sweeping what has expired before refusing a key', async () => {
      const backend = create({ maxEntries: 2 });
      store(backend, 'short', 20);
      store(backend, 'long');
      await sleep(40);
      expect(backend.acquire('new', FINGERPRINT, LEASE_MS).state).toBe('acquired');
      expect(backend.size).toBe(2);
      expect(backend.acquire('long', FINGERPRINT, LEASE_MS).state).toBe('completed');
    });

    it('bounds the bytes held: bodies, headers, keys and fingerprints', () => {
      const backend = create({ maxBytes: 64 * 1024 });
      const big = Buffer.alloc(30 * 1024, 1);
      store(backend, 'a', 60_000, big);
      store(backend, 'b', 60_000, big);
      // Room for one more key; its response makes the store overshoot by at most that response.
      store(backend, 'c', 60_000, big);
      expect(backend.bytes).toBeGreaterThan(90 * 1024);
      expect(() => backend.acquire('d', FINGERPRINT, LEASE_MS)).toThrow(/MemoryBackend is full/);
      expect(backend.acquire('a', FINGERPRINT, LEASE_MS).state).toBe('completed');
    });

    it('keeps a body that is a slice of a larger buffer as bytes of its own, not the whole buffer', () => {
      const backend = create();
      // What a short `Buffer.from` returns: a few bytes of Node.js's shared 8 KiB pool.
      const pooled = Buffer.from('{"id":1}');
      expect(pooled.buffer.byteLength).toBeGreaterThan(pooled.byteLength);
      const view = new Uint8Array(new ArrayBuffer(4096), 100, 8).fill(7);
      store(backend, 'pooled', null, pooled);
      store(backend, 'view', null, view);
      const sent = new Uint8Array([1, 2, 3]);
      store(backend, 'copied', null, sent);
      const bodyOf = (key: string) => {
        const held = backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (held.state !== 'completed' || held.record.response === null)
          throw new Error(`${key}: ${held.state}`);
        return held.record.response.body;
      };
      for (const [key, sent] of [
        ['pooled', pooled],
        ['view', view],
      ] as const) {
        const body = bodyOf(key);
        expect(Buffer.from(body)).toEqual(Buffer.from(sent));
        expect(body.buffer.byteLength).toBe(sent.byteLength);
      }
      // What is stored is a copy: the sender's buffer changing later changes nothing, and each replay gets a copy
      // of its own.
      sent[0] = 9;
      const replayed = bodyOf('copied');
      expect([...replayed]).toEqual([1, 2, 3]);
      replayed[1] = 9;
      expect([...bodyOf('copied')]).toEqual([1, 2, 3]);
    });

    it('counts the unused cells of partly used buffers against maxBytes, so that the memory held stays bounded', async () => {
      const maxBytes = 1024 * 1024;
      const backend = create({ maxBytes });
      // One body for every store: the only new buffers are the backend's own.
      const small = new Uint8Array(100).fill(1);
      const large = new Uint8Array(1000).fill(2);
      const before = arrayBuffersHeld();
      // Small records; one in a hundred outlives the others, so that every buffer they fill keeps one.
      for (let i = 0; i < 2000; i++) store(backend, `small-${i}`, i % 100 === 0 ? null : 20, small);
      await sleep(40);
      backend.sweep();
      expect(backend.size).toBe(20);
      expect(backend.bytes).toBeLessThan(maxBytes / 10);
      // Larger records cannot use the small cells set free: new buffers, until the memory held reaches the bound.
      let refused = 0;
      for (let i = 0; i < 2000; i++) {
        try {
          store(backend, `large-${i}`, null, large);
        } catch (error) {
          expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND_FULL');
          refused++;
        }
      }
      expect(refused).toBeGreaterThan(0);
      // Over the bound by one buffer of cells (a sixteenth of it) at most, with room for the test's own garbage.
      expect(arrayBuffersHeld() - before).toBeLessThan(maxBytes + maxBytes / 16 + 64 * 1024);
      // Every record kept is still there.
      expect(backend.acquire('small-0', FINGERPRINT, LEASE_MS).state).toBe('completed');
    });

    it('gives back the bytes of released locks and expired records', async () => {
      const backend = create();
      expect(backend.bytes).toBe(0);
      const lock = backend.acquire('k', FINGERPRINT, LEASE_MS);
      expect(backend.bytes).toBeGreaterThan(0);
      backend.release('k', (lock as { token: string }).token);
      expect(backend.bytes).toBe(0);
      store(backend, 'short', 20);
      await sleep(40);
      backend.sweep();
      expect(backend.bytes).toBe(0);
    });

    it('lets a flood of fresh keys fill it, but not push out what is stored', () => {
      const backend = create({ maxEntries: 100 });
      store(backend, 'precious');
      let refused = 0;
      for (let i = 0; i < 1000; i++) {
        try {
          const result = backend.acquire(`flood-${i}`, FINGERPRINT, LEASE_MS);
          if (result.state === 'acquired')
            backend.complete(`flood-${i}`, result.token, record(`flood-${i}`), 60_000);
        } catch {
          refused++;
        }
      }
      expect(refused).toBe(901);
      expect(backend.size).toBe(100);
      expect(backend.acquire('precious', FINGERPRINT, LEASE_MS).state).toBe('completed');
    });

    it('refuses a key without capturing a stack trace, so that a flood’s refusals stay cheap', () => {
      const backend = create({ maxEntries: 1 });
      store(backend, 'k1');
      const limit = Error.stackTraceLimit;
      const error = captureError(() => backend.acquire('k2', FINGERPRINT, LEASE_MS)) as IdempotencyError;
      expect(error.code).toBe('ERR_IDEMPOTENCY_BACKEND_FULL');
      expect(error.stack).not.toMatch(/\n\s+at /);
      // The limit is put back for every other error.
      expect(Error.stackTraceLimit).toBe(limit);
      expect(new Error('other').stack).toMatch(/\n\s+at /);
    });
  });

  describe('one entry per key', () => {
    it('takes over an expired record or a lapsed lock in place, its bytes counted once', async () => {
      const backend = create();
      const reference = create();
      expect(reference.acquire('k', FINGERPRINT, LEASE_MS).state).toBe('acquired');
      const lockBytes = reference.bytes;

      store(backend, 'k', 20);
      await sleep(40);
      const taken = backend.acquire('k', FINGERPRINT, LEASE_MS);
      expect(taken.state).toBe('acquired');
      expect(backend.size).toBe(1);
      expect(backend.bytes).toBe(lockBytes);

      const lapsing = backend.acquire('l', FINGERPRINT, 20);
      await sleep(40);
      const next = backend.acquire('l', FINGERPRINT, LEASE_MS);
      expect(next.state).toBe('acquired');
      expect(backend.size).toBe(2);
      expect(backend.bytes).toBe(2 * lockBytes);
      // The lapsed holder is fenced out: its store and release find another token.
      const stale = (lapsing as { token: string }).token;
      expect(backend.complete('l', stale, record('late'), null)).toBe(false);
      expect(backend.release('l', stale)).toBe(false);

      backend.release('k', (taken as { token: string }).token);
      backend.release('l', (next as { token: string }).token);
      expect(backend.size).toBe(0);
      expect(backend.bytes).toBe(0);
    });

    it('replays stored headers exactly: repeated, empty, and a value with a line feed', () => {
      const backend = create();
      const lists: [string, string][][] = [
        [],
        [['x-empty', '']],
        [
          ['set-thing', 'a'],
          ['set-thing', 'b'],
          ['content-type', 'text/plain'],
        ],
        [
          ['x-line', 'one\ntwo'],
          ['x-after', ''],
        ],
      ];
      lists.forEach((headers, i) => {
        const key = `h${i}`;
        const lock = backend.acquire(key, FINGERPRINT, LEASE_MS) as { token: string };
        const stored: IdempotencyRecord = {
          fingerprint: FINGERPRINT,
          createdAt: Date.now(),
          response: { status: 201, headers, body: Buffer.from(key) },
        };
        expect(backend.complete(key, lock.token, stored, null)).toBe(true);
        const replay = backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(replay.state).toBe('completed');
        expect((replay as { record: IdempotencyRecord }).record.response?.headers).toEqual(headers);
      });
    });
  });

  describe('keys that meet in its index', () => {
    /** Keys as the engine makes them (a dash and a UUID-shaped string), numbered from 0. */
    const keyNumbered = (i: number) => `-${i.toString(16).padStart(8, '0')}-0000-4000-8000-000000000000`;

    /** Two different keys with the same 32-bit hash, found by trying keys until two meet. */
    function twoKeysOfOneHash(): [string, string] {
      const seen = new Map<number, string>();
      for (let i = 0; ; i++) {
        const key = keyNumbered(i);
        const other = seen.get(hashKey(key));
        if (other !== undefined) return [other, key];
        seen.set(hashKey(key), key);
      }
    }

    /** `count` keys whose hashes point to the same slot of the index's first table (1 024 slots). */
    function keysOfOneSlot(count: number): string[] {
      const keys: string[] = [];
      for (let i = 0; keys.length < count; i++)
        if ((hashKey(keyNumbered(i)) & 1023) === 7) keys.push(keyNumbered(i));
      return keys;
    }

    /** Each key, locked and then stored with its own body, is its own: its lock, then its record, then gone. */
    function expectEachItsOwn(backend: MemoryBackend, keys: string[]): void {
      const tokens = keys.map((key) => {
        const lock = backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(lock.state).toBe('acquired');
        return (lock as { token: string }).token;
      });
      expect(backend.size).toBe(keys.length);
      keys.forEach((key) => {
        expect(backend.acquire(key, FINGERPRINT, LEASE_MS).state).toBe('in-flight');
      });
      keys.forEach((key, i) => {
        expect(backend.complete(key, tokens[i]!, record(key), null)).toBe(true);
      });
      keys.forEach((key) => {
        const replay = backend.acquire(key, FINGERPRINT, LEASE_MS) as { record: IdempotencyRecord };
        expect(Buffer.from(replay.record.response!.body).toString()).toBe(key);
        expect(backend.inspect(key)?.state).toBe('completed');
      });
      // Forgotten one by one, from the first: those left still replay their own.
      keys.forEach((key, i) => {
        expect(backend.forget(key, false)).toBe(true);
        expect(backend.inspect(key)).toBeUndefined();
        for (const left of keys.slice(i + 1)) {
          const replay = backend.acquire(left, FINGERPRINT, LEASE_MS) as { record: IdempotencyRecord };
          expect(Buffer.from(replay.record.response!.body).toString()).toBe(left);
        }
      });
      expect(backend.size).toBe(0);
    }

    it('keeps apart two keys with the same hash: locks, records, forgets', () => {
      const [first, second] = twoKeysOfOneHash();
      expect(first).not.toBe(second);
      expect(hashKey(first)).toBe(hashKey(second));
      expectEachItsOwn(create(), [first, second]);
    });

    it('keeps apart 40 keys of one slot, the last 8 past the 32 slots a key is looked for in', () => {
      expectEachItsOwn(create(), keysOfOneSlot(40));
    });

    it('sweeps keys that meet, each on its own expiry', async () => {
      const backend = create();
      const [first, second] = twoKeysOfOneHash();
      const crowded = keysOfOneSlot(36);
      store(backend, first, 20);
      store(backend, second, null);
      crowded.forEach((key, i) => {
        store(backend, key, i % 2 === 0 ? 20 : null);
      });
      await sleep(40);
      backend.sweep();
      expect(backend.inspect(first)).toBeUndefined();
      expect(backend.inspect(second)?.state).toBe('completed');
      crowded.forEach((key, i) => {
        expect(backend.inspect(key)?.state).toBe(i % 2 === 0 ? undefined : 'completed');
      });
      expect(backend.size).toBe(1 + crowded.length / 2);
    });
  });

  describe('sweeping', () => {
    it('frees expired records and lapsed locks without their keys being read', async () => {
      const backend = create({ sweepIntervalMs: 50 });
      store(backend, 'short-1', 100);
      store(backend, 'short-2', 100);
      store(backend, 'forever', null);
      expect(backend.acquire('lapsing-lock', FINGERPRINT, 100).state).toBe('acquired');
      expect(backend.acquire('held-lock', FINGERPRINT, LEASE_MS).state).toBe('acquired');
      expect(backend.size).toBe(5);

      const deadline = Date.now() + 2_000;
      while (backend.size > 2 && Date.now() < deadline) await sleep(25);
      expect(backend.size).toBe(2);
      expect(backend.acquire('forever', FINGERPRINT, LEASE_MS).state).toBe('completed');
      expect(backend.acquire('held-lock', FINGERPRINT, LEASE_MS).state).toBe('in-flight');
    });

    it('frees expired records at once when sweep() is called', async () => {
      const backend = create();
      store(backend, 'short', 20);
      await sleep(60);
      expect(backend.size).toBe(1);
      backend.sweep();
      expect(backend.size).toBe(0);
    });

    it('does not keep the process alive with its sweep timer', async () => {
      const memoryModule = pathToFileURL(
        fileURLToPath(new URL('../../src/backends/memory.ts', import.meta.url)),
      );
      const marker = randomUUID();
      // A child that creates a backend with a fast sweep and does nothing else: it must exit on its own.
      // With a ref'd timer it would run until killed.
      const script = [
        `const { MemoryBackend } = await import(${JSON.stringify(memoryModule.href)});`,
        'globalThis.backend = new MemoryBackend({ sweepIntervalMs: 10 });',
        `console.log(${JSON.stringify(marker)});`,
      ].join('\n');
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => {
        output += chunk.toString();
      });
      child.stderr.on('data', (chunk: Buffer) => {
        output += chunk.toString();
      });
      const exit = await new Promise<{ code: number | null; timedOut: boolean }>((resolve) => {
        const timer = setTimeout(() => {
          child.kill('SIGKILL');
          resolve({ code: null, timedOut: true });
        }, 10_000);
        child.once('exit', (code) => {
          clearTimeout(timer);
          resolve({ code, timedOut: false });
        });
      });
      expect(output).toContain(marker);
      expect(exit).toEqual({ code: 0, timedOut: false });
    });
  });

  describe('options', () => {
    it.each([
      ['maxEntries', 0],
      ['maxEntries', -1],
      ['maxEntries', 1.5],
      ['maxEntries', Number.NaN],
      ['maxEntries', '10'],
      ['maxBytes', 0],
      ['maxBytes', 1.5],
      ['maxBytes', '1000'],
      ['sweepIntervalMs', 0],
      ['sweepIntervalMs', -5],
      ['sweepIntervalMs', Number.POSITIVE_INFINITY],
      ['sweepIntervalMs', Number.NaN],
      ['sweepIntervalMs', '100'],
    ])('rejects %s = %s with an IdempotencyError naming the option', (name, value) => {
      let error: unknown;
      try {
        new MemoryBackend({ [name]: value } as never);
      } catch (caught) {
        error = caught;
      }
      expect(error).toBeInstanceOf(IdempotencyError);
      expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_OPTION');
      expect((error as IdempotencyError).message).toContain(`\`${name}\``);
    });

    it('accepts the defaults and explicit valid values', () => {
      expect(() => create()).not.toThrow();
      expect(() => create({ maxEntries: 1, sweepIntervalMs: 1 })).not.toThrow();
    });
  });
});
