#!/usr/bin/env python3
"""Scales a measured moe-plan profile to another model shape, for planning layouts of models this
machine cannot run (issue 14: OLMoE-1B-7B and Qwen3-30B-A3B on 16 and 64 hosts).

  bench/derive_profile.py MEASURED.json SHAPE OUT.json [HOST_SPEEDUP]
      SHAPE: olmoe-1b-7b | qwen3-30b-a3b; HOST_SPEEDUP (default 1): one rank of the target is that
      many times faster than one rank of the measured profile (e.g. 16 for a 16-core host running
      one instance where the profile ran one thread, assuming perfect scaling)

Assumptions (written into the profile's note): the target runs at the measured machine's speed
per weight FLOP of CPU time (the profile's CPU-time fit, step.ms_cpu, where it has one: a
dedicated host, not this shared machine's load) (step times scale with the active weight FLOPs per token of the two shapes), its
attention cost scales with layers x query width, its KV bytes per token and expert share follow
its config (published config.json values, as in tools/moe_gen_model/presets.c); no all-to-all
measurement is kept, so expert-parallel instances use the network model (--link-gbps,
--link-latency-us). It is a planning estimate, not a measurement.
"""
import json
import sys

# hidden, layers, heads, kv_heads, head_dim, experts, top_k, moe_ffn, shared_ffn, vocab
SHAPES = {
    "small": (768, 6, 12, 4, 64, 16, 4, 384, 1536, 8192),
    "olmoe-1b-7b": (2048, 16, 16, 16, 128, 64, 8, 1024, 0, 50304),
    "qwen3-30b-a3b": (2048, 48, 32, 4, 128, 128, 8, 768, 0, 151936),
}


def flops(s):
    d, L, h, kvh, hd, E, k, ffn, sh, V = s
    q, kv = h * hd, kvh * hd
    dense = L * (d * (2 * q + 2 * kv) + d * E + 3 * d * sh) + d * V
    experts = L * k * 3 * d * ffn
    return dense, experts, L * q, 2 * L * kv * 4


def main():
    src, shape, out = sys.argv[1:4]
    speed = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    p = json.load(open(src))
    base = SHAPES["small"]
    tgt = SHAPES[shape]
    bd, be, bq, _ = flops(base)
    td, te, tq, tkv = flops(tgt)
    r = (td + te) / (bd + be) / speed
    # A dedicated host's step takes its CPU time: start from the profile's CPU-time fit where it
    # has one (the wall times carry this shared machine's load of the moment).
    cpu = "ms_cpu" in p["step"]
    st = p["step"]
    st["ms"] = [m * r for m in (st["ms_cpu"] if cpu else st["ms"])]
    st["attn_ms"] = (st["attn_cpu_ms"] if cpu else st["attn_ms"]) * tq / bq / speed
    for k in ("samples", "ms_cpu", "attn_cpu_ms"):
        st.pop(k, None)
    d, L, h, kvh, hd, E, k, ffn, sh, V = tgt
    p["model_shape"] = {"n_layers": L, "moe_layers": L, "hidden": d, "top_k": k, "n_experts": E,
                        "kv_bytes_per_token": tkv, "expert_frac": te / (td + te)}
    p["a2a"] = []
    p["model"] = shape + " (derived)"
    p["note"] = ("derived from %s by bench/derive_profile.py: %s step times x %.2f (active weight FLOPs per "
                 "token), attention x %.2f (host speedup %g); same speed per FLOP as the measured machine; "
                 "all-to-all from the network model" % (src, "CPU" if cpu else "wall", r, tq / bq / speed, speed))
    json.dump(p, open(out, "w"), indent=1)
    print("%s: step times x %.2f, attention x %.2f, KV %d bytes/token, expert share %.2f" % (
        out, r, tq / bq / speed, tkv, te / (td + te)))


if __name__ == "__main__":
    main()
