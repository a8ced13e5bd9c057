/**
 * `idempotency-header/client`: against our own `node:http` middleware on the memory backend, with faults injected
 * where they happen in production (a response lost on the wire, a connection cut while the first request runs, a
 * backend outage), each call ends with exactly one execution and that execution's response. Then the backoff's
 * timing on a fake clock, and what is never retried.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { withIdempotency } from '../src/adapters/node.js';
import { MemoryBackend } from '../src/backends/memory.js';
import {
  createIdempotentFetch,
  type FetchFunction,
  type IdempotentRetry,
  idempotentFetch,
  RETRIED_STATUSES,
} from '../src/client.js';
import { IdempotencyError } from '../src/core/errors.js';
import type { Backend } from '../src/core/types.js';
import { listen, readAll, type TestServer } from './support/http.js';

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** A fault injected into one request before the middleware sees it. */
type Fault = (req: IncomingMessage, res: ServerResponse) => void;

/** The handler's answer when the request asks for one: `/status/418` answers 418. */
interface Run {
  run: number;
  key: string | undefined;
  body: string;
}

interface Harness {
  url: string;
  /** Executions of the handler per idempotency key. */
  runs: Map<string | undefined, number>;
  /** Bodies the handler read, in order. */
  bodies: string[];
  /** Faults for the next requests, in order: each request takes the first left. */
  faults: (Fault | undefined)[];
  /** While above 0, each `acquire` fails (a backend outage) and counts down. */
  outage: { failures: number };
  /** How long the handler takes, in ms. */
  delay: { ms: number };
}

/**
 * A `node:http` server behind `withIdempotency` on a memory backend. The handler counts its runs per key and
 * answers 201 with the run number, the key and the body it read (or, on `/status/<n>`, that status).
 */
async function serve(servers: TestServer[]): Promise<Harness> {
  const memory = new MemoryBackend();
  const outage = { failures: 0 };
  const backend: Backend = {
    acquire(key, fingerprint, leaseMs) {
      if (outage.failures > 0) {
        outage.failures--;
        return Promise.reject(new Error('backend outage'));
      }
      return memory.acquire(key, fingerprint, leaseMs);
    },
    complete: (...args) => memory.complete(...args),
    release: (...args) => memory.release(...args),
    renew: (...args) => memory.renew(...args),
  };
  const runs = new Map<string | undefined, number>();
  const bodies: string[] = [];
  const delay = { ms: 0 };
  const listener = withIdempotency(
    async (req, res) => {
      const body = (await readAll(req)).toString();
      const key = req.headers['idempotency-key'] as string | undefined;
      const run = (runs.get(key) ?? 0) + 1;
      runs.set(key, run);
      bodies.push(body);
      if (delay.ms > 0) await sleep(delay.ms);
      const status = /^\/status\/(\d+)$/.exec(req.url ?? '')?.[1];
      const answer: Run = { run, key, body };
      res.writeHead(status === undefined ? 201 : Number(status), { 'content-type': 'application/json' });
      res.end(JSON.stringify(answer));
    },
    { backend, onHandlerError: () => {} },
  );
  const faults: (Fault | undefined)[] = [];
  const server = createServer((req, res) => {
    faults.shift()?.(req, res);
    listener(req, res);
  });
  const running = await listen(server);
  servers.push({
    url: running.url,
    close: async () => {
      await running.close();
      memory.close();
    },
  });
  return { url: running.url, runs, bodies, faults, outage, delay };
}

/**
 * The response never reaches the client: the connection is destroyed at the first byte the server writes, after
 * the handler ran and its response was stored.
 */
const loseResponse: Fault = (req) => {
  const socket = req.socket;
  socket.write = (() => {
    socket.destroy();
    return false;
  }) as typeof socket.write;
};

/** The connection breaks `ms` after the request arrived, as a client timeout or a network fault would break it. */
const cutAfter =
  (ms: number): Fault =>
  (req) => {
    setTimeout(() => req.socket.destroy(new Error('connection reset')), ms);
  };

function post(body: string, headers: Record<string, string> = {}): RequestInit {
  return { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body };
}

describe('idempotentFetch against the node:http middleware', () => {
  const servers: TestServer[] = [];
  let server: Harness;
  let retries: IdempotentRetry[];
  const onRetry = (retry: IdempotentRetry) => retries.push(retry);

  beforeEach(async () => {
    server = await serve(servers);
    retries = [];
  });

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });

  it('sends a new v4 key with a POST, and one attempt is enough when nothing fails', async () => {
    const response = await idempotentFetch(`${server.url}/orders`, post('{"item":"book"}'), { onRetry });
    expect(response.status).toBe(201);
    const run = (await response.json()) as Run;
    expect(run.key).toMatch(UUID4);
    expect(run).toEqual({ run: 1, key: run.key, body: '{"item":"book"}' });
    expect(retries).toEqual([]);
  });

  it('gives each logical call its own key', async () => {
    const first = (await (await idempotentFetch(`${server.url}/orders`, post('{}'))).json()) as Run;
    const second = (await (await idempotentFetch(`${server.url}/orders`, post('{}'))).json()) as Run;
    expect(first.key).not.toBe(second.key);
    expect([first.run, second.run]).toEqual([1, 1]);
  });

  describe('a response lost on the wire', () => {
    it('retries with the same key and gets the stored response: one execution', async () => {
      server.faults.push(loseResponse);
      const response = await idempotentFetch(`${server.url}/orders`, post('{"item":"lamp"}'), { onRetry });
      expect(response.status).toBe(201);
      expect(response.headers.get('idempotent-replayed')).toBe('true');
      const run = (await response.json()) as Run;
      expect(run).toEqual({ run: 1, key: run.key, body: '{"item":"lamp"}' });
      expect(server.runs.get(run.key)).toBe(1);
      expect(retries).toHaveLength(1);
      expect(retries[0]).toMatchObject({ key: run.key, attempt: 1, status: undefined });
      expect(retries[0]!.error).toBeInstanceOf(TypeError);
    });

    it('reads a stream body once and sends the same bytes again, so the retry is the same request', async () => {
      server.faults.push(loseResponse);
      const bytes = new TextEncoder().encode('{"item":"streamed","n":1}');
      const stream = new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(bytes.subarray(0, 10));
          controller.enqueue(bytes.subarray(10));
          controller.close();
        },
      });
      const response = await idempotentFetch(`${server.url}/orders`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: stream,
        duplex: 'half',
      } as RequestInit);
      expect(response.status).toBe(201);
      expect(response.headers.get('idempotent-replayed')).toBe('true');
      const run = (await response.json()) as Run;
      expect(run.body).toBe('{"item":"streamed","n":1}');
      expect(server.runs.get(run.key)).toBe(1);
    });

    it('takes a Request with a body as its input and resends its bytes', async () => {
      server.faults.push(loseResponse);
      const request = new Request(`${server.url}/orders`, post('{"item":"from a Request"}'));
      const response = await idempotentFetch(request);
      expect(response.headers.get('idempotent-replayed')).toBe('true');
      const run = (await response.json()) as Run;
      expect(run.body).toBe('{"item":"from a Request"}');
      expect(server.runs.get(run.key)).toBe(1);
    });
  });

  describe('a 409 while the first request runs', () => {
    it('waits Retry-After after the 409 and gets the first run’s response: one execution', async () => {
      // The first attempt's connection breaks while its handler still runs; the second attempt meets the lock.
      server.delay.ms = 600;
      server.faults.push(cutAfter(50));
      const started = performance.now();
      const response = await idempotentFetch(`${server.url}/orders`, post('{"item":"chair"}'), { onRetry });
      const elapsed = performance.now() - started;
      expect(response.status).toBe(201);
      expect(response.headers.get('idempotent-replayed')).toBe('true');
      const run = (await response.json()) as Run;
      expect(run).toEqual({ run: 1, key: run.key, body: '{"item":"chair"}' });
      expect(server.runs.get(run.key)).toBe(1);
      expect(retries.map((retry) => retry.status)).toEqual([undefined, 409]);
      expect(retries[1]).toMatchObject({ attempt: 2, retryAfterMs: 1000 });
      expect(retries[1]!.delayMs).toBeGreaterThanOrEqual(1000);
      expect(elapsed).toBeGreaterThanOrEqual(1000);
    });

    it('lets two calls with the caller’s own key share one execution', async () => {
      server.delay.ms = 300;
      const key = crypto.randomUUID();
      const [a, b] = await Promise.all(
        [0, 1].map(async (i) => {
          if (i === 1) await sleep(30);
          const response = await idempotentFetch(`${server.url}/orders`, post('{"item":"desk"}'), {
            key,
            onRetry,
          });
          return { status: response.status, text: await response.text() };
        }),
      );
      expect(a).toEqual(b);
      expect(a!.status).toBe(201);
      expect(JSON.parse(a!.text)).toEqual({ run: 1, key, body: '{"item":"desk"}' });
      expect(server.runs.get(key)).toBe(1);
      expect(retries.map((retry) => retry.status)).toEqual([409]);
      expect(retries[0]!.key).toBe(key);
    });
  });

  describe('a 503 from a backend outage', () => {
    it('retries until the backend is back: one execution', async () => {
      server.outage.failures = 2;
      const response = await idempotentFetch(`${server.url}/orders`, post('{"item":"pen"}'), { onRetry });
      expect(response.status).toBe(201);
      expect(response.headers.get('idempotent-replayed')).toBeNull();
      const run = (await response.json()) as Run;
      expect(run).toEqual({ run: 1, key: run.key, body: '{"item":"pen"}' });
      expect(server.runs.get(run.key)).toBe(1);
      expect(retries.map((retry) => [retry.attempt, retry.status])).toEqual([
        [1, 503],
        [2, 503],
      ]);
      expect(new Set(retries.map((retry) => retry.key))).toEqual(new Set([run.key]));
    });

    it('returns the last 503 when the attempts run out', async () => {
      server.outage.failures = 10;
      const response = await idempotentFetch(`${server.url}/orders`, post('{}'), { onRetry, maxAttempts: 3 });
      expect(response.status).toBe(503);
      expect(await response.json()).toEqual({ detail: 'Idempotency backend unavailable; retry later' });
      expect(retries).toHaveLength(2);
      expect(server.runs.size).toBe(0);
    });
  });

  describe('answers that are final', () => {
    it.each([400, 401, 403, 404, 410, 418, 422, 500])('does not retry a %i', async (status) => {
      const response = await idempotentFetch(`${server.url}/status/${status}`, post('{}'), { onRetry });
      expect(response.status).toBe(status);
      expect(retries).toEqual([]);
      const run = (await response.json()) as Run;
      expect(server.runs.get(run.key)).toBe(1);
    });

    it('does not retry the 422 of a key reused for another request', async () => {
      const key = crypto.randomUUID();
      await (await idempotentFetch(`${server.url}/orders`, post('{"n":1}'), { key })).arrayBuffer();
      const response = await idempotentFetch(`${server.url}/orders`, post('{"n":2}'), { key, onRetry });
      expect(response.status).toBe(422);
      expect(retries).toEqual([]);
      expect(server.runs.get(key)).toBe(1);
    });

    it('does not retry the 410 of a request that ran but whose response was not stored', async () => {
      // A response over maxResponseBytes is remembered without its body: a retry gets 410, and must stop there.
      const big = 'x'.repeat(64);
      const listener = withIdempotency(
        (_req, res) => {
          res.writeHead(201, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ big }));
        },
        { backend: new MemoryBackend(), maxResponseBytes: 16 },
      );
      const small = await listen(createServer(listener));
      servers.push(small);
      const key = crypto.randomUUID();
      await (await idempotentFetch(small.url, post('{}'), { key })).arrayBuffer();
      const response = await idempotentFetch(small.url, post('{}'), { key, onRetry });
      expect(response.status).toBe(410);
      expect(retries).toEqual([]);
    });
  });

  describe('which requests it handles', () => {
    it('passes a GET to fetch as it is: no key, no retry', async () => {
      server.outage.failures = 5;
      const seen: Request[] = [];
      const fetchSpy: FetchFunction = (request) => {
        seen.push(request);
        return fetch(request);
      };
      const response = await idempotentFetch(`${server.url}/status/503`, undefined, {
        fetch: fetchSpy,
        onRetry,
      });
      // GET is not an applicable method on the server either: the handler answers.
      expect(response.status).toBe(503);
      expect(seen).toHaveLength(1);
      expect(seen[0]!.headers.has('idempotency-key')).toBe(false);
      expect(retries).toEqual([]);
    });

    it('handles the methods it is given, compared case-insensitively', async () => {
      const seen: Request[] = [];
      const api = createIdempotentFetch({
        methods: ['put'],
        fetch: async (request) => {
          seen.push(request);
          return new Response(null, { status: 204 });
        },
      });
      await api('http://127.0.0.1:9/a', { method: 'PUT', body: 'x' });
      await api('http://127.0.0.1:9/a', { method: 'POST', body: 'x' });
      expect(seen.map((request) => request.headers.get('idempotency-key'))).toEqual([
        expect.stringMatching(UUID4),
        null,
      ]);
    });

    it('keeps the key the request carries, under the configured header name', async () => {
      const seen: string[] = [];
      server.outage.failures = 1;
      const response = await idempotentFetch(
        `${server.url}/orders`,
        post('{}', { 'idempotency-key': 'caller-key-1' }),
        {
          key: 'ignored',
          fetch: async (request) => {
            seen.push(request.headers.get('idempotency-key')!);
            return fetch(request);
          },
        },
      );
      expect(response.status).toBe(201);
      expect(seen).toEqual(['caller-key-1', 'caller-key-1']);
      const custom: string[] = [];
      await createIdempotentFetch({
        headerName: 'X-Request-Key',
        generateKey: () => 'generated',
        fetch: async (request) => {
          custom.push(`${request.headers.get('x-request-key')}/${request.headers.get('idempotency-key')}`);
          return new Response(null, { status: 204 });
        },
      })('http://127.0.0.1:9/', { method: 'POST' });
      expect(custom).toEqual(['generated/null']);
    });
  });

  describe('network errors', () => {
    it('retries them and throws the last one when every attempt failed', async () => {
      const closed = await listen(createServer());
      await closed.close();
      const failure = await idempotentFetch(`${closed.url}/orders`, post('{}'), {
        onRetry,
        maxAttempts: 3,
        baseDelayMs: 1,
      }).catch((error: unknown) => error);
      expect(failure).toBeInstanceOf(TypeError);
      expect(retries.map((retry) => retry.attempt)).toEqual([1, 2]);
      expect(retries.every((retry) => retry.error instanceof TypeError)).toBe(true);
    });
  });

  describe('AbortSignal', () => {
    it('rejects with the reason at once when aborted during a wait, and sends nothing more', async () => {
      server.outage.failures = 100;
      const controller = new AbortController();
      let attempts = 0;
      const call = idempotentFetch(
        `${server.url}/orders`,
        { ...post('{}'), signal: controller.signal },
        {
          baseDelayMs: 60_000,
          maxDelayMs: 60_000,
          fetch: (request) => {
            attempts++;
            return fetch(request);
          },
          onRetry: () => setTimeout(() => controller.abort(new Error('stop')), 20),
        },
      );
      const started = performance.now();
      await expect(call).rejects.toThrow('stop');
      expect(performance.now() - started).toBeLessThan(5_000);
      expect(attempts).toBe(1);
    });

    it('rejects at once for a signal already aborted, sending nothing', async () => {
      let attempts = 0;
      const call = idempotentFetch(
        `${server.url}/orders`,
        { ...post('{}'), signal: AbortSignal.abort(new Error('before')) },
        {
          fetch: async () => {
            attempts++;
            return new Response();
          },
        },
      );
      await expect(call).rejects.toThrow('before');
      expect(attempts).toBe(0);
    });

    it('does not retry an attempt its signal stopped', async () => {
      server.delay.ms = 2_000;
      const call = idempotentFetch(
        `${server.url}/orders`,
        { ...post('{}'), signal: AbortSignal.timeout(100) },
        { onRetry },
      );
      await expect(call).rejects.toMatchObject({ name: 'TimeoutError' });
      expect(retries).toEqual([]);
    });
  });
});

describe('backoff, on a fake clock', () => {
  afterEach(() => {
    vi.useRealTimers();
    vi.restoreAllMocks();
  });

  /** A fetch that answers `responses` in order (the last one repeated), recording when each attempt came. */
  function scripted(responses: (() => Response)[]) {
    const times: number[] = [];
    const fetch: FetchFunction = async () => {
      times.push(Date.now());
      return responses[Math.min(times.length - 1, responses.length - 1)]!();
    };
    return { fetch, times };
  }

  async function run(promise: Promise<Response>): Promise<Response> {
    await vi.runAllTimersAsync();
    return promise;
  }

  it('waits a uniformly drawn part of a ceiling that doubles from baseDelayMs up to maxDelayMs', async () => {
    vi.useFakeTimers({ now: 0 });
    vi.spyOn(Math, 'random').mockReturnValue(0.5);
    const { fetch, times } = scripted([() => new Response(null, { status: 503 })]);
    const delays: number[] = [];
    const response = await run(
      idempotentFetch(
        'http://api.test/orders',
        { method: 'POST' },
        {
          fetch,
          maxAttempts: 7,
          baseDelayMs: 100,
          maxDelayMs: 1_000,
          onRetry: (retry) => delays.push(retry.delayMs),
        },
      ),
    );
    expect(response.status).toBe(503);
    // Ceilings 100, 200, 400, 800, 1000, 1000: half of each.
    expect(delays).toEqual([50, 100, 200, 400, 500, 500]);
    expect(times).toEqual([0, 50, 150, 350, 750, 1250, 1750]);
  });

  it('draws each wait between 0 and the ceiling (full jitter)', async () => {
    vi.useFakeTimers({ now: 0 });
    const draws = [0, 0.999];
    vi.spyOn(Math, 'random').mockImplementation(() => draws.shift() ?? 0);
    const { fetch, times } = scripted([() => new Response(null, { status: 502 })]);
    await run(idempotentFetch('http://api.test/', { method: 'POST' }, { fetch, maxAttempts: 3 }));
    expect(times).toEqual([0, 0, 199]);
  });

  it('never retries sooner than Retry-After in seconds', async () => {
    vi.useFakeTimers({ now: 0 });
    vi.spyOn(Math, 'random').mockReturnValue(0.5);
    const { fetch, times } = scripted([
      () => new Response(null, { status: 429, headers: { 'retry-after': '3' } }),
      () => new Response(null, { status: 409, headers: { 'retry-after': '0' } }),
      () => new Response('{}', { status: 201 }),
    ]);
    const response = await run(idempotentFetch('http://api.test/', { method: 'POST' }, { fetch }));
    expect(response.status).toBe(201);
    // 3 s after the 429; after the 409's "0", the jittered backoff (half of 200 ms).
    expect(times).toEqual([0, 3_000, 3_100]);
  });

  it('honours Retry-After as an HTTP date, and a date already past as no wait', async () => {
    vi.useFakeTimers({ now: Date.parse('2030-01-01T00:00:00Z') });
    vi.spyOn(Math, 'random').mockReturnValue(0);
    const start = Date.now();
    const { fetch, times } = scripted([
      () => new Response(null, { status: 503, headers: { 'retry-after': 'Tue, 01 Jan 2030 00:00:07 GMT' } }),
      () => new Response(null, { status: 503, headers: { 'retry-after': 'Mon, 31 Dec 2029 00:00:00 GMT' } }),
      () => new Response(null, { status: 504, headers: { 'retry-after': 'soon' } }),
      () => new Response('{}', { status: 200 }),
    ]);
    const retried: (number | undefined)[] = [];
    const response = await run(
      idempotentFetch(
        'http://api.test/',
        { method: 'POST' },
        {
          fetch,
          onRetry: (retry) => retried.push(retry.retryAfterMs),
        },
      ),
    );
    expect(response.status).toBe(200);
    expect(times.map((time) => time - start)).toEqual([0, 7_000, 7_000, 7_000]);
    expect(retried).toEqual([7_000, 0, undefined]);
  });

  it('returns the last answer rather than wait past maxElapsedMs', async () => {
    vi.useFakeTimers({ now: 0 });
    const { fetch, times } = scripted([
      () => new Response(null, { status: 503, headers: { 'retry-after': '1' } }),
      () => new Response(null, { status: 503, headers: { 'retry-after': '30' } }),
    ]);
    const response = await run(
      idempotentFetch('http://api.test/', { method: 'POST' }, { fetch, maxElapsedMs: 10_000 }),
    );
    expect(response.status).toBe(503);
    expect(response.headers.get('retry-after')).toBe('30');
    expect(times).toEqual([0, 1_000]);
  });

  it('waits after network errors too, and rethrows the last', async () => {
    vi.useFakeTimers({ now: 0 });
    vi.spyOn(Math, 'random').mockReturnValue(1);
    const times: number[] = [];
    const call = idempotentFetch(
      'http://api.test/',
      { method: 'PATCH' },
      {
        maxAttempts: 3,
        fetch: async () => {
          times.push(Date.now());
          throw new TypeError(`fetch failed ${times.length}`);
        },
      },
    );
    const settled = call.catch((error: unknown) => error);
    await vi.runAllTimersAsync();
    expect(await settled).toEqual(new TypeError('fetch failed 3'));
    expect(times).toEqual([0, 100, 300]);
  });
});

describe('options', () => {
  it('retries exactly 409, 429, 502, 503 and 504', () => {
    expect([...RETRIED_STATUSES].sort()).toEqual([409, 429, 502, 503, 504]);
  });

  it.each([
    [{ maxAttempts: 0 }, 'maxAttempts'],
    [{ maxAttempts: 1.5 }, 'maxAttempts'],
    [{ baseDelayMs: -1 }, 'baseDelayMs'],
    [{ maxElapsedMs: Number.NaN }, 'maxElapsedMs'],
    [{ headerName: 'bad header' }, 'headerName'],
    [{ methods: [] }, 'methods'],
    [{ onRetry: 'log' }, 'onRetry'],
    [{ retries: 3 }, 'retries'],
    [{ key: 'shared' }, 'key'],
  ])('refuses %j when the fetch is made, naming `%s`', (options, name) => {
    let thrown: unknown;
    try {
      createIdempotentFetch(options as never);
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(IdempotencyError);
    expect((thrown as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_OPTION');
    expect((thrown as Error).message).toContain(`\`${name}\``);
  });

  it('rejects a call with an invalid per-call option instead of throwing', async () => {
    const api = createIdempotentFetch();
    await expect(api('http://api.test/', { method: 'POST' }, { key: '' })).rejects.toMatchObject({
      code: 'ERR_IDEMPOTENCY_OPTION',
    });
    await expect(idempotentFetch('http://api.test/', { method: 'POST' }, { maxAttempts: 0 })).rejects.toThrow(
      IdempotencyError,
    );
  });

  it('lets per-call options override the preset ones', async () => {
    let attempts = 0;
    const api = createIdempotentFetch({
      maxAttempts: 5,
      baseDelayMs: 0,
      fetch: async () => {
        attempts++;
        return new Response(null, { status: 503 });
      },
    });
    expect((await api('http://api.test/', { method: 'POST' }, { maxAttempts: 2 })).status).toBe(503);
    expect(attempts).toBe(2);
  });
});
