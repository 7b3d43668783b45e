#!/usr/bin/env bash
# Installs every Debian package the build, the tests and the demo need. Idempotent: a second run
# installs nothing. Python packages for reference fixtures and benchmarks are separate
# (scripts/install-py-deps.sh): the product never needs them at run time.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config ninja-build git ca-certificates python3
  openmpi-bin libopenmpi-dev
  libgrpc-dev libmicrohttpd-dev libgnutls28-dev protobuf-c-compiler libprotobuf-c-dev protobuf-compiler libprotobuf-dev
  libcjson-dev libpcre2-dev libutf8proc-dev
  libcriterion-dev
  libucx-dev libssl-dev
  librandom123-dev
  iproute2
  clang libclang-rt-14-dev
  shellcheck yamllint openssh-server openssh-client tini
  prometheus
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
