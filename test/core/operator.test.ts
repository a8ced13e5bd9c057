import { describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { storageKeyOf } from '../../src/core/engine.js';
import { forgetKey, inspectKey } from '../../src/core/operator.js';
import type { Backend } from '../../src/core/types.js';

const FINGERPRINT = 'f'.repeat(64);

function lockAndStore(backend: MemoryBackend, key: string, scope?: string, status: number | null = 201) {
  const storageKey = storageKeyOf(key, scope);
  const acquired = backend.acquire(storageKey, FINGERPRINT, 30_000);
  if (acquired.state !== 'acquired') throw new Error('not acquired');
  backend.complete(
    storageKey,
    acquired.token,
    {
      fingerprint: FINGERPRINT,
      createdAt: 1_000,
      response:
        status === null
          ? null
          : { status, headers: [['content-type', 'application/json']], body: Buffer.from('{}') },
    },
    60_000,
  );
}

describe('inspectKey and forgetKey', () => {
  it('tells a completed key from one in flight and from one never seen', async () => {
    const backend = new MemoryBackend();
    lockAndStore(backend, 'done', 'tenant-1');
    backend.acquire(storageKeyOf('running'), FINGERPRINT, 30_000);
    expect(await inspectKey(backend, 'done', { scope: 'tenant-1' })).toEqual({
      state: 'completed',
      fingerprint: FINGERPRINT,
      status: 201,
      storedAt: 1_000,
      expiresAt: expect.any(Number),
      size: 2,
    });
    expect(await inspectKey(backend, 'done')).toBeUndefined();
    expect(await inspectKey(backend, 'running')).toMatchObject({
      state: 'in-flight',
      fingerprint: FINGERPRINT,
    });
    expect(await inspectKey(backend, 'never')).toBeUndefined();
    backend.close();
  });

  it('forgets a record, so that the key runs again, and refuses a running one unless forced', async () => {
    const backend = new MemoryBackend();
    lockAndStore(backend, 'done', undefined, null);
    backend.acquire(storageKeyOf('running'), FINGERPRINT, 30_000);
    expect(await forgetKey(backend, 'done')).toMatchObject({
      forgotten: true,
      was: { state: 'completed', status: null },
    });
    expect(backend.acquire(storageKeyOf('done'), FINGERPRINT, 30_000).state).toBe('acquired');
    expect(await forgetKey(backend, 'running')).toEqual({ forgotten: false, reason: 'in-flight' });
    expect(await forgetKey(backend, 'running', { force: true })).toMatchObject({ forgotten: true });
    expect(await forgetKey(backend, 'never')).toEqual({ forgotten: false, reason: 'not-found' });
    backend.close();
  });

  it('says so when a backend cannot inspect', async () => {
    const bare = {
      acquire: () => ({ state: 'mismatch' }),
      complete: () => true,
      release: () => true,
      renew: () => true,
    } as Backend;
    await expect(inspectKey(bare, 'k')).rejects.toThrow(/does not support inspect/);
  });
});
