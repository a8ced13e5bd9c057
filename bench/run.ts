/**
 * Throughput of Express with the idempotency middleware (memory backend) against bare Express, measured in the
 * same run and reported as a ratio. Each server runs in its own process; the load comes from autocannon here.
 *
 * Scenarios: `first-run` sends a new key with every request (each is executed and stored, the costliest path);
 * `replay` repeats a small set of keys (each request is answered from the store). Runs alternate between the
 * two servers several times and the median of each is compared, so that drift in the machine affects both.
 *
 * Usage: npm run bench [-- --duration 5 --rounds 3 --connections 32 --scenario all|first-run|replay]
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { parseArgs } from 'node:util';
import autocannon from 'autocannon';

const { values } = parseArgs({
  options: {
    duration: { type: 'string', default: '5' },
    rounds: { type: 'string', default: '3' },
    connections: { type: 'string', default: '32' },
    scenario: { type: 'string', default: 'all' },
  },
});
const duration = Number(values.duration);
const rounds = Number(values.rounds);
const connections = Number(values.connections);
const body = JSON.stringify({ item: 'book', quantity: 2 });

interface Server {
  url: string;
  child: ChildProcess;
}

async function startServer(mode: string): Promise<Server> {
  const child = spawn(process.execPath, ['bench/server.mjs', mode], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const [chunk] = (await once(child.stdout!, 'data')) as [Buffer];
  return { url: `http://127.0.0.1:${chunk.toString().trim()}/orders`, child };
}

async function stopServer(server: Server): Promise<void> {
  server.child.kill('SIGTERM');
  await once(server.child, 'exit');
}

/** Both servers get the same requests, key header included; bare Express just ignores it. */
type Keys = 'unique' | 'replay';

async function measure(url: string, keys: Keys, seconds: number): Promise<number> {
  const replayKeys = Array.from({ length: 64 }, () => randomUUID());
  let sent = 0;
  const result = await autocannon({
    url,
    method: 'POST',
    connections,
    duration: seconds,
    headers: { 'content-type': 'application/json' },
    body,
    requests: [
      {
        setupRequest(request) {
          const key = keys === 'unique' ? randomUUID() : replayKeys[sent++ % replayKeys.length]!;
          request.headers = { ...request.headers, 'idempotency-key': key };
          return request;
        },
      },
    ],
  });
  if (result.non2xx > 0 || result.errors > 0) {
    throw new Error(`${url}: ${result.non2xx} non-2xx responses and ${result.errors} errors`);
  }
  return result.requests.average;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function scenario(
  name: string,
  keys: Keys,
): Promise<{ name: string; bare: number; idempotent: number }> {
  const bare: number[] = [];
  const idempotent: number[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const mode of ['bare', 'idempotent'] as const) {
      const server = await startServer(mode);
      try {
        await measure(server.url, keys, 1); // warm-up: JIT and connection set-up
        (mode === 'bare' ? bare : idempotent).push(await measure(server.url, keys, duration));
      } finally {
        await stopServer(server);
      }
    }
  }
  return { name, bare: median(bare), idempotent: median(idempotent) };
}

const results = [];
if (values.scenario !== 'replay') results.push(await scenario('first-run (new key each request)', 'unique'));
if (values.scenario !== 'first-run') results.push(await scenario('replay', 'replay'));
console.log(
  `\nExpress + express.json(), POST /orders, ${connections} connections, ${duration}s x ${rounds} rounds`,
);
console.log('scenario                             bare req/s   idempotent req/s   ratio');
for (const { name, bare, idempotent } of results) {
  console.log(
    `${name.padEnd(36)} ${bare.toFixed(0).padStart(10)}   ${idempotent.toFixed(0).padStart(16)}   ${(idempotent / bare).toFixed(3)}`,
  );
}
