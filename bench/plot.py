#!/usr/bin/env python3
"""Plots from moe-bench / moe-plan JSON lines (--jsonl): attainment vs rate, latency CDFs, and a
timeline of queue depth and KV usage per instance.

  bench/plot.py --out DIR [--title T] FILE[=LABEL] ...

Each FILE is one run (or sweep) of either tool; LABEL names it in the legends (default: the file
name). Writes DIR/attainment_vs_rate.png (when a file holds summaries at several rates),
DIR/latency_cdf.png (TTFT and TPOT of every request; of the highest rate in a sweep) and
DIR/timeline_<label>.png per file that has timeline lines. Needs matplotlib (bench/requirements.txt).
"""
import argparse
import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    rows = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                j = json.loads(line)
                rows[j.get("type", "?")].append(j)
    return rows


def cdf(ax, values, label):
    v = sorted(x for x in values if x is not None)
    if not v:
        return
    ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=label)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    runs = []
    for spec in a.files:
        path, label = (spec, "") if os.path.exists(spec) else spec.rpartition("=")[::2]
        runs.append((label or os.path.basename(path).split(".jsonl")[0], load(path)))
    note = (" - " + a.title) if a.title else ""

    sweeps = [(lab, r) for lab, r in runs if len({s.get("rate") for s in r["summary"]}) > 1]
    if sweeps:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for lab, r in sweeps:
            pts = sorted((s["rate"], s["attainment"]) for s in r["summary"] if s.get("rate") is not None)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=lab)
        s0 = sweeps[0][1]["summary"][0]
        ax.axhline(90, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 102)
        ax.set_title("attainment vs rate (TTFT <= %g ms, TPOT <= %g ms)%s" % (s0["slo_ttft_ms"], s0["slo_tpot_ms"], note.replace(" - ", "\n", 1)),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "attainment_vs_rate.png"), dpi=110)
        plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for lab, r in runs:
        req = r["request"]
        rates = [q.get("rate") for q in req if q.get("rate") is not None]
        if rates:
            top = max(rates)
            req = [q for q in req if q.get("rate") == top]
        cdf(ax1, [q.get("ttft_ms") for q in req if q.get("ok")], lab)
        cdf(ax2, [q.get("tpot_ms") for q in req if q.get("ok") and q.get("n_tokens", 0) > 1], lab)
    for ax, name in ((ax1, "TTFT (ms)"), (ax2, "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("latency CDFs" + note, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "latency_cdf.png"), dpi=110)
    plt.close(fig)

    for lab, r in runs:
        tl = r["timeline"]
        if not tl:
            continue
        rates = [x.get("rate") for x in tl if x.get("rate") is not None]
        if rates:
            top = max(rates)
            tl = [x for x in tl if x.get("rate") == top]
        by = collections.defaultdict(list)
        for x in tl:
            by[(x["instance"], x["pool"])].append(x)
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True)
        for (inst, pool), xs in sorted(by.items()):
            t = [x["t_s"] for x in xs]
            ax1.plot(t, [100.0 * x["kv_used"] / max(1, x["kv_total"]) for x in xs], label="%d %s" % (inst, pool))
            ax2.plot(t, [x["running"] + x["waiting"] for x in xs], label="%d %s: sequences" % (inst, pool))
        q = sorted(by.items())[0][1]
        if "queued" in q[0]:
            ax2.plot([x["t_s"] for x in q], [x["queued"] for x in q], "k--", label="coordinator queue")
        elif "active_streams" in q[0]:
            ax2.plot([x["t_s"] for x in q], [x["active_streams"] for x in q], "k--", label="open streams")
        ax1.set_ylabel("KV blocks used (%)")
        ax2.set_ylabel("requests")
        ax2.set_xlabel("time (s)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle("queue depth and KV usage per instance: %s%s" % (lab, note), fontsize=10)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in lab)
        fig.savefig(os.path.join(a.out, "timeline_%s.png" % safe), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
