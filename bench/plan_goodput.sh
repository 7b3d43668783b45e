#!/usr/bin/env bash
# Goodput per rank of colocated vs disaggregated layouts at equal ranks (issue 14), measured and
# simulated: for each layout, a live cluster swept over rates with moe-bench (per-request records
# kept), the machine's CPU availability probed beside the sweep, the fixed costs calibrated on the
# cluster; then moe-plan simulate over the same rates with that profile and availability, and
# moe-plan search over the same ranks. bench/plan_goodput.py turns the records into attainment and
# goodput under a tight and a loose TPOT SLO (both from the same runs) and draws the plots.
# Usage: bench/plan_goodput.sh BUILD_DIR [MODEL_DIR]
# Env: GP_OUT (results dir), GP_RATES (1,2,3,4,6), GP_REQUESTS (40), GP_LEN_SCALE (0.5),
#      GP_TRACE (bench/traces/chat.jsonl), GP_LAYOUTS ("NAME|np|moe-serve flags|sim layout;...").
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR]}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
model=${2:-}
rates=${GP_RATES:-1,2,3,4,6}
n=${GP_REQUESTS:-40}
scale=${GP_LEN_SCALE:-0.5}
trace=${GP_TRACE:-$src/bench/traces/chat.jsonl}
layouts=${GP_LAYOUTS:-"colocated 2|3|--colocated|M=2x1;1P+1D|3|--prefill-instances 1 --decode-instances 1|P=1x1,D=1x1;EP-2 colocated|3|--colocated --ep-size 2|M=1x2"}
kv=512
out_default=${GP_OUT:-}
# shellcheck source=bench/plan_lib.sh
. "$src/bench/plan_lib.sh"
hb=""; case $trace in *chat*) hb="--hash-block 64" ;; esac
wl="--trace $trace --requests $n --len-scale $scale $hb"
IFS=';' read -r -a lays <<< "$layouts"
for l in "${lays[@]}"; do
  IFS='|' read -r name np flags simlay <<< "$l"
  key=$(echo "$name" | tr ' +' '__')
  echo "profiling for $name (load $(load))" >&2
  mpirun --oversubscribe -np 2 "$build/moe-plan" profile --model "$model" --threads 1 --reps 3 --quick \
    --note "bench/plan_goodput.sh, load average $(load)" --out "$out/$key.profile.json" 2> "$out/$key.profile.log"
  # shellcheck disable=SC2086
  plan_start "$key" "$np" $flags
  plan_calibrate "$key" "$out/$key.profile.json"
  l0=$(load)
  echo "=== $name: sweep $rates (port $port, load $l0)" >&2
  # shellcheck disable=SC2086
  "$build/moe-bench" --addr "127.0.0.1:$port" --json --no-progress $wl --sweep "$rates" \
    --jsonl "$out/$key.real.jsonl" > "$out/$key.real.json" || true
  plan_stop "$key" "$l0"
  # shellcheck disable=SC2086
  "$build/moe-plan" simulate --profile "$out/$key.cal.json" --availability "$out/$key.avail.json" \
    --layout "$simlay" $wl --kv-blocks $kv --sweep "$rates" --json --jsonl "$out/$key.sim.jsonl" > "$out/$key.sim.json"
done
ttft=${GP_TTFT_MS:-1000}; tight=${GP_TIGHT_MS:-15}; loose=${GP_LOOSE_MS:-40}
python3 "$src/bench/plan_goodput.py" "$out" "$layouts" --ttft-ms "$ttft" --tight-ms "$tight" --loose-ms "$loose"

# The search's ranking checked for real: moe-plan search over 2 worker ranks (the first layout's
# calibrated profile and availability), then its top 3 layouts run live at its best's goodput
# rate; measured attainment against the predicted one, under the tight SLO.
first=$(echo "${lays[0]}" | cut -d'|' -f1 | tr ' +' '__')
# shellcheck disable=SC2086
"$build/moe-plan" search --profile "$out/$first.cal.json" --availability "$out/$first.avail.json" --ranks 2 \
  $wl --kv-blocks $kv --slo-ttft-ms "$ttft" --slo-tpot-ms "$tight" --top 3 > "$out/search.txt"
cat "$out/search.txt"
rate=$(grep '^best:' "$out/search.txt" | sed 's/^best: //' | python3 -c 'import json,sys; print(json.load(sys.stdin)["goodput_rps"])')
i=0
mapfile -t tops < <(grep -E '^[0-9]+ ' "$out/search.txt")
for top in "${tops[@]}"; do # in this shell: a piped loop's subshell lost $tmp after its second turn
  read -r rank lay _ <<< "$top"
  i=$((i + 1))
  read -r np flags <<< "$(plan_flags "$lay")"
  # shellcheck disable=SC2086
  plan_start "search$i" "$np" $flags
  "$build/moe-plan" probe --quiet --out "$out/search$i.avail.json" & pp=$!
  l0=$(load)
  # shellcheck disable=SC2086
  "$build/moe-bench" --addr "127.0.0.1:$port" --json --no-progress $wl --rate "$rate" < /dev/null --slo-ttft-ms "$ttft" \
    --slo-tpot-ms "$tight" > "$out/search$i.real.json" || true
  plan_stop "search$i" "$l0"
  python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print("search rank %s %s (%s worker ranks) at %.3f req/s: measured attainment %.1f%% (load %s)" % (sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), 100 * d["attainment"], open(sys.argv[6]).read().strip()))' \
    "$out/search$i.real.json" "$rank" "$lay" "$((np - 1))" "$rate" "$out/search$i.load"
done
