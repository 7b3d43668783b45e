#!/usr/bin/env bash
# The search's first choice against its second, live (issue 14): moe-plan search over the worker
# ranks of this machine with a calibrated profile and a probed availability (e.g. those of a
# bench/plan_check.sh run minutes before), then its top 2 layouts run live at the first's goodput
# rate, alternating (1, 2, 1, 2, ...) so that the machine's load drifts over both alike; every
# run's measured attainment next to the predicted one, and the spread of the repeats (the noise
# the difference has to beat).
# AVAILABILITY is a `moe-plan probe` file, or `share`: the processor-sharing model instead (every
# layout's worker ranks on this one host, --host-ranks, by PROFILE's sharing curve; give it a
# profile calibrated with --host-ranks, e.g. plan_check.sh's KEY.calsh.json).
# Usage: bench/plan_search_check.sh BUILD_DIR PROFILE AVAILABILITY|share [MODEL_DIR]
# Env: SC_OUT (results dir), SC_RANKS (2), SC_REQUESTS (40), SC_LEN_SCALE (0.5),
#      SC_TRACE (bench/traces/chat.jsonl), SC_TTFT_MS (1000), SC_TPOT_MS (15), SC_REPEATS (2),
#      SC_TOP (2: the layouts run live, best first), SC_CLIENT_CPU (with share: the coordinator's and
#      moe-bench's CPU ms per token, --client-cpu-ms-per-token, e.g. a plan_check.sh run's
#      KEY.client_cpu), SC_PER_RANK (1: each layout at the first's goodput per rank times its own
#      worker ranks, the load per rank the search ranks by; default 0: all at the first's rate).
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR PROFILE AVAILABILITY [MODEL_DIR]}" && pwd)
prof=$(realpath "${2:?profile}")
if [ "${3:?availability}" = share ]; then
  model_flags="--host-ranks ${SC_RANKS:-2}${SC_CLIENT_CPU:+ --client-cpu-ms-per-token $SC_CLIENT_CPU}"
else
  model_flags="--availability $(realpath "$3")"
fi
src=$(cd "$(dirname "$0")/.." && pwd)
model=${4:-}
n=${SC_REQUESTS:-40}
scale=${SC_LEN_SCALE:-0.5}
trace=${SC_TRACE:-$src/bench/traces/chat.jsonl}
ttft=${SC_TTFT_MS:-1000}
tpot=${SC_TPOT_MS:-15}
reps=${SC_REPEATS:-2}
kv=512
out_default=${SC_OUT:-}
# shellcheck source=bench/plan_lib.sh
. "$src/bench/plan_lib.sh"
hb=""; case $trace in *chat*) hb="--hash-block 64" ;; esac
wl="--trace $trace --requests $n --len-scale $scale $hb"
# shellcheck disable=SC2086
"$build/moe-plan" search --profile "$prof" $model_flags --ranks "${SC_RANKS:-2}" $wl --kv-blocks $kv \
  --slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot" --top "${SC_TOP:-2}" > "$out/search.txt"
cat "$out/search.txt"
rate=$(grep '^best:' "$out/search.txt" | sed 's/^best: //' | python3 -c 'import json,sys; print(json.load(sys.stdin)["goodput_rps"])')
best_ranks=$(grep '^best:' "$out/search.txt" | sed 's/^best: //' | python3 -c 'import json,sys; print(json.load(sys.stdin)["ranks"])')
mapfile -t tops < <(grep -E '^[0-9]+ ' "$out/search.txt")
for rep in $(seq "$reps"); do
  for top in "${tops[@]}"; do
    read -r rank lay _ <<< "$top"
    key="top$rank.run$rep"
    read -r np flags <<< "$(plan_flags "$lay")"
    lrate=$rate
    if [ "${SC_PER_RANK:-0}" = 1 ]; then lrate=$(python3 -c "print('%.4f' % ($rate * ($np - 1) / $best_ranks))"); fi
    # The prediction at this rate, for the same workload.
    # shellcheck disable=SC2086
    "$build/moe-plan" simulate --profile "$prof" $model_flags --layout "$lay" $wl --rate "$lrate" \
      --kv-blocks $kv --slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot" --json > "$out/$key.sim.json"
    # shellcheck disable=SC2086
    plan_start "$key" "$np" $flags
    "$build/moe-plan" probe --quiet --out "$out/$key.avail.json" & pp=$!
    l0=$(load)
    echo "=== $key: $lay at $lrate req/s (load $l0)" >&2
    plan_cpu_mark
    # shellcheck disable=SC2086
    /usr/bin/time -f '%U %S' -o "$out/$key.bench_time" "$build/moe-bench" --addr "127.0.0.1:$port" --json \
      --no-progress $wl --rate "$lrate" --slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot" --jsonl "$out/$key.real.jsonl" \
      < /dev/null > "$out/$key.real.json" || true
    plan_cpu_done "$key" "$out/$key.real.jsonl" "$out/$key.bench_time"
    plan_stop "$key" "$l0"
    python3 - "$out" "$key" "$rank" "$lay" "$((np - 1))" "$lrate" <<'PY'
import json, os, sys
out, key, rank, lay, ranks, rate = sys.argv[1:]
last = lambda p: json.loads(open(os.path.join(out, p)).read().strip().splitlines()[-1])
r, s = last(key + ".real.json"), last(key + ".sim.json")
lat = lambda x: "%.0f / %.0f, %.1f / %.1f ms" % (x["ttft_ms"]["p50"], x["ttft_ms"]["p90"], x["tpot_ms"]["p50"],
                                                  x["tpot_ms"]["p90"])
g = r.get("second_token_gap_ms", {})
print("| %s | `%s` | %s | %.3f | %.1f%% | %.1f%% | %s | %s | %s | %s | %s |" % (
    rank, lay, ranks, float(rate), 100 * s["attainment"], 100 * r["attainment"], lat(r), lat(s),
    "%.1f / %.1f ms" % (g["p50"], g["p90"]) if g else "n/a", open(os.path.join(out, key + ".client_cpu")).read().strip(),
    open(os.path.join(out, key + ".load")).read().strip()))
PY
  done
done
echo "(search rank | layout | worker ranks | rate | predicted attainment | measured | measured TTFT p50 / p90, TPOT p50 / p90 | predicted ones | measured first-to-second token gap p50 / p90 | coordinator + moe-bench CPU ms per token | load before / after; SLO TTFT $ttft ms, TPOT $tpot ms; $n requests of $(basename "$trace") x $scale; raw files in $out)"
