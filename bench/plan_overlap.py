#!/usr/bin/env python3
"""Our own ranks' steps against each other (issue 14, bench/RESULTS.md): for each rank's step trace
(MOE_STEP_TRACE, KEY.steps.RANK.jsonl), the wall/CPU ratio of its steps split by whether another
rank of the same cluster was in a step when the step began (by start time, so that a step's own
length does not select it). Usage: bench/plan_overlap.py PREFIX... (PREFIX.steps.*.jsonl)."""
import glob
import json
import sys


def pct(v, p):
    v = sorted(v)
    return "%.2f" % v[int(p * (len(v) - 1))] if v else "-"


for pre in sys.argv[1:]:
    files = sorted(glob.glob(pre + ".steps.*.jsonl"))
    steps = {f: [json.loads(line) for line in open(f)] for f in files}
    for f in files:
        others = [(s["t0_ns"], s["t0_ns"] + s["step_ns"]) for g in files if g != f for s in steps[g]]
        busy, alone = [], []
        for s in steps[f]:
            r = s["step_ns"] / max(1, s["cpu_ns"])
            (busy if any(a <= s["t0_ns"] < b for a, b in others) else alone).append(r)
        print("%s rank %s: another stepping at start: %d steps, wall/CPU p50 %s p90 %s; none: %d steps, p50 %s p90 %s"
              % (pre, f.rsplit(".", 2)[-2], len(busy), pct(busy, .5), pct(busy, .9), len(alone), pct(alone, .5),
                 pct(alone, .9)))
