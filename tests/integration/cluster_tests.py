"""The mpirun cluster tests: `cluster_tests.py --list` names them, `cluster_tests.py NAME` runs one
(exit 0 = pass). run.sh runs each in its own process with a time limit."""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc

import health_pb2
from cluster import (MODEL, Cluster, TestFailure, build_dir, check, gen_request, generate, mixed_workload,
                     reference, registrar, run_parallel, small_model, test_main)
import moeserve_pb2 as pb

TESTS = {}


test = registrar(TESTS)


def references(reqs):
    return [reference(prompt=r.get("prompt"), ids=r.get("ids"), max_new=r["max_new"]) for r in reqs]


def run_workload(c, reqs, **kw):
    def one(r):
        ids, _, last = generate(c.stub, gen_request(prompt=r.get("prompt"), ids=r.get("ids"), max_new=r["max_new"], **kw))
        return ids, last
    return run_parallel(one, reqs)


def compare(reqs, got, refs):
    for i, ((ids, last), ref) in enumerate(zip(got, refs)):
        check(ids == ref, "request %d (%s): cluster %s != moe-generate %s" % (i, reqs[i], ids, ref))
        check(last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS),
              "request %d finished with %s" % (i, last.finish_reason))
        check(last.usage.completion_tokens == len(ids), "request %d usage %s" % (i, last.usage))


def stop_ok(c):
    rc = c.stop()
    check(rc == 0, "mpirun exited %s after the drain:\n%s" % (rc, c.stderr()[-3000:]))


@test
def disaggregated_greedy_matches_moe_generate():
    """1 prefill + 1 decode, 36 concurrent streams of mixed lengths, chunked prefill: outputs equal
    moe-generate's, every multi-token request went through a KV pull, KV back to zero."""
    reqs = mixed_workload(36)
    refs = references(reqs)
    with Cluster(np=3, args=["--batch-tokens", "64"]) as c:
        t0 = time.time()
        got = run_workload(c, reqs)
        dt = time.time() - t0
        compare(reqs, got, refs)
        pulled = sum(1 for ids, last in got if len(ids) > 1)
        st = c.wait_counters(lambda k: k.kv_transfers >= pulled)
        check(st.counters.kv_transfer_bytes > 0 and st.counters.kv_checksum_failures == 0, str(st.counters))
        # the default --kv-transfer layer: with room on the decode side, KV leaves layer by layer
        check(st.counters.kv_transfers_layerwise > 0 and st.counters.kv_transfer_recomputes == 0, str(st.counters))
        c.wait_idle()
        print("36 streams in %.2f s, %d KV transfers (%d layer by layer), %d bytes" % (
            dt, st.counters.kv_transfers, st.counters.kv_transfers_layerwise, st.counters.kv_transfer_bytes))
        stop_ok(c)


@test
def block_transfer_greedy_matches_moe_generate():
    """--kv-transfer block (whole blocks pulled after the prefill, no layer push): the same outputs,
    no layer-by-layer transfer, KV back to zero."""
    reqs = mixed_workload(24, seed=99)
    refs = references(reqs)
    with Cluster(np=3, args=["--batch-tokens", "64", "--kv-transfer", "block"]) as c:
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        pulled = sum(1 for ids, last in got if len(ids) > 1)
        st = c.wait_counters(lambda k: k.kv_transfers >= pulled)
        check(st.counters.kv_transfers_layerwise == 0 and st.counters.kv_transfer_recomputes == 0, str(st.counters))
        c.wait_idle()
        stop_ok(c)


@test
def seeded_sampling_matches_moe_generate():
    """Seeded sampling (temperature 0.8, top-p 0.9) through the disaggregated cluster, with the KV
    pushed layer by layer and pulled as whole blocks: the sampler state moves with the KV, so the
    tokens equal moe-generate's with the same seed."""
    reqs = [{"ids": [7 + i, 100 + 3 * i, 42, 5 * i + 1] * (1 + i % 5), "max_new": 12 + 7 * (i % 4),
             "seed": 1000 + i} for i in range(12)]
    refs = [reference(ids=r["ids"], max_new=r["max_new"],
                      extra=["--temperature", "0.8", "--top-p", "0.9", "--seed", str(r["seed"])]) for r in reqs]
    for mode in ("layer", "block"):
        with Cluster(np=3, args=["--batch-tokens", "32", "--kv-transfer", mode]) as c:
            def one(r):
                return generate(c.stub, gen_request(ids=r["ids"], max_new=r["max_new"], temperature=0.8,
                                                    top_p=0.9, seed=r["seed"]))[0]
            got = run_parallel(one, reqs)
            for i, (ids, ref) in enumerate(zip(got, refs)):
                check(ids == ref, "%s: request %d: cluster %s != moe-generate %s" % (mode, i, ids, ref))
            st = c.wait_counters(lambda k: k.kv_transfers >= len(reqs))
            check((st.counters.kv_transfers_layerwise > 0) == (mode == "layer"), "%s: %s" % (mode, st.counters))
            c.wait_idle()
            stop_ok(c)


@test
def colocated_greedy_matches_moe_generate():
    """--colocated with two mixed instances, 36 concurrent streams: outputs equal moe-generate's."""
    reqs = mixed_workload(36, seed=99)
    refs = references(reqs)
    with Cluster(np=3, args=["--colocated", "--batch-tokens", "64"]) as c:
        st = c.status()
        check([i.pool for i in st.instances] == [pb.POOL_KIND_MIXED] * 2, str(st.instances))
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        st = c.wait_idle()
        check(st.counters.kv_transfers == 0, "colocated layout moved KV: %s" % st.counters)
        stop_ok(c)


@test
def two_prefill_two_decode():
    """2 prefill + 2 decode instances: requests spread over both pools, outputs still exact."""
    reqs = mixed_workload(24, seed=7)
    refs = references(reqs)
    with Cluster(np=5, args=["--prefill-instances", "2", "--decode-instances", "2"]) as c:
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        st = c.wait_idle()
        check(len(st.instances) == 4, str(st.instances))
        stop_ok(c)


@test
def expert_parallel_pools_match_moe_generate():
    """Expert parallelism: a prefill instance of 2 ranks and a decode instance of 2 ranks (each
    rank maps half of the experts, tokens cross ranks in every MoE layer, attention stays per
    rank), 24 concurrent streams: outputs equal single-process moe-generate's."""
    reqs = mixed_workload(24, seed=11)
    refs = references(reqs)
    with Cluster(np=5, args=["--prefill-ep", "2", "--decode-ep", "2", "--batch-tokens", "64"]) as c:
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        st = c.wait_idle()
        check(len(st.instances) == 4, "every rank schedules its own sequences: %s" % st.instances)
        check(st.moe_layers > 0 and st.moe_experts == 8, "expert stats shape %d x %d" % (st.moe_layers, st.moe_experts))
        want = {1: ([1, 2], 0, 4), 2: ([1, 2], 4, 8), 3: ([3, 4], 0, 4), 4: ([3, 4], 4, 8)}
        for inst in st.instances:
            group, lo, hi = want[inst.ranks[0]]
            check(list(inst.ep_group_ranks) == group and (inst.expert_begin, inst.expert_end) == (lo, hi),
                  "placement of rank %d: %s" % (inst.ranks[0], inst))
        # Expert load statistics arrive with the heartbeats: every rank computed rows, only for its experts.
        deadline = time.time() + 10
        while time.time() < deadline:
            st = c.status()
            if all(sum(i.expert_tokens) > 0 for i in st.instances):
                break
            time.sleep(0.2)
        for inst in st.instances:
            E = st.moe_experts
            rows = [sum(inst.expert_tokens[l * E + e] for l in range(st.moe_layers)) for e in range(E)]
            check(sum(rows) > 0, "rank %d reported no expert rows: %s" % (inst.ranks[0], rows))
            check(all(rows[e] == 0 for e in range(E) if not inst.expert_begin <= e < inst.expert_end),
                  "rank %d computed experts it does not hold: %s" % (inst.ranks[0], rows))
        log = c.stderr()
        for r, pos, rng in ((1, 0, "[0, 4)"), (2, 1, "[4, 8)"), (3, 0, "[0, 4)"), (4, 1, "[4, 8)")):
            line = "rank %d: expert parallel %d/2, experts %s" % (r, pos, rng)
            check(line in log, "missing from the log: %s" % line)
        stop_ok(c)


@test
def eplb_replicas_keep_outputs_exact():
    """EPLB in a running cluster: one colocated instance of 2 ranks re-plans every 4 steps, placing
    2 replicas of the hottest experts from the routed loads (each rank binds its replicas from the
    mmaps and tokens go to the least loaded holder); outputs stay equal to moe-generate's."""
    reqs = mixed_workload(16, seed=21)
    refs = references(reqs)
    with Cluster(np=3, args=["--colocated", "--ep-size", "2", "--redundant-experts", "2", "--eplb-interval", "4",
                             "--batch-tokens", "64"]) as c:
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        c.wait_idle()
        log = c.stderr()
        check("EPLB: 2 replicas placed" in log, "no EPLB re-plan in the log:\n%s" % log[-2000:])
        stop_ok(c)


def long_request(**kw):
    return gen_request(ids=[5, 6, 7, 8, 9, 10, 11, 12], max_new=480, ignore_eos=True, **kw)


@test
def preemptions_are_counted_and_outputs_exact():
    """Colocated instances with 12 KV blocks each and requests that each fit but together outgrow
    it: the engines preempt (recompute), ClusterStatus counts it, outputs stay exact, KV ends at 0."""
    reqs = [{"ids": [(i * 53 + k) % 1000 for k in range(8)], "max_new": 100} for i in range(8)]
    refs = [reference(ids=r["ids"], max_new=100, extra=["--ignore-eos"]) for r in reqs]
    with Cluster(np=3, args=["--colocated", "--kv-blocks", "12", "--migration", "off"]) as c:
        got = run_parallel(lambda r: generate(c.stub, gen_request(ids=r["ids"], max_new=100, ignore_eos=True))[0],
                           reqs)
        for i, (ids, ref) in enumerate(zip(got, refs)):
            check(ids == ref, "request %d: cluster %s != moe-generate %s" % (i, ids, ref))
        st = c.wait_counters(lambda k: k.preemptions > 0)
        check(st.counters.preemptions > 0, "no preemption counted: %s" % st.counters)
        c.wait_idle()
        stop_ok(c)


@test
def full_decode_pool_slows_prefill_instead_of_failing():
    """A KV cache of 40 blocks per instance and 20 requests needing 10 blocks each: offers wait for
    room on the decode rank (the prefill rank holds their KV meanwhile), nothing fails, outputs are
    exact and the KV ends at zero."""
    # 100 new tokens: 10 blocks a request, 4 at a time on the decode rank, for long enough that the
    # status poll sees offers waiting even on a quick, quiet machine (40 tokens missed it there).
    reqs = [{"ids": [(i * 37 + k) % 1000 for k in range(60)], "max_new": 100} for i in range(20)]
    refs = [reference(ids=r["ids"], max_new=100, extra=["--ignore-eos"]) for r in reqs]
    with Cluster(np=3, args=["--kv-blocks", "40"]) as c:
        seen = {"waiting": 0, "parked": 0}
        done = threading.Event()

        def monitor():
            while not done.is_set():
                for i in c.status().instances:
                    if i.pool == pb.POOL_KIND_DECODE:
                        seen["waiting"] = max(seen["waiting"], i.waiting)
                    else:
                        seen["parked"] = max(seen["parked"], i.kv_blocks_used)
                time.sleep(0.005)
        mon = threading.Thread(target=monitor)
        mon.start()
        try:
            got = run_parallel(lambda r: generate(c.stub, gen_request(ids=r["ids"], max_new=100, ignore_eos=True))[0],
                               reqs)
        finally:
            done.set()
            mon.join()
        for i, (g, ref) in enumerate(zip(got, refs)):
            check(g == ref, "request %d: %s vs %s" % (i, g, ref))
        st = c.wait_idle()
        # The decode rank counts every offer that had to wait for room: exact, whatever a status
        # poll happened to see (the gauges are printed for the record).
        check(st.counters.kv_pulls_waited > 0, "no offer ever waited for room on the decode rank: %s" % st.counters)
        print("%d hand-offs waited for room on the decode rank (most seen waiting at once: %d); most blocks "
              "held by the prefill rank: %d" % (st.counters.kv_pulls_waited, seen["waiting"], seen["parked"]))
        check(st.counters.kv_transfers >= 20 and st.counters.kv_transfer_recomputes == 0, str(st.counters))
        stop_ok(c)


@test
def cancel_disconnect_deadline_free_kv():
    """Cancel mid-stream, client disconnect and an expired deadline each free the KV on every rank;
    the other streams are unaffected."""
    model = small_model()
    refs = [reference(ids=[100 + i, 3, 4], max_new=30, model=model) for i in range(6)]
    with Cluster(np=3, model=model, args=["--kv-blocks", "256"]) as c:
        background = [gen_request(ids=[100 + i, 3, 4], max_new=30) for i in range(6)]
        outcome = {}

        def cancel_after(n):
            call = c.stub.Generate(long_request(), timeout=60)
            got = 0
            try:
                for r in call:
                    got += len(r.token_ids)
                    if got >= n:
                        call.cancel()
            except grpc.RpcError as e:
                return e.code()
            return "finished"

        def disconnect_after(n):
            ch = grpc.insecure_channel("127.0.0.1:%d" % c.port)
            from moeserve_pb2_grpc import MoeserveStub
            it = MoeserveStub(ch).Generate(long_request(), timeout=60)
            got = 0
            for r in it:
                got += len(r.token_ids)
                if got >= n:
                    break
            ch.close()  # the client goes away without a cancel of its own
            return "closed"

        def deadline():
            try:
                for _ in c.stub.Generate(long_request(), timeout=0.5):
                    pass
            except grpc.RpcError as e:
                return e.code()
            return "finished"

        def bg(i):
            ids, _, _ = generate(c.stub, background[i])
            return ids

        jobs = [lambda: cancel_after(3), lambda: cancel_after(20), lambda: disconnect_after(3),
                lambda: disconnect_after(15), deadline, deadline] + [lambda i=i: bg(i) for i in range(6)]
        res = run_parallel(lambda f: f(), jobs)
        outcome = res[:6]
        check(outcome[0] == grpc.StatusCode.CANCELLED and outcome[1] == grpc.StatusCode.CANCELLED, str(outcome))
        check(outcome[4] == grpc.StatusCode.DEADLINE_EXCEEDED and outcome[5] == grpc.StatusCode.DEADLINE_EXCEEDED,
              str(outcome))
        check(res[6:] == refs, "background streams differ: %s vs %s" % (res[6:], refs))
        st = c.wait_idle()
        check(st.counters.requests_cancelled >= 6, "cancel counter: %s" % st.counters)
        for i in st.instances:
            check(i.kv_blocks_used == 0, "instance %d still holds %d blocks" % (i.id, i.kv_blocks_used))
        stop_ok(c)


@test
def cancel_storm_frees_kv_at_once_over_mpi():
    """elastic_tests.cancel_storm over the mpirun launch (KV over MPI): KV back at zero at once,
    no transfer counted as failed."""
    from elastic_tests import STORM_ARGS, STORM_ENV, cancel_storm
    with Cluster(np=4, args=STORM_ARGS, env=dict(STORM_ENV, MOE_LOG_LEVEL="debug")) as c:
        cancel_storm(c, c.stderr)
        stop_ok(c)


@test
def cancel_while_parked_frees_prefill_kv():
    """Cancel requests whose KV is parked on the prefill instance (the decode side delays its pull):
    the prefill KV is freed and no offer is pulled later."""
    with Cluster(np=3, env={"MOE_TEST_PULL_DELAY_MS": "1500"}) as c:
        calls = [c.stub.Generate(gen_request(ids=[1, 2, 3] * 20, max_new=50), timeout=30) for _ in range(4)]
        firsts = [next(call) for call in calls]  # first token: parked on the prefill rank now
        check(all(len(f.token_ids) == 1 for f in firsts), str(firsts))
        st = c.status()
        pre = [i for i in st.instances if i.pool == pb.POOL_KIND_PREFILL][0]
        check(pre.kv_blocks_used > 0, "nothing parked on the prefill instance: %s" % st.instances)
        for call in calls:
            call.cancel()
        st = c.wait_idle(timeout=5)
        check(st.counters.kv_transfers == 0, "a cancelled sequence was pulled: %s" % st.counters)
        time.sleep(2.0)  # past the pull delay: the decode side must not import anything now
        st = c.wait_idle(timeout=3)
        stop_ok(c)


@test
def bad_requests_are_invalid_argument():
    """Bad requests get INVALID_ARGUMENT naming the field; a stream running meanwhile is unaffected."""
    with Cluster(np=2) as c:
        ref = reference(ids=[9, 8, 7], max_new=200)
        bg = {}
        t = threading.Thread(target=lambda: bg.setdefault("r", generate(c.stub, gen_request(ids=[9, 8, 7], max_new=200))))
        t.start()
        cases = [
            ("empty prompt", gen_request(prompt=""), "prompt"),
            ("no prompt", pb.GenerateRequest(max_new_tokens=4), "prompt"),
            ("unknown token id", gen_request(ids=[1, 2, 1000]), "token_ids"),
            ("prompt over the context", gen_request(ids=[1] * 600), "prompt"),
            ("max tokens over the limit", gen_request(ids=[1, 2], max_new=100000), "max_new_tokens"),
            ("negative temperature", gen_request(ids=[1, 2], temperature=-1.0), "temperature"),
            ("top_p zero", gen_request(ids=[1, 2], top_p=0.0), "top_p"),
            ("top_p above one", gen_request(ids=[1, 2], top_p=1.5), "top_p"),
            ("oversized message", gen_request(prompt="x" * (4 * 1024 * 1024 + 1000)), "")]
        for name, req, field in cases:
            try:
                generate(c.stub, req, timeout=10)
                raise TestFailure("%s: accepted" % name)
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "%s: %s %s" % (name, e.code(), e.details()))
                check(field in e.details(), "%s: message %r does not name %s" % (name, e.details(), field))
        t.join()
        check(bg["r"][0] == ref, "background stream changed: %s vs %s" % (bg["r"][0], ref))
        check(c.serving(), "not SERVING after bad requests")
        c.wait_idle()
        stop_ok(c)


@test
def queue_full_is_resource_exhausted():
    """With --max-requests 4 --max-queue 2, a burst of 16 gets RESOURCE_EXHAUSTED for the excess;
    the admitted ones finish exactly, and the server serves again afterwards."""
    model = small_model()  # slow enough that the admitted four are still running at the burst's end
    ref = reference(ids=[4, 5, 6], max_new=60, model=model, extra=["--ignore-eos"])
    with Cluster(np=2, model=model, args=["--max-requests", "4", "--max-queue", "2"]) as c:
        def one(_):
            try:
                return generate(c.stub, gen_request(ids=[4, 5, 6], max_new=60, ignore_eos=True))[0]
            except grpc.RpcError as e:
                return (e.code(), e.details())
        res = run_parallel(one, list(range(16)))
        full = [r for r in res if isinstance(r, tuple)]
        ok = [r for r in res if not isinstance(r, tuple)]
        check(full and all(r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED for r in full), str(full[:3]))
        check(ok and all(r == ref for r in ok), "admitted outputs differ")
        check(len(ok) >= 4, "only %d admitted" % len(ok))
        check(generate(c.stub, gen_request(ids=[4, 5, 6], max_new=60, ignore_eos=True))[0] == ref,
              "not serving afterwards")
        c.wait_idle()
        print("%d admitted, %d RESOURCE_EXHAUSTED (e.g. %r)" % (len(ok), len(full), full[0][1]))
        stop_ok(c)


def corrupt_test(mode, want):
    reqs = mixed_workload(10, seed=5)
    refs = references(reqs)
    with Cluster(np=3, env={"MOE_TEST_CORRUPT_KV": mode}) as c:
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        pulled = sum(1 for ids, _ in got if len(ids) > 1)
        st = c.wait_counters(lambda k: want(k, pulled))
        c.wait_idle()
        print("counters: transfers %d, checksum failures %d, retries %d, recomputes %d" % (
            st.counters.kv_transfers, st.counters.kv_checksum_failures, st.counters.kv_transfer_retries,
            st.counters.kv_transfer_recomputes))
        stop_ok(c)


@test
def corrupted_block_is_retried():
    """MOE_TEST_CORRUPT_KV=1: every first attempt carries a flipped bit; the checksum catches it, the
    retry succeeds, outputs are exact."""
    corrupt_test("1", lambda k, n: k.kv_checksum_failures >= n and k.kv_transfer_retries >= n
                 and k.kv_transfers >= n and k.kv_transfer_recomputes == 0)


@test
def corrupted_block_twice_is_recomputed():
    """MOE_TEST_CORRUPT_KV=all: both attempts fail; the decode side recomputes, outputs are exact."""
    corrupt_test("all", lambda k, n: k.kv_checksum_failures >= 2 * n and k.kv_transfer_recomputes >= n)


@test
def lease_expires_when_nobody_pulls():
    """The decode side does not pull for 1 s (test hook) while the lease is 250 ms: the prefill side
    frees the KV, the decode side recomputes, outputs are exact and KV ends at zero."""
    reqs = mixed_workload(6, seed=11)
    refs = references(reqs)
    with Cluster(np=3, args=["--kv-lease-ms", "250"], env={"MOE_TEST_PULL_DELAY_MS": "1000"}) as c:
        got = run_workload(c, reqs)
        compare(reqs, got, refs)
        pulled = sum(1 for ids, _ in got if len(ids) > 1)
        c.wait_counters(lambda k: k.kv_lease_expirations >= pulled and k.kv_transfer_recomputes >= pulled)
        c.wait_idle()
        stop_ok(c)


@test
def hung_rank_becomes_unavailable():
    """A mixed instance hangs (test hook): its requests fail UNAVAILABLE within seconds, Health
    turns NOT_SERVING, ClusterStatus shows it UNREACHABLE, the other instance keeps serving."""
    env = {"MOE_TEST_HANG_RANK": "2", "MOE_TEST_HANG_AFTER": "1"}
    with Cluster(np=3, args=["--colocated", "--heartbeat-timeout-ms", "1000"], env=env) as c:
        def one(_):
            t0 = time.time()
            try:
                ids = generate(c.stub, long_request(), timeout=30)[0]
                return ("ok", len(ids), time.time() - t0)
            except grpc.RpcError as e:
                return (e.code(), e.details(), time.time() - t0)
        res = run_parallel(one, list(range(4)))
        failed = [r for r in res if r[0] != "ok"]
        check(failed, "no request was placed on the hung rank: %s" % res)
        for r in failed:
            check(r[0] == grpc.StatusCode.UNAVAILABLE and "rank 2" in r[1] and r[2] < 8, str(r))
        check(all(r[1] == 480 for r in res if r[0] == "ok"), str(res))
        st = c.status()
        states = {i.ranks[0]: i.state for i in st.instances}
        check(states[2] == pb.INSTANCE_STATE_UNREACHABLE and states[1] == pb.INSTANCE_STATE_READY, str(states))
        check(not c.serving(), "Health still SERVING with a rank lost")
        ids = generate(c.stub, gen_request(ids=[4, 5], max_new=10))[0]
        check(ids == reference(ids=[4, 5], max_new=10), "the healthy instance gives wrong output")
        print("failed in %.2f s: %s" % (max(r[2] for r in failed), failed[0][1]))
        c.kill()  # the hung rank never exits by itself


@test
def hung_decode_rank_unavailable():
    """Disaggregated: the decode rank hangs on its first offer; the request fails UNAVAILABLE within
    seconds and new requests are refused UNAVAILABLE (no decode instance left)."""
    env = {"MOE_TEST_HANG_RANK": "2", "MOE_TEST_HANG_AFTER": "1"}
    with Cluster(np=3, args=["--heartbeat-timeout-ms", "1000"], env=env) as c:
        t0 = time.time()
        try:
            generate(c.stub, long_request(), timeout=30)
            raise TestFailure("finished on a hung decode rank")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAVAILABLE and time.time() - t0 < 8, "%s %s" % (e.code(), e.details()))
        try:
            generate(c.stub, gen_request(ids=[1, 2], max_new=3), timeout=10)
            raise TestFailure("accepted with no decode instance")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAVAILABLE, "%s %s" % (e.code(), e.details()))
        # the prefill instance freed what it held for the lost decode rank
        deadline = time.time() + 5
        while time.time() < deadline:
            pre = [i for i in c.status().instances if i.pool == pb.POOL_KIND_PREFILL][0]
            if pre.kv_blocks_used == 0:
                break
            time.sleep(0.05)
        check(pre.kv_blocks_used == 0, "prefill still holds %d blocks" % pre.kv_blocks_used)
        c.kill()


@test
def hung_prefill_rank_mid_transfer_is_recomputed():
    """The prefill rank hangs while a request's KV waits to be pulled (the decode side delays its
    pull): both pull attempts time out, the decode side recomputes and the request still finishes
    exactly; the next request, which needs the hung prefill rank, fails UNAVAILABLE."""
    env = {"MOE_TEST_HANG_RANK": "1", "MOE_TEST_HANG_AFTER": "2", "MOE_TEST_PULL_DELAY_MS": "800"}
    ref = reference(ids=[7, 8, 9, 10], max_new=30)
    with Cluster(np=3, args=["--heartbeat-timeout-ms", "1000", "--kv-timeout-ms", "300"], env=env) as c:
        call = c.stub.Generate(gen_request(ids=[7, 8, 9, 10], max_new=30), timeout=30)
        first = next(call)  # token 0 came from the prefill rank; its KV is parked there now
        t0 = time.time()
        try:
            generate(c.stub, gen_request(ids=[1, 2, 3], max_new=5), timeout=30)
            raise TestFailure("a request finished on the hung prefill rank")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAVAILABLE and "rank 1" in e.details() and time.time() - t0 < 8,
                  "%s %s" % (e.code(), e.details()))
        ids = list(first.token_ids)
        for r in call:
            ids += list(r.token_ids)
        check(ids == ref, "after the recompute: %s vs %s" % (ids, ref))
        st = c.wait_counters(lambda k: k.kv_transfer_timeouts >= 2 and k.kv_transfer_recomputes >= 1)
        check(st.counters.kv_transfers == 0, str(st.counters))
        c.kill()


@test
def spare_rank_waits_and_exits_0():
    """-np 4 with 1 prefill + 1 decode leaves rank 3 idle: it serves nothing and exits 0 at drain."""
    with Cluster(np=4, args=["--prefill-instances", "1", "--decode-instances", "1"]) as c:
        check(len(c.status().instances) == 2, "spare rank became an instance")
        check("1 rank(s) beyond the layout stay idle" in c.stderr(), "no notice about the spare rank")
        check(generate(c.stub, gen_request(ids=[3, 4], max_new=8))[0] == reference(ids=[3, 4], max_new=8),
              "wrong output")
        stop_ok(c)


def drain_test(**stop_kw):
    model = small_model()  # ~10 ms per token: the streams are surely mid-way at the signal
    prompts = [[20, 21, 22], [30, 31, 32, 33]]
    reqs = [{"ids": prompts[i % 2], "max_new": 60} for i in range(8)]
    refs = {tuple(p): reference(ids=p, max_new=60, model=model, extra=["--ignore-eos"]) for p in prompts}
    # a generous drain timeout: sanitizer builds run this model ~10x slower
    with Cluster(np=3, model=model, args=["--drain-timeout-s", "100"]) as c:
        results, finished_at = {}, {}

        def one(i):
            r = reqs[i]
            try:
                results[i] = generate(c.stub, gen_request(ids=r["ids"], max_new=r["max_new"], ignore_eos=True))[0]
            except grpc.RpcError as e:
                results[i] = (e.code(), e.details())
            finished_at[i] = time.time()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            s = c.status()
            if s.totals.active_streams == len(reqs) and s.counters.generated_tokens >= 2 * len(reqs):
                break
            time.sleep(0.01)
        signalled = time.time()
        stopper = {}
        st = threading.Thread(target=lambda: stopper.setdefault("rc", c.stop(timeout=110, **stop_kw)))
        st.start()
        time.sleep(0.1)
        try:  # new requests are refused while draining
            ch = grpc.insecure_channel("127.0.0.1:%d" % c.port)
            from moeserve_pb2_grpc import MoeserveStub
            generate(MoeserveStub(ch), gen_request(ids=[1, 2], max_new=2), timeout=5)
            late = "accepted"
        except grpc.RpcError as e:
            late = e.code()
        for t in threads:
            t.join()
        st.join()
        for i in range(len(reqs)):
            check(results[i] == refs[tuple(reqs[i]["ids"])], "request %d after the drain signal: %s" % (i, results[i]))
        check(min(finished_at.values()) > signalled, "a stream had finished before the signal: not a drain test")
        check(late in (grpc.StatusCode.UNAVAILABLE,), "a request during the drain: %s" % late)
        check(stopper.get("rc") == 0, "mpirun exited %s:\n%s" % (stopper.get("rc"), c.stderr()[-3000:]))
        check("draining" in c.stderr(), "no drain in the log")
        print("8 streams finished %.2f s after the signal; mpirun exited 0" % (max(finished_at.values()) - signalled))


@test
def sigterm_drains_and_every_rank_exits_0():
    """SIGTERM to rank 0 while 8 streams run: they all finish exactly, new requests are refused,
    then every rank exits 0 (mpirun's status is 0)."""
    drain_test()


@test
def sigusr1_to_mpirun_drains():
    """SIGUSR1 to mpirun (which forwards it to every rank) drains the same way."""
    drain_test(sig=signal.SIGUSR1, to_mpirun=True)


@test
def stop_strings_and_stop_ids():
    """Stop strings and stop token ids end the stream at the right place (finish STOP, matched_stop),
    in the disaggregated layout."""
    with Cluster(np=3) as c:
        ids, text, _ = generate(c.stub, gen_request(prompt="Hello world, this is", max_new=40, ignore_eos=True))
        check(len(text) > 12, "reference text too short: %r" % text)
        stop = text[6:9]
        s_ids, s_text, last = generate(c.stub, gen_request(prompt="Hello world, this is", max_new=40,
                                                           ignore_eos=True, stop=[stop, "\x01never"]))
        check(last.finish_reason == pb.FINISH_REASON_STOP and last.matched_stop == stop, str(last))
        check(s_text == text[:text.index(stop)], "%r vs %r" % (s_text, text[:text.index(stop)]))
        _, inc_text, _ = generate(c.stub, gen_request(prompt="Hello world, this is", max_new=40, ignore_eos=True,
                                                      stop=[stop], include_stop_str_in_output=True))
        check(inc_text == text[:text.index(stop)] + stop, "%r" % inc_text)
        tid = ids[5]
        t_ids, _, last = generate(c.stub, gen_request(prompt="Hello world, this is", max_new=40, ignore_eos=True,
                                                      stop_token_ids=[tid]))
        check(t_ids == ids[:ids.index(tid) + 1] and last.matched_stop == str(tid), "%s %s" % (t_ids, last))
        c.wait_idle()
        stop_ok(c)


@test
def impossible_layouts_are_refused():
    """Too few ranks for the pools asked for: a clear error naming the ranks needed."""
    env = dict(os.environ)
    from cluster import MPI_ENV
    env.update(MPI_ENV)
    cases = [(["--prefill-instances", "2", "--decode-instances", "2"], "run mpirun -np 5 (got -np 3)"),
             (["--colocated", "--prefill-instances", "1"], "--colocated"),
             (["--ep-size", "4"], "--ep-size 4 needs 4 worker ranks"),
             (["--prefill-ep", "2", "--decode-ep", "2"], "run mpirun -np 5 (got -np 3)")]
    for args, want in cases:
        p = subprocess.run(["mpirun", "--oversubscribe", "-np", "3", os.path.join(build_dir(), "moe-serve"), "--model",
                            MODEL] + args, capture_output=True, text=True, env=env, timeout=60)
        check(p.returncode != 0 and want in p.stderr, "%s: rc %d, stderr %r" % (args, p.returncode, p.stderr[-500:]))


if __name__ == "__main__":
    sys.exit(test_main(TESTS, "cluster_tests.py"))
