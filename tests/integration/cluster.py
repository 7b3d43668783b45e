"""Helpers for the mpirun cluster tests: start moe-serve under mpirun, wait until it serves, talk
to it with grpcio stubs generated from proto/ (run.sh puts them on PYTHONPATH), compute reference
outputs with moe-generate, and stop the cluster, checking that every rank exited 0."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc

import health_pb2
import health_pb2_grpc
import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(SRC, "tests/reference/fixtures/models/qwen3_moe_f32")

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    # containers without ptrace rights cannot use CMA single-copy
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def build_dir():
    return os.environ["MOE_BUILD_DIR"]


def small_model():
    """The moe-gen-model 'small' preset (qwen3_moe, bf16, ~200 MB, ~10 ms per token on one core):
    slow enough that a cancel or a deadline surely lands mid-stream. Generated once per run.sh
    run into its temporary directory (MOE_IT_TMP)."""
    import fcntl
    root = os.environ.get("MOE_IT_TMP") or tempfile.gettempdir()
    out = os.path.join(root, "small_qwen3_moe")
    with open(os.path.join(root, "small_qwen3_moe.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(out, "config.json")):
            gen = os.path.join(build_dir(), "moe-gen-model")
            check(os.access(gen, os.X_OK), "%s is missing (build it first)" % gen)
            subprocess.run([gen, "--arch", "qwen3_moe", "--preset", "small", "--out", out + ".tmp", "--quiet"],
                           check=True, timeout=120)
            os.rename(out + ".tmp", out)
    return out


def with_test_hooks(env):
    """Opens the test hooks' gate (common/test_hook.h) in env when it sets any MOE_TEST_* hook."""
    if any(k.startswith("MOE_TEST_") for k in env):
        env["MOE_TEST_HOOKS"] = "1"
    return env


# Lines of the mpirun job's log a failed test prints (run.sh shows a failure's last 80 lines).
CLUSTER_LOG_TAIL_LINES = 20


class Cluster:
    """One moe-serve job. Use as a context manager; stop() drains it with SIGTERM to rank 0.
    mpirun_args go to mpirun; wrap(cmd) returns the command line that runs cmd (e.g. in a
    namespace host, netns.Hosts.command); connect(port) returns the address the test's gRPC
    client dials for the coordinator's port (default 127.0.0.1:port)."""

    def __init__(self, np=3, args=(), env=None, model=MODEL, startup_s=60, mpirun_args=(), wrap=None,
                 connect=None, creds=None):
        self.np = np
        self.model = model
        self.creds = creds  # grpc.ChannelCredentials for a --tls-cert server (certificate for "localhost")
        self.log = tempfile.NamedTemporaryFile(prefix="moe-serve-", suffix=".log", delete=False)
        self.out = tempfile.NamedTemporaryFile(prefix="moe-serve-", suffix=".out", delete=False)
        e = dict(os.environ)
        e.update(MPI_ENV)
        e.setdefault("MOE_LOG_LEVEL", "info")
        if env:
            e.update(env)
        with_test_hooks(e)
        cmd = ["mpirun", "--oversubscribe", "-np", str(np)] + list(mpirun_args) + [os.path.join(build_dir(), "moe-serve"),
               "--model", model, "--listen", "127.0.0.1:0", "--threads", "1", "--kv-blocks", "512",
               # A rank starved of CPU for seconds (two cores, parallel builds) is not what most
               # tests test: liveness tests pass their own, shorter timeout (the last flag wins).
               "--heartbeat-ms", "100", "--heartbeat-timeout-ms", "20000"] + list(args)
        self.cmd = cmd
        self.connect = connect or (lambda port: "127.0.0.1:%d" % port)
        self.proc = subprocess.Popen(wrap(cmd) if wrap else cmd, stdout=self.out, stderr=self.log, env=e, start_new_session=True)
        try:
            self._start(startup_s)
        except BaseException:
            self.kill()
            sys.stderr.write("cluster log kept: %s\n" % self.log.name)
            raise

    def _start(self, startup_s):
        self.port = None
        self.pid = None
        deadline = time.time() + startup_s
        while time.time() < deadline:
            m = re.search(r"port (\d+)\); coordinator pid (\d+)", self.stdout())
            if m:
                self.port, self.pid = int(m.group(1)), int(m.group(2))
                break
            if self.proc.poll() is not None:
                raise TestFailure("moe-serve exited with %s before serving:\n%s" % (self.proc.returncode, self.stderr()))
            time.sleep(0.05)
        if not self.port:
            raise TestFailure("moe-serve did not print its start-up line in %d s:\n%s" % (startup_s, self.stderr()))
        self.channel = self.dial()
        self.stub = pbg.MoeserveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.serving():
                return
            time.sleep(0.05)
        raise TestFailure("Health never answered SERVING:\n" + self.stderr())

    def dial(self, creds=None):
        """A channel to the coordinator: TLS with `creds` (default: the cluster's), else plaintext."""
        creds = creds or self.creds
        if creds is None:
            return grpc.insecure_channel(self.connect(self.port))
        return grpc.secure_channel(self.connect(self.port), creds,
                                   options=[("grpc.ssl_target_name_override", "localhost")])

    def stdout(self):
        with open(self.out.name, errors="replace") as f:
            return f.read()

    def stderr(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def serving(self):
        try:
            r = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def status(self):
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)

    def wait_idle(self, timeout=10):
        """Waits until no instance holds KV or runs a sequence; returns the last status."""
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            st = self.status()
            if all(i.kv_blocks_used == 0 and i.running == 0 and i.waiting == 0 for i in st.instances) \
                    and st.totals.active_streams == 0:
                return st
            time.sleep(0.05)
        raise TestFailure("KV/sequences not back at zero after %d s:\n%s" % (timeout, st))

    def wait_counters(self, pred, timeout=5):
        """Waits until pred(status.counters) holds (counters travel with heartbeats)."""
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            st = self.status()
            if pred(st.counters):
                return st
            time.sleep(0.05)
        raise TestFailure("counters never satisfied the test:\n%s" % st.counters)

    def stop(self, timeout=30, sig=signal.SIGTERM, to_mpirun=False):
        """Drains via SIGTERM to the coordinator (or a signal to mpirun); returns mpirun's status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid if to_mpirun else self.pid, sig)
        try:
            rc = self.proc.wait(timeout=timeout)
            self.channel.close()
            return rc
        except subprocess.TimeoutExpired:
            self.kill()
            raise TestFailure("moe-serve did not exit %d s after the signal:\n%s" % (timeout, self.stderr()[-4000:]))

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        tail = []
        if exc[0] is not None:  # the job's last words, for a CI log whose machine is gone
            self.log.flush()
            with open(self.log.name, errors="replace") as f:
                tail = f.read().splitlines()[-CLUSTER_LOG_TAIL_LINES:]
        for f in (self.log, self.out):
            f.close()
            if exc[0] is None:
                os.unlink(f.name)
            else:
                sys.stderr.write("cluster log kept: %s\n" % f.name)
        for line in tail:
            sys.stderr.write("  cluster| %s\n" % line)
        return False


def gen_request(prompt=None, ids=None, max_new=16, temperature=0.0, **kw):
    sp = pb.SamplingParams(temperature=temperature)
    if "top_p" in kw:
        sp.top_p = kw.pop("top_p")
    if "seed" in kw:
        sp.seed = kw.pop("seed")
    if ids is not None:
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_new_tokens=max_new, sampling=sp, **kw)
    return pb.GenerateRequest(text=prompt, max_new_tokens=max_new, sampling=sp, **kw)


def generate(stub, req, timeout=60):
    """Runs one Generate; returns (ids, text, last message). Checks index continuity."""
    ids, text, last = [], "", None
    for r in stub.Generate(req, timeout=timeout):
        check(list(r.token_indices) == list(range(len(ids), len(ids) + len(r.token_ids))),
              "token indices %s after %d tokens" % (list(r.token_indices), len(ids)))
        ids += list(r.token_ids)
        text += r.text
        last = r
    return ids, text, last


def reference(prompt=None, ids=None, max_new=16, model=MODEL, extra=()):
    """moe-generate's greedy token ids for the same prompt."""
    cmd = [os.path.join(build_dir(), "moe-generate"), "--model", model, "--max-new-tokens", str(max_new),
           "--print-ids", "--threads", "1"] + list(extra)
    if ids is not None:
        cmd += ["--prompt-ids", ",".join(str(i) for i in ids)]
    else:
        cmd += ["--prompt", prompt]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")  # references need no leak check: fast
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60, env=env).stdout
    m = re.search(r"^ids:(.*)$", out, re.M)
    check(m is not None, "moe-generate printed no ids: %r" % out)
    return [int(x) for x in m.group(1).split()]


def mixed_workload(n, seed=1234, vocab=1000, context=512):
    """n requests of mixed prompt and output lengths (text and token-id prompts)."""
    import random
    rnd = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "Hello", "world", "serving", "experts", "token", "cache",
             "über", "naïve", "日本", "数据", "🙂", ",", ".", "\n"]
    reqs = []
    for i in range(n):
        max_new = rnd.choice([1, 2, 5, 17, 33, 64, 100])
        if i % 3 == 0:
            plen = rnd.choice([1, 3, 15, 16, 17, 40, 130, 300])
            ids = [rnd.randrange(vocab) for _ in range(plen)]
            reqs.append({"ids": ids, "max_new": max_new})
        else:
            k = rnd.choice([1, 4, 12, 30, 80])
            reqs.append({"prompt": " ".join(rnd.choice(words) for _ in range(k)), "max_new": max_new})
    return reqs


def run_parallel(fn, items, workers=40):
    """fn(item) for each item on its own thread, all at once; returns results (exceptions re-raised)."""
    results = [None] * len(items)
    errors = []

    def one(i):
        try:
            results[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        i, e = errors[0]
        raise TestFailure("item %d: %s: %s" % (i, type(e).__name__, e))
    return results


def registrar(tests):
    """A decorator that records a test function in `tests` under its name."""
    def test(fn):
        tests[fn.__name__] = fn
        return fn
    return test


def test_main(tests, prog):
    """`prog --list` names the tests, `prog NAME` runs one (exit 0 = pass)."""
    import sys
    if len(sys.argv) == 2 and sys.argv[1] == "--list":
        print("\n".join(tests))
        return 0
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        print("usage: %s --list | NAME" % prog, file=sys.stderr)
        return 2
    import signal

    def stopped(signum, _frame):
        # run.sh's time limit (timeout sends SIGTERM) or a runner stopping: unwind, so that each
        # Cluster's __exit__ stops the processes it started instead of leaving them running.
        raise SystemExit("stopped by signal %d" % signum)
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGHUP, stopped)
    try:
        tests[sys.argv[1]]()
    except TestFailure as e:
        print("FAIL: %s" % e)
        return 1
    return 0
