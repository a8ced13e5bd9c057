/**
 * What the idempotency proxy costs: throughput and latency through `idempotency-header proxy` (the built
 * `dist/cli.mjs`, as `npx` runs it), against the same upstream served directly and through a plain Node.js
 * reverse proxy with no idempotency (`proxy-servers.mjs plain`), in the same run. Every server is its own process
 * on 127.0.0.1; autocannon loads them from this process.
 *
 * Targets: `direct` (the upstream), `plain` (the plain proxy), `proxy-memory` and `proxy-redis` (ours, on each
 * backend; Redis at --redis-url under a prefix of its own, removed afterwards). Modes:
 * - `fresh`: POST /orders with a new Idempotency-Key each time (ours: each runs upstream and is stored);
 * - `replay`: POST /orders cycling over keys sent once before the warm-up (ours answers from the store; the
 *   others run every request);
 * - `pass`: GET /orders, no key (ours passes it through: the cost of the proxy alone).
 * Each measurement starts fresh proxy processes, warms up, then runs a fixed duration at fixed connections.
 * Rounds repeat every measurement, in reverse order every other round, so that drift in a shared machine falls
 * on all of them; each figure is the median over rounds. Beside throughput and latency, the CPU time each server
 * process spent per request (from /proc): on a busy machine throughput says how much CPU was left over, CPU per
 * request what the proxy itself costs. The load average before and after is printed with the results.
 *
 * Usage: npm run bench:proxy [-- --rounds 3 --warmup 2 --duration 5 --connections 50 --modes fresh,pass
 *   --targets direct,plain,proxy-memory --redis-url redis://127.0.0.1:6379 --out bench/results/proxy]
 * Writes <out>.md and <out>.json.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus, loadavg } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import autocannon from 'autocannon';
import { Redis } from 'ioredis';

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(BENCH, '..');
const CLI = join(ROOT, 'dist', 'cli.mjs');

const { values: args } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '2' },
    duration: { type: 'string', default: '5' },
    connections: { type: 'string', default: '50' },
    modes: { type: 'string', default: 'fresh,replay,pass' },
    targets: { type: 'string', default: 'direct,plain,proxy-memory,proxy-redis' },
    'redis-url': { type: 'string', default: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' },
    out: { type: 'string', default: join(BENCH, 'results', 'proxy') },
  },
});

type Mode = 'fresh' | 'replay' | 'pass';
type Target = 'direct' | 'plain' | 'proxy-memory' | 'proxy-redis';
const MODES = args.modes.split(',') as Mode[];
const ROUNDS = Number(args.rounds);
const WARMUP = Number(args.warmup);
const DURATION = Number(args.duration);
const CONNECTIONS = Number(args.connections);
const REPLAY_KEYS = 1_000;
const BODY = JSON.stringify({ item: 'book', quantity: 2 });

const LABELS: Record<Target, string> = {
  direct: 'upstream, direct',
  plain: 'plain Node.js proxy',
  'proxy-memory': 'idempotency proxy, memory',
  'proxy-redis': 'idempotency proxy, Redis',
};

// ---------------------------------------------------------------------------------------------------------------
// Processes

const children = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

interface Running {
  url: string;
  /** The server's process, for its CPU time; `undefined` where no process of its own serves. */
  pid: number | undefined;
  stop(): Promise<void>;
}

/**
 * CPU time (user + system) a process has used so far, in microseconds, from /proc (Linux; clock ticks of 10 ms).
 * Per request, it says what a server costs whatever else the machine is doing, which throughput does not.
 */
function cpuMicros(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) * 10_000;
  } catch {
    return undefined;
  }
}

function freePort(): Promise<number> {
  return new Promise((done) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => done(port));
    });
  });
}

/** Starts a server process on `port` and waits until `readyPath` answers 200. */
async function start(command: string, argv: string[], port: number, readyPath: string): Promise<Running> {
  // stdout is discarded, not read: the proxy's JSON log lines are written as in production, to a sink that
  // costs this process nothing.
  const child = spawn(command, argv, { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
  children.add(child);
  const exited = new Promise<void>((done) => child.once('exit', () => done()));
  const url = `http://127.0.0.1:${port}`;
  for (let attempt = 0; ; attempt++) {
    try {
      if ((await fetch(url + readyPath)).ok) break;
    } catch {}
    if (attempt > 300 || child.exitCode !== null) throw new Error(`${argv.join(' ')} did not start`);
    await new Promise((done) => setTimeout(done, 50));
  }
  return {
    url,
    pid: child.pid,
    async stop() {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
      children.delete(child);
    },
  };
}

async function startTarget(target: Target, upstream: string, prefix: string): Promise<Running> {
  const port = await freePort();
  switch (target) {
    case 'direct':
      return { url: upstream, pid: undefined, stop: async () => {} };
    case 'plain':
      return start(
        process.execPath,
        [join(BENCH, 'proxy-servers.mjs'), 'plain', String(port), upstream],
        port,
        '/ready',
      );
    case 'proxy-memory':
    case 'proxy-redis':
      return start(
        process.execPath,
        [
          CLI,
          'proxy',
          '--upstream',
          upstream,
          '--port',
          String(port),
          '--backend',
          target === 'proxy-redis' ? args['redis-url'] : 'memory',
          '--prefix',
          prefix,
        ],
        port,
        '/healthz',
      );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Load

interface Measurement {
  target: Target;
  mode: Mode;
  round: number;
  rps: number;
  p50: number;
  p99: number;
  errors: number;
  non2xx: number;
  /** CPU per request of the proxy's process, in µs (none for `direct`). */
  proxyCpuUs: number | undefined;
  /** CPU per request of the upstream's process, in µs. */
  upstreamCpuUs: number | undefined;
}

function load(url: string, mode: Mode, seconds: number, nextKey: () => string): Promise<autocannon.Result> {
  const post = mode !== 'pass';
  return autocannon({
    url: `${url}/orders`,
    method: post ? 'POST' : 'GET',
    connections: CONNECTIONS,
    duration: seconds,
    timeout: 30,
    headers: post ? { 'content-type': 'application/json' } : {},
    body: post ? BODY : undefined,
    requests: [
      {
        setupRequest(request) {
          if (post) request.headers!['idempotency-key'] = nextKey();
          return request;
        },
      },
    ],
  });
}

async function measure(target: Target, mode: Mode, round: number, upstream: Running): Promise<Measurement> {
  const run = randomUUID().slice(0, 8);
  const prefix = `bench-proxy:${run}:`;
  const running = await startTarget(target, upstream.url, prefix);
  try {
    let n = 0;
    const replayKeys = Array.from({ length: REPLAY_KEYS }, (_, i) => `${run}-replay-${i}`);
    if (mode === 'replay') {
      // Each key runs once before the warm-up; then every request is a replay.
      for (let i = 0; i < replayKeys.length; i += 50) {
        await Promise.all(
          replayKeys.slice(i, i + 50).map(async (key) => {
            const response = await fetch(`${running.url}/orders`, {
              method: 'POST',
              headers: { 'content-type': 'application/json', 'idempotency-key': key },
              body: BODY,
            });
            await response.arrayBuffer();
          }),
        );
      }
    }
    const nextKey = mode === 'replay' ? () => replayKeys[n++ % REPLAY_KEYS]! : () => `${run}-fresh-${n++}`;
    await load(running.url, mode, WARMUP, nextKey);
    const proxyCpu = cpuMicros(running.pid);
    const upstreamCpu = cpuMicros(upstream.pid);
    const result = await load(running.url, mode, DURATION, nextKey);
    const perRequest = (before: number | undefined, after: number | undefined) =>
      before === undefined || after === undefined ? undefined : (after - before) / result.requests.total;
    return {
      target,
      mode,
      round,
      rps: result.requests.average,
      p50: result.latency.p50,
      p99: result.latency.p99,
      errors: result.errors + result.timeouts,
      non2xx: result.non2xx,
      proxyCpuUs: perRequest(proxyCpu, cpuMicros(running.pid)),
      upstreamCpuUs: perRequest(upstreamCpu, cpuMicros(upstream.pid)),
    };
  } finally {
    await running.stop();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Run

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

function medianOf(values: (number | undefined)[]): number | undefined {
  const known = values.filter((value): value is number => value !== undefined);
  return known.length === 0 ? undefined : median(known);
}

function formatUs(us: number | undefined): string {
  return us === undefined ? '–' : `${Math.round(us)}`;
}

async function redisAvailable(url: string): Promise<Redis | undefined> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 1_000 });
  redis.on('error', () => {});
  try {
    await redis.connect();
    await redis.ping();
    return redis;
  } catch {
    redis.disconnect();
    return undefined;
  }
}

async function deleteBenchKeys(redis: Redis): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', 'bench-proxy:*', 'COUNT', 1000);
    if (keys.length > 0) await redis.del(...keys);
    cursor = next;
  } while (cursor !== '0');
}

async function main(): Promise<void> {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build first (npm run bench:proxy builds it)`);
  let targets = args.targets.split(',') as Target[];
  const redis = targets.includes('proxy-redis') ? await redisAvailable(args['redis-url']) : undefined;
  if (targets.includes('proxy-redis') && redis === undefined) {
    console.warn(`No Redis at ${args['redis-url']}: proxy-redis left out.`);
    targets = targets.filter((target) => target !== 'proxy-redis');
  }
  const loadBefore = loadavg();
  console.log(
    `proxy benchmark: ${cpus().length} CPUs, load average ${loadBefore.map((x) => x.toFixed(2)).join(' ')}; ` +
      `${ROUNDS} rounds, ${WARMUP} s warm-up + ${DURATION} s, ${CONNECTIONS} connections`,
  );
  const upstreamPort = await freePort();
  const upstream = await start(
    process.execPath,
    [join(BENCH, 'proxy-servers.mjs'), 'upstream', String(upstreamPort)],
    upstreamPort,
    '/ready',
  );
  const measurements: Measurement[] = [];
  try {
    const plan = MODES.flatMap((mode) => targets.map((target) => ({ target, mode })));
    for (let round = 1; round <= ROUNDS; round++) {
      for (const { target, mode } of round % 2 === 1 ? plan : [...plan].reverse()) {
        const measured = await measure(target, mode, round, upstream);
        measurements.push(measured);
        console.log(
          `  round ${round} ${mode.padEnd(6)} ${LABELS[target].padEnd(27)} ${Math.round(measured.rps)
            .toString()
            .padStart(6)} req/s  p50 ${measured.p50} ms  p99 ${measured.p99} ms  CPU/req ${formatUs(
            measured.proxyCpuUs,
          )} proxy, ${formatUs(measured.upstreamCpuUs)} upstream` +
            (measured.errors + measured.non2xx > 0
              ? `  (${measured.errors} errors, ${measured.non2xx} non-2xx)`
              : ''),
        );
      }
    }
  } finally {
    await upstream.stop();
    if (redis !== undefined) {
      await deleteBenchKeys(redis);
      redis.disconnect();
    }
  }
  const loadAfter = loadavg();

  const rows: string[] = [];
  const summary: Record<string, unknown>[] = [];
  for (const mode of MODES) {
    const of = (target: Target) => measurements.filter((m) => m.target === target && m.mode === mode);
    const directRps = median(of('direct').map((m) => m.rps));
    const plainRps = median(of('plain').map((m) => m.rps));
    for (const target of targets) {
      const ms = of(target);
      if (ms.length === 0) continue;
      const rps = median(ms.map((m) => m.rps));
      const p99 = median(ms.map((m) => m.p99));
      const p50 = median(ms.map((m) => m.p50));
      const proxyCpu = medianOf(ms.map((m) => m.proxyCpuUs));
      const upstreamCpu = medianOf(ms.map((m) => m.upstreamCpuUs));
      const vsDirect = directRps > 0 ? rps / directRps : Number.NaN;
      const vsPlain = plainRps > 0 ? rps / plainRps : Number.NaN;
      rows.push(
        `| ${mode} | ${LABELS[target]} | ${Math.round(rps)} | ${p50} | ${p99} | ${(vsDirect * 100).toFixed(0)} % | ${
          target === 'direct' ? '' : `${(vsPlain * 100).toFixed(0)} %`
        } | ${formatUs(proxyCpu)} | ${formatUs(upstreamCpu)} |`,
      );
      summary.push({
        mode,
        target,
        rps,
        p50,
        p99,
        vsDirect,
        vsPlain,
        proxyCpuUs: proxyCpu,
        upstreamCpuUs: upstreamCpu,
      });
    }
  }
  const table = [
    `Proxy benchmark, ${new Date().toISOString()}: ${cpus().length} CPUs (${cpus()[0]?.model ?? 'unknown'}), ` +
      `load average ${loadBefore.map((x) => x.toFixed(2)).join(' ')} before, ${loadAfter
        .map((x) => x.toFixed(2))
        .join(' ')} after; Node.js ${process.version}; median of ${ROUNDS} rounds of ${DURATION} s at ` +
      `${CONNECTIONS} connections.`,
    '',
    '| mode | target | req/s | p50 ms | p99 ms | of direct | of plain proxy | proxy CPU µs/req | upstream CPU µs/req |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|',
    ...rows,
  ].join('\n');
  console.log(`\n${table}\n`);
  mkdirSync(dirname(args.out), { recursive: true });
  writeFileSync(`${args.out}.md`, `${table}\n`);
  writeFileSync(
    `${args.out}.json`,
    `${JSON.stringify({ loadBefore, loadAfter, cpus: cpus().length, rounds: ROUNDS, duration: DURATION, connections: CONNECTIONS, summary, measurements }, null, 2)}\n`,
  );
}

await main();
