"""Runs a command against a live moe-serve cluster: live_cluster.py [--np N] CMD ARGS...
Starts the cluster (1 prefill + 1 decode by default) on a free port, runs CMD with "{addr}" in its
arguments replaced by HOST:PORT and MOE_SERVER_ADDR set in its environment, then drains the
cluster; exits with CMD's status (or 1 if the cluster did not exit 0)."""

import os
import subprocess
import sys

from cluster import Cluster, TestFailure


def main():
    args = sys.argv[1:]
    np = 3
    if len(args) >= 2 and args[0] == "--np":
        np = int(args[1])
        args = args[2:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        with Cluster(np=np) as c:
            addr = "127.0.0.1:%d" % c.port
            env = dict(os.environ, MOE_SERVER_ADDR=addr)
            rc = subprocess.run([a.replace("{addr}", addr) for a in args], env=env).returncode
            src = c.stop()
            if src != 0:
                print("moe-serve exited %s:\n%s" % (src, c.stderr()[-3000:]))
                return 1
            return rc
    except TestFailure as e:
        print("FAIL: %s" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
