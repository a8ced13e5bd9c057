/**
 * Each example starts as its README and header comment say: every `example:*` script in package.json (read from
 * it, so that a new example is covered as soon as its script exists) runs with `npm run`, listens on the port it
 * is given (`PORT=0`: a free one, which each example prints as `Listening on <url>`), runs a keyed POST once and
 * replays it, and stops on SIGTERM. The examples run from the sources (tsx resolves `idempotency-header` through
 * tsconfig's paths), on their default in-memory backend: the environment variables that would point them at a
 * shared server are removed. They run concurrently, as each takes a few seconds to start, mostly compiling.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'vitest';
import { REPO_ROOT } from './package/fixtures/build.js';
import { NPM_ENV } from './package/fixtures/consumer-project.js';
import { expectReplay, serve, stopGroup, stopsOnSigterm, waitFor } from './support/served-process.js';

const scripts = Object.keys(
  (JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> })
    .scripts,
).filter((name) => name.startsWith('example:'));

const env: NodeJS.ProcessEnv = { ...NPM_ENV, PORT: '0', HOST: '127.0.0.1' };
for (const name of ['REDIS_URL', 'DATABASE_URL', 'MYSQL_URL', 'SQLITE_PATH', 'IDEMPOTENCY_BACKEND'])
  delete env[name];

describe.concurrent('examples', () => {
  it('has an example for each framework adapter', ({ expect }) => {
    for (const framework of ['express', 'fastify', 'hono', 'koa', 'fetch'])
      expect(scripts).toContain(`example:${framework}`);
  });

  it.each(scripts)(
    'npm run %s listens, runs a keyed POST once, replays it, and stops on SIGTERM',
    async (script) => {
      const served = serve('npm', ['run', '--silent', script], { cwd: REPO_ROOT, env });
      try {
        const listening = await waitFor(
          served,
          'a "Listening on <url>" line',
          () => /Listening on (https?:\/\/\S+)/.exec(served.output())?.[1],
          30_000,
        );
        await expectReplay(new URL('/orders', listening).href);
        await stopsOnSigterm(served);
      } finally {
        stopGroup(served, 'SIGKILL');
      }
    },
    50_000,
  );
});
