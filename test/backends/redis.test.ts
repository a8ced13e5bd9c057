/**
 * RedisBackend against real Redis: the backend contract with ioredis and node-redis (RESP2 and RESP3) on the
 * shared server at REDIS_URL, then with an ioredis `Cluster` and a node-redis cluster on a private one-node
 * cluster; plus the Redis-only promises: key layout, one round trip per step, NOSCRIPT fallback, errors.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster, Redis } from 'ioredis';
import { createClient, createCluster } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type IoredisClientLike,
  type NodeRedisClientLike,
  RedisBackend,
  type RedisClientLike,
} from '../../src/backends/redis.js';
import { IdempotencyError } from '../../src/core/errors.js';
import type { IdempotencyRecord } from '../../src/core/types.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import {
  deleteKeysWithPrefix,
  keysWithPrefix,
  REDIS_URL,
  requireRedis,
  uniquePrefix,
} from '../support/redis.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';

const redisUp = await requireRedis('RedisBackend tests');
/** The commands a counting client sent since `before`, less the one-time eviction check (`CONFIG GET`). */
function commandsSince(calls: readonly (readonly unknown[])[], before: number): unknown[] {
  return calls
    .slice(before)
    .map(([command]) => command)
    .filter((command) => command !== 'CONFIG');
}

const privateServers = redisUp && requireRedisServer('RedisBackend tests on a private redis-server');

const FINGERPRINT = 'f'.repeat(64);
const LEASE_MS = 30_000;

function makeRecord(body: Uint8Array = Buffer.from('{"ok":true}')): IdempotencyRecord {
  return {
    fingerprint: FINGERPRINT,
    createdAt: Date.now(),
    response: { status: 201, headers: [['content-type', 'application/json']], body },
  };
}

async function connectNodeRedis(url: string, options: { RESP?: 2 | 3 } = {}) {
  const client = createClient({ url, ...options });
  client.on('error', () => {});
  await client.connect();
  return client;
}

/** A client that counts the commands it sends and records their arguments: the one way to see round trips. */
interface CountingClient {
  readonly client: RedisClientLike;
  readonly calls: string[][];
}

function countingIoredis(redis: Redis): CountingClient {
  const calls: string[][] = [];
  const client: IoredisClientLike = {
    callBuffer(command, ...args) {
      calls.push([command, ...args.map(String)]);
      return redis.callBuffer(command, ...args);
    },
  };
  return { calls, client };
}

/** An ioredis client that refuses `SET … NX … GET` as servers before Redis 7 do (NX and GET together). */
function withoutSetNxGet(redis: Redis): CountingClient {
  const calls: string[][] = [];
  const client: IoredisClientLike = {
    callBuffer(command, ...args) {
      calls.push([command, ...args.map(String)]);
      const words = args.map((arg) => String(arg).toUpperCase());
      if (command === 'SET' && words.includes('NX') && words.includes('GET')) {
        return Promise.reject(new Error('ERR syntax error'));
      }
      return redis.callBuffer(command, ...args);
    },
  };
  return { calls, client };
}

function countingNodeRedis(redis: NodeRedisClientLike): CountingClient {
  const calls: string[][] = [];
  const client: NodeRedisClientLike = {
    sendCommand(args, options) {
      calls.push(args.map(String));
      return redis.sendCommand(args, options);
    },
  };
  return { calls, client };
}

describe.runIf(redisUp)('RedisBackend', () => {
  const contractTest = { describe, it, beforeAll, afterAll };
  /** Every backend of this project has the operator methods: their cases must run, never be skipped. */
  const contractOptions = { requires: ['inspect', 'forget'] } as const;

  describeBackendContract(
    'RedisBackend with ioredis',
    async () => {
      const redis = new Redis(REDIS_URL);
      // A second connection, and a node-redis one, on the same keys: the races spread over all three.
      const peer = new Redis(REDIS_URL);
      const nodeRedis = await connectNodeRedis(REDIS_URL);
      const prefix = uniquePrefix('ioredis');
      return {
        backend: new RedisBackend({ redis, prefix }),
        peers: [new RedisBackend({ redis: peer, prefix }), new RedisBackend({ redis: nodeRedis, prefix })],
        async teardown() {
          await deleteKeysWithPrefix(redis, prefix);
          await Promise.all([redis.quit(), peer.quit(), nodeRedis.close()]);
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describeBackendContract(
    'RedisBackend with ioredis and enableAutoPipelining',
    async () => {
      const redis = new Redis(REDIS_URL, { enableAutoPipelining: true });
      const prefix = uniquePrefix('ioredis-pipelined');
      return {
        backend: new RedisBackend({ redis, prefix }),
        async teardown() {
          await deleteKeysWithPrefix(redis, prefix);
          await redis.quit();
        },
      };
    },
    contractTest,
    contractOptions,
  );

  describeBackendContract(
    'RedisBackend on a server without SET NX GET (before Redis 7)',
    async () => {
      const redis = new Redis(REDIS_URL);
      const prefix = uniquePrefix('pre-7');
      return {
        backend: new RedisBackend({ redis: withoutSetNxGet(redis).client, prefix }),
        async teardown() {
          await deleteKeysWithPrefix(redis, prefix);
          await redis.quit();
        },
      };
    },
    contractTest,
    contractOptions,
  );

  for (const RESP of [2, 3] as const) {
    describeBackendContract(
      `RedisBackend with node-redis (RESP${RESP})`,
      async () => {
        const redis = await connectNodeRedis(REDIS_URL, { RESP });
        const admin = new Redis(REDIS_URL);
        const prefix = uniquePrefix('node-redis');
        return {
          backend: new RedisBackend({ redis, prefix }),
          async teardown() {
            await deleteKeysWithPrefix(admin, prefix);
            await Promise.all([redis.close(), admin.quit()]);
          },
        };
      },
      contractTest,
      contractOptions,
    );
  }

  describe('on the shared server', () => {
    const prefix = uniquePrefix('redis-specific');
    let admin: Redis;
    let nodeRedis: Awaited<ReturnType<typeof connectNodeRedis>>;

    beforeAll(async () => {
      admin = new Redis(REDIS_URL);
      nodeRedis = await connectNodeRedis(REDIS_URL);
    });

    afterAll(async () => {
      await deleteKeysWithPrefix(admin, prefix);
      await Promise.all([admin.quit(), nodeRedis.close()]);
    });

    const clients = [
      ['ioredis', () => countingIoredis(admin)],
      ['node-redis', () => countingNodeRedis(nodeRedis)],
    ] as const;

    describe('key layout', () => {
      it('keeps a lock at exactly prefix + key, as a string (token, lease, fingerprint) whose TTL is the lease', async () => {
        const backend = new RedisBackend({ redis: admin, prefix });
        const key = `layout:${randomUUID()}`;
        const before = Date.now();
        const result = await backend.acquire(key, FINGERPRINT, 5_000);
        if (result.state !== 'acquired') throw new Error('not acquired');
        expect(await keysWithPrefix(admin, `${prefix}layout:`)).toEqual([prefix + key]);
        expect(await admin.type(prefix + key)).toBe('string');
        const lock = /^L(.+)\n(\d+) (\d+)\n(.*)$/s.exec((await admin.get(prefix + key))!);
        expect(lock?.[1]).toBe(result.token);
        expect(Number(lock?.[2])).toBeGreaterThanOrEqual(before + 5_000);
        expect(Number(lock?.[2])).toBeLessThanOrEqual(Date.now() + 5_000);
        expect(lock?.[3]).toBe('5000');
        expect(lock?.[4]).toBe(FINGERPRINT);
        const ttl = await admin.pttl(prefix + key);
        expect(ttl).toBeGreaterThan(0);
        expect(ttl).toBeLessThanOrEqual(5_000);
      });

      it('turns the lock into the record in place, body as raw bytes, with the expiry as the TTL', async () => {
        const backend = new RedisBackend({ redis: admin, prefix });
        const key = `layout:${randomUUID()}`;
        const acquired = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (acquired.state !== 'acquired') throw new Error('not acquired');
        const record = makeRecord(randomBytes(1024));
        expect(await backend.complete(key, acquired.token, record, 90_000)).toBe(true);

        const stored = (await admin.getBuffer(prefix + key))!;
        const headers = JSON.stringify(record.response!.headers);
        const head = `D${FINGERPRINT.length} ${record.createdAt} 201 ${headers.length}\n${FINGERPRINT}${headers}`;
        expect(stored.subarray(0, head.length).toString()).toBe(head);
        expect(stored.subarray(head.length).equals(Buffer.from(record.response!.body))).toBe(true);
        const ttl = await admin.pttl(prefix + key);
        expect(ttl).toBeGreaterThan(LEASE_MS);
        expect(ttl).toBeLessThanOrEqual(90_000);
      });

      it('stores a record remembered without its response as its header line and fingerprint only', async () => {
        const backend = new RedisBackend({ redis: admin, prefix });
        const key = `layout:${randomUUID()}`;
        const acquired = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (acquired.state !== 'acquired') throw new Error('not acquired');
        const record: IdempotencyRecord = { fingerprint: FINGERPRINT, createdAt: Date.now(), response: null };
        expect(await backend.complete(key, acquired.token, record, 60_000)).toBe(true);
        expect(await admin.get(prefix + key)).toBe(
          `D${FINGERPRINT.length} ${record.createdAt} - 0\n${FINGERPRINT}`,
        );
      });

      it('stores a record completed with ttlMs null without any expiry', async () => {
        const backend = new RedisBackend({ redis: admin, prefix });
        const key = `layout:${randomUUID()}`;
        const acquired = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (acquired.state !== 'acquired') throw new Error('not acquired');
        expect(await backend.complete(key, acquired.token, makeRecord(), null)).toBe(true);
        expect(await admin.pttl(prefix + key)).toBe(-1);
      });

      it('uses the default prefix idempotency: when none is given', async () => {
        const backend = new RedisBackend({ redis: admin });
        const key = `${prefix}default:${randomUUID()}`;
        expect((await backend.acquire(key, FINGERPRINT, LEASE_MS)).state).toBe('acquired');
        try {
          expect(await admin.exists(`idempotency:${key}`)).toBe(1);
        } finally {
          await admin.del(`idempotency:${key}`);
        }
      });

      it("puts an ioredis client's own keyPrefix before the backend's prefix", async () => {
        const withKeyPrefix = new Redis(REDIS_URL, { keyPrefix: `${prefix}client:` });
        try {
          const backend = new RedisBackend({ redis: withKeyPrefix, prefix: 'backend:' });
          const key = randomUUID();
          expect((await backend.acquire(key, FINGERPRINT, LEASE_MS)).state).toBe('acquired');
          expect(await admin.exists(`${prefix}client:backend:${key}`)).toBe(1);
          expect((await backend.acquire(key, FINGERPRINT, LEASE_MS)).state).toBe('in-flight');
        } finally {
          await withKeyPrefix.quit();
        }
      });

      it.each(clients)('names only the key prefix + key in every command (%s)', async (_name, counting) => {
        const { client, calls } = counting();
        const backend = new RedisBackend({ redis: client, prefix });
        const key = `one-key:${randomUUID()}`;
        const result = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (result.state !== 'acquired') throw new Error('not acquired');
        await backend.acquire(key, FINGERPRINT, LEASE_MS);
        await backend.renew(key, result.token, LEASE_MS);
        await backend.complete(key, result.token, makeRecord(), 60_000);
        await backend.acquire(key, FINGERPRINT, LEASE_MS);
        await backend.release(key, result.token);
        const commands = calls.filter(([command]) => command !== 'CONFIG');
        expect(commands.length).toBeGreaterThanOrEqual(6);
        for (const [command, ...args] of commands) {
          if (command === 'SET') {
            expect(args[0]).toBe(prefix + key);
            continue;
          }
          const [, numberOfKeys, redisKey] = args;
          expect(['EVALSHA', 'EVAL']).toContain(command);
          expect(numberOfKeys).toBe('1');
          expect(redisKey).toBe(prefix + key);
        }
      });
    });

    describe('round trips', () => {
      it.each(clients)(
        'sends one command per acquire, complete, release and renew (%s)',
        async (_name, counting) => {
          const { client, calls } = counting();
          const backend = new RedisBackend({ redis: client, prefix });
          // Warm the server's script cache, so that what is measured is the steady state.
          const warm = `warm:${randomUUID()}`;
          const warmToken = await backend.acquire(warm, FINGERPRINT, LEASE_MS);
          if (warmToken.state !== 'acquired') throw new Error('not acquired');
          await backend.renew(warm, warmToken.token, LEASE_MS);
          await backend.release(warm, warmToken.token);
          const again = await backend.acquire(warm, FINGERPRINT, LEASE_MS);
          if (again.state !== 'acquired') throw new Error('not acquired');
          await backend.complete(warm, again.token, makeRecord(), 60_000);

          const roundTrips = async (step: () => Promise<unknown>) => {
            const before = calls.length;
            await step();
            return calls.length - before;
          };
          const key = `trips:${randomUUID()}`;
          let token = '';
          expect(
            await roundTrips(async () => {
              const result = await backend.acquire(key, FINGERPRINT, LEASE_MS);
              if (result.state === 'acquired') token = result.token;
            }),
          ).toBe(1);
          expect(await roundTrips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // in flight
          expect(await roundTrips(() => backend.renew(key, token, LEASE_MS))).toBe(1);
          expect(await roundTrips(() => backend.release(key, token))).toBe(1);
          expect(
            await roundTrips(async () => {
              const result = await backend.acquire(key, FINGERPRINT, LEASE_MS);
              if (result.state === 'acquired') token = result.token;
            }),
          ).toBe(1);
          expect(await roundTrips(() => backend.complete(key, token, makeRecord(), 60_000))).toBe(1);
          expect(await roundTrips(() => backend.acquire(key, FINGERPRINT, LEASE_MS))).toBe(1); // replay
          // acquire and replay are a plain SET … NX GET; the fenced steps are scripts.
          expect(calls.slice(-7).map(([command]) => command)).toEqual([
            'SET',
            'SET',
            'EVALSHA',
            'EVALSHA',
            'SET',
            'EVALSHA',
            'SET',
          ]);
        },
      );
    });

    describe('servers before Redis 7', () => {
      it('switches acquire to a script after the first refusal of SET NX GET, and never sends it again', async () => {
        const { client, calls } = withoutSetNxGet(admin);
        const backend = new RedisBackend({ redis: client, prefix });
        const key = `pre-7:${randomUUID()}`;
        const acquired = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (acquired.state !== 'acquired') throw new Error('not acquired');
        expect(commandsSince(calls, 0)[0]).toBe('SET');
        let before = calls.length;
        expect((await backend.acquire(key, FINGERPRINT, LEASE_MS)).state).toBe('in-flight');
        expect(commandsSince(calls, before)).toEqual(['EVALSHA']);
        expect(await backend.complete(key, acquired.token, makeRecord(), 60_000)).toBe(true);
        before = calls.length;
        const replay = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        expect(replay.state === 'completed' && Buffer.from(replay.record.response!.body).toString()).toBe(
          '{"ok":true}',
        );
        expect(commandsSince(calls, before)).toEqual(['EVALSHA']);
        expect(calls.filter(([command]) => command === 'SET')).toHaveLength(1);
      });
    });

    describe('errors', () => {
      it.each(clients)(
        'rejects with the client error when the key holds another type (%s)',
        async (_name, counting) => {
          const { client } = counting();
          const backend = new RedisBackend({ redis: client, prefix });
          const key = `wrong-type:${randomUUID()}`;
          await admin.hset(prefix + key, 'field', 'not a string');
          await expect(backend.acquire(key, FINGERPRINT, LEASE_MS)).rejects.toThrow(/WRONGTYPE/);
          await expect(backend.complete(key, 'token', makeRecord(), 1_000)).rejects.toThrow(/WRONGTYPE/);
          await expect(backend.release(key, 'token')).rejects.toThrow(/WRONGTYPE/);
          await expect(backend.renew(key, 'token', 1_000)).rejects.toThrow(/WRONGTYPE/);
        },
      );

      it.each(clients)(
        'rejects an acquire on a value it did not write, and leaves that value alone (%s)',
        async (_name, counting) => {
          const { client } = counting();
          const backend = new RedisBackend({ redis: client, prefix });
          const key = `foreign:${randomUUID()}`;
          await admin.set(prefix + key, 'written by someone else');
          await expect(backend.acquire(key, FINGERPRINT, LEASE_MS)).rejects.toThrow(/did not write/);
          expect(await backend.complete(key, 'token', makeRecord(), 1_000)).toBe(false);
          expect(await backend.release(key, 'token')).toBe(false);
          expect(await backend.renew(key, 'token', 1_000)).toBe(false);
          expect(await admin.get(prefix + key)).toBe('written by someone else');
        },
      );

      it('rejects when the client throws synchronously instead of returning a rejected promise', async () => {
        const backend = new RedisBackend({
          redis: {
            callBuffer() {
              throw new Error('boom');
            },
          },
        });
        await expect(backend.acquire('key', FINGERPRINT, LEASE_MS)).rejects.toThrow('boom');
      });

      it('rejects with ERR_IDEMPOTENCY_BACKEND on a reply it does not understand', async () => {
        const backend = new RedisBackend({ redis: { callBuffer: async () => 'OK' } });
        await expect(backend.acquire('key', FINGERPRINT, LEASE_MS)).rejects.toMatchObject({
          code: 'ERR_IDEMPOTENCY_BACKEND',
        });
        await expect(backend.release('key', 'token')).rejects.toBeInstanceOf(IdempotencyError);
      });
    });
  });

  describe('options', () => {
    it.each([
      ['undefined', undefined],
      ['null', null],
      ['a URL string', 'redis://127.0.0.1:6379'],
      ['an empty object', {}],
      ['a function', () => {}],
      ['an object whose sendCommand is not a function', { sendCommand: true }],
    ])('rejects %s as redis with an IdempotencyError naming redis', (_label, redis) => {
      expect(() => new RedisBackend({ redis } as never)).toThrow(IdempotencyError);
      expect(() => new RedisBackend({ redis } as never)).toThrow(/`redis`/);
    });

    it('rejects a missing options object with an error naming redis', () => {
      expect(() => new (RedisBackend as new (options?: unknown) => RedisBackend)()).toThrow(/`redis`/);
    });

    it('rejects a prefix that is not a string with an error naming prefix', () => {
      const redis = { callBuffer: async () => null };
      let error: unknown;
      try {
        new RedisBackend({ redis, prefix: 42 as never });
      } catch (caught) {
        error = caught;
      }
      expect(error).toBeInstanceOf(IdempotencyError);
      expect(error).toMatchObject({
        code: 'ERR_IDEMPOTENCY_OPTION',
        message: expect.stringContaining('`prefix`'),
      });
    });

    it('recognises a node-redis sentinel by its shape and sends commands to the master', async () => {
      const seen: unknown[] = [];
      const nodeRedis = await connectNodeRedis(REDIS_URL);
      const admin = new Redis(REDIS_URL);
      const prefix = uniquePrefix('sentinel-shape');
      try {
        const sentinelLike = {
          getMasterNode: () => undefined,
          sendCommand(isReadonly: boolean | undefined, args: string[], options?: object) {
            seen.push(isReadonly);
            return nodeRedis.sendCommand(args, options);
          },
        };
        const backend = new RedisBackend({ redis: sentinelLike, prefix });
        expect((await backend.acquire('k', FINGERPRINT, LEASE_MS)).state).toBe('acquired');
        expect((await backend.acquire('k', FINGERPRINT, LEASE_MS)).state).toBe('in-flight');
        // The two acquires, and the eviction check of the first (CONFIG GET), all to the master.
        expect(seen).toEqual([false, false, false]);
      } finally {
        await deleteKeysWithPrefix(admin, prefix);
        await Promise.all([nodeRedis.close(), admin.quit()]);
      }
    });

    it('recognises a node-redis cluster by its shape and routes each command by its key', async () => {
      const seen: { firstKey: unknown; isReadonly: unknown; command: unknown }[] = [];
      const nodeRedis = await connectNodeRedis(REDIS_URL);
      const admin = new Redis(REDIS_URL);
      const prefix = uniquePrefix('cluster-shape');
      try {
        const clusterLike = {
          getSlotMaster: () => undefined,
          sendCommand(
            firstKey: string | Buffer | undefined,
            isReadonly: boolean | undefined,
            args: string[],
          ) {
            seen.push({ firstKey, isReadonly, command: args[0] });
            return nodeRedis.sendCommand(args, { typeMapping: { 36: Buffer } });
          },
        };
        const backend = new RedisBackend({ redis: clusterLike, prefix });
        const result = await backend.acquire('k', FINGERPRINT, LEASE_MS);
        expect(result.state).toBe('acquired');
        // The eviction check (CONFIG GET) goes to the node that holds the key, too.
        expect(seen).toEqual([
          { firstKey: `${prefix}k`, isReadonly: false, command: 'CONFIG' },
          { firstKey: `${prefix}k`, isReadonly: false, command: 'SET' },
        ]);
      } finally {
        await deleteKeysWithPrefix(admin, prefix);
        await Promise.all([nodeRedis.close(), admin.quit()]);
      }
    });
  });

  describe.runIf(privateServers)('on a private server', () => {
    let server: RedisServer;
    let admin: Redis;
    let nodeRedis: Awaited<ReturnType<typeof connectNodeRedis>>;

    beforeAll(async () => {
      server = await startRedisServer();
      admin = new Redis(server.url);
      nodeRedis = await connectNodeRedis(server.url);
    });

    afterAll(async () => {
      admin?.disconnect();
      await nodeRedis?.close().catch(() => {});
      await server?.close();
    });

    it('writes nothing outside prefix + key', async () => {
      const prefix = 'only-here:';
      const backend = new RedisBackend({ redis: admin, prefix });
      const keys = ['a', 'b:c', 'é', `${randomUUID()}`];
      for (const key of keys) {
        const result = await backend.acquire(key, FINGERPRINT, LEASE_MS);
        if (result.state !== 'acquired') throw new Error('not acquired');
        await backend.renew(key, result.token, LEASE_MS);
        if (key === 'a') await backend.release(key, result.token);
        else await backend.complete(key, result.token, makeRecord(), 60_000);
      }
      const all = (await admin.keys('*')).sort();
      expect(all).toEqual(['only-here:b:c', `only-here:${keys[3]}`, 'only-here:é'].sort());
    });

    it.each([
      ['ioredis', () => countingIoredis(admin)],
      ['node-redis', () => countingNodeRedis(nodeRedis)],
    ] as const)(
      'keeps working after SCRIPT FLUSH, with one extra round trip to reload a script (%s)',
      async (_name, counting) => {
        const { client, calls } = counting();
        const backend = new RedisBackend({ redis: client, prefix: 'flush:' });
        const key = randomUUID();
        const steps: [string, () => Promise<unknown>][] = [];
        let token = '';
        steps.push([
          'acquire',
          async () => {
            const result = await backend.acquire(key, FINGERPRINT, LEASE_MS);
            if (result.state !== 'acquired') throw new Error('not acquired');
            token = result.token;
          },
        ]);
        steps.push(['renew', async () => expect(await backend.renew(key, token, LEASE_MS)).toBe(true)]);
        steps.push(['release', async () => expect(await backend.release(key, token)).toBe(true)]);
        steps.push(['acquire', steps[0]![1]]);
        steps.push([
          'complete',
          async () => expect(await backend.complete(key, token, makeRecord(), 60_000)).toBe(true),
        ]);
        for (const [name, step] of steps) {
          await admin.script('FLUSH');
          const before = calls.length;
          await step();
          // acquire is no script; the first acquire of a backend also asks once whether the server may evict keys
          // (CONFIG GET).
          expect(commandsSince(calls, before)).toEqual(name === 'acquire' ? ['SET'] : ['EVALSHA', 'EVAL']);
        }
        // A replay is one SET … NX GET, flushed scripts or not.
        const before = calls.length;
        expect((await backend.acquire(key, FINGERPRINT, LEASE_MS)).state).toBe('completed');
        expect(commandsSince(calls, before)).toEqual(['SET']);
      },
    );
  });

  describe.runIf(privateServers)('on a private server whose eviction policy changes', () => {
    let server: RedisServer;
    let admin: Redis;
    let nodeRedis: Awaited<ReturnType<typeof connectNodeRedis>>;

    beforeAll(async () => {
      server = await startRedisServer();
      admin = new Redis(server.url);
      nodeRedis = await connectNodeRedis(server.url);
    });

    afterAll(async () => {
      admin?.disconnect();
      await nodeRedis?.close().catch(() => {});
      await server?.close();
    });

    it('warns once when the server may evict its keys, and not when it may not', async () => {
      const warnings: Error[] = [];
      const onWarning = (warning: Error) => {
        if ((warning as Error & { code?: string }).code === 'IDEMPOTENCY_REDIS_EVICTION')
          warnings.push(warning);
      };
      process.on('warning', onWarning);
      try {
        for (const [policy, client] of [
          ['noeviction', admin],
          ['allkeys-lru', admin],
          ['volatile-ttl', nodeRedis],
        ] as const) {
          await admin.config('SET', 'maxmemory-policy', policy);
          const backend = new RedisBackend({ redis: client, prefix: `eviction-${policy}:` });
          for (let i = 0; i < 3; i++) await backend.acquire(randomUUID(), FINGERPRINT, LEASE_MS);
          await new Promise((resolve) => setImmediate(resolve));
        }
      } finally {
        process.off('warning', onWarning);
        await admin.config('SET', 'maxmemory-policy', 'noeviction');
      }
      expect(warnings.map((warning) => warning.message.match(/'([a-z-]+)'/)?.[1])).toEqual([
        'allkeys-lru',
        'volatile-ttl',
      ]);
    });
  });

  describe.runIf(privateServers)('on a private one-node cluster', () => {
    let server: RedisServer;

    beforeAll(async () => {
      server = await startRedisServer({ cluster: true });
    });

    afterAll(async () => {
      await server?.close();
    });

    describeBackendContract(
      'RedisBackend with an ioredis Cluster',
      async () => {
        const cluster = new Cluster([{ host: '127.0.0.1', port: server.port }]);
        cluster.on('error', () => {});
        // Fail the setup at once, rather than every test by timeout, if the cluster cannot be reached.
        await Promise.race([
          cluster.ping(),
          sleep(5_000).then(() => Promise.reject(new Error('ioredis Cluster did not become ready'))),
        ]);
        return {
          backend: new RedisBackend({ redis: cluster, prefix: uniquePrefix('ioredis-cluster') }),
          async teardown() {
            cluster.disconnect();
          },
        };
      },
      contractTest,
      contractOptions,
    );

    describeBackendContract(
      'RedisBackend with a node-redis cluster',
      async () => {
        const cluster = createCluster({ rootNodes: [{ url: server.url }] });
        cluster.on('error', () => {});
        await cluster.connect();
        return {
          backend: new RedisBackend({ redis: cluster, prefix: uniquePrefix('node-redis-cluster') }),
          async teardown() {
            await cluster.close();
          },
        };
      },
      contractTest,
      contractOptions,
    );
  });
});
