/**
 * Differential corpus for the Koa middleware (SPEC §3, transparent first runs; see `test/support/differential.ts`
 * for what is compared): every case is a Koa handler (`ctx.body` of every kind Koa takes, `ctx.status`, `ctx.set`,
 * `ctx.redirect`, cookies, errors, streams, `ctx.respond = false`), served by bare Koa and by Koa with the
 * middleware, on Koa 2 and Koa 3, with `@koa/bodyparser` before the middleware and after it, on memory and Redis.
 * Both apps have a middleware of their own mounted first (a header before `next()`, another after it) and one
 * mounted between the middleware and the handler (a header after `next()`).
 */
import { createServer } from 'node:http';
import { PassThrough } from 'node:stream';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { bodyParser } from '@koa/bodyparser';
import Koa from 'koa';
import { describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/koa.js';
import type { IdempotencyOptions } from '../../src/core/options.js';
import {
  chunks,
  describeDifferential,
  differentialBackends,
  failOnUnexpectedErrors,
  listenOn,
  numberedCases,
} from '../support/differential.js';
import { type KoaModule, koa3 } from '../support/koa.js';

failOnUnexpectedErrors();

interface KoaCase {
  readonly name: string;
  readonly handler: Koa.Middleware;
  readonly skip?: string;
}

const encoder = new TextEncoder();
const largeObject = (size: number) => ({ pad: 'x'.repeat(size) });

const CORPUS: readonly KoaCase[] = [
  {
    name: 'an object',
    handler: (ctx) => {
      ctx.body = { id: 1 };
    },
  },
  {
    name: 'an object with a status and a Location',
    handler: (ctx) => {
      ctx.status = 201;
      ctx.set('Location', '/orders/2');
      ctx.body = { id: 2, note: 'café' };
    },
  },
  {
    name: 'the parsed request body echoed',
    handler: async (ctx) => {
      const request = ctx.request as typeof ctx.request & { body?: unknown };
      ctx.status = 201;
      ctx.body = { received: request.body ?? null };
    },
  },
  {
    name: 'an array',
    handler: (ctx) => {
      ctx.body = [1, 'two', null];
    },
  },
  {
    name: 'a text string',
    handler: (ctx) => {
      ctx.body = 'hello';
    },
  },
  {
    name: 'an HTML string',
    handler: (ctx) => {
      ctx.body = '<p>hello</p>';
    },
  },
  {
    name: 'a JSON string with ctx.type',
    handler: (ctx) => {
      ctx.type = 'json';
      ctx.body = '{ "a" : 1 }';
    },
  },
  {
    name: 'a Buffer',
    handler: (ctx) => {
      ctx.body = Buffer.from([0, 1, 2, 255]);
    },
  },
  {
    name: 'a JSON Buffer',
    handler: (ctx) => {
      ctx.type = 'application/json; charset=utf-8';
      ctx.body = Buffer.from('{"b":2}');
    },
  },
  {
    name: 'a JSON stream',
    handler: (ctx) => {
      ctx.type = 'json';
      ctx.body = chunks(['{"items":', '[1,2]', '}']);
    },
  },
  {
    name: 'a text stream',
    handler: (ctx) => {
      ctx.body = chunks(['one ', 'two']);
    },
  },
  {
    name: 'an event stream written over time',
    handler: (ctx) => {
      ctx.type = 'text/event-stream';
      const stream = new PassThrough();
      ctx.body = stream;
      (async () => {
        stream.write('data: one\n\n');
        await nextTurn();
        stream.end('data: two\n\n');
      })();
    },
  },
  {
    name: 'null',
    handler: (ctx) => {
      ctx.body = null;
    },
  },
  {
    name: 'null with a JSON type',
    handler: (ctx) => {
      ctx.type = 'json';
      ctx.body = null;
    },
  },
  {
    name: 'no body and a status',
    handler: (ctx) => {
      ctx.status = 202;
    },
  },
  { name: 'no body at all (404)', handler: () => {} },
  {
    name: 'a 204 with a body Koa drops',
    handler: (ctx) => {
      ctx.status = 204;
      ctx.body = { dropped: true };
    },
  },
  {
    name: 'a 304 with an ETag',
    handler: (ctx) => {
      ctx.etag = 'v1';
      ctx.status = 304;
    },
  },
  {
    name: 'a redirect',
    handler: (ctx) => {
      ctx.status = 303;
      ctx.redirect('/orders/1');
    },
  },
  {
    name: 'repeated headers: ctx.set with a list, ctx.append, ctx.vary',
    handler: (ctx) => {
      ctx.set('Link', ['</a>; rel="a"', '</b>; rel="b"']);
      ctx.append('Vary', 'Accept');
      ctx.vary('Accept-Language');
      ctx.body = { linked: true };
    },
  },
  {
    name: 'cookies',
    handler: (ctx) => {
      ctx.cookies.set('a', '1', { path: '/' });
      ctx.cookies.set('b', '2', { httpOnly: true });
      ctx.body = { cookies: 2 };
    },
  },
  {
    name: 'an attachment',
    handler: (ctx) => {
      ctx.attachment('order.json');
      ctx.body = { attached: true };
    },
  },
  {
    name: 'Last-Modified and a manual length',
    handler: (ctx) => {
      ctx.lastModified = new Date(Date.UTC(2024, 0, 2, 3, 4, 5));
      ctx.type = 'json';
      ctx.body = '{"length":1}';
      ctx.length = 12;
    },
  },
  {
    name: 'the header an earlier middleware set, removed by the handler',
    handler: (ctx) => {
      ctx.remove('x-app');
      ctx.body = { removedEarlier: true };
    },
  },
  {
    name: 'the header an earlier middleware set, overwritten by the handler',
    handler: (ctx) => {
      ctx.set('x-app', 'handler');
      ctx.body = { overwritten: true };
    },
  },
  { name: 'ctx.throw(400)', handler: (ctx) => ctx.throw(400, 'bad order') },
  {
    name: 'ctx.throw with headers',
    handler: (ctx) => ctx.throw(401, 'who are you', { headers: { 'www-authenticate': 'Bearer' } }),
  },
  {
    name: 'a synchronous throw',
    handler: () => {
      throw new Error('thrown before answering');
    },
  },
  {
    name: 'a body and headers set, then an async rejection',
    handler: async (ctx) => {
      ctx.set('x-before-failure', '1');
      ctx.body = { never: 'sent' };
      await nextTurn();
      throw new Error('failed after setting the body');
    },
  },
  {
    name: 'a stream that fails midway',
    handler: (ctx) => {
      ctx.type = 'json';
      ctx.body = chunks(['{"half":', '[1,'], new Error('stream failed'));
    },
  },
  {
    name: 'a stream that fails before its first chunk',
    handler: (ctx) => {
      ctx.type = 'json';
      ctx.body = chunks([], new Error('stream failed'));
    },
  },
  {
    name: 'a 2 MiB object (over maxResponseBytes)',
    handler: (ctx) => {
      ctx.body = largeObject(2 * 1024 * 1024);
    },
  },
  {
    name: 'a 1.5 MiB stream in 64 KiB chunks (over maxResponseBytes)',
    handler: (ctx) => {
      const body = Buffer.from(JSON.stringify(largeObject(1536 * 1024)));
      const parts: Buffer[] = [];
      for (let offset = 0; offset < body.length; offset += 65_536)
        parts.push(body.subarray(offset, offset + 65_536));
      ctx.type = 'json';
      ctx.body = chunks(parts);
    },
  },
  {
    name: 'a 100 KiB object',
    handler: (ctx) => {
      ctx.body = largeObject(100 * 1024);
    },
  },
  {
    name: 'a 503',
    handler: (ctx) => {
      ctx.status = 503;
      ctx.set('Retry-After', '3');
      ctx.body = { down: true };
    },
  },
  {
    name: 'a 429 refusal',
    handler: (ctx) => {
      ctx.status = 429;
      ctx.set('Retry-After', '1');
      ctx.body = { slow: 'down' };
    },
  },
  {
    name: 'a body after awaiting',
    handler: async (ctx) => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      ctx.status = 202;
      ctx.body = { later: true };
    },
  },
  {
    name: 'ctx.respond = false and a response written on ctx.res',
    handler: (ctx) => {
      ctx.respond = false;
      ctx.res.writeHead(201, { 'content-type': 'application/json' });
      ctx.res.end('{"raw":true}');
    },
  },
  {
    name: 'a Blob',
    handler: (ctx) => {
      ctx.body = new Blob(['{"blob":true}'], { type: 'application/json' });
    },
  },
  {
    name: 'a ReadableStream',
    handler: (ctx) => {
      ctx.type = 'json';
      ctx.body = new ReadableStream({
        start(controller) {
          controller.enqueue(encoder.encode('{"web":'));
          controller.enqueue(encoder.encode('"stream"}'));
          controller.close();
        },
      });
    },
  },
  {
    name: 'a Response',
    handler: (ctx) => {
      ctx.body = new Response('{"response":true}', {
        status: 201,
        headers: { 'content-type': 'application/json', 'x-from-response': '1' },
      });
    },
  },
];

const VERSIONS: readonly (readonly [string, KoaModule])[] = [
  ['Koa 2', Koa],
  ['Koa 3', koa3],
];
const PARSER_PLACEMENTS = ['before', 'after'] as const;

function koaApp(
  KoaClass: KoaModule,
  parser: (typeof PARSER_PLACEMENTS)[number],
  idempotency?: Koa.Middleware,
): Koa {
  const app = new KoaClass();
  // The corpus fails on purpose: no error log.
  app.silent = true;
  // A middleware of the app's own, first: a header before the handler, another one after it.
  app.use(async (ctx, next) => {
    ctx.set('x-app', 'corpus');
    await next();
    ctx.set('x-after', 'set after next');
  });
  if (parser === 'before') app.use(bodyParser());
  if (idempotency !== undefined) app.use(idempotency);
  if (parser === 'after') app.use(bodyParser());
  // One between the middleware and the handler.
  app.use(async (ctx, next) => {
    await next();
    if (ctx.respond !== false) ctx.set('x-inner', 'between');
  });
  app.use(async (ctx, next) => {
    if (ctx.path === '/ping') {
      ctx.body = { pong: true };
      return;
    }
    const handler = CORPUS[Number(ctx.path.split('/')[2])]?.handler;
    if (handler === undefined) return next();
    return handler(ctx, next);
  });
  return app;
}

const cases = numberedCases(CORPUS);

const backends = await differentialBackends('Koa');

describe('Koa: the first response equals bare Koa’s, byte for byte', () => {
  it('has a corpus of at least 20 behaviours', () => {
    expect(CORPUS.length).toBeGreaterThanOrEqual(20);
  });

  for (const backendSetup of backends) {
    for (const [version, KoaClass] of VERSIONS) {
      for (const parser of PARSER_PLACEMENTS) {
        const label = `${version}, body parser ${parser} the middleware`;
        describeDifferential(label, backendSetup, cases, async (backend, onEvent) => {
          const options: IdempotencyOptions<Koa.Context> = { backend, onEvent };
          const bare = await listenOn(createServer(koaApp(KoaClass, parser).callback()));
          const idempotent = await listenOn(
            createServer(koaApp(KoaClass, parser, idempotencyHeader(options)).callback()),
          );
          return { bare, idempotent };
        });
      }
    }
  }
});
