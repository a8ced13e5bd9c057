/**
 * The package as users get it: `npm pack`, installed into a fresh project outside the repository, loaded from
 * ES modules and CommonJS, serving real HTTP requests; and the tarball checked by publint and
 * @arethetypeswrong/cli.
 */
import { execFile, spawn } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from './fixtures/build.js';
import { type ConsumerProject, createConsumerProject, NPM_ENV } from './fixtures/consumer-project.js';

const exec = promisify(execFile);
const FIXTURES = join(REPO_ROOT, 'test', 'package', 'fixtures');

interface ScenarioResponse {
  status: number;
  replayed: string | null;
  location: string | null;
  body: string;
}

interface ScenarioOutput {
  format: string;
  exports: Record<string, string>;
  express: { responses: ScenarioResponse[]; runs: number };
  node: { responses: ScenarioResponse[]; runs: number };
  errors: Record<string, { name: string; code: string; sameClass: boolean } | string>;
}

let consumer: ConsumerProject | undefined;
let packedFiles: string[];
let project: string;

beforeAll(async () => {
  // Express and Nest are optional peer dependencies: linked from the repository instead of fetched.
  consumer = await createConsumerProject({
    name: 'pack',
    link: ['express', '@nestjs/common', '@nestjs/core', 'rxjs', 'reflect-metadata'],
  });
  ({ packedFiles, dir: project } = consumer);
  for (const file of ['scenario.cjs', 'consumer.mjs', 'consumer.cjs']) {
    copyFileSync(join(FIXTURES, file), join(project, file));
  }
}, 120_000);

afterAll(() => {
  consumer?.remove();
});

async function runConsumer(file: string): Promise<ScenarioOutput> {
  const { stdout } = await exec(process.execPath, [file], { cwd: project, timeout: 20_000 });
  const lines = stdout.trim().split('\n');
  expect(lines).toHaveLength(1);
  return JSON.parse(lines[0]!) as ScenarioOutput;
}

describe('npm pack', () => {
  it('publishes only the build, package.json and documentation', () => {
    expect(packedFiles).toContain('package.json');
    expect(packedFiles).toContain('dist/index.mjs');
    expect(packedFiles).toContain('dist/index.cjs');
    for (const path of packedFiles) {
      expect(path, path).toMatch(
        /^(dist\/.+\.(mjs|cjs|d\.mts|d\.cts)|package\.json|README\.md|LICENSE(\.md)?)$/,
      );
    }
  });
});

describe('the installed tarball’s executable and client', () => {
  it('publishes the executable with its shebang', async () => {
    expect(packedFiles).toContain('dist/cli.mjs');
    const pkg = JSON.parse(
      await readFile(join(project, 'node_modules', 'idempotency-header', 'package.json'), 'utf8'),
    );
    expect(pkg.bin).toEqual({ 'idempotency-header': './dist/cli.mjs' });
    const cli = await readFile(
      join(project, 'node_modules', 'idempotency-header', 'dist', 'cli.mjs'),
      'utf8',
    );
    expect(cli.startsWith('#!/usr/bin/env node\n')).toBe(true);
  });

  it('runs `npx idempotency-header proxy --help`, documenting every flag', async () => {
    const { stdout } = await exec('npx', ['--no', 'idempotency-header', 'proxy', '--help'], {
      cwd: project,
      env: NPM_ENV,
      timeout: 30_000,
    });
    expect(stdout).toMatch(/^idempotency-header \d+\.\d+\.\d+: a reverse proxy/);
    for (const flag of [
      '--upstream URL',
      '--backend SPEC',
      '--lock-timeout SECONDS',
      '--required, --no-required',
    ]) {
      expect(stdout).toContain(flag);
    }
  }, 30_000);

  it('proxies a service: runs a keyed POST once, replays it, and stops on SIGTERM', async () => {
    let runs = 0;
    const upstream = createServer((req, res) => {
      req.resume();
      req.on('end', () => {
        runs++;
        res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ run: runs }));
      });
    });
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const { port } = upstream.address() as AddressInfo;
    const child = spawn(
      join(project, 'node_modules', '.bin', 'idempotency-header'),
      ['proxy', '--upstream', `http://127.0.0.1:${port}`, '--port', '0'],
      { cwd: project, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    try {
      let output = '';
      const url = await new Promise<string>((resolve, reject) => {
        child.stdout.on('data', (chunk: Buffer) => {
          output += chunk.toString();
          const match = /"msg":"listening","time":"[^"]+","url":"([^"]+)"/.exec(output);
          if (match !== null) resolve(match[1]!);
        });
        child.once('exit', (code) => reject(new Error(`exited with ${code}: ${output}`)));
      });
      const send = () =>
        fetch(`${url}/orders`, { method: 'POST', headers: { 'idempotency-key': 'pack-1' }, body: '{}' });
      const first = await send();
      expect(first.status).toBe(201);
      expect(await first.text()).toBe('{"run":1}');
      const replay = await send();
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(await replay.text()).toBe('{"run":1}');
      expect(runs).toBe(1);
      const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
    } finally {
      child.kill('SIGKILL');
      upstream.close();
    }
  }, 30_000);

  it('names the driver to install when the backend needs one that is missing', async () => {
    const failure = await exec(
      join(project, 'node_modules', '.bin', 'idempotency-header'),
      ['proxy', '--upstream', 'http://127.0.0.1:1', '--backend', 'redis://127.0.0.1:6379'],
      { cwd: project, timeout: 30_000 },
    ).catch((error: { code: number; stderr: string }) => error);
    expect(failure).toMatchObject({ code: 2 });
    expect((failure as { stderr: string }).stderr).toMatch(
      /needs the `ioredis` or `redis` package.*npm install ioredis/,
    );
  }, 30_000);

  it.each([
    [
      'ESM',
      [
        '--input-type=module',
        '-e',
        "import * as c from 'idempotency-header/client'; console.log(Object.keys(c).sort().join())",
      ],
    ],
    ['CommonJS', ['-e', "console.log(Object.keys(require('idempotency-header/client')).sort().join())"]],
  ])('loads idempotency-header/client as %s', async (_, args) => {
    const { stdout } = await exec(process.execPath, args, { cwd: project, timeout: 20_000 });
    expect(stdout.trim().split(',')).toEqual(
      expect.arrayContaining(['createIdempotentFetch', 'idempotentFetch']),
    );
  });

  it.each([
    [
      'ESM',
      [
        '--input-type=module',
        '-e',
        "import * as t from 'idempotency-header/testkit'; console.log(Object.keys(t).sort().join())",
      ],
    ],
    ['CommonJS', ['-e', "console.log(Object.keys(require('idempotency-header/testkit')).sort().join())"]],
  ])('loads idempotency-header/testkit as %s, without a test runner installed', async (_, args) => {
    const { stdout } = await exec(process.execPath, args, { cwd: project, timeout: 20_000 });
    expect(stdout.trim()).toBe('describeBackendContract');
  });
});

describe('the installed tarball’s NestJS subpath', () => {
  it.each([
    [
      'ESM',
      [
        '--input-type=module',
        '-e',
        "import * as n from 'idempotency-header/nestjs'; console.log(Object.keys(n).sort().join())",
      ],
    ],
    ['CommonJS', ['-e', "console.log(Object.keys(require('idempotency-header/nestjs')).sort().join())"]],
  ])('loads idempotency-header/nestjs as %s', async (_, args) => {
    const { stdout } = await exec(process.execPath, args, { cwd: project, timeout: 20_000 });
    expect(stdout.trim().split(',')).toEqual(
      expect.arrayContaining(['Idempotent', 'IdempotencyInterceptor', 'IdempotencyModule', 'idempotencyOf']),
    );
  });
});

describe.each([
  ['an ES module', 'consumer.mjs', 'esm'],
  ['a CommonJS module', 'consumer.cjs', 'cjs'],
])('the installed tarball loaded from %s', (_, file, format) => {
  let output: ScenarioOutput;

  beforeAll(async () => {
    output = await runConsumer(file);
  }, 30_000);

  it('exposes every documented export', () => {
    expect(output.format).toBe(format);
    expect(output.exports).toEqual({
      MemoryBackend: 'function',
      IdempotencyEngine: 'function',
      IdempotencyError: 'function',
      idempotencyHeader: 'function',
      withIdempotency: 'function',
      RedisBackend: 'function',
    });
  });

  it.each(['express', 'node'] as const)('runs the %s handler once and replays the second POST', (server) => {
    const { responses, runs } = output[server];
    expect(runs).toBe(1);
    const body = '{"run":1,"amount":10}';
    expect(responses).toEqual([
      { status: 201, replayed: null, location: '/orders/1', body },
      { status: 201, replayed: 'true', location: '/orders/1', body },
    ]);
  });

  it('throws IdempotencyError from every subpath, one class shared by all', () => {
    const expected = { name: 'IdempotencyError', code: 'ERR_IDEMPOTENCY_OPTION', sameClass: true };
    expect(output.errors).toEqual({ express: expected, node: expected });
  });
});

/** Runs a command in the repository and reports its exit code and output instead of throwing. */
async function check(command: string, args: string[]): Promise<{ code: number; output: string }> {
  try {
    const { stdout, stderr } = await exec(command, args, { cwd: REPO_ROOT, env: NPM_ENV, timeout: 60_000 });
    return { code: 0, output: stdout + stderr };
  } catch (error) {
    const failed = error as { code?: number | string; stdout?: string; stderr?: string };
    return {
      code: typeof failed.code === 'number' ? failed.code : -1,
      output: `${failed.stdout}${failed.stderr}`,
    };
  }
}

describe('package linters', () => {
  it('passes publint --strict', async () => {
    const { code, output } = await check('npx', ['publint', '--strict']);
    expect(code, output).toBe(0);
    expect(output).toMatch(/All good/);
  }, 60_000);

  it('passes @arethetypeswrong/cli for node16 and bundlers', async () => {
    const { code, output } = await check('npx', ['attw', '--pack', '.', '--profile', 'node16']);
    expect(code, output).toBe(0);
  }, 60_000);
});
