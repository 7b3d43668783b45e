#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, builds with warnings as errors,
# runs every unit test, the same again under ASan+UBSan, the fuzzers for a bounded time, and the
# mpirun cluster tests. Ends with one line "N passed, M failed" over all stages.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh || { echo "install-deps failed"; exit 1; }
scripts/install-py-deps.sh || { echo "install-py-deps failed"; exit 1; }

passed=0
failed=0
stage() { # stage NAME COMMAND...
  local name=$1
  shift
  echo "=== $name"
  if "$@"; then
    passed=$((passed + 1))
    echo "=== $name: ok"
  else
    failed=$((failed + 1))
    echo "=== $name: FAILED"
  fi
}

unit_tests() { # unit_tests BUILD_DIR: every Criterion binary must run at least one test
  local dir=$1 log
  log=$(mktemp)
  ctest --test-dir "$dir" --output-on-failure --timeout 600 -j"$(nproc)" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if grep -q "No tests were found" "$log"; then rc=1; fi
  rm -f "$log"
  return "$rc"
}

stage "build (warnings as errors)" scripts/build.sh build -DMOE_WERROR=ON
stage "unit tests" unit_tests build
cuda_built() { # where a CUDA toolkit is installed the build must have compiled the CUDA plugin
  # (nvcc, sm_80 + sm_90, warnings as errors) linking cuBLAS and NCCL, and moe-serve must load it
  # on demand only: a CPU process maps no CUDA library (docs/backends.md, "The CUDA plugin")
  local plugin=build/libmoe_cuda.so libs
  [ -f "$plugin" ] || { echo "toolkit found but no $plugin"; return 1; }
  libs=$(ldd "$plugin") || return 1
  echo "$libs" | grep -q libcublas || { echo "$plugin does not link cuBLAS"; return 1; }
  if [ -f /usr/local/cuda/include/nccl.h ] || [ -f /usr/include/nccl.h ]; then
    echo "$libs" | grep -q libnccl || { echo "$plugin does not link NCCL"; return 1; }
  fi
  if ldd build/moe-serve | grep -E 'lib(cublas|cudart|nccl)'; then
    echo "moe-serve links CUDA libraries itself: every CPU process would map them"; return 1
  fi
  echo "CUDA plugin built; it links: $(echo "$libs" | grep -oE 'lib(cublas|cublasLt|nccl|cudart)[^ ]*' | sort -u | tr '\n' ' ')"
}
if [ -x /usr/local/cuda/bin/nvcc ] || command -v nvcc >/dev/null 2>&1; then
  stage "CUDA backend and NCCL built and linked" cuda_built
fi
stage "build (ASan+UBSan)" scripts/build.sh build-asan -DMOE_WERROR=ON -DMOE_SANITIZE="address;undefined" -DCMAKE_BUILD_TYPE=Debug
stage "unit tests (ASan+UBSan)" unit_tests build-asan
if [ -x scripts/fuzz.sh ]; then
  stage "fuzzing (bounded)" scripts/fuzz.sh "${MOE_FUZZ_SECONDS:-15}"
fi
if [ -x tests/deploy/run.sh ]; then stage "deploy manifests and pod scripts" tests/deploy/run.sh; fi
if [ -x tests/integration/run.sh ]; then
  stage "cluster tests (mpirun)" tests/integration/run.sh build
fi

echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
