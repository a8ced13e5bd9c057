import { randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runtimes, type Served } from './serve.js';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const _BIN = join(HERE, '..', '..', 'node_modules', '.bin');

let workDir = '';
let bundle = '';

beforeAll(async () => {
  workDir = await mkdtemp(join(tmpdir(), 'idempotency-runtimes-'));
  bundle = join(workDir, 'app.mjs');
  await build({
    entryPoints: [join(HERE, 'app.ts')],
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    mainFields: ['module', 'main'],
    target: 'es2022',
    outfile: bundle,
    logLevel: 'silent',
  });
}, 60_000);

afterAll(async () => {
  if (workDir !== '') await rm(workDir, { recursive: true, force: true });
});

describe('the runtime app bundle', () => {
  it('has no Node.js import on its path', async () => {
    expect(await readFile(bundle, 'utf8')).not.toMatch(/from\s*["']node:|require\(["']node:/);
  });
});

interface Result {
  status: number;
  headers: Headers;
  text: string;
}

async function post(
  url: string,
  key: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<Result> {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'idempotency-key': key, 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
  });
  return { status: response.status, headers: response.headers, text: await response.text() };
}

for (const [runtime, serve] of runtimes(() => ({ file: bundle, dir: workDir }))) {
  describe(`${runtime}`, () => {
    let served: Served | undefined;

    beforeAll(async () => {
      served = await serve();
    }, 60_000);

    afterAll(async () => {
      await served?.stop();
    });

    for (const adapter of ['hono', 'fetch']) {
      describe(`${adapter} adapter`, () => {
        const url = (path: string) => `${served!.url}/${adapter}${path}`;
        const runs = async (path: string) =>
          ((await (await fetch(`${served!.url}/runs`)).json()) as Record<string, number>)[adapter + path] ??
          0;

        it('runs a first request once and replays its exact bytes', async () => {
          const key = randomUUID();
          const before = await runs('/orders');
          const first = await post(url('/orders'), key, { item: 'book' });
          expect(first.status).toBe(201);
          expect(first.headers.get('idempotent-replayed')).toBeNull();
          expect(JSON.parse(first.text)).toEqual({ run: before + 1, key, body: { item: 'book' } });
          const replay = await post(url('/orders'), key, { item: 'book' });
          expect(replay.status).toBe(201);
          expect(replay.headers.get('idempotent-replayed')).toBe('true');
          expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
          expect(replay.text).toBe(first.text);
          expect(await runs('/orders')).toBe(before + 1);
        });

        it('answers 409 while the first request runs, then replays it', async () => {
          const key = randomUUID();
          const before = await runs('/slow');
          const first = post(url('/slow'), key, { item: 'slow' }, { 'x-delay': '1500' });
          await sleep(500);
          const duplicate = await post(url('/slow'), key, { item: 'slow' });
          expect(duplicate.status).toBe(409);
          expect(JSON.parse(duplicate.text)).toEqual({
            detail: `Request already pending for idempotency key '${key}'`,
          });
          expect(Number(duplicate.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
          const done = await first;
          expect(done.status).toBe(201);
          const replay = await post(url('/slow'), key, { item: 'slow' });
          expect(replay.headers.get('idempotent-replayed')).toBe('true');
          expect(replay.text).toBe(done.text);
          expect(await runs('/slow')).toBe(before + 1);
        });

        it('answers 422 to the same key with a different body', async () => {
          const key = randomUUID();
          expect((await post(url('/orders'), key, { item: 'book' })).status).toBe(201);
          const other = await post(url('/orders'), key, { item: 'pen' });
          expect(other.status).toBe(422);
          expect(JSON.parse(other.text)).toEqual({
            detail: `Idempotency key '${key}' was already used for a different request`,
          });
        });

        it('keeps two scopes apart with the same key', async () => {
          const key = randomUUID();
          const a = await post(url('/orders'), key, { item: 'book' }, { 'x-tenant': 'a' });
          const b = await post(url('/orders'), key, { item: 'book' }, { 'x-tenant': 'b' });
          expect([a.status, b.status]).toEqual([201, 201]);
          expect(b.headers.get('idempotent-replayed')).toBeNull();
          expect(JSON.parse(b.text).run).toBe(JSON.parse(a.text).run + 1);
          const replayA = await post(url('/orders'), key, { item: 'book' }, { 'x-tenant': 'a' });
          expect(replayA.headers.get('idempotent-replayed')).toBe('true');
          expect(replayA.text).toBe(a.text);
        });
      });
    }
  });
}
