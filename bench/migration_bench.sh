#!/usr/bin/env bash
# Live-migration measurements (docs/migration.md; results in bench/RESULTS.md, not CI).
# Usage: bench/migration_bench.sh BUILD_DIR [MODEL_DIR] [pause|skew|all]
#   pause: one request at a time of 128..8000 prompt tokens on 1 prefill + 2 decode instances,
#          moved between the decode instances every 16 generated tokens (--migrate-every): the
#          pause (source paused -> destination resumed) against the sequence length, next to the
#          time moe-generate takes to recompute the same prompt (its prefill) on one thread.
#   skew:  moe-bench with long and short requests mixed (exponential prompt and output lengths)
#          against small decode KV caches, migration policy off, then on: TTFT/TPOT percentiles.
# Generates the 'small' preset (qwen3_moe, context 8192) when MODEL_DIR is not given.
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR] [pause|skew|all]}" && pwd)
model=${2:-}
what=${3:-all}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$model" ]; then
  model=$tmp/small
  "$build/moe-gen-model" --arch qwen3_moe --preset small --out "$model" --quiet
fi
np=4
layout=(--prefill-instances 1 --decode-instances 2 --threads 1)

start_server() { # FLAGS... ; sets port, pid, mp
  mpirun --oversubscribe -np "$np" "$build/moe-serve" --model "$model" --listen 127.0.0.1:0 \
    "${layout[@]}" "$@" > "$tmp/out" 2> "$tmp/err" &
  mp=$!
  for _ in $(seq 1200); do grep -q "coordinator pid" "$tmp/out" 2>/dev/null && break; sleep 0.1; done
  port=$(grep -o 'port [0-9]*' "$tmp/out" | awk '{print $2}')
  pid=$(grep -o 'coordinator pid [0-9]*' "$tmp/out" | awk '{print $3}')
  echo "# $(cat "$tmp/out")"
}

stop_server() {
  kill -TERM "$pid"
  wait "$mp" || true
}

ids() { # N: N prompt ids
  python3 -c "import random; r=random.Random($1); print(','.join(str(r.randrange(1, 8000)) for _ in range($1)))"
}

if [ "$what" = pause ] || [ "$what" = all ]; then
  echo "## pause vs sequence length"
  start_server --kv-blocks 1100 --batch-tokens 512 --heartbeat-timeout-ms 60000 --migrate-every 16 \
    --migrate-min-remaining 1 --migration off
  printf "%8s %8s %10s %10s %10s %10s %12s %12s\n" "tokens" "moves" "pause p50" "pause max" \
    "blocks" "stages" "total ms" "recompute ms"
  for len in ${MOE_BENCH_LENS:-128 256 512 1024 2048 4096 8000}; do
    p=$(ids "$len")
    "$build/moe-client" --addr "127.0.0.1:$port" --prompt-ids "$p" --max-new-tokens 80 \
      --temperature 0 --ignore-eos --request-id "len-$len" > /dev/null 2> "$tmp/client" ||
      { echo "moe-client failed for $len tokens:"; cat "$tmp/client"; }
    rec=$("$build/moe-generate" --model "$model" --prompt-ids "$p" --max-new-tokens 1 --threads 1 \
      2>&1 | grep -o 'prompt: [0-9]* tokens in [0-9.]* s' | awk '{print $5 * 1000}') || rec=0
    { grep "request len-$len instance" "$tmp/err" || true; } | { grep -v aborted || true; } |
      sed -E 's/.*: ([0-9]+) tokens, ([0-9]+) stages, ([0-9]+) blocks .*pause ([0-9.]+) ms, total ([0-9.]+) ms/\1 \2 \3 \4 \5/' |
      python3 -c "
import sys, statistics as s
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
if not rows: print('%8d %8d' % ($len, 0)); sys.exit()
p = sorted(r[3] for r in rows)
print('%8d %8d %10.2f %10.2f %10.0f %10.1f %12.2f %12.0f' % ($len, len(rows), s.median(p), p[-1],
      s.mean(r[2] for r in rows), s.mean(r[1] for r in rows), s.mean(r[4] for r in rows), $rec))"
  done
  "$build/moe-client" --addr "127.0.0.1:$port" status | grep -A1 "^migrate:" || true
  stop_server
fi

if [ "$what" = skew ] || [ "$what" = all ]; then
  echo "## skewed load, migration off vs on"
  bench_args=${MOE_BENCH_ARGS:-"--requests 32 --rate 0.25 --concurrency 64 --prompt-len exp:192 --output-len exp:128 --seed 3"}
  for mode in ${MOE_BENCH_MODES:-off on}; do
    start_server --kv-blocks "${MOE_KV_BLOCKS:-48}" --heartbeat-timeout-ms 60000 --migration "$mode"
    echo "=== migration $mode: moe-bench $bench_args"
    # shellcheck disable=SC2086
    "$build/moe-bench" --addr "127.0.0.1:$port" $bench_args || true
    "$build/moe-client" --addr "127.0.0.1:$port" status | grep -E "^(migrate:|  |sched:|kv:)" || true
    stop_server
    grep -c "moe_cluster_mig_on_end" "$tmp/err" || true
  done
fi
