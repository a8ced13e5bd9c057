/**
 * The fetch adapter, `withIdempotency(handler)`, on Node.js (`@hono/node-server` turns node:http into `Request`s):
 * the adapter contract on memory and Redis, then what only it has (the request body stays readable, streamed
 * `Response` bodies, `idempotencyOf`, other arguments passed on).
 */
import { randomUUID } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotencyOf, withIdempotency } from '../../src/adapters/fetch.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createFetchServerFactory } from '../support/hono.js';
import { createMemoryBackend } from '../support/http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('fetch withIdempotency on @hono/node-server, MemoryBackend', {
  createServer: createFetchServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('fetch adapter contract on RedisBackend');
describe.runIf(redisUp)('fetch adapter on RedisBackend', () => {
  describeAdapterContract('fetch withIdempotency on @hono/node-server, ioredis', {
    createServer: createFetchServerFactory(),
    createBackend: () => createIoredisBackend('fetch'),
  });
});

describe('withIdempotency specifics', () => {
  const backends: MemoryBackend[] = [];

  afterEach(() => {
    for (const backend of backends.splice(0)) backend.close();
  });

  function backend(): MemoryBackend {
    const memory = new MemoryBackend();
    backends.push(memory);
    return memory;
  }

  const request = (key: string | undefined, body = '{"a":1}', url = 'http://localhost/orders') =>
    new Request(url, {
      method: 'POST',
      body,
      headers: {
        'content-type': 'application/json',
        ...(key === undefined ? {} : { 'idempotency-key': key }),
      },
    });

  it('passes the runtime’s other arguments on, and leaves the request body readable', async () => {
    const seen: unknown[] = [];
    const handler = withIdempotency(
      async (req: Request, env: { name: string }, ctx: { id: number }) => {
        seen.push(env.name, ctx.id, await req.json(), idempotencyOf(req)?.key);
        return Response.json({ ok: true }, { status: 201 });
      },
      { backend: backend() },
    );
    const key = randomUUID();
    const response = await handler(request(key), { name: 'env' }, { id: 7 });
    expect(response.status).toBe(201);
    expect(seen).toEqual(['env', 7, { a: 1 }, key]);
    const replay = await handler(request(key), { name: 'env' }, { id: 8 });
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(seen).toHaveLength(4);
    // Without a key: passed through, no idempotency.
    await handler(request(undefined), { name: 'plain' }, { id: 9 });
    expect(seen.slice(4)).toEqual(['plain', 9, { a: 1 }, undefined]);
  });

  it('hashes the path and query of the URL, as the other adapters hash the path they see', async () => {
    const handler = withIdempotency(async () => Response.json({ ok: true }), { backend: backend() });
    const key = randomUUID();
    await handler(request(key, '{}', 'http://one.example/orders?x=1'));
    const sameTarget = await handler(request(key, '{}', 'https://two.example:8443/orders?x=1'));
    expect(sameTarget.headers.get('idempotent-replayed')).toBe('true');
    expect((await handler(request(key, '{}', 'http://one.example/orders?x=2'))).status).toBe(422);
  });

  it('lets an error of the handler go on to the runtime after releasing the key', async () => {
    let runs = 0;
    const handler = withIdempotency(
      async () => {
        runs++;
        throw new Error('boom');
      },
      { backend: backend() },
    );
    const key = randomUUID();
    await expect(handler(request(key))).rejects.toThrow('boom');
    await expect(handler(request(key))).rejects.toThrow('boom');
    expect(runs).toBe(2);
  });

  it('stores a streamed JSON body whole before answering, and streams an event stream on', async () => {
    const encoder = new TextEncoder();
    const stream = (parts: string[]) =>
      new ReadableStream<Uint8Array>({
        start(controller) {
          for (const part of parts) controller.enqueue(encoder.encode(part));
          controller.close();
        },
      });
    const handler = withIdempotency(
      async (req: Request) =>
        new URL(req.url).pathname === '/events'
          ? new Response(stream(['data: 1\n\n']), { headers: { 'content-type': 'text/event-stream' } })
          : new Response(stream(['{"items":', '[1,2]}']), {
              headers: { 'content-type': 'application/json' },
            }),
      { backend: backend() },
    );
    const key = randomUUID();
    expect(await (await handler(request(key))).text()).toBe('{"items":[1,2]}');
    const replay = await handler(request(key));
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.text()).toBe('{"items":[1,2]}');
    const events = await handler(request(randomUUID(), '{}', 'http://localhost/events'));
    expect(await events.text()).toBe('data: 1\n\n');
  });

  it('refuses a body over maxRequestBytes with 413 before calling the handler', async () => {
    let runs = 0;
    const handler = withIdempotency(
      async () => {
        runs++;
        return new Response('ok');
      },
      { backend: backend(), maxRequestBytes: 8 },
    );
    const response = await handler(request(randomUUID(), '{"a":"0123456789"}'));
    expect(response.status).toBe(413);
    expect(runs).toBe(0);
  });
});
