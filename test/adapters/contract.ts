/**
 * The HTTP scenarios every adapter must pass, over real HTTP on 127.0.0.1 against a real backend. An adapter's
 * test file calls {@link describeAdapterContract} once per configuration (framework version, body parser
 * placement, backend), then adds the tests that only make sense for it.
 *
 * The routes the scenarios need are written once, here ({@link createContractRoutes}), framework-neutral; the
 * adapter's `createServer` translates them. Each test starts its own server with the options it needs, so every
 * counter starts at zero, and uses fresh random keys, so a shared backend never mixes tests.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import type { Awaitable, Backend } from '../../src/core/types.js';
import {
  type BackendHandle,
  type ContractOptions,
  type HttpResult,
  type RouteResponse,
  type Routes,
  readResult,
  type SendOptions,
  type ServerFactory,
  send,
  sendHead,
  sendRawRequest,
  sendWithNodeHttp,
  type TestServer,
} from '../support/http.js';
import { exchange, type RawRequest, type RawResponse } from '../support/raw-http.js';

/** What a contract run needs. */
export interface AdapterContractConfig {
  /** Builds an app with the middleware configured with `options` in front of `routes`, listening on port 0. */
  createServer: ServerFactory;
  /** Called once before the run's first test; its teardown once after the last. */
  createBackend: () => Promise<BackendHandle>;
}

/** A promise with its resolver outside. */
class Signal {
  resolve!: () => void;
  readonly promise = new Promise<void>((resolve) => {
    this.resolve = resolve;
  });
}

/** Holds the `/slow` route: it runs until {@link release} is called, reporting where it is on the way. */
class Gate {
  /** The handler started (the key is locked). */
  readonly started = new Signal();
  /** The handler saw its connection close (response finished or client gone). */
  readonly closed = new Signal();
  /** The handler handed its whole response to the framework. */
  readonly finished = new Signal();
  readonly #released = new Signal();

  get released(): Promise<void> {
    return this.#released.promise;
  }

  release(): void {
    this.#released.resolve();
  }
}

/** Per-server state the routes share with the tests: how often each route ran, and the slow route's gate. */
export class RouteState {
  readonly #runs = new Map<string, number>();
  readonly gate = new Gate();
  /** Told when a handler that takes time (`/slow`) starts (`true`) and ends (`false`). */
  onRun: (path: string, running: boolean) => void = () => {};

  /** Counts one execution of `path`'s handler; returns its number (1 for the first). */
  run(path: string): number {
    const count = (this.#runs.get(path) ?? 0) + 1;
    this.#runs.set(path, count);
    return count;
  }

  /** How often `path`'s handler ran. */
  runs(path: string): number {
    return this.#runs.get(path) ?? 0;
  }
}

/** A request header from an adapter's request object: node:http style (`headers` record) or Fetch (`Headers`). */
export function requestHeader(req: unknown, name: string): string | undefined {
  const headers = (req as { headers?: unknown } | null)?.headers;
  if (headers === null || typeof headers !== 'object') return undefined;
  if (typeof (headers as Headers).get === 'function') return (headers as Headers).get(name) ?? undefined;
  const value = (headers as Record<string, string | string[] | undefined>)[name.toLowerCase()];
  return Array.isArray(value) ? value[0] : value;
}

const JSON_TYPE = ['content-type', 'application/json'] as const;

function jsonResponse(status: number, value: unknown, extra: readonly (readonly [string, string])[] = []) {
  return { status, headers: [JSON_TYPE, ...extra], chunks: [JSON.stringify(value)] } satisfies RouteResponse;
}

/** Every byte value once, in order. */
export const ALL_BYTES = Buffer.from(Array.from({ length: 256 }, (_, i) => i));

/**
 * The routes the scenarios use, every one counting its executions in `state`. Any method reaches them.
 *
 * - `/orders`: 201 JSON `{id, run}` with a `Location`, head via `setHeader`.
 * - `/created`: 201 via `writeHead(status, object)` with `Location`, two `Set-Cookie`, `X-Run` and a body whose
 *   bytes are not canonical JSON (spacing, non-ASCII, trailing newline).
 * - `/slow`: 201 JSON once {@link Gate.release} is called.
 * - `/throw`: the handler rejects.
 * - `/server-error`: 500 JSON.
 * - `/refuse`: JSON with the status of `X-Status` (a refusal such as 429 or 401).
 * - `/text`: 200 `text/plain; charset=utf-8`, in two writes.
 * - `/charset`: 200 `application/json; charset=utf-8`.
 * - `/problem`: 400 `application/problem+json`.
 * - `/chunked`: 201 JSON via `writeHead(status, list)` in five writes (strings and bytes).
 * - `/events`: 200 `text/event-stream` in two writes.
 * - `/large`: 200 JSON of exactly `X-Size` bytes, in 16 KiB writes.
 * - `/binary`: 200 `application/octet-stream`: every byte value, then the run number.
 * - `/echo`: the request body back: bytes as they came (same content type), or a parsed value as JSON.
 * - `/end-then-fail`: 201 of type `X-Type` (default `application/json`) `{"run":n}`; the handler fails right after
 *   ending it.
 * - `/live`: 200 of type `X-Type` (default `text/event-stream`): a first chunk of `X-Size` bytes (default 16),
 *   then, once {@link Gate.release} is called, a last chunk `"end"`; for responses that must stream.
 */
export function createContractRoutes(state: RouteState): Routes {
  return {
    '/no-content': () => {
      const run = state.run('/no-content');
      return {
        status: 204,
        headers: [
          ['content-type', 'application/json'],
          ['x-run', String(run)],
        ],
        chunks: [],
      };
    },
    '/reset-content': () => {
      const run = state.run('/reset-content');
      return { status: 205, headers: [['x-run', String(run)]], chunks: [] };
    },
    '/orders': () => {
      const run = state.run('/orders');
      const id = randomUUID();
      return jsonResponse(201, { id, run }, [['location', `/orders/${id}`]]);
    },
    '/created': () => {
      const run = state.run('/created');
      const id = randomUUID();
      return {
        status: 201,
        head: 'writeHead',
        headers: [
          ['Content-Type', 'application/json'],
          ['Location', `/orders/${id}`],
          ['Set-Cookie', `session=s${run}; Path=/; HttpOnly`],
          ['Set-Cookie', 'theme=dark; Path=/'],
          ['X-Run', String(run)],
        ],
        chunks: [Buffer.from(`{ "id" : "${id}",\n  "note": "café ☕", "run": ${run} }\n`)],
      };
    },
    '/slow': async (req) => {
      const run = state.run('/slow');
      const gate = state.gate;
      state.onRun('/slow', true);
      gate.started.resolve();
      req.closed.then(() => gate.closed.resolve());
      await gate.released;
      state.onRun('/slow', false);
      return { ...jsonResponse(201, { id: randomUUID(), run }), onWritten: () => gate.finished.resolve() };
    },
    '/throw': async () => {
      state.run('/throw');
      throw new Error('the route failed on purpose');
    },
    '/server-error': () => jsonResponse(500, { error: 'boom', run: state.run('/server-error') }),
    '/refuse': (req) =>
      jsonResponse(Number(req.header('x-status')), { refused: true, run: state.run('/refuse') }),
    '/text': () => {
      const run = state.run('/text');
      return {
        status: 200,
        headers: [['content-type', 'text/plain; charset=utf-8']],
        chunks: [`run ${run}\n`, 'that is all\n'],
      };
    },
    '/charset': () => ({
      status: 200,
      headers: [['content-type', 'application/json; charset=utf-8']],
      chunks: [JSON.stringify({ run: state.run('/charset'), text: 'grüße' })],
    }),
    '/problem': () => ({
      status: 400,
      headers: [['content-type', 'application/problem+json']],
      chunks: [
        JSON.stringify({
          type: 'about:blank',
          title: 'Bad Request',
          status: 400,
          run: state.run('/problem'),
        }),
      ],
    }),
    '/chunked': () => {
      const run = state.run('/chunked');
      return {
        status: 201,
        head: 'writeHead-list',
        headers: [
          ['content-type', 'application/json'],
          ['x-run', String(run)],
        ],
        chunks: ['{"items":[', Buffer.from('1,2,3'), ',', `"run-${run}"`, Buffer.from(']}')],
      };
    },
    '/events': () => {
      const run = state.run('/events');
      return {
        status: 200,
        headers: [['content-type', 'text/event-stream']],
        chunks: [`data: run ${run}\n\n`, 'data: done\n\n'],
      };
    },
    '/large': (req) => {
      const run = state.run('/large');
      const size = Number(req.header('x-size'));
      const prefix = `{"run":${run},"pad":"`;
      const body = Buffer.from(`${prefix}${'x'.repeat(size - prefix.length - 2)}"}`);
      const chunks: Buffer[] = [];
      for (let offset = 0; offset < body.length; offset += 16_384)
        chunks.push(body.subarray(offset, offset + 16_384));
      return { status: 200, headers: [JSON_TYPE], chunks };
    },
    '/binary': () => ({
      status: 200,
      headers: [['content-type', 'application/octet-stream']],
      chunks: [Buffer.concat([ALL_BYTES, Buffer.from([state.run('/binary')])])],
    }),
    '/end-then-fail': (req) => ({
      status: 201,
      headers: [['content-type', req.header('x-type') ?? 'application/json']],
      chunks: [JSON.stringify({ run: state.run('/end-then-fail') })],
      failAfterWriting: true,
    }),
    '/live': (req) => {
      state.run('/live');
      const gate = state.gate;
      req.closed.then(() => gate.closed.resolve());
      const size = Number(req.header('x-size') ?? 16);
      async function* body() {
        yield Buffer.alloc(size, 'a');
        gate.started.resolve();
        await gate.released;
        yield 'end';
      }
      return {
        status: 200,
        headers: [['content-type', req.header('x-type') ?? 'text/event-stream']],
        chunks: body(),
      };
    },
    '/echo': (req) => {
      state.run('/echo');
      if (req.body instanceof Uint8Array) {
        return {
          status: 200,
          headers: [['content-type', req.header('content-type') ?? 'application/octet-stream']],
          chunks: [req.body],
        };
      }
      return jsonResponse(200, req.body ?? null);
    },
  };
}

/** A started app: its server, its route state and a client bound to it. */
export interface ContractApp {
  readonly server: TestServer;
  readonly state: RouteState;
  readonly gate: Gate;
  url(path: string): string;
  send(path: string, options?: SendOptions): Promise<HttpResult>;
  runs(path: string): number;
}

const PENDING_BODY = (key: string) => `{"detail":"Request already pending for idempotency key '${key}'"}`;
const UUID_BODY = (header = 'Idempotency-Key') =>
  `{"detail":"'${header}' header value must be formatted as a v4 UUID"}`;
const REPLAYED = 'idempotent-replayed';
/** Headers that differ between any two responses, or that a replay leaves out on purpose. */
const UNCOMPARED = new Set([
  'date',
  'connection',
  'keep-alive',
  'set-cookie',
  'transfer-encoding',
  'content-length',
]);
const GONE_BODY = (key: string) =>
  `{"detail":"The request with idempotency key '${key}' already ran, but its response was too large to store or a stream; it cannot be replayed"}`;

function comparableHeaders(result: HttpResult, replayHeader = REPLAYED): [string, string][] {
  return [...result.headers].filter(([name]) => !UNCOMPARED.has(name) && name !== replayHeader.toLowerCase());
}

/** Asserts that `replay` is `first` replayed: same status, headers (less per-response ones) and body bytes. */
function expectReplayOf(replay: HttpResult, first: HttpResult, replayHeader = REPLAYED): void {
  expect(first.headers.get(replayHeader)).toBeNull();
  expect(replay.headers.get(replayHeader)).toBe('true');
  expect(replay.status).toBe(first.status);
  expect(comparableHeaders(replay, replayHeader)).toEqual(comparableHeaders(first, replayHeader));
  expect(replay.body.equals(first.body)).toBe(true);
}

/** Asserts that `result` is the 410 for a key whose request ran but whose response could not be stored. */
function expectNotReplayable(result: HttpResult, key: string): void {
  expect(result.status).toBe(410);
  expect(result.headers.get(REPLAYED)).toBeNull();
  expect(result.text).toBe(GONE_BODY(key));
}

/** Asserts that `result` ran the handler: not a replay. */
function expectFresh(result: HttpResult, status: number, replayHeader = REPLAYED): void {
  expect(result.status).toBe(status);
  expect(result.headers.get(replayHeader)).toBeNull();
}

function expectJsonError(result: HttpResult, status: number, detail: RegExp): void {
  expect(result.status).toBe(status);
  expect(result.headers.get('content-type')).toBe('application/json');
  expect(result.headers.get(REPLAYED)).toBeNull();
  const body = JSON.parse(result.text) as { detail: unknown };
  expect(Object.keys(body)).toEqual(['detail']);
  expect(body.detail).toMatch(detail);
}

/** A backend whose every method throws synchronously: as if its client could not even queue a command. */
function throwingBackend(): Backend {
  const fail = (): never => {
    throw new Error('backend down (thrown)');
  };
  return { acquire: fail, complete: fail, release: fail, renew: fail };
}

/** A backend whose every method rejects: as if the network call failed. */
function rejectingBackend(): Backend {
  const fail = () => Promise.reject(new Error('backend down (rejected)'));
  return { acquire: fail, complete: fail, release: fail, renew: fail };
}

/**
 * Reads from a streaming response until `size` bytes arrived; `undefined` when they did not within `timeoutMs`
 * (the response was held back). Leaves the rest of the body unread.
 */
async function readFirstBytes(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  size: number,
  timeoutMs = 2000,
): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let length = 0;
  const deadline = sleep(timeoutMs).then(() => undefined);
  while (length < size) {
    const next = await Promise.race([reader.read(), deadline]);
    if (next === undefined || next.done) return undefined;
    chunks.push(Buffer.from(next.value));
    length += next.value.length;
  }
  return Buffer.concat(chunks);
}

/** Reads what is left of a streaming response. */
async function readRest(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for (;;) {
    const next = await reader.read();
    if (next.done) return Buffer.concat(chunks);
    chunks.push(Buffer.from(next.value));
  }
}

/**
 * The run's backend with slow writes, as a networked store under load: `complete` and `release` take effect
 * `writeLagMs` after the call, lookups a macrotask after it, and every answer comes a macrotask later still. Each
 * step is still the inner backend's one atomic call. An adapter that lets a response out before its store or
 * release took effect is caught by a retry sent the instant that response arrives.
 */
function slowWritesBackend(inner: Backend, writeLagMs = 5): Backend {
  const later = <T>(delayMs: number, step: () => Awaitable<T>): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      setTimeout(() => {
        Promise.resolve()
          .then(step)
          .then((value) => setImmediate(() => resolve(value)), reject);
      }, delayMs);
    });
  return {
    acquire: (...args) => later(0, () => inner.acquire(...args)),
    complete: (...args) => later(writeLagMs, () => inner.complete(...args)),
    release: (...args) => later(writeLagMs, () => inner.release(...args)),
    renew: (...args) => later(0, () => inner.renew(...args)),
  };
}

/** Sends until `done` accepts the result (at most `timeoutMs`), 50 ms apart; returns the last result. */
async function eventually(
  sendOnce: () => Promise<HttpResult>,
  done: (result: HttpResult) => boolean,
  timeoutMs = 3000,
): Promise<HttpResult> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const result = await sendOnce();
    if (done(result) || Date.now() > deadline) return result;
    await sleep(50);
  }
}

/** Fires `release` after `count` of `promises` settled, or after `fallbackMs` so that a failing test cannot hang. */
function releaseAfterSettled(
  promises: Promise<unknown>[],
  count: number,
  release: () => void,
  fallbackMs = 5000,
) {
  let settled = 0;
  const timer = setTimeout(release, fallbackMs);
  for (const promise of promises) {
    promise.finally(() => {
      if (++settled === count) release();
    });
  }
  return () => clearTimeout(timer);
}

/**
 * Registers the adapter contract suite.
 *
 * @param name - names the run in the report, e.g. `'express 5, json parser before'`.
 *
 * @example
 * ```ts
 * describeAdapterContract('node:http, MemoryBackend', {
 *   createServer: createNodeServerFactory(),
 *   createBackend: async () => {
 *     const backend = new MemoryBackend();
 *     return { backend, teardown: async () => backend.close() };
 *   },
 * });
 * ```
 */
export function describeAdapterContract(name: string, config: AdapterContractConfig): void {
  describe(`${name} (adapter contract)`, () => {
    let handle: BackendHandle | undefined;
    const started: ContractApp[] = [];

    beforeAll(async () => {
      handle = await config.createBackend();
    });

    afterAll(async () => {
      await handle?.teardown();
    });

    afterEach(async () => {
      const apps = started.splice(0);
      for (const app of apps) app.gate.release();
      await Promise.all(apps.map((app) => app.server.close()));
    });

    /** Starts an app with the run's backend (unless `options` names another) and these options. */
    async function start(options: Partial<ContractOptions> = {}): Promise<ContractApp> {
      const state = new RouteState();
      const server = await config.createServer(
        { backend: handle!.backend, ...options },
        createContractRoutes(state),
      );
      const app: ContractApp = {
        server,
        state,
        gate: state.gate,
        url: (path) => server.url + path,
        send: (path, sendOptions) => send(server.url + path, sendOptions),
        runs: (path) => state.runs(path),
      };
      started.push(app);
      return app;
    }

    const body = { item: 'book', quantity: 2 };

    /** The same keyed POST sent twice, the two responses as they came over the wire. */
    async function sentTwiceOnTheWire(app: ContractApp, path: string): Promise<[RawResponse, RawResponse]> {
      const port = Number(new URL(app.server.url).port);
      const request: RawRequest = {
        method: 'POST',
        path,
        headers: [
          ['idempotency-key', randomUUID()],
          ['content-type', 'application/json'],
        ],
        body: Buffer.from('{}'),
      };
      return [await exchange(port, request, undefined), await exchange(port, request, undefined)];
    }

    describe('first run and replay', () => {
      it('replays a stored 204 as the first run went out: no body, no Content-Length', async () => {
        // Every type: Koa drops a 204's Content-Type, as it drops its body.
        const app = await start({ cacheableContentTypes: '*' });
        const [first, replay] = await sentTwiceOnTheWire(app, '/no-content');
        for (const response of [first, replay]) {
          expect(response.status).toBe(204);
          expect(response.framing).toBe('none');
          expect(response.body.byteLength).toBe(0);
          expect(response.headers.map(([name]) => name)).not.toContain('content-length');
          expect(response.headers).toContainEqual(['x-run', '1']);
        }
        expect(replay.headers).toContainEqual(['idempotent-replayed', 'true']);
        expect(app.runs('/no-content')).toBe(1);
      });

      it('replays a stored 205 framed as the first run went out, with no body', async () => {
        // A 205 may have no content (RFC 9110 §15.3.6); fetch's `Response` refuses one with any body, even empty.
        const app = await start({ cacheableContentTypes: '*' });
        const [first, replay] = await sentTwiceOnTheWire(app, '/reset-content');
        const lengthOf = (response: RawResponse) =>
          response.headers.find(([name]) => name === 'content-length')?.[1];
        expect(first.status).toBe(205);
        expect(replay.status).toBe(205);
        expect(replay.body.byteLength).toBe(0);
        expect(replay.framing).toBe(first.framing);
        expect(lengthOf(replay)).toBe(lengthOf(first));
        expect(replay.headers).toContainEqual(['x-run', '1']);
        expect(replay.headers).toContainEqual(['idempotent-replayed', 'true']);
        expect(app.runs('/reset-content')).toBe(1);
      });

      it('replays the status, headers and exact body bytes, and marks only the replay', async () => {
        const app = await start();
        const key = randomUUID();
        const first = await app.send('/created', { key, body });
        expectFresh(first, 201);
        expect(first.headers.get('location')).toMatch(/^\/orders\/[0-9a-f-]{36}$/);
        expect(first.headers.getSetCookie()).toEqual(['session=s1; Path=/; HttpOnly', 'theme=dark; Path=/']);
        expect(first.text).toMatch(/^\{ "id" : "[0-9a-f-]{36}",\n {2}"note": "café ☕", "run": 1 \}\n$/);

        const replay = await app.send('/created', { key, body });
        expectReplayOf(replay, first);
        expect(replay.headers.get('location')).toBe(first.headers.get('location'));
        expect(replay.headers.get('x-run')).toBe('1');
        expect(replay.headers.getSetCookie()).toEqual([]);
        expect(app.runs('/created')).toBe(1);
      });

      it('replays every later retry the same way without running the handler', async () => {
        const app = await start();
        const key = randomUUID();
        const first = await app.send('/orders', { key, body });
        expectFresh(first, 201);
        for (let i = 0; i < 3; i++) expectReplayOf(await app.send('/orders', { key, body }), first);
        expect(app.runs('/orders')).toBe(1);
      });

      it('runs the handler for each new key', async () => {
        const app = await start();
        const first = await app.send('/orders', { key: randomUUID(), body });
        const second = await app.send('/orders', { key: randomUUID(), body });
        expectFresh(first, 201);
        expectFresh(second, 201);
        expect(second.text).not.toBe(first.text);
        expect(app.runs('/orders')).toBe(2);
      });
    });

    describe('concurrency', () => {
      it('answers 409 with the pending detail and Retry-After while the first request runs', async () => {
        const app = await start();
        const key = randomUUID();
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;

        const duplicate = await app.send('/slow', { key, body });
        expect(duplicate.status).toBe(409);
        expect(duplicate.headers.get('content-type')).toBe('application/json');
        expect(duplicate.text).toBe(PENDING_BODY(key));
        // The holder renews its lease, so the lease's time left (about lockTimeout) says nothing about when the
        // response comes: the hint is how long first runs take here, at least 1 s (none finished yet).
        expect(duplicate.headers.get('retry-after')).toBe('1');
        expect(duplicate.headers.get(REPLAYED)).toBeNull();

        app.gate.release();
        const done = await first;
        expectFresh(done, 201);
        expectReplayOf(await app.send('/slow', { key, body }), done);
        expect(app.runs('/slow')).toBe(1);
      });

      it("makes duplicates wait for the first request with onConflict: 'wait', and answers them with its response", async () => {
        const app = await start({ onConflict: 'wait', waitTimeout: 5 });
        const key = randomUUID();
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;
        const duplicates = Array.from({ length: 10 }, () => app.send('/slow', { key, body }));
        await sleep(100);
        app.gate.release();
        const original = await first;
        expectFresh(original, 201);
        for (const duplicate of await Promise.all(duplicates)) expectReplayOf(duplicate, original);
        expect(app.runs('/slow')).toBe(1);
      });

      it('answers 409 after waitTimeout when the first request still runs', async () => {
        const app = await start({ onConflict: 'wait', waitTimeout: 0.3 });
        const key = randomUUID();
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;
        const startedAt = Date.now();
        const duplicate = await app.send('/slow', { key, body });
        expect(duplicate.status).toBe(409);
        expect(Date.now() - startedAt).toBeGreaterThanOrEqual(250);
        app.gate.release();
        expectFresh(await first, 201);
      });

      it('runs the handler exactly once for 30 parallel identical requests', async () => {
        const app = await start();
        const key = randomUUID();
        const requests = Array.from({ length: 30 }, () => app.send('/slow', { key, body }));
        await app.gate.started.promise;
        // Let part of them meet the lock, then finish: later ones may get the replay instead of 409.
        const cancelFallback = releaseAfterSettled(requests, 10, () => app.gate.release());
        const results = await Promise.all(requests);
        cancelFallback();

        expect(app.runs('/slow')).toBe(1);
        const fresh = results.filter((r) => r.status === 201 && r.headers.get(REPLAYED) === null);
        expect(fresh).toHaveLength(1);
        const [original] = fresh;
        for (const result of results) {
          if (result === original) continue;
          if (result.status === 409) expect(result.text).toBe(PENDING_BODY(key));
          else expectReplayOf(result, original!);
        }
        expect(results.filter((r) => r.status === 409).length).toBeGreaterThanOrEqual(10);
      });

      it('keeps the lock past lockTimeout while the handler runs, because the lease is renewed', async () => {
        const app = await start({ lockTimeout: 1 });
        const key = randomUUID();
        const startedAt = Date.now();
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;
        await sleep(2300 - (Date.now() - startedAt));

        const duplicate = await app.send('/slow', { key, body });
        expect(duplicate.status).toBe(409);
        expect(duplicate.text).toBe(PENDING_BODY(key));
        expect(duplicate.headers.get('retry-after')).toBe('1');

        app.gate.release();
        const done = await first;
        expectFresh(done, 201);
        expect(app.runs('/slow')).toBe(1);
        expectReplayOf(await app.send('/slow', { key, body }), done);
      });

      it('never runs twice for a client that disconnects mid-handler: 409 meanwhile, the replay after', async () => {
        const events: IdempotencyEvent[] = [];
        const app = await start({ onEvent: (event) => events.push(event) });
        const key = randomUUID();
        const controller = new AbortController();
        const first = app.send('/slow', { key, body, signal: controller.signal }).then(
          () => 'answered',
          (error: Error) => error.name,
        );
        await app.gate.started.promise;
        controller.abort();
        expect(await first).toBe('AbortError');
        await app.gate.closed.promise;

        // The handler still runs and still holds the key.
        const meanwhile = await app.send('/slow', { key, body });
        expect(meanwhile.status).toBe(409);
        expect(meanwhile.text).toBe(PENDING_BODY(key));
        expect(meanwhile.headers.get('retry-after')).toBe('1');

        app.gate.release();
        await app.gate.finished.promise;
        const retry = await eventually(
          () => app.send('/slow', { key, body }),
          (r) => r.status !== 409,
        );
        expect(retry.status).toBe(201);
        expect(retry.headers.get(REPLAYED)).toBe('true');
        expect(JSON.parse(retry.text)).toMatchObject({ run: 1 });
        expect(app.runs('/slow')).toBe(1);
        // Reported once the store has settled in this process, which a transactional backend may confirm after a
        // retry on another connection already found the record.
        const executed = await vi.waitFor(() => {
          const event = events.find((candidate) => candidate.outcome === 'executed');
          if (event === undefined) throw new Error('no executed event yet');
          return event;
        });
        expect(executed).toMatchObject({ status: 201, clientGone: true });
      });

      it('never runs twice for a client that leaves after part of a streamed response', async () => {
        const app = await start();
        const key = randomUUID();
        const controller = new AbortController();
        const response = await sendHead(app.url('/live'), { key, body, signal: controller.signal });
        const reader = response.body!.getReader();
        expect((await readFirstBytes(reader, 16))?.toString()).toBe('a'.repeat(16));
        controller.abort();
        await reader.read().catch(() => undefined);
        await app.gate.closed.promise;
        expect((await app.send('/live', { key, body })).status).toBe(409);
        app.gate.release();
        // An event stream is not stored; the request is remembered as run.
        const retry = await eventually(
          () => app.send('/live', { key, body }),
          (r) => r.status !== 409,
        );
        expectNotReplayable(retry, key);
        expect(app.runs('/live')).toBe(1);
      });

      it('runs once for a retrying client with a short per-attempt timeout, never twice at once', async () => {
        const app = await start();
        const key = randomUUID();
        let concurrent = 0;
        let mostConcurrent = 0;
        app.state.onRun = (path, running) => {
          if (path !== '/slow') return;
          concurrent += running ? 1 : -1;
          mostConcurrent = Math.max(mostConcurrent, concurrent);
        };
        // The handler takes about 700 ms; each attempt gives up after 150 ms and retries with the same key.
        setTimeout(() => app.gate.release(), 700);
        let final: HttpResult | undefined;
        const statuses: string[] = [];
        for (let attempt = 0; attempt < 40 && final === undefined; attempt++) {
          const result = await app.send('/slow', { key, body, signal: AbortSignal.timeout(150) }).then(
            (r) => r,
            () => undefined,
          );
          statuses.push(result === undefined ? 'timeout' : String(result.status));
          if (result !== undefined && result.status !== 409) final = result;
          else if (result !== undefined) await sleep(50);
        }
        expect(final?.status, statuses.join(' ')).toBe(201);
        expect(final?.headers.get(REPLAYED)).toBe('true');
        expect(app.runs('/slow')).toBe(1);
        expect(mostConcurrent).toBe(1);
        expect(statuses).toContain('timeout');
      });

      it('gives a client that honours Retry-After its replay within about the handler time plus a second', async () => {
        const app = await start();
        const key = randomUUID();
        const startedAt = Date.now();
        // The client gives up once the handler runs: a fixed timeout could fire, on a loaded machine, before the
        // request reached the handler, which then never ran.
        const controller = new AbortController();
        const first = app.send('/slow', { key, body, signal: controller.signal }).catch(() => undefined);
        await app.gate.started.promise;
        controller.abort();
        setTimeout(() => app.gate.release(), 1500);
        await first;
        let result = await app.send('/slow', { key, body });
        while (result.status === 409) {
          await sleep(Number(result.headers.get('retry-after')) * 1000);
          result = await app.send('/slow', { key, body });
        }
        expect(result.headers.get(REPLAYED)).toBe('true');
        expect(Date.now() - startedAt).toBeLessThan(1500 + 2500);
        expect(app.runs('/slow')).toBe(1);
      });

      for (const [label, iterations, lag] of [
        ['', 200, false],
        [', even when the backend writes slowly', 100, true],
      ] as const) {
        it(`answers a retry sent the instant a stored response arrives with the replay, never 409${label}`, async () => {
          const app = await start(lag ? { backend: slowWritesBackend(handle!.backend) } : {});
          const outcomes: string[] = [];
          for (let i = 0; i < iterations; i++) {
            const key = randomUUID();
            const head = await sendHead(app.url('/orders'), { key, body });
            // The retry goes out before the first body is even read.
            const retry = await app.send('/orders', { key, body });
            const first = await readResult(head);
            outcomes.push(`${first.status}/${retry.status}/${retry.headers.get(REPLAYED)}`);
            if (!retry.body.equals(first.body)) outcomes.push('body differs');
          }
          expect(new Set(outcomes)).toEqual(new Set(['201/201/true']));
          expect(app.runs('/orders')).toBe(iterations);
        });

        it(`runs a retry sent the instant a not-stored response arrives again, never 409${label}`, async () => {
          const app = await start(lag ? { backend: slowWritesBackend(handle!.backend) } : {});
          const outcomes: string[] = [];
          for (let i = 0; i < iterations; i++) {
            const key = randomUUID();
            const head = await sendHead(app.url('/text'), { key, body });
            // A streamed response is complete only with its last byte: that is when the retry goes out.
            await readResult(head);
            const retry = await app.send('/text', { key, body });
            outcomes.push(`${head.status}/${retry.status}/${retry.headers.get(REPLAYED)}`);
          }
          expect(new Set(outcomes)).toEqual(new Set(['200/200/null']));
          expect(app.runs('/text')).toBe(2 * iterations);
        });
      }
    });

    describe('key validation', () => {
      it('accepts hyphenated and 32-hex v4 UUIDs when enforceUuid4Formatting is on', async () => {
        const app = await start({ enforceUuid4Formatting: true });
        const hyphenated = randomUUID();
        const compact = randomUUID().replaceAll('-', '');
        expectFresh(await app.send('/orders', { key: hyphenated, body }), 201);
        expectFresh(await app.send('/orders', { key: compact, body }), 201);
        expect((await app.send('/orders', { key: compact, body })).headers.get(REPLAYED)).toBe('true');
        expect(app.runs('/orders')).toBe(2);
      });

      it('refuses nil, v1, braced and other non-v4 keys with the exact 422 body', async () => {
        const app = await start({ enforceUuid4Formatting: true });
        const v4 = randomUUID();
        const refused = [
          '00000000-0000-0000-0000-000000000000',
          '00000000000000000000000000000000',
          'c232ab00-9414-11ec-b3c8-9e6bdeced846', // v1
          `{${v4}}`,
          `urn:uuid:${v4}`,
          `${v4.slice(0, 14)}5${v4.slice(15)}`, // version 5
          `${v4.slice(0, 19)}c${v4.slice(20)}`, // not the RFC 4122 variant
          v4.replaceAll('-', '').slice(0, 31),
          `${v4.slice(0, 8)}${v4.slice(9, 13)}-${v4.slice(13)}`, // a hyphen moved
          'not-a-uuid',
        ];
        for (const key of refused) {
          const result = await app.send('/orders', { key, body });
          expect([key, result.status, result.text]).toEqual([key, 422, UUID_BODY()]);
          expect(result.headers.get('content-type')).toBe('application/json');
        }
        expect(app.runs('/orders')).toBe(0);
      });

      it('reads the configured header and names it in the 422 body', async () => {
        const app = await start({ enforceUuid4Formatting: true, idempotencyHeaderKey: 'X-Request-Key' });
        const refused = await app.send('/orders', { key: 'abc', keyHeader: 'x-request-key', body });
        expect(refused.status).toBe(422);
        expect(refused.text).toBe(UUID_BODY('X-Request-Key'));

        // The default header is now an ordinary header: no validation, no replay.
        expectFresh(await app.send('/orders', { key: 'abc', body }), 201);
        expectFresh(await app.send('/orders', { key: 'abc', body }), 201);

        const key = randomUUID();
        const first = await app.send('/orders', { key, keyHeader: 'X-Request-Key', body });
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', { key, keyHeader: 'x-request-key', body }), first);
        expect(app.runs('/orders')).toBe(3);
      });

      it('refuses keys longer than maxKeyLength with 422', async () => {
        const app = await start({ maxKeyLength: 40 });
        const result = await app.send('/orders', { key: 'k'.repeat(41), body });
        expectJsonError(result, 422, /40/);
        expectFresh(await app.send('/orders', { key: `${'k'.repeat(4)}${randomUUID()}`, body }), 201);
        expect(app.runs('/orders')).toBe(1);
      });

      it('refuses keys longer than 255 characters by default', async () => {
        const app = await start();
        expectJsonError(await app.send('/orders', { key: 'k'.repeat(256), body }), 422, /255/);
        const longest = randomUUID() + 'k'.repeat(255 - 36);
        expectFresh(await app.send('/orders', { key: longest, body }), 201);
        expect(app.runs('/orders')).toBe(1);
      });

      it('treats the RFC 8941 quoted key "abc" as the key abc', async () => {
        const app = await start();
        const key = `order-${randomUUID()}`;
        const first = await app.send('/orders', { key: `"${key}"`, body });
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', { key, body }), first);
        expectReplayOf(await app.send('/orders', { key: `"${key}"`, body }), first);
        expect(app.runs('/orders')).toBe(1);
      });

      it('names the unquoted key in the 409 body', async () => {
        const app = await start();
        const key = `order-${randomUUID()}`;
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;
        const duplicate = await app.send('/slow', { key: `"${key}"`, body });
        expect(duplicate.status).toBe(409);
        expect(duplicate.text).toBe(PENDING_BODY(key));
        app.gate.release();
        expectFresh(await first, 201);
      });

      it('refuses a key containing a control character with 422', async () => {
        const app = await start();
        const result = await sendWithNodeHttp(app.server.url, {
          path: '/orders',
          headers: { 'Idempotency-Key': `bad\tkey-${randomUUID()}`, 'content-type': 'application/json' },
          body: JSON.stringify(body),
        });
        expect(result.status).toBe(422);
        expect(result.headers['content-type']).toBe('application/json');
        expect(JSON.parse(result.text)).toEqual({ detail: expect.stringMatching(/control characters/) });
        expect(app.runs('/orders')).toBe(0);
      });

      it('never runs the handler for a key with raw control bytes', async () => {
        const app = await start();
        for (const byte of ['\x01', '\x1b', '\x7f']) {
          const result = await sendRawRequest(
            app.server.url,
            `POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: a${byte}b\r\n` +
              'Content-Length: 0\r\nConnection: close\r\n\r\n',
          );
          // Node's own HTTP parser refuses most control bytes (400) before any middleware sees them.
          expect([400, 422]).toContain(result.status);
        }
        expect(app.runs('/orders')).toBe(0);
      });

      it('answers 400 to several Idempotency-Key header lines instead of taking them for one key', async () => {
        const app = await start();
        for (const lines of [
          'Idempotency-Key: first\r\nIdempotency-Key: second\r\n',
          'Idempotency-Key: same\r\nIdempotency-Key: same\r\n',
          'Idempotency-Key: a, b\r\n',
          // A quote that opens no string, or one left open, must not hide the line after it.
          'Idempotency-Key: "abc\r\nIdempotency-Key: def\r\n',
          'Idempotency-Key: ab"c\r\nIdempotency-Key: d\r\n',
        ]) {
          const result = await sendRawRequest(
            app.server.url,
            `POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\n${lines}Content-Length: 0\r\nConnection: close\r\n\r\n`,
          );
          expect(result.status).toBe(400);
          expect(JSON.parse(result.text)).toEqual({
            detail:
              "'Idempotency-Key' header must be sent once, with one key (a key containing a comma must be a quoted string)",
          });
        }
        expect(app.runs('/orders')).toBe(0);
      });

      it('answers 400 to a request without the header, or with an empty one, when required', async () => {
        const app = await start({ required: true });
        expectJsonError(await app.send('/orders', { body }), 400, /'Idempotency-Key'/);
        expectJsonError(await app.send('/orders', { key: '', body }), 400, /'Idempotency-Key'/);
        expect(app.runs('/orders')).toBe(0);
        // Methods the middleware does not handle still need no key.
        expectFresh(await app.send('/orders', { method: 'PUT', body }), 201);
        expect(app.runs('/orders')).toBe(1);
      });

      it('passes a request with an empty header, or none, through to the handler every time', async () => {
        const app = await start();
        for (const key of ['', '', undefined, undefined]) {
          const result = await app.send('/orders', key === undefined ? { body } : { key, body });
          expectFresh(result, 201);
        }
        expect(app.runs('/orders')).toBe(4);
      });
    });

    describe('fingerprint', () => {
      it('answers 422 to the same key with a different body', async () => {
        const app = await start();
        const key = randomUUID();
        expectFresh(await app.send('/orders', { key, body }), 201);
        const other = await app.send('/orders', { key, body: { ...body, quantity: 3 } });
        expectJsonError(other, 422, new RegExp(`'${key}'.*different request`));
        expect(app.runs('/orders')).toBe(1);
      });

      it('answers 422 to the same key on a different path or query string', async () => {
        const app = await start();
        const key = randomUUID();
        expectFresh(await app.send('/orders?page=1', { key, body }), 201);
        expectJsonError(await app.send('/orders?page=2', { key, body }), 422, /different request/);
        expectJsonError(await app.send('/orders', { key, body }), 422, /different request/);
        expectJsonError(await app.send('/created?page=1', { key, body }), 422, /different request/);
        expect(app.runs('/orders')).toBe(1);
        expect(app.runs('/created')).toBe(0);
      });

      it('answers 422 to the same key with a different method when both are applicable', async () => {
        const app = await start();
        const key = randomUUID();
        expectFresh(await app.send('/orders', { key, body }), 201);
        expectJsonError(await app.send('/orders', { method: 'PATCH', key, body }), 422, /different request/);
        expect(app.runs('/orders')).toBe(1);
      });

      it('answers 422 to a different request while the first is still in flight', async () => {
        const app = await start();
        const key = randomUUID();
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;
        expectJsonError(await app.send('/slow', { key, body: { other: true } }), 422, /different request/);
        app.gate.release();
        expectFresh(await first, 201);
        expect(app.runs('/slow')).toBe(1);
      });

      it('fingerprints a JSON body nested deeper than the call stack goes, as the body parser accepts it', async () => {
        const app = await start();
        const key = randomUUID();
        // 40 kB: well within every body limit, 20 000 levels deep.
        const deep = (leaf: number) => ({
          key,
          headers: { 'content-type': 'application/json' },
          body: `${'['.repeat(20_000)}${leaf}${']'.repeat(20_000)}`,
        });
        const first = await app.send('/orders', deep(1));
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', deep(1)), first);
        expectJsonError(await app.send('/orders', deep(2)), 422, /different request/);
        expect(app.runs('/orders')).toBe(1);
      });

      it('replays whatever the request when fingerprint is false', async () => {
        const app = await start({ fingerprint: false });
        const key = randomUUID();
        const first = await app.send('/orders', { key, body });
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', { key, body: { something: 'else' } }), first);
        expectReplayOf(await app.send('/orders?x=1', { key, method: 'PATCH', body }), first);
        expectReplayOf(await app.send('/created', { key, body }), first);
        expect(app.runs('/orders')).toBe(1);
        expect(app.runs('/created')).toBe(0);
      });

      it('uses a custom fingerprint function instead of the built-in one', async () => {
        const seen: string[] = [];
        const app = await start({
          fingerprint: (req) => {
            const value = requestHeader(req, 'x-fingerprint') ?? '';
            seen.push(value);
            return value;
          },
        });
        const key = randomUUID();
        const first = await app.send('/orders', { key, body, headers: { 'x-fingerprint': 'one' } });
        expectFresh(first, 201);
        // Another body, same custom fingerprint: a replay.
        const replay = await app.send('/orders', {
          key,
          body: { x: 1 },
          headers: { 'x-fingerprint': 'one' },
        });
        expectReplayOf(replay, first);
        // Same body, another custom fingerprint: a mismatch.
        const other = await app.send('/orders', { key, body, headers: { 'x-fingerprint': 'two' } });
        expectJsonError(other, 422, /different request/);
        expect(seen).toEqual(['one', 'one', 'two']);
        expect(app.runs('/orders')).toBe(1);
      });

      it('fingerprints binary request bodies byte for byte', async () => {
        const app = await start();
        const key = randomUUID();
        const headers = { 'content-type': 'application/octet-stream' };
        const bytes = Buffer.concat([ALL_BYTES, Buffer.from(ALL_BYTES).reverse()]);
        const first = await app.send('/orders', { key, headers, body: bytes });
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', { key, headers, body: Buffer.from(bytes) }), first);
        const changed = Buffer.from(bytes);
        changed[300] = changed[300]! ^ 0x01;
        expectJsonError(await app.send('/orders', { key, headers, body: changed }), 422, /different request/);
        expect(app.runs('/orders')).toBe(1);
      });

      it('fingerprints a multipart form by its parts, whatever boundary each attempt drew', async () => {
        const app = await start();
        const key = randomUUID();
        // Clients encode a form again for each attempt, with a new boundary (undici's fetch, axios).
        const form = (boundary: string, file: string) => ({
          key,
          headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
          body: Buffer.concat([
            Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="item"\r\n\r\nbook\r\n`),
            Buffer.from(
              `--${boundary}\r\nContent-Disposition: form-data; name="scan"; filename="scan.bin"\r\n`,
            ),
            Buffer.from('Content-Type: application/octet-stream\r\n\r\n'),
            Buffer.from(file, 'latin1'),
            Buffer.from(`\r\n--${boundary}--\r\n`),
          ]),
        });
        const first = await app.send('/orders', form('----formdata-undici-062458384713', 'scan\x00\xff-1'));
        expectFresh(first, 201);
        expectReplayOf(
          await app.send('/orders', form('----WebKitFormBoundary7MA4YWxk', 'scan\x00\xff-1')),
          first,
        );
        const otherFile = form('----formdata-undici-901238712398', 'scan\x00\xff-2');
        expectJsonError(await app.send('/orders', otherFile), 422, /different request/);
        expect(app.runs('/orders')).toBe(1);
      });

      it('reads a quoted multipart boundary holding a comma (RFC 2046), as the boundary of each attempt', async () => {
        const app = await start();
        const key = randomUUID();
        const form = (boundary: string) => ({
          key,
          headers: { 'content-type': `multipart/form-data; boundary="${boundary}"` },
          body: Buffer.from(
            `--${boundary}\r\nContent-Disposition: form-data; name="item"\r\n\r\nbook\r\n--${boundary}--\r\n`,
          ),
        });
        const first = await app.send('/orders', form('form,1,a'));
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', form('form,2,b')), first);
        expect(app.runs('/orders')).toBe(1);
      });
    });

    describe('applicable methods', () => {
      it('leaves methods outside applicableMethods untouched', async () => {
        const app = await start();
        const key = randomUUID();
        for (const method of ['PUT', 'PUT', 'DELETE', 'GET']) {
          const result = await app.send(
            '/orders',
            method === 'GET' ? { method, key } : { method, key, body },
          );
          expectFresh(result, 201);
        }
        expect(app.runs('/orders')).toBe(4);
        // The key is still free for a method that is handled.
        expectFresh(await app.send('/orders', { key, body }), 201);
        expect(app.runs('/orders')).toBe(5);
      });

      it('accepts lower-case method names in applicableMethods', async () => {
        const app = await start({ applicableMethods: ['put', 'delete'] });
        const key = randomUUID();
        const first = await app.send('/orders', { method: 'PUT', key, body });
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', { method: 'PUT', key, body }), first);
        // POST is no longer handled.
        const other = randomUUID();
        expectFresh(await app.send('/orders', { key: other, body }), 201);
        expectFresh(await app.send('/orders', { key: other, body }), 201);
        expect(app.runs('/orders')).toBe(3);
      });
    });

    describe('what is stored', () => {
      it('does not store text/plain by default: a retry runs again', async () => {
        const app = await start();
        const key = randomUUID();
        const first = await app.send('/text', { key, body });
        expectFresh(first, 200);
        expect(first.text).toBe('run 1\nthat is all\n');
        const retry = await app.send('/text', { key, body });
        expectFresh(retry, 200);
        expect(retry.text).toBe('run 2\nthat is all\n');
        expect(app.runs('/text')).toBe(2);
      });

      it("stores text/plain with cacheableContentTypes '*' or ['text/plain']", async () => {
        for (const cacheableContentTypes of ['*', ['text/plain']] as const) {
          const app = await start({ cacheableContentTypes });
          const key = randomUUID();
          const first = await app.send('/text', { key, body });
          expectFresh(first, 200);
          expectReplayOf(await app.send('/text', { key, body }), first);
          expect(app.runs('/text')).toBe(1);
        }
      });

      it("never stores text/event-stream, even with '*', but remembers it ran: a retry gets 410", async () => {
        for (const cacheableContentTypes of [undefined, '*'] as const) {
          const app = await start(cacheableContentTypes === undefined ? {} : { cacheableContentTypes });
          const key = randomUUID();
          const first = await app.send('/events', { key, body });
          expectFresh(first, 200);
          expect(first.text).toBe('data: run 1\n\ndata: done\n\n');
          expectNotReplayable(await app.send('/events', { key, body }), key);
          expect(app.runs('/events')).toBe(1);
        }
      });

      it("runs an event stream again with unstoredResponses: 'release'", async () => {
        const app = await start({ unstoredResponses: 'release' });
        const key = randomUUID();
        expectFresh(await app.send('/events', { key, body }), 200);
        const retry = await app.send('/events', { key, body });
        expectFresh(retry, 200);
        expect(retry.text).toBe('data: run 2\n\ndata: done\n\n');
        expect(app.runs('/events')).toBe(2);
      });

      it('streams a text/event-stream response as it is written, without waiting for its end', async () => {
        const app = await start({ cacheableContentTypes: '*' });
        const key = randomUUID();
        const response = await sendHead(app.url('/live'), { key, body });
        expect(response.status).toBe(200);
        const reader = response.body!.getReader();
        // The first event arrives while the handler is still running.
        expect((await readFirstBytes(reader, 16))?.toString()).toBe('a'.repeat(16));
        app.gate.release();
        expect((await readRest(reader)).toString()).toBe('end');
        expectNotReplayable(await app.send('/live', { key, body }), key);
        expect(app.runs('/live')).toBe(1);
      });

      it('streams a response once it outgrows maxResponseBytes, and does not store it', async () => {
        const app = await start({ maxResponseBytes: 1000 });
        const key = randomUUID();
        const headers = { 'x-type': 'application/json', 'x-size': '4000' };
        const response = await sendHead(app.url('/live'), { key, body, headers });
        const reader = response.body!.getReader();
        expect((await readFirstBytes(reader, 4000))?.length).toBe(4000);
        app.gate.release();
        expect((await readRest(reader)).toString()).toBe('end');
        expectNotReplayable(await app.send('/live', { key, body, headers }), key);
        expect(app.runs('/live')).toBe(1);
      });

      it('stores application/json; charset=utf-8', async () => {
        const app = await start();
        const key = randomUUID();
        const first = await app.send('/charset', { key, body });
        expectFresh(first, 200);
        expect(first.headers.get('content-type')).toBe('application/json; charset=utf-8');
        expectReplayOf(await app.send('/charset', { key, body }), first);
        expect(app.runs('/charset')).toBe(1);
      });

      it('stores +json types such as application/problem+json, 4xx included', async () => {
        const app = await start();
        const key = randomUUID();
        const first = await app.send('/problem', { key, body });
        expectFresh(first, 400);
        expectReplayOf(await app.send('/problem', { key, body }), first);
        expect(app.runs('/problem')).toBe(1);
      });

      it('stores binary responses byte for byte when their type is cacheable', async () => {
        const app = await start({ cacheableContentTypes: ['application/octet-stream'] });
        const key = randomUUID();
        const first = await app.send('/binary', { key, body });
        expectFresh(first, 200);
        expect(first.body.equals(Buffer.concat([ALL_BYTES, Buffer.from([1])]))).toBe(true);
        expectReplayOf(await app.send('/binary', { key, body }), first);
        expect(app.runs('/binary')).toBe(1);
      });

      it('leaves the key free when the handler throws: a retry runs again', async () => {
        const app = await start();
        const key = randomUUID();
        expect((await app.send('/throw', { key, body })).status).toBe(500);
        const retry = await app.send('/throw', { key, body });
        expect(retry.status).toBe(500);
        expect(retry.headers.get(REPLAYED)).toBeNull();
        expect(app.runs('/throw')).toBe(2);
      });

      for (const [label, slowWrites] of [
        ['', false],
        [', even when the backend writes slowly', true],
      ] as const) {
        it(`sends the response a handler ended even if the handler fails afterwards${label}`, async () => {
          const app = await start(slowWrites ? { backend: slowWritesBackend(handle!.backend) } : {});
          const key = randomUUID();
          const first = await app.send('/end-then-fail', { key, body });
          expectFresh(first, 201);
          expect(first.headers.get('content-type')).toBe('application/json');
          expect(first.text).toBe('{"run":1}');
          // The response was complete when the handler failed: it stands, and is what retries get.
          expectReplayOf(await app.send('/end-then-fail', { key, body }), first);
          expect(app.runs('/end-then-fail')).toBe(1);

          const textKey = randomUUID();
          const headers = { 'x-type': 'text/plain' };
          const text = await app.send('/end-then-fail', { key: textKey, body, headers });
          expectFresh(text, 201);
          expect(text.headers.get('content-type')).toBe('text/plain');
          expect(text.text).toBe('{"run":2}');
          const again = await app.send('/end-then-fail', { key: textKey, body, headers });
          expectFresh(again, 201);
          expect(again.text).toBe('{"run":3}');
        });
      }

      it('does not store 5xx responses unless cacheServerErrors is on', async () => {
        const app = await start();
        const key = randomUUID();
        expectFresh(await app.send('/server-error', { key, body }), 500);
        const retry = await app.send('/server-error', { key, body });
        expectFresh(retry, 500);
        expect(JSON.parse(retry.text)).toEqual({ error: 'boom', run: 2 });
        expect(app.runs('/server-error')).toBe(2);

        const caching = await start({ cacheServerErrors: true });
        const first = await caching.send('/server-error', { key, body });
        expectFresh(first, 500);
        expectReplayOf(await caching.send('/server-error', { key, body }), first);
        expect(caching.runs('/server-error')).toBe(1);
      });

      // 407 is in the default list too (the engine's tests prove it), but fetch will not read a 407 from an origin.
      it('does not pin a refusal that means "not executed" on the key: 401, 403, 408, 425, 429 run again', async () => {
        const app = await start();
        for (const status of ['401', '403', '408', '425', '429']) {
          const key = randomUUID();
          const headers = { 'x-status': status };
          expectFresh(await app.send('/refuse', { key, body, headers }), Number(status));
          const retry = await app.send('/refuse', { key, body, headers });
          expectFresh(retry, Number(status));
          expect(JSON.parse(retry.text)).toMatchObject({ refused: true });
        }
        expect(app.runs('/refuse')).toBe(10);
      });

      it('stores a refusal once it is taken out of releaseStatuses, and releases a status put in', async () => {
        const app = await start({ releaseStatuses: [409] });
        const key = randomUUID();
        const first = await app.send('/refuse', { key, body, headers: { 'x-status': '429' } });
        expectReplayOf(await app.send('/refuse', { key, body, headers: { 'x-status': '429' } }), first);
        const conflict = randomUUID();
        expectFresh(await app.send('/refuse', { key: conflict, body, headers: { 'x-status': '409' } }), 409);
        expectFresh(await app.send('/refuse', { key: conflict, body, headers: { 'x-status': '409' } }), 409);
        expect(app.runs('/refuse')).toBe(3);
      });

      it('assembles a response written in several chunks and replays it byte for byte', async () => {
        const app = await start();
        const key = randomUUID();
        const first = await app.send('/chunked', { key, body });
        expectFresh(first, 201);
        expect(first.text).toBe('{"items":[1,2,3,"run-1"]}');
        const replay = await app.send('/chunked', { key, body });
        expectReplayOf(replay, first);
        expect(replay.headers.get('x-run')).toBe('1');
        expect(app.runs('/chunked')).toBe(1);
      });

      it('sends a response over maxResponseBytes complete, does not store it, and never runs it twice', async () => {
        const app = await start({ maxResponseBytes: 1000 });
        const key = randomUUID();
        const headers = { 'x-size': '50000' };
        const first = await app.send('/large', { key, body, headers });
        expectFresh(first, 200);
        expect(first.body.length).toBe(50_000);
        expect(JSON.parse(first.text)).toMatchObject({ run: 1 });
        expectNotReplayable(await app.send('/large', { key, body, headers }), key);

        // At the limit it is still stored.
        const small = randomUUID();
        const smallHeaders = { 'x-size': '1000' };
        const stored = await app.send('/large', { key: small, body, headers: smallHeaders });
        expect(stored.body.length).toBe(1000);
        expectReplayOf(await app.send('/large', { key: small, body, headers: smallHeaders }), stored);
        expect(app.runs('/large')).toBe(2);
      });

      it('does not store responses over 1 MiB by default', async () => {
        const app = await start();
        const key = randomUUID();
        const headers = { 'x-size': String(1024 * 1024 + 1) };
        const first = await app.send('/large', { key, body, headers });
        expectFresh(first, 200);
        expect(first.body.length).toBe(1024 * 1024 + 1);
        expectNotReplayable(await app.send('/large', { key, body, headers }), key);
        expect(app.runs('/large')).toBe(1);

        const exact = randomUUID();
        const exactHeaders = { 'x-size': String(1024 * 1024) };
        const stored = await app.send('/large', { key: exact, body, headers: exactHeaders });
        expectReplayOf(await app.send('/large', { key: exact, body, headers: exactHeaders }), stored);
        expect(app.runs('/large')).toBe(2);
      });
    });

    describe('scope and expiry', () => {
      it('answers 500 when the scope function throws, and never looks the key up unscoped', async () => {
        let acquires = 0;
        const real = handle!.backend;
        const counting: Backend = {
          acquire: (...args) => {
            acquires++;
            return real.acquire(...args);
          },
          complete: (...args) => real.complete(...args),
          release: (...args) => real.release(...args),
          renew: (...args) => real.renew(...args),
        };
        for (const scope of [
          () => {
            throw new Error('no tenant on this request');
          },
          () => 42 as unknown as string,
        ]) {
          const app = await start({ backend: counting, scope });
          const result = await app.send('/orders', { key: randomUUID(), body });
          expect(result.status).toBe(500);
          expect(result.headers.get(REPLAYED)).toBeNull();
          expect(app.runs('/orders')).toBe(0);
        }
        expect(acquires).toBe(0);
      });

      it('keeps two scopes apart even with the same key', async () => {
        const app = await start({ scope: (req) => requestHeader(req, 'x-tenant') });
        const key = randomUUID();
        const tenantA = await app.send('/orders', { key, body, headers: { 'x-tenant': 'a' } });
        const tenantB = await app.send('/orders', { key, body, headers: { 'x-tenant': 'b' } });
        const unscoped = await app.send('/orders', { key, body });
        for (const result of [tenantA, tenantB, unscoped]) expectFresh(result, 201);
        expect(new Set([tenantA.text, tenantB.text, unscoped.text]).size).toBe(3);
        expect(app.runs('/orders')).toBe(3);

        expectReplayOf(await app.send('/orders', { key, body, headers: { 'x-tenant': 'a' } }), tenantA);
        expectReplayOf(await app.send('/orders', { key, body, headers: { 'x-tenant': 'b' } }), tenantB);
        expectReplayOf(await app.send('/orders', { key, body }), unscoped);
        expect(app.runs('/orders')).toBe(3);
      });

      it('runs a key again once its response expired', async () => {
        // A second of expiry: the replay right after the first run must come before it ends, even on a loaded
        // machine (with 0.3 s, a slow CI run once saw the record expire before that replay).
        const app = await start({ expiry: 1 });
        const key = randomUUID();
        const first = await app.send('/orders', { key, body });
        expectFresh(first, 201);
        expectReplayOf(await app.send('/orders', { key, body }), first);
        await sleep(1300);
        const again = await app.send('/orders', { key, body });
        expectFresh(again, 201);
        expect(JSON.parse(again.text)).toMatchObject({ run: 2 });
        expectReplayOf(await app.send('/orders', { key, body }), again);
        expect(app.runs('/orders')).toBe(2);
      });

      it('still replays later with expiry: null', async () => {
        const app = await start({ expiry: null });
        const key = randomUUID();
        const first = await app.send('/orders', { key, body });
        await sleep(400);
        expectReplayOf(await app.send('/orders', { key, body }), first);
        expect(app.runs('/orders')).toBe(1);
      });
    });

    describe('error format, headers and events', () => {
      it("sends RFC 9457 problem details with errorFormat: 'problem'", async () => {
        const app = await start({ errorFormat: 'problem', enforceUuid4Formatting: true });
        const invalid = await app.send('/orders', { key: 'nope', body });
        expect(invalid.status).toBe(422);
        expect(invalid.headers.get('content-type')).toBe('application/problem+json');
        expect(JSON.parse(invalid.text)).toEqual({
          type: 'about:blank',
          title: 'Unprocessable Content',
          status: 422,
          detail: "'Idempotency-Key' header value must be formatted as a v4 UUID",
        });

        const key = randomUUID();
        const first = app.send('/slow', { key, body });
        await app.gate.started.promise;
        const conflict = await app.send('/slow', { key, body });
        expect(conflict.status).toBe(409);
        expect(conflict.headers.get('content-type')).toBe('application/problem+json');
        expect(Number(conflict.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
        expect(JSON.parse(conflict.text)).toMatchObject({
          title: 'Conflict',
          status: 409,
          detail: `Request already pending for idempotency key '${key}'`,
        });
        app.gate.release();
        expectFresh(await first, 201);
      });

      it('marks replays with the configured replayHeaderKey', async () => {
        const app = await start({ replayHeaderKey: 'X-Was-Replayed' });
        const key = randomUUID();
        const first = await app.send('/orders', { key, body });
        expectFresh(first, 201, 'X-Was-Replayed');
        const replay = await app.send('/orders', { key, body });
        expectReplayOf(replay, first, 'X-Was-Replayed');
        expect(replay.headers.get(REPLAYED)).toBeNull();
        expect(app.runs('/orders')).toBe(1);
      });

      it('reports one event per handled request, with its outcome and a hashed key', async () => {
        const events: IdempotencyEvent[] = [];
        const app = await start({ onEvent: (event) => events.push(event), required: true, maxKeyLength: 64 });
        const key = `evt-${randomUUID()}`;
        const expectLast = (outcome: string, status: number | undefined, count: number) => {
          expect(events).toHaveLength(count);
          expect(events.at(-1)).toMatchObject({ outcome, status, method: 'POST' });
          expect(events.at(-1)!.durationMs).toBeGreaterThanOrEqual(0);
        };

        await app.send('/orders', { key, body });
        expectLast('executed', 201, 1);
        await app.send('/orders', { key, body });
        expectLast('replayed', 201, 2);
        await app.send('/orders', { key, body: { other: 1 } });
        expectLast('mismatch', 422, 3);
        await app.send('/orders', { key: 'x'.repeat(65), body });
        expectLast('invalid-key', 422, 4);
        await app.send('/orders', { body });
        expectLast('missing-key', 400, 5);
        const textKey = randomUUID();
        await app.send('/text', { key: textKey, body });
        expectLast('not-stored', 200, 6);
        const slowKey = randomUUID();
        const slow = app.send('/slow', { key: slowKey, body });
        await app.gate.started.promise;
        await app.send('/slow', { key: slowKey, body });
        expectLast('conflict', 409, 7);
        app.gate.release();
        await slow;
        expectLast('executed', 201, 8);
        // Requests the middleware does not handle report nothing.
        await app.send('/orders', { method: 'GET', key });
        expect(events).toHaveLength(8);

        const hashes = events.map((event) => event.keyHash);
        for (const [i, hash] of hashes.entries()) {
          if (i === 3 || i === 4) expect(hash).toBeUndefined();
          else expect(hash).toMatch(/^[0-9a-f]{64}$/);
        }
        expect(new Set([hashes[0], hashes[1], hashes[2]]).size).toBe(1);
        expect(new Set([hashes[0], hashes[5], hashes[6]]).size).toBe(3);
        expect(hashes[6]).toBe(hashes[7]);
        // The raw key appears nowhere in what the events carry.
        const serialised = JSON.stringify(events);
        for (const raw of [key, textKey, slowKey]) expect(serialised).not.toContain(raw);
      });
    });

    describe('request bodies', () => {
      it('hands a JSON body to the app intact after the middleware read it', async () => {
        const app = await start();
        const key = randomUUID();
        const document = { b: [1, 'two', { c: null }], a: 'ünïcødé ☕', n: 1.5 };
        const first = await app.send('/echo', { key, body: document });
        expectFresh(first, 200);
        expect(JSON.parse(first.text)).toEqual(document);
        expectReplayOf(await app.send('/echo', { key, body: document }), first);
        expect(app.runs('/echo')).toBe(1);
      });

      it('hands a 2 MB binary body to the app intact after the middleware read it', async () => {
        const app = await start({ maxRequestBytes: 4 * 1024 * 1024 });
        const key = randomUUID();
        const bytes = randomBytes(2 * 1024 * 1024);
        const headers = { 'content-type': 'application/octet-stream' };
        const first = await app.send('/echo', { key, headers, body: bytes });
        expectFresh(first, 200);
        expect(first.body.length).toBe(bytes.length);
        expect(first.body.equals(bytes)).toBe(true);
        // Binary is not a stored type: the retry runs again, and reads the same bytes again.
        const retry = await app.send('/echo', { key, headers, body: bytes });
        expectFresh(retry, 200);
        expect(retry.body.equals(bytes)).toBe(true);
        expect(app.runs('/echo')).toBe(2);
      });
    });

    describe('backend failures', () => {
      it('never evicts a stored record to make room: a full MemoryBackend is a backend error', async () => {
        const events: IdempotencyEvent[] = [];
        const backend = new MemoryBackend({ maxEntries: 2 });
        const app = await start({ backend, onEvent: (event) => events.push(event) });
        const kept = [randomUUID(), randomUUID()];
        const originals = [];
        for (const key of kept) originals.push(await app.send('/orders', { key, body }));
        const refused = await app.send('/orders', { key: randomUUID(), body });
        expectJsonError(refused, 503, /unavailable/);
        expect((events.at(-1)!.error as { code?: string }).code).toBe('ERR_IDEMPOTENCY_BACKEND_FULL');
        for (const [i, key] of kept.entries())
          expectReplayOf(await app.send('/orders', { key, body }), originals[i]!);
        const open = await start({ backend, onBackendError: 'fail-open' });
        expectFresh(await open.send('/orders', { key: randomUUID(), body }), 201);
        backend.close();
      });

      for (const [kind, createBroken] of [
        ['throws', throwingBackend],
        ['rejects', rejectingBackend],
      ] as const) {
        it(`answers 503 at once, fail-closed, when the backend ${kind}`, async () => {
          const events: IdempotencyEvent[] = [];
          const app = await start({ backend: createBroken(), onEvent: (event) => events.push(event) });
          const startedAt = Date.now();
          const result = await app.send('/orders', { key: randomUUID(), body });
          expect(Date.now() - startedAt).toBeLessThan(1000);
          expectJsonError(result, 503, /unavailable/);
          expect(app.runs('/orders')).toBe(0);
          expect(events).toEqual([
            expect.objectContaining({ outcome: 'backend-error', status: 503, error: expect.any(Error) }),
          ]);
          expect((events[0]!.error as Error).cause).toBeInstanceOf(Error);
        });

        it(`runs the handler without idempotency, fail-open, when the backend ${kind}`, async () => {
          const app = await start({ backend: createBroken(), onBackendError: 'fail-open' });
          const key = randomUUID();
          expectFresh(await app.send('/orders', { key, body }), 201);
          expectFresh(await app.send('/orders', { key, body }), 201);
          expect(app.runs('/orders')).toBe(2);
        });
      }

      it('stores the response when a failed store succeeds on a later attempt', async () => {
        const real = handle!.backend;
        let failures = 1;
        const flakyStore: Backend = {
          acquire: (...args) => real.acquire(...args),
          complete: (...args) =>
            failures-- > 0 ? Promise.reject(new Error('store failed once')) : real.complete(...args),
          release: (...args) => real.release(...args),
          renew: (...args) => real.renew(...args),
        };
        const events: IdempotencyEvent[] = [];
        const app = await start({ backend: flakyStore, onEvent: (event) => events.push(event) });
        const key = randomUUID();
        const first = await app.send('/orders', { key, body });
        expectFresh(first, 201);
        expect(events).toEqual([expect.objectContaining({ outcome: 'executed', status: 201 })]);
        expectReplayOf(await app.send('/orders', { key, body }), first);
        expect(app.runs('/orders')).toBe(1);
      });

      it('still sends the response when storing it always fails, and never releases the key', async () => {
        const real = handle!.backend;
        const failingStore: Backend = {
          acquire: (...args) => real.acquire(...args),
          complete: () => Promise.reject(new Error('store failed')),
          release: (...args) => real.release(...args),
          renew: (...args) => real.renew(...args),
        };
        const events: IdempotencyEvent[] = [];
        const app = await start({
          backend: failingStore,
          lockTimeout: 1,
          onEvent: (event) => events.push(event),
        });
        const key = randomUUID();
        expectFresh(await app.send('/orders', { key, body }), 201);
        expect(events).toEqual([expect.objectContaining({ outcome: 'store-failed', status: 201 })]);
        // The handler ran: a retry meets the lock, never a second run, until the lease lapses.
        const retry = await app.send('/orders', { key, body });
        expect(retry.status).toBe(409);
        expect(app.runs('/orders')).toBe(1);
        const later = await eventually(
          () => app.send('/orders', { key, body }),
          (result) => result.status !== 409,
          4000,
        );
        expectFresh(later, 201);
        expect(app.runs('/orders')).toBe(2);
      });
    });
  });
}
