/**
 * Helpers for tests that need the shared Redis server at `REDIS_URL`.
 *
 * Tests never FLUSHDB or FLUSHALL: each run writes under its own {@link uniquePrefix} and deletes only the keys
 * under it ({@link deleteKeysWithPrefix}).
 */
import { randomUUID } from 'node:crypto';
import { connect as connectTcp, type Socket } from 'node:net';
import { connect as connectTls } from 'node:tls';
import type { Redis } from 'ioredis';

/** The Redis server the tests use: `REDIS_URL`, or a local default. */
export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

/** Whether this run is on CI, where a missing server must fail the run instead of skipping tests. */
export const IS_CI = process.env.CI === 'true';

/**
 * Whether something answering the Redis protocol listens at `url`: sends `PING` over a bare socket and waits for
 * any reply (`+PONG`, or an error such as `-NOAUTH`, still proves a Redis server is there). Never throws.
 */
export function redisAnswers(url: string = REDIS_URL, timeoutMs = 1000): Promise<boolean> {
  const { hostname, port, protocol } = new URL(url);
  const host = hostname.replace(/^\[|\]$/g, '') || '127.0.0.1';
  const portNumber = Number(port || 6379);
  return new Promise((resolve) => {
    const socket: Socket =
      protocol === 'rediss:'
        ? connectTls({ host, port: portNumber, servername: host })
        : connectTcp({ host, port: portNumber });
    const timer = setTimeout(() => done(false), timeoutMs);
    const done = (answer: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(answer);
    };
    socket.once('error', () => done(false));
    socket.once('data', (chunk: Buffer) => done(chunk[0] === 0x2b /* + */ || chunk[0] === 0x2d /* - */));
    socket.write('PING\r\n');
  });
}

/**
 * Decides whether a Redis suite runs: `true` when `REDIS_URL` answers. When it does not, on CI (`CI=true`) this
 * throws, failing the run; elsewhere it warns loudly and returns `false` so the suite is skipped.
 */
export async function requireRedis(suite: string): Promise<boolean> {
  if (await redisAnswers()) return true;
  const message =
    `${suite}: no Redis answers at ${REDIS_URL}. Start one (e.g. \`redis-server\` or ` +
    `\`docker run -p 6379:6379 redis:7\`) or set REDIS_URL to run these tests.`;
  if (IS_CI) throw new Error(`${message} On CI (CI=true) a missing Redis fails the run.`);
  console.warn(`\n⚠️  SKIPPED ${message}\n`);
  return false;
}

/** A key prefix unique to this run, so that concurrent runs and suites never see each other's keys. */
export function uniquePrefix(label = 'test'): string {
  return `idempotency-${label}:${randomUUID()}:`;
}

/** Escapes glob metacharacters so that a SCAN `MATCH` pattern matches the prefix literally. */
function globEscape(text: string): string {
  return text.replace(/[*?[\]\\]/g, '\\$&');
}

/** Every key of a standalone server that starts with `prefix` (SCAN, never KEYS). */
export async function keysWithPrefix(client: Redis, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await client.scan(cursor, 'MATCH', `${globEscape(prefix)}*`, 'COUNT', 1000);
    keys.push(...batch);
    cursor = next;
  } while (cursor !== '0');
  return keys;
}

/** Deletes the keys under `prefix`, and only those. Returns how many were deleted. */
export async function deleteKeysWithPrefix(client: Redis, prefix: string): Promise<number> {
  const keys = await keysWithPrefix(client, prefix);
  let deleted = 0;
  for (let i = 0; i < keys.length; i += 500) deleted += await client.del(...keys.slice(i, i + 500));
  return deleted;
}
