import { createHash, randomUUID } from 'node:crypto';
import { IdempotencyError, invalidOption, rejectUnknownOptions } from '../core/errors.js';
import type { AcquireResult, Backend, HeaderPair, IdempotencyRecord, KeyState } from '../core/types.js';
import { KeyWatchers } from './_watchers.js';

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
   *   being run after a reconnect, e.g. an acquire taking a lock nobody holds). Without the offline queue a
   *   command sent before the first connection is ready fails too: connect (`lazyConnect: true` and
   *   `await redis.connect()`) before the server listens.
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
  /**
   * Announces every stored response and released lock on a pub/sub channel (`prefix + 'notifications'`, the
   * message being the key), so that duplicates waiting with `onConflict: 'wait'` are woken at once, in any
   * process, instead of polling every 200 ms. The `PUBLISH` runs inside the complete and release scripts: no
   * extra round trip. The first wait opens one more connection, a `duplicate()` of `redis`, to subscribe with;
   * {@link RedisBackend.close} closes it. Turn it on in every process that shares the prefix. Not for a
   * node-redis pool, which has no `duplicate()`.
   * @default false
   */
  notifications?: boolean;
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

// Storage layout: one Redis string per idempotency key, at `prefix + key`, so that every step touches exactly one
// key (one hash slot: Cluster safe) and a lock turns into its record in place. The value is packed:
//   in flight: L<token>\n<lease end, ms since the epoch> <lease ms>\n<fingerprint>           key TTL = the lease
//   completed: D<fingerprint bytes> <createdAt> <status or -> <headers bytes>\n<fingerprint><headers JSON><body>
//              (a record remembered without its response: status `-`, no headers, no body)  key TTL = expiry
// One value rather than a hash of fields: a step reads or writes it with one plain command (SET, GET), where a
// hash took a command per field and its TTL another. A crashed process's lock lapses with the key's TTL; nothing
// else needs cleaning up.

// Acquire is not a script: `SET key <lock> NX PX <lease> GET` (Redis 7+) takes the key if it is free and returns
// what holds it otherwise, in one atomic command: of N concurrent acquires on a free key exactly one gets nil
// back. The lock carries its lease, so a lapsed lock is simply gone. Before Redis 7, where SET refuses NX with
// GET, the same step runs as this script (GET, then SET only if there was nothing: atomic, as every script is).
// KEYS[1] = the key; ARGV = lock value, lease ms.
const ACQUIRE = script(`local value = redis.call('GET', KEYS[1])
if value then
  return value
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false`);

// Atomicity: the token check and the write are one step, so a request whose lease lapsed (its key expired or was
// taken over by another token) cannot overwrite anything. The SET replaces the lock by the record and its TTL by
// the record's expiry (none: a SET without PX clears it), so the record never outlives its expiry.
// KEYS[1] = the key; ARGV = 'L' .. token .. '\n' (the lock's first bytes), record value, ttl ms or ''.
const COMPLETE = script(`local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1`);

// Atomicity: the token check and the DEL are one step, so a late release cannot free a key another request has
// taken since; a completed record starts with D, so it is never released by mistake.
// KEYS[1] = the key; ARGV = 'L' .. token .. '\n'.
const RELEASE = script(`local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1`);

// Atomicity: the token check and the SET are one step, so only the current holder's lease is extended; a lapsed
// lease (the key expired) is not revived. The lock is rewritten with its new lease end, fingerprint kept.
// KEYS[1] = the key; ARGV = 'L' .. token .. '\n', lease ms, lease end.
const RENEW = script(`local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
local rest = string.find(value, '\\n', #ARGV[1] + 1, true)
redis.call('SET', KEYS[1], ARGV[1] .. ARGV[3] .. ' ' .. ARGV[2] .. string.sub(value, rest), 'PX', ARGV[2])
return 1`);

/**
 * A script that also announces its success: the `PUBLISH` goes right before the script's `return 1` (its only
 * success), on the channel and with the message passed as its last two arguments. Derived from the script itself,
 * so that the two never drift apart.
 */
function publishing(base: Script): Script {
  const at = base.lua.lastIndexOf('return 1');
  if (at === -1) throw new Error('publishing(): the script has no `return 1`');
  return script(
    `${base.lua.slice(0, at)}redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])\n${base.lua.slice(at)}`,
  );
}

const COMPLETE_PUBLISHING = publishing(COMPLETE);
const RELEASE_PUBLISHING = publishing(RELEASE);

// For operators: the value and its time to live, read in one atomic step so that they belong together.
// KEYS[1] = the key.
const INSPECT = script(`return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}`);

// Atomicity: the lock check and the DEL are one step, so a key taken by a request between an operator's inspect
// and this forget is refused unless forced, never deleted from under it by surprise. Only the value's first byte
// is read (L: a lock, D: a record). A forced forget of a lock ends it as a release does: it is announced too.
// KEYS[1] = the key; ARGV = '1' to force or '0', then with notifications the channel and the message.
const FORGET = script(`local kind = redis.call('GETRANGE', KEYS[1], 0, 0)
if kind == '' or (kind == 'L' and ARGV[1] ~= '1') then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[3] then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1`);

/** RESP type bytes of node-redis v5+'s `RESP_TYPES.BLOB_STRING` and `SIMPLE_STRING`, mapped to `Buffer`. */
const BUFFER_REPLIES = { typeMapping: { 36: Buffer, 43: Buffer }, returnBuffers: true };

const MISMATCH: AcquireResult = Object.freeze({ state: 'mismatch' });

/** The option names the constructor takes: any other is refused, as the middleware refuses one. */
const OPTION_NAMES: ReadonlySet<string> = new Set(['redis', 'prefix', 'notifications']);

/**
 * Keeps keys, locks and responses in Redis, shared by every process that uses the same server or cluster.
 * Each method is one atomic step on one key, in one round trip: `acquire` a plain `SET … NX PX … GET` (a Lua
 * script before Redis 7), `complete`, `release` and `renew` a Lua script (EVALSHA; after a `SCRIPT FLUSH` or on a
 * new server, one more round trip to send the script with EVAL). Cluster safe.
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
 *   lazyConnect: true,
 * });
 * redis.on('error', (error) => console.error(error));
 * await redis.connect(); // without the offline queue, a command sent before the connection is ready fails
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
  /** Whether the server takes `SET … NX GET` (Redis 7+); cleared by the first syntax error. */
  #setGet = true;
  /** The user's client, duplicated for the subscriber. */
  readonly #client: RedisClientLike;
  /** The pub/sub channel with `notifications` on; `undefined` off. */
  readonly #channel: string | undefined;
  /** Who waits for each key's lock to end ({@link watch}), woken by the channel's messages. */
  readonly #watchers = new KeyWatchers();
  /** The subscriber, once subscribed; `undefined` until the first {@link watch}, or after {@link close}. */
  #subscribing: Promise<Subscriber> | undefined;
  /** Whether {@link #subscribing} has resolved: the subscription is in place. */
  #subscribed = false;
  /** When subscribing last failed: for a while after, waiters poll rather than try again at once. */
  #subscribeFailedAt = Number.NEGATIVE_INFINITY;

  constructor(options: RedisBackendOptions) {
    rejectUnknownOptions(options, OPTION_NAMES);
    const {
      redis,
      prefix = DEFAULT_REDIS_PREFIX,
      notifications = false,
    } = options ?? ({} as Partial<RedisBackendOptions>);
    const send = senderFor(redis);
    if (send === undefined) {
      throw invalidOption(
        'redis',
        'an ioredis client or Cluster, or a node-redis (v4+) client, pool, cluster or sentinel',
        redis,
      );
    }
    if (typeof prefix !== 'string') throw invalidOption('prefix', 'a string', prefix);
    if (typeof notifications !== 'boolean') throw invalidOption('notifications', 'a boolean', notifications);
    if (notifications && typeof (redis as { duplicate?: unknown }).duplicate !== 'function') {
      throw invalidOption(
        'redis',
        'a client with duplicate() (not a node-redis pool), for notifications',
        redis,
      );
    }
    this.#send = send;
    this.#prefix = prefix;
    this.#client = redis;
    this.#channel = notifications ? `${prefix}notifications` : undefined;
  }

  async acquire(key: string, fingerprint: string, leaseMs: number): Promise<AcquireResult> {
    const redisKey = this.#prefix + key;
    if (!this.#evictionChecked) {
      this.#evictionChecked = true;
      void this.#warnIfEvicting(redisKey);
    }
    const token = randomUUID();
    const lease = milliseconds(leaseMs);
    const lock = `L${token}\n${Date.now() + Number(lease)} ${lease}\n${fingerprint}`;
    let reply: unknown;
    if (this.#setGet) {
      try {
        reply = await this.#send(redisKey, ['SET', redisKey, lock, 'NX', 'PX', lease, 'GET']);
      } catch (error) {
        // Before Redis 7, SET does not take NX with GET: from now on, the script does the same.
        if (!isSyntaxError(error)) throw error;
        this.#setGet = false;
      }
    }
    if (!this.#setGet) reply = await this.#run(ACQUIRE, redisKey, [lock, lease]);
    if (reply === null || reply === undefined) return { state: 'acquired', token };
    return heldBy(fingerprint, value(reply));
  }

  async complete(
    key: string,
    token: string,
    record: IdempotencyRecord,
    ttlMs: number | null,
  ): Promise<boolean> {
    const args = [lockHead(token), packRecord(record), ttlMs === null ? '' : milliseconds(ttlMs)];
    // With notifications, the same one script also publishes: waiters are told without another round trip.
    if (this.#channel !== undefined) {
      return flag(
        'complete',
        await this.#run(COMPLETE_PUBLISHING, this.#prefix + key, [...args, this.#channel, key]),
      );
    }
    const reply = await this.#run(COMPLETE, this.#prefix + key, args);
    return flag('complete', reply);
  }

  async release(key: string, token: string): Promise<boolean> {
    if (this.#channel !== undefined) {
      const args = [lockHead(token), this.#channel, key];
      return flag('release', await this.#run(RELEASE_PUBLISHING, this.#prefix + key, args));
    }
    return flag('release', await this.#run(RELEASE, this.#prefix + key, [lockHead(token)]));
  }

  async renew(key: string, token: string, leaseMs: number): Promise<boolean> {
    const lease = milliseconds(leaseMs);
    const reply = await this.#run(RENEW, this.#prefix + key, [
      lockHead(token),
      lease,
      String(Date.now() + Number(lease)),
    ]);
    return flag('renew', reply);
  }

  /**
   * The key's state, its value and time to live read in one script: see {@link Backend.inspect}. The lease left
   * and the expiry are Redis's own (the key's PTTL).
   */
  async inspect(key: string): Promise<KeyState | undefined> {
    const reply = await this.#run(INSPECT, this.#prefix + key, []);
    if (!Array.isArray(reply) || reply.length !== 2) throw unexpectedReply('inspect', reply);
    const [held, ttl] = reply as [unknown, unknown];
    if (held === null || held === undefined) return undefined;
    return keyStateOf(value(held), Number(Buffer.isBuffer(ttl) ? ttl.toString() : ttl));
  }

  /**
   * Deletes the key's record, or its lock only with `force` (announced, with `notifications`, so that waiters
   * look again), in one script: see {@link Backend.forget}.
   */
  async forget(key: string, force: boolean): Promise<boolean> {
    const args = this.#channel === undefined ? [force ? '1' : '0'] : [force ? '1' : '0', this.#channel, key];
    return flag('forget', await this.#run(FORGET, this.#prefix + key, args));
  }

  /**
   * With `notifications` on, resolves once the key may have been stored or released, as announced on the channel
   * by any process, or once `signal` aborts; off, `undefined` (the key is polled). The first call subscribes,
   * on a duplicate of the client.
   */
  watch(key: string, signal: AbortSignal): Promise<void> | undefined {
    const channel = this.#channel;
    if (channel === undefined) return undefined;
    // A subscription that just failed (Redis refused SUBSCRIBE, or the duplicate could not connect) is not tried
    // again for every round of every waiter: they poll meanwhile.
    if (this.#subscribing === undefined && Date.now() - this.#subscribeFailedAt < SUBSCRIBE_RETRY_MS) {
      return undefined;
    }
    // Until the subscription is in place, a message could pass unheard: a watch begun before it (or when it
    // failed) wakes its waiter then, to look again.
    const ready = this.#subscribed ? undefined : (this.#subscribing ?? this.#subscribe(channel));
    return this.#watchers.watch(key, signal, ready);
  }

  /**
   * Closes the subscriber connection that `notifications` opened on the first wait, if any. The client passed
   * in is left open: it is the application's.
   */
  async close(): Promise<void> {
    const subscribing = this.#subscribing;
    this.#subscribing = undefined;
    this.#subscribed = false;
    if (subscribing === undefined) return;
    const subscriber = await subscribing.catch(() => undefined);
    await subscriber?.close();
  }

  #subscribe(channel: string): Promise<Subscriber> {
    const subscribing = subscribe(this.#client, channel, {
      message: (key) => this.#watchers.wake(key),
      // Messages sent while the connection was down are lost: every waiter looks again once it is back.
      reconnected: () => this.#watchers.wakeAll(),
    });
    this.#subscribing = subscribing;
    subscribing.then(
      (subscriber) => {
        // Closed while it was being opened: close it too.
        if (this.#subscribing === subscribing) this.#subscribed = true;
        else void subscriber.close();
      },
      () => {
        // Not subscribed: a watch after SUBSCRIBE_RETRY_MS tries again; its waiters poll meanwhile.
        this.#subscribeFailedAt = Date.now();
        if (this.#subscribing === subscribing) this.#subscribing = undefined;
      },
    );
    return subscribing;
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
  async #run(script: Script, redisKey: string, args: RedisArgument[]): Promise<unknown> {
    try {
      return await this.#send(redisKey, ['EVALSHA', script.sha, '1', redisKey, ...args]);
    } catch (error) {
      if (!isNoScript(error)) throw error;
      return await this.#send(redisKey, ['EVAL', script.lua, '1', redisKey, ...args]);
    }
  }
}

/** How long after a failed subscription waiters poll before another one is tried. */
const SUBSCRIBE_RETRY_MS = 5_000;

/** A subscription to the notification channel, on a connection of its own. */
interface Subscriber {
  close(): Promise<void>;
}

/** What the subscriber tells the backend. */
interface SubscriberEvents {
  /** A message on the channel: the key that was stored or released. */
  message(key: string): void;
  /** The connection is back after it was lost (and the driver subscribed again): messages may have been missed. */
  reconnected(): void;
}

/** The part of an ioredis `Redis` or `Cluster` (a duplicate) that subscribing uses. */
interface IoredisSubscriberLike {
  status: string;
  on(event: string, listener: (...args: never[]) => void): unknown;
  once(event: string, listener: (...args: never[]) => void): unknown;
  connect(): Promise<unknown>;
  subscribe(channel: string): Promise<unknown>;
  disconnect(): void;
}

/** The part of a node-redis client, cluster or sentinel (a duplicate) that subscribing uses. */
interface NodeRedisSubscriberLike {
  on(event: string, listener: (...args: never[]) => void): unknown;
  connect(): Promise<unknown>;
  subscribe(channel: string, listener: (message: string) => void): Promise<unknown>;
  destroy?(): void;
  disconnect?(): Promise<unknown>;
  quit?(): Promise<unknown>;
}

/**
 * Subscribes to `channel` on a duplicate of `client` (a subscribed connection can do nothing else), and resolves
 * once the subscription is in place. Both drivers subscribe again by themselves after a reconnect. The
 * duplicate's errors are heard (an `'error'` event without a listener would end the process) and otherwise
 * ignored: while it is down, waiters are woken by their timers.
 */
async function subscribe(
  client: RedisClientLike,
  channel: string,
  events: SubscriberEvents,
): Promise<Subscriber> {
  const ignore = () => {};
  if (typeof (client as Partial<IoredisClientLike>).callBuffer === 'function') {
    // A Cluster subscribes again through its own subscriber connection, which handles a failure; a Redis client
    // subscribes again by itself too, but sends that SUBSCRIBE without handling its failure: a connection lost
    // again before Redis answers (or maxRetriesPerRequest reached) left an unhandled rejection, which ends a
    // Node.js process. So a Redis client's duplicate does not, and this subscribes again itself.
    const cluster = (client as { isCluster?: unknown }).isCluster === true;
    const subscriber = cluster
      ? (client as unknown as { duplicate(): IoredisSubscriberLike }).duplicate()
      : (client as unknown as { duplicate(options: object): IoredisSubscriberLike }).duplicate({
          autoResubscribe: false,
        });
    const close = async () => subscriber.disconnect();
    subscriber.on('error', ignore);
    subscriber.on('message', ((from: string, message: string) => {
      if (from === channel) events.message(message);
    }) as never);
    try {
      // A client made with enableOfflineQueue: false (as the backend's documentation advises) refuses SUBSCRIBE
      // until it is connected; a lazyConnect one does not connect by itself.
      if (subscriber.status === 'wait') subscriber.connect().catch(ignore);
      if (subscriber.status !== 'ready') {
        await new Promise<void>((resolve, reject) => {
          subscriber.once('ready', resolve as never);
          subscriber.once('end', (() => reject(new Error('The Redis subscriber connection ended'))) as never);
        });
      }
      await subscriber.subscribe(channel);
    } catch (error) {
      await close();
      throw error;
    }
    // Waiters look again once the subscription is back (or could not be: their timers wake them meanwhile).
    const resubscribe = () => subscriber.subscribe(channel).then(events.reconnected, events.reconnected);
    subscriber.on('ready', (cluster ? events.reconnected : resubscribe) as never);
    return { close };
  }
  const subscriber = (client as unknown as { duplicate(): NodeRedisSubscriberLike }).duplicate();
  const close = async () => {
    if (typeof subscriber.destroy === 'function') subscriber.destroy();
    else await (subscriber.disconnect ?? subscriber.quit)?.call(subscriber).catch(ignore);
  };
  subscriber.on('error', ignore);
  try {
    await subscriber.connect();
    await subscriber.subscribe(channel, (message) => events.message(message));
  } catch (error) {
    await close();
    throw error;
  }
  subscriber.on('ready', events.reconnected as never);
  return { close };
}

/**
 * What {@link RedisBackend.inspect} tells of a value (see the storage layout above) and its PTTL: the lease left
 * or the expiry are Redis's, the time a record was stored the storing process's.
 */
function keyStateOf(held: Buffer, ttlMs: number): KeyState {
  const value = parseValue(held);
  if (value.kind === 'lock') {
    return { state: 'in-flight', fingerprint: value.fingerprint, leaseLeftMs: Math.max(1, ttlMs) };
  }
  return {
    state: 'completed',
    fingerprint: value.fingerprint,
    status: value.status ?? null,
    storedAt: value.createdAt,
    // PTTL -1: the record has no expiry (stored with `expiry: null`).
    expiresAt: ttlMs < 0 ? null : Date.now() + ttlMs,
    size: held.byteLength - value.bodyAt,
  };
}

/** The first bytes of a lock taken with `token`: what complete, release and renew compare. */
function lockHead(token: string): string {
  return `L${token}\n`;
}

/** A completed record as one value: a header line of lengths and numbers, then fingerprint, headers and body. */
function packRecord(record: IdempotencyRecord): Buffer {
  const { response, fingerprint, createdAt } = record;
  const fingerprintBytes = Buffer.byteLength(fingerprint);
  if (response === null) {
    return Buffer.from(`D${fingerprintBytes} ${createdAt} - 0\n${fingerprint}`);
  }
  const headers = JSON.stringify(response.headers);
  const head = `D${fingerprintBytes} ${createdAt} ${response.status} ${Buffer.byteLength(headers)}\n${fingerprint}${headers}`;
  const headBytes = Buffer.byteLength(head);
  const packed = Buffer.allocUnsafe(headBytes + response.body.byteLength);
  packed.write(head, 0);
  packed.set(response.body, headBytes);
  return packed;
}

/**
 * What an acquire found holding the key: a lock (in flight) or a record (completed), either `mismatch` if its
 * fingerprint differs. The Retry-After hint of a lock is its lease end by the holder's clock, within its lease.
 */
function heldBy(fingerprint: string, held: Buffer): AcquireResult {
  const value = parseValue(held);
  if (value.fingerprint !== fingerprint) return MISMATCH;
  if (value.kind === 'lock') {
    return {
      state: 'in-flight',
      retryAfterMs: Math.min(value.lease, Math.max(1, value.leaseEnd - Date.now())),
    };
  }
  const { createdAt, status, headersAt, bodyAt } = value;
  return {
    state: 'completed',
    record: {
      fingerprint,
      createdAt,
      response:
        status === undefined
          ? null
          : {
              status,
              headers: parseHeaders(held.toString('utf8', headersAt, bodyAt)),
              body: held.subarray(bodyAt),
            },
    },
  };
}

/** A stored value taken apart: see the storage layout above. */
type StoredValue =
  | { readonly kind: 'lock'; readonly fingerprint: string; readonly leaseEnd: number; readonly lease: number }
  | {
      readonly kind: 'record';
      readonly fingerprint: string;
      readonly createdAt: number;
      /** `undefined` for a request remembered without its response. */
      readonly status: number | undefined;
      readonly headersAt: number;
      readonly bodyAt: number;
    };

/** Takes a value apart; throws for one this backend did not write. */
function parseValue(held: Buffer): StoredValue {
  const newline = held.indexOf(10);
  if (held[0] === 0x4c /* L */ && newline !== -1) {
    const second = held.indexOf(10, newline + 1);
    if (second !== -1) {
      const [leaseEnd, lease] = held
        .toString('latin1', newline + 1, second)
        .split(' ')
        .map(Number);
      if (Number.isFinite(leaseEnd) && Number.isFinite(lease)) {
        const fingerprint = held.toString('utf8', second + 1);
        return { kind: 'lock', fingerprint, leaseEnd: leaseEnd!, lease: lease! };
      }
    }
  } else if (held[0] === 0x44 /* D */ && newline !== -1) {
    const [fingerprintBytes, createdAt, status, headersBytes] = held
      .toString('latin1', 1, newline)
      .split(' ')
      .map((field) => (field === '-' ? Number.NaN : Number(field)));
    const headersAt = newline + 1 + fingerprintBytes!;
    const bodyAt = headersAt + headersBytes!;
    if (Number.isInteger(createdAt) && Number.isInteger(headersBytes) && bodyAt <= held.byteLength) {
      return {
        kind: 'record',
        fingerprint: held.toString('utf8', newline + 1, headersAt),
        createdAt: createdAt!,
        status: Number.isInteger(status) ? status : undefined,
        headersAt,
        bodyAt,
      };
    }
  }
  throw new IdempotencyError(
    'ERR_IDEMPOTENCY_BACKEND',
    `The Redis key holds a value RedisBackend did not write (${held.byteLength} bytes): is another program using the prefix?`,
  );
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
    const ioredis = redis as IoredisClientLike & Partial<Record<string, unknown>>;
    return async (_key, [command, ...args]) => {
      // The command's own method (setBuffer, evalshaBuffer) where the client has one: with enableAutoPipelining,
      // ioredis 6 drops callBuffer's command name and sends the key as the command.
      const method = ioredis[`${(command as string).toLowerCase()}Buffer`];
      return typeof method === 'function'
        ? (method as (...args: RedisArgument[]) => Promise<unknown>).apply(ioredis, args)
        : ioredis.callBuffer(command as string, ...args);
    };
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

function isSyntaxError(error: unknown): boolean {
  return error instanceof Error && /^ERR syntax error/i.test(error.message);
}

/** PEXPIRE takes whole milliseconds, at least 1 (0 would delete the key). */
function milliseconds(ms: number): string {
  return String(Math.max(1, Math.ceil(ms)));
}

/** A value read from Redis, as bytes. */
function value(reply: unknown): Buffer {
  if (Buffer.isBuffer(reply)) return reply;
  if (reply instanceof Uint8Array) return Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength);
  // A client that ignored the request for Buffer replies: only correct for UTF-8 text bodies.
  if (typeof reply === 'string') return Buffer.from(reply, 'utf8');
  throw unexpectedReply('acquire', reply);
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
