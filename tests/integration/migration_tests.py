"""Live-migration tests under mpirun (docs/migration.md): `migration_tests.py --list` names them,
`migration_tests.py NAME` runs one (exit 0 = pass); run.sh runs each in its own process.

Layout: one prefill and two decode instances (mpirun -np 4). The forced hook
(MOE_TEST_MIGRATE_EVERY=N) moves every decoding request to the other decode instance each time it
has generated N more tokens, so a request moves there and back many times; the abort hooks
(MOE_TEST_MIGRATE_ABORT, worker/migrate.h) abort migrations at a chosen stage."""

import os
import re
import subprocess
import sys
import threading
import time

from cluster import (MODEL, Cluster, TestFailure, build_dir, check, gen_request, generate, reference,
                     registrar, run_parallel, small_model, test_main)
import moeserve_pb2 as pb

TESTS = {}
LAYOUT = ["--prefill-instances", "1", "--decode-instances", "2"]
# The policy tests need their requests decoding together: prefilled in one engine step (else the
# first ones finish decoding before the last ones are handed over). A larger step budget, and a
# blocker (occupy_prefill) that keeps the prefill rank busy while they all arrive.
ONE_PREFILL_STEP = ["--batch-tokens", "1024"]


def occupy_prefill(c):
    """Starts a 900-token prompt with one output token (it ends on the prefill rank: ~1 s of work
    holding 57 of its 64 KV blocks) and returns its thread, so that requests sent right after it
    queue and are then prefilled together."""
    t = threading.Thread(target=lambda: generate(c.stub, gen_request(ids=[(k * 11 + 5) % 8000 for k in range(900)],
                                                                      max_new=1), timeout=120))
    t.start()
    # The prefill rank reports its load between engine steps only, so the blocker's step cannot be
    # observed from outside while it runs: give it a moment to arrive (it then computes for ~1 s).
    time.sleep(0.2)
    return t


test = registrar(TESTS)


def stop_ok(c):
    rc = c.stop()
    check(rc == 0, "mpirun exited %s after the drain:\n%s" % (rc, c.stderr()[-3000:]))


def workload(n, max_new, seeded_every=2):
    """n requests (token-id prompts of different lengths), every other one with seeded sampling."""
    reqs = []
    for i in range(n):
        ids = [(37 * i + 11 * k + 5) % 900 for k in range(3 + 7 * i)]
        r = {"ids": ids, "max_new": max_new + 13 * i}
        if i % seeded_every == 1:
            r.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        reqs.append(r)
    return reqs


def ref_of(r, model=MODEL):
    extra = ["--ignore-eos"]
    if "seed" in r:
        extra += ["--temperature", str(r["temperature"]), "--top-p", str(r["top_p"]), "--seed", str(r["seed"])]
    return reference(ids=r["ids"], max_new=r["max_new"], model=model, extra=extra)


def request_of(r, **kw):
    extra = {k: r[k] for k in ("top_p", "seed") if k in r}
    return gen_request(ids=r["ids"], max_new=r["max_new"], temperature=r.get("temperature", 0.0), ignore_eos=True,
                       **extra, **kw)


def run_and_compare(c, reqs, refs):
    got = run_parallel(lambda r: generate(c.stub, request_of(r), timeout=120), reqs)
    for i, ((ids, _, last), ref) in enumerate(zip(got, refs)):
        check(ids == ref, "request %d (%s): migrated %s != unmigrated %s" % (i, reqs[i], ids, ref))
        check(last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == len(ids),
              "request %d: %s %s" % (i, last.finish_reason, last.usage))
    return got


MIG_LINE = re.compile(r"migration (\d+) \((\w+)\): request (\S+) instance (\d+) -> (\d+)(: | aborted)")


def migrations(log):
    """[(id, why, request, src, dst, completed)] from the coordinator's log lines."""
    return [(int(m.group(1)), m.group(2), m.group(3), int(m.group(4)), int(m.group(5)), m.group(6) == ": ")
            for m in MIG_LINE.finditer(log)]


@test
def forced_migrations_keep_outputs_exact():
    """Every decoding request moves to the other decode instance every 4 tokens (there and back,
    many times), 8 concurrent streams, greedy and seeded sampling: the token streams equal the
    unmigrated outputs, indices contiguous (no gap, no duplicate), KV back to zero."""
    reqs = workload(8, 90)
    refs = [ref_of(r) for r in reqs]
    # Steps slowed (1 ms a layer) so that migrations keep pace with decode: on a fast host a
    # request was first moved at its last tokens and ended before it could move back.
    env = {"MOE_TEST_MIGRATE_EVERY": "4", "MOE_TEST_LAYER_DELAY_MS": "1"}
    with Cluster(np=4, args=LAYOUT, env=env) as c:
        run_and_compare(c, reqs, refs)
        st = c.wait_idle()
        g = st.migration
        check(g.completed >= 16 and g.by_forced == g.started, "migration counters: %s" % g)
        check(g.bytes > 0 and g.stages >= g.completed and g.pause_ms_max > 0, str(g))
        check(st.counters.migrations == g.completed, str(st.counters))
        moves = migrations(c.stderr())
        done = {}
        for _, why, rid, src, dst, ok in moves:
            check(why == "forced", "unexpected trigger %s" % why)
            if ok and rid != "(ended)":  # (ended): it finished before the report came back
                done.setdefault(rid, []).append((src, dst))
        check(len(done) == len(reqs), "requests that moved: %d of %d" % (len(done), len(reqs)))
        for rid, path in done.items():
            check(len(path) >= 2 and path[1] == (path[0][1], path[0][0]),
                  "request %s did not move there and back: %s" % (rid, path))
            for a, b in zip(path, path[1:]):
                check(a[1] == b[0], "request %s: moves do not chain: %s" % (rid, path))
        print("%d migrations completed, %d aborted, %.1f MiB, pause p50 %.2f ms p99 %.2f ms max %.2f ms"
              % (g.completed, g.aborted, g.bytes / 2**20, g.pause_ms_p50, g.pause_ms_p99, g.pause_ms_max))
        stop_ok(c)


@test
def incoming_migration_counts_its_blocks_once():
    """One request in the whole cluster, moved between the decode instances with slow stages
    (each stage waits 300 ms, at least 3 of them): while a migration is in flight its destination
    holds the stages it imported (reported in kv_blocks_used) and the coordinator promises it the
    request's blocks; ClusterStatus's kv_blocks_committed (what placement and the migration policy
    weigh) counts them once, so no instance ever commits more than the one request needs."""
    r = {"ids": [(13 * k + 3) % 900 for k in range(200)], "max_new": 150}
    ref = ref_of(r)
    # Steps of >= 15 ms (5 ms per layer): the request decodes for >= 2 s, long enough for
    # migrations of >= 3 stages 300 ms apart.
    env = {"MOE_TEST_MIGRATE_EVERY": "8", "MOE_TEST_MIGRATE_STALL_MS": "300",
           "MOE_TEST_MIGRATE_MIN_STAGES": "3", "MOE_TEST_LAYER_DELAY_MS": "5"}
    with Cluster(np=4, args=LAYOUT, env=env) as c:
        samples, done = [], threading.Event()

        def watch():
            while not done.is_set():
                st = c.status()
                samples.append((st.migration.in_flight,
                                {i.id: (i.kv_blocks_used, i.kv_blocks_committed, i.kv_block_tokens)
                                 for i in decode_rows(st).values()}))
                time.sleep(0.01)
        w = threading.Thread(target=watch)
        w.start()
        try:
            got = generate(c.stub, request_of(r), timeout=120)[0]
        finally:
            done.set()
            w.join()
        check(got == ref, "output: %s vs %s" % (got, ref))
        bt = max(v[2] for _, rows in samples for v in rows.values())
        need = -(-(len(r["ids"]) + r["max_new"]) // bt)  # the request's blocks at its longest
        both = [rows for fl, rows in samples if fl > 0 and all(v[0] > 0 for v in rows.values())]
        check(len(both) > 0, "no sample with a migration in flight and KV on both decode instances "
              "(%d samples): the check below would not see an import" % len(samples))
        worst = max(v[1] for _, rows in samples for v in rows.values())
        check(worst <= need, "an instance committed %d blocks; the only request needs at most %d"
              % (worst, need))
        g = c.wait_idle().migration
        check(g.completed >= 1, "migration counters: %s" % g)
        print("%d samples (%d with KV on both sides mid-migration): most committed %d of the "
              "request's %d blocks; %d migrations" % (len(samples), len(both), worst, need, g.completed))
        stop_ok(c)


DEST_LINE = re.compile(r"incoming migration \d+ from rank \d+ aborted at stage (-?\d+) \((\w+)\); "
                       r"reservation freed, (\d+) KV blocks in use here")


def abort_cases(cases):
    """One cluster per hook: every migration aborts there; the request stays on its source, its
    output is exact, and the destination (which runs nothing else) holds no KV after each abort."""
    # Long enough (~0.1 s each) that stages 0, 1 and the final one happen before they end.
    reqs = [{"ids": [5, 6, 7, 8, 9, 10, 11], "max_new": 300},
            {"ids": [300, 301, 302], "max_new": 260, "temperature": 0.8, "top_p": 0.9, "seed": 4242}]
    refs = [ref_of(r) for r in reqs]
    for hook, bucket in cases:
        env = {"MOE_TEST_MIGRATE_EVERY": "3", "MOE_TEST_MIGRATE_ABORT": hook + ":all",
               "MOE_TEST_MIGRATE_MIN_STAGES": "2"}
        with Cluster(np=4, args=LAYOUT, env=env) as c:
            for r, ref in zip(reqs, refs):  # one at a time: the other decode instance holds nothing
                run_and_compare(c, [r], [ref])
            st = c.wait_idle()
            g = st.migration
            check(g.completed == 0 and g.aborted >= 2, "%s: %s" % (hook, g))
            check(getattr(g, bucket) >= 1, "%s: no abort counted as %s: %s" % (hook, bucket, g))
            log = c.stderr()
            for _, _, _, _, _, ok in migrations(log):
                check(not ok, "%s: a migration completed" % hook)
            stage = hook.split(":")[1]
            fired = [ln for ln in log.splitlines() if "test hook MOE_TEST_MIGRATE_ABORT: aborting" in ln
                     and (ln.endswith(" (final)") if stage == "final" else
                          ln.endswith("aborting at stage %s" % stage))]
            check(fired, "%s: the hook never fired:\n%s" % (hook, log[-3000:]))
            freed = DEST_LINE.findall(log)
            check(freed, "%s: the destination logged no freed reservation" % hook)
            for st_, reason, used in freed:
                check(used == "0", "%s: destination holds %s blocks after an abort (%s)" % (hook, used, reason))
            print("%-14s %d aborted (%s %d), hook fired %d times, destination freed %d reservations (%s)" %
                  (hook, g.aborted, bucket, getattr(g, bucket), len(fired), len(freed),
                   ",".join(sorted(set(r for _, r, _ in freed)))))
            stop_ok(c)


@test
def aborts_on_the_destination_side():
    """The destination refuses stage 0, stage 1 or the final stage, or a block arrives corrupted
    (stage 0, final stage)."""
    abort_cases([("dest:0", "aborted_other"), ("dest:1", "aborted_other"), ("dest:final", "aborted_other"),
                 ("corrupt:0", "aborted_transfer"), ("corrupt:final", "aborted_transfer")])


@test
def aborts_on_the_source_side():
    """The source aborts before sending stage 0, stage 1, or the final stage (the request is
    paused then), or with stage 0's or stage 1's data in flight."""
    abort_cases([("src:0", "aborted_other"), ("src:1", "aborted_other"), ("src:final", "aborted_other"),
                 ("sent:0", "aborted_other"), ("sent:1", "aborted_other")])


def join_and_compare(threads, results, refs):
    """Waits for the client threads, then checks each request's tokens against its reference."""
    for t in threads:
        t.join(timeout=120)
    for i, (g, ref) in enumerate(zip(results, refs)):
        check(g == ref, "request %d: %s vs %s" % (i, g, ref))


def wait_until(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise TestFailure("timed out waiting for " + what)


def decode_rows(st):
    return {i.id: i for i in st.instances if i.pool == pb.POOL_KIND_DECODE}


@test
def drain_moves_every_request_off():
    """moe-client drain 1 with requests decoding on both decode instances: they migrate to
    instance 2 and finish there exactly; instance 1 reports no KV in use while streams are still
    open, takes no new request, and takes requests again after --undo."""
    model = small_model()
    reqs = [{"ids": [(7 * i + k) % 8000 for k in range(20 + 9 * i)], "max_new": 70} for i in range(6)]
    refs = [ref_of(r, model) for r in reqs]
    with Cluster(np=4, model=model, args=LAYOUT + ["--kv-blocks", "256"]) as c:
        results = [None] * len(reqs)

        def client(i):
            results[i] = generate(c.stub, request_of(reqs[i]), timeout=120)[0]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        wait_until(lambda: all(r.running > 0 for r in decode_rows(c.status()).values()), 60,
                   "both decode instances to run requests")
        addr = "127.0.0.1:%d" % c.port
        p = subprocess.run([os.path.join(build_dir(), "moe-client"), "--addr", addr, "drain", "1",
                            "--timeout-ms", "60000"], capture_output=True, text=True, timeout=90)
        check(p.returncode == 0 and "drained" in p.stdout, "moe-client drain: rc %d\n%s%s" %
              (p.returncode, p.stdout, p.stderr))
        st = c.status()
        row = decode_rows(st)[1]
        check(row.state == pb.INSTANCE_STATE_DRAINING and row.kv_blocks_used == 0 and row.running == 0,
              "instance 1 after the drain: %s" % row)
        open_streams = sum(1 for t in threads if t.is_alive())
        # New requests all go to instance 2 while instance 1 stays empty.
        extra = [{"ids": [1, 2, 3, 4], "max_new": 30}, {"ids": [9, 8, 7], "max_new": 30}]
        extra_refs = [ref_of(r, model) for r in extra]
        seen = {"max_used": 0}
        done = threading.Event()

        def watch():
            while not done.is_set():
                seen["max_used"] = max(seen["max_used"], decode_rows(c.status())[1].kv_blocks_used)
                time.sleep(0.01)
        w = threading.Thread(target=watch)
        w.start()
        try:
            got = run_parallel(lambda r: generate(c.stub, request_of(r), timeout=120)[0], extra)
        finally:
            done.set()
            w.join()
        check(got == extra_refs, "requests during the drain: %s vs %s" % (got, extra_refs))
        check(seen["max_used"] == 0, "the drained instance took KV: %s" % seen)
        join_and_compare(threads, results, refs)
        st = c.wait_idle()
        g = st.migration
        check(g.by_drain >= 1 and g.completed >= 1, "migration counters: %s" % g)
        p = subprocess.run([os.path.join(build_dir(), "moe-client"), "--addr", addr, "drain", "1", "--undo"],
                           capture_output=True, text=True, timeout=30)
        check(p.returncode == 0, "drain --undo: %s %s" % (p.stdout, p.stderr))
        check(decode_rows(c.status())[1].state == pb.INSTANCE_STATE_READY, "instance 1 not ready after --undo")
        print("drained instance 1 with %d streams still open: %d migrations (%d by drain), pause max %.2f ms"
              % (open_streams, g.completed, g.by_drain, g.pause_ms_max))
        stop_ok(c)


@test
def drain_refusals():
    """Drain answers NOT_FOUND for an unknown instance and INVALID_ARGUMENT for the last decode
    instance taking requests; moe-client drain exits 1 with the reason."""
    import grpc
    with Cluster(np=4, args=LAYOUT) as c:
        try:
            c.stub.Drain(pb.DrainRequest(instance=7), timeout=5)
            raise TestFailure("draining instance 7 succeeded")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.NOT_FOUND, "instance 7: %s" % e.code())
        r = c.stub.Drain(pb.DrainRequest(instance=2), timeout=5)
        check(r.instance.id == 2 and r.instance.state == pb.INSTANCE_STATE_DRAINING, str(r))
        try:
            c.stub.Drain(pb.DrainRequest(instance=1), timeout=5)
            raise TestFailure("draining the last decode instance succeeded")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "last decode instance" in e.details(),
                  "%s %s" % (e.code(), e.details()))
        p = subprocess.run([os.path.join(build_dir(), "moe-client"), "--addr", "127.0.0.1:%d" % c.port, "drain",
                            "1"], capture_output=True, text=True, timeout=30)
        check(p.returncode == 1 and "last decode instance" in p.stderr, "moe-client: %d %s" % (p.returncode, p.stderr))
        # Everything still runs on instance 1.
        ids, _, _ = generate(c.stub, gen_request(ids=[5, 6, 7], max_new=10, ignore_eos=True))
        check(ids == reference(ids=[5, 6, 7], max_new=10, extra=["--ignore-eos"]), "output while drained")
        c.stub.Drain(pb.DrainRequest(instance=2, undo=True), timeout=5)
        check(decode_rows(c.status())[2].state == pb.INSTANCE_STATE_READY, "undo")
        stop_ok(c)


def skewed_start(c, reqs, drained):
    """Starts reqs (streams on threads) while instance `drained` takes nothing, so they all land on
    the other decode instance; returns (threads, results)."""
    c.stub.Drain(pb.DrainRequest(instance=drained), timeout=5)
    results = [None] * len(reqs)
    blocker = occupy_prefill(c)

    def client(i):
        results[i] = generate(c.stub, request_of(reqs[i], **reqs[i].get("kw", {})), timeout=120)[0]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    return threads + [blocker], results


@test
def balance_moves_requests_to_the_cold_instance():
    """Four long requests all start on decode instance 1 (instance 2 drained meanwhile), filling it
    above the high-water mark; once instance 2 takes requests again the policy moves requests to
    it (trigger: balance); outputs stay exact."""
    model = small_model()
    # 200 new tokens: the first request must still be decoding when the last one is handed over
    reqs = [{"ids": [(13 * i + k) % 8000 for k in range(190)], "max_new": 200} for i in range(4)]
    refs = [ref_of(r, model) for r in reqs]
    with Cluster(np=4, model=model, args=LAYOUT + ["--kv-blocks", "64"] + ONE_PREFILL_STEP) as c:
        threads, results = skewed_start(c, reqs, drained=2)
        wait_until(lambda: decode_rows(c.status())[1].kv_blocks_used >= 56, 60, "instance 1 above high water")
        check(c.status().migration.started == 0, "moves before instance 2 was back")
        c.stub.Drain(pb.DrainRequest(instance=2, undo=True), timeout=5)
        join_and_compare(threads, results, refs)
        st = c.wait_idle()
        g = st.migration
        check(g.by_balance >= 1 and g.completed >= 1, "no balance migration: %s" % g)
        for _, why, _, src, dst, _ in migrations(c.stderr()):
            check(why == "balance" and (src, dst) == (1, 2), "unexpected move %s %d -> %d" % (why, src, dst))
        print("balance: %d migrations, pause max %.2f ms" % (g.completed, g.pause_ms_max))
        stop_ok(c)


@test
def priority_requests_get_headroom():
    """Instance 1 runs one priority request and three normal ones at ~50-65% KV use, below the
    high-water mark: the priority headroom moves normal requests to instance 2, never the
    priority one; outputs stay exact."""
    model = small_model()
    reqs = [{"ids": [(17 * i + k) % 8000 for k in range(150)], "max_new": 80} for i in range(4)]
    reqs[0]["kw"] = {"priority": -1, "request_id": "vip"}
    refs = [ref_of(r, model) for r in reqs]
    with Cluster(np=4, model=model, args=LAYOUT + ["--kv-blocks", "64"] + ONE_PREFILL_STEP) as c:
        threads, results = skewed_start(c, reqs, drained=2)
        wait_until(lambda: decode_rows(c.status())[1].kv_blocks_used >= 40, 60, "instance 1 to hold the requests")
        c.stub.Drain(pb.DrainRequest(instance=2, undo=True), timeout=5)
        join_and_compare(threads, results, refs)
        st = c.wait_idle()
        g = st.migration
        check(g.by_priority >= 1, "no priority migration: %s" % g)
        for _, why, rid, _, _, _ in migrations(c.stderr()):
            check(rid != "vip", "the priority request moved (%s)" % why)
        print("priority: %d migrations (%d by priority)" % (g.completed, g.by_priority))
        stop_ok(c)


@test
def defrag_makes_room_for_a_waiting_request():
    """Both decode instances about half full (3 requests of 11-15 blocks each); a request needing 33
    blocks fits neither until the policy moves a running request off the instance it was given
    (trigger: defrag); every output stays exact."""
    model = small_model()
    small = [{"ids": [(29 * i + k) % 8000 for k in range(160)], "max_new": 90} for i in range(6)]
    # 33 blocks: more than either instance has free while its 3 requests hold 11-15 blocks each,
    # no more than it has once one of them moved away (64 - 2 x 15 = 34)
    big = {"ids": [(k * 7 + 3) % 8000 for k in range(512)], "max_new": 12}
    refs = run_parallel(lambda r: ref_of(r, model), small + [big], workers=2)
    with Cluster(np=4, model=model, args=LAYOUT + ["--kv-blocks", "64"] + ONE_PREFILL_STEP) as c:
        results = [None] * 7

        def client(i, r):
            results[i] = generate(c.stub, request_of(r), timeout=120)[0]
        threads = [threading.Thread(target=client, args=(i, r)) for i, r in enumerate(small)]
        threads.append(occupy_prefill(c))
        for t in threads[:-1]:
            t.start()
        wait_until(lambda: all(r.running == 3 for r in decode_rows(c.status()).values()), 60,
                   "3 requests decoding on each decode instance")
        check(c.status().migration.started == 0, "moves before the big request: %s" % c.status().migration)
        tb = threading.Thread(target=client, args=(6, big))
        tb.start()
        threads.append(tb)
        join_and_compare(threads, results, refs)
        st = c.wait_idle()
        g = st.migration
        check(g.by_defrag >= 1 and g.completed >= 1, "no defrag migration: %s" % g)
        print("defrag: %d migrations (%d defrag, %d balance)" % (g.completed, g.by_defrag, g.by_balance))
        stop_ok(c)


@test
def colocated_forced_migrations():
    """--colocated, two mixed instances: requests move between them every 5 tokens; outputs
    exact."""
    reqs = workload(6, 70)
    refs = [ref_of(r) for r in reqs]
    with Cluster(np=3, args=["--colocated"], env={"MOE_TEST_MIGRATE_EVERY": "5"}) as c:
        run_and_compare(c, reqs, refs)
        g = c.wait_idle().migration
        check(g.completed >= 6, "migration counters: %s" % g)
        stop_ok(c)


@test
def expert_parallel_ranks_migrate():
    """One decode instance of two expert-parallel ranks (each rank owns its sequences and KV, the
    two step together): requests move between the two ranks every 4 tokens; outputs exact."""
    reqs = workload(6, 60)
    refs = [ref_of(r) for r in reqs]
    args = ["--prefill-instances", "1", "--decode-instances", "1", "--decode-ep", "2"]
    with Cluster(np=4, args=args, env={"MOE_TEST_MIGRATE_EVERY": "4"}) as c:
        rows = decode_rows(c.status())
        check(len(rows) == 2, "expected the two EP ranks as two targets: %s" % rows)
        run_and_compare(c, reqs, refs)
        g = c.wait_idle().migration
        check(g.completed >= 6, "migration counters: %s" % g)
        stop_ok(c)


if __name__ == "__main__":
    sys.exit(test_main(TESTS, "migration_tests.py"))
