/**
 * Differential corpus for `withIdempotency` (SPEC §3, transparent first runs; see `test/support/differential.ts`
 * for what is compared): every case is a fetch handler, `(request) => Response`, served on Node.js through
 * `@hono/node-server`'s `getRequestListener` (the bridge the fetch adapter's other tests use) bare and wrapped, on
 * memory and Redis.
 */
import { createServer } from 'node:http';
import { getRequestListener } from '@hono/node-server';
import { describe, expect, it } from 'vitest';
import { withIdempotency } from '../../src/adapters/fetch.js';
import {
  describeDifferential,
  differentialBackends,
  FETCH_NODE_SERVER_FRAMING,
  failOnUnexpectedErrors,
  listenOn,
  numberedCases,
} from '../support/differential.js';

failOnUnexpectedErrors();

interface FetchCase {
  readonly name: string;
  readonly handler: (request: Request) => Response | Promise<Response>;
  readonly skip?: string;
}

const encoder = new TextEncoder();
const JSON_HEADERS = { 'content-type': 'application/json' };
const largeJson = (size: number) => JSON.stringify({ pad: 'x'.repeat(size) });
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

const CORPUS: readonly FetchCase[] = [
  { name: 'Response.json(object, 201)', handler: () => Response.json({ id: 1 }, { status: 201 }) },
  {
    name: 'a JSON string with a Location header',
    handler: () =>
      new Response('{"id":2}', { status: 201, headers: { ...JSON_HEADERS, location: '/orders/2' } }),
  },
  {
    name: 'the request body read with request.json() and echoed',
    handler: async (request) => Response.json({ received: await request.json() }, { status: 201 }),
  },
  {
    name: 'the request body read with request.text()',
    handler: async (request) => Response.json({ text: await request.text() }),
  },
  {
    name: 'the request body read with request.arrayBuffer()',
    handler: async (request) => Response.json({ bytes: (await request.arrayBuffer()).byteLength }),
  },
  {
    name: 'the request body read from its stream',
    handler: async (request) => {
      let size = 0;
      const reader = request.body!.getReader();
      for (let next = await reader.read(); !next.done; next = await reader.read())
        size += next.value.byteLength;
      return Response.json({ streamed: size });
    },
  },
  { name: 'a string, text/plain by default', handler: () => new Response('hello') },
  {
    name: 'a Uint8Array typed JSON',
    handler: () => new Response(encoder.encode('{"bytes":true}'), { headers: JSON_HEADERS }),
  },
  {
    name: 'an ArrayBuffer typed JSON',
    handler: () =>
      new Response(encoder.encode('{"arrayBuffer":true}').buffer as ArrayBuffer, { headers: JSON_HEADERS }),
  },
  {
    name: 'a Blob with its type',
    handler: () => new Response(new Blob(['{"blob":1}'], { type: 'application/json' })),
  },
  { name: 'URLSearchParams', handler: () => new Response(new URLSearchParams({ a: '1', b: 'two' })) },
  {
    name: 'a ReadableStream of JSON',
    handler: () => new Response(byteStream(['{"items":', '[1,2]', '}']), { headers: JSON_HEADERS }),
  },
  { name: 'a ReadableStream of text', handler: () => new Response(byteStream(['one ', 'two'])) },
  {
    name: 'an event stream',
    handler: () =>
      new Response(byteStream(['data: one\n\n', 'data: two\n\n']), {
        headers: { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' },
      }),
  },
  { name: 'Response.redirect(url, 303)', handler: () => Response.redirect('http://127.0.0.1/orders/9', 303) },
  { name: '204 without a body', handler: () => new Response(null, { status: 204 }) },
  {
    name: '304 with an ETag',
    handler: () => new Response(null, { status: 304, headers: { etag: '"v1"' } }),
  },
  { name: 'a null body with a JSON type', handler: () => new Response(null, { headers: JSON_HEADERS }) },
  { name: 'an empty string body', handler: () => new Response('', { headers: JSON_HEADERS }) },
  {
    name: 'cookies and a repeated header through Headers.append',
    handler: () => {
      const headers = new Headers(JSON_HEADERS);
      headers.append('set-cookie', 'a=1; Path=/');
      headers.append('set-cookie', 'b=2; HttpOnly');
      headers.append('vary', 'Accept');
      headers.append('vary', 'Accept-Language');
      return new Response('{"cookies":2}', { headers });
    },
  },
  {
    name: 'mixed-case headers out of order',
    handler: () =>
      new Response('{"order":true}', {
        headers: { 'X-Zulu': 'z', 'Content-Type': 'application/json', 'X-Alpha': 'a' },
      }),
  },
  {
    name: 'headers as a list of pairs',
    handler: () =>
      new Response('{"pairs":true}', {
        headers: [
          ['content-type', 'application/json'],
          ['x-pair', '1'],
          ['x-pair', '2'],
        ],
      }),
  },
  {
    name: 'a status text',
    handler: () =>
      new Response('{"statusText":true}', { status: 201, statusText: 'Made It', headers: JSON_HEADERS }),
  },
  {
    name: 'a manual Content-Length',
    handler: () => new Response('{"length":1}', { headers: { ...JSON_HEADERS, 'content-length': '12' } }),
  },
  {
    name: 'a cloned Response',
    handler: () => Response.json({ cloned: true }).clone(),
  },
  {
    name: 'a Response after awaiting',
    handler: async () => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      return Response.json({ later: true }, { status: 202 });
    },
  },
  {
    name: 'a synchronous throw',
    handler: () => {
      throw new Error('thrown before answering');
    },
  },
  {
    name: 'an async rejection',
    handler: async () => {
      await tick();
      throw new Error('rejected');
    },
  },
  {
    name: 'a stream that fails midway',
    handler: () =>
      new Response(byteStream(['{"half":', '[1,'], new Error('stream failed')), { headers: JSON_HEADERS }),
  },
  {
    name: 'a stream that fails before its first chunk',
    handler: () => new Response(byteStream([], new Error('stream failed')), { headers: JSON_HEADERS }),
  },
  {
    name: 'a 2 MiB JSON string (over maxResponseBytes)',
    handler: () => new Response(largeJson(2 * 1024 * 1024), { headers: JSON_HEADERS }),
  },
  {
    name: 'a 1.5 MiB stream in 64 KiB chunks (over maxResponseBytes)',
    handler: () => {
      const body = encoder.encode(largeJson(1536 * 1024));
      const parts: Uint8Array[] = [];
      for (let offset = 0; offset < body.length; offset += 65_536)
        parts.push(body.subarray(offset, offset + 65_536));
      return new Response(byteStream(parts), { headers: JSON_HEADERS });
    },
  },
  {
    name: 'a 100 KiB JSON string',
    handler: () => new Response(largeJson(100 * 1024), { headers: JSON_HEADERS }),
  },
  {
    name: 'a 500 answered by the handler',
    handler: () => Response.json({ detail: 'broken' }, { status: 500 }),
  },
  {
    name: 'a 503',
    handler: () => Response.json({ down: true }, { status: 503, headers: { 'retry-after': '3' } }),
  },
  {
    name: 'a 429 refusal',
    handler: () => Response.json({ slow: 'down' }, { status: 429, headers: { 'retry-after': '1' } }),
  },
  { name: 'Response.error()', handler: () => Response.error() },
];

async function handlerFor(request: Request): Promise<Response> {
  const { pathname } = new URL(request.url);
  if (pathname === '/ping') return Response.json({ pong: true });
  return CORPUS[Number(pathname.split('/')[2])]!.handler(request);
}

const cases = numberedCases(CORPUS);

const backends = await differentialBackends('fetch');

describe('fetch handlers: the first response equals the bare handler’s on @hono/node-server, byte for byte', () => {
  it('has a corpus of at least 20 behaviours', () => {
    expect(CORPUS.length).toBeGreaterThanOrEqual(20);
  });

  for (const backendSetup of backends) {
    describeDifferential(
      'withIdempotency',
      backendSetup,
      cases,
      async (backend, onEvent) => {
        const wrapped = withIdempotency(handlerFor, { backend, onEvent });
        const bare = await listenOn(createServer(getRequestListener(handlerFor)));
        const idempotent = await listenOn(createServer(getRequestListener(wrapped)));
        return { bare, idempotent };
      },
      FETCH_NODE_SERVER_FRAMING,
    );
  }
});
