#!/usr/bin/env bash
# An instance pod's readiness probe: ready once the coordinator lists this instance as ready.
#   moeserve-ready
# Asks the coordinator's gRPC API (MOE_COORDINATOR_API, HOST:PORT) for the cluster table
# (`moe-client status`, tools/moe_client.c: INST POOL STATE RANKS ... HOST) and looks for a row
# whose HOST is this instance's host label (MOE_HOST_LABEL, default the pod's hostname, which the
# entrypoint passes as --host-label) and whose STATE is "ready". Ready therefore means registered
# with the coordinator and taking requests, not merely started: a rolling update or a scale-up
# counts an instance only once it serves, a draining or lost one is out, and the
# PodDisruptionBudget counts the same. (Every rank of an LWS group is a row with the leader's
# label; one ready row is enough, as the coordinator readies an instance's ranks together.)
set -uo pipefail
bindir=$(cd "$(dirname "$0")" && pwd)
client=${MOE_CLIENT:-$bindir/moe-client}
addr=${MOE_COORDINATOR_API:?MOE_COORDINATOR_API (HOST:PORT of the coordinator gRPC API) is not set}
label=${MOE_HOST_LABEL:-$(hostname)}
table=$("$client" --addr "$addr" --timeout-ms "${MOE_READY_TIMEOUT_MS:-3000}" status 2>&1) || {
  echo "moeserve-ready: $addr: $table" >&2
  exit 1
}
if awk -v l="$label" '$NF == l && $3 == "ready" { found = 1 } END { exit !found }' <<<"$table"; then
  exit 0
fi
echo "moeserve-ready: $label is not a ready instance in the cluster table of $addr" >&2
exit 1
