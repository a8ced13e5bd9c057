/**
 * The Fastify plugin: the adapter contract on memory and Redis, then what only Fastify has (per-route options,
 * `inject()`, encapsulation, hooks seeing replays, `request.idempotency`).
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import multipart, { type MultipartFile } from '@fastify/multipart';
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import { type FastifyIdempotencyOptions, idempotencyHeader } from '../../src/adapters/fastify.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createFastifyServerFactory } from '../support/fastify.js';
import { createMemoryBackend, postRaw } from '../support/http.js';
import { requireRedis } from '../support/redis.js';
import { createIoredisBackend } from '../support/redis-handle.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('Fastify 5, MemoryBackend', {
  createServer: createFastifyServerFactory(),
  createBackend: createMemoryBackend,
});

const redisUp = await requireRedis('Fastify adapter contract on RedisBackend');
describe.runIf(redisUp)('Fastify adapter on RedisBackend', () => {
  describeAdapterContract('Fastify 5, ioredis', {
    createServer: createFastifyServerFactory(),
    createBackend: () => createIoredisBackend('fastify'),
  });
});

describe('Fastify plugin specifics', () => {
  const backends: MemoryBackend[] = [];
  const apps: FastifyInstance[] = [];

  afterEach(async () => {
    await Promise.all(apps.splice(0).map((app) => app.close()));
    for (const backend of backends.splice(0)) backend.close();
  });

  async function build(options: Partial<FastifyIdempotencyOptions> = {}): Promise<FastifyInstance> {
    const backend = new MemoryBackend();
    backends.push(backend);
    const app = Fastify();
    apps.push(app);
    await app.register(idempotencyHeader, { backend, ...options });
    return app;
  }

  const post = (app: FastifyInstance, url: string, key: string | undefined, payload: object = { a: 1 }) =>
    app.inject({
      method: 'POST',
      url,
      payload,
      headers: key === undefined ? {} : { 'idempotency-key': key },
    });

  it('works through inject(), and hands the key and lease signal to the handler', async () => {
    const app = await build();
    let runs = 0;
    const seen: unknown[] = [];
    app.post('/orders', async (request, reply) => {
      seen.push(request.idempotency?.key, request.idempotency?.signal.aborted);
      return reply.code(201).send({ run: ++runs });
    });
    app.post('/plain', async (request) => ({ idempotency: request.idempotency }));
    const key = randomUUID();
    const first = await post(app, '/orders', key);
    expect(first.statusCode).toBe(201);
    expect(first.headers['idempotent-replayed']).toBeUndefined();
    const replay = await post(app, '/orders', key);
    expect(replay.statusCode).toBe(201);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toBe(first.body);
    expect(runs).toBe(1);
    expect(seen).toEqual([key, false]);
    // Without a key, the request passes through and `request.idempotency` is null.
    expect((await post(app, '/plain', undefined)).json()).toEqual({ idempotency: null });
  });

  it('reaches routes registered in other plugins, as fastify-plugin makes it', async () => {
    const app = await build();
    let runs = 0;
    await app.register(
      async (child) => {
        child.post('/orders', async (_request, reply) => reply.code(201).send({ run: ++runs }));
      },
      { prefix: '/v1' },
    );
    const key = randomUUID();
    await post(app, '/v1/orders', key);
    expect((await post(app, '/v1/orders', key)).headers['idempotent-replayed']).toBe('true');
    expect(runs).toBe(1);
  });

  it('leaves a route with config.idempotency: false alone, and applies a route override', async () => {
    const app = await build();
    let runs = 0;
    app.post('/webhook', { config: { idempotency: false } }, async () => ({ run: ++runs }));
    app.post('/strict', { config: { idempotency: { required: true } } }, async () => ({ run: ++runs }));
    const key = randomUUID();
    await post(app, '/webhook', key);
    const again = await post(app, '/webhook', key);
    expect(again.headers['idempotent-replayed']).toBeUndefined();
    expect(again.json()).toEqual({ run: 2 });
    const missing = await post(app, '/strict', undefined);
    expect(missing.statusCode).toBe(400);
    expect(missing.json()).toEqual({ detail: "'Idempotency-Key' header is required" });
    expect(runs).toBe(2);
  });

  it('refuses an invalid route override when the route is declared', async () => {
    const app = await build();
    expect(() => app.post('/bad', { config: { idempotency: { expiry: -1 } } }, async () => ({}))).toThrow(
      /expiry/,
    );
  });

  it('rejects register() and ready() with the option named when the plugin options are invalid, instead of throwing past them', async () => {
    const uncaught: unknown[] = [];
    const onUncaught = (error: unknown) => uncaught.push(error);
    process.on('uncaughtException', onUncaught);
    try {
      const app = Fastify();
      await expect(
        app.register(idempotencyHeader, { backend: new MemoryBackend(), expiry: 0 }),
      ).rejects.toMatchObject({
        code: 'ERR_IDEMPOTENCY_OPTION',
        message: expect.stringMatching(/`expiry`/),
      });
      const other = Fastify();
      other.register(idempotencyHeader, {} as never);
      await expect(other.ready()).rejects.toMatchObject({
        code: 'ERR_IDEMPOTENCY_OPTION',
        message: expect.stringMatching(/`backend`/),
      });
      expect(uncaught).toEqual([]);
    } finally {
      process.off('uncaughtException', onUncaught);
    }
  });

  it('sends replays through reply, so onSend and onResponse hooks see them', async () => {
    const app = await build();
    const sent: string[] = [];
    app.addHook('onSend', async (_request, reply, payload) => {
      reply.header('x-served-by', 'hook');
      return payload;
    });
    app.addHook('onResponse', async (_request, reply) => {
      sent.push(`${reply.statusCode} ${String(reply.getHeader('idempotent-replayed') ?? '-')}`);
    });
    app.post('/orders', async (_request, reply) => reply.code(201).send({ id: randomUUID() }));
    const key = randomUUID();
    const first = await post(app, '/orders', key);
    const replay = await post(app, '/orders', key);
    expect(replay.headers['x-served-by']).toBe('hook');
    expect(replay.body).toBe(first.body);
    expect(sent).toEqual(['201 -', '201 true']);
  });

  for (const parser of ['leaves the stream', 'hands the stream on as the body'] as const) {
    it(`fingerprints the bytes of a body that a catch-all parser ${parser}, and leaves them to the handler`, async () => {
      const backend = new MemoryBackend();
      backends.push(backend);
      const app = Fastify();
      apps.push(app);
      app.removeAllContentTypeParsers();
      app.addContentTypeParser('*', (_request, payload, done) =>
        parser === 'leaves the stream' ? done(null) : done(null, payload),
      );
      await app.register(idempotencyHeader, { backend });
      let runs = 0;
      app.post('/imports', async (request, reply) => {
        const stream = (parser === 'leaves the stream' ? request.raw : request.body) as AsyncIterable<Buffer>;
        const chunks: Buffer[] = [];
        for await (const chunk of stream) chunks.push(chunk);
        return reply.code(201).send({ run: ++runs, rows: Buffer.concat(chunks).toString() });
      });
      const send = (key: string, rows: string) =>
        app.inject({
          method: 'POST',
          url: '/imports',
          payload: rows,
          headers: { 'content-type': 'text/csv', 'idempotency-key': key },
        });
      const key = randomUUID();
      const first = await send(key, 'a,b\n1,2\n');
      expect([first.statusCode, first.json()]).toEqual([201, { run: 1, rows: 'a,b\n1,2\n' }]);
      const replay = await send(key, 'a,b\n1,2\n');
      expect([replay.headers['idempotent-replayed'], replay.body]).toEqual(['true', first.body]);
      expect((await send(key, 'a,b\n3,4\n')).statusCode).toBe(422);
      expect(runs).toBe(1);
    });
  }

  describe('with @fastify/multipart', () => {
    const form = (boundary: string, file: string) => ({
      'content-type': `multipart/form-data; boundary=${boundary}`,
      body: Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nscan\r\n` +
          `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n` +
          `Content-Type: application/octet-stream\r\n\r\n${file}\r\n--${boundary}--\r\n`,
      ),
    });
    const upload = (app: FastifyInstance, key: string | undefined, boundary: string, file: string) => {
      const { body, ...headers } = form(boundary, file);
      return app.inject({
        method: 'POST',
        url: '/uploads',
        payload: body,
        headers: key === undefined ? headers : { ...headers, 'idempotency-key': key },
      });
    };

    for (const attachFieldsToBody of [false, true]) {
      it(`fingerprints the upload's bytes whether the handler streams it or it is attached as fields (attachFieldsToBody: ${attachFieldsToBody})`, async () => {
        const backend = new MemoryBackend();
        backends.push(backend);
        const app = Fastify();
        apps.push(app);
        await app.register(multipart, { attachFieldsToBody });
        await app.register(idempotencyHeader, { backend });
        let runs = 0;
        app.post('/uploads', async (request, reply) => {
          runs++;
          const file = attachFieldsToBody
            ? (request.body as { file: MultipartFile }).file
            : ((await request.file()) as MultipartFile);
          return reply.code(201).send({ run: runs, file: (await file.toBuffer()).toString() });
        });
        const key = randomUUID();
        const first = await upload(app, key, '----formdata-undici-0123', 'first');
        expect([first.statusCode, first.json()]).toEqual([201, { run: 1, file: 'first' }]);
        // The same form, encoded again with another boundary, as a retrying client does.
        const replay = await upload(app, key, '----WebKitFormBoundaryQ9', 'first');
        expect([replay.statusCode, replay.headers['idempotent-replayed'], replay.body]).toEqual([
          201,
          'true',
          first.body,
        ]);
        const other = await upload(app, key, '----formdata-undici-4567', 'other');
        expect(other.statusCode).toBe(422);
        // Without a key the upload is left alone, and the handler reads it all.
        const unkeyed = await upload(app, undefined, 'b', 'free');
        expect([unkeyed.statusCode, unkeyed.json()]).toEqual([201, { run: 2, file: 'free' }]);
        expect(runs).toBe(2);
      });
    }

    it('refuses a keyed upload on a route declared before the multipart parser was registered, which leaves fields without the bytes, with a clear error', async () => {
      const backend = new MemoryBackend();
      backends.push(backend);
      const app = Fastify();
      apps.push(app);
      await app.register(idempotencyHeader, { backend });
      // Not awaited: the route is declared before `@fastify/multipart` is loaded, so no trace of the bytes is kept.
      app.register(multipart, { attachFieldsToBody: true });
      let runs = 0;
      app.post('/uploads', async (_request, reply) => reply.code(201).send({ run: ++runs }));
      const response = await upload(app, randomUUID(), 'b', 'scan');
      expect(response.statusCode).toBe(500);
      expect(response.json()).toMatchObject({
        code: 'ERR_IDEMPOTENCY_BODY',
        message: expect.stringMatching(/multipart.*before declaring the routes/),
      });
      expect(runs).toBe(0);
      // Without a key the upload is left alone.
      expect((await upload(app, undefined, 'b', 'scan')).statusCode).toBe(201);
    });

    it('answers a keyed multipart request whose body is empty, with or without chunked framing, under a raw multipart parser', async () => {
      const app = await build();
      // A parser that reads the whole body, as a raw-body parser for uploads does.
      app.addContentTypeParser('multipart/form-data', { parseAs: 'buffer' }, (_request, body, done) =>
        done(null, body),
      );
      let runs = 0;
      app.post('/uploads', async (_request, reply) => reply.code(201).send({ run: ++runs }));
      await app.listen({ port: 0, host: '127.0.0.1' });
      const { port } = app.server.address() as AddressInfo;
      const empty = async (framing: Record<string, string>) => {
        const headers = {
          'content-type': 'multipart/form-data; boundary=xyz',
          'idempotency-key': randomUUID(),
          ...framing,
        };
        return (await postRaw(`http://127.0.0.1:${port}/uploads`, headers)).status;
      };
      expect(await empty({ 'transfer-encoding': 'chunked' })).toBe(201);
      expect(await empty({ 'content-length': '0' })).toBe(201);
      expect(runs).toBe(2);
    });

    it('answers 413 to an upload over maxRequestBytes, closing the connection, without running the handler', async () => {
      const app = await build({ maxRequestBytes: 256 });
      await app.register(multipart);
      let runs = 0;
      app.post('/uploads', async (_request, reply) => reply.code(201).send({ run: ++runs }));
      const response = await upload(app, randomUUID(), 'b', 'x'.repeat(1000));
      expect([response.statusCode, response.headers.connection]).toEqual([413, 'close']);
      expect(runs).toBe(0);
    });
  });

  it('stores the payload before any onSend hook changed it, so a hook registered before the plugin changes a replay once, as it did the first response', async () => {
    const backend = new MemoryBackend();
    backends.push(backend);
    const app = Fastify();
    apps.push(app);
    const envelope = async (_request: unknown, _reply: unknown, payload: unknown) =>
      `{"data":${String(payload)}}`;
    // One on the app and one in a plugin, both registered before the idempotency plugin; one in a plugin after it.
    app.addHook('onSend', envelope);
    let runs = 0;
    const handler = async (_request: unknown, reply: FastifyReply) => reply.code(201).send({ run: ++runs });
    app.register(async (before) => {
      before.addHook('onSend', envelope);
      before.post('/before', handler);
    });
    await app.register(idempotencyHeader, { backend });
    app.register(async (after) => {
      after.addHook('onSend', envelope);
      after.post('/after', handler);
    });
    app.post('/orders', handler);
    for (const [url, wrapped] of [
      ['/orders', '{"data":{"run":1}}'],
      ['/before', '{"data":{"data":{"run":2}}}'],
      ['/after', '{"data":{"data":{"run":3}}}'],
    ] as const) {
      const key = randomUUID();
      const first = await post(app, url, key);
      const replay = await post(app, url, key);
      expect([first.statusCode, first.body]).toEqual([201, wrapped]);
      expect([replay.statusCode, replay.headers['idempotent-replayed'], replay.body]).toEqual([
        201,
        'true',
        wrapped,
      ]);
    }
    expect(runs).toBe(3);
  });

  it('hands onSend hooks a replayed JSON or text body as a string, as Fastify hands them a first run’s, and a binary one as a buffer', async () => {
    const app = await build({ cacheableContentTypes: '*' });
    const seen: string[] = [];
    app.addHook('onSend', async (request, _reply, payload) => {
      seen.push(
        `${request.url} ${typeof payload === 'string' ? 'string' : Buffer.isBuffer(payload) ? 'buffer' : typeof payload}`,
      );
      // A hook written for serialised JSON, which string methods would fail on a buffer.
      return typeof payload === 'string' ? payload.replace('secret', '***') : payload;
    });
    app.post('/json', async (_request, reply) => reply.code(201).send({ card: 'secret', note: 'é ✓' }));
    app.post('/text', async (_request, reply) => reply.type('text/plain; charset=utf-8').send('secret text'));
    app.post('/bytes', async (_request, reply) =>
      reply.type('application/octet-stream').send(Buffer.from([0xff, 0x00, 0xfe])),
    );
    for (const url of ['/json', '/text', '/bytes']) {
      const key = randomUUID();
      const first = await post(app, url, key);
      const replay = await post(app, url, key);
      expect(replay.headers['idempotent-replayed']).toBe('true');
      expect(replay.rawPayload.equals(first.rawPayload)).toBe(true);
      expect(replay.headers['content-length']).toBe(first.headers['content-length']);
    }
    expect(seen).toEqual([
      '/json string',
      '/json string',
      '/text string',
      '/text string',
      '/bytes buffer',
      '/bytes buffer',
    ]);
  });

  it('stores what the handler set, not what hooks before it set, whether they set headers on reply or on reply.raw', async () => {
    const backend = new MemoryBackend();
    backends.push(backend);
    const app = Fastify();
    apps.push(app);
    let request = 0;
    // Registered before the plugin: they run again for the replay, with the replay's own values.
    app.addHook('onRequest', async (_request, reply) => {
      request++;
      reply.header('x-request-id', `req-${request}`);
      reply.raw.setHeader('x-raw-request-id', `raw-${request}`);
      reply.header('x-removed-by-handler', 'yes');
    });
    await app.register(idempotencyHeader, { backend });
    app.post('/orders', async (_request, reply) => {
      reply.removeHeader('x-removed-by-handler');
      reply.header('x-request-id', `handler-${request}`);
      return reply.code(201).header('x-order', 'o-1').send({ id: randomUUID() });
    });
    const key = randomUUID();
    const first = await post(app, '/orders', key);
    expect(first.headers).toMatchObject({
      'x-request-id': 'handler-1',
      'x-raw-request-id': 'raw-1',
      'x-order': 'o-1',
    });
    expect(first.headers['x-removed-by-handler']).toBeUndefined();
    const replay = await post(app, '/orders', key);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    // Changed by the handler: stored. Left as the hook set it: the replay's own. Removed by the handler: removed.
    expect(replay.headers).toMatchObject({
      'x-request-id': 'handler-1',
      'x-raw-request-id': 'raw-2',
      'x-order': 'o-1',
    });
    expect(replay.headers['x-removed-by-handler']).toBeUndefined();
    expect(replay.body).toBe(first.body);

    // With no hook setting anything before, every header the handler set is stored.
    const bare = await build();
    bare.post('/orders', async (_request, reply) => reply.code(201).header('x-order', 'o-2').send({ id: 2 }));
    const bareKey = randomUUID();
    await post(bare, '/orders', bareKey);
    const bareReplay = await post(bare, '/orders', bareKey);
    expect(bareReplay.headers).toMatchObject({ 'idempotent-replayed': 'true', 'x-order': 'o-2' });
  });

  it('stores the headers a handler sets on reply.raw, beside those it sets on reply', async () => {
    const app = await build();
    let runs = 0;
    app.post('/orders', async (_request, reply) => {
      runs++;
      reply.raw.setHeader('x-raw-order', `raw-${runs}`);
      return reply.code(201).header('x-order', `o-${runs}`).send({ run: runs });
    });
    const key = randomUUID();
    const first = await post(app, '/orders', key);
    expect(first.headers).toMatchObject({ 'x-raw-order': 'raw-1', 'x-order': 'o-1' });
    const replay = await post(app, '/orders', key);
    expect(runs).toBe(1);
    expect(replay.headers).toMatchObject({
      'idempotent-replayed': 'true',
      'x-raw-order': 'raw-1',
      'x-order': 'o-1',
    });
    expect(replay.body).toBe(first.body);
  });

  it('fingerprints the parsed body: the same JSON document with its keys in another order is a repeat', async () => {
    const app = await build();
    let runs = 0;
    app.post('/orders', async () => ({ run: ++runs }));
    const key = randomUUID();
    await app.inject({
      method: 'POST',
      url: '/orders',
      headers: { 'idempotency-key': key, 'content-type': 'application/json' },
      payload: '{"a":1,"b":2}',
    });
    const reordered = await app.inject({
      method: 'POST',
      url: '/orders',
      headers: { 'idempotency-key': key, 'content-type': 'application/json' },
      payload: '{ "b": 2, "a": 1 }',
    });
    expect(reordered.headers['idempotent-replayed']).toBe('true');
    expect((await post(app, '/orders', key, { a: 2 })).statusCode).toBe(422);
    expect(runs).toBe(1);
  });

  it('releases the key when the handler throws, and sends Fastify’s own error response', async () => {
    const app = await build();
    let runs = 0;
    app.post('/fail', async () => {
      runs++;
      throw Object.assign(new Error('no stock'), { statusCode: 409 });
    });
    const key = randomUUID();
    const first = await post(app, '/fail', key);
    expect(first.statusCode).toBe(409);
    expect(first.json()).toMatchObject({ message: 'no stock' });
    expect((await post(app, '/fail', key)).statusCode).toBe(409);
    expect(runs).toBe(2);
  });

  it('stores a streamed JSON reply whole and replays it', async () => {
    const app = await build();
    app.post('/stream', async (_request, reply) => {
      reply.header('content-type', 'application/json');
      return reply.send(Readable.from(['{"items":[', '1,2', ']}']));
    });
    const key = randomUUID();
    const first = await post(app, '/stream', key);
    expect(first.body).toBe('{"items":[1,2]}');
    const replay = await post(app, '/stream', key);
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(replay.body).toBe(first.body);
  });
});
