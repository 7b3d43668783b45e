#!/usr/bin/env python3
"""Writes the synthetic traces of bench/traces/ (deterministic: numpy-free, random.Random(seed)).

Shaped like published traces, with lengths scaled down so that this repository's small benchmark
model (8192-token context, 2 CPU cores) serves them in minutes; the scale of each is in its
description below and in bench/traces/README.md. Arrival timestamps are at a mean of 1 request/s
(replay with `moe-bench --trace F --rate R` to rescale them).

  chat.jsonl     Mooncake JSONL. Multi-turn conversations like Azure's 2023 conversation trace
                 (prompt median ~1020 tokens, output ~129; Patel et al., Splitwise) and Mooncake's
                 conversation trace (turns share their history: hash_ids repeat). Lengths / 8
                 (input) and / 4 (output); hash blocks of 64 tokens (Mooncake's 512 / 8: replay with
                 --hash-block 64). Poisson session starts, turns 2-20 s apart.
  code.csv       CSV timestamp_ms,input_tokens,output_tokens. Azure's 2023 code trace: long prompts
                 (median ~1500), short outputs (median ~13), bursty arrivals (gamma, CV 2).
                 Input / 8, output as is.
  longsum.jsonl  Mooncake JSONL. Long-context summarisation (LongBench-like: 6k-14k-token
                 documents, 200-500-token summaries). Input / 8, output / 4. Poisson.
"""
import json
import math
import os
import random
import sys

N = 200


def lognorm(rng, mean, cv, lo, hi):
    s2 = math.log(1 + cv * cv)
    v = rng.lognormvariate(math.log(mean) - s2 / 2, math.sqrt(s2))
    return int(min(hi, max(lo, round(v))))


def chat(rng):
    rows, t, next_hash, sessions = [], 0.0, 1, []
    # Sessions start as a Poisson process; each has 1-6 turns whose prompt is the history plus a
    # new user message; the history's blocks keep their hash ids (Mooncake's prefix sharing).
    while len(rows) < N:
        t += rng.expovariate(1 / 2.5)
        hist, hashes, tt = 0, [], t
        for _ in range(rng.randint(1, 6)):
            new = lognorm(rng, 60, 0.9, 4, 1200)
            out = lognorm(rng, 32, 0.8, 1, 256)
            n_in = hist + new
            need = (n_in + 63) // 64
            while len(hashes) < need:
                hashes.append(next_hash)
                next_hash += 1
            rows.append({"timestamp": int(tt * 1000), "input_length": n_in, "output_length": out,
                         "hash_ids": hashes[:need]})
            hist = n_in + out
            tt += rng.uniform(2, 20)
            # The answer joins the history: its blocks past the prompt's get new ids next turn.
            hashes = hashes[: n_in // 64]
            if hist > 3000:
                break
    rows.sort(key=lambda r: r["timestamp"])
    rows = rows[:N]
    span = rows[-1]["timestamp"] - rows[0]["timestamp"]
    k = (N - 1) * 1000 / span  # mean 1 request/s
    for r in rows:
        r["timestamp"] = int((r["timestamp"] - rows[0]["timestamp"]) * k)
    return rows


def code(rng):
    rows, t, shape = [], 0.0, 1 / 4.0  # gamma CV 2: shape 1/CV^2
    for _ in range(N):
        rows.append((int(t * 1000), lognorm(rng, 190, 0.7, 16, 2000), lognorm(rng, 16, 1.0, 1, 200)))
        t += rng.gammavariate(shape, 1 / shape)
    return rows


def longsum(rng):
    rows, t = [], 0.0
    for i in range(N):
        n_in = lognorm(rng, 1100, 0.3, 600, 1800)
        rows.append({"timestamp": int(t * 1000), "input_length": n_in,
                     "output_length": lognorm(rng, 80, 0.35, 40, 160),
                     "hash_ids": list(range(100000 + i * 100, 100000 + i * 100 + (n_in + 63) // 64))})
        t += rng.expovariate(1.0)
    return rows


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "traces")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "chat.jsonl"), "w") as f:
        for r in chat(random.Random(1)):
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "code.csv"), "w") as f:
        f.write("timestamp,input_tokens,output_tokens\n")
        for r in code(random.Random(2)):
            f.write("%d,%d,%d\n" % r)
    with open(os.path.join(out, "longsum.jsonl"), "w") as f:
        for r in longsum(random.Random(3)):
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
