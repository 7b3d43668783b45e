#!/usr/bin/env bash
# Writes the two secrets the manifests' secretGenerators read, once per cluster:
#   deploy/k8s/make-secrets.sh [DIR]      (default: deploy/k8s/base/secrets; never committed)
#   DIR/cluster-token                    32 random bytes, hex: instances present it to join
#   DIR/ssh-privatekey, DIR/ssh-publickey  an ed25519 key pair: the leader of an LWS group logs
#                                        in to its workers with it, and the workers' sshd
#                                        presents it as their host key
# Existing files are kept (re-running changes nothing); delete them to rotate. kustomize names
# each Secret after a hash of its content, so applying rotated secrets rolls the pods.
set -euo pipefail
dir=${1:-$(cd "$(dirname "$0")" && pwd)/base/secrets}
umask 077
mkdir -p "$dir"
if [ ! -s "$dir/cluster-token" ]; then
  od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dir/cluster-token"
  echo "make-secrets: wrote $dir/cluster-token"
fi
if [ ! -s "$dir/ssh-privatekey" ] || [ ! -s "$dir/ssh-publickey" ]; then
  rm -f "$dir/ssh-privatekey" "$dir/ssh-privatekey.pub" "$dir/ssh-publickey"
  ssh-keygen -q -t ed25519 -N '' -C moeserve-group -f "$dir/ssh-privatekey"
  mv "$dir/ssh-privatekey.pub" "$dir/ssh-publickey"
  echo "make-secrets: wrote $dir/ssh-privatekey, $dir/ssh-publickey"
fi
