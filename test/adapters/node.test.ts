/**
 * The `node:http` adapter, `withIdempotency`: the adapter contract on {@link MemoryBackend} and Redis, then how it
 * treats a listener that fails, and control characters that only a lenient HTTP parser lets through.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, request, type ServerOptions } from 'node:http';
import express from 'express';
import { afterEach, describe, expect, it } from 'vitest';
import { type RequestListener, withIdempotency } from '../../src/adapters/node.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import {
  createMemoryBackend,
  createNodeServerFactory,
  listen,
  readAll,
  send,
  sendRawRequest,
  type TestServer,
} from '../support/http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('node:http withIdempotency, MemoryBackend', {
  createServer: createNodeServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('node:http adapter contract on RedisBackend');
describe.runIf(redisUp)('node:http adapter on RedisBackend', () => {
  describeAdapterContract('node:http withIdempotency, ioredis', {
    createServer: createNodeServerFactory(),
    createBackend: () => createIoredisBackend('node'),
  });
});

const INTERNAL_ERROR = '{"detail":"Internal Server Error"}';
const REPLAYED = 'idempotent-replayed';

describe('withIdempotency', () => {
  const servers: TestServer[] = [];
  const backends: MemoryBackend[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((server) => server.close()));
    for (const backend of backends.splice(0)) backend.close();
  });

  /** Serves `listener` wrapped with a fresh backend; records `onHandlerError` calls and events. */
  async function serve(listener: RequestListener, serverOptions: ServerOptions = {}) {
    const backend = new MemoryBackend();
    backends.push(backend);
    const handlerErrors: { error: unknown; req: IncomingMessage }[] = [];
    const events: IdempotencyEvent[] = [];
    const wrapped = withIdempotency(listener, {
      backend,
      onHandlerError: (error, req) => handlerErrors.push({ error, req }),
      onEvent: (event) => events.push(event),
    });
    const server = await listen(createServer(serverOptions, wrapped));
    servers.push(server);
    return { url: server.url, handlerErrors, events };
  }

  /** A listener that fails its first call the given way, and answers 201 JSON afterwards. */
  function failingOnce(fail: 'throw' | 'reject' | 'throw after writing'): {
    listener: RequestListener;
    runs: () => number;
    error: Error;
  } {
    let runs = 0;
    const error = new Error(`the listener failed (${fail})`);
    const listener: RequestListener = (req, res) => {
      runs++;
      if (runs === 1) {
        if (fail === 'throw') throw error;
        if (fail === 'throw after writing') {
          res.writeHead(201, { 'content-type': 'application/json', 'x-partial': 'yes' });
          res.write('{"partial":');
          throw error;
        }
        return readAll(req).then(() => Promise.reject(error));
      }
      return readAll(req).then((body) => {
        res.writeHead(201, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ run: runs, body: body.toString('utf8') }));
      });
    };
    return { listener, runs: () => runs, error };
  }

  for (const fail of ['throw', 'reject', 'throw after writing'] as const) {
    const outcome = fail === 'throw after writing' ? 'cuts the connection' : 'answers 500';
    it(`${outcome} and frees the key when the listener ${fail === 'reject' ? 'rejects' : `${fail}s`}`, async () => {
      const { listener, runs, error } = failingOnce(fail);
      const { url, handlerErrors, events } = await serve(listener);
      const key = randomUUID();

      if (fail === 'throw after writing') {
        // The head had gone out (as far as the listener could tell): as without the middleware, the response
        // is cut short rather than turned into another one.
        await expect(send(`${url}/orders`, { key, body: { item: 'book' } })).rejects.toThrow();
      } else {
        const failed = await send(`${url}/orders`, { key, body: { item: 'book' } });
        expect(failed.status).toBe(500);
        expect(failed.headers.get('content-type')).toBe('application/json');
        expect(failed.headers.get('x-partial')).toBeNull();
        expect(failed.text).toBe(INTERNAL_ERROR);
      }
      expect(handlerErrors).toHaveLength(1);
      expect(handlerErrors[0]!.error).toBe(error);
      expect(handlerErrors[0]!.req.headers['idempotency-key']).toBe(key);
      expect(events.map((event) => event.outcome)).toEqual(['not-stored']);

      const retry = await send(`${url}/orders`, { key, body: { item: 'book' } });
      expect(retry.status).toBe(201);
      expect(retry.headers.get(REPLAYED)).toBeNull();
      expect(JSON.parse(retry.text)).toEqual({ run: 2, body: '{"item":"book"}' });
      const replay = await send(`${url}/orders`, { key, body: { item: 'book' } });
      expect(replay.headers.get(REPLAYED)).toBe('true');
      expect(replay.text).toBe(retry.text);
      expect(runs()).toBe(2);
      expect(handlerErrors).toHaveLength(1);
    });
  }

  it('calls onHandlerError for a failing listener on a request it does not handle, too', async () => {
    const { listener, runs, error } = failingOnce('throw');
    const { url, handlerErrors, events } = await serve(listener);
    const failed = await send(`${url}/orders`, { method: 'PUT', key: randomUUID() });
    expect(failed.status).toBe(500);
    expect(failed.text).toBe(INTERNAL_ERROR);
    expect(handlerErrors.map((entry) => entry.error)).toEqual([error]);
    expect(events).toEqual([]);
    expect(runs()).toBe(1);
  });

  it('answers 422 to control characters in the key that a lenient HTTP parser lets through', async () => {
    let runs = 0;
    const { url } = await serve(
      (_req, res) => {
        runs++;
        res.end();
      },
      { insecureHTTPParser: true },
    );
    for (const byte of ['\x01', '\x1b', '\x7f']) {
      const result = await sendRawRequest(
        url,
        `POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: key${byte}${randomUUID()}\r\n` +
          'Content-Length: 0\r\nConnection: close\r\n\r\n',
      );
      expect([byte, result.status]).toEqual([byte, 422]);
      expect(JSON.parse(result.text)).toEqual({ detail: expect.stringMatching(/control characters/) });
    }
    expect(runs).toBe(0);
  });

  describe('maxRequestBytes', () => {
    const LIMIT = 1024;

    async function serveWithLimit() {
      let runs = 0;
      const events: IdempotencyEvent[] = [];
      const backend = new MemoryBackend();
      backends.push(backend);
      const listener = withIdempotency(
        async (req, res) => {
          runs++;
          const body = await readAll(req);
          res.writeHead(201, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ bytes: body.length }));
        },
        { backend, maxRequestBytes: LIMIT, onEvent: (event) => events.push(event) },
      );
      const server = await listen(createServer(listener));
      servers.push(server);
      return { url: server.url, events, runs: () => runs };
    }

    /** Sends `size` bytes in chunked transfer encoding, so that no Content-Length announces the size. */
    function sendChunked(url: string, key: string, size: number): Promise<{ status: number; body: string }> {
      return new Promise((resolve, reject) => {
        const req = request(url, { method: 'POST', headers: { 'idempotency-key': key } }, (res) => {
          readAll(res).then(
            (body) => resolve({ status: res.statusCode ?? 0, body: body.toString() }),
            reject,
          );
        });
        // The server may answer and close before the whole body is written.
        req.on('error', (error: NodeJS.ErrnoException) =>
          error.code === 'EPIPE' ? undefined : reject(error),
        );
        for (let sent = 0; sent < size; sent += 256) req.write(Buffer.alloc(256, 7));
        req.end();
      });
    }

    it('answers 413 to a body over the limit without running the listener or touching the backend', async () => {
      const app = await serveWithLimit();
      const result = await send(`${app.url}/upload`, { key: randomUUID(), body: Buffer.alloc(LIMIT + 1, 1) });
      expect(result.status).toBe(413);
      expect(JSON.parse(result.text)).toEqual({
        detail: `Request body exceeds the ${LIMIT}-byte limit for requests with an 'Idempotency-Key' header`,
      });
      expect(app.runs()).toBe(0);
      expect(app.events.map((event) => [event.outcome, event.status])).toEqual([['body-too-large', 413]]);
    });

    it('answers 413 to a chunked body that grows over the limit', async () => {
      const app = await serveWithLimit();
      const result = await sendChunked(`${app.url}/upload`, randomUUID(), LIMIT * 4);
      expect(result.status).toBe(413);
      expect(result.body).toContain('byte limit');
      expect(app.runs()).toBe(0);
    });

    it('runs a body of exactly the limit, and one without a key whatever its size', async () => {
      const app = await serveWithLimit();
      const atLimit = await send(`${app.url}/upload`, { key: randomUUID(), body: Buffer.alloc(LIMIT, 1) });
      expect(atLimit.status).toBe(201);
      expect(JSON.parse(atLimit.text)).toEqual({ bytes: LIMIT });
      const chunked = await sendChunked(`${app.url}/upload`, randomUUID(), LIMIT);
      expect(chunked.status).toBe(201);
      const unkeyed = await send(`${app.url}/upload`, { body: Buffer.alloc(LIMIT * 8, 1) });
      expect(unkeyed.status).toBe(201);
      expect(JSON.parse(unkeyed.text)).toEqual({ bytes: LIMIT * 8 });
      expect(app.runs()).toBe(3);
    });
  });

  it('wraps an Express app, which gives each response a prototype of its own, and still stores and replays', async () => {
    // Express sets `app.response` as the prototype of every response once the wrapper has captured it: a capture
    // put in front of the old prototype would be dropped, the response never stored and the key left in flight.
    let runs = 0;
    const app = express();
    app.use(express.json());
    app.post('/orders', (req, res) => {
      res.status(201).json({ run: ++runs, item: (req.body as { item?: string }).item });
    });
    const { url } = await serve(app as unknown as RequestListener);
    const key = randomUUID();
    const first = await send(`${url}/orders`, { key, body: { item: 'book' } });
    expect(first.status).toBe(201);
    expect(JSON.parse(first.text)).toEqual({ run: 1, item: 'book' });
    const again = await send(`${url}/orders`, { key, body: { item: 'book' } });
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(again.text).toBe(first.text);
    expect(runs).toBe(1);
  });

  it('refuses a listener that is not a function', () => {
    expect(() =>
      withIdempotency(undefined as unknown as RequestListener, { backend: new MemoryBackend() }),
    ).toThrow(TypeError);
  });
});
