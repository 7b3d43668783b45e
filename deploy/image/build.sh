#!/usr/bin/env bash
# Builds moeserve for the image and installs it under a prefix:
#   deploy/image/build.sh [BUILD_DIR [PREFIX]] [-- extra cmake args, e.g. -DMOE_CUDA=ON]
# defaults: BUILD_DIR=build-image, PREFIX=/opt/moeserve. Installs
#   PREFIX/bin/moe-*                  every tool the build made (moe-serve, moe-client, ...)
#   PREFIX/lib/moeserve/libmoe_cuda.so the CUDA plugin, where the build made one
#   PREFIX/bin/moeserve-entrypoint, moeserve-prestop, moeserve-ready   the pod scripts
#   PREFIX/share/moeserve/install-runtime-deps.sh
#   PREFIX/share/moeserve/runtime-packages.txt   the Debian packages that own the shared
#                                      libraries the binaries load (ldd + dpkg -S), which the
#                                      runtime stage installs: the list follows the build, so a
#                                      new library dependency needs no edit here.
# Portable ISA (MOE_NATIVE off: run-time dispatch), Release, no unit tests (CI runs those).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-build-image}
prefix=${2:-/opt/moeserve}
shift $(( $# >= 2 ? 2 : $# ))
if [ "${1:-}" = "--" ]; then shift; fi
case $build in /*) ;; *) build=$root/$build ;; esac

gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DMOE_NATIVE=OFF \
  -DMOE_BUILD_TESTS=OFF "$@"
cmake --build "$build" -j"$(nproc)"

install -d "$prefix/bin" "$prefix/share/moeserve"
n=0
for exe in "$build"/moe-*; do
  if [ ! -f "$exe" ] || [ ! -x "$exe" ]; then continue; fi
  install -m 0755 -s "$exe" "$prefix/bin/"
  n=$((n + 1))
done
[ "$n" -gt 0 ] || { echo "build.sh: no moe-* binaries in $build" >&2; exit 1; }
# A build with a CUDA toolkit made the CUDA plugin, which the binaries load on demand from
# PREFIX/lib/moeserve/ (worker/compute/cuda_plugin.c). The CUDA libraries it links come from
# NVIDIA's runtime image, not from Debian's packages: they are not in the list below.
if [ -f "$build/libmoe_cuda.so" ]; then
  install -d "$prefix/lib/moeserve"
  install -m 0755 -s "$build/libmoe_cuda.so" "$prefix/lib/moeserve/"
fi
install -m 0755 "$here/entrypoint.sh" "$prefix/bin/moeserve-entrypoint"
install -m 0755 "$here/prestop.sh" "$prefix/bin/moeserve-prestop"
install -m 0755 "$here/ready.sh" "$prefix/bin/moeserve-ready"
install -m 0755 "$here/install-runtime-deps.sh" "$prefix/share/moeserve/"

# The packages owning each shared library, as ldd resolves them here. Bookworm's dpkg database
# still names many libraries under /lib while ldd may print /usr/lib (merged /usr): try both.
owner() {
  local f=$1 alt
  for alt in "$f" "${f#/usr}" "/usr$f"; do
    if dpkg-query -S "$alt" 2>/dev/null | grep -v '^diversion' | head -n1 | cut -d: -f1; then
      return 0
    fi
  done
  echo "build.sh: no Debian package owns $f (needed by the binaries)" >&2
  return 1
}
libs=$(ldd "$prefix"/bin/moe-* | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u)
pkgs=()
for lib in $libs; do
  p=$(owner "$lib")
  [ -n "$p" ] && pkgs+=("$p")
done
printf '%s\n' "${pkgs[@]}" | sort -u >"$prefix/share/moeserve/runtime-packages.txt"
echo "build.sh: installed $n binaries in $prefix/bin; runtime packages:" \
  "$(tr '\n' ' ' <"$prefix/share/moeserve/runtime-packages.txt")"
