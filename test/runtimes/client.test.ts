/**
 * `idempotency-header/client` on the runtimes it promises besides Node.js: Bun, Deno and workerd (Miniflare),
 * each installed from npm. The client, bundled for a neutral platform (which fails on any `node:` import), runs
 * inside each runtime and calls our `node:http` middleware here, which loses the first response on the wire: the
 * call retries with its key, sends its streamed body again, and ends with the one run's stored response.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { Miniflare } from 'miniflare';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withIdempotency } from '../../src/adapters/node.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { listen, readAll, type TestServer } from '../support/http.js';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const BIN = join(HERE, '..', '..', 'node_modules', '.bin');

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

interface Served {
  readonly url: string;
  stop(): Promise<void>;
}

/** Starts `command` and waits for it to print `LISTENING <port>`. */
function serveProcess(command: string, args: string[]): Promise<Served> {
  return new Promise((resolve, reject) => {
    const child: ChildProcess = spawn(command, args, {
      env: { ...process.env, DENO_NO_UPDATE_CHECK: '1', DENO_NO_PROMPT: '1', NO_COLOR: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    const timer = setTimeout(() => {
      child.kill();
      reject(new Error(`${command} did not start within 30 s:\n${output}`));
    }, 30_000);
    child.stdout?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      const port = /LISTENING (\d+)/.exec(output)?.[1];
      if (port === undefined) return;
      clearTimeout(timer);
      resolve({
        url: `http://127.0.0.1:${port}`,
        stop: () =>
          new Promise<void>((done) => {
            if (child.exitCode !== null) return done();
            child.once('exit', () => done());
            child.kill();
          }),
      });
    });
    child.stderr?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

const RUNTIMES: readonly (readonly [string, () => Promise<Served>])[] = [
  ['Bun', () => serveProcess(join(BIN, 'bun'), [join(HERE, 'serve-bun.mjs'), bundle])],
  [
    'Deno',
    () =>
      serveProcess(join(BIN, 'deno'), [
        'run',
        '--allow-net=127.0.0.1',
        `--allow-read=${workDir}`,
        join(HERE, 'serve-deno.mjs'),
        bundle,
      ]),
  ],
  [
    'workerd (Miniflare)',
    async () => {
      const mf = new Miniflare({
        modules: true,
        script: await readFile(bundle, 'utf8'),
        compatibilityDate: '2025-01-01',
      });
      const url = await mf.ready;
      return { url: url.origin, stop: () => mf.dispose() };
    },
  ],
];

interface CallResult {
  status: number;
  replayed: string | null;
  text: string;
  retries: { attempt: number; status: number | undefined; network: boolean }[];
}

for (const [runtime, serve] of RUNTIMES) {
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
