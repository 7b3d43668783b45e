#!/usr/bin/env python3
"""bench/llama_ref.py: the llama.cpp reference for bench/run.sh. Converts a generated Hugging Face
model to GGUF with llama.cpp's own converter (bf16, q8_0), quantizes Q4_0 with llama.cpp's
quantizer, and measures llama.cpp (through llama-cpp-python) with the same thread count: prompt
processing tokens/s for long prompts (--pp, a list) and decode tokens/s at batch 1 from llama.cpp's
own perf counters, decode at other batch sizes (--batches: one token per sequence per step, wall
time), and the peak RSS of the measuring process. Prints `name=value` lines (one block per format) and writes them to --out.

  llama_ref.py --model HF_DIR --name small --threads 2 [--formats bf16,q8_0,q4_0]

Benchmark tooling only: the product never runs Python. The converter is not shipped in the
llama-cpp-python wheel, so it is taken from the sdist of the installed version (pip download, once)
and cached under bench/out/llama/ with every GGUF it writes.

The converter refuses tokenizers whose pre-tokenizer hash it does not know, and our synthetic BPE
tokenizer is unknown to it: we patch that one lookup at run time to fall back to a named
pre-tokenizer (qwen2 / olmo / default). Token ids are fed directly, so the tokenizer plays no part
in the timings.
"""
import argparse
import ctypes
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values (llama.h)


def log(msg):
    print(f"[llama_ref] {msg}", file=sys.stderr, flush=True)


# ---- the converter, from the sdist of the installed llama-cpp-python ----

def converter_dir(cache: Path) -> Path:
    ver = importlib.metadata.version("llama-cpp-python")
    d = cache / f"llama.cpp-{ver}"
    if (d / "convert_hf_to_gguf.py").exists():
        return d
    sdist_dir = cache / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    tars = sorted(sdist_dir.glob(f"llama_cpp_python-{ver}.tar.gz")) + sorted(
        sdist_dir.glob(f"llama-cpp-python-{ver}.tar.gz"))
    if not tars:
        log(f"fetching the llama-cpp-python {ver} sdist for convert_hf_to_gguf.py (once)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(sdist_dir)], check=True,
                       stdout=sys.stderr)
        tars = sorted(sdist_dir.glob("*.tar.gz"))
    if not tars:
        raise SystemExit(f"llama_ref: no sdist found in {sdist_dir}")
    tmp = cache / f"llama.cpp-{ver}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tars[0]) as tf:
        # convert_hf_to_gguf.py, its conversion/ package (newer llama.cpp) and gguf-py/
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        for m in tf.getmembers():
            parts = m.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not parts[1].startswith(wanted):
                continue
            if not (m.isfile() or m.isdir()):
                continue
            m.name = parts[1]
            tf.extract(m, tmp)
    if not (tmp / "convert_hf_to_gguf.py").exists():
        raise SystemExit(f"llama_ref: {tars[0]} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    tmp.rename(d)
    return d


def run_converter(conv: Path, pre_fallback: str, argv):
    """Runs convert_hf_to_gguf.py in this process with the pre-tokenizer lookup patched."""
    import runpy
    sys.path.insert(0, str(conv))
    sys.path.insert(1, str(conv / "gguf-py"))
    patched = []
    try:
        import conversion.base as base  # llama.cpp >= 2026: the converter is a package
        mods = [base]
    except ImportError:
        mods = []
    if not mods:  # older llama.cpp: everything lives in convert_hf_to_gguf.py
        import importlib
        mods = [importlib.import_module("convert_hf_to_gguf")]
    for mod in mods:
        for obj in list(vars(mod).values()):
            if isinstance(obj, type) and "get_vocab_base_pre" in obj.__dict__:
                orig = obj.__dict__["get_vocab_base_pre"]

                def lookup(self, tokenizer, _orig=orig):
                    try:
                        return _orig(self, tokenizer)
                    except NotImplementedError:
                        print(f"[llama_ref] unknown pre-tokenizer hash (synthetic tokenizer): "
                              f"using '{pre_fallback}'", file=sys.stderr)
                        return pre_fallback

                obj.get_vocab_base_pre = lookup
                patched.append(obj.__name__)
    if not patched:
        raise SystemExit("llama_ref: found no get_vocab_base_pre to patch in the converter")
    sys.argv = [str(conv / "convert_hf_to_gguf.py")] + argv
    runpy.run_path(str(conv / "convert_hf_to_gguf.py"), run_name="__main__")


def fingerprint(hf_dir: Path) -> str:
    """Changes when the HF model is regenerated (config and weight file names, sizes, mtimes)."""
    h = hashlib.sha256()
    for p in sorted(hf_dir.iterdir()):
        if p.suffix in (".json", ".safetensors"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def pre_tokenizer_for(hf_dir: Path) -> str:
    arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    if arch.startswith("Qwen"):
        return "qwen2"
    if arch.startswith("Olmoe"):
        return "olmo"
    return "default"


def convert(conv: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    stamp = out.with_suffix(".src")
    fp = fingerprint(hf_dir)
    if out.exists() and stamp.exists() and stamp.read_text().strip() == fp:
        return out
    log(f"converting {hf_dir} -> {out} ({outtype}) with {conv.name}/convert_hf_to_gguf.py")
    tmp = out.with_suffix(".tmp")
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "_convert", str(conv), pre_tokenizer_for(hf_dir), "--",
                    str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)], check=True,
                   stdout=sys.stderr)
    tmp.rename(out)
    stamp.write_text(fp + "\n")
    log(f"converted in {time.time() - t0:.0f} s")
    return out


def quantize(src: Path, out: Path, fmt: str, threads: int) -> Path:
    import llama_cpp
    stamp = out.with_suffix(".src")
    fp = f"{src.name}:{src.stat().st_size}:{int(src.stat().st_mtime)}"
    if out.exists() and stamp.exists() and stamp.read_text().strip() == fp:
        return out
    log(f"quantizing {src} -> {out} ({fmt}) with llama_model_quantize")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[fmt]
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_ref: llama_model_quantize({fmt}) failed with {rc}")
    tmp.rename(out)
    stamp.write_text(fp + "\n")
    log(f"quantized in {time.time() - t0:.0f} s")
    return out


# ---- what a decoded token reads from this GGUF ----

def gguf_costs(path: Path, conv: Path):
    sys.path.insert(0, str(conv / "gguf-py"))
    import gguf
    r = gguf.GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def field(name, default=0):
        f = r.fields.get(f"{arch}.{name}")
        return int(f.parts[-1][0]) if f else default

    n_exp, top_k = field("expert_count"), field("expert_used_count")
    total = active = 0
    for t in r.tensors:
        nb = int(t.n_bytes)
        total += nb
        if "_exps" in t.name and n_exp:
            active += nb * top_k / n_exp
        elif t.name == "token_embd.weight":
            active += nb / int(t.shape[-1])  # one row
        else:
            active += nb
    return {"gguf_bytes": total, "active_bytes_per_token": int(active), "n_expert": n_exp,
            "top_k": top_k}


# ---- measurement ----

_log_cb = None


def quiet_llama_log():
    """Only llama.cpp's errors reach stderr (its info log is thousands of lines per model)."""
    global _log_cb
    import llama_cpp as L
    if _log_cb is None:
        def cb(level, text, _user):
            if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode(errors="replace"))
        _log_cb = L.llama_log_callback(cb)
        L.llama_log_set(_log_cb, None)


class Llama:
    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int, load_mode: int = 1,
                 n_seq: int = 1):
        import llama_cpp as L
        self.L = L
        quiet_llama_log()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        if hasattr(mp, "load_mode"):
            mp.load_mode = load_mode  # 1 = LLAMA_LOAD_MODE_MMAP: mapped, as our engine maps safetensors
        elif hasattr(mp, "use_mmap"):
            mp.use_mmap = True
        if os.environ.get("LLAMA_REF_NO_REPACK") == "1" and hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = False  # --no-repack: weights served from the mapping, no repacked copy
        t0 = time.time()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama_ref: llama.cpp could not load {path}")
        self.load_s = time.time() - t0
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        if n_seq > 1 and hasattr(cp, "kv_unified"):
            cp.kv_unified = True  # one KV buffer of n_ctx cells shared by the sequences
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit("llama_ref: llama_init_from_model failed")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.threads, self.n_batch = threads, n_batch

    def new_context(self, n_ctx: int, n_batch: int, n_seq: int):
        """Replaces the context (same mapped model): another batch size needs other n_seq_max."""
        L = self.L
        L.llama_free(self.ctx)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        if n_seq > 1 and hasattr(cp, "kv_unified"):
            cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit("llama_ref: llama_init_from_model failed")

    def decode_seqs(self, toks, pos):
        """One step of len(toks) sequences: token toks[i] at position pos[i] of sequence i."""
        L, n = self.L, len(toks)
        b = L.llama_batch_init(n, 0, 1)
        try:
            b.n_tokens = n
            for i in range(n):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = toks[i], pos[i], 1, True
                b.seq_id[i][0] = i
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise SystemExit(f"llama_ref: llama_decode returned {rc}")
            L.llama_synchronize(self.ctx)
        finally:
            L.llama_batch_free(b)

    def decode_prompt(self, seq, toks):
        """A whole prompt of sequence seq (positions 0..), logits of the last token only."""
        L, n = self.L, len(toks)
        b = L.llama_batch_init(n, 0, 1)
        try:
            b.n_tokens = n
            for i in range(n):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = toks[i], i, 1, i == n - 1
                b.seq_id[i][0] = seq
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise SystemExit(f"llama_ref: llama_decode returned {rc}")
            L.llama_synchronize(self.ctx)
        finally:
            L.llama_batch_free(b)

    def argmax_ith(self, i):
        import numpy as np
        p = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, toks):
        arr = (self.L.llama_token * len(toks))(*toks)
        rc = self.L.llama_decode(self.ctx, self.L.llama_batch_get_one(arr, len(toks)))
        if rc != 0:
            raise SystemExit(f"llama_ref: llama_decode returned {rc}")
        # llama.cpp adds a decode to its perf counters when it synchronizes
        self.L.llama_synchronize(self.ctx)

    def argmax(self):
        import numpy as np
        p = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def perf(self):
        return self.L.llama_perf_context(self.ctx)

    def reset_perf(self):
        self.L.llama_perf_context_reset(self.ctx)

    def close(self):
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def preread(path: Path):
    """Reads the file once so the timed runs do not wait for the disk."""
    t0 = time.time()
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.time() - t0


def evict(paths):
    """Drops these files from the page cache (POSIX_FADV_DONTNEED), so the model about to be measured
    has the memory to itself: 23 GB machines cannot cache OLMoE's safetensors and its GGUFs at once,
    and a run under reclaim pressure measures the disk, not the engine."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cpu_snap():
    """(busy jiffies, total jiffies, own CPU seconds): see others_share."""
    import resource
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, busy + v[3] + v[4], ru.ru_utime + ru.ru_stime


def others_share(a, b):
    """Share of the CPUs other work took between snapshots a and b (busy minus our own CPU time)."""
    tot = b[1] - a[1]
    if tot <= 0:
        return 0.0
    v = ((b[0] - a[0]) - (b[2] - a[2]) * os.sysconf("SC_CLK_TCK")) / tot
    return round(min(1.0, max(0.0, v)), 3)


def rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: Path, threads: int, pps, pp_reps: int, prompt: int, n_predict: int, warmup: int,
            rounds: int = 1, load_mode: int = 1, batches=(1,)):
    import random
    rng = random.Random(1234)
    res = {"preread_seconds": round(preread(path), 3)}
    res["rss_baseline_bytes"] = rss_bytes()  # Python, numpy and llama.cpp loaded, no model yet
    max_pp = max(pps) if pps else 0
    llm = Llama(path, threads, n_ctx=max(max_pp, prompt + warmup + n_predict) + 16,
                n_batch=max(max_pp, prompt, 1), load_mode=load_mode)
    res["load_seconds"] = round(llm.load_s, 3)
    res["rss_after_load_bytes"] = rss_bytes()
    toks = [rng.randrange(llm.n_vocab) for _ in range(max(max_pp, prompt))]
    for i, pp in enumerate(pps):
        best = None
        for _ in range(pp_reps):
            llm.clear()
            llm.reset_perf()
            c0 = cpu_snap()
            t0 = time.time()
            llm.decode(toks[:pp])
            wall = time.time() - t0
            c1 = cpu_snap()
            p = llm.perf()
            rate = p.n_p_eval / (p.t_p_eval_ms * 1e-3) if p.t_p_eval_ms > 0 else 0
            if best is None or rate > best[0]:
                best = (rate, p.t_p_eval_ms * 1e-3, p.n_p_eval, wall, others_share(c0, c1))
        keys = [f"pp_p{pp}"] + (["pp"] if i == 0 else [])  # the first length also as plain pp_*
        for k in keys:
            res.update({f"{k}_tokens": best[2], f"{k}_seconds": round(best[1], 4),
                        f"{k}_tok_s": round(best[0], 3), f"{k}_wall_seconds": round(best[3], 4),
                        f"{k}_others_cpu": best[4]})
    # decode at batch 1: a short prompt, `warmup` untimed tokens, then n_predict timed greedy tokens;
    # best of `rounds` (the pp run above, or the first round, faults the mapped weights in)
    best = None
    for _ in range(rounds):
        llm.clear()
        llm.decode(toks[:prompt])
        for _ in range(warmup):
            llm.decode([llm.argmax()])
        llm.reset_perf()
        c0 = cpu_snap()
        t0 = time.time()
        for _ in range(n_predict):
            llm.decode([llm.argmax()])
        wall = time.time() - t0
        c1 = cpu_snap()
        p = llm.perf()
        if best is None or p.t_eval_ms < best[1]:
            best = (p.n_eval, p.t_eval_ms, wall, others_share(c0, c1))
    n_eval, t_ms, wall, others = best
    res.update({"decode_prompt": prompt, "decode_tokens": n_eval, "decode_rounds": rounds, "decode_seconds": round(t_ms * 1e-3, 4),
                "decode_tok_s": round(n_eval / (t_ms * 1e-3), 3) if t_ms > 0 else 0,
                "decode_wall_seconds": round(wall, 4), "decode_others_cpu": others})
    res["decode_b1_tok_s"] = res["decode_tok_s"]
    res["decode_b1_others_cpu"] = others
    # batched decode: B sequences, each its own prompt, then steps of one token per sequence (as
    # our engine's batched decode); wall time of the timed steps, best of `rounds`
    for B in batches:
        if B == 1:
            continue
        per_seq = prompt + warmup + n_predict + 8
        llm.new_context(n_ctx=B * per_seq, n_batch=max(B, prompt), n_seq=B)
        steps = max(2, n_predict * 4 // B)
        best = None
        for _ in range(rounds):
            llm.clear()
            cur, pos = [], []
            for i in range(B):
                # every sequence gets `prompt` tokens (a rotation of the prompt): a plain slice from
                # offset 7i ran short near the end, and the next position was then wrong for it
                p = (toks[(i * 7) % len(toks):] + toks)[:prompt]
                llm.decode_prompt(i, p)
                cur.append(llm.argmax_ith(-1))
                pos.append(len(p))
            for _ in range(warmup):
                llm.decode_seqs(cur, pos)
                cur = [llm.argmax_ith(i) for i in range(B)]
                pos = [q + 1 for q in pos]
            c0 = cpu_snap()
            t0 = time.time()
            for _ in range(steps):
                llm.decode_seqs(cur, pos)
                cur = [llm.argmax_ith(i) for i in range(B)]
                pos = [q + 1 for q in pos]
            wall = time.time() - t0
            c1 = cpu_snap()
            if best is None or wall < best[0]:
                best = (wall, others_share(c0, c1))
        res.update({f"decode_b{B}_steps": steps, f"decode_b{B}_seconds": round(best[0], 4),
                    f"decode_b{B}_tok_s": round(B * steps / best[0], 3),
                    f"decode_b{B}_others_cpu": best[1]})
    llm.close()
    res["peak_rss_bytes"] = rss_bytes("VmHWM")
    return res


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_convert":  # internal: python llama_ref.py _convert DIR PRE -- args
        run_converter(Path(sys.argv[2]), sys.argv[3], sys.argv[5:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":  # internal: one GGUF in a fresh process
        path, threads, pp, pp_reps, prompt, n_predict, warmup, rounds, load_mode, nice, batches = sys.argv[2:13]
        if int(nice):
            try:
                os.nice(int(nice))  # negative needs root; the driver asks for it to shield the timing
            except OSError:
                pass
        res = measure(Path(path), int(threads), [int(v) for v in pp.split(",") if int(v) > 0], int(pp_reps),
                      int(prompt), int(n_predict), int(warmup), int(rounds), int(load_mode),
                      [int(v) for v in batches.split(",") if v])
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        res["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 3)  # see run.sh: others' share of the CPUs
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="HF model directory (moe-gen-model output)")
    ap.add_argument("--name", required=True, help="name of the GGUF files in the cache")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--formats", default="bf16,q8_0,q4_0")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "out" / "llama")
    ap.add_argument("--pp", default="512", help="prompt-processing lengths, comma separated (0 = skip)")
    ap.add_argument("--batches", default="1", help="decode batch sizes, comma separated (1 = the plain run)")
    ap.add_argument("--pp-reps", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32, help="prompt before the decode run")
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="decode rounds, best kept")
    ap.add_argument("--load-mode", type=int, default=1, help="llama_load_mode (1 = mmap, 0 = read into memory)")
    ap.add_argument("--no-repack", action="store_true",
                    help="no repacked weight copies (use_extra_bufts off): llama.cpp's default repacks Q4_0 into "
                         "an interleaved copy beside the mapped file (more resident memory, faster kernels)")
    ap.add_argument("--nice", type=int, default=0, help="niceness increment of the measuring process")
    ap.add_argument("--out", type=Path, help="directory for llama_<format>.txt")
    ap.add_argument("--prepare-only", action="store_true", help="convert/quantize, measure nothing")
    a = ap.parse_args()

    import llama_cpp
    quiet_llama_log()
    a.cache.mkdir(parents=True, exist_ok=True)
    conv = converter_dir(a.cache)
    formats = [f for f in a.formats.split(",") if f]
    paths = {}
    for fmt in formats:
        if fmt in ("bf16", "q8_0"):
            paths[fmt] = convert(conv, a.model, a.cache / f"{a.name}-{fmt}.gguf", fmt)
        elif fmt in FTYPES:
            src = convert(conv, a.model, a.cache / f"{a.name}-bf16.gguf", "bf16")
            paths[fmt] = quantize(src, a.cache / f"{a.name}-{fmt}.gguf", fmt, a.threads)
        else:
            raise SystemExit(f"llama_ref: unknown format {fmt}")
    if a.prepare_only:
        return
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
    sysinfo = llama_cpp.llama_print_system_info().decode().strip()
    for fmt in formats:
        log(f"measuring {paths[fmt].name} with {a.threads} threads")
        res = {"llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
               "converter": conv.name, "format": fmt, "gguf": str(paths[fmt]), "threads": a.threads,
               "system_info": sysinfo.replace("\n", " ")}
        res.update(gguf_costs(paths[fmt], conv))
        # A fresh process per format: nothing (thread pools, repacked buffers, allocator state) carries
        # over from the previous model.
        evict([p for p in a.cache.glob("*.gguf") if p != paths[fmt]] + list(a.model.glob("*.safetensors")))
        # numpy (argmax) must not start an OpenBLAS thread pool next to llama.cpp's threads
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(a.threads),
                   LLAMA_REF_NO_REPACK="1" if a.no_repack else "0")
        out = subprocess.run([sys.executable, __file__, "_measure", str(paths[fmt]), str(a.threads), str(a.pp),
                              str(a.pp_reps), str(a.prompt), str(a.n_predict), str(a.warmup), str(a.rounds),
                              str(a.load_mode), str(a.nice), a.batches],
                             check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        res.update(json.loads(out.strip().splitlines()[-1]))
        text = "".join(f"{k}={v}\n" for k, v in res.items())
        sys.stdout.write(f"# llama.cpp {fmt}\n{text}")
        sys.stdout.flush()
        if a.out:
            (a.out / f"llama_{fmt}.txt").write_text(text)


if __name__ == "__main__":
    main()
