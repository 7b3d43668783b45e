#!/usr/bin/env bash
# Predicted goodput for 16- and 64-host layouts of the OLMoE-1B-7B and Qwen3-30B-A3B shapes
# (issue 14), from a profile measured here scaled by bench/derive_profile.py, under a tight and a
# loose TPOT SLO, with a stated network model. Simulation only: nothing here runs those models.
# Usage: bench/plan_large.sh BUILD_DIR MEASURED_PROFILE [OUT_DIR]
# Env: LARGE_SEARCH (0: four named layouts per case, seconds; 1: moe-plan search over every layout,
#      about 2 CPU-minutes per 16-host case here and far more at 64), LARGE_SPEEDUP (16: one host = 16 of the profiled single-thread ranks, perfect scaling),
#      LARGE_GBPS (25 GB/s per link, 200 Gb/s), LARGE_LAT_US (10 us per message).
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR MEASURED_PROFILE [OUT_DIR]}" && pwd)
prof=${2:?measured profile}
src=$(cd "$(dirname "$0")/.." && pwd)
out=${3:-$(mktemp -d)}
mkdir -p "$out"
speed=${LARGE_SPEEDUP:-16}
gbps=${LARGE_GBPS:-25}
lat=${LARGE_LAT_US:-10}
# A chat-like synthetic workload (more requests than a trace file holds, so that a 64-host layout
# is measured past its warm-up): prompts lognormal mean 256 (CV 0.5), outputs lognormal mean 128
# (CV 0.5), bursty arrivals (gamma, CV 2).
wl="--prompt-len lognorm:256:0.5 --output-len lognorm:128:0.5 --cv 2"
for shape in olmoe-1b-7b qwen3-30b-a3b; do
  python3 "$src/bench/derive_profile.py" "$prof" "$shape" "$out/$shape.json" "$speed" >&2
  case $shape in
    olmoe-1b-7b) ttft=2000; tight=20; loose=80 ;;
    *) ttft=8000; tight=60; loose=240 ;;
  esac
  for hosts in 16 64; do
    for slo in tight loose; do
      tpot=$tight; [ $slo = loose ] && tpot=$loose
      reqs=$((hosts * 40))
      echo "### $shape, $hosts hosts, TTFT <= $ttft ms, TPOT <= $tpot ms ($slo), $reqs requests"
      echo '```'
      if [ "${LARGE_SEARCH:-0}" = 1 ]; then
        # Every layout (moe-plan search): minutes of CPU per case at 16 hosts, far more at 64.
        # shellcheck disable=SC2086
        "$build/moe-plan" search --profile "$out/$shape.json" --ranks "$hosts" --machine-ranks 1 $wl \
          --requests "$reqs" --slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot" --link-gbps "$gbps" \
          --link-latency-us "$lat" --top 6 2>/dev/null | sed 's/  (larger than the profiled machine: network-model prediction)//'
      else
        # Named layouts (each one rate search): colocated without and with EP 8, disaggregated
        # with half the ranks prefilling, and the 16-host search's best (P=7x1,D=2x4) scaled.
        h=$hosts
        for lay in "M=${h}x1" "M=$((h / 8))x8" "P=$((h / 2))x1,D=$((h / 8))x4" "P=$((h * 7 / 16))x1,D=$((h / 8))x4"; do
          # shellcheck disable=SC2086
          "$build/moe-plan" simulate --profile "$out/$shape.json" --layout "$lay" $wl --requests "$reqs" \
            --slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot" --link-gbps "$gbps" --link-latency-us "$lat" \
            --sweep auto 2>/dev/null | grep '^sweep:' | sed 's/^sweep: //'
        done
      fi
      echo '```'
    done
  done
done
