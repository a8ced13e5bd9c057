/**
 * Third-party HTTP clients that retry on their own, each configured as its documentation says for a POST that
 * carries an `Idempotency-Key`: got, ky, axios with axios-retry, undici's `RetryAgent`, and Stripe's own SDK
 * (which makes the key itself). Against every adapter (Express, node:http, Fastify, Koa, Hono, fetch), with the
 * middleware on `MemoryBackend` and `onConflict: 'wait'`, two ways a first attempt is lost while its handler runs:
 *
 * - the network drops the connection: a proxy between client and server (which also counts the attempts) cuts
 *   it, both ways, once the request went through; the client retries on the network error;
 * - the client's own per-attempt timeout fires, and it retries.
 *
 * Either way the retry waits for the first run and gets its response (`Idempotent-Replayed: true`): the handler
 * runs once per key, and the client ends with the first run's body. (ky does not retry after its own timeout; there
 * the app sends the request again, as it would have to.)
 */
import { randomUUID } from 'node:crypto';
import { type AddressInfo, connect, createServer as createNetServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import axios from 'axios';
import axiosRetry from 'axios-retry';
import express from 'express';
import got from 'got';
import Koa from 'koa';
import ky from 'ky';
import Stripe from 'stripe';
import { Agent, RetryAgent, request as undiciRequest } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { createFastifyServerFactory } from '../support/fastify.js';
import { createFetchServerFactory, createHonoServerFactory } from '../support/hono.js';
import {
  createExpressServerFactory,
  createNodeServerFactory,
  type RouteRequest,
  type RouteResponse,
  type ServerFactory,
  type TestServer,
} from '../support/http.js';
import { createKoaServerFactory } from '../support/koa.js';

/**
 * How long a handler runs; when the proxy cuts a first attempt; each client's per-attempt timeout. The handler
 * outlasts undici's timeouts, which it checks on a timer that ticks about every half second.
 */
const HANDLER_MS = 1500;
const DROP_AFTER_MS = 100;
const ATTEMPT_TIMEOUT_MS = 600;

interface Outcome {
  status: number;
  replayed: string | null;
  body: Record<string, unknown>;
}

/**
 * A retrying client: one call with `key`, retried by the client itself, resolving with the last answer;
 * `timeoutMs`, its per-attempt timeout (`undefined`: the client's usual one).
 */
type Client = (url: string, key: string, timeoutMs: number | undefined) => Promise<Outcome>;

const header = (value: string | string[] | undefined | null): string | null =>
  value === undefined || value === null ? null : Array.isArray(value) ? value.join(', ') : value;

const clients: Record<string, Client> = {
  async got(url, key, timeoutMs) {
    const response = await got.post(url, {
      json: { item: 'book' },
      headers: { 'idempotency-key': key },
      // got retries only idempotent methods unless told; network errors and timeouts are in its default codes.
      retry: { limit: 3, methods: ['POST'], backoffLimit: 100 },
      timeout: { request: timeoutMs },
      responseType: 'json',
    });
    return {
      status: response.statusCode,
      replayed: header(response.headers['idempotent-replayed']),
      body: response.body as Record<string, unknown>,
    };
  },

  async ky(url, key, timeoutMs) {
    const response = await ky.post(url, {
      json: { item: 'book' },
      headers: { 'idempotency-key': key },
      retry: { limit: 3, methods: ['post'], backoffLimit: 100 },
      timeout: timeoutMs ?? 10_000,
    });
    return {
      status: response.status,
      replayed: response.headers.get('idempotent-replayed'),
      body: (await response.json()) as Record<string, unknown>,
    };
  },

  async 'axios + axios-retry'(url, key, timeoutMs) {
    const client = axios.create({ timeout: timeoutMs ?? 0 });
    axiosRetry(client, {
      retries: 3,
      retryDelay: () => 50,
      // Its default condition leaves POST alone: a keyed POST is safe to retry on a network error or timeout.
      retryCondition: (error) => error.response === undefined,
      shouldResetTimeout: true,
    });
    const response = await client.post(url, { item: 'book' }, { headers: { 'idempotency-key': key } });
    return {
      status: response.status,
      replayed: header(response.headers['idempotent-replayed'] as string | undefined),
      body: response.data as Record<string, unknown>,
    };
  },

  async 'undici RetryAgent'(url, key, timeoutMs) {
    const timeout = timeoutMs ?? 10_000;
    const dispatcher = new RetryAgent(new Agent({ headersTimeout: timeout, bodyTimeout: timeout }), {
      maxRetries: 3,
      minTimeout: 50,
      methods: ['POST'],
      errorCodes: ['ECONNRESET', 'UND_ERR_SOCKET', 'UND_ERR_HEADERS_TIMEOUT'],
    });
    try {
      const response = await undiciRequest(url, {
        method: 'POST',
        dispatcher,
        body: JSON.stringify({ item: 'book' }),
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
      });
      return {
        status: response.statusCode,
        replayed: header(response.headers['idempotent-replayed']),
        body: (await response.body.json()) as Record<string, unknown>,
      };
    } finally {
      await dispatcher.close();
    }
  },
};

/** A proxy in front of a server: it sees every request, and may cut some connections. */
interface Proxy {
  readonly url: string;
  /** The `Idempotency-Key` of every request that went through, retries answered by the middleware included. */
  readonly arrived: string[];
  close(): Promise<void>;
}

/**
 * A TCP proxy in front of `port` that notes the key of every request and, with `cutAfterMs`, cuts the connection
 * of the first request of each key, both ways, that long after the request went through: to the server, the
 * client went away; to the client, the connection reset.
 */
async function proxyTo(port: number, cutAfterMs: number | undefined): Promise<Proxy> {
  const arrived: string[] = [];
  const sockets = new Set<Socket>();
  const proxy = createNetServer((client) => {
    const upstream = connect(port, '127.0.0.1');
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => {});
      socket.on('close', () => sockets.delete(socket));
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('data', (chunk: Buffer) => {
      const key = /\r\nidempotency-key: *([^\r]+)\r\n/i.exec(chunk.toString('latin1'))?.[1];
      if (key === undefined) return;
      const first = !arrived.includes(key);
      arrived.push(key);
      if (!first || cutAfterMs === undefined) return;
      setTimeout(() => {
        client.destroy();
        upstream.destroy();
      }, cutAfterMs);
    });
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`,
    arrived,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        proxy.close(() => resolve());
      }),
  };
}

const json = (value: unknown): RouteResponse => ({
  status: 201,
  headers: [['content-type', 'application/json']],
  chunks: [JSON.stringify(value)],
});

const adapters: Record<string, ServerFactory> = {
  Express: createExpressServerFactory(express, 'before'),
  'node:http': createNodeServerFactory(),
  Fastify: createFastifyServerFactory(),
  Koa: createKoaServerFactory(Koa, 'before'),
  'Hono (@hono/node-server)': createHonoServerFactory(),
  'fetch (withIdempotency)': createFetchServerFactory(),
};

describe.concurrent.each(Object.entries(adapters))(
  '%s: third-party clients that retry on their own',
  (adapter, factory) => {
    describe.each(['dropped', 'timed-out'] as const)('first attempt %s', (lost) => {
      const runs = new Map<string, number>();
      const backend = new MemoryBackend();
      let server: TestServer;
      let proxy: Proxy;

      /** Counts the run, outlasts the client's first attempt, then answers. */
      const run = async (req: RouteRequest, answer: object) => {
        const key = String(req.header('idempotency-key'));
        const count = (runs.get(key) ?? 0) + 1;
        runs.set(key, count);
        await sleep(HANDLER_MS);
        return json({ ...answer, run: count });
      };

      beforeAll(async () => {
        server = await factory(
          { backend, onConflict: 'wait' },
          {
            '/orders': (req) => run(req, { item: 'book' }),
            // Stripe's SDK posts to /v1/…, and reads an object with an `id` back.
            '/v1/customers': (req) => run(req, { id: 'cus_1', object: 'customer', email: 'ann@example.com' }),
          },
        );
        // The proxy cuts the first attempt's connection, or only watches while the client times out on its own.
        proxy = await proxyTo(
          Number(new URL(server.url).port),
          lost === 'dropped' ? DROP_AFTER_MS : undefined,
        );
      });

      afterAll(async () => {
        await proxy.close();
        await server.close();
        backend.close();
      });

      it.each(Object.keys(clients))(
        '%s ends with the first run’s response, the handler run once',
        async (name) => {
          const key = randomUUID();
          const timeoutMs = lost === 'timed-out' ? ATTEMPT_TIMEOUT_MS : undefined;
          const call = (timeout: number | undefined) => clients[name]!(`${proxy.url}/orders`, key, timeout);
          let outcome: Outcome;
          if (name === 'ky' && lost === 'timed-out') {
            // ky does not retry after its own timeout, by design ("Retries are not triggered following a
            // timeout"): the app sees the timeout and sends the request again itself, same key, default timeout.
            await expect(call(timeoutMs)).rejects.toMatchObject({ name: 'TimeoutError' });
            outcome = await call(undefined);
          } else outcome = await call(timeoutMs);
          expect(outcome).toEqual({ status: 201, replayed: 'true', body: { item: 'book', run: 1 } });
          expect(runs.get(key)).toBe(1);
          expect(proxy.arrived.filter((seen) => seen === key).length).toBeGreaterThan(1);
        },
      );

      // Stripe's SDK sends form-encoded bodies, which Fastify refuses with 415 unless a form parser
      // (`@fastify/formbody`) is registered; the test app registers none.
      it.runIf(adapter !== 'Fastify')(
        'Stripe’s SDK (its own key, its own retries) creates the customer once',
        async () => {
          const stripe = new Stripe('sk_test_idempotency', {
            host: '127.0.0.1',
            port: Number(new URL(proxy.url).port),
            protocol: 'http',
            maxNetworkRetries: 3,
            timeout: lost === 'timed-out' ? ATTEMPT_TIMEOUT_MS : 10_000,
          });
          const customer = await stripe.customers.create({ email: 'ann@example.com' });
          expect(customer.email).toBe('ann@example.com');
          expect(customer.lastResponse.headers['idempotent-replayed']).toBe('true');
          // Every attempt carried the one key the SDK made, and the customer was created once.
          const keys = proxy.arrived.filter((key) => key.startsWith('stripe-node-retry-'));
          expect(keys.length).toBeGreaterThan(1);
          expect(new Set(keys).size).toBe(1);
          expect(runs.get(keys[0]!)).toBe(1);
        },
      );
    });
  },
);
