/**
 * The `node:http` adapter, `withIdempotency`: the adapter contract on {@link MemoryBackend}, then how it treats a
 * listener that fails, and control characters that only a lenient HTTP parser lets through.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerOptions } from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { type RequestListener, withIdempotency } from '../../src/adapters/node.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { IdempotencyEvent } from '../../src/core/options.js';
import {
  createMemoryBackend,
  createNodeServerFactory,
  listen,
  readAll,
  send,
  sendRawRequest,
  type TestServer,
} from '../support/http.js';
import { describeAdapterContract } from './contract.js';

describeAdapterContract('node:http withIdempotency, MemoryBackend', {
  createServer: createNodeServerFactory(),
  createBackend: createMemoryBackend,
});

const INTERNAL_ERROR = '{"detail":"Internal Server Error"}';
const REPLAYED = 'idempotent-replayed';

describe('withIdempotency', () => {
  const servers: TestServer[] = [];
  const backends: MemoryBackend[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((server) => server.close()));
    for (const backend of backends.splice(0)) backend.close();
  });

  /** Serves `listener` wrapped with a fresh backend; records `onHandlerError` calls and events. */
  async function serve(listener: RequestListener, serverOptions: ServerOptions = {}) {
    const backend = new MemoryBackend();
    backends.push(backend);
    const handlerErrors: { error: unknown; req: IncomingMessage }[] = [];
    const events: IdempotencyEvent[] = [];
    const wrapped = withIdempotency(listener, {
      backend,
      onHandlerError: (error, req) => handlerErrors.push({ error, req }),
      onEvent: (event) => events.push(event),
    });
    const server = await listen(createServer(serverOptions, wrapped));
    servers.push(server);
    return { url: server.url, handlerErrors, events };
  }

  /** A listener that fails its first call the given way, and answers 201 JSON afterwards. */
  function failingOnce(fail: 'throw' | 'reject' | 'throw after writing'): {
    listener: RequestListener;
    runs: () => number;
    error: Error;
  } {
    let runs = 0;
    const error = new Error(`the listener failed (${fail})`);
    const listener: RequestListener = (req, res) => {
      runs++;
      if (runs === 1) {
        if (fail === 'throw') throw error;
        if (fail === 'throw after writing') {
          res.writeHead(201, { 'content-type': 'application/json', 'x-partial': 'yes' });
          res.write('{"partial":');
          throw error;
        }
        return readAll(req).then(() => Promise.reject(error));
      }
      return readAll(req).then((body) => {
        res.writeHead(201, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ run: runs, body: body.toString('utf8') }));
      });
    };
    return { listener, runs: () => runs, error };
  }

  for (const fail of ['throw', 'reject', 'throw after writing'] as const) {
    it(`answers 500 and frees the key when the listener ${fail === 'reject' ? 'rejects' : `${fail}s`}`, async () => {
      const { listener, runs, error } = failingOnce(fail);
      const { url, handlerErrors, events } = await serve(listener);
      const key = randomUUID();

      const failed = await send(`${url}/orders`, { key, body: { item: 'book' } });
      expect(failed.status).toBe(500);
      expect(failed.headers.get('content-type')).toBe('application/json');
      expect(failed.headers.get('x-partial')).toBeNull();
      expect(failed.text).toBe(INTERNAL_ERROR);
      expect(handlerErrors).toHaveLength(1);
      expect(handlerErrors[0]!.error).toBe(error);
      expect(handlerErrors[0]!.req.headers['idempotency-key']).toBe(key);
      expect(events.map((event) => event.outcome)).toEqual(['not-stored']);

      const retry = await send(`${url}/orders`, { key, body: { item: 'book' } });
      expect(retry.status).toBe(201);
      expect(retry.headers.get(REPLAYED)).toBeNull();
      expect(JSON.parse(retry.text)).toEqual({ run: 2, body: '{"item":"book"}' });
      const replay = await send(`${url}/orders`, { key, body: { item: 'book' } });
      expect(replay.headers.get(REPLAYED)).toBe('true');
      expect(replay.text).toBe(retry.text);
      expect(runs()).toBe(2);
      expect(handlerErrors).toHaveLength(1);
    });
  }

  it('calls onHandlerError for a failing listener on a request it does not handle, too', async () => {
    const { listener, runs, error } = failingOnce('throw');
    const { url, handlerErrors, events } = await serve(listener);
    const failed = await send(`${url}/orders`, { method: 'PUT', key: randomUUID() });
    expect(failed.status).toBe(500);
    expect(failed.text).toBe(INTERNAL_ERROR);
    expect(handlerErrors.map((entry) => entry.error)).toEqual([error]);
    expect(events).toEqual([]);
    expect(runs()).toBe(1);
  });

  it('answers 422 to control characters in the key that a lenient HTTP parser lets through', async () => {
    let runs = 0;
    const { url } = await serve(
      (_req, res) => {
        runs++;
        res.end();
      },
      { insecureHTTPParser: true },
    );
    for (const byte of ['\x01', '\x1b', '\x7f']) {
      const result = await sendRawRequest(
        url,
        `POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: key${byte}${randomUUID()}\r\n` +
          'Content-Length: 0\r\nConnection: close\r\n\r\n',
      );
      expect([byte, result.status]).toEqual([byte, 422]);
      expect(JSON.parse(result.text)).toEqual({ detail: expect.stringMatching(/control characters/) });
    }
    expect(runs).toBe(0);
  });

  it('refuses a listener that is not a function', () => {
    expect(() =>
      withIdempotency(undefined as unknown as RequestListener, { backend: new MemoryBackend() }),
    ).toThrow(TypeError);
  });
});
