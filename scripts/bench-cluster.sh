#!/usr/bin/env bash
# The cluster benchmark of docs/benchmarks.md, in one run on this machine:
#   1. a single node (embedded default) under the append workload — the baseline;
#   2. a three-node loopback cluster, connections spread over all nodes: closed loop (maximum
#      throughput), then open loop at half that rate (latency at half load);
#   3. failover: open loop against two nodes while the third (leader of a third of the groups)
#      is killed with SIGKILL; the longest write latency is the write unavailability.
# Results (JSON per run and a summary) go to $OUT (default ./bench-cluster-results).
#
#   ./scripts/bench-cluster.sh            # build (release) and run, ~3 minutes
#   DURATION=20 ./scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p starcite-server -p starcite-bench
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/release"
out="${OUT:-./bench-cluster-results}"
duration="${DURATION:-15}"
mkdir -p "$out"
work=$(mktemp -d)
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT

wait_ready() {
  for url in "$@"; do
    for _ in $(seq 1 300); do
      curl -fsS "$url/health/ready" >/dev/null 2>&1 && continue 2
      sleep 0.1
    done
    echo "$url never became ready" >&2
    exit 1
  done
}

bench() { # name, then starcite-bench arguments
  local name=$1
  shift
  "$bin/starcite-bench" append --connections 64 --sessions 500 --payload-bytes 200 \
    --warmup 3 --quiet --json "$out/$name.json" "$@"
}

figure() { # json file, field
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])' "$1" "$2"
}

echo "==> single node"
PORT=4600 STARCITE_RAFT_DATA_DIR="$work/single" "$bin/starcite" serve >"$work/single.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.0.1:4600
bench single --url http://127.0.0.1:4600 --duration "$duration"
stop_all

echo "==> three-node cluster"
nodes="n1@127.0.0.1:7201,n2@127.0.0.1:7202,n3@127.0.0.1:7203"
start_node() {
  # Worker threads: the server's default (the cores shared out among the nodes on this host)
  # unless WORKER_THREADS is set.
  NODE_NAME="n$1" CLUSTER_NODES="$nodes" PORT="460$1" STARCITE_RAFT_DATA_DIR="$work/n$1" \
    env ${WORKER_THREADS:+STARCITE_WORKER_THREADS=$WORKER_THREADS} "$bin/starcite" serve >>"$work/n$1.log" 2>&1 &
  pids+=($!)
}
for i in 1 2 3; do start_node "$i"; done
urls="http://127.0.0.1:4601,http://127.0.0.1:4602,http://127.0.0.1:4603"
wait_ready http://127.0.0.1:4601 http://127.0.0.1:4602 http://127.0.0.1:4603
sleep 3 # leaders settle on their preferred nodes
bench cluster-max --url "$urls" --duration "$duration"
max=$(figure "$out/cluster-max.json" ops_per_sec)
half=$(python3 -c "print(round($max / 2))")
bench cluster-half --url "$urls" --duration "$duration" --rate "$half"

echo "==> failover: SIGKILL n1 under an open-loop load on n2 and n3"
rate=$(python3 -c "print(round($max / 4))")
"$bin/starcite-bench" append --connections 64 --sessions 500 --payload-bytes 200 --warmup 1 \
  --duration 12 --rate "$rate" --quiet --json "$out/failover.json" \
  --url http://127.0.0.1:4602,http://127.0.0.1:4603 &
load=$!
sleep 5
kill -9 "${pids[0]}"
wait "$load" || true
stop_all

python3 - "$out" <<'EOF'
import json, sys, os
out = sys.argv[1]
r = {n: json.load(open(os.path.join(out, n + ".json")))[0] for n in ["single", "cluster-max", "cluster-half", "failover"]}
def row(name, x):
    return f"| {name} | {x['ops_per_sec']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['p999_ms']:.2f} | {x['max_ms']:.1f} | {x['errors']} | {x['ordering_violations']} |"
lines = ["| run | appends/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | ordering violations |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
         row("single node, closed loop", r["single"]),
         row("3 nodes, closed loop (max)", r["cluster-max"]),
         row("3 nodes, open loop at half max", r["cluster-half"]),
         row("3 nodes, SIGKILL of n1 mid-run (load on n2, n3)", r["failover"])]
ratio = r["cluster-max"]["ops_per_sec"] / r["single"]["ops_per_sec"]
lines.append("")
lines.append(f"cluster max / single node: {ratio:.2f}x; write unavailability after SIGKILL ≈ longest write latency = {r['failover']['max_ms']/1000:.2f} s")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
EOF
