#!/usr/bin/env bash
# The simulator against real clusters on this machine (issue 14): profiles the machine with
# `moe-plan profile` (under mpirun -np 2: the MPI hand-off rate and all-to-all too), then for each
# layout and trace runs moe-bench on a live `mpirun moe-serve` cluster and `moe-plan simulate` on
# the same workload, and prints the error table (TTFT/TPOT p50/p90, simulated vs measured).
# A fifth prediction (share) runs our worker ranks as processor sharing of this host by the
# profile's measured sharing curve (--host-ranks); a sixth (sharec) adds the coordinator and
# moe-bench as one more sharer for their CPU per token, measured beside the run.
# Every run also records the workers' step trace ($out/KEY.steps.RANK.jsonl, MOE_STEP_TRACE), the
# machine's CPU availability before and during the run (moe-plan probe) and the fixed costs
# calibrated on the cluster (moe-plan calibrate); bench/plan_steps.py compares the step trace with
# the profile's step model.
# Usage: bench/plan_check.sh BUILD_DIR [MODEL_DIR]
# Env: PLAN_OUT (results dir, default a temp dir), PLAN_REQUESTS (30), PLAN_RATE (0.5 req/s),
#      PLAN_LEN_SCALE (0.5), PLAN_LAYOUTS ("NAME|np|moe-serve flags|sim layout;..."),
#      PLAN_TRACES (bench/traces files), PLAN_PROFILE (one profile file for every run),
#      PLAN_PROFILE_EACH (1, the default: a --quick profile right before each live run, so that the
#      profile and the run see the same load on a shared machine; 0: one full profile first),
#      PLAN_RESIM=1 (only simulate again and print the table, from an earlier PLAN_OUT).
# The live runs are on a shared machine: every figure it prints carries the load average.
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR]}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
model=${2:-}
n=${PLAN_REQUESTS:-30}
rate=${PLAN_RATE:-0.5}
scale=${PLAN_LEN_SCALE:-0.5}
kv=512
layouts=${PLAN_LAYOUTS:-"1P+1D|3|--prefill-instances 1 --decode-instances 1|P=1x1,D=1x1;colocated 2|3|--colocated|M=2x1;1P+2D|4|--prefill-instances 1 --decode-instances 2|P=1x1,D=2x1"}
traces=${PLAN_TRACES:-"$src/bench/traces/chat.jsonl $src/bench/traces/code.csv"}
out_default=${PLAN_OUT:-}
# shellcheck source=bench/plan_lib.sh
. "$src/bench/plan_lib.sh"
each=${PLAN_PROFILE_EACH:-1}
[ -n "${PLAN_PROFILE:-}" ] && each=0
profile_to() { # FILE [--quick]
  echo "profiling (load $(load))" >&2
  mpirun --oversubscribe -np 2 "$build/moe-plan" profile --model "$model" --threads 1 --reps 3 ${2:-} \
    --note "bench/plan_check.sh, load average $(load)" --out "$1" 2> "$1.log" ||
    { cat "$1.log" >&2; exit 1; }
}
profile=${PLAN_PROFILE:-$out/profile.json}
resim=${PLAN_RESIM:-0}
[ "$each" = 1 ] || [ -f "$profile" ] || profile_to "$profile"

IFS=';' read -r -a lays <<< "$layouts"
for t in $traces; do
  tn=$(basename "$t"); tn=${tn%%.*}
  hb=""; [ "$tn" = chat ] && hb="--hash-block 64"
  wl="--trace $t --requests $n --rate $rate --len-scale $scale $hb"
  for l in "${lays[@]}"; do
    IFS='|' read -r name np flags simlay <<< "$l"
    key="$tn.$(echo "$name" | tr ' +' '__')"
    [ "$each" = 1 ] && profile="$out/$key.profile.json"
    if [ "$resim" != 1 ]; then
      [ "$each" = 1 ] && profile_to "$profile" --quick
      # shellcheck disable=SC2086
      plan_start "$key" "$np" $flags
      plan_calibrate "$key" "$profile"
      l0=$(load)
      echo "=== $tn / $name (port $port, load $l0)" >&2
      plan_cpu_mark
      # shellcheck disable=SC2086
      /usr/bin/time -f '%U %S' -o "$out/$key.bench_time" "$build/moe-bench" --addr "127.0.0.1:$port" --json \
        --no-progress $wl --jsonl "$out/$key.real.jsonl" > "$out/$key.real.json" || true
      plan_cpu_done "$key" "$out/$key.real.jsonl" "$out/$key.bench_time"
      plan_stop "$key" "$l0"
    fi
    # Four predictions of the same live run: (sim) the step model of the first version (wall
    # times as profiled, default fixed costs, --cores); (pred) CPU times, the costs calibrated on
    # the cluster and the availability probed before the run; (simav) the same with the
    # availability probed during the run; (timed) that probe's bursts at their times in the run.
    # shellcheck disable=SC2086
    "$build/moe-plan" simulate --profile "$profile" --layout "$simlay" $wl --kv-blocks $kv --cores "$(nproc)" --json \
      --jsonl "$out/$key.sim.jsonl" > "$out/$key.sim.json"
    for v in pred:avail_before simav:avail timed:avail:--availability-timed; do
      IFS=: read -r vn vf vx <<< "$v"
      # shellcheck disable=SC2086
      "$build/moe-plan" simulate --profile "$out/$key.cal.json" --availability "$out/$key.$vf.json" $vx \
        --layout "$simlay" $wl --kv-blocks $kv --json --jsonl "$out/$key.$vn.jsonl" > "$out/$key.$vn.json"
    done
    # (share) CPU times, our np-1 worker ranks sharing this host as processor sharing by the
    # profile's measured curve (no probe: a prediction from the profile taken before the run).
    if [ -f "$out/$key.calsh.json" ]; then
      # shellcheck disable=SC2086
      "$build/moe-plan" simulate --profile "$out/$key.calsh.json" --host-ranks $((np - 1)) --layout "$simlay" $wl \
        --kv-blocks $kv --json --jsonl "$out/$key.share.jsonl" > "$out/$key.share.json"
    fi
    # (sharec) as share, with the coordinator and moe-bench as one more sharer of the host for
    # their CPU per token, measured beside the run (KEY.client_cpu).
    if [ -f "$out/$key.calsh.json" ] && [ -f "$out/$key.client_cpu" ]; then
      # shellcheck disable=SC2086
      "$build/moe-plan" simulate --profile "$out/$key.calsh.json" --host-ranks $((np - 1)) --layout "$simlay" $wl \
        --client-cpu-ms-per-token "$(cat "$out/$key.client_cpu")" \
        --kv-blocks $kv --json --jsonl "$out/$key.sharec.jsonl" > "$out/$key.sharec.json"
    fi
  done
done

python3 - "$out" "$layouts" "$traces" "$n" "$rate" "$scale" <<'PY'
import json, os, sys
out, layouts, traces, n, rate, scale = sys.argv[1:]
def err(s, r):
    return "%+.0f%%" % (100 * (s - r) / r) if r else "n/a"
def last(path):
    return json.loads(open(path).read().strip().splitlines()[-1])
names = {"sim": "first version (profiled wall times, default fixed costs, --cores)",
         "pred": "CPU times x availability probed before the run, calibrated fixed costs",
         "simav": "CPU times x availability probed during the run, calibrated fixed costs",
         "timed": "as simav, each step taking the probe's burst nearest its time (--availability-timed)",
         "share": "CPU times, the host's worker ranks as processor sharing by the profile's sharing curve (--host-ranks), fixed costs calibrated for it",
         "sharec": "as share, the coordinator and moe-bench one more sharer for their CPU per token measured beside the run (--client-cpu-ms-per-token)"}
names_short = ["sim", "pred", "simav", "timed", "share", "sharec"]
for var in names_short:
    print("\n**%s**\n" % names[var])
    print("| trace | layout | load (1/5/15 min, before / after) | TTFT p50 real / sim (err) | TTFT p90 real / sim (err) | TPOT p50 real / sim (err) | TPOT p90 real / sim (err) |")
    print("|---|---|---|---|---|---|---|")
    errs = []
    for t in traces.split():
        tn = os.path.basename(t).split(".")[0]
        for l in layouts.split(";"):
            name = l.split("|")[0]
            key = "%s.%s" % (tn, name.replace(" ", "_").replace("+", "_"))
            try:
                r = last(os.path.join(out, key + ".real.json"))
                s = last(os.path.join(out, key + "." + var + ".json"))
            except Exception as e:
                print("| %s | %s | | failed: %s | | | |" % (tn, name, e)); continue
            cells = []
            for m in ("ttft_ms", "tpot_ms"):
                for p in ("p50", "p90"):
                    rv, sv = r[m][p], s[m][p]
                    cells.append("%.1f / %.1f (%s)" % (rv, sv, err(sv, rv)))
                    if rv: errs.append(abs(sv - rv) / rv)
            ld = open(os.path.join(out, key + ".load")).read().strip()
            if var == "sharec":
                ld += "; client %s CPU ms/token" % open(os.path.join(out, key + ".client_cpu")).read().strip()
            print("| %s | %s | %s | %s |" % (tn, name, ld, " | ".join(cells)))
    if errs:
        errs.sort()
        print("\n%s: %d figures: median |error| %.0f%%, worst %.0f%%; %d of %d within 15%%" % (
            var, len(errs), 100 * errs[len(errs) // 2], 100 * errs[-1], sum(e <= 0.15 for e in errs), len(errs)))
# The first-to-second token gap (the hand-off as the user sees it), measured and predicted.
print("\n**first-to-second token gap p50 / p90 ms (real, then each prediction)**\n")
print("| trace | layout | real | " + " | ".join(names_short) + " |")
print("|---|---|---|" + "---|" * len(names_short))
for t in traces.split():
    tn = os.path.basename(t).split(".")[0]
    for l in layouts.split(";"):
        name = l.split("|")[0]
        key = "%s.%s" % (tn, name.replace(" ", "_").replace("+", "_"))
        cells = []
        for var in ["real"] + names_short:
            try:
                g = last(os.path.join(out, "%s.%s.json" % (key, var)))["second_token_gap_ms"]
                cells.append("%.1f / %.1f" % (g["p50"], g["p90"]))
            except Exception:
                cells.append("n/a")
        print("| %s | %s | %s |" % (tn, name, " | ".join(cells)))
print("\n(%s requests per run at %s req/s, lengths x %s; raw JSON lines in %s)" % (n, rate, scale, out))
PY
