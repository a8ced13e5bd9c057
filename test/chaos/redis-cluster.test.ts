/**
 * RedisBackend on a real Redis Cluster of three masters, started by the test on loopback ports
 * (`redis-server --cluster-enabled yes` three times, joined by `redis-cli --cluster create`), passes the backend
 * contract with an ioredis `Cluster` and a node-redis cluster client (each with a second client of its kind as the
 * contract's peer, as a second process would be). Every step touches one key, so the keys of
 * the run land on all three masters and each step runs where its key lives.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Cluster, Redis } from 'ioredis';
import { createCluster } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RedisBackend } from '../../src/backends/redis.js';
import { describeBackendContract } from '../../src/testkit/index.js';
import { uniquePrefix } from '../support/redis.js';
import { type RedisServer, requireRedisServer, startRedisServer } from '../support/redis-server.js';
import { report, waitFor } from './support/chaos.js';

const run = promisify(execFile);
const enabled = requireRedisServer('Chaos: Redis Cluster of 3 masters');
const REDIS_CLI_BIN = process.env.REDIS_CLI_BIN ?? 'redis-cli';
const MASTERS = 3;

describe.runIf(enabled)('chaos: RedisBackend on a 3-master Redis Cluster', () => {
  const servers: RedisServer[] = [];
  const clusterClients: { close(): Promise<void> | void }[] = [];
  let formedMs = 0;

  beforeAll(async () => {
    const started = performance.now();
    for (let i = 0; i < MASTERS; i++) {
      servers.push(
        await startRedisServer({
          args: [
            '--cluster-enabled',
            'yes',
            // Relative to the server's own working directory: each node keeps its own.
            '--cluster-config-file',
            'nodes.conf',
            '--cluster-announce-ip',
            '127.0.0.1',
            '--cluster-node-timeout',
            '5000',
          ],
        }),
      );
    }
    await run(REDIS_CLI_BIN, [
      '--cluster',
      'create',
      ...servers.map((server) => `127.0.0.1:${server.port}`),
      '--cluster-replicas',
      '0',
      '--cluster-yes',
    ]);
    // Every node must agree the cluster is whole before a client asks it for the slot map.
    for (const server of servers) {
      const node = new Redis(server.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
      node.on('error', () => {});
      await node.connect();
      try {
        await waitFor(
          `node ${server.port} to see the cluster ok`,
          async () => {
            const info = String(await node.call('CLUSTER', 'INFO'));
            return info.includes('cluster_state:ok') && info.includes(`cluster_known_nodes:${MASTERS}`)
              ? true
              : undefined;
          },
          20_000,
          100,
        );
      } finally {
        node.disconnect();
      }
    }
    formedMs = performance.now() - started;
  }, 60_000);

  afterAll(async () => {
    for (const client of clusterClients) await client.close();
    await Promise.all(servers.map((server) => server.close()));
  });

  it('is a cluster of 3 masters sharing the 16384 slots', async () => {
    const node = new Redis(servers[0]!.url);
    node.on('error', () => {});
    try {
      const nodes = String(await node.call('CLUSTER', 'NODES'))
        .trim()
        .split('\n');
      const masters = nodes.filter((line) => line.split(' ')[2]!.includes('master'));
      expect(masters).toHaveLength(MASTERS);
      let slots = 0;
      for (const master of masters) {
        for (const range of master.split(' ').slice(8)) {
          const [from, to = from] = range.split('-').map(Number) as [number, number?];
          slots += to! - from + 1;
        }
      }
      expect(slots).toBe(16384);
    } finally {
      node.disconnect();
    }
    report('Redis Cluster', { masters: MASTERS, 'formed in': { ms: formedMs } });
  });

  const prefixes = {
    ioredis: uniquePrefix('cluster-ioredis'),
    'node-redis': uniquePrefix('cluster-node-redis'),
  };

  describeBackendContract(
    'RedisBackend with an ioredis Cluster of 3 masters',
    async () => {
      // Two clients, as two processes would have: the second one's backend is the contract's peer.
      const [cluster, peer] = await Promise.all(
        [0, 1].map(async () => {
          const client = new Cluster(
            servers.map((server) => ({ host: '127.0.0.1', port: server.port })),
            { redisOptions: { maxRetriesPerRequest: 2 } },
          );
          client.on('error', () => {});
          await client.ping();
          clusterClients.push({ close: () => client.disconnect() });
          return client;
        }),
      );
      // Keys are left for the spread check below; the servers go with the run.
      return {
        backend: new RedisBackend({ redis: cluster!, prefix: prefixes.ioredis }),
        peers: [new RedisBackend({ redis: peer!, prefix: prefixes.ioredis })],
      };
    },
    { describe, it, beforeAll, afterAll },
    { requires: ['inspect', 'forget'] },
  );

  describeBackendContract(
    'RedisBackend with a node-redis cluster of 3 masters',
    async () => {
      const [cluster, peer] = await Promise.all(
        [0, 1].map(async () => {
          const client = createCluster({ rootNodes: servers.map((server) => ({ url: server.url })) });
          client.on('error', () => {});
          await client.connect();
          clusterClients.push({ close: () => client.close() });
          return client;
        }),
      );
      return {
        backend: new RedisBackend({ redis: cluster!, prefix: prefixes['node-redis'] }),
        peers: [new RedisBackend({ redis: peer!, prefix: prefixes['node-redis'] })],
      };
    },
    { describe, it, beforeAll, afterAll },
    { requires: ['inspect', 'forget'] },
  );

  it('spread the contract’s keys over every master', async () => {
    const perMaster: number[] = [];
    for (const server of servers) {
      const node = new Redis(server.url);
      node.on('error', () => {});
      try {
        perMaster.push(Number(await node.dbsize()));
      } finally {
        node.disconnect();
      }
    }
    for (const count of perMaster) expect(count).toBeGreaterThan(0);
    report('Redis Cluster: keys left by the two contract runs, per master', { keys: perMaster.join(' / ') });
  });
});
