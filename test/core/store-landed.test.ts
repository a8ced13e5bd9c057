/**
 * Regression (found by the chaos soak on Redis, issue 12): a store whose write landed but whose answer was lost
 * (the backend died, or the connection dropped, right after running it) is retried; the retry finds the key
 * holding a record instead of its lock and answers `false`. The engine reported that as `lease-lost` (the handler
 * ran and its response was not stored) although its own record was stored and is replayed. The engine now looks
 * the key up (`inspect`) before calling a refused retry a lost lease: its own record (same fingerprint, same
 * `createdAt`) means `executed`. Another request's record, or a backend without `inspect`, is still `lease-lost`.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { IdempotencyEngine, Ticket } from '../../src/core/engine.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import type { EngineReply } from '../../src/core/responses.js';
import type { Backend, IdempotencyRecord } from '../../src/core/types.js';
import { nodeSha256 } from '../../src/runtime/node-sha256.js';

const BODY = Buffer.from('{"amount":10}');
const RESPONSE = {
  status: 201,
  headers: [['content-type', 'application/json']] as [string, string][],
  body: Buffer.from('{"id":"ord_1"}'),
};

const backends: MemoryBackend[] = [];
afterEach(() => {
  vi.useRealTimers();
  for (const backend of backends.splice(0)) backend.close();
});

/** A MemoryBackend whose `complete` can be made to run and then lose its answer; `inspect` kept or dropped. */
function lossyBackend(withInspect: boolean) {
  const inner = new MemoryBackend();
  backends.push(inner);
  const state = { loseAnswers: 0, completes: 0 };
  const backend: Backend = {
    acquire: (key, fingerprint, leaseMs) => inner.acquire(key, fingerprint, leaseMs),
    complete: async (key: string, token: string, record: IdempotencyRecord, ttlMs: number | null) => {
      state.completes++;
      const held = await inner.complete(key, token, record, ttlMs);
      if (state.loseAnswers > 0) {
        state.loseAnswers--;
        throw new Error('Connection is closed.');
      }
      return held;
    },
    release: (key, token) => inner.release(key, token),
    renew: (key, token, leaseMs) => inner.renew(key, token, leaseMs),
    ...(withInspect ? { inspect: (key: string) => inner.inspect(key) } : {}),
  };
  return { backend, inner, state };
}

function engineOn(backend: Backend) {
  const events: IdempotencyEvent[] = [];
  const engine = new IdempotencyEngine<object>(
    { backend, onEvent: (event) => events.push(event) },
    { sha256: nodeSha256 },
  );
  const begin = (key: string) =>
    Promise.resolve(engine.begin({}, 'POST', '/orders', key, BODY, performance.now()));
  return { engine, events, begin };
}

describe('a store that landed but lost its answer', () => {
  it('is reported as executed, not lease-lost, when a retry finds its own record', async () => {
    const { backend, state } = lossyBackend(true);
    const { engine, events, begin } = engineOn(backend);
    const ticket = (await begin('landed')) as Ticket;
    expect(ticket).toBeInstanceOf(Ticket);
    state.loseAnswers = 1;
    await engine.finish(ticket, RESPONSE);
    expect(state.completes).toBe(2);
    expect(events.map((event) => `${event.outcome} ${event.status}`)).toEqual(['executed 201']);
    const replay = (await begin('landed')) as EngineReply;
    expect(replay.replayed).toBe(true);
  });

  it('is reported as executed when the answer is lost in the background too', async () => {
    vi.useFakeTimers();
    const { backend, state } = lossyBackend(true);
    const { engine, events, begin } = engineOn(backend);
    const ticket = (await begin('landed-late')) as Ticket;
    // Every attempt while the response waits fails before reaching the backend; the first background one lands
    // and loses its answer; the next finds the record.
    const complete = backend.complete;
    let attempts = 0;
    backend.complete = (key, token, record, ttlMs) => {
      attempts++;
      if (attempts <= 4) return Promise.reject(new Error('ECONNREFUSED'));
      if (attempts === 5) state.loseAnswers = 1;
      return complete(key, token, record, ttlMs);
    };
    const settled = Promise.resolve(engine.finish(ticket, RESPONSE));
    await vi.advanceTimersByTimeAsync(1400);
    await settled;
    expect(events).toEqual([]);
    await vi.advanceTimersByTimeAsync(2100 + 4100);
    expect(attempts).toBe(6);
    expect(events.map((event) => `${event.outcome} ${event.status}`)).toEqual(['executed 201']);
  });

  it('is still lease-lost when the record found is another request’s', async () => {
    vi.useFakeTimers();
    const { backend, inner } = lossyBackend(true);
    const { engine, events, begin } = engineOn(backend);
    const ticket = (await begin('taken')) as Ticket;
    // The first attempt fails without landing; meanwhile the lease is lost and another request stores its own.
    let attempts = 0;
    const complete = backend.complete;
    backend.complete = (key, token, record, ttlMs) => {
      if (++attempts === 1) {
        inner.forget(key, true);
        return Promise.reject(new Error('ECONNRESET'));
      }
      return complete(key, token, record, ttlMs);
    };
    const settled = Promise.resolve(engine.finish(ticket, RESPONSE));
    const other = (await begin('taken')) as Ticket;
    expect(other).toBeInstanceOf(Ticket);
    backend.complete = complete;
    // Stored a moment later: its createdAt is its own (fake timers hold Date.now() still otherwise).
    await vi.advanceTimersByTimeAsync(5);
    await engine.finish(other, { ...RESPONSE, body: Buffer.from('{"id":"ord_2"}') });
    await vi.advanceTimersByTimeAsync(1400);
    await settled;
    expect(events.map((event) => event.outcome)).toEqual(['executed', 'lease-lost']);
    const replay = (await begin('taken')) as EngineReply;
    expect(Buffer.from(replay.body!).toString()).toBe('{"id":"ord_2"}');
  });

  it('is still lease-lost on a backend without inspect, which cannot tell', async () => {
    const { backend, state } = lossyBackend(false);
    const { engine, events, begin } = engineOn(backend);
    const ticket = (await begin('no-inspect')) as Ticket;
    state.loseAnswers = 1;
    await engine.finish(ticket, RESPONSE);
    expect(events.map((event) => event.outcome)).toEqual(['lease-lost']);
  });
});
