#!/usr/bin/env bash
# Runs the whole test suite: unit, property and integration tests of every crate (the
# integration tests start real `starcite serve` processes on loopback ports), then a short
# smoke run of the load generator against a real server and a private Redis, then a short
# seeded fault-injection drill on a local three-node cluster (docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo test (workspace)"
cargo test --workspace --all-targets

echo "==> benchmark harness smoke run"
cargo build --release -p starcite-server -p starcite-bench
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/release"
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PORT=$port STARCITE_RAFT_DATA_DIR="$data" "$bin/starcite" serve >"$data/server.log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin/starcite-bench" smoke --url "http://127.0.0.1:$port"

echo "==> fault-injection drill (3-node cluster + Postgres archive, seeded, ~35 s)"
if [ -n "${DATABASE_URL:-}" ]; then
  archive=(--postgres-url "$DATABASE_URL")
else
  archive=(--postgres-throwaway)
fi
"$bin/starcite-bench" drill --seed 3 --duration 25 --fault-every-ms 2500 "${archive[@]}"

echo "==> fault-injection drill (3-node cluster, each node's own SQLite archive, seeded, ~20 s)"
"$bin/starcite-bench" drill --seed 3 --duration 15 --fault-every-ms 2500
