/**
 * A {@link ServerFactory} for the Koa middleware, on Koa 2 or Koa 3, with `@koa/bodyparser` mounted before the
 * middleware, after it, or not at all.
 */

import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { bodyParser } from '@koa/bodyparser';
import type Koa from 'koa';
import { idempotencyHeader, type KoaIdempotencyOptions } from '../../src/adapters/koa.js';
import { listen, type Routes, readAll, type ServerFactory } from './http.js';
import { nodeBody } from './route-chunks.js';

/** The Koa class's shape; `koa` (2) and `koa3` (3, an npm alias) are both loaded as this. */
export type KoaModule = typeof Koa;

/** Koa 3, installed under the npm alias `koa3`. */
export const koa3 = createRequire(import.meta.url)('koa3') as KoaModule;

/** Where the body parser sits relative to the middleware. */
export type KoaParserPlacement = 'before' | 'after' | 'none';

/**
 * Koa with the middleware, then one middleware serving the contract's routes. With a parser, JSON bodies arrive
 * parsed; any body it left in the stream (binary) is read raw by the route. `failAfterWriting` has no counterpart:
 * a Koa handler that throws after setting `ctx.body` gets Koa's 500 instead of that body, with or without the
 * middleware, so the route sets its body and returns, and the scenario checks that the response stands.
 */
export function createKoaServerFactory(KoaClass: KoaModule, parser: KoaParserPlacement): ServerFactory {
  return async (options, routes: Routes) => {
    const app = new KoaClass();
    // The contract's throwing route fails on purpose: no error log.
    app.silent = true;
    const parse = bodyParser({ jsonLimit: '10mb', textLimit: '10mb', enableTypes: ['json', 'text'] });
    if (parser === 'before') app.use(parse);
    app.use(idempotencyHeader(options as KoaIdempotencyOptions));
    if (parser === 'after') app.use(parse);
    app.use(async (ctx, next) => {
      const handler = routes[ctx.path];
      if (handler === undefined) return next();
      const request = ctx.request as typeof ctx.request & { body?: unknown };
      const body = ctx.req.readableEnded ? request.body : await readAll(ctx.req);
      const response = await handler({
        method: ctx.method,
        url: ctx.originalUrl,
        header: (name) => ctx.get(name) || undefined,
        body,
        closed: new Promise((resolve) => ctx.res.once('close', () => resolve())),
      });
      ctx.status = response.status;
      const seen = new Set<string>();
      for (const [name, value] of response.headers ?? []) {
        if (seen.has(name.toLowerCase())) ctx.append(name, value);
        else ctx.set(name, value);
        seen.add(name.toLowerCase());
      }
      ctx.body = nodeBody(response);
    });
    return listen(createServer(app.callback()));
  };
}
