import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withIdempotency } from '../../src/adapters/node.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { listen, readAll, type TestServer } from '../support/http.js';
import { runtimes, type Served } from './serve.js';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const _BIN = join(HERE, '..', '..', 'node_modules', '.bin');

let workDir = '';
let bundle = '';
let server: TestServer;
const backend = new MemoryBackend();
const runs = new Map<string, number>();
const lost = new Set<string>();

beforeAll(async () => {
  workDir = await mkdtemp(join(tmpdir(), 'idempotency-client-runtimes-'));
  bundle = join(workDir, 'client-app.mjs');
  await build({
    entryPoints: [join(HERE, 'client-app.ts')],
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    target: 'es2022',
    outfile: bundle,
    logLevel: 'silent',
  });
  const listener = withIdempotency(
    async (req: IncomingMessage, res) => {
      const body = (await readAll(req)).toString();
      const key = String(req.headers['idempotency-key']);
      runs.set(key, (runs.get(key) ?? 0) + 1);
      res.writeHead(201, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ key, run: runs.get(key), body }));
    },
    { backend },
  );
  server = await listen(
    createServer((req, res) => {
      // The first response of each key never reaches the client: the connection is cut at its first byte, after
      // the handler ran and its response was stored.
      const key = String(req.headers['idempotency-key']);
      if (!lost.has(key)) {
        lost.add(key);
        const socket = req.socket;
        socket.write = (() => {
          socket.destroy();
          return false;
        }) as typeof socket.write;
      }
      listener(req, res);
    }),
  );
}, 60_000);

afterAll(async () => {
  await server?.close();
  backend.close();
  if (workDir !== '') await rm(workDir, { recursive: true, force: true });
});

describe('the client bundle', () => {
  it('has no Node.js import on its path', async () => {
    expect(await readFile(bundle, 'utf8')).not.toMatch(/from\s*["']node:|require\(["']node:/);
  });
});

interface CallResult {
  status: number;
  replayed: string | null;
  text: string;
  retries: { attempt: number; status: number | undefined; network: boolean }[];
}

for (const [runtime, serve] of runtimes(() => ({ file: bundle, dir: workDir }))) {
  describe(runtime, () => {
    let served: Served | undefined;

    beforeAll(async () => {
      served = await serve();
    }, 60_000);

    afterAll(async () => {
      await served?.stop();
    });

    it('retries a lost response with the same key and the same bytes: one execution, its response', async () => {
      const response = await fetch(
        `${served!.url}/call?target=${encodeURIComponent(`${server.url}/orders`)}`,
      );
      const result = (await response.json()) as CallResult;
      expect(result.status).toBe(201);
      expect(result.replayed).toBe('true');
      const order = JSON.parse(result.text) as { key: string; run: number; body: string };
      expect(order.key).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect(order).toEqual({ key: order.key, run: 1, body: '{"item":"from a runtime"}' });
      expect(runs.get(order.key)).toBe(1);
      expect(result.retries).toEqual([{ attempt: 1, status: undefined, network: true }]);
    });
  });
}
