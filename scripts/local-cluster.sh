#!/usr/bin/env bash
# A local elastic moeserve cluster in one command: `moe-serve coordinator` and P prefill + D decode
# (+ M mixed) instances, each a separate job (its own process, or its own `mpirun -np E` for
# expert parallelism), so each instance is its own failure domain (docs/cluster.md). Runs in the
# foreground until SIGTERM / SIGINT / SIGUSR1, then drains: every instance first (its requests
# migrate or finish, it exits 0), then the coordinator; exits 0 when every job it drained exited 0
# (a job that died earlier was reported when it died).
#
#   scripts/local-cluster.sh --model DIR [--build build] [--prefill 1] [--decode 1] [--mixed 0]
#       [--ep 1] [--listen 127.0.0.1:50051] [--http-listen ADDR:PORT]
#       [--cluster-listen 127.0.0.1:0] [--threads 1] [--log-dir DIR] [-- MOE_SERVE_ARGS...]
#
# Arguments after `--` go to every moe-serve process (e.g. --kv-blocks 512). The cluster token is
# $MOESERVE_CLUSTER_TOKEN, or a random one made for this run. Prints "local cluster ready: ..."
# once Health is SERVING with every instance READY. Logs: one file per job in --log-dir (default
# a new /tmp/moeserve-local.XXXXXX). A job that dies is reported and the cluster goes on without
# it (that is the point of separate failure domains); if the coordinator dies, everything stops.
set -uo pipefail
build=build model='' prefill=1 decode=1 mixed=0 ep=1 listen=127.0.0.1:50051 http='' cluster=127.0.0.1:0
threads=1 logdir=''
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --prefill) prefill=$2; shift 2 ;;
    --decode) decode=$2; shift 2 ;;
    --mixed) mixed=$2; shift 2 ;;
    --ep) ep=$2; shift 2 ;;
    --listen) listen=$2; shift 2 ;;
    --http-listen) http=$2; shift 2 ;;
    --cluster-listen) cluster=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --log-dir) logdir=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "local-cluster.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$model" ]; then echo "local-cluster.sh: --model DIR is required" >&2; exit 2; fi
serve=$build/moe-serve
client=$build/moe-client
for b in "$serve" "$client"; do
  [ -x "$b" ] || { echo "local-cluster.sh: $b is missing (build first)" >&2; exit 2; }
done
logdir=${logdir:-$(mktemp -d /tmp/moeserve-local.XXXXXX)}
mkdir -p "$logdir"
if [ -z "${MOESERVE_CLUSTER_TOKEN:-}" ]; then
  MOESERVE_CLUSTER_TOKEN=$(head -c 24 /dev/urandom | base64)
fi
export MOESERVE_CLUSTER_TOKEN
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

names=() pids=()
coord_pid=''
declare -A reported=() # jobs already seen dead (reported then, not waited for at the drain)

drain() { # SIGTERM every instance (it drains and exits 0), then the coordinator
  local rc=0 i
  for i in "${!pids[@]}"; do
    [ -n "${reported[$i]:-}" ] && continue
    # mpirun forwards SIGUSR1 to its ranks at once; SIGTERM would wait odls_base_sigkill_timeout
    if [ "$ep" -gt 1 ]; then kill -USR1 "${pids[$i]}" 2>/dev/null; else kill -TERM "${pids[$i]}" 2>/dev/null; fi
  done
  for i in "${!pids[@]}"; do
    [ -n "${reported[$i]:-}" ] && continue
    if ! wait "${pids[$i]}"; then
      echo "local-cluster.sh: ${names[$i]} exited non-zero (log: $logdir/${names[$i]}.log)" >&2
      rc=1
    fi
  done
  kill -TERM "$coord_pid" 2>/dev/null
  wait "$coord_pid" || { echo "local-cluster.sh: the coordinator exited non-zero (log: $logdir/coordinator.log)" >&2; rc=1; }
  exit "$rc"
}
trap drain TERM INT USR1

coord_args=(coordinator --model "$model" --listen "$listen" --cluster-listen "$cluster" --threads "$threads")
[ -n "$http" ] && coord_args+=(--http-listen "$http")
"$serve" "${coord_args[@]}" "${extra[@]}" > "$logdir/coordinator.out" 2> "$logdir/coordinator.log" &
coord_pid=$!
join=''
for _ in $(seq 600); do
  line=$(grep -m1 "instances join at" "$logdir/coordinator.out" 2>/dev/null)
  if [ -n "$line" ]; then
    # "instances join at ADDR:PORT (port N)": the address as given, the port as bound
    join=$(sed -E 's/.*instances join at (.*):[0-9]+ \(port ([0-9]+)\).*/\1:\2/' <<< "$line")
    break
  fi
  kill -0 "$coord_pid" 2>/dev/null || { cat "$logdir/coordinator.log" >&2; echo "local-cluster.sh: the coordinator exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$join" ] || { echo "local-cluster.sh: no start-up line from the coordinator" >&2; exit 1; }
# a wildcard listen address is joined on loopback
join=${join/0.0.0.0:/127.0.0.1:}
echo "$line"

start_instance() { # POOL INDEX
  local name=$1$2
  local cmd=("$serve" instance --join "$join" --pool "$1" --model "$model" --threads "$threads"
             --host-label "$name" "${extra[@]}")
  if [ "$ep" -gt 1 ]; then
    # --bind-to none: Open MPI 4.1 binds each rank to one core when -np <= 2, and every group's
    # mpirun binds its ranks to the same first cores, knowing nothing of the other jobs on the
    # host: a --threads 2 rank then runs both threads on one core, beside the other groups'
    # rank 0 (bench/RESULTS.md, planner session 9). The kernel scheduler places them better.
    cmd=(mpirun --oversubscribe --bind-to none --mca odls_base_sigkill_timeout 60 -np "$ep" "${cmd[@]}")
  fi
  "${cmd[@]}" > "$logdir/$name.out" 2> "$logdir/$name.log" &
  names+=("$name")
  pids+=($!)
  echo "started $name (pid $!): ${cmd[*]}"
}
for i in $(seq 1 "$prefill"); do start_instance prefill "$i"; done
for i in $(seq 1 "$decode"); do start_instance decode "$i"; done
for i in $(seq 1 "$mixed"); do start_instance mixed "$i"; done

want=$(( (prefill + decode + mixed) * ep ))
# the gRPC address as bound ("listening on ADDR:PORT (port N)": --listen may say port 0)
gport=$(sed -E 's/.*listening on [^ ]+ \(port ([0-9]+)\).*/\1/' <<< "$line")
addr=${listen%:*}:$gport
addr=${addr/0.0.0.0:/127.0.0.1:}
ready=0
for _ in $(seq 1200); do
  if "$client" --addr "$addr" health 2>/dev/null | grep -q '^SERVING' &&
     [ "$("$client" --addr "$addr" status 2>/dev/null | awk '$3 == "ready"' | wc -l)" -ge "$want" ]; then
    ready=1; break
  fi
  kill -0 "$coord_pid" 2>/dev/null || break
  sleep 0.1
done
if [ "$ready" != 1 ]; then
  echo "local-cluster.sh: the cluster did not become ready (logs in $logdir)" >&2
  drain
fi
echo "local cluster ready: gRPC $addr${http:+, HTTP $http}, instances join at $join, logs in $logdir"

# Serve until told to stop; report jobs that die (the others go on).
while :; do
  if ! kill -0 "$coord_pid" 2>/dev/null; then
    echo "local-cluster.sh: the coordinator died; stopping the instances" >&2
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    wait
    exit 1
  fi
  for i in "${!pids[@]}"; do
    if [ -z "${reported[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
      reported[$i]=1
      echo "local-cluster.sh: ${names[$i]} (pid ${pids[$i]}) is gone; the cluster goes on without it" >&2
    fi
  done
  sleep 0.5 & wait $! 2>/dev/null  # wait is interruptible by the trapped signals, sleep is not
done
