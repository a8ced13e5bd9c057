/**
 * The middleware mounted twice on one request's path (an app-wide instance and a router's, a plugin registered
 * twice, a handler wrapped twice), in every adapter: the first instance that takes the key handles the request,
 * the other lets it through. Before, the inner instance found the key in flight and answered 409, which the outer
 * one stored as the outcome (or, on Express, the two captures of one response called each other's `end` until
 * the stack overflowed and the process crashed).
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { serve } from '@hono/node-server';
import express from 'express';
import Fastify from 'fastify';
import { Hono } from 'hono';
import Koa from 'koa';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotencyHeader as expressIdempotency } from '../../src/adapters/express.js';
import { idempotencyHeader as fastifyIdempotency } from '../../src/adapters/fastify.js';
import { withIdempotency as fetchIdempotency } from '../../src/adapters/fetch.js';
import { idempotencyHeader as honoIdempotency } from '../../src/adapters/hono.js';
import { idempotencyHeader as koaIdempotency } from '../../src/adapters/koa.js';
import { withIdempotency as nodeIdempotency } from '../../src/adapters/node.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Backend } from '../../src/core/types.js';
import { express4, listen, send, type TestServer } from '../support/http.js';

/** The handler's work: counts its runs and answers 201 with the run's number, after a pause. */
interface Counter {
  runs: number;
}

const pause = () => new Promise((resolve) => setTimeout(resolve, 30));

/** Starts an app with two instances on `/admin/orders`, the second with a scope of its own, on `backend`. */
type StartTwice = (backend: Backend, counter: Counter) => Promise<TestServer>;

const scoped = { scope: () => 'admin' };

const APPS: Readonly<Record<string, StartTwice>> = {
  'Express 5, app-wide and on a router': (backend, counter) => {
    const app = express();
    app.use(express.json());
    app.use(expressIdempotency({ backend }));
    app.use('/admin', expressIdempotency({ backend, ...scoped }));
    app.post('/admin/orders', async (_req, res) => {
      await pause();
      res.status(201).json({ run: ++counter.runs });
    });
    return listen(createServer(app));
  },
  'Express 4, app-wide and on a router': (backend, counter) => {
    const app = express4();
    app.use(express4.json());
    app.use(expressIdempotency({ backend }));
    const router = express4.Router();
    router.use(expressIdempotency({ backend, ...scoped }));
    router.post('/orders', (_req, res) => {
      void pause().then(() => res.status(201).json({ run: ++counter.runs }));
    });
    app.use('/admin', router);
    return listen(createServer(app));
  },
  'node:http, a listener wrapped twice': (backend, counter) => {
    const inner = nodeIdempotency(
      (_req: IncomingMessage, res: ServerResponse) => {
        void pause().then(() => {
          res.writeHead(201, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ run: ++counter.runs }));
        });
      },
      { backend, ...scoped },
    );
    return listen(createServer(nodeIdempotency(inner, { backend })));
  },
  // The outer instance marks a request of Node.js's own class, the inner one sees it after Express gave the
  // request a prototype of its app's: the two ways a request is marked, seen from either side.
  'node:http wrapping an Express app that mounts its own': (backend, counter) => {
    const app = express();
    app.use(express.json());
    app.use(expressIdempotency({ backend, ...scoped }));
    app.post('/admin/orders', async (_req, res) => {
      await pause();
      res.status(201).json({ run: ++counter.runs });
    });
    return listen(createServer(nodeIdempotency<IncomingMessage, ServerResponse>(app, { backend })));
  },
  'Fastify, registered on the app and in a plugin': async (backend, counter) => {
    const app = Fastify();
    await app.register(fastifyIdempotency, { backend });
    await app.register(
      async (admin) => {
        await admin.register(fastifyIdempotency, { backend, ...scoped });
        admin.post('/orders', async (_request, reply) => {
          await pause();
          return reply.code(201).send({ run: ++counter.runs });
        });
      },
      { prefix: '/admin' },
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as { port: number };
    return { url: `http://127.0.0.1:${port}`, close: () => app.close() };
  },
  'Hono on @hono/node-server, app-wide and on a path': (backend, counter) => {
    const app = new Hono();
    app.use('*', honoIdempotency({ backend }));
    app.use('/admin/*', honoIdempotency({ backend, ...scoped }));
    app.post('/admin/orders', async (c) => {
      await c.req.json();
      await pause();
      return c.json({ run: ++counter.runs }, 201);
    });
    return serveFetch(app.fetch);
  },
  'Koa, two middleware in a row': (backend, counter) => {
    const app = new Koa();
    app.use(koaIdempotency({ backend }));
    app.use(koaIdempotency({ backend, ...scoped }));
    app.use(async (ctx) => {
      await pause();
      ctx.status = 201;
      ctx.body = { run: ++counter.runs };
    });
    return listen(createServer(app.callback()));
  },
  'fetch, a handler wrapped twice (served by @hono/node-server)': (backend, counter) => {
    const handler = fetchIdempotency(
      fetchIdempotency(
        async (request: Request) => {
          await request.text();
          await pause();
          return Response.json({ run: ++counter.runs }, { status: 201 });
        },
        { backend, ...scoped },
      ),
      { backend },
    );
    return serveFetch(handler);
  },
};

/** Serves a fetch handler on `@hono/node-server`. */
function serveFetch(fetchHandler: (request: Request) => Response | Promise<Response>): Promise<TestServer> {
  return new Promise((resolve) => {
    const server = serve({ fetch: fetchHandler, port: 0, hostname: '127.0.0.1' }, (info) =>
      resolve({
        url: `http://127.0.0.1:${info.port}`,
        close: () =>
          new Promise<void>((done) => {
            (server as unknown as { closeAllConnections(): void }).closeAllConnections();
            server.close(() => done());
          }),
      }),
    );
  });
}

let server: TestServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

describe('the middleware mounted twice on a request’s path', () => {
  for (const [label, start] of Object.entries(APPS)) {
    describe(label, () => {
      it('runs the handler once, stores its response and replays it', async () => {
        const counter = { runs: 0 };
        server = await start(new MemoryBackend(), counter);
        const key = randomUUID();
        const body = { item: 'book' };
        const first = await send(`${server.url}/admin/orders`, { key, body });
        expect(first.status).toBe(201);
        expect(first.headers.get('idempotent-replayed')).toBeNull();
        expect(JSON.parse(first.text)).toEqual({ run: 1 });
        const again = await send(`${server.url}/admin/orders`, { key, body });
        expect(again.status).toBe(201);
        expect(again.headers.get('idempotent-replayed')).toBe('true');
        expect(again.text).toBe(first.text);
        const other = await send(`${server.url}/admin/orders`, { key, body: { item: 'pen' } });
        expect(other.status).toBe(422);
        expect(counter.runs).toBe(1);
      });

      it('runs the handler once for 20 parallel requests with one key', async () => {
        const counter = { runs: 0 };
        server = await start(new MemoryBackend(), counter);
        const key = randomUUID();
        const url = `${server.url}/admin/orders`;
        const results = await Promise.all(
          Array.from({ length: 20 }, () => send(url, { key, body: { item: 'book' } })),
        );
        expect(counter.runs).toBe(1);
        const fresh = results.filter(
          (r) => r.status === 201 && r.headers.get('idempotent-replayed') === null,
        );
        expect(fresh).toHaveLength(1);
        for (const result of results) expect([201, 409]).toContain(result.status);
        // The key ends stored, never as a 409: the next request is a replay of the one run.
        const after = await send(url, { key, body: { item: 'book' } });
        expect(after.status).toBe(201);
        expect(after.text).toBe(fresh[0]!.text);
      });
    });
  }
});
