#!/usr/bin/env bash
# Disaggregated vs colocated serving on one machine with moe-bench (not CI).
# Usage: bench/cluster_bench.sh BUILD_DIR [MODEL_DIR] [NP]
# Generates the 'small' preset (qwen3_moe) when MODEL_DIR is not given, then for each layout
# starts `mpirun -np NP moe-serve`, runs the same moe-bench workload (override with MOE_BENCH_ARGS)
# and prints moe-bench's report and the coordinator's token-path latency (its overhead per
# streamed token: worker send -> handed to the gRPC front end).
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR] [NP]}" && pwd)
model=${2:-}
np=${3:-3}
bench_args=${MOE_BENCH_ARGS:-"--requests 64 --prompt-len 128 --output-len 64"}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$model" ]; then
  model=$tmp/small
  "$build/moe-gen-model" --arch qwen3_moe --preset small --out "$model" --quiet
fi
threads=$(( $(nproc) / np )); [ "$threads" -ge 1 ] || threads=1

run_layout() { # NAME FLAGS...
  local name=$1; shift
  mpirun --oversubscribe -np "$np" "$build/moe-serve" --model "$model" --listen 127.0.0.1:0 \
    --threads "$threads" "$@" > "$tmp/out" 2> "$tmp/err" &
  local mp=$!
  for _ in $(seq 600); do grep -q "coordinator pid" "$tmp/out" 2>/dev/null && break; sleep 0.1; done
  local port pid
  port=$(grep -o 'port [0-9]*' "$tmp/out" | awk '{print $2}')
  pid=$(grep -o 'coordinator pid [0-9]*' "$tmp/out" | awk '{print $3}')
  echo "=== $name: $(cat "$tmp/out")"
  # shellcheck disable=SC2086
  "$build/moe-bench" --addr "127.0.0.1:$port" $bench_args || true
  kill -TERM "$pid"
  wait "$mp" || true
  grep -o "token path.*" "$tmp/err" || true
}

run_layout "disaggregated" --prefill-instances 1
run_layout "colocated" --colocated
