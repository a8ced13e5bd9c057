/**
 * The server side of the benchmark: one variant per process, on 127.0.0.1, with plain Node.js on the built package
 * (dist/, or the snapshot of it at the absolute path BENCH_DIST), as users run it. Every variant serves the same app: a JSON body
 * parser and `POST /orders` answering 201 with a small JSON order.
 *
 * Usage: node bench/server.mjs <variant> [--sleep-ms N] [--prefix P] [--redis-url U] [--control]
 *   variant   a name from VARIANTS below; `bare` and `idempotent` are the names bench/instructions.sh uses
 *             (bare Express, Express with MemoryBackend)
 *   --sleep-ms   the handler waits this long before answering (the conflict mode and the race check)
 *   --prefix     the Redis key prefix or SQL table name of this process (unique per run; the bench cleans up)
 *   --control    also listen on a second port, printed on a second line, answering GET /stats with
 *                `{ runs, requests, backendCalls }`: handler runs, requests received and backend round trips
 *                counted at the driver
 * Prints the port it listens on, then (with --control) the control port.
 */
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'sleep-ms': { type: 'string', default: '0' },
    prefix: { type: 'string', default: `bench-${process.pid}-` },
    'redis-url': { type: 'string', default: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' },
    'postgres-url': {
      type: 'string',
      default: process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test',
    },
    'mysql-url': { type: 'string', default: process.env.MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test' },
    control: { type: 'boolean', default: false },
  },
});
const ALIASES = { bare: 'express', idempotent: 'express-memory' };
const variant = ALIASES[positionals[0] ?? 'bare'] ?? positionals[0];
const sleepMs = Number(values['sleep-ms']);
const prefix = values.prefix;
const dist = process.env.BENCH_DIST
  ? pathToFileURL(`${process.env.BENCH_DIST}/`)
  : new URL('../dist/', import.meta.url);
const ours = (entry) => import(new URL(`${entry}.mjs`, dist).href);

/** What the control port reports. */
const stats = { runs: 0, requests: 0, backendCalls: 0 };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The handler's work, the same in every variant: count the run, wait if asked, build the order. */
async function work(body) {
  const id = ++stats.runs;
  if (sleepMs > 0) await sleep(sleepMs);
  return { id, item: body?.item, quantity: body?.quantity };
}
function workSync(body) {
  const id = ++stats.runs;
  return { id, item: body?.item, quantity: body?.quantity };
}

// ---------------------------------------------------------------------------------------------------------------
// Backends, each with a driver-level count of round trips.

const huge = { maxEntries: 50_000_000, maxBytes: 16 * 1024 ** 3 };

async function memoryBackend() {
  const { MemoryBackend } = await ours('index');
  // BENCH_SWEEP_INTERVAL_MS: bench/instructions.sh stretches the sweep's minute as valgrind stretches time.
  const sweep = Number(process.env.BENCH_SWEEP_INTERVAL_MS);
  return new MemoryBackend(sweep > 0 ? { ...huge, sweepIntervalMs: sweep } : huge);
}

async function redisBackend() {
  const { Redis } = await import('ioredis');
  const { RedisBackend } = await ours('redis');
  // Auto-pipelining, as the README recommends: concurrent requests' commands share socket writes and reads, as
  // node-redis (which the peers use) does by default. BENCH_AUTOPIPELINING=0 measures ioredis without it.
  const redis = new Redis(values['redis-url'], {
    maxRetriesPerRequest: 1,
    enableAutoPipelining: process.env.BENCH_AUTOPIPELINING !== '0',
  });
  redis.on('error', (error) => console.error(error));
  // Every command the backend sends goes through one of these.
  for (const name of ['callBuffer', 'setBuffer', 'evalshaBuffer', 'evalBuffer']) {
    const original = redis[name];
    redis[name] = function countedCommand(...args) {
      stats.backendCalls++;
      return original.apply(this, args);
    };
  }
  await redis.ping();
  return new RedisBackend({ redis, prefix });
}

/** RedisBackend on a node-redis client, the client the Redis peers use. */
async function nodeRedisBackend() {
  const { createClient } = await import('redis');
  const { RedisBackend } = await ours('redis');
  const redis = createClient({ url: values['redis-url'] });
  redis.on('error', (error) => console.error(error));
  await redis.connect();
  // Every command the backend sends goes through sendCommand.
  const sendCommand = redis.sendCommand;
  redis.sendCommand = function countedCommand(...args) {
    stats.backendCalls++;
    return sendCommand.apply(this, args);
  };
  return new RedisBackend({ redis, prefix });
}

async function postgresBackend() {
  const { default: pg } = await import('pg');
  const { PostgresBackend } = await ours('postgres');
  // Named after the table, so that the bench finds this pool's server processes in pg_stat_activity.
  const pool = new pg.Pool({
    connectionString: values['postgres-url'],
    max: 10,
    idleTimeoutMillis: 0,
    application_name: prefix,
  });
  pool.on('error', (error) => console.error(error));
  const query = pool.query;
  pool.query = function countedQuery(...args) {
    stats.backendCalls++;
    return query.apply(this, args);
  };
  return new PostgresBackend({ pool, table: prefix });
}

async function mysqlBackend() {
  const { default: mysql } = await import('mysql2/promise');
  const { MysqlBackend } = await ours('mysql');
  const pool = mysql.createPool({ uri: values['mysql-url'], connectionLimit: 10 });
  const query = pool.query;
  pool.query = function countedQuery(...args) {
    stats.backendCalls++;
    return query.apply(this, args);
  };
  return new MysqlBackend({ pool, table: prefix });
}

async function sqliteBackend() {
  const { default: Database } = await import('better-sqlite3');
  const { SqliteBackend } = await ours('sqlite');
  const db = new Database(join(process.env.BENCH_SQLITE_DIR ?? tmpdir(), `${prefix}.db`));
  // Statements are counted where they run: each prepared statement's run/get/all.
  const counted = {
    prepare(source) {
      const statement = db.prepare(source);
      for (const method of ['run', 'get', 'all']) {
        const original = statement[method];
        statement[method] = (...args) => {
          stats.backendCalls++;
          return original.apply(statement, args);
        };
      }
      return statement;
    },
    exec: (source) => db.exec(source),
    pragma: (source, options) => db.pragma(source, options),
    close: () => db.close(),
  };
  return new SqliteBackend({ database: counted, table: prefix });
}

/**
 * Backends for measuring ours by parts (never for correctness: they take every key): `nostore` keeps nothing, so
 * that what is left is the engine and the adapter; `keysonly` keeps each key in a Map, the least any store in
 * memory does, so that what a Map of every key costs shows apart from how records are kept.
 */
function partBackend(keepKeys) {
  const keys = new Map();
  let token = 0;
  return {
    acquire(key) {
      if (keepKeys) keys.set(key, 0);
      return { state: 'acquired', token: String(++token) };
    },
    complete: () => true,
    release(key) {
      keys.delete(key);
      return true;
    },
    renew: () => true,
  };
}

/** `MemoryBackend` taking and releasing each key's lock, but storing no record: a store that never grows. */
async function lockOnlyBackend() {
  const memory = await memoryBackend();
  return {
    acquire: (key, fingerprint, leaseMs) => memory.acquire(key, fingerprint, leaseMs),
    complete: (key, token) => memory.release(key, token),
    release: (key, token) => memory.release(key, token),
    renew: (key, token, leaseMs) => memory.renew(key, token, leaseMs),
  };
}

const BACKENDS = {
  memory: memoryBackend,
  redis: redisBackend,
  'node-redis': nodeRedisBackend,
  postgres: postgresBackend,
  mysql: mysqlBackend,
  sqlite: sqliteBackend,
};

// ---------------------------------------------------------------------------------------------------------------
// Frameworks: each returns a node:http request listener.

/** A JSON error handler, as an Express app has one; the peers hand their 409 and 422 to `next(error)`. */
function jsonErrors(error, _req, res, _next) {
  const status = error.status ?? (res.statusCode >= 400 ? res.statusCode : 500);
  res.status(status).json({ error: error.message });
}

async function expressApp(middleware) {
  const { default: express } = await import('express4');
  const app = express();
  app.use(express.json());
  if (middleware) app.use(middleware);
  app.post('/orders', (req, res, next) => {
    if (sleepMs === 0) return void res.status(201).json(workSync(req.body));
    work(req.body).then((order) => res.status(201).json(order), next);
  });
  app.use(jsonErrors);
  return app;
}

/**
 * Only the first step ours takes on Express: the request and response given a hidden class shared with every
 * other request's and response's, as `shareHiddenClass` in src/adapters/node-http/dictionary-mode.ts does (a
 * property added and deleted again). It shows how much of ours on Express is that step alone.
 */
const PROBE = Symbol('probe');
function shareHiddenClasses(req, res, next) {
  req[PROBE] = undefined;
  delete req[PROBE];
  res[PROBE] = undefined;
  delete res[PROBE];
  next();
}

async function fastifyApp(backend) {
  const { default: Fastify } = await import('fastify');
  let listener;
  const app = Fastify({
    logger: false,
    serverFactory(handler) {
      listener = handler;
      return createServer(handler);
    },
  });
  if (backend === 'noop') app.addHook('preHandler', (_request, _reply, next) => next());
  else if (backend) {
    const { idempotencyHeader } = await ours('fastify');
    await app.register(idempotencyHeader, { backend });
  }
  app.post('/orders', async (request, reply) => reply.code(201).send(await work(request.body)));
  await app.ready();
  return listener;
}

async function honoApp(backend) {
  const { Hono } = await import('hono');
  const { getRequestListener } = await import('@hono/node-server');
  const app = new Hono();
  if (backend === 'noop') app.use('/orders', (_c, next) => next());
  else if (backend === 'skeleton') app.use('/orders', honoSkeleton);
  else if (backend) {
    const { idempotencyHeader } = await ours('hono');
    app.use('/orders', idempotencyHeader({ backend }));
  }
  app.post('/orders', async (c) => c.json(await work(await c.req.json()), 201));
  return getRequestListener(app.fetch);
}

/**
 * What the Hono middleware does around the handler, without the engine: the body read through Hono's cache, a
 * context variable set, the handler awaited and its response read.
 */
async function honoSkeleton(c, next) {
  await c.req.text();
  c.set('idempotency', undefined);
  await next();
  if (c.res === undefined) throw new Error('no response');
}

async function koaApp(backend) {
  const { default: Koa } = await import('koa');
  const { bodyParser } = await import('@koa/bodyparser');
  const app = new Koa();
  app.use(bodyParser());
  if (backend) {
    const { idempotencyHeader } = await ours('koa');
    app.use(idempotencyHeader({ backend }));
  }
  app.use(async (ctx) => {
    if (ctx.method !== 'POST' || ctx.path !== '/orders') return;
    ctx.status = 201;
    ctx.body = await work(ctx.request.body);
  });
  return app.callback();
}

async function oursOnExpress(backendName) {
  const { idempotencyHeader } = await ours('express');
  return expressApp(idempotencyHeader({ backend: await BACKENDS[backendName]() }));
}

// ---------------------------------------------------------------------------------------------------------------
// Peers, on the same Express app. Each as its documentation shows, with the error handler above.

/** Counts the commands a node-redis client sends: every command of v4 and v6 clients goes through these. */
function countRedisCommands(client) {
  for (const name of ['get', 'set', 'del', 'GET', 'SET', 'DEL']) {
    const original = client[name];
    if (typeof original !== 'function') continue;
    client[name] = function countedCommand(...args) {
      stats.backendCalls++;
      return original.apply(this, args);
    };
  }
}

/**
 * `@node-idempotency/core` on Express. Its own Express package is not on the registry this bench installs from,
 * so this is its middleware's logic: `onRequest` before the route (replay, 409 or 422 thrown as
 * IdempotencyError), `onResponse` from a wrapped `res.send`, not awaited (the response goes out as the record is
 * written, as in its published middleware).
 */
async function nodeIdempotency(storage) {
  const { Idempotency, IdempotencyError } = await import('@node-idempotency/core');
  let adapter;
  if (storage === 'memory') {
    const { MemoryStorageAdapter } = await import('@node-idempotency/storage-adapter-memory');
    adapter = new MemoryStorageAdapter();
  } else {
    const { RedisStorageAdapter } = await import('@node-idempotency/storage-adapter-redis');
    adapter = new RedisStorageAdapter({ url: values['redis-url'] });
    await adapter.connect();
    countRedisCommands(adapter.client);
  }
  const idempotency = new Idempotency(adapter, { cacheKeyPrefix: prefix });
  const codes = { REQUEST_IN_PROGRESS: 409, IDEMPOTENCY_FINGERPRINT_MISSMATCH: 422 };
  return expressApp(async function nodeIdempotencyMiddleware(req, res, next) {
    const request = { headers: req.headers, body: req.body, path: req.url, method: req.method };
    try {
      const cached = await idempotency.onRequest(request);
      if (!cached) {
        const send = res.send.bind(res);
        res.send = (body) => {
          const additional = { statusCode: res.statusCode, 'content-type': res.getHeader('content-type') };
          let payload = body;
          try {
            if (typeof body === 'string') payload = JSON.parse(body);
          } catch {}
          const response = { additional, ...(res.statusCode < 400 ? { body: payload } : { error: payload }) };
          idempotency.onResponse(request, response).catch((error) => console.error(error));
          return send(body);
        };
        return next();
      }
      res.status(cached.additional?.statusCode ?? 200);
      res.set('idempotent-replayed', 'true');
      res.send(cached.body);
    } catch (error) {
      if (!(error instanceof IdempotencyError)) return next(error);
      res.status(codes[error.code] ?? 500);
      next(error);
    }
  });
}

/** `express-idempotency`: mounted on the route; the handler asks `isHit(req)` and returns on a replay. */
async function expressIdempotency(storage) {
  const { idempotency, getSharedIdempotencyService } = await import('express-idempotency');
  let dataAdapter;
  if (storage === 'redis') {
    const { default: adapterModule } = await import('express-idempotency-redis-adapter');
    const RedisAdapter = adapterModule.default ?? adapterModule;
    // Its own @redis/client (v1), so that the client is the one it was written for.
    const { createClient } = await import(
      new URL(
        'node_modules/express-idempotency-redis-adapter/node_modules/@redis/client/dist/index.js',
        import.meta.url,
      ).href
    );
    const client = createClient({ url: values['redis-url'] });
    client.on('error', (error) => console.error(error));
    countRedisCommands(client);
    dataAdapter = new RedisAdapter({ connectionInstance: client });
    await dataAdapter.connect();
  }
  const { default: express } = await import('express4');
  const app = express();
  app.use(express.json());
  const middleware = idempotency(dataAdapter ? { dataAdapter } : {});
  app.post('/orders', middleware, (req, res, next) => {
    if (getSharedIdempotencyService().isHit(req)) return;
    work(req.body).then((order) => res.status(201).json(order), next);
  });
  app.use(jsonErrors);
  return app;
}

/**
 * Powertools for AWS Lambda's idempotency with its Redis (cache) persistence layer, behind an Express route: the
 * order function is made idempotent on the key header. A Lambda context is registered (30 s remaining) so that in-progress records carry their expiry as on Lambda.
 */
async function powertools() {
  const { IdempotencyConfig, makeIdempotent } = await import('@aws-lambda-powertools/idempotency');
  const { CachePersistenceLayer } = await import('@aws-lambda-powertools/idempotency/cache');
  const { createClient } = await import('@redis/client');
  const client = await createClient({ url: values['redis-url'] }).connect();
  countRedisCommands(client);
  // No payloadValidationJmesPath: its cache layer stores the result without the payload hash, so with
  // validation every replay of a completed request is refused as a mismatch.
  const config = new IdempotencyConfig({ eventKeyJmesPath: 'key' });
  config.registerLambdaContext({ getRemainingTimeInMillis: () => 30_000 });
  const createOrder = makeIdempotent(async (event) => work(event.body), {
    persistenceStore: new CachePersistenceLayer({ client }),
    config,
    keyPrefix: prefix,
  });
  const { default: express } = await import('express4');
  const app = express();
  app.use(express.json());
  app.post('/orders', async (req, res, next) => {
    try {
      res.status(201).json(await createOrder({ key: req.get('idempotency-key'), body: req.body }));
    } catch (error) {
      if (error.name === 'IdempotencyAlreadyInProgressError') res.status(409);
      else if (error.name === 'IdempotencyValidationError') res.status(422);
      next(error);
    }
  });
  app.use(jsonErrors);
  return app;
}

const VARIANTS = {
  express: () => expressApp(),
  fastify: () => fastifyApp(),
  hono: () => honoApp(),
  koa: () => koaApp(),
  'express-memory': () => oursOnExpress('memory'),
  'express-redis': () => oursOnExpress('redis'),
  'express-node-redis': () => oursOnExpress('node-redis'),
  'express-postgres': () => oursOnExpress('postgres'),
  'express-mysql': () => oursOnExpress('mysql'),
  'express-sqlite': () => oursOnExpress('sqlite'),
  'fastify-memory': async () => fastifyApp(await memoryBackend()),
  'fastify-redis': async () => fastifyApp(await redisBackend()),
  'fastify-node-redis': async () => fastifyApp(await nodeRedisBackend()),
  'hono-memory': async () => honoApp(await memoryBackend()),
  'koa-memory': async () => koaApp(await memoryBackend()),
  'node-idempotency-memory': () => nodeIdempotency('memory'),
  'node-idempotency-redis': () => nodeIdempotency('redis'),
  'express-idempotency-memory': () => expressIdempotency('memory'),
  'express-idempotency-redis': () => expressIdempotency('redis'),
  'powertools-redis': () => powertools(),
  'express-shared': () => expressApp(shareHiddenClasses),
  'fastify-noop': () => fastifyApp('noop'),
  'hono-noop': () => honoApp('noop'),
  'express-nostore': async () => {
    const { idempotencyHeader } = await ours('express');
    return expressApp(idempotencyHeader({ backend: partBackend(false) }));
  },
  'fastify-nostore': () => fastifyApp(partBackend(false)),
  'hono-nostore': () => honoApp(partBackend(false)),
  'fastify-keysonly': () => fastifyApp(partBackend(true)),
  'hono-keysonly': () => honoApp(partBackend(true)),
  'hono-skeleton': () => honoApp('skeleton'),
  'hono-lockonly': async () => honoApp(await lockOnlyBackend()),
};

const build = VARIANTS[variant];
if (!build) throw new Error(`unknown variant ${variant}; known: ${Object.keys(VARIANTS).join(', ')}`);
const server = createServer(await build());
// Requests received, those still in flight when the load stops included, as the handler runs are.
server.on('request', () => {
  stats.requests++;
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
let out = `${server.address().port}\n`;
if (values.control) {
  const control = createServer((_req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(stats));
  });
  await new Promise((resolve) => control.listen(0, '127.0.0.1', resolve));
  control.unref();
  out += `${control.address().port}\n`;
}
process.stdout.write(out);
process.on('SIGTERM', () => {
  server.closeAllConnections?.();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
});
