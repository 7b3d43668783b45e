#!/usr/bin/env bash
# TTFT and the first-to-second-token gap of the elastic launch (coordinator + 1 prefill + 1 decode
# instance as separate jobs, scripts/local-cluster.sh; KV over UCX/TCP on loopback) against the one
# mpirun job (`mpirun -np 3 moe-serve --prefill-instances 1`, KV over Open MPI), same model, same
# moe-bench workload, alternated ROUNDS times in one run (old, new, old, new...) so that both see
# the same machine load. Not CI; figures in bench/RESULTS.md ("Elastic cluster").
# Usage: bench/elastic_layout_bench.sh BUILD_DIR [MODEL_DIR] [ROUNDS]
#   MOE_LAYOUT_BENCH_ARGS: the moe-bench workload (default: 16 requests at 0.5/s, 256-token
#   prompts, 32 output tokens: latency without much queueing, the gap is the KV hand-off)
#   MOE_LAYOUT_SERVE_ARGS: given to every moe-serve of both layouts (default: --heartbeat-timeout-ms
#   30000, so that CPU starvation on a shared machine does not fence a starved instance, which
#   with one instance per pool fails its requests and leaves nothing to compare)
#   MOE_LAYOUT_OUT: where the raw moe-bench JSON and logs are kept (default: deleted)
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR] [ROUNDS]}" && pwd)
model=${2:-}
rounds=${3:-2}
bargs=${MOE_LAYOUT_BENCH_ARGS:-"--requests 16 --rate 0.5 --prompt-len 256 --output-len 32"}
read -r -a sargs <<< "${MOE_LAYOUT_SERVE_ARGS:---heartbeat-timeout-ms 30000}"
src=$(cd "$(dirname "$0")/.." && pwd)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
tmp=${MOE_LAYOUT_OUT:-$(mktemp -d)}
mkdir -p "$tmp"
[ -n "${MOE_LAYOUT_OUT:-}" ] || trap 'rm -rf "$tmp"' EXIT
if [ -z "$model" ]; then
  model=$tmp/small
  "$build/moe-gen-model" --arch qwen3_moe --preset small --out "$model" --quiet
fi
serve_args=(--threads 1 --kv-blocks 1024 "${sargs[@]}")
port=50700

run_old() { # ROUND
  mpirun --oversubscribe -np 3 "$build/moe-serve" --model "$model" --listen "127.0.0.1:$port" \
    --prefill-instances 1 "${serve_args[@]}" > "$tmp/old.out" 2> "$tmp/old.err" &
  local mp=$!
  for _ in $(seq 600); do
    "$build/moe-client" --addr "127.0.0.1:$port" health 2>/dev/null | grep -q '^SERVING' && break; sleep 0.1
  done
  # shellcheck disable=SC2086
  "$build/moe-bench" --addr "127.0.0.1:$port" --json --no-progress $bargs > "$tmp/old.$1.json" 2> "$tmp/old.$1.bench.err" || true
  kill -USR1 "$mp"
  wait "$mp" || true
  cp "$tmp/old.err" "$tmp/old.$1.log"
}

run_new() { # ROUND
  "$src/scripts/local-cluster.sh" --build "$build" --model "$model" --listen "127.0.0.1:$port" \
    --prefill 1 --decode 1 --log-dir "$tmp/new-logs.$1" -- --kv-blocks 1024 "${sargs[@]}" > "$tmp/new.out" 2>&1 &
  local lp=$!
  for _ in $(seq 600); do grep -q '^local cluster ready' "$tmp/new.out" && break; sleep 0.1; done
  # shellcheck disable=SC2086
  "$build/moe-bench" --addr "127.0.0.1:$port" --json --no-progress $bargs > "$tmp/new.$1.json" 2> "$tmp/new.$1.bench.err" || true
  kill -TERM "$lp"
  wait "$lp" || true
}

echo "# $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  run_old "$r"
  echo "# round $r old done, load $(cut -d' ' -f1-3 /proc/loadavg)"
  run_new "$r"
  echo "# round $r new done, load $(cut -d' ' -f1-3 /proc/loadavg)"
done

python3 - "$tmp" "$rounds" "$bargs" <<'EOF'
import json, sys
tmp, rounds, bargs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("\n`moe-bench %s`, small preset, --threads 1 per process\n" % bargs)
print("| round | layout | completed | TTFT p50 / p99 ms | first-to-second token p50 / p99 ms | TPOT p50 / p99 ms |")
print("|---|---|---|---|---|---|")
ratio = {"ttft": [], "gap": []}
for r in range(1, rounds + 1):
    row = {}
    for name, label in (("old", "one mpirun -np 3"), ("new", "elastic: coordinator + 1P + 1D jobs")):
        try:
            j = json.load(open("%s/%s.%d.json" % (tmp, name, r)))
        except Exception:
            print("| %d | %s | failed | | | |" % (r, label)); continue
        row[name] = j
        g = j.get("second_token_gap_ms", {})
        print("| %d | %s | %s | %.1f / %.1f | %.1f / %.1f | %.1f / %.1f |" % (
            r, label, "%s/%s" % (j["ok"], j["requests"]), j["ttft_ms"]["p50"], j["ttft_ms"]["p99"], g.get("p50", float("nan")),
            g.get("p99", float("nan")), j["tpot_ms"]["p50"], j["tpot_ms"]["p99"]))
    if len(row) == 2:
        ratio["ttft"].append(row["new"]["ttft_ms"]["p50"] / row["old"]["ttft_ms"]["p50"])
        ratio["gap"].append(row["new"]["second_token_gap_ms"]["p50"] / row["old"]["second_token_gap_ms"]["p50"])
print("\nnew / old, per round: TTFT p50 %s; first-to-second gap p50 %s" % (
    ", ".join("%.2f" % x for x in ratio["ttft"]), ", ".join("%.2f" % x for x in ratio["gap"])))
EOF
