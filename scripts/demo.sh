#!/usr/bin/env bash
# The main job (README): installs what is missing, builds, starts a local elastic moeserve cluster
# on the built-in tiny model (scripts/local-cluster.sh: a coordinator, one prefill and one decode
# instance, each its own process and failure domain), sends it a few real requests with moe-client
# and one chat request over the OpenAI HTTP API (curl), prints the answers and the cluster table,
# then drains it (every process exits 0). MOE_DEMO_PREFILL / MOE_DEMO_DECODE (instances) and
# MOE_DEMO_PORT / MOE_DEMO_HTTP_PORT change the layout and ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build

model=build/models/tiny
port=${MOE_DEMO_PORT:-50051}
addr=127.0.0.1:$port
http_addr=127.0.0.1:${MOE_DEMO_HTTP_PORT:-8000}
log=$(mktemp -d /tmp/moeserve-demo.XXXXXX)
launch=(scripts/local-cluster.sh --model "$model" --listen "$addr" --http-listen "$http_addr"
        --prefill "${MOE_DEMO_PREFILL:-1}" --decode "${MOE_DEMO_DECODE:-1}" --log-dir "$log")

echo "== starting: ${launch[*]}"
"${launch[@]}" >"$log/launcher.log" 2>&1 &
launcher_pid=$!
stop() {
  kill -TERM "$launcher_pid" 2>/dev/null || true
  local rc=0
  wait "$launcher_pid" || rc=$?
  return "$rc"
}
trap 'stop || true' EXIT

for _ in $(seq 1 300); do # the launcher says so once Health is SERVING and every instance READY
  if grep -q '^local cluster ready' "$log/launcher.log"; then break; fi
  if ! kill -0 "$launcher_pid" 2>/dev/null; then cat "$log/launcher.log"; echo "the cluster exited"; exit 1; fi
  sleep 0.2
done
cat "$log/launcher.log"

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
echo "== draining (SIGTERM to the launcher: each instance drains and exits 0, then the coordinator)"
rc=0
stop || rc=$?
trap - EXIT
if [ "$rc" -ne 0 ]; then
  tail -20 "$log"/*.log
  echo "the cluster exited $rc"
  exit "$rc"
fi
echo "cluster drained and stopped: every process exited 0"
