#!/usr/bin/env python3
"""Writes tests/reference/fixtures/models/*: tiny random MoE models built, saved and run by Hugging
Face transformers itself, with the logits and greedy continuations HF computes for them.

Run by hand (never in CI) after changing a model or a prompt:

    python3 tests/reference/gen_model_fixtures.py            # rewrites every fixture
    python3 tests/reference/gen_model_fixtures.py --only mixtral_f32

Deterministic: fixed seeds, one CPU thread, deterministic torch algorithms. Every fixture directory
holds what moe_model_load reads (config.json, generation_config.json, model.safetensors,
tokenizer.json) plus cases.json and reference/*.bin (little-endian float32 logits, row-major
(n_prompt, vocab)). See tests/reference/README.md for what each model covers.

The script asserts, and refuses to write fixtures that would make the C test flaky or toothless:
  - along every recorded greedy path the top-1 vs top-2 logit margin exceeds MIN_MARGIN (bf16:
    the logit tolerance the C test grants bf16, which is larger);
  - at every position the runtime computes (prompts and greedy paths), each MoE layer's k-th and
    (k+1)-th router logits differ by more than MIN_ROUTER_GAP, so f32 rounding cannot swap an
    expert (which would move the logits by far more than any tolerance);
  - every expert of every MoE layer is picked somewhere (the router really varies);
  - the prompts batched with left padding + attention mask give the same logits and greedy tokens
    as one at a time.
When a new seed is needed, `--search-seeds N --only NAME` tries seeds from the listed one upwards
and prints the first that passes; put it into MODELS.
"""

import argparse
import json
import os
import platform
import shutil
import sys

import numpy as np
import torch
import tokenizers
import transformers
from transformers import (GenerationConfig, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_tokenizers import byte_level_tokenizer, sentencepiece_tokenizer  # noqa: E402

OUT_DIR = os.path.join(HERE, "fixtures", "models")
PROMPT_LENGTHS = (1, 5, 17, 40)
N_GREEDY = 32
# Greedy paths whose top-2 logits are closer than this could flip on summation order alone.
MIN_MARGIN = 1e-3
# f32 logits: the runtime must match HF within this (accumulation order only).
F32_ABS_TOL = 1e-4
# bf16 weights: the C test compares the runtime against HF run in f32 on the same bf16 weights and
# allows |diff| <= BF16_REL_TOL * max(1, max|ref|) (see tests/unit/test_reference.c for why). The
# bf16 greedy paths must be unambiguous under that tolerance.
BF16_REL_TOL = 1e-3
# Router logits of the chosen experts vs the best unchosen one, at every computed position.
MIN_ROUTER_GAP = 1e-4
# --new-tokenizers: train tokenizers again instead of keeping the fixtures' tokenizer.json.
NEW_TOKENIZERS = False

# Source texts for the prompts: each prompt is the first L tokens of one of these, provided that
# decoding those L tokens and encoding the text again gives the same ids (so text and ids agree).
SOURCE_TEXTS = [
    "The quick brown fox jumps over the lazy dog while the experts route every token.",
    "Hello",
    "def route(x, gate):\n    scores = softmax(gate @ x)\n    return topk(scores, 2)\n",
    "Mixture-of-Experts models route each token to a few experts chosen by a small gating network;"
    " a serving cluster splits the prompt phase from the decode phase so they stop interfering.",
    "Prices rose 3.5% in 2023, from $1,299.99 to $1,345.50 — volume was 12345678 units. 今天天气很好，"
    "我们去公园散步吧。Emoji: 😀 🚀 and Café, naïve, Zürich.",
    "Once upon a time, in a land far away, there lived a king who loved numbers and riddles, and "
    "every morning he asked his ministers: \"What is 17 times 23?\" Nobody ever knew.",
]

ROPE_DEFAULT = "default"


def rope(theta):
    return {"rope_type": ROPE_DEFAULT, "rope_theta": float(theta)}


# One entry per fixture. init_std is the std of every matrix (HF's default 0.02 gives nearly
# uniform routers and flat logits on models this small); emb_std is the embedding's.
MODELS = [
    dict(
        name="mixtral_f32",
        covers="Mixtral: softmax router over 8 experts, top-2 renormalised, SwiGLU experts w1/w2/w3, "
               "GQA 4/2 heads, rope_theta 1e6, SentencePiece-style tokenizer with BOS.",
        config_cls=MixtralConfig, model_cls=MixtralForCausalLM, dtype="float32",
        seed=1102, init_std=0.2, emb_std=1.0,
        tokenizer=("sentencepiece", 500), eos=["</s>"], bos="<s>",
        config=dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                    rope_parameters=rope(1e6), tie_word_embeddings=False, sliding_window=None),
    ),
    dict(
        name="qwen2_moe_f32",
        covers="Qwen2-MoE (Qwen1.5-MoE): q/k/v bias, shared expert with its sigmoid gate, "
               "norm_topk_prob=false, mlp_only_layers=[1] so layer 1 is a dense MLP, "
               "use_sliding_window=false (transformers then saves sliding_window=0), rope_theta 1e4, "
               "model vocab larger than the tokenizer's.",
        config_cls=Qwen2MoeConfig, model_cls=Qwen2MoeForCausalLM, dtype="float32",
        seed=2202, init_std=0.2, emb_std=1.0,
        tokenizer=("qwen2", 600), eos=["<|endoftext|>"], bos=None,
        config=dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=48, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[1], qkv_bias=True,
                    max_position_embeddings=512, rms_norm_eps=1e-6, rope_parameters=rope(1e4),
                    use_sliding_window=False, sliding_window=4096, max_window_layers=3,
                    tie_word_embeddings=False),
    ),
    dict(
        name="olmoe_f32",
        covers="OLMoE: q_norm/k_norm over the whole q and k projections (before RoPE), clip_qkv "
               "active, norm_topk_prob=false, no biases, rope_theta 1e4, GPT-2-style tokenizer.",
        config_cls=OlmoeConfig, model_cls=OlmoeForCausalLM, dtype="float32",
        seed=3304, init_std=0.2, emb_std=1.0,
        tokenizer=("gpt2", 500), eos=["<|endoftext|>"], bos=None,
        config=dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                    num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=2.5,
                    max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters=rope(1e4),
                    attention_bias=False, tie_word_embeddings=False),
    ),
    dict(
        name="qwen3_moe_f32",
        covers="Qwen3-MoE: per-head q/k RMSNorm, head_dim=24 != hidden/heads=16, "
               "norm_topk_prob=true, tie_word_embeddings=true (no lm_head tensor), rope_theta 1e6, "
               "two EOS ids.",
        config_cls=Qwen3MoeConfig, model_cls=Qwen3MoeForCausalLM, dtype="float32",
        seed=4404, init_std=0.2, emb_std=0.5,
        tokenizer=("qwen2", 900), eos=["<|im_end|>", "<|endoftext|>"], bos=None,
        config=dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
                    rms_norm_eps=1e-6, rope_parameters=rope(1e6), attention_bias=False,
                    use_sliding_window=False, tie_word_embeddings=True),
    ),
    dict(
        name="qwen3_moe_bf16",
        covers="Qwen3-MoE saved in bfloat16: reference logits from HF in f32 on the same bf16 "
               "weights (what the C test compares against) and from HF computing in bf16; "
               "head_dim=32, norm_topk_prob=true, untied lm_head.",
        config_cls=Qwen3MoeConfig, model_cls=Qwen3MoeForCausalLM, dtype="bfloat16",
        seed=5509, init_std=0.2, emb_std=1.0,
        tokenizer=("qwen2", 600), eos=["<|im_end|>", "<|endoftext|>"], bos=None,
        config=dict(vocab_size=608, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
                    rms_norm_eps=1e-6, rope_parameters=rope(1e6), attention_bias=False,
                    use_sliding_window=False, tie_word_embeddings=False),
    ),
]


def make_tokenizer(kind, vocab_size):
    if kind == "sentencepiece":
        return sentencepiece_tokenizer(vocab_size)
    return byte_level_tokenizer(vocab_size, style=kind)


def pick_prompts(tok):
    """For each length L, the first L ids of a source text whose decoded text re-encodes to them."""
    prompts = []
    used = set()
    for L in PROMPT_LENGTHS:
        found = None
        for si, src in enumerate(SOURCE_TEXTS):
            if si in used:
                continue
            ids = tok.encode(src).ids
            if len(ids) < L:
                continue
            ids = ids[:L]
            text = tok.decode(ids, skip_special_tokens=True)
            if tok.encode(text).ids == ids:
                found = (si, text, ids)
                break
        if found is None:
            raise SystemExit(f"no source text gives a round-tripping prompt of {L} tokens")
        used.add(found[0])
        prompts.append({"text": found[1], "ids": found[2]})
    return prompts


def reinit(model, seed, init_std, emb_std):
    """Re-initialises every parameter from one generator, in named_parameters order (tied weights
    appear once). Norm weights are 1 + noise and biases are noise, so that a runtime ignoring a
    norm weight or a bias is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if p.ndim == 1 and name.endswith("bias"):
                v = 0.2 * torch.randn(shape, generator=g)
            elif p.ndim == 1:
                v = 1.0 + 0.2 * torch.randn(shape, generator=g)
            elif "embed_tokens" in name:
                v = emb_std * torch.randn(shape, generator=g)
            else:
                v = init_std * torch.randn(shape, generator=g)
            p.copy_(v.to(p.dtype))


def build(spec, tok):
    cfg_kw = dict(spec["config"])
    eos_ids = [tok.token_to_id(t) for t in spec["eos"]]
    bos_id = tok.token_to_id(spec["bos"]) if spec["bos"] else None
    assert all(i is not None for i in eos_ids), spec["eos"]
    cfg = spec["config_cls"](**cfg_kw, bos_token_id=bos_id,
                             eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
                             pad_token_id=None, initializer_range=spec["init_std"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    model = spec["model_cls"](cfg)
    reinit(model, spec["seed"], spec["init_std"], spec["emb_std"])
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        do_sample=False)
    model.eval()
    return model, eos_ids, bos_id


@torch.no_grad()
def forward_logits(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    return model(input_ids=x, use_cache=False).logits[0].float()


@torch.no_grad()
def greedy(model, ids, n):
    """Greedy by full recomputation (EOS is not special): returns (tokens, margins)."""
    seq = list(ids)
    toks, margins, scale = [], [], 0.0
    for _ in range(n):
        last = forward_logits(model, seq)[-1]
        top = torch.topk(last, 2)
        toks.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        scale = max(scale, float(last.abs().max()))
        seq.append(toks[-1])
    return toks, margins, scale


@torch.no_grad()
def greedy_cached(model, ids, n):
    """HF's own KV-cache path, as a cross-check of greedy()."""
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, use_cache=True)
    cache = out.cache
    toks = []
    nxt = int(out.logits[0, -1].argmax())
    for i in range(n):
        toks.append(nxt)
        if i == n - 1:
            break
        pos = torch.tensor([[len(ids) + i]])
        out = model(input_ids=torch.tensor([[nxt]]), cache=cache, position_ids=pos,
                    use_cache=True)
        cache = out.cache
        nxt = int(out.logits[0, -1].argmax())
    return toks


@torch.no_grad()
def batched(model, seqs, pad_id):
    """Left-padded batch forward with attention mask and positions from the mask."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, T - len(s):] = torch.tensor(s)
        mask[b, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()


@torch.no_grad()
def check_batch(model, prompts, singles_logits, singles_greedy, pad_id, tol):
    """The same prompts batched with left padding must equal the single runs."""
    seqs = [list(p["ids"]) for p in prompts]
    logits = batched(model, seqs, pad_id)
    T = logits.shape[1]
    worst = 0.0
    for b, s in enumerate(seqs):
        d = float((logits[b, T - len(s):] - singles_logits[b]).abs().max())
        worst = max(worst, d)
    assert worst <= tol, f"batched prompt logits differ from single ones by {worst}"
    gen = [[] for _ in seqs]
    for _ in range(N_GREEDY):
        last = batched(model, seqs, pad_id)[:, -1]
        for b in range(len(seqs)):
            t = int(last[b].argmax())
            gen[b].append(t)
            seqs[b].append(t)
    for b in range(len(seqs)):
        assert gen[b] == singles_greedy[b], f"batched greedy of prompt {b} differs"
    return worst


@torch.no_grad()
def router_stats(model, seqs):
    """Runs seqs through the model with hooks on the routers. Returns {layer: set of experts
    picked} and the smallest gap between the k-th and (k+1)-th router logit seen anywhere."""
    k = model.config.num_experts_per_tok
    used = {}
    gap = [float("inf")]
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate") or name.endswith("block_sparse_moe.gate"):
            def hook(m, inp, out, name=name):
                logits = (out[0] if isinstance(out, tuple) else out).float()
                top = torch.topk(logits, k + 1, dim=-1)
                used.setdefault(name, set()).update(int(i) for i in top.indices[:, :k].flatten())
                gap[0] = min(gap[0], float((top.values[:, k - 1] - top.values[:, k]).min()))
            hooks.append(mod.register_forward_hook(hook))
    for s in seqs:
        forward_logits(model, s)
    for h in hooks:
        h.remove()
    return used, gap[0]


class Rejected(Exception):
    """The fixture would be flaky or toothless with this seed."""


def write_bin(path, t):
    a = np.ascontiguousarray(t.detach().float().numpy().astype("<f4"))
    a.tofile(path)


def n_moe_layers(cfg):
    if isinstance(cfg, MixtralConfig) or isinstance(cfg, OlmoeConfig):
        return cfg.num_hidden_layers
    return sum(1 for i in range(cfg.num_hidden_layers)
               if i not in (cfg.mlp_only_layers or []) and (i + 1) % cfg.decoder_sparse_step == 0)


def generate_one(spec, write=True):
    """Builds, checks and (if write) writes one fixture. Raises Rejected if a check fails."""
    name = spec["name"]
    out = os.path.join(OUT_DIR, name)
    tk, tv = spec["tokenizer"]
    # The committed tokenizer.json is kept: train_tokenizers' SentencePiece-style trainer is not
    # reproducible across processes (tokenizers' limit_alphabet breaks ties between equally rare
    # characters in hash order), and a new tokenizer would change every prompt.
    kept = os.path.join(out, "tokenizer.json")
    if os.path.exists(kept) and not NEW_TOKENIZERS:
        tok = tokenizers.Tokenizer.from_file(kept)
    else:
        tok = make_tokenizer(tk, tv)
    model_vocab = spec["config"]["vocab_size"]
    assert tok.get_vocab_size() <= model_vocab, (tok.get_vocab_size(), model_vocab)
    model, eos_ids, bos_id = build(spec, tok)
    prompts = pick_prompts(tok)
    # Padding never reaches a valid position, so any id will do.
    pad_id = model_vocab - 1

    bf16 = spec["dtype"] == "bfloat16"
    if bf16:
        # Round the weights to bf16 once; the reference is HF computing in f32 on those weights.
        model_bf16 = model.to(torch.bfloat16)
        model_f32 = spec["model_cls"](model.config).eval()
        model_f32.load_state_dict({k: v.float() for k, v in model_bf16.state_dict().items()})
        ref = model_f32
    else:
        ref = model

    cases = []
    singles_logits, singles_greedy = [], []
    for p in prompts:
        L = len(p["ids"])
        lg = forward_logits(ref, p["ids"])
        assert tuple(lg.shape) == (L, model_vocab)
        toks, margins, scale = greedy(ref, p["ids"], N_GREEDY)
        need = BF16_REL_TOL * max(1.0, scale, float(lg.abs().max())) if bf16 else MIN_MARGIN
        if min(margins) <= need:
            raise Rejected(f"{name} len{L}: greedy margin {min(margins):.3g} <= {need:.3g} at step "
                           f"{int(np.argmin(margins))}")
        if greedy_cached(ref, p["ids"], N_GREEDY) != toks:
            raise Rejected(f"{name} len{L}: HF's KV-cache greedy differs from recomputation")
        case = {"name": f"len{L}", "text": p["text"], "prompt_ids": p["ids"],
                "logits_file": f"reference/len{L}.logits.f32.bin", "logits_shape": [L, model_vocab],
                "greedy_ids": toks, "greedy_text": tok.decode(toks, skip_special_tokens=False),
                "greedy_min_margin": min(margins)}
        case["_logits"] = lg
        if bf16:
            lb = forward_logits(model_bf16, p["ids"])
            gb, _, _ = greedy(model_bf16, p["ids"], N_GREEDY)
            case.update(logits_bf16compute_file=f"reference/len{L}.logits_bf16compute.f32.bin",
                        greedy_ids_bf16compute=gb,
                        bf16compute_max_abs_diff=float((lb - lg).abs().max()))
            case["_logits_bf16"] = lb
        singles_logits.append(lg)
        singles_greedy.append(toks)
        cases.append(case)

    # Every position whose output is recorded: prompts and greedy paths (the last token is never fed).
    used, gap = router_stats(ref, [c["prompt_ids"] + c["greedy_ids"][:-1] for c in cases])
    n_exp = getattr(ref.config, "num_local_experts", None) or ref.config.num_experts
    if len(used) != n_moe_layers(ref.config):
        raise Rejected(f"{name}: found routers {sorted(used)}, expected {n_moe_layers(ref.config)}")
    for lname, chosen in used.items():
        if len(chosen) != n_exp:
            raise Rejected(f"{name}: {lname} only picks experts {sorted(chosen)}")
    if gap <= MIN_ROUTER_GAP:
        raise Rejected(f"{name}: router top-k gap {gap:.3g} <= {MIN_ROUTER_GAP}")

    batch_diff = check_batch(ref, prompts, singles_logits, singles_greedy, pad_id, F32_ABS_TOL / 2)

    print(f"{name} seed {spec['seed']}: batch diff {batch_diff:.2e}, logit std "
          f"{float(torch.cat(singles_logits).std()):.2f}, max |logit| "
          f"{float(torch.cat(singles_logits).abs().max()):.2f}, router gap {gap:.2e}, "
          f"min margins {[round(c['greedy_min_margin'], 4) for c in cases]}")
    if bf16:
        print("  bf16 compute vs f32: max abs diff "
              f"{[round(c['bf16compute_max_abs_diff'], 4) for c in cases]}, greedy equal "
              f"{[c['greedy_ids_bf16compute'] == c['greedy_ids'] for c in cases]}")
    if not write:
        return

    # Written next to the old fixture and swapped in at the end, so a rejection leaves it intact.
    tmp = os.path.join(OUT_DIR, f".{name}.new")
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "reference"))
    (model_bf16 if bf16 else model).save_pretrained(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    # What the runtime reads is the saved file, not the model in memory: reload it (transformers 5
    # converts its fused in-memory experts back to per-expert tensors on save) and check that every
    # weight came back bit for bit and that the reloaded config gives the reference logits (up to
    # the kernels from_pretrained picks, ~1e-6).
    again = spec["model_cls"].from_pretrained(tmp, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    want = ref.state_dict()
    for k, v in again.state_dict().items():
        if k not in want or not torch.equal(v, want[k]):
            shutil.rmtree(tmp)
            raise Rejected(f"{name}: saved tensor {k} does not reload as the reference's")
    for c in cases:
        d = float((forward_logits(again, c["prompt_ids"]) - c["_logits"]).abs().max())
        if d > F32_ABS_TOL / 10:
            shutil.rmtree(tmp)
            raise Rejected(f"{name} {c['name']}: reloaded fixture differs from the reference by {d}")
    for c in cases:
        write_bin(os.path.join(tmp, c["logits_file"]), c.pop("_logits"))
        if bf16:
            write_bin(os.path.join(tmp, c["logits_bf16compute_file"]), c.pop("_logits_bf16"))

    doc = {
        "model": name,
        "architecture": spec["model_cls"].__name__,
        "covers": spec["covers"],
        "weights_dtype": spec["dtype"],
        "vocab_size": model_vocab,
        "tokenizer": {"style": tk, "vocab_size": tok.get_vocab_size()},
        "bos_id": bos_id,
        "eos_ids": eos_ids,
        "seed": spec["seed"],
        "greedy_new_tokens": N_GREEDY,
        "greedy_note": "argmax over raw logits, EOS not special (ignore_eos); greedy_min_margin is "
                       "the smallest top-1 minus top-2 logit along the path",
        "router_min_topk_gap": gap,
        "batch_left_padded_max_abs_diff": batch_diff,
    }
    if bf16:
        doc["reference"] = ("HF forward in float32 on the bf16 weights (upcast exactly); "
                            "logits_bf16compute_file / greedy_ids_bf16compute: HF computing in "
                            "bfloat16, for information only")
        doc["tolerance"] = {"logits_rel": BF16_REL_TOL,
                            "rule": "max|diff| <= logits_rel * max(1, max|ref|) per case"}
    else:
        doc["reference"] = "HF forward in float32"
        doc["tolerance"] = {"logits_max_abs": F32_ABS_TOL}
    doc["cases"] = cases
    with open(os.path.join(tmp, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="fixture name(s) to regenerate")
    ap.add_argument("--search-seeds", type=int, default=0, metavar="N",
                    help="try N seeds upwards from the listed one; print the first that passes")
    ap.add_argument("--new-tokenizers", action="store_true",
                    help="train the tokenizers again instead of keeping each fixture's tokenizer.json")
    args = ap.parse_args()
    global NEW_TOKENIZERS
    NEW_TOKENIZERS = args.new_tokenizers
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT_DIR, exist_ok=True)
    failed = False
    for spec in MODELS:
        if args.only and spec["name"] not in args.only:
            continue
        if args.search_seeds:
            base = spec["seed"]
            for seed in range(base, base + args.search_seeds):
                try:
                    generate_one(dict(spec, seed=seed), write=False)
                    print(f"{spec['name']}: seed {seed} passes")
                    break
                except Rejected as e:
                    print(f"  seed {seed}: {e}")
            continue
        try:
            generate_one(spec)
        except Rejected as e:
            print(f"REJECTED: {e} (try --search-seeds)", file=sys.stderr)
            failed = True
    if args.search_seeds:
        return 0
    with open(os.path.join(HERE, "versions.txt"), "w") as f:
        f.write(f"python {platform.python_version()}\n")
        f.write(f"torch {torch.__version__}\n")
        f.write(f"transformers {transformers.__version__}\n")
        f.write(f"tokenizers {tokenizers.__version__}\n")
        f.write(f"numpy {np.__version__}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
