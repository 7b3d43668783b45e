"""Elastic-cluster tests (docs/cluster.md): a coordinator and instances as separate processes that
join over the network, and the faults the issue names, each during live streams (greedy and
seeded) whose full outputs must equal moe-generate's, with KV back to zero everywhere afterwards.
`elastic_tests.py --list` names the tests; `elastic_tests.py NAME` runs one."""

import os
import signal
import sys
import threading
import time

import moeserve_pb2 as pb
from cluster import (MODEL, TestFailure, build_dir, check, gen_request, generate, reference, registrar,
                     run_parallel, test_main)
from elastic import ElasticCluster, Proc

TESTS = {}
test = registrar(TESTS)


def workload(n, max_new=240, seed=7, id_lens=(3, 17, 40)):
    """n prompts (text and token ids of id_lens lengths) with long outputs, so that faults land
    mid-stream."""
    import random
    rnd = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "Hello", "world", "serving", "experts", "über", "日本"]
    out = []
    for i in range(n):
        if i % 2:
            out.append({"ids": [rnd.randrange(1000) for _ in range(rnd.choice(id_lens))], "max_new": max_new})
        else:
            out.append({"prompt": " ".join(rnd.choice(words) for _ in range(rnd.choice([2, 6, 15]))),
                        "max_new": max_new})
        if i % 3 == 1:  # seeded sampling: draws depend on (seed, index) only, wherever they happen
            out[-1].update(temperature=0.9, seed=1000 + i)
    return out


def ref_of(w):
    extra = ["--ignore-eos"]
    if "seed" in w:
        extra += ["--temperature", str(w["temperature"]), "--seed", str(w["seed"])]
    return reference(prompt=w.get("prompt"), ids=w.get("ids"), max_new=w["max_new"], extra=extra)


def stream_one(cl, w, counted):
    """One request of a workload, streamed; checks the token indices; returns its token ids.
    counted(n) is called as tokens arrive."""
    kw = {"temperature": w["temperature"], "seed": w["seed"]} if "seed" in w else {}
    req = gen_request(prompt=w.get("prompt"), ids=w.get("ids"), max_new=w["max_new"], ignore_eos=True, **kw)
    ids = []
    for r in cl.stub.Generate(req, timeout=120):
        check(list(r.token_indices) == list(range(len(ids), len(ids) + len(r.token_ids))),
              "token indices %s after %d tokens" % (list(r.token_indices), len(ids)))
        ids += list(r.token_ids)
        counted(len(r.token_ids))
    return ids


class Streams:
    """Runs every request of a workload at once on its own thread; counts tokens as they arrive so
    a test can strike mid-stream; join() returns each stream's token ids. With loop=True each
    thread sends its request again and again until stop(): requests are in flight whenever a
    fault lands, however slow the machine; join() then returns each thread's list of outputs."""

    def __init__(self, cl, work, loop=False):
        self.cl = cl
        self.work = work
        self.loop = loop
        self.stopping = threading.Event()
        self.tokens = 0
        self.lock = threading.Lock()
        self.results = [[] for _ in work]
        self.errors = []
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(len(work))]
        for t in self.threads:
            t.start()

    def _count(self, n):
        with self.lock:
            self.tokens += n

    def _one(self, i):
        try:
            while True:
                self.results[i].append(stream_one(self.cl, self.work[i], self._count))
                if not self.loop or self.stopping.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - reported by join
            self.errors.append((i, e))

    def stop(self):
        """Looping streams: each ends after the request it is in."""
        self.stopping.set()

    def wait_tokens(self, n, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if self.tokens >= n:
                    return
            if self.errors:
                break
            time.sleep(0.005)
        raise TestFailure("only %d tokens streamed (wanted %d); errors: %s" % (self.tokens, n, self.errors[:2]))

    def join(self):
        self.stop()
        for t in self.threads:
            t.join()
        if self.errors:
            i, e = self.errors[0]
            raise TestFailure("stream %d: %s: %s" % (i, type(e).__name__, e))
        return self.results if self.loop else [r[0] for r in self.results]


def check_outputs(work, results, looped=False):
    """Each stream's output (looped: each of its outputs) equals moe-generate's."""
    refs = run_parallel(ref_of, work, workers=4)
    for i, (w, gots, want) in enumerate(zip(work, results, refs)):
        for got in (gots if looped else [gots]):
            check(got == want, "stream %d (%s): %d tokens differ from moe-generate's %d from index %s" % (
                i, w.get("prompt", "ids"), len(got), len(want),
                next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))))


def busiest(cl, pool, timeout=10):
    """The ready instance of pool that runs the most requests, once the load reports show one
    running any: a fault test must hit an instance that has work (reports lag the streams)."""
    deadline = time.time() + timeout
    while True:
        best = None
        for i in cl.status().instances:
            if i.pool == pool and i.state == pb.INSTANCE_STATE_READY and (best is None or i.running > best.running):
                best = i
        check(best is not None, "no ready instance of pool %s" % pool)
        if best.running > 0:
            return best
        check(time.time() < deadline, "no instance of pool %s reports a running request" % pool)
        time.sleep(0.05)


def proc_of(cl, inst):
    """The Proc whose host label names this target (tests label every instance)."""
    for p in cl.instances:
        if p.name == inst.host:
            return p
    raise TestFailure("no process for instance %d (host %r)" % (inst.id, inst.host))


def add(cl, pool, **kw):
    name = "%s%d" % (pool, len(cl.instances))
    return cl.add_instance(pool, host_label=name, **kw)


# Decode steps slowed 2 ms a layer (the layer-delay hook) in the tests that strike a decode
# instance mid-stream: unslowed, the tiny model decoded the whole workload in a fraction of a
# second, and on a fast or loaded host the streams could finish before the fault landed (CI: a
# SIGSTOP after every request had ended was undone by SIGCONT before any heartbeat timeout, so
# nothing was fenced; a 300-token request took ~0.1 s, so a drain found nothing to move).
DECODE_SLOW_ENV = {"MOE_TEST_LAYER_DELAY_MS": "2"}
DECODE_VICTIMS = ("prefill", "decode", "decode")
DECODE_VICTIMS_ENV = {1: DECODE_SLOW_ENV, 2: DECODE_SLOW_ENV}


def strike(cl, pools, work, tokens, victim_pool, act, pool_args=None, pool_env=None):
    """The body of the instance fault tests: one instance per entry of pools (pool_args[i]: its
    flags, pool_env[i]: its environment), the workload streaming, and once `tokens` tokens
    streamed act(proc) on the process of the busiest ready instance of victim_pool. Returns
    (streams, victim proc)."""
    for i, p in enumerate(pools):
        add(cl, p, args=(pool_args or {}).get(i, ()), env=(pool_env or {}).get(i))
    cl.wait_ready(len(pools))
    s = Streams(cl, work)
    s.wait_tokens(tokens)
    victim = proc_of(cl, busiest(cl, victim_pool))
    act(victim)
    return s, victim


def killed(victim):
    victim.kill()
    victim.killed = True


def check_lost_one(cl, work, s, resumed=1):
    """Every stream equals moe-generate, KV is back at zero, one instance was lost, at least
    `resumed` requests went on elsewhere and none failed."""
    check_outputs(work, s.join())
    st = cl.wait_idle()
    k = st.counters
    check(k.instance_losses == 1 and k.requests_resumed >= resumed,
          "losses %d, resumes %d" % (k.instance_losses, k.requests_resumed))
    check(k.requests_failed == 0, "failed: %d" % k.requests_failed)
    return st


@test
def elastic_greedy_matches_moe_generate():
    """1 prefill + 2 decode instances as separate processes; 32 concurrent streams == moe-generate;
    status names each instance's host; stopping drains every process to exit 0."""
    with ElasticCluster() as cl:
        add(cl, "prefill")
        add(cl, "decode")
        add(cl, "decode")
        st = cl.wait_ready(3)
        check(sorted(i.host for i in st.instances) == ["decode1", "decode2", "prefill0"],
              "hosts in status: %s" % [i.host for i in st.instances])
        check(st.counters.instance_joins == 3, "joins: %d" % st.counters.instance_joins)
        work = workload(32, max_new=24)
        s = Streams(cl, work)
        check_outputs(work, s.join())
        cl.wait_idle()
        cl.stop()


@test
def kill9_decode_instance_loses_no_request():
    with ElasticCluster() as cl:
        work = workload(16)
        s, _ = strike(cl, DECODE_VICTIMS, work, 16 * 8, pb.POOL_KIND_DECODE, killed,
                      pool_env=DECODE_VICTIMS_ENV)
        check_lost_one(cl, work, s)
        cl.stop()


@test
def kill9_prefill_instance_loses_no_request():
    """Prefill instances that take 16 prompt tokens a step, each step slowed to ~30 ms by the
    layer-delay hook (the tiny model would otherwise prefill the whole workload in a fraction of
    a second, before the kill), keep a queue of prompts, so the kill lands while one is
    mid-prefill with its KV pushed layer by layer to the decode side (resumed, on the same
    decode instance: a new sequence id) and others wait in the queue or hand their KV off (the
    decode side waits for an offer that died)."""
    with ElasticCluster() as cl:
        slow = ["--batch-tokens", "16", "--max-seqs", "2"]
        slow_env = {"MOE_TEST_LAYER_DELAY_MS": "10"}
        work = workload(16, max_new=16, id_lens=(200, 300))
        s, _ = strike(cl, ("prefill", "prefill", "decode"), work, 4, pb.POOL_KIND_PREFILL, killed,
                      pool_args={0: slow, 1: slow}, pool_env={0: slow_env, 1: slow_env})
        st = check_lost_one(cl, work, s)
        print("requests resumed: %d" % st.counters.requests_resumed)
        cl.stop()


# Instance flags of the cancel storms: prefill chunks small enough that cancels land mid-push,
# and KV timeouts and leases far longer than the storm's wait for zero KV.
STORM_ARGS = ["--batch-tokens", "32", "--kv-timeout-ms", "60000", "--kv-lease-ms", "60000"]
# And each layer slowed by 3 ms (the test hook), so that a 400-token prompt's push lasts 13 steps
# of ~10 ms: unslowed, the tiny model pushed it so fast that on a loaded machine (2 CPU hogs) no
# cancel of cancel_pushes' 0-58 ms sweep landed inside one.
STORM_ENV = {"MOE_TEST_LAYER_DELAY_MS": "3"}


def cancel_pushes(cl, logs, tries=30):
    """Pairs of requests with 400-token prompts: the coordinator sends the second to the prefill
    instance when the first's first token comes back (one long prompt at a time), and the
    client cancels it d ms after that first token, d growing, until a cancel landed while its
    KV was being pushed layer by layer (the decode side logs it at debug level); returns d."""
    import grpc
    mark = "freed while receiving the push of"
    base = logs().count(mark)
    for k in range(tries):
        a = gen_request(ids=[(7 * k + j) % 1000 for j in range(400)], max_new=4, ignore_eos=True)
        b = gen_request(ids=[(11 * k + j) % 1000 for j in range(400)], max_new=4, ignore_eos=True)
        ca = cl.stub.Generate(a, timeout=60)
        cb = cl.stub.Generate(b, timeout=60)
        next(ca)
        time.sleep(0.002 * k)
        cb.cancel()
        for _ in ca:
            pass
        try:
            for _ in cb:
                pass
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.CANCELLED, str(e))
        cl.wait_idle(timeout=20)
        if logs().count(mark) > base:
            return 2 * k
    raise TestFailure("no cancel in %d tries landed during a layer-wise push" % tries)


def cancel_storm(cl, logs):
    """cancel_pushes, then 48 requests with long prompts, each cancelled by its client at a different moment
    (queued, mid-prefill while its KV is pushed layer by layer, mid-transfer, decoding): every
    instance's KV is back at zero well before any timeout or lease could free it (60 s), and no
    transfer counts as failed: a cancelled transfer is not a failure. Then the cluster still
    serves exactly."""
    import random
    import grpc
    work = workload(48, max_new=200, id_lens=(120, 250))
    rnd = random.Random(3)
    afters = [rnd.choice([0, 1, 2, 8]) for _ in work]  # tokens to see before cancelling (0: at once)
    pauses = [rnd.random() * 0.05 for _ in work]
    got = [0] * len(work)

    def one(i):
        w = work[i]
        call = cl.stub.Generate(gen_request(prompt=w.get("prompt"), ids=w.get("ids"), max_new=w["max_new"],
                                            ignore_eos=True), timeout=120)
        if afters[i] == 0:
            time.sleep(pauses[i])
            call.cancel()
            return
        try:
            for r in call:
                got[i] += len(r.token_ids)
                if got[i] >= afters[i]:
                    call.cancel()
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.CANCELLED, "stream %d: %s" % (i, e))

    run_parallel(one, list(range(len(work))), workers=len(work))
    print("a cancel %d ms after the previous first token cut a push short" % cancel_pushes(cl, logs))
    t0 = time.time()
    st = cl.wait_idle(timeout=20)
    print("KV back at zero %.2f s after the last cancel; %d of %d streams saw tokens" % (
        time.time() - t0, sum(1 for g in got if g), len(work)))
    k = st.counters
    check(k.kv_checksum_failures == 0 and k.kv_transfer_timeouts == 0 and k.kv_lease_expirations == 0
          and k.kv_transfer_recomputes == 0,
          "cancels counted as transfer failures: checksum %d, timeouts %d, leases %d, recomputes %d" % (
              k.kv_checksum_failures, k.kv_transfer_timeouts, k.kv_lease_expirations, k.kv_transfer_recomputes))
    work2 = workload(4, max_new=16, seed=4)
    check_outputs(work2, Streams(cl, work2).join())
    cl.wait_idle()


@test
def cancel_storm_frees_kv_at_once_and_counts_no_failure():
    """cancel_storm over the elastic launch (KV over UCX)."""
    with ElasticCluster(env={"MOE_LOG_LEVEL": "debug"}) as cl:
        for p in ("prefill", "decode", "decode"):
            add(cl, p, args=STORM_ARGS, env=STORM_ENV if p == "prefill" else None)
        cl.wait_ready(3)
        cancel_storm(cl, lambda: "".join(p.stderr() for p in cl.instances))
        cl.stop()


@test
def sigstop_decode_is_fenced_then_rejoins():
    """A decode instance stopped past the heartbeat timeout is fenced (its requests go on
    elsewhere); continued, it drops its stale KV, rejoins under a new member id and serves."""
    with ElasticCluster(heartbeat_timeout_ms=1000) as cl:
        work = workload(16)
        s, victim = strike(cl, DECODE_VICTIMS, work, 16 * 8, pb.POOL_KIND_DECODE,
                           lambda v: v.signal(signal.SIGSTOP), pool_env=DECODE_VICTIMS_ENV)
        check_outputs(work, s.join())
        victim.signal(signal.SIGCONT)
        deadline = time.time() + 20
        while time.time() < deadline:
            st = cl.status()
            mine = [i for i in st.instances if i.host == victim.name]
            if sum(1 for i in mine if i.state == pb.INSTANCE_STATE_READY) == 1 and \
                    sum(1 for i in mine if i.state == pb.INSTANCE_STATE_UNREACHABLE) == 1:
                break
            time.sleep(0.1)
        else:
            raise TestFailure("the continued instance did not rejoin:\n%s" % st)
        check(st.counters.instance_losses == 1, "losses %d" % st.counters.instance_losses)
        # It serves again: with the other decode instance drained, new requests must go to it.
        other = [i for i in st.instances if i.pool == pb.POOL_KIND_DECODE and i.host != victim.name
                 and i.state == pb.INSTANCE_STATE_READY][0]
        cl.stub.Drain(pb.DrainRequest(instance=other.id), timeout=5)
        work2 = workload(4, max_new=16, seed=9)
        check_outputs(work2, Streams(cl, work2).join())
        cl.wait_idle()
        cl.stop()


@test
def long_engine_step_keeps_its_heartbeat():
    """A prefill instance whose every engine step lasts ~2.4 s (a test hook sleeps 800 ms in each
    of the model's 3 layers), well past the 1.5 s heartbeat timeout: it keeps heartbeating from
    between layers, so nothing is fenced or resumed, and the outputs equal moe-generate's."""
    with ElasticCluster(heartbeat_timeout_ms=1500) as cl:
        add(cl, "prefill", env={"MOE_TEST_LAYER_DELAY_MS": "800"})
        add(cl, "decode")
        cl.wait_ready(2)
        work = workload(4, max_new=8)
        t0 = time.time()
        got = Streams(cl, work).join()
        took = time.time() - t0
        check_outputs(work, got)
        st = cl.wait_idle()
        check(took > 2.4, "the slow prefill step took only %.1f s: the hook did not slow it" % took)
        check(st.counters.instance_losses == 0 and st.counters.requests_resumed == 0,
              "a healthy instance in a long step was fenced: %d lost, %d resumed" % (
                  st.counters.instance_losses, st.counters.requests_resumed))
        print("4 requests through a prefill instance with %.1f s of steps: nothing fenced" % took)
        cl.stop()


@test
def stalled_coordinator_loses_nothing():
    """SIGSTOP of the coordinator for 12 s (longer than the heartbeat timeout), then SIGCONT:
    no instance is fenced, every stream completes exactly."""
    with ElasticCluster(heartbeat_timeout_ms=1500) as cl:
        for p in ("prefill", "decode"):
            add(cl, p)
        cl.wait_ready(2)
        work = workload(8, max_new=200)
        s = Streams(cl, work)
        s.wait_tokens(8 * 4)
        cl.coord.signal(signal.SIGSTOP)
        time.sleep(12)
        cl.coord.signal(signal.SIGCONT)
        check_outputs(work, s.join())
        st = cl.wait_idle()
        check(st.counters.instance_losses == 0, "instances lost: %d" % st.counters.instance_losses)
        cl.stop()


@test
def sigterm_instance_drains_by_migration_and_exits_0():
    with ElasticCluster() as cl:
        work = workload(12, max_new=440)  # near the 512 context: the drain must find requests to move
        s, victim = strike(cl, DECODE_VICTIMS, work, 12 * 8, pb.POOL_KIND_DECODE,
                           lambda v: v.signal(signal.SIGTERM), pool_env=DECODE_VICTIMS_ENV)
        check(victim.wait(60) == 0, "the leaving instance exited %s" % victim.proc.returncode)
        check_outputs(work, s.join())
        st = cl.wait_idle()
        check(st.counters.migrations >= 1, "nothing migrated: %s" % st.counters)
        check(st.counters.requests_resumed == 0, "requests were resumed, not migrated: %s" % st.counters)
        cl.stop()


@test
def decode_instance_joined_under_load_takes_requests():
    with ElasticCluster() as cl:
        for p in ("prefill", "decode"):
            add(cl, p)
        cl.wait_ready(2)
        work = workload(16, max_new=120)
        s = Streams(cl, work)
        s.wait_tokens(16)
        t0 = time.time()
        late = add(cl, "decode")
        cl.wait_ready(3)
        joined_s = time.time() - t0
        work2 = workload(8, max_new=24, seed=11)
        s2 = Streams(cl, work2)
        check_outputs(work, s.join())
        check_outputs(work2, s2.join())
        st = cl.wait_idle()
        mine = [i for i in st.instances if i.host == late.name][0]
        check(mine.kv_blocks_total > 0, "the late instance reports no KV")
        print("joined and ready in %.2f s" % joined_s)
        # It took requests: its expert load counters moved.
        check(sum(mine.expert_tokens) > 0, "the late instance computed nothing")
        cl.stop()


@test
def join_without_token_is_refused():
    with ElasticCluster() as cl:
        add(cl, "mixed")
        cl.wait_ready(1)
        bad = add(cl, "mixed", env={"MOESERVE_CLUSTER_TOKEN": "not-the-cluster-token-at-all"})
        rc = bad.wait(30)
        bad.killed = True  # its exit is the point: stop() must not hold it against the cluster
        check(rc not in (0, None), "a wrong token was accepted (exit %s)" % rc)
        check("refused" in bad.stderr() or "permission" in bad.stderr().lower(),
              "the refused instance does not say why:\n" + bad.stderr()[-2000:])
        check("refused" in cl.coord.stderr(), "the coordinator did not log the refusal")
        st = cl.status()
        check(len(st.instances) == 1, "the refused instance is listed: %s" % st)
        cl.stop()


@test
def coordinator_restart_instances_rejoin():
    """The coordinator dies; a new one on the same address takes the instances back (they rejoin
    by themselves) and serves."""
    with ElasticCluster() as cl:
        for p in ("prefill", "decode"):
            add(cl, p)
        cl.wait_ready(2)
        old = cl.coord
        port = cl.cluster_port
        old.kill()
        old.close(False)
        cl.start_coordinator(cluster_port=port)
        cl.wait_ready(2, timeout=30)
        work = workload(6, max_new=16, seed=5)
        check_outputs(work, Streams(cl, work).join())
        cl.wait_idle()
        cl.stop()


@test
def kill9_one_rank_of_ep2_instance():
    """An expert-parallel decode instance (mpirun -np 2) loses one rank: the whole instance is
    lost, its requests go on on the other decode instance."""
    with ElasticCluster() as cl:
        add(cl, "prefill")
        ep = add(cl, "decode", ep=2)
        add(cl, "decode")
        cl.wait_ready(4)
        work = workload(16)
        s = Streams(cl, work)
        s.wait_tokens(16 * 8)
        import subprocess
        ranks = subprocess.run(["pgrep", "-P", str(ep.proc.pid)], capture_output=True, text=True).stdout.split()
        check(len(ranks) >= 1, "no rank processes under mpirun %d" % ep.proc.pid)
        os.kill(int(ranks[0]), signal.SIGKILL)
        ep.killed = True
        check_outputs(work, s.join())
        st = cl.wait_idle()
        lost = [i for i in st.instances if i.host == ep.name and i.state == pb.INSTANCE_STATE_UNREACHABLE]
        check(len(lost) == 2, "both ranks of the EP instance should be lost: %s" % st)
        ep.wait(30)
        cl.stop()


def signal_mpirun_of_ep2_instance(sig, sigkill_timeout_s=4):
    """Signals the mpirun of an EP-2 decode instance (not its process group: what a supervisor
    does) while streams run, again and again, so that requests are in flight on it when the
    signal reaches its ranks however late that is; both ranks ask to leave, their requests
    migrate to the other decode instance and every rank exits 0 (no SIGKILL). Returns mpirun's
    exit status."""
    with ElasticCluster() as cl:
        add(cl, "prefill")
        ep = add(cl, "decode", ep=2, sigkill_timeout_s=sigkill_timeout_s, env=DECODE_SLOW_ENV)
        add(cl, "decode", env=DECODE_SLOW_ENV)
        cl.wait_ready(4)
        # Long enough that a request placed on it is still running when the drain moves it.
        work = workload(8, max_new=300)
        s = Streams(cl, work, loop=True)
        s.wait_tokens(len(work) * 8)
        t0 = time.time()
        os.kill(ep.proc.pid, sig)
        # The coordinator's log, not the ranks': mpirun holds their output back once told to
        # terminate, and (Open MPI 4.1.4) exits only about 2 x odls_base_sigkill_timeout after
        # the SIGTERM even when its ranks exited long before.
        deadline = t0 + sigkill_timeout_s + 60
        while cl.coord.stderr().count("leaves (signalled)") < 2 and time.time() < deadline and ep.proc.poll() is None:
            time.sleep(0.05)
        print("the ranks heard the signal after %.1f s" % (time.time() - t0))
        s.stop()
        rc = ep.wait(2 * sigkill_timeout_s + 60)
        print("mpirun exited %s after %.1f s" % (rc, time.time() - t0))
        ep.killed = True  # its status is checked by the caller
        check_outputs(work, s.join(), looped=True)
        log = ep.stderr() + ep.stdout()
        check(log.count("leaving: asked the coordinator to drain") == 2, "both ranks should leave:\n" + log[-3000:])
        check("signal 9" not in log and "Killed" not in log, "a rank was killed:\n" + log[-3000:])
        st = cl.wait_idle()
        check(st.counters.requests_resumed == 0 and st.counters.requests_failed == 0, str(st.counters))
        check(st.counters.migrations >= 1, "nothing migrated: %s" % st.counters)
        cl.stop()
        return rc


@test
def sigusr1_to_mpirun_drains_ep2_instance():
    """mpirun forwards SIGUSR1 to its ranks at once: the instance drains and mpirun exits 0."""
    rc = signal_mpirun_of_ep2_instance(signal.SIGUSR1)
    check(rc == 0, "mpirun exited %s" % rc)


@test
def sigterm_to_mpirun_drains_ep2_instance():
    """SIGTERM to mpirun reaches the ranks odls_base_sigkill_timeout s (the launcher's setting,
    10 here) later, with as long again before SIGKILL: they drain in that window and exit 0
    (mpirun itself reports 1, as Open MPI does for any job it was told to terminate)."""
    rc = signal_mpirun_of_ep2_instance(signal.SIGTERM, sigkill_timeout_s=10)
    check(rc in (0, 1), "mpirun exited %s" % rc)


if __name__ == "__main__":
    sys.exit(test_main(TESTS, "elastic_tests.py"))
