#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: unlike throughput, the count does not depend on what
# else the machine is doing, so small differences show. Each server (bare Express, and Express with the middleware
# on MemoryBackend) runs under callgrind with counting off while it serves WARMUP requests, so that the JIT has
# compiled the request path as a long-running server would have; then counting is switched on for the next N
# requests, and their total divided by N is the cost of one request. N spans several garbage collections, which
# come in bursts.
# Usage: npm run bench:instructions   (needs valgrind; builds first). WARMUP, N, BASE and VARIANTS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
# Fastify, Hono and Koa run a first request in a fraction of Express's instructions: after 4 000 requests their JIT
# is still compiling (some 80 k instructions per request, in both servers, pulling the ratio towards 1), so they
# are counted over more requests, after more warm-up.
case "${BASE:-bare}" in
  bare | express | express-*) default_warmup=4000 default_n=6000 ;;
  *) default_warmup=5000 default_n=30000 ;;
esac
# MemoryBackend sweeps its expired records once a minute, visiting every key. Under valgrind a minute holds some
# 30 000 requests where it holds 2 million at full speed, so a sweep falling in the window would be counted some 60
# times over, several thousand instructions per request; the window is too short for it at full speed. Its
# minute is stretched as time is.
export BENCH_SWEEP_INTERVAL_MS=${BENCH_SWEEP_INTERVAL_MS:-3600000}
WARMUP=${WARMUP:-$default_warmup}
N=${N:-$default_n}
out=$(mktemp -d)
# Keys (Redis) and tables (SQL) of this run are named after it, and removed at the end.
prefix="bench_instructions_$$_"
cleanup() {
  rm -rf "$out"
  node --input-type=module -e "
    const { Redis } = await import('ioredis');
    const redis = new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', { lazyConnect: true, maxRetriesPerRequest: 0 });
    try {
      await redis.connect();
      let cursor = '0';
      do {
        const [next, keys] = await redis.scan(cursor, 'MATCH', '${prefix}*', 'COUNT', 1000);
        if (keys.length > 0) await redis.del(...keys);
        cursor = next;
      } while (cursor !== '0');
    } catch {}
    redis.disconnect();
  " || true
}
trap cleanup EXIT

per_request() { # mode
  rm -f "$out"/cg.* "$out/port"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/cg.%p" \
    node bench/server.mjs "$1" --prefix "$prefix" >"$out/port" 2>/dev/null &
  local pid=$!
  for _ in $(seq 1 240); do [ -s "$out/port" ] && break; sleep 0.5; done
  node bench/sequential-client.mjs "$(cat "$out/port")" "$WARMUP"
  callgrind_control -i on "$pid" >/dev/null
  node bench/sequential-client.mjs "$(cat "$out/port")" "$N"
  callgrind_control -i off "$pid" >/dev/null
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  local total
  total=$(awk '/^totals:/ { print $2 }' "$out"/cg.*)
  echo $((total / N))
}

# BASE: the server the others are compared with (bare Express); VARIANTS: the others, by bench/server.mjs's names
# (express-redis, hono-memory, …).
base=${BASE:-bare}
bare=$(per_request "$base")
echo "instructions per request (first runs, new key each, after $WARMUP warm-up requests, over $N): $base $bare"
for variant in ${VARIANTS:-idempotent}; do
  count=$(per_request "$variant")
  awk -v v="$variant" -v b="$bare" -v i="$count" \
    'BEGIN { printf "%s: %d, ratio (bare / it, like a throughput ratio): %.3f\n", v, i, b / i }'
done
