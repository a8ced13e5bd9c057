/**
 * fetch example: a `(request) => Response` handler made safe to retry, on the in-memory backend. The handler is
 * what Bun's and Deno's `serve`, a Cloudflare Worker or a Next.js route handler take; here Node.js serves it
 * through `@hono/node-server`.
 *
 *   npm run example:fetch   # http://127.0.0.1:3000
 *   bun examples/fetch/server.ts, deno run -A examples/fetch/server.ts: the same handler on those runtimes
 *
 * Environment: PORT (3000; 0 picks a free one), HOST (127.0.0.1).
 */
import { MemoryBackend } from 'idempotency-header';
import { idempotencyOf, withIdempotency } from 'idempotency-header/fetch';

let orders = 0;

export const handler = withIdempotency(
  async (request: Request) => {
    const { pathname } = new URL(request.url);
    if (request.method !== 'POST' || pathname !== '/orders')
      return new Response('not found', { status: 404 });
    const { item } = (await request.json()) as { item?: string };
    const number = ++orders;
    return Response.json(
      { number, item: item ?? null, key: idempotencyOf(request)?.key },
      { status: 201, headers: { location: `/orders/${number}` } },
    );
  },
  { backend: new MemoryBackend() },
);

const port = Number(process.env.PORT ?? 3000);
const hostname = process.env.HOST ?? '127.0.0.1';
const announce = (actualPort: number) => {
  const url = `http://${hostname}:${actualPort}/orders`;
  const curl = `curl -i -X POST ${url} -H 'Idempotency-Key: ${crypto.randomUUID()}' -H 'Content-Type: application/json' -d '{"item":"book"}'`;
  console.log(`Listening on ${url} (fetch handler, MemoryBackend)`);
  console.log(
    'Run this twice: the first creates order 1; the second replays it, with Idempotent-Replayed: true.',
  );
  console.log(`  ${curl}\n  ${curl}`);
};

const runtime = globalThis as {
  Bun?: { serve(options: object): { port: number } };
  Deno?: { serve(options: object, handler: unknown): unknown };
};
if (runtime.Bun) announce(runtime.Bun.serve({ port, hostname, fetch: handler }).port);
else if (runtime.Deno)
  runtime.Deno.serve({ port, hostname, onListen: ({ port }: { port: number }) => announce(port) }, handler);
else {
  const { serve } = await import('@hono/node-server');
  const server = serve({ fetch: (request) => handler(request), port, hostname }, (info) =>
    announce(info.port),
  );
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => server.close());
}
