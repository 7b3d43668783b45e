#!/usr/bin/env bash
# bench/run.sh: THE benchmark command (issue 3). Builds, generates the benchmark models once (cached
# under bench/out/), measures this machine's rooflines, runs our engine and llama.cpp on the same
# models with the same thread count, profiles decode, and writes the table into bench/RESULTS.md.
# See bench/README.md. Environment knobs (defaults in brackets):
#   MOE_BENCH_THREADS   [nproc]                 threads for every figure, ours and llama.cpp
#   MOE_BENCH_PRESETS   ["small olmoe-1b-7b"]
#   MOE_BENCH_LLAMA     [1]                      0 skips llama.cpp
#   MOE_BENCH_LLAMA_FORMATS [bf16,q8_0,q4_0]
#   MOE_BENCH_OURS_FORMATS  ["bf16 q8 q4"]       ours: q8/q4 = --quantize all=q8 / all=q4 at load
#   MOE_BENCH_OLMOE_LAYERS  []                   shorten OLMoE (disk/time); empty = full 16 layers
#   MOE_BENCH_PROFILE   [1]                      0 skips the callgrind/perf decode profiles
#   MOE_BENCH_BUILD     [build-bench]
#   MOE_BENCH_NICE      [-10]                    niceness of the timed processes (shields them from
#                                                other work on a shared machine; 0 = unchanged)
#   MOE_BENCH_QUIET_BUSY [0.25]                  before each timed run, wait until the CPUs are at most
#   MOE_BENCH_QUIET_WAIT [600]                   this busy (fraction, over 3 s), spending at most this
#                                                many seconds waiting in the whole run
#   MOE_BENCH_ATTEMPTS  [3]                      reruns of a measurement while other work took more
#                                                than QUIET_BUSY of the CPUs inside its timed windows
#   MOE_BENCH_BATCHES   [1,4,16,64]              decode batch sizes, both engines
#   MOE_BENCH_PREFILL   [128,512,2048]           prefill prompt lengths, both engines
#   MOE_BENCH_RESULTS   [bench/RESULTS.md]       the file whose generated block the report rewrites
#   MOE_BENCH_AB_ROUNDS [3]                      interleaved rounds per preset: ours f, llama.cpp f, for
#                                                every format, then again; the report keeps each figure's
#                                                best round (a slow minute hits both engines)
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)

THREADS=${MOE_BENCH_THREADS:-$(nproc)}
PRESETS=${MOE_BENCH_PRESETS:-small olmoe-1b-7b}
LLAMA=${MOE_BENCH_LLAMA:-1}
LLAMA_FORMATS=${MOE_BENCH_LLAMA_FORMATS:-bf16,q8_0,q4_0}
OURS_FORMATS=${MOE_BENCH_OURS_FORMATS:-bf16 q8 q4}
OLMOE_LAYERS=${MOE_BENCH_OLMOE_LAYERS:-}
PROFILE=${MOE_BENCH_PROFILE:-1}
BUILD=${MOE_BENCH_BUILD:-build-bench}
NICE=${MOE_BENCH_NICE:--10}
QUIET_BUSY=${MOE_BENCH_QUIET_BUSY:-0.25}
QUIET_WAIT=${MOE_BENCH_QUIET_WAIT:-600}
ATTEMPTS=${MOE_BENCH_ATTEMPTS:-3}
BATCHES=${MOE_BENCH_BATCHES:-1,4,16,64}
PREFILL=${MOE_BENCH_PREFILL:-128,512,2048}
AB_ROUNDS=${MOE_BENCH_AB_ROUNDS:-3}
RESULTS=${MOE_BENCH_RESULTS:-bench/RESULTS.md}
OUT=bench/out
RUN=$OUT/run

cmd="bench/run.sh"
for v in MOE_BENCH_THREADS MOE_BENCH_PRESETS MOE_BENCH_LLAMA MOE_BENCH_LLAMA_FORMATS MOE_BENCH_OURS_FORMATS MOE_BENCH_OLMOE_LAYERS \
         MOE_BENCH_PROFILE MOE_BENCH_BUILD MOE_BENCH_NICE MOE_BENCH_QUIET_BUSY MOE_BENCH_QUIET_WAIT MOE_BENCH_ATTEMPTS \
         MOE_BENCH_BATCHES MOE_BENCH_PREFILL MOE_BENCH_AB_ROUNDS MOE_BENCH_RESULTS; do
  if [ -n "${!v:-}" ]; then cmd="$v='${!v}' $cmd"; fi
done

say() { printf '\n== %s\n' "$*" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }
# Timed commands run at niceness $NICE when allowed (negative needs root), else as they are.
timed=()
if [ "$NICE" != 0 ] && nice -n "$NICE" true 2>/dev/null; then timed=(nice -n "$NICE"); fi
# Fraction of all CPU time spent busy over 3 s (from /proc/stat; we are idle while sampling).
busy() {
  local a b
  a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
  awk -v u1="${a[1]}" -v n1="${a[2]}" -v s1="${a[3]}" -v i1="${a[4]}" -v w1="${a[5]}" -v q1="${a[6]}" -v r1="${a[7]}" -v t1="${a[8]}" \
      -v u2="${b[1]}" -v n2="${b[2]}" -v s2="${b[3]}" -v i2="${b[4]}" -v w2="${b[5]}" -v q2="${b[6]}" -v r2="${b[7]}" -v t2="${b[8]}" \
      'BEGIN { tot = (u2+n2+s2+i2+w2+q2+r2+t2) - (u1+n1+s1+i1+w1+q1+r1+t1); idle = (i2+w2) - (i1+w1);
               printf "%.2f\n", (tot > 0 ? 1 - idle / tot : 0) }'
}
# Waits until other work leaves the CPUs mostly idle (QUIET_WAIT s of waiting in all, for the whole
# run); appends busy_before=... to $1.
waited=0
wait_quiet() {
  local t0 b
  while :; do
    t0=$(date +%s)
    b=$(busy)
    if awk -v b="$b" -v m="$QUIET_BUSY" 'BEGIN { exit !(b <= m) }'; then break; fi
    if [ "$waited" -ge "$QUIET_WAIT" ]; then
      say "machine ${b} busy and the ${QUIET_WAIT} s waiting budget is spent: measuring anyway (recorded)"
      break
    fi
    say "machine ${b} busy (others' work): waiting for <= ${QUIET_BUSY}"
    sleep 17
    waited=$((waited + $(date +%s) - t0))
  done
  echo "busy_before=$b" >>"$1"
}
# Largest "others' CPU share" of the timed windows recorded in a result file (*_others_cpu keys).
max_others() { awk -F= '$1 ~ /_others_cpu$/ && $2 > m { m = $2 } END { printf "%.3f\n", m + 0 }' "$1"; }
# attempts OUT LABEL CMD...: runs a timed command (after wait_quiet) up to ATTEMPTS times while other
# work took more than QUIET_BUSY of the CPUs during any of its timed windows, and keeps in OUT the
# attempt that saw the least contention (every figure in a file comes from one attempt).
attempts() {
  local out=$1 label=$2 i m best=2
  shift 2
  for ((i = 1; i <= ATTEMPTS; i++)); do
    wait_quiet "$out.try$i"
    say "$label (attempt $i)"
    "$@" | tee -a "$out.try$i"
    m=$(max_others "$out.try$i")
    echo "attempt=$i" >>"$out.try$i"
    if awk -v m="$m" -v b="$best" 'BEGIN { exit !(m < b) }'; then best=$m; cp "$out.try$i" "$out"; fi
    if awk -v m="$m" -v q="$QUIET_BUSY" 'BEGIN { exit !(m <= q) }'; then break; fi
    say "others took up to $m of the CPUs while $label ran"
  done
}
# Drops files from the page cache: the machine cannot cache OLMoE's safetensors and its GGUFs
# together, and a run under reclaim pressure measures the disk, not the engine.
evict() {
  python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"
}

if [ "$LLAMA" = 1 ]; then bench/install-deps.sh; fi

# ---- build (the README's release flavour: RelWithDebInfo, warnings as errors) ----
say "build ($BUILD)"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_WERROR=ON >/dev/null
fi
cmake --build "$BUILD" -j"$(nproc)" --target moe-gen-model roofline engine_bench

rm -rf "$RUN"
mkdir -p "$RUN/profile" "$OUT/models"
echo "$cmd" >"$RUN/command.txt"
{
  echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "cores=$(lscpu -p=CORE | grep -v '^#' | sort -u | wc -l)"
  echo "cpus=$(nproc)"
  echo "l3=$(lscpu | sed -n 's/^L3 cache: *//p' | head -1)"
  echo "mem=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
  echo "virt=$(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1) VM"
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit=$(git rev-parse --short HEAD)"
  echo "load_before=$(load1)"
} >"$RUN/machine.txt"

# ---- models: generated once, regenerated only when the arguments change ----
arch_of() { case $1 in small) echo qwen3_moe ;; olmoe-1b-7b) echo olmoe ;; *) echo olmoe ;; esac; }
for p in $PRESETS; do
  args=(--arch "$(arch_of "$p")" --preset "$p")
  if [ "$p" = olmoe-1b-7b ] && [ -n "$OLMOE_LAYERS" ]; then args+=(--layers "$OLMOE_LAYERS"); fi
  dir=$OUT/models/$p
  if [ "$(cat "$dir/.bench-args" 2>/dev/null)" != "${args[*]}" ]; then
    say "generating $p (${args[*]}) into $dir (once; cached)"
    rm -rf "$dir"
    "$BUILD/moe-gen-model" "${args[@]}" --out "$dir"
    echo "${args[*]}" >"$dir/.bench-args"
  fi
done

# ---- rooflines: probed at the start, before each preset and at the end; the report takes the best
# (on a shared VM the bandwidth one probe sees swings by 2x with the neighbours' load) ----
n_probe=0
probe() {
  n_probe=$((n_probe + 1))
  wait_quiet "$RUN/roofline_$n_probe.busy"
  say "roofline probe $n_probe ($THREADS threads)"
  "${timed[@]}" "$BUILD/bench/roofline" --threads "$THREADS" | tee "$RUN/roofline_$n_probe.txt"
}
probe

# ---- per preset: our engine and llama.cpp interleaved (ours f, llama.cpp f, for every format,
# AB_ROUNDS times): a slow minute of the shared machine hits both engines, and the report keeps
# each figure's best round. Every run is a fresh process (its peak RSS is the load's too). ----
llama_fmt() { case $1 in bf16) echo bf16 ;; q8) echo q8_0 ;; q4) echo q4_0 ;; *) echo "" ;; esac; }
for p in $PRESETS; do
  mkdir -p "$RUN/$p"
  case $p in
    # decode: every batch size a few short rounds inside each run, best kept
    small) steps=32,16,8,4; eb=(--prompt 32 --rounds 2 --prefill-reps 2)
           lr=(--pp-reps 2 --prompt 32 --n-predict 32 --rounds 2) ;;
    *)     steps=8,4,2,2;   eb=(--prompt 16 --rounds 1 --prefill-reps 1)
           lr=(--pp-reps 1 --prompt 16 --n-predict 8 --rounds 1) ;;
  esac
  # only this model's safetensors in the page cache
  shopt -s nullglob
  others=($OUT/llama/*.gguf)
  for q in $PRESETS; do [ "$q" = "$p" ] || others+=($OUT/models/$q/*.safetensors); done
  shopt -u nullglob
  if [ ${#others[@]} -gt 0 ]; then evict "${others[@]}"; fi
  lfmts=""
  for f in $OURS_FORMATS; do
    lf=$(llama_fmt "$f")
    case ",$LLAMA_FORMATS," in *",$lf,"*) lfmts="$lfmts${lfmts:+,}$lf" ;; esac
  done
  if [ "$LLAMA" = 1 ] && [ -n "$lfmts" ]; then
    say "llama.cpp $p: GGUF conversion ($lfmts; cached after the first run)"
    python3 bench/llama_ref.py --model "$OUT/models/$p" --name "$p" --threads "$THREADS" \
      --formats "$lfmts" --prepare-only
  fi
  probe
  for ((r = 1; r <= AB_ROUNDS; r++)); do
    for f in $OURS_FORMATS; do
      # every matrix llama.cpp's Q8_0/Q4_0 GGUFs quantize (the embedding table aside: see README)
      case $f in bf16) q=none ;; *) q=all=$f ;; esac
      wait_quiet "$RUN/$p/ours_$f.r$r.busy"
      say "round $r/$AB_ROUNDS: engine_bench $p $f (--quantize $q)"
      "${timed[@]}" "$BUILD/bench/engine_bench" --model "$OUT/models/$p" --threads "$THREADS" --quantize "$q" \
        --batch "$BATCHES" --decode-tokens "$steps" --prefill "$PREFILL" "${eb[@]}" | tee "$RUN/$p/ours_$f.r$r.txt"
      lf=$(llama_fmt "$f")
      if [ "$LLAMA" = 1 ] && [ -n "$lf" ] && [[ ",$lfmts," == *",$lf,"* ]]; then
        wait_quiet "$RUN/$p/llama_$lf.r$r.busy"
        say "round $r/$AB_ROUNDS: llama.cpp $p $lf"
        python3 bench/llama_ref.py --model "$OUT/models/$p" --name "$p" --threads "$THREADS" \
          --formats "$lf" --nice "$NICE" --pp "$PREFILL" --batches "$BATCHES" "${lr[@]}" | tee "$RUN/$p/llama_$lf.r$r.txt"
      fi
    done
  done
  # the bandwidth at each model's own size (a third of its weight bytes per triad array): a model
  # that fits the caches is held against the caches' bandwidth, not DRAM's
  for f in $OURS_FORMATS; do
    wb=$(sed -n 's/^weights_bytes_total=//p' "$RUN/$p/ours_$f.r1.txt" | head -1)
    [ -n "$wb" ] || continue
    mib=$(( (wb / 3 + 1048575) / 1048576 ))
    say "bandwidth at the size of $p $f ($((wb / 1048576)) MiB of weights)"
    "${timed[@]}" "$BUILD/bench/roofline" --threads "$THREADS" --mib "$mib" --bw-only | tee "$RUN/$p/bw_$f.txt"
  done
done

# ---- decode profiles (small preset) ----
if [ "$PROFILE" = 1 ] && [[ " $PRESETS " == *" small "* ]]; then
  say "decode profile: callgrind (1 thread) and perf cpu-clock ($THREADS threads), small preset"
  wait_quiet "$RUN/profile/perf.busy"
  if command -v valgrind >/dev/null; then
    valgrind --tool=callgrind --collect-atstart=no --callgrind-out-file="$RUN/profile/callgrind.out" \
      "$BUILD/bench/engine_bench" --model "$OUT/models/small" --threads 1 --batch 1 --prompt 16 \
      --warmup 1 --decode-tokens 8 --prefill 0 --no-touch --callgrind-decode >/dev/null 2>"$RUN/profile/callgrind.log"
    callgrind_annotate --inclusive=no --auto=no "$RUN/profile/callgrind.out" >"$RUN/profile/callgrind.txt" 2>/dev/null
    printf 'threads=1\nsteps=8\n' >"$RUN/profile/callgrind.meta"
  fi
  if command -v perf >/dev/null; then
    # batch 1 (the decode roofline target) and batch 16 (the batching target), small preset
    for B in 1 16; do
      steps=$((B == 1 ? 128 : 32))
      if "${timed[@]}" perf record -e cpu-clock -F 2000 -o "$RUN/profile/perf_b$B.data" -- \
          "$BUILD/bench/engine_bench" --model "$OUT/models/small" --threads "$THREADS" --batch "$B" \
          --decode-tokens "$steps" --prefill 0 >/dev/null 2>"$RUN/profile/perf_b$B.log"; then
        perf report -i "$RUN/profile/perf_b$B.data" --stdio --no-children --sort comm,dso,sym 2>/dev/null \
          | grep -v '^#' | grep '%' >"$RUN/profile/perf_b$B.txt" || true
        printf 'threads=%s\nsteps=%s\nbatch=%s\n' "$THREADS" "$steps" "$B" >"$RUN/profile/perf_b$B.meta"
      fi
      rm -f "$RUN/profile/perf_b$B.data"
    done
  fi
fi

probe
echo "load_after=$(load1)" >>"$RUN/machine.txt"
echo "wall_minutes=$(( ($(date +%s) - t_start + 30) / 60 ))" >>"$RUN/machine.txt"
say "results"
python3 bench/report.py "$RUN" "$RESULTS"
echo >&2
echo "$RESULTS updated; raw outputs in $RUN" >&2
