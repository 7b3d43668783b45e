#!/usr/bin/env bash
# Runtime stage of the image (and any Debian bookworm machine or chroot that runs an installed
# PREFIX): only what the installed binaries and the pod scripts need, no compilers, no -dev
# packages. Run as root after build.sh installed PREFIX:
#   PREFIX/share/moeserve/install-runtime-deps.sh [PREFIX]      (default: the prefix it lies in)
# Installs
#   - the packages in PREFIX/share/moeserve/runtime-packages.txt (the owners of the shared
#     libraries the binaries load, written by build.sh),
#   - openmpi-bin (mpirun/orted on the leader of an expert-parallel group and orted on its
#     workers), openssh-server + openssh-client (how mpirun reaches the group's other pods, as
#     MPI-on-Kubernetes does), tini (PID 1: forwards signals, reaps ssh/orted children);
# and creates the unprivileged user the pods run as (moe, uid/gid 10001, home /home/moe).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:-$(cd "$here/../.." && pwd)}
list=$prefix/share/moeserve/runtime-packages.txt
[ -f "$list" ] || { echo "install-runtime-deps: $list is missing (run deploy/image/build.sh first)" >&2; exit 1; }
mapfile -t pkgs < <(grep -v -e '^#' -e '^$' "$list")
pkgs+=(openmpi-bin openssh-server openssh-client tini)

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
apt-get clean
rm -rf /var/lib/apt/lists/*
# openssh-server's postinst makes host keys for a system sshd; the pods run their own sshd as the
# unprivileged user with a host key from a Secret, so none is baked into the image.
rm -f /etc/ssh/ssh_host_*

uid=${MOE_UID:-10001}
if ! getent passwd moe >/dev/null; then
  groupadd --gid "$uid" moe
  useradd --uid "$uid" --gid "$uid" --create-home --home-dir /home/moe --shell /bin/bash moe
fi
install -d -o moe -g moe -m 0755 /models
install -d -o moe -g moe -m 0700 /home/moe/.ssh
echo "install-runtime-deps: installed ${pkgs[*]}; user moe ($uid)"
