#!/usr/bin/env python3
"""Elastic cluster fault and join timings (issue 10, bench/RESULTS.md "Elastic cluster"; not CI):

  failover: a coordinator, 1 prefill and 2 decode instances as separate processes
            (tests/integration/elastic.py); S greedy streams of prompts of L tokens; once every
            stream has T tokens, kill -9 of the decode instance running the most; for each request
            the coordinator resumed elsewhere (its log: "request ID goes on elsewhere"), the time
            from the kill to that request's next token. p50 / max per prompt length, next to the
            same figure for the streams that were not on the dead instance (one decode step).
  join:     1 prefill + 1 decode under a steady load (a new request every --join-gap-ms), then a
            second decode instance is started: time from its start to READY in ClusterStatus and
            to the first request it runs.

    bench/failover_bench.py BUILD_DIR [--model DIR] [--lens 128,2048] [--streams 8] [--trials 3]

Without --model, moe-gen-model's 'small' preset (qwen3_moe, context 8192) is written to a
temporary directory. Every stream's token indices are checked to be contiguous."""

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
IT = os.path.join(SRC, "tests", "integration")


def stubs():
    """Generates the Python gRPC stubs (as tests/integration/run.sh does) and imports the harness."""
    d = tempfile.mkdtemp(prefix="moe-bench-stubs-")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(SRC, "proto"), "--python_out=" + d,
                    "--grpc_python_out=" + d, os.path.join(SRC, "proto", "moeserve.proto"),
                    os.path.join(SRC, "proto", "health.proto")], check=True)
    sys.path[:0] = [d, IT]


class Stream(threading.Thread):
    """One greedy Generate; records each token's arrival (time.monotonic())."""

    def __init__(self, stub, pb, rid, ids, max_new):
        super().__init__(daemon=True)
        self.stub, self.pb, self.rid = stub, pb, rid
        self.req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_new_tokens=max_new, ignore_eos=True,
                                      sampling=pb.SamplingParams(temperature=0.0), request_id=rid)
        self.arrivals = []  # (index, t)
        self.error = None
        self.t0 = time.monotonic()
        self.start()

    def run(self):
        try:
            for r in self.stub.Generate(self.req, timeout=600):
                t = time.monotonic()
                for k in r.token_indices:
                    if k != len(self.arrivals):
                        raise RuntimeError("%s: token index %d after %d tokens" % (self.rid, k, len(self.arrivals)))
                    self.arrivals.append((k, t))
        except Exception as e:  # noqa: BLE001 - reported by the caller
            self.error = e

    def next_after(self, t):
        return next((a for _, a in self.arrivals if a > t), None)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def failover_trial(ec, pb, model, plen, n, tokens_before, max_new, seed, heartbeat_timeout_ms):
    with ec.ElasticCluster(model=model, heartbeat_timeout_ms=heartbeat_timeout_ms) as cl:
        for i, pool in enumerate(("prefill", "decode", "decode")):
            cl.add_instance(pool, host_label="%s%d" % (pool, i), args=["--kv-blocks", "2048"])
        cl.wait_ready(3, timeout=180)
        rnd = random.Random(seed)
        vocab = cl.status().vocab_size
        streams = [Stream(cl.stub, pb, "fo-%d-%d-%d" % (plen, seed, i), [rnd.randrange(vocab) for _ in range(plen)],
                          max_new) for i in range(n)]
        deadline = time.time() + 600
        while any(len(s.arrivals) < tokens_before for s in streams) and time.time() < deadline:
            if any(s.error for s in streams):
                break
            time.sleep(0.005)
        st = cl.status()
        victim = max((i for i in st.instances if i.pool == pb.POOL_KIND_DECODE and i.state == pb.INSTANCE_STATE_READY),
                     key=lambda i: i.running)
        proc = next(p for p in cl.instances if p.name == victim.host)
        t_kill = time.monotonic()
        proc.kill()
        proc.killed = True
        for s in streams:
            s.join(600)
        errors = [s.error for s in streams if s.error]
        if errors:
            raise RuntimeError("stream failed: %s" % errors[0])
        log = cl.coord.stderr()
        # the first token of the new placement: index N of "goes on elsewhere from token N" (tokens
        # the dead instance sent before it died may still arrive after the kill)
        resumed = {rid: int(k) for rid, k in re.findall(r"request (\S+) goes on elsewhere from token (\d+)", log)}
        moved = [s.arrivals[resumed[s.rid]][1] - t_kill for s in streams
                 if s.rid in resumed and resumed[s.rid] < len(s.arrivals)]
        stayed = [s.next_after(t_kill) - t_kill for s in streams if s.rid not in resumed and s.next_after(t_kill)]
        st = cl.wait_idle(60)
        cl.stop()
        ttft = [s.arrivals[0][1] - s.t0 for s in streams if s.arrivals]
        return {"victim_running": victim.running, "moved": moved, "stayed": stayed, "ttft": ttft,
                "resumed_counter": st.counters.requests_resumed, "failed": st.counters.requests_failed}


def join_trial(ec, pb, model, gap_ms, max_new):
    with ec.ElasticCluster(model=model) as cl:
        cl.add_instance("prefill", host_label="prefill0")
        cl.add_instance("decode", host_label="decode1")
        cl.wait_ready(2, timeout=180)
        stop = threading.Event()
        streams = []
        vocab = cl.status().vocab_size

        def load():
            rnd = random.Random(5)
            k = 0
            while not stop.is_set():
                streams.append(Stream(cl.stub, pb, "join-%d" % k, [rnd.randrange(vocab) for _ in range(32)], max_new))
                k += 1
                stop.wait(gap_ms / 1000)

        th = threading.Thread(target=load, daemon=True)
        th.start()
        time.sleep(2)  # the load is on
        t0 = time.monotonic()
        cl.add_instance("decode", host_label="late")
        t_ready = t_first = None
        rows0 = None  # its expert rows when first seen READY (the warm-up's, if counted)
        while time.monotonic() - t0 < 180 and t_first is None:
            for i in cl.status().instances:
                if i.host == "late":
                    now = time.monotonic() - t0
                    if t_ready is None and i.state == pb.INSTANCE_STATE_READY:
                        t_ready, rows0 = now, sum(i.expert_tokens)
                    if t_ready is not None and (i.running > 0 or i.kv_blocks_used > 0 or
                                                sum(i.expert_tokens) > rows0):
                        t_first = now
            time.sleep(0.01)
        stop.set()
        th.join()
        for s in streams:
            s.join(600)
        cl.wait_idle(60)
        cl.stop()
        return t_ready, t_first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build")
    ap.add_argument("--model")
    ap.add_argument("--lens", default="128,2048")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--tokens-before", type=int, default=4, help="tokens every stream has before the kill")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=3000)
    ap.add_argument("--join-trials", type=int, default=3)
    ap.add_argument("--join-gap-ms", type=int, default=200)
    ap.add_argument("--what", default="failover,join")
    a = ap.parse_args()
    os.environ["MOE_BUILD_DIR"] = os.path.abspath(a.build)
    stubs()
    import moeserve_pb2 as pb
    import elastic as ec
    model = a.model
    if not model:
        model = os.path.join(tempfile.mkdtemp(prefix="moe-small-"), "small")
        subprocess.run([os.path.join(a.build, "moe-gen-model"), "--arch", "qwen3_moe", "--preset", "small",
                        "--out", model, "--quiet"], check=True)
    print("model %s; %s" % (model, subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()))
    if "failover" in a.what:
        print("\n| prompt tokens | streams | trials | resumed (victim ran) | kill -> next token, resumed p50 / max ms | not on the victim p50 / max ms | TTFT before the kill p50 / max ms |")
        print("|---|---|---|---|---|---|---|")
        for plen in [int(x) for x in a.lens.split(",")]:
            moved, stayed, ran, res, ttft = [], [], [], [], []
            for t in range(a.trials):
                r = failover_trial(ec, pb, model, plen, a.streams, a.tokens_before, a.max_new, 100 + t,
                                   a.heartbeat_timeout_ms)
                sys.stderr.write("len %d trial %d: %s\n" % (plen, t, r))
                moved += r["moved"]
                ttft += r["ttft"]
                stayed += r["stayed"]
                ran.append(r["victim_running"])
                res.append(len(r["moved"]))
                if r["failed"]:
                    print("!! %d requests failed" % r["failed"])
            print("| %d | %d | %d | %s (%s) | %.0f / %.0f | %.0f / %.0f | %.0f / %.0f |" % (
                plen, a.streams, a.trials, "+".join(map(str, res)), "+".join(map(str, ran)),
                1e3 * statistics.median(moved) if moved else float("nan"), 1e3 * max(moved) if moved else float("nan"),
                1e3 * statistics.median(stayed) if stayed else float("nan"), 1e3 * max(stayed) if stayed else float("nan"),
                1e3 * statistics.median(ttft), 1e3 * max(ttft)))
            sys.stdout.flush()
    if "join" in a.what:
        rows = [join_trial(ec, pb, model, a.join_gap_ms, a.max_new) for _ in range(a.join_trials)]
        print("\njoin under load (a 32-token request every %d ms): start -> READY, start -> first request (s): %s" % (
            a.join_gap_ms, ", ".join("%.2f / %.2f" % (r or float("nan"), f or float("nan")) for r, f in rows)))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
