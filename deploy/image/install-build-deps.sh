#!/usr/bin/env bash
# Build stage of the image (and any Debian bookworm machine or chroot): the compilers and -dev
# packages the build needs. The package list is scripts/install-deps.sh's, not a copy of it, so
# the image builds with exactly what CI builds with (that script runs apt-get update itself when
# anything is missing). Needs root (or sudo) and Debian's mirrors.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "$root/scripts/install-deps.sh"
