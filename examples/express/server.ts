/**
 * The example: an order endpoint made safe to retry. Runs on the in-memory backend by default; set REDIS_URL to
 * share keys (and the order sequence) between several processes through Redis.
 *
 *   npm start                                   # MemoryBackend, http://127.0.0.1:3000
 *   REDIS_URL=redis://127.0.0.1:6379 npm start  # RedisBackend
 *   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test npm start  # PostgresBackend
 *   MYSQL_URL=mysql://root@127.0.0.1:3306/test npm start            # MysqlBackend
 *   SQLITE_PATH=./idempotency.db npm start                          # SqliteBackend
 *
 * Environment: PORT (3000; 0 picks a free one), HOST (127.0.0.1), REDIS_URL, IDEMPOTENCY_PREFIX ('idempotency:'),
 * ORDER_DELAY_MS (0: how long placing an order takes, as a slow payment provider would make it);
 * for the SQL backends see `sql-backends.ts` (IDEMPOTENCY_BACKEND, IDEMPOTENCY_TABLE).
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import express from 'express';
import { type Backend, MemoryBackend } from 'idempotency-header';
import { idempotencyHeader } from 'idempotency-header/express';
import { RedisBackend } from 'idempotency-header/redis';
import { Redis } from 'ioredis';
import { sqlBackendFromEnv } from './sql-backends.js';

const port = Number(process.env.PORT ?? 3000);
const host = process.env.HOST ?? '127.0.0.1';
const prefix = process.env.IDEMPOTENCY_PREFIX ?? 'idempotency:';
const sql = await sqlBackendFromEnv();
const redisUrl = sql ? undefined : process.env.REDIS_URL;

// Fail fast while Redis is away, so that requests get a 503 at once instead of waiting for a reconnect.
const redis = redisUrl
  ? new Redis(redisUrl, {
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      commandTimeout: 2000,
      // Connected before the server listens: without the offline queue, a command sent earlier would fail.
      lazyConnect: true,
    })
  : undefined;
redis?.on('error', (error) => console.error('redis:', error.message));
await redis?.connect();
const backend: Backend = sql?.backend ?? (redis ? new RedisBackend({ redis, prefix }) : new MemoryBackend());

/** Order numbers: from Redis or the database when shared, so that every process counts the same orders. */
let localSequence = 0;
const nextOrderNumber = async () =>
  sql ? sql.nextOrderNumber() : redis ? redis.incr(`${prefix}example:order-sequence`) : ++localSequence;

const app = express();
app.use(express.json());
app.use(idempotencyHeader({ backend }));

const orderDelayMs = Number(process.env.ORDER_DELAY_MS ?? 0);

app.post('/orders', async (req, res, next) => {
  try {
    if (orderDelayMs > 0) await new Promise((resolve) => setTimeout(resolve, orderDelayMs));
    const number = await nextOrderNumber();
    res
      .status(201)
      .location(`/orders/${number}`)
      .json({ number, item: req.body?.item ?? null, pid: process.pid });
  } catch (error) {
    next(error);
  }
});

const server = app.listen(port, host, () => {
  const { port: actualPort } = server.address() as AddressInfo;
  const url = `http://${host}:${actualPort}/orders`;
  const key = randomUUID();
  const curl = `curl -i -X POST ${url} -H 'Idempotency-Key: ${key}' -H 'Content-Type: application/json' -d '{"item":"book"}'`;
  console.log(`Listening on ${url} (${sql?.name ?? (redis ? 'RedisBackend' : 'MemoryBackend')})`);
  console.log(
    'Run this twice: the first creates order 1; the second replays it, with Idempotent-Replayed: true.',
  );
  console.log(`  ${curl}`);
  console.log(`  ${curl}`);
});

const shutdown = () =>
  server.close(() => {
    redis?.disconnect();
    void sql?.close();
  });
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
