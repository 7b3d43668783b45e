"""deploy/'s pods simulated on this machine: each pod is its own PID namespace (as a container's
is) running the image's entrypoint unchanged, configured only through the environment that
deploy/k8s gives it (MOE_ROLE, MOE_POOL, the token file, the flags). Readiness is the image's
moeserve-ready against the real coordinator, preStop is the image's moeserve-prestop run inside
the pod's namespaces (nsenter), as the kubelet runs it. Then the lifecycle Kubernetes drives:
scale a pool up, drain a pod by its preStop hook, lose a pod and let its replacement join.
Every stream's output must equal moe-generate's. Needs root (unshare, nsenter).
`deploy_pods_tests.py --list` names the tests; `deploy_pods_tests.py NAME` runs one."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import grpc

import health_pb2
import health_pb2_grpc
import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg
from cluster import MODEL, MPI_ENV, TestFailure, build_dir, check, registrar, test_main, with_test_hooks
from elastic import ElasticCluster, Proc
from elastic_tests import DECODE_SLOW_ENV, Streams, check_outputs, workload

TESTS = {}
test = registrar(TESTS)
IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "deploy", "image")
ENTRYPOINT = os.path.join(IMAGE, "entrypoint.sh")
PRESTOP = os.path.join(IMAGE, "prestop.sh")
READY = os.path.join(IMAGE, "ready.sh")
TOKEN = "deploy-pods-test-token-0123456789abcdef"


def pod_spawn(cmd, env, out, err):
    """A pod: its own PID namespace with its own /proc, PID 1 the entrypoint (as with Kubernetes'
    shareProcessNamespace: false); --kill-child ends the pod with whatever runs in it."""
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *cmd],
                            stdout=out, stderr=err, env=env, start_new_session=True)


class Pods:
    """A coordinator pod and instance pods, with the environment deploy/k8s sets."""

    def __init__(self, drain_timeout_s=30, heartbeat_timeout_ms=5000):
        if os.geteuid() != 0:
            raise TestFailure("simulated pods need root (unshare --pid, nsenter)")
        self.dir = tempfile.mkdtemp(prefix="moe-pods-")
        token = os.path.join(self.dir, "token")
        with open(token, "w") as f:
            f.write(TOKEN)
        b = build_dir()
        self.env = {"PATH": os.environ["PATH"], "HOME": self.dir, "MOE_LOG_LEVEL": "info",
                    "MOE_SERVE": os.path.join(b, "moe-serve"), "MOE_CLIENT": os.path.join(b, "moe-client"),
                    "MOE_MODEL_DIR": MODEL, "MOE_CLUSTER_TOKEN_FILE": token,
                    "MOE_DRAIN_TIMEOUT_S": str(drain_timeout_s),
                    # Not the 1.5 s of the fault tests: on this shared machine a loaded instance
                    # can miss 1.5 s of heartbeats and be fenced, which turns a drain test's
                    # migrations into resumes. A killed pod is seen at once anyway (its
                    # connection fails), and the lost-pod test waits for that.
                    "MOE_HEARTBEAT_TIMEOUT_MS": str(heartbeat_timeout_ms)}
        self.env.update(MPI_ENV)
        self.pods = {}
        self.coord = self.start("coordinator", MOE_ROLE="coordinator", MOE_LISTEN="127.0.0.1:0",
                                MOE_CLUSTER_LISTEN="127.0.0.1:0", MOE_COORDINATOR_ARGS="--heartbeat-ms 100")
        deadline = time.time() + 30
        m = None
        while time.time() < deadline and not m:
            m = re.search(r"\(port (\d+)\); instances join at \S+ \(port (\d+)\)", self.coord.stdout())
            if self.coord.proc.poll() is not None:
                raise TestFailure("the coordinator pod exited %s:\n%s" % (self.coord.proc.returncode,
                                                                          self.coord.stderr()))
            time.sleep(0.05)
        check(m is not None, "the coordinator pod printed no start-up line:\n" + self.coord.stderr())
        self.api = "127.0.0.1:%s" % m.group(1)
        self.cluster = "127.0.0.1:%s" % m.group(2)
        self.channel = grpc.insecure_channel(self.api)
        self.stub = pbg.MoeserveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def start(self, name, **env):
        e = dict(self.env)
        e.update(env)
        with_test_hooks(e)
        p = Proc(name, [ENTRYPOINT], e, pod_spawn)
        p.pod_env = e
        self.pods[name] = p
        return p

    def instance(self, name, pool, **env):
        """An E = 1 instance pod (components/pools-deployment), its pod name as host label; env:
        more of its environment (a test hook)."""
        return self.start(name, MOE_ROLE="instance", MOE_POOL=pool, MOE_COORDINATOR_ADDR=self.cluster,
                          MOE_COORDINATOR_API=self.api, MOE_HOST_LABEL=name, MOE_THREADS="1",
                          MOE_INSTANCE_ARGS="--kv-blocks 512 --heartbeat-ms 100", **env)

    def ready(self, pod):
        """The pod's readiness probe (moeserve-ready): True when it exits 0."""
        r = subprocess.run([READY], env=pod.pod_env, capture_output=True, text=True, timeout=30)
        return r.returncode == 0

    def wait_ready(self, pods, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in pods:
                if p.proc.poll() is not None:
                    raise TestFailure("pod %s exited %s:\n%s" % (p.name, p.proc.returncode, p.stderr()[-3000:]))
            if all(self.ready(p) for p in pods) and self.serving():
                return
            time.sleep(0.2)
        raise TestFailure("pods %s not ready in %d s" % ([p.name for p in pods], timeout))

    # The same as the elastic harness's: they need only self.health / self.status().
    serving = ElasticCluster.serving
    wait_idle = ElasticCluster.wait_idle

    def status(self):
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)

    def prestop(self, pod, timeout=90):
        """The kubelet's preStop: moeserve-prestop inside the pod's PID and mount namespaces.
        Where the drained process is the pod's PID 1 (an E = 1 pod, the coordinator), the pod
        ends with it and takes the hook along: SIGKILL is the hook's success there too, as long as
        the pod itself exits 0 (hook_ok)."""
        kids = open("/proc/%d/task/%d/children" % (pod.proc.pid, pod.proc.pid)).read().split()
        check(len(kids) == 1, "pod %s: the namespace's PID 1 not found (%s)" % (pod.name, kids))
        r = subprocess.run(["nsenter", "-t", kids[0], "-p", "-m", "--", PRESTOP], env=pod.pod_env,
                           capture_output=True, text=True, timeout=timeout)
        return r

    def stop(self):
        """Every pod's preStop hook, instances first: each drains and exits 0."""
        bad = []
        for p in [p for p in self.pods.values() if p is not self.coord] + [self.coord]:
            if p.proc.poll() is not None:
                continue
            r = self.prestop(p)
            rc = p.wait(30)
            if not hook_ok(r) or rc != 0:
                bad.append("%s: preStop %d (%s), exit %s" % (p.name, r.returncode, r.stderr.strip(), rc))
        self.channel.close()
        check(not bad, "; ".join(bad))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        keep = exc[0] is not None
        for p in self.pods.values():
            p.kill()
            p.close(keep)
        shutil.rmtree(self.dir, ignore_errors=True)
        return False


def wait_decoding(c, streams, timeout=60):
    """Waits until every stream still open runs in a decode batch (none queued, prefilling or in
    KV hand-off), so that a drain finds every request on a decode instance; returns the status.
    (Counting against the open streams, not all of them: on a quick machine the first ones may
    end before the last one's load report shows it decoding.)"""
    deadline = time.time() + timeout
    st = None
    while time.time() < deadline:
        st = c.status()
        running = sum(i.running for i in st.instances if i.pool == pb.POOL_KIND_DECODE
                      and i.state == pb.INSTANCE_STATE_READY)
        open_streams = sum(t.is_alive() for t in streams.threads)
        if open_streams > 0 and running >= open_streams:
            return st
        time.sleep(0.02)
    raise TestFailure("not every open stream decoding after %d s:\n%s" % (timeout, st))


def losses(log):
    """The coordinator's log lines about instances lost or requests resumed: why a drain test saw
    resumes instead of migrations."""
    return "\n".join(line for line in log.splitlines() if re.search(r"lost|resum|stall|fenc|unreachable", line, re.I))


def hook_ok(r):
    return r.returncode == 0 or (r.returncode == -signal.SIGKILL and "waiting up to" in r.stderr)


@test
def pods_serve_and_scale_up():
    """A coordinator pod, a prefill pod and two decode pods from the entrypoint alone; readiness
    flips once each pod's instance is registered; 12 streams == moe-generate; a third decode pod
    (kubectl scale) joins, becomes ready and computes."""
    with Pods() as c:
        pods = [c.instance("moeserve-prefill-0", "prefill"), c.instance("moeserve-decode-0", "decode"),
                c.instance("moeserve-decode-1", "decode")]
        c.wait_ready(pods)
        st = c.status()
        check(sorted(i.host for i in st.instances) == ["moeserve-decode-0", "moeserve-decode-1", "moeserve-prefill-0"],
              "hosts in status: %s" % [i.host for i in st.instances])
        ghost = dict(c.pods["moeserve-decode-0"].pod_env, MOE_HOST_LABEL="moeserve-decode-9")
        check(subprocess.run([READY], env=ghost, capture_output=True).returncode == 1,
              "the readiness probe passed for an instance that never registered")
        work = workload(12, max_new=24)
        check_outputs(work, Streams(c, work).join())
        new = c.instance("moeserve-decode-2", "decode")
        c.wait_ready([new])
        work = workload(12, max_new=24, seed=3)
        check_outputs(work, Streams(c, work).join())
        st = c.wait_idle()
        mine = [i for i in st.instances if i.host == new.name]
        check(len(mine) == 1 and sum(mine[0].expert_tokens) > 0, "the scaled-up pod computed nothing: %s" % mine)
        c.stop()


@test
def pods_prestop_drains_without_losing_a_request():
    """The busiest decode pod's preStop hook during 12 live streams: its requests migrate, the
    hook returns once the instance has exited 0, every stream equals moe-generate. The decode pods
    are slowed (DECODE_SLOW_ENV): unslowed, a quick CPU (a Zen 4 CI run) decoded all 12 x 400
    tokens in 0.35 s, before the hook ran, and the drain found nothing to move."""
    with Pods() as c:
        pods = [c.instance("moeserve-prefill-0", "prefill"), c.instance("moeserve-decode-0", "decode", **DECODE_SLOW_ENV),
                c.instance("moeserve-decode-1", "decode", **DECODE_SLOW_ENV)]
        c.wait_ready(pods)
        work = workload(12, max_new=400)
        s = Streams(c, work)
        s.wait_tokens(12 * 4)
        st = wait_decoding(c, s)
        decode = [i for i in st.instances if i.pool == pb.POOL_KIND_DECODE and i.state == pb.INSTANCE_STATE_READY]
        victim = c.pods[max(decode, key=lambda i: i.running).host]
        r = c.prestop(victim)
        check(hook_ok(r), "preStop: %d %s" % (r.returncode, r.stderr))
        check(victim.wait(10) == 0, "the drained pod exited %s" % victim.proc.returncode)
        try:
            check_outputs(work, s.join())
        except TestFailure as e:
            raise TestFailure("%s\n%s" % (e, losses(c.coord.stderr())))
        st = c.wait_idle()
        check(st.counters.migrations >= 1, "nothing migrated: %s" % st.counters)
        check(st.counters.requests_resumed == 0, "requests were resumed, not migrated: %s\n%s" % (
            st.counters, losses(c.coord.stderr())))
        c.stop()


@test
def pods_lost_pod_is_replaced_and_rejoins():
    """A decode pod dies whole (SIGKILL to the pod, as when its node dies): the cluster goes on
    serving on the other decode pod, and the pod's replacement (what the Deployment creates)
    joins, becomes ready and serves. The pod dies between workloads: requests resumed after a
    loss mid-stream are elastic_tests' subject (kill9_decode_instance_loses_no_request)."""
    with Pods() as c:
        pods = [c.instance("moeserve-prefill-0", "prefill"), c.instance("moeserve-decode-0", "decode"),
                c.instance("moeserve-decode-1", "decode")]
        c.wait_ready(pods)
        work = workload(8, max_new=24, seed=9)
        check_outputs(work, Streams(c, work).join())
        dead = c.pods["moeserve-decode-0"]
        dead.signal(signal.SIGKILL)
        dead.proc.wait()
        deadline = time.time() + 10
        while c.ready(dead) and time.time() < deadline:  # the coordinator notices the lost pod
            time.sleep(0.1)
        check(not c.ready(dead), "the dead pod still reads as ready:\n%s" % c.status())
        work = workload(8, max_new=24, seed=10)
        check_outputs(work, Streams(c, work).join())
        new = c.instance("moeserve-decode-0-b", "decode")
        c.wait_ready([new])
        work = workload(8, max_new=24, seed=4)
        check_outputs(work, Streams(c, work).join())
        st = c.wait_idle()
        mine = [i for i in st.instances if i.host == new.name]
        check(len(mine) == 1 and sum(mine[0].expert_tokens) > 0, "the replacement computed nothing: %s" % mine)
        c.stop()


if __name__ == "__main__":
    raise SystemExit(test_main(TESTS, "deploy_pods_tests.py"))
