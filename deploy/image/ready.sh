#!/usr/bin/env bash
# An instance pod's readiness probe: ready once the coordinator lists this instance.
#   moeserve-ready
# Asks the coordinator's gRPC API (MOE_COORDINATOR_API, HOST:PORT) for the cluster table
# (`moe-client status`) and looks for this instance's host label (MOE_HOST_LABEL, default the
# pod's hostname, which the entrypoint passes as --host-label) as a whole field of the table. Ready therefore
# means registered with the coordinator, not merely started: a rolling update or a scale-up
# counts an instance only once it can take requests, and the PodDisruptionBudget counts the same.
set -uo pipefail
bindir=$(cd "$(dirname "$0")" && pwd)
client=${MOE_CLIENT:-$bindir/moe-client}
addr=${MOE_COORDINATOR_API:?MOE_COORDINATOR_API (HOST:PORT of the coordinator gRPC API) is not set}
label=${MOE_HOST_LABEL:-$(hostname)}
table=$("$client" --addr "$addr" --timeout-ms "${MOE_READY_TIMEOUT_MS:-3000}" status 2>&1) || {
  echo "moeserve-ready: $addr: $table" >&2
  exit 1
}
if awk -v l="$label" '{ for (i = 1; i <= NF; i++) if ($i == l) found = 1 } END { exit !found }' <<<"$table"; then
  exit 0
fi
echo "moeserve-ready: $label is not in the cluster table of $addr yet" >&2
exit 1
