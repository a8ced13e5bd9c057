import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { entries } from '../../tsdown.config.js';
import { ensureBuilt, REPO_ROOT } from './fixtures/build.js';

interface ConditionalTarget {
  types: string;
  default: string;
}

interface PackageJson {
  name: string;
  type: string;
  main: string;
  module: string;
  types: string;
  files: string[];
  sideEffects: boolean;
  exports: Record<string, { import: ConditionalTarget; require: ConditionalTarget } | string>;
}

const pkg = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as PackageJson;
const entryNames = Object.keys(entries) as (keyof typeof entries)[];

/** The subpath an entry of `tsdown.config.ts` is published under. */
const subpathOf = (entry: string) => (entry === 'index' ? '.' : `./${entry}`);

/** What SPEC §1 promises each subpath exports, at the least. */
const PROMISED: Record<string, string[]> = {
  '.': ['MemoryBackend', 'IdempotencyEngine', 'IdempotencyError'],
  './express': ['idempotencyHeader'],
  './node': ['withIdempotency'],
  './fastify': ['idempotencyHeader'],
  './hono': ['idempotencyHeader'],
  './koa': ['idempotencyHeader'],
  './fetch': ['withIdempotency', 'idempotencyOf'],
  './nestjs': ['IdempotencyModule', 'IdempotencyInterceptor', 'Idempotent', 'idempotencyOf'],
  './redis': ['RedisBackend'],
  './postgres': ['PostgresBackend', 'postgresSchema'],
  './mysql': ['MysqlBackend', 'mysqlSchema'],
  './sqlite': ['SqliteBackend', 'sqliteSchema'],
  './opentelemetry': ['openTelemetry'],
  './client': ['idempotentFetch', 'createIdempotentFetch'],
  './testkit': ['describeBackendContract'],
};

const requireFromRepo = createRequire(join(REPO_ROOT, 'package.json'));

function conditions(subpath: string): { import: ConditionalTarget; require: ConditionalTarget } {
  const target = pkg.exports[subpath];
  expect(typeof target, `exports["${subpath}"]`).toBe('object');
  return target as { import: ConditionalTarget; require: ConditionalTarget };
}

async function loadEsm(subpath: string): Promise<Record<string, unknown>> {
  return (await import(pathToFileURL(join(REPO_ROOT, conditions(subpath).import.default)).href)) as Record<
    string,
    unknown
  >;
}

function loadCjs(subpath: string): Record<string, unknown> {
  return requireFromRepo(join(REPO_ROOT, conditions(subpath).require.default)) as Record<string, unknown>;
}

beforeAll(ensureBuilt, 180_000);

describe('package.json exports', () => {
  it('has exactly one subpath per build entry, plus ./package.json', () => {
    const subpaths = Object.keys(pkg.exports).filter((subpath) => subpath !== './package.json');
    expect(subpaths.sort()).toEqual(entryNames.map(subpathOf).sort());
    expect(pkg.exports['./package.json']).toBe('./package.json');
  });

  it('builds an entry for every public subpath SPEC §1 names that exists so far', () => {
    for (const subpath of Object.keys(PROMISED)) expect(Object.keys(pkg.exports)).toContain(subpath);
  });

  it('builds every entry from a source file that exists', () => {
    for (const name of entryNames)
      expect(existsSync(join(REPO_ROOT, entries[name])), entries[name]).toBe(true);
  });

  describe.each(entryNames.map((name) => [subpathOf(name), name] as const))('%s', (subpath, name) => {
    it('has import and require conditions, each with types first and a default', () => {
      const target = conditions(subpath);
      expect(Object.keys(target)).toEqual(['import', 'require']);
      expect(Object.keys(target.import)).toEqual(['types', 'default']);
      expect(Object.keys(target.require)).toEqual(['types', 'default']);
    });

    it("points to the entry's own ESM, CJS and declaration files in dist/", () => {
      expect(conditions(subpath)).toEqual({
        import: { types: `./dist/${name}.d.mts`, default: `./dist/${name}.mjs` },
        require: { types: `./dist/${name}.d.cts`, default: `./dist/${name}.cjs` },
      });
    });

    it.each([
      ['import', 'types'],
      ['import', 'default'],
      ['require', 'types'],
      ['require', 'default'],
    ] as const)('has the %s.%s file in the build', (condition, kind) => {
      const file = conditions(subpath)[condition][kind];
      expect(existsSync(join(REPO_ROOT, file)), file).toBe(true);
    });
  });

  it('points the legacy main, module and types fields to built files of the root entry', () => {
    expect(pkg.main).toBe(conditions('.').require.default);
    expect(pkg.module).toBe(conditions('.').import.default);
    expect(pkg.types).toBe(conditions('.').require.types);
    for (const file of [pkg.main, pkg.module, pkg.types])
      expect(existsSync(join(REPO_ROOT, file)), file).toBe(true);
  });

  it('publishes dist/ and is an ES module package without side effects', () => {
    expect(pkg.name).toBe('idempotency-header');
    expect(pkg.type).toBe('module');
    expect(pkg.files).toEqual(['dist']);
    expect(pkg.sideEffects).toBe(false);
  });
});

describe('built entries', () => {
  describe.each(Object.entries(PROMISED))('%s', (subpath, names) => {
    it('loads as ESM and exports what SPEC §1 names', async () => {
      const module = await loadEsm(subpath);
      for (const name of names) expect(typeof module[name], `${subpath} ${name}`).toBe('function');
    });

    it('loads as CommonJS and exports what SPEC §1 names', () => {
      const module = loadCjs(subpath);
      for (const name of names) expect(typeof module[name], `${subpath} ${name}`).toBe('function');
    });

    it('exports the same names from both builds', async () => {
      const esm = Object.keys(await loadEsm(subpath)).filter(
        (name) => name !== 'default' && name !== 'module.exports',
      );
      expect(Object.keys(loadCjs(subpath)).sort()).toEqual(esm.sort());
    });
  });

  it('loads every entry in both formats', async () => {
    for (const name of entryNames) {
      await expect(loadEsm(subpathOf(name))).resolves.toBeTypeOf('object');
      expect(loadCjs(subpathOf(name))).toBeTypeOf('object');
    }
  });

  it.each([
    ['ESM', (subpath: string) => loadEsm(subpath)],
    ['CommonJS', async (subpath: string) => loadCjs(subpath)],
  ])('shares one IdempotencyError class between subpaths in %s', async (_, load) => {
    const core = await load('.');
    const express = await load('./express');
    const node = await load('./node');
    const IdempotencyError = core.IdempotencyError as new (...args: never[]) => Error;
    for (const factory of [
      () => (express.idempotencyHeader as (options: unknown) => unknown)({}),
      () => (node.withIdempotency as (listener: unknown, options: unknown) => unknown)(() => undefined, {}),
    ]) {
      let thrown: unknown;
      try {
        factory();
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(IdempotencyError);
      expect((thrown as { code?: string }).code).toBe('ERR_IDEMPOTENCY_OPTION');
    }
  });

  it('runs a request through the built engine and memory backend in both formats', async () => {
    for (const core of [await loadEsm('.'), loadCjs('.')]) {
      const Memory = core.MemoryBackend as new () => { close(): void };
      const Engine = core.IdempotencyEngine as new (
        options: unknown,
      ) => {
        begin(...args: unknown[]): Promise<{ kind: string }>;
        finish(ticket: unknown, response: unknown): unknown;
      };
      const backend = new Memory();
      const engine = new Engine({ backend });
      // The core hashes with Web Crypto, asynchronously, so that it runs on any runtime.
      const ticket = await engine.begin({}, 'POST', '/orders', 'k', undefined, 0);
      expect(ticket.kind).toBe('proceed');
      await engine.finish(ticket, {
        status: 201,
        headers: [['content-type', 'application/json']],
        body: new Uint8Array([123, 125]),
      });
      expect(await engine.begin({}, 'POST', '/orders', 'k', undefined, 0)).toMatchObject({
        kind: 'reply',
        replayed: true,
      });
      backend.close();
    }
  });
});
