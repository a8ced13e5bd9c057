/**
 * Where the capture of a `node:http` response goes when the response has a prototype made for its app, as
 * Express gives every response: spliced once into the chain below the app's prototypes, or, where that chain
 * cannot be changed, in front of each response's own prototype. Either way the first run is stored and replayed.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, ServerResponse } from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { listen, send, type TestServer } from '../support/http.js';

const servers: TestServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((server) => server.close()));
});

/**
 * A server that gives each response `appPrototype` before the middleware runs, as Express's init does, and
 * answers 201 with the run's number.
 */
async function serveWith(appPrototype: object): Promise<{ url: string; runs: () => number }> {
  const middleware = idempotencyHeader({ backend: new MemoryBackend() });
  let runs = 0;
  const server = await listen(
    createServer((req: IncomingMessage, res: ServerResponse) => {
      Object.setPrototypeOf(res, appPrototype);
      const request = Object.assign(req, { originalUrl: req.url }) as Parameters<typeof middleware>[0];
      middleware(request, res as Parameters<typeof middleware>[1], () => {
        runs++;
        res.writeHead(201, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ run: runs }));
      });
    }),
  );
  servers.push(server);
  return { url: server.url, runs: () => runs };
}

describe('capture placement on responses with an app-made prototype', () => {
  it('captures through each response where the prototype below the app is frozen', async () => {
    const frozen = Object.freeze(Object.create(ServerResponse.prototype) as object);
    const appPrototype = Object.create(frozen) as object;
    const { url, runs } = await serveWith(appPrototype);
    const key = randomUUID();
    const first = await send(`${url}/orders`, { key, body: { item: 'book' } });
    const retry = await send(`${url}/orders`, { key, body: { item: 'book' } });
    expect([first.status, retry.status]).toEqual([201, 201]);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(retry.text).toBe(first.text);
    expect(runs()).toBe(1);
    expect(Object.getPrototypeOf(frozen)).toBe(ServerResponse.prototype);
  });

  it('splices the capture below the app prototypes once, and passes through the responses it does not capture', async () => {
    const shared = Object.create(ServerResponse.prototype) as object;
    const appPrototype = Object.create(shared) as object;
    const { url, runs } = await serveWith(appPrototype);
    const key = randomUUID();
    const first = await send(`${url}/orders`, { key, body: { item: 'book' } });
    expect(first.status).toBe(201);
    const spliced = Object.getPrototypeOf(shared) as object;
    expect(spliced).not.toBe(ServerResponse.prototype);
    expect(Object.getPrototypeOf(spliced)).toBe(ServerResponse.prototype);
    // A request without a key is not captured: its response goes out through the spliced methods unchanged.
    const plain = await send(`${url}/orders`, { body: { item: 'pen' } });
    expect(plain.status).toBe(201);
    expect(plain.text).toBe('{"run":2}');
    const retry = await send(`${url}/orders`, { key, body: { item: 'book' } });
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(retry.text).toBe(first.text);
    expect(runs()).toBe(2);
    // Spliced once: later first runs leave the chain as it is.
    await send(`${url}/orders`, { key: randomUUID(), body: { item: 'cup' } });
    expect(Object.getPrototypeOf(shared)).toBe(spliced);
  });
});
