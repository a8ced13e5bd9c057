/**
 * A process killed mid-handler, and a handler that outlives its lease several times over (SPEC §3: "a crashed
 * process's lock lapses after lockTimeout; then a retry runs"; leases renewed while the handler runs).
 *
 * Two copies of the chaos fixture server (`fixtures/ledger-server.ts`, Express) share one backend and write every
 * execution to a ledger file. Run on every shared backend of the project: Redis (ioredis, under a prefix of its
 * own), PostgreSQL and MariaDB (a table of its own), SQLite (a file both processes open, in a directory of its
 * own). Beside every retry the test reads the key's state in the same backend (`inspectKey`, timed by the
 * backend's own clock, as the leases are): the lease's true time left, against which `Retry-After` is judged.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inspectKey } from '../../src/core/operator.js';
import type { KeyState } from '../../src/core/types.js';
import { type Answer, postJson, postWithRetries } from '../processes/client.js';
import { type ExampleProcess, startExample } from '../processes/example-process.js';
import { max, report, size, waitFor } from './support/chaos.js';
import { createLedger, type Ledger } from './support/ledger.js';
import { type SharedBackend, sharedBackends } from './support/shared-backends.js';

/** The middleware's `lockTimeout`, in seconds (1 is the least it accepts). */
const LOCK_S = size(3, 6);
const LOCK_MS = LOCK_S * 1000;
/** How often the observers retry. */
const POLL_MS = 200;
const FIXTURE = 'test/chaos/fixtures/ledger-server.ts';

/** A 409 (or the answer that ended the wait), and the key's state read in the backend right after it. */
interface Observation {
  at: number;
  answer: Answer;
  state: KeyState | undefined;
}

/** The lease's time left in a state read by `inspectKey`; `undefined` when the key is not in flight. */
function leaseLeftMs(state: KeyState | undefined): number | undefined {
  return state?.state === 'in-flight' ? state.leaseLeftMs : undefined;
}

const BACKENDS = await sharedBackends('Chaos: crash and long handler');

describe('chaos: processes that crash or run long (Express, 2 processes)', () => {
  describe.each(BACKENDS)('$name', ({ name, reported, enabled, setup }) => {
    let ledger: Ledger | undefined;
    let shared: SharedBackend | undefined;
    let a: ExampleProcess;
    let b: ExampleProcess;

    beforeAll(async () => {
      if (!enabled) return;
      ledger = createLedger('crash');
      shared = await setup('chaos_crash');
      const env = { ...shared.env, LEDGER: ledger.path, LOCK_TIMEOUT: String(LOCK_S) };
      [a, b] = await Promise.all([startExample(env, FIXTURE), startExample(env, FIXTURE)]);
      expect([a.backend, b.backend]).toEqual([reported, reported]);
      // Warm both up, so that each has measured a short first run (its `Retry-After` hint while a holder lives).
      for (const child of [a, b])
        expect((await postJson(child.url, randomUUID(), { item: 'warm-up' })).status).toBe(201);
    }, 60_000);

    afterAll(async () => {
      await Promise.all([a?.stop(), b?.stop()]);
      await shared?.close();
      ledger?.remove();
    });

    const runsOf = (key: string) => ledger!.byKey().get(key) ?? [];
    const stateOf = (key: string) => inspectKey(shared!.backend, key);

    it.runIf(enabled)(
      `keeps a handler that runs 3 × lockTimeout (${3 * LOCK_S} s) leased: retries get 409, it never runs twice`,
      async () => {
        const key = `long-${randomUUID()}`;
        const body = { item: 'long', delayMs: 3 * LOCK_MS };
        const started = performance.now();
        const first = postJson(a.url, key, body);
        await waitFor(
          'the long handler to start',
          () => (runsOf(key).length > 0 ? true : undefined),
          10_000,
          10,
        );

        const observations: Observation[] = [];
        let done: Answer | undefined;
        first.then((answer) => {
          done = answer;
        });
        for (let i = 0; done === undefined; i++) {
          const answer = await postJson((i % 2 === 0 ? b : a).url, key, body);
          const at = performance.now();
          const state = await stateOf(key);
          if (done === undefined || answer.status === 409) observations.push({ at, answer, state });
          await sleep(POLL_MS);
        }
        const handlerMs = performance.now() - started;
        const firstAnswer = await first;
        expect(firstAnswer.status).toBe(201);
        expect(handlerMs).toBeGreaterThanOrEqual(3 * LOCK_MS);

        // Every retry while it ran was a 409 with the documented body: no retry ran the handler.
        for (const { answer } of observations) {
          expect(answer.status, answer.text).toBe(409);
          expect(JSON.parse(answer.text)).toEqual({
            detail: `Request already pending for idempotency key '${key}'`,
          });
          expect(Number(answer.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
        }
        // The lease never lapsed: every read found the key in flight with time left, but the last, which may
        // come just after the response was stored.
        const states = observations.map(({ state }) => state?.state ?? 'free');
        expect(states.slice(0, -1).filter((state) => state !== 'in-flight')).toEqual([]);
        expect(['in-flight', 'completed']).toContain(states.at(-1));
        const leases = observations.flatMap(({ state }) => leaseLeftMs(state) ?? []);
        expect(leases.length).toBeGreaterThanOrEqual(observations.length - 1);
        expect(Math.min(...leases)).toBeGreaterThan(0);
        // Renewals: the time left went back up, again and again, instead of running down to 0 once.
        let renewals = 0;
        for (let i = 1; i < leases.length; i++) if (leases[i]! > leases[i - 1]! + 100) renewals++;
        expect(renewals).toBeGreaterThanOrEqual(3);

        const replay = await postJson(b.url, key, body);
        expect(replay.status).toBe(201);
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
        expect(replay.text).toBe(firstAnswer.text);
        expect(runsOf(key)).toHaveLength(1);

        report(`long handler: 3 × lockTimeout, retries meanwhile: ${name}`, {
          lockTimeout: { ms: LOCK_MS },
          'handler ran for': { ms: handlerMs },
          'retries (all 409)': observations.length,
          'lease time left, least seen': { ms: Math.min(...leases) },
          'renewals seen': renewals,
          'Retry-After, largest': max(
            observations.map(({ answer }) => Number(answer.headers.get('retry-after'))),
          ),
          executions: runsOf(key).length,
        });
      },
      3 * LOCK_MS + 30_000,
    );

    it.runIf(enabled)(
      'answers 409 with the lease’s time left after a SIGKILL mid-handler, then runs the retry once when it lapses',
      async () => {
        const key = `crash-${randomUUID()}`;
        // Hangs in process A only: the same request runs normally once B takes it over.
        const body = { item: 'crash', hangInPid: a.pid };
        const doomed = postJson(a.url, key, body).catch((error: unknown) => error);
        await waitFor(
          'the handler to start in process A',
          () => (runsOf(key).length > 0 ? true : undefined),
          10_000,
          10,
        );
        // Let a renewal or two happen, so that the lease is mid-way when the process dies.
        await sleep(LOCK_MS / 2);
        const leaseAtKill = leaseLeftMs(await stateOf(key));
        process.kill(a.pid, 'SIGKILL');
        const killedAt = performance.now();
        expect(await doomed).toBeInstanceOf(Error);
        expect(leaseAtKill).toBeGreaterThan(0);
        const leftAtKill = leaseAtKill!;

        // A client honouring Retry-After, beside an observer polling every 200 ms.
        const honouring = postWithRetries(b.url, key, body, { maxWaitMs: LOCK_MS, maxAttempts: 50 }).then(
          (answer) => ({ answer, at: performance.now() }),
        );
        const observations: Observation[] = [];
        let success: Observation | undefined;
        while (success === undefined) {
          const answer = await postJson(b.url, key, body);
          const at = performance.now();
          const observation = { at, answer, state: await stateOf(key) };
          if (answer.status === 409) observations.push(observation);
          else success = observation;
          if (performance.now() - killedAt > 2 * LOCK_MS + 5_000) throw new Error('the key is still held');
          await sleep(POLL_MS);
        }
        const lapsedAfterMs = success.at - killedAt;

        // 409 until the lease ran out, then one run, in B; every later request replays it.
        expect(success.answer.status).toBe(201);
        // Not before the lease the dead process held ran out (its time left was read just before the kill), nor
        // long after.
        expect(lapsedAfterMs).toBeGreaterThanOrEqual(leftAtKill - 250);
        expect(lapsedAfterMs).toBeLessThanOrEqual(leftAtKill + POLL_MS + 1000);
        const { answer: honoured, at: honouredAt } = await honouring;
        expect(honoured.status).toBe(201);
        expect(honoured.text).toBe(success.answer.text);
        const runs = runsOf(key);
        expect(runs.map(({ pid }) => pid)).toEqual([a.pid, b.pid]);
        expect(JSON.parse(success.answer.text)).toMatchObject({ pid: b.pid, run: runs[1]!.run });
        const replay = await postJson(b.url, key, body);
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
        expect(runsOf(key)).toHaveLength(2);

        // Retry-After: once the lease is past its half (the holder would have renewed it by then), the 409 says how
        // long the lease has left, to the second; before that it may be the short "likely done soon" hint.
        let judged = 0;
        let worstErrorS = 0;
        for (const { answer, state } of observations) {
          const retryAfter = Number(answer.headers.get('retry-after'));
          expect(retryAfter).toBeGreaterThanOrEqual(1);
          const left = leaseLeftMs(state);
          if (left === undefined || left > LOCK_MS / 2 - 250) continue;
          judged++;
          // The time left is read a moment after the engine's own read: their ceilings differ by one second at
          // most.
          const errorS = Math.abs(retryAfter - Math.max(1, Math.ceil(left / 1000)));
          worstErrorS = Math.max(worstErrorS, errorS);
          expect(errorS, `Retry-After ${retryAfter} with ${left} ms left`).toBeLessThanOrEqual(1);
        }
        expect(judged).toBeGreaterThan(0);

        report(`crash: SIGKILL mid-handler: ${name}`, {
          lockTimeout: { ms: LOCK_MS },
          'lease left at the kill': { ms: leftAtKill },
          '409s before the lease lapsed': observations.length,
          'Retry-After values': observations.map(({ answer }) => answer.headers.get('retry-after')).join(' '),
          'Retry-After judged against the time left': judged,
          'Retry-After error, worst': `${worstErrorS} s`,
          'first run after the kill': { ms: lapsedAfterMs },
          'client honouring Retry-After answered after': { ms: honouredAt - killedAt },
          'executions (killed + retry)': runs.length,
        });
      },
      3 * LOCK_MS + 30_000,
    );
  });
});
