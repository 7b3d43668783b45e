#!/usr/bin/env bash
# Serving-cluster benchmark on one machine with moe-bench (not CI): disaggregated (layer-by-layer
# KV push, and whole-block pull) vs colocated, in one run, on the same model and workloads.
# Usage: bench/cluster_bench.sh BUILD_DIR [MODEL_DIR] [NP]
# Generates the 'small' preset (qwen3_moe) when MODEL_DIR is not given. For each workload and
# layout it starts `mpirun -np NP moe-serve`, runs moe-bench --json, and keeps the coordinator's
# token-path latency (its added latency per streamed token: worker send -> gRPC front end). Prints
# one markdown table per workload (what bench/RESULTS.md quotes), raw JSON under $MOE_CLUSTER_OUT.
# Workloads (override with MOE_CLUSTER_WORKLOADS, entries "NAME|moe-bench args" separated by ';'):
#   burst:  64 requests at once, 128-token prompts, 64 output tokens (throughput under load)
#   paced:  32 requests at 1/s, 512-token prompts, 32 output tokens (latency without queueing:
#           the first-to-second token gap is the KV hand-off in the disaggregated layouts)
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR] [NP]}" && pwd)
model=${2:-}
np=${3:-3}
workloads=${MOE_CLUSTER_WORKLOADS:-"burst|--requests 64 --prompt-len 128 --output-len 64;paced|--requests 32 --rate 1 --prompt-len 512 --output-len 32"}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
tmp=$(mktemp -d)
out=${MOE_CLUSTER_OUT:-$tmp/results}
mkdir -p "$out"
trap 'rm -rf "$tmp"' EXIT
if [ -z "$model" ]; then
  model=$tmp/small
  "$build/moe-gen-model" --arch qwen3_moe --preset small --out "$model" --quiet
fi
threads=$(( $(nproc) / (np - 1) )); [ "$threads" -ge 1 ] || threads=1

run_layout() { # WORKLOAD NAME BENCH_ARGS FLAGS...
  local wl=$1 name=$2 bargs=$3; shift 3
  mpirun --oversubscribe -np "$np" "$build/moe-serve" --model "$model" --listen 127.0.0.1:0 \
    --threads "$threads" "$@" > "$tmp/out" 2> "$tmp/err" &
  local mp=$!
  for _ in $(seq 600); do grep -q "coordinator pid" "$tmp/out" 2>/dev/null && break; sleep 0.1; done
  local port pid
  port=$(grep -o 'port [0-9]*' "$tmp/out" | awk '{print $2}')
  pid=$(grep -o 'coordinator pid [0-9]*' "$tmp/out" | awk '{print $3}')
  echo "=== $wl / $name: $(cat "$tmp/out")" >&2
  # shellcheck disable=SC2086
  "$build/moe-bench" --addr "127.0.0.1:$port" --json $bargs > "$out/$wl.$name.json" || true
  "$build/moe-client" --addr "127.0.0.1:$port" status > "$out/$wl.$name.status" 2>&1 || true
  kill -USR1 "$mp" # drain (SIGTERM to mpirun would kill the ranks after 1 s)
  wait "$mp" || true
  grep -o "token path.*" "$tmp/err" > "$out/$wl.$name.tokenpath" || true
}

IFS=';' read -r -a wls <<< "$workloads"
for w in "${wls[@]}"; do
  wl=${w%%|*}; bargs=${w#*|}
  run_layout "$wl" disagg-layer "$bargs" --prefill-instances 1 --kv-transfer layer
  run_layout "$wl" disagg-block "$bargs" --prefill-instances 1 --kv-transfer block
  run_layout "$wl" colocated "$bargs" --colocated
done

python3 - "$out" "$workloads" "$np" "$threads" <<'EOF'
import json, os, re, sys
out, workloads, np_, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
names = {"disagg-layer": "disaggregated 1P+1D, layer-by-layer KV", "disagg-block": "disaggregated 1P+1D, whole-block pull",
         "colocated": "colocated, %d mixed" % (int(np_) - 1)}
for w in workloads.split(";"):
    wl, args = w.split("|", 1)
    print("\n**%s** (`moe-bench %s`, -np %s, %s kernel threads per worker)\n" % (wl, args.strip(), np_, threads))
    print("| layout | req/s | output tok/s | TTFT p50 / p99 ms | first-to-second token p50 / p99 ms | TPOT p50 / p99 ms | E2E p50 ms | KV transfers (layer-wise) | token path p50 / p99 us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ("disagg-layer", "disagg-block", "colocated"):
        p = os.path.join(out, "%s.%s.json" % (wl, n))
        try:
            j = json.load(open(p))
        except Exception:
            print("| %s | failed | | | | | | | |" % names[n]); continue
        st = open(os.path.join(out, "%s.%s.status" % (wl, n))).read()
        m = re.search(r"kv:\s+(\d+) transfers \((\d+) layer by layer", st)
        kv = "%s (%s)" % (m.group(1), m.group(2)) if m else "?"
        tp = open(os.path.join(out, "%s.%s.tokenpath" % (wl, n))).read()
        m50, m99 = re.search(r"p50 (\d+) us", tp), re.search(r"p99 (\d+) us", tp)
        tps = "%s / %s" % (m50.group(1), m99.group(1)) if m50 and m99 else "?"
        g = j.get("second_token_gap_ms", {"p50": float("nan"), "p99": float("nan")})
        print("| %s | %.2f | %.1f | %.1f / %.1f | %.1f / %.1f | %.1f / %.1f | %.0f | %s | %s |" % (
            names[n], j["req_per_s"], j["output_tok_per_s"], j["ttft_ms"]["p50"], j["ttft_ms"]["p99"],
            g["p50"], g["p99"], j["tpot_ms"]["p50"], j["tpot_ms"]["p99"], j["e2e_ms"]["p50"], kv, tps))
EOF
