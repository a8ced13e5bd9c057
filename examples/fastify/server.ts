/**
 * Fastify example: an order endpoint made safe to retry, on the in-memory backend.
 *
 *   npm run example:fastify   # http://127.0.0.1:3000
 *
 * Environment: PORT (3000; 0 picks a free one), HOST (127.0.0.1).
 */
import { randomUUID } from 'node:crypto';
import Fastify from 'fastify';
import { MemoryBackend } from 'idempotency-header';
import { idempotencyHeader } from 'idempotency-header/fastify';

const app = Fastify();
await app.register(idempotencyHeader, { backend: new MemoryBackend() });

let orders = 0;
app.post<{ Body: { item?: string } }>('/orders', async (request, reply) => {
  const number = ++orders;
  return reply
    .code(201)
    .header('location', `/orders/${number}`)
    .send({ number, item: request.body?.item ?? null, key: request.idempotency?.key });
});

// A route that must never be deduplicated opts out.
app.post('/webhooks', { config: { idempotency: false } }, async () => ({ received: true }));

const address = await app.listen({
  port: Number(process.env.PORT ?? 3000),
  host: process.env.HOST ?? '127.0.0.1',
});
const curl = `curl -i -X POST ${address}/orders -H 'Idempotency-Key: ${randomUUID()}' -H 'Content-Type: application/json' -d '{"item":"book"}'`;
console.log(`Listening on ${address}/orders (Fastify, MemoryBackend)`);
console.log(
  'Run this twice: the first creates order 1; the second replays it, with Idempotent-Replayed: true.',
);
console.log(`  ${curl}\n  ${curl}`);

for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => app.close());
