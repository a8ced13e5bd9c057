import { spawn } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { type BeginResult, IdempotencyEngine, storageKeyOf, Ticket } from '../../src/core/engine.js';
import { IdempotencyError } from '../../src/core/errors.js';
import { computeFingerprint } from '../../src/core/fingerprint.js';
import type { IdempotencyEvent, IdempotencyOptions } from '../../src/core/options.js';
import type { EngineReply } from '../../src/core/responses.js';
import {
  type Backend,
  type HeaderPair,
  type IdempotencyRecord,
  type StoredResponse,
  TEXT_BODIES,
} from '../../src/core/types.js';
import { nodeSha256 } from '../../src/runtime/node-sha256.js';

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

/** A spy on a backend that says it takes a body sent as text as that text (see `TEXT_BODIES`), as MemoryBackend does. */
class TextSpyBackend extends SpyBackend {
  readonly [TEXT_BODIES] = true;
}

const backends: MemoryBackend[] = [];

afterEach(() => {
  vi.useRealTimers();
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
  const engine = new IdempotencyEngine<FakeRequest>(
    { backend: spy, onEvent: (event) => events.push(event), ...options },
    { sha256: nodeSha256 },
  );
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

/** A finished JSON response; `body: undefined` stands for one whose body was not kept. */
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
/** A response of `contentType` whose body the adapter did not keep (streamed, or over maxResponseBytes). */
const unkept = (status = 200, contentType = 'application/json') => ({
  status,
  headers: [['content-type', contentType]] as [string, string][],
  body: undefined,
});
/** Lets fake timers (and the renewals and retries they fire) run for `ms`. */
const elapse = (ms: number) => vi.advanceTimersByTimeAsync(ms);
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
      expect(ticket.fingerprint).toBe(computeFingerprint('POST', '/orders', BODY, nodeSha256));
      expect(spy.calls.acquire).toBe(1);
      expect(spy.leases).toEqual([60_000]);
      engine.fail(ticket);
    });

    it('answers synchronously with a synchronous backend and hash', () => {
      const { engine } = setup();
      const result = engine.begin({}, 'POST', '/orders', 'sync', BODY, performance.now());
      expect(result).toBeInstanceOf(Ticket);
      engine.fail(result as Ticket);
    });

    it('hashes with Web Crypto, asynchronously, when no hash is given, to the same fingerprint', async () => {
      const web = new IdempotencyEngine({ backend: memory() });
      const result = web.begin({}, 'POST', '/orders', 'web', BODY, performance.now());
      expect(result).toBeInstanceOf(Promise);
      const ticket = (await result) as Ticket;
      expect(ticket.fingerprint).toBe(computeFingerprint('POST', '/orders', BODY, nodeSha256));
      web.fail(ticket);
    });

    it('fingerprints an absolute URL as its path and query, as the Node.js adapters see it', async () => {
      const { engine } = setup();
      const a = await beginTicket(engine, 'abs');
      engine.fail(a);
      const absolute = (await begin(engine, 'abs', { url: 'https://api.example.com/orders' })) as Ticket;
      expect(absolute.fingerprint).toBe(a.fingerprint);
      engine.fail(absolute);
    });

    it('passes the lease in milliseconds to the backend', async () => {
      const { engine, spy } = setup({ lockTimeout: 2.5 });
      const ticket = await beginTicket(engine, 'lease');
      expect(spy.leases).toEqual([2500]);
      engine.fail(ticket);
    });

    it('answers 409 with the exact body while the first request is in flight', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'order-7');
      const reply = await beginReply(engine, 'order-7');
      expect(reply.status).toBe(409);
      expect(reply.replayed).toBe(false);
      expect(reply.headers).toEqual([
        ['content-type', 'application/json'],
        ['retry-after', '1'],
      ]);
      expect(text(reply)).toBe(`{"detail":"Request already pending for idempotency key 'order-7'"}`);
      expect(events.map((event) => event.outcome)).toEqual(['conflict']);
      expect(events[0]!.status).toBe(409);
      engine.fail(ticket);
    });

    describe('Retry-After', () => {
      const inFlight = (retryAfterMs: number) => ({
        acquire: () => ({ state: 'in-flight' as const, retryAfterMs }),
      });

      it('invites a retry after about 1 s while the holder renews its lease, not after the lease', async () => {
        const { engine } = setup({}, inFlight(59_500));
        expect((await beginReply(engine, 'k')).headers).toContainEqual(['retry-after', '1']);
      });

      it('invites a retry after about as long as first runs take here, while the holder is alive', async () => {
        vi.useFakeTimers();
        const slow = setup();
        const first = await beginTicket(slow.engine, 'slow');
        await elapse(4200);
        await slow.engine.finish(first, response());
        slow.spy.overrides.acquire = () => ({ state: 'in-flight', retryAfterMs: 58_000 });
        expect((await beginReply(slow.engine, 'other')).headers).toContainEqual(['retry-after', '5']);
      });

      it("advertises the lease's time left, in whole seconds rounded up, once the holder stopped renewing", async () => {
        const { engine } = setup({}, inFlight(12_300));
        expect((await beginReply(engine, 'k')).headers).toContainEqual(['retry-after', '13']);
        const { engine: late } = setup({}, inFlight(40));
        expect((await beginReply(late, 'k')).headers).toContainEqual(['retry-after', '1']);
      });
    });

    it('JSON-escapes the key in the 409 body', async () => {
      const { engine } = setup();
      const key = 'quote " and \\ backslash';
      const ticket = await beginTicket(engine, key);
      const reply = await beginReply(engine, key);
      expect(JSON.parse(text(reply))).toEqual({
        detail: `Request already pending for idempotency key '${key}'`,
      });
      engine.fail(ticket);
    });

    it('answers 409 as problem details when errorFormat is problem', async () => {
      const { engine } = setup({ errorFormat: 'problem' });
      const ticket = await beginTicket(engine, 'p');
      const reply = await beginReply(engine, 'p');
      expect(reply.headers).toEqual([
        ['content-type', 'application/problem+json'],
        ['retry-after', '1'],
      ]);
      expect(JSON.parse(text(reply))).toEqual({
        type: 'about:blank',
        title: 'Conflict',
        status: 409,
        detail: "Request already pending for idempotency key 'p'",
      });
      engine.fail(ticket);
    });

    it('replays a stored response with its status, headers, exact body bytes and the replay header', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'replay-me');
      const stored = response(201, '{ "id" : "ord_1",\n  "note": "kept as sent" }');
      await engine.finish(ticket, stored);
      const reply = await beginReply(engine, 'replay-me');
      expect(reply.replayed).toBe(true);
      expect(reply.status).toBe(201);
      expect(reply.headers).toEqual([...stored.headers, ['Idempotent-Replayed', 'true']]);
      expect(Buffer.from(reply.body).equals(Buffer.from(stored.body))).toBe(true);
      expect(events.map((event) => event.outcome)).toEqual(['executed', 'replayed']);
      expect(events[1]!.status).toBe(201);
    });

    it('names the configured replay header', async () => {
      const { engine } = setup({ replayHeaderKey: 'X-Replayed' });
      await engine.finish(await beginTicket(engine, 'named'), response());
      expect((await beginReply(engine, 'named')).headers).toContainEqual(['X-Replayed', 'true']);
    });

    it('replays again and again', async () => {
      const { engine } = setup();
      const ticket = await beginTicket(engine, 'many');
      await engine.finish(ticket, response());
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
        await engine.finish(await beginTicket(engine, 'used'), response());
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
        engine.fail(ticket);
      });
    });

    it('replays whatever the request when fingerprint is false', async () => {
      const { engine, spy } = setup({ fingerprint: false });
      const ticket = await beginTicket(engine, 'nofp');
      expect(ticket.fingerprint).toBe('');
      await engine.finish(ticket, response());
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
      await engine.finish(ticket, response());
      expect(
        (await beginReply(engine, 'custom', { req: { signature: 'sig-1' }, url: '/other' })).replayed,
      ).toBe(true);
      expect((await beginReply(engine, 'custom', { req: { signature: 'sig-2' } })).status).toBe(422);
    });
  });

  describe('finish', () => {
    it('stores the record with the expiry in milliseconds and the fingerprint', async () => {
      const { engine, spy } = setup({ expiry: 10 });
      const ticket = await beginTicket(engine, 'ttl');
      const before = Date.now();
      const stored = response();
      await engine.finish(ticket, stored);
      expect(spy.completions).toHaveLength(1);
      const { key, token, record, ttlMs } = spy.completions[0]!;
      expect(key).toBe(ticket.storageKey);
      expect(token).toBe(ticket.token);
      expect(ttlMs).toBe(10_000);
      expect(record.fingerprint).toBe(ticket.fingerprint);
      expect(record.response).toEqual(stored);
      expect(record.createdAt).toBeGreaterThanOrEqual(before);
      expect(record.createdAt).toBeLessThanOrEqual(Date.now());
    });

    it('stores headers with lower-case names, without those a replay must not repeat', async () => {
      const { engine, spy } = setup();
      await engine.finish(await beginTicket(engine, 'headers'), {
        status: 201,
        headers: [
          ['Content-Type', 'application/json'],
          ['Set-Cookie', 'a=1'],
          ['Content-Length', '2'],
          ['Date', 'Tue, 01 Dec 2026 00:00:00 GMT'],
          ['Connection', 'keep-alive'],
          ['Transfer-Encoding', 'chunked'],
          ['Location', '/orders/1'],
        ],
        body: Buffer.from('{}'),
      });
      expect(spy.completions[0]!.record.response!.headers).toEqual([
        ['content-type', 'application/json'],
        ['location', '/orders/1'],
      ]);
    });

    it('stores forever with expiry: null', async () => {
      const { engine, spy } = setup({ expiry: null });
      await engine.finish(await beginTicket(engine, 'forever'), response());
      expect(spy.completions[0]!.ttlMs).toBeNull();
    });

    it('reports executed once with the status', async () => {
      const { engine, events } = setup();
      await engine.finish(await beginTicket(engine, 'exec'), response(201));
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({ outcome: 'executed', method: 'POST', status: 201 });
      expect(events[0]!.durationMs).toBeGreaterThanOrEqual(0);
      expect(events[0]!.clientGone).toBeUndefined();
    });

    it('is idempotent: a second finish or a later fail does nothing', async () => {
      const { engine, events, spy } = setup();
      const ticket = await beginTicket(engine, 'twice');
      await engine.finish(ticket, response(201, '{"first":true}'));
      expect(ticket.settled).toBe(true);
      await engine.finish(ticket, response(200, '{"second":true}'));
      await engine.fail(ticket);
      expect(spy.calls.complete).toBe(1);
      expect(spy.calls.release).toBe(0);
      expect(events.map((event) => event.outcome)).toEqual(['executed']);
      expect(text(await beginReply(engine, 'twice'))).toBe('{"first":true}');
    });

    describe('releases the key, so that a retry runs again, for a response that is not kept', () => {
      const cases: [string, Partial<IdempotencyOptions<FakeRequest>>, ReturnType<typeof response>][] = [
        ['a 5xx', {}, response(500)],
        ['a 503', {}, response(503)],
        ['a type outside cacheableContentTypes', {}, response(200, 'plain', 'text/plain')],
        ['a response without a type', {}, { status: 200, headers: [], body: Buffer.from('x') }],
        ...([401, 403, 407, 408, 425, 429].map((status) => [`a ${status} refusal`, {}, response(status)]) as [
          string,
          Partial<IdempotencyOptions<FakeRequest>>,
          ReturnType<typeof response>,
        ][]),
        ['a status listed in releaseStatuses', { releaseStatuses: [409] }, response(409)],
      ];

      it.each(cases)('%s', async (_, options, finished) => {
        const { engine, events, spy } = setup(options);
        const ticket = await beginTicket(engine, 'free-me');
        await engine.finish(ticket, finished);
        expect(spy.calls.release).toBe(1);
        expect(spy.calls.complete).toBe(0);
        expect(events).toEqual([expect.objectContaining({ outcome: 'not-stored', status: finished.status })]);
        const retry = await begin(engine, 'free-me');
        expect(retry).toBeInstanceOf(Ticket);
        engine.fail(retry as Ticket);
      });
    });

    it('stores a 5xx with cacheServerErrors, and a refusal once releaseStatuses is emptied', async () => {
      const { engine } = setup({ cacheServerErrors: true, releaseStatuses: [] });
      await engine.finish(await beginTicket(engine, 'five'), response(502));
      expect((await beginReply(engine, 'five')).status).toBe(502);
      await engine.finish(await beginTicket(engine, 'four'), response(429));
      expect((await beginReply(engine, 'four')).status).toBe(429);
    });

    it.each([
      ['a backend marked to take text (as MemoryBackend is), handed the string', true],
      ['any other backend, handed the bytes', false],
    ])('stores a body sent as text as the UTF-8 Node.js sends for it, on %s', async (_name, takesText) => {
      const stores = takesText ? new TextSpyBackend(memory()) : new SpyBackend(memory());
      const engine = new IdempotencyEngine<FakeRequest>({ backend: stores }, { sha256: nodeSha256 });
      const body = '{"name":"caf\u00e9 \u20ac \ud83d\ude00 \ud800"}';
      const headers: HeaderPair[] = [['content-type', 'application/json']];
      await engine.finish(await beginTicket(engine, 'text'), { status: 201, headers, body });
      const replay = await beginReply(engine, 'text');
      expect(replay.status).toBe(201);
      expect([...replay.body]).toEqual([...Buffer.from(body)]);
      const handed: unknown = stores.completions[0]!.record.response!.body;
      if (takesText) expect(handed).toBe(body);
      else expect(handed).toBeInstanceOf(Uint8Array);
    });

    it('marks MemoryBackend as taking text, and hands a subclass that overrides complete the bytes', async () => {
      expect(memory()[TEXT_BODIES]).toBe(true);
      const handed: unknown[] = [];
      class Recording extends MemoryBackend {
        override complete(
          key: string,
          token: string,
          record: IdempotencyRecord,
          ttlMs: number | null,
        ): boolean {
          handed.push(record.response?.body);
          return super.complete(key, token, record, ttlMs);
        }
      }
      const backend = new Recording();
      backends.push(backend);
      expect(backend[TEXT_BODIES]).toBe(false);
      const engine = new IdempotencyEngine<FakeRequest>({ backend }, { sha256: nodeSha256 });
      const headers: HeaderPair[] = [['content-type', 'application/json']];
      await engine.finish(await beginTicket(engine, 'sub'), { status: 201, headers, body: '{"a":"\u00e9"}' });
      expect(handed).toHaveLength(1);
      expect(handed[0]).toBeInstanceOf(Uint8Array);
      expect([...(await beginReply(engine, 'sub')).body]).toEqual([...Buffer.from('{"a":"\u00e9"}')]);
    });

    describe('remembers a completed request whose response cannot be stored, so it never runs twice', () => {
      const cases: [
        string,
        Partial<IdempotencyOptions<FakeRequest>>,
        Parameters<IdempotencyEngine['finish']>[1],
      ][] = [
        ['a body the adapter did not keep (past maxResponseBytes)', {}, unkept()],
        ['a body over maxResponseBytes', { maxResponseBytes: 4 }, response(201, '{"too":"long"}')],
        [
          'a body sent as text, its UTF-8 over maxResponseBytes though its units are not',
          { maxResponseBytes: 7 },
          { status: 201, headers: [['content-type', 'application/json']], body: '"\u20ac\u20ac"' },
        ],
        ['an event stream', {}, unkept(200, 'text/event-stream')],
        [
          'an event stream, with every type cacheable',
          { cacheableContentTypes: '*' },
          unkept(200, 'text/event-stream; charset=utf-8'),
        ],
        // Its body in hand (an adapter that read it whole), its type in capitals: still a stream, never stored.
        ['an event stream in capitals, its body read', {}, response(200, 'data: 1\n\n', 'Text/Event-Stream')],
        // Named among the cacheable types, or covered by `*/*`: no matcher accepts an event stream.
        [
          'an event stream, its type listed as cacheable, its body read',
          { cacheableContentTypes: ['text/event-stream', '*/*'] },
          response(200, 'data: 1\n\n', 'text/event-stream'),
        ],
      ];

      it.each(cases)('%s', async (_, options, finished) => {
        const { engine, events, spy } = setup(options);
        await engine.finish(await beginTicket(engine, 'big'), finished);
        expect(spy.completions[0]!.record.response).toBeNull();
        expect(events.map((event) => event.outcome)).toEqual(['remembered']);
        const retry = await beginReply(engine, 'big');
        expect(retry.status).toBe(410);
        expect(retry.replayed).toBe(false);
        expect(JSON.parse(text(retry))).toEqual({
          detail:
            "The request with idempotency key 'big' already ran, but its response was too large to store or a stream; it cannot be replayed",
        });
        expect(events.map((event) => event.outcome)).toEqual(['remembered', 'not-replayable']);
        expect(events[1]!.status).toBe(410);
      });

      it("releases instead with unstoredResponses: 'release'", async () => {
        const { engine, events } = setup({ unstoredResponses: 'release' });
        await engine.finish(await beginTicket(engine, 'big'), unkept());
        expect(events.map((event) => event.outcome)).toEqual(['not-stored']);
        expect(await begin(engine, 'big')).toBeInstanceOf(Ticket);
      });

      it('still answers 422 to a different request with the key', async () => {
        const { engine } = setup();
        await engine.finish(await beginTicket(engine, 'big'), unkept());
        expect((await beginReply(engine, 'big', { url: '/elsewhere' })).status).toBe(422);
      });
    });

    describe('a store that fails', () => {
      it('is retried, and the response stored, when the backend recovers', async () => {
        vi.useFakeTimers();
        let failures = 1;
        const { engine, events, spy } = setup(
          {},
          {
            complete: (key, token, record, ttl) =>
              failures-- > 0
                ? Promise.reject(new Error('connection reset'))
                : spy.inner.complete(key, token, record, ttl),
          },
        );
        const ticket = await beginTicket(engine, 'blip');
        const settled = Promise.resolve(engine.finish(ticket, response()));
        await elapse(100);
        await settled;
        expect(spy.calls.complete).toBe(2);
        expect(spy.calls.release).toBe(0);
        expect(events.map((event) => event.outcome)).toEqual(['executed']);
        expect((await beginReply(engine, 'blip')).replayed).toBe(true);
      });

      it('never releases the key: it reports store-failed and lets the lease lapse, renewed meanwhile', async () => {
        vi.useFakeTimers();
        const failure = new Error('connection reset');
        const { engine, events, spy } = setup(
          { lockTimeout: 3 },
          { complete: () => Promise.reject(failure) },
        );
        const ticket = await beginTicket(engine, 'store-fails');
        const settled = Promise.resolve(engine.finish(ticket, response()));
        // Four attempts while the response waits (about 1.3 s), then it may go out.
        await elapse(1400);
        await expect(settled).resolves.toBeUndefined();
        expect(spy.calls.complete).toBe(4);
        expect(events).toHaveLength(0);
        // Then in the background, 2 s later (the next, 4 s later, would outlast the lease): one more attempt.
        await elapse(3000);
        expect(spy.calls.complete).toBe(5);
        expect(spy.calls.release).toBe(0);
        expect(spy.calls.renew).toBeGreaterThanOrEqual(2);
        expect(events).toHaveLength(1);
        expect(events[0]).toMatchObject({ outcome: 'store-failed', status: 201 });
        const error = events[0]!.error as IdempotencyError;
        expect(error).toBeInstanceOf(IdempotencyError);
        expect(error.code).toBe('ERR_IDEMPOTENCY_BACKEND');
        expect(error.cause).toBe(failure);
        // A retry meets the lock, not a second run; once the lease lapses (no more renewals) it runs.
        expect((await beginReply(engine, 'store-fails')).status).toBe(409);
        const renewals = spy.calls.renew;
        await elapse(3100);
        expect(spy.calls.renew).toBe(renewals);
        const retry = await begin(engine, 'store-fails');
        expect(retry).toBeInstanceOf(Ticket);
        engine.fail(retry as Ticket);
      });

      it('does not throw when the backend throws synchronously', async () => {
        vi.useFakeTimers();
        const { engine, events } = setup(
          {},
          {
            complete: () => {
              throw new Error('sync failure');
            },
          },
        );
        const ticket = await beginTicket(engine, 'store-throws');
        let settled: unknown;
        expect(() => {
          settled = engine.finish(ticket, response());
        }).not.toThrow();
        await elapse(1400);
        await settled;
        // The background attempts last as long as the lease (60 s by default).
        await elapse(62_000);
        expect(events.map((event) => event.outcome)).toEqual(['store-failed']);
        expect((await beginReply(engine, 'store-throws')).status).toBe(409);
      });
    });

    it('stores the response in the background when the backend comes back after the response went out', async () => {
      vi.useFakeTimers();
      let down = true;
      const { engine, events, spy } = setup(
        {},
        {
          complete: (key, token, record, ttl) =>
            down ? Promise.reject(new Error('restarting')) : spy.inner.complete(key, token, record, ttl),
        },
      );
      const ticket = await beginTicket(engine, 'comes-back');
      const settled = Promise.resolve(engine.finish(ticket, response()));
      await elapse(1400);
      await settled;
      expect((await beginReply(engine, 'comes-back')).status).toBe(409);
      down = false;
      await elapse(2100);
      expect(events.map((event) => event.outcome)).toEqual(['conflict', 'executed']);
      expect((await beginReply(engine, 'comes-back')).replayed).toBe(true);
    });

    it('reports lease-lost when the backend refuses the fenced write', async () => {
      const { engine, events } = setup({}, { complete: () => false });
      const ticket = await beginTicket(engine, 'lost');
      await engine.finish(ticket, response(200));
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({ outcome: 'lease-lost', status: 200 });
      expect(events[0]!.error).toBeUndefined();
    });

    it('reports lease-lost when another request took over a lapsed lease', async () => {
      vi.useFakeTimers();
      const { engine, events } = setup({ lockTimeout: 1 }, { renew: () => false });
      const first = await beginTicket(engine, 'lapsed');
      await elapse(1100);
      const second = await beginTicket(engine, 'lapsed');
      await engine.finish(first, response(201, '{"first":true}'));
      await engine.finish(second, response(201, '{"second":true}'));
      expect(events.map((event) => event.outcome)).toEqual(['lease-lost', 'executed']);
      expect(text(await beginReply(engine, 'lapsed'))).toBe('{"second":true}');
    });
  });

  describe('a client that went away', () => {
    it('changes nothing: the lock is held and the response stored when the handler finishes', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'gone');
      engine.clientLeft(ticket);
      expect((await beginReply(engine, 'gone')).status).toBe(409);
      await engine.finish(ticket, response(201));
      expect(events.map((event) => event.outcome)).toEqual(['conflict', 'executed']);
      expect(events[1]!.clientGone).toBe(true);
      expect((await beginReply(engine, 'gone')).replayed).toBe(true);
    });

    it('keeps the lease renewed for one more lockTimeout, then stops, so a handler that never ends frees the key', async () => {
      vi.useFakeTimers();
      const { engine, spy } = setup({ lockTimeout: 3 });
      const ticket = await beginTicket(engine, 'never-ends');
      engine.clientLeft(ticket);
      await elapse(2900);
      expect(spy.calls.renew).toBeGreaterThanOrEqual(2);
      expect((await beginReply(engine, 'never-ends')).status).toBe(409);
      await elapse(1100);
      const renewals = spy.calls.renew;
      await elapse(2000);
      expect(spy.calls.renew).toBe(renewals);
      // The last renewal was at most a third of a lease before renewing stopped: the lease lapses within one more.
      await elapse(1100);
      const retry = await begin(engine, 'never-ends');
      expect(retry).toBeInstanceOf(Ticket);
      engine.fail(retry as Ticket);
    });

    it('lets the lease lapse instead of releasing when the handler then fails (throws)', async () => {
      vi.useFakeTimers();
      const { engine, events, spy } = setup({ lockTimeout: 1 });
      const ticket = await beginTicket(engine, 'threw');
      engine.clientLeft(ticket);
      await engine.fail(ticket);
      expect(spy.calls.release).toBe(0);
      expect(events).toEqual([
        expect.objectContaining({ outcome: 'abandoned', status: undefined, clientGone: true }),
      ]);
      expect((await beginReply(engine, 'threw')).status).toBe(409);
      await elapse(1100);
      const retry = await begin(engine, 'threw');
      expect(retry).toBeInstanceOf(Ticket);
      engine.fail(retry as Ticket);
    });

    it('lets the lease lapse instead of releasing when the handler then answers 5xx', async () => {
      const { engine, events, spy } = setup();
      const ticket = await beginTicket(engine, 'five');
      engine.clientLeft(ticket);
      await engine.finish(ticket, response(500));
      expect(spy.calls.release).toBe(0);
      expect(events.map((event) => event.outcome)).toEqual(['abandoned']);
      expect((await beginReply(engine, 'five')).status).toBe(409);
    });

    it('still releases a response that was never going to be stored, such as a refusal', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'refused');
      engine.clientLeft(ticket);
      await engine.finish(ticket, response(429));
      expect(events.map((event) => event.outcome)).toEqual(['not-stored']);
      expect(await begin(engine, 'refused')).toBeInstanceOf(Ticket);
    });
  });

  describe('fail', () => {
    it('releases the key so that a retry runs again', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'free-me');
      await engine.fail(ticket);
      expect(ticket.settled).toBe(true);
      const retry = await begin(engine, 'free-me');
      expect(retry).toBeInstanceOf(Ticket);
      expect(events[0]).toMatchObject({ outcome: 'not-stored', status: 500 });
      engine.fail(retry as Ticket);
    });

    it('is idempotent: a second fail or a later finish does nothing', async () => {
      const { engine, events, spy } = setup();
      const ticket = await beginTicket(engine, 'release-twice');
      await engine.fail(ticket);
      const next = await beginTicket(engine, 'release-twice');
      await engine.fail(ticket);
      await engine.finish(ticket, response());
      expect(spy.calls.release).toBe(1);
      expect(spy.calls.complete).toBe(0);
      expect(events.map((event) => event.outcome)).toEqual(['not-stored']);
      expect((await beginReply(engine, 'release-twice')).status).toBe(409);
      engine.fail(next);
    });

    it('retries a release that fails, then reports backend-error and leaves the lease to lapse', async () => {
      vi.useFakeTimers();
      const failure = new Error('gone');
      const { engine, events, spy } = setup({}, { release: () => Promise.reject(failure) });
      const ticket = await beginTicket(engine, 'release-fails');
      const settled = Promise.resolve(engine.fail(ticket));
      await elapse(1400);
      await expect(settled).resolves.toBeUndefined();
      expect(spy.calls.release).toBe(4);
      // Then in the background, 2, 4, 8, 16 s apart while the lease (60 s) lasts.
      await elapse(62_000);
      expect(spy.calls.release).toBe(8);
      expect(events).toHaveLength(1);
      expect(events[0]!.outcome).toBe('backend-error');
      expect((events[0]!.error as IdempotencyError).cause).toBe(failure);
    });

    it('does not throw when the backend throws synchronously', async () => {
      vi.useFakeTimers();
      const { engine, events } = setup(
        {},
        {
          release: () => {
            throw new Error('sync');
          },
        },
      );
      const ticket = await beginTicket(engine, 'release-throws');
      let settled: unknown;
      expect(() => {
        settled = engine.fail(ticket);
      }).not.toThrow();
      await elapse(1400);
      await settled;
      await elapse(62_000);
      expect(events.map((event) => event.outcome)).toEqual(['backend-error']);
    });
  });

  describe('plan', () => {
    it('keeps JSON responses below 500 for storing', () => {
      const { engine } = setup();
      for (const status of [200, 201, 204, 301, 400, 404, 409, 422, 499]) {
        expect(engine.plan(status, 'application/json'), String(status)).toBe('store');
      }
    });

    it('streams 5xx responses unless cacheServerErrors', () => {
      const { engine } = setup();
      for (const status of [500, 502, 503, 599])
        expect(engine.plan(status, 'application/json')).toBe('stream');
      const { engine: caching } = setup({ cacheServerErrors: true });
      for (const status of [500, 502, 503, 599])
        expect(caching.plan(status, 'application/json')).toBe('store');
    });

    it('streams the refusals of releaseStatuses', () => {
      const { engine } = setup();
      for (const status of [401, 403, 407, 408, 425, 429])
        expect(engine.plan(status, 'application/json')).toBe('stream');
      const { engine: custom } = setup({ releaseStatuses: [418] });
      expect(custom.plan(418, 'application/json')).toBe('stream');
      expect(custom.plan(429, 'application/json')).toBe('store');
    });

    it('respects cacheableContentTypes, and always streams event streams', () => {
      const { engine } = setup();
      expect(engine.plan(200, 'text/plain')).toBe('stream');
      expect(engine.plan(200, undefined)).toBe('stream');
      expect(engine.plan(200, 'application/problem+json')).toBe('store');
      const { engine: any } = setup({ cacheableContentTypes: '*' });
      expect(any.plan(200, 'text/plain')).toBe('store');
      expect(any.plan(200, 'text/event-stream')).toBe('stream');
      expect(any.plan(500, 'text/plain')).toBe('stream');
    });

    it('exposes maxResponseBytes and maxRequestBytes', () => {
      expect(setup().engine.maxResponseBytes).toBe(1_048_576);
      expect(setup({ maxResponseBytes: 10 }).engine.maxResponseBytes).toBe(10);
      expect(setup({ maxRequestBytes: 20 }).engine.maxRequestBytes).toBe(20);
    });

    it('offers the 500 for a failed handler in the configured errorFormat', () => {
      expect(text(setup().engine.internalError)).toBe('{"detail":"Internal Server Error"}');
      const problem = setup({ errorFormat: 'problem' }).engine.internalError;
      expect(problem.headers).toEqual([['content-type', 'application/problem+json']]);
      expect(JSON.parse(text(problem))).toMatchObject({ status: 500, title: 'Internal Server Error' });
    });
  });

  describe("onConflict: 'wait'", () => {
    function waiting(options: Partial<IdempotencyOptions<FakeRequest>> = {}) {
      const backend = memory();
      const events: IdempotencyEvent[] = [];
      const engine = new IdempotencyEngine<FakeRequest>(
        { backend, onConflict: 'wait', onEvent: (event) => events.push(event), ...options },
        { sha256: nodeSha256 },
      );
      return { engine, backend, events };
    }

    it('answers a repeat with the replay as soon as the first request finishes', async () => {
      const { engine } = waiting();
      const ticket = await beginTicket(engine, 'k');
      const repeat = begin(engine, 'k');
      await sleep(30);
      const finishedAt = performance.now();
      await engine.finish(ticket, response(201, '{"first":true}'));
      const reply = (await repeat) as EngineReply;
      // Woken by the store: MemoryBackend can be watched, so the waiter does not poll, and without the wake-up it
      // would answer only at waitTimeout (10 s). The bound is loose for a loaded machine, far below that.
      expect(performance.now() - finishedAt).toBeLessThan(1_000);
      expect(reply.replayed).toBe(true);
      expect(text(reply)).toBe('{"first":true}');
    });

    it('answers 50 waiters with the one stored response, woken together', async () => {
      const { engine, events } = waiting();
      const ticket = await beginTicket(engine, 'many');
      const waiters = Array.from({ length: 50 }, () => begin(engine, 'many'));
      await sleep(20);
      await engine.finish(ticket, response(201, '{"once":true}'));
      const replies = (await Promise.all(waiters)) as EngineReply[];
      expect(replies.every((reply) => reply.replayed && text(reply) === '{"once":true}')).toBe(true);
      expect(events.filter((event) => event.outcome === 'executed')).toHaveLength(1);
      expect(events.filter((event) => event.outcome === 'replayed')).toHaveLength(50);
    });

    it('answers 409 once waitTimeout passed and the first still runs', async () => {
      const { engine } = waiting({ waitTimeout: 0.2 });
      const ticket = await beginTicket(engine, 'long');
      const startedAt = performance.now();
      const reply = (await begin(engine, 'long')) as EngineReply;
      expect(reply.status).toBe(409);
      expect(performance.now() - startedAt).toBeGreaterThanOrEqual(190);
      engine.fail(ticket);
    });

    it('lets one waiter run when the first released the key, and the others wait for it', async () => {
      const { engine } = waiting();
      const first = await beginTicket(engine, 'released');
      const waiters = [begin(engine, 'released'), begin(engine, 'released')];
      await sleep(10);
      await engine.finish(first, response(503));
      const [a, b] = await Promise.race([
        Promise.all([waiters[0]!, Promise.resolve(undefined)]),
        Promise.all([waiters[1]!, Promise.resolve(undefined)]),
      ]);
      expect(a).toBeInstanceOf(Ticket);
      expect(b).toBeUndefined();
      await engine.finish(a as Ticket, response(201, '{"second":true}'));
      const results = await Promise.all(waiters);
      const replays = results.filter((result) => result !== a) as EngineReply[];
      expect(replays).toHaveLength(1);
      expect(text(replays[0]!)).toBe('{"second":true}');
    });

    it('polls a backend that cannot notify, and still answers with the replay', async () => {
      const { engine, spy } = setup({ onConflict: 'wait' });
      const ticket = await beginTicket(engine, 'polled');
      const repeat = begin(engine, 'polled');
      await sleep(50);
      await engine.finish(ticket, response(201, '{"polled":true}'));
      const reply = (await repeat) as EngineReply;
      expect(reply.replayed).toBe(true);
      expect(spy.calls.acquire).toBeGreaterThanOrEqual(3);
    });

    it("looks again when a crashed holder's lease lapses, and runs", async () => {
      const { engine, backend } = waiting({ lockTimeout: 1, waitTimeout: 5 });
      // The holder took the lock and died: no notification will come.
      expect(
        backend.acquire('-crashed', computeFingerprint('POST', '/orders', BODY, nodeSha256) as string, 300)
          .state,
      ).toBe('acquired');
      const startedAt = performance.now();
      const result = await begin(engine, 'crashed');
      expect(result).toBeInstanceOf(Ticket);
      expect(performance.now() - startedAt).toBeLessThan(1000);
      engine.fail(result as Ticket);
    });
  });

  describe('backendTimeout', () => {
    const hanging = <T>() => new Promise<T>(() => {});

    it('answers 503 once an acquire has not answered within backendTimeout', async () => {
      vi.useFakeTimers();
      const { engine, events } = setup({ backendTimeout: 1.5 }, { acquire: hanging });
      const result = begin(engine, 'hung');
      await elapse(1600);
      const reply = (await result) as EngineReply;
      expect(reply.status).toBe(503);
      expect((events[0]!.error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND_TIMEOUT');
    });

    it('runs the handler without idempotency, fail-open, once an acquire hangs', async () => {
      vi.useFakeTimers();
      const { engine } = setup({ onBackendError: 'fail-open' }, { acquire: hanging });
      const result = begin(engine, 'hung');
      await elapse(2100);
      expect(await result).toEqual({ kind: 'pass' });
    });

    it('releases at once the lock of an acquire that answered after its caller gave up', async () => {
      vi.useFakeTimers();
      const { engine, spy } = setup({}, {});
      let answer!: () => void;
      spy.overrides.acquire = (key, fingerprint, lease) =>
        new Promise((resolve) => {
          answer = () => resolve(spy.inner.acquire(key, fingerprint, lease));
        });
      const result = begin(engine, 'late');
      await elapse(2100);
      expect(((await result) as EngineReply).status).toBe(503);
      answer();
      await elapse(1);
      expect(spy.calls.release).toBe(1);
      spy.overrides.acquire = undefined;
      expect(await begin(engine, 'late')).toBeInstanceOf(Ticket);
    });

    it('lets the response go after one backendTimeout when the store hangs, and goes on in the background', async () => {
      vi.useFakeTimers();
      const { engine, spy } = setup({ backendTimeout: 1 }, { complete: hanging });
      const ticket = await beginTicket(engine, 'store-hangs');
      let sent = false;
      Promise.resolve(engine.finish(ticket, response())).then(() => {
        sent = true;
      });
      await elapse(1100);
      // Not an attempt per retry (4 × backendTimeout and more): a new attempt would queue behind the hung one.
      expect(sent).toBe(true);
      expect(spy.calls.complete).toBe(1);
      // In the background: 2 s after the timeout, then 4 s after that attempt's own timeout.
      await elapse(7000);
      expect(spy.calls.complete).toBe(3);
      expect((await beginReply(engine, 'store-hangs')).status).toBe(409);
    });

    it('reports executed, not lease-lost, when a store that timed out landed and a later attempt finds its record', async () => {
      vi.useFakeTimers();
      const { engine, spy, events } = setup({ backendTimeout: 1 });
      let land!: () => void;
      spy.overrides.complete = (key, token, record, ttlMs) =>
        new Promise((resolve) => {
          land = () => resolve(spy.inner.complete(key, token, record, ttlMs));
        });
      const ticket = await beginTicket(engine, 'late-store');
      const settled = Promise.resolve(engine.finish(ticket, response()));
      await elapse(1100);
      await settled;
      // The hung backend wakes and runs the store after its caller gave up on it.
      land();
      spy.overrides.complete = undefined;
      await elapse(2100);
      expect(spy.calls.complete).toBe(2);
      expect(events.map((event) => event.outcome)).toEqual(['executed']);
      expect((await beginReply(engine, 'late-store')).replayed).toBe(true);
    });

    it('still reports lease-lost when the key was taken over and no attempt of the store landed', async () => {
      vi.useFakeTimers();
      const { engine, spy, events } = setup({ backendTimeout: 1 });
      spy.overrides.complete = () => new Promise<boolean>(() => {});
      const ticket = await beginTicket(engine, 'taken-over');
      const settled = Promise.resolve(engine.finish(ticket, response()));
      await elapse(1100);
      await settled;
      spy.overrides.complete = () => false;
      await elapse(2100);
      expect(events.map((event) => event.outcome)).toEqual(['lease-lost']);
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

    /** The process warnings emitted while `run` runs. */
    async function warningsDuring(run: () => Promise<unknown>): Promise<(Error & { code?: string })[]> {
      const warnings: (Error & { code?: string })[] = [];
      const onWarning = (warning: Error) => warnings.push(warning);
      process.on('warning', onWarning);
      try {
        await run();
        // 'warning' events are emitted on the next tick.
        await new Promise((resolve) => setImmediate(resolve));
      } finally {
        process.off('warning', onWarning);
      }
      return warnings;
    }

    it('warns of a backend failure once a minute without onEvent, counting the ones between', async () => {
      const now = vi.spyOn(Date, 'now');
      try {
        let clock = 1_000_000;
        now.mockImplementation(() => clock);
        const failing = () => Promise.reject(new Error('connect ECONNREFUSED 127.0.0.1:6379'));
        const engine = new IdempotencyEngine<FakeRequest>(
          { backend: new SpyBackend(memory(), { acquire: failing }) },
          { sha256: nodeSha256 },
        );
        const first = await warningsDuring(() => beginReply(engine, 'down-1'));
        expect(first).toHaveLength(1);
        expect(first[0]!.code).toBe('IDEMPOTENCY_BACKEND_ERROR');
        expect(first[0]!.message).toBe(
          'idempotency-header: the backend failed; while it does, requests get 503 (onBackendError: fail-closed): The idempotency backend failed: connect ECONNREFUSED 127.0.0.1:6379. Pass onEvent to observe every one.',
        );
        clock += 59_999;
        expect(
          await warningsDuring(async () => {
            await beginReply(engine, 'down-2');
            await beginReply(engine, 'down-3');
          }),
        ).toEqual([]);
        clock += 1;
        const later = await warningsDuring(() => beginReply(engine, 'down-4'));
        expect(later.map((warning) => warning.message)).toEqual([
          expect.stringContaining(
            'ECONNREFUSED 127.0.0.1:6379 (2 more failures since the previous warning).',
          ),
        ]);
      } finally {
        now.mockRestore();
      }
    });

    it('warns of a response not stored because its lease was lost, without onEvent', async () => {
      const engine = new IdempotencyEngine<FakeRequest>(
        { backend: new SpyBackend(memory(), { complete: () => false }) },
        { sha256: nodeSha256 },
      );
      const ticket = await beginTicket(engine, 'lost');
      const warnings = await warningsDuring(() => Promise.resolve(engine.finish(ticket, response(200))));
      expect(warnings.map((warning) => warning.message)).toEqual([
        'idempotency-header: a response was sent but not stored: its lease had lapsed or its key was forgotten with force, and a retry may have run the key again (a backend unreachable for longer than lockTimeout, or a forget with force by an operator). Pass onEvent to observe every one.',
      ]);
    });

    it('warns of nothing when onEvent observes the failures, and says what fail-open does', async () => {
      const failing = () => Promise.reject(new Error('ECONNREFUSED'));
      const observed = setup({}, { acquire: failing });
      expect(await warningsDuring(() => beginReply(observed.engine, 'down'))).toEqual([]);
      expect(observed.events.map((event) => event.outcome)).toEqual(['backend-error']);
      const open = new IdempotencyEngine<FakeRequest>(
        { backend: new SpyBackend(memory(), { acquire: failing }), onBackendError: 'fail-open' },
        { sha256: nodeSha256 },
      );
      const warnings = await warningsDuring(() => begin(open, 'down'));
      expect(warnings.map((warning) => warning.message)).toEqual([
        expect.stringContaining('requests run without idempotency (onBackendError: fail-open): '),
      ]);
    });

    it('answers 503 as problem details when errorFormat is problem', async () => {
      const { engine } = setup({ errorFormat: 'problem' }, { acquire: () => Promise.reject(new Error('x')) });
      const reply = await beginReply(engine, 'down');
      expect(reply.headers).toEqual([['content-type', 'application/problem+json']]);
      expect(JSON.parse(text(reply))).toMatchObject({ status: 503, title: 'Service Unavailable' });
    });
  });

  describe('lease renewal', () => {
    it('renews the lease every third of lockTimeout while a ticket is open, and stops after finish', async () => {
      vi.useFakeTimers();
      const { engine, spy } = setup({ lockTimeout: 3 });
      const ticket = await beginTicket(engine, 'long-running');
      await elapse(3100);
      expect(spy.calls.renew).toBe(3);
      await engine.finish(ticket, response());
      await elapse(3000);
      expect(spy.calls.renew).toBe(3);
      expect((await beginReply(engine, 'long-running')).replayed).toBe(true);
    });

    it('keeps the key locked long past lockTimeout while the ticket is open', async () => {
      vi.useFakeTimers();
      const { engine } = setup({ lockTimeout: 1 });
      const ticket = await beginTicket(engine, 'outlives');
      await elapse(3000);
      // Three leases' worth: without renewal the key would be free again.
      expect((await beginReply(engine, 'outlives')).status).toBe(409);
      await engine.fail(ticket);
      expect(await begin(engine, 'outlives')).toBeInstanceOf(Ticket);
    });

    it('stops renewing after fail', async () => {
      vi.useFakeTimers();
      const { engine, spy } = setup({ lockTimeout: 1 });
      const ticket = await beginTicket(engine, 'released');
      await elapse(400);
      await engine.fail(ticket);
      expect(spy.calls.renew).toBe(1);
      await elapse(2000);
      expect(spy.calls.renew).toBe(1);
    });

    it('renews every open ticket with its own key and token, for the full lease', async () => {
      vi.useFakeTimers();
      const { engine, spy } = setup({ lockTimeout: 1.5 });
      const renewals: [string, string, number][] = [];
      spy.overrides.renew = (key, token, leaseMs) => {
        renewals.push([key, token, leaseMs]);
        return spy.inner.renew(key, token, leaseMs);
      };
      const a = await beginTicket(engine, 'a');
      const b = await beginTicket(engine, 'b');
      await elapse(600);
      expect(renewals).toContainEqual([a.storageKey, a.token, 1500]);
      expect(renewals).toContainEqual([b.storageKey, b.token, 1500]);
      await engine.finish(a, response());
      await engine.finish(b, response());
    });

    it('survives a renew that throws or rejects', async () => {
      vi.useFakeTimers();
      let calls = 0;
      const { engine } = setup(
        { lockTimeout: 1 },
        {
          renew: () => {
            calls++;
            if (calls % 2 === 0) return Promise.reject(new Error('renew rejected'));
            throw new Error('renew threw');
          },
        },
      );
      const ticket = await beginTicket(engine, 'renew-fails');
      await elapse(1000);
      expect(calls).toBeGreaterThanOrEqual(2);
      await engine.finish(ticket, response());
    });

    it('does not renew in a tight loop when the lease is longer than a timer can wait', async () => {
      // A third of this lease is beyond setInterval's 2^31 - 1 ms limit, which Node.js turns into 1 ms.
      const { engine, spy } = setup({ lockTimeout: 10_000_000 });
      const ticket = await beginTicket(engine, 'very-long');
      await sleep(100);
      expect(spy.calls.renew).toBe(0);
      await engine.fail(ticket);
    });

    describe("the ticket's signal", () => {
      it('stays quiet while the lease is held', async () => {
        vi.useFakeTimers();
        const { engine } = setup({ lockTimeout: 1 });
        const ticket = await beginTicket(engine, 'held');
        const signal = ticket.signal;
        await elapse(2000);
        expect(signal.aborted).toBe(false);
        await engine.finish(ticket, response());
        expect(signal.aborted).toBe(false);
      });

      it('aborts when a renewal finds the lease taken over, so that the handler can stop', async () => {
        vi.useFakeTimers();
        const { engine } = setup({ lockTimeout: 1 }, { renew: () => false });
        const ticket = await beginTicket(engine, 'taken');
        const signal = ticket.signal;
        await elapse(400);
        expect(signal.aborted).toBe(true);
        expect((signal.reason as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_LEASE_LOST');
        expect(ticket.leaseLost).toBe(true);
      });

      it('aborts once no renewal succeeded for a whole lease (a long backend outage)', async () => {
        vi.useFakeTimers();
        const { engine } = setup({ lockTimeout: 1 }, { renew: () => Promise.reject(new Error('down')) });
        const ticket = await beginTicket(engine, 'outage');
        await elapse(700);
        expect(ticket.signal.aborted).toBe(false);
        await elapse(700);
        expect(ticket.signal.aborted).toBe(true);
        engine.fail(ticket);
      });

      it('is aborted from the start when asked for after the lease was lost', async () => {
        vi.useFakeTimers();
        const { engine } = setup({ lockTimeout: 1 }, { renew: () => false });
        const ticket = await beginTicket(engine, 'late');
        await elapse(400);
        expect(ticket.signal.aborted).toBe(true);
      });
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
        const engine = new IdempotencyEngine({ backend, lockTimeout: 1 });
        const ticket = await engine.begin({}, 'POST', '/orders', 'never-finishes', undefined, performance.now());
        console.log('began ' + ticket.kind);
        setTimeout(() => console.log('renewed ' + (renewed > 0)), 500);
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
      await engine.finish(a, response(201, '{"tenant":"acme"}'));
      await engine.finish(b, response(201, '{"tenant":"globex"}'));
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
      engine.fail(scoped);
      engine.fail(unscoped);
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
      for (const ticket of tickets) engine.fail(ticket);
    });

    it('meets its own key within one scope', async () => {
      const { engine } = setup({ scope: (req) => req.tenant });
      const ticket = await beginTicket(engine, 'k', { tenant: 'acme' });
      expect((await beginReply(engine, 'k', { req: { tenant: 'acme' } })).status).toBe(409);
      engine.fail(ticket);
    });

    it('answers a scope function that throws by throwing, before any backend call', async () => {
      const failure = new Error('no tenant');
      const { engine, spy } = setup({
        scope: () => {
          throw failure;
        },
      });
      expect(() => engine.begin({}, 'POST', '/orders', 'k', BODY, performance.now())).toThrow(failure);
      expect(spy.calls.acquire).toBe(0);
    });

    it.each([
      ['null', null],
      ['a number', 42],
      ['an object', {}],
    ])('refuses a scope of %s rather than mixing it into another namespace', (_, value) => {
      const { engine, spy } = setup({ scope: () => value as unknown as string });
      let error: unknown;
      try {
        engine.begin({}, 'POST', '/orders', 'k', BODY, performance.now());
      } catch (thrown) {
        error = thrown;
      }
      expect(error).toBeInstanceOf(IdempotencyError);
      expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_SCOPE');
      expect(spy.calls.acquire).toBe(0);
    });

    it('hashes the scoped key into events, so that two scopes report different hashes', async () => {
      const { engine, events } = setup({ scope: (req) => req.tenant });
      await engine.finish(await beginTicket(engine, 'k', { tenant: 'acme' }), response());
      await engine.finish(await beginTicket(engine, 'k', { tenant: 'globex' }), response());
      expect(events[0]!.keyHash).not.toBe(events[1]!.keyHash);
    });
  });

  describe('onEvent', () => {
    it('is called once per handled request, with the outcome, a key hash, method, status and duration', async () => {
      const { engine, events } = setup();
      const ticket = await beginTicket(engine, 'k');
      await sleep(5);
      await engine.finish(ticket, response(201));
      expect(events).toHaveLength(1);
      const [event] = events;
      expect(event).toEqual({
        outcome: 'executed',
        keyHash: sha256(ticket.storageKey),
        method: 'POST',
        status: 201,
        durationMs: expect.any(Number),
        backendMs: expect.any(Number),
      });
      expect(event!.durationMs).toBeGreaterThanOrEqual(4);
      expect(event!.backendMs).toBeGreaterThanOrEqual(0);
      expect(event!.backendMs).toBeLessThan(event!.durationMs);
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
      await expect(Promise.resolve(engine.finish(ticket, response()))).resolves.toBeUndefined();
      expect(await beginReply(engine, 'k')).toMatchObject({ replayed: true });
      const other = await beginTicket(engine, 'other');
      await expect(Promise.resolve(engine.fail(other))).resolves.toBeUndefined();
    });

    it('never carries the raw key, whatever the outcome', async () => {
      const key = `secret-${randomUUID()}`;
      const events: IdempotencyEvent[] = [];
      const onEvent = (event: IdempotencyEvent) => events.push(event);
      const { engine } = setup({ onEvent, scope: (req) => req.tenant });
      const ticket = await beginTicket(engine, key, { tenant: 'acme' });
      await beginReply(engine, key, { req: { tenant: 'acme' } }); // conflict
      await beginReply(engine, key, { req: { tenant: 'acme' }, url: '/other' }); // mismatch
      await engine.finish(ticket, response()); // executed
      await beginReply(engine, key, { req: { tenant: 'acme' } }); // replayed
      await engine.finish(await beginTicket(engine, key, { tenant: 'globex' }), response(500)); // not-stored
      const failing = setup({ onEvent }, { acquire: () => Promise.reject(new Error('down')) });
      await beginReply(failing.engine, key); // backend-error
      const lost = setup({ onEvent }, { complete: () => false });
      await lost.engine.finish(await beginTicket(lost.engine, key), response()); // lease-lost
      const gone = await beginTicket(engine, key, { tenant: 'initech' });
      engine.clientLeft(gone);
      await engine.fail(gone); // abandoned
      const big = await beginTicket(engine, key, { tenant: 'umbrella' });
      await engine.finish(big, unkept()); // remembered
      await beginReply(engine, key, { req: { tenant: 'umbrella' } }); // not-replayable
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
          'abandoned',
          'remembered',
          'not-replayable',
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

describe('storageKeyOf', () => {
  it('prefixes an unscoped key with a dash, and length-prefixes a scope', () => {
    expect(storageKeyOf('3f1b6c1e-8a4d-4f5e-9b2c-7d8e9f0a1b2c')).toBe(
      '-3f1b6c1e-8a4d-4f5e-9b2c-7d8e9f0a1b2c',
    );
    expect(storageKeyOf('k', 'tenant-1')).toBe('8:tenant-1:k');
    expect(storageKeyOf('k', '')).toBe('0::k');
  });

  it('never spells one scope and key pair as another', () => {
    const pairs: [string, string | undefined][] = [
      ['b:c', 'a'],
      ['c', 'a:b'],
      ['1:a:b', undefined],
      ['b', '1:a'],
      ['-x', undefined],
      ['x', '-'],
    ];
    const keys = pairs.map(([key, scope]) => storageKeyOf(key, scope));
    expect(new Set(keys).size).toBe(pairs.length);
  });
});
