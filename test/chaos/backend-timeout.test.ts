/**
 * A backend that hangs is bounded by the middleware itself (`backendTimeout`, default 2 s), not by the client's
 * settings: ioredis and node-redis at their DEFAULT settings queue commands and wait for replies for as long as
 * the connection stays open, so a frozen Redis would hold every request for as long as it stays frozen.
 *
 * Redis is frozen two ways, on a private `redis-server`: SIGSTOP (the process stops; connections stay open, nothing
 * answers) and `DEBUG SLEEP` (the server blocks, `--enable-debug-command yes`). Requests get 503 within about
 * `backendTimeout`; the acquire the frozen server runs once it wakes takes a lock nobody will use, and the
 * middleware releases it at once, so the key is not held for `lockTimeout` (60 s here, the default).
 */
import { createHash, randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import { Redis } from 'ioredis';
import { createClient } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { RedisBackend, type RedisClientLike } from '../../src/backends/redis.js';
import type { IdempotencyError } from '../../src/core/errors.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import { postJson } from '../processes/client.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';
import { report, waitFor } from './support/chaos.js';

const enabled = requireRedisServer('Chaos: backendTimeout against a frozen Redis');

/** The default `backendTimeout`, in ms: the option is left unset. */
const BACKEND_TIMEOUT_MS = 2_000;
const PREFIX = 'chaos-timeout:';

interface Client {
  redis: RedisClientLike;
  close(): void;
}

/** Both drivers exactly as they come: offline queue on, no command timeout. */
const clients: Record<string, (url: string) => Promise<Client>> = {
  async ioredis(url) {
    const redis = new Redis(url, { lazyConnect: true });
    redis.on('error', () => {});
    await redis.connect();
    return { redis, close: () => redis.disconnect() };
  },
  async 'node-redis'(url) {
    const redis = createClient({ url });
    redis.on('error', () => {});
    await redis.connect();
    return { redis, close: () => redis.destroy() };
  },
};

interface App {
  base: string;
  events: IdempotencyEvent[];
  runs: Map<string, number>;
  /** A key's handler waits for its promise here, if there is one, before it answers. */
  holds: Map<string, Promise<void>>;
  close(): Promise<void>;
}

async function startApp(redis: RedisClientLike): Promise<App> {
  const events: IdempotencyEvent[] = [];
  const runs = new Map<string, number>();
  const holds = new Map<string, Promise<void>>();
  const app = express();
  app.use(
    idempotencyHeader({
      backend: new RedisBackend({ redis, prefix: PREFIX }),
      onEvent: (event) => events.push(event),
    }),
  );
  app.use(express.json());
  app.post('/orders', async (req, res) => {
    const key = String(req.get('idempotency-key'));
    runs.set(key, (runs.get(key) ?? 0) + 1);
    await holds.get(key);
    res.status(201).json({ key, run: runs.get(key) });
  });
  const server: Server = await new Promise((resolve) => {
    const listening = app.listen(0, '127.0.0.1', () => resolve(listening));
  });
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    events,
    runs,
    holds,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function keyHash(key: string): string {
  return createHash('sha256').update(`-${key}`).digest('hex');
}

describe.runIf(enabled)(
  'chaos: backendTimeout bounds a frozen Redis (drivers at their default settings)',
  () => {
    let server: RedisServer;
    /** Connects after each freeze, to look at the keys the way the server sees them. */
    let admin: Redis;

    beforeAll(async () => {
      server = await startRedisServer({ args: ['--enable-debug-command', 'yes'] });
      admin = new Redis(server.url, { lazyConnect: true });
      admin.on('error', () => {});
      await admin.connect();
    });

    afterAll(async () => {
      server?.resume();
      admin?.disconnect();
      await server?.close();
    });

    describe.each(Object.keys(clients))('%s', (clientName) => {
      let client: Client;
      let app: App;

      beforeAll(async () => {
        client = await clients[clientName]!(server.url);
        app = await startApp(client.redis);
        // Warm up: scripts loaded, the one-time eviction check done, so that the frozen request is the acquire.
        expect((await postJson(`${app.base}/orders`, `warm-up-${randomUUID()}`, {})).status).toBe(201);
      });

      afterAll(async () => {
        await app?.close();
        client?.close();
      });

      /**
       * Sends a request while Redis is frozen by `freeze` (and thawed by `thaw` after `frozenMs`): expects a 503
       * within about backendTimeout, then the late lock released once Redis answers, and the key free for a run.
       */
      async function frozenAcquire(
        how: string,
        freeze: () => Promise<void> | void,
        thaw: () => Promise<void> | void,
        frozenMs: number,
      ) {
        const key = `frozen-${randomUUID()}`;
        const before = app.events.length;
        await freeze();
        const frozenAt = performance.now();
        const answer = await postJson(`${app.base}/orders`, key, { item: key });
        expect(answer.status).toBe(503);
        expect(JSON.parse(answer.text)).toEqual({ detail: 'Idempotency backend unavailable; retry later' });
        // About backendTimeout: not before it, and not much after (the default settings would wait for ever).
        expect(answer.elapsedMs).toBeGreaterThanOrEqual(BACKEND_TIMEOUT_MS - 50);
        expect(answer.elapsedMs).toBeLessThan(BACKEND_TIMEOUT_MS + 1_000);
        const event = app.events.slice(before).find((e) => e.keyHash === keyHash(key));
        expect(event?.outcome).toBe('backend-error');
        expect((event!.error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND_TIMEOUT');

        await sleep(Math.max(0, frozenMs - (performance.now() - frozenAt)));
        await thaw();
        const thawedAt = performance.now();
        // The frozen acquire runs now and takes the lock; the middleware releases it as soon as it hears back.
        const lockExisted = await admin.exists(`${PREFIX}-${key}`);
        await waitFor(
          'the late lock to be released',
          async () => ((await admin.exists(`${PREFIX}-${key}`)) === 0 ? true : undefined),
          5_000,
          10,
        );
        const releasedAfterMs = performance.now() - thawedAt;
        expect(releasedAfterMs).toBeLessThan(1_000);
        const retry = await postJson(`${app.base}/orders`, key, { item: key });
        expect(retry.status).toBe(201);
        expect(retry.headers.get('idempotent-replayed')).toBeNull();
        expect(app.runs.get(key)).toBe(1);

        report(`backendTimeout, Redis frozen by ${how} (${clientName} at its defaults)`, {
          backendTimeout: { ms: BACKEND_TIMEOUT_MS },
          'Redis frozen for': { ms: frozenMs },
          '503 after': { ms: answer.elapsedMs },
          'late lock seen after the thaw': lockExisted === 1 ? 'yes' : 'already released',
          'late lock released after the thaw': { ms: releasedAfterMs },
          'retry after the thaw': retry.status,
        });
      }

      it('answers 503 within about backendTimeout while Redis is stopped (SIGSTOP), and releases the late lock', async () => {
        await frozenAcquire(
          'SIGSTOP',
          () => server.pause(),
          () => server.resume(),
          BACKEND_TIMEOUT_MS + 1_500,
        );
      }, 30_000);

      it('answers 503 within about backendTimeout while Redis sleeps (DEBUG SLEEP), and releases the late lock', async () => {
        const sleepS = (BACKEND_TIMEOUT_MS + 1_500) / 1000;
        let slept: Promise<unknown> = Promise.resolve();
        await frozenAcquire(
          'DEBUG SLEEP',
          async () => {
            slept = admin.call('DEBUG', 'SLEEP', String(sleepS));
            // The command reaches the server before the request does.
            await sleep(50);
          },
          () => slept.then(() => {}),
          sleepS * 1000,
        );
      }, 30_000);

      it('sends the response when the store hangs, stores it once Redis wakes, and replays it', async () => {
        const key = `frozen-store-${randomUUID()}`;
        const before = app.events.length;
        // Frozen between the acquire and the store: the handler finishes while Redis is stopped.
        let finish!: () => void;
        app.holds.set(
          key,
          new Promise<void>((resolve) => {
            finish = resolve;
          }),
        );
        const answered = postJson(`${app.base}/orders`, key, { item: key });
        await waitFor('the handler to run', () => (app.runs.get(key) === 1 ? true : undefined), 5_000, 5);
        server.pause();
        const pausedAt = performance.now();
        finish();
        const answer = await answered;
        const answeredAfterMs = performance.now() - pausedAt;
        server.resume();
        expect(answer.status).toBe(201);
        // Once Redis answers, the stored response is replayed; the handler ran once.
        const { replay, afterMs } = await waitFor(
          'the replay',
          async () => {
            const retry = await postJson(`${app.base}/orders`, key, { item: key });
            return retry.headers.get('idempotent-replayed') === 'true'
              ? { replay: retry, afterMs: performance.now() - pausedAt }
              : undefined;
          },
          15_000,
          100,
        );
        expect(replay.text).toBe(answer.text);
        expect(app.runs.get(key)).toBe(1);
        // Reported once, as what happened: the response was stored (by the attempt Redis ran late, or a retry).
        const outcomes = await waitFor(
          'the outcome event',
          () => {
            const found = app.events
              .slice(before)
              .filter(
                (e) =>
                  e.keyHash === keyHash(key) &&
                  !['replayed', 'conflict', 'backend-error'].includes(e.outcome),
              );
            return found.length > 0 ? found : undefined;
          },
          15_000,
        );
        await sleep(100);
        expect(outcomes.map(({ outcome, status }) => ({ outcome, status }))).toEqual([
          { outcome: 'executed', status: 201 },
        ]);
        // Bounded like any backend call: the response waited about backendTimeout for its store, not one per retry.
        expect(answeredAfterMs).toBeLessThan(BACKEND_TIMEOUT_MS + 1_500);
        report(`backendTimeout, Redis frozen during the store (${clientName} at its defaults)`, {
          backendTimeout: { ms: BACKEND_TIMEOUT_MS },
          'response sent after': { ms: answeredAfterMs },
          'replay after the freeze': { ms: afterMs },
          executions: app.runs.get(key) ?? 0,
          'onEvent for the request': outcomes.map((e) => e.outcome).join(', '),
        });
      }, 40_000);
    });
  },
);
