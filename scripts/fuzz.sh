#!/usr/bin/env bash
# Builds every libFuzzer target (tests/fuzz/fuzz_*.c) with clang in build-fuzz and runs each for
# SECONDS (default 20) over its seed corpus tests/fuzz/corpus/NAME/ (read-only; new inputs go to
# tests/fuzz/corpus-run/NAME/, which git ignores). Fails if any fuzzer finds a crash, a leak or a
# sanitizer report; the reproducer is left in build-fuzz/artifacts/.
# Usage: scripts/fuzz.sh [SECONDS] [NAME...]   e.g. scripts/fuzz.sh 60 safetensors
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-20}
shift || true
build=build-fuzz
jobs=${MOE_FUZZ_JOBS:-2}

mkdir -p "$build"
CC=clang cmake -S . -B "$build" -G Ninja -DMOE_FUZZ=ON -DMOE_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j"$jobs" --target moe_fuzz

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.c; do
    n=$(basename "$f" .c)
    names+=("${n#fuzz_}")
  done
fi

mkdir -p "$build/artifacts"
failed=0
for n in "${names[@]}"; do
  bin="$build/tests/fuzz/fuzz_$n"
  if [ ! -x "$bin" ]; then
    echo "fuzz: $bin was not built" >&2
    failed=1
    continue
  fi
  seeds=tests/fuzz/corpus/$n
  run=tests/fuzz/corpus-run/$n
  mkdir -p "$run"
  dirs=("$run")
  [ -d "$seeds" ] && dirs+=("$seeds")
  echo "=== fuzz_$n: ${secs}s over ${dirs[*]}"
  log="$build/artifacts/fuzz_$n.log"
  if "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/fuzz_$n-" "${dirs[@]}" >"$log" 2>&1; then
    grep -aE "^stat::(number_of_executed_units|new_units_added|peak_rss_mb)" "$log" || true
    echo "=== fuzz_$n: ok"
  else
    tail -n 60 "$log"
    echo "=== fuzz_$n: FAILED (log $log, reproducer in $build/artifacts/)"
    failed=1
  fi
done
exit "$failed"
