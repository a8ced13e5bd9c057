/**
 * `idempotency-header proxy` end to end: the command line as users run it, in front of a service written in
 * Python (`upstream.py`, the standard library's `http.server`) that knows nothing of idempotency keys and counts
 * how often each key's request ran.
 */
import { randomUUID } from 'node:crypto';
import { request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { type AddressInfo, createServer as createNetServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createIdempotencyProxy, type ProxyRequestLog } from '../../src/proxy/server.js';
import { type LogLine, type ProxyProcess, startProxy, startUpstream, type Upstream } from './processes.js';

interface Answer {
  status: number;
  headers: Headers;
  text: string;
}

async function send(url: string, init: RequestInit = {}): Promise<Answer> {
  const response = await fetch(url, init);
  return { status: response.status, headers: response.headers, text: await response.text() };
}

function post(url: string, key: string | undefined, body: string, extra: Record<string, string> = {}) {
  const headers: Record<string, string> = { 'content-type': 'application/json', ...extra };
  if (key !== undefined) headers['idempotency-key'] = key;
  return send(url, { method: 'POST', headers, body });
}

/** Sends a request with exactly these header lines (names, case, order and repeats kept). */
function sendRaw(
  url: string,
  method: string,
  rawHeaders: string[],
  body?: Buffer | Buffer[],
): Promise<{ status: number; headers: IncomingHttpHeaders; rawHeaders: string[]; text: string }> {
  // Node.js adds nothing to a list of header lines, not even Host.
  const lines = rawHeaders.some((name, i) => i % 2 === 0 && name.toLowerCase() === 'host')
    ? rawHeaders
    : ['Host', new URL(url).host, ...rawHeaders];
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method, headers: lines as unknown as Record<string, string> }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () =>
        resolve({
          status: res.statusCode!,
          headers: res.headers,
          rawHeaders: res.rawHeaders,
          text: Buffer.concat(chunks).toString(),
        }),
      );
      res.on('error', reject);
    });
    req.on('error', reject);
    for (const chunk of Array.isArray(body) ? body : body === undefined ? [] : [body]) req.write(chunk);
    req.end();
  });
}

interface Echo {
  method: string;
  path: string;
  headers: [string, string][];
  bodyLength: number;
  body: string | null;
}

const keyOf = () => `key-${randomUUID()}`;

describe('idempotency-header proxy in front of a Python service', () => {
  let upstream: Upstream;
  let proxy: ProxyProcess;

  beforeAll(async () => {
    upstream = await startUpstream();
    proxy = await startProxy(['--upstream', upstream.url]);
  }, 30_000);

  afterAll(async () => {
    await proxy?.stop();
    await upstream?.stop();
  });

  describe('keyed requests', () => {
    it('runs a POST once and replays its response byte for byte, with Idempotent-Replayed', async () => {
      const key = keyOf();
      const first = await post(`${proxy.url}/orders`, key, '{"item":"book"}');
      expect(first.status).toBe(201);
      expect(first.headers.get('idempotent-replayed')).toBeNull();
      const order = JSON.parse(first.text) as { key: string; run: number; total: number; body: string };
      expect(order).toMatchObject({ key, run: 1, body: '{"item":"book"}' });
      expect(first.headers.get('location')).toBe(`/orders/${order.total}`);

      const replay = await post(`${proxy.url}/orders`, key, '{"item":"book"}');
      expect(replay.status).toBe(201);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(replay.text).toBe(first.text);
      expect(replay.headers.get('location')).toBe(first.headers.get('location'));
      expect((await upstream.counts())[key]).toBe(1);
    });

    it('answers 409 to a repeat while the first runs, and 422 to the key reused for another request', async () => {
      const key = keyOf();
      const running = post(`${proxy.url}/orders?delay=500`, key, '{"n":1}');
      await sleep(150);
      const conflict = await post(`${proxy.url}/orders?delay=500`, key, '{"n":1}');
      expect(conflict.status).toBe(409);
      expect(JSON.parse(conflict.text)).toEqual({
        detail: `Request already pending for idempotency key '${key}'`,
      });
      expect(Number(conflict.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
      expect((await running).status).toBe(201);
      const other = await post(`${proxy.url}/orders?delay=500`, key, '{"n":2}');
      expect(other.status).toBe(422);
      expect((await upstream.counts())[key]).toBe(1);
    });

    it('runs a PATCH once too, and leaves GET, PUT and DELETE to the upstream every time', async () => {
      const key = keyOf();
      for (let i = 0; i < 2; i++) {
        const patch = await send(`${proxy.url}/orders`, {
          method: 'PATCH',
          headers: { 'idempotency-key': key },
        });
        expect(patch.status).toBe(201);
      }
      const putKey = keyOf();
      for (let i = 0; i < 2; i++) {
        const put = await send(`${proxy.url}/orders`, {
          method: 'PUT',
          headers: { 'idempotency-key': putKey },
        });
        expect(put.headers.get('idempotent-replayed')).toBeNull();
      }
      const counts = await upstream.counts();
      expect(counts[key]).toBe(1);
      expect(counts[putKey]).toBe(2);
    });

    it('reads a chunked request body, fingerprints it and sends it on chunked', async () => {
      const key = keyOf();
      const chunks = [Buffer.from('{"item":'), Buffer.from('"chunked"}')];
      const headers = [
        'Content-Type',
        'application/json',
        'Idempotency-Key',
        key,
        'Transfer-Encoding',
        'chunked',
      ];
      const first = await sendRaw(`${proxy.url}/orders`, 'POST', headers, chunks);
      expect(first.status).toBe(201);
      expect(JSON.parse(first.text).body).toBe('{"item":"chunked"}');
      const replay = await sendRaw(`${proxy.url}/orders`, 'POST', headers, Buffer.concat(chunks));
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect((await upstream.counts())[key]).toBe(1);
    });

    it('does not store a 5xx: the key is released and a retry runs again', async () => {
      const key = keyOf();
      expect((await post(`${proxy.url}/status/500`, key, '{}')).status).toBe(500);
      expect((await post(`${proxy.url}/status/500`, key, '{}')).status).toBe(500);
      expect((await upstream.counts())[key]).toBe(2);
    });

    it('remembers a response too large to store: it streams through, and a retry gets 410', async () => {
      const key = keyOf();
      const big = await send(`${proxy.url}/big?bytes=3000000&type=application/json`, {
        method: 'POST',
        headers: { 'idempotency-key': key },
      });
      expect(big.status).toBe(200);
      expect(big.text.length).toBe(3_000_000);
      const retry = await send(`${proxy.url}/big?bytes=3000000&type=application/json`, {
        method: 'POST',
        headers: { 'idempotency-key': key },
      });
      expect(retry.status).toBe(410);
      expect((await upstream.counts())[key]).toBe(1);
    });

    it('answers 413 to a keyed body over --max-request-bytes, and streams an unkeyed one of any size', async () => {
      const large = 'x'.repeat(3 * 1024 * 1024);
      const keyed = await post(`${proxy.url}/echo`, keyOf(), large);
      expect(keyed.status).toBe(413);
      const unkeyed = await post(`${proxy.url}/echo`, undefined, large);
      expect(unkeyed.status).toBe(200);
      expect((JSON.parse(unkeyed.text) as Echo).bodyLength).toBe(large.length);
    });
  });

  describe('as a proxy', () => {
    it('passes a request without a key through, each time', async () => {
      await post(`${proxy.url}/orders`, undefined, '{}');
      const before = (await upstream.counts()).null ?? 0;
      await post(`${proxy.url}/orders`, undefined, '{}');
      expect((await upstream.counts()).null).toBe(before + 1);
    });

    it('ends hop-by-hop request headers at the proxy and adds X-Forwarded-For, -Proto and -Host', async () => {
      const echo = await sendRaw(`${proxy.url}/echo?q=1`, 'GET', [
        'Host',
        'shop.example',
        'Connection',
        'keep-alive, X-Secret-Hop',
        'X-Secret-Hop',
        'for the proxy only',
        'Keep-Alive',
        'timeout=3',
        'TE',
        'trailers',
        'Proxy-Authorization',
        'Basic cHJveHk6c2VjcmV0',
        'Proxy-Connection',
        'keep-alive',
        'X-Forwarded-For',
        '203.0.113.7',
        'X-Custom',
        'one',
        'X-Custom',
        'two',
      ]);
      const seen = JSON.parse(echo.text) as Echo;
      expect(seen.path).toBe('/echo?q=1');
      const names = seen.headers.map(([name]) => name.toLowerCase());
      for (const hop of [
        'x-secret-hop',
        'keep-alive',
        'te',
        'trailer',
        'proxy-authorization',
        'proxy-connection',
      ]) {
        expect(names, hop).not.toContain(hop);
      }
      const header = (name: string) =>
        seen.headers.filter(([candidate]) => candidate.toLowerCase() === name).map(([, value]) => value);
      expect(header('host')).toEqual(['shop.example']);
      expect(header('x-custom')).toEqual(['one', 'two']);
      expect(header('x-forwarded-for')).toEqual(['203.0.113.7, 127.0.0.1']);
      expect(header('x-forwarded-proto')).toEqual(['http']);
      expect(header('x-forwarded-host')).toEqual(['shop.example']);
    });

    it('ends hop-by-hop response headers at the proxy, and passes end-to-end ones as they came', async () => {
      const hop = await sendRaw(`${proxy.url}/hop`, 'GET', []);
      expect(hop.status).toBe(200);
      expect(hop.headers['x-hop']).toBeUndefined();
      expect(hop.headers['proxy-authenticate']).toBeUndefined();
      expect(hop.headers.trailer).toBeUndefined();
      expect(hop.headers.upgrade).toBeUndefined();
      // The proxy's own connection management, not the upstream's.
      expect(hop.headers['keep-alive']).toBe('timeout=5');
      expect(hop.headers['x-end-to-end']).toBe('kept');
      expect(hop.headers['set-cookie']).toEqual(['a=1', 'b=2']);
      expect(hop.rawHeaders).toContain('Server');
      expect(hop.text).toBe('{"ok": true}');
    });

    it('streams a large response through untouched', async () => {
      const response = await fetch(`${proxy.url}/big?bytes=5000000`);
      expect(response.headers.get('content-type')).toBe('application/octet-stream');
      const body = Buffer.from(await response.arrayBuffer());
      expect(body.length).toBe(5_000_000);
      expect(body.every((byte) => byte === 0x78)).toBe(true);
    });

    it('answers /healthz itself, without a log line, and sends HEAD and other paths on', async () => {
      const health = await send(`${proxy.url}/healthz`);
      expect(health.status).toBe(200);
      expect(JSON.parse(health.text)).toEqual({ status: 'ok' });
      expect(health.headers.get('cache-control')).toBe('no-store');
      expect((await fetch(`${proxy.url}/healthz`, { method: 'HEAD' })).status).toBe(200);
      expect((await send(`${proxy.url}/healthz/deep`)).status).toBe(404);
      expect(proxy.lines().filter((line) => line.path === '/healthz')).toEqual([]);
    });
  });

  describe('its log', () => {
    it('writes one JSON line per request: outcome, hashed key, status and timings, never the key', async () => {
      const key = keyOf();
      const id = randomUUID();
      await post(`${proxy.url}/orders/${id}?token=secret`, key, '{}');
      await post(`${proxy.url}/orders/${id}?token=secret`, key, '{}');
      await send(`${proxy.url}/status/200/${id}`);
      const mine = (line: LogLine) => line.msg === 'request' && String(line.path).endsWith(id);
      const lines = (await waitForLines(proxy, 3, mine)) as unknown as ProxyRequestLog[];
      expect(lines).toHaveLength(3);
      const [executed, replayed, passed] = lines;
      expect(executed).toMatchObject({
        method: 'POST',
        path: `/orders/${id}`,
        status: 201,
        outcome: 'executed',
      });
      expect(replayed).toMatchObject({
        method: 'POST',
        path: `/orders/${id}`,
        status: 201,
        outcome: 'replayed',
      });
      expect(passed).toMatchObject({
        method: 'GET',
        path: `/status/200/${id}`,
        status: 200,
        outcome: 'passed',
      });
      expect(executed!.keyHash).toMatch(/^[0-9a-f]{64}$/);
      expect(replayed!.keyHash).toBe(executed!.keyHash);
      expect(passed!.keyHash).toBeUndefined();
      for (const line of lines) {
        expect(line.durationMs).toBeGreaterThanOrEqual(0);
        expect(Date.parse(line.time)).not.toBeNaN();
      }
      expect(executed!.upstreamMs).toBeGreaterThan(0);
      expect(replayed!.upstreamMs).toBeUndefined();
      expect(proxy.output()).not.toContain(key);
      expect(proxy.output()).not.toContain('secret');
    });
  });
});

/** Waits until `count` lines match, polling; resolves with them. */
async function waitForLines(proxy: ProxyProcess, count: number, match: (line: LogLine) => boolean) {
  for (let i = 0; i < 200; i++) {
    const lines = proxy.lines().filter(match);
    if (lines.length >= count) return lines;
    await sleep(10);
  }
  throw new Error(`Fewer than ${count} lines:\n${proxy.output()}`);
}

describe('when the upstream fails', () => {
  it('answers 502 and releases the key when the upstream cannot be reached', async () => {
    const port = await freePort();
    const proxy = await startProxy(['--upstream', `http://127.0.0.1:${port}`]);
    let upstream: Upstream | undefined;
    try {
      const key = keyOf();
      const down = await post(`${proxy.url}/orders`, key, '{"item":"late"}');
      expect(down.status).toBe(502);
      expect(JSON.parse(down.text).detail).toMatch(/^Bad Gateway: the upstream could not be reached/i);
      const line = await proxy.waitForLine((candidate) => candidate.msg === 'request');
      expect(line).toMatchObject({ status: 502, outcome: 'not-stored', error: 'ECONNREFUSED' });
      upstream = await startUpstream(port);
      const up = await post(`${proxy.url}/orders`, key, '{"item":"late"}');
      expect(up.status).toBe(201);
      expect(JSON.parse(up.text)).toMatchObject({ key, run: 1 });
    } finally {
      await proxy.stop();
      await upstream?.stop();
    }
  });

  describe('once it has the request', () => {
    let upstream: Upstream;
    let proxy: ProxyProcess;

    beforeAll(async () => {
      upstream = await startUpstream();
      proxy = await startProxy([
        '--upstream',
        upstream.url,
        '--lock-timeout',
        '1',
        '--error-format',
        'problem',
      ]);
    }, 30_000);

    afterAll(async () => {
      await proxy?.stop();
      await upstream?.stop();
    });

    it('answers 502 and leaves the key to lapse with its lease: the request may have run', async () => {
      const key = keyOf();
      const crashed = await post(`${proxy.url}/crash`, key, '{}');
      expect(crashed.status).toBe(502);
      expect(crashed.headers.get('content-type')).toBe('application/problem+json');
      expect(JSON.parse(crashed.text)).toMatchObject({ title: 'Bad Gateway', status: 502 });
      const retry = await post(`${proxy.url}/crash`, key, '{}');
      expect(retry.status).toBe(409);
      expect((await upstream.counts())[key]).toBe(1);
      // Once the lease lapsed, a retry runs again.
      await sleep(1_600);
      expect((await post(`${proxy.url}/crash`, key, '{}')).status).toBe(502);
      expect((await upstream.counts())[key]).toBe(2);
    });

    it('cuts the connection when the response is cut short, and leaves the key to lapse', async () => {
      const key = keyOf();
      await expect(post(`${proxy.url}/truncate`, key, '{}')).rejects.toThrow();
      const retry = await post(`${proxy.url}/truncate`, key, '{}');
      expect(retry.status).toBe(409);
      expect((await upstream.counts())[key]).toBe(1);
      const line = await proxy.waitForLine(
        (candidate) => candidate.msg === 'request' && candidate.path === '/truncate',
      );
      expect(line).toMatchObject({ outcome: 'abandoned' });
    });
  });

  it('sends a keyed request again on a new connection when a kept-alive one turns out closed', async () => {
    // An upstream that, like any server closing an idle connection, drops a kept-alive connection as the next
    // request arrives on it, before reading it: that request never ran.
    let ran = 0;
    const upstream = createNetServer((socket: Socket) => {
      let served = 0;
      socket.on('data', (data: Buffer) => {
        if (!data.includes('\r\n\r\n')) return;
        if (served++ > 0) return socket.resetAndDestroy();
        ran++;
        socket.write(
          'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n{"ok":true}',
        );
      });
    });
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const backend = new MemoryBackend();
    const lines: ProxyRequestLog[] = [];
    const proxy = createIdempotencyProxy({
      upstream: `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`,
      backend,
      log: (line) => lines.push(line),
    });
    const url = await proxy.listen(0, '127.0.0.1');
    try {
      expect((await post(`${url}/a`, keyOf(), '{}')).status).toBe(201);
      expect((await post(`${url}/b`, keyOf(), '{}')).status).toBe(201);
      expect(ran).toBe(2);
      expect(lines.map((line) => line.outcome)).toEqual(['executed', 'executed']);
    } finally {
      await proxy.shutdown(1_000);
      upstream.close();
      backend.close();
    }
  });
});

describe('graceful shutdown', () => {
  let upstream: Upstream;

  beforeAll(async () => {
    upstream = await startUpstream();
  });

  afterAll(async () => {
    await upstream?.stop();
  });

  it('on SIGTERM lets the request in flight finish and store its response, refuses new ones, then exits 0', async () => {
    const proxy = await startProxy(['--upstream', upstream.url]);
    const key = keyOf();
    const inFlight = post(`${proxy.url}/orders?delay=800`, key, '{"item":"last"}');
    await sleep(200);
    proxy.child.kill('SIGTERM');
    await proxy.waitForLine((line) => line.msg === 'stopping');
    await expect(fetch(`${proxy.url}/echo`)).rejects.toThrow();
    const answer = await inFlight;
    expect(answer.status).toBe(201);
    expect(answer.headers.get('connection')).toBe('close');
    expect(await proxy.exited).toEqual({ code: 0, signal: null });
    const lines = proxy.lines();
    expect(lines.find((line) => line.msg === 'stopping')).toMatchObject({ signal: 'SIGTERM', inFlight: 1 });
    expect(lines.find((line) => line.msg === 'request')).toMatchObject({ outcome: 'executed', status: 201 });
    expect(lines.at(-1)).toMatchObject({ msg: 'stopped' });
    expect((await upstream.counts())[key]).toBe(1);
  });

  it('cuts what still runs at --shutdown-timeout, leaving its key to lapse', async () => {
    const proxy = await startProxy(['--upstream', upstream.url, '--shutdown-timeout', '0.3']);
    const slow = post(`${proxy.url}/orders?delay=3000`, keyOf(), '{}').catch((error: Error) => error);
    await sleep(200);
    const started = performance.now();
    proxy.child.kill('SIGTERM');
    expect(await proxy.exited).toEqual({ code: 0, signal: null });
    expect(performance.now() - started).toBeLessThan(2_500);
    const answer = await slow;
    if (!(answer instanceof Error)) expect(answer.status).toBe(502);
    expect(proxy.lines().find((line) => line.msg === 'request')).toMatchObject({ outcome: 'abandoned' });
  });
});

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = createNetServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
