"""Generates the tokenizer fixtures under tests/reference/fixtures/tokenizers/.

For each tokenizer (trained in-process by train_tokenizers.py, plus two variants that exercise the
rarer tokenizer.json options) it writes NAME/tokenizer.json, and one expected.json holding, for a
test corpus unlike the training corpus, what Hugging Face `tokenizers` gives: the ids without and
with special tokens, and the decode of those ids (and of some hand-picked id sequences) with
skip_special_tokens false and true. versions.txt records the versions that produced them.

    python3 tests/reference/gen_tokenizer_fixtures.py [OUT_DIR]

Strings that contain NUL are stored hex-encoded under "<field>_hex" (cJSON strings stop at NUL).
"""

import json
import os
import platform
import random
import sys

import tokenizers
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tokenizers as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "fixtures", "tokenizers")

# Unlike the training corpus on purpose: new words, new scripts, new emoji, odd whitespace.
TEST_TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "a",
    "Hello, world!",
    "The mixture routes tokens; experts compute, then combine.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "I'll go, you'd stay, we're done, they've left, she's here, it's OK, I'm fine.",
    "DON'T SHOUT: IT'S 'QUOTED' AND \"DOUBLE\"",
    "def route(x, k=2):\n    scores = gate(x)\n    return topk(scores, k)\n",
    "if (a && b) {\n\t\treturn -1;\n\t}\n\telse { x += 0x1F; }",
    "trailing spaces    \nand    internal     runs\t\t\tof tabs",
    "\n\n\n\n",
    " \t \n \r\n ",
    "line\r\nwindows\r\n\r\n",
    "1234567890 3.14159 -42 +7 1e-9 2,718 100%",
    "Order #66 shipped on 2025-03-14 at 09:26:53.",
    "深度混合专家模型在推理时只激活一部分参数。",
    "日本語のテキストとカタカナ、ひらがな。",
    "Tiếng Việt có dấu: người, được, những.",
    "Ελληνικά και Русский и עברית و العربية",
    "emoji 🤖🧠💡 skin tones 👋🏻👋🏿 family 👩‍👩‍👧‍👦 flag 🏳️‍🌈 🇩🇪",
    "keycap 1️⃣ #️⃣ and zwj 🧑‍💻 done",
    "Ünïcödé àccénts: crème brûlée, piñata, façade, Øresund, Łódź",
    "e\u0301 composed? \u00e9 vs e\u0301 vs \u212b and \u2126",
    "ﬁ ligature, ①②③, ｆｕｌｌｗｉｄｔｈ, ²³, ½",
    "mixed: abc123def 456ghi jkl_789 CamelCaseWord snake_case_word",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] question [/INST] answer</s>",
    "literal <s> and </s> and <unk> in text",
    "<|im_start|<|im_end|><|endoftext|><|endoftext|>",
    "almost special: <|endoftext| <0x41> <0xZZ> <|im_start",
    "\ufffd replacement, \ufeffbom, zero\u200bwidth, nbsp\u00a0here, ideographic\u3000space",
    "controls \x01\x02\x1f\x7f and nel\u0085 and ls\u2028ps\u2029 and mongolian\u180eseparator",
    "nul\x00inside",
    "noncharacters \uffff \U0010ffff private \ue000 \U000f0000",
    "mojibake: Ã©tÃ© â€™ â€œ",
    "a" * 300,
    "ab " * 120,
]


def _hexable(rec, key, value):
    if "\x00" in value:
        rec[key + "_hex"] = value.encode("utf-8").hex()
    else:
        rec[key] = value


# Written with merges in the older "left right" string form (Mixtral's file has it); HF itself
# saves the newer ["left", "right"] form, so the file is rewritten after saving.
LEGACY_MERGES = {"sentencepiece_legacy", "options"}


def _rewrite_legacy_merges(path):
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))


def _options_variant():
    """Byte-level BPE with the rarer options: NFKC, Digits + Split behaviours, added tokens with
    lstrip/rstrip/single_word/normalized, a BOS/EOS template, legacy merges, ignore_merges."""
    base = T.byte_level_tokenizer(vocab_size=600, style="gpt2")
    spec = json.loads(base.to_str())
    top = max(spec["model"]["vocab"].values())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"},
        {"type": "Replace", "pattern": {"Regex": "\\r\\n"}, "content": "\n"},
    ]}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    ]}
    spec["model"]["ignore_merges"] = True
    spec["added_tokens"] += [
        {"id": top + 2, "content": "<tool>", "single_word": False, "lstrip": True, "rstrip": True,
         "normalized": False, "special": False},
        {"id": top + 3, "content": "mixture", "single_word": True, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
        {"id": top + 4, "content": "<|pad|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
    ]
    eot = spec["added_tokens"][0]["id"]
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot],
                                              "tokens": ["<|endoftext|>"]}}},
    ]}
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def build_tokenizers():
    return {
        "qwen2": T.byte_level_tokenizer(vocab_size=700, style="qwen2"),
        "gpt2": T.byte_level_tokenizer(vocab_size=600, style="gpt2"),
        "sentencepiece": T.sentencepiece_tokenizer(vocab_size=800),
        "sentencepiece_legacy": T.sentencepiece_tokenizer(vocab_size=700, legacy=True),
        "options": _options_variant(),
    }


def decode_cases(tok, rng):
    """Id sequences beyond encode's output: out-of-range ids, lone and broken byte pieces."""
    n = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    cases = [[], [n + 5], [0, 1, 2, n, n + 1]]
    # Byte-level: pieces of a 3-byte character, then a broken one; SentencePiece: <0xNN> runs.
    for s in (["ä½", "ł"], ["ä", "½ł", "Ġ"], ["<0xE4>", "<0xBD>"], ["<0xE4>", "<0xBD>", "<0xA0>", "<0x41>"],
              ["<0xE4>", "<0xFF>", "▁a"], ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]):
        ids = [vocab[t] for t in s if t in vocab]
        if ids:
            cases.append(ids)
    for _ in range(12):
        cases.append([rng.randrange(n + 2) for _ in range(rng.randint(1, 16))])
    return cases


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    os.makedirs(out, exist_ok=True)
    rng = random.Random(1234)
    expected = {"generator": "tests/reference/gen_tokenizer_fixtures.py", "tokenizers": {}}
    for name, tok in build_tokenizers().items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"), pretty=False)
        if name in LEGACY_MERGES:
            _rewrite_legacy_merges(os.path.join(d, "tokenizer.json"))
        # Re-load what was written, so the expectations describe exactly the file on disk.
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        records = []
        for text in TEST_TEXTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            ids_sp = tok.encode(text, add_special_tokens=True).ids
            rec = {"ids": ids, "ids_special": ids_sp}
            _hexable(rec, "text", text)
            _hexable(rec, "decode", tok.decode(ids_sp, skip_special_tokens=False))
            _hexable(rec, "decode_skip", tok.decode(ids_sp, skip_special_tokens=True))
            records.append(rec)
        decodes = []
        for ids in decode_cases(tok, rng):
            rec = {"ids": ids}
            _hexable(rec, "decode", tok.decode(ids, skip_special_tokens=False))
            _hexable(rec, "decode_skip", tok.decode(ids, skip_special_tokens=True))
            decodes.append(rec)
        expected["tokenizers"][name] = {
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "records": records,
            "decodes": decodes,
        }
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(out, "versions.txt"), "w") as f:
        f.write(f"python {platform.python_version()}\n")
        f.write(f"tokenizers {tokenizers.__version__}\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
