import { spawn } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { type BeginResult, IdempotencyEngine, Ticket } from '../../src/core/engine.js';
import { IdempotencyError } from '../../src/core/errors.js';
import { computeFingerprint } from '../../src/core/fingerprint.js';
import type { IdempotencyEvent, IdempotencyOptions } from '../../src/core/options.js';
import type { EngineReply } from '../../src/core/responses.js';
import type { Backend, IdempotencyRecord, StoredResponse } from '../../src/core/types.js';

const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** The request object handed to `scope` and `fingerprint`; the engine never looks inside it. */
interface FakeRequest {
  tenant?: string;
  signature?: string;
}

/** Counts every backend call and lets a test replace any method. */
class SpyBackend implements Backend {
  readonly calls = { acquire: 0, complete: 0, release: 0, renew: 0 };
  readonly completions: { key: string; token: string; record: IdempotencyRecord; ttlMs: number | null }[] =
    [];
  readonly leases: number[] = [];

  constructor(
    readonly inner: MemoryBackend = new MemoryBackend(),
    readonly overrides: Partial<Backend> = {},
  ) {}

  acquire(key: string, fingerprint: string, leaseMs: number) {
    this.calls.acquire++;
    this.leases.push(leaseMs);
    return (this.overrides.acquire ?? this.inner.acquire.bind(this.inner))(key, fingerprint, leaseMs);
  }

  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null) {
    this.calls.complete++;
    this.completions.push({ key, token, record, ttlMs });
    return (this.overrides.complete ?? this.inner.complete.bind(this.inner))(key, token, record, ttlMs);
  }

  release(key: string, token: string) {
    this.calls.release++;
    return (this.overrides.release ?? this.inner.release.bind(this.inner))(key, token);
  }

  renew(key: string, token: string, leaseMs: number) {
    this.calls.renew++;
    return (this.overrides.renew ?? this.inner.renew.bind(this.inner))(key, token, leaseMs);
  }
}

const backends: MemoryBackend[] = [];

afterEach(() => {
  for (const backend of backends.splice(0)) backend.close();
});

function memory(): MemoryBackend {
  const backend = new MemoryBackend();
  backends.push(backend);
  return backend;
}

interface Harness {
  engine: IdempotencyEngine<FakeRequest>;
  events: IdempotencyEvent[];
  spy: SpyBackend;
}

function setup(
  options: Partial<IdempotencyOptions<FakeRequest>> = {},
  overrides: Partial<Backend> = {},
): Harness {
  const events: IdempotencyEvent[] = [];
  const spy = new SpyBackend(memory(), overrides);
  const engine = new IdempotencyEngine<FakeRequest>({
    backend: spy,
    onEvent: (event) => events.push(event),
    ...options,
  });
  return { engine, events, spy };
}

const BODY = Buffer.from('{"amount":10}');

function begin(
  engine: IdempotencyEngine<FakeRequest>,
  key: string,
  {
    req = {},
    method = 'POST',
    url = '/orders',
    body = BODY,
  }: { req?: FakeRequest; method?: string; url?: string; body?: Uint8Array } = {},
): Promise<BeginResult> {
  return Promise.resolve(engine.begin(req, method, url, key, body, performance.now()));
}

async function beginTicket(
  engine: IdempotencyEngine<FakeRequest>,
  key: string,
  req: FakeRequest = {},
): Promise<Ticket> {
  const result = await begin(engine, key, { req });
  expect(result).toBeInstanceOf(Ticket);
  return result as Ticket;
}

async function beginReply(
  engine: IdempotencyEngine<FakeRequest>,
  key: string,
  request: Parameters<typeof begin>[2] = {},
): Promise<EngineReply> {
  const result = await begin(engine, key, request);
  expect(result.kind).toBe('reply');
  return result as EngineReply;
}

function response(status = 201, body = '{"id":"ord_1"}', contentType = 'application/json'): StoredResponse {
  return {
    status,
    headers: [
      ['content-type', contentType],
      ['location', '/orders/ord_1'],
      ['x-multi', 'a'],
      ['x-multi', 'b'],
    ],
    body: Buffer.from(body),
  };
}

const text = (reply: EngineReply) => Buffer.from(reply.body).toString('utf8');
const sha256 = (value: string) => createHash('sha256').update(value).digest('hex');

describe('IdempotencyEngine', () => {
  describe('begin', () => {
    it('takes the lock of a free key and returns a ticket', async () => {
      const { engine, spy } = setup();
      const ticket = await beginTicket(engine, 'k1');
      expect(ticket.kind).toBe('proceed');
      expect(ticket.settled).toBe(false);
      expect(ticket.token).toEqual(expect.any(String));
      expect(ticket.method).toBe('POST');
      expect(ticket.fingerprint).toBe(computeFingerprint('POST', '/orders', BODY));
      expect(spy.calls.acquire).toBe(1);
      expect(spy.leases).toEqual([60_000]);
      engine.release(ticket, undefined);
    });

    it('answers synchronously with a synchronous backend', () => {
      const { engine } = setup();
      const result = engine.begin({}, 'POST', '/orders', 'sync', BODY, performance.now());
      expect(result).toBeInstanceOf(Ticket);
      engine.release(result as Ticket, undefined);
    });

    it('passes the lease in milliseconds to the backend', async () => {
      const { engine, spy } = setup({ lockTimeout: 2.5 });
      const ticket = await beginTicket(engine, 'lease');
      expect(spy.leases).toEqual([2500]);
      engine.release(ticket, undefined);
    });

    it('answers 409 with retry-after and the exact body while the first request is in flight', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'order-7');
      const reply = await beginReply(engine, 'order-7');
      expect(reply.status).toBe(409);
      expect(reply.replayed).toBe(false);
      expect(reply.headers).toEqual([
        ['content-type', 'application/json'],
        ['retry-after', '60'],
      ]);
      expect(text(reply)).toBe(`{"detail":"Request already pending for idempotency key 'order-7'"}`);
      expect(events.map((event) => event.outcome)).toEqual(['conflict']);
      expect(events[0]!.status).toBe(409);
      engine.release(ticket, undefined);
    });

    it('rounds retry-after up to whole seconds, at least 1', async () => {
      const { engine } = setup({ lockTimeout: 0.05 });
      const ticket = await beginTicket(engine, 'short');
      const reply = await beginReply(engine, 'short');
      expect(reply.headers).toContainEqual(['retry-after', '1']);
      engine.release(ticket, undefined);

      const { engine: other } = setup({ lockTimeout: 2.2 });
      const held = await beginTicket(other, 'fractional');
      expect((await beginReply(other, 'fractional')).headers).toContainEqual(['retry-after', '3']);
      other.release(held, undefined);
    });

    it('JSON-escapes the key in the 409 body', async () => {
      const { engine } = setup();
      const key = 'quote " and \\ backslash';
      const ticket = await beginTicket(engine, key);
      const reply = await beginReply(engine, key);
      expect(JSON.parse(text(reply))).toEqual({
        detail: `Request already pending for idempotency key '${key}'`,
      });
      engine.release(ticket, undefined);
    });

    it('answers 409 as problem details when errorFormat is problem', async () => {
      const { engine } = setup({ errorFormat: 'problem' });
      const ticket = await beginTicket(engine, 'p');
      const reply = await beginReply(engine, 'p');
      expect(reply.headers).toEqual([
        ['content-type', 'application/problem+json'],
        ['retry-after', '60'],
      ]);
      expect(JSON.parse(text(reply))).toEqual({
        type: 'about:blank',
        title: 'Conflict',
        status: 409,
        detail: "Request already pending for idempotency key 'p'",
      });
      engine.release(ticket, undefined);
    });

    it('replays a committed response with its status, headers and exact body bytes', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'replay-me');
      const stored = response(201, '{ "id" : "ord_1",\n  "note": "kept as sent" }');
      await engine.commit(ticket, stored);
      const reply = await beginReply(engine, 'replay-me');
      expect(reply.replayed).toBe(true);
      expect(reply.status).toBe(201);
      expect(reply.headers).toEqual(stored.headers);
      expect(Buffer.from(reply.body).equals(Buffer.from(stored.body))).toBe(true);
      expect(events.map((event) => event.outcome)).toEqual(['executed', 'replayed']);
      expect(events[1]!.status).toBe(201);
    });

    it('replays again and again', async () => {
      const { engine } = setup();
      const ticket = await beginTicket(engine, 'many');
      await engine.commit(ticket, response());
      for (let i = 0; i < 3; i++) expect((await beginReply(engine, 'many')).replayed).toBe(true);
    });

    describe('answers 422 to a different request under the same key', () => {
      const variants: [string, Parameters<typeof begin>[2]][] = [
        ['another method', { method: 'PATCH' }],
        ['another path', { url: '/refunds' }],
        ['another query string', { url: '/orders?dry_run=1' }],
        ['another body', { body: Buffer.from('{"amount":11}') }],
      ];

      it.each(variants)('%s, while the first is completed', async (_, request) => {
        const { engine, events } = setup();
        await engine.commit(await beginTicket(engine, 'used'), response());
        const reply = await beginReply(engine, 'used', request);
        expect(reply.status).toBe(422);
        expect(reply.replayed).toBe(false);
        expect(text(reply)).toBe(
          `{"detail":"Idempotency key 'used' was already used for a different request"}`,
        );
        expect(events.map((event) => event.outcome)).toEqual(['executed', 'mismatch']);
      });

      it.each(variants)('%s, while the first is in flight', async (_, request) => {
        const { engine } = setup();
        const ticket = await beginTicket(engine, 'busy');
        const reply = await beginReply(engine, 'busy', request);
        expect(reply.status).toBe(422);
        expect(text(reply)).toBe(
          `{"detail":"Idempotency key 'busy' was already used for a different request"}`,
        );
        engine.release(ticket, undefined);
      });
    });

    it('replays whatever the request when fingerprint is false', async () => {
      const { engine, spy } = setup({ fingerprint: false });
      const ticket = await beginTicket(engine, 'nofp');
      expect(ticket.fingerprint).toBe('');
      await engine.commit(ticket, response());
      const reply = await beginReply(engine, 'nofp', {
        method: 'PATCH',
        url: '/elsewhere',
        body: Buffer.from('x'),
      });
      expect(reply.replayed).toBe(true);
      expect(spy.completions[0]!.record.fingerprint).toBe('');
    });

    it('uses a fingerprint function in place of the built-in one', async () => {
      const { engine } = setup({ fingerprint: (req) => req.signature ?? 'none' });
      const ticket = await beginTicket(engine, 'custom', { signature: 'sig-1' });
      expect(ticket.fingerprint).toBe('sig-1');
      await engine.commit(ticket, response());
      expect(
        (await beginReply(engine, 'custom', { req: { signature: 'sig-1' }, url: '/other' })).replayed,
      ).toBe(true);
      expect((await beginReply(engine, 'custom', { req: { signature: 'sig-2' } })).status).toBe(422);
    });
  });

  describe('commit', () => {
    it('stores the record with the expiry in milliseconds and the fingerprint', async () => {
      const { engine, spy } = setup({ expiry: 10 });
      const ticket = await beginTicket(engine, 'ttl');
      const before = Date.now();
      const stored = response();
      await engine.commit(ticket, stored);
      expect(spy.completions).toHaveLength(1);
      const { key, token, record, ttlMs } = spy.completions[0]!;
      expect(key).toBe(ticket.storageKey);
      expect(token).toBe(ticket.token);
      expect(ttlMs).toBe(10_000);
      expect(record.fingerprint).toBe(ticket.fingerprint);
      expect(record.response).toBe(stored);
      expect(record.createdAt).toBeGreaterThanOrEqual(before);
      expect(record.createdAt).toBeLessThanOrEqual(Date.now());
    });

    it('stores forever with expiry: null', async () => {
      const { engine, spy } = setup({ expiry: null });
      await engine.commit(await beginTicket(engine, 'forever'), response());
      expect(spy.completions[0]!.ttlMs).toBeNull();
    });

    it('reports executed once with the status', async () => {
      const { engine, events } = setup();
      await engine.commit(await beginTicket(engine, 'exec'), response(201));
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({ outcome: 'executed', method: 'POST', status: 201 });
      expect(events[0]!.durationMs).toBeGreaterThanOrEqual(0);
    });

    it('is idempotent: a second commit or a later release does nothing', async () => {
      const { engine, events, spy } = setup();
      const ticket = await beginTicket(engine, 'twice');
      await engine.commit(ticket, response(201, '{"first":true}'));
      expect(ticket.settled).toBe(true);
      await engine.commit(ticket, response(200, '{"second":true}'));
      await engine.release(ticket, 500);
      expect(spy.calls.complete).toBe(1);
      expect(spy.calls.release).toBe(0);
      expect(events.map((event) => event.outcome)).toEqual(['executed']);
      expect(text(await beginReply(engine, 'twice'))).toBe('{"first":true}');
    });

    it('resolves, reports backend-error and frees the key when the backend rejects the write', async () => {
      const failure = new Error('connection reset');
      const { engine, events, spy } = setup({}, { complete: () => Promise.reject(failure) });
      const ticket = await beginTicket(engine, 'store-fails');
      await expect(Promise.resolve(engine.commit(ticket, response()))).resolves.toBeUndefined();
      expect(events).toHaveLength(1);
      expect(events[0]!.outcome).toBe('backend-error');
      expect(events[0]!.status).toBe(201);
      const error = events[0]!.error as IdempotencyError;
      expect(error).toBeInstanceOf(IdempotencyError);
      expect(error.code).toBe('ERR_IDEMPOTENCY_BACKEND');
      expect(error.cause).toBe(failure);
      expect(spy.calls.release).toBe(1);
      expect(await begin(engine, 'store-fails')).toBeInstanceOf(Ticket);
    });

    it('does not throw and frees the key when the backend throws synchronously', async () => {
      const failure = new Error('sync failure');
      const { engine, events } = setup(
        {},
        {
          complete: () => {
            throw failure;
          },
        },
      );
      const ticket = await beginTicket(engine, 'store-throws');
      expect(() => engine.commit(ticket, response())).not.toThrow();
      await sleep(0);
      expect(events.map((event) => event.outcome)).toEqual(['backend-error']);
      expect((events[0]!.error as IdempotencyError).cause).toBe(failure);
      expect(await begin(engine, 'store-throws')).toBeInstanceOf(Ticket);
    });

    it('resolves even when freeing the key after a failed write fails too', async () => {
      const { engine, events } = setup(
        {},
        {
          complete: () => Promise.reject(new Error('write')),
          release: () => Promise.reject(new Error('release')),
        },
      );
      const ticket = await beginTicket(engine, 'both-fail');
      await expect(Promise.resolve(engine.commit(ticket, response()))).resolves.toBeUndefined();
      expect(events.map((event) => event.outcome)).toEqual(['backend-error']);
    });

    it('reports lease-lost when the backend refuses the fenced write', async () => {
      const { engine, events } = setup({}, { complete: () => false });
      const ticket = await beginTicket(engine, 'lost');
      await engine.commit(ticket, response(200));
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({ outcome: 'lease-lost', status: 200 });
      expect(events[0]!.error).toBeUndefined();
    });

    it('reports lease-lost when another request took over a lapsed lease', async () => {
      const { engine, events } = setup({ lockTimeout: 0.05 }, { renew: () => false });
      const first = await beginTicket(engine, 'lapsed');
      await sleep(80);
      const second = await beginTicket(engine, 'lapsed');
      await engine.commit(first, response(201, '{"first":true}'));
      await engine.commit(second, response(201, '{"second":true}'));
      expect(events.map((event) => event.outcome)).toEqual(['lease-lost', 'executed']);
      expect(text(await beginReply(engine, 'lapsed'))).toBe('{"second":true}');
    });
  });

  describe('release', () => {
    it('frees the key so that a retry runs again', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'free-me');
      await engine.release(ticket, 500);
      expect(ticket.settled).toBe(true);
      const retry = await begin(engine, 'free-me');
      expect(retry).toBeInstanceOf(Ticket);
      expect(events[0]).toMatchObject({ outcome: 'not-stored', status: 500 });
      engine.release(retry as Ticket, undefined);
    });

    it('reports not-stored with no status when no response was sent', async () => {
      const { engine, events } = setup();
      await engine.release(await beginTicket(engine, 'gone'), undefined);
      expect(events).toEqual([expect.objectContaining({ outcome: 'not-stored', status: undefined })]);
    });

    it('is idempotent: a second release or a later commit does nothing', async () => {
      const { engine, events, spy } = setup();
      const ticket = await beginTicket(engine, 'release-twice');
      await engine.release(ticket, 500);
      const next = await beginTicket(engine, 'release-twice');
      await engine.release(ticket, 500);
      await engine.commit(ticket, response());
      expect(spy.calls.release).toBe(1);
      expect(spy.calls.complete).toBe(0);
      expect(events.map((event) => event.outcome)).toEqual(['not-stored']);
      expect((await beginReply(engine, 'release-twice')).status).toBe(409);
      engine.release(next, undefined);
    });

    it('resolves and reports backend-error when the backend fails', async () => {
      const failure = new Error('gone');
      const { engine, events } = setup({}, { release: () => Promise.reject(failure) });
      const ticket = await beginTicket(engine, 'release-fails');
      await expect(Promise.resolve(engine.release(ticket, 500))).resolves.toBeUndefined();
      expect(events).toHaveLength(1);
      expect(events[0]!.outcome).toBe('backend-error');
      expect((events[0]!.error as IdempotencyError).cause).toBe(failure);
    });

    it('does not throw when the backend throws synchronously', async () => {
      const { engine, events } = setup(
        {},
        {
          release: () => {
            throw new Error('sync');
          },
        },
      );
      const ticket = await beginTicket(engine, 'release-throws');
      expect(() => engine.release(ticket, 500)).not.toThrow();
      expect(events.map((event) => event.outcome)).toEqual(['backend-error']);
    });
  });

  describe('isStorable', () => {
    it('stores JSON responses below 500', () => {
      const { engine } = setup();
      for (const status of [200, 201, 204, 301, 400, 404, 409, 422, 499]) {
        expect(engine.isStorable(status, 'application/json'), String(status)).toBe(true);
      }
    });

    it('does not store 5xx responses unless cacheServerErrors', () => {
      const { engine } = setup();
      for (const status of [500, 502, 503, 599])
        expect(engine.isStorable(status, 'application/json')).toBe(false);
      const { engine: caching } = setup({ cacheServerErrors: true });
      for (const status of [500, 502, 503, 599])
        expect(caching.isStorable(status, 'application/json')).toBe(true);
    });

    it('respects cacheableContentTypes', () => {
      const { engine } = setup();
      expect(engine.isStorable(200, 'text/plain')).toBe(false);
      expect(engine.isStorable(200, undefined)).toBe(false);
      expect(engine.isStorable(200, 'application/problem+json')).toBe(true);
      const { engine: any } = setup({ cacheableContentTypes: '*' });
      expect(any.isStorable(200, 'text/plain')).toBe(true);
      expect(any.isStorable(200, 'text/event-stream')).toBe(false);
      expect(any.isStorable(500, 'text/plain')).toBe(false);
    });

    it('exposes maxResponseBytes', () => {
      expect(setup().engine.maxResponseBytes).toBe(1_048_576);
      expect(setup({ maxResponseBytes: 10 }).engine.maxResponseBytes).toBe(10);
    });
  });

  describe('backend failures on acquire', () => {
    const failures: [string, (error: Error) => Backend['acquire']][] = [
      [
        'throws synchronously',
        (error) => () => {
          throw error;
        },
      ],
      ['rejects', (error) => () => Promise.reject(error)],
    ];

    it.each(failures)('answers 503 fail-closed when acquire %s', async (_, failing) => {
      const failure = new Error('ECONNREFUSED');
      const { engine, events } = setup({}, { acquire: failing(failure) });
      const reply = await beginReply(engine, 'down');
      expect(reply.status).toBe(503);
      expect(reply.replayed).toBe(false);
      expect(reply.headers).toEqual([['content-type', 'application/json']]);
      expect(text(reply)).toBe('{"detail":"Idempotency backend unavailable; retry later"}');
      expect(events).toHaveLength(1);
      expect(events[0]!.outcome).toBe('backend-error');
      expect(events[0]!.status).toBe(503);
      const error = events[0]!.error as IdempotencyError;
      expect(error).toBeInstanceOf(IdempotencyError);
      expect(error.code).toBe('ERR_IDEMPOTENCY_BACKEND');
      expect(error.cause).toBe(failure);
    });

    it.each(failures)('passes through fail-open when acquire %s', async (_, failing) => {
      const failure = new Error('ECONNREFUSED');
      const { engine, events } = setup({ onBackendError: 'fail-open' }, { acquire: failing(failure) });
      expect(await begin(engine, 'down')).toEqual({ kind: 'pass' });
      expect(events).toHaveLength(1);
      expect(events[0]!.outcome).toBe('backend-error');
      expect(events[0]!.status).toBeUndefined();
      expect((events[0]!.error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND');
      expect((events[0]!.error as IdempotencyError).cause).toBe(failure);
    });

    it('reports an IdempotencyError thrown by the backend as it is', async () => {
      const failure = new IdempotencyError('ERR_IDEMPOTENCY_BACKEND', 'Redis script failed');
      const { engine, events } = setup({}, { acquire: () => Promise.reject(failure) });
      await beginReply(engine, 'own-error');
      expect(events[0]!.error).toBe(failure);
    });

    it('answers 503 as problem details when errorFormat is problem', async () => {
      const { engine } = setup({ errorFormat: 'problem' }, { acquire: () => Promise.reject(new Error('x')) });
      const reply = await beginReply(engine, 'down');
      expect(reply.headers).toEqual([['content-type', 'application/problem+json']]);
      expect(JSON.parse(text(reply))).toMatchObject({ status: 503, title: 'Service Unavailable' });
    });
  });

  describe('lease renewal', () => {
    it('renews the lease while a ticket is open, and stops after commit', async () => {
      const { engine, spy } = setup({ lockTimeout: 0.15 });
      const ticket = await beginTicket(engine, 'long-running');
      await sleep(500);
      expect(spy.calls.renew).toBeGreaterThanOrEqual(2);
      await engine.commit(ticket, response());
      const renewed = spy.calls.renew;
      await sleep(250);
      expect(spy.calls.renew).toBe(renewed);
      expect((await beginReply(engine, 'long-running')).replayed).toBe(true);
    });

    it('keeps the key locked long past lockTimeout while the ticket is open', async () => {
      const { engine } = setup({ lockTimeout: 0.3 });
      const ticket = await beginTicket(engine, 'outlives');
      await sleep(900);
      // Three leases' worth: without renewal the key would be free again.
      expect((await beginReply(engine, 'outlives')).status).toBe(409);
      await engine.release(ticket, undefined);
      expect(await begin(engine, 'outlives')).toBeInstanceOf(Ticket);
    });

    it('stops renewing after release', async () => {
      const { engine, spy } = setup({ lockTimeout: 0.15 });
      const ticket = await beginTicket(engine, 'released');
      await sleep(150);
      await engine.release(ticket, undefined);
      const renewed = spy.calls.renew;
      expect(renewed).toBeGreaterThanOrEqual(1);
      await sleep(200);
      expect(spy.calls.renew).toBe(renewed);
    });

    it('renews every open ticket with its own key and token, for the full lease', async () => {
      const { engine, spy } = setup({ lockTimeout: 0.15 });
      const renewals: [string, string, number][] = [];
      spy.overrides.renew = (key, token, leaseMs) => {
        renewals.push([key, token, leaseMs]);
        return spy.inner.renew(key, token, leaseMs);
      };
      const a = await beginTicket(engine, 'a');
      const b = await beginTicket(engine, 'b');
      await sleep(200);
      expect(renewals).toContainEqual([a.storageKey, a.token, 150]);
      expect(renewals).toContainEqual([b.storageKey, b.token, 150]);
      await engine.commit(a, response());
      await engine.commit(b, response());
    });

    it('survives a renew that throws or rejects', async () => {
      let calls = 0;
      const { engine } = setup(
        { lockTimeout: 0.06 },
        {
          renew: () => {
            calls++;
            if (calls % 2 === 0) return Promise.reject(new Error('renew rejected'));
            throw new Error('renew threw');
          },
        },
      );
      const ticket = await beginTicket(engine, 'renew-fails');
      await sleep(150);
      expect(calls).toBeGreaterThanOrEqual(2);
      await engine.commit(ticket, response());
    });

    it('does not renew in a tight loop when the lease is longer than a timer can wait', async () => {
      // A third of this lease is beyond setInterval's 2^31 - 1 ms limit, which Node.js turns into 1 ms.
      const { engine, spy } = setup({ lockTimeout: 10_000_000 });
      const ticket = await beginTicket(engine, 'very-long');
      await sleep(100);
      expect(spy.calls.renew).toBe(0);
      await engine.release(ticket, undefined);
    });

    it('does not keep the process alive', async () => {
      const script = `
        import { MemoryBackend } from './src/backends/memory.ts';
        import { IdempotencyEngine } from './src/core/engine.ts';
        const memory = new MemoryBackend();
        let renewed = 0;
        const backend = {
          acquire: (...args) => memory.acquire(...args),
          complete: (...args) => memory.complete(...args),
          release: (...args) => memory.release(...args),
          renew: (...args) => { renewed++; return memory.renew(...args); },
        };
        const engine = new IdempotencyEngine({ backend, lockTimeout: 0.15 });
        const ticket = await engine.begin({}, 'POST', '/orders', 'never-finishes', undefined, performance.now());
        console.log('began ' + ticket.kind);
        setTimeout(() => console.log('renewed ' + (renewed > 0)), 300);
      `;
      const started = performance.now();
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        cwd: REPO_ROOT,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (chunk) => {
        stdout += chunk;
      });
      child.stderr.on('data', (chunk) => {
        stderr += chunk;
      });
      const watchdog = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
        child.on('exit', (exitCode, exitSignal) => resolve([exitCode, exitSignal])),
      );
      clearTimeout(watchdog);
      expect(signal, `killed: the process did not exit by itself\n${stdout}\n${stderr}`).toBeNull();
      expect(code, stderr).toBe(0);
      expect(stdout).toBe('began proceed\nrenewed true\n');
      expect(performance.now() - started).toBeLessThan(10_000);
    }, 20_000);
  });

  describe('scope', () => {
    it('keeps the same key in two scopes apart', async () => {
      const { engine } = setup({ scope: (req) => req.tenant });
      const a = await beginTicket(engine, 'shared', { tenant: 'acme' });
      const b = await beginTicket(engine, 'shared', { tenant: 'globex' });
      expect(a.storageKey).not.toBe(b.storageKey);
      await engine.commit(a, response(201, '{"tenant":"acme"}'));
      await engine.commit(b, response(201, '{"tenant":"globex"}'));
      expect(text(await beginReply(engine, 'shared', { req: { tenant: 'acme' } }))).toBe('{"tenant":"acme"}');
      expect(text(await beginReply(engine, 'shared', { req: { tenant: 'globex' } }))).toBe(
        '{"tenant":"globex"}',
      );
    });

    it('keeps a scoped key apart from the unscoped one', async () => {
      const { engine } = setup({ scope: (req) => req.tenant });
      const scoped = await beginTicket(engine, 'k', { tenant: 'acme' });
      const unscoped = await beginTicket(engine, 'k', {});
      expect(scoped.storageKey).not.toBe(unscoped.storageKey);
      engine.release(scoped, undefined);
      engine.release(unscoped, undefined);
    });

    it('cannot be confused by separators in the scope or the key', async () => {
      const { engine } = setup({ scope: (req) => req.tenant });
      const pairs: [string, string][] = [
        ['a:b', 'c'],
        ['a', 'b:c'],
        ['', 'a:b:c'],
        ['3', 'a:b:c'],
        ['1:a', 'b'],
      ];
      const tickets: Ticket[] = [];
      for (const [tenant, key] of pairs) tickets.push(await beginTicket(engine, key, { tenant }));
      tickets.push(await beginTicket(engine, '-a:b:c'));
      tickets.push(await beginTicket(engine, '1:a:b'));
      expect(new Set(tickets.map((ticket) => ticket.storageKey)).size).toBe(tickets.length);
      for (const ticket of tickets) engine.release(ticket, undefined);
    });

    it('meets its own key within one scope', async () => {
      const { engine } = setup({ scope: (req) => req.tenant });
      const ticket = await beginTicket(engine, 'k', { tenant: 'acme' });
      expect((await beginReply(engine, 'k', { req: { tenant: 'acme' } })).status).toBe(409);
      engine.release(ticket, undefined);
    });

    it('hashes the scoped key into events, so that two scopes report different hashes', async () => {
      const { engine, events } = setup({ scope: (req) => req.tenant });
      await engine.commit(await beginTicket(engine, 'k', { tenant: 'acme' }), response());
      await engine.commit(await beginTicket(engine, 'k', { tenant: 'globex' }), response());
      expect(events[0]!.keyHash).not.toBe(events[1]!.keyHash);
    });
  });

  describe('onEvent', () => {
    it('is called once per handled request, with the outcome, a key hash, method, status and duration', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'k');
      await sleep(5);
      await engine.commit(ticket, response(201));
      expect(events).toHaveLength(1);
      const [event] = events;
      expect(event).toEqual({
        outcome: 'executed',
        keyHash: sha256(ticket.storageKey),
        method: 'POST',
        status: 201,
        durationMs: expect.any(Number),
      });
      expect(event!.durationMs).toBeGreaterThanOrEqual(4);
    });

    it('has its exceptions swallowed', async () => {
      const engine = new IdempotencyEngine<FakeRequest>({
        backend: memory(),
        required: true,
        onEvent: () => {
          throw new Error('logger broke');
        },
      });
      expect(() => engine.readKey('POST', undefined)).not.toThrow();
      const ticket = await beginTicket(engine, 'k');
      expect(await beginReply(engine, 'k')).toMatchObject({ status: 409 });
      await expect(Promise.resolve(engine.commit(ticket, response()))).resolves.toBeUndefined();
      expect(await beginReply(engine, 'k')).toMatchObject({ replayed: true });
      const other = await beginTicket(engine, 'other');
      await expect(Promise.resolve(engine.release(other, 500))).resolves.toBeUndefined();
    });

    it('never carries the raw key, whatever the outcome', async () => {
      const key = `secret-${randomUUID()}`;
      const events: IdempotencyEvent[] = [];
      const onEvent = (event: IdempotencyEvent) => events.push(event);
      const { engine } = setup({ onEvent, scope: (req) => req.tenant });
      const ticket = await beginTicket(engine, key, { tenant: 'acme' });
      await beginReply(engine, key, { req: { tenant: 'acme' } }); // conflict
      await beginReply(engine, key, { req: { tenant: 'acme' }, url: '/other' }); // mismatch
      await engine.commit(ticket, response()); // executed
      await beginReply(engine, key, { req: { tenant: 'acme' } }); // replayed
      await engine.release(await beginTicket(engine, key, { tenant: 'globex' }), 500); // not-stored
      const failing = setup({ onEvent }, { acquire: () => Promise.reject(new Error('down')) });
      await beginReply(failing.engine, key); // backend-error
      const lost = setup({ onEvent }, { complete: () => false });
      await lost.engine.commit(await beginTicket(lost.engine, key), response()); // lease-lost
      const strict = new IdempotencyEngine({ backend: memory(), onEvent, enforceUuid4Formatting: true });
      strict.readKey('POST', key); // invalid-key

      expect(new Set(events.map((event) => event.outcome))).toEqual(
        new Set([
          'conflict',
          'mismatch',
          'executed',
          'replayed',
          'not-stored',
          'backend-error',
          'lease-lost',
          'invalid-key',
        ]),
      );
      for (const event of events) {
        const serialised = JSON.stringify(event, (_, value) =>
          value instanceof Error ? { message: value.message, cause: value.cause, stack: value.stack } : value,
        );
        expect(serialised).not.toContain(key);
        expect(String(event.keyHash)).not.toBe(sha256(key));
        if (event.keyHash !== undefined) expect(event.keyHash).toMatch(/^[0-9a-f]{64}$/);
      }
    });
  });
});
