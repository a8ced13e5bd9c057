/**
 * Starts and stops a private `redis-server` for tests that must take Redis down, inspect every key it holds, or
 * run it in cluster mode, without touching the shared server.
 *
 * @example
 * ```ts
 * const server = await startRedisServer();
 * afterAll(() => server.close());
 * await server.stop(); // outage
 * await server.start(); // back, same port
 * ```
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IS_CI, redisAnswers } from './redis.js';

/** The `redis-server` binary: `REDIS_SERVER_BIN`, or `redis-server` on the PATH. */
export const REDIS_SERVER_BIN = process.env.REDIS_SERVER_BIN ?? 'redis-server';

/** Options of {@link startRedisServer}. */
export interface RedisServerOptions {
  /** Port to listen on; a free one by default. */
  port?: number;
  /** Starts the server with `cluster-enabled yes` and assigns it every hash slot: a one-node cluster. */
  cluster?: boolean;
  /** More `redis-server` arguments, e.g. `['--enable-debug-command', 'yes']`. */
  args?: string[];
}

/** A private `redis-server` process on 127.0.0.1. */
export interface RedisServer {
  readonly port: number;
  /** `redis://127.0.0.1:<port>`. */
  readonly url: string;
  /** Whether the process is running (started and neither stopped nor exited). */
  readonly running: boolean;
  /** Starts the server again on the same port, after {@link RedisServer.stop}. Resolves once it answers. */
  start(): Promise<void>;
  /** Kills the server (SIGKILL by default: a crash, no goodbye to clients) and waits until it has exited. */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** Freezes the server (SIGSTOP): connections stay open, nothing answers. */
  pause(): void;
  /** Thaws a paused server (SIGCONT). */
  resume(): void;
  /** Kills the server if it runs and deletes its working directory. Safe to call any number of times. */
  close(): Promise<void>;
}

/** Whether the `redis-server` binary can be run. */
export function redisServerInstalled(): boolean {
  const result = spawnSync(REDIS_SERVER_BIN, ['--version'], { stdio: 'ignore' });
  return result.error === undefined && result.status === 0;
}

/**
 * Decides whether a suite needing a private server runs: `true` when `redis-server` can be run. When it cannot,
 * on CI (`CI=true`) this throws, failing the run; elsewhere it warns loudly and returns `false`.
 */
export function requireRedisServer(suite: string): boolean {
  if (redisServerInstalled()) return true;
  const message =
    `${suite}: the \`${REDIS_SERVER_BIN}\` binary was not found. Install Redis (e.g. \`apt-get install ` +
    `redis-server\`) or set REDIS_SERVER_BIN to run these tests.`;
  if (IS_CI) throw new Error(`${message} On CI (CI=true) it is required.`);
  console.warn(`\n⚠️  SKIPPED ${message}\n`);
  return false;
}

/**
 * Ports {@link freePort} picks from: below Linux's default ephemeral range (32768–60999), which the OS draws on
 * for every `listen(0)` and every outgoing connection. A port there that a stopped server leaves free for a while
 * could be taken by another test's listener, or become the local port of an outgoing connection, and a client
 * reconnecting to it would reach that instead of the restarted server (or itself, by TCP self-connect). The
 * range ends low enough that a cluster node's bus port (its port + 10 000) is below the ephemeral range too.
 */
const PRIVATE_PORTS = { from: 20_000, to: 22_700 };

/** A port nobody listens on right now, drawn at random from {@link PRIVATE_PORTS}. */
export async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = PRIVATE_PORTS.from + Math.floor(Math.random() * (PRIVATE_PORTS.to - PRIVATE_PORTS.from));
    if (await canListen(port)) return port;
  }
  throw new Error(`no free port between ${PRIVATE_PORTS.from} and ${PRIVATE_PORTS.to} after 100 tries`);
}

/** Whether `port` on 127.0.0.1 can be listened on now (it is closed again before this resolves). */
function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

const STARTUP_TIMEOUT_MS = 10_000;
const live = new Set<ChildProcess>();

// A safety net: a test process that dies without its afterAll never leaves a server behind.
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/** Starts a private `redis-server` on 127.0.0.1 (no persistence) and resolves once it answers PING. */
export async function startRedisServer(options: RedisServerOptions = {}): Promise<RedisServer> {
  const port = options.port ?? (await freePort());
  const url = `redis://127.0.0.1:${port}`;
  const dir = mkdtempSync(join(tmpdir(), 'idempotency-redis-'));
  const args = [
    '--port',
    String(port),
    '--bind',
    '127.0.0.1',
    '--save',
    '',
    '--appendonly',
    'no',
    '--dir',
    dir,
    // A lone node does not know its own address and reports an empty host in CLUSTER SLOTS: announce it.
    ...(options.cluster
      ? [
          '--cluster-enabled',
          'yes',
          '--cluster-config-file',
          join(dir, 'nodes.conf'),
          '--cluster-announce-ip',
          '127.0.0.1',
        ]
      : []),
    ...(options.args ?? []),
  ];
  let child: ChildProcess | undefined;
  let clusterSlotsAssigned = false;

  async function start(): Promise<void> {
    if (child !== undefined) throw new Error(`redis-server on port ${port} is already running`);
    const spawned = spawn(REDIS_SERVER_BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    child = spawned;
    live.add(spawned);
    let output = '';
    spawned.stdout?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    spawned.stderr?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    const exited = new Promise<void>((resolve) => spawned.once('exit', () => resolve()));
    exited.then(() => {
      live.delete(spawned);
      if (child === spawned) child = undefined;
    });
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    while (!(await redisAnswers(url, 200))) {
      if (child !== spawned || Date.now() > deadline) {
        spawned.kill('SIGKILL');
        throw new Error(`redis-server did not start on port ${port}:\n${output}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    if (options.cluster && !clusterSlotsAssigned) {
      await assignAllSlots(port);
      clusterSlotsAssigned = true;
    }
  }

  async function stop(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const running = child;
    if (running === undefined) return;
    const exited = new Promise<void>((resolve) => running.once('exit', () => resolve()));
    if (signal !== 'SIGCONT' && signal !== 'SIGKILL') running.kill('SIGCONT');
    running.kill(signal);
    await exited;
  }

  await start();
  return {
    port,
    url,
    get running() {
      return child !== undefined;
    },
    start,
    stop,
    pause: () => child?.kill('SIGSTOP'),
    resume: () => child?.kill('SIGCONT'),
    async close() {
      await stop('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Makes a fresh cluster-mode node serve every hash slot and waits until the cluster reports `ok`. */
async function assignAllSlots(port: number): Promise<void> {
  const { Redis } = await import('ioredis');
  const admin = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 1 });
  admin.on('error', () => {});
  try {
    await admin.connect();
    await admin.call('CLUSTER', 'ADDSLOTSRANGE', '0', '16383');
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    while (!String(await admin.call('CLUSTER', 'INFO')).includes('cluster_state:ok')) {
      if (Date.now() > deadline) throw new Error(`cluster on port ${port} did not become ready`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  } finally {
    admin.disconnect();
  }
}
