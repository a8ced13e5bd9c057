/**
 * Server factories for the web-standard adapters, on Node.js through `@hono/node-server`: Hono with the middleware,
 * and a bare fetch handler wrapped with `withIdempotency`.
 */
import { createServer, type ServerResponse } from 'node:http';
import { getRequestListener, type HttpBindings } from '@hono/node-server';
import { type Context, Hono } from 'hono';
import { withIdempotency } from '../../src/adapters/fetch.js';
import { idempotencyHeader } from '../../src/adapters/hono.js';
import type { ContractOptions, RouteRequest, RouteResponse, Routes, ServerFactory } from './http.js';
import { listen } from './http.js';
import { webBody, webHeaders } from './route-chunks.js';

/**
 * The contract's options with `scope` and `fingerprint` handed the `Request` (the contract reads request headers
 * from it); the Hono middleware itself hands them Hono's `Context`.
 */
function optionsForHono(options: ContractOptions) {
  const { scope, fingerprint } = options;
  return {
    ...options,
    scope: scope === undefined ? undefined : (c: Context) => scope(c.req.raw),
    fingerprint: typeof fingerprint === 'function' ? (c: Context) => fingerprint(c.req.raw) : fingerprint,
  };
}

/** The neutral view of a web request whose body was read as `body`, served on `outgoing`. */
function routeRequest(request: Request, body: Uint8Array, outgoing: ServerResponse): RouteRequest {
  const url = new URL(request.url);
  return {
    method: request.method,
    url: url.pathname + url.search,
    header: (name) => request.headers.get(name) ?? undefined,
    body,
    closed: new Promise((resolve) => outgoing.once('close', () => resolve())),
  };
}

/**
 * A route's answer as a `Response`. `failAfterWriting` has no counterpart here: a web handler's response is its
 * return value, so it cannot fail after ending it; the route returns its response, and the scenario checks that
 * it stands.
 */
function toResponse(response: RouteResponse): Response {
  return new Response(webBody(response), { status: response.status, headers: webHeaders(response) });
}

/** Hono 4 with the middleware on every path, the routes read their body with `c.req.arrayBuffer()`. */
export function createHonoServerFactory(): ServerFactory {
  return async (options, routes: Routes) => {
    const app = new Hono<{ Bindings: HttpBindings }>();
    // The contract's throwing route fails on purpose: answer 500 without logging it.
    app.onError((_error, c) => c.text('Internal Server Error', 500));
    app.use(idempotencyHeader(optionsForHono(options)));
    for (const [path, handler] of Object.entries(routes)) {
      app.all(path, async (c) => {
        const body = new Uint8Array(await c.req.arrayBuffer());
        return toResponse(await handler(routeRequest(c.req.raw, body, c.env.outgoing)));
      });
    }
    return listen(createServer(getRequestListener(app.fetch)));
  };
}

/** A bare fetch handler wrapped with `withIdempotency`; it reads the request body itself. */
export function createFetchServerFactory(): ServerFactory {
  return async (options, routes: Routes) => {
    const handler = withIdempotency(
      async (request: Request, env: HttpBindings) => {
        const route = routes[new URL(request.url).pathname];
        if (route === undefined) return new Response('not found', { status: 404 });
        const body = new Uint8Array(await request.arrayBuffer());
        return toResponse(await route(routeRequest(request, body, env.outgoing)));
      },
      options as ContractOptions & { scope?: (req: Request) => string | undefined },
    );
    return listen(
      createServer(
        getRequestListener((request, env) => handler(request, env as HttpBindings), {
          // The contract's throwing route fails on purpose: answer 500 without logging it.
          errorHandler: () => new Response('Internal Server Error', { status: 500 }),
        }),
      ),
    );
  };
}
