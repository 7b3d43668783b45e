#!/usr/bin/env python3
"""aiperf (NVIDIA's OpenAI-API benchmark, PyPI) against our HTTP API, next to our moe-bench against
the gRPC API, on one synthetic Mooncake-format trace and one cluster: both replay the trace's
timestamps (fixed schedule) and its lengths; prints each tool's TTFT and ITL (p50, p90) and their
ratio.

Usage: PYTHONPATH=STUBS:tests/integration MOE_BUILD_DIR=build AIPERF=aiperf \\
       python3 bench/aiperf_vs_moe_bench.py [OUT_DIR]
(STUBS: the Python gRPC stubs of proto/, as tests/integration/run.sh makes them; AIPERF: the
aiperf executable, from scripts/install-py-deps.sh). Not a CI test: timings depend on the machine
and its load. The same requests are not byte-identical: aiperf makes prompt text from its own
corpus for each hash id (the server tokenizes it: lengths within a few tokens), moe-bench sends
token ids; both keep the shared-prefix structure of hash_ids.
"""
import json
import os
import random
import re
import subprocess
import sys
import tempfile

from cluster import Cluster, build_dir

BLOCK = 32  # tokens per hash id (Mooncake's is 512; scaled down with the lengths)


def write_trace(path, n=48, seed=7):
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (shared prefixes)."""
    rng = random.Random(seed)
    t, next_id, rows = 0, 0, []
    prefixes = []
    for _ in range(n):
        t += int(rng.expovariate(1 / 150.0))  # ~6.7 requests/s
        inp = rng.choice([64, 96, 128, 160, 192])
        blocks = inp // BLOCK
        if prefixes and rng.random() < 0.5:  # half share a prefix with an earlier request
            base = rng.choice(prefixes)[: rng.randint(1, blocks)]
        else:
            base = []
        ids = list(base)
        while len(ids) < blocks:
            ids.append(next_id)
            next_id += 1
        prefixes.append(ids)
        rows.append({"timestamp": t, "input_length": inp, "output_length": rng.choice([16, 24, 32]),
                     "hash_ids": ids})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def pct(d, key, *names):
    for n in names:
        if n in d:
            return d[n]
    raise KeyError("%s: none of %s in %s" % (key, names, sorted(d)))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="aiperf-")
    os.makedirs(out, exist_ok=True)
    trace = os.path.join(out, "trace.jsonl")
    rows = write_trace(trace)
    model = os.path.abspath(os.path.join(build_dir(), "models", "tiny"))  # a path, not a hub id
    aiperf = os.environ.get("AIPERF", "aiperf")
    with Cluster(np=3, model=model, args=["--http-listen", "127.0.0.1:0", "--max-requests", "512"]) as c:
        port = int(re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr()).group(1))
        mb = subprocess.run([os.path.join(build_dir(), "moe-bench"), "--addr", "127.0.0.1:%d" % c.port,
                             "--trace", trace, "--hash-block", str(BLOCK), "--json", "--no-progress"],
                            capture_output=True, text=True, timeout=300, check=True)
        ours = json.loads(mb.stdout.strip().splitlines()[-1])
        cmd = [aiperf, "profile", "--model", os.path.basename(model), "--url", "http://127.0.0.1:%d" % port,
               "--endpoint-type", "completions", "--streaming", "--input-file", trace,
               "--custom-dataset-type", "mooncake_trace", "--fixed-schedule",
               "--prompt-input-tokens-block-size", str(BLOCK), "--tokenizer", model,
               "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
               "--random-seed", "1", "--ui-type", "none", "--output-artifact-dir", out]
        print("$ " + " ".join(cmd), flush=True)
        ap = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if ap.returncode != 0:
            print(ap.stdout[-4000:], ap.stderr[-4000:])
            return 1
        c.stop()
    with open(os.path.join(out, "profile_export_aiperf.json")) as f:
        theirs = json.load(f)
    res = {"requests": len(rows)}
    for name, ak in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency")):
        a = theirs[ak] if ak in theirs else theirs["records"][ak]
        m = ours[name]
        for p in ("p50", "p90"):
            av, mv = a[p], pct(m, name, p, p + "_ms")
            res["%s_%s_ms" % (name, p)] = {"aiperf_http": round(av, 2), "moe_bench_grpc": round(mv, 2),
                                           "ratio": round(av / mv, 2) if mv else None}
    req = theirs.get("request_count", {})
    res["aiperf_requests"] = req.get("avg", req) if isinstance(req, dict) else req
    res["moe_bench_ok"] = ours.get("ok", ours.get("completed"))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
