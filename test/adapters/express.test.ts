/**
 * The Express adapter: the adapter contract on Express 5 and Express 4, each with the body parsers mounted before
 * the middleware and after it, on {@link MemoryBackend}; then what only Express has (routers, `sendFile`,
 * `redirect`, `res.json`, parsed bodies).
 */
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import express from 'express';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import {
  createExpressServerFactory,
  createMemoryBackend,
  type ExpressModule,
  express4,
  listen,
  send,
  type TestServer,
} from '../support/http.js';
import { describeAdapterContract } from './contract.js';

const VERSIONS: readonly (readonly [string, ExpressModule])[] = [
  ['Express 5', express],
  ['Express 4', express4],
];

for (const [version, expressModule] of VERSIONS) {
  for (const parsers of ['before', 'after'] as const) {
    describeAdapterContract(`${version}, body parsers ${parsers} the middleware, MemoryBackend`, {
      createServer: createExpressServerFactory(expressModule, parsers),
      createBackend: createMemoryBackend,
    });
  }
}

const REPLAYED = 'idempotent-replayed';

for (const [version, expressModule] of VERSIONS) {
  describe(`${version}: Express specifics`, () => {
    const servers: TestServer[] = [];
    const backends: MemoryBackend[] = [];
    let files = '';

    beforeAll(async () => {
      files = await mkdtemp(join(tmpdir(), 'idempotency-express-'));
      await writeFile(join(files, 'order.json'), '{ "id": 42,\n  "status": "shipped" }\n');
      await writeFile(join(files, 'note.txt'), 'plain text, not stored\n');
    });

    afterAll(async () => {
      await rm(files, { recursive: true, force: true });
    });

    afterEach(async () => {
      await Promise.all(servers.splice(0).map((server) => server.close()));
      for (const backend of backends.splice(0)) backend.close();
    });

    function newBackend(): MemoryBackend {
      const backend = new MemoryBackend();
      backends.push(backend);
      return backend;
    }

    async function serve(app: express.Express): Promise<TestServer> {
      const server = await listen(createServer(app));
      servers.push(server);
      return server;
    }

    it('cuts the connection, as Express does, when a handler fails after writing part of a response', async () => {
      const app = expressModule();
      app.use(expressModule.json());
      app.use(idempotencyHeader({ backend: newBackend() }));
      let runs = 0;
      app.post('/partial', (_req, res, next) => {
        runs++;
        res.setHeader('content-type', 'application/json');
        if (runs === 1) {
          res.write('{"half":');
          next(new Error('failed halfway'));
          return;
        }
        res.status(201).end('{"whole":true}');
      });
      app.use((_error: unknown, _req: express.Request, res: express.Response, next: express.NextFunction) => {
        // Express's own final handler makes the same check.
        if (res.headersSent) return next(_error);
        res.status(500).json({ detail: 'error page' });
      });
      const server = await serve(app);
      const key = randomUUID();
      const first = fetch(`${server.url}/partial`, {
        method: 'POST',
        headers: { 'idempotency-key': key, 'content-type': 'application/json' },
        body: '{}',
      }).then((response) => response.text());
      await expect(first).rejects.toThrow();
      const retry = await send(`${server.url}/partial`, { key, body: {} });
      expect(retry.status).toBe(201);
      expect(retry.text).toBe('{"whole":true}');
      expect(runs).toBe(2);
    });

    it('fingerprints the originalUrl when mounted under routers', async () => {
      const app = expressModule();
      app.use(expressModule.json());
      const middleware = idempotencyHeader({ backend: newBackend() });
      let runs = 0;
      for (const prefix of ['/a', '/b']) {
        const router = expressModule.Router();
        router.use(middleware);
        router.post('/orders', (_req, res) => {
          runs++;
          res.status(201).json({ prefix, run: runs });
        });
        app.use(prefix, router);
      }
      const { url } = await serve(app);
      const key = randomUUID();
      const body = { item: 'book' };

      const first = await send(`${url}/a/orders`, { key, body });
      expect(first.status).toBe(201);
      expect(JSON.parse(first.text)).toEqual({ prefix: '/a', run: 1 });
      // Inside both routers `req.url` is `/orders`: only the original URL tells the two endpoints apart.
      const other = await send(`${url}/b/orders`, { key, body });
      expect(other.status).toBe(422);
      expect(other.text).toMatch(/different request/);
      const replay = await send(`${url}/a/orders`, { key, body });
      expect(replay.headers.get(REPLAYED)).toBe('true');
      expect(replay.text).toBe(first.text);
      expect((await send(`${url}/a/orders?page=2`, { key, body })).status).toBe(422);
      expect(runs).toBe(1);
    });

    // A sub-app gives the response its own `app.response` as prototype while it runs, and the parent's back when
    // it calls next(): the capture must survive both (before, the first run answered and its key stayed in
    // flight, every retry got 409 and, once the lock lapsed, ran the handler again).
    it('stores and replays a route of a sub-app mounted after the middleware', async () => {
      const app = expressModule();
      app.use(expressModule.json());
      app.use(idempotencyHeader({ backend: newBackend() }));
      const sub = expressModule();
      let runs = 0;
      sub.post('/orders', (req, res) => {
        runs++;
        res.status(201).json({ run: runs, item: (req.body as { item?: string }).item });
      });
      app.use('/v1', sub);
      const { url } = await serve(app);
      const key = randomUUID();
      const first = await send(`${url}/v1/orders`, { key, body: { item: 'book' } });
      expect(first.status).toBe(201);
      expect(first.headers.get(REPLAYED)).toBeNull();
      const retries = await Promise.all(
        [1, 2, 3].map(() => send(`${url}/v1/orders`, { key, body: { item: 'book' } })),
      );
      for (const retry of retries) {
        expect(retry.status).toBe(201);
        expect(retry.headers.get(REPLAYED)).toBe('true');
        expect(retry.text).toBe(first.text);
      }
      expect(runs).toBe(1);
    });

    it('stores and replays a response sent after a sub-app with the middleware handed the request back', async () => {
      const app = expressModule();
      app.use(expressModule.json());
      const sub = expressModule();
      sub.use(idempotencyHeader({ backend: newBackend() }));
      sub.post('/orders', (_req, _res, next) => next());
      app.use('/v1', sub);
      let runs = 0;
      app.post('/v1/orders', (_req, res) => {
        runs++;
        res.status(201).json({ order: runs });
      });
      const { url } = await serve(app);
      const key = randomUUID();
      const first = await send(`${url}/v1/orders`, { key, body: { item: 'book' } });
      expect(first.status).toBe(201);
      const retry = await send(`${url}/v1/orders`, { key, body: { item: 'book' } });
      expect(retry.status).toBe(201);
      expect(retry.headers.get(REPLAYED)).toBe('true');
      expect(retry.text).toBe('{"order":1}');
      expect(runs).toBe(1);
    });

    it("captures where the app's own response prototype wraps end, as an instrumentation library may", async () => {
      const app = expressModule();
      let wrapped = 0;
      const end = app.response.end;
      app.response.end = function endWrapped(this: express.Response, ...args: unknown[]) {
        wrapped++;
        return (end as (...a: unknown[]) => unknown).apply(this, args);
      } as typeof end;
      app.use(expressModule.json());
      app.use(idempotencyHeader({ backend: newBackend() }));
      let runs = 0;
      app.post('/orders', (_req, res) => {
        runs++;
        res.status(201).json({ run: runs });
      });
      const { url } = await serve(app);
      const key = randomUUID();
      const first = await send(`${url}/orders`, { key, body: {} });
      const retry = await send(`${url}/orders`, { key, body: {} });
      expect([first.status, retry.status]).toEqual([201, 201]);
      expect(retry.headers.get(REPLAYED)).toBe('true');
      expect(retry.text).toBe(first.text);
      expect(runs).toBe(1);
      expect(wrapped).toBe(2);
    });

    it('stores a JSON file sent with res.sendFile and replays its bytes', async () => {
      const app = expressModule();
      app.use(idempotencyHeader({ backend: newBackend() }));
      let runs = 0;
      app.post('/file/:name', (req, res, next) => {
        runs++;
        res.sendFile(join(files, String(req.params.name)), (error) => {
          if (error) next(error);
        });
      });
      const { url } = await serve(app);

      const key = randomUUID();
      const first = await send(`${url}/file/order.json`, { key });
      expect(first.status).toBe(200);
      expect(first.headers.get('content-type')).toMatch(/^application\/json/);
      expect(first.text).toBe('{ "id": 42,\n  "status": "shipped" }\n');
      const replay = await send(`${url}/file/order.json`, { key });
      expect(replay.headers.get(REPLAYED)).toBe('true');
      expect(replay.body.equals(first.body)).toBe(true);
      expect(replay.headers.get('etag')).toBe(first.headers.get('etag'));
      expect(replay.headers.get('last-modified')).toBe(first.headers.get('last-modified'));
      expect(runs).toBe(1);

      const textKey = randomUUID();
      const text = await send(`${url}/file/note.txt`, { key: textKey });
      expect(text.text).toBe('plain text, not stored\n');
      const again = await send(`${url}/file/note.txt`, { key: textKey });
      expect(again.headers.get(REPLAYED)).toBeNull();
      expect(again.text).toBe('plain text, not stored\n');
      expect(runs).toBe(3);
    });

    it('sends res.redirect as it is, and replays its Location when redirects are stored', async () => {
      for (const cacheableContentTypes of [undefined, '*'] as const) {
        const app = expressModule();
        app.use(
          idempotencyHeader(
            cacheableContentTypes === undefined
              ? { backend: newBackend() }
              : { backend: newBackend(), cacheableContentTypes },
          ),
        );
        let runs = 0;
        app.post('/orders', (_req, res) => {
          runs++;
          res.redirect(303, `/orders/${runs}`);
        });
        const { url } = await serve(app);
        const key = randomUUID();

        const first = await send(`${url}/orders`, { key, redirect: 'manual' });
        expect(first.status).toBe(303);
        expect(first.headers.get('location')).toBe('/orders/1');
        expect(first.headers.get(REPLAYED)).toBeNull();
        const retry = await send(`${url}/orders`, { key, redirect: 'manual' });
        expect(retry.status).toBe(303);
        if (cacheableContentTypes === undefined) {
          // A text/plain redirect is not a stored type: the retry ran again.
          expect(retry.headers.get('location')).toBe('/orders/2');
          expect(retry.headers.get(REPLAYED)).toBeNull();
          expect(runs).toBe(2);
        } else {
          expect(retry.headers.get('location')).toBe('/orders/1');
          expect(retry.headers.get(REPLAYED)).toBe('true');
          expect(retry.body.equals(first.body)).toBe(true);
          expect(runs).toBe(1);
        }
      }
    });

    it("stores res.json's application/json; charset=utf-8 and replays its ETag", async () => {
      const app = expressModule();
      app.use(expressModule.json());
      app.use(idempotencyHeader({ backend: newBackend() }));
      let runs = 0;
      app.post('/orders', (req, res) => {
        runs++;
        res
          .status(201)
          .location(`/orders/${runs}`)
          .json({ run: runs, item: (req.body as { item?: string }).item });
      });
      const { url } = await serve(app);
      const key = randomUUID();
      const first = await send(`${url}/orders`, { key, body: { item: 'pen' } });
      expect(first.status).toBe(201);
      expect(first.headers.get('content-type')).toBe('application/json; charset=utf-8');
      expect(first.text).toBe('{"run":1,"item":"pen"}');
      const replay = await send(`${url}/orders`, { key, body: { item: 'pen' } });
      expect(replay.status).toBe(201);
      expect(replay.headers.get(REPLAYED)).toBe('true');
      expect(replay.text).toBe(first.text);
      expect(replay.headers.get('etag')).toBe(first.headers.get('etag'));
      expect(replay.headers.get('location')).toBe('/orders/1');
      expect(runs).toBe(1);
    });

    it('fingerprints a body parsed before it in canonical JSON form, and raw bytes otherwise', async () => {
      for (const parserFirst of [true, false]) {
        const app = expressModule();
        if (parserFirst) app.use(expressModule.json());
        app.use(idempotencyHeader({ backend: newBackend() }));
        if (!parserFirst) app.use(expressModule.json());
        let runs = 0;
        app.post('/orders', (req, res) => {
          runs++;
          res.status(201).json({ run: runs, body: req.body as unknown });
        });
        const { url } = await serve(app);
        const key = randomUUID();
        const headers = { 'content-type': 'application/json' };
        const first = await send(`${url}/orders`, { key, headers, body: '{"a":1,"b":[2,3]}' });
        expect(JSON.parse(first.text)).toEqual({ run: 1, body: { a: 1, b: [2, 3] } });
        const reordered = await send(`${url}/orders`, { key, headers, body: '{ "b": [2, 3], "a": 1 }' });
        if (parserFirst) {
          expect(reordered.headers.get(REPLAYED)).toBe('true');
          expect(reordered.text).toBe(first.text);
        } else {
          expect(reordered.status).toBe(422);
        }
        expect(runs).toBe(1);
      }
    });

    it('leaves the key free when a route calls next(error)', async () => {
      const app = expressModule();
      app.use(idempotencyHeader({ backend: newBackend() }));
      let runs = 0;
      app.post('/orders', (_req, res, next) => {
        runs++;
        if (runs === 1) return next(new Error('first attempt fails'));
        res.status(201).json({ run: runs });
      });
      app.use(
        (_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
          res.status(500).json({ error: 'failed' });
        },
      );
      const { url } = await serve(app);
      const key = randomUUID();
      expect((await send(`${url}/orders`, { key })).status).toBe(500);
      const retry = await send(`${url}/orders`, { key });
      expect(retry.status).toBe(201);
      expect(retry.headers.get(REPLAYED)).toBeNull();
      expect((await send(`${url}/orders`, { key })).headers.get(REPLAYED)).toBe('true');
      expect(runs).toBe(2);
    });
  });
}

describe('Express 5: async route handlers', () => {
  it('leaves the key free when an async route rejects', async () => {
    const backend = new MemoryBackend();
    const app = express();
    app.use(idempotencyHeader({ backend }));
    let runs = 0;
    app.post('/orders', async (_req, res) => {
      runs++;
      if (runs === 1) throw new Error('first attempt fails');
      res.status(201).json({ run: runs });
    });
    app.use((_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
      res.status(500).json({ error: 'failed' });
    });
    const server = await listen(createServer(app));
    try {
      const key = randomUUID();
      expect((await send(`${server.url}/orders`, { key })).status).toBe(500);
      const retry = await send(`${server.url}/orders`, { key });
      expect(retry.status).toBe(201);
      expect(JSON.parse(retry.text)).toEqual({ run: 2 });
      expect(runs).toBe(2);
    } finally {
      await server.close();
      backend.close();
    }
  });

  describe('a handler that fails is released, whatever Express’s error handling answers', () => {
    const errorHandlers = [
      ['Express’s final handler (HTML 500)', 500, undefined],
      [
        'a JSON 500',
        500,
        (_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
          res.status(500).json({ error: 'failed' });
        },
      ],
      [
        'a 404 mapped from the error',
        404,
        (_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
          res.status(404).json({ error: 'not found' });
        },
      ],
    ] as const;
    const failures = [
      ['throws', () => Promise.reject(new Error('boom'))],
      ['passes an error to next', undefined],
    ] as const;

    for (const [answer, status, errorHandler] of errorHandlers) {
      for (const [how, fail] of failures) {
        it(`${how}, answered by ${answer}, with cacheServerErrors and every type stored`, async () => {
          const backend = new MemoryBackend();
          const app = express();
          app.use(idempotencyHeader({ backend, cacheServerErrors: true, cacheableContentTypes: '*' }));
          let runs = 0;
          app.post('/orders', async (_req, res, next) => {
            runs++;
            if (runs === 1) {
              if (fail === undefined) return next(new Error('boom'));
              await fail();
            }
            res.status(201).json({ run: runs });
          });
          // An explicit 500 is a response like any other: stored with cacheServerErrors.
          app.post('/explicit', (_req, res) => {
            runs++;
            res.status(500).json({ run: runs });
          });
          if (errorHandler !== undefined) app.use(errorHandler);
          app.set('env', 'test');
          const server = await listen(createServer(app));
          try {
            const key = randomUUID();
            const first = await send(`${server.url}/orders`, { key });
            expect([first.status, first.headers.get(REPLAYED)]).toEqual([status, null]);
            const retry = await send(`${server.url}/orders`, { key });
            expect([retry.status, retry.headers.get(REPLAYED), JSON.parse(retry.text)]).toEqual([
              201,
              null,
              { run: 2 },
            ]);
            const explicitKey = randomUUID();
            const explicit = await send(`${server.url}/explicit`, { key: explicitKey });
            const replay = await send(`${server.url}/explicit`, { key: explicitKey });
            expect([replay.status, replay.headers.get(REPLAYED), replay.text]).toEqual([
              500,
              'true',
              explicit.text,
            ]);
            expect(runs).toBe(3);
          } finally {
            await server.close();
            backend.close();
          }
        });
      }
    }
  });
});
