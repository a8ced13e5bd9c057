/**
 * The testkit runs under `node:test` as well as vitest: `node --test` on a fixture that hands `node:test` to
 * `describeBackendContract`, against MemoryBackend and real Redis, from the sources (through tsx) and from the
 * build (importing the package by its name, as a user's test file does). The TAP report must count every case of
 * the suite, none failing; and on a backend whose complete() is not fenced by its token, the fencing cases fail.
 * The README's node:test snippet runs as written, too.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import { ensureBuilt, REPO_ROOT } from '../package/fixtures/build.js';
import { requireRedis } from '../support/redis.js';
import { collectingRunner } from './support/collect.js';

const run = promisify(execFile);
const FIXTURE = join(REPO_ROOT, 'test', 'testkit', 'fixtures', 'contract.node-test.mjs');
const redisUp = await requireRedis('testkit under node:test on Redis');

/**
 * The names of the suite's tests, as registered (the same for every backend), and those of the optional cases:
 * skipped on a backend without `inspect`/`forget`, or without peers.
 */
const registered = (() => {
  const runner = collectingRunner();
  const names: string[] = [];
  const optional = new Set<string>();
  const groups: string[] = [];
  describeBackendContract('names', () => ({ backend: new MemoryBackend() }), {
    ...runner.functions,
    describe(name, body) {
      groups.push(name);
      runner.functions.describe(name, body);
      groups.pop();
    },
    it(name, body) {
      names.push(name);
      if (/optional|peers/.test(groups.at(-1) ?? '')) optional.add(name);
      runner.functions.it(name, body);
    },
  });
  return { count: runner.count(), names, optional };
})();

interface TapReport {
  summary: Record<string, number>;
  /** Test (not suite) results by name: 'pass', 'fail' or 'skip'. */
  tests: Map<string, 'pass' | 'fail' | 'skip'>;
  output: string;
}

/** Runs the fixture (or `file`) under `node --test` with the TAP reporter; a failing run is reported, not thrown. */
async function nodeTest(from: 'src' | 'dist', backend: string, file = FIXTURE): Promise<TapReport> {
  const args = [...(from === 'src' ? ['--import', 'tsx'] : []), '--test', '--test-reporter=tap', file];
  const env = { ...process.env, TESTKIT_FROM: from, TESTKIT_BACKEND: backend };
  let output: string;
  try {
    const { stdout, stderr } = await run(process.execPath, args, { cwd: REPO_ROOT, env, timeout: 60_000 });
    output = stdout + stderr;
  } catch (error) {
    const failed = error as { stdout?: string; stderr?: string };
    output = `${failed.stdout ?? ''}${failed.stderr ?? ''}`;
  }
  const summary: Record<string, number> = {};
  for (const [, key, value] of output.matchAll(
    /^# (tests|suites|pass|fail|cancelled|skipped|todo) (\d+)$/gm,
  )) {
    summary[key!] = Number(value);
  }
  const tests = new Map<string, 'pass' | 'fail' | 'skip'>();
  for (const [, status, name, skip] of output.matchAll(/^\s*(ok|not ok) \d+ - (.*?)( # SKIP.*)?$/gm)) {
    if (!registered.names.includes(name!)) continue; // a suite's line
    tests.set(name!, status === 'not ok' ? 'fail' : skip ? 'skip' : 'pass');
  }
  return { summary, tests, output };
}

describe('the testkit under node:test', () => {
  it('registers the whole suite: more than 40 cases, every name distinct, a dozen of them optional', () => {
    expect(registered.count).toBeGreaterThan(40);
    expect(new Set(registered.names).size).toBe(registered.count);
    expect(registered.optional.size).toBeGreaterThanOrEqual(12);
  });

  describe.each(['src', 'dist'] as const)('imported from %s', (from) => {
    if (from === 'dist') beforeAll(ensureBuilt, 180_000);

    it('passes every case on MemoryBackend but the peers one (memory backends share nothing)', async () => {
      const { summary, tests, output } = await nodeTest(from, 'memory');
      expect(summary, output).toMatchObject({
        tests: registered.count,
        pass: registered.count - 1,
        fail: 0,
        skipped: 1,
      });
      expect(tests.size).toBe(registered.count);
      expect([...tests].filter(([, status]) => status === 'skip').map(([name]) => name)).toEqual([
        "sees the other instances' locks, records, releases and expiries",
      ]);
    }, 60_000);

    it.runIf(redisUp)(
      'passes on RedisBackend with a peer connection, none failing',
      async () => {
        const { summary, tests, output } = await nodeTest(from, 'redis');
        expect(summary, output).toMatchObject({ tests: registered.count, fail: 0, cancelled: 0 });
        expect(summary.pass! + summary.skipped!).toBe(registered.count);
        // The races and fencing all ran; only an optional case may be skipped.
        for (const [name, status] of tests)
          if (status !== 'pass') expect(registered.optional).toContain(name);
        expect(tests.get("sees the other instances' locks, records, releases and expiries")).toBe('pass');
      },
      60_000,
    );

    it('fails the fencing cases on a backend whose complete() ignores the token', async () => {
      const { summary, tests, output } = await nodeTest(from, 'unfenced');
      expect(summary.fail, output).toBeGreaterThanOrEqual(3);
      for (const name of [
        'lets a new acquire take over a lapsed lease with a new token and fences the old token out',
        'returns false for a wrong token and stores nothing',
        'lets exactly one of two racing completes with different tokens win, and only its holder',
      ]) {
        expect(tests.get(name), name).toBe('fail');
      }
      // Without inspect() and forget(), their cases are skipped, not failed.
      expect(tests.get('finds nothing for a key never used')).toBe('skip');
      expect(tests.get('forgets a completed key, so that the next acquire runs again')).toBe('skip');
    }, 60_000);
  });

  describe('the README snippet', () => {
    beforeAll(ensureBuilt, 180_000);

    it('runs as written under node --test, with MyBackend a MemoryBackend', async () => {
      const readme = readFileSync(join(REPO_ROOT, 'README.md'), 'utf8');
      const section = readme.slice(readme.indexOf('### Testing your own backend'));
      const snippet = /```js\n(\/\/ my-backend\.test\.mjs\n[\s\S]*?)```/.exec(section)?.[1];
      expect(snippet, 'the node:test snippet of "Testing your own backend"').toBeDefined();
      // Inside the repository, so that `idempotency-header/testkit` resolves to this package's build.
      const dir = join(REPO_ROOT, '.tmp', `testkit-readme-${randomUUID()}`);
      mkdirSync(dir, { recursive: true });
      try {
        writeFileSync(
          join(dir, 'my-backend.js'),
          "import { MemoryBackend } from 'idempotency-header';\nexport class MyBackend extends MemoryBackend {}\n" +
            'export async function connect() {}\n',
        );
        // `connect()` is the reader's own: the snippet leaves it undeclared.
        const file = join(dir, 'my-backend.test.mjs');
        writeFileSync(file, `import { connect } from './my-backend.js';\n${snippet}`);
        const { summary, output } = await nodeTest('dist', 'memory', file);
        expect(summary, output).toMatchObject({ tests: registered.count, fail: 0, skipped: 1 });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }, 60_000);
  });

  describe('under bun test (the bun:test module handed over as it is)', () => {
    it('passes every case on MemoryBackend: bodies that take the test context do not read as done callbacks', async () => {
      const dir = join(REPO_ROOT, '.tmp', `testkit-bun-${randomUUID()}`);
      mkdirSync(dir, { recursive: true });
      try {
        const file = join(dir, 'contract.test.ts');
        writeFileSync(
          file,
          [
            "import * as bunTest from 'bun:test';",
            `import { MemoryBackend } from ${JSON.stringify(join(REPO_ROOT, 'src', 'index.ts'))};`,
            `import { describeBackendContract } from ${JSON.stringify(join(REPO_ROOT, 'src', 'testkit', 'index.ts'))};`,
            "describeBackendContract('MemoryBackend', () => ({ backend: new MemoryBackend() }), bunTest);",
            '',
          ].join('\n'),
        );
        const bun = join(REPO_ROOT, 'node_modules', '.bin', 'bun');
        const output = await run(bun, ['test', file], { cwd: dir, timeout: 60_000 }).then(
          ({ stdout, stderr }) => stdout + stderr,
          (error: { stdout?: string; stderr?: string }) => `${error.stdout ?? ''}${error.stderr ?? ''}`,
        );
        // Bun has no test context: the peers case passes instead of being skipped.
        expect(output).toMatch(new RegExp(`^\\s*${registered.count} pass$`, 'm'));
        expect(output).toMatch(/^\s*0 fail$/m);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }, 60_000);
  });
});
