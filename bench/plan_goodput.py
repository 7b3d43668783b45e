#!/usr/bin/env python3
"""Attainment and goodput per rank under a tight and a loose TPOT SLO, measured and simulated,
from bench/plan_goodput.sh's results (issue 14).

Usage: bench/plan_goodput.py OUT_DIR LAYOUTS [--ttft-ms A] [--tight-ms B] [--loose-ms C] [--target F]

Both SLOs are judged on the same per-request records (moe-bench --jsonl / moe-plan simulate
--jsonl: TTFT and TPOT of every request of every rate), the way report.c judges them: a request
attains when it succeeded, TTFT <= A and TPOT <= B (one-token requests: TTFT only). Goodput is
DistServe's: the highest rate whose attainment is at least the target, interpolated linearly
between the swept rates (as rp_sweep_goodput). Writes OUT_DIR/attainment_vs_rate.png (matplotlib).
"""
import argparse
import collections
import json
import os


def runs(path):
    """{rate: [request records]} from a sweep's JSON lines (requests precede their summary)."""
    out, pending = collections.OrderedDict(), []
    for line in open(path):
        if not line.startswith("{"):
            continue
        j = json.loads(line)
        if j.get("type") == "request":
            pending.append(j)
        elif j.get("type") == "summary" and j.get("rate") is not None:
            out[j["rate"]] = pending
            pending = []
    return out


def attainment(reqs, ttft, tpot):
    good = 0
    for r in reqs:
        t = r.get("tpot_ms")
        good += bool(r.get("ok")) and r["ttft_ms"] <= ttft and (t is None or r["n_tokens"] < 2 or t <= tpot)
    return good / len(reqs) if reqs else 0


def goodput(rates, att, target):
    for i, a in enumerate(att):
        if a >= target:
            continue
        if i == 0:
            return 0.0
        return rates[i - 1] + (att[i - 1] - target) / (att[i - 1] - a) * (rates[i] - rates[i - 1])
    return rates[-1] if rates else 0.0  # at least this: every swept rate met the target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("layouts")
    ap.add_argument("--ttft-ms", type=float, default=1000)
    ap.add_argument("--tight-ms", type=float, default=15)
    ap.add_argument("--loose-ms", type=float, default=40)
    ap.add_argument("--target", type=float, default=0.9)
    a = ap.parse_args()
    slos = [("tight", a.tight_ms), ("loose", a.loose_ms)]
    rows, curves = [], []
    for spec in a.layouts.split(";"):
        name, np_, _flags, simlay = spec.split("|")
        key = name.replace(" ", "_").replace("+", "_")
        ranks = int(np_) - 1
        res = {}
        for src in ("real", "sim"):
            p = os.path.join(a.out, "%s.%s.jsonl" % (key, src))
            res[src] = runs(p) if os.path.exists(p) else {}
        for slo, tpot in slos:
            cells = {}
            for src, rr in res.items():
                rates = sorted(rr)
                att = [attainment(rr[r], a.ttft_ms, tpot) for r in rates]
                g = goodput(rates, att, a.target)
                capped = rates and all(x >= a.target for x in att)
                cells[src] = (g, capped, dict(zip(rates, att)))
                curves.append((slo, name, src, rates, att))
            rows.append((name, simlay, ranks, slo, tpot, cells))
    load = {}
    for spec in a.layouts.split(";"):
        name = spec.split("|")[0]
        p = os.path.join(a.out, name.replace(" ", "_").replace("+", "_") + ".load")
        load[name] = open(p).read().strip() if os.path.exists(p) else "?"
    print("| layout | worker ranks | TPOT SLO | load (before / after) | attainment by rate, measured / simulated | goodput measured | goodput simulated | per rank measured / simulated |")
    print("|---|---|---|---|---|---|---|---|")
    for name, simlay, ranks, slo, tpot, cells in rows:
        r, s = cells.get("real"), cells.get("sim")
        att = ", ".join("%g: %.0f/%.0f%%" % (k, 100 * v, 100 * s[2].get(k, float("nan")))
                        for k, v in r[2].items()) if r and s else ""
        fmt = lambda c: ("≥ %.2f" if c[1] else "%.2f") % c[0]
        print("| %s (`%s`) | %d | %s ≤ %g ms | %s | %s | %s | %s | %.2f / %.2f |" % (
            name, simlay, ranks, slo, tpot, load[name], att, fmt(r), fmt(s), r[0] / ranks, s[0] / ranks))
    print("\n(TTFT ≤ %g ms in both SLOs, target attainment %.0f%%; ≥: every swept rate met it)" % (
        a.ttft_ms, 100 * a.target))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (slo, tpot) in zip(axes, slos):
        for i, (s_, name, src, rates, att) in enumerate(c for c in curves if c[0] == slo):
            ax.plot(rates, [100 * x for x in att], marker="o" if src == "real" else "x",
                    linestyle="-" if src == "real" else "--", color="C%d" % (i // 2),
                    label="%s %s" % (name, "measured" if src == "real" else "simulated"))
        ax.axhline(100 * a.target, color="grey", linewidth=0.8)
        ax.set_title("TTFT <= %g ms, TPOT <= %g ms (%s)" % (a.ttft_ms, tpot, slo))
        ax.set_xlabel("rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "attainment_vs_rate.png"), dpi=110)


if __name__ == "__main__":
    main()
