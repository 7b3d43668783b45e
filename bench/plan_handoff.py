#!/usr/bin/env python3
"""Where a disaggregated hand-off's time goes, request by request (issue 14, bench/RESULTS.md).

Reads one run of bench/plan_handoff.sh: moe-bench's request lines (PREFIX.real.jsonl, with the
run's start on the monotonic clock, clock0_ns), the workers' hand-off trace (MOE_KV_TRACE,
PREFIX.kv.RANK.jsonl) and step trace (MOE_STEP_TRACE, PREFIX.steps.RANK.jsonl), all on the same
monotonic clock. Each request is matched to the prefill-side sequence that parked last before its
first token reached moe-bench; its first-to-second token gap is split into:
  offer:   park (first token sampled, offer sent) -> the decode rank read the offer
  data:    offer read -> the last slice of the push received (the decode rank's poll saw it)
  resume:  last slice -> resumed in the decode engine
  token:   resumed -> the second token at moe-bench (a decode step and the token path)
and, for the data wait, whether the prefill rank was inside another engine step meanwhile and how
long after the prefill rank's last MPI progress point (a layer boundary of that step, the step's
progress hook between matmuls, a loop turn)
the last slice was seen: if the slices move only inside the prefill side's MPI calls, the slow
hand-offs end just after such a point.
Usage: bench/plan_handoff.py PREFIX [--rows N]"""
import bisect
import glob
import json
import sys


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))] if v else float("nan")


def load_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    pre = sys.argv[1]
    rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 12
    reqs = [r for r in load_lines(pre + ".real.jsonl") if r.get("type") == "request"]
    kv = {}
    for f in glob.glob(pre + ".kv.*.jsonl"):
        for e in load_lines(f):
            kv.setdefault(e["rank"], []).append(e)
    steps = {}
    for f in glob.glob(pre + ".steps.*.jsonl"):
        for s in load_lines(f):
            steps.setdefault(s["rank"], []).append(s)
    prank = next((r for r, ev in kv.items() if any(e["ev"] == "park" for e in ev)), None)
    drank = next((r for r, ev in kv.items() if any(e["ev"] == "offer_in" for e in ev)), None)
    if prank is None or drank is None:
        print("no hand-offs traced (MOE_KV_TRACE unset, or not a disaggregated cluster)")
        return
    by_seq = {}
    for r in (prank, drank):
        for e in kv[r]:
            by_seq.setdefault(e["seq"], {}).setdefault((r, e["ev"]), []).append(e)
    # (time, seq, prompt tokens): a request is the sequence of its prompt's length parked last before
    # its first token came (several park together when one step prefills several prompts).
    parks = sorted((v[(prank, "park")][0]["t_ns"], s, v[(prank, "park")][0]["arg"]) for s, v in by_seq.items()
                   if (prank, "park") in v)
    # The prefill rank's MPI progress points: layer boundaries inside its steps and its step ends
    # (the loop polls every transfer right after a step and while idle).
    psteps = sorted(steps.get(prank, []), key=lambda s: s["t0_ns"])
    step_spans = [(s["t0_ns"], s["t0_ns"] + s["step_ns"]) for s in psteps]
    points = sorted([e["t_ns"] for e in kv[prank] if e["ev"] in ("layer", "progress")] + [b for _, b in step_spans])

    def in_step(t0, t1):
        """ns of [t0, t1) the prefill rank spent inside engine steps."""
        return sum(max(0, min(b, t1) - max(a, t0)) for a, b in step_spans)

    dsteps = sorted(steps.get(drank, []), key=lambda s: s["t0_ns"])
    dstarts = [s["t0_ns"] for s in dsteps]
    taken, out = set(), []
    for r in reqs:
        if not r.get("ok") or "second_token_gap_ms" not in r:
            continue
        c0 = r["clock0_ns"]
        t1 = c0 + r["arrival_s"] * 1e9 + r["ttft_ms"] * 1e6
        t2 = t1 + r["second_token_gap_ms"] * 1e6
        i = bisect.bisect_right(parks, (t1, float("inf"), 0)) - 1
        while i >= 0 and (parks[i][1] in taken or parks[i][2] != r["n_in"]):
            i -= 1
        if i < 0:
            continue
        tp, seq, _ = parks[i]
        taken.add(seq)
        ev = by_seq[seq]
        first = lambda k: ev[(drank, k)][0]["t_ns"] if (drank, k) in ev else None
        t_off, t_res = first("offer_in"), first("resumed")
        recv0 = [e["t_ns"] for e in ev.get((drank, "recv"), []) if e["arg"] == 0]
        t_land = recv0[0] if recv0 else None
        if t_off is None or t_res is None or t_land is None:
            continue
        t_land = max(t_land, t_off)  # a push that landed before its offer waits for it
        k = bisect.bisect_left(dstarts, t_res)
        ds = dsteps[k] if k < len(dsteps) else None
        d_wait = (ds["t0_ns"] - t_res) / 1e6 if ds else float("nan")
        d_step = ds["step_ns"] / 1e6 if ds else float("nan")
        d_cpu = ds["cpu_ns"] / 1e6 if ds else float("nan")
        d_path = (t2 - ds["t0_ns"] - ds["step_ns"]) / 1e6 if ds else float("nan")
        j = bisect.bisect_right(points, t_land) - 1
        last_pt = points[j] if j >= 0 else tp
        out.append(dict(i=r["i"], seq=seq, n_in=r["n_in"], gap=r["second_token_gap_ms"],
                        offer=(t_off - tp) / 1e6, data=(t_land - t_off) / 1e6, resume=(t_res - t_land) / 1e6,
                        token=(t2 - t_res) / 1e6, d_wait=d_wait, d_step=d_step, d_cpu=d_cpu, d_path=d_path,
                        busy=in_step(tp, t_land) / 1e6,
                        after_pt=(t_land - max(last_pt, tp)) / 1e6,
                        left=(ev[(prank, "left")][0]["t_ns"] - tp) / 1e6 if (prank, "left") in ev else float("nan")))
    if not out:
        print("no request matched a traced hand-off")
        return
    gaps = [o["gap"] for o in out]
    print("%d hand-offs matched of %d requests; gap p50 / p90 / p99 = %.1f / %.1f / %.1f ms" % (
        len(out), len(reqs), pct(gaps, .5), pct(gaps, .9), pct(gaps, .99)))
    print("| req | prompt | gap ms | offer | data | resume | token | prefill in a step during data | "
          "data end after prefill's last progress point | all slices left (prefill) after park | "
          "token = wait for a decode step + its wall (CPU) + token path |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for o in sorted(out, key=lambda o: -o["gap"])[:rows]:
        print("| %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f + %.1f (%.1f) + %.1f |" % (
            o["i"], o["n_in"], o["gap"], o["offer"], o["data"], o["resume"], o["token"], o["busy"],
            o["after_pt"], o["left"], o["d_wait"], o["d_step"], o["d_cpu"], o["d_path"]))
    slow = [o for o in out if o["gap"] > 2 * pct(gaps, .5)]
    rest = [o for o in out if o["gap"] <= 2 * pct(gaps, .5)]
    for name, grp in (("slow (gap > 2x median)", slow), ("the others", rest)):
        if not grp:
            continue
        print("%s: %d; p50 of: data %.1f ms, prefill in a step during it %.1f ms, data end after the "
              "prefill's last progress point %.1f ms, offer %.1f ms, token %.1f ms (wait %.1f + step %.1f, CPU %.1f, + path %.1f)" % (
                  name, len(grp), pct([o["data"] for o in grp], .5), pct([o["busy"] for o in grp], .5),
                  pct([o["after_pt"] for o in grp], .5), pct([o["offer"] for o in grp], .5),
                  pct([o["token"] for o in grp], .5), pct([o["d_wait"] for o in grp], .5),
                  pct([o["d_step"] for o in grp], .5), pct([o["d_cpu"] for o in grp], .5),
                  pct([o["d_path"] for o in grp], .5)))
    print("JSON " + json.dumps({"n": len(out), "gap_p50": pct(gaps, .5), "gap_p90": pct(gaps, .9),
                                "gap_p99": pct(gaps, .99), "slow": len(slow),
                                "data_p90": pct([o["data"] for o in out], .9)}))


if __name__ == "__main__":
    main()
