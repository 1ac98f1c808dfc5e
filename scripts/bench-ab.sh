#!/usr/bin/env bash
# Compares two server builds on the three-node loopback cluster of bench-cluster.sh, in
# alternating runs (A, B, A, B, ...), each on a fresh cluster, open loop at one fixed rate. On
# this noisy machine a single run of each says little: the same build's half-load p99 varies
# by 2x from one run to the next, so only the medians of several pairs compare.
#
#   ./scripts/bench-ab.sh <starcite A> <starcite B> [pairs] [rate]
#
# pairs: default 5. rate: appends/s for every run; default half of build A's closed-loop
# maximum, measured first. DURATION (default 15) sets each run's measured seconds. Results (a
# JSON per run and summary.md) go to $OUT (default ./bench-ab-results).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
a=$(realpath "$1")
b=$(realpath "$2")
pairs="${3:-5}"
rate="${4:-}"
cd "$(dirname "$0")/.."
for bin in "$a" "$b"; do
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
cargo build --release -p starcite-bench
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
load="$target_dir/release/starcite-bench"
out="${OUT:-./bench-ab-results}"
duration="${DURATION:-15}"
mkdir -p "$out"
rm -f "$out"/run-*.json
work=$(mktemp -d)
pids=()
source scripts/bench-lib.sh
trap 'stop_all; rm -rf "$work"' EXIT

if [ -z "$rate" ]; then
  echo "==> build A, closed loop: the maximum"
  start_cluster "$a" max
  bench "$load" "$out/max.json" --url "$cluster_urls" --duration "$duration" >/dev/null
  stop_all
  rate=$(python3 -c "print(round($(figure "$out/max.json" ops_per_sec) / 2))")
fi
echo "==> $pairs pairs at $rate appends/s"
for pair in $(seq 1 "$pairs"); do
  for side in A B; do
    bin=$a
    [ "$side" = B ] && bin=$b
    start_cluster "$bin" "run-$pair-$side"
    bench "$load" "$out/run-$pair-$side.json" --url "$cluster_urls" --duration "$duration" --rate "$rate" >/dev/null
    stop_all
    rm -rf "$work"/run-*
    echo "pair $pair $side: p99 $(figure "$out/run-$pair-$side.json" p99_ms) ms"
  done
done

python3 - "$out" "$pairs" "$rate" "$a" "$b" <<'PY'
import json, os, statistics, sys
out, pairs, rate, a, b = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
runs = {s: [json.load(open(os.path.join(out, f"run-{p}-{s}.json")))[0] for p in range(1, pairs + 1)] for s in "AB"}
keys = [("ops_per_sec", "appends/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms"), ("max_ms", "max ms")]
lines = [f"A = {a}", f"B = {b}", f"{pairs} alternating pairs, open loop at {rate} appends/s, each on a fresh cluster", "",
         "| build | " + " | ".join(f"{label} (median)" for _, label in keys) + " | p99 of each run |",
         "| --- |" + " ---: |" * len(keys) + " --- |"]
for s in "AB":
    med = [statistics.median(r[k] for r in runs[s]) for k, _ in keys]
    lines.append(f"| {s} | " + " | ".join(f"{m:,.2f}" for m in med) + " | " + " / ".join(f"{r['p99_ms']:.1f}" for r in runs[s]) + " |")
lower = sum(rb["p99_ms"] < ra["p99_ms"] for ra, rb in zip(runs["A"], runs["B"]))
errors = sum(r["errors"] + r["ordering_violations"] for s in "AB" for r in runs[s])
lines += ["", f"B had the lower p99 in {lower} of {pairs} pairs; errors and ordering violations in all runs: {errors}"]
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
PY
