/**
 * The reverse proxy: a `node:http` server that runs the `node:http` adapter's request flow in front of an
 * upstream, so that a service written in any language gets idempotency keys without a line of its code changed.
 * What the middleware does to a request, the proxy does; every other request, and the upstream's answers, pass
 * through as they came, bodies streamed, hop-by-hop headers replaced by this hop's own.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import {
  Agent,
  type ClientRequest,
  createServer,
  request as httpRequest,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { hasBody } from '../adapters/node-http/body.js';
import { failCapture, ticketOf } from '../adapters/node-http/capture.js';
import { createNodeEngine, handleNodeRequest, READ_STREAM, sendReply } from '../adapters/node-http/flow.js';
import type { IdempotencyEngine } from '../core/engine.js';
import type { IdempotencyEvent, IdempotencyOptions, IdempotencyOutcome } from '../core/options.js';
import type { EngineReply } from '../core/responses.js';
import type { Backend } from '../core/types.js';
import { nodeSha256 } from '../runtime/node-sha256.js';
import { endToEndHeaders, upstreamRequestHeaders } from './headers.js';

/** The proxy's own outcomes, beside the engine's: a request the middleware let through untouched. */
export type ProxyOutcome = IdempotencyOutcome | 'passed';

/** One line per request, written when its outcome is known and its response is over. */
export interface ProxyRequestLog {
  readonly msg: 'request';
  /** When the request arrived, ISO 8601. */
  readonly time: string;
  readonly method: string;
  /** The path without its query string (which may carry secrets). */
  readonly path: string;
  /** The status sent; `undefined` when none was (the client left first). */
  readonly status: number | undefined;
  /** What the middleware did (`executed`, `replayed`, `conflict`, …), or `passed` for a request it let through. */
  readonly outcome: ProxyOutcome;
  /** SHA-256 (hex) of the scoped key, never the key itself; absent without a usable key. */
  readonly keyHash?: string;
  /** Milliseconds from the request's arrival to the end of its response (or of its run, if the client left). */
  readonly durationMs: number;
  /** Milliseconds from sending the request upstream to the end of the upstream's response; absent if not sent. */
  readonly upstreamMs?: number;
  /** The client went away before its response was complete; the request still ran to its end. */
  readonly clientGone?: true;
  /** Why the upstream failed (`ECONNREFUSED`, `ECONNRESET`, …), when it did. */
  readonly error?: string;
}

/** Options of {@link createIdempotencyProxy}. */
export interface IdempotencyProxyOptions {
  /** The service behind the proxy: `http://` or `https://`, with an optional path prefix. */
  upstream: string | URL;
  backend: Backend;
  /** Every middleware option but `backend` (above) and `onEvent` (the proxy's log uses it). */
  middleware?: Omit<IdempotencyOptions<IncomingMessage>, 'backend' | 'onEvent'>;
  /**
   * Path the proxy answers itself, to GET and HEAD: 200 `{"status":"ok"}` while it serves, 503
   * `{"status":"stopping"}` once it shuts down. `null` sends that path upstream like any other.
   * @default '/healthz'
   */
  healthPath?: string | null;
  /** Receives one {@link ProxyRequestLog} per request (health checks aside). */
  log?: (line: ProxyRequestLog) => void;
  /** Receives an engine event that could not be tied to a request (it should not happen; never lost if it does). */
  onStrayEvent?: (event: IdempotencyEvent) => void;
}

/** A proxy made by {@link createIdempotencyProxy}. */
export interface IdempotencyProxy {
  /** The `node:http` server; not listening until {@link listen}. */
  readonly server: Server;
  /** Starts listening; resolves with the URL it serves at. */
  listen(port: number, host: string): Promise<string>;
  /**
   * Stops taking connections and lets the requests in flight finish: their responses go out and are stored, or
   * their keys released, as usual. After `timeoutMs` the requests still running are cut (their keys then lapse
   * with their leases). Resolves once every request is over; the backend is the caller's to close after it.
   */
  shutdown(timeoutMs: number): Promise<void>;
  /** Requests being served, or whose run goes on after their client left. */
  readonly inFlight: number;
}

/** One request through the proxy. */
class Exchange {
  readonly startedAt = performance.now();
  /** When the request arrived (`Date.now()`), for its log line. */
  readonly arrivedAt = Date.now();
  event: IdempotencyEvent | undefined;
  upstream: ClientRequest | undefined;
  upstreamStartedAt: number | undefined;
  upstreamMs: number | undefined;
  error: string | undefined;
  /** The response is over: sent, or its connection closed. */
  closed = false;
  clientGone = false;
  logged = false;

  constructor(
    readonly req: IncomingMessage,
    readonly res: ServerResponse,
  ) {}
}

/**
 * A copy of a request body as it goes upstream, for the one case where it is sent again: a kept-alive upstream
 * connection that turned out to be closed (see {@link isStaleConnection}). Kept up to the size the middleware
 * reads for fingerprints.
 */
class BodyCopy {
  chunks: Buffer[] = [];
  size = 0;
  complete = false;
  overflow = false;

  constructor(readonly limit: number) {}

  add(chunk: Buffer): void {
    if (this.overflow) return;
    this.size += chunk.length;
    if (this.size > this.limit) {
      this.overflow = true;
      this.chunks = [];
    } else this.chunks.push(chunk);
  }
}

/** Methods RFC 9110 calls idempotent: sent again on a fresh connection when a stale one failed, like a keyed request. */
const IDEMPOTENT_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE']);
/** Errors of a kept-alive connection the upstream closed as the request went out. */
const STALE_CONNECTION_ERRORS = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED']);
/** Pooled upstream connections idle longer than this are closed, before most servers' keep-alive timeouts. */
const IDLE_UPSTREAM_MS = 4_000;
/** How long past the shutdown timeout the proxy waits for the requests it cut to report their end. */
const SHUTDOWN_GRACE_MS = 5_000;

/**
 * Makes the reverse proxy: the middleware's request flow (`handleNodeRequest`, as `withIdempotency` runs it) with
 * the upstream as the handler.
 *
 * - A request the middleware lets run is sent upstream, and the upstream's response is captured, stored and sent
 *   exactly as a handler's would be. A request it answers itself (replay, 409, 422, 400, 413, 503) never reaches
 *   the upstream. Any other request streams through.
 * - The upstream cannot be reached (refused, unknown host): 502, and the key is released, since the request never
 *   reached it. The upstream fails once it has the request (connection reset, response cut short): 502 (or the
 *   connection cut, if the response had begun), and the key is left to lapse with its lease, since the request may
 *   have run: a retry meanwhile gets 409, never a second run beside the first.
 * - A client that leaves changes nothing for a request that holds its key: its upstream response is read to the
 *   end and stored. A request passing through is abandoned upstream, as by any proxy.
 *
 * @example
 * ```ts
 * const proxy = createIdempotencyProxy({ upstream: 'http://127.0.0.1:8080', backend: new MemoryBackend() });
 * console.log(await proxy.listen(8081, '127.0.0.1'));
 * process.once('SIGTERM', () => proxy.shutdown(30_000));
 * ```
 */
export function createIdempotencyProxy(options: IdempotencyProxyOptions): IdempotencyProxy {
  const upstream = new URL(options.upstream);
  if (upstream.protocol !== 'http:' && upstream.protocol !== 'https:') {
    throw new TypeError(`The upstream must be an http:// or https:// URL, not ${upstream.href}`);
  }
  const secure = upstream.protocol === 'https:';
  const send = secure ? httpsRequest : httpRequest;
  const upstreamHost = upstream.host;
  const basePath = upstream.pathname.replace(/\/+$/, '');
  const agentOptions = { keepAlive: true, scheduling: 'lifo' as const, timeout: IDLE_UPSTREAM_MS };
  const agent = secure ? new HttpsAgent(agentOptions) : new Agent(agentOptions);
  const healthPath = options.healthPath === undefined ? '/healthz' : options.healthPath;
  const log = options.log;
  const onStrayEvent = options.onStrayEvent;

  // Ties the engine's events to the request they are about: the engine reports them from inside calls the proxy
  // makes, or from promise continuations those calls registered, all of which run in the request's context.
  const context = new AsyncLocalStorage<Exchange>();
  const engine: IdempotencyEngine<IncomingMessage> = createNodeEngine<IncomingMessage>({
    ...options.middleware,
    backend: options.backend,
    onEvent(event) {
      const exchange = context.getStore() ?? holderOf(event);
      if (exchange === undefined || exchange.event !== undefined) return onStrayEvent?.(event);
      exchange.event = event;
      settle(exchange);
    },
  });
  const bodyLimit = engine.maxRequestBytes;
  const active = new Set<Exchange>();

  /**
   * The request an event reported outside any request's context is about: the one whose key it holds (events
   * hash the scoped key as `nodeSha256` does). Only a request that holds its key reports from outside (the
   * engine told from a timer, or through its connection being cut).
   */
  const holderOf = (event: IdempotencyEvent): Exchange | undefined => {
    if (event.keyHash === undefined) return undefined;
    for (const exchange of active) {
      const ticket = ticketOf(exchange.res);
      if (
        exchange.event === undefined &&
        ticket?.settled &&
        nodeSha256([ticket.storageKey]) === event.keyHash
      ) {
        return exchange;
      }
    }
    return undefined;
  };
  let stopping = false;
  let drained: (() => void) | undefined;

  const settle = (exchange: Exchange) => {
    if (exchange.logged || !exchange.closed) return;
    // A request that holds its key is over once the engine reported its outcome (stored, released, …), which
    // may come after its client left.
    if (exchange.event === undefined && ticketOf(exchange.res) !== undefined) return;
    exchange.logged = true;
    active.delete(exchange);
    if (log !== undefined) log(logLine(exchange));
    if (stopping) {
      server.closeIdleConnections();
      if (active.size === 0) drained?.();
    }
  };

  const badGateway = (exchange: Exchange, reply: EngineReply) => {
    const { res } = exchange;
    if (failCapture(res, () => sendReply(res, reply))) return;
    if (!res.headersSent) sendReply(res, reply);
    else res.destroy();
  };

  /**
   * The upstream failed before its response was over. `delivered`: the request reached it (the connection was
   * up), so it may have run.
   */
  const upstreamFailed = (exchange: Exchange, error: Error, delivered: boolean) => {
    // A request passing through whose client left was dropped upstream on purpose: nothing failed.
    if (exchange.clientGone && ticketOf(exchange.res) === undefined) return;
    exchange.error = (error as { code?: string }).code ?? error.message;
    if (exchange.upstreamStartedAt !== undefined) {
      exchange.upstreamMs = performance.now() - exchange.upstreamStartedAt;
    }
    const ticket = ticketOf(exchange.res);
    // The outcome is unknown: the engine is told what it is told of a handler that failed after its client left,
    // so that the key waits out its lease instead of inviting a second run beside one that may be going on.
    if (ticket !== undefined && delivered) engine.clientLeft(ticket);
    badGateway(
      exchange,
      gatewayReply(
        engine.options.errorFormat,
        delivered
          ? 'The upstream failed after it received the request; whether it ran is unknown'
          : 'The upstream could not be reached; the request was not sent',
      ),
    );
  };

  const relay = (exchange: Exchange, upstreamRes: IncomingMessage) => {
    const { res } = exchange;
    const holdsKey = ticketOf(res) !== undefined;
    try {
      res.writeHead(
        upstreamRes.statusCode ?? 502,
        upstreamRes.statusMessage || undefined,
        endToEndHeaders(upstreamRes),
      );
    } catch (error) {
      upstreamRes.destroy();
      return upstreamFailed(exchange, error as Error, true);
    }
    const resume = () => upstreamRes.resume();
    upstreamRes.on('data', (chunk: Buffer) => {
      if (!res.write(chunk) && !res.destroyed) {
        upstreamRes.pause();
        res.once('drain', resume);
      }
    });
    upstreamRes.on('end', () =>
      context.run(exchange, () => {
        exchange.upstreamMs = performance.now() - exchange.upstreamStartedAt!;
        res.end();
      }),
    );
    upstreamRes.on('close', () => {
      if (!upstreamRes.complete)
        context.run(exchange, upstreamFailed, exchange, new Error('ECONNRESET'), true);
    });
    upstreamRes.on('error', () => {});
    // A client that left reads nothing more: a keyed request's response is read to its end all the same.
    res.once('close', () => {
      if (exchange.clientGone && holdsKey) resume();
    });
  };

  /**
   * Sends the request upstream. `resendable`: it may be sent again on a new connection if a kept-alive one turns
   * out closed; `copy` keeps its body for that (none for a request without a body).
   */
  const forward = (exchange: Exchange, resendable: boolean, copy: BodyCopy | undefined, fresh: boolean) => {
    const { req, res } = exchange;
    const upstreamReq = send({
      protocol: upstream.protocol,
      hostname: upstream.hostname,
      port: upstream.port,
      method: req.method,
      path: basePath + (req.url ?? '/'),
      headers: upstreamRequestHeaders(req, upstreamHost) as unknown as Record<string, string>,
      agent: fresh ? false : agent,
      // TLS names the upstream, not the Host header passed on from the client.
      ...(secure ? { servername: upstream.hostname } : {}),
    });
    exchange.upstream = upstreamReq;
    exchange.upstreamStartedAt ??= performance.now();
    let delivered = false;
    let responded = false;
    upstreamReq.on('socket', (socket: Socket) => {
      if (!socket.connecting) delivered = true;
      else socket.once(secure ? 'secureConnect' : 'connect', () => (delivered = true));
    });
    upstreamReq.on('response', (upstreamRes: IncomingMessage) => {
      responded = true;
      context.run(exchange, relay, exchange, upstreamRes);
    });
    upstreamReq.on('error', (error: Error) => {
      if (responded) return;
      if (
        !fresh &&
        resendable &&
        (copy === undefined || copy.complete) &&
        isStaleConnection(upstreamReq, error)
      ) {
        return forward(exchange, resendable, copy, true);
      }
      context.run(exchange, upstreamFailed, exchange, error, delivered);
    });
    if (fresh) {
      for (const chunk of copy?.chunks ?? []) upstreamReq.write(chunk);
      upstreamReq.end();
      return;
    }
    if (copy !== undefined) {
      req.on('data', (chunk: Buffer) => copy.add(chunk));
      req.once('end', () => (copy.complete = !copy.overflow));
    }
    req.pipe(upstreamReq);
    req.once('error', () => {
      if (ticketOf(res) === undefined) upstreamReq.destroy();
    });
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    if (stopping) res.shouldKeepAlive = false;
    if (healthPath !== null && isHealthCheck(req, healthPath)) return answerHealth(res, stopping);
    const exchange = new Exchange(req, res);
    active.add(exchange);
    res.once('close', () => {
      exchange.closed = true;
      exchange.clientGone = !res.writableEnded;
      // The client left. A keyed request runs to its end upstream and is stored; anything else is dropped.
      if (exchange.clientGone && ticketOf(res) === undefined) exchange.upstream?.destroy();
      settle(exchange);
    });
    context.run(exchange, () =>
      handleNodeRequest(
        engine,
        req,
        res,
        req.url ?? '/',
        READ_STREAM,
        () => {
          const resendable = ticketOf(res) !== undefined || IDEMPOTENT_METHODS.has(req.method ?? '');
          forward(
            exchange,
            resendable,
            resendable && hasBody(req) ? new BodyCopy(bodyLimit) : undefined,
            false,
          );
        },
        // The middleware could not handle the request (a `scope` that threw, a body that could not be read).
        (error) => {
          exchange.error = error instanceof Error ? error.message : String(error);
          if (!res.headersSent) sendReply(res, engine.internalError);
          else res.destroy();
        },
      ),
    );
  };

  const server = createServer(onRequest);

  let stopped: Promise<void> | undefined;
  return {
    server,
    get inFlight() {
      return active.size;
    },
    listen(port, host) {
      return new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.off('error', reject);
          const address = server.address() as AddressInfo;
          const shown = address.family === 'IPv6' ? `[${address.address}]` : address.address;
          resolve(`http://${shown}:${address.port}`);
        });
      });
    },
    shutdown(timeoutMs) {
      stopped ??= new Promise<void>((resolve) => {
        stopping = true;
        let forced: ReturnType<typeof setTimeout> | undefined;
        let abandoned: ReturnType<typeof setTimeout> | undefined;
        const done = () => {
          clearTimeout(forced);
          clearTimeout(abandoned);
          agent.destroy();
          resolve();
        };
        drained = done;
        server.close();
        server.closeIdleConnections();
        // Responses still to be written close their connections once they are out.
        for (const exchange of active) exchange.res.shouldKeepAlive = false;
        if (active.size === 0) return done();
        forced = setTimeout(() => {
          const cut = new Error('The proxy is shutting down');
          // The upstream side first: each request still running fails as an upstream failure (502, its key left
          // to lapse). Then the clients' connections, cut with an error: to the capture, a client going away,
          // which changes nothing more; an error-less destroy would read as the application cutting its response.
          for (const exchange of active) exchange.upstream?.destroy(cut);
          setImmediate(() => {
            for (const exchange of active) exchange.req.socket.destroy(cut);
            server.closeAllConnections();
          });
          abandoned = setTimeout(done, SHUTDOWN_GRACE_MS);
        }, timeoutMs);
      });
      return stopped;
    },
  };
}

/**
 * A kept-alive upstream connection the upstream had closed just as the request went out on it: the request was
 * not received, and is sent again once on a new connection, if its body is in hand and sending it twice is safe
 * (an idempotent method, or a request that holds its key).
 */
function isStaleConnection(upstreamReq: ClientRequest, error: Error): boolean {
  return upstreamReq.reusedSocket && STALE_CONNECTION_ERRORS.has((error as { code?: string }).code ?? '');
}

function isHealthCheck(req: IncomingMessage, path: string): boolean {
  if (req.method !== 'GET' && req.method !== 'HEAD') return false;
  const url = req.url ?? '';
  return url === path || (url.startsWith(path) && url.charCodeAt(path.length) === 63) /* ? */;
}

function answerHealth(res: ServerResponse, stopping: boolean): void {
  const body = stopping ? '{"status":"stopping"}' : '{"status":"ok"}';
  res.writeHead(stopping ? 503 : 200, {
    'content-type': 'application/json',
    'cache-control': 'no-store',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
}

/** A 502 in the configured error format. */
function gatewayReply(format: 'detail' | 'problem', detail: string): EngineReply {
  const problem = format === 'problem';
  const payload = problem
    ? { type: 'about:blank', title: 'Bad Gateway', status: 502, detail }
    : { detail: `Bad Gateway: ${detail}` };
  return {
    kind: 'reply',
    status: 502,
    headers: [['content-type', problem ? 'application/problem+json' : 'application/json']],
    body: Buffer.from(JSON.stringify(payload)),
    replayed: false,
  };
}

function logLine(exchange: Exchange): ProxyRequestLog {
  const { req, res, event } = exchange;
  const url = req.url ?? '/';
  const query = url.indexOf('?');
  return {
    msg: 'request',
    time: new Date(exchange.arrivedAt).toISOString(),
    method: req.method ?? 'GET',
    path: query === -1 ? url : url.slice(0, query),
    status: res.headersSent ? res.statusCode : event?.status,
    outcome: event?.outcome ?? 'passed',
    ...(event?.keyHash === undefined ? {} : { keyHash: event.keyHash }),
    durationMs: round(performance.now() - exchange.startedAt),
    ...(exchange.upstreamMs === undefined ? {} : { upstreamMs: round(exchange.upstreamMs) }),
    ...(exchange.clientGone ? { clientGone: true as const } : {}),
    ...(exchange.error === undefined ? {} : { error: exchange.error }),
  };
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}
