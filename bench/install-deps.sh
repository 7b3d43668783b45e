#!/usr/bin/env bash
# Python packages bench/run.sh needs for its llama.cpp side (benchmark tooling only: the product
# never runs Python): llama-cpp-python (builds llama.cpp from source for this CPU), gguf, and
# torch and transformers, which llama.cpp's convert_hf_to_gguf.py imports (torch at the top,
# transformers for the tokenizer; PyPI's Linux wheels, used on the CPU only). Installed from PyPI
# when missing; idempotent. bench/run.sh calls it when it runs llama.cpp (MOE_BENCH_LLAMA=1).
set -euo pipefail
py=${PYTHON:-python3}

# On CPUs with AMX-INT8, llama.cpp's native build compiles its AMX int8 matmul, which dies with
# SIGILL on `tilezero` for q8_0 here (llama-cpp-python 0.3.36; ggml-org/llama.cpp PR 26954: its
# tile configuration on the stack is optimised away, so the tiles are never configured). There
# it is built with every other extension this CPU has named one by one and the AMX ones off: the
# comparison then runs against llama.cpp's AVX-512 BF16/VNNI and repacked kernels, not its tiles
# (bench/RESULTS.md says so where it matters).
llama_cmake_args() {
  grep -qw amx_int8 /proc/cpuinfo || return 0
  local flags args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  local pair
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case $flags in
      *" ${pair%%:*} "*) args+=" -DGGML_${pair#*:}=ON" ;;
      *) args+=" -DGGML_${pair#*:}=OFF" ;;
    esac
  done
  echo "$args"
}
cmake_args=$(llama_cmake_args)

need=()
"$py" -c "import llama_cpp" 2>/dev/null || need+=(llama-cpp-python)
if [ -n "$cmake_args" ] && [ ${#need[@]} -eq 0 ] &&
   "$py" -c "import llama_cpp, sys; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
  echo "bench/install-deps: the installed llama-cpp-python has AMX int8 (SIGILL here): rebuilding without it" >&2
  CMAKE_ARGS="$cmake_args" "$py" -m pip install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python
fi
"$py" -c "import gguf" 2>/dev/null || need+=(gguf)
"$py" -c "import torch" 2>/dev/null || need+=(torch)
"$py" -c "import transformers" 2>/dev/null || need+=(transformers)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench/install-deps: installing ${need[*]} (llama-cpp-python compiles llama.cpp: minutes)" >&2
  CMAKE_ARGS="$cmake_args" "$py" -m pip install -q "${need[@]}"
fi
