"""An elastic moeserve cluster for the tests: `moe-serve coordinator` and each instance
(`moe-serve instance --join`, or `mpirun -np E moe-serve instance` for expert parallelism) as
separate processes, each its own failure domain, on this host or inside test network namespaces
(a `spawn` function that wraps the command). Kill, stop, continue or drain any of them, then
check every stream against moe-generate."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import grpc

import health_pb2
import health_pb2_grpc
import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg
from cluster import MODEL, MPI_ENV, TestFailure, build_dir, check, with_test_hooks

TOKEN = "moeserve-test-token-0123456789"


def local_spawn(cmd, env, out, err):
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)


# Lines of each process's log a failed test prints (tests/integration/run.sh shows the last 80
# lines of a failed test's output).
LOG_TAIL_LINES = 8


class Proc:
    """One process of the cluster with its logs."""

    def __init__(self, name, cmd, env, spawn=local_spawn):
        self.name = name
        self.cmd = cmd
        self.out = tempfile.NamedTemporaryFile(prefix="moe-%s-" % name, suffix=".out", delete=False)
        self.err = tempfile.NamedTemporaryFile(prefix="moe-%s-" % name, suffix=".log", delete=False)
        self.proc = spawn(cmd, env, self.out, self.err)

    def stdout(self):
        with open(self.out.name, errors="replace") as f:
            return f.read()

    def stderr(self):
        with open(self.err.name, errors="replace") as f:
            return f.read()

    def signal(self, sig):
        """Signals the process group (mpirun and its ranks, or the process alone)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure("%s did not exit within %d s:\n%s" % (self.name, timeout, self.stderr()[-3000:]))

    def kill(self):
        self.signal(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()

    def close(self, keep):
        """keep (a failed test): the logs stay, and the last lines of this process's log go to
        stderr, so that a failure in CI, whose machine and /tmp are gone afterwards, carries the
        cluster's own account of it."""
        tail = self.stderr().splitlines()[-LOG_TAIL_LINES:] if keep else []
        for f in (self.out, self.err):
            f.close()
            if keep:
                sys.stderr.write("%s log kept: %s\n" % (self.name, f.name))
            else:
                os.unlink(f.name)
        for line in tail:
            sys.stderr.write("  %s| %s\n" % (self.name, line))


class ElasticCluster:
    """A coordinator listening on `addr` (loopback by default) and instances joining it."""

    def __init__(self, model=MODEL, addr="127.0.0.1", args=(), env=None, spawn=local_spawn,
                 token=TOKEN, heartbeat_timeout_ms=1500):
        self.model = model
        self.addr = addr
        self.spawn = spawn
        self.args = list(args)
        self.env = dict(os.environ)
        self.env.update(MPI_ENV)
        self.env.setdefault("MOE_LOG_LEVEL", "info")
        self.env["MOESERVE_CLUSTER_TOKEN"] = token
        if env:
            self.env.update(env)
        self.instances = []
        self.n_coord = 0
        self.coord = None
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.cluster_port = 0
        self.start_coordinator()

    def start_coordinator(self, cluster_port=None):
        cmd = [os.path.join(build_dir(), "moe-serve"), "coordinator", "--model", self.model,
               "--listen", "127.0.0.1:0" if self.addr == "127.0.0.1" else "%s:0" % self.addr,
               "--cluster-listen", "%s:%d" % (self.addr, cluster_port or 0), "--heartbeat-ms", "100",
               "--heartbeat-timeout-ms", str(self.heartbeat_timeout_ms)] + self.args
        self.n_coord += 1
        self.coord = Proc("coordinator%d" % self.n_coord, cmd, self.env, self.spawn)
        deadline = time.time() + 30
        m = None
        while time.time() < deadline:
            m = re.search(r"\(port (\d+)\); instances join at \S+ \(port (\d+)\); coordinator pid (\d+)",
                          self.coord.stdout())
            if m:
                break
            if self.coord.proc.poll() is not None:
                raise TestFailure("the coordinator exited with %s:\n%s" % (self.coord.proc.returncode,
                                                                           self.coord.stderr()))
            time.sleep(0.05)
        check(m is not None, "the coordinator printed no start-up line:\n" + self.coord.stderr())
        self.port, self.cluster_port = int(m.group(1)), int(m.group(2))
        self.channel = grpc.insecure_channel("%s:%d" % (self.addr, self.port))
        self.stub = pbg.MoeserveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        return self.coord

    def join_addr(self):
        return "%s:%d" % (self.addr, self.cluster_port)

    def add_instance(self, pool, ep=1, args=(), host_label=None, spawn=None, env=None, sigkill_timeout_s=4):
        """Starts an instance (E ranks under mpirun when ep > 1); returns its Proc."""
        serve = [os.path.join(build_dir(), "moe-serve"), "instance", "--join", self.join_addr(),
                 "--pool", pool, "--model", self.model, "--threads", "1", "--kv-blocks", "512",
                 "--heartbeat-ms", "100"] + (["--host-label", host_label] if host_label else []) + list(args)
        # mpirun answers SIGTERM with SIGCONT to the ranks, SIGTERM odls_base_sigkill_timeout
        # seconds later and SIGKILL as many after that (1 by default): time to drain.
        mpirun = ["mpirun", "--oversubscribe", "--mca", "odls_base_sigkill_timeout", str(sigkill_timeout_s),
                  "-np", str(ep)]
        cmd = (mpirun + serve) if ep > 1 else serve
        e = dict(self.env)
        if env:
            e.update(env)
        with_test_hooks(e)
        p = Proc(host_label or "%s%d" % (pool, len(self.instances)), cmd, e, spawn or self.spawn)
        self.instances.append(p)
        return p

    def status(self):
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)

    def serving(self):
        try:
            r = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def wait_ready(self, n, timeout=60):
        """Waits until n targets are READY and Health says SERVING; returns the status."""
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            try:
                st = self.status()
                ready = sum(1 for i in st.instances if i.state == pb.INSTANCE_STATE_READY)
                if ready >= n and self.serving():
                    return st
            except grpc.RpcError:
                pass
            for p in self.instances:
                if p.proc.poll() is not None and p.proc.returncode not in (0, None):
                    raise TestFailure("%s exited with %s:\n%s" % (p.name, p.proc.returncode, p.stderr()[-3000:]))
            time.sleep(0.1)
        raise TestFailure("%d ready instances not reached in %d s:\n%s" % (n, timeout, st))

    def wait_idle(self, timeout=15):
        """Waits until no live instance holds KV or runs a sequence and no stream is open."""
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            st = self.status()
            live = [i for i in st.instances if i.state != pb.INSTANCE_STATE_UNREACHABLE]
            if all(i.kv_blocks_used == 0 and i.running == 0 and i.waiting == 0 for i in live) \
                    and st.totals.active_streams == 0:
                return st
            time.sleep(0.05)
        raise TestFailure("KV/sequences not back at zero after %d s:\n%s" % (timeout, st))

    def stop(self, timeout=30):
        """SIGTERM to every instance (each drains and exits 0), then to the coordinator."""
        for p in self.instances:
            p.signal(signal.SIGTERM)
        bad = []
        for p in self.instances:
            rc = p.wait(timeout)
            if rc != 0 and not getattr(p, "killed", False):
                bad.append("%s exited %s:\n%s" % (p.name, rc, p.stderr()[-1500:]))
        self.coord.signal(signal.SIGTERM)
        rc = self.coord.wait(timeout)
        self.channel.close()
        check(rc == 0, "the coordinator exited %s:\n%s" % (rc, self.coord.stderr()[-3000:]))
        check(not bad, "; ".join(bad))

    def kill_all(self):
        for p in self.instances + [self.coord]:
            if p:
                p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()
        keep = exc[0] is not None
        for p in self.instances + ([self.coord] if self.coord else []):
            p.close(keep)
        return False
