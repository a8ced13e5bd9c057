/**
 * RedisBackend while Redis is down, frozen or back: on a private redis-server that the tests kill, pause and
 * restart on the same port. The clients are configured to fail fast as RedisBackend's TSDoc recommends; the
 * backend must then reject promptly (the engine turns that into 503 or fail-open), never hang, never leave an
 * unhandled rejection, and work again once Redis is back without being recreated.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { createClient } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RedisBackend } from '../../src/backends/redis.js';
import type { IdempotencyRecord } from '../../src/core/types.js';
import type { FailFastClient } from '../support/fail-fast-redis.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';

const enabled = requireRedisServer('RedisBackend outage tests');

const FINGERPRINT = 'f'.repeat(64);
const LEASE_MS = 30_000;
/** The clients' command timeout: how long a call may wait on a server that does not answer. */
const COMMAND_TIMEOUT_MS = 1_000;
/** The bound every failing call must reject within. */
const REJECT_WITHIN_MS = 2_000;

const record: IdempotencyRecord = {
  fingerprint: FINGERPRINT,
  createdAt: Date.now(),
  response: { status: 200, headers: [], body: Buffer.from('{}') },
};

/**
 * Fail-fast client configurations: no offline queue, bounded commands, keep reconnecting. Tighter than the README's
 * (`../support/fail-fast-redis.ts`), so that every failing call is seen to reject within {@link REJECT_WITHIN_MS}.
 */
const clients: Record<string, (url: string) => Promise<FailFastClient>> = {
  async ioredis(url) {
    const redis = new Redis(url, {
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      commandTimeout: COMMAND_TIMEOUT_MS,
      retryStrategy: () => 100,
      lazyConnect: true,
    });
    redis.on('error', () => {});
    await redis.connect();
    return { redis, close: () => redis.disconnect() };
  },
  async 'node-redis'(url) {
    // node-redis's `commandOptions.timeout` only bounds the time a command waits to be written: once sent, a
    // command waits for its reply until the socket closes. `socketTimeout` closes a silent socket, and
    // `pingInterval` keeps an idle one from looking silent.
    const redis = createClient({
      url,
      disableOfflineQueue: true,
      pingInterval: COMMAND_TIMEOUT_MS / 3,
      socket: {
        connectTimeout: COMMAND_TIMEOUT_MS,
        socketTimeout: COMMAND_TIMEOUT_MS,
        reconnectStrategy: () => 100,
      },
    });
    redis.on('error', () => {});
    await redis.connect();
    return { redis, close: () => redis.destroy() };
  },
};

/** Runs `call`, expecting it to reject within {@link REJECT_WITHIN_MS}; returns how long it took. */
async function expectPromptRejection(call: () => Promise<unknown>): Promise<number> {
  const started = performance.now();
  const outcome = await Promise.race([
    call().then(
      () => 'resolved',
      () => 'rejected',
    ),
    sleep(REJECT_WITHIN_MS * 2).then(() => 'hung'),
  ]);
  const elapsed = performance.now() - started;
  expect(outcome).toBe('rejected');
  expect(elapsed).toBeLessThan(REJECT_WITHIN_MS);
  return elapsed;
}

/** Retries `call` until it resolves, for at most `timeoutMs`. */
async function eventually<T>(call: () => Promise<T>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await call();
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await sleep(50);
    }
  }
}

describe.runIf(enabled)('RedisBackend when Redis goes down', () => {
  let server: RedisServer | undefined;
  const unhandled: unknown[] = [];
  const onUnhandledRejection = (reason: unknown) => {
    unhandled.push(reason);
  };

  beforeAll(async () => {
    process.on('unhandledRejection', onUnhandledRejection);
    server = await startRedisServer();
  });

  afterAll(async () => {
    process.off('unhandledRejection', onUnhandledRejection);
    await server?.close();
  });

  describe.each(Object.keys(clients))('with a fail-fast %s client', (clientName) => {
    let client: FailFastClient | undefined;
    let backend: RedisBackend;

    beforeAll(async () => {
      if (!server!.running) await server!.start();
      client = await clients[clientName]!(server!.url);
      backend = new RedisBackend({ redis: client.redis, prefix: `outage:${clientName}:` });
    });

    afterAll(() => {
      client?.close();
    });

    it('answers while the server is up', async () => {
      expect((await backend.acquire('up', FINGERPRINT, LEASE_MS)).state).toBe('acquired');
    });

    it('rejects a call that is waiting for its reply when the server dies', async () => {
      server!.pause();
      const pending = backend.acquire('in-flight-at-crash', FINGERPRINT, LEASE_MS);
      pending.catch(() => {});
      await sleep(100);
      const stopped = server!.stop('SIGKILL');
      await expectPromptRejection(() => pending);
      await stopped;
    });

    it('rejects every call within 2 s while the server is down', async () => {
      expect(server!.running).toBe(false);
      await expectPromptRejection(() => backend.acquire('down', FINGERPRINT, LEASE_MS));
      await expectPromptRejection(() => backend.complete('down', 'token', record, 60_000));
      await expectPromptRejection(() => backend.release('down', 'token'));
      await expectPromptRejection(() => backend.renew('down', 'token', LEASE_MS));
      // Still failing fast after several reconnection attempts.
      await sleep(500);
      await expectPromptRejection(() => backend.acquire('down', FINGERPRINT, LEASE_MS));
    });

    it('answers again once the server is back on the same port, without a new backend', async () => {
      await server!.start();
      const result = await eventually(() => backend.acquire('back', FINGERPRINT, LEASE_MS));
      expect(result.state).toBe('acquired');
      if (result.state !== 'acquired') return;
      expect(await backend.renew('back', result.token, LEASE_MS)).toBe(true);
      expect(await backend.complete('back', result.token, record, 60_000)).toBe(true);
      // The new server has an empty script cache: the NOSCRIPT fallback reloaded the scripts.
      expect((await backend.acquire('back', FINGERPRINT, LEASE_MS)).state).toBe('completed');
    });

    it('rejects within the command timeout while the server is frozen, and answers once it thaws', async () => {
      server!.pause();
      try {
        const elapsed = await expectPromptRejection(() => backend.acquire('frozen', FINGERPRINT, LEASE_MS));
        expect(elapsed).toBeGreaterThanOrEqual(COMMAND_TIMEOUT_MS - 50);
      } finally {
        server!.resume();
      }
      const result = await eventually(() => backend.acquire('thawed', FINGERPRINT, LEASE_MS));
      expect(result.state).toBe('acquired');
    });

    it('leaves no unhandled rejection behind', async () => {
      // Give late socket events and timers a chance to surface.
      await sleep(200);
      expect(unhandled).toEqual([]);
    });
  });
});
