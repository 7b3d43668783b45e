"""Checks a moe-gen-model output directory against Hugging Face's own libraries (a development
aid, never needed at run time):

    python3 tools/moe_gen_model/verify_hf.py DIR [DIR ...]

For each DIR: tokenizers loads tokenizer.json and round-trips varied text; AutoTokenizer loads
too; the config class re-saves config.json to the same fields (minus the legacy keys we add for
older readers); AutoModelForCausalLM loads the weights with no missing, unexpected or
mis-shaped keys; a short greedy generation runs and its logits are finite; the router spreads
tokens over several experts. Exits non-zero on the first failure.
"""

import json
import math
import os
import sys

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # twice\n\n\tindented\ttabs",
    "机器学习是人工智能的一个分支。東京は日本の首都です。안녕하세요!",
    "Emoji 😀🚀 👍🏽 and numbers 3.14159, 2024-12-31, $1,299.99",
    "   leading spaces, trailing spaces   \n\n\nnewlines\r\nCRLF",
    "Zürich, Kraków, naïve café, Ελληνικά, Привет, مرحبا, नमस्ते",
    "rare bytes: \u0001\u007f \u00ff \U0001f9ea end",
]

# Keys moe-gen-model writes for transformers 4.x and other readers; 5.x folds them away.
LEGACY_KEYS = {"rope_theta"}
LEGACY_KEYS_BY_TYPE = {"qwen3_moe": {"num_experts"}}


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def check_tokenizer(d, cfg):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    spec = json.load(open(os.path.join(d, "tokenizer.json"), encoding="utf-8"))
    metaspace = (spec.get("pre_tokenizer") or {}).get("type") == "Metaspace"
    for s in SAMPLES:
        enc = tok.encode(s, add_special_tokens=False)
        back = tok.decode(enc.ids, skip_special_tokens=False)
        # Metaspace(prepend_scheme="first") adds no "▁" to text that starts with a space, yet the
        # decoder's Strip still drops one leading space: Llama's tokenizer.json does the same.
        expect = s[1:] if metaspace and s.startswith(" ") else s
        if back != expect:
            fail(f"{d}: round trip of {s!r} gave {back!r}")
        if any(i >= cfg["vocab_size"] for i in enc.ids):
            fail(f"{d}: id beyond vocab_size in {enc.ids}")
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    gen = json.load(open(os.path.join(d, "generation_config.json")))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for src in (cfg, gen):
            v = src.get(key)
            for i in (v if isinstance(v, list) else [v]):
                if i is not None and i not in added.values():
                    fail(f"{d}: {key}={i} is not an added special token ({added})")
    n = tok.get_vocab_size(with_added_tokens=True)
    ids = tok.encode("Hello world", add_special_tokens=True).ids
    hf = AutoTokenizer.from_pretrained(d)
    if hf("Hello world")["input_ids"] != ids:
        fail(f"{d}: AutoTokenizer disagrees with tokenizers: {hf('Hello world')['input_ids']} vs {ids}")
    print(f"  tokenizer: {n} tokens, specials {added}, 'Hello world' -> {ids}")
    return tok


def check_config(d, cfg):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(d)
    resaved = json.loads(c.to_json_string(use_diff=True))
    legacy = LEGACY_KEYS | LEGACY_KEYS_BY_TYPE.get(cfg["model_type"], set())
    ours = {k: v for k, v in cfg.items() if k not in legacy}
    if resaved != ours:
        diff = {k: (ours.get(k), resaved.get(k)) for k in set(ours) | set(resaved)
                if ours.get(k) != resaved.get(k)}
        fail(f"{d}: config.json differs from what {type(c).__name__} saves: {diff}")
    print(f"  config: {type(c).__name__} re-saves the same {len(ours)} fields")


def check_model(d, cfg, tok):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        fail(f"{d}: loading info not clean: {bad}")
    model.eval()
    prompt = tok.encode("The experts of the model", add_special_tokens=True).ids
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model(x, output_router_logits=True)
        if not torch.isfinite(out.logits).all():
            fail(f"{d}: non-finite logits")
        gen = model.generate(x, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    new = gen[0, len(prompt):].tolist()
    routers = getattr(out, "router_logits", None) or ()
    chosen = set()
    k = cfg["num_experts_per_tok"]
    for r in routers:
        if r is None:
            continue
        chosen.update(torch.topk(r.float(), k, dim=-1).indices.flatten().tolist())
    n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
    if routers and len(chosen) < min(n_exp, k + 1):
        fail(f"{d}: router picks only experts {sorted(chosen)}")
    std = out.logits.float().std().item()
    print(f"  model: clean load, logits std {std:.2f}, experts used {len(chosen)}/{n_exp}, "
          f"greedy {len(set(new))} distinct of {len(new)}: {tok.decode(new)!r}")
    unknown = [i for i in new if tok.id_to_token(i) is None]
    if unknown:
        fail(f"{d}: greedy decoding picked ids no token has: {unknown}")
    if len(set(new)) < 3:
        fail(f"{d}: degenerate greedy output {new}")
    if not math.isfinite(std):
        fail(f"{d}: bad logits")


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    for d in sys.argv[1:]:
        print(d)
        cfg = json.load(open(os.path.join(d, "config.json")))
        tok = check_tokenizer(d, cfg)
        check_config(d, cfg)
        check_model(d, cfg, tok)
    print("OK")


if __name__ == "__main__":
    main()
