/**
 * The package as users get it: `npm pack`, installed into a fresh project outside the repository, loaded from
 * ES modules and CommonJS, serving real HTTP requests; and the tarball checked by publint and
 * @arethetypeswrong/cli.
 */
import { execFile } from 'node:child_process';
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, REPO_ROOT } from './fixtures/build.js';

const exec = promisify(execFile);
const FIXTURES = join(REPO_ROOT, 'test', 'package', 'fixtures');

/** npm without the noise and without the registry: everything here is local. */
const NPM_ENV = {
  ...process.env,
  npm_config_update_notifier: 'false',
  npm_config_audit: 'false',
  npm_config_fund: 'false',
  npm_config_loglevel: 'error',
};

interface PackedFile {
  path: string;
}

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

let workDir: string;
let tarball: string;
let packedFiles: string[];
let project: string;

beforeAll(async () => {
  await ensureBuilt();
  workDir = realpathSync(mkdtempSync(join(tmpdir(), 'idempotency-header-pack-')));
  expect(workDir.startsWith(REPO_ROOT)).toBe(false);

  const { stdout } = await exec('npm', ['pack', '--json', '--pack-destination', workDir], {
    cwd: REPO_ROOT,
    env: NPM_ENV,
    timeout: 60_000,
  });
  const [packed] = JSON.parse(stdout) as [{ filename: string; files: PackedFile[] }];
  tarball = join(workDir, packed.filename);
  packedFiles = packed.files.map((file) => file.path);

  project = join(workDir, 'consumer');
  mkdirSync(project);
  writeFileSync(
    join(project, 'package.json'),
    JSON.stringify({ name: 'idempotency-header-consumer', version: '0.0.0', private: true }),
  );
  await exec('npm', ['install', '--no-audit', '--no-fund', '--ignore-scripts', '--offline', tarball], {
    cwd: project,
    env: NPM_ENV,
    timeout: 60_000,
  });
  // Express is an optional peer dependency: link the repository's copy instead of fetching it.
  symlinkSync(join(REPO_ROOT, 'node_modules', 'express'), join(project, 'node_modules', 'express'), 'dir');
  for (const file of ['scenario.cjs', 'consumer.mjs', 'consumer.cjs']) {
    copyFileSync(join(FIXTURES, file), join(project, file));
  }
}, 120_000);

afterAll(() => {
  if (workDir !== undefined) rmSync(workDir, { recursive: true, force: true });
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
