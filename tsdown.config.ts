import { defineConfig } from 'tsdown';

/** Every public subpath of the package; `test/package/exports.test.ts` checks package.json against it. */
export const entries = {
  index: 'src/index.ts',
  express: 'src/adapters/express.ts',
  node: 'src/adapters/node.ts',
  fastify: 'src/adapters/fastify.ts',
  hono: 'src/adapters/hono.ts',
  koa: 'src/adapters/koa.ts',
  fetch: 'src/adapters/fetch.ts',
  nestjs: 'src/adapters/nestjs.ts',
  redis: 'src/backends/redis.ts',
  postgres: 'src/backends/postgres.ts',
  mysql: 'src/backends/mysql.ts',
  sqlite: 'src/backends/sqlite.ts',
  opentelemetry: 'src/opentelemetry.ts',
  client: 'src/client.ts',
  testkit: 'src/testkit/index.ts',
};

export default defineConfig([
  {
    entry: entries,
    format: ['esm', 'cjs'],
    dts: true,
    platform: 'node',
    target: 'node20',
    clean: true,
    sourcemap: false,
  },
  // The `idempotency-header` executable (package.json `bin`): not a subpath, so not in `entries`. ESM only, as
  // it is run and never imported; dist/ is cleaned once for both builds.
  {
    entry: { cli: 'src/proxy/cli.ts' },
    format: 'esm',
    dts: false,
    platform: 'node',
    target: 'node20',
    clean: false,
    sourcemap: false,
  },
]);
