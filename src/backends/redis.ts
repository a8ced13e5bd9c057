import { createHash, randomUUID } from 'node:crypto';
import { IdempotencyError, invalidOption } from '../core/errors.js';
import type { AcquireResult, Backend, HeaderPair, IdempotencyRecord } from '../core/types.js';

/** A command argument as both clients accept it. */
type RedisArgument = string | Buffer;

/**
 * The part of an `ioredis` client this backend uses; `Redis` and `Cluster` both have it. Commands go through
 * `callBuffer`, so bulk replies come back as `Buffer`s and bodies stay binary.
 *
 * @example
 * ```ts
 * import { Cluster } from 'ioredis';
 * const redis: IoredisClientLike = new Cluster([{ host: 'redis-1', port: 6379 }]);
 * ```
 */
export interface IoredisClientLike {
  callBuffer(command: string, ...args: RedisArgument[]): Promise<unknown>;
}

/**
 * The part of a `redis` (node-redis v4+) client this backend uses; `createClient()` and `createClientPool()`
 * have it. Buffer replies are asked for per command, with `typeMapping` (v5+) and `returnBuffers` (v4).
 *
 * @example
 * ```ts
 * import { createClient } from 'redis';
 * const redis: NodeRedisClientLike = await createClient({ url: 'redis://localhost:6379' }).connect();
 * ```
 */
export interface NodeRedisClientLike {
  sendCommand(args: RedisArgument[], options?: object): Promise<unknown>;
}

/**
 * The part of a `redis` (node-redis v4+) cluster this backend uses; recognised by its `getSlotMaster`. Each
 * command is routed by its one key.
 *
 * @example
 * ```ts
 * import { createCluster } from 'redis';
 * const redis: NodeRedisClusterLike = await createCluster({ rootNodes: [{ url: 'redis://redis-1:6379' }] }).connect();
 * ```
 */
export interface NodeRedisClusterLike {
  sendCommand(
    firstKey: RedisArgument | undefined,
    isReadonly: boolean | undefined,
    args: RedisArgument[],
    options?: object,
  ): Promise<unknown>;
  getSlotMaster(slot: number): unknown;
}

/**
 * The part of a `redis` (node-redis v5+) sentinel, `createSentinel()`, this backend uses; recognised by its
 * `getMasterNode`. Commands go to the master.
 *
 * @example
 * ```ts
 * import { createSentinel } from 'redis';
 * const redis: NodeRedisSentinelLike = await createSentinel({ name: 'mymaster', sentinelRootNodes }).connect();
 * ```
 */
export interface NodeRedisSentinelLike {
  sendCommand(isReadonly: boolean | undefined, args: RedisArgument[], options?: object): Promise<unknown>;
  getMasterNode(): unknown;
}

/**
 * Any client {@link RedisBackend} accepts. It is recognised by its shape: this package imports neither driver, so
 * users install only the one they use.
 *
 * @example
 * ```ts
 * function backendFor(redis: RedisClientLike) {
 *   return new RedisBackend({ redis });
 * }
 * ```
 */
export type RedisClientLike =
  | IoredisClientLike
  | NodeRedisClientLike
  | NodeRedisClusterLike
  | NodeRedisSentinelLike;

/**
 * Options of {@link RedisBackend}.
 *
 * @example
 * ```ts
 * const options: RedisBackendOptions = { redis, prefix: 'billing:idempotency:' };
 * const backend = new RedisBackend(options);
 * ```
 */
export interface RedisBackendOptions {
  /**
   * A connected client: an `ioredis` `Redis` or `Cluster`, or a `redis` (node-redis v4+) client, pool, cluster
   * or sentinel. Its errors reject the backend's promises unchanged (the engine reports them as backend errors).
   *
   * By default both drivers wait for Redis rather than fail: commands are queued while disconnected and resent
   * on reconnect, and a sent command waits for its reply as long as the connection stays open. For
   * `onBackendError` to act within seconds, make the client fail fast:
   * - ioredis: `{ enableOfflineQueue: false, maxRetriesPerRequest: 0, autoResendUnfulfilledCommands: false,
   *   commandTimeout: 2000 }` (`autoResendUnfulfilledCommands: false` keeps a command that already failed from
   *   being run after a reconnect, e.g. an acquire taking a lock nobody holds).
   * - node-redis: `{ disableOfflineQueue: true, pingInterval: 1000, socket: { socketTimeout: 3000,
   *   reconnectStrategy: (retries) => Math.min(retries * 100, 2000) } }`. Its `commandOptions.timeout` only
   *   bounds the wait before a command is sent; `socketTimeout` closes a connection whose server went silent (and
   *   so fails the commands waiting on it), `pingInterval` keeps an idle connection from looking silent.
   *
   * Listen to the client's `'error'` event: an `'error'` event without a listener crashes the process.
   */
  redis: RedisClientLike;
  /**
   * Prepended to every key: the Redis key of an idempotency key is exactly `prefix + key` (an ioredis
   * `keyPrefix`, if the client has one, comes before it). Keys of different applications sharing a server
   * must not share a prefix.
   * @default 'idempotency:'
   */
  prefix?: string;
}

/**
 * Default of {@link RedisBackendOptions.prefix}.
 *
 * @example
 * ```ts
 * new RedisBackend({ redis, prefix: `${DEFAULT_REDIS_PREFIX}tenant-a:` });
 * ```
 */
export const DEFAULT_REDIS_PREFIX = 'idempotency:';

/** Sends one command about one key; `key` routes it on a cluster. */
type Send = (key: string, args: RedisArgument[]) => Promise<unknown>;

interface Script {
  readonly lua: string;
  readonly sha: string;
}

function script(lua: string): Script {
  return { lua, sha: createHash('sha1').update(lua).digest('hex') };
}

// Storage layout: one Redis hash per idempotency key, at `prefix + key`, so that every script touches exactly one
// key (one hash slot: Cluster safe) and a lock turns into its record in place.
//   in flight: state=lock,  token, fingerprint;                                   key TTL = the lease
//   completed: state=done,  fingerprint, status, headers (JSON), body (raw bytes), createdAt; key TTL = expiry
// A crashed process's lock lapses with the key's TTL; nothing else needs cleaning up.

// Atomicity: Redis runs a script to completion with no other command in between, so reading the key's state and
// taking the lock are one step: of N concurrent acquires on a free key exactly one sees it free. HSET and PEXPIRE
// run in the same step, so a lock never exists without its lease. The token is made by the caller (ARGV[3]) so
// the script stays deterministic.
// KEYS[1] = the key; ARGV = fingerprint, lease ms, new token.
const ACQUIRE = script(`local key = KEYS[1]
local entry = redis.call('HMGET', key, 'state', 'fingerprint')
local state = entry[1]
if not state then
  redis.call('HSET', key, 'state', 'lock', 'token', ARGV[3], 'fingerprint', ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
  return {'acquired'}
end
if entry[2] ~= ARGV[1] then
  return {'mismatch'}
end
if state == 'lock' then
  local ttl = redis.call('PTTL', key)
  if ttl < 1 then ttl = 1 end
  return {'in-flight', ttl}
end
local record = redis.call('HMGET', key, 'status', 'headers', 'body', 'createdAt')
return {'completed', record[1], record[2], record[3], record[4]}`);

// Atomicity: the token check and the write are one step, so a request whose lease lapsed (its key expired or was
// taken over by another token) cannot overwrite anything. DEL + HSET replace the lock by the record and drop the
// lease's TTL in the same step; PEXPIRE then sets the record's expiry (none when ARGV[2] is empty), so the record
// never exists without its expiry and never outlives it.
// KEYS[1] = the key; ARGV = token, ttl ms or '', fingerprint, createdAt, then status, headers, body (absent for a
// request remembered without its response).
const COMPLETE = script(`local key = KEYS[1]
if redis.call('HGET', key, 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', key)
if ARGV[5] then
  redis.call('HSET', key, 'state', 'done', 'fingerprint', ARGV[3], 'createdAt', ARGV[4], 'status', ARGV[5],
    'headers', ARGV[6], 'body', ARGV[7])
else
  redis.call('HSET', key, 'state', 'done', 'fingerprint', ARGV[3], 'createdAt', ARGV[4])
end
if ARGV[2] ~= '' then
  redis.call('PEXPIRE', key, ARGV[2])
end
return 1`);

// Atomicity: the token check and the DEL are one step, so a late release cannot free a key another request has
// taken since; a completed record has no token field, so it is never released by mistake.
// KEYS[1] = the key; ARGV = token.
const RELEASE = script(`if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1`);

// Atomicity: the token check and the PEXPIRE are one step, so only the current holder's lease is extended; a
// lapsed lease (the key expired) is not revived.
// KEYS[1] = the key; ARGV = token, lease ms.
const RENEW = script(`if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`);

/** RESP type bytes of node-redis v5+'s `RESP_TYPES.BLOB_STRING` and `SIMPLE_STRING`, mapped to `Buffer`. */
const BUFFER_REPLIES = { typeMapping: { 36: Buffer, 43: Buffer }, returnBuffers: true };

const MISMATCH: AcquireResult = Object.freeze({ state: 'mismatch' });

/**
 * Keeps keys, locks and responses in Redis, shared by every process that uses the same server or cluster.
 * Each method is one Lua script on one key: one round trip (EVALSHA; after a `SCRIPT FLUSH` or on a new server,
 * one more to send the script with EVAL), atomic and Cluster safe.
 *
 * Works with `ioredis` (`Redis`, `Cluster`) and `redis` (node-redis v4+ client, pool, cluster or sentinel);
 * neither is imported, the client is recognised by its shape. Client errors reject the returned promise
 * unchanged. Configure the client to fail fast while Redis is unreachable (see {@link RedisBackendOptions.redis}).
 *
 * A lapsed lease ends with its key: the holder's `complete`, `release` and `renew` then return `false` even if
 * no other request has taken the key.
 *
 * @example
 * ```ts
 * import { Redis } from 'ioredis';
 * import { RedisBackend } from 'idempotency-header/redis';
 *
 * const redis = new Redis(process.env.REDIS_URL, {
 *   enableOfflineQueue: false,
 *   maxRetriesPerRequest: 0,
 *   autoResendUnfulfilledCommands: false,
 *   commandTimeout: 2000,
 * });
 * redis.on('error', (error) => console.error(error));
 * const backend = new RedisBackend({ redis, prefix: 'myapp:idempotency:' });
 * ```
 *
 * @example
 * ```ts
 * import { createClient } from 'redis';
 * import { RedisBackend } from 'idempotency-header/redis';
 *
 * const redis = createClient({
 *   url: process.env.REDIS_URL,
 *   disableOfflineQueue: true,
 *   pingInterval: 1000,
 *   socket: { socketTimeout: 3000, reconnectStrategy: (retries) => Math.min(retries * 100, 2000) },
 * });
 * redis.on('error', (error) => console.error(error));
 * await redis.connect();
 * const backend = new RedisBackend({ redis });
 * ```
 */
export class RedisBackend implements Backend {
  readonly #send: Send;
  readonly #prefix: string;
  #evictionChecked = false;

  constructor(options: RedisBackendOptions) {
    const { redis, prefix = DEFAULT_REDIS_PREFIX } = options ?? ({} as Partial<RedisBackendOptions>);
    const send = senderFor(redis);
    if (send === undefined) {
      throw invalidOption(
        'redis',
        'an ioredis client or Cluster, or a node-redis (v4+) client, pool, cluster or sentinel',
        redis,
      );
    }
    if (typeof prefix !== 'string') throw invalidOption('prefix', 'a string', prefix);
    this.#send = send;
    this.#prefix = prefix;
  }

  async acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    if (!this.#evictionChecked) {
      this.#evictionChecked = true;
      void this.#warnIfEvicting(this.#prefix + key);
    }
    const token = randomUUID();
    const reply = await this.#run(ACQUIRE, key, [fingerprint, milliseconds(leaseMs), token]);
    const fields = Array.isArray(reply) ? reply : [];
    const state = fields.length > 0 ? text(fields[0]) : undefined;
    switch (state) {
      case 'acquired':
        return { state, token };
      case 'in-flight':
        return { state, retryAfterMs: Number(text(fields[1])) };
      case 'mismatch':
        return MISMATCH;
      case 'completed':
        return { state, record: recordFrom(fingerprint, fields) };
      default:
        throw unexpectedReply('acquire', reply);
    }
  }

  async complete(
    key: string,
    token: string,
    record: IdempotencyRecord,
    ttlMs: number | null,
  ): Promise<boolean> {
    const response = record.response;
    const reply = await this.#run(COMPLETE, key, [
      token,
      ttlMs === null ? '' : milliseconds(ttlMs),
      record.fingerprint,
      String(record.createdAt),
      // A request remembered without its response stores no status, headers or body.
      ...(response === null
        ? []
        : [
            String(response.status),
            JSON.stringify(response.headers),
            Buffer.from(response.body.buffer, response.body.byteOffset, response.body.byteLength),
          ]),
    ]);
    return flag('complete', reply);
  }

  async release(key: string, token: string): Promise<boolean> {
    return flag('release', await this.#run(RELEASE, key, [token]));
  }

  async renew(key: string, token: string, leaseMs: number): Promise<boolean> {
    return flag('renew', await this.#run(RENEW, key, [token, milliseconds(leaseMs)]));
  }

  /**
   * Warns once, as a process warning (`IDEMPOTENCY_REDIS_EVICTION`), when the server may evict this backend's keys
   * under memory pressure: with any `maxmemory-policy` but `noeviction`, a record or a lock (all of which carry a
   * TTL, so `volatile-*` policies reach them too) can vanish before it expires, and a retry would run again. A
   * server that refuses `CONFIG` (managed services often do) is not second-guessed.
   */
  async #warnIfEvicting(redisKey: string): Promise<void> {
    let policy: string | undefined;
    try {
      policy = configValue(
        await this.#send(redisKey, ['CONFIG', 'GET', 'maxmemory-policy']),
        'maxmemory-policy',
      );
    } catch {
      return;
    }
    if (policy === undefined || policy === 'noeviction') return;
    process.emitWarning(
      `Redis maxmemory-policy is '${policy}': under memory pressure Redis may evict idempotency records and locks before they expire, and a retry would then run again. Set maxmemory-policy to noeviction, or keep idempotency keys on a Redis of their own that does.`,
      { code: 'IDEMPOTENCY_REDIS_EVICTION' },
    );
  }

  /** Runs a cached script in one round trip; only if Redis lost it (NOSCRIPT), sends it once more with EVAL. */
  async #run(script: Script, key: string, args: RedisArgument[]): Promise<unknown> {
    const redisKey = this.#prefix + key;
    try {
      return await this.#send(redisKey, ['EVALSHA', script.sha, '1', redisKey, ...args]);
    } catch (error) {
      if (!isNoScript(error)) throw error;
      return await this.#send(redisKey, ['EVAL', script.lua, '1', redisKey, ...args]);
    }
  }
}

/** The record in an acquire reply: `completed`, status, headers, body, createdAt (status absent: no response). */
function recordFrom(fingerprint: string, fields: unknown[]): IdempotencyRecord {
  const status = fields[1];
  return {
    fingerprint,
    createdAt: Number(text(fields[4])),
    response:
      status === null || status === undefined
        ? null
        : { status: Number(text(status)), headers: parseHeaders(text(fields[2])), body: bytes(fields[3]) },
  };
}

/** A `CONFIG GET` reply's value for `name`: a flat list (RESP2), or a map (RESP3), of Buffers or strings. */
function configValue(reply: unknown, name: string): string | undefined {
  const flat: unknown[] =
    reply instanceof Map
      ? [...reply.entries()].flat()
      : Array.isArray(reply)
        ? reply
        : reply !== null && typeof reply === 'object'
          ? Object.entries(reply).flat()
          : [];
  const at = flat.findIndex((item) => String(item) === name);
  return at === -1 || at + 1 >= flat.length ? undefined : String(flat[at + 1]);
}

function senderFor(redis: unknown): Send | undefined {
  if (typeof redis !== 'object' || redis === null) return undefined;
  const client = redis as Partial<
    Record<'callBuffer' | 'sendCommand' | 'getSlotMaster' | 'getMasterNode', unknown>
  >;
  // ioredis first: its clients also have a `sendCommand`, with another signature.
  if (typeof client.callBuffer === 'function') {
    const ioredis = redis as IoredisClientLike;
    return async (_key, [command, ...args]) => ioredis.callBuffer(command as string, ...args);
  }
  if (typeof client.sendCommand !== 'function') return undefined;
  // node-redis's cluster and sentinel take routing arguments before the command.
  if (typeof client.getSlotMaster === 'function') {
    const cluster = redis as NodeRedisClusterLike;
    return async (key, args) => cluster.sendCommand(key, false, args, BUFFER_REPLIES);
  }
  if (typeof client.getMasterNode === 'function') {
    const sentinel = redis as NodeRedisSentinelLike;
    return async (_key, args) => sentinel.sendCommand(false, args, BUFFER_REPLIES);
  }
  const nodeRedis = redis as NodeRedisClientLike;
  return async (_key, args) => nodeRedis.sendCommand(args, BUFFER_REPLIES);
}

function isNoScript(error: unknown): boolean {
  return error instanceof Error && error.message.startsWith('NOSCRIPT');
}

/** PEXPIRE takes whole milliseconds, at least 1 (0 would delete the key). */
function milliseconds(ms: number): string {
  return String(Math.max(1, Math.ceil(ms)));
}

function text(value: unknown): string {
  if (Buffer.isBuffer(value)) return value.toString('utf8');
  if (typeof value === 'string' || typeof value === 'number' || typeof value === 'bigint')
    return String(value);
  throw unexpectedReply('read', value);
}

function bytes(value: unknown): Uint8Array {
  if (value instanceof Uint8Array) return value;
  // A client that ignored the request for Buffer replies: only correct for UTF-8 text bodies.
  if (typeof value === 'string') return Buffer.from(value, 'utf8');
  throw unexpectedReply('read', value);
}

function parseHeaders(json: string): HeaderPair[] {
  const headers: unknown = JSON.parse(json);
  if (!Array.isArray(headers)) throw unexpectedReply('read', json);
  return headers as HeaderPair[];
}

function flag(operation: string, reply: unknown): boolean {
  const value = Buffer.isBuffer(reply) ? reply.toString('utf8') : reply;
  if (value === 1 || value === '1' || value === 1n) return true;
  if (value === 0 || value === '0' || value === 0n) return false;
  throw unexpectedReply(operation, reply);
}

function unexpectedReply(operation: string, reply: unknown): IdempotencyError {
  const shown = Buffer.isBuffer(reply) ? `<Buffer ${reply.byteLength} bytes>` : typeof reply;
  return new IdempotencyError(
    'ERR_IDEMPOTENCY_BACKEND',
    `Unexpected reply from Redis to ${operation}: ${shown}. Is the client configured with a reply transformer?`,
  );
}
