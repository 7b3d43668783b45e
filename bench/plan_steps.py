#!/usr/bin/env python3
"""The live cluster's engine steps against moe-plan's step model (issue 14).

Usage: bench/plan_steps.py PROFILE.json STEPS.RANK.jsonl... [--json]

The step files are the workers' MOE_STEP_TRACE output (worker/worker_loop.c: one line per engine
step: wall and process CPU ns, prefill/decode tokens, attention positions); bench/plan_check.sh
records them for every live run. For each rank and kind of step (decode only, prefill only,
mixed) it prints how the live steps compare with the profile's prediction for the same tokens and
attention work: live CPU / profiled CPU (the engine's work: should be near 1), live wall / live CPU
(time spent waiting for a core: the machine's load and our own ranks sharing it), and live wall /
profiled wall (what the first simulator assumed). Bench-only: the simulator itself is C
(tools/moe_plan/costs.c); this re-reads the same profile fields to judge them."""
import json
import statistics as st
import sys


def curve(prof, key, k_key):
    tok, ms, k = prof["step"]["tokens"], prof["step"][key], prof["step"][k_key]

    def f(n, attn):  # costs.c interp(): linear between points, flat below the first
        if n <= tok[0] or len(tok) == 1:
            t = ms[0] if n <= tok[0] else ms[0] * n / tok[0]
        else:
            i = 1
            while i < len(tok) - 1 and n > tok[i]:
                i += 1
            t = ms[i - 1] + (ms[i] - ms[i - 1]) * (n - tok[i - 1]) / (tok[i] - tok[i - 1])
        return max(t, 0) + k * attn
    return f


def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))]


def main(argv):
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    prof = json.load(open(argv[0]))
    wall = curve(prof, "ms", "attn_ms")
    cpu = curve(prof, "ms_cpu", "attn_cpu_ms") if "ms_cpu" in prof["step"] else None
    out = []
    for path in argv[1:]:
        groups = {}
        for line in open(path):
            r = json.loads(line)
            n, a = r["prefill_tokens"] + r["decode_tokens"], r["attn_positions"]
            kind = "decode" if r["prefill_tokens"] == 0 else "prefill" if r["decode_tokens"] == 0 else "mixed"
            groups.setdefault(kind, []).append((n, a, r["step_ns"] / 1e6, r["cpu_ns"] / 1e6))
        for kind, g in sorted(groups.items()):
            row = {"file": path, "kind": kind, "steps": len(g), "tokens_p50": st.median([x[0] for x in g]),
                   "wall_ms_sum": sum(x[2] for x in g), "cpu_ms_sum": sum(x[3] for x in g)}
            ratios = {"wall_over_cpu": [x[2] / x[3] for x in g if x[3] > 0],
                      "wall_over_profiled_wall": [x[2] / wall(x[0], x[1]) for x in g]}
            if cpu:
                ratios["cpu_over_profiled_cpu"] = [x[3] / cpu(x[0], x[1]) for x in g]
            for k, v in ratios.items():
                row[k] = {"mean": sum(v) / len(v), "p10": q(v, 0.1), "p50": q(v, 0.5), "p90": q(v, 0.9)}
            out.append(row)
    if as_json:
        for row in out:
            print(json.dumps(row))
        return 0
    print("| steps file | kind | steps | tokens p50 | live CPU / profiled CPU (p10 p50 p90) | live wall / live CPU (p50 mean p90) | live wall / profiled wall (p50) |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        c = r.get("cpu_over_profiled_cpu")
        print("| %s | %s | %d | %g | %s | %.2f %.2f %.2f | %.2f |" % (
            r["file"].split("/")[-1], r["kind"], r["steps"], r["tokens_p50"],
            "%.2f %.2f %.2f" % (c["p10"], c["p50"], c["p90"]) if c else "n/a",
            r["wall_over_cpu"]["p50"], r["wall_over_cpu"]["mean"], r["wall_over_cpu"]["p90"],
            r["wall_over_profiled_wall"]["p50"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
