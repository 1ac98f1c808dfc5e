#!/usr/bin/env bash
# Starts a local three-node Starcite cluster on loopback: HTTP on ports 4001-4003, node-to-node
# on 7101-7103, data in ./cluster-data/n{1,2,3}, logs in ./cluster-data/n{1,2,3}.log.
# Ctrl-C stops all three. Send requests to any node (or to a load balancer in front of them).
#
#   ./scripts/cluster.sh            # build (release) and run
#   STARCITE_BIN=path ./scripts/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${STARCITE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release -p starcite-server
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  bin="$target_dir/release/starcite"
fi
data="${STARCITE_CLUSTER_DATA:-./cluster-data}"
mkdir -p "$data"
nodes="n1@127.0.0.1:7101,n2@127.0.0.1:7102,n3@127.0.0.1:7103"
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM
for i in 1 2 3; do
  NODE_NAME="n$i" CLUSTER_NODES="$nodes" PORT="400$i" STARCITE_RAFT_DATA_DIR="$data/n$i" \
    "$bin" serve >"$data/n$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  until curl -fsS "http://127.0.0.1:400$i/health/ready" >/dev/null 2>&1; do
    if ! kill -0 "${pids[$((i-1))]}" 2>/dev/null; then
      echo "node n$i exited; see $data/n$i.log" >&2
      exit 1
    fi
    sleep 0.2
  done
done
echo "cluster ready: http://127.0.0.1:4001 http://127.0.0.1:4002 http://127.0.0.1:4003 (Ctrl-C stops)"
wait
