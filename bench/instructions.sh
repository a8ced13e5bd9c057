#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: unlike throughput, the count does not depend on what
# else the machine is doing, so small differences show. Each server (bare Express, and Express with the
# middleware on MemoryBackend) runs twice under callgrind, serving N1 and then N2 requests; the difference of the
# two totals divided by N2 - N1 is the cost of one request, without start-up.
# Usage: npm run bench:instructions   (needs valgrind; builds first)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
N1=${N1:-300}
N2=${N2:-1300}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

total_instructions() { # mode requests
  rm -f "$out"/cg.* "$out/port"
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.%p" node bench/server.mjs "$1" >"$out/port" 2>/dev/null &
  local pid=$!
  for _ in $(seq 1 240); do [ -s "$out/port" ] && break; sleep 0.5; done
  node bench/sequential-client.mjs "$(cat "$out/port")" "$2"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  awk '/^summary:/ { print $2 }' "$out"/cg.*
}

per_request() { # mode
  local a b
  a=$(total_instructions "$1" "$N1")
  b=$(total_instructions "$1" "$N2")
  echo $(((b - a) / (N2 - N1)))
}

bare=$(per_request bare)
idempotent=$(per_request idempotent)
echo "instructions per request (first runs, new key each): bare Express $bare, with idempotency $idempotent"
awk -v b="$bare" -v i="$idempotent" 'BEGIN { printf "ratio (bare / with idempotency, like a throughput ratio): %.3f\n", b / i }'
