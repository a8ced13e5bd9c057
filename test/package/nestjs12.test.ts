/**
 * The packed tarball with NestJS 12, on Express and on Fastify: the repository's own dependencies are NestJS 11,
 * on which every NestJS test runs, so NestJS 12 lives in a project of its own (`test/nestjs12`, installed from its
 * lockfile on first use) and is linked into a fresh consumer project with the tarball, as a user on NestJS 12 has
 * them. The README's NestJS set-up then serves the core scenarios: first run, replay, 422, 409 in flight, a failing
 * handler, 20 parallel requests, a route opted out.
 */
import { execFile } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from './fixtures/build.js';
import { type ConsumerProject, createConsumerProject, NPM_ENV } from './fixtures/consumer-project.js';

const exec = promisify(execFile);
const NEST12 = join(REPO_ROOT, 'test', 'nestjs12');
const FIXTURE = join(REPO_ROOT, 'test', 'package', 'fixtures', 'nest-scenario.mjs');

/** Installs NestJS 12 from test/nestjs12's lockfile, once; `false` (with a warning) when it cannot be had. */
async function installNest12(): Promise<boolean> {
  if (existsSync(join(NEST12, 'node_modules', '@nestjs', 'core'))) return true;
  try {
    await exec('npm', ['ci', '--no-audit', '--no-fund', '--ignore-scripts'], {
      cwd: NEST12,
      env: NPM_ENV,
      timeout: 180_000,
    });
    return true;
  } catch (error) {
    if (process.env.CI === 'true') throw error;
    console.warn(`NestJS 12 could not be installed in test/nestjs12, skipping its tests: ${String(error)}`);
    return false;
  }
}

const installed = await installNest12();

interface Reply {
  status: number;
  replayed: string | null;
  text: string;
}

interface ScenarioResult {
  nest: string;
  first: Reply;
  replay: Reply;
  mismatch: Reply;
  runsAfterReplay: number;
  inFlight: Reply;
  slow: Reply;
  failed: Reply;
  afterFailure: Reply;
  runsForFailure: number;
  /** Each response's status, with ` replayed` for a replay. */
  parallel: string[];
  runsForParallel: number;
  optedOut: Reply;
  runsOptedOut: number;
}

describe.runIf(installed)('the installed tarball on NestJS 12', () => {
  let consumer: ConsumerProject;

  beforeAll(async () => {
    consumer = await createConsumerProject({ name: 'nestjs12', packageJson: { type: 'module' } });
    const modules = join(consumer.dir, 'node_modules');
    mkdirSync(join(modules, '@nestjs'), { recursive: true });
    // Linked from the NestJS 12 project: each package's own dependencies resolve there, beside it.
    for (const name of ['core', 'common', 'platform-express', 'platform-fastify']) {
      symlinkSync(join(NEST12, 'node_modules', '@nestjs', name), join(modules, '@nestjs', name), 'dir');
    }
    for (const name of ['reflect-metadata', 'rxjs']) {
      symlinkSync(join(NEST12, 'node_modules', name), join(modules, name), 'dir');
    }
    copyFileSync(FIXTURE, join(consumer.dir, 'nest-scenario.mjs'));
  }, 120_000);

  afterAll(() => consumer?.remove());

  for (const platform of ['express', 'fastify']) {
    it(`serves the README's set-up on platform-${platform}: replay, 422, 409, a failure, a flood`, async () => {
      const { stdout } = await exec(process.execPath, ['nest-scenario.mjs', platform], {
        cwd: consumer.dir,
        timeout: 60_000,
      });
      // The last line: Nest may log on stdout before it.
      const result = JSON.parse(stdout.trim().split('\n').at(-1)!) as ScenarioResult;
      expect(result.nest).toMatch(/^12\./);

      expect(result.first).toMatchObject({ status: 201, replayed: null });
      expect(JSON.parse(result.first.text)).toEqual({ run: 1, item: 'book' });
      expect(result.replay).toEqual({ status: 201, replayed: 'true', text: result.first.text });
      expect(result.mismatch.status).toBe(422);
      expect(result.runsAfterReplay).toBe(1);

      expect(result.inFlight.status).toBe(409);
      expect(result.slow).toMatchObject({ status: 201, replayed: null });

      // A handler that throws leaves the key free: the retry runs again.
      expect(result.failed.status).toBe(500);
      expect(result.afterFailure.status).toBe(500);
      expect(result.runsForFailure).toBe(2);

      // One first run; the others came while it ran (409) or after it (its replay).
      expect(result.runsForParallel).toBe(1);
      expect(result.parallel.filter((outcome) => outcome === '201')).toHaveLength(1);
      for (const outcome of result.parallel) expect(['201', '409', '201 replayed']).toContain(outcome);

      // `@Idempotent(false)` under the global interceptor: runs every time.
      expect(result.optedOut.replayed).toBeNull();
      expect(result.runsOptedOut).toBe(2);
    }, 90_000);
  }
});
