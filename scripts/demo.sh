#!/usr/bin/env bash
# The main job (README): installs what is missing, builds, starts a local moeserve cluster on the
# built-in tiny model (rank 0 coordinator, one prefill and one decode worker), sends it a few real
# requests with moe-client and one chat request over the OpenAI HTTP API (curl), prints the answers
# and the cluster table, then drains it (every rank exits 0). MOE_DEMO_RANKS / MOE_DEMO_PORT /
# MOE_DEMO_HTTP_PORT change the layout and ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build

model=build/models/tiny
port=${MOE_DEMO_PORT:-50051}
addr=127.0.0.1:$port
http_addr=127.0.0.1:${MOE_DEMO_HTTP_PORT:-8000}
ranks=${MOE_DEMO_RANKS:-3}
log=$(mktemp /tmp/moeserve-demo.XXXXXX.log)
mpirun_args=(--oversubscribe -np "$ranks")
if [ "$(id -u)" = 0 ]; then mpirun_args+=(--allow-run-as-root); fi

echo "== starting: mpirun ${mpirun_args[*]} build/moe-serve --model $model --listen $addr --http-listen $http_addr (log: $log)"
mpirun "${mpirun_args[@]}" build/moe-serve --model "$model" --listen "$addr" --http-listen "$http_addr" \
  --prefill-instances 1 --decode-instances $((ranks - 2)) >"$log" 2>&1 &
mpirun_pid=$!
stop() {
  kill -USR1 "$mpirun_pid" 2>/dev/null || true
  local rc=0
  wait "$mpirun_pid" || rc=$?
  return "$rc"
}
trap 'kill -9 $mpirun_pid 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  if build/moe-client --addr "$addr" health 2>/dev/null | grep -q '^SERVING'; then break; fi
  if ! kill -0 "$mpirun_pid" 2>/dev/null; then cat "$log"; echo "moe-serve exited"; exit 1; fi
  sleep 0.2
done
grep -m1 "coordinator pid" "$log" || true

for prompt in "The quick brown fox" "def fibonacci(n):" "Mixture-of-Experts models route each token"; do
  echo
  echo "== moe-client --prompt \"$prompt\" --stream"
  build/moe-client --addr "$addr" --prompt "$prompt" --max-new-tokens 32 --temperature 0.7 --top-p 0.95 \
    --seed 1 --stream
done
echo
echo "== curl http://$http_addr/v1/chat/completions (OpenAI API, the model's own chat template)"
curl -sS --max-time 60 "http://$http_addr/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "messages": [{"role": "user", "content": "Name three experts."}],
       "max_tokens": 24, "temperature": 0.7, "seed": 1}'
echo
echo
echo "== moe-client status"
build/moe-client --addr "$addr" status
echo
echo "== draining (SIGUSR1 to mpirun)"
rc=0
stop || rc=$?
trap - EXIT
if [ "$rc" -ne 0 ]; then
  tail -20 "$log"
  echo "mpirun exited $rc"
  exit "$rc"
fi
echo "cluster drained and stopped: every rank exited 0"
