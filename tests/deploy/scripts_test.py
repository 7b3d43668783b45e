"""deploy/image's pod scripts, run for real outside a container: the entrypoint's mapping from a
pod's environment to the command (--dry-run prints it), the files it writes for an LWS group's
ssh (checked by sshd -t and ssh -G themselves), its refusals; the preStop drain against stand-in
processes; the readiness check against a stand-in client; shellcheck on every script."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "deploy" / "image"
ENTRYPOINT = IMAGE / "entrypoint.sh"
PRESTOP = IMAGE / "prestop.sh"
READY = IMAGE / "ready.sh"
SERVE = "/opt/moeserve/bin/moe-serve"
TOKEN = "0123456789abcdef0123456789abcdef"


class Pod:
    """A scratch folder laid out like a pod's mounts: a model, the token Secret, the ssh Secret."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="moeserve-pod-"))
        self.model = self.dir / "models" / "model"
        self.model.mkdir(parents=True)
        (self.model / "config.json").write_text("{}")
        self.token = self.dir / "token" / "token"
        self.token.parent.mkdir()
        self.token.write_text(TOKEN)
        self.ssh_secret = self.dir / "ssh-secret"
        self.ssh_secret.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test",
                        "-f", str(self.ssh_secret / "ssh-privatekey")], check=True)
        os.rename(self.ssh_secret / "ssh-privatekey.pub", self.ssh_secret / "ssh-publickey")
        self.ssh_dir = self.dir / "run" / "ssh"

    def env(self, **kw):
        e = {"PATH": os.environ["PATH"], "HOME": str(self.dir), "MOE_SERVE": SERVE,
             "MOE_MODEL_DIR": str(self.model), "MOE_CLUSTER_TOKEN_FILE": str(self.token),
             "MOE_SSH_SECRET_DIR": str(self.ssh_secret), "MOE_SSH_DIR": str(self.ssh_dir)}
        e.update({k: str(v) for k, v in kw.items()})
        return {k: v for k, v in e.items() if v != "<unset>"}

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def entrypoint(env, *args, user=None):
    return subprocess.run(as_user(user, [str(ENTRYPOINT), *args]), env=env, capture_output=True, text=True,
                          timeout=60)


NOBODY = 65534


def as_user(uid, argv):
    """argv run as uid (setpriv) when we are root: the pods run as an unprivileged user, and
    sshd behaves differently as root (privilege separation)."""
    if uid is None or os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def dry(env):
    """The command the entrypoint would exec, as argv, and the hostfile lines it printed."""
    out = entrypoint(env, "--dry-run")
    if out.returncode != 0:
        raise AssertionError(f"entrypoint failed ({out.returncode}): {out.stderr}")
    hosts, argv = [], None
    for line in out.stdout.splitlines():
        words = shlex.split(line)
        if words[0] == "hostfile":
            hosts.append(words[1])
        elif words[0] == "exec":
            argv = words[1:]
    return argv, hosts


class Entrypoint(unittest.TestCase):
    def setUp(self):
        self.pod = Pod()

    def tearDown(self):
        self.pod.close()

    def test_coordinator(self):
        argv, _ = dry(self.pod.env(MOE_ROLE="coordinator", MOE_LISTEN="0.0.0.0:50051",
                                   MOE_CLUSTER_LISTEN="0.0.0.0:50052", MOE_DRAIN_TIMEOUT_S=60,
                                   MOE_HTTP_LISTEN="0.0.0.0:8080",
                                   MOE_HEARTBEAT_TIMEOUT_MS=3000,
                                   MOE_COORDINATOR_ARGS="--max-requests 1024  --max-queue 64"))
        self.assertEqual(argv, [SERVE, "coordinator", "--model", str(self.pod.model),
                                "--listen", "0.0.0.0:50051", "--cluster-listen", "0.0.0.0:50052",
                                "--cluster-token-file", str(self.pod.token),
                                "--http-listen", "0.0.0.0:8080", "--heartbeat-timeout-ms", "3000", "--drain-timeout-s", "60",
                                "--max-requests", "1024", "--max-queue", "64"])

    def test_single_rank_instance(self):
        env = self.pod.env(MOE_ROLE="instance", MOE_POOL="decode", MOE_COORDINATOR_ADDR="moeserve-coordinator:50052",
                           MOE_HOST_LABEL="moeserve-decode-7d9f-abcde", MOE_THREADS=4,
                           MOE_INSTANCE_ARGS="--kv-block-size 16", MOE_DECODE_ARGS="--kv-mb 4096",
                           MOE_PREFILL_ARGS="--batch-tokens 99")
        argv, hosts = dry(env)
        self.assertEqual(hosts, [])
        self.assertEqual(argv, [SERVE, "instance", "--join", "moeserve-coordinator:50052", "--pool", "decode",
                                "--model", str(self.pod.model), "--cluster-token-file", str(self.pod.token),
                                "--host-label", "moeserve-decode-7d9f-abcde",
                                "--kv-block-size", "16", "--kv-mb", "4096", "--threads", "4"])
        # A --threads in the flags wins over the CPU request; LWS_GROUP_SIZE=1 is one process too.
        env.update(MOE_DECODE_ARGS="--threads 2", LWS_GROUP_SIZE="1", LWS_WORKER_INDEX="0")
        argv, _ = dry(env)
        self.assertEqual(argv[-2:], ["--threads", "2"])
        self.assertEqual(argv.count("--threads"), 1)

    def test_token_from_the_environment(self):
        env = self.pod.env(MOE_ROLE="instance", MOE_POOL="mixed", MOE_COORDINATOR_ADDR="c:1",
                           MOE_CLUSTER_TOKEN_FILE=str(self.pod.dir / "absent"), MOESERVE_CLUSTER_TOKEN=TOKEN,
                           MOE_HOST_LABEL="p")
        argv, _ = dry(env)
        self.assertNotIn("--cluster-token-file", argv)
        self.assertNotIn(TOKEN, argv)  # moe-serve reads it from its environment, never from argv

    def test_lws_leader_runs_mpirun_over_the_group(self):
        # LWS_LEADER_ADDRESS as LWS sets it for group 1 of LWS "test-sample" in namespace "lws"
        # (LWS pkg/utils/pod/pod_utils_test.go); its workers are test-sample-1-<i> under the same
        # headless service (LWS docs: leaderWorkerSetName-leaderIndex-workerIndex).
        env = self.pod.env(MOE_ROLE="instance", MOE_POOL="prefill", MOE_COORDINATOR_ADDR="c:50052",
                           LWS_LEADER_ADDRESS="test-sample-1.test-sample.lws", LWS_GROUP_SIZE=3,
                           LWS_WORKER_INDEX=0, MOE_LEADER_HOST="test-sample-1", MOE_HOST_LABEL="test-sample-1",
                           MOE_LOG_LEVEL="debug", MOE_MPIRUN_ARGS="--mca btl_tcp_if_include eth0",
                           UCX_TLS="tcp", NCCL_SOCKET_IFNAME="eth0", UCX_EMPTY="")
        argv, hosts = dry(env)
        self.assertEqual(hosts, ["test-sample-1", "test-sample-1-1.test-sample.lws",
                                 "test-sample-1-2.test-sample.lws"])
        self.assertEqual(argv[:3], ["mpirun", "-np", "3"])
        cfg = str(self.pod.ssh_dir / "config")
        for pair in (["--hostfile", str(self.pod.ssh_dir / "hostfile")], ["--mca", "plm_rsh_args", f"-F {cfg}"],
                     ["--mca", "plm_rsh_no_tree_spawn", "1"], ["--mca", "orte_keep_fqdn_hostnames", "1"],
                     ["-x", "MOE_LOG_LEVEL"], ["--mca", "btl_tcp_if_include", "eth0"],
                     ["-x", "UCX_TLS"], ["-x", "NCCL_SOCKET_IFNAME"],
                     ["--mca", "odls_base_sigkill_timeout", "1"]):  # short: preStop drains (entrypoint.sh)
            self.assertTrue(any(argv[i:i + len(pair)] == pair for i in range(len(argv))), pair)
        self.assertNotIn("UCX_EMPTY", argv)  # set but empty: nothing to pass on
        i = argv.index(SERVE)
        self.assertEqual(argv[i:i + 6], [SERVE, "instance", "--join", "c:50052", "--pool", "prefill"])

    def test_lws_worker_runs_sshd(self):
        env = self.pod.env(MOE_ROLE="instance", MOE_POOL="decode", MOE_COORDINATOR_ADDR="c:1",
                           LWS_LEADER_ADDRESS="x-0.x.ns", LWS_GROUP_SIZE=2, LWS_WORKER_INDEX=1)
        argv, _ = dry(env)
        self.assertEqual(argv, ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.pod.ssh_dir / "sshd_config")])

    def test_lws_files_are_what_sshd_and_ssh_accept(self):
        # The worker's sshd_config and the leader's ssh config, written for real and read by
        # OpenSSH itself: sshd -t loads the config and the host key; ssh -G resolves the config.
        # As the pods do, as an unprivileged user.
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.assertTrue(os.path.exists(sshd), "openssh-server (scripts/install-deps.sh)")
        if os.geteuid() == 0:
            for d, _, files in os.walk(self.pod.dir):
                for f in [d, *(os.path.join(d, f) for f in files)]:
                    os.chown(f, NOBODY, NOBODY)
        env = self.pod.env(MOE_ROLE="instance", MOE_POOL="decode", MOE_COORDINATOR_ADDR="c:1",
                           LWS_LEADER_ADDRESS="g-0.g.ns", LWS_GROUP_SIZE=2, LWS_WORKER_INDEX=1,
                           MOE_SSHD="/bin/true", MOE_SSH_PORT=2345)
        out = entrypoint(env, user=NOBODY)
        self.assertEqual(out.returncode, 0, out.stderr)
        cfg = self.pod.ssh_dir / "sshd_config"
        self.assertEqual(os.stat(self.pod.ssh_dir / "id_moeserve").st_mode & 0o777, 0o600)
        out = subprocess.run(as_user(NOBODY, [sshd, "-t", "-f", str(cfg)]), capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Port 2345", cfg.read_text())
        # The leader: its workers do not exist, so it stops waiting at once, having written the files.
        env.update(LWS_WORKER_INDEX="0", MOE_WORKER_WAIT_S="0")
        out = entrypoint(env, user=NOBODY)
        self.assertEqual(out.returncode, 2)
        self.assertIn("worker g-0-1.g.ns did not answer", out.stderr)
        self.assertEqual((self.pod.ssh_dir / "hostfile").read_text().split("\n")[1], "g-0-1.g.ns slots=1")
        known = (self.pod.ssh_dir / "known_hosts").read_text().split()
        self.assertEqual(known[0], "moeserve-group")
        self.assertEqual(known[1:3], (self.pod.ssh_secret / "ssh-publickey").read_text().split()[:2])
        out = subprocess.run(as_user(NOBODY, ["ssh", "-G", "-F", str(self.pod.ssh_dir / "config"), "g-0-1.g.ns"]),
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        resolved = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
        self.assertEqual(resolved["port"], "2345")
        self.assertEqual(resolved["hostkeyalias"], "moeserve-group")
        self.assertEqual(resolved["stricthostkeychecking"], "true")
        self.assertEqual(resolved["batchmode"], "yes")

    def test_refusals(self):
        base = dict(MOE_ROLE="instance", MOE_POOL="decode", MOE_COORDINATOR_ADDR="c:1")
        cases = [
            (dict(MOE_ROLE="<unset>"), "MOE_ROLE=''"),
            (dict(MOE_ROLE="worker"), "MOE_ROLE='worker': must be coordinator or instance"),
            (dict(MOE_POOL="decoder"), "MOE_POOL='decoder': must be prefill, decode or mixed"),
            (dict(MOE_COORDINATOR_ADDR="<unset>"), "MOE_COORDINATOR_ADDR is not set"),
            (dict(MOE_MODEL_DIR="/nonexistent/model"), "no model at MOE_MODEL_DIR=/nonexistent/model"),
            (dict(MOE_CLUSTER_TOKEN_FILE="/nonexistent/token"), "no cluster token"),
            (dict(MOE_CLUSTER_TOKEN_FILE="/nonexistent/token", MOESERVE_CLUSTER_TOKEN="short"),
             "MOESERVE_CLUSTER_TOKEN has 5 bytes"),
            (dict(LWS_GROUP_SIZE=2, LWS_WORKER_INDEX=0), "LWS_LEADER_ADDRESS is not set"),
            (dict(LWS_GROUP_SIZE=2, LWS_WORKER_INDEX=0, LWS_LEADER_ADDRESS="nodots"), "is not <pod>.<service>.<namespace>"),
            (dict(LWS_GROUP_SIZE=2, LWS_WORKER_INDEX=2, LWS_LEADER_ADDRESS="a-0.a.ns"), "LWS_WORKER_INDEX=2 is not below"),
            (dict(LWS_GROUP_SIZE="two"), "LWS_GROUP_SIZE='two' is not a number"),
            (dict(LWS_GROUP_SIZE=2, LWS_WORKER_INDEX=1, LWS_LEADER_ADDRESS="a-0.a.ns",
                  MOE_SSH_SECRET_DIR="/nonexistent"), "no ssh key pair in /nonexistent"),
        ]
        for kw, message in cases:
            with self.subTest(env=kw):
                out = entrypoint(self.pod.env(**{**base, **kw}), "--dry-run")
                self.assertEqual(out.returncode, 2, out.stdout)
                self.assertIn(message, out.stderr)
                self.assertEqual(out.stdout, "")
        self.pod.token.write_text("too short")
        out = entrypoint(self.pod.env(**base), "--dry-run")
        self.assertEqual(out.returncode, 2)
        self.assertIn("has 9 bytes; it needs at least 16", out.stderr)


def stand_in(path, name, on_term):
    """An executable called NAME (its /proc comm) that runs ON_TERM when it gets SIGTERM."""
    exe = Path(path) / name
    exe.write_text(f"#!/bin/bash\ntrap '{on_term}' TERM\necho up\nwhile :; do sleep 0.1; done\n")
    exe.chmod(0o755)
    p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "up\n"
    p.stdout.close()
    return p


class PreStop(unittest.TestCase):
    # Stand-ins get a name unique to this test run: prestop.sh signals every process of that name
    # in its PID namespace, which outside a pod is the whole machine.
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="moeserve-prestop-")
        self.name = f"mst{os.getpid() % 100000}"
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def prestop(self, **env):
        e = {"PATH": os.environ["PATH"], "MOE_PRESTOP_COMM": self.name}
        e.update({k: str(v) for k, v in env.items()})
        t = time.monotonic()
        out = subprocess.run([str(PRESTOP)], env=e, capture_output=True, text=True, timeout=60)
        return out, time.monotonic() - t

    def test_waits_for_the_drain(self):
        # Two ranks in the pod: each drains for a while after SIGTERM, then exits 0.
        self.procs = [stand_in(self.dir, self.name, "sleep 1; exit 0") for _ in range(2)]
        out, took = self.prestop(MOE_DRAIN_TIMEOUT_S=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("drained", out.stderr)
        self.assertGreaterEqual(took, 0.9)  # it waited for the drain, not just signalled
        for p in self.procs:
            self.assertEqual(p.wait(timeout=5), 0)

    def test_lws_worker_waits_for_the_groups_job_to_end(self):
        # An LWS worker pod: its rank drains at once; Open MPI's daemon there (a stand-in named
        # like it) ends 4 s after the rank, when the group's job has ended: the hook returns only
        # after that (4 s: the hook's scans of this machine's /proc are slow under load; a pod's
        # /proc holds a handful of processes).
        daemon = f"{self.name}d"
        gone = Path(self.dir) / "rank-gone"
        self.procs = [stand_in(self.dir, self.name, f"touch {gone}; exit 0")]
        exe = Path(self.dir) / daemon
        exe.write_text(f"#!/bin/bash\nuntil [ -e {gone} ]; do sleep 0.1; done\nsleep 4\n")
        exe.chmod(0o755)
        d = subprocess.Popen([str(exe)])
        self.procs.append(d)
        out, _ = self.prestop(MOE_DRAIN_TIMEOUT_S=30, MOE_PRESTOP_DAEMON_COMM=daemon)
        ended = d.poll()
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("drained", out.stderr)
        self.assertIn(f"waiting for {daemon}", out.stderr)
        self.assertEqual(ended, 0, "the hook returned while the group's job still ran")

    def test_gives_up_after_the_drain_timeout(self):
        self.procs = [stand_in(self.dir, self.name, ":")]  # ignores SIGTERM
        out, took = self.prestop(MOE_DRAIN_TIMEOUT_S=1, MOE_PRESTOP_MARGIN_S=1)
        self.assertEqual(out.returncode, 1)
        self.assertIn("still running after 2 s", out.stderr)
        self.assertLess(took, 10)
        self.assertIsNone(self.procs[0].poll())

    def test_nothing_to_drain(self):
        out, _ = self.prestop()
        self.assertEqual(out.returncode, 0)
        self.assertIn("no mst", out.stderr)


class Ready(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="moeserve-ready-"))

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def ready(self, table, rc=0, label="moeserve-decode-1"):
        client = self.dir / "moe-client"
        client.write_text(f'#!/bin/bash\n[ "$1 $2" = "--addr coord:50051" ] || exit 9\n'
                          f'cat <<"EOF"\n{table}\nEOF\nexit {rc}\n')
        client.chmod(0o755)
        env = {"PATH": os.environ["PATH"], "MOE_CLIENT": str(client), "MOE_COORDINATOR_API": "coord:50051",
               "MOE_HOST_LABEL": label}
        return subprocess.run([str(READY)], env=env, capture_output=True, text=True, timeout=30).returncode

    def test_ready_only_when_listed_ready(self):
        # Rows as tools/moe_client.c prints them (tests/integration/deploy_pods_tests.py runs the
        # probe against the real client and coordinator).
        head = ("POOL     INSTANCES RANKS  EP RUNNING WAITING               KV USED\n"
                "decode           2     2   1       0       0                 0/1024\n\n"
                "INST POOL     STATE       RANKS        RUNNING WAITING  KV USED  KV FREE  KV TOTAL PEND.PROMPT"
                " HEARTBEAT  HOST\n")

        def row(state, host):
            return (f"3    decode   {state:<11} 1,2                0       0        0      512       512"
                    f"          0       12 ms  {host}\n")
        self.assertEqual(self.ready(head + row("ready", "moeserve-decode-1")), 0)
        self.assertEqual(self.ready(head + row("ready", "moeserve-decode-1"), label="moeserve-decode-2"), 1)
        self.assertEqual(self.ready(head + row("ready", "moeserve-decode-10")), 1)
        for state in ("draining", "UNREACHABLE", "starting"):
            self.assertEqual(self.ready(head + row(state, "moeserve-decode-1")), 1, state)
        self.assertEqual(self.ready("UNAVAILABLE: failed to connect", rc=1), 1)


class Lint(unittest.TestCase):
    def test_shellcheck(self):
        scripts = sorted(str(p) for p in (ROOT / "deploy").rglob("*.sh")) + sorted(
            str(p) for p in (ROOT / "tests" / "deploy").rglob("*.sh"))
        self.assertGreaterEqual(len(scripts), 8)
        out = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)


if __name__ == "__main__":
    unittest.main()
