#!/usr/bin/env bash
# Where a disaggregated hand-off's time goes at a high rate, request by request (issue 14): a
# live 1P+1D cluster under moe-bench with the workers' step trace (MOE_STEP_TRACE) and hand-off
# trace (MOE_KV_TRACE), one run per variant, the variants alternated over the repeats; then
# bench/plan_handoff.py splits each request's first-to-second token gap into its parts.
# A variant is "NAME", "NAME:VAR=VALUE" (an environment variable given to the ranks, e.g.
# "yield0:OMPI_MCA_mpi_yield_when_idle=0") or "NAME@DIR" (the moe-serve binary in DIR instead of
# BUILD_DIR's: a build from before a change, for an A/B of the same run alternated).
# Usage: bench/plan_handoff.sh BUILD_DIR [MODEL_DIR]
# Env: HO_OUT (results dir), HO_RATE (3.5 req/s), HO_REQUESTS (40), HO_LEN_SCALE (0.5),
#      HO_TRACE (bench/traces/chat.jsonl), HO_REPEATS (2), HO_VARIANTS ("default").
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR [MODEL_DIR]}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
model=${2:-}
rate=${HO_RATE:-3.5}
n=${HO_REQUESTS:-40}
scale=${HO_LEN_SCALE:-0.5}
trace=${HO_TRACE:-$src/bench/traces/chat.jsonl}
kv=512
out_default=${HO_OUT:-}
# shellcheck source=bench/plan_lib.sh
. "$src/bench/plan_lib.sh"
hb=""; case $trace in *chat*) hb="--hash-block 64" ;; esac
for rep in $(seq "${HO_REPEATS:-2}"); do
  for v in ${HO_VARIANTS:-default}; do
    serve_dir=$build
    case $v in *@*) serve_dir=$(cd "${v#*@}" && pwd); v=${v%%@*} ;; esac
    name=${v%%:*}
    key="$name.run$rep"
    env_var=""
    if [ "$v" != "$name" ]; then env_var=${v#*:}; fi
    export MOE_KV_TRACE="$out/$key.kv"
    PLAN_MPI_ENV="-x MOE_KV_TRACE"
    saved=""
    if [ -n "$env_var" ]; then
      saved=$(env | grep "^${env_var%%=*}=" || true)
      export "${env_var?}"; PLAN_MPI_ENV="$PLAN_MPI_ENV -x ${env_var%%=*}"
    fi
    bench_build=$build; build=$serve_dir
    plan_start "$key" 3 --prefill-instances 1 --decode-instances 1
    build=$bench_build
    l0=$(load)
    # shellcheck disable=SC2086
    "$build/moe-bench" --addr "127.0.0.1:$port" --json --no-progress --trace "$trace" --requests "$n" \
      --len-scale "$scale" $hb --rate "$rate" --jsonl "$out/$key.real.jsonl" < /dev/null > "$out/$key.real.json" || true
    kill -USR1 "$mp"; wait "$mp" || true
    echo "$l0 / $(load)" > "$out/$key.load"
    if [ -n "$env_var" ]; then unset "${env_var%%=*}"; fi
    if [ -n "$saved" ]; then export "${saved?}"; fi
    echo "=== $key ($v, $rate req/s, load $(cat "$out/$key.load"))"
    python3 "$src/bench/plan_handoff.py" "$out/$key"
  done
done
echo "(raw files in $out)"
