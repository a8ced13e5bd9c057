/**
 * Redis goes away after the handler succeeded, before its response is stored (SPEC §2 step 5, "the store
 * fails"): the client still gets its response, the key is never released (a request that ran is never forgotten),
 * and it is not stuck either:
 *
 * - Redis back within the lease: the background retry stores the response once it can, and a retry gets the
 *   replay, long before the lease would have lapsed. The same for a release (a 500 that is not stored): the
 *   background release frees the key, and a retry runs again.
 * - Redis away for longer than the lease: `store-failed` is reported, and once Redis is back the key is free no
 *   later than the lease's end.
 *
 * The Express middleware on RedisBackend, on a private `redis-server` with an append-only file (fsync always), so
 * that the lock written before the crash is still there after the restart, as on a production Redis with
 * persistence; for ioredis and node-redis, each configured to fail fast as the README says.
 */
import { createHash, randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { RedisBackend, type RedisClientLike } from '../../src/backends/redis.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import { type Answer, postJson } from '../processes/client.js';
import { type FailFastClient, failFastClients } from '../support/fail-fast-redis.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';
import { report, waitFor } from './support/chaos.js';

const enabled = requireRedisServer('Chaos: the store fails after the handler succeeded');

/** The lease of the mount whose store must survive the outage: room for the background retries (2 s, 6 s). */
const LONG_LOCK_S = 10;
/** The lease of the mount that outlives the outage's start: shorter than the outage. */
const SHORT_LOCK_S = 3;
const PREFIX = 'chaos-blip:';

const clients = failFastClients;

interface Gate {
  started: Promise<void>;
  open(): void;
}

/** An app whose handlers each wait for their key's gate to open before they answer. */
interface App {
  base: string;
  events: IdempotencyEvent[];
  /** Executions per key. */
  runs: Map<string, number>;
  gate(key: string): Gate;
  close(): Promise<void>;
}

async function startApp(redis: RedisClientLike): Promise<App> {
  const backend = new RedisBackend({ redis, prefix: PREFIX });
  const events: IdempotencyEvent[] = [];
  const runs = new Map<string, number>();
  const gates = new Map<string, { started: () => void; opened: Promise<void> }>();
  const app = express();
  const onEvent = (event: IdempotencyEvent) => events.push(event);
  app.use('/long', idempotencyHeader({ backend, lockTimeout: LONG_LOCK_S, onEvent }));
  app.use('/short', idempotencyHeader({ backend, lockTimeout: SHORT_LOCK_S, onEvent }));
  app.use(express.json());
  // `order` answers 201 once its gate opens; `flaky` answers 500 the first time (not stored: the key is
  // released), 201 after.
  app.post(['/long/order', '/short/order', '/long/flaky'], async (req, res) => {
    const key = String(req.get('idempotency-key'));
    const run = (runs.get(key) ?? 0) + 1;
    runs.set(key, run);
    const gate = gates.get(key);
    gate?.started();
    await gate?.opened;
    if (req.path === '/long/flaky' && run === 1) res.status(500).json({ detail: 'failed', run });
    else res.status(201).json({ key, run, item: req.body?.item ?? null });
  });
  const server: Server = await new Promise((resolve) => {
    const listening = app.listen(0, '127.0.0.1', () => resolve(listening));
  });
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    events,
    runs,
    gate(key) {
      let started!: () => void;
      let open!: () => void;
      const startedPromise = new Promise<void>((resolve) => {
        started = resolve;
      });
      const opened = new Promise<void>((resolve) => {
        open = resolve;
      });
      gates.set(key, { started, opened });
      return { started: startedPromise, open };
    },
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
  'chaos: the store fails after the handler succeeded (Redis restarted mid-request)',
  () => {
    let server: RedisServer;

    beforeAll(async () => {
      server = await startRedisServer({ args: ['--appendonly', 'yes', '--appendfsync', 'always'] });
    });

    afterAll(async () => {
      await server?.close();
    });

    describe.each(Object.keys(clients))('with a fail-fast %s client', (clientName) => {
      let client: FailFastClient;
      let app: App;

      beforeAll(async () => {
        if (!server.running) await server.start();
        client = await clients[clientName]!(server.url);
        app = await startApp(client.redis);
      });

      afterAll(async () => {
        await app?.close();
        client?.close();
      });

      /** Runs a request whose handler is held until Redis is down, then lets it answer: returns its answer. */
      async function answerWhileRedisIsDown(
        path: string,
        key: string,
      ): Promise<{ answer: Answer; waitedMs: number; stoppedAt: number }> {
        const gate = app.gate(key);
        const pending = postJson(`${app.base}${path}`, key, { item: key });
        await gate.started;
        const stoppedAt = performance.now();
        await server.stop();
        const opened = performance.now();
        gate.open();
        const answer = await pending;
        return { answer, waitedMs: performance.now() - opened, stoppedAt };
      }

      /** Posts every 200 ms until the answer is neither 409 nor 503; returns it with the statuses met on the way. */
      async function retryUntilSettled(path: string, key: string, withinMs: number) {
        const statuses: number[] = [];
        const started = performance.now();
        for (;;) {
          const answer = await postJson(`${app.base}${path}`, key, { item: key });
          statuses.push(answer.status);
          if (answer.status !== 409 && answer.status !== 503)
            return { answer, statuses, at: performance.now() };
          if (performance.now() - started > withinMs) throw new Error(`still ${statuses.join(', ')}`);
          await sleep(200);
        }
      }

      it('Redis back within the lease: the background retry stores the response, and a retry gets the replay', async () => {
        const key = `back-${randomUUID()}`;
        const before = app.events.length;
        const { answer, waitedMs, stoppedAt } = await answerWhileRedisIsDown('/long/order', key);
        // The client got its response, after the inline retries (about 1.3 s), not stored yet.
        expect(answer.status).toBe(201);
        expect(answer.headers.get('idempotent-replayed')).toBeNull();
        expect(JSON.parse(answer.text)).toMatchObject({ key, run: 1 });
        expect(waitedMs).toBeLessThan(3_000);

        await sleep(300);
        await server.start();
        const restartedAt = performance.now();
        const {
          answer: settled,
          statuses,
          at,
        } = await retryUntilSettled('/long/order', key, LONG_LOCK_S * 1000);
        expect(settled.status).toBe(201);
        expect(settled.headers.get('idempotent-replayed')).toBe('true');
        expect(settled.text).toBe(answer.text);
        expect(app.runs.get(key)).toBe(1);
        // Well before the lease would have lapsed (it was renewed until Redis died, and runs LONG_LOCK_S from there).
        const storedAfterMs = at - restartedAt;
        expect(storedAfterMs).toBeLessThan(LONG_LOCK_S * 1000 - 3_000);

        // Reported once, as executed: the background store succeeded.
        const terminalOf = () =>
          app.events
            .slice(before)
            .filter(
              (event) =>
                event.keyHash === keyHash(key) &&
                event.outcome !== 'conflict' &&
                event.outcome !== 'replayed' &&
                event.outcome !== 'backend-error',
            );
        await waitFor('the outcome event', () => (terminalOf().length > 0 ? true : undefined), 5_000);
        await sleep(200);
        const terminal = terminalOf();
        expect(terminal.map(({ outcome, status }) => ({ outcome, status }))).toEqual([
          { outcome: 'executed', status: 201 },
        ]);

        report(`store blip, Redis back within the lease (${clientName})`, {
          lockTimeout: { ms: LONG_LOCK_S * 1000 },
          'response sent after (inline retries)': { ms: waitedMs },
          'Redis down for': { ms: restartedAt - stoppedAt },
          'retries after the restart': statuses.join(' '),
          'replay after the restart': { ms: storedAfterMs },
          executions: app.runs.get(key) ?? 0,
          'onEvent for the request': terminal.map((event) => event.outcome).join(', '),
        });
      }, 40_000);

      it('Redis back within the lease: a release that failed is done in the background, and a retry runs again', async () => {
        const key = `release-${randomUUID()}`;
        const before = app.events.length;
        const { answer, waitedMs } = await answerWhileRedisIsDown('/long/flaky', key);
        expect(answer.status).toBe(500);
        await sleep(300);
        await server.start();
        const restartedAt = performance.now();
        const {
          answer: settled,
          statuses,
          at,
        } = await retryUntilSettled('/long/flaky', key, LONG_LOCK_S * 1000);
        // The release got through: the retry ran the handler again (it answers 201 the second time).
        expect(settled.status).toBe(201);
        expect(settled.headers.get('idempotent-replayed')).toBeNull();
        expect(app.runs.get(key)).toBe(2);
        const freedAfterMs = at - restartedAt;
        expect(freedAfterMs).toBeLessThan(LONG_LOCK_S * 1000 - 3_000);
        const mine = app.events.slice(before).filter((event) => event.keyHash === keyHash(key));
        expect(mine.map((event) => event.outcome)).toContain('not-stored');
        expect(mine.map((event) => event.outcome)).not.toContain('store-failed');

        report(`release blip, Redis back within the lease (${clientName})`, {
          lockTimeout: { ms: LONG_LOCK_S * 1000 },
          'response (500) sent after': { ms: waitedMs },
          'retries after the restart': statuses.join(' '),
          'key free after the restart': { ms: freedAfterMs },
          'onEvent for the key': mine.map((event) => event.outcome).join(', '),
        });
      }, 40_000);

      it('Redis away past the lease: the client gets its response, store-failed is reported, the key is free by the lease’s end', async () => {
        const key = `away-${randomUUID()}`;
        const before = app.events.length;
        const { answer, waitedMs, stoppedAt } = await answerWhileRedisIsDown('/short/order', key);
        expect(answer.status).toBe(201);
        expect(JSON.parse(answer.text)).toMatchObject({ key, run: 1 });

        // While Redis is away, retries get 503: never a second run, never a 500.
        const whileDown = await postJson(`${app.base}/short/order`, key, { item: key });
        expect(whileDown.status).toBe(503);

        const failed = await waitFor(
          'store-failed',
          () =>
            app.events
              .slice(before)
              .find((event) => event.keyHash === keyHash(key) && event.outcome === 'store-failed'),
          SHORT_LOCK_S * 1000 + 5_000,
        );
        expect(failed.status).toBe(201);
        const reportedAfterMs = performance.now() - stoppedAt;
        // Reported once, and as nothing else: not as executed, not as a lost lease.
        const firstRun = app.events
          .slice(before)
          .filter(
            (event) =>
              event.keyHash === keyHash(key) &&
              !['conflict', 'replayed', 'backend-error'].includes(event.outcome),
          );
        expect(firstRun.map(({ outcome, status }) => `${outcome} ${status}`)).toEqual(['store-failed 201']);
        // The lease was last renewed before Redis died: it has lapsed, inside Redis, by now.
        await sleep(Math.max(0, SHORT_LOCK_S * 1000 - (performance.now() - stoppedAt)));
        await server.start();
        const restartedAt = performance.now();
        const { answer: settled, statuses, at } = await retryUntilSettled('/short/order', key, 10_000);
        // The documented limit: a response that could never be stored runs again once its lease lapsed.
        expect(settled.status).toBe(201);
        expect(statuses.filter((status) => status === 409)).toEqual([]);
        expect(app.runs.get(key)).toBe(2);

        report(`store failed for longer than the lease (${clientName})`, {
          lockTimeout: { ms: SHORT_LOCK_S * 1000 },
          'response sent after (inline retries)': { ms: waitedMs },
          'store-failed reported after the crash': { ms: reportedAfterMs },
          'answers after the restart': statuses.join(' '),
          'key free after the restart': { ms: at - restartedAt },
        });
      }, 40_000);
    });
  },
);
