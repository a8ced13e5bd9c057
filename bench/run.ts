/**
 * The side-by-side benchmark: bare frameworks, this package on each adapter and backend, and its peers, on the
 * same workload, each variant in its own server process on 127.0.0.1, loaded by autocannon from this process.
 *
 * Workload: a JSON body parser and `POST /orders` answering 201 with a small JSON order. Modes:
 * - `fresh`: a new key with every request (each one runs and is stored: the costliest path);
 * - `replay`: a pool of keys, each sent once before the warm-up, then cycled (answered from the store);
 * - `conflict`: many connections on a few keys at a time while the handler sleeps (answered 409 while the first
 *   request runs, from the store after it); the bare frameworks run every request, sleep included.
 * Each measurement: a fresh server process, a warm-up, then a fixed duration at fixed connections. Rounds repeat
 * every variant, in reverse order every other round, so that drift in the machine falls on all of them; each
 * figure is the median over rounds, its ratio the median of ratios to the bare framework in the same round.
 * Beside it, a race check: 20 simultaneous identical POSTs per variant, and how many times the handler ran.
 * Parts (`*-noop`, `*-nostore`, `*-keysonly`, `hono-skeleton`, `hono-lockonly`), measured only when named with
 * --variants and in `fresh` mode only, show where the cost of ours lies: any middleware at all, the engine and
 * adapter alone, a Map of every key; on Hono, a middleware doing what ours does around the handler without the
 * engine, and `MemoryBackend` taking each key's lock but storing no record. With --rate the load is fixed (that
 * many requests a second over all connections) rather than as fast as the server answers: every server then meets
 * the same client, and the server CPU per request is the figure to compare.
 *
 * Usage: npm run bench [-- --quick] [-- --variants express-redis,powertools-redis --modes fresh,replay]
 *   [--rounds 2 --warmup 3 --duration 8 --connections 50] [--rate 25000] [--no-race] [--redis-url redis://…]
 *   [--out path] [--dist dir] (another build of the package, e.g. of an earlier commit, to compare)
 * Writes <out>.md, <out>.svg and <out>.json (default bench/results/latest; bench/results/partial for a --quick
 * or filtered run).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Agent, request as httpRequest } from 'node:http';
import { createServer } from 'node:net';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import autocannon from 'autocannon';
import { Redis } from 'ioredis';
import mysql from 'mysql2/promise';
import pg from 'pg';

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(BENCH, '..');

// ---------------------------------------------------------------------------------------------------------------
// Variants and modes

type Framework = 'express' | 'fastify' | 'hono' | 'koa';
type BackendName = 'memory' | 'redis' | 'postgres' | 'mysql' | 'sqlite';
interface Variant {
  name: string;
  label: string;
  framework: Framework;
  /** `part`: a piece of ours measured alone, first runs only, and only when named with --variants. */
  kind: 'bare' | 'ours' | 'peer' | 'part';
  backend?: BackendName;
}

const VARIANTS: Variant[] = [
  { name: 'express', label: 'Express 4 (bare)', framework: 'express', kind: 'bare' },
  { name: 'fastify', label: 'Fastify 5 (bare)', framework: 'fastify', kind: 'bare' },
  { name: 'hono', label: 'Hono 4 (bare)', framework: 'hono', kind: 'bare' },
  { name: 'koa', label: 'Koa 2 (bare)', framework: 'koa', kind: 'bare' },
  {
    name: 'express-memory',
    label: 'ours, Express + memory',
    framework: 'express',
    kind: 'ours',
    backend: 'memory',
  },
  {
    name: 'express-redis',
    label: 'ours, Express + Redis (ioredis)',
    framework: 'express',
    kind: 'ours',
    backend: 'redis',
  },
  {
    name: 'express-node-redis',
    label: 'ours, Express + Redis (node-redis)',
    framework: 'express',
    kind: 'ours',
    backend: 'redis',
  },
  {
    name: 'express-postgres',
    label: 'ours, Express + PostgreSQL',
    framework: 'express',
    kind: 'ours',
    backend: 'postgres',
  },
  {
    name: 'express-mysql',
    label: 'ours, Express + MariaDB',
    framework: 'express',
    kind: 'ours',
    backend: 'mysql',
  },
  {
    name: 'express-sqlite',
    label: 'ours, Express + SQLite',
    framework: 'express',
    kind: 'ours',
    backend: 'sqlite',
  },
  {
    name: 'fastify-memory',
    label: 'ours, Fastify + memory',
    framework: 'fastify',
    kind: 'ours',
    backend: 'memory',
  },
  {
    name: 'fastify-redis',
    label: 'ours, Fastify + Redis (ioredis)',
    framework: 'fastify',
    kind: 'ours',
    backend: 'redis',
  },
  {
    name: 'fastify-node-redis',
    label: 'ours, Fastify + Redis (node-redis)',
    framework: 'fastify',
    kind: 'ours',
    backend: 'redis',
  },
  { name: 'hono-memory', label: 'ours, Hono + memory', framework: 'hono', kind: 'ours', backend: 'memory' },
  { name: 'koa-memory', label: 'ours, Koa + memory', framework: 'koa', kind: 'ours', backend: 'memory' },
  {
    name: 'node-idempotency-memory',
    label: '@node-idempotency + memory',
    framework: 'express',
    kind: 'peer',
    backend: 'memory',
  },
  {
    name: 'node-idempotency-redis',
    label: '@node-idempotency + Redis',
    framework: 'express',
    kind: 'peer',
    backend: 'redis',
  },
  {
    name: 'express-idempotency-memory',
    label: 'express-idempotency + memory',
    framework: 'express',
    kind: 'peer',
    backend: 'memory',
  },
  {
    name: 'express-idempotency-redis',
    label: 'express-idempotency + Redis',
    framework: 'express',
    kind: 'peer',
    backend: 'redis',
  },
  {
    name: 'powertools-redis',
    label: 'Powertools + Redis',
    framework: 'express',
    kind: 'peer',
    backend: 'redis',
  },
  // Where the cost of ours lies, by parts: any middleware at all, the engine and adapter with a backend that keeps
  // nothing, and a backend that only keeps each key in a Map (what every in-memory store must at least do).
  ...(
    [
      ['express-shared', 'Express + a middleware giving req and res a shared hidden class'],
      ['fastify-noop', 'Fastify + an empty hook'],
      ['hono-noop', 'Hono + an empty middleware'],
      ['express-nostore', 'ours, Express + a backend keeping nothing'],
      ['fastify-nostore', 'ours, Fastify + a backend keeping nothing'],
      ['hono-nostore', 'ours, Hono + a backend keeping nothing'],
      ['fastify-keysonly', 'ours, Fastify + a backend keeping only keys'],
      ['hono-keysonly', 'ours, Hono + a backend keeping only keys'],
      ['hono-skeleton', 'Hono + a middleware doing what ours does around the handler'],
      ['hono-lockonly', 'ours, Hono + MemoryBackend storing no record'],
    ] as const
  ).map(
    ([name, label]): Variant => ({
      name,
      label: `part: ${label}`,
      framework: name.slice(0, name.indexOf('-')) as Framework,
      kind: 'part',
    }),
  ),
];
const MODES = ['fresh', 'replay', 'conflict'] as const;
type Mode = (typeof MODES)[number];

/**
 * What --quick measures, in under 2 minutes on 2 busy cores: Express bare, ours on memory and Redis and every
 * Redis peer, fresh and replay, 1 round of 1 s + 2 s.
 */
const QUICK = {
  variants: [
    'express',
    'express-memory',
    'express-redis',
    'node-idempotency-redis',
    'express-idempotency-redis',
    'powertools-redis',
  ],
  modes: ['fresh', 'replay'],
  rounds: 1,
  warmup: 1,
  duration: 2,
};
const DEFAULTS = { rounds: 2, warmup: 3, duration: 8, connections: 50 };
/** Keys in the replay pool, each stored before the warm-up. */
const REPLAY_KEYS = 1000;
/** Conflict mode: this many keys at a time, a new set after this many requests, the handler sleeping this long. */
const CONFLICT = { keys: 5, requestsPerSet: 250, sleepMs: 20 };
/** Race check: this many simultaneous identical POSTs, the handler sleeping this long. */
const RACE = { requests: 20, sleepMs: 100 };
const SERVER_START_TIMEOUT_MS = 30_000;

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    variants: { type: 'string' },
    modes: { type: 'string' },
    rounds: { type: 'string' },
    warmup: { type: 'string' },
    duration: { type: 'string' },
    connections: { type: 'string' },
    rate: { type: 'string' },
    'no-race': { type: 'boolean', default: false },
    'redis-url': { type: 'string' },
    out: { type: 'string' },
    dist: { type: 'string' },
  },
});

function positive(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const number = Number(value);
  if (!Number.isFinite(number) || number <= 0)
    throw new Error(`--${name} must be a positive number, got ${value}`);
  return number;
}
const quick = values.quick;
const rounds = Math.floor(positive('rounds', values.rounds, quick ? QUICK.rounds : DEFAULTS.rounds));
const warmup = positive('warmup', values.warmup, quick ? QUICK.warmup : DEFAULTS.warmup);
const duration = positive('duration', values.duration, quick ? QUICK.duration : DEFAULTS.duration);
const connections = Math.floor(positive('connections', values.connections, DEFAULTS.connections));
/** Requests a second over all connections, when the load is fixed rather than as fast as the server answers. */
const rate = values.rate === undefined ? undefined : Math.floor(positive('rate', values.rate, 1));
const modes = (values.modes?.split(',') ?? (quick ? QUICK.modes : [...MODES])) as Mode[];
for (const mode of modes) if (!MODES.includes(mode)) throw new Error(`unknown mode ${mode}; known: ${MODES}`);
const wanted =
  values.variants?.split(',') ??
  (quick ? QUICK.variants : VARIANTS.filter((v) => v.kind !== 'part').map((v) => v.name));
for (const name of wanted) {
  if (!VARIANTS.some((v) => v.name === name)) {
    throw new Error(`unknown variant ${name}; known: ${VARIANTS.map((v) => v.name).join(', ')}`);
  }
}
/** The chosen variants, with the bare framework of each (the ratios need it), in the table's order. */
let selected = VARIANTS.filter(
  (v) =>
    wanted.includes(v.name) ||
    (v.kind === 'bare' && VARIANTS.some((w) => wanted.includes(w.name) && w.framework === v.framework)),
);
const partial = quick || values.variants !== undefined || values.modes !== undefined;
const outStem = resolve(values.out ?? join(BENCH, 'results', partial ? 'partial' : 'latest'));
const command = `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`;

// ---------------------------------------------------------------------------------------------------------------
// Set-up: peers installed, the built package snapshotted, services reachable

const runTag = `bench_${randomBytes(4).toString('hex')}`;
const scratch = mkdtempSync(join(tmpdir(), 'idempotency-bench-'));
// Inside node_modules, so that the copy resolves the peer dependencies some entries import (fastify-plugin).
const distSnapshot = join(ROOT, 'node_modules', '.cache', 'idempotency-bench', runTag, 'dist');
let measurementCount = 0;
const children = new Set<ChildProcess>();
const log = (line: string) => process.stderr.write(`${line}\n`);

function ensurePeers(): boolean {
  const installed = () =>
    ['@node-idempotency/core', 'express-idempotency', '@aws-lambda-powertools/idempotency'].every((name) =>
      existsSync(join(BENCH, 'node_modules', name, 'package.json')),
    );
  if (installed()) return true;
  log('installing the peers (npm ci --prefix bench)…');
  try {
    execFileSync('npm', ['ci', '--prefix', BENCH, '--no-audit', '--no-fund', '--prefer-offline'], {
      stdio: 'inherit',
      cwd: ROOT,
    });
  } catch {
    return false;
  }
  return installed();
}
if (selected.some((v) => v.kind === 'peer') && !ensurePeers()) {
  log('warning: the peers could not be installed (npm ci --prefix bench failed); measuring without them');
  selected = selected.filter((v) => v.kind !== 'peer');
}

// The servers load a copy of dist/: another build of the working tree during the run does not change what runs.
cpSync(resolve(values.dist ?? join(ROOT, 'dist')), distSnapshot, { recursive: true });
const sqliteDir = join(scratch, 'sqlite');
mkdirSync(sqliteDir);

const POSTGRES_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const MYSQL_URL = process.env.MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test';

async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  server.close();
  return port;
}

/**
 * Redis: a private `redis-server` (nothing else talks to it, so its INFO deltas are this bench's alone), or the
 * server at --redis-url. Keys are under this run's tag and removed at the end.
 */
let redisUrl = values['redis-url'] ?? '';
let redisPrivate: ChildProcess | undefined;
let admin: Redis | undefined;
async function startRedis(): Promise<void> {
  if (!redisUrl) {
    const port = await freePort();
    const dir = join(scratch, 'redis');
    mkdirSync(dir);
    try {
      redisPrivate = spawn(
        'redis-server',
        ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
        { stdio: 'ignore' },
      );
      await Promise.race([
        once(redisPrivate, 'spawn'),
        once(redisPrivate, 'error').then(([error]) => Promise.reject(error)),
      ]);
      children.add(redisPrivate);
      redisUrl = `redis://127.0.0.1:${port}`;
    } catch {
      redisPrivate = undefined;
      redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
      log(
        `warning: no redis-server to start; using ${redisUrl}, whose INFO deltas include its other clients`,
      );
    }
  }
  admin = new Redis(redisUrl, { maxRetriesPerRequest: 3, retryStrategy: (n) => (n > 50 ? null : 100) });
  admin.on('error', () => {});
  await admin.ping();
}

let pgPool: pg.Pool | undefined;
let mysqlPool: mysql.Pool | undefined;
const unavailable = new Set<BackendName>();
async function checkServices(): Promise<void> {
  const backends = new Set(selected.map((v) => v.backend));
  if (backends.has('redis')) {
    try {
      await startRedis();
    } catch (error) {
      unavailable.add('redis');
      log(`warning: Redis unreachable (${(error as Error).message}); skipping the Redis variants`);
    }
  }
  if (backends.has('postgres')) {
    pgPool = new pg.Pool({ connectionString: POSTGRES_URL, max: 2, connectionTimeoutMillis: 3000 });
    pgPool.on('error', () => {});
    await pgPool.query('SELECT 1').catch((error) => {
      unavailable.add('postgres');
      log(`warning: PostgreSQL unreachable at ${POSTGRES_URL} (${error.message}); skipping it`);
    });
  }
  if (backends.has('mysql')) {
    mysqlPool = mysql.createPool({ uri: MYSQL_URL, connectionLimit: 2, connectTimeout: 3000 });
    await mysqlPool.query('SELECT 1').catch((error) => {
      unavailable.add('mysql');
      log(`warning: MySQL/MariaDB unreachable at ${MYSQL_URL} (${error.message}); skipping it`);
    });
  }
  selected = selected.filter((v) => !v.backend || !unavailable.has(v.backend));
}

// ---------------------------------------------------------------------------------------------------------------
// Server processes

interface Server {
  child: ChildProcess;
  port: number;
  control: number;
  prefix: string;
  variant: Variant;
  stderr: string[];
}

async function startServer(variant: Variant, sleepMs: number): Promise<Server> {
  const prefix = `${runTag}_${++measurementCount}`;
  const args = [
    join(BENCH, 'server.mjs'),
    variant.name,
    '--control',
    '--prefix',
    prefix,
    '--sleep-ms',
    String(sleepMs),
  ];
  if (redisUrl) args.push('--redis-url', redisUrl);
  args.push('--postgres-url', POSTGRES_URL, '--mysql-url', MYSQL_URL);
  const child = spawn(process.execPath, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NODE_ENV: 'production', BENCH_DIST: distSnapshot, BENCH_SQLITE_DIR: sqliteDir },
  });
  children.add(child);
  const stderr: string[] = [];
  child.stderr!.on('data', (chunk: Buffer) => {
    if (stderr.length < 20) stderr.push(chunk.toString());
  });
  let out = '';
  await new Promise<void>((resolvePromise) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), SERVER_START_TIMEOUT_MS);
    const done = () => {
      clearTimeout(timer);
      child.stdout!.off('data', onData);
      resolvePromise();
    };
    const onData = (chunk: Buffer) => {
      out += chunk;
      if (out.split('\n').length > 2) done();
    };
    child.stdout!.on('data', onData);
    child.once('exit', done);
  });
  const [port, control] = out.split('\n').map(Number);
  if (!port || !control) {
    child.kill('SIGKILL');
    throw new Error(`${variant.name} did not start: ${stderr.join('').trim() || out}`);
  }
  return { child, port, control, prefix, variant, stderr };
}

async function stopServer(server: Server): Promise<void> {
  if (server.child.exitCode === null) {
    const exited = once(server.child, 'exit');
    server.child.kill('SIGTERM');
    const timer = setTimeout(() => server.child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
  children.delete(server.child);
  await removeData(server.prefix, server.variant.backend);
}

/** Removes what one server stored: its table, its SQLite file; its Redis keys if the Redis is not private. */
async function removeData(prefix: string, backend: BackendName | undefined): Promise<void> {
  if (backend === 'postgres') await pgPool?.query(`DROP TABLE IF EXISTS "${prefix}"`).catch(() => {});
  if (backend === 'mysql') await mysqlPool?.query(`DROP TABLE IF EXISTS \`${prefix}\``).catch(() => {});
  if (backend === 'sqlite') {
    for (const suffix of ['', '-wal', '-shm'])
      rmSync(join(sqliteDir, `${prefix}.db${suffix}`), { force: true });
  }
  if (backend === 'redis' && admin && !redisPrivate) await deleteRedisKeys(`${prefix}*`);
}

async function deleteRedisKeys(pattern: string): Promise<void> {
  let cursor = '0';
  for (let i = 0; i < 1_000_000; i++) {
    const [next, keys] = await admin!.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
    if (keys.length > 0) await admin!.unlink(...keys);
    cursor = next;
    if (cursor === '0') return;
  }
}

function getJson(port: number, path: string): Promise<Record<string, number>> {
  return new Promise((resolvePromise, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, path, agent: false, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        body += chunk;
      });
      res.on('end', () => resolvePromise(JSON.parse(body)));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end();
  });
}

const BODY = JSON.stringify({ item: 'book', quantity: 2 });

/** One POST, on its own connection unless an agent is given; resolves with the status code (0: failed). */
function post(port: number, key: string, agent: Agent | false = false): Promise<number> {
  return new Promise((resolvePromise) => {
    const req = httpRequest(
      {
        host: '127.0.0.1',
        port,
        path: '/orders',
        method: 'POST',
        agent,
        timeout: 30_000,
        headers: {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(BODY),
          'idempotency-key': key,
        },
      },
      (res) => {
        res.resume();
        res.on('end', () => resolvePromise(res.statusCode ?? 0));
      },
    );
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', () => resolvePromise(0));
    req.end(BODY);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Measuring

const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK']).toString()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU seconds (user + system) a process has used, from /proc/<pid>/stat; undefined if unreadable. */
function cpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return undefined;
  }
}
function rssBytes(pid: number): number | undefined {
  try {
    const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}
/** Busy and total jiffies of the whole machine, from /proc/stat. */
function machineTicks(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = line.reduce((a, b) => a + b, 0);
  const idle = (line[3] ?? 0) + (line[4] ?? 0);
  return { busy: total - idle, total };
}

interface RedisSample {
  calls: Map<string, number>;
  cpu: number;
}
async function redisSample(): Promise<RedisSample> {
  const [commandstats, cpu] = await Promise.all([admin!.info('commandstats'), admin!.info('cpu')]);
  const calls = new Map<string, number>();
  for (const match of commandstats.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) {
    calls.set(match[1]!, Number(match[2]));
  }
  const field = (name: string) => Number(new RegExp(`^${name}:([\\d.]+)`, 'm').exec(cpu)?.[1] ?? 0);
  return { calls, cpu: field('used_cpu_sys') + field('used_cpu_user') };
}

/** The backend's own processes whose CPU time is measured: PostgreSQL's server processes for the pool, mysqld. */
async function backendPids(server: Server): Promise<number[]> {
  if (server.variant.backend === 'postgres' && pgPool) {
    const { rows } = await pgPool.query('SELECT pid FROM pg_stat_activity WHERE application_name = $1', [
      server.prefix,
    ]);
    return rows.map((row) => Number(row.pid));
  }
  if (server.variant.backend === 'mysql') {
    for (const file of ['/run/mysqld/mysqld.pid', '/var/run/mysqld/mysqld.pid']) {
      try {
        return [Number(readFileSync(file, 'utf8').trim())];
      } catch {}
    }
  }
  return [];
}

interface Sample {
  at: number;
  serverCpu: number;
  machine: { busy: number; total: number };
  control: Record<string, number>;
  redis?: RedisSample;
  backendCpu?: number;
}
async function sample(server: Server, pids: number[]): Promise<Sample> {
  const [control, redis] = await Promise.all([
    getJson(server.control, '/stats'),
    server.variant.backend === 'redis' ? redisSample() : undefined,
  ]);
  const backendCpu = pids.length > 0 ? pids.reduce((sum, pid) => sum + (cpuSeconds(pid) ?? 0), 0) : undefined;
  return {
    at: performance.now(),
    serverCpu: cpuSeconds(server.child.pid) ?? 0,
    machine: machineTicks(),
    control,
    redis,
    backendCpu,
  };
}

/** The key of each request in a mode; `n` counts the requests sent. */
function keyMaker(mode: Mode, tag: string): () => string {
  let n = 0;
  if (mode === 'fresh') return () => `${tag}-f-${n++}`;
  if (mode === 'replay') return () => `${tag}-r-${n++ % REPLAY_KEYS}`;
  return () => {
    const i = n++;
    return `${tag}-c-${Math.floor(i / CONFLICT.requestsPerSet)}-${i % CONFLICT.keys}`;
  };
}

function load(port: number, seconds: number, nextKey: () => string): Promise<autocannon.Result> {
  return autocannon({
    url: `http://127.0.0.1:${port}/orders`,
    method: 'POST',
    connections,
    ...(rate === undefined ? {} : { overallRate: rate }),
    duration: seconds,
    timeout: 30,
    headers: { 'content-type': 'application/json' },
    body: BODY,
    requests: [
      {
        setupRequest(request) {
          request.headers!['idempotency-key'] = nextKey();
          return request;
        },
      },
    ],
  });
}

interface Measurement {
  variant: string;
  mode: Mode;
  round: number;
  rps: number;
  requests: number;
  p50: number;
  p99: number;
  statuses: Record<string, number>;
  errors: number;
  twoxx: number;
  runs: number;
  /** Requests the server received in the window (those still in flight when the load stopped included). */
  received: number;
  rssMiB?: number;
  cpuUs: number;
  /** CPU used by everything else on the machine during the window, in cores. */
  othersCores: number;
  trips?: number;
  backendCpuUs?: number;
  redisCommands?: Record<string, number>;
  stderr?: string;
}

async function measure(variant: Variant, mode: Mode, round: number): Promise<Measurement> {
  const server = await startServer(variant, mode === 'conflict' ? CONFLICT.sleepMs : 0);
  try {
    const tag = server.prefix;
    if (mode === 'replay') {
      // Store every key of the pool once, ten at a time (bounded: REPLAY_KEYS requests).
      const agent = new Agent({ keepAlive: true, maxSockets: 10 });
      for (let i = 0; i < REPLAY_KEYS; i += 10) {
        await Promise.all(
          Array.from({ length: 10 }, (_, j) => post(server.port, `${tag}-r-${i + j}`, agent)),
        );
      }
      agent.destroy();
    }
    const nextKey = keyMaker(mode, tag);
    await load(server.port, warmup, nextKey);
    const pids = await backendPids(server);
    const before = await sample(server, pids);
    const result = await load(server.port, duration, nextKey);
    const after = await sample(server, pids);
    const requests = result.requests.total;
    const statuses: Record<string, number> = {};
    for (const [code, stat] of Object.entries(result.statusCodeStats ?? {}))
      statuses[code] = stat?.count ?? 0;
    const elapsed = (after.at - before.at) / 1000;
    const machineBusy = (after.machine.busy - before.machine.busy) / CLK_TCK;
    const ours = after.serverCpu - before.serverCpu;
    const measurement: Measurement = {
      variant: variant.name,
      mode,
      round,
      rps: requests / duration,
      requests,
      p50: result.latency.p50,
      p99: result.latency.p99,
      statuses,
      errors: result.errors + result.timeouts,
      twoxx: result['2xx'],
      runs: after.control.runs! - before.control.runs!,
      received: after.control.requests! - before.control.requests!,
      rssMiB: (rssBytes(server.child.pid!) ?? Number.NaN) / 1024 ** 2,
      cpuUs: (ours * 1e6) / requests,
      othersCores: Math.max(0, (machineBusy - ours) / elapsed),
    };
    if (variant.backend && variant.backend !== 'memory') {
      measurement.trips = (after.control.backendCalls! - before.control.backendCalls!) / requests;
    }
    if (before.redis && after.redis) {
      measurement.backendCpuUs = ((after.redis.cpu - before.redis.cpu) * 1e6) / requests;
      const commands: Record<string, number> = {};
      for (const [name, calls] of after.redis.calls) {
        if (name === 'info') continue;
        const delta = calls - (before.redis.calls.get(name) ?? 0);
        if (delta > 0) commands[name] = delta / requests;
      }
      measurement.redisCommands = commands;
    } else if (before.backendCpu !== undefined && after.backendCpu !== undefined) {
      measurement.backendCpuUs = ((after.backendCpu - before.backendCpu) * 1e6) / requests;
    }
    if (server.stderr.length > 0) measurement.stderr = server.stderr.join('').slice(0, 2000);
    return measurement;
  } finally {
    await stopServer(server);
  }
}

interface RaceResult {
  variant: string;
  runs: number;
  statuses: Record<string, number>;
}
async function race(variant: Variant): Promise<RaceResult> {
  const server = await startServer(variant, RACE.sleepMs);
  try {
    const key = `${server.prefix}-race`;
    const before = await getJson(server.control, '/stats');
    const codes = await Promise.all(Array.from({ length: RACE.requests }, () => post(server.port, key)));
    // A peer that stores after answering may still be writing: give it a moment before counting.
    await new Promise((r) => setTimeout(r, 200));
    const after = await getJson(server.control, '/stats');
    const statuses: Record<string, number> = {};
    for (const code of codes) statuses[code] = (statuses[code] ?? 0) + 1;
    return { variant: variant.name, runs: after.runs! - before.runs!, statuses };
  } finally {
    await stopServer(server);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Reporting

function median(numbers: number[]): number {
  const sorted = numbers.filter((n) => Number.isFinite(n)).sort((a, b) => a - b);
  if (sorted.length === 0) return Number.NaN;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

interface Row {
  variant: Variant;
  mode: Mode;
  rps: number;
  ratio: number;
  p50: number;
  p99: number;
  rssMiB: number;
  cpuUs: number;
  runsPer2xx: number;
  trips: number;
  backendCpuUs: number;
  statuses: Record<string, number>;
  errors: number;
  redisCommands?: Record<string, number>;
}

function summarise(measurements: Measurement[]): Row[] {
  const rows: Row[] = [];
  for (const mode of modes) {
    for (const variant of selected) {
      const mine = measurements.filter((m) => m.variant === variant.name && m.mode === mode);
      if (mine.length === 0) continue;
      const bare = VARIANTS.find((v) => v.kind === 'bare' && v.framework === variant.framework)!;
      const ratios = mine.map((m) => {
        const base = measurements.find(
          (b) => b.variant === bare.name && b.mode === mode && b.round === m.round,
        );
        return base ? m.rps / base.rps : Number.NaN;
      });
      const statuses: Record<string, number> = {};
      for (const m of mine)
        for (const [code, n] of Object.entries(m.statuses)) statuses[code] = (statuses[code] ?? 0) + n;
      const redisCommands: Record<string, number> = {};
      for (const m of mine) {
        for (const [name, n] of Object.entries(m.redisCommands ?? {})) {
          redisCommands[name] = (redisCommands[name] ?? 0) + n / mine.length;
        }
      }
      rows.push({
        variant,
        mode,
        rps: median(mine.map((m) => m.rps)),
        ratio: median(ratios),
        p50: median(mine.map((m) => m.p50)),
        p99: median(mine.map((m) => m.p99)),
        rssMiB: median(mine.map((m) => m.rssMiB ?? Number.NaN)),
        cpuUs: median(mine.map((m) => m.cpuUs)),
        // Runs over the requests received that were answered 2xx (the share of 2xx among the answered ones).
        runsPer2xx: median(
          mine.map((m) => (m.twoxx > 0 ? m.runs / ((m.received * m.twoxx) / m.requests) : Number.NaN)),
        ),
        trips: median(mine.map((m) => m.trips ?? Number.NaN)),
        backendCpuUs: median(mine.map((m) => m.backendCpuUs ?? Number.NaN)),
        statuses,
        errors: mine.reduce((sum, m) => sum + m.errors, 0),
        redisCommands: Object.keys(redisCommands).length > 0 ? redisCommands : undefined,
      });
    }
  }
  return rows;
}

const fixed = (n: number, digits: number) => (Number.isFinite(n) ? n.toFixed(digits) : '—');
const thousands = (n: number) => (Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : '—');

function statusText(row: Row): string {
  const total = Object.values(row.statuses).reduce((a, b) => a + b, 0) + row.errors;
  const parts = Object.entries(row.statuses)
    .sort(([a], [b]) => Number(a) - Number(b))
    .map(([code, n]) => `${code} ${((100 * n) / total).toFixed(n === total ? 0 : 1)} %`);
  if (row.errors > 0) parts.push(`errors ${row.errors}`);
  return parts.join(', ');
}

function backendCpuText(row: Row): string {
  if (row.variant.backend === 'sqlite') return 'in process';
  if (row.variant.backend === 'mysql' && Number.isFinite(row.backendCpuUs))
    return `${fixed(row.backendCpuUs, 0)}*`;
  return fixed(row.backendCpuUs, 1);
}

/** One line per variant: the ratios in every mode, then the first-run costs. */
function summaryTable(rows: Row[], races: RaceResult[]): string {
  const head = [
    'variant',
    ...modes.map((mode) => `${mode} × bare`),
    'fresh req/s',
    'fresh p50 / p99 ms',
    'server CPU µs/req fresh',
    'backend round trips/req fresh / replay',
    'backend CPU µs/req fresh',
    'RSS MiB fresh',
    ...(races.length > 0 ? [`handler runs, ${RACE.requests} racing POSTs`] : []),
  ];
  const lines = [`| ${head.join(' | ')} |`, `| --- |${' ---: |'.repeat(head.length - 1)}`];
  for (const variant of selected) {
    const row = (mode: Mode) => rows.find((r) => r.variant === variant && r.mode === mode);
    const fresh = row('fresh');
    const replay = row('replay');
    const race = races.find((r) => r.variant === variant.name);
    const cells = [
      variant.kind === 'ours' ? `**${variant.label}**` : variant.label,
      ...modes.map((mode) => (variant.kind === 'bare' ? '1' : fixed(row(mode)?.ratio ?? Number.NaN, 2))),
      thousands(fresh?.rps ?? Number.NaN),
      `${fixed(fresh?.p50 ?? Number.NaN, 0)} / ${fixed(fresh?.p99 ?? Number.NaN, 0)}`,
      fixed(fresh?.cpuUs ?? Number.NaN, 0),
      variant.backend && variant.backend !== 'memory'
        ? `${fixed(fresh?.trips ?? Number.NaN, 2)} / ${fixed(replay?.trips ?? Number.NaN, 2)}`
        : '—',
      fresh ? backendCpuText(fresh) : '—',
      fixed(fresh?.rssMiB ?? Number.NaN, 0),
      ...(races.length > 0 ? [race ? String(race.runs) : '—'] : []),
    ];
    lines.push(`| ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}

function markdownTable(rows: Row[], mode: Mode): string {
  const lines = [
    '| variant | req/s | × bare | p50 ms | p99 ms | RSS MiB | server CPU µs/req | handler runs per 2xx | backend round trips/req | backend CPU µs/req | responses |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |',
  ];
  for (const row of rows.filter((r) => r.mode === mode)) {
    const label = row.variant.kind === 'ours' ? `**${row.variant.label}**` : row.variant.label;
    lines.push(
      `| ${label} | ${thousands(row.rps)} | ${row.variant.kind === 'bare' ? '1' : fixed(row.ratio, 2)} | ${fixed(row.p50, 0)} | ${fixed(row.p99, 0)} | ${fixed(row.rssMiB, 0)} | ${fixed(row.cpuUs, 0)} | ${fixed(row.runsPer2xx, 3)} | ${fixed(row.trips, 2)} | ${backendCpuText(row)} | ${statusText(row)} |`,
    );
  }
  return lines.join('\n');
}

function redisTable(rows: Row[]): string {
  const lines = ['| variant | mode | Redis commands per request |', '| --- | --- | --- |'];
  for (const row of rows) {
    if (!row.redisCommands) continue;
    const total = Object.values(row.redisCommands).reduce((a, b) => a + b, 0);
    const parts = Object.entries(row.redisCommands)
      .filter(([, n]) => n >= 0.005)
      .sort(([, a], [, b]) => b - a)
      .map(([name, n]) => `${name.toUpperCase()} ${n.toFixed(2)}`);
    lines.push(`| ${row.variant.label} | ${row.mode} | ${total.toFixed(2)}: ${parts.join(', ')} |`);
  }
  return lines.length > 2 ? lines.join('\n') : '';
}

function raceTable(results: RaceResult[]): string {
  const lines = [
    `| variant | handler runs for ${RACE.requests} simultaneous identical POSTs | responses |`,
    '| --- | ---: | --- |',
  ];
  for (const result of results) {
    const variant = VARIANTS.find((v) => v.name === result.variant)!;
    const statuses = Object.entries(result.statuses)
      .map(([code, n]) => `${code === '0' ? 'failed' : code} × ${n}`)
      .join(', ');
    lines.push(
      `| ${variant.kind === 'ours' ? `**${variant.label}**` : variant.label} | ${result.runs} | ${statuses} |`,
    );
  }
  return lines.join('\n');
}

const escapeXml = (text: string) => text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** A horizontal bar chart of the ratios to the bare framework, fresh and replay side by side, written by hand. */
function svgChart(rows: Row[]): string {
  const chartModes = (['fresh', 'replay'] as const).filter((m) => modes.includes(m));
  const variants = selected.filter((v) => v.kind !== 'bare' && rows.some((r) => r.variant === v));
  const colours: Record<string, string> = { fresh: '#1f6feb', replay: '#8fbcf5' };
  const peerColours: Record<string, string> = { fresh: '#8a8a8a', replay: '#cfcfcf' };
  const bar = 12;
  const group = bar * chartModes.length + 10;
  const left = 230;
  const width = 760;
  const plot = width - left - 60;
  const top = 48;
  const height = top + variants.length * group + 40;
  const max = Math.max(
    1.2,
    ...rows.filter((r) => chartModes.includes(r.mode as 'fresh')).map((r) => r.ratio || 0),
  );
  const scale = Math.ceil(max * 5) / 5;
  const x = (ratio: number) => left + (plot * ratio) / scale;
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="${left}" y="18" font-size="14" font-weight="600">Throughput as a ratio to the bare framework, same round</text>`,
  ];
  let legendX = left;
  for (const mode of chartModes) {
    out.push(`<rect x="${legendX}" y="28" width="10" height="10" fill="${colours[mode]}"/>`);
    out.push(`<text x="${legendX + 14}" y="37">${mode}</text>`);
    legendX += 70;
  }
  out.push(`<rect x="${legendX}" y="28" width="10" height="10" fill="${peerColours.fresh}"/>`);
  out.push(`<text x="${legendX + 14}" y="37">peers (grey)</text>`);
  for (let tick = 0; tick <= scale + 1e-9; tick += 0.2) {
    const tx = x(tick);
    const strong = Math.abs(tick - 1) < 1e-9;
    out.push(
      `<line x1="${tx.toFixed(1)}" y1="${top - 4}" x2="${tx.toFixed(1)}" y2="${height - 30}" stroke="${strong ? '#d1242f' : '#e5e5e5'}" stroke-width="${strong ? 1.5 : 1}"${strong ? ' stroke-dasharray="4 3"' : ''}/>`,
    );
    out.push(
      `<text x="${tx.toFixed(1)}" y="${height - 16}" text-anchor="middle" fill="#555">${tick.toFixed(1)}</text>`,
    );
  }
  variants.forEach((variant, i) => {
    const y0 = top + i * group;
    out.push(
      `<text x="${left - 8}" y="${(y0 + (bar * chartModes.length) / 2 + 4).toFixed(1)}" text-anchor="end"${variant.kind === 'ours' ? ' font-weight="600"' : ''}>${escapeXml(variant.label)}</text>`,
    );
    chartModes.forEach((mode, j) => {
      const row = rows.find((r) => r.variant === variant && r.mode === mode);
      if (!row || !Number.isFinite(row.ratio)) return;
      const fill = (variant.kind === 'peer' ? peerColours : colours)[mode];
      const y = y0 + j * bar;
      out.push(
        `<rect x="${left}" y="${y}" width="${Math.max(0, x(row.ratio) - left).toFixed(1)}" height="${bar - 2}" fill="${fill}"/>`,
      );
      out.push(
        `<text x="${(x(row.ratio) + 4).toFixed(1)}" y="${y + bar - 3}" font-size="10" fill="#333">${row.ratio.toFixed(2)}</text>`,
      );
    });
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

function machineText(): string {
  const model = cpus()[0]?.model.trim() ?? 'unknown CPU';
  return `${cpus().length} cores (${model}), ${(totalmem() / 1024 ** 3).toFixed(0)} GiB, Linux, Node.js ${process.versions.node}`;
}

function gitDescribe(): string {
  try {
    return execFileSync('git', ['describe', '--always', '--dirty'], { cwd: ROOT }).toString().trim();
  } catch {
    return 'unknown';
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Main

async function cleanUp(): Promise<void> {
  for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
  if (admin && !redisPrivate) await deleteRedisKeys(`${runTag}*`).catch(() => {});
  admin?.disconnect();
  await pgPool?.end().catch(() => {});
  await mysqlPool?.end().catch(() => {});
  rmSync(scratch, { recursive: true, force: true });
  rmSync(dirname(distSnapshot), { recursive: true, force: true });
}
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    log(`${signal}: stopping`);
    cleanUp().finally(() => process.exit(130));
  });
}

async function main(): Promise<void> {
  const t0 = performance.now();
  await checkServices();
  const started = new Date();
  const load1 = loadavg()[0]!;
  const total = rounds * modes.length * selected.length;
  log(
    `${selected.length} variants × ${modes.length} modes × ${rounds} rounds = ${total} measurements of ${warmup} s warm-up + ${duration} s, ${connections} connections${redisPrivate ? `; private Redis at ${redisUrl}` : redisUrl ? `; Redis at ${redisUrl}` : ''}`,
  );
  const measurements: Measurement[] = [];
  const failures: string[] = [];
  let done = 0;
  for (let round = 0; round < rounds; round++) {
    for (const mode of modes) {
      const order = round % 2 === 0 ? selected : [...selected].reverse();
      for (const variant of order) {
        done++;
        // A part keeps nothing a replay or a conflict could be answered from: first runs only.
        if (variant.kind === 'part' && mode !== 'fresh') continue;
        let m: Measurement;
        try {
          m = await measure(variant, mode, round);
        } catch (error) {
          failures.push(
            `${variant.name} ${mode} round ${round + 1}: ${(error as Error).message.split('\n')[0]}`,
          );
          log(
            `[${done}/${total}] round ${round + 1} ${mode} ${variant.name} FAILED: ${(error as Error).message}`,
          );
          continue;
        }
        measurements.push(m);
        log(
          `[${done}/${total}] round ${round + 1} ${mode.padEnd(8)} ${variant.name.padEnd(27)} ${thousands(m.rps).padStart(7)} req/s  p99 ${fixed(m.p99, 0).padStart(4)} ms  ${fixed(m.cpuUs, 0).padStart(4)} µs CPU/req  others ${m.othersCores.toFixed(2)} cores${m.stderr ? `  stderr: ${m.stderr.split('\n')[0]}` : ''}`,
        );
      }
    }
  }
  const races: RaceResult[] = [];
  if (!values['no-race']) {
    for (const variant of selected) {
      if (variant.kind === 'part') continue;
      try {
        races.push(await race(variant));
        log(`race ${variant.name}: ${races.at(-1)!.runs} handler runs`);
      } catch (error) {
        failures.push(`${variant.name} race check: ${(error as Error).message.split('\n')[0]}`);
      }
    }
  }
  const rows = summarise(measurements);
  const others = measurements.map((m) => m.othersCores);
  if (failures.length > 0) log(`failed:\n  ${failures.join('\n  ')}`);
  const svgPath = `${outStem}.svg`;
  const md = [
    `Measured ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC on ${machineText()}, commit ${gitDescribe()}, with \`${command}\`.`,
    '',
    `Method: each variant in its own server process on 127.0.0.1, loaded by autocannon from the bench process with ${connections} connections${rate === undefined ? '' : ` at a fixed ${rate} requests a second`}; per measurement a new process, ${warmup} s of warm-up, then ${duration} s measured; ${rounds > 1 ? `${rounds} rounds, every other one in reverse order` : '1 round'}. Figures are medians over rounds; × bare is the median of the ratios to the bare framework measured in the same round and mode. Redis: ${redisPrivate ? 'a private redis-server started by the bench' : redisUrl || '—'}.`,
    '',
    `Load from other processes during the measured windows: ${median(others).toFixed(2)} cores median (min ${Math.min(...others).toFixed(2)}, max ${Math.max(...others).toFixed(2)}) of ${cpus().length}; load average ${load1.toFixed(2)} at the start, ${loadavg()[0]!.toFixed(2)} at the end.`,
    '',
  ];
  md.push('### Summary', '', summaryTable(rows, races), '');
  for (const mode of modes) {
    const heading = {
      fresh: 'fresh: a new key with every request',
      replay: `replay: ${REPLAY_KEYS} keys stored beforehand, cycled`,
      conflict: `conflict: ${CONFLICT.keys} keys at a time (a new set every ${CONFLICT.requestsPerSet} requests), the handler sleeping ${CONFLICT.sleepMs} ms`,
    }[mode];
    md.push(`### ${heading}`, '', markdownTable(rows, mode), '');
  }
  if (failures.length > 0) md.push('Failed measurements:', '', ...failures.map((f) => `- ${f}`), '');
  const redis = redisTable(rows);
  if (redis)
    md.push(
      '### Redis commands per request (INFO commandstats, scripts and the commands they run)',
      '',
      redis,
      '',
    );
  if (races.length > 0) {
    md.push(
      `### Race check: ${RACE.requests} identical POSTs at once, on ${RACE.requests} connections, the handler sleeping ${RACE.sleepMs} ms`,
      '',
      raceTable(races),
      '',
    );
  }
  md.push(
    'Server CPU: user + system time of the server process (/proc/<pid>/stat) over the window, per request. Backend round trips: counted at the driver in the server process. Backend CPU: Redis `INFO cpu`; PostgreSQL: the server processes of the pool (pg_stat_activity, /proc); *MariaDB: the whole mariadbd process, other clients included; SQLite runs in the server process. RSS at the end of the window.',
    '',
    `![Throughput ratio to the bare framework](${relative(dirname(`${outStem}.md`), svgPath)})`,
    '',
  );
  const text = md.join('\n');
  mkdirSync(dirname(outStem), { recursive: true });
  writeFileSync(`${outStem}.md`, text);
  writeFileSync(svgPath, svgChart(rows));
  writeFileSync(
    `${outStem}.json`,
    `${JSON.stringify({ started, command, machine: machineText(), rounds, warmup, duration, connections, measurements, races }, null, 2)}\n`,
  );
  process.stdout.write(`\n${text}\n`);
  log(
    `${((performance.now() - t0) / 1000).toFixed(0)} s; written: ${relative(ROOT, `${outStem}.md`)}, ${relative(ROOT, svgPath)}, ${relative(ROOT, `${outStem}.json`)}`,
  );
}

try {
  await main();
} finally {
  await cleanUp();
}
