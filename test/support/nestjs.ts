/**
 * {@link ServerFactory}s for NestJS on Express and on Fastify: the contract's routes as one Nest controller, with
 * `IdempotencyModule.forRoot(options)` and the interceptor bound globally (`APP_INTERCEPTOR`). Decorators are
 * applied as plain function calls, so that this file compiles with the project's settings (no
 * `experimentalDecorators`).
 *
 * The routes write their responses themselves (`@Res()`), as the other adapters' routes do, since a Nest
 * handler's return value cannot choose its status or write a body in chunks; the Nest-specific tests cover
 * handlers that return values.
 */
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { All, Controller, type INestApplication, Module, Req, Res, type Type } from '@nestjs/common';
import { APP_INTERCEPTOR, NestFactory } from '@nestjs/core';
import { ExpressAdapter, type NestExpressApplication } from '@nestjs/platform-express';
import { FastifyAdapter, type NestFastifyApplication } from '@nestjs/platform-fastify';
import type { FastifyReply, FastifyRequest } from 'fastify';
import {
  IdempotencyInterceptor,
  IdempotencyModule,
  type NestIdempotencyOptions,
} from '../../src/adapters/nestjs.js';
import { fastifyRouteRequest } from './fastify.js';
import {
  type ContractOptions,
  nodeRouteRequest,
  type Routes,
  readAll,
  type ServerFactory,
  type TestServer,
  writeRouteResponse,
} from './http.js';
import { nodeBody } from './route-chunks.js';

/** Nest's platforms. */
export type NestPlatform = 'express' | 'fastify';

/** A route method: what Nest calls with `@Req()` and `@Res()`. */
type RouteMethod = (req: never, res: never) => Promise<void>;

/**
 * A controller serving `routes`, one method per path, any HTTP method. `serve` turns a route's response into the
 * platform's writes.
 */
export function contractController(
  routes: Routes,
  serve: (handler: Routes[string], req: never, res: never) => Promise<void>,
): Type<unknown> {
  class ContractController {}
  const prototype = ContractController.prototype as Record<string, RouteMethod>;
  for (const [index, [path, handler]] of Object.entries(routes).entries()) {
    const name = `route${index}`;
    prototype[name] = (req, res) => serve(handler, req, res);
    const descriptor = Object.getOwnPropertyDescriptor(prototype, name)!;
    All(path)(prototype, name, descriptor);
    Req()(prototype, name, 0);
    Res()(prototype, name, 1);
  }
  Controller()(ContractController);
  return ContractController;
}

/** A root module importing `IdempotencyModule.forRoot(options)` with the interceptor bound globally. */
export function appModule(
  options: NestIdempotencyOptions<unknown>,
  controllers: Type<unknown>[],
): Type<unknown> {
  class AppModule {}
  Module({
    imports: [IdempotencyModule.forRoot(options)],
    controllers,
    providers: [{ provide: APP_INTERCEPTOR, useClass: IdempotencyInterceptor }],
  })(AppModule);
  return AppModule;
}

/** Creates a Nest app on the platform, with bodies up to 10 MB and `application/octet-stream` left raw (Express) or parsed as a Buffer (Fastify). */
export async function createNestApp(
  platform: NestPlatform,
  module: Type<unknown>,
): Promise<INestApplication> {
  if (platform === 'express') {
    const app = await NestFactory.create<NestExpressApplication>(module, new ExpressAdapter(), {
      logger: false,
    });
    app.useBodyParser('json', { limit: '10mb' });
    return app;
  }
  const app = await NestFactory.create<NestFastifyApplication>(
    module,
    new FastifyAdapter({ bodyLimit: 10 * 1024 * 1024 }),
    { logger: false },
  );
  app
    .getHttpAdapter()
    .getInstance()
    .addContentTypeParser(
      ['application/octet-stream', 'multipart/form-data'],
      { parseAs: 'buffer' },
      (_request, body, done) => done(null, body),
    );
  return app;
}

/** Starts the app on 127.0.0.1, port 0. */
export async function listenNest(app: INestApplication): Promise<TestServer> {
  await app.listen(0, '127.0.0.1');
  const server = app.getHttpServer() as Server;
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: async () => {
      server.closeAllConnections();
      await app.close();
    },
  };
}

async function serveExpress(
  handler: Routes[string],
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const parsed = (req as IncomingMessage & { _body?: boolean })._body === true || req.readableEnded;
  const body = parsed ? (req as IncomingMessage & { body?: unknown }).body : await readAll(req);
  const response = await handler(nodeRouteRequest(req, res, body));
  await writeRouteResponse(res, response);
}

async function serveFastify(
  handler: Routes[string],
  request: FastifyRequest,
  reply: FastifyReply,
): Promise<void> {
  const response = await handler(fastifyRouteRequest(request, reply));
  reply.code(response.status);
  for (const [name, value] of response.headers ?? []) reply.header(name, value);
  reply.send(nodeBody(response));
  if (response.failAfterWriting) throw new Error('the route failed after sending its reply');
}

/** The contract's {@link ServerFactory} for Nest on `platform`. */
export function createNestServerFactory(platform: NestPlatform): ServerFactory {
  return async (options: ContractOptions, routes: Routes) => {
    const serve = (platform === 'express' ? serveExpress : serveFastify) as (
      handler: Routes[string],
      req: never,
      res: never,
    ) => Promise<void>;
    const module = appModule(options, [contractController(routes, serve)]);
    return listenNest(await createNestApp(platform, module));
  };
}
