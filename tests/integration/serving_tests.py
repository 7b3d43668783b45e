"""Serving-side accounting and operations (issue 13): outcome counters that add up, GET /metrics
checked by prometheus_client's parser and promtool, equal to ClusterStatus.
`serving_tests.py --list` names the tests, `serving_tests.py NAME` runs one (run.sh runs them)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc

from cluster import Cluster, TestFailure, check, gen_request, registrar, run_parallel, small_model, test_main
import moeserve_pb2 as pb
import moeserve_pb2_grpc as pbg

TESTS = {}
test = registrar(TESTS)

OUTCOMES = ("requests_finished", "requests_cancelled", "requests_failed", "requests_rejected_invalid",
            "requests_rejected_busy")


def identity_holds(k):
    return k.requests_received == sum(getattr(k, f) for f in OUTCOMES) + k.requests_in_flight


def http_port(c):
    deadline = time.time() + 10
    while time.time() < deadline:
        m = re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise TestFailure("no HTTP listening line in the log")


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        check(r.status == 200, "/metrics: HTTP %d" % r.status)
        ctype = r.headers.get("Content-Type", "")
        check(ctype.startswith("text/plain; version=0.0.4"), "/metrics content type %r" % ctype)
        return r.read().decode()


def parse_metrics(text):
    """{(sample name, frozenset(labels)): value} via prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def promtool_check(text):
    promtool = shutil.which("promtool")
    check(promtool is not None, "promtool missing (scripts/install-deps.sh installs Debian's prometheus)")
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    check(p.returncode == 0, "promtool check metrics: rc %d:\n%s%s" % (p.returncode, p.stdout, p.stderr))


def long_request(**kw):
    return gen_request(ids=[5, 6, 7, 8, 9, 10, 11, 12], max_new=400, ignore_eos=True, **kw)


def http_post(port, path, body, timeout=60):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@test
def outcomes_add_up_and_metrics_match_status():
    """A mixed run over gRPC and HTTP (finished, cancelled mid-stream, disconnected, deadlines of
    0.3 s and 1 ms, invalid requests): every ClusterStatus and every /metrics scrape during the run
    satisfies received = finished + cancelled + failed + rejected + in flight; afterwards nothing is
    in flight or open, the counts match what the clients saw, /metrics passes prometheus_client's
    parser and promtool, and equals ClusterStatus."""
    model = small_model()
    with Cluster(np=3, model=model, args=["--kv-blocks", "256", "--http-listen", "127.0.0.1:0"]) as c:
        hport = http_port(c)
        stop = threading.Event()
        polls = {"status": 0, "metrics": 0, "bad": []}

        def poller():
            while not stop.is_set():
                k = c.status().counters
                polls["status"] += 1
                if not identity_holds(k):
                    polls["bad"].append(str(k))
                m = parse_metrics(scrape(hport))
                polls["metrics"] += 1
                recv = [v for (n, _), v in m.items() if n == "moeserve_requests_received_total"][0]
                outs = sum(v for (n, _), v in m.items() if n == "moeserve_requests_total")
                fl = [v for (n, _), v in m.items() if n == "moeserve_requests_in_flight"][0]
                if recv != outs + fl:
                    polls["bad"].append("metrics: received %s, outcomes %s, in flight %s" % (recv, outs, fl))
                time.sleep(0.02)

        def finished():
            n = 0
            for r in c.stub.Generate(gen_request(ids=[1, 2, 3], max_new=12), timeout=60):
                n += len(r.token_ids)
            return ("ok", n)

        def cancel_after(k):
            call = c.stub.Generate(long_request(), timeout=60)
            got = 0
            try:
                for r in call:
                    got += len(r.token_ids)
                    if got >= k:
                        call.cancel()
            except grpc.RpcError as e:
                return ("cancel", e.code())
            return ("ok", got)

        def disconnect_after(k):
            ch = grpc.insecure_channel("127.0.0.1:%d" % c.port)
            got = 0
            for r in pbg.MoeserveStub(ch).Generate(long_request(), timeout=60):
                got += len(r.token_ids)
                if got >= k:
                    break
            ch.close()
            return ("gone", got)

        def deadline(t):
            try:
                for _ in c.stub.Generate(long_request(), timeout=t):
                    pass
            except grpc.RpcError as e:
                return ("deadline", e.code())
            return ("ok", 0)

        def invalid():
            try:
                list(c.stub.Generate(gen_request(ids=[1, 2], max_new=4, top_p=1.5), timeout=10))
            except grpc.RpcError as e:
                return ("invalid", e.code())
            return ("ok", 0)

        def http_finished():
            st, body = http_post(hport, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 8})
            return ("ok", st) if st == 200 else ("http", st)

        def http_invalid():
            st, _ = http_post(hport, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 8, "top_p": 7})
            return ("invalid", st)

        def http_disconnect():
            s = socket.create_connection(("127.0.0.1", hport), timeout=30)
            body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            got = b""
            while got.count(b"data:") < 3:
                b = s.recv(4096)
                if not b:
                    break
                got += b
            s.close()
            return ("gone", got.count(b"data:"))

        jobs = ([finished] * 4 + [lambda: cancel_after(2)] * 3 + [lambda: disconnect_after(2)] * 2 +
                [lambda: deadline(0.3)] * 2 + [lambda: deadline(0.001)] * 3 + [invalid] * 3 +
                [http_finished] * 2 + [http_invalid] + [http_disconnect] * 2)
        t = threading.Thread(target=poller)
        t.start()
        try:
            res = run_parallel(lambda f: f(), jobs)
        finally:
            stop.set()
            t.join()
        check(not polls["bad"], "identity broken during the run: %s" % polls["bad"][:3])
        check(polls["status"] > 3 and polls["metrics"] > 3, "too few polls: %s" % polls)
        kinds = [r[0] for r in res]
        check(kinds.count("invalid") == 4 and kinds.count("ok") == 6, "client outcomes %s" % res)
        # settle: nothing in flight, no stream open
        deadline_t = time.time() + 15
        while True:
            st = c.status()
            k = st.counters
            if k.requests_in_flight == 0 and st.totals.active_streams == 0:
                break
            check(time.time() < deadline_t, "still in flight after the run: %s %s" % (k, st.totals))
            time.sleep(0.05)
        check(identity_holds(k), str(k))
        # a 1 ms deadline may expire in the client before the call leaves it: such calls never arrive
        check(len(jobs) - 3 <= k.requests_received <= len(jobs), "received %d of %d sent:\n%s" % (
            k.requests_received, len(jobs), k))
        check(k.requests_rejected_invalid == 4, "rejected_invalid %d (4 invalid sent; a deadline that passed "
              "before the message is a cancel, not invalid):\n%s" % (k.requests_rejected_invalid, k))
        check(k.requests_finished >= 6 and k.requests_failed == 0 and k.requests_rejected_busy == 0, str(k))
        # cancelled: the 3 cancels, 2 disconnects, 2 + (up to) 3 deadlines, 2 HTTP disconnects (each
        # unless it finished first, which 400 tokens at ~10 ms each never do)
        want_cancelled = k.requests_received - 6 - 4
        check(k.requests_cancelled == want_cancelled, "cancelled %d, want %d:\n%s" % (
            k.requests_cancelled, want_cancelled, k))
        check(k.requests_finished == 6, "finished %d, want 6:\n%s" % (k.requests_finished, k))
        check(k.requests_finished_length + k.requests_finished_eos + k.requests_finished_stop == k.requests_finished,
              str(k))
        text = scrape(hport)
        promtool_check(text)
        m = parse_metrics(text)
        st = c.status()
        k = st.counters
        name = os.path.basename(model)

        def val(sample, **labels):
            labels["model_name"] = name
            key = (sample, frozenset(labels.items()))
            check(key in m, "/metrics has no %s %s" % (sample, labels))
            return m[key]

        want = {("moeserve_requests_received_total", ()): k.requests_received,
                ("moeserve_requests_in_flight", ()): k.requests_in_flight,
                ("moeserve_prompt_tokens_total", ()): k.prompt_tokens,
                ("moeserve_generation_tokens_total", ()): k.generated_tokens,
                ("moeserve_kv_transfers_total", ()): k.kv_transfers,
                ("moeserve_kv_transfer_bytes_total", ()): k.kv_transfer_bytes,
                ("moeserve_num_preemptions_total", ()): k.preemptions,
                ("moeserve_active_streams", ()): st.totals.active_streams}
        for o in OUTCOMES:
            want[("moeserve_requests_total", (("outcome", o[len("requests_"):]),))] = getattr(k, o)
        for r in ("length", "eos", "stop"):
            want[("moeserve_request_success_total", (("finished_reason", r),))] = \
                getattr(k, "requests_finished_" + r)
        for (sample, labels), v in want.items():
            got = val(sample, **dict(labels))
            check(got == v, "%s%s: /metrics %s, ClusterStatus %s" % (sample, dict(labels), got, v))
        for i in st.instances:
            lab = {"instance": str(i.id), "pool": pb.PoolKind.Name(i.pool)[len("POOL_KIND_"):].lower(),
                   "host": i.host}
            check(val("moeserve_num_requests_running", **lab) == i.running, "running %s" % lab)
            check(val("moeserve_kv_cache_blocks_used", **lab) == i.kv_blocks_used, "kv used %s" % lab)
            check(val("moeserve_kv_cache_usage_perc", **lab) == i.kv_blocks_used / max(i.kv_blocks_total, 1),
                  "kv usage %s" % lab)
        check(val("moeserve_time_to_first_token_seconds_count") >= 6, "TTFT count")
        check(val("moeserve_e2e_request_latency_seconds_count") == k.requests_finished, "e2e count")
        check(val("moeserve_request_generation_tokens_sum") > 0, "generation tokens sum")
        c.stop()
        print("identity held in %d ClusterStatus and %d /metrics polls; final %s" % (
            polls["status"], polls["metrics"], str(k).replace("\n", " ")))


if __name__ == "__main__":
    sys.exit(test_main(TESTS, "serving_tests.py"))
