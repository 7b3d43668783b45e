#!/usr/bin/env python3
"""A client that is not ours: Python grpcio, stubs generated from proto/ at test time.

    grpc_client_test.py [HOST:PORT]        (default: $MOE_SERVER_ADDR)

Checks a live moe-serve (or any server of the moeserve.v1 API) from the outside: Health/Check,
Tokenize, Generate streaming (text and token-id prompts, greedy determinism, contiguous indices,
usage and timing on the last message; n = 3 choices in one call), ClusterStatus consistency, INVALID_ARGUMENT naming the field,
and a cancel mid-stream after which the server still serves. Exits 0 when every check passed and
prints one line per check. Run against a cluster with tests/integration/run.sh (or
live_cluster.py); it needs grpcio and grpcio-tools, and the server must answer Health SERVING
within --wait seconds.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_stubs():
    """Generates the stubs into a fresh temporary directory and imports them from there, so that
    the test always checks the .proto files of this checkout."""
    out = tempfile.mkdtemp(prefix="moe-grpc-stubs-")
    proto = os.path.join(SRC, "proto")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", proto, "--python_out=" + out,
           "--grpc_python_out=" + out, os.path.join(proto, "moeserve.proto"),
           os.path.join(proto, "health.proto")]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, out)
    import health_pb2
    import health_pb2_grpc
    import moeserve_pb2
    import moeserve_pb2_grpc
    return moeserve_pb2, moeserve_pb2_grpc, health_pb2, health_pb2_grpc


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("addr", nargs="?", default=os.environ.get("MOE_SERVER_ADDR"))
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for SERVING")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    if not args.addr:
        ap.error("give HOST:PORT or set MOE_SERVER_ADDR")

    import grpc
    pb, pbg, hpb, hpbg = load_stubs()
    channel = grpc.insecure_channel(args.addr)
    api = pbg.MoeserveStub(channel)
    health = hpbg.HealthStub(channel)
    results = []

    def run(name, fn):
        try:
            fn()
            results.append((name, None))
            print("ok   %s" % name, flush=True)
        except Exception as e:  # a check failing or an RPC error: report, go on
            results.append((name, e))
            print("FAIL %s: %s" % (name, e), flush=True)

    def health_serving():
        deadline = time.time() + args.wait
        last = None
        while time.time() < deadline:
            try:
                r = health.Check(hpb.HealthCheckRequest(service=""), timeout=5)
                last = r.status
                if r.status == hpb.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError as e:
                last = e.code()
            time.sleep(0.2)
        check(last == hpb.HealthCheckResponse.SERVING, "Health/Check never SERVING (last: %s)" % last)
        r = health.Check(hpb.HealthCheckRequest(service="moeserve.v1.Moeserve"), timeout=5)
        check(r.status == hpb.HealthCheckResponse.SERVING, "service moeserve.v1.Moeserve: %s" % r.status)
        try:
            health.Check(hpb.HealthCheckRequest(service="no.such.Service"), timeout=5)
            raise Failure("unknown service answered OK")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.NOT_FOUND, "unknown service: %s" % e.code())

    run("health_serving", health_serving)

    prompt = "The quick brown fox"
    state = {}

    def tokenize():
        r = api.Tokenize(pb.TokenizeRequest(text=prompt), timeout=10)
        check(r.count > 0 and r.count == len(r.token_ids), "count %d, %d ids" % (r.count, len(r.token_ids)))
        check(r.max_model_len > r.count, "max_model_len %d" % r.max_model_len)
        raw = api.Tokenize(pb.TokenizeRequest(text=prompt, add_special_tokens=False), timeout=10)
        check(0 < raw.count <= r.count, "without special tokens: %d vs %d" % (raw.count, r.count))
        state["ids"] = list(r.token_ids)

    run("tokenize", tokenize)

    def generate(req, timeout=60):
        msgs = list(api.Generate(req, timeout=timeout))
        check(msgs, "no message")
        ids, idx, times, text = [], [], [], ""
        for i, m in enumerate(msgs):
            check(len(m.token_ids) == len(m.token_indices) == len(m.token_times_ms),
                  "message %d: %d ids, %d indices, %d times" % (i, len(m.token_ids), len(m.token_indices),
                                                               len(m.token_times_ms)))
            last = i == len(msgs) - 1
            check((m.finish_reason != pb.FINISH_REASON_UNSPECIFIED) == last,
                  "message %d of %d: finish_reason %d" % (i, len(msgs), m.finish_reason))
            check(m.request_id == msgs[0].request_id and m.request_id, "request_id %r" % m.request_id)
            ids += m.token_ids
            idx += m.token_indices
            times += m.token_times_ms
            text += m.text
        check(idx == list(range(len(ids))), "indices %s" % idx)
        check(all(a <= b for a, b in zip(times, times[1:])), "token times go back: %s" % times)
        end = msgs[-1]
        check(end.HasField("usage") and end.HasField("timing"), "last message lacks usage/timing")
        check(end.usage.completion_tokens == len(ids), "usage %d vs %d tokens" % (end.usage.completion_tokens, len(ids)))
        if ids:
            check(0 < end.timing.ttft_ms <= end.timing.e2e_ms, "timing %s" % end.timing)
        return msgs, ids, text

    def generate_text():
        n = args.max_new_tokens
        req = pb.GenerateRequest(text=prompt, max_new_tokens=n, request_id="py-text-1",
                                 sampling=pb.SamplingParams(temperature=0.0))
        msgs, ids, text = generate(req)
        end = msgs[-1]
        check(end.request_id == "py-text-1", "request_id %r" % end.request_id)
        check(1 <= len(ids) <= n, "%d tokens for max %d" % (len(ids), n))
        if end.finish_reason == pb.FINISH_REASON_LENGTH:
            check(len(ids) == n, "LENGTH after %d of %d tokens" % (len(ids), n))
        if "ids" in state:
            check(end.usage.prompt_tokens == len(state["ids"]),
                  "prompt_tokens %d, Tokenize said %d" % (end.usage.prompt_tokens, len(state["ids"])))
        state["greedy"] = ids
        state["text"] = text
        print("     text prompt -> %d tokens in %d messages: %r" % (len(ids), len(msgs), text), flush=True)

    run("generate_text_stream", generate_text)

    def generate_ids():
        check("ids" in state and "greedy" in state, "needs tokenize and generate_text_stream")
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=state["ids"]), max_new_tokens=args.max_new_tokens,
                                 sampling=pb.SamplingParams(temperature=0.0))
        msgs, ids, text = generate(req)
        check(ids == state["greedy"], "greedy from ids %s != from text %s" % (ids, state["greedy"]))
        check(text == state["text"], "text %r != %r" % (text, state["text"]))

    run("generate_token_ids_same_greedy", generate_ids)

    def generate_n_greedy():
        # n = 3 in one call: every message names its choice; greedy, each choice is the greedy
        # output of one choice alone
        check("greedy" in state, "needs generate_text_stream")
        req = pb.GenerateRequest(text=prompt, max_new_tokens=args.max_new_tokens, n=3,
                                 sampling=pb.SamplingParams(temperature=0.0))
        ids, ends = {}, {}
        for m in api.Generate(req, timeout=60):
            check(m.index not in ends, "choice %d: a message after its last" % m.index)
            ids.setdefault(m.index, []).extend(m.token_ids)
            if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                ends[m.index] = m
        check(sorted(ends) == [0, 1, 2], "choices that finished: %s" % sorted(ends))
        for i in range(3):
            check(ids[i] == state["greedy"], "choice %d: %s != %s" % (i, ids[i], state["greedy"]))
            check(ends[i].usage.completion_tokens == len(ids[i]), "choice %d usage" % i)

    run("generate_n_greedy", generate_n_greedy)

    def invalid_argument():
        for req, field in [
            (pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
            (pb.GenerateRequest(text=""), "text"),
            (pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(temperature=-1.0)), "temperature"),
        ]:
            try:
                list(api.Generate(req, timeout=10))
                raise Failure("%s: accepted" % field)
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "%s: %s %s" % (field, e.code(), e.details()))
                check(field in e.details(), "%s: message %r does not name the field" % (field, e.details()))

    run("invalid_argument", invalid_argument)

    def cancel_then_serve():
        req = pb.GenerateRequest(text=prompt, max_new_tokens=64, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0))
        call = api.Generate(req, timeout=60)
        next(call)
        call.cancel()
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.CANCELLED, "after cancel: %s" % e.code())
        msgs, ids, _ = generate(pb.GenerateRequest(text=prompt, max_new_tokens=4,
                                                   sampling=pb.SamplingParams(temperature=0.0)))
        check(len(ids) >= 1, "no token after a cancel")

    run("cancel_then_serve", cancel_then_serve)

    def cluster_status():
        r = api.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        check(r.model, "empty model name")
        check(r.serving, "serving false while Health says SERVING")
        check(r.world_size >= 1 and r.max_model_len > 0 and r.vocab_size > 0, "world/limits %s" % r)
        check(len(r.instances) >= 1, "no instance")
        for i in r.instances:
            check(i.pool != pb.POOL_KIND_UNSPECIFIED, "instance %d: pool unset" % i.id)
            check(len(i.ranks) == i.ep_size >= 1, "instance %d: %d ranks, ep %d" % (i.id, len(i.ranks), i.ep_size))
            check(i.kv_blocks_used + i.kv_blocks_free <= i.kv_blocks_total,
                  "instance %d: kv %d+%d > %d" % (i.id, i.kv_blocks_used, i.kv_blocks_free, i.kv_blocks_total))
        check(sum(p.instances for p in r.pools) == len(r.instances) == r.totals.instances, "pool sums")
        check(sum(p.kv_blocks_used for p in r.pools) == r.totals.kv_blocks_used, "kv used sums")
        check(r.counters.requests_received >= 2, "requests_received %d" % r.counters.requests_received)
        check(r.counters.requests_rejected_invalid >= 3, "rejected_invalid %d" % r.counters.requests_rejected_invalid)
        check(r.counters.generated_tokens >= 1, "generated_tokens %d" % r.counters.generated_tokens)

    run("cluster_status", cluster_status)

    def health_watch_unimplemented():
        try:
            next(health.Watch(hpb.HealthCheckRequest(service=""), timeout=5))
            raise Failure("Watch answered")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNIMPLEMENTED, "Watch: %s" % e.code())

    run("health_watch_unimplemented", health_watch_unimplemented)

    failed = [n for n, e in results if e is not None]
    print("%d passed, %d failed%s" % (len(results) - len(failed), len(failed),
                                      (": " + " ".join(failed)) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
