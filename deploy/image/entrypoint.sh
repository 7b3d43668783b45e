#!/usr/bin/env bash
# The image's entrypoint: turns a pod's environment into the moe-serve command it should run.
#   moeserve-entrypoint [--dry-run]
# --dry-run (or MOE_DRY_RUN=1) prints the command (and an LWS leader's hostfile) instead of
# running it: how tests/deploy checks the mapping without a cluster.
#
# Environment (deploy/k8s sets these from the Downward API, the flags ConfigMap and LWS):
#   MOE_ROLE            coordinator | instance                                     (required)
#   MOE_MODEL_DIR       model folder (Hugging Face layout) on the mounted volume   (required)
#   MOE_CLUSTER_TOKEN_FILE  the cluster token (a Secret's file, >= 16 bytes); default
#                       /etc/moeserve/token/token; when that file is absent the token must be in
#                       MOESERVE_CLUSTER_TOKEN, which moe-serve reads itself
#   MOE_LOG_LEVEL       passed on to every rank (also the remote ones of an LWS group)
# coordinator:
#   MOE_LISTEN (0.0.0.0:50051, the gRPC API), MOE_CLUSTER_LISTEN (0.0.0.0:50052, instances
#   join here), MOE_HTTP_LISTEN (the OpenAI-compatible HTTP API; off when unset),
#   MOE_HEARTBEAT_TIMEOUT_MS, MOE_DRAIN_TIMEOUT_S, MOE_COORDINATOR_ARGS (more flags: TLS and
#   API-key files from the Secret deploy/k8s mounts at /etc/moeserve/api go here)
# instance:
#   MOE_POOL            prefill | decode | mixed                                   (required)
#   MOE_COORDINATOR_ADDR  HOST:PORT of the coordinator's cluster port              (required)
#   MOE_HOST_LABEL      shown in `moe-client status`; default the pod's name (hostname)
#   MOE_THREADS         --threads (deploy/k8s: the container's CPU request), unless the args
#                       below already say --threads
#   MOE_INSTANCE_ARGS, MOE_PREFILL_ARGS / MOE_DECODE_ARGS / MOE_MIXED_ARGS   more flags
#   LWS_GROUP_SIZE, LWS_WORKER_INDEX, LWS_LEADER_ADDRESS   set by LeaderWorkerSet: a group of
#                       E = LWS_GROUP_SIZE pods is one expert-parallel instance. The leader
#                       (index 0) runs `mpirun -np E` over the group's pods through ssh; every
#                       other pod runs sshd and hosts one rank. Without them (or E = 1) the
#                       instance is this one process.
#   MOE_SSH_SECRET_DIR  the ssh Secret's mount (ssh-privatekey, ssh-publickey);
#                       default /etc/moeserve/ssh
#   MOE_SSH_DIR         where the usable copies go (ssh wants 0600 files the user owns): a
#                       folder this script creates; default $HOME/.ssh (deploy/k8s: in an
#                       emptyDir, as the root file system is read-only)
#   MOE_SSH_PORT        the workers' sshd port (2222: unprivileged, as the pods run as non-root)
#   MOE_WORKER_WAIT_S   how long the leader waits for its workers' sshd (600)
#   MOE_MPIRUN_SIGKILL_TIMEOUT_S  Open MPI's odls_base_sigkill_timeout for the leader's mpirun
#                       (1, its default: see below why it stays short in pods)
#   MOE_MPIRUN_ARGS     more mpirun flags (e.g. --mca btl_tcp_if_include eth0); the leader's
#                       UCX_* and NCCL_* variables (and OMPI_*, by mpirun itself) reach the
#                       remote ranks without it
#   MOE_SSHD            the sshd binary (/usr/sbin/sshd; sshd must be started by absolute path)
# Flags in the *_ARGS variables are split on whitespace (they are flags, not free text).
set -euo pipefail

die() {
  echo "moeserve-entrypoint: $*" >&2
  exit 2
}

dry_run=${MOE_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
[ $# -eq 0 ] || die "unexpected arguments: $* (configure the pod through its environment)"

bindir=$(cd "$(dirname "$0")" && pwd)
moe_serve=${MOE_SERVE:-$bindir/moe-serve}

# run CMD...: exec it, or print it as one line "exec WORD..." with each word shell-quoted
# (printf %q), so tests can compare argv exactly, spaces and all.
run() {
  if [ "$dry_run" = 1 ]; then
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
    exit 0
  fi
  exec "$@"
}

# split_args VAR: the words of $VAR appended to the array `args`.
split_args() {
  local words
  read -r -a words <<<"${!1:-}"
  args+=("${words[@]}")
}

has_flag() { # has_flag FLAG: whether `args` already holds FLAG (or FLAG=...)
  local a
  for a in "${args[@]}"; do
    case $a in "$1" | "$1"=*) return 0 ;; esac
  done
  return 1
}

check_model() {
  local dir=${MOE_MODEL_DIR:-}
  [ -n "$dir" ] || die "MOE_MODEL_DIR is not set (the model folder on the mounted volume)"
  [ -f "$dir/config.json" ] ||
    die "no model at MOE_MODEL_DIR=$dir (no config.json): load one onto the model volume first (deploy/README.md, 'Load a model')"
}

token_args() {
  local f=${MOE_CLUSTER_TOKEN_FILE:-/etc/moeserve/token/token}
  if [ -f "$f" ]; then
    local n
    n=$(wc -c <"$f")
    [ "$n" -ge 16 ] || die "cluster token file $f has $n bytes; it needs at least 16 (deploy/k8s/make-secrets.sh makes one)"
    args+=(--cluster-token-file "$f")
  elif [ -n "${MOESERVE_CLUSTER_TOKEN:-}" ]; then
    [ "${#MOESERVE_CLUSTER_TOKEN}" -ge 16 ] || die "MOESERVE_CLUSTER_TOKEN has ${#MOESERVE_CLUSTER_TOKEN} bytes; it needs at least 16"
  else
    die "no cluster token: neither the file $f (MOE_CLUSTER_TOKEN_FILE) nor MOESERVE_CLUSTER_TOKEN"
  fi
}

coordinator() {
  check_model
  args=("$moe_serve" coordinator --model "$MOE_MODEL_DIR"
    --listen "${MOE_LISTEN:-0.0.0.0:50051}"
    --cluster-listen "${MOE_CLUSTER_LISTEN:-0.0.0.0:50052}")
  token_args
  if [ -n "${MOE_HTTP_LISTEN:-}" ]; then args+=(--http-listen "$MOE_HTTP_LISTEN"); fi
  if [ -n "${MOE_HEARTBEAT_TIMEOUT_MS:-}" ]; then args+=(--heartbeat-timeout-ms "$MOE_HEARTBEAT_TIMEOUT_MS"); fi
  if [ -n "${MOE_DRAIN_TIMEOUT_S:-}" ]; then args+=(--drain-timeout-s "$MOE_DRAIN_TIMEOUT_S"); fi
  split_args MOE_COORDINATOR_ARGS
  run "${args[@]}"
}

# instance_args: the `moe-serve instance ...` words of this pod's instance into `args`.
instance_args() {
  local pool=${MOE_POOL:-}
  case $pool in
    prefill | decode | mixed) ;;
    *) die "MOE_POOL='$pool': must be prefill, decode or mixed" ;;
  esac
  [ -n "${MOE_COORDINATOR_ADDR:-}" ] || die "MOE_COORDINATOR_ADDR is not set (HOST:PORT of the coordinator's cluster port)"
  check_model
  args=("$moe_serve" instance --join "$MOE_COORDINATOR_ADDR" --pool "$pool" --model "$MOE_MODEL_DIR")
  token_args
  args+=(--host-label "${MOE_HOST_LABEL:-$(hostname)}")
  split_args MOE_INSTANCE_ARGS
  local pool_var
  pool_var="MOE_$(echo "$pool" | tr '[:lower:]' '[:upper:]')_ARGS"
  split_args "$pool_var"
  if [ -n "${MOE_THREADS:-}" ] && ! has_flag --threads; then args+=(--threads "$MOE_THREADS"); fi
}

ssh_dir() { echo "${MOE_SSH_DIR:-$HOME/.ssh}"; }

# ssh_keys: the Secret's key pair copied where ssh accepts it (owned by us, 0600).
ssh_keys() {
  local src=${MOE_SSH_SECRET_DIR:-/etc/moeserve/ssh} dir
  dir=$(ssh_dir)
  if [ ! -f "$src/ssh-privatekey" ] || [ ! -f "$src/ssh-publickey" ]; then
    die "no ssh key pair in $src (ssh-privatekey, ssh-publickey): an LWS group needs the ssh Secret (deploy/k8s/make-secrets.sh)"
  fi
  [ "$dry_run" = 1 ] && return 0
  install -d -m 0700 "$dir"
  install -m 0600 "$src/ssh-privatekey" "$dir/id_moeserve"
  install -m 0644 "$src/ssh-publickey" "$dir/id_moeserve.pub"
}

# The group's hostnames, leader first. LWS names a group's pods <lws>-<group> (the leader) and
# <lws>-<group>-<index> (workers 1..E-1), all under the LWS's headless service, and sets
# LWS_LEADER_ADDRESS=<lws>-<group>.<service>.<namespace> (LWS pkg/utils/pod/pod_utils.go,
# AddLWSVariables; docs reference/leaderworkerset.v1: "Worker pods are named using the format
# leaderWorkerSetName-leaderIndex-workerIndex"). So worker i is the leader address with "-i"
# appended to its first label. The leader itself is listed under its own hostname, which is how
# Open MPI recognises the local node (no ssh to itself).
# group_hosts E: into the array `hosts`.
group_hosts() {
  local leader=${LWS_LEADER_ADDRESS:-} size=$1 i
  [ -n "$leader" ] || die "LWS_LEADER_ADDRESS is not set (LWS_GROUP_SIZE=$size needs LeaderWorkerSet's variables)"
  case $leader in *.*) ;; *) die "LWS_LEADER_ADDRESS='$leader' is not <pod>.<service>.<namespace>" ;; esac
  hosts=("${MOE_LEADER_HOST:-$(hostname)}")
  for ((i = 1; i < size; i++)); do
    hosts+=("${leader%%.*}-$i.${leader#*.}")
  done
}

lws_leader() {
  local size=$1 dir hostfile h
  instance_args
  ssh_keys
  dir=$(ssh_dir)
  hostfile=$dir/hostfile
  group_hosts "$size"
  if [ "$dry_run" = 1 ]; then
    printf 'hostfile %s\n' "${hosts[@]}"
  else
    for h in "${hosts[@]}"; do echo "$h slots=1"; done >"$hostfile"
    # Every pod of the group presents the Secret's key as its sshd host key, so one known_hosts
    # line under a fixed alias checks them all (no StrictHostKeyChecking=no).
    echo "moeserve-group $(cat "$dir/id_moeserve.pub")" >"$dir/known_hosts"
    cat >"$dir/config" <<EOF
Host *
  Port ${MOE_SSH_PORT:-2222}
  IdentityFile $dir/id_moeserve
  IdentitiesOnly yes
  HostKeyAlias moeserve-group
  UserKnownHostsFile $dir/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
  ServerAliveInterval 5
  ServerAliveCountMax 3
  LogLevel ERROR
EOF
    chmod 0600 "$dir/config" "$dir/known_hosts"
    # LWS starts the workers once the leader pod exists (startupPolicy LeaderCreated), so wait
    # until every worker's sshd answers before mpirun tries them once.
    local deadline=$((SECONDS + ${MOE_WORKER_WAIT_S:-600}))
    for h in "${hosts[@]:1}"; do
      until ssh -F "$dir/config" "$h" true 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] ||
          die "worker $h did not answer on ssh port ${MOE_SSH_PORT:-2222} within ${MOE_WORKER_WAIT_S:-600} s"
        sleep 2
      done
    done
  fi
  # Remote ranks start under sshd, not with this pod's environment: pass on what they need.
  # mpirun exports OMPI_* variables itself (mpirun(1), "Exported Environment Variables"); the
  # transports' settings (UCX_*: the cluster link and KV transfer; NCCL_*: the GPU all-to-all)
  # come from the same flags ConfigMap in every pod of the group and must hold on every rank.
  # A SIGTERM to mpirun reaches the ranks odls_base_sigkill_timeout s later and SIGKILL as long
  # again after that (Open MPI 4.1; default 1 s). Kept short here: mpirun sleeps through both
  # waits even when every rank has already exited, so a group broken by a dead pod would hold its
  # leader 2 x that long before the group can be recreated; in a pod the drain is preStop's job
  # and runs before the SIGTERM (MOE_MPIRUN_SIGKILL_TIMEOUT_S raises it where no preStop runs).
  local -a mpi=(mpirun -np "$size" --hostfile "$hostfile" --bind-to none
    --mca plm_rsh_agent ssh --mca plm_rsh_args "-F $dir/config"
    --mca plm_rsh_no_tree_spawn 1 --mca orte_keep_fqdn_hostnames 1
    --mca odls_base_sigkill_timeout "${MOE_MPIRUN_SIGKILL_TIMEOUT_S:-1}")
  local v
  for v in MOE_LOG_LEVEL MOESERVE_CLUSTER_TOKEN $(compgen -e | grep -E '^(UCX|NCCL)_' | sort); do
    if [ -n "${!v:-}" ]; then mpi+=(-x "$v"); fi
  done
  local -a extra
  read -r -a extra <<<"${MOE_MPIRUN_ARGS:-}"
  run "${mpi[@]}" "${extra[@]}" "${args[@]}"
}

lws_worker() {
  local dir
  ssh_keys
  dir=$(ssh_dir)
  local sshd=${MOE_SSHD:-/usr/sbin/sshd}
  if [ "$dry_run" = 0 ]; then
    cp "$dir/id_moeserve.pub" "$dir/authorized_keys"
    chmod 0600 "$dir/authorized_keys"
    # sshd as the unprivileged user: it can only log in that same user, which is all mpirun
    # needs; the Secret's key is both the host key and the one authorized key. StrictModes is
    # off because the files live in an emptyDir (world-writable above our own 0700 folder),
    # which StrictModes refuses; it guards against other users of a shared host, and a pod has
    # none.
    cat >"$dir/sshd_config" <<EOF
Port ${MOE_SSH_PORT:-2222}
HostKey $dir/id_moeserve
AuthorizedKeysFile $dir/authorized_keys
PidFile none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin no
AllowUsers $(id -un)
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel ${MOE_SSHD_LOG_LEVEL:-INFO}
EOF
  fi
  run "$sshd" -D -e -f "$dir/sshd_config"
}

instance() {
  local size=${LWS_GROUP_SIZE:-1} index=${LWS_WORKER_INDEX:-0}
  case $size in '' | *[!0-9]*) die "LWS_GROUP_SIZE='$size' is not a number" ;; esac
  case $index in '' | *[!0-9]*) die "LWS_WORKER_INDEX='$index' is not a number" ;; esac
  if [ "$size" -le 1 ]; then
    instance_args
    run "${args[@]}"
  elif [ "$index" -eq 0 ]; then
    lws_leader "$size"
  else
    [ "$index" -lt "$size" ] || die "LWS_WORKER_INDEX=$index is not below LWS_GROUP_SIZE=$size"
    lws_worker
  fi
}

case ${MOE_ROLE:-} in
  coordinator) coordinator ;;
  instance) instance ;;
  *) die "MOE_ROLE='${MOE_ROLE:-}': must be coordinator or instance" ;;
esac
