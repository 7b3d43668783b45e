#!/usr/bin/env bash
# The main job (README): installs what is missing, builds, writes the built-in tiny model and
# generates from a prompt on it, printing the text as it comes and the speed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build
model=build/models/tiny
build/moe-generate --model "$model" --prompt "The quick brown fox" --max-new-tokens 48 \
  --temperature 0.7 --top-p 0.95 --seed 1
