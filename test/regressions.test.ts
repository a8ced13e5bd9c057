/**
 * One test per defect of the original Python package (`asgi-idempotency-header` 0.2.0) that this port fixes
 * (SPEC §4). Each is named after what it protects and asserts the exact point where the original went wrong, so
 * that it fails on the original's behaviour.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../src/adapters/express.js';
import { type NodeIdempotencyOptions, withIdempotency } from '../src/adapters/node.js';
import { MemoryBackend } from '../src/backends/memory.js';
import { IdempotencyEngine, Ticket } from '../src/core/engine.js';
import { isUuid4 } from '../src/core/key.js';
import type { AcquireResult, Awaitable, Backend, IdempotencyRecord } from '../src/core/types.js';
import { listen, readAll, send, type TestServer } from './support/http.js';

const REPLAYED = 'idempotent-replayed';

/** One backend call as the engine made it. */
interface BackendCall {
  method: 'acquire' | 'complete' | 'release' | 'renew';
  key: string;
  args: unknown[];
}

/**
 * Wraps a real backend and records every call the engine makes. `beforeComplete` may hold `complete` back, to
 * look at the world while the store is on its way.
 */
class RecordingBackend implements Backend {
  readonly calls: BackendCall[] = [];
  beforeComplete: (() => Promise<void>) | undefined;

  constructor(readonly inner: Backend) {}

  callsFor(key: string): string[] {
    return this.calls.filter((call) => call.key === key).map((call) => call.method);
  }

  acquire(key: string, fingerprint: string, leaseMs: number): Awaitable<AcquireResult> {
    this.calls.push({ method: 'acquire', key, args: [fingerprint, leaseMs] });
    return this.inner.acquire(key, fingerprint, leaseMs);
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null): Awaitable<boolean> {
    this.calls.push({ method: 'complete', key, args: [token, record, ttlMs] });
    const hold = this.beforeComplete;
    if (hold === undefined) return this.inner.complete(key, token, record, ttlMs);
    return hold().then(() => this.inner.complete(key, token, record, ttlMs));
  }

  release(key: string, token: string): Awaitable<boolean> {
    this.calls.push({ method: 'release', key, args: [token] });
    return this.inner.release(key, token);
  }

  renew(key: string, token: string, leaseMs: number): Awaitable<boolean> {
    this.calls.push({ method: 'renew', key, args: [token, leaseMs] });
    return this.inner.renew(key, token, leaseMs);
  }
}

type Listener = (req: IncomingMessage, res: ServerResponse, body: Buffer, run: number) => unknown;

describe('regressions of the original', () => {
  const servers: TestServer[] = [];
  const backends: MemoryBackend[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((server) => server.close()));
    for (const backend of backends.splice(0)) backend.close();
  });

  function memory(): MemoryBackend {
    const backend = new MemoryBackend();
    backends.push(backend);
    return backend;
  }

  /** Serves `listener` through `withIdempotency`; the listener gets the body it read and its run number. */
  async function serve(listener: Listener, options: Partial<NodeIdempotencyOptions> = {}) {
    let runs = 0;
    const wrapped = withIdempotency(
      async (req, res) => {
        const body = await readAll(req);
        await listener(req, res, body, ++runs);
      },
      { backend: options.backend ?? memory(), onHandlerError: () => {}, ...options },
    );
    const server = await listen(createServer(wrapped));
    servers.push(server);
    return { url: server.url, runs: () => runs };
  }

  function json(res: ServerResponse, status: number, value: unknown): void {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(value));
  }

  it('an expired key runs again instead of answering 409 forever', async () => {
    const backend = memory();
    const app = await serve((_req, res, _body, run) => json(res, 201, { run }), { backend, expiry: 1 });
    const key = randomUUID();
    expect((await send(`${app.url}/orders`, { key })).status).toBe(201);
    // The in-flight marker is gone once the response is stored: only the record is held.
    expect(backend.size).toBe(1);
    expect((await send(`${app.url}/orders`, { key })).headers.get(REPLAYED)).toBe('true');

    // An expiry long enough for the replay above to come first on a busy machine, and waited out in full.
    await sleep(1100);
    const again = await send(`${app.url}/orders`, { key });
    expect(again.status).toBe(201);
    expect(again.headers.get(REPLAYED)).toBeNull();
    expect(JSON.parse(again.text)).toEqual({ run: 2 });
    expect(app.runs()).toBe(2);
  });

  it('a throwing handler does not leave the key stuck', async () => {
    const app = await serve((_req, res, _body, run) => {
      if (run === 1) throw new Error('boom');
      json(res, 201, { run });
    });
    const key = randomUUID();
    expect((await send(`${app.url}/orders`, { key })).status).toBe(500);
    const retry = await send(`${app.url}/orders`, { key });
    expect(retry.status).toBe(201);
    expect(JSON.parse(retry.text)).toEqual({ run: 2 });
  });

  it('a client that goes away mid-handler does not leave the key stuck, nor run the handler twice', async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let started!: () => void;
    const handlerStarted = new Promise<void>((resolve) => {
      started = resolve;
    });
    let closed!: () => void;
    const connectionClosed = new Promise<void>((resolve) => {
      closed = resolve;
    });
    const app = await serve(async (_req, res, _body, run) => {
      if (run === 1) {
        res.once('close', closed);
        started();
        await released;
      }
      json(res, 201, { run });
    });
    const key = randomUUID();
    const controller = new AbortController();
    const first = send(`${app.url}/orders`, { key, signal: controller.signal }).catch(
      (error: Error) => error.name,
    );
    await handlerStarted;
    controller.abort();
    expect(await first).toBe('AbortError');
    await connectionClosed;
    expect((await send(`${app.url}/orders`, { key })).status).toBe(409);
    release();
    await sleep(20);
    const retry = await send(`${app.url}/orders`, { key });
    expect(retry.status).toBe(201);
    expect(retry.headers.get(REPLAYED)).toBe('true');
    expect(JSON.parse(retry.text)).toEqual({ run: 1 });
    expect(app.runs()).toBe(1);
  });

  it("a crashed worker's lock lapses after lockTimeout", async () => {
    const backend = memory();
    const app = await serve((_req, res, _body, run) => json(res, 201, { run }), {
      backend,
      lockTimeout: 1,
    });
    const key = randomUUID();
    const body = '{"item":"book"}';

    // Learn the storage key and fingerprint the app's engine will use, from an engine whose backend only records.
    const probe = new RecordingBackend({
      acquire: () => ({ state: 'in-flight', retryAfterMs: 1 }),
      complete: () => false,
      release: () => false,
      renew: () => false,
    });
    await new IdempotencyEngine({ backend: probe }).begin(
      undefined,
      'POST',
      '/orders',
      key,
      Buffer.from(body),
      performance.now(),
    );
    const [{ key: storageKey, args }] = probe.calls as [BackendCall];
    // The crashed worker: took the lock with its lease, then died without completing, releasing or renewing.
    expect((await backend.acquire(storageKey, args[0] as string, 1000)).state).toBe('acquired');

    const blocked = await send(`${app.url}/orders`, { key, body });
    expect(blocked.status).toBe(409);
    expect(blocked.headers.get('retry-after')).toBe('1');
    expect(app.runs()).toBe(0);

    await sleep(1100);
    const retry = await send(`${app.url}/orders`, { key, body });
    expect(retry.status).toBe(201);
    expect(app.runs()).toBe(1);
    expect((await send(`${app.url}/orders`, { key, body })).headers.get(REPLAYED)).toBe('true');
  });

  it("a live worker's lock does not lapse: its lease is renewed while the handler runs", async () => {
    const recording = new RecordingBackend(memory());
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    const app = await serve(
      async (_req, res, _body, run) => {
        await released;
        json(res, 201, { run });
      },
      { backend: recording, lockTimeout: 1 },
    );
    const key = randomUUID();
    const first = send(`${app.url}/orders`, { key });
    await sleep(2200);
    expect((await send(`${app.url}/orders`, { key })).status).toBe(409);
    release();
    expect((await first).status).toBe(201);
    expect(app.runs()).toBe(1);
    expect(recording.calls.filter((call) => call.method === 'renew').length).toBeGreaterThanOrEqual(2);
  });

  it('the response is stored in one atomic write', async () => {
    const recording = new RecordingBackend(memory());
    let letStoreFinish!: () => void;
    const storeHeld = new Promise<void>((resolve) => {
      letStoreFinish = resolve;
    });
    let storeStarted!: () => void;
    const storing = new Promise<void>((resolve) => {
      storeStarted = resolve;
    });
    recording.beforeComplete = () => {
      storeStarted();
      return storeHeld;
    };
    const app = await serve(
      (_req, res, _body, run) => {
        res.writeHead(201, { 'content-type': 'application/json', location: `/orders/${run}` });
        res.write('{"run":');
        res.end(`${run}}`);
      },
      { backend: recording },
    );
    const key = randomUUID();
    let answered = false;
    const first = send(`${app.url}/orders`, { key }).then((result) => {
      answered = true;
      return result;
    });
    await storing;

    // While the one write is on its way, others see the key in flight: never a half-written record.
    for (let i = 0; i < 5; i++) {
      const during = await send(`${app.url}/orders`, { key });
      expect(during.status).toBe(409);
      expect(during.text).toBe(`{"detail":"Request already pending for idempotency key '${key}'"}`);
    }
    // The response is stored before it is sent.
    expect(answered).toBe(false);

    letStoreFinish();
    const original = await first;
    expect(original.status).toBe(201);
    for (let i = 0; i < 5; i++) {
      const after = await send(`${app.url}/orders`, { key });
      expect(after.status).toBe(201);
      expect(after.headers.get(REPLAYED)).toBe('true');
      expect(after.headers.get('location')).toBe('/orders/1');
      expect(after.text).toBe('{"run":1}');
    }

    // Exactly one write stored status, headers, body and the expiry together, and ended the lock with it.
    const storageKey = recording.calls[0]!.key;
    expect(recording.callsFor(storageKey).filter((method) => method !== 'acquire')).toEqual(['complete']);
    const complete = recording.calls.find((call) => call.method === 'complete')!;
    const [, record, ttlMs] = complete.args as [string, IdempotencyRecord, number];
    expect(ttlMs).toBe(86_400_000);
    expect(record.response!.status).toBe(201);
    expect(record.response!.headers).toContainEqual(['location', '/orders/1']);
    expect(Buffer.from(record.response!.body).toString()).toBe('{"run":1}');
    expect(app.runs()).toBe(1);
  });

  describe('streamed bodies are assembled and release is idempotent', () => {
    async function streamed(contentType: string) {
      const recording = new RecordingBackend(memory());
      const app = await serve(
        async (_req, res, _body, run) => {
          res.writeHead(200, { 'content-type': contentType });
          for (const part of ['{"parts":[', '"a",', '"b",', `"run-${run}"]}`]) {
            res.write(part);
            await sleep(5);
          }
          res.end();
        },
        { backend: recording },
      );
      return { recording, app };
    }

    it('stores a JSON response written in chunks once, whole, and replays it', async () => {
      const { recording, app } = await streamed('application/json');
      const key = randomUUID();
      const first = await send(`${app.url}/stream`, { key });
      expect(first.text).toBe('{"parts":["a","b","run-1"]}');
      const replay = await send(`${app.url}/stream`, { key });
      expect(replay.headers.get(REPLAYED)).toBe('true');
      expect(replay.body.equals(first.body)).toBe(true);
      const writes = recording.calls.filter((call) => call.method !== 'acquire' && call.method !== 'renew');
      expect(writes.map((call) => call.method)).toEqual(['complete']);
      const record = writes[0]!.args[1] as IdempotencyRecord;
      expect(Buffer.from(record.response!.body).toString()).toBe('{"parts":["a","b","run-1"]}');
      expect(app.runs()).toBe(1);
    });

    it('releases a streamed response that is not stored exactly once', async () => {
      const { recording, app } = await streamed('text/plain');
      const key = randomUUID();
      expect((await send(`${app.url}/stream`, { key })).text).toBe('{"parts":["a","b","run-1"]}');
      expect(recording.calls.filter((call) => call.method === 'release')).toHaveLength(1);
      const retry = await send(`${app.url}/stream`, { key });
      expect(retry.text).toBe('{"parts":["a","b","run-2"]}');
      expect(recording.calls.filter((call) => call.method === 'complete')).toHaveLength(0);
      expect(app.runs()).toBe(2);
    });

    it('a second release of the same lock is harmless, in the backend and in the engine', async () => {
      const backend = memory();
      const acquired = backend.acquire('k', 'f', 10_000);
      expect(acquired.state).toBe('acquired');
      const token = (acquired as { token: string }).token;
      expect(backend.release('k', token)).toBe(true);
      expect(() => backend.release('k', token)).not.toThrow();
      expect(backend.release('k', token)).toBe(false);
      // A stale release must not free the key for its next holder.
      const next = backend.acquire('k', 'f', 10_000);
      expect(next.state).toBe('acquired');
      expect(backend.release('k', token)).toBe(false);
      expect(backend.acquire('k', 'f', 10_000).state).toBe('in-flight');

      const recording = new RecordingBackend(memory());
      const engine = new IdempotencyEngine({ backend: recording });
      const ticket = await engine.begin(undefined, 'POST', '/x', randomUUID(), undefined, performance.now());
      expect(ticket).toBeInstanceOf(Ticket);
      await engine.fail(ticket as Ticket);
      await engine.fail(ticket as Ticket);
      await engine.finish(ticket as Ticket, { status: 200, headers: [], body: new Uint8Array() });
      expect(recording.calls.map((call) => call.method)).toEqual(['acquire', 'release']);
    });
  });

  it('application/json; charset=utf-8 is JSON', async () => {
    for (const contentType of [
      'application/json; charset=utf-8',
      'Application/JSON;charset=UTF-8',
      'application/vnd.api+json; charset=utf-8',
    ]) {
      const app = await serve((_req, res, _body, run) => {
        res.writeHead(200, { 'content-type': contentType });
        res.end(JSON.stringify({ run }));
      });
      const key = randomUUID();
      await send(`${app.url}/orders`, { key });
      const replay = await send(`${app.url}/orders`, { key });
      expect([contentType, replay.headers.get(REPLAYED)]).toEqual([contentType, 'true']);
      expect(replay.text).toBe('{"run":1}');
      expect(app.runs()).toBe(1);
    }
  });

  it('the v4 check refuses nil, v1 and odd forms', async () => {
    const v4 = randomUUID();
    for (const key of [
      '00000000-0000-0000-0000-000000000000',
      'c232ab00-9414-11ec-b3c8-9e6bdeced846', // v1
      '1b9d6bcd-bbfd-3b2d-9b5d-ab8dfbbd4bed', // v3
      '9b2f3c4e-8a1b-5d6c-9e7f-0a1b2c3d4e5f', // v5
      `{${v4}}`,
      `urn:uuid:${v4}`,
      `${v4.slice(0, 19)}7${v4.slice(20)}`, // NCS variant
      `${v4.slice(0, 19)}c${v4.slice(20)}`, // Microsoft variant
      `${v4} `,
      `${v4}0`,
      v4.replaceAll('-', '_'),
      `${v4.slice(0, 8)}${v4.slice(9)}`, // one hyphen missing
      'g'.repeat(32),
    ]) {
      expect([key, isUuid4(key)]).toEqual([key, false]);
    }
    expect(isUuid4(v4)).toBe(true);
    expect(isUuid4(v4.replaceAll('-', ''))).toBe(true);

    const app = await serve((_req, res, _body, run) => json(res, 201, { run }), {
      enforceUuid4Formatting: true,
    });
    const nil = await send(`${app.url}/orders`, { key: '00000000-0000-0000-0000-000000000000' });
    expect(nil.status).toBe(422);
    expect(nil.text).toBe(`{"detail":"'Idempotency-Key' header value must be formatted as a v4 UUID"}`);
    const v1 = await send(`${app.url}/orders`, { key: 'c232ab00-9414-11ec-b3c8-9e6bdeced846' });
    expect(v1.status).toBe(422);
    expect((await send(`${app.url}/orders`, { key: v4 })).status).toBe(201);
    expect(app.runs()).toBe(1);
  });

  it('keys are fingerprinted and scoped', async () => {
    const app = await serve(
      (req, res, body, run) => json(res, 201, { run, url: req.url, body: body.toString() }),
      { scope: (req) => req.headers['x-tenant'] as string | undefined },
    );
    const key = randomUUID();
    const first = await send(`${app.url}/orders`, { key, body: { amount: 10 } });
    expect(first.status).toBe(201);
    // Same key, another endpoint or another body: refused, not answered with the first request's response.
    for (const [path, body] of [
      ['/refunds', { amount: 10 }],
      ['/orders', { amount: 99 }],
    ] as const) {
      const other = await send(`${app.url}${path}`, { key, body });
      expect(other.status).toBe(422);
      expect(other.headers.get(REPLAYED)).toBeNull();
      expect(other.text).not.toContain('"run"');
    }
    // Same key from another tenant: its own request, never the first tenant's response.
    const tenant = await send(`${app.url}/orders`, {
      key,
      body: { amount: 10 },
      headers: { 'x-tenant': 't2' },
    });
    expect(tenant.status).toBe(201);
    expect(tenant.headers.get(REPLAYED)).toBeNull();
    expect(JSON.parse(tenant.text)).toMatchObject({ run: 2 });
    expect(app.runs()).toBe(2);
  });

  it('redis key names are namespaced', async () => {
    const recording = new RecordingBackend(memory());
    const app = express();
    app.use(
      idempotencyHeader({
        backend: recording,
        scope: (req) => req.get('x-scope'),
        fingerprint: false,
      }),
    );
    let runs = 0;
    app.post('/orders', (_req, res) => {
      runs++;
      res.status(201).json({ run: runs });
    });
    const server = await listen(createServer(app));
    servers.push(server);

    const pairs: [scope: string | undefined, key: string][] = [
      ['ab', 'c'],
      ['a', 'bc'],
      ['a:b', 'c'],
      ['a', 'b:c'],
      ['a', 'c'],
      ['', 'c'],
      [undefined, 'c'],
      [undefined, '1:a:c'],
      [undefined, '-c'],
      ['1:a', 'c'],
    ];
    for (const [scope, key] of pairs) {
      const result = await send(`${server.url}/orders`, {
        key,
        ...(scope === undefined ? {} : { headers: { 'x-scope': scope } }),
      });
      expect([scope, key, result.status, result.headers.get(REPLAYED)]).toEqual([scope, key, 201, null]);
    }
    const storageKeys = recording.calls.filter((call) => call.method === 'acquire').map((call) => call.key);
    expect(storageKeys).toHaveLength(pairs.length);
    expect(new Set(storageKeys).size).toBe(pairs.length);
    expect(runs).toBe(pairs.length);
  });

  it('replays keep the original bytes and headers such as Location', async () => {
    // Not canonical JSON: spacing, key order, escapes and a trailing newline a re-serialisation would lose.
    const original = '{ "z": 1,  "a": "caf\\u00e9 \u2615", "n": 1.50 }\n';
    const app = await serve((_req, res, _body, run) => {
      res.writeHead(201, {
        'content-type': 'application/json',
        location: `/orders/${run}`,
        'cache-control': 'no-store',
        'content-language': 'fr',
        link: '</orders>; rel="collection"',
        'x-request-run': String(run),
        'set-cookie': ['session=secret; HttpOnly'],
      });
      res.end(original);
    });
    const key = randomUUID();
    const first = await send(`${app.url}/orders`, { key });
    const replay = await send(`${app.url}/orders`, { key });
    expect(replay.status).toBe(201);
    expect(replay.headers.get(REPLAYED)).toBe('true');
    expect(replay.body.equals(Buffer.from(original))).toBe(true);
    expect(replay.body.equals(first.body)).toBe(true);
    for (const [name, value] of [
      ['location', '/orders/1'],
      ['content-type', 'application/json'],
      ['cache-control', 'no-store'],
      ['content-language', 'fr'],
      ['link', '</orders>; rel="collection"'],
      ['x-request-run', '1'],
      ['content-length', String(Buffer.byteLength(original))],
    ]) {
      expect([name, replay.headers.get(name!)]).toEqual([name, value]);
    }
    expect(replay.headers.getSetCookie()).toEqual([]);
    expect(app.runs()).toBe(1);
  });
});
