/**
 * Hono example: an order endpoint made safe to retry, on the in-memory backend, served on Node.js with
 * `@hono/node-server` (the same app runs on Bun, Deno and Cloudflare Workers: export `app` as their handler).
 *
 *   npm run example:hono   # http://127.0.0.1:3000
 *
 * Environment: PORT (3000; 0 picks a free one), HOST (127.0.0.1).
 */
import { serve } from '@hono/node-server';
import { Hono } from 'hono';
import { MemoryBackend } from 'idempotency-header';
import { type IdempotencyVariables, idempotencyHeader } from 'idempotency-header/hono';

const app = new Hono<{ Variables: IdempotencyVariables }>();
app.use('/orders/*', idempotencyHeader({ backend: new MemoryBackend() }));

let orders = 0;
app.post('/orders', async (c) => {
  const { item } = await c.req.json<{ item?: string }>();
  const number = ++orders;
  c.header('Location', `/orders/${number}`);
  return c.json({ number, item: item ?? null, key: c.get('idempotency')?.key }, 201);
});

const hostname = process.env.HOST ?? '127.0.0.1';
const server = serve({ fetch: app.fetch, port: Number(process.env.PORT ?? 3000), hostname }, ({ port }) => {
  const url = `http://${hostname}:${port}/orders`;
  const curl = `curl -i -X POST ${url} -H 'Idempotency-Key: ${crypto.randomUUID()}' -H 'Content-Type: application/json' -d '{"item":"book"}'`;
  console.log(`Listening on ${url} (Hono, MemoryBackend)`);
  console.log(
    'Run this twice: the first creates order 1; the second replays it, with Idempotent-Replayed: true.',
  );
  console.log(`  ${curl}\n  ${curl}`);
});

for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => server.close());
