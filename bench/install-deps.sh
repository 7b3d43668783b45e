#!/usr/bin/env bash
# Python packages bench/run.sh needs for its llama.cpp side (benchmark tooling only: the product
# never runs Python): llama-cpp-python (builds llama.cpp from source for this CPU), gguf, and
# torch and transformers, which llama.cpp's convert_hf_to_gguf.py imports (torch at the top,
# transformers for the tokenizer; PyPI's Linux wheels, used on the CPU only). Installed from PyPI
# when missing; idempotent. bench/run.sh calls it when it runs llama.cpp (MOE_BENCH_LLAMA=1).
set -euo pipefail
py=${PYTHON:-python3}
need=()
"$py" -c "import llama_cpp" 2>/dev/null || need+=(llama-cpp-python)
"$py" -c "import gguf" 2>/dev/null || need+=(gguf)
"$py" -c "import torch" 2>/dev/null || need+=(torch)
"$py" -c "import transformers" 2>/dev/null || need+=(transformers)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench/install-deps: installing ${need[*]} (llama-cpp-python compiles llama.cpp: minutes)" >&2
  "$py" -m pip install -q "${need[@]}"
fi
