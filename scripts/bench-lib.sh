# Shared by the cluster benchmark scripts (sourced, not run): starting nodes on loopback,
# waiting for them, running the append workload, reading a figure from its JSON.
# The caller sets `pids=()` and `work` (a scratch directory) and calls stop_all on exit.

stop_all() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

wait_ready() { # urls
  for url in "$@"; do
    for _ in $(seq 1 300); do
      curl -fsS "$url/health/ready" >/dev/null 2>&1 && continue 2
      sleep 0.1
    done
    echo "$url never became ready" >&2
    exit 1
  done
}

cluster_nodes="n1@127.0.0.1:7201,n2@127.0.0.1:7202,n3@127.0.0.1:7203"
cluster_urls="http://127.0.0.1:4601,http://127.0.0.1:4602,http://127.0.0.1:4603"

# Starts node n<i> of the three-node loopback cluster with the server binary <bin>, its data in
# $work/<name>-n<i>. Worker threads: the server's default unless WORKER_THREADS is set.
start_node() { # bin, name, i
  NODE_NAME="n$3" CLUSTER_NODES="$cluster_nodes" PORT="460$3" STARCITE_RAFT_DATA_DIR="$work/$2-n$3" \
    env ${WORKER_THREADS:+STARCITE_WORKER_THREADS=$WORKER_THREADS} "$1" serve >>"$work/$2-n$3.log" 2>&1 &
  pids+=($!)
}

# A fresh three-node cluster, ready, with leaders settled on their preferred nodes.
start_cluster() { # bin, name
  for i in 1 2 3; do start_node "$1" "$2" "$i"; done
  wait_ready http://127.0.0.1:4601 http://127.0.0.1:4602 http://127.0.0.1:4603
  sleep 3
}

# The workload of docs/benchmarks.md; WARMUP (default 3) sets the unmeasured seconds first.
bench() { # bench binary, json file, then starcite-bench append arguments
  local bench_bin=$1 json=$2
  shift 2
  "$bench_bin" append --connections 64 --sessions 500 --payload-bytes 200 \
    --warmup "${WARMUP:-3}" --quiet --json "$json" "$@"
}

figure() { # json file, field
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])' "$1" "$2"
}
