/**
 * The README's Quick start works when pasted into a fresh project: each framework's snippet is read from README.md
 * by its heading (so this test follows the README as it changes), written as a file into a project that has only
 * the packed tarball and the packages the section imports or tells to `npm install`, run as a user would run it,
 * and sent the same keyed POST twice. A snippet that does not start, does not listen on `PORT`, or does not replay
 * is a README bug.
 *
 * Every `###` section under `## Quick start` is covered, including ones added later; its first `ts` block is the
 * snippet (later blocks, such as Express's `idempotencyOf` example, are fragments of the first). It runs with tsx,
 * except the fetch handler, which exports `{ fetch }` instead of listening: that form is served as written by Bun
 * (one of the runtimes the section names, and which reads `PORT` for it). The backend snippets (RedisBackend's, and
 * the first of PostgresBackend, MysqlBackend and SqliteBackend) are fragments (`app.use(...)`) and run inside
 * {@link wrapExpressFragment}, each SQL one on a schema, database or file of its own, where its records are then
 * counted. Every snippet must also exit on SIGTERM. All of them are also type-checked, as TypeScript
 * users paste them: with the strict settings `tsc --init` writes, the `@types/` packages of what they import and
 * `@types/node`; so is the adapter of "Writing an adapter".
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { Redis } from 'ioredis';
import mysql from 'mysql2/promise';
import pg from 'pg';
import { afterAll, beforeAll, describe, it } from 'vitest';
import { REDIS_URL, requireRedis } from '../support/redis.js';
import { freePort } from '../support/redis-server.js';
import {
  accepts,
  expectReplay,
  quote,
  serve,
  stopGroup,
  stopsOnSigterm,
  waitFor,
} from '../support/served-process.js';
import {
  MYSQL_URL,
  POSTGRES_URL,
  requireMysql,
  requirePostgres,
  requireSqlite,
  uniqueTable,
} from '../support/sql.js';
import { REPO_ROOT } from './fixtures/build.js';
import { type ConsumerProject, createConsumerProject } from './fixtures/consumer-project.js';

const README = readFileSync(join(REPO_ROOT, 'README.md'), 'utf8');

interface Section {
  heading: string;
  /** The section's text, headings excluded. */
  text: string;
  /** The contents of its fenced `ts`, `typescript`, `js` and `javascript` blocks, in order. */
  code: string[];
}

/** The `###` sections under the `## ${chapter}` heading, skipping `#` lines inside fenced blocks. */
function sectionsOf(markdown: string, chapter: string): Section[] {
  const sections: Section[] = [];
  let inChapter = false;
  let fence: { lang: string; lines: string[] } | undefined;
  let current: Section | undefined;
  for (const line of markdown.split('\n')) {
    const fenceMatch = /^```(\w*)\s*$/.exec(line);
    if (fenceMatch !== null) {
      if (fence === undefined) fence = { lang: fenceMatch[1]!, lines: [] };
      else {
        if (current !== undefined && /^(ts|typescript|js|javascript)$/.test(fence.lang))
          current.code.push(`${fence.lines.join('\n')}\n`);
        fence = undefined;
      }
      if (current !== undefined) current.text += `${line}\n`;
      continue;
    }
    if (fence !== undefined) {
      fence.lines.push(line);
      if (current !== undefined) current.text += `${line}\n`;
      continue;
    }
    if (line.startsWith('## ')) {
      inChapter = line.slice(3).trim() === chapter;
      current = undefined;
      continue;
    }
    if (!inChapter) continue;
    if (line.startsWith('### ')) {
      current = { heading: line.slice(4).trim(), text: '', code: [] };
      sections.push(current);
    } else if (current !== undefined) current.text += `${line}\n`;
  }
  return sections;
}

/** The npm packages a snippet imports and its section tells to install, except this package itself. */
function packagesFor(section: Section, snippet: string): string[] {
  const names = new Set<string>();
  for (const [, specifier] of snippet.matchAll(/\bfrom\s+'([^']+)'/g)) {
    if (specifier!.startsWith('.') || specifier!.startsWith('node:')) continue;
    const parts = specifier!.split('/');
    names.add(specifier!.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!);
  }
  for (const [, args] of section.text.matchAll(/`npm install ([^`]+)`/g)) {
    for (const name of args!.split(/\s+/)) if (name !== '' && !name.startsWith('-')) names.add(name);
  }
  names.delete('idempotency-header');
  return [...names].sort();
}

/**
 * Completes a fragment that mounts the middleware on an Express `app` (the RedisBackend snippets): the Express
 * Quick start around it, with a route and a listener on `PORT`. ES module imports are hoisted, so the fragment's
 * own imports may stay where they are.
 */
function wrapExpressFragment(fragment: string): string {
  return [
    "import express from 'express';",
    "import { idempotencyHeader } from 'idempotency-header/express';",
    'const app = express();',
    'app.use(express.json());',
    '// ---- README snippet ----',
    fragment,
    '// ---- end of README snippet ----',
    "app.post('/orders', (req, res) => {",
    '  res.status(201).json({ id: crypto.randomUUID(), item: req.body.item });',
    '});',
    'app.listen(Number(process.env.PORT));',
    '',
  ].join('\n');
}

const slug = (heading: string) => heading.toLowerCase().replace(/[^a-z0-9]+/g, '-');
const TSX = join(REPO_ROOT, 'node_modules', '.bin', 'tsx');
const BUN = join(REPO_ROOT, 'node_modules', '.bin', 'bun');
const TSC = join(REPO_ROOT, 'node_modules', '.bin', 'tsc');
const exec = promisify(execFile);

let project: ConsumerProject | undefined;

beforeAll(async () => {
  // "type": "module", as for any project using top-level await (the Fastify snippet does): `npm init` gives
  // CommonJS, where tsx cannot run it.
  project = await createConsumerProject({ name: 'readme', packageJson: { type: 'module' } });
}, 120_000);

afterAll(() => {
  project?.remove();
});

/** Writes `source` into the project, runs it with `PORT` set, and checks the keyed POST replays. */
async function runSnippet(
  file: string,
  source: string,
  packages: string[],
  runtime: 'tsx' | 'bun',
  env: NodeJS.ProcessEnv = {},
) {
  const { dir, link } = project!;
  link(packages);
  writeFileSync(join(dir, file), source);
  const port = await freePort();
  const served = serve(runtime === 'bun' ? BUN : TSX, [file], {
    cwd: dir,
    env: { ...process.env, PORT: String(port), REDIS_URL, ...env },
  });
  try {
    await waitFor(served, `a listener on port ${port}`, async () =>
      (await accepts(port)) ? true : undefined,
    );
    const keys = await expectReplay(`http://127.0.0.1:${port}/orders`);
    // As `docker stop` or a supervisor stops it: a snippet that handles SIGTERM must still exit.
    await stopsOnSigterm(served, 5_000);
    return keys;
  } catch (error) {
    (error as Error).message += `\n${file}:\n${quote(source)}\noutput:\n${quote(served.output())}`;
    throw error;
  } finally {
    stopGroup(served, 'SIGTERM');
    const timer = setTimeout(() => stopGroup(served, 'SIGKILL'), 5_000);
    await served.exited;
    clearTimeout(timer);
  }
}

/** A `##` chapter without `###` sections, as one section (its heading, text and code blocks). */
function chapterOf(markdown: string, chapter: string): Section {
  const start = markdown.indexOf(`\n## ${chapter}\n`);
  if (start === -1) throw new Error(`README has no chapter "${chapter}"`);
  const end = markdown.indexOf('\n## ', start + 1);
  const text = markdown.slice(start, end === -1 ? undefined : end);
  const code = [...text.matchAll(/```ts\n([\s\S]*?)```/g)].map((match) => match[1]!);
  return { heading: chapter, text, code };
}

const quickStart = sectionsOf(README, 'Quick start');
const writingAnAdapter = chapterOf(README, 'Writing an adapter');
const backendSections = sectionsOf(README, 'Backends');
const redisSnippets = backendSections.find((section) => section.heading === 'RedisBackend');
/** The SQL backends' first snippets, each mounting its backend on an Express `app` with the default table. */
const sqlSnippets = ['PostgresBackend', 'MysqlBackend', 'SqliteBackend'].map((heading) => {
  const section = backendSections.find((candidate) => candidate.heading === heading);
  return { heading, section, code: section?.code[0] };
});

/** The `@types/` package for `name`, when the repository has one: what a TypeScript user installs beside it. */
function typesFor(name: string): string[] {
  const types = `@types/${name.startsWith('@') ? name.slice(1).replace('/', '__') : name}`;
  return existsSync(join(REPO_ROOT, 'node_modules', types)) ? [types] : [];
}

describe('README snippets in a fresh TypeScript project', () => {
  it('type-check as written, with the settings `tsc --init` writes', async ({ expect }) => {
    const dir = join(project!.dir, 'typecheck');
    mkdirSync(dir);
    const files: [string, Section, string][] = [
      ...quickStart.map((section): [string, Section, string] => [
        slug(section.heading),
        section,
        section.code[0]!,
      ]),
      ...(redisSnippets?.code ?? []).map((code, index): [string, Section, string] => [
        `redis-${index + 1}`,
        redisSnippets!,
        wrapExpressFragment(code),
      ]),
      ...sqlSnippets.map(({ heading, section, code }): [string, Section, string] => [
        slug(heading),
        section!,
        wrapExpressFragment(code!),
      ]),
      [slug(writingAnAdapter.heading), writingAnAdapter, writingAnAdapter.code[0]!],
    ];
    for (const [name, section, source] of files) {
      const packages = packagesFor(section, source);
      project!.link([...packages, ...packages.flatMap(typesFor), '@types/node']);
      writeFileSync(join(dir, `${name}.ts`), source);
    }
    await exec(TSC, ['--init'], { cwd: dir });
    // `tsc --init` leaves `types` empty, with a comment asking to add "node" in a Node.js project.
    const result = await exec(TSC, ['-p', '.', '--noEmit', '--types', 'node'], {
      cwd: dir,
      timeout: 60_000,
    }).catch((error: { stdout: string }) => error);
    expect(result.stdout).toBe('');
  }, 60_000);
});

describe.concurrent('README Quick start, pasted into a fresh project', () => {
  it('has a section per adapter, each with a snippet', ({ expect }) => {
    const headings = quickStart.map((section) => section.heading);
    for (const framework of ['Express', 'node:http', 'Fastify', 'Hono', 'Koa', 'fetch'])
      expect(
        headings.some((heading) => heading.startsWith(framework)),
        framework,
      ).toBe(true);
    for (const section of quickStart) expect(section.code.length, section.heading).toBeGreaterThan(0);
  });

  it.each(quickStart.map((section) => [section.heading, section] as const))(
    '%s: the snippet listens on PORT and replays a keyed POST',
    async (heading, section) => {
      const snippet = section.code[0]!;
      const runtime = heading.startsWith('fetch') ? 'bun' : 'tsx';
      await runSnippet(`${slug(heading)}.ts`, snippet, packagesFor(section, snippet), runtime);
    },
    45_000,
  );
});

const redisUp = await requireRedis('README RedisBackend snippets');

describe.runIf(redisUp).concurrent('README RedisBackend snippets, inside the Express Quick start', () => {
  const client = redisUp ? new Redis(REDIS_URL, { lazyConnect: true }) : undefined;
  const used: string[] = [];

  afterAll(async () => {
    // The snippets use the default prefix; the keys are random UUIDs, so these are this run's keys only.
    if (client === undefined) return;
    if (used.length > 0) await client.del(...used.map((key) => `idempotency:-${key}`));
    client.disconnect();
  });

  it('has the ioredis and node-redis snippets', ({ expect }) => {
    expect(redisSnippets?.code.length).toBeGreaterThanOrEqual(2);
  });

  it.each((redisSnippets?.code ?? []).map((code, index) => [index + 1, code] as const))(
    'snippet %i connects, stores in Redis and replays a keyed POST',
    async (index, fragment) => {
      const source = wrapExpressFragment(fragment);
      const packages = packagesFor(redisSnippets!, source);
      const keys = await runSnippet(`redis-${index}-${randomUUID().slice(0, 8)}.ts`, source, packages, 'tsx');
      used.push(...keys);
      const stored = await client!.get(`idempotency:-${keys[0]}`);
      if (stored === null || !stored.startsWith('D')) throw new Error(`not stored in Redis: ${stored}`);
    },
    45_000,
  );
});

const postgresUp = await requirePostgres('README PostgresBackend snippet');
const mysqlUp = await requireMysql('README MysqlBackend snippet');
const sqliteUp = await requireSqlite('README SqliteBackend snippet');

/**
 * How each SQL snippet runs against a place of its own, found through the environment variable it reads: a schema
 * (PostgreSQL, through the connection's `search_path`) or database (MySQL) created for the run, or a file in the
 * project. Each counts the records stored there, and removes only what it created.
 */
const sqlTargets: Record<
  string,
  {
    up: boolean;
    prepare(): Promise<{ env: NodeJS.ProcessEnv; stored(): Promise<number>; remove(): Promise<void> }>;
  }
> = {
  PostgresBackend: {
    up: postgresUp,
    async prepare() {
      const schema = uniqueTable('readme');
      const admin = new pg.Pool({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 2000 });
      await admin.query(`CREATE SCHEMA ${schema}`);
      const url = new URL(POSTGRES_URL);
      url.searchParams.set('options', `-c search_path=${schema}`);
      return {
        env: { DATABASE_URL: url.href },
        stored: async () =>
          Number(
            (await admin.query(`SELECT count(*) AS n FROM ${schema}.idempotency_keys WHERE token IS NULL`))
              .rows[0].n,
          ),
        remove: async () => {
          await admin.query(`DROP SCHEMA ${schema} CASCADE`);
          await admin.end();
        },
      };
    },
  },
  MysqlBackend: {
    up: mysqlUp,
    async prepare() {
      const database = uniqueTable('readme');
      const admin = mysql.createPool({ uri: MYSQL_URL, connectTimeout: 2000 });
      await admin.query(`CREATE DATABASE ${database}`);
      const url = new URL(MYSQL_URL);
      url.pathname = `/${database}`;
      return {
        env: { MYSQL_URL: url.href },
        stored: async () => {
          const [rows] = await admin.query(
            `SELECT count(*) AS n FROM ${database}.idempotency_keys WHERE token IS NULL`,
          );
          return Number((rows as { n: number }[])[0]!.n);
        },
        remove: async () => {
          await admin.query(`DROP DATABASE ${database}`);
          await admin.end();
        },
      };
    },
  },
  SqliteBackend: {
    up: sqliteUp,
    async prepare() {
      const file = join(project!.dir, `${uniqueTable('readme')}.db`);
      return {
        env: { SQLITE_PATH: file },
        stored: async () => {
          const db = new Database(file, { readonly: true });
          try {
            return Number(
              (
                db.prepare('SELECT count(*) AS n FROM idempotency_keys WHERE token IS NULL').get() as {
                  n: number;
                }
              ).n,
            );
          } finally {
            db.close();
          }
        },
        remove: async () => {},
      };
    },
  },
};

describe.concurrent('README SQL backend snippets, inside the Express Quick start', () => {
  for (const { heading, section, code } of sqlSnippets) {
    it(`${heading}: the snippet creates its table, stores in it and replays a keyed POST`, async ({
      expect,
      skip,
    }) => {
      expect(code, `a ts snippet under ### ${heading}`).toBeDefined();
      const target = sqlTargets[heading]!;
      if (!target.up) return skip();
      const source = wrapExpressFragment(code!);
      const place = await target.prepare();
      try {
        await runSnippet(`${slug(heading)}.ts`, source, packagesFor(section!, source), 'tsx', place.env);
        // The two keys the POSTs used, each stored as a completed record in the snippet's own table.
        expect(await place.stored()).toBe(2);
      } finally {
        await place.remove();
      }
    }, 45_000);
  }
});
