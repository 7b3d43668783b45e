#!/usr/bin/env bash
# Runs the image's install steps in fresh Debian bookworm roots, as the Containerfile's two
# stages would, without a container engine:
#   deploy/image/check-debootstrap.sh [WORKDIR]        (root; default WORKDIR /var/tmp/moeserve-debootstrap)
# 1. debootstrap --variant=minbase bookworm WORKDIR/base (once; kept for later runs)
# 2. build root  = a copy of base + this working tree at /src:
#                  install-build-deps.sh, then build.sh /tmp/build /opt/moeserve
# 3. runtime root = a fresh copy of base + the build root's /opt/moeserve only:
#                  install-runtime-deps.sh; then, as the unprivileged user moe (uid 10001), the
#                  binaries start (moe-serve --help, moe-client --help), a tiny model is written
#                  and generated from (moe-gen-model, moe-generate), mpirun and sshd are there,
#                  the entrypoint maps a pod environment (--dry-run), and no compiler is
#                  installed.
# Slow (minutes: two debootstraps' worth of packages and a full build on this machine), so it is
# not a CI stage; deploy/README.md records a run. Needs Debian's mirrors.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/var/tmp/moeserve-debootstrap}
mirror=${MOE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "check-debootstrap: run as root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
}

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
prepare() { # prepare DIR: the kernel file systems and name resolution apt and postinsts need
  mount -t proc proc "$1/proc" && mounted+=("$1/proc")
  mount --bind /dev "$1/dev" && mounted+=("$1/dev")
  cp /etc/resolv.conf "$1/etc/resolv.conf"
  # As in Debian's container images: packages must not start services (openssh-server's sshd)
  # inside the root.
  printf '#!/bin/sh\nexit 101\n' >"$1/usr/sbin/policy-rc.d"
  chmod 0755 "$1/usr/sbin/policy-rc.d"
}
step() { echo "=== check-debootstrap: $* ($(date -u +%T))"; }

mkdir -p "$work"
if [ ! -f "$work/base/.complete" ]; then
  step "debootstrap --variant=minbase bookworm"
  rm -rf "$work/base"
  debootstrap --variant=minbase bookworm "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; exit 1; }
  touch "$work/base/.complete"
fi

step "build root: install-build-deps.sh, build.sh"
rm -rf "$work/build" "$work/runtime"
cp -a "$work/base" "$work/build"
mkdir -p "$work/build/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | tar -c --null -T - -f -) |
  tar -x -C "$work/build/src"
prepare "$work/build"
chroot "$work/build" /src/deploy/image/install-build-deps.sh
chroot "$work/build" /src/deploy/image/build.sh /tmp/build /opt/moeserve

step "runtime root: install-runtime-deps.sh"
cp -a "$work/base" "$work/runtime"
cp -a "$work/build/opt/moeserve" "$work/runtime/opt/"
prepare "$work/runtime"
chroot "$work/runtime" /opt/moeserve/share/moeserve/install-runtime-deps.sh

step "runtime root: the binaries start as moe"
as_moe() { chroot --userspec=10001:10001 "$work/runtime" env HOME=/home/moe PATH=/opt/moeserve/bin:/usr/bin:/bin "$@"; }
first() { local rc=0; "$@" >"$work/out.txt" 2>&1 || rc=$?; head -n 2 "$work/out.txt"; return "$rc"; }
first as_moe moe-serve --help
first as_moe moe-client --help || true   # usage on stderr, exit status 2
as_moe moe-client --addr 127.0.0.1:1 --timeout-ms 200 health && { echo "health against nothing succeeded" >&2; exit 1; }
as_moe moe-gen-model --arch qwen3_moe --preset tiny --seed 1 --out /tmp/tiny >/dev/null
as_moe moe-generate --model /tmp/tiny --prompt "Hello" --max-new-tokens 4 --temperature 0
first as_moe mpirun --version
first as_moe /usr/sbin/sshd -V || true   # prints its version, exits 1
as_moe env MOE_ROLE=instance MOE_POOL=decode MOE_MODEL_DIR=/tmp/tiny MOE_COORDINATOR_ADDR=coordinator:50052 \
  MOESERVE_CLUSTER_TOKEN=0123456789abcdef0123 moeserve-entrypoint --dry-run
if chroot "$work/runtime" sh -c 'command -v cc || command -v gcc || command -v cmake'; then
  echo "check-debootstrap: the runtime root has a compiler" >&2
  exit 1
fi
du -sxh "$work/runtime" | sed 's/^/runtime root size: /'
echo "runtime packages: $(tr "\n" " " <"$work/runtime/opt/moeserve/share/moeserve/runtime-packages.txt")"
step "ok"
