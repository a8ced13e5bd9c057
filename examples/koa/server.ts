/**
 * Koa example: an order endpoint made safe to retry, on the in-memory backend, with `@koa/bodyparser` mounted
 * before the middleware.
 *
 *   npm run example:koa   # http://127.0.0.1:3000
 *
 * Environment: PORT (3000; 0 picks a free one), HOST (127.0.0.1).
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { bodyParser } from '@koa/bodyparser';
import { MemoryBackend } from 'idempotency-header';
import { idempotencyHeader } from 'idempotency-header/koa';
import Koa from 'koa';

const app = new Koa();
app.use(bodyParser());
app.use(idempotencyHeader({ backend: new MemoryBackend() }));

let orders = 0;
app.use((ctx) => {
  if (ctx.method !== 'POST' || ctx.path !== '/orders') return;
  const number = ++orders;
  const { item } = (ctx.request.body ?? {}) as { item?: string };
  ctx.status = 201;
  ctx.set('Location', `/orders/${number}`);
  ctx.body = { number, item: item ?? null, key: ctx.state.idempotency?.key };
});

const host = process.env.HOST ?? '127.0.0.1';
const server = app.listen(Number(process.env.PORT ?? 3000), host, () => {
  const { port } = server.address() as AddressInfo;
  const url = `http://${host}:${port}/orders`;
  const curl = `curl -i -X POST ${url} -H 'Idempotency-Key: ${randomUUID()}' -H 'Content-Type: application/json' -d '{"item":"book"}'`;
  console.log(`Listening on ${url} (Koa, MemoryBackend)`);
  console.log(
    'Run this twice: the first creates order 1; the second replays it, with Idempotent-Replayed: true.',
  );
  console.log(`  ${curl}\n  ${curl}`);
});

for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => server.close());
