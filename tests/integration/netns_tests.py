"""Cluster tests across several hosts of one machine (network namespaces, netns.py):
`netns_tests.py --list` names them, `netns_tests.py NAME` runs one (exit 0 = pass, 77 = skipped:
not root or no `ip netns`, the reason printed). run.sh runs each in its own process."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from cluster import (MODEL, MPI_ENV, Cluster, TestFailure, build_dir, check, gen_request, generate, mixed_workload,
                     reference, registrar, run_parallel, test_main)
from cluster_tests import compare, references, run_workload, stop_ok
import health_pb2_grpc
import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg
import netns
from elastic import ElasticCluster

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


class ElasticOnHosts:
    """The elastic launch on namespace hosts: `moe-serve coordinator` alone on one host, then
    instances (`moe-serve instance`, one process or one `mpirun -np E` job over a hostfile) started
    with add_instance on any hosts; the test's client reaches the coordinator through a forwarder.
    status / wait_idle / wait_counters as Cluster's."""

    TOKEN = "netns-test-token-0123456789abcdef"

    def __init__(self, hosts, host, args=(), model=MODEL, startup_s=60):
        self.hosts, self.model, self.args = hosts, model, list(args)
        self.env = dict(os.environ, MOESERVE_CLUSTER_TOKEN=self.TOKEN, MOE_LOG_LEVEL="info", **MPI_ENV)
        self.env.update(hosts.env())
        self.procs = {}  # name -> (Popen, log path)
        self.logdir = tempfile.mkdtemp(prefix="moe-elastic-")
        self.coord = self._start("coordinator", host, [
            os.path.join(build_dir(), "moe-serve"), "coordinator", "--model", model, "--listen", "127.0.0.1:0",
            "--cluster-listen", hosts.addr[host] + ":0", "--threads", "1", "--heartbeat-ms", "100"] + self.args)
        deadline = time.time() + startup_s
        m = None
        while time.time() < deadline and not m:
            m = re.search(r"\(port (\d+)\); instances join at \S+ \(port (\d+)\); coordinator pid (\d+)",
                          self.log("coordinator"))
            check(self.coord.poll() is None, "the coordinator exited %s:\n%s" % (self.coord.returncode,
                                                                                  self.log("coordinator")))
            time.sleep(0.05)
        check(m is not None, "no start-up line from the coordinator:\n" + self.log("coordinator"))
        self.port, self.cluster_port, self.pid = int(m.group(1)), int(m.group(2)), int(m.group(3))
        self.join = "%s:%d" % (host, self.cluster_port)
        self.channel = grpc.insecure_channel("127.0.0.1:%d" % hosts.forward(host, self.port))
        self.stub = pbg.MoeserveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _start(self, name, host, argv):
        path = os.path.join(self.logdir, name + ".log")
        with open(path, "w") as f:
            p = self.hosts.popen(host, argv, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = (p, path)
        return p

    def log(self, name):
        with open(self.procs[name][1], errors="replace") as f:
            return f.read()

    def logs(self):
        return "\n".join("== %s\n%s" % (n, self.log(n)[-3000:]) for n in self.procs)

    def add_instance(self, name, pool, hosts, args=()):
        """An instance of len(hosts) ranks, one per host (mpirun over a hostfile when more than
        one), started from hosts[0]."""
        argv = [os.path.join(build_dir(), "moe-serve"), "instance", "--join", self.join, "--pool", pool,
                "--model", self.model, "--threads", "1", "--kv-blocks", "512"] + list(args)
        if len(hosts) > 1:
            hf = self.hosts.hostfile({h: 1 for h in hosts})
            argv = ["mpirun", "--oversubscribe", "-np", str(len(hosts))] + self.hosts.mpirun_args(hf) + argv
        return self._start(name, hosts[0], argv)

    def status(self):
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)

    wait_idle = ElasticCluster.wait_idle  # fenced targets keep their last (stale) load
    wait_counters = Cluster.wait_counters

    def wait_ready(self, n, timeout=60):
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            st = self.status()
            if len(st.instances) == n and all(i.state == pb.INSTANCE_STATE_READY for i in st.instances):
                return st
            for name, (p, _) in self.procs.items():
                check(p.poll() is None, "%s exited %s:\n%s" % (name, p.returncode, self.logs()))
            time.sleep(0.1)
        raise TestFailure("%d instances not ready in %d s: %s\n%s" % (n, timeout, st, self.logs()))

    def ranks(self, name):
        """{rank: pid} of an instance started under mpirun (its ranks on every host)."""
        return self.hosts.mpi_ranks(os.path.join(build_dir(), "moe-serve"), root=self.procs[name][0].pid)

    def stop(self, timeout=30, to_mpirun=False):
        """SIGTERM to every instance process (each rank of an mpirun job, or mpirun itself with
        to_mpirun), then to the coordinator; returns {name: exit status}."""
        rcs = {}
        for name, (p, _) in self.procs.items():
            if name == "coordinator" or p.poll() is not None:
                continue
            ranks = {} if to_mpirun else self.ranks(name)
            for pid in ranks.values() or [p.pid]:
                os.kill(pid, signal.SIGTERM)
        for name, (p, _) in self.procs.items():
            if name != "coordinator":
                rcs[name] = self._wait(p, timeout)
        self.coord.send_signal(signal.SIGTERM)
        rcs["coordinator"] = self._wait(self.coord, timeout)
        self.channel.close()
        return rcs

    def close(self, ok):
        """Removes the logs when the test passed, else says where they are."""
        if ok:
            shutil.rmtree(self.logdir, ignore_errors=True)
        else:
            sys.stderr.write("logs kept in %s\n" % self.logdir)

    @staticmethod
    def _wait(p, timeout):
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "hung"


@test
def netns_elastic_instances_on_three_hosts_match_moe_generate():
    """The elastic launch over three hosts: `moe-serve coordinator` and a prefill instance on host
    1, an EP-2 decode instance (`mpirun -np 2 moe-serve instance`, one rank on host 2, one on host
    3) joining over the network; ClusterStatus names each instance's host; 32 concurrent streams
    (greedy, every fourth seeded) equal moe-generate's; all KV crossed the links; KV back to
    zero; SIGTERM to the instances, then to the coordinator: every process exits 0."""
    reqs = mixed_workload(32, seed=13)
    for i, r in enumerate(reqs):
        if i % 4 == 3:
            r["seed"] = 5000 + i
    seeded = ["--temperature", "0.8", "--top-p", "0.9", "--seed"]
    refs = [reference(prompt=r.get("prompt"), ids=r.get("ids"), max_new=r["max_new"],
                      extra=seeded + [str(r["seed"])] if "seed" in r else ()) for r in reqs]
    with make_hosts(3, delay="200us", rate="1gbit") as hosts:
        print("links: %s" % hosts.shaping)
        h1, h2, h3 = hosts.names
        c = ElasticOnHosts(hosts, h1, args=["--batch-tokens", "64"])
        ok = False
        try:
            c.add_instance("prefill", "prefill", [h1])
            c.add_instance("decode", "decode", [h2, h3])
            st = c.wait_ready(3)
            where = {r: hosts.host_of(pid) for r, pid in c.ranks("decode").items()}
            check(where == {0: h2, 1: h3}, "decode ranks placed %s" % where)
            where = sorted((i.pool, i.host) for i in st.instances)
            check(where == sorted([(pb.POOL_KIND_PREFILL, h1), (pb.POOL_KIND_DECODE, h2), (pb.POOL_KIND_DECODE, h3)]),
                  "instance hosts: %s" % where)
            rx0 = {h: hosts.link_bytes(h)[0] for h in (h2, h3)}

            def one(r):
                kw = dict(temperature=0.8, top_p=0.9, seed=r["seed"]) if "seed" in r else {}
                ids, _, last = generate(c.stub, gen_request(prompt=r.get("prompt"), ids=r.get("ids"),
                                                            max_new=r["max_new"], **kw))
                return ids, last

            got = run_parallel(one, reqs)
            compare(reqs, got, refs)
            pulled = sum(1 for ids, last in got if len(ids) > 1)
            st = c.wait_counters(lambda k: k.kv_transfers >= pulled)
            rx = {h: hosts.link_bytes(h)[0] - rx0[h] for h in (h2, h3)}
            check(rx[h2] + rx[h3] >= st.counters.kv_transfer_bytes > 0,
                  "KV %d bytes, links received %s" % (st.counters.kv_transfer_bytes, rx))
            c.wait_idle()
            print("KV %d bytes in %d transfers; received h2 %d, h3 %d bytes" % (
                st.counters.kv_transfer_bytes, st.counters.kv_transfers, rx[h2], rx[h3]))
            rcs = c.stop()
            check(all(v == 0 for v in rcs.values()), "exit statuses %s:\n%s" % (rcs, c.logs()))
            ok = True
        finally:
            c.close(ok)


@test
def netns_link_cut_fences_host_then_it_rejoins():
    """A host's cable is cut (its switch port down) while 16 streams run (greedy and seeded): the
    coordinator fences the decode instance on it after the heartbeat timeout and its requests go
    on on the other host's decode instance; every stream equals moe-generate. The cable comes
    back: the instance finds its link to the coordinator dead, drops its stale KV, rejoins under
    a new member id and serves again (the other decode instance drained, new streams must go to
    it); KV back to zero everywhere."""
    from elastic_tests import Streams, check_outputs, workload
    with make_hosts(3) as hosts:
        h1, h2, h3 = hosts.names
        c = ElasticOnHosts(hosts, h1, args=["--heartbeat-timeout-ms", "1000"])
        ok = False
        try:
            c.add_instance("prefill", "prefill", [h1], args=["--heartbeat-ms", "100"])
            c.add_instance("decode2", "decode", [h2], args=["--heartbeat-ms", "100"])
            c.add_instance("decode3", "decode", [h3], args=["--heartbeat-ms", "100"])
            c.wait_ready(3)
            work = workload(16)
            s = Streams(c, work)
            s.wait_tokens(16 * 8)
            hosts.cut(h2)
            t0 = time.time()
            try:
                check_outputs(work, s.join())
                st = c.wait_counters(lambda k: k.instance_losses == 1)
                check(st.counters.requests_failed == 0, "failed: %d" % st.counters.requests_failed)
                lost = [i for i in st.instances if i.host == h2]
                check(len(lost) == 1 and lost[0].state == pb.INSTANCE_STATE_UNREACHABLE, "h2: %s" % lost)
                print("streams done over h3 %.1f s after the cut; %d request(s) resumed" % (
                    time.time() - t0, st.counters.requests_resumed))
            finally:
                hosts.restore(h2)
            t1 = time.time()
            deadline = t1 + 60
            while True:
                st = c.status()
                mine = [i for i in st.instances if i.host == h2]
                if sorted(i.state for i in mine) == sorted([pb.INSTANCE_STATE_READY, pb.INSTANCE_STATE_UNREACHABLE]):
                    break
                check(time.time() < deadline, "h2's instance did not rejoin within 60 s of the restore:\n%s\n%s" % (
                    st, c.logs()))
                time.sleep(0.1)
            print("h2 rejoined %.1f s after the restore" % (time.time() - t1))
            back = [i for i in mine if i.state == pb.INSTANCE_STATE_READY][0]
            check(back.id != lost[0].id, "the rejoined instance kept its id %d" % back.id)
            other = [i for i in st.instances if i.host == h3][0]
            c.stub.Drain(pb.DrainRequest(instance=other.id), timeout=5)
            before = sum(back.expert_tokens)
            work2 = workload(6, max_new=24, seed=9)
            check_outputs(work2, Streams(c, work2).join())
            st = c.wait_idle()
            st = c.wait_counters(lambda k: sum([i for i in c.status().instances if i.id == back.id][0].expert_tokens)
                                 > before)  # its load travels with heartbeats
            check(st.counters.instance_losses == 1 and st.counters.requests_failed == 0, str(st.counters))
            rcs = c.stop()
            check(all(v == 0 for v in rcs.values()), "exit statuses %s:\n%s" % (rcs, c.logs()))
            ok = True
        finally:
            c.close(ok)


def main():
    try:
        return test_main(TESTS, "netns_tests.py")
    except Skip as e:
        return netns.skip(str(e))


if __name__ == "__main__":
    sys.exit(main())
