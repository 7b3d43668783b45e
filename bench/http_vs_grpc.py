#!/usr/bin/env python3
"""HTTP (OpenAI API, SSE) next to gRPC on the same cluster: client-side TTFT, time between streamed
chunks and token throughput at N concurrent streams, both front ends in the same run; then the
server's own figure for each front end's added latency per streamed token (the backend's push to
the bytes handed to gRPC core / libmicrohttpd), logged by moe-serve at shutdown.

Usage: PYTHONPATH=STUBS:tests/integration MOE_BUILD_DIR=build python3 bench/http_vs_grpc.py [N...]
(STUBS: Python gRPC stubs from proto/, as tests/integration/run.sh makes them). Not a CI test:
timings depend on the machine and its load; record the CPU with the figures.
"""
import json
import os
import re
import socket
import statistics
import sys
import threading
import time

from cluster import Cluster, build_dir
import moeserve_pb2 as pb

PROMPT = "Mixture-of-Experts models route each token"
MAX_NEW = 32


def http_stream(port, out):
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_NEW, "ignore_eos": True, "temperature": 0,
                       "stream": True}).encode()
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    times, buf = [], b""  # buf: the whole response, kept for debugging
    while True:
        b = s.recv(65536)
        if not b:
            break
        now = time.perf_counter()
        buf += b
        # one timestamp per non-empty text chunk seen in this read (chunks carry one step's text)
        times += [now] * len(re.findall(rb'"text":"[^"]', b))
    s.close()
    out.append((t0, times))


def grpc_stream(stub, out):
    t0 = time.perf_counter()
    times = []
    for r in stub.Generate(pb.GenerateRequest(text=PROMPT, max_new_tokens=MAX_NEW, ignore_eos=True,
                                              sampling=pb.SamplingParams(temperature=0.0)), timeout=300):
        if r.token_ids:
            times.append(time.perf_counter())
    out.append((t0, times))


def run(n, fn, arg):
    out = []
    th = [threading.Thread(target=fn, args=(arg, out)) for _ in range(n)]
    start = time.perf_counter()
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.perf_counter() - start
    ttft = [ts[0] - t0 for t0, ts in out if ts]
    gaps = [b - a for _, ts in out for a, b in zip(ts, ts[1:])]
    return {"streams": n, "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "gap_p50_ms": 1e3 * statistics.median(gaps) if gaps else 0,
            "tokens_per_s": n * MAX_NEW / wall}


def main():
    ns = [int(x) for x in sys.argv[1:]] or [16, 64]
    model = os.path.join(build_dir(), "models", "tiny")
    with Cluster(np=3, model=model, args=["--http-listen", "127.0.0.1:0", "--max-requests", "512"]) as c:
        port = int(re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr()).group(1))
        for n in ns:
            for name, fn, arg in (("grpc", grpc_stream, c.stub), ("http", http_stream, port)):
                r = run(n, fn, arg)
                print("%-4s %s" % (name, json.dumps({k: round(v, 2) for k, v in r.items()})), flush=True)
        c.stop()
        # the server's side: what each front end adds per streamed token (push -> transport),
        # over the whole run (run one N per invocation to attribute it), and the token path
        for line in c.stderr().splitlines():
            if "front end: push -> transport" in line or "token path worker -> front end" in line:
                print("server: " + line.split(": ", 1)[1], flush=True)


if __name__ == "__main__":
    main()
