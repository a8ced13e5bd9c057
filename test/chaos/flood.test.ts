/**
 * A flood of fresh keys against the memory backend (SPEC §3: "the memory backend is bounded … it never evicts an
 * unexpired record or a lock: when full, a new key is a backend error"): 1 000 000 requests, each with a key never
 * seen before, through the engine on a `MemoryBackend` with its default bounds (100 000 entries, 64 MiB). Once it
 * is full every new key gets 503; the heap stops growing with it; and every record and lock taken before the
 * flood is still there afterwards: a client that flooded cannot make anyone else's request run twice.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { type FinishedResponse, IdempotencyEngine, Ticket } from '../../src/core/engine.js';
import type { EngineReply } from '../../src/core/responses.js';
import { nodeSha256 } from '../../src/runtime/node-sha256.js';
import { report } from './support/chaos.js';

const KEYS = 1_000_000;
const MAX_ENTRIES = 100_000;
/** Keys whose handlers are still running (their locks held) when the flood comes. */
const IN_FLIGHT = 1_000;
const MiB = 1024 * 1024;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** The JavaScript heap and the memory of `ArrayBuffer`s outside it, where `MemoryBackend` writes its records. */
function heapUsed(): number {
  gc();
  gc();
  const { heapUsed, arrayBuffers } = process.memoryUsage();
  return heapUsed + arrayBuffers;
}

const BODY = Buffer.from('{"item":"book","quantity":1}');

function responseOf(i: number): FinishedResponse {
  return {
    status: 201,
    headers: [
      ['content-type', 'application/json'],
      ['location', `/orders/${i}`],
    ],
    body: Buffer.from(`{"order":${i}}`),
  };
}

describe('chaos: a flood of 1 000 000 fresh keys on MemoryBackend', () => {
  const backend = new MemoryBackend();
  const engine = new IdempotencyEngine<object>({ backend }, { sha256: nodeSha256 });
  const inFlight: Ticket[] = [];

  afterAll(() => {
    for (const ticket of inFlight) engine.fail(ticket);
    backend.close();
  });

  it('stays within maxEntries, answers 503 once full, and evicts nothing unexpired', async () => {
    const begin = (key: string) => engine.begin({}, 'POST', '/orders', key, BODY, performance.now());
    const baseline = heapUsed();
    const heap: { keys: number; bytes: number }[] = [];
    const started = performance.now();
    let stored = 0;
    let refused = 0;
    let fullAt = 0;
    let otherAnswers = 0;
    /** Time spent measuring the heap (forced collections), left out of the per-request costs. */
    let measuringMs = 0;
    let filledMs = 0;
    for (let i = 0; i < KEYS; i++) {
      // Let timers run now and then (lease renewals of the requests in flight), as a server's event loop would.
      if (i % 10_000 === 0) await new Promise((resolve) => setImmediate(resolve));
      const result = begin(`flood-${i}`);
      if (result instanceof Ticket) {
        // The first keys stay in flight: their locks must survive the flood as the records do.
        if (i < IN_FLIGHT) inFlight.push(result);
        else {
          engine.finish(result, responseOf(i));
          stored++;
        }
      } else if ((result as EngineReply).status === 503) {
        if (refused++ === 0) {
          fullAt = i;
          filledMs = performance.now() - started - measuringMs;
        }
      } else otherAnswers++;
      if ((i + 1) % 100_000 === 0) {
        const measuring = performance.now();
        heap.push({ keys: i + 1, bytes: heapUsed() - baseline });
        measuringMs += performance.now() - measuring;
      }
    }
    const floodMs = performance.now() - started;

    // Full at maxEntries exactly, and never over it.
    expect(otherAnswers).toBe(0);
    expect(fullAt).toBe(MAX_ENTRIES);
    expect(backend.size).toBe(MAX_ENTRIES);
    expect(stored).toBe(MAX_ENTRIES - IN_FLIGHT);
    expect(refused).toBe(KEYS - MAX_ENTRIES);
    expect(backend.bytes).toBeLessThanOrEqual(64 * MiB);

    // The heap holds the 100 000 entries, and no more for the 900 000 refused keys: it grew while the backend
    // filled, and stopped when it was full.
    const atFull = heap[0]!.bytes;
    const atEnd = heap[heap.length - 1]!.bytes;
    expect(atEnd - atFull).toBeLessThan(8 * MiB);
    expect(atEnd).toBeLessThan(128 * MiB);

    // Nothing unexpired was evicted: every record replays its own response, every lock still answers 409.
    const checked = performance.now();
    const lost: number[] = [];
    for (let i = IN_FLIGHT; i < MAX_ENTRIES; i++) {
      const reply = begin(`flood-${i}`) as EngineReply;
      if (!reply.replayed || Buffer.from(reply.body!).toString() !== `{"order":${i}}`) lost.push(i);
    }
    for (let i = 0; i < IN_FLIGHT; i++) if ((begin(`flood-${i}`) as EngineReply).status !== 409) lost.push(i);
    expect(lost.slice(0, 10)).toEqual([]);
    const checkMs = performance.now() - checked;

    report('flood: 1 000 000 fresh keys on MemoryBackend (maxEntries 100 000)', {
      keys: KEYS,
      'flood took': { ms: floodMs },
      'cost per request: first run, refusal (503), replay': `${((filledMs / MAX_ENTRIES) * 1000).toFixed(1)} µs, ${(((floodMs - measuringMs - filledMs) / refused) * 1000).toFixed(1)} µs, ${((checkMs / MAX_ENTRIES) * 1000).toFixed(1)} µs`,
      'full after': fullAt,
      'stored, in flight, refused (503)': `${stored}, ${IN_FLIGHT}, ${refused}`,
      'entries held at the end': backend.size,
      'bytes counted at the end': `${(backend.bytes / MiB).toFixed(1)} MiB`,
      'heap growth per 100 000 keys (MiB)': heap.map(({ bytes }) => (bytes / MiB).toFixed(1)).join(' '),
      'heap growth after full': `${((atEnd - atFull) / MiB).toFixed(1)} MiB`,
      'heap per entry': `${Math.round(atFull / MAX_ENTRIES)} B`,
      'records replayed, locks still 409 afterwards': `${MAX_ENTRIES - IN_FLIGHT}, ${IN_FLIGHT}`,
      'check took': { ms: checkMs },
    });
  }, 120_000);
});
