"""scripts/local-cluster.sh, the one-command local elastic cluster (what scripts/demo.sh runs):
`launcher_tests.py --list` names the tests, `launcher_tests.py NAME` runs one (exit 0 = pass)."""

import os
import re
import signal
import subprocess
import tempfile
import time

import grpc

import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg
from cluster import MODEL, MPI_ENV, SRC, build_dir, check, gen_request, generate, reference, registrar, test_main

TESTS = {}
test = registrar(TESTS)
LAUNCHER = os.path.join(SRC, "scripts", "local-cluster.sh")


def start(args, logdir):
    env = dict(os.environ, **MPI_ENV)
    env.pop("MOESERVE_CLUSTER_TOKEN", None)  # the launcher makes one
    out = open(os.path.join(logdir, "launcher.out"), "w")
    p = subprocess.Popen([LAUNCHER, "--build", build_dir(), "--model", MODEL, "--listen", "127.0.0.1:0",
                          "--log-dir", logdir] + args, stdout=out, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    deadline = time.time() + 90
    text = ""
    while time.time() < deadline:
        text = open(out.name).read()
        m = re.search(r"^local cluster ready: gRPC (\S+),", text, re.M)
        if m:
            return p, m.group(1).rstrip(","), out.name
        check(p.poll() is None, "the launcher exited %s:\n%s" % (p.returncode, text))
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError("the launcher never said ready:\n" + text)


@test
def local_cluster_serves_as_separate_jobs_and_drains():
    """1 prefill + 2 decode instances: each is its own process (not one mpirun job), status lists
    them under the launcher's host labels, greedy outputs equal moe-generate's, a kill -9 of one
    decode instance is reported and the cluster goes on serving, and SIGTERM to the launcher
    drains the rest: it exits 0 and leaves no process behind."""
    logdir = tempfile.mkdtemp(prefix="moe-launcher-")
    p, addr, out = start(["--prefill", "1", "--decode", "2", "--", "--kv-blocks", "256"], logdir)
    try:
        stub = pbg.MoeserveStub(grpc.insecure_channel(addr))
        st = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        hosts = sorted(i.host for i in st.instances if i.state == pb.INSTANCE_STATE_READY)
        check(hosts == ["decode1", "decode2", "prefill1"], "instances: %s" % hosts)
        pids = [int(x) for x in re.findall(r"^started \S+ \(pid (\d+)\)", open(out).read(), re.M)]
        check(len(pids) == 3 and len(set(pids)) == 3, "instance pids: %s" % pids)
        for pid in pids:  # separate jobs: none is an MPI rank of a shared job
            env = open("/proc/%d/environ" % pid, "rb").read()
            check(b"OMPI_COMM_WORLD_SIZE" not in env, "instance %d runs under mpirun" % pid)
        prompts = [[5, 9, 200, 31], [77, 1, 2, 3, 4, 5, 6], [400, 12]]
        for ids in prompts:
            got, _, _ = generate(stub, gen_request(ids=ids, max_new=12, ignore_eos=True))
            check(got == reference(ids=ids, max_new=12, extra=["--ignore-eos"]), "output of %s differs" % ids)
        victim = re.search(r"^started decode2 \(pid (\d+)\)", open(out).read(), re.M).group(1)
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.time() + 20
        while "decode2 (pid %s) is gone" % victim not in open(out).read() and time.time() < deadline:
            time.sleep(0.1)
        check("decode2 (pid %s) is gone" % victim in open(out).read(), "the launcher did not report the loss")
        got, _, _ = generate(stub, gen_request(ids=prompts[0], max_new=12, ignore_eos=True))
        check(got == reference(ids=prompts[0], max_new=12, extra=["--ignore-eos"]), "output after the loss differs")
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        check(rc == 0, "launcher exited %s:\n%s" % (rc, open(out).read()[-3000:]))
        alive = [pid for pid in pids if pid != int(victim) and os.path.exists("/proc/%d" % pid)]
        check(not alive, "left running: %s" % alive)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    import sys
    sys.exit(test_main(TESTS, "launcher_tests.py"))
