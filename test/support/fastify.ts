/**
 * A {@link ServerFactory} for the Fastify plugin: the contract's routes as Fastify routes, on a real listener.
 */
import Fastify, { type FastifyReply, type FastifyRequest } from 'fastify';
import { type FastifyIdempotencyOptions, idempotencyHeader } from '../../src/adapters/fastify.js';
import type { RouteRequest, Routes, ServerFactory, TestServer } from './http.js';
import { nodeBody } from './route-chunks.js';

/** The neutral view of a Fastify request: the body Fastify parsed (JSON, or a Buffer for raw types). */
export function fastifyRouteRequest(request: FastifyRequest, reply: FastifyReply): RouteRequest {
  return {
    method: request.method,
    url: request.url,
    header(name) {
      const value = request.headers[name.toLowerCase()];
      return Array.isArray(value) ? value[0] : value;
    },
    body: request.body,
    closed: new Promise((resolve) => reply.raw.once('close', () => resolve())),
  };
}

/**
 * Fastify 5 with the plugin registered at the root and one route per contract path (any method). Besides JSON and
 * text, which Fastify parses itself, `application/octet-stream` and `multipart/form-data` bodies arrive as Buffers. `failAfterWriting`
 * routes send their reply, then throw, as an async handler that fails after `reply.send()`.
 */
export function createFastifyServerFactory(): ServerFactory {
  return async (options, routes: Routes) => {
    const app = Fastify({ bodyLimit: 10 * 1024 * 1024 });
    app.addContentTypeParser(
      ['application/octet-stream', 'multipart/form-data'],
      { parseAs: 'buffer' },
      (_request, body, done) => done(null, body),
    );
    await app.register(idempotencyHeader, options as FastifyIdempotencyOptions);
    for (const [path, handler] of Object.entries(routes)) {
      app.all(path, async (request, reply) => {
        const response = await handler(fastifyRouteRequest(request, reply));
        reply.code(response.status);
        for (const [name, value] of response.headers ?? []) reply.header(name, value);
        reply.send(nodeBody(response));
        if (response.failAfterWriting) throw new Error('the route failed after sending its reply');
        return reply;
      });
    }
    await app.listen({ port: 0, host: '127.0.0.1' });
    const address = app.server.address();
    const port = typeof address === 'object' && address !== null ? address.port : 0;
    return {
      url: `http://127.0.0.1:${port}`,
      close: async () => {
        app.server.closeAllConnections();
        await app.close();
      },
    } satisfies TestServer;
  };
}
