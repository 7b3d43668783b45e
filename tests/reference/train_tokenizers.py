"""Small Hugging Face tokenizers trained in-process, shaped like the ones real MoE models ship.

Importable by any fixture generator (tests/reference/*.py): nothing is downloaded, the training
corpus is embedded below, and vocabularies are kept small so the tokenizer.json files stay small.

    byte_level_tokenizer(vocab_size=600, style="qwen2")  # Qwen2/Qwen1.5-MoE/Qwen3-MoE shape
    byte_level_tokenizer(vocab_size=600, style="gpt2")   # GPT-2 / OLMoE shape
    sentencepiece_tokenizer(vocab_size=600)               # Llama-2 / Mixtral shape

Each returns a `tokenizers.Tokenizer`; call `.save(path)` to write tokenizer.json.
"""

import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

# The pre-tokenizer pattern of Qwen2 (and Qwen1.5-MoE / Qwen3-MoE): letters with one leading
# non-letter, single digits, punctuation runs, newline runs, and whitespace that keeps the last
# space for the next word.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_SPECIALS = ["<|endoftext|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]

# Varied on purpose: prose, indented code, CJK, emoji, numbers, whitespace runs, accented Latin.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "It's a truth universally acknowledged that they'll say we've done what I'd have done.",
    "Mixture-of-Experts models route each token to a few experts chosen by a small gating network.",
    "A serving cluster splits the prompt phase from the decode phase so they stop interfering.",
    "Once upon a time, in a land far away, there lived a king who loved numbers and riddles.",
    "She said: \"Hello, world!\" and he answered (quietly): 'good morning, everyone...'",
    "Prices rose 3.5% in 2023, from $1,299.99 to $1,345.50; volume was 12345678 units.",
    "Call 555-0199 or write to info@example.com before 2024-12-31 23:59:59 UTC.",
    "The years 1066, 1492, 1776, 1914 and 1969 appear in many history books.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n\tif (sum > limit) break;\n}\n",
    "class Expert:\n    def __init__(self, d_model, d_ff):\n        self.w1 = Linear(d_model, d_ff)\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    "if x == y and not z:\n        print('equal')\n    else:\n        print(\"different\")\n",
    "    indented with four spaces\n        and eight\n\t\ttwo tabs\n\n\nthree newlines",
    "many     spaces   between    words and trailing spaces   \n   leading spaces",
    "line one\r\nline two\r\n\r\nline four after a blank line",
    "机器学习是人工智能的一个分支。深度学习使用多层神经网络。",
    "今天天气很好，我们去公园散步吧。明天可能会下雨。",
    "東京は日本の首都です。ひらがなとカタカナと漢字を使います。",
    "한국어 문장도 조금 넣어 봅니다. 안녕하세요, 반갑습니다!",
    "Emoji: 😀 😃 😄 😁 🎉 🚀 ❤️ 👍 👍🏽 🇫🇷 🇯🇵 and more 🙂",
    "Café, naïve, résumé, jalapeño, São Paulo, Zürich, Kraków, Ångström, façade, coöperate.",
    "Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Українська: Добрий день.",
    "العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया।",
    "Tabs\tseparate\tcolumns\tin\tTSV\tfiles\t1\t2\t3",
    "Math: x^2 + y^2 = z^2, e^(i*pi) + 1 = 0, sum_{k=1}^{n} k = n(n+1)/2, 3.14159.",
    "JSON: {\"id\": 17, \"name\": \"expert_3\", \"weights\": [0.25, -1.5e-3, 7]}",
    "URLs like https://example.org/path?q=mixture&lang=en#top are common in web text.",
    "I'M SHOUTING, YOU'RE LISTENING, WE'VE HEARD, THEY'LL KNOW, HE'D SAY, IT'S DONE.",
    "lowercase words follow uppercase WORDS and MiXeD CaSe Words in the same line.",
    "The expert parallel all-to-all exchange dispatches tokens and combines their outputs.",
    "Numbers again: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 10000 3.0 2.5 -7 +8 1e10",
    "Punctuation!!! Really??? Yes... No--maybe; (perhaps) [certainly] {never} <always>",
    "Whitespace at the end\n\n",
    "   ",
    "\n\n\n\t\t\t    \n",
]


def _corpus_iter(repeat=3):
    # Repeating the corpus gives the trainer enough pair counts to learn merges of small vocabs.
    for _ in range(repeat):
        for line in CORPUS:
            yield line


def byte_level_tokenizer(vocab_size=600, style="qwen2"):
    """A byte-level BPE tokenizer. style="qwen2": NFC + Qwen2 Split regex + ByteLevel(use_regex=False);
    style="gpt2": ByteLevel(use_regex=True) with the GPT-2 pattern (OLMoE-like)."""
    if style not in ("qwen2", "gpt2"):
        raise ValueError(f"style must be 'qwen2' or 'gpt2', not {style!r}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = QWEN2_SPECIALS
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        specials = GPT2_SPECIALS
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus_iter(), trainer=trainer)
    # Specials go after the learned vocabulary, as in Qwen2 (ids 151643..) and OLMoE.
    tok.add_special_tokens(specials)
    return tok


def sentencepiece_tokenizer(vocab_size=600, legacy=False):
    """A Llama-2 / Mixtral shaped BPE: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then merges;
    byte_fallback, Metaspace(prepend_scheme="first", split=False), BOS added by the template.
    legacy=True: the older file layout (Mixtral-8x7B's): no pre-tokenizer, normalizer
    Sequence[Prepend("▁"), Replace(" ", "▁")]."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    # Trained on words (split=True) so merges never cross a word start, as SentencePiece's; the
    # shipped pre-tokenizer (below) keeps the text whole, as Llama-2's tokenizer.json does.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    byte_tokens = ["<0x%02X>" % b for b in range(256)]
    n_fixed = len(SP_SPECIALS) + len(byte_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(byte_tokens), len(SP_SPECIALS) + 64),
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SP_SPECIALS),
        # SentencePiece keeps rare characters out of the vocabulary; byte fallback covers them.
        limit_alphabet=120,
    )
    tok.train_from_iterator(_corpus_iter(), trainer=trainer)

    # Re-number the vocabulary into Llama's layout: specials, the 256 byte tokens, then the rest.
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {}
    for t in SP_SPECIALS + byte_tokens:
        vocab[t] = len(vocab)
    for t, _ in learned:
        if t not in vocab:
            vocab[t] = len(vocab)
    assert len(vocab) >= n_fixed
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t in SP_SPECIALS
    ]
    spec["pre_tokenizer"]["split"] = False
    if legacy:
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]}
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", vocab["<s>"])],
    )
    return tok


if __name__ == "__main__":
    for name, t in (("qwen2", byte_level_tokenizer(style="qwen2")),
                    ("gpt2", byte_level_tokenizer(style="gpt2")),
                    ("sentencepiece", sentencepiece_tokenizer())):
        enc = t.encode("Hello world! 你好 😀\n\tdef f(x):  return 42")
        print(name, t.get_vocab_size(), enc.ids[:24], repr(t.decode(enc.ids)))
