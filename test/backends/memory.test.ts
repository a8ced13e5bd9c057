import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { IdempotencyRecord } from '../../src/core/types.js';
import { describeBackendContract } from './contract.js';

describeBackendContract('MemoryBackend', async () => {
  const backend = new MemoryBackend();
  return { backend, teardown: async () => backend.close() };
});

const FINGERPRINT = 'f'.repeat(64);
const LEASE_MS = 30_000;

function record(body: string): IdempotencyRecord {
  return {
    fingerprint: FINGERPRINT,
    createdAt: Date.now(),
    response: { status: 200, headers: [['content-type', 'application/json']], body: Buffer.from(body) },
  };
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

  /** Acquires and completes `key`; the record never expires on its own. */
  function store(backend: MemoryBackend, key: string, ttlMs: number | null = null): void {
    const result = backend.acquire(key, FINGERPRINT, LEASE_MS);
    if (result.state !== 'acquired') throw new Error(`expected to acquire ${key}, got ${result.state}`);
    expect(backend.complete(key, result.token, record(key), ttlMs)).toBe(true);
  }

  describe('maxEntries', () => {
    it('evicts the least recently used completed record first, counting a replay as a use', () => {
      const backend = create({ maxEntries: 3 });
      store(backend, 'k1');
      store(backend, 'k2');
      store(backend, 'k3');
      expect(backend.size).toBe(3);
      // Replaying k1 makes k2 the least recently used.
      expect(backend.acquire('k1', FINGERPRINT, LEASE_MS).state).toBe('completed');

      expect(backend.acquire('k4', FINGERPRINT, LEASE_MS).state).toBe('acquired');
      expect(backend.size).toBe(3);
      expect(backend.acquire('k1', FINGERPRINT, LEASE_MS).state).toBe('completed');
      expect(backend.acquire('k3', FINGERPRINT, LEASE_MS).state).toBe('completed');
      expect(backend.acquire('k2', FINGERPRINT, LEASE_MS).state).toBe('acquired');
    });

    it('evicts in insertion order when no record was replayed', () => {
      const backend = create({ maxEntries: 2 });
      store(backend, 'k1');
      store(backend, 'k2');
      store(backend, 'k3');
      expect(backend.size).toBe(2);
      expect(backend.acquire('k2', FINGERPRINT, LEASE_MS).state).toBe('completed');
      expect(backend.acquire('k3', FINGERPRINT, LEASE_MS).state).toBe('completed');
      expect(backend.acquire('k1', FINGERPRINT, LEASE_MS).state).toBe('acquired');
    });

    it('never evicts in-flight locks, even beyond the limit', () => {
      const backend = create({ maxEntries: 3 });
      store(backend, 'done-1');
      store(backend, 'done-2');
      const keys = Array.from({ length: 10 }, (_, i) => `lock-${i}`);
      const tokens = keys.map((key) => {
        const result = backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(result.state).toBe('acquired');
        return result.state === 'acquired' ? result.token : '';
      });
      // The completed records made room; the locks stay although they exceed the limit.
      expect(backend.size).toBe(10);
      for (const key of keys) expect(backend.acquire(key, FINGERPRINT, LEASE_MS).state).toBe('in-flight');
      expect(backend.acquire('done-1', FINGERPRINT, LEASE_MS).state).toBe('acquired');
      expect(backend.size).toBe(11);
      // Every holder can still complete.
      keys.forEach((key, i) => {
        expect(backend.complete(key, tokens[i]!, record(key), null)).toBe(true);
      });
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
