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
source scripts/bench-lib.sh
trap 'stop_all; rm -rf "$work"' EXIT

echo "==> single node"
PORT=4600 STARCITE_RAFT_DATA_DIR="$work/single" "$bin/starcite" serve >"$work/single.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.0.1:4600
bench "$bin/starcite-bench" "$out/single.json" --url http://127.0.0.1:4600 --duration "$duration"
stop_all

echo "==> three-node cluster"
start_cluster "$bin/starcite" cluster
urls="$cluster_urls"
bench "$bin/starcite-bench" "$out/cluster-max.json" --url "$urls" --duration "$duration"
max=$(figure "$out/cluster-max.json" ops_per_sec)
half=$(python3 -c "print(round($max / 2))")
bench "$bin/starcite-bench" "$out/cluster-half.json" --url "$urls" --duration "$duration" --rate "$half"

echo "==> failover: SIGKILL n1 under an open-loop load on n2 and n3"
rate=$(python3 -c "print(round($max / 4))")
WARMUP=1 bench "$bin/starcite-bench" "$out/failover.json" --duration 12 --rate "$rate" \
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
