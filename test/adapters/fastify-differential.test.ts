/**
 * Differential corpus for the Fastify plugin (SPEC §3, transparent first runs; see `test/support/differential.ts`
 * for what is compared): every case is a route written the Fastify way, served by bare Fastify and by Fastify with
 * the plugin, on memory and Redis. Both apps have a hook registered before the plugin (`onRequest`, setting a
 * header) and one after it (`onSend`, setting another), as most Fastify apps do.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';
import Fastify, { type FastifyInstance, type RouteHandlerMethod, type RouteShorthandOptions } from 'fastify';
import { describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/fastify.js';
import {
  chunks,
  describeDifferential,
  differentialBackends,
  failOnUnexpectedErrors,
  type Listening,
  numberedCases,
} from '../support/differential.js';

failOnUnexpectedErrors();

interface FastifyCase {
  readonly name: string;
  /** Declares the case's route at `path`, on the app or in a plugin of its own. */
  readonly route: (app: FastifyInstance, path: string) => void;
  readonly skip?: string;
}

const JSON_TYPE = 'application/json; charset=utf-8';
const encoder = new TextEncoder();
const largeObject = (size: number) => ({ pad: 'x'.repeat(size) });
const post =
  (handler: RouteHandlerMethod, options: RouteShorthandOptions = {}) =>
  (app: FastifyInstance, path: string) =>
    app.post(path, options, handler);

const CORPUS: readonly FastifyCase[] = [
  { name: 'an object returned by an async handler', route: post(async () => ({ id: 1 })) },
  {
    name: 'an object returned by a sync handler with reply.code',
    route: post((_request, reply) => {
      reply.code(201);
      return { id: 2 };
    }),
  },
  {
    name: 'reply.code(201).send(object) with a Location header',
    route: post(async (_request, reply) => reply.code(201).header('location', '/orders/3').send({ id: 3 })),
  },
  {
    name: 'the parsed request body echoed',
    route: post(async (request, reply) => reply.code(201).send({ received: request.body })),
  },
  { name: 'reply.send(string), text/plain', route: post(async (_request, reply) => reply.send('hello')) },
  {
    name: 'reply.type(json).send(string)',
    route: post(async (_request, reply) => reply.type('application/json').send('{ "spaced" : true }')),
  },
  {
    name: 'reply.send(Buffer), octet-stream',
    route: post(async (_request, reply) => reply.send(Buffer.from([0, 1, 2, 253, 254, 255]))),
  },
  {
    name: 'reply.type(json).send(Buffer)',
    route: post(async (_request, reply) => reply.type(JSON_TYPE).send(Buffer.from('{"buffer":true}'))),
  },
  {
    name: 'reply.send(a Node.js stream) of JSON',
    route: post(async (_request, reply) => reply.type(JSON_TYPE).send(chunks(['{"items":', '[1,2]', '}']))),
  },
  {
    name: 'reply.send(a web ReadableStream) of JSON',
    route: post(async (_request, reply) =>
      reply.type(JSON_TYPE).send(
        new ReadableStream({
          start(controller) {
            controller.enqueue(encoder.encode('{"web":'));
            controller.enqueue(encoder.encode('"stream"}'));
            controller.close();
          },
        }),
      ),
    ),
  },
  {
    name: 'reply.send(a Response)',
    route: post(async (_request, reply) =>
      reply.send(
        new Response('{"response":true}', {
          status: 201,
          headers: { 'content-type': 'application/json', 'x-from-response': '1' },
        }),
      ),
    ),
  },
  {
    name: 'reply.headers() and a repeated reply.header',
    route: post(async (_request, reply) => {
      reply.headers({ 'x-one': '1', 'x-two': 2, link: ['</a>; rel="a"', '</b>; rel="b"'] });
      reply.header('vary', 'Accept');
      reply.header('vary', 'Accept-Language');
      return { headers: true };
    }),
  },
  {
    name: 'cookies',
    route: post(async (_request, reply) => {
      reply.header('set-cookie', ['a=1; Path=/', 'b=2; HttpOnly']);
      return { cookies: 2 };
    }),
  },
  {
    name: 'a header set, then removed',
    route: post(async (_request, reply) => {
      reply.header('x-temporary', '1');
      reply.removeHeader('x-temporary');
      return { removed: true };
    }),
  },
  {
    name: 'the header an earlier hook set, removed by the handler',
    route: post(async (_request, reply) => {
      reply.removeHeader('x-app');
      return { removedEarlier: true };
    }),
  },
  {
    name: 'the header an earlier hook set, overwritten by the handler',
    route: post(async (_request, reply) => {
      reply.header('x-app', 'handler');
      return { overwritten: true };
    }),
  },
  {
    name: 'reply.redirect(url, 303)',
    route: post(async (_request, reply) => reply.redirect('/orders/9', 303)),
  },
  { name: 'reply.code(204).send()', route: post(async (_request, reply) => reply.code(204).send()) },
  {
    name: 'reply.code(204).send(object), a body Fastify drops',
    route: post(async (_request, reply) => reply.code(204).send({ dropped: true })),
  },
  {
    name: 'reply.code(304) with an ETag',
    route: post(async (_request, reply) => reply.code(304).header('etag', '"v1"').send()),
  },
  { name: 'reply.send() with no payload', route: post(async (_request, reply) => reply.send()) },
  { name: 'reply.send(null)', route: post(async (_request, reply) => reply.send(null)) },
  {
    name: 'a route preHandler hook that sets a header',
    route: post(async () => ({ hooked: 'preHandler' }), {
      preHandler: async (_request, reply) => {
        reply.header('x-pre-handler', '1');
      },
    }),
  },
  {
    name: 'a route onSend hook that sets a header',
    route: post(async () => ({ hooked: 'onSend' }), {
      onSend: async (_request, reply, payload) => {
        reply.header('x-on-send', '1');
        return payload;
      },
    }),
  },
  {
    name: 'a route onSend hook that rewrites the payload',
    route: post(async () => ({ hooked: 'rewrite' }), {
      onSend: async (_request, _reply, payload) => String(payload).replace('rewrite', 'rewritten'),
    }),
  },
  {
    name: 'a response schema that drops a field',
    route: post(async (_request, reply) => reply.code(201).send({ id: 4, secret: 'dropped' }), {
      schema: { response: { 201: { type: 'object', properties: { id: { type: 'number' } } } } },
    }),
  },
  {
    name: 'a custom serializer',
    route: post(async (_request, reply) =>
      reply.serializer((value: unknown) => `${JSON.stringify(value)}\n`).send({ serialised: 'custom' }),
    ),
  },
  {
    name: 'an object sent after awaiting',
    route: post(async (_request, reply) => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      return reply.code(202).send({ later: true });
    }),
  },
  {
    name: 'a synchronous throw',
    route: post(() => {
      throw new Error('thrown before sending');
    }),
  },
  {
    name: 'an async rejection with a statusCode',
    route: post(async () => {
      await nextTurn();
      throw Object.assign(new Error('no stock'), { statusCode: 409 });
    }),
  },
  {
    name: 'reply.send(an Error)',
    route: post(async (_request, reply) =>
      reply.send(Object.assign(new Error('bad input'), { statusCode: 400 })),
    ),
  },
  {
    name: 'headers set, then a rejection',
    route: post(async (_request, reply) => {
      reply.header('x-before-failure', '1');
      await nextTurn();
      throw new Error('failed after setting a header');
    }),
  },
  {
    name: 'a rejection after reply.send',
    route: post(async (_request, reply) => {
      reply.code(201).send({ sent: true });
      throw new Error('failed after sending');
    }),
  },
  {
    name: 'a rejection a tick after reply.send',
    route: post(async (_request, reply) => {
      reply.code(201).send({ sent: 'tick' });
      await nextTurn();
      throw new Error('failed a tick after sending');
    }),
  },
  {
    name: 'a custom error handler in a plugin of its own',
    route: (app, path) => {
      app.register(async (child) => {
        child.setErrorHandler(async (error, _request, reply) =>
          reply
            .code(418)
            .header('x-handled', 'yes')
            .send({ handled: (error as Error).message }),
        );
        child.post(path, async () => {
          throw new Error('handled by the plugin');
        });
      });
    },
  },
  {
    name: 'a stream that fails midway',
    route: post(async (_request, reply) =>
      reply.type(JSON_TYPE).send(chunks(['{"half":', '[1,'], new Error('stream failed'))),
    ),
  },
  {
    name: 'a stream that fails before its first chunk',
    route: post(async (_request, reply) =>
      reply.type(JSON_TYPE).send(chunks([], new Error('stream failed'))),
    ),
  },
  {
    name: 'a 2 MiB object (over maxResponseBytes)',
    route: post(async () => largeObject(2 * 1024 * 1024)),
  },
  {
    name: 'a 1.5 MiB stream in 64 KiB chunks (over maxResponseBytes)',
    route: post(async (_request, reply) => {
      const body = Buffer.from(JSON.stringify(largeObject(1536 * 1024)));
      const parts: Buffer[] = [];
      for (let offset = 0; offset < body.length; offset += 65_536)
        parts.push(body.subarray(offset, offset + 65_536));
      return reply.type(JSON_TYPE).send(chunks(parts));
    }),
  },
  {
    name: 'a 100 KiB object',
    route: post(async () => largeObject(100 * 1024)),
  },
  {
    name: 'a 503',
    route: post(async (_request, reply) => reply.code(503).header('retry-after', '3').send({ down: true })),
  },
  {
    name: 'a 429 refusal',
    route: post(async (_request, reply) => reply.code(429).header('retry-after', '1').send({ slow: 'down' })),
  },
  {
    name: 'a 404 from reply.callNotFound()',
    route: post(async (_request, reply) => reply.callNotFound()),
  },
  {
    name: 'an event stream',
    route: post(async (_request, reply) =>
      reply.header('content-type', 'text/event-stream').send(chunks(['data: one\n\n', 'data: two\n\n'])),
    ),
  },
  {
    name: 'a later preHandler hook that answers 401',
    route: post(async () => ({ never: true }), {
      preHandler: async (_request, reply) => reply.code(401).send({ detail: 'who are you' }),
    }),
  },
  {
    name: 'a later preHandler hook that throws',
    route: post(async () => ({ never: true }), {
      preHandler: async () => {
        throw Object.assign(new Error('forbidden'), { statusCode: 403 });
      },
    }),
  },
  {
    name: 'reply.send(Uint8Array)',
    route: post(async (_request, reply) =>
      reply.type(JSON_TYPE).send(new Uint8Array(encoder.encode('[1,2,3]'))),
    ),
  },
  {
    name: 'reply.send() from a timer, the handler returning reply',
    route: post((_request, reply) => {
      setTimeout(() => reply.code(201).send({ timer: true }), 5);
      return reply;
    }),
  },
  {
    name: 'reply.send() in an async handler that returns nothing',
    route: post(async (_request, reply) => {
      reply.code(201).send({ returned: 'nothing' });
    }),
  },
  {
    name: 'a problem+json string',
    route: post(async (_request, reply) =>
      reply.code(400).type('application/problem+json').send('{"title":"Bad","status":400}'),
    ),
  },
  {
    name: 'reply.trailer()',
    route: post(async (_request, reply) =>
      reply.trailer('x-checksum', async () => 'abc').send({ trailers: true }),
    ),
  },
  {
    name: 'a Response with a streamed body',
    route: post(async (_request, reply) =>
      reply.send(
        new Response(
          new ReadableStream({
            start(controller) {
              controller.enqueue(encoder.encode('{"streamed":'));
              controller.enqueue(encoder.encode('"response"}'));
              controller.close();
            },
          }),
          { status: 202, headers: { 'content-type': 'application/json' } },
        ),
      ),
    ),
  },
  {
    name: 'a route that opts out',
    route: post(async (_request, reply) => reply.code(201).send({ optedOut: true }), {
      config: { idempotency: false },
    }),
  },
  {
    name: 'a route that stores every type, text',
    route: post(async (_request, reply) => reply.code(201).send('stored text'), {
      config: { idempotency: { cacheableContentTypes: '*' } },
    }),
  },
  {
    name: 'reply.hijack() and a response written on reply.raw',
    route: post(async (_request, reply) => {
      reply.hijack();
      reply.raw.writeHead(201, { 'content-type': 'application/json' });
      reply.raw.end('{"hijacked":true}');
    }),
  },
];

async function fastifyApp(
  idempotency?: Parameters<typeof idempotencyHeader>[1] & object,
): Promise<FastifyInstance> {
  const app = Fastify({ logger: false, bodyLimit: 10 * 1024 * 1024 });
  // A hook registered before the plugin: it answers every request again, replays included.
  app.addHook('onRequest', async (_request, reply) => {
    reply.header('x-app', 'corpus');
  });
  if (idempotency !== undefined) await app.register(idempotencyHeader, idempotency);
  // One registered after it: it sets its header on the way out, replays included.
  app.addHook('onSend', async (_request, reply, payload) => {
    reply.header('x-sent-by', 'fastify');
    return payload;
  });
  CORPUS.forEach((corpusCase, i) => {
    corpusCase.route(app, `/case/${i}`);
  });
  app.get('/ping', async () => ({ pong: true }));
  await app.listen({ port: 0, host: '127.0.0.1' });
  return app;
}

function listening(app: FastifyInstance): Listening {
  const address = app.server.address();
  return {
    port: typeof address === 'object' && address !== null ? address.port : 0,
    async close() {
      app.server.closeAllConnections();
      await app.close();
    },
  };
}

const cases = numberedCases(CORPUS);

const backends = await differentialBackends('Fastify');

describe('Fastify: the first response equals bare Fastify’s, byte for byte', () => {
  it('has a corpus of at least 20 behaviours', () => {
    expect(CORPUS.length).toBeGreaterThanOrEqual(20);
  });

  for (const backendSetup of backends) {
    describeDifferential('Fastify 5', backendSetup, cases, async (backend, onEvent) => {
      const bare = listening(await fastifyApp());
      const idempotent = listening(await fastifyApp({ backend, onEvent }));
      return { bare, idempotent };
    });
  }
});
