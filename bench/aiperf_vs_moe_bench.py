#!/usr/bin/env python3
"""aiperf (NVIDIA's OpenAI-API benchmark, PyPI) against our HTTP API, next to our moe-bench against
the gRPC API, on one synthetic Mooncake-format trace and one cluster: both replay the trace's
timestamps (fixed schedule) and its lengths; prints each tool's TTFT and ITL (p50, p90) and their
ratio.

Usage: PYTHONPATH=STUBS:tests/integration MOE_BUILD_DIR=build python3 bench/aiperf_vs_moe_bench.py [OUT_DIR]
(STUBS: the Python gRPC stubs of proto/, as tests/integration/run.sh makes them; AIPERF: the
aiperf executable, default .venv-aiperf/bin/aiperf as scripts/install-py-deps.sh installs it).
Not a CI test: timings depend on the machine and its load. The same requests are not byte-identical: aiperf makes prompt text from its own
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


def hf_cache_for(model, out):
    """aiperf 0.13 loads tokenizers in offline mode in its prompt-synthesis workers, where a local
    directory is looked up as a hub repo id and fails: give it the model's tokenizer as a hub
    cache entry (moeserve/NAME at revision main) instead, and run aiperf offline."""
    name = "moeserve/" + os.path.basename(model)
    repo = os.path.join(out, "hf", "hub", "models--" + name.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", "0" * 40)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0" * 40)
    for fn in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        dst = os.path.join(snap, fn)
        if not os.path.exists(dst):
            os.symlink(os.path.join(model, fn), dst)
    return name, os.path.join(out, "hf", "hub")


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
    aiperf = os.environ.get("AIPERF") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                      ".venv-aiperf", "bin", "aiperf")
    tok_name, hub = hf_cache_for(model, out)
    with Cluster(np=3, model=model, args=["--http-listen", "127.0.0.1:0", "--max-requests", "512"]) as c:
        port = int(re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr()).group(1))
        mb = subprocess.run([os.path.join(build_dir(), "moe-bench"), "--addr", "127.0.0.1:%d" % c.port,
                             "--trace", trace, "--hash-block", str(BLOCK), "--json", "--no-progress"],
                            capture_output=True, text=True, timeout=300, check=True)
        ours = json.loads(mb.stdout.strip().splitlines()[-1])
        cmd = [aiperf, "profile", "--model", os.path.basename(model), "--url", "http://127.0.0.1:%d" % port,
               "--endpoint-type", "completions", "--streaming", "--input-file", trace,
               "--custom-dataset-type", "mooncake_trace", "--fixed-schedule",
               "--prompt-input-tokens-block-size", str(BLOCK), "--tokenizer", tok_name,
               "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
               "--use-server-token-count", "--random-seed", "1", "--ui-type", "none", "--output-artifact-dir", out]
        print("$ " + " ".join(cmd), flush=True)
        env = dict(os.environ, HF_HUB_CACHE=hub, HF_HUB_OFFLINE="1")
        ap = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if ap.returncode != 0:
            print(ap.stdout[-4000:], ap.stderr[-4000:])
            return 1
        c.stop()
    with open(os.path.join(out, "profile_export_aiperf.json")) as f:
        theirs = json.load(f)
    # aiperf's inter_token_latency is per request, (e2e - TTFT) / (output tokens - 1): moe-bench's
    # TPOT; moe-bench's own ITL is every gap between streamed messages (several tokens can share
    # one, hence a p50 near 0), shown beside it
    res = {"requests": len(rows), "aiperf_completed": theirs["request_count"]["avg"],
           "moe_bench_ok": ours["ok"]}
    for name, ak, mk in (("ttft", "time_to_first_token", "ttft_ms"),
                         ("itl_per_request", "inter_token_latency", "tpot_ms")):
        for p in ("p50", "p90"):
            av, mv = theirs[ak][p], ours[mk][p]
            res["%s_%s_ms" % (name, p)] = {"aiperf_http": round(av, 3), "moe_bench_grpc": round(mv, 3),
                                           "ratio": round(av / mv, 2) if mv else None}
    res["moe_bench_itl_gaps_ms"] = {p: ours["itl_ms"][p] for p in ("p50", "p90", "p99")}
    res["output_tokens"] = {"aiperf": theirs["total_osl"]["avg"] if isinstance(theirs.get("total_osl"), dict)
                            else theirs.get("total_osl"), "moe_bench": ours["output_tokens"],
                            "trace": sum(r["output_length"] for r in rows)}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
