/**
 * A store or release retried after the response went out is fenced by its token: it can never overwrite, or free,
 * the lock of a request that took the key over (issue 12, "no key stuck after a blip … fenced by the token, so
 * it can never overwrite a newer owner").
 *
 * A process is cut off from the backend right before its handler answers (a partition: its store or release and
 * its lease renewals hang, and the backend only gets them later). The middleware sends the response after
 * `backendTimeout` and goes on trying in the background. The lease lapses in the backend; a retry takes the key
 * over and is still running when the partition heals: every call the old owner had sent (its renewals, its store
 * or its release) then reaches the real backend, with the old token. The backend refuses them all; the new
 * owner's lock holds (a retry gets 409, no third run); the new owner's response is the one replayed afterwards;
 * the old owner's request is reported as `lease-lost` or `store-failed`, never `executed`.
 *
 * Run on every shared backend of the project (Redis with ioredis, PostgreSQL, MariaDB, a SQLite file) and on
 * MemoryBackend.
 */
import { createHash, randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import type { AcquireResult, Backend, IdempotencyRecord } from '../../src/core/types.js';
import { type Answer, postJson } from '../processes/client.js';
import { report, waitFor } from './support/chaos.js';
import { sharedBackends } from './support/shared-backends.js';

/** The shortest lease the middleware accepts: renewed every second, lapsed 2 s after the last renewal. */
const LOCK_S = 2;
const BACKEND_TIMEOUT_S = 1;

type Call = 'complete' | 'release' | 'renew';

/** A call of a cut-off owner, held until the partition heals. */
interface HeldCall {
  call: Call;
  send(): Promise<boolean>;
}

/**
 * Wraps a real backend. `cut(key)` partitions the key's current owner away: every later call carrying its token
 * hangs until `heal()`, which sends them to the real backend in the order they were made and answers what the
 * backend said to each. Everyone else's calls go straight through.
 */
class PartitionBackend implements Backend {
  readonly #owners = new Map<string, string>();
  readonly #cut = new Set<string>();
  #held: HeldCall[] = [];

  constructor(readonly inner: Backend) {}

  async acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    const result = await this.inner.acquire(key, fingerprint, leaseMs);
    if (result.state === 'acquired') this.#owners.set(key, result.token);
    return result;
  }
  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null) {
    return this.#gate(token, 'complete', () => this.inner.complete(key, token, record, ttlMs));
  }
  release(key: string, token: string) {
    return this.#gate(token, 'release', () => this.inner.release(key, token));
  }
  renew(key: string, token: string, leaseMs: number) {
    return this.#gate(token, 'renew', () => this.inner.renew(key, token, leaseMs));
  }

  /** Cuts the key's current owner off. */
  cut(key: string): void {
    const token = this.#owners.get(key);
    if (token === undefined) throw new Error(`no owner of ${key}`);
    this.#cut.add(token);
  }

  /** Sends every held call, in order; from now on the cut owners' calls go straight through. */
  async heal(): Promise<{ call: Call; held: boolean }[]> {
    const held = this.#held;
    this.#held = [];
    this.#cut.clear();
    const answers: { call: Call; held: boolean }[] = [];
    for (const call of held) answers.push({ call: call.call, held: await call.send() });
    return answers;
  }

  #gate(token: string, call: Call, send: () => boolean | Promise<boolean>): boolean | Promise<boolean> {
    if (!this.#cut.has(token)) return send();
    return new Promise<boolean>((resolve, reject) => {
      this.#held.push({
        call,
        send: () => {
          const answer = Promise.resolve().then(send);
          answer.then(resolve, reject);
          return answer;
        },
      });
    });
  }
}

interface Setup {
  backend: Backend;
  close(): Promise<void> | void;
}

const BACKENDS: { name: string; enabled: boolean; setup: () => Promise<Setup> }[] = [
  {
    name: 'MemoryBackend',
    enabled: true,
    async setup() {
      const backend = new MemoryBackend();
      return { backend, close: () => backend.close() };
    },
  },
  ...(await sharedBackends('Chaos: fenced background writes')).map(({ name, enabled, setup }) => ({
    name,
    enabled,
    setup: () => setup('chaos_fencing'),
  })),
];

interface App {
  url: string;
  partition: PartitionBackend;
  events: IdempotencyEvent[];
  runs: Map<string, number>;
  /** Holds the next run of `key`: `started` resolves when it began, `go()` lets it answer. */
  hold(key: string): { started: Promise<void>; go(): void };
  close(): Promise<void>;
}

async function startApp(backend: Backend): Promise<App> {
  const partition = new PartitionBackend(backend);
  const events: IdempotencyEvent[] = [];
  const runs = new Map<string, number>();
  const holds = new Map<string, { started(): void; released: Promise<void> }>();
  const app = express();
  app.use(
    idempotencyHeader({
      backend: partition,
      lockTimeout: LOCK_S,
      backendTimeout: BACKEND_TIMEOUT_S,
      onEvent: (event) => events.push(event),
    }),
  );
  app.use(express.json());
  app.post('/orders', async (req, res) => {
    const key = String(req.get('idempotency-key'));
    const run = (runs.get(key) ?? 0) + 1;
    runs.set(key, run);
    // Every request of a key is the same request (same body): what a run does is told by its number. The first
    // is cut off from the backend before it answers (500 for a `fenced-release-` key, so that it is released);
    // a held run waits for the test.
    const hold = holds.get(key);
    if (hold !== undefined) {
      holds.delete(key);
      hold.started();
      await hold.released;
    }
    if (run === 1) partition.cut(`-${key}`);
    res.status(run === 1 && key.startsWith('fenced-release-') ? 500 : 201).json({ key, run });
  });
  const server: Server = await new Promise((resolve) => {
    const listening = app.listen(0, '127.0.0.1', () => resolve(listening));
  });
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/orders`,
    partition,
    events,
    runs,
    hold(key) {
      let started!: () => void;
      let go!: () => void;
      const startedPromise = new Promise<void>((resolve) => {
        started = resolve;
      });
      const released = new Promise<void>((resolve) => {
        go = resolve;
      });
      holds.set(key, { started, released });
      return { started: startedPromise, go };
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

/** The body of every request: all the requests of a key are retries of one request. */
const ORDER = { item: 'book' };

const keyHash = (key: string) => createHash('sha256').update(`-${key}`).digest('hex');

describe('chaos: background writes of a cut-off owner are fenced by its token', () => {
  describe.each(BACKENDS)('$name', ({ name, enabled, setup }) => {
    let backend: Setup;
    let app: App;

    beforeAll(async () => {
      if (!enabled) return;
      backend = await setup();
      app = await startApp(backend.backend);
    });

    afterAll(async () => {
      await app?.close();
      await backend?.close();
    });

    it.runIf(enabled).each([
      { write: 'store', status: 201 },
      { write: 'release', status: 500 },
    ])(
      'a late $write of the old owner leaves the new owner’s lock and response alone',
      async ({ write, status }) => {
        const key = `fenced-${write}-${randomUUID()}`;
        // The first owner: cut off right before it answers; its store or release hangs, and so do its renewals.
        const cutAt = performance.now();
        const first = await postJson(app.url, key, ORDER);
        expect(first.status).toBe(status);
        expect(first.elapsedMs).toBeLessThan(BACKEND_TIMEOUT_S * 1000 + 1_500);

        // Its lease lapses in the backend; a retry takes the key over and holds it.
        await sleep(Math.max(0, LOCK_S * 1000 + 300 - (performance.now() - cutAt)));
        const second = app.hold(key);
        const conflicts: number[] = [];
        let secondAnswer: Promise<Answer> | undefined;
        await waitFor(
          'a retry to take the key over',
          async () => {
            const attempt = postJson(app.url, key, ORDER);
            const outcome = await Promise.race([attempt, second.started.then(() => 'started' as const)]);
            if (outcome === 'started') {
              secondAnswer = attempt;
              return true;
            }
            conflicts.push(outcome.status);
            expect(outcome.status).toBe(409);
            return undefined;
          },
          5_000,
          100,
        );
        expect(app.runs.get(key)).toBe(2);
        const takenOverAfterMs = performance.now() - cutAt;

        // The partition heals: every call the old owner made reaches the backend now, and each is refused.
        const healed = await app.partition.heal();
        expect(healed.map(({ call }) => call)).toContain(write === 'store' ? 'complete' : 'release');
        expect(healed.filter(({ held }) => held)).toEqual([]);
        // Its background attempts, if any are left, go through from now on: give them time to land.
        await sleep(500);

        // The new owner still holds the key: a retry gets 409, not a replay of the old response, not a third run.
        const during = await postJson(app.url, key, ORDER);
        expect(during.status, during.text).toBe(409);
        expect(app.runs.get(key)).toBe(2);

        second.go();
        const secondDone = await secondAnswer!;
        expect(secondDone.status).toBe(201);
        expect(JSON.parse(secondDone.text)).toEqual({ key, run: 2 });
        const replay = await postJson(app.url, key, ORDER);
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
        expect(replay.text).toBe(secondDone.text);
        expect(app.runs.get(key)).toBe(2);

        // The old owner's request is reported as what happened to it: never as stored.
        const outcomes = await waitFor(
          'both requests’ outcomes',
          () => {
            const terminal = app.events
              .filter((event) => event.keyHash === keyHash(key))
              .filter((event) => !['conflict', 'replayed'].includes(event.outcome))
              .map((event) => `${event.outcome} ${event.status}`);
            return terminal.length >= 2 ? terminal : undefined;
          },
          LOCK_S * 1000 + 5_000,
        );
        const expectedOld =
          write === 'store'
            ? ['lease-lost 201', 'store-failed 201']
            : ['backend-error 500', 'not-stored 500'];
        expect(outcomes).toHaveLength(2);
        expect(expectedOld).toContain(outcomes.find((outcome) => !outcome.startsWith('executed')));
        expect(outcomes).toContain('executed 201');

        report(`fenced background ${write}: ${name}`, {
          lockTimeout: { ms: LOCK_S * 1000 },
          backendTimeout: { ms: BACKEND_TIMEOUT_S * 1000 },
          'old owner answered after': { ms: first.elapsedMs },
          'new owner took over after': { ms: takenOverAfterMs },
          '409s before the takeover': conflicts.length,
          'old owner’s calls sent on healing (all refused)': healed.map(({ call }) => call).join(' '),
          'retry while the new owner runs': during.status,
          executions: app.runs.get(key) ?? 0,
          'onEvent outcomes': outcomes.join(', '),
        });
      },
      30_000,
    );
  });
});
