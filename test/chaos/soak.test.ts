/**
 * The backend goes away under load (SPEC §3, exactly once, across processes): four copies of the chaos fixture
 * server share one backend while virtual clients send orders for `SOAK_MS` with random retries (the same key
 * resent after 409s, 503s, client timeouts and random pauses; sometimes once more after the answer). Twice during
 * the run the backend is hit:
 *
 * - Redis (a private `redis-server` with an append-only file, fsync on every write, as a production Redis with
 *   persistence): killed with SIGKILL and restarted, then stopped with SIGTERM and restarted. Two processes use
 *   ioredis, two node-redis, each configured to fail fast as the README says.
 * - PostgreSQL: every connection of the processes' pools terminated (`pg_terminate_backend`, found by the pools'
 *   `application_name`).
 * - MariaDB: every connection of the processes' pools killed (`KILL`, by the thread ids the pools report).
 * - SQLite (a file the four processes share): a write lock held by another connection for 1.5 s (`BEGIN
 *   EXCLUSIVE`, as a backup or a migration takes it), which every write waits out within the busy timeout, the
 *   process's event loop with it (`better-sqlite3` waits in the calling thread).
 *
 * The ledger (every execution of the handler, written by the handler itself) must show at most one execution per
 * key, and exactly one for every key a client got a 2xx for, the one whose response every 2xx carried. No request
 * waits more than 5 s; the answers are 2xx (first runs and replays), 409 or 503, never 410, 422 or 500.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type mysql from 'mysql2/promise';
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ExampleProcess, startExample } from '../processes/example-process.js';
import { requireRedisServer, startRedisServer } from '../support/redis-server.js';
import {
  dropMysqlTable,
  dropPostgresTable,
  MYSQL_URL,
  mysqlPool,
  POSTGRES_URL,
  postgresPool,
  requireMysql,
  requirePostgres,
  requireSqlite,
  sqliteDirectory,
  uniqueTable,
} from '../support/sql.js';
import { max, percentile, report, size } from './support/chaos.js';
import { createLedger, type Ledger } from './support/ledger.js';
import { type Fault, type LoadResult, runLoad, type SentRequest } from './support/load.js';

const redisServer = requireRedisServer('Chaos soak on Redis');
const postgresUp = await requirePostgres('Chaos soak on PostgreSQL');
const mysqlUp = await requireMysql('Chaos soak on MariaDB');
const sqliteLoads = await requireSqlite('Chaos soak on SQLite');

const PROCESSES = 4;
/** How long the load runs. */
const SOAK_MS = size(10_000, 30_000);
/** When the two faults hit, as fractions of the run. */
const FAULTS_AT = [0.3, 0.65];
const CLIENTS = 24;
/** Longer than any outage here, so that a lease never lapses under a running handler. */
const LOCK_S = 10;
/** After the load, how long unfinished requests may retry: a lock orphaned by a lost acquire reply lapses. */
const DRAIN_MS = LOCK_S * 1000 + 10_000;
/** The longest any request may wait for its answer. */
const MAX_WAIT_MS = 5_000;
const FIXTURE = 'test/chaos/fixtures/ledger-server.ts';
/** How long the SQLite run's other connection holds the write lock. */
const LOCK_HELD_MS = 1_500;

interface Stats {
  pid: number;
  runs: number;
  outcomes: Record<string, number>;
}

async function startProcesses(envs: Record<string, string>[]): Promise<ExampleProcess[]> {
  const started = await Promise.allSettled(envs.map((env) => startExample(env, FIXTURE)));
  const failure = started.find((result) => result.status === 'rejected');
  const children = started.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []));
  if (failure !== undefined) {
    await Promise.all(children.map((child) => child.stop()));
    throw (failure as PromiseRejectedResult).reason;
  }
  return children;
}

async function statsOf(children: readonly ExampleProcess[]): Promise<Record<string, number>> {
  const outcomes: Record<string, number> = {};
  for (const child of children) {
    const stats = (await (await fetch(child.url.replace(/\/orders$/, '/stats'))).json()) as Stats;
    for (const [outcome, count] of Object.entries(stats.outcomes))
      outcomes[outcome] = (outcomes[outcome] ?? 0) + count;
  }
  return outcomes;
}

/** Judges a run against the ledger, prints its figures and asserts the guarantees. */
async function judge(name: string, result: LoadResult, ledger: Ledger, children: readonly ExampleProcess[]) {
  const executions = ledger.byKey();
  const duplicates = [...executions].filter(([, runs]) => runs.length > 1);
  const statuses: Record<string, number> = {};
  for (const request of result.requests) {
    const label =
      request.kind === 'answer' ? `${request.status}${request.replayed ? ' replay' : ''}` : request.kind;
    statuses[label] = (statuses[label] ?? 0) + 1;
  }
  const answered = result.requests.filter((request) => request.kind === 'answer');
  const waits = answered.map((request) => request.elapsedMs);
  const slowest = answered.reduce((worst, request) =>
    request.elapsedMs > worst.elapsedMs ? request : worst,
  );
  const done = result.operations.filter((op) => op.done);
  const outcomes = await statsOf(children);
  // The retries the run is about: the same key resent after its client gave up on it, and after a 409 or a 503.
  const resentAfter = (gaveUp: (request: SentRequest) => boolean) => {
    const keys = new Set<string>();
    const pending = new Set<string>();
    for (const request of [...result.requests].sort((a, b) => a.sentAtMs - b.sentAtMs)) {
      if (pending.has(request.key)) keys.add(request.key);
      if (gaveUp(request)) pending.add(request.key);
    }
    return keys.size;
  };
  const resentAfterTimeout = resentAfter((request) => request.kind === 'timeout');
  const resentAfterRefusal = resentAfter(
    (request) => request.kind === 'answer' && (request.status === 409 || request.status === 503),
  );
  const totalExecutions = [...executions.values()].reduce((sum, runs) => sum + runs.length, 0);

  report(`backend fault under load: ${name}`, {
    processes: children.length,
    'load for': { ms: SOAK_MS },
    'virtual clients': CLIENTS,
    faults: result.faults
      .map((fault) => `${fault.name} at ${(fault.atMs / 1000).toFixed(1)} s (${fault.note})`)
      .join('; '),
    requests: result.requests.length,
    'logical requests (keys)': result.operations.length,
    'keys answered 2xx': done.length,
    executions: totalExecutions,
    'duplicate executions': duplicates.length,
    answers: Object.entries(statuses)
      .sort()
      .map(([label, count]) => `${label}: ${count}`)
      .join(', '),
    'client timeouts (impatient clients)': statuses.timeout ?? 0,
    'keys resent after a client timeout': resentAfterTimeout,
    'keys resent after a 409 or 503': resentAfterRefusal,
    'wait, median': { ms: percentile(waits, 50) },
    'wait, p99': { ms: percentile(waits, 99) },
    'wait, max': { ms: max(waits) },
    'attempts per key, max': max(result.operations.map((op) => op.attempts)),
    'key to its 2xx, max': { ms: max(done.map((op) => op.elapsedMs)) },
    // An acquire whose reply the fault swallowed leaves a lock nobody holds: its key waits for the lease to lapse.
    'keys that waited out an orphaned lock': done.filter((op) => op.elapsedMs > LOCK_S * 1000).length,
    'onEvent outcomes': Object.entries(outcomes)
      .sort()
      .map(([outcome, count]) => `${outcome}: ${count}`)
      .join(', '),
  });

  // The guarantees. Each fault hit something (a SQL fault that found no connection would prove nothing).
  expect(result.faults).toHaveLength(FAULTS_AT.length);
  for (const fault of result.faults) expect(fault.note).not.toMatch(/^0 /);
  expect(duplicates.map(([key, runs]) => `${key}: ${runs.map((run) => run.run).join(', ')}`)).toEqual([]);
  const unexpected = result.requests.filter(
    (request) =>
      request.kind === 'network' ||
      (request.kind === 'answer' &&
        !(request.status >= 200 && request.status < 300) &&
        request.status !== 409 &&
        request.status !== 503),
  );
  expect(unexpected.slice(0, 5)).toEqual([]);
  expect(slowest.elapsedMs, `slowest: ${JSON.stringify(slowest)}`).toBeLessThanOrEqual(MAX_WAIT_MS);
  expect(result.operations.filter((op) => !op.done).map((op) => op.key)).toEqual([]);
  // Every key a client got a 2xx for ran exactly once, and every 2xx it got (first run or replay) is that run's.
  for (const op of done) {
    const runs = executions.get(op.key) ?? [];
    expect(runs, op.key).toHaveLength(1);
    const answers = result.requests.filter((request) => request.key === op.key && request.run !== undefined);
    for (const answer of answers) expect(answer.run, op.key).toBe(runs[0]!.run);
  }
  // Nothing ran that no client asked for.
  const asked = new Set(result.operations.map((op) => op.key));
  expect([...executions.keys()].filter((key) => !asked.has(key))).toEqual([]);
  // The run tested what it claims to: replays happened, and keys were resent after client timeouts and after
  // 409s or 503s.
  expect(result.requests.some((request) => request.replayed)).toBe(true);
  expect(resentAfterTimeout).toBeGreaterThan(0);
  expect(resentAfterRefusal).toBeGreaterThan(0);
  // Every execution was stored and reported as such through onEvent: the outages were far shorter than the lease,
  // so no store may be lost or misreported (a store that landed with its answer lost once showed as lease-lost).
  expect(outcomes['lease-lost'] ?? 0).toBe(0);
  expect(outcomes['store-failed'] ?? 0).toBe(0);
  expect(outcomes.executed ?? 0).toBe(totalExecutions);
}

const faultTimes = FAULTS_AT.map((fraction) => Math.round(SOAK_MS * fraction));

/** A backend set up for a soak: the processes sharing it, the faults to inject, and the cleanup. */
interface Soak {
  children: ExampleProcess[];
  faults: Fault[];
  cleanup(): Promise<void>;
}

function describeSoak(name: string, enabled: boolean, setup: (ledger: Ledger) => Promise<Soak>): void {
  describe.runIf(enabled)(name, () => {
    const ledger = createLedger('soak');
    let soak: Soak | undefined;

    beforeAll(async () => {
      soak = await setup(ledger);
    }, 60_000);

    afterAll(async () => {
      await soak?.cleanup();
      ledger.remove();
    });

    it(
      'never runs a key twice, answers every request within 5 s, and only with 2xx, 409 or 503',
      async () => {
        const result = await runLoad({
          label: `soak-${randomBytes(4).toString('hex')}`,
          urls: soak!.children.map((child) => child.url),
          durationMs: SOAK_MS,
          clients: CLIENTS,
          drainMs: DRAIN_MS,
          hangMs: 15_000,
          faults: soak!.faults,
        });
        await judge(name, result, ledger, soak!.children);
      },
      SOAK_MS + DRAIN_MS + 30_000,
    );
  });
}

describe('chaos: the backend goes away under load, 4 processes', () => {
  describeSoak(
    'Redis restarted twice (2 processes on ioredis, 2 on node-redis)',
    redisServer,
    async (ledger) => {
      const server = await startRedisServer({ args: ['--appendonly', 'yes', '--appendfsync', 'always'] });
      const children = await startProcesses(
        Array.from({ length: PROCESSES }, (_, i) => ({
          CHAOS_BACKEND: i % 2 === 0 ? 'ioredis' : 'node-redis',
          REDIS_URL: server.url,
          LEDGER: ledger.path,
          LOCK_TIMEOUT: String(LOCK_S),
        })),
      ).catch(async (error: unknown) => {
        await server.close();
        throw error;
      });
      const restart = (signal: NodeJS.Signals) => async () => {
        const stopped = performance.now();
        await server.stop(signal);
        await server.start();
        return `down ${Math.round(performance.now() - stopped)} ms`;
      };
      return {
        children,
        faults: [
          { atMs: faultTimes[0]!, name: 'Redis killed (SIGKILL) and restarted', inject: restart('SIGKILL') },
          { atMs: faultTimes[1]!, name: 'Redis stopped (SIGTERM) and restarted', inject: restart('SIGTERM') },
        ],
        async cleanup() {
          await Promise.all(children.map((child) => child.stop()));
          await server.close();
        },
      };
    },
  );

  describeSoak('PostgreSQL, the pools’ connections terminated twice', postgresUp, async (ledger) => {
    const table = uniqueTable('chaos_soak');
    const applicationName = `idempotency-chaos-${randomBytes(6).toString('hex')}`;
    const admin: pg.Pool = postgresPool({ max: 2 });
    const cleanup = async (children: readonly ExampleProcess[]) => {
      await Promise.all(children.map((child) => child.stop()));
      await dropPostgresTable(admin, table);
      await admin.end();
    };
    const children = await startProcesses(
      Array.from({ length: PROCESSES }, () => ({
        CHAOS_BACKEND: 'postgres',
        DATABASE_URL: POSTGRES_URL,
        PG_APPLICATION_NAME: applicationName,
        IDEMPOTENCY_TABLE: table,
        LEDGER: ledger.path,
        LOCK_TIMEOUT: String(LOCK_S),
      })),
    ).catch(async (error: unknown) => {
      await cleanup([]);
      throw error;
    });
    // Only the connections of these processes' pools: they carry the run's application_name.
    const terminate = async () => {
      const { rows } = await admin.query<{ terminated: boolean }>(
        'SELECT pg_terminate_backend(pid) AS terminated FROM pg_stat_activity WHERE application_name = $1',
        [applicationName],
      );
      return `${rows.filter((row) => row.terminated).length} connections terminated`;
    };
    return {
      children,
      faults: faultTimes.map((atMs) => ({ atMs, name: 'pg_terminate_backend', inject: terminate })),
      cleanup: () => cleanup(children),
    };
  });

  describeSoak('MariaDB, the pools’ connections killed twice', mysqlUp, async (ledger) => {
    const table = uniqueTable('chaos_soak');
    const admin: mysql.Pool = mysqlPool({ connectionLimit: 2 });
    const cleanup = async (children: readonly ExampleProcess[]) => {
      await Promise.all(children.map((child) => child.stop()));
      await dropMysqlTable(admin, table);
      await admin.end();
    };
    const children = await startProcesses(
      Array.from({ length: PROCESSES }, () => ({
        CHAOS_BACKEND: 'mysql',
        MYSQL_URL,
        IDEMPOTENCY_TABLE: table,
        LEDGER: ledger.path,
        LOCK_TIMEOUT: String(LOCK_S),
      })),
    ).catch(async (error: unknown) => {
      await cleanup([]);
      throw error;
    });
    const killed = new Set<number>();
    // Only the connections of these processes' pools: they print each one's thread id as it opens.
    const kill = async () => {
      const threads = children.flatMap((child) =>
        [...child.output().matchAll(/mysql-thread (\d+)/g)].map((match) => Number(match[1])),
      );
      let count = 0;
      for (const thread of threads) {
        if (killed.has(thread)) continue;
        killed.add(thread);
        try {
          await admin.query(`KILL CONNECTION ${thread}`);
          count++;
        } catch {
          // Closed already.
        }
      }
      return `${count} connections killed`;
    };
    return {
      children,
      faults: faultTimes.map((atMs) => ({ atMs, name: 'KILL', inject: kill })),
      cleanup: () => cleanup(children),
    };
  });

  describeSoak('SQLite, a write lock held by another connection twice', sqliteLoads, async (ledger) => {
    const directory = sqliteDirectory('chaos-soak');
    const path = directory.path('idempotency.db');
    const table = uniqueTable('chaos_soak');
    const children = await startProcesses(
      Array.from({ length: PROCESSES }, () => ({
        CHAOS_BACKEND: 'sqlite',
        SQLITE_PATH: path,
        IDEMPOTENCY_TABLE: table,
        LEDGER: ledger.path,
        LOCK_TIMEOUT: String(LOCK_S),
      })),
    ).catch((error: unknown) => {
      directory.remove();
      throw error;
    });
    const { default: Database } = await import('better-sqlite3');
    const holder = new Database(path, { timeout: 5_000 });
    const holdWriteLock = async () => {
      const taken = performance.now();
      holder.exec('BEGIN EXCLUSIVE');
      await sleep(LOCK_HELD_MS);
      holder.exec('COMMIT');
      return `held ${Math.round(performance.now() - taken)} ms`;
    };
    return {
      children,
      faults: faultTimes.map((atMs) => ({ atMs, name: 'BEGIN EXCLUSIVE', inject: holdWriteLock })),
      async cleanup() {
        await Promise.all(children.map((child) => child.stop()));
        holder.close();
        directory.remove();
      },
    };
  });
});
