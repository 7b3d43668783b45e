# Shared by bench/plan_check.sh and bench/plan_goodput.sh (sourced): the MPI environment, a
# results dir and the model, and the steps around one live cluster: start it, probe the machine's
# CPU availability before it (a prediction's input) and beside the run, calibrate the fixed costs.
# Needs: build (the build dir), model (may be empty: the small preset is generated), out_default.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_mpi_yield_when_idle=1
# No binding, for the profile and every live cluster alike: Open MPI binds each rank to one core
# when -np <= 2 and none above, so the profile's sharing curve (engines of one rank's process)
# measured our engines crowding one core while the 3-rank clusters float over both, and a 1-rank
# layout ran pinned where the others did not (bench/RESULTS.md issue 14, session 9).
export OMPI_MCA_hwloc_base_binding_policy=none
tmp=$(mktemp -d)
out=${out_default:-$tmp/results}
mkdir -p "$out"
trap 'rm -rf "$tmp"' EXIT
if [ -z "$model" ]; then
  model=$tmp/small
  "$build/moe-gen-model" --arch qwen3_moe --preset small --out "$model" --quiet
fi
load() { cut -d' ' -f1-3 /proc/loadavg; }

# plan_start KEY NP FLAGS...: a live cluster (its workers' step trace in $out/KEY.steps.RANK.jsonl);
# sets mp (mpirun's pid) and port. PLAN_MPI_ENV: more "-x NAME" for mpirun (set in the caller).
plan_start() {
  local key=$1 np=$2
  shift 2
  # shellcheck disable=SC2086
  MOE_STEP_TRACE="$out/$key.steps" mpirun --oversubscribe -x MOE_STEP_TRACE ${PLAN_MPI_ENV:-} -np "$np" "$build/moe-serve" \
    --model "$model" --listen 127.0.0.1:0 --threads 1 --kv-blocks "$kv" "$@" < /dev/null > "$tmp/out" 2> "$tmp/err" &
  mp=$!
  for _ in $(seq 1200); do grep -q "coordinator pid" "$tmp/out" 2>/dev/null && break; sleep 0.1; done
  port=$(grep -o 'port [0-9]*' "$tmp/out" | awk '{print $2}' || true)
  if [ -z "$port" ]; then
    echo "plan_start $key: the cluster did not announce its port within 120 s (load $(load)); its output:" >&2
    cat "$tmp/out" "$tmp/err" >&2
    kill "$mp" 2>/dev/null || true
    exit 1
  fi
}

# plan_calibrate KEY PROFILE: 15 s of probing (KEY.avail_before.json), then the fixed costs
# measured on the cluster into a copy of PROFILE (KEY.cal.json, and KEY.calsh.json for
# --host-ranks); then starts the probe that runs
# beside the workload (KEY.avail.json, pid in pp).
plan_calibrate() {
  "$build/moe-plan" probe --quiet --seconds 15 --out "$out/$1.avail_before.json"
  cp "$2" "$out/$1.cal.json"
  "$build/moe-plan" calibrate --profile "$out/$1.cal.json" --availability "$out/$1.avail_before.json" \
    --addr "127.0.0.1:$port" 2> "$out/$1.cal.log" || cat "$out/$1.cal.log" >&2
  # The same fixed costs for the processor-sharing model (KEY.calsh.json): the probes' engine steps
  # costed at the profile's sharing curve (a lone step) instead of the probe's mean stretch.
  cp "$2" "$out/$1.calsh.json"
  "$build/moe-plan" calibrate --profile "$out/$1.calsh.json" --host-ranks 1 --addr "127.0.0.1:$port" \
    2> "$out/$1.calsh.log" || cat "$out/$1.calsh.log" >&2
  "$build/moe-plan" probe --quiet --out "$out/$1.avail.json" & pp=$!
}

# plan_cpu_mark: the coordinator's CPU time now (before a workload); plan_cpu_done KEY JSONL
# BENCH_TIME: the coordinator's CPU since the mark plus moe-bench's own (its /usr/bin/time -f '%U %S'
# file) per token delivered (JSONL: moe-bench's request lines) into KEY.client_cpu (ms per token:
# moe-plan's --client-cpu-ms-per-token, measured beside the run).
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat" 2> /dev/null || echo 0; }
plan_cpu_mark() {
  cpid=$(grep -o 'coordinator pid [0-9]*' "$tmp/out" | awk '{print $3}')
  c0=$(cpu_of "$cpid")
}
plan_cpu_done() {
  local c1; c1=$(cpu_of "$cpid")
  python3 - "$c0" "$c1" "$(getconf CLK_TCK)" "$2" "$3" > "$out/$1.client_cpu" <<'PY'
import json, sys
c0, c1, hz, jl, bt = sys.argv[1:]
bench = sum(map(float, open(bt).read().split()[-2:]))
tokens = sum(r.get("n_tokens", 0) for r in map(json.loads, open(jl)) if r.get("type") == "request")
print("%.4f" % (((int(c1) - int(c0)) / float(hz) + bench) * 1e3 / max(1, tokens)))
PY
}

# plan_stop KEY LOAD_BEFORE: stops the probe and the cluster; the load averages into KEY.load.
plan_stop() {
  kill -TERM "$pp"; wait "$pp" || true
  kill -USR1 "$mp"; wait "$mp" || true
  echo "$2 / $(load)" > "$out/$1.load"
}

# plan_flags LAYOUT: "NP FLAGS" of moe-serve under mpirun for a moe-plan layout: "M=AxE" -> A*E
# ranks colocated; "P=pxe1,D=dxe2" -> disaggregated with those EP sizes (the coordinator counted).
plan_flags() {
  python3 - "$1" <<'PY'
import sys
l = dict(p.split("=") for p in sys.argv[1].split(","))
c = {k: tuple(map(int, v.split("x"))) for k, v in l.items()}
if "M" in c:
    print(c["M"][0] * c["M"][1] + 1, "--colocated --ep-size %d" % c["M"][1])
else:
    print(c["P"][0] * c["P"][1] + c["D"][0] * c["D"][1] + 1,
          "--prefill-instances %d --decode-instances %d --prefill-ep %d --decode-ep %d" % (c["P"][0], c["D"][0], c["P"][1], c["D"][1]))
PY
}
