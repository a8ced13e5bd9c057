/**
 * A Redis outage as an HTTP client sees it (SPEC §2 step 6, `onBackendError`): the Express middleware on a
 * RedisBackend whose private redis-server the tests kill and restart on the same port, with the fail-fast client
 * options RedisBackend's TSDoc documents, for ioredis and for node-redis.
 *
 * The server keeps an append-only file (fsync on every write), like a production Redis with persistence: what was
 * written before a crash, a lock included, is still there after the restart.
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { RedisBackend, type RedisClientLike } from '../../src/backends/redis.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import { type FailFastClient, failFastClients } from '../support/fail-fast-redis.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';
import { type Answer, postJson } from './client.js';

const enabled = requireRedisServer('HTTP-level Redis outage tests');

/** Every answer while Redis is down must arrive within this. */
const ANSWER_WITHIN_MS = 3_000;
/** How long a reconnect may take once Redis is back (node-redis's documented backoff tops out at 2 s). */
const RECOVERY_WITHIN_MS = 15_000;
/** How long the engine retries a failed store before it gives up (50 + 250 + 1000 ms, and the attempts). */
const STORE_RETRIES_MS = 1500;
/** The middleware's `lockTimeout`, in seconds: short, so that a lock stranded by the outage lapses quickly. */
const LOCK_TIMEOUT_S = 2;
const UNAVAILABLE = { detail: 'Idempotency backend unavailable; retry later' };

const clients = failFastClients;

interface Deferred {
  promise: Promise<void>;
  resolve(): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((done) => {
    resolve = done;
  });
  return { promise, resolve };
}

/** An Express app with the middleware mounted twice on one backend: fail-closed and fail-open. */
interface App {
  /** `http://127.0.0.1:<port>`. */
  base: string;
  /** The `Idempotency-Key` of every handler run, in order. */
  runs: string[];
  /** Every `onEvent` report, with the route's mode. */
  events: (IdempotencyEvent & { mode: string })[];
  /** The slow route's handler reports that it started, then waits for `finish`. */
  slow: { started: Deferred; finish: Deferred };
  close(): Promise<void>;
}

async function startApp(redis: RedisClientLike, prefix: string): Promise<App> {
  const backend = new RedisBackend({ redis, prefix });
  const runs: string[] = [];
  const events: App['events'] = [];
  const slow = { started: deferred(), finish: deferred() };
  const app = express();
  app.use(express.json());
  for (const mode of ['fail-closed', 'fail-open'] as const) {
    app.use(
      `/${mode}`,
      idempotencyHeader({
        backend,
        onBackendError: mode,
        lockTimeout: LOCK_TIMEOUT_S,
        onEvent: (event) => events.push({ ...event, mode }),
      }),
    );
  }
  app.post(['/fail-closed/orders', '/fail-open/orders'], (req, res) => {
    runs.push(String(req.get('idempotency-key')));
    res.status(201).json({ run: runs.length, item: req.body?.item ?? null });
  });
  app.post('/fail-closed/slow', async (req, res) => {
    runs.push(String(req.get('idempotency-key')));
    const run = runs.length;
    slow.started.resolve();
    await slow.finish.promise;
    res.status(201).json({ run, item: req.body?.item ?? null, slow: true });
  });
  const server: Server = await new Promise((resolve) => {
    const listening = app.listen(0, '127.0.0.1', () => resolve(listening));
  });
  const { port } = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${port}`,
    runs,
    events,
    slow,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function runsOf(app: App, key: string): number {
  return app.runs.filter((run) => run === key).length;
}

describe.runIf(enabled)('the Express middleware while Redis goes down and comes back', () => {
  let server: RedisServer | undefined;
  const unhandled: unknown[] = [];
  const onUnhandledRejection = (reason: unknown) => {
    unhandled.push(reason);
  };

  beforeAll(async () => {
    process.on('unhandledRejection', onUnhandledRejection);
    server = await startRedisServer({ args: ['--appendonly', 'yes', '--appendfsync', 'always'] });
  });

  afterAll(async () => {
    process.off('unhandledRejection', onUnhandledRejection);
    await server?.close();
  });

  describe.each(Object.keys(clients))('with a fail-fast %s client', (clientName) => {
    let client: FailFastClient | undefined;
    let app: App;

    beforeAll(async () => {
      if (!server!.running) await server!.start();
      client = await clients[clientName]!(server!.url);
      app = await startApp(client.redis, `outage-http:${clientName}:`);
    });

    afterAll(async () => {
      await app?.close();
      client?.close();
    });

    const post = (mode: string, path: string, key: string | undefined, item = key) =>
      postJson(`${app.base}/${mode}/${path}`, key, { item });

    let recoveryKeys = 0;
    /** Posts until Redis answers again (anything but 503), with a new key each time; returns that answer. */
    async function untilRecovered(mode: string): Promise<{ key: string; answer: Answer }> {
      const deadline = Date.now() + RECOVERY_WITHIN_MS;
      for (;;) {
        const key = `recovery-${recoveryKeys++}`;
        const answer = await post(mode, 'orders', key);
        if (answer.status !== 503 || Date.now() > deadline) return { key, answer };
        expect(runsOf(app, key)).toBe(0);
        await sleep(100);
      }
    }

    it('runs a request once and replays its retry while Redis is up', async () => {
      const first = await post('fail-closed', 'orders', 'up');
      expect(first.status).toBe(201);
      expect(first.headers.get('idempotent-replayed')).toBeNull();
      const retry = await post('fail-closed', 'orders', 'up');
      expect(retry.status).toBe(201);
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(retry.text).toBe(first.text);
      expect(runsOf(app, 'up')).toBe(1);
    });

    it('fail-closed: answers 503 with the detail body within 3 s while Redis is down, without running the handler', async () => {
      await server!.stop();
      const before = app.events.length;
      const elapsed: number[] = [];
      // At once, then while the client is reconnecting in the background.
      for (const [attempt, pause] of [0, 300, 1000].entries()) {
        await sleep(pause);
        const key = `down-closed-${attempt}`;
        const answer = await post('fail-closed', 'orders', key);
        expect(answer.status).toBe(503);
        expect(answer.headers.get('content-type')).toMatch(/^application\/json\b/);
        expect(JSON.parse(answer.text)).toEqual(UNAVAILABLE);
        expect(answer.elapsedMs).toBeLessThan(ANSWER_WITHIN_MS);
        expect(runsOf(app, key)).toBe(0);
        elapsed.push(answer.elapsedMs);
      }
      console.info(
        `outage (${clientName}): 503s answered in ${elapsed.map((ms) => `${ms.toFixed(1)} ms`).join(', ')}`,
      );
      const reported = app.events.slice(before);
      expect(reported.map(({ outcome, status, mode }) => ({ outcome, status, mode }))).toEqual(
        Array(3).fill({ outcome: 'backend-error', status: 503, mode: 'fail-closed' }),
      );
      for (const { error } of reported) {
        expect(error).toBeInstanceOf(IdempotencyError);
        expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND');
      }
      // Requests without a key never touch the backend: they still run.
      const keyless = await post('fail-closed', 'orders', undefined, 'no key');
      expect(keyless.status).toBe(201);
    });

    it('fail-open: runs the handler without idempotency while Redis is down', async () => {
      expect(server!.running).toBe(false);
      const before = app.events.length;
      for (let i = 0; i < 2; i++) {
        const answer = await post('fail-open', 'orders', 'down-open');
        expect(answer.status).toBe(201);
        expect(answer.headers.get('idempotent-replayed')).toBeNull();
        expect(answer.elapsedMs).toBeLessThan(ANSWER_WITHIN_MS);
      }
      // No idempotency: the same key ran twice.
      expect(runsOf(app, 'down-open')).toBe(2);
      expect(app.events.slice(before).map(({ outcome, status }) => ({ outcome, status }))).toEqual([
        { outcome: 'backend-error', status: undefined },
        { outcome: 'backend-error', status: undefined },
      ]);
    });

    it('is back to normal once Redis restarts on the same port, without a new app or client', async () => {
      await server!.start();
      const recovered = await untilRecovered('fail-closed');
      expect(recovered.answer.status).toBe(201);
      const retry = await post('fail-closed', 'orders', recovered.key);
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(retry.text).toBe(recovered.answer.text);
      expect(runsOf(app, recovered.key)).toBe(1);

      // A key that got 503 during the outage was never locked: it runs now, once.
      const late = await post('fail-closed', 'orders', 'down-closed-0');
      expect(late.status).toBe(201);
      expect(late.headers.get('idempotent-replayed')).toBeNull();
      expect((await post('fail-closed', 'orders', 'down-closed-0')).headers.get('idempotent-replayed')).toBe(
        'true',
      );
      expect(runsOf(app, 'down-closed-0')).toBe(1);

      // The fail-open mount is idempotent again too.
      const open = await post('fail-open', 'orders', 'back-open');
      expect(open.status).toBe(201);
      const openRetry = await post('fail-open', 'orders', 'back-open');
      expect(openRetry.headers.get('idempotent-replayed')).toBe('true');
      expect(runsOf(app, 'back-open')).toBe(1);

      // What was stored before the crash survived it and still replays.
      expect((await post('fail-closed', 'orders', 'up')).headers.get('idempotent-replayed')).toBe('true');
      expect(runsOf(app, 'up')).toBe(1);
    });

    it('sends the handler’s response when Redis dies while it runs, and the key is not stuck afterwards', async () => {
      const before = app.events.length;
      const pending = post('fail-closed', 'slow', 'slow');
      await app.slow.started.promise;
      await server!.stop();
      const finishedAt = performance.now();
      app.slow.finish.resolve();
      const answer = await Promise.race([
        pending,
        sleep(ANSWER_WITHIN_MS * 3).then(() => {
          throw new Error('The slow request got no answer after Redis died');
        }),
      ]);
      const sendMs = performance.now() - finishedAt;

      // The client gets what the handler produced, once the store was retried a few times (about 1.3 s); the failed
      // store is reported, not thrown, and the key is not released: the request ran.
      expect(answer.status).toBe(201);
      expect(answer.headers.get('idempotent-replayed')).toBeNull();
      expect(JSON.parse(answer.text)).toEqual({ run: expect.any(Number), item: 'slow', slow: true });
      expect(sendMs).toBeLessThan(ANSWER_WITHIN_MS + STORE_RETRIES_MS);
      const reported = app.events.slice(before);
      expect(reported.map(({ outcome, status }) => ({ outcome, status }))).toEqual([
        { outcome: 'store-failed', status: 201 },
      ]);
      expect(reported[0]!.error).toBeInstanceOf(IdempotencyError);

      // The lock was written (and persisted) before the crash, and its release failed while Redis was down: after
      // the restart a retry may meet it (409, Retry-After) until its lease lapses, then it runs; or it replays if
      // the store got through. Never 409 for longer than the lease.
      await server!.start();
      await untilRecovered('fail-closed');
      const deadline = Date.now() + LOCK_TIMEOUT_S * 1000 + RECOVERY_WITHIN_MS;
      const statuses: number[] = [];
      let retry: Answer;
      for (;;) {
        retry = await post('fail-closed', 'slow', 'slow');
        statuses.push(retry.status);
        if ((retry.status !== 409 && retry.status !== 503) || Date.now() > deadline) break;
        const retryAfterMs = Number(retry.headers.get('retry-after') ?? '0') * 1000;
        await sleep(Math.min(Math.max(retryAfterMs, 100), 500));
      }
      expect(retry.status, `statuses: ${statuses.join(', ')}`).toBe(201);
      if (retry.headers.get('idempotent-replayed') === 'true') {
        expect(retry.text).toBe(answer.text);
        expect(runsOf(app, 'slow')).toBe(1);
      } else {
        expect(runsOf(app, 'slow')).toBe(2);
        const replay = await post('fail-closed', 'slow', 'slow');
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
        expect(replay.text).toBe(retry.text);
      }
      console.info(`outage (${clientName}): retries after the restart answered ${statuses.join(', ')}`);
    });

    it('leaves no unhandled rejection behind', async () => {
      // Give late socket events and timers a chance to surface.
      await sleep(200);
      expect(unhandled).toEqual([]);
    });
  });
});
