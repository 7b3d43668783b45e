"""Cluster tests across several hosts of one machine (network namespaces, netns.py):
`netns_tests.py --list` names them, `netns_tests.py NAME` runs one (exit 0 = pass, 77 = skipped:
not root or no `ip netns`, the reason printed). run.sh runs each in its own process."""

import os
import signal
import subprocess
import sys
import time

from cluster import Cluster, TestFailure, build_dir, check, mixed_workload, registrar, test_main
from cluster_tests import compare, references, run_workload, stop_ok
import moeserve_pb2 as pb
import netns

TESTS = {}
test = registrar(TESTS)


class Skip(Exception):
    pass


def make_hosts(n, **kw):
    try:
        return netns.Hosts(n, **kw)
    except netns.Unavailable as e:
        raise Skip(str(e))


def in_host(hosts, host, code, timeout=10):
    """Runs a Python snippet in host; returns (exit status, stdout + stderr)."""
    r = subprocess.run(hosts.command(host, [sys.executable, "-c", code]), capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def connect_code(host, port, timeout=1.0):
    return ("import socket, sys\n"
            "try:\n"
            "    s = socket.create_connection((%r, %d), timeout=%r); print(s.recv(64).decode())\n"
            "except OSError as e:\n"
            "    print('error', e); sys.exit(3)\n" % (host, port, timeout))


@test
def netns_hosts_links_and_cleanup():
    """The harness itself: hosts resolve each other by name and talk over their links, not to
    anything outside the subnet; gethostname() is the host's name; cut() silences a host and
    restore() brings it back; SIGSTOP / SIGCONT / SIGKILL of a process in a host; and nothing is
    left behind: not after close(), not after SIGTERM to the test process, and a run killed with
    SIGKILL is removed by the next run of its prefix."""
    prefix = "moetst"
    with make_hosts(3, rate="1gbit", prefix=prefix) as hosts:
        a, b, c = hosts.names
        rc, out = in_host(hosts, a, "import socket; print(socket.gethostname(), socket.gethostbyname(%r))" % c)
        check(rc == 0 and out.split() == [a, hosts.addr[c]], "host name / resolution in %s: %r" % (a, out))
        # b listens on its address; a and c reach it by name; nothing leaves the subnet
        server = hosts.popen(b, [sys.executable, "-c",
                                 "import socket\n"
                                 "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                 "s.bind(('0.0.0.0', 7000)); s.listen(8)\n"
                                 "while True:\n"
                                 "    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()\n"])
        deadline = time.time() + 10
        while True:
            rc, out = in_host(hosts, a, connect_code(b, 7000))
            if rc == 0 or time.time() > deadline:
                break
            time.sleep(0.1)
        check(rc == 0 and out.strip() == b, "a -> b by name: %r" % out)
        rx0, _ = hosts.link_bytes(b)
        rc, out = in_host(hosts, c, connect_code(b, 7000))
        check(rc == 0 and out.strip() == b, "c -> b: %r" % out)
        check(hosts.link_bytes(b)[0] > rx0, "the connection did not cross b's link")
        rc, out = in_host(hosts, a, connect_code("192.0.2.1", 80))
        check(rc == 3 and "unreachable" in out.lower(), "a host must have no route out of the subnet: %r" % out)
        # the test's own namespace reaches b's port only through a forwarder
        import socket
        port = hosts.forward(b, 7000, addr=hosts.addr[b])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            check(s.recv(64).decode() == b, "forwarder")
        # cut / restore
        hosts.cut(b)
        rc, out = in_host(hosts, a, connect_code(b, 7000))
        check(rc == 3 and "timed out" in out, "a reached b through a cut link: %r" % out)
        hosts.restore(b)
        deadline = time.time() + 10
        while True:
            rc, out = in_host(hosts, a, connect_code(b, 7000))
            if rc == 0 or time.time() > deadline:
                break
        check(rc == 0 and out.strip() == b, "b not back after restore: %r" % out)
        # stop / cont / kill -9 of a process in a host
        check(hosts.host_of(server.pid) == b, "server runs in %s, not %s" % (hosts.host_of(server.pid), b))
        hosts.stop(server)
        time.sleep(0.2)
        with open("/proc/%d/stat" % server.pid) as f:
            check(f.read().split(") ")[1][0] == "T", "SIGSTOP did not stop the process")
        hosts.cont(server)
        hosts.kill9(server)
        check(server.wait(timeout=5) == -signal.SIGKILL, "kill9: %s" % server.returncode)
        made = hosts.names + [hosts.switch]
    left = set(made) & set(netns._netns_list())
    check(not left and not any(os.path.exists("/etc/netns/" + h) for h in made), "left behind: %s" % left)

    # SIGTERM to a test process cleans up; SIGKILL leaves it for the next run of the prefix
    child = ("import sys, time; sys.path.insert(0, %r); import netns\n"
             "h = netns.Hosts(2, prefix=%r); print(' '.join(h.names + [h.switch]), flush=True); time.sleep(60)\n"
             % (os.path.dirname(os.path.abspath(__file__)), prefix))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        names = p.stdout.readline().split()
        check(len(names) == 3, "child made no hosts (%s)" % p.poll())
        p.send_signal(sig)
        p.wait(timeout=30)
        left = set(names) & set(netns._netns_list())
        if sig == signal.SIGTERM:
            check(not left, "left behind after SIGTERM: %s" % left)
        else:
            check(left == set(names), "SIGKILL: expected leftovers %s, found %s" % (names, left))
            removed = netns.remove_leftovers(prefix)
            check(set(removed) == set(names), "leftovers removed: %s of %s" % (removed, names))
            check(not set(names) & set(netns._netns_list()), "leftovers still there")


@test
def netns_three_hosts_ep2_decode_greedy_matches_moe_generate():
    """One mpirun across three hosts: the coordinator and the prefill instance on host 1, an EP-2
    decode instance with one rank on host 2 and one on host 3 (mpirun --hostfile, the netns rsh
    agent, MPI over TCP on the test subnet only), links shaped (0.2 ms delay where the kernel has
    netem, 1 Gbit/s); 32 concurrent greedy streams equal moe-generate's, every rank ran in its
    host, every KV byte crossed a link, KV back to zero, every rank exits 0."""
    reqs = mixed_workload(32, seed=10)
    refs = references(reqs)
    with make_hosts(3, delay="200us", rate="1gbit") as hosts:
        print("links: %s" % hosts.shaping)
        h1, h2, h3 = hosts.names
        hf = hosts.hostfile({h1: 2, h2: 1, h3: 1})
        with Cluster(np=4, args=["--decode-ep", "2", "--batch-tokens", "64"], env=hosts.env(),
                     mpirun_args=hosts.mpirun_args(hf), wrap=lambda cmd: hosts.command(h1, cmd),
                     connect=lambda port: "127.0.0.1:%d" % hosts.forward(h1, port)) as c:
            where = {r: hosts.host_of(pid) for r, pid in hosts.mpi_ranks(os.path.join(build_dir(), "moe-serve")).items()}
            check(where == {0: h1, 1: h1, 2: h2, 3: h3}, "ranks placed %s" % where)
            st = c.status()
            pools = sorted((i.pool, list(i.ep_group_ranks) or list(i.ranks)) for i in st.instances)
            check(pools == sorted([(pb.POOL_KIND_PREFILL, [1]), (pb.POOL_KIND_DECODE, [2, 3]),
                                   (pb.POOL_KIND_DECODE, [2, 3])]), "instances: %s" % st.instances)
            rx0 = {h: hosts.link_bytes(h)[0] for h in (h2, h3)}
            t0 = time.time()
            got = run_workload(c, reqs)
            dt = time.time() - t0
            compare(reqs, got, refs)
            pulled = sum(1 for ids, last in got if len(ids) > 1)
            st = c.wait_counters(lambda k: k.kv_transfers >= pulled)
            check(st.counters.kv_checksum_failures == 0, str(st.counters))
            rx = {h: hosts.link_bytes(h)[0] - rx0[h] for h in (h2, h3)}
            # prefill is on host 1, both decode ranks elsewhere: all KV came over the links
            check(rx[h2] + rx[h3] >= st.counters.kv_transfer_bytes > 0,
                  "KV %d bytes, links received %s" % (st.counters.kv_transfer_bytes, rx))
            check(min(rx.values()) > 0, "a decode host received nothing: %s" % rx)
            c.wait_idle()
            print("32 streams in %.2f s over %s; KV %d bytes in %d transfers; received h2 %d, h3 %d bytes" % (
                dt, hosts.shaping, st.counters.kv_transfer_bytes, st.counters.kv_transfers, rx[h2], rx[h3]))
            stop_ok(c)


def main():
    try:
        return test_main(TESTS, "netns_tests.py")
    except Skip as e:
        return netns.skip(str(e))


if __name__ == "__main__":
    sys.exit(main())
