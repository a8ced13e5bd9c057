/**
 * The app the runtime tests serve on Bun, Deno and workerd: the Hono middleware under `/hono/*` and
 * `withIdempotency` under `/fetch/*`, on a `MemoryBackend`. Web-standard only: it is bundled for a neutral
 * platform, so a `node:` import anywhere on its path fails the bundle.
 *
 * Routes (each under both prefixes): `POST /orders` answers 201 JSON with the run number and the body it read;
 * `POST /slow` the same after `x-delay` ms; `GET /runs` the run counters. `x-tenant` is the scope.
 */
import { Hono } from 'hono';
import { idempotencyOf, withIdempotency } from '../../src/adapters/fetch.js';
import { type IdempotencyVariables, idempotencyHeader } from '../../src/adapters/hono.js';
import { MemoryBackend } from '../../src/backends/memory.js';

const runs: Record<string, number> = {};

async function order(prefix: string, path: string, read: () => Promise<unknown>, key: string | undefined) {
  const count = (runs[prefix + path] ?? 0) + 1;
  runs[prefix + path] = count;
  return { run: count, key, body: await read() };
}

const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const hono = new Hono<{ Variables: IdempotencyVariables }>().basePath('/hono');
hono.use(idempotencyHeader({ backend: new MemoryBackend(), scope: (c) => c.req.header('x-tenant') }));
hono.post('/orders', async (c) =>
  c.json(await order('hono', '/orders', () => c.req.json(), c.get('idempotency')?.key), 201),
);
hono.post('/slow', async (c) => {
  await delay(Number(c.req.header('x-delay') ?? 0));
  return c.json(await order('hono', '/slow', () => c.req.json(), c.get('idempotency')?.key), 201);
});

const fetchHandler = withIdempotency(
  async (request: Request) => {
    const path = new URL(request.url).pathname.slice('/fetch'.length);
    if (path === '/slow') await delay(Number(request.headers.get('x-delay') ?? 0));
    const key = idempotencyOf(request)?.key;
    return Response.json(await order('fetch', path, () => request.json(), key), { status: 201 });
  },
  { backend: new MemoryBackend(), scope: (request) => request.headers.get('x-tenant') ?? undefined },
);

export default {
  async fetch(request: Request): Promise<Response> {
    const { pathname } = new URL(request.url);
    if (pathname.endsWith('/runs')) return Response.json(runs);
    if (pathname.startsWith('/hono/')) return hono.fetch(request);
    if (pathname.startsWith('/fetch/')) return fetchHandler(request);
    return new Response('not found', { status: 404 });
  },
};
