/**
 * What a first run costs `MemoryBackend` alone, without HTTP: a lock taken and a small response stored for each of
 * N fresh keys, kept until the end as records live until they expire. Beside it, in the same run, a plain `Map`
 * of each key to its record as an object, the way an in-memory store is commonly written (and the way the peers'
 * memory stores keep theirs). Each store runs in its own process, rounds alternate their order; the figures are
 * medians: wall and CPU time (garbage collection threads included) per key, and RSS at the end.
 *
 * Usage: npm run bench:memory-store [-- --keys 300000 --rounds 3] [--dist dir] (another build of the package)
 */
import { execFileSync } from 'node:child_process';
import { resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    keys: { type: 'string', default: '300000' },
    rounds: { type: 'string', default: '3' },
    dist: { type: 'string', default: fileURLToPath(new URL('../dist', import.meta.url)) },
    store: { type: 'string' },
  },
});
const keys = Number(values.keys);

/** One store's run, in this process: `{ wallUs, cpuUs, rssMiB }`. */
async function measure(store) {
  const { MemoryBackend } = await import(pathToFileURL(`${resolve(values.dist)}/index.mjs`).href);
  const backend =
    store === 'MemoryBackend'
      ? new MemoryBackend({ maxEntries: 50_000_000, maxBytes: 16 * 1024 ** 3 })
      : plainMapStore();
  const body = new TextEncoder().encode('{"id":1,"item":"book","quantity":2}');
  const fingerprint = 'f'.repeat(64);
  const headers = [['content-type', 'application/json; charset=utf-8']];
  const wall = performance.now();
  const cpu = process.cpuUsage();
  for (let i = 0; i < keys; i++) {
    // Scoped as the engine scopes keys: a dash before the UUID.
    const key = `-${crypto.randomUUID()}`;
    const { token } = backend.acquire(key, fingerprint, 30_000);
    const record = { fingerprint, createdAt: Date.now(), response: { status: 201, headers, body } };
    backend.complete(key, token, record, 86_400_000);
  }
  const used = process.cpuUsage(cpu);
  return {
    wallUs: ((performance.now() - wall) * 1000) / keys,
    cpuUs: (used.user + used.system) / keys,
    rssMiB: process.memoryUsage().rss / 1024 ** 2,
  };
}

/** Each key's lock or record as an object in a `Map`, the body copied as a store must. */
function plainMapStore() {
  const entries = new Map();
  let tokens = 0;
  return {
    acquire(key, fingerprint, leaseMs) {
      const token = String(++tokens);
      entries.set(key, { token, fingerprint, endsAt: Date.now() + leaseMs });
      return { state: 'acquired', token };
    },
    complete(key, token, record, ttlMs) {
      if (entries.get(key)?.token !== token) return false;
      const response = { ...record.response, body: record.response.body.slice() };
      entries.set(key, { ...record, response, expiresAt: Date.now() + ttlMs });
      return true;
    },
  };
}

if (values.store) {
  process.stdout.write(JSON.stringify(await measure(values.store)));
} else {
  const stores = ['a Map of objects', 'MemoryBackend'];
  const runs = Object.fromEntries(stores.map((store) => [store, []]));
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const store of round % 2 === 0 ? stores : [...stores].reverse()) {
      const args = [
        fileURLToPath(import.meta.url),
        '--store',
        store,
        '--keys',
        values.keys,
        '--dist',
        values.dist,
      ];
      runs[store].push(JSON.parse(execFileSync(process.execPath, args, { encoding: 'utf8' })));
    }
  }
  const median = (list) => list.toSorted((a, b) => a - b)[list.length >> 1];
  const of = (store, field) => median(runs[store].map((run) => run[field]));
  const base = stores[0];
  console.log(`${keys} fresh keys, each locked and its response stored, ${values.rounds} rounds (medians)\n`);
  console.log('| store | µs per key, wall | × the Map | µs per key, CPU | × the Map | RSS MiB at the end |');
  console.log('| --- | ---: | ---: | ---: | ---: | ---: |');
  for (const store of stores) {
    const wall = of(store, 'wallUs');
    const cpu = of(store, 'cpuUs');
    console.log(
      `| ${store} | ${wall.toFixed(2)} | ${(wall / of(base, 'wallUs')).toFixed(2)} | ${cpu.toFixed(2)} | ${(cpu / of(base, 'cpuUs')).toFixed(2)} | ${of(store, 'rssMiB').toFixed(0)} |`,
    );
  }
}
