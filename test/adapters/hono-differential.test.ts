/**
 * Differential corpus for the Hono middleware on Node.js (`@hono/node-server`; SPEC §3, transparent first runs;
 * see `test/support/differential.ts` for what is compared): every case is a route written the Hono way, served by
 * bare Hono and by Hono with the middleware, on memory and Redis, under three stacks: a middleware of the app's
 * own around the routes only; Hono's `cors`, `secureHeaders` and `etag` mounted before the middleware; the same
 * mounted after it.
 */
import { createServer } from 'node:http';
import { getRequestListener } from '@hono/node-server';
import { type Context, Hono, type MiddlewareHandler } from 'hono';
import { setCookie } from 'hono/cookie';
import { cors } from 'hono/cors';
import { etag } from 'hono/etag';
import { HTTPException } from 'hono/http-exception';
import { secureHeaders } from 'hono/secure-headers';
import { stream, streamSSE, streamText } from 'hono/streaming';
import { validator } from 'hono/validator';
import { describe, expect, it } from 'vitest';
import { type IdempotencyVariables, idempotencyHeader } from '../../src/adapters/hono.js';
import type { IdempotencyOptions } from '../../src/core/options.js';
import {
  describeDifferential,
  differentialBackends,
  failOnUnexpectedErrors,
  HONO_NODE_SERVER_FRAMING,
  listenOn,
  numberedCases,
} from '../support/differential.js';

failOnUnexpectedErrors();

type Env = { Variables: IdempotencyVariables };
type HonoHandler = (c: Context<Env>) => Response | Promise<Response>;

interface HonoCase {
  readonly name: string;
  /** Declares the case's route at `path`. */
  readonly route: (app: Hono<Env>, path: string) => void;
  readonly skip?: string;
}

const encoder = new TextEncoder();
const largeObject = (size: number) => ({ pad: 'x'.repeat(size) });
const post = (handler: HonoHandler) => (app: Hono<Env>, path: string) => app.post(path, handler);
const tick = () => new Promise((resolve) => setTimeout(resolve, 1));

/** A byte stream of `parts`, each after a tick, failing with `error` at the end if given. */
function byteStream(parts: readonly (string | Uint8Array)[], error?: Error): ReadableStream<Uint8Array> {
  let index = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      await tick();
      if (index < parts.length) {
        const part = parts[index++]!;
        controller.enqueue(typeof part === 'string' ? encoder.encode(part) : part);
      } else if (error !== undefined) controller.error(error);
      else controller.close();
    },
  });
}

const CORPUS: readonly HonoCase[] = [
  { name: 'c.json(object)', route: post((c) => c.json({ id: 1 })) },
  {
    name: 'c.json(object, 201) with c.header(Location)',
    route: post((c) => {
      c.header('Location', '/orders/2');
      return c.json({ id: 2 }, 201);
    }),
  },
  {
    name: 'c.status(201), then c.json',
    route: post((c) => {
      c.status(201);
      return c.json({ id: 3 });
    }),
  },
  {
    name: 'the request body read with c.req.json() and echoed',
    route: post(async (c) => c.json({ received: await c.req.json() }, 201)),
  },
  {
    name: 'a validator reading the JSON body',
    route: (app, path) =>
      app.post(
        path,
        validator('json', (value) => value as { item: string }),
        (c) => c.json({ validated: c.req.valid('json').item }, 201),
      ),
  },
  {
    name: 'the request body read with c.req.text(), then c.req.json()',
    route: post(async (c) => c.json({ text: await c.req.text(), json: await c.req.json() }, 201)),
  },
  {
    name: 'the request body read with c.req.arrayBuffer()',
    route: post(async (c) => c.json({ bytes: (await c.req.arrayBuffer()).byteLength }, 201)),
  },
  {
    name: 'the request body read with c.req.blob()',
    route: post(async (c) => {
      const blob = await c.req.blob();
      return c.json({ size: blob.size, type: blob.type, text: await blob.text() }, 201);
    }),
  },
  {
    name: 'the request body read with c.req.raw.text()',
    route: post(async (c) => c.json({ raw: await c.req.raw.text() }, 201)),
  },
  { name: 'c.text(string), text/plain', route: post((c) => c.text('hello')) },
  {
    name: 'a Response with mixed-case headers out of order',
    route: post(
      () =>
        new Response('{"order":true}', {
          headers: { 'X-Zulu': 'z', 'Content-Type': 'application/json', 'X-Alpha': 'a' },
        }),
    ),
  },
  {
    name: 'c.body(string) with one mixed-case header',
    route: post((c) => c.body('{"one":true}', 201, { 'Content-Type': 'application/json' })),
  },
  { name: 'c.text with a status and a header', route: post((c) => c.text('made', 201, { 'x-text': '1' })) },
  { name: 'c.html(string)', route: post((c) => c.html('<p>hello</p>')) },
  { name: 'c.body(Uint8Array) without a type', route: post((c) => c.body(new Uint8Array([0, 1, 2, 255]))) },
  {
    name: 'c.body(string) typed JSON',
    route: post((c) => c.body('{ "spaced" : true }', 200, { 'content-type': 'application/json' })),
  },
  {
    name: 'c.newResponse(ArrayBuffer)',
    route: post((c) =>
      c.newResponse(encoder.encode('{"arrayBuffer":true}').buffer as ArrayBuffer, 200, {
        'content-type': 'application/json',
      }),
    ),
  },
  {
    name: 'a Response built by hand',
    route: post(
      () =>
        new Response('{"byHand":true}', {
          status: 201,
          headers: { 'content-type': 'application/json', 'x-by-hand': '1' },
        }),
    ),
  },
  { name: 'Response.json()', route: post(() => Response.json({ static: true }, { status: 202 })) },
  {
    name: 'a Response with a status text',
    route: post(
      () =>
        new Response('{"statusText":true}', {
          status: 201,
          statusText: 'Made It',
          headers: { 'content-type': 'application/json' },
        }),
    ),
  },
  {
    name: 'a Response with a Blob body',
    route: post(() => new Response(new Blob(['{"blob":true}'], { type: 'application/json' }))),
  },
  {
    name: 'a Response with a ReadableStream of JSON',
    route: post(
      () =>
        new Response(byteStream(['{"items":', '[1,2]', '}']), {
          headers: { 'content-type': 'application/json' },
        }),
    ),
  },
  {
    name: 'stream() helper writing JSON',
    route: post((c) => {
      c.header('content-type', 'application/json');
      return stream(c, async (out) => {
        await out.write('{"streamed":');
        await out.sleep(1);
        await out.write('true}');
      });
    }),
  },
  {
    name: 'streamText() helper',
    route: post((c) =>
      streamText(c, async (out) => {
        await out.writeln('line 1');
        await out.sleep(1);
        await out.write('line 2');
      }),
    ),
  },
  {
    name: 'streamSSE() helper',
    route: post((c) =>
      streamSSE(c, async (out) => {
        await out.writeSSE({ data: 'one', event: 'tick', id: '1' });
        await out.sleep(1);
        await out.writeSSE({ data: 'two', event: 'tick', id: '2' });
      }),
    ),
  },
  {
    name: 'c.header with append, and repeated set-cookie through setCookie',
    route: post((c) => {
      c.header('vary', 'Accept');
      c.header('vary', 'Accept-Language', { append: true });
      setCookie(c, 'a', '1', { path: '/' });
      setCookie(c, 'b', '2', { httpOnly: true });
      return c.json({ cookies: 2 });
    }),
  },
  {
    name: 'the header an earlier middleware set, removed by the handler',
    route: post((c) => {
      c.header('x-app', undefined);
      return c.json({ removedEarlier: true });
    }),
  },
  {
    name: 'the header an earlier middleware set, overwritten by the handler',
    route: post((c) => {
      c.header('x-app', 'handler');
      return c.json({ overwritten: true });
    }),
  },
  { name: 'c.redirect(url, 303)', route: post((c) => c.redirect('/orders/9', 303)) },
  { name: 'c.redirect(url) (302)', route: post((c) => c.redirect('/orders/10')) },
  { name: 'Response.redirect()', route: post(() => Response.redirect('http://127.0.0.1/orders/11', 301)) },
  { name: 'c.body(null, 204)', route: post((c) => c.body(null, 204)) },
  {
    name: 'c.body(null, 304) with an ETag',
    route: post((c) => {
      c.header('etag', '"v1"');
      return c.body(null, 304);
    }),
  },
  {
    name: 'c.body(null) with a JSON type',
    route: post((c) => c.body(null, 200, { 'content-type': 'application/json' })),
  },
  { name: 'an empty c.text', route: post((c) => c.text('')) },
  {
    name: 'a thrown HTTPException',
    route: post(() => {
      throw new HTTPException(400, { message: 'bad order' });
    }),
  },
  {
    name: 'an HTTPException with its own response',
    route: post(() => {
      throw new HTTPException(401, {
        res: new Response('{"detail":"who are you"}', {
          status: 401,
          headers: { 'content-type': 'application/json', 'www-authenticate': 'Bearer' },
        }),
      });
    }),
  },
  {
    name: 'a synchronous throw',
    route: post(() => {
      throw new Error('thrown before answering');
    }),
  },
  {
    name: 'headers set, then an async rejection',
    route: post(async (c) => {
      c.header('x-before-failure', '1');
      await tick();
      throw new Error('failed after setting a header');
    }),
  },
  {
    name: 'a stream that fails midway',
    route: post(
      () =>
        new Response(byteStream(['{"half":', '[1,'], new Error('stream failed')), {
          headers: { 'content-type': 'application/json' },
        }),
    ),
  },
  {
    name: 'a stream that fails before its first chunk',
    route: post(
      () =>
        new Response(byteStream([], new Error('stream failed')), {
          headers: { 'content-type': 'application/json' },
        }),
    ),
  },
  {
    name: 'stream() helper whose callback throws',
    route: post((c) => {
      c.header('content-type', 'application/json');
      return stream(
        c,
        async (out) => {
          await out.write('{"partial":');
          throw new Error('callback failed');
        },
        async () => {},
      );
    }),
  },
  {
    name: 'a 2 MiB c.json (over maxResponseBytes)',
    route: post((c) => c.json(largeObject(2 * 1024 * 1024))),
  },
  {
    name: 'a 1.5 MiB stream in 64 KiB chunks (over maxResponseBytes)',
    route: post(() => {
      const body = encoder.encode(JSON.stringify(largeObject(1536 * 1024)));
      const parts: Uint8Array[] = [];
      for (let offset = 0; offset < body.length; offset += 65_536)
        parts.push(body.subarray(offset, offset + 65_536));
      return new Response(byteStream(parts), { headers: { 'content-type': 'application/json' } });
    }),
  },
  { name: 'a 100 KiB c.json', route: post((c) => c.json(largeObject(100 * 1024))) },
  { name: 'a 503', route: post((c) => c.json({ down: true }, 503, { 'retry-after': '3' })) },
  { name: 'a 429 refusal', route: post((c) => c.json({ slow: 'down' }, 429, { 'retry-after': '1' })) },
  { name: 'c.notFound()', route: post((c) => c.notFound()) },
  {
    name: 'a JSON body after awaiting',
    route: post(async (c) => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      return c.json({ later: true }, 202);
    }),
  },
];

type Stack = 'app middleware only' | 'Hono middleware before' | 'Hono middleware after';
const STACKS: readonly Stack[] = ['app middleware only', 'Hono middleware before', 'Hono middleware after'];

/** Hono's own middleware most apps mount: CORS with an allow-list, security headers, ETags. */
function honoMiddleware(): MiddlewareHandler[] {
  return [cors({ origin: ['http://a.example', 'http://b.example'] }), secureHeaders(), etag()];
}

function honoApp(stack: Stack, idempotency?: MiddlewareHandler<Env>): Hono<Env> {
  const app = new Hono<Env>();
  // The app's own error page: Hono's default, without logging the corpus's failures.
  app.onError((error, c) =>
    error instanceof HTTPException ? error.getResponse() : c.text('Internal Server Error', 500),
  );
  // A middleware of the app's own around everything: a header before the handler, another one after it.
  app.use(async (c, next) => {
    c.header('x-app', 'corpus');
    await next();
    c.header('x-after', 'set after next');
  });
  if (stack === 'Hono middleware before') for (const middleware of honoMiddleware()) app.use(middleware);
  if (idempotency !== undefined) app.use(idempotency);
  if (stack === 'Hono middleware after') for (const middleware of honoMiddleware()) app.use(middleware);
  CORPUS.forEach((corpusCase, i) => {
    corpusCase.route(app, `/case/${i}`);
  });
  app.get('/ping', (c) => c.json({ pong: true }));
  return app;
}

const cases = numberedCases(CORPUS);

const backends = await differentialBackends('Hono');

describe('Hono: the first response equals bare Hono’s on @hono/node-server, byte for byte', () => {
  it('has a corpus of at least 20 behaviours', () => {
    expect(CORPUS.length).toBeGreaterThanOrEqual(20);
  });

  for (const backendSetup of backends) {
    for (const stack of STACKS) {
      describeDifferential(
        `Hono 4, ${stack}`,
        backendSetup,
        cases,
        async (backend, onEvent) => {
          const options: IdempotencyOptions<Context> = { backend, onEvent };
          const bare = await listenOn(createServer(getRequestListener(honoApp(stack).fetch)));
          const idempotent = await listenOn(
            createServer(getRequestListener(honoApp(stack, idempotencyHeader(options)).fetch)),
          );
          return { bare, idempotent };
        },
        HONO_NODE_SERVER_FRAMING,
      );
    }
  }
});
