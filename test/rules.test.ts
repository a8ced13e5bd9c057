/**
 * Regression tests for the rules this port added after the original's defects: each reproduces a way a request
 * that ran could run again, a first response could differ from the app's own, or two requests could be taken for
 * one, and asserts it no longer happens. Named after what they protect.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import compression from 'compression';
import cors from 'cors';
import express from 'express';
import { Redis } from 'ioredis';
import morgan from 'morgan';
import responseTime from 'response-time';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader, idempotencyOf } from '../src/adapters/express.js';
import { idempotencyOf as nodeIdempotencyOf, withIdempotency } from '../src/adapters/node.js';
import { MemoryBackend } from '../src/backends/memory.js';
import { RedisBackend } from '../src/backends/redis.js';
import type { Backend } from '../src/core/types.js';
import { listen, send, type TestServer } from './support/http.js';
import { exchange } from './support/raw-http.js';
import { deleteKeysWithPrefix, REDIS_URL, requireRedis, uniquePrefix } from './support/redis.js';

const redisUp = await requireRedis('Rules on RedisBackend');
const REPLAYED = 'idempotent-replayed';

const servers: TestServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((server) => server.close()));
});

async function serve(listener: Parameters<typeof createServer>[1]): Promise<TestServer> {
  const server = await listen(createServer(listener));
  servers.push(server);
  return server;
}

const unexpected: unknown[] = [];
const onUnexpected = (error: unknown) => unexpected.push(error);
beforeAll(() => {
  process.on('unhandledRejection', onUnexpected);
});
afterAll(() => {
  process.off('unhandledRejection', onUnexpected);
});

describe('transparent first runs', () => {
  it('sends and stores the headers of writeHead(status, undefined, headers)', async () => {
    const backend = new MemoryBackend();
    const server = await serve(
      withIdempotency(
        (_req, res) => {
          res.writeHead(201, undefined, { 'content-type': 'application/json', 'x-kept': 'yes' });
          res.end('{"id":1}');
        },
        { backend },
      ),
    );
    const key = randomUUID();
    const first = await send(`${server.url}/orders`, { key });
    expect(first.status).toBe(201);
    expect(first.headers.get('content-type')).toBe('application/json');
    expect(first.headers.get('x-kept')).toBe('yes');
    const replay = await send(`${server.url}/orders`, { key });
    expect(replay.headers.get(REPLAYED)).toBe('true');
    expect(replay.headers.get('x-kept')).toBe('yes');
    backend.close();
  });

  it('cuts the connection, as Express does, when a handler fails halfway under morgan, compression and response-time', async () => {
    for (const withMiddleware of [false, true]) {
      const app = express();
      app.set('env', 'production');
      app.use(morgan('tiny', { skip: () => true }), compression(), responseTime());
      if (withMiddleware) app.use(idempotencyHeader({ backend: new MemoryBackend() }));
      app.post('/orders', (_req, res, next) => {
        res.setHeader('content-type', 'application/json');
        res.write('{"partial":');
        next(new Error('failed halfway'));
      });
      app.get('/ping', (_req, res) => {
        res.json({ pong: true });
      });
      const server = await serve(app);
      const response = await exchange(
        Number(new URL(server.url).port),
        {
          method: 'POST',
          path: '/orders',
          headers: [['Idempotency-Key', randomUUID()]],
          body: Buffer.from(''),
        },
        { method: 'GET', path: '/ping', headers: [] },
      );
      // Never a complete-looking 500 after partial bytes, nor a Content-Length that lies on a kept-alive connection.
      expect(response.complete, `with the middleware: ${withMiddleware}`).toBe(false);
    }
  });

  describe.runIf(redisUp)('on Redis', () => {
    let redis: Redis;
    let backend: Backend;
    const prefix = uniquePrefix('rules');
    beforeAll(async () => {
      redis = new Redis(REDIS_URL);
      backend = new RedisBackend({ redis, prefix });
    });
    afterAll(async () => {
      await deleteKeysWithPrefix(redis, prefix);
      redis.disconnect();
    });

    it('answers an invalid status with a 500, stores nothing, and leaves no rejection unhandled', async () => {
      const app = express();
      app.set('env', 'production');
      app.use(express.json());
      app.use(idempotencyHeader({ backend }));
      let runs = 0;
      app.post('/orders', (_req, res) => {
        runs++;
        res.writeHead(1000, { 'content-type': 'application/json' });
        res.end('{}');
      });
      const server = await serve(app);
      const key = randomUUID();
      const before = unexpected.length;
      const first = await send(`${server.url}/orders`, { key, body: {}, signal: AbortSignal.timeout(5000) });
      expect(first.status).toBe(500);
      const retry = await send(`${server.url}/orders`, { key, body: {}, signal: AbortSignal.timeout(5000) });
      expect(retry.status).toBe(500);
      expect(retry.headers.get(REPLAYED)).toBeNull();
      expect(runs).toBe(2);
      await sleep(50);
      expect(unexpected.slice(before)).toEqual([]);
    });
  });

  it('sends the node:http 500 in the configured errorFormat', async () => {
    const server = await serve(
      withIdempotency(
        () => {
          throw new Error('boom');
        },
        { backend: new MemoryBackend(), errorFormat: 'problem', onHandlerError: () => {} },
      ),
    );
    const result = await send(`${server.url}/orders`, { key: randomUUID() });
    expect(result.status).toBe(500);
    expect(result.headers.get('content-type')).toBe('application/problem+json');
    expect(JSON.parse(result.text)).toEqual({
      type: 'about:blank',
      title: 'Internal Server Error',
      status: 500,
      detail: 'Internal Server Error',
    });
  });

  it("replays the handler's headers, not the previous exchange's: CORS answers the replay's own origin", async () => {
    const app = express();
    app.use(cors({ origin: ['http://a.example', 'http://b.example'] }));
    app.use(express.json());
    app.use(idempotencyHeader({ backend: new MemoryBackend() }));
    app.post('/orders', (_req, res) => {
      res.status(201).json({ id: 1 });
    });
    const server = await serve(app);
    const key = randomUUID();
    const first = await send(`${server.url}/orders`, {
      key,
      body: {},
      headers: { origin: 'http://a.example' },
    });
    expect(first.headers.get('access-control-allow-origin')).toBe('http://a.example');
    const replay = await send(`${server.url}/orders`, {
      key,
      body: {},
      headers: { origin: 'http://b.example' },
    });
    expect(replay.headers.get(REPLAYED)).toBe('true');
    expect(replay.headers.get('access-control-allow-origin')).toBe('http://b.example');
  });
});

describe('a request that ran is never forgotten', () => {
  it('keeps writing harmless for a handler whose client left, and stores its response', async () => {
    let finished!: () => void;
    const handlerDone = new Promise<void>((resolve) => {
      finished = resolve;
    });
    let runs = 0;
    const server = await serve(
      withIdempotency(
        async (req, res) => {
          runs++;
          await new Promise<void>((resolve) => req.socket.once('close', () => resolve()));
          res.setHeader('content-type', 'application/json');
          res.write('{"written":');
          res.write('"after the client left"');
          res.end('}', () => {});
          finished();
        },
        { backend: new MemoryBackend(), onHandlerError: (error) => unexpected.push(error) },
      ),
    );
    const key = randomUUID();
    await expect(send(`${server.url}/orders`, { key, signal: AbortSignal.timeout(100) })).rejects.toThrow();
    await handlerDone;
    await sleep(20);
    const replay = await send(`${server.url}/orders`, { key });
    expect(replay.headers.get(REPLAYED)).toBe('true');
    expect(replay.text).toBe('{"written":"after the client left"}');
    expect(runs).toBe(1);
  });
});

describe('handlers learn their key and when their lease is lost', () => {
  it('gives an Express handler its key and a live signal through idempotencyOf(req)', async () => {
    const app = express();
    app.use(express.json());
    app.use(idempotencyHeader({ backend: new MemoryBackend() }));
    app.post('/orders', (req, res) => {
      const idempotency = idempotencyOf(req);
      res.status(201).json({ key: idempotency?.key, aborted: idempotency?.signal.aborted });
    });
    app.put('/orders', (req, res) => {
      res.json({ handled: idempotencyOf(req) !== undefined });
    });
    const server = await serve(app);
    const key = randomUUID();
    const result = await send(`${server.url}/orders`, { key: `"${key}"`, body: {} });
    expect(JSON.parse(result.text)).toEqual({ key, aborted: false });
    const other = await send(`${server.url}/orders`, { method: 'PUT', key, body: {} });
    expect(JSON.parse(other.text)).toEqual({ handled: false });
  });

  it('aborts the signal of a node:http handler whose lease was taken over', async () => {
    const memory = new MemoryBackend();
    const stolen: Backend = {
      acquire: (...args) => memory.acquire(...args),
      complete: (...args) => memory.complete(...args),
      release: (...args) => memory.release(...args),
      renew: () => false,
    };
    let reason: unknown;
    const server = await serve(
      withIdempotency(
        async (req: IncomingMessage, res: ServerResponse) => {
          const { signal } = nodeIdempotencyOf(req)!;
          await new Promise<void>((resolve) =>
            signal.addEventListener('abort', () => resolve(), { once: true }),
          );
          reason = signal.reason;
          res.writeHead(503, { 'content-type': 'application/json' });
          res.end('{"stopped":true}');
        },
        { backend: stolen, lockTimeout: 1 },
      ),
    );
    const result = await send(`${server.url}/orders`, { key: randomUUID() });
    expect(result.status).toBe(503);
    expect((reason as { code?: string }).code).toBe('ERR_IDEMPOTENCY_LEASE_LOST');
  });
});

describe('fingerprints that cannot merge two requests', () => {
  it('hashes the raw bytes a JSON parser kept as req.rawBody, not the parsed value', async () => {
    const app = express();
    app.use(
      express.json({
        verify: (req, _res, buffer) => {
          (req as unknown as { rawBody?: Buffer }).rawBody = buffer;
        },
      }),
    );
    app.use(idempotencyHeader({ backend: new MemoryBackend() }));
    let runs = 0;
    app.post('/orders', (_req, res) => {
      runs++;
      res.status(201).json({ run: runs });
    });
    const server = await serve(app);
    const key = randomUUID();
    const headers = { 'content-type': 'application/json' };
    expect(
      (await send(`${server.url}/orders`, { key, body: Buffer.from('{"amount":1}'), headers })).status,
    ).toBe(201);
    // Parsed, these are the same document; as sent, they are not the same request.
    const differentBytes = await send(`${server.url}/orders`, {
      key,
      body: Buffer.from('{"amount":1.0}'),
      headers,
    });
    expect(differentBytes.status).toBe(422);
    const same = await send(`${server.url}/orders`, { key, body: Buffer.from('{"amount":1}'), headers });
    expect(same.headers.get(REPLAYED)).toBe('true');
    expect(runs).toBe(1);
  });

  it('refuses to guess a body a parser consumed without a trace, rather than fingerprinting it as empty', async () => {
    const { url, handler } = await serveWithParserFirst('/orders', (req, _res, next) => {
      req.on('data', () => {});
      req.on('end', () => next());
    });
    const result = await send(`${url}/orders`, { key: randomUUID(), body: { amount: 1 } });
    expect(result.status).toBe(500);
    expect(JSON.parse(result.text).code).toBe('ERR_IDEMPOTENCY_BODY');
    expect(handler.runs).toBe(0);
  });

  it('refuses a multipart body a parser consumed first, its fields in req.body and its files elsewhere, naming why', async () => {
    // As multer does: the stream read, the fields in req.body, the files in req.files.
    const { url, handler } = await serveWithParserFirst('/uploads', (req, _res, next) => {
      req.on('data', () => {});
      req.on('end', () => {
        req.body = { note: 'scan' };
        next();
      });
    });
    const boundary = '----formdata-undici-0123';
    const result = await send(`${url}/uploads`, {
      key: randomUUID(),
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
      body: `--${boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nscan\r\n--${boundary}--\r\n`,
    });
    expect(result.status).toBe(500);
    expect(JSON.parse(result.text)).toEqual({
      code: 'ERR_IDEMPOTENCY_BODY',
      message: expect.stringMatching(/multipart.*files.*mount the idempotency middleware before that parser/),
    });
    expect(handler.runs).toBe(0);
  });
});

/**
 * An Express app with `parser` mounted before the middleware and one POST route at `path`, whose error handler
 * answers 500 with the error's code and message; `handler.runs` counts the route's runs.
 */
async function serveWithParserFirst(
  path: string,
  parser: express.RequestHandler,
): Promise<{ url: string; handler: { runs: number } }> {
  const app = express();
  app.use(parser);
  app.use(idempotencyHeader({ backend: new MemoryBackend() }));
  const handler = { runs: 0 };
  app.post(path, (_req, res) => {
    handler.runs++;
    res.status(201).json({ run: handler.runs });
  });
  app.use(
    (
      error: { code?: string; message?: string },
      _req: express.Request,
      res: express.Response,
      _next: express.NextFunction,
    ) => {
      res.status(500).json({ code: error.code, message: error.message });
    },
  );
  const server = await serve(app);
  return { url: server.url, handler };
}
