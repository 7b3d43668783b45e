#!/usr/bin/env bash
# The pods' preStop hook: drains what runs in this pod before Kubernetes sends SIGTERM.
#   moeserve-prestop
# Sends SIGTERM to this pod's moe-serve processes and waits until they have exited:
#  - an instance (a plain pod, or any pod of an LWS group: the rank it hosts) drains on SIGTERM:
#    its requests migrate live to other instances of the pool, then every rank exits 0, mpirun
#    on the group's leader ends, and the group is gone without a request lost;
#  - the coordinator drains the cluster (running requests finish within its drain timeout).
# Why not leave it to the kubelet's SIGTERM: on an LWS leader PID 1's child is mpirun, and
# mpirun answers SIGTERM by SIGKILLing its ranks about a second later (Open MPI 4.1); on a worker
# pod it is sshd, whose exit would end the pod's rank mid-stream. Signalling the ranks
# themselves is the drain the server implements. Where a drained process is the container's
# main one (an E = 1 instance, the coordinator, the ranks under an LWS leader's mpirun), the
# container ends when it exits and takes this hook along before it can say "drained": that is
# the success path too (the pod's exit status, 0, is what counts).
# On an LWS worker pod the hook then also waits for Open MPI's daemon (orted) to go: it ends when
# the group's whole job has ended (mpirun on the leader stops its daemons). The kubelet's SIGTERM
# follows the hook and ends sshd and with it the leader's ssh session to this pod; were that
# before the job's end, the leader's mpirun would take it for a lost daemon and kill ranks of
# the group still finishing their drain (seen in deploy_lws_tests when a whole group is deleted).
# The wait is bounded by MOE_DRAIN_TIMEOUT_S +
# MOE_PRESTOP_MARGIN_S (60 + 30 s by default); deploy/k8s sets terminationGracePeriodSeconds
# above that, and tests/deploy checks it.
set -uo pipefail
timeout=$(( ${MOE_DRAIN_TIMEOUT_S:-60} + ${MOE_PRESTOP_MARGIN_S:-30} ))
name=${MOE_PRESTOP_COMM:-moe-serve}
daemon=${MOE_PRESTOP_DAEMON_COMM:-orted}

pids() { # pids [NAME]: this PID namespace's live processes named NAME (default $name)
  local d comm state want=${1:-$name}
  for d in /proc/[0-9]*; do
    comm=$(cat "$d/comm" 2>/dev/null) || continue
    [ "$comm" = "$want" ] || continue
    state=$(awk '{print $3}' "$d/stat" 2>/dev/null) || continue
    [ "$state" = Z ] && continue
    echo "${d#/proc/}"
  done
}

mapfile -t targets < <(pids)
if [ ${#targets[@]} -eq 0 ]; then
  echo "moeserve-prestop: no $name process in this pod" >&2
  exit 0
fi
echo "moeserve-prestop: SIGTERM to $name ${targets[*]}; waiting up to $timeout s for the drain" >&2
kill -TERM "${targets[@]}" 2>/dev/null
deadline=$((SECONDS + timeout))
drained=0
while [ "$SECONDS" -lt "$deadline" ]; do
  left=()
  if [ "$drained" = 0 ]; then
    for p in "${targets[@]}"; do
      if kill -0 "$p" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]; then
        left+=("$p")
      fi
    done
    if [ ${#left[@]} -eq 0 ]; then
      drained=1
      echo "moeserve-prestop: drained" >&2
    fi
  fi
  if [ "$drained" = 1 ]; then
    mapfile -t left < <(pids "$daemon")
    if [ ${#left[@]} -eq 0 ]; then
      exit 0
    fi
    [ -n "${said:-}" ] || echo "moeserve-prestop: waiting for $daemon ${left[*]} (the group's job to end)" >&2
    said=1
  fi
  sleep 1
done
if [ "$drained" = 1 ]; then
  echo "moeserve-prestop: $daemon ${left[*]} still running after $timeout s (the group's job has not ended)" >&2
else
  echo "moeserve-prestop: $name ${left[*]} still running after $timeout s; Kubernetes kills it at the end of the grace period" >&2
fi
exit 1
