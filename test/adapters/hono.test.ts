/**
 * The Hono middleware on Node.js (`@hono/node-server`): the adapter contract on memory and Redis, then what only
 * Hono has (`app.request()`, the body cache, `c.error`, `c.get('idempotency')`).
 */
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer, request as httpRequest } from 'node:http';
import { connect } from 'node:net';
import { getRequestListener } from '@hono/node-server';
import { Hono } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { cors } from 'hono/cors';
import { afterEach, describe, expect, it } from 'vitest';
import {
  type HonoIdempotencyOptions,
  type IdempotencyVariables,
  idempotencyHeader,
} from '../../src/adapters/hono.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createHonoServerFactory } from '../support/hono.js';
import { createMemoryBackend, listen, postRaw } from '../support/http.js';
import { exchange, type RawRequest, type RawResponse } from '../support/raw-http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('Hono 4 on @hono/node-server, MemoryBackend', {
  createServer: createHonoServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('Hono adapter contract on RedisBackend');
describe.runIf(redisUp)('Hono adapter on RedisBackend', () => {
  describeAdapterContract('Hono 4 on @hono/node-server, ioredis', {
    createServer: createHonoServerFactory(),
    createBackend: () => createIoredisBackend('hono'),
  });
});

describe('Hono middleware specifics', () => {
  const backends: MemoryBackend[] = [];

  afterEach(() => {
    for (const backend of backends.splice(0)) backend.close();
  });

  function app(options: Partial<HonoIdempotencyOptions> = {}) {
    const backend = new MemoryBackend();
    backends.push(backend);
    const hono = new Hono<{ Variables: IdempotencyVariables }>();
    hono.use(idempotencyHeader({ backend, ...options }));
    return hono;
  }

  /** Runs `check` against the app served on `@hono/node-server` over a real `node:http` listener, closed after. */
  async function onNodeServer(
    hono: { fetch: Hono['fetch'] },
    check: (url: string) => Promise<void>,
  ): Promise<void> {
    const server = await listen(createServer(getRequestListener(hono.fetch)));
    try {
      await check(server.url);
    } finally {
      await server.close();
    }
  }

  const post = (hono: Hono<never>, path: string, key: string | undefined, body: string = '{"a":1}') =>
    hono.request(path, {
      method: 'POST',
      body,
      headers: {
        'content-type': 'application/json',
        ...(key === undefined ? {} : { 'idempotency-key': key }),
      },
    });

  it('works through app.request(), and hands the key and lease signal to the handler via c.get', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/orders', async (c) => {
      const idempotency = c.get('idempotency');
      return c.json({ run: ++runs, key: idempotency?.key, aborted: idempotency?.signal.aborted }, 201);
    });
    const key = randomUUID();
    const first = await post(hono as never, '/orders', key);
    expect(first.status).toBe(201);
    const body = await first.text();
    expect(JSON.parse(body)).toEqual({ run: 1, key, aborted: false });
    const replay = await post(hono as never, '/orders', key);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.text()).toBe(body);
    expect(runs).toBe(1);
  });

  it('leaves the body to the handler through the body cache: c.req.json() and c.req.text() both work', async () => {
    const hono = app();
    hono.post('/echo', async (c) => c.json({ json: await c.req.json(), text: await c.req.text() }));
    const response = await post(hono as never, '/echo', randomUUID(), '{"b":2}');
    expect(await response.json()).toEqual({ json: { b: 2 }, text: '{"b":2}' });
  });

  it('reads a chunked body within maxRequestBytes, and refuses a larger one with 413', async () => {
    const hono = app({ maxRequestBytes: 16 });
    hono.post('/echo', async (c) => c.json(await c.req.json()));
    const chunked = (text: string) =>
      new ReadableStream({
        start(controller) {
          controller.enqueue(new TextEncoder().encode(text));
          controller.close();
        },
      });
    const small = await hono.request('/echo', {
      method: 'POST',
      body: chunked('{"a":1}'),
      headers: { 'idempotency-key': randomUUID() },
      duplex: 'half',
    } as RequestInit);
    expect(await small.json()).toEqual({ a: 1 });
    const large = await hono.request('/echo', {
      method: 'POST',
      body: chunked(`{"a":"${'x'.repeat(32)}"}`),
      headers: { 'idempotency-key': randomUUID() },
      duplex: 'half',
    } as RequestInit);
    expect(large.status).toBe(413);
  });

  it('on @hono/node-server, refuses a body over maxRequestBytes with 413, with or without a length, and serves the next request', async () => {
    const hono = app({ maxRequestBytes: 16 });
    let runs = 0;
    hono.post('/echo', async (c) => c.json({ run: ++runs, body: await c.req.json() }, 201));
    await onNodeServer(hono, async (url) => {
      const large = `{"a":"${'x'.repeat(32)}"}`;
      const headers = { 'content-type': 'application/json', 'idempotency-key': randomUUID() };
      const withLength = await postRaw(`${url}/echo`, { ...headers, 'content-length': large.length }, [
        large,
      ]);
      expect(withLength.status).toBe(413);
      const chunked = await postRaw(`${url}/echo`, { ...headers, 'transfer-encoding': 'chunked' }, [
        large.slice(0, 10),
        large.slice(10),
      ]);
      expect(chunked.status).toBe(413);
      const small = await postRaw(
        `${url}/echo`,
        {
          'content-type': 'application/json',
          'idempotency-key': randomUUID(),
          'transfer-encoding': 'chunked',
        },
        ['{"a":', '1}'],
      );
      expect(small).toEqual({ status: 201, text: '{"run":1,"body":{"a":1}}' });
      expect(runs).toBe(1);
    });
  });

  it('on @hono/node-server, runs nothing for a client that leaves mid-body, and the key stays free', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/echo', async (c) => c.json({ run: ++runs, body: await c.req.json() }, 201));
    await onNodeServer(hono, async (url) => {
      const key = randomUUID();
      const { port } = new URL(url);
      const socket = connect(Number(port), '127.0.0.1');
      await once(socket, 'connect');
      socket.write(
        `POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nidempotency-key: ${key}\r\ncontent-length: 100\r\n\r\n{"a":`,
      );
      await new Promise((resolve) => setTimeout(resolve, 50));
      socket.destroy();
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(runs).toBe(0);
      const headers = { 'content-type': 'application/json', 'idempotency-key': key };
      const retry = await postRaw(`${url}/echo`, headers, ['{"a":1}']);
      expect(retry).toEqual({ status: 201, text: '{"run":1,"body":{"a":1}}' });
      const replay = await postRaw(`${url}/echo`, headers, ['{"a":1}']);
      expect(replay).toEqual({ status: 201, text: '{"run":1,"body":{"a":1}}' });
      expect(runs).toBe(1);
    });
  });

  it('leaves a body of unknown length readable for Hono’s bodyLimit on the route, which reads c.req.raw itself', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/orders', bodyLimit({ maxSize: 64 }), async (c) =>
      c.json({ run: ++runs, ...(await c.req.json()) }, 201),
    );
    // app.request() with a string body: a Request without Content-Length.
    const key = randomUUID();
    const first = await post(hono as never, '/orders', key, '{"a":1}');
    expect([first.status, await first.text()]).toEqual([201, '{"run":1,"a":1}']);
    const replay = await post(hono as never, '/orders', key, '{"a":1}');
    expect([replay.status, replay.headers.get('idempotent-replayed'), await replay.text()]).toEqual([
      201,
      'true',
      '{"run":1,"a":1}',
    ]);
    const tooLarge = await post(hono as never, '/orders', randomUUID(), `{"a":"${'x'.repeat(100)}"}`);
    expect(tooLarge.status).toBe(413);
    // A chunked upload on @hono/node-server.
    const server = createServer(getRequestListener(hono.fetch));
    const { url, close } = await listen(server);
    try {
      const chunked = await postRaw(
        `${url}/orders`,
        {
          'content-type': 'application/json',
          'transfer-encoding': 'chunked',
          'idempotency-key': randomUUID(),
        },
        ['{"a":', '2}'],
      );
      expect(chunked).toEqual({ status: 201, text: '{"run":2,"a":2}' });
    } finally {
      await close();
    }
    expect(runs).toBe(2);
  });

  describe('leaves the body for a handler that reads c.req.raw, as without the middleware', () => {
    const routes = (hono: Hono<{ Variables: IdempotencyVariables }>) => {
      let runs = 0;
      hono.post('/json', async (c) => c.json({ run: ++runs, body: await c.req.raw.json() }, 201));
      hono.post('/text', async (c) => c.json({ run: ++runs, body: await c.req.raw.text() }, 201));
      hono.post('/bytes', async (c) =>
        c.json({ run: ++runs, hex: Buffer.from(await c.req.raw.arrayBuffer()).toString('hex') }, 201),
      );
      hono.post('/stream', async (c) =>
        c.json({ run: ++runs, body: await new Response(c.req.raw.body).text() }, 201),
      );
      return () => runs;
    };
    const cases = [
      ['/json', { body: { a: 1 } }],
      ['/text', { body: '{"a":1}' }],
      ['/bytes', { hex: Buffer.from('{"a":1}').toString('hex') }],
      ['/stream', { body: '{"a":1}' }],
    ] as const;

    it('through app.request(), with and without a length', async () => {
      const hono = app();
      const runs = routes(hono);
      for (const [path, expected] of cases) {
        for (const chunked of [false, true]) {
          const key = randomUUID();
          const send = () =>
            hono.request(path, {
              method: 'POST',
              body: chunked ? new Blob(['{"a":1}']).stream() : '{"a":1}',
              headers: {
                'content-type': 'application/json',
                'idempotency-key': key,
                ...(chunked ? {} : { 'content-length': '7' }),
              },
              duplex: 'half',
            } as RequestInit);
          const first = await send();
          expect([path, chunked, first.status, await first.json()]).toEqual([
            path,
            chunked,
            201,
            { run: runs(), ...expected },
          ]);
          const replay = await send();
          expect(replay.headers.get('idempotent-replayed'), `${path} ${chunked}`).toBe('true');
        }
      }
    });

    it('on @hono/node-server, with and without a length', async () => {
      const hono = app();
      const runs = routes(hono);
      await onNodeServer(hono, async (url) => {
        for (const [path, expected] of cases) {
          for (const chunked of [false, true]) {
            const key = randomUUID();
            const headers = { 'content-type': 'application/json', 'idempotency-key': key };
            const send = () =>
              postRaw(
                `${url}${path}`,
                chunked
                  ? { ...headers, 'transfer-encoding': 'chunked' }
                  : { ...headers, 'content-length': 7 },
                ['{"a":', '1}'],
              );
            const first = await send();
            expect([path, chunked, first.status, JSON.parse(first.text)]).toEqual([
              path,
              chunked,
              201,
              { run: runs(), ...expected },
            ]);
            expect(await send(), `${path} ${chunked}`).toEqual(first);
          }
        }
      });
    });
  });

  it('fingerprints the body’s bytes, not their text, and hands the handler the bytes as they came', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/upload', async (c) =>
      c.json({ run: ++runs, hex: Buffer.from(await c.req.arrayBuffer()).toString('hex') }, 201),
    );
    await onNodeServer(hono, async (url) => {
      const send = (key: string, hex: string) =>
        fetch(`${url}/upload`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': key },
          body: Buffer.from(hex, 'hex'),
        });
      // Bytes that are not UTF-8, and a byte order mark: text would replace the first and drop the second.
      for (const hex of ['fffe22', 'efbbbf7b7d']) {
        const first = await send(randomUUID(), hex);
        expect(await first.json()).toEqual({ run: runs, hex });
      }
      // Two bodies whose bytes differ only where they are not UTF-8 decode to the same text: two requests still.
      const key = randomUUID();
      expect((await send(key, '228022')).status).toBe(201);
      const other = await send(key, '22ff22');
      expect([other.status, other.headers.get('idempotent-replayed')]).toEqual([422, null]);
      expect((await send(key, '228022')).headers.get('idempotent-replayed')).toBe('true');
      expect(runs).toBe(3);
    });
  });

  it('on @hono/node-server, fingerprints a rawBody the host read first, and leaves it for the handler', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/orders', async (c) => c.json({ run: ++runs, body: await c.req.json() }, 201));
    const listener = getRequestListener(hono.fetch);
    // As Google Cloud Functions and Firebase do: the body read before the app runs, kept as `rawBody`.
    const server = await listen(
      createServer((req, res) => {
        const chunks: Buffer[] = [];
        req.on('data', (chunk: Buffer) => chunks.push(chunk));
        req.on('end', () => {
          Object.assign(req, { rawBody: Buffer.concat(chunks) });
          listener(req, res);
        });
      }),
    );
    try {
      const key = randomUUID();
      const send = (body: string) =>
        postRaw(`${server.url}/orders`, { 'content-type': 'application/json', 'idempotency-key': key }, [
          body,
        ]);
      expect(await send('{"a":1}')).toEqual({ status: 201, text: '{"run":1,"body":{"a":1}}' });
      expect(await send('{"a":1}')).toEqual({ status: 201, text: '{"run":1,"body":{"a":1}}' });
      expect((await send('{"a":2}')).status).toBe(422);
      expect(runs).toBe(1);
    } finally {
      await server.close();
    }
  });

  it('releases the key when the handler throws, and sends the app’s onError answer', async () => {
    const hono = app();
    hono.onError((error, c) => c.json({ error: error.message }, 418));
    let runs = 0;
    hono.post('/fail', () => {
      runs++;
      throw new Error('boom');
    });
    const key = randomUUID();
    const first = await post(hono as never, '/fail', key);
    expect(first.status).toBe(418);
    expect(await first.json()).toEqual({ error: 'boom' });
    expect((await post(hono as never, '/fail', key)).status).toBe(418);
    expect(runs).toBe(2);
  });

  it('keeps headers that middleware mounted before sets, and does not store them', async () => {
    const backend = new MemoryBackend();
    backends.push(backend);
    const hono = new Hono();
    let request = 0;
    hono.use(async (c, next) => {
      c.header('x-request-id', `req-${++request}`);
      await next();
    });
    hono.use(idempotencyHeader({ backend }));
    hono.post('/orders', (c) => c.json({ ok: true }, 201));
    const key = randomUUID();
    const first = await post(hono as never, '/orders', key);
    expect(first.headers.get('x-request-id')).toBe('req-1');
    const replay = await post(hono as never, '/orders', key);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.headers.get('x-request-id')).toBe('req-2');
  });

  it('on @hono/node-server, fingerprints a JSON body by its bytes, whether it comes with a length or chunked, and its type', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/orders', async (c) =>
      c.json({ run: ++runs, json: await c.req.json(), bytes: (await c.req.arrayBuffer()).byteLength }, 201),
    );
    await onNodeServer(hono, async (url) => {
      const body = '{"item":"b\u00fcch","quantity":2}';
      const send = (key: string, text: string, contentType: string, chunked = false) =>
        fetch(`${url}/orders`, {
          method: 'POST',
          headers: { 'content-type': contentType, 'idempotency-key': key },
          // A stream has no length: the body is read as bytes, the path other content types take too.
          body: chunked ? new Blob([text]).stream() : text,
          duplex: 'half',
        } as RequestInit);
      const key = randomUUID();
      const first = await send(key, body, 'application/json');
      expect(first.status).toBe(201);
      const stored = await first.text();
      expect(JSON.parse(stored)).toEqual({
        run: 1,
        json: { item: 'büch', quantity: 2 },
        bytes: Buffer.byteLength(body),
      });
      // The same bytes read as bytes (chunked, or sent as text/plain) or as text (another JSON type): a replay.
      for (const [contentType, chunked] of [
        ['application/json', true],
        ['application/merge-patch+json; charset=utf-8', false],
        ['text/plain', false],
      ] as const) {
        const replay = await send(key, body, contentType, chunked);
        expect(replay.headers.get('idempotent-replayed'), contentType).toBe('true');
        expect(await replay.text()).toBe(stored);
      }
      expect((await send(key, body.replace('2', '3'), 'application/json')).status).toBe(422);
      expect(runs).toBe(1);
    });
  });

  it('on @hono/node-server, fingerprints the path and query string alike for origin-form and absolute-form targets', async () => {
    const hono = app();
    let runs = 0;
    hono.post('/orders', (c) => c.json({ run: ++runs, query: c.req.query('x') }, 201));
    await onNodeServer(hono, async (url) => {
      const { port } = new URL(url);
      // A request line with an absolute URL, as a client sends it to a forward proxy (RFC 9112 §3.2.2).
      const send = (key: string, target: string) =>
        new Promise<{ status: number; replayed: string | undefined; text: string }>((resolve, reject) => {
          const request = httpRequest(
            { host: '127.0.0.1', port, method: 'POST', path: target, headers: { 'idempotency-key': key } },
            (response) => {
              let text = '';
              response.setEncoding('utf8');
              response.on('data', (chunk: string) => {
                text += chunk;
              });
              response.on('end', () =>
                resolve({
                  status: response.statusCode ?? 0,
                  replayed: response.headers['idempotent-replayed'] as string | undefined,
                  text,
                }),
              );
            },
          );
          request.on('error', reject);
          request.end();
        });
      const key = randomUUID();
      const first = await send(key, `http://127.0.0.1:${port}/orders?x=1`);
      expect(first.status).toBe(201);
      const replay = await send(key, '/orders?x=1');
      expect(replay.replayed).toBe('true');
      expect(replay.text).toBe(first.text);
      expect((await send(key, `http://127.0.0.1:${port}/orders?x=2`)).status).toBe(422);
      expect((await send(key, '/orders?x=2')).status).toBe(422);
      const other = randomUUID();
      expect((await send(other, '/orders?x=3')).status).toBe(201);
      expect((await send(other, `http://127.0.0.1:${port}/orders?x=3`)).replayed).toBe('true');
      expect(runs).toBe(2);
    });
  });
  it('on @hono/node-server, frames a first run as the bare app does when middleware after it sets a header once the handler answered', async () => {
    const build = (withMiddleware: boolean) => {
      const hono = withMiddleware ? (app() as unknown as Hono) : new Hono();
      hono.use('*', cors());
      hono.use('*', async (c, next) => {
        await next();
        // On a finished response Hono makes a new one of the platform's class, its body a stream.
        c.header('x-after', '1');
      });
      hono.post('/orders', (c) => c.json({ ok: true, pad: 'x'.repeat(40) }, 201));
      return hono;
    };
    const request = (key: string): RawRequest => ({
      method: 'POST',
      path: '/orders',
      headers: [
        ['content-type', 'application/json'],
        ['idempotency-key', key],
        ['origin', 'https://a.example'],
      ],
      body: Buffer.from('{}'),
    });
    const heads: RawResponse[] = [];
    for (const withMiddleware of [false, true]) {
      await onNodeServer(build(withMiddleware), async (url) => {
        const port = Number(new URL(url).port);
        heads.push(await exchange(port, request(randomUUID()), undefined));
      });
    }
    const [bare, first] = heads as [RawResponse, RawResponse];
    const framing = (response: RawResponse) => ({
      framing: response.framing,
      length: response.headers.find(([name]) => name === 'content-length')?.[1],
      names: response.headers.map(([name]) => name).filter((name) => name !== 'date'),
    });
    expect(bare.framing).toBe('content-length');
    expect(framing(first)).toEqual(framing(bare));
    expect(first.body.equals(bare.body)).toBe(true);
  });
});
