/**
 * HTTP helpers for the adapter tests: framework-neutral routes and how node:http-based apps serve them, server
 * factories for Express and `withIdempotency`, and clients (`fetch`, and `node:http`/raw sockets for the bytes
 * `fetch` refuses to send).
 *
 * The routes are written once, as plain functions from a {@link RouteRequest} to a {@link RouteResponse}; each
 * adapter's factory translates them into its framework. The node:http translation ({@link writeRouteResponse})
 * deliberately uses every way a handler writes a response: `statusCode` + `setHeader`, `writeHead` with an
 * object, `writeHead` with a flat header list, one `end(body)`, or several `write`s then `end()`.
 */

import {
  createServer as createHttpServer,
  request as httpRequest,
  type IncomingMessage,
  type OutgoingHttpHeaders,
  type Server,
  type ServerOptions,
  type ServerResponse,
} from 'node:http';
import { createRequire } from 'node:module';
import type { AddressInfo } from 'node:net';
import { connect } from 'node:net';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import type express from 'express';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { withIdempotency } from '../../src/adapters/node.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { IdempotencyOptions } from '../../src/core/options.js';
import type { Backend } from '../../src/core/types.js';

/** The Express module's shape; both `express` (5) and `express4` (4, an npm alias) are loaded as this. */
export type ExpressModule = typeof express;

/** Express 4, installed under the npm alias `express4` (it has no types of its own: it is Express's API). */
export const express4 = createRequire(import.meta.url)('express4') as ExpressModule;

/** Middleware options as the contract hands them to an adapter: `scope`/`fingerprint` see the adapter's request. */
export type ContractOptions = IdempotencyOptions<unknown>;

/** What a route handler sees of a request, whatever the framework. */
export interface RouteRequest {
  readonly method: string;
  /** Path with its query string. */
  readonly url: string;
  /** A request header (case-insensitive name), first value. */
  header(name: string): string | undefined;
  /** Raw bytes when the app read the stream itself; the parsed value when a body parser ran. */
  readonly body: unknown;
  /** Settles when the response is finished or the client connection closed, whichever comes first. */
  readonly closed: Promise<void>;
}

/** What a route handler answers; the adapter's factory writes it with its framework's means. */
export interface RouteResponse {
  readonly status: number;
  /** Header pairs; a repeated name (`set-cookie`) sends several values. */
  readonly headers?: readonly (readonly [string, string])[];
  /**
   * Body chunks: one is sent with `end(chunk)`, several with one `write` each (a tick apart), then `end()`. An
   * async iterable is written chunk by chunk as it yields, then ended: for responses that stream over time.
   */
  readonly chunks?: readonly (string | Uint8Array)[] | AsyncIterable<string | Uint8Array>;
  /** How node:http apps send the head: `statusCode` + `setHeader` (default), or `writeHead` (object or list). */
  readonly head?: 'set' | 'writeHead' | 'writeHead-list';
  /** Called right after the last byte was handed to the framework. */
  readonly onWritten?: () => void;
  /** The handler fails (rejects) right after it ended its response, as if cleanup after the response threw. */
  readonly failAfterWriting?: boolean;
}

/** A route: any method, one path (without query string). Throwing or rejecting is the handler failing. */
export type RouteHandler = (req: RouteRequest) => RouteResponse | Promise<RouteResponse>;

/** The routes of an app, by path. */
export type Routes = Readonly<Record<string, RouteHandler>>;

/** A listening test server. */
export interface TestServer {
  /** `http://127.0.0.1:<port>`, no trailing slash. */
  readonly url: string;
  /** Closes the server and every connection it holds; never hangs. */
  close(): Promise<void>;
}

/** Builds an app around the middleware configured with `options`, serving `routes`, and starts it. */
export type ServerFactory = (options: ContractOptions, routes: Routes) => Promise<TestServer>;

/** A backend for a contract run, and how to dispose of it. */
export interface BackendHandle {
  readonly backend: Backend;
  teardown(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------------------------
// Serving routes from node:http-based apps

/** Reads a request stream to its end. */
export function readAll(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

/** The neutral view of a node:http request. */
export function nodeRouteRequest(req: IncomingMessage, res: ServerResponse, body: unknown): RouteRequest {
  return {
    method: req.method ?? 'GET',
    url: (req as IncomingMessage & { originalUrl?: string }).originalUrl ?? req.url ?? '/',
    header(name) {
      const value = req.headers[name.toLowerCase()];
      return Array.isArray(value) ? value[0] : value;
    },
    body,
    closed: new Promise((resolve) => res.once('close', () => resolve())),
  };
}

/** Writes a route's response on a node:http response, the way {@link RouteResponse.head} says. */
export async function writeRouteResponse(res: ServerResponse, response: RouteResponse): Promise<void> {
  const { status, headers = [], chunks = [], head = 'set' } = response;
  if (head === 'writeHead-list') {
    res.writeHead(status, headers.flat());
  } else {
    const grouped: OutgoingHttpHeaders = {};
    for (const [name, value] of headers) {
      const previous = grouped[name];
      grouped[name] =
        previous === undefined
          ? value
          : Array.isArray(previous)
            ? [...previous, value]
            : [String(previous), value];
    }
    if (head === 'writeHead') res.writeHead(status, grouped);
    else {
      res.statusCode = status;
      for (const name in grouped) res.setHeader(name, grouped[name]!);
    }
  }
  if (Symbol.asyncIterator in chunks) {
    for await (const chunk of chunks) res.write(chunk);
    res.end();
  } else if (chunks.length <= 1) res.end(chunks[0]);
  else {
    for (const chunk of chunks) {
      res.write(chunk);
      await yieldToLoop();
    }
    res.end();
  }
  response.onWritten?.();
  if (response.failAfterWriting) throw new Error('the route failed after ending its response');
}

/** Serves a route for a node:http request whose body is `body` (raw or parsed); `false` when no route matches. */
export async function serveRoute(
  routes: Routes,
  path: string,
  req: IncomingMessage,
  res: ServerResponse,
  body: unknown,
): Promise<boolean> {
  const handler = routes[path];
  if (handler === undefined) return false;
  const response = await handler(nodeRouteRequest(req, res, body));
  await writeRouteResponse(res, response);
  return true;
}

/** Starts a node:http server on 127.0.0.1, port 0. */
export function listen(server: Server): Promise<TestServer> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      resolve({
        url: `http://127.0.0.1:${port}`,
        close: () =>
          new Promise<void>((done) => {
            server.close(() => done());
            server.closeAllConnections();
          }),
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Server factories

/** A fresh {@link MemoryBackend} for a contract run; its teardown stops its sweep timer. */
export async function createMemoryBackend(): Promise<BackendHandle> {
  const backend = new MemoryBackend();
  return { backend, teardown: async () => backend.close() };
}

/** Where the Express app's body parsers sit relative to the middleware. */
export type ParserPlacement = 'before' | 'after';

/**
 * A {@link ServerFactory} for Express (5 or 4). `'before'`: `express.json()` and `express.raw()` run before the
 * middleware, which fingerprints the parsed body. `'after'`: the middleware reads the raw stream and must put it
 * back for the parsers mounted after it. Any body no parser took is read raw by the route.
 */
export function createExpressServerFactory(
  expressModule: ExpressModule,
  parsers: ParserPlacement,
): ServerFactory {
  return async (options, routes) => {
    const app = expressModule();
    const bodyParsers = [
      expressModule.json({ limit: '10mb' }),
      expressModule.raw({ type: 'application/octet-stream', limit: '10mb' }),
    ];
    if (parsers === 'before') app.use(...bodyParsers);
    app.use(idempotencyHeader(options as IdempotencyOptions<express.Request>));
    if (parsers === 'after') app.use(...bodyParsers);
    app.use((req, res, next) => {
      const parsed = (req as express.Request & { _body?: boolean })._body === true || req.readableEnded;
      const body = parsed ? Promise.resolve(req.body as unknown) : readAll(req);
      body
        .then((value) => serveRoute(routes, req.path, req, res, value))
        .then((served) => {
          if (!served) next();
        })
        .catch(next);
    });
    return listen(createHttpServer(app));
  };
}

/**
 * A {@link ServerFactory} for `withIdempotency` on a plain `node:http` server. The listener reads the body
 * itself, after the wrapper read it for the fingerprint and put it back.
 */
export function createNodeServerFactory(serverOptions: ServerOptions = {}): ServerFactory {
  return async (options, routes) => {
    const listener = withIdempotency(
      async (req, res) => {
        const body = await readAll(req);
        const path = new URL(req.url ?? '/', 'http://localhost').pathname;
        if (!(await serveRoute(routes, path, req, res, body))) {
          res.writeHead(404, { 'content-type': 'text/plain' });
          res.end('not found');
        }
      },
      // The contract's throwing route fails on purpose: keep the default console.error quiet.
      { onHandlerError: () => {}, ...options },
    );
    return listen(createHttpServer(serverOptions, listener));
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Clients

/** A response read to its end. */
export interface HttpResult {
  readonly status: number;
  readonly headers: Headers;
  readonly body: Buffer;
  readonly text: string;
}

/** What {@link send} sends. */
export interface SendOptions {
  /** @default 'POST' */
  method?: string;
  /** The idempotency key; omitted when `undefined`. */
  key?: string;
  /** @default 'Idempotency-Key' */
  keyHeader?: string;
  headers?: Record<string, string>;
  /** A string or bytes as they are; anything else as JSON (with `content-type: application/json`). */
  body?: string | Uint8Array | object;
  signal?: AbortSignal;
  /** @default 'follow' */
  redirect?: 'follow' | 'manual' | 'error';
}

/** Sends one request with `fetch` and reads the whole response. */
export async function send(url: string, options: SendOptions = {}): Promise<HttpResult> {
  const response = await fetch(url, toRequestInit(options));
  return readResult(response);
}

/** Sends one request with `fetch` and resolves as soon as the response head arrives (the body is not read). */
export function sendHead(url: string, options: SendOptions = {}): Promise<Response> {
  return fetch(url, toRequestInit(options));
}

/** Reads a `fetch` response to its end. */
export async function readResult(response: Response): Promise<HttpResult> {
  const body = Buffer.from(await response.arrayBuffer());
  return { status: response.status, headers: response.headers, body, text: body.toString('utf8') };
}

function toRequestInit(options: SendOptions): RequestInit {
  const { method = 'POST', key, keyHeader = 'Idempotency-Key', body, signal, redirect } = options;
  const headers: Record<string, string> = { ...options.headers };
  if (key !== undefined) headers[keyHeader] = key;
  let payload: string | Uint8Array | undefined;
  if (typeof body === 'string' || body instanceof Uint8Array) payload = body;
  else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['content-type'] ??= 'application/json';
  }
  const init: RequestInit = { method, headers };
  if (payload !== undefined) init.body = payload;
  if (signal !== undefined) init.signal = signal;
  if (redirect !== undefined) init.redirect = redirect;
  return init;
}

/**
 * Sends one request with `node:http` (no agent, so no keep-alive), which accepts header values `fetch` and
 * undici refuse or normalise (a tab inside a key).
 */
export function sendWithNodeHttp(
  url: string,
  options: { method?: string; path: string; headers: Record<string, string>; body?: string },
): Promise<{ status: number; headers: IncomingMessage['headers']; text: string }> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        host: hostname,
        port,
        method: options.method ?? 'POST',
        path: options.path,
        headers: options.headers,
        agent: false,
      },
      (res) => {
        readAll(res).then(
          (body) =>
            resolve({ status: res.statusCode ?? 0, headers: res.headers, text: body.toString('utf8') }),
          reject,
        );
      },
    );
    req.on('error', reject);
    req.end(options.body);
  });
}

/**
 * Writes a request over a bare socket, exactly as given (latin1), and returns the status code and body of the
 * answer. For header bytes no HTTP client sends (control characters). The request must say `Connection: close`.
 */
export function sendRawRequest(url: string, request: string): Promise<{ status: number; text: string }> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(port), hostname);
    const chunks: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', reject);
    socket.on('close', () => {
      const answer = Buffer.concat(chunks).toString('latin1');
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1] ?? 0);
      const separator = answer.indexOf('\r\n\r\n');
      resolve({ status, text: separator === -1 ? '' : answer.slice(separator + 4) });
    });
    // Not `end()`: a half-closed request socket makes node:http abort the request before it answers.
    socket.write(Buffer.from(request, 'latin1'));
  });
}

/**
 * One POST with `node:http`, its body written as the given chunks (none: no body) under the framing the headers
 * name (`transfer-encoding: chunked`, or a `content-length`), which `fetch` does not let a test choose. Resolves
 * with the status and the body as text; rejects when no answer comes within 5 s.
 */
export function postRaw(
  url: string,
  headers: OutgoingHttpHeaders,
  chunks: readonly string[] = [],
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const request = httpRequest(url, { method: 'POST', headers }, (response) => {
      let text = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => {
        text += chunk;
      });
      response.on('end', () => resolve({ status: response.statusCode ?? 0, text }));
    });
    request.setTimeout(5_000, () => request.destroy(new Error('no answer within 5 s')));
    request.on('error', reject);
    for (const chunk of chunks) request.write(chunk);
    request.end();
  });
}
