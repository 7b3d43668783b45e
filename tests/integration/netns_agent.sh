#!/bin/sh
# Open MPI's rsh agent for the namespace hosts of tests/integration/netns.py
# (mpirun --mca plm_rsh_agent THIS): "THIS HOST COMMAND..." runs COMMAND (the orted launch line,
# a shell command as ssh would get it) in network namespace HOST, with HOST as its hostname (a UTS
# namespace of its own), as if ssh had logged into a host of that name.
host=$1
shift
case $host in
  *[!A-Za-z0-9._-]*|'') echo "netns_agent.sh: bad host name '$host'" >&2; exit 2 ;;
esac
exec ip netns exec "$host" unshare --uts -- /bin/sh -c "hostname $host && $*"
