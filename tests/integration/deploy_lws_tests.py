"""deploy/'s LeaderWorkerSet pools simulated across pods on this machine. Every pod is a host of
netns.py (a network namespace on the run's private bridge) with its own UTS, PID, IPC and mount
namespaces, as a container has:
- its hostname is its pod name, as LWS names them: the leader of group g of LeaderWorkerSet
  `moeserve-decode` is `moeserve-decode-g`, its worker i `moeserve-decode-g-i`;
- its /etc/hosts (what `ip netns exec` mounts from /etc/netns/NAME/) resolves what cluster DNS
  would: the coordinator's Service `moeserve-coordinator`, and every pod as
  `<pod>.<lws>.<namespace>` under the LWS's headless Service, which is what LWS_LEADER_ADDRESS
  and the entrypoint's hostfile name;
- it runs as the image's user (uid 10001, `moe`, from an /etc/passwd and /etc/group of the pod's
  own mounted over the machine's, as the image has them), with no_new_privs, under tini (PID 1,
  as the image's ENTRYPOINT), and runs deploy/image/entrypoint.sh unchanged, configured only by
  the environment deploy/k8s gives it (MOE_ROLE, MOE_POOL, LWS_GROUP_SIZE, LWS_WORKER_INDEX,
  LWS_LEADER_ADDRESS, the token and ssh Secrets' files, the flags);
- the Secrets' files are what deploy/k8s/make-secrets.sh writes, mode 0440 group 10001 (a Secret
  volume with defaultMode 0440 and fsGroup 10001).
So an EP-2 decode group is a leader pod whose `mpirun` logs in to its worker pod's real sshd
(running as uid 10001 with the Secret's key as host key) and starts the worker's rank there.
Readiness is the image's moeserve-ready run inside the leader pod (its namespaces, its user),
preStop is the image's moeserve-prestop the same way, and this file plays the LWS controller and
the kubelet: scale a pool up and down, delete a group's pods (preStop, then SIGTERM to PID 1),
lose a pod and recreate its whole group (RecreateGroupOnPodRestart). Every stream's output must
equal moe-generate's. Needs root (namespaces, setpriv).
`deploy_lws_tests.py --list` names the tests; `deploy_lws_tests.py NAME` runs one (77: skipped)."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

import health_pb2_grpc
import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg
import netns
from cluster import MODEL, TestFailure, build_dir, check, registrar, test_main
from elastic import ElasticCluster, Proc
from elastic_tests import Streams, check_outputs, workload
from deploy_pods_tests import losses, wait_decoding

TESTS = {}
test = registrar(TESTS)
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
IMAGE = os.path.join(SRC, "deploy", "image")
ENTRYPOINT = os.path.join(IMAGE, "entrypoint.sh")
PRESTOP = os.path.join(IMAGE, "prestop.sh")
READY = os.path.join(IMAGE, "ready.sh")
MAKE_SECRETS = os.path.join(SRC, "deploy", "k8s", "make-secrets.sh")
UID = 10001  # the image's user (install-runtime-deps.sh; runAsUser in deploy/k8s)
NAMESPACE = "moeserve"  # the Kubernetes namespace of the simulated cluster
COORD = "moeserve-coordinator"


class Skip(Exception):
    pass


def as_pod_user(argv):
    """argv as the pod's user, as a container's securityContext starts it (runAsUser/Group 10001,
    no supplementary groups, allowPrivilegeEscalation: false, capabilities dropped)."""
    return ["setpriv", "--reuid=%d" % UID, "--regid=%d" % UID, "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--"] + list(argv)


class Pod:
    """One pod: the Proc of its `ip netns exec ... unshare ... tini -g -- entrypoint`."""

    def __init__(self, cluster, name, env):
        self.name = name
        self.env = env
        self.ns = cluster.ns_of[name]
        inner = ("hostname \"$0\" && mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && "
                 "exec \"$@\"")
        cmd = ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--ipc", "--pid", "--fork", "--mount-proc",
               "--", "/bin/sh", "-c", inner, name] + as_pod_user(["tini", "-g", "--", ENTRYPOINT])
        self.p = Proc(name, cmd, env, lambda c, e, o, r: subprocess.Popen(
            c, env=e, stdout=o, stderr=r, start_new_session=True))
        self.proc = self.p.proc

    def init_pid(self, timeout=10):
        """The host's pid of the pod's PID 1 (tini): unshare's only child."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            if self.proc.poll() is not None:
                raise TestFailure("pod %s exited %s:\n%s" % (self.name, self.proc.returncode, self.p.stderr()[-3000:]))
            time.sleep(0.05)
        raise TestFailure("pod %s: no PID 1 after %d s" % (self.name, timeout))

    def exec(self, argv, timeout=30, **kw):
        """argv inside the pod (its namespaces, its user, its environment), as the kubelet runs an
        exec probe or hook."""
        cmd = ["nsenter", "-t", str(self.init_pid()), "-n", "-m", "-u", "-i", "-p", "--"] + as_pod_user(argv)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)

    def alive(self):
        return self.proc.poll() is None

    def signal_init(self, sig):
        """A signal to the pod's PID 1 (the kubelet's SIGTERM; SIGKILL ends the whole pod)."""
        if self.alive():
            try:
                os.kill(self.init_pid(), sig)
            except (ProcessLookupError, TestFailure):
                pass

    def kill(self):
        self.signal_init(signal.SIGKILL)
        if self.alive():
            self.p.signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout):
        return self.p.wait(timeout)


class LwsCluster:
    """The cluster of pods: names fixed up front (the netns hosts), pods started and deleted as the
    test says. decode_groups / prefill: how many groups (E = 2) and E = 1 prefill pods there may
    be."""

    def __init__(self, decode_groups=1, prefill=1, drain_timeout_s=30):
        self.pod_names = [COORD] + ["moeserve-prefill-%d" % i for i in range(prefill)]
        for g in range(decode_groups):
            self.pod_names += ["moeserve-decode-%d" % g, "moeserve-decode-%d-1" % g]
        try:
            self.hosts = netns.Hosts(hosts=self.pod_names, prefix="moed")
        except netns.Unavailable as e:
            raise Skip(str(e))
        try:
            self._setup(drain_timeout_s)
        except BaseException:
            self.hosts.close()
            raise

    def _setup(self, drain_timeout_s):
        h = self.hosts
        self.ns_of = dict(zip(self.pod_names, h.names))
        self.addr_of = {p: h.addr[self.ns_of[p]] for p in self.pod_names}
        self.dir = tempfile.mkdtemp(prefix="moe-lws-")
        os.chmod(self.dir, 0o755)
        self.home = os.path.join(self.dir, "home")
        os.mkdir(self.home)
        os.chown(self.home, UID, UID)
        # The Secrets, made as a user makes them; mounted as a Secret volume would be.
        secrets = os.path.join(self.dir, "secrets")
        subprocess.run([MAKE_SECRETS, secrets], check=True, capture_output=True)
        os.chown(secrets, 0, UID)
        os.chmod(secrets, 0o750)
        for f in os.listdir(secrets):
            os.chown(os.path.join(secrets, f), 0, UID)
            os.chmod(os.path.join(secrets, f), 0o440)
        token = os.path.join(self.dir, "token")  # the token Secret's own mount: one key, `token`
        os.mkdir(token)
        os.chmod(token, 0o755)
        os.link(os.path.join(secrets, "cluster-token"), os.path.join(token, "token"))
        # Every pod's /etc: the image's user, and cluster DNS as /etc/hosts.
        with open("/etc/passwd") as f:
            passwd = [line for line in f if not line.startswith("moe:")]
        passwd.append("moe:x:%d:%d::%s:/bin/bash\n" % (UID, UID, self.home))
        with open("/etc/group") as f:
            group = [line for line in f if not line.startswith("moe:")]
        group.append("moe:x:%d:\n" % UID)
        hosts = ["127.0.0.1 localhost", "::1 localhost",
                 "%s %s %s.%s %s.%s.svc.cluster.local" % (self.addr_of[COORD], COORD, COORD, NAMESPACE, COORD, NAMESPACE)]
        for p in self.pod_names:
            svc = self.service_of(p)
            fq = "%s.%s.%s" % (p, svc, NAMESPACE) if svc else None
            hosts.append(" ".join([self.addr_of[p], p] + ([fq, fq + ".svc.cluster.local"] if fq else [])))
        for ns in h.names:
            for name, lines in (("passwd", passwd), ("group", group), ("hosts", [x + "\n" for x in hosts])):
                with open("/etc/netns/%s/%s" % (ns, name), "w") as f:
                    f.writelines(lines)
        b = build_dir()
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": self.home, "USER": "moe",
                    "MOE_LOG_LEVEL": "info",
                    "MOE_SERVE": os.path.join(b, "moe-serve"), "MOE_CLIENT": os.path.join(b, "moe-client"),
                    # base/flags.env and the pod templates' env
                    "MOE_MODEL_DIR": MODEL, "MOE_CLUSTER_TOKEN_FILE": os.path.join(token, "token"),
                    "MOE_DRAIN_TIMEOUT_S": str(drain_timeout_s), "MOE_HEARTBEAT_TIMEOUT_MS": "5000",  # as deploy_pods_tests
                    "MOE_SSH_SECRET_DIR": secrets,
                    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",  # the image's ENV
                    # The pods share one kernel here: keep UCX on the pods' network (as it is
                    # between real pods), not on shared memory or another pod's loopback.
                    "UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0"}
        self.pods = {}
        self.every_pod = []  # with the ones a recreated group replaced, whose logs go too
        self.coord = self.start(COORD, MOE_ROLE="coordinator", MOE_COORDINATOR_ARGS="--heartbeat-ms 100",
                                MOE_HTTP_LISTEN="0.0.0.0:8080")  # base/coordinator.yaml's env
        self.api_port = h.forward(self.ns_of[COORD], 50051)
        self.http_port = h.forward(self.ns_of[COORD], 8080)
        self.channel = grpc.insecure_channel("127.0.0.1:%d" % self.api_port)
        self.stub = pbg.MoeserveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @staticmethod
    def service_of(pod):
        """The headless Service an LWS pod is named under (its LeaderWorkerSet's name)."""
        m = re.match(r"^(moeserve-(?:decode|prefill))-\d+(?:-\d+)?$", pod)
        return m.group(1) if m else None

    def start(self, name, **env):
        e = dict(self.env)
        run = os.path.join(self.dir, "pods", name)  # the pod's emptyDir (/run/moeserve)
        os.makedirs(run, exist_ok=True)
        os.chown(run, UID, UID)
        e.update(MOE_SSH_DIR=os.path.join(run, "ssh"), MOE_HOST_LABEL=name)  # metadata.name
        e.update(env)
        old = self.pods.get(name)
        check(old is None or not old.alive(), "pod %s already runs" % name)
        pod = Pod(self, name, e)
        self.pods[name] = pod
        self.every_pod.append(pod)
        return pod

    def _instance_env(self, pool):
        return dict(MOE_ROLE="instance", MOE_POOL=pool, MOE_COORDINATOR_ADDR=COORD + ":50052",
                    MOE_COORDINATOR_API=COORD + ":50051", MOE_THREADS="1",
                    MOE_INSTANCE_ARGS="--kv-blocks 512 --heartbeat-ms 100")

    def prefill(self, i):
        """An E = 1 prefill pod (components/pools-deployment)."""
        return self.start("moeserve-prefill-%d" % i, **self._instance_env("prefill"))

    def decode_group(self, g):
        """Decode group g of the LeaderWorkerSet moeserve-decode (size 2): the leader pod and its
        worker, with the variables LWS gives them; returns (leader, worker). The worker starts
        after the leader exists (startupPolicy: LeaderCreated)."""
        lws = "moeserve-decode"
        leader_addr = "%s-%d.%s.%s" % (lws, g, lws, NAMESPACE)
        env = self._instance_env("decode")
        env.update(LWS_GROUP_SIZE="2", LWS_LEADER_ADDRESS=leader_addr, MOE_WORKER_WAIT_S="60",
                   # The pods' flags (base/flags.env's MOE_MPIRUN_ARGS): MPI inside the group on
                   # TCP over the pods' network. UCX_TLS / UCX_NET_DEVICES reach the worker's
                   # rank only because the entrypoint passes UCX_* on.
                   MOE_MPIRUN_ARGS="--mca pml ob1 --mca btl tcp,self")
        leader = self.start("%s-%d" % (lws, g), LWS_WORKER_INDEX="0", **env)
        worker = self.start("%s-%d-1" % (lws, g), LWS_WORKER_INDEX="1", **env)
        return leader, worker

    # ---- probes ----
    def ready(self, pod):
        """The pod's readiness probe: moeserve-ready in an instance pod that runs a rank's leader
        (E = 1 pods, LWS leaders); the ssh port's TCP check in an LWS worker pod."""
        if not pod.alive():
            return False
        if pod.env.get("LWS_WORKER_INDEX", "0") != "0":
            r = pod.exec(["bash", "-c", "exec 3<>/dev/tcp/%s/2222" % self.addr_of[pod.name]], timeout=10)
        else:
            r = pod.exec([READY], timeout=30)
        return r.returncode == 0

    def wait_ready(self, pods, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in pods:
                if not p.alive():
                    raise TestFailure("pod %s exited %s:\n%s" % (p.name, p.proc.returncode, p.p.stderr()[-3000:]))
            if all(self.ready(p) for p in pods) and self.serving():
                return
            time.sleep(0.3)
        raise TestFailure("pods %s not ready in %d s:\n%s" % ([p.name for p in pods], timeout,
                                                             "\n".join(p.p.stderr()[-1500:] for p in pods)))

    serving = ElasticCluster.serving
    wait_idle = ElasticCluster.wait_idle

    def status(self):
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)

    def ranks_of(self, st, leader):
        """The coordinator's targets of the group whose leader pod is `leader` (its host label)."""
        return [i for i in st.instances if i.host == leader.name]

    def rank_pids(self, pod):
        """The moe-serve processes in the pod's network namespace, each with its ancestors' names."""
        exe = os.path.realpath(self.env["MOE_SERVE"])
        out = {}
        for pid in self.hosts.pids(pod.ns):
            try:
                if os.path.realpath("/proc/%d/exe" % pid) != exe:
                    continue
            except OSError:
                continue
            chain, p = [], pid
            while p > 1:
                try:
                    with open("/proc/%d/stat" % p) as f:
                        s = f.read()
                except OSError:
                    break
                p = int(s.rsplit(")", 1)[1].split()[1])
                try:
                    with open("/proc/%d/comm" % p) as f:
                        chain.append(f.read().strip())
                except OSError:
                    break
            out[pid] = chain
        return out

    # ---- what the kubelet and the LWS controller do ----
    def delete(self, pods, grace_s=120):
        """Deletes pods as Kubernetes does, all at once (a group is deleted whole): each pod's
        preStop hook in parallel, then SIGTERM to each pod's PID 1, SIGKILL at the end of the
        grace period. Returns {pod name: (preStop result, pod exit status)}."""
        res = {}

        def one(p):
            start = time.time()
            r = None
            if p.alive():
                try:
                    r = p.exec([PRESTOP], timeout=grace_s)
                except (subprocess.TimeoutExpired, TestFailure) as e:
                    r = e
            p.signal_init(signal.SIGTERM)
            try:
                rc = p.proc.wait(timeout=max(1, grace_s - (time.time() - start)))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "killed at the end of the grace period"
            res[p.name] = (r, rc)

        threads = [threading.Thread(target=one, args=(p,)) for p in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return res

    def close(self):
        for p in self.pods.values():
            if p.alive():
                p.kill()
        self.channel.close()
        self.hosts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        keep = exc[0] is not None
        if keep:
            for p in self.pods.values():
                sys.stderr.write("---- pod %s (exit %s) ----\n%s\n" % (p.name, p.proc.poll(), p.p.stderr()[-4000:]))
        self.close()
        for p in self.every_pod:
            p.p.close(False)
        subprocess.run(["rm", "-rf", self.dir])
        return False


def prestop_ok(r):
    """The preStop hook drained: it said so, or it was ended with its pod because what it drained
    was the pod's main process (an LWS leader's mpirun ends when its ranks have exited 0)."""
    if isinstance(r, Exception):
        return False
    return r.returncode == 0 or (r.returncode in (-signal.SIGKILL, 137) and "waiting up to" in r.stderr)


def delete_all(c, instance_pods):
    """Deletes the instance pods, then the coordinator pod (kubectl delete -k, or a namespace
    going away): every preStop drains and every pod exits 0 (an LWS worker's too: tini reports
    sshd's clean exit on the SIGTERM that follows its drained rank)."""
    res = c.delete(instance_pods)
    res.update(c.delete([c.coord]))
    bad = ["%s: preStop %s, exit %s" % (n, getattr(r, "stderr", r), rc) for n, (r, rc) in res.items()
           if not prestop_ok(r) or rc != 0]
    check(not bad, "; ".join(bad))


def check_group_ran_across_pods(c, leader, worker):
    """Each pod of the group hosts one rank: the leader's under its mpirun, the worker's under an
    orted that the leader's mpirun started through the worker's sshd (which logged the leader's
    login with the Secret's key; orted then daemonizes under the pod's PID 1)."""
    lr, wr = c.rank_pids(leader), c.rank_pids(worker)
    check(len(lr) == 1 and len(wr) == 1, "ranks per pod: leader %s, worker %s" % (lr, wr))
    check(list(lr.values())[0][:1] == ["mpirun"], "the leader's rank is not mpirun's child: %s" % lr)
    check(list(wr.values())[0][:2] == ["orted", "tini"], "the worker's rank is not under its pod's orted: %s" % wr)
    with open("/proc/%d/environ" % list(wr)[0], "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    got = {k: env.get(k.encode(), b"").decode() for k in ("UCX_TLS", "UCX_NET_DEVICES", "MOE_LOG_LEVEL")}
    want = {k: leader.env[k] for k in got}
    check(got == want, "the worker's rank (started by sshd) did not get the leader's %s: %s" % (want, got))
    login = "Accepted publickey for moe from %s " % c.addr_of[leader.name]
    check(login in worker.p.stderr(), "the worker's sshd logged no login from the leader:\n" + worker.p.stderr())


def check_group_computed(c, st, leader):
    ranks = c.ranks_of(st, leader)
    desc = [(i.id, list(i.ep_group_ranks), i.expert_begin, i.expert_end) for i in ranks]
    check(len(ranks) == 2 and all(len(i.ep_group_ranks) == 2 and sorted(i.ep_group_ranks) == sorted(ranks[0].ep_group_ranks)
                                  for i in ranks), "group %s is not one EP-2 group: %s" % (leader.name, desc))
    lo, hi = sorted((i.expert_begin, i.expert_end) for i in ranks)
    check(lo[0] == 0 and lo[1] == hi[0] < hi[1], "group %s does not split the experts: %s" % (leader.name, desc))
    check(all(sum(i.expert_tokens) > 0 for i in ranks),
          "a rank of group %s computed no expert: %s" % (leader.name, [sum(i.expert_tokens) for i in ranks]))



def check_drained_by_migration(c, work, streams):
    """After a drain during the streams: every output equals moe-generate, something migrated and
    nothing was resumed (the coordinator's loss lines explain a failure). Returns the idle status."""
    try:
        check_outputs(work, streams.join())
    except TestFailure as e:
        raise TestFailure("%s\n%s" % (e, losses(c.coord.p.stderr())))
    st = c.wait_idle()
    check(st.counters.migrations >= 1, "nothing migrated: %s" % st.counters)
    check(st.counters.requests_resumed == 0, "requests were resumed, not migrated: %s\n%s" % (
        st.counters, losses(c.coord.p.stderr())))
    return st


def check_hpa_metric_is_exported(c):
    """The example HPA's metric (deploy/k8s/components/hpa-decode) is what the coordinator pod's
    /metrics really exports, with the label its selector matches."""
    import yaml
    with open(os.path.join(SRC, "deploy", "k8s", "components", "hpa-decode", "hpa.yaml")) as f:
        metric = yaml.safe_load(f)["spec"]["metrics"][0]["object"]["metric"]
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % c.http_port, timeout=10) as r:
        text = r.read().decode()
    labels = metric["selector"]["matchLabels"]
    rows = [line for line in text.splitlines() if line.startswith(metric["name"] + "{")
            and all('%s="%s"' % kv in line for kv in labels.items())]
    check(rows, "GET /metrics has no %s with %s:\n%s" % (metric["name"], labels, text[:2000]))

@test
def lws_group_serves_across_pods_and_is_recreated():
    """A coordinator pod, a prefill pod and an EP-2 decode group (leader + worker pods): the
    leader's mpirun reaches the worker's sshd, one rank per pod, both compute (the experts are
    split between the pods); 8 streams == moe-generate. The worker pod dies whole (its node dies):
    the group's MPI job ends, the coordinator drops both ranks; the LWS controller recreates the
    group (same pod names), which joins, becomes ready and serves, streams == moe-generate."""
    with LwsCluster() as c:
        pre = c.prefill(0)
        leader, worker = c.decode_group(0)
        c.wait_ready([pre, leader, worker])
        check_group_ran_across_pods(c, leader, worker)
        work = workload(8, max_new=24)
        check_outputs(work, Streams(c, work).join())
        st = c.wait_idle()
        check_group_computed(c, st, leader)
        # The Service's http port (the OpenAI-compatible API) answers from the coordinator pod.
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % c.http_port, timeout=10) as r:
            check(r.status == 200, "GET /health: %d" % r.status)
        with urllib.request.urlopen("http://127.0.0.1:%d/v1/models" % c.http_port, timeout=10) as r:
            models = json.load(r)
        check(models.get("object") == "list" and len(models.get("data", [])) == 1, "GET /v1/models: %s" % models)
        check_hpa_metric_is_exported(c)
        old_ids = sorted(i.id for i in c.ranks_of(st, leader))

        worker.kill()  # the node under the worker pod dies
        deadline = time.time() + 15
        while time.time() < deadline:
            st = c.status()
            if all(i.state != pb.INSTANCE_STATE_READY for i in c.ranks_of(st, leader)):
                break
            time.sleep(0.1)
        check(all(i.state != pb.INSTANCE_STATE_READY for i in c.ranks_of(st, leader)),
              "the coordinator still has the broken group's ranks ready:\n%s" % st)
        check(not c.ready(leader), "the leader still reads as ready with its worker gone")
        # RecreateGroupOnPodRestart: the controller deletes the group's pods and makes them anew.
        # The leader's mpirun loses its remote daemon and ends the job: the leader's container
        # fails too (a restart LWS sees), rather than serving half a group.
        t0 = time.time()
        rc = leader.wait(30)
        check(rc != 0, "the leader pod exited 0 after its worker died")
        print("the leader pod ended by itself %.1f s after its worker, exit %s" % (time.time() - t0, rc))
        leader, worker = c.decode_group(0)
        c.wait_ready([leader, worker])
        check_group_ran_across_pods(c, leader, worker)
        work = workload(8, max_new=24, seed=11)
        check_outputs(work, Streams(c, work).join())
        st = c.wait_idle()
        new = c.ranks_of(st, leader)
        check(all(i.id not in old_ids for i in new if i.state == pb.INSTANCE_STATE_READY),
              "the recreated group reused member ids %s" % old_ids)
        check_group_computed(c, pb.ClusterStatusResponse(instances=[i for i in new if i.id not in old_ids]), leader)
        delete_all(c, [pre, leader, worker])


@test
def lws_scale_up_then_down_drains_a_group():
    """kubectl scale leaderworkerset/moeserve-decode 1 -> 2: the new group joins, becomes ready and
    serves (12 streams == moe-generate). Then 2 -> 1 during 12 long streams: LWS deletes the
    last group (the highest index), both its pods at once; each pod's preStop
    signals its own rank, the group drains by migration to group 0, its pods end, and every
    stream equals moe-generate with no request resumed (none was lost)."""
    with LwsCluster(decode_groups=2) as c:
        pre = c.prefill(0)
        g0 = c.decode_group(0)
        c.wait_ready([pre, *g0])
        g1 = c.decode_group(1)  # scale up
        c.wait_ready(list(g1))
        check_group_ran_across_pods(c, *g1)
        work = workload(12, max_new=24, seed=5)
        check_outputs(work, Streams(c, work).join())
        st = c.wait_idle()
        check_group_computed(c, st, g1[0])

        work = workload(12, max_new=300, seed=6)
        s = Streams(c, work)
        st = wait_decoding(c, s)
        check(sum(i.running for i in c.ranks_of(st, g1[0])) >= 1, "group 1 runs nothing to drain:\n%s" % st)
        res = c.delete(list(g1))  # scale down: the highest-index group goes
        st = check_drained_by_migration(c, work, s)
        (lr, lrc), (wr, wrc) = res[g1[0].name], res[g1[1].name]
        check(prestop_ok(lr) and prestop_ok(wr), "preStop: leader %s, worker %s" % (
            getattr(lr, "stderr", lr), getattr(wr, "stderr", wr)))
        check(lrc == 0, "the drained group's leader (mpirun) exited %s:\n%s" % (lrc, g1[0].p.stderr()[-3000:]))
        check(wrc == 0, "the drained group's worker pod exited %s" % wrc)
        print("group 1 drained: %d migrations; leader exit %s, worker exit %s; preStop: %s / %s" % (
            st.counters.migrations, lrc, wrc, lr.stderr.strip().splitlines()[-1:], wr.stderr.strip().splitlines()[-1:]))
        delete_all(c, [pre, *g0])


@test
def lws_evicted_worker_pod_drains_its_group():
    """kubectl drain of the node under one worker pod: only that pod is evicted (its preStop, then
    SIGTERM), during 12 long streams. Its rank's leave drains the whole EP group by migration to
    the other group; the leader's rank is shut down too, so the leader's mpirun exits 0 (LWS then
    recreates the group); every stream equals moe-generate, no request is resumed."""
    with LwsCluster(decode_groups=2) as c:
        pre = c.prefill(0)
        g0, g1 = c.decode_group(0), c.decode_group(1)
        c.wait_ready([pre, *g0, *g1])
        work = workload(12, max_new=300, seed=8)
        s = Streams(c, work)
        st = wait_decoding(c, s)
        victim = max((g0, g1), key=lambda g: sum(i.running for i in c.ranks_of(st, g[0])))
        check(sum(i.running for i in c.ranks_of(st, victim[0])) >= 1, "no group runs anything:\n%s" % st)
        res = c.delete([victim[1]])  # the worker pod alone
        st = check_drained_by_migration(c, work, s)
        r, rc = res[victim[1].name]
        check(prestop_ok(r) and rc == 0, "the evicted worker pod: preStop %s, exit %s" % (
            getattr(r, "stderr", r), rc))
        lrc = victim[0].wait(30)
        check(lrc == 0, "the group's leader (mpirun) exited %s:\n%s" % (lrc, victim[0].p.stderr()[-3000:]))
        print("evicted %s: %d migrations; its leader exited %s" % (victim[1].name, st.counters.migrations, lrc))
        other = g1 if victim is g0 else g0
        delete_all(c, [pre, *other])


@test
def lws_pod_death_mid_stream_loses_no_request():
    """A worker pod dies whole (SIGKILL: its node dies) while its group runs requests: the
    coordinator loses the group and each of its requests goes on in the other group from its
    prompt and the tokens already streamed; 16 greedy streams equal moe-generate, nothing
    repeated or skipped (Streams checks the token indices). Greedy only: a seeded draw after a
    recompute of 48 tokens or more may differ in the last bits (docs/cluster.md, Exactness)."""
    with LwsCluster(decode_groups=2) as c:
        pre = c.prefill(0)
        g0, g1 = c.decode_group(0), c.decode_group(1)
        c.wait_ready([pre, *g0, *g1])
        work = [w for w in workload(16, max_new=200, seed=12) if "seed" not in w]
        s = Streams(c, work)
        st = wait_decoding(c, s)
        victim = max((g0, g1), key=lambda g: sum(i.running for i in c.ranks_of(st, g[0])))
        running = sum(i.running for i in c.ranks_of(st, victim[0]))
        check(running >= 1, "no group runs anything:\n%s" % st)
        victim[1].kill()
        check_outputs(work, s.join())
        st = c.wait_idle()
        check(st.counters.requests_resumed >= running, "%d requests ran on the lost group, %d resumed" % (
            running, st.counters.requests_resumed))
        check(victim[0].wait(30) != 0, "the broken group's leader exited 0")
        other = g1 if victim is g0 else g0
        delete_all(c, [pre, *other])


def main():
    try:
        return test_main(TESTS, "deploy_lws_tests.py")
    except Skip as e:
        return netns.skip(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
