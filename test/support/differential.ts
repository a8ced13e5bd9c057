/**
 * The differential harness for the framework adapters (SPEC §3, transparent first runs): a corpus of handler
 * behaviours, each served by the bare app and by the same app with the middleware, and the two responses compared
 * as they came over the wire (see `test/adapters/differential.test.ts` for Express and `node:http`).
 *
 * - First run (a new key): the same status line, the same header lines in the same order (`Date` aside), framed
 *   the same way (chunked, or with a length: its value may differ only where the body does, which it may not),
 *   the same body bytes and trailers; where the bare
 *   app's response was cut short, the middleware's is not complete either; where the bare app left the connection
 *   usable for another request, so does the middleware; no replay header.
 * - Then the same request again: a stored response comes back as the first run had it, plus
 *   `Idempotent-Replayed: true` (less `Set-Cookie`, which is never stored); a response remembered without its body
 *   gets 410; one that was not stored runs again.
 *
 * The run fails on any unhandled rejection or uncaught exception ({@link failOnUnexpectedErrors}).
 */
import { createHash, randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { RedisBackend } from '../../src/backends/redis.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import type { Backend } from '../../src/core/types.js';
import { exchange, type RawRequest, type RawResponse } from './raw-http.js';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from './redis.js';

/** Headers that differ between any two responses, and the framing's, where the framing is not compared. */
export const PER_RESPONSE: ReadonlySet<string> = new Set(['date', 'content-length', 'transfer-encoding']);
/** The header that differs between any two responses. */
const DATE: ReadonlySet<string> = new Set(['date']);
/** Left out of a replay on purpose (SPEC: hop-by-hop and `Set-Cookie`; trailers are not stored). */
const NOT_REPLAYED = new Set([...PER_RESPONSE, 'set-cookie', 'trailer', 'idempotent-replayed']);

/** Whether a response was framed chunked rather than with a `Content-Length`. */
export function isChunked(response: RawResponse): boolean {
  return response.headers.some(([name, value]) => name === 'transfer-encoding' && /chunked/i.test(value));
}

/** One handler behaviour of a corpus, served by both apps at `path`. */
export interface DifferentialCase {
  readonly name: string;
  readonly path: string;
  /** Why this case is skipped here; a skip without a reason is not allowed. */
  readonly skip?: string;
}

/**
 * The cases of a corpus whose apps serve its behaviour number `i` at `/case/<i>`, as the Fastify, Hono, Koa and
 * fetch corpora do.
 */
export function numberedCases(
  corpus: readonly { readonly name: string; readonly skip?: string }[],
): DifferentialCase[] {
  return corpus.map((corpusCase, i) => ({
    name: corpusCase.name,
    path: `/case/${i}`,
    skip: corpusCase.skip,
  }));
}

/** A listening server of the pair. */
export interface Listening {
  readonly port: number;
  close(): Promise<void>;
}

/** The bare app and the app with the middleware, both listening. */
export interface ServerPair {
  readonly bare: Listening;
  readonly idempotent: Listening;
}

/** Builds the pair on `backend`; the middleware reports its events to `onEvent`. */
export type StartPair = (backend: Backend, onEvent: (event: IdempotencyEvent) => void) => Promise<ServerPair>;

/** A backend for a corpus run, and whether it can run here. */
export interface BackendSetup {
  readonly name: string;
  readonly up: boolean;
  create(): Promise<{ backend: Backend; teardown(): Promise<void> }>;
}

/** Memory, and Redis when a server answers (skipped with a warning otherwise, failing under `CI=true`). */
export async function differentialBackends(label: string): Promise<readonly BackendSetup[]> {
  const redisUp = await requireRedis(`${label} differential corpus on RedisBackend`);
  return [
    {
      name: 'MemoryBackend',
      up: true,
      async create() {
        const backend = new MemoryBackend();
        return { backend, teardown: async () => backend.close() };
      },
    },
    {
      name: 'RedisBackend',
      up: redisUp,
      async create() {
        const redis = new Redis(REDIS_URL, { lazyConnect: true });
        await redis.connect();
        const prefix = uniquePrefix(`differential-${label.toLowerCase().replace(/\W+/g, '-')}`);
        return {
          backend: new RedisBackend({ redis, prefix }),
          async teardown() {
            await deleteKeysWithPrefix(redis, prefix);
            redis.disconnect();
          },
        };
      },
    },
  ];
}

/** Fails the test file on any unhandled rejection or uncaught exception while it runs. */
export function failOnUnexpectedErrors(): void {
  const unexpected: unknown[] = [];
  const onUnexpected = (error: unknown) => unexpected.push(error);
  beforeAll(() => {
    process.on('unhandledRejection', onUnexpected);
    process.on('uncaughtException', onUnexpected);
  });
  afterAll(() => {
    process.off('unhandledRejection', onUnexpected);
    process.off('uncaughtException', onUnexpected);
    expect(unexpected, 'unhandled rejections or uncaught exceptions during the run').toEqual([]);
  });
}

/** A `node:http` server listening on an ephemeral port of 127.0.0.1, as a {@link Listening}. */
export async function listenOn(server: Server): Promise<Listening> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** The request every case gets: a JSON body, an `Origin` (for CORS middleware), and the key. */
export function corpusRequest(path: string, key: string): RawRequest {
  return {
    method: 'POST',
    path,
    headers: [
      ['Content-Type', 'application/json'],
      ['Origin', 'http://a.example'],
      ['Idempotency-Key', key],
    ],
    body: Buffer.from('{"item":"book","quantity":2}'),
  };
}

/** The follow-up request on the same connection, to prove the framing left it usable. */
const PING: RawRequest = { method: 'GET', path: '/ping', headers: [] };

function headerLines(response: RawResponse, leaveOut: ReadonlySet<string>): [string, string][] {
  return response.headers.filter(([name]) => !leaveOut.has(name));
}

/** The event's `keyHash` for a key sent without a scope (the engine namespaces it as `-<key>`). */
function keyHashOf(key: string): string {
  return createHash('sha256').update(`-${key}`).digest('hex');
}

async function eventFor(
  events: readonly IdempotencyEvent[],
  key: string,
): Promise<IdempotencyEvent | undefined> {
  const hash = keyHashOf(key);
  // The outcome is reported once the response settled; the event can trail the last byte by a tick.
  for (let i = 0; i < 100; i++) {
    const event = events.find((candidate) => candidate.keyHash === hash);
    if (event !== undefined) return event;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return undefined;
}

/** How a corpus is compared, where a framework needs it said. */
export interface DifferentialOptions {
  /** Why a first run may go with a length where the bare app's response went chunked; compared without it. */
  readonly chunkedNotCompared?: string;
  /** Why a first run may go chunked where the bare app's response went with a length; compared without it. */
  readonly lengthNotCompared?: string;
}

/**
 * `@hono/node-server` frames a body by timing: it reads a streamed body for a moment without waiting, and sends a
 * `Content-Length` when the stream ended by then, chunks otherwise. A response the middleware holds until the
 * engine settled, or sends on from its stored bytes, ends sooner or later than the bare app's.
 */
const TIMED =
  '@hono/node-server sends a Content-Length for a stream that ended within its first reads, chunks otherwise';

/** Hono on `@hono/node-server`: neither framing is compared (Hono's own middleware reads bodies on the way out). */
export const HONO_NODE_SERVER_FRAMING: DifferentialOptions = {
  chunkedNotCompared: TIMED,
  lengthNotCompared: TIMED,
};

/**
 * A fetch handler on `@hono/node-server`: a response the bare handler streamed is streamed on a first run too; one
 * it sent in hand may go chunked when the middleware relays it.
 */
export const FETCH_NODE_SERVER_FRAMING: DifferentialOptions = { lengthNotCompared: TIMED };

/**
 * Registers the corpus for one pair of servers on one backend: one test per case, run one after another on the
 * same pair.
 */
export function describeDifferential(
  label: string,
  backendSetup: BackendSetup,
  cases: readonly DifferentialCase[],
  start: StartPair,
  options: DifferentialOptions = {},
): void {
  describe.runIf(backendSetup.up)(`${label}, ${backendSetup.name}`, () => {
    const events: IdempotencyEvent[] = [];
    let pair: ServerPair | undefined;
    let teardown: (() => Promise<void>) | undefined;

    beforeAll(async () => {
      const created = await backendSetup.create();
      teardown = created.teardown;
      pair = await start(created.backend, (event) => events.push(event));
    });

    afterAll(async () => {
      await pair?.bare.close();
      await pair?.idempotent.close();
      await teardown?.();
    });

    for (const corpusCase of cases) {
      const run = corpusCase.skip === undefined ? it : it.skip;
      run(
        corpusCase.skip === undefined ? corpusCase.name : `${corpusCase.name} (${corpusCase.skip})`,
        async () => {
          const { bare, idempotent } = pair!;
          const key = randomUUID();
          const expected = await exchange(bare.port, corpusRequest(corpusCase.path, key), PING, 2500);
          // Where even the bare app never answers, the middleware cannot be expected to: a shorter wait shows it
          // does not either.
          const first = await exchange(
            idempotent.port,
            corpusRequest(corpusCase.path, key),
            PING,
            expected.timedOut ? 1000 : 5000,
          );
          expect(
            first.timedOut === true && expected.timedOut !== true,
            'no complete response within 5 s',
          ).toBe(false);
          const outcome = (await eventFor(events, key))?.outcome;

          if (!expected.complete) {
            // The bare app cut its response short: the client must not get a complete-looking one either.
            expect(first.complete, `${first.statusLine}\n${first.body.toString()}`).toBe(false);
            return;
          }
          expect(first.complete, 'the response was cut short').toBe(true);
          expect(first.statusLine).toBe(expected.statusLine);
          // Where the framing is compared, its header lines are too: the same `Content-Length` in the same place.
          const perResponse =
            options.chunkedNotCompared === undefined && options.lengthNotCompared === undefined
              ? DATE
              : PER_RESPONSE;
          expect(headerLines(first, perResponse)).toEqual(headerLines(expected, perResponse));
          // A body the bare app streamed (chunked) is streamed on a first run too, stored or not.
          // Framed as the bare app's: chunked where it streamed, with a length where it sent one.
          const notCompared = isChunked(expected) ? options.chunkedNotCompared : options.lengthNotCompared;
          if (notCompared === undefined) {
            expect(isChunked(first), 'chunked (true) or with a length (false)').toBe(isChunked(expected));
          }
          expect(first.body.toString('latin1')).toBe(expected.body.toString('latin1'));
          expect(first.trailers).toEqual(expected.trailers);
          if (expected.connectionReusable) expect(first.connectionReusable).toBe(true);
          expect(first.headers.find(([name]) => name === 'idempotent-replayed')).toBeUndefined();

          const again = await exchange(idempotent.port, corpusRequest(corpusCase.path, key), PING);
          expect(again.complete).toBe(true);
          if (outcome === 'executed') {
            expect(again.statusLine.split(' ')[1]).toBe(first.statusLine.split(' ')[1]);
            expect(again.headers).toContainEqual(['idempotent-replayed', 'true']);
            expect(headerLines(again, NOT_REPLAYED)).toEqual(headerLines(first, NOT_REPLAYED));
            expect(again.body.toString('latin1'), 'the replayed body differs').toBe(
              first.body.toString('latin1'),
            );
          } else if (outcome === 'remembered') {
            expect(again.status).toBe(410);
          } else {
            // Not stored, or not handled at all (a route that opted out reports no event): it runs again.
            expect(['not-stored', 'abandoned', undefined], `outcome ${outcome}`).toContain(outcome);
            expect(again.headers.find(([name]) => name === 'idempotent-replayed')).toBeUndefined();
          }
        },
      );
    }
  });
}

/** A Node.js stream of `parts`, a tick apart, failing with `error` at the end if given: a body made as it goes. */
export function chunks(parts: readonly (string | Buffer)[], error?: Error): Readable {
  return Readable.from(
    (async function* () {
      for (const part of parts) {
        await nextTurn();
        yield typeof part === 'string' ? Buffer.from(part) : part;
      }
      if (error !== undefined) throw error;
    })(),
  );
}
