#!/usr/bin/env bash
# The mpirun cluster tests. Usage: tests/integration/run.sh BUILD_DIR [TEST...]
# Builds nothing: BUILD_DIR must hold moe-serve, moe-generate, moe-gen-model and moe-client. Generates the
# Python gRPC stubs from proto/ into a temporary directory, runs every test of cluster_tests.py,
# migration_tests.py, elastic_tests.py and netns_tests.py (or the ones named) in its own process with
# a time limit, then the grpcio client test against a live cluster, and
# ends with one line "N passed, M failed" (exit status non-zero when M > 0), ", K skipped" added
# when a test exited 77 (it could not run here, e.g. the namespace tests when not root: the
# reason is printed).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
if [ $# -lt 1 ]; then
  echo "usage: $0 BUILD_DIR [TEST...]" >&2
  exit 2
fi
build=$(cd "$1" && pwd) || exit 2
shift
per_test_timeout=${MOE_IT_TIMEOUT:-120}

passed=0
failed=0
skipped=0
fail_names=()
for bin in moe-serve moe-generate moe-gen-model moe-client moe-chat-template; do
  if [ ! -x "$build/$bin" ]; then
    echo "run.sh: $build/$bin is missing (build it first)" >&2
    echo "0 passed, 1 failed"
    exit 1
  fi
done
if ! python3 -c "import grpc, grpc_tools" 2>/dev/null; then
  echo "run.sh: Python grpcio and grpcio-tools are required (pip install grpcio grpcio-tools)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
python3 -m grpc_tools.protoc -I "$src/proto" --python_out="$stubs" --grpc_python_out="$stubs" \
  "$src/proto/moeserve.proto" "$src/proto/health.proto" || { echo "0 passed, 1 failed"; exit 1; }
export PYTHONPATH="$stubs:$here${PYTHONPATH:+:$PYTHONPATH}"
export MOE_BUILD_DIR="$build"
export MOE_IT_TMP="$stubs" # scratch shared by the tests (e.g. a generated model)
# ASan builds: full stacks so that the suppressions recognise Open MPI's and gRPC's own leaks.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}fast_unwind_on_malloc=0"
export LSAN_OPTIONS="${LSAN_OPTIONS:+$LSAN_OPTIONS:}suppressions=$here/lsan.supp:print_suppressions=0"

# Every test module answers --list; a test runs as `python3 MODULE NAME`.
modules=(cluster_tests.py migration_tests.py elastic_tests.py netns_tests.py plan_tests.py deploy_pods_tests.py launcher_tests.py deploy_lws_tests.py serving_tests.py gpu_tests.py)
declare -A module_of=()
all_tests=()
for m in "${modules[@]}"; do
  [ -f "$here/$m" ] || continue
  while read -r name; do
    [ -n "$name" ] || continue
    module_of[$name]=$m
    all_tests+=("$name")
  done < <(python3 "$here/$m" --list)
done
if [ $# -gt 0 ]; then
  tests=("$@")
else
  tests=("${all_tests[@]}")
  if [ -f "$here/grpc_client_test.py" ]; then
    tests+=(grpc_client_test)
  fi
  if [ -f "$here/openai_client_test.py" ]; then
    tests+=(openai_client_test)
  fi
fi

for t in "${tests[@]}"; do
  start=$(date +%s%N)
  if [ "$t" = grpc_client_test ]; then
    cmd=(python3 "$here/live_cluster.py" python3 "$here/grpc_client_test.py")
  elif [ "$t" = openai_client_test ]; then
    cmd=(python3 "$here/openai_client_test.py") # the official openai SDK; starts its own clusters
  else
    cmd=(python3 "$here/${module_of[$t]:-cluster_tests.py}" "$t")
  fi
  out=$(timeout -k 5 "$per_test_timeout" "${cmd[@]}" 2>&1)
  rc=$?
  tenths=$((($(date +%s%N) - start) / 100000000))
  secs="$((tenths / 10)).$((tenths % 10))"
  if [ $rc -eq 0 ]; then
    passed=$((passed + 1))
    echo "PASS $t (${secs} s)"
  elif [ $rc -eq 77 ]; then
    skipped=$((skipped + 1))
    echo "SKIP $t ($(echo "$out" | sed -n 's/^SKIP: //p' | tail -1))"
  else
    failed=$((failed + 1))
    fail_names+=("$t")
    [ $rc -eq 124 ] && out="$out
(timed out after ${per_test_timeout} s)"
    echo "FAIL $t (${secs} s)"
    echo "$out" | tail -80 | sed 's/^/    /'
  fi
done
if [ $failed -gt 0 ]; then
  echo "failed: ${fail_names[*]}"
fi
summary="$passed passed, $failed failed"
[ $skipped -gt 0 ] && summary+=", $skipped skipped"
echo "$summary"
[ $failed -eq 0 ]
