/* Quantized models in less memory: after quantizing at load the bf16 source pages are released
 * (RSS and peak RSS asserted against bounds computed from the quantized bytes), outputs are
 * unchanged by it; pre-quantized model directories (moe_model_save / moe-quantize) load with no
 * float copy, give the same logits as quantizing at load, and are refused, naming the file and
 * the tensor, when corrupt or mismatching. The moe-gen-model sources are compiled in to write a
 * model of the `small` shapes (2 layers) at test time. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/unit/test_util.h"
#include "common/log.h"
#include "worker/engine.h"
#include "worker/model.h"

#include "tools/moe_gen_model/gen_model.h"

#define MIB ((size_t)1 << 20)
/* What a load may add to the RSS besides the weights it serves: f32 copies of norms, the
 * config, name tables, malloc's arenas. Stated, not tuned: a load measures 1-2 MiB of it. */
#define SLACK (6 * MIB)

static char g_root[512];
static char g_model[600];

static void setup(void)
{
    moe_log_threshold = MOE_LOG_WARN;
    char base[256];
    snprintf(base, sizeof base, "%s/test_quant_memory", MOE_BINARY_DIR);
    mkdir(base, 0777);
    snprintf(g_root, sizeof g_root, "%s/run-XXXXXX", base);
    cr_assert_not_null(mkdtemp(g_root), "mkdtemp under %s", base);
    snprintf(g_model, sizeof g_model, "%s/small2", g_root);
    /* olmoe wiring of the `small` preset, 2 layers: 84 MB of bf16, 55 MB of it routed experts */
    char *argv[] = {(char *)"moe-gen-model", (char *)"--arch",   (char *)"olmoe",
                    (char *)"--preset",      (char *)"small",    (char *)"--layers",
                    (char *)"2",             (char *)"--out",    g_model,
                    (char *)"--quiet",       NULL};
    moe_gen_options opt;
    cr_assert_eq(moe_gen_parse_args(10, argv, &opt), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_gen_run(&opt), MOE_OK, "%s", moe_error_message());
}

static void teardown(void)
{
    moe_test_rm_rf(g_root);
}

TestSuite(quant_memory, .init = setup, .fini = teardown, .timeout = 120);

/* A field of /proc/self/status in bytes ("VmRSS", "VmHWM"). */
static size_t status_bytes(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    cr_assert_not_null(f);
    char line[256];
    size_t kb = 0, n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && line[n] == ':')
            kb = strtoull(line + n + 1, NULL, 10);
    fclose(f);
    cr_assert_gt(kb, 0, "no %s in /proc/self/status", field);
    return kb * 1024;
}

/* Resets VmHWM to the current RSS (Linux >= 4.0); false where the kernel refuses. */
static bool reset_peak(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f)
        return false;
    bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

typedef struct {
    size_t grow, peak; /* RSS after the load and its peak during it, above the RSS before */
    size_t weights;    /* moe_model_weight_bytes */
    size_t largest;    /* the largest matrix's source bytes that quantizing reads */
} load_mem;

static moe_model *load_measured(const char *dir, const char *spec, bool keep, load_mem *lm)
{
    moe_model_load_opts o = {0};
    cr_assert_eq(moe_model_parse_quantize(spec, &o), MOE_OK, "%s", moe_error_message());
    o.keep_source_pages = keep;
    bool peak_ok = reset_peak();
    size_t before = status_bytes("VmRSS");
    moe_model *m = NULL;
    cr_assert_eq(moe_model_load(dir, &o, &m), MOE_OK, "%s: %s", dir, moe_error_message());
    size_t after = status_bytes("VmRSS"), hwm = status_bytes("VmHWM");
    lm->grow = after > before ? after - before : 0;
    lm->peak = peak_ok && hwm > before ? hwm - before : 0;
    lm->weights = moe_model_weight_bytes(m);
    /* lm_head: vocab x d bf16, the biggest matrix of this model */
    lm->largest = (size_t)m->cfg.vocab_size * (size_t)m->cfg.hidden_size * 2;
    return m;
}

/* The bound both loads are held to: the bytes the model serves from (moe_model_weight_bytes:
 * quantized copies, float matrices still mapped, including the bf16 embedding of which only
 * looked-up rows are ever resident, so the bound is loose by most of it) plus SLACK. */
static size_t rss_bound(const load_mem *lm)
{
    return lm->weights + SLACK;
}

Test(quant_memory, q4_load_rss_below_quantized_bytes)
{
    load_mem rel, keep;
    moe_model *m = load_measured(g_model, "all=q4", false, &rel);
    moe_model_free(m);
    m = load_measured(g_model, "all=q4", true, &keep);
    moe_model_free(m);
    cr_log_info("all=q4: serves %.1f MiB; RSS grows %.1f MiB (peak %.1f) released, %.1f MiB "
                "(peak %.1f) keeping the bf16 pages; bound %.1f MiB",
                (double)rel.weights / MIB, (double)rel.grow / MIB, (double)rel.peak / MIB,
                (double)keep.grow / MIB, (double)keep.peak / MIB, (double)rss_bound(&rel) / MIB);
    cr_assert_leq(rel.grow, rss_bound(&rel), "RSS grew by %zu bytes, bound %zu", rel.grow,
                  rss_bound(&rel));
    /* The bound means something: without the release the same load exceeds it. */
    cr_assert_gt(keep.grow, rss_bound(&rel), "keeping the source pages grew RSS by only %zu",
                 keep.grow);
    if (rel.peak) {
        /* During the load: the quantized copies plus about one source matrix per quantizing
         * thread (each releases its source right after copying it). */
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        size_t peak_bound = rss_bound(&rel) + (size_t)(ncpu < 64 ? ncpu : 64) * rel.largest;
        cr_assert_leq(rel.peak, peak_bound, "peak RSS grew by %zu bytes, bound %zu", rel.peak,
                      peak_bound);
    } else {
        cr_log_info("SKIPPED: VmHWM cannot be reset here (/proc/self/clear_refs): peak not asserted");
    }
}

static float *all_logits(const moe_model *m, int n)
{
    moe_engine_opts o = {.n_threads = 2, .block_size = 16, .max_seqs = 2};
    moe_engine *e = NULL;
    cr_assert_eq(moe_engine_create(m, &o, &e), MOE_OK, "%s", moe_error_message());
    int32_t ids[24];
    for (int i = 0; i < n; i++)
        ids[i] = (int32_t)((i * 37 + 5) % 1000);
    float *out = malloc(sizeof(float) * (size_t)n * (size_t)m->cfg.vocab_size);
    cr_assert_not_null(out);
    cr_assert_eq(moe_engine_logits(e, ids, n, 0, out), MOE_OK, "%s", moe_error_message());
    moe_engine_free(e);
    return out;
}

static moe_model *load_plain(const char *dir, const char *spec, bool keep)
{
    moe_model_load_opts o = {0};
    cr_assert_eq(moe_model_parse_quantize(spec, &o), MOE_OK, "%s", moe_error_message());
    o.keep_source_pages = keep;
    moe_model *m = NULL;
    cr_assert_eq(moe_model_load(dir, &o, &m), MOE_OK, "%s: %s", dir, moe_error_message());
    return m;
}

static void assert_same_logits(const char *dir_a, const char *spec_a, bool keep_a,
                               const char *dir_b, const char *spec_b, bool keep_b)
{
    enum { N = 20 };
    moe_model *a = load_plain(dir_a, spec_a, keep_a), *b = load_plain(dir_b, spec_b, keep_b);
    size_t nv = (size_t)N * (size_t)a->cfg.vocab_size;
    float *la = all_logits(a, N), *lb = all_logits(b, N);
    cr_assert_eq(memcmp(la, lb, nv * sizeof(float)), 0,
                 "%s (%s) and %s (%s) give different logits", dir_a, spec_a, dir_b, spec_b);
    double norm = 0;
    for (size_t i = 0; i < nv; i++)
        norm += (double)la[i] * la[i];
    cr_assert_gt(norm, 0.0, "logits are all zero");
    free(la);
    free(lb);
    moe_model_free(a);
    moe_model_free(b);
}

/* Releasing pages changes no byte the kernels read. */
Test(quant_memory, release_keeps_outputs)
{
    assert_same_logits(g_model, "all=q4", false, g_model, "all=q4", true);
    assert_same_logits(g_model, "experts=q8", false, g_model, "experts=q8", true);
}

static void save(const char *src, const char *spec, const char *dst)
{
    moe_model *m = load_plain(src, spec, false);
    cr_assert_eq(moe_model_save(m, dst), MOE_OK, "%s", moe_error_message());
    moe_model_free(m);
}

/* Written once, loaded with no float copy: the same logits as quantizing at load, RSS bounded by
 * the file's bytes, every selected matrix in the file's Q dtype. */
Test(quant_memory, prequantized_same_logits_less_memory)
{
    char dir[700];
    snprintf(dir, sizeof dir, "%s/q4", g_root);
    save(g_model, "all=q4", dir);
    assert_same_logits(g_model, "all=q4", false, dir, "none", false);
    assert_same_logits(g_model, "all=q4", false, dir, "all=q4", false); /* same ask: kept */
    load_mem lm;
    moe_model *m = load_measured(dir, "none", false, &lm);
    const moe_weight *w = moe_model_matrix(m, "model.layers.1.mlp.experts.3.down_proj.weight");
    cr_assert_not_null(w);
    cr_assert_eq(w->dtype, MOE_DT_Q4);
    w = moe_model_matrix(m, "model.layers.0.self_attn.q_proj.weight");
    cr_assert_eq(w->dtype, MOE_DT_Q4);
    w = moe_model_matrix(m, "model.layers.0.mlp.gate.weight"); /* the router stays bf16 */
    cr_assert_eq(w->dtype, MOE_DT_BF16);
    cr_log_info("pre-quantized q4: serves %.1f MiB, RSS grows %.1f MiB (peak %.1f)",
                (double)lm.weights / MIB, (double)lm.grow / MIB, (double)lm.peak / MIB);
    cr_assert_leq(lm.grow, rss_bound(&lm));
    if (lm.peak) /* no bf16 copy is ever read: the peak is the served bytes too */
        cr_assert_leq(lm.peak, rss_bound(&lm));
    moe_model_free(m);
}

/* A tied model (lm_head is the embedding): dense quantization writes lm_head's own quantized
 * copy, the embedding stays float; the reloaded model gives the same logits. */
Test(quant_memory, prequantized_tied_lm_head)
{
    char src[700], dir[700];
    snprintf(src, sizeof src, "%s/tests/reference/fixtures/models/qwen3_moe_f32", MOE_SOURCE_DIR);
    snprintf(dir, sizeof dir, "%s/tied-q8", g_root);
    save(src, "all=q8", dir);
    assert_same_logits(src, "all=q8", false, dir, "none", false);
    moe_model *m = load_plain(dir, "none", false);
    cr_assert_eq(m->lm_head.dtype, MOE_DT_Q8);
    cr_assert_eq(m->embed.dtype, MOE_DT_F32);
    moe_model_free(m);
}

/* Replaces the first occurrence of `from` in path's bytes with `to` (same length). */
static void patch_file(const char *path, const char *from, const char *to)
{
    FILE *f = fopen(path, "r+b");
    cr_assert_not_null(f, "%s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    char *buf = malloc((size_t)len);
    fseek(f, 0, SEEK_SET);
    cr_assert_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
    size_t n = strlen(from);
    cr_assert_eq(strlen(to), n);
    char *at = NULL;
    for (long i = 0; i + (long)n <= len && !at; i++)
        if (memcmp(buf + i, from, n) == 0)
            at = buf + i;
    cr_assert_not_null(at, "%s: no '%s'", path, from);
    fseek(f, at - buf, SEEK_SET);
    fwrite(to, 1, n, f);
    fclose(f);
    free(buf);
}

static void expect_refused(const char *dir, const char *spec, moe_status want, const char *msg1,
                           const char *msg2)
{
    moe_model_load_opts o = {0};
    cr_assert_eq(moe_model_parse_quantize(spec, &o), MOE_OK);
    moe_model *m = NULL;
    moe_status s = moe_model_load(dir, &o, &m);
    cr_assert_eq(s, want, "load of %s gave %s: %s", dir, moe_status_name(s), moe_error_message());
    const char *e = moe_error_message();
    cr_assert(strstr(e, msg1) && strstr(e, msg2), "message '%s' lacks '%s' / '%s'", e, msg1,
              msg2);
    cr_assert_null(m);
}

static void fresh_copy(char *dir, size_t cap, const char *name)
{
    snprintf(dir, cap, "%s/%s", g_root, name);
    save(g_model, "experts=q8", dir);
}

Test(quant_memory, prequantized_refusals)
{
    char dir[700], file[800];
    const char *tensor = "model.layers.1.mlp.experts.15.up_proj.weight";
    /* asking for another format than the file holds */
    fresh_copy(dir, sizeof dir, "conflict");
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    expect_refused(dir, "experts=q4", MOE_ERR_INVALID_ARG, file,
                   "model.layers.0.mlp.experts.0.gate_proj.weight");

    /* a corrupt byte inside a quantized tensor: find that tensor's bytes and flip one */
    moe_model *m = load_plain(dir, "none", false);
    const moe_weight *w = moe_model_matrix(m, tensor);
    cr_assert_eq(w->dtype, MOE_DT_Q8);
    const moe_st_tensor *t = moe_st_find(m->st, tensor);
    /* moe_st_write_file packs tensors from the start of the data section: the lowest pointer is it */
    const uint8_t *base = moe_st_at(m->st, 0)->data;
    for (int i = 0; i < moe_st_count(m->st); i++) {
        const moe_st_tensor *x = moe_st_at(m->st, i);
        if ((const uint8_t *)x->data < base)
            base = x->data;
    }
    FILE *f = fopen(file, "rb");
    uint8_t len8[8];
    cr_assert_eq(fread(len8, 1, 8, f), 8u);
    fclose(f);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)len8[i] << (8 * i);
    long off = (long)(8 + hlen) + (long)((const uint8_t *)t->data - base) + 100;
    moe_model_free(m);
    f = fopen(file, "r+b");
    cr_assert_not_null(f);
    fseek(f, off, SEEK_SET);
    int c = fgetc(f);
    fseek(f, off, SEEK_SET);
    fputc(c ^ 0x40, f);
    fclose(f);
    expect_refused(dir, "none", MOE_ERR_FORMAT, file, tensor);

    /* a group size this build does not use */
    fresh_copy(dir, sizeof dir, "group");
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    patch_file(file, "\"moe.quant.group_size\":\"32\"", "\"moe.quant.group_size\":\"64\"");
    expect_refused(dir, "none", MOE_ERR_UNSUPPORTED, file, "group size 64");

    /* a format version from the future */
    fresh_copy(dir, sizeof dir, "version");
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    patch_file(file, "\"moe.quant.version\":\"1\"", "\"moe.quant.version\":\"7\"");
    expect_refused(dir, "none", MOE_ERR_UNSUPPORTED, file, "version \"7\"");

    /* Q tensors in a file that does not say how they were made */
    fresh_copy(dir, sizeof dir, "nometa");
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    patch_file(file, "\"moe.quant.version\"", "\"moe.quant.vErsion\"");
    expect_refused(dir, "none", MOE_ERR_FORMAT, file, "not written by moe-quantize");
}

/* The reader's checks of the Q dtypes: shape must be [rows, k * 32] and the bytes must match. */
Test(quant_memory, reader_checks_q_shapes)
{
    const char *hdr_bad_cols =
        "{\"w\":{\"dtype\":\"MOE_Q4\",\"shape\":[2,48],\"data_offsets\":[0,54]}}";
    const char *hdr_bad_len =
        "{\"w\":{\"dtype\":\"MOE_Q8\",\"shape\":[2,32],\"data_offsets\":[0,66]}}";
    const char *hdr_ok = "{\"w\":{\"dtype\":\"MOE_Q8\",\"shape\":[2,32],\"data_offsets\":[0,68]}}";
    const char *hdrs[3] = {hdr_bad_cols, hdr_bad_len, hdr_ok};
    for (int k = 0; k < 3; k++) {
        size_t hl = (strlen(hdrs[k]) + 7) / 8 * 8; /* padded with spaces: data 8-aligned */
        size_t len = 8 + hl + 72;
        uint8_t *buf = calloc(1, len);
        for (int i = 0; i < 8; i++)
            buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
        memset(buf + 8, ' ', hl);
        memcpy(buf + 8, hdrs[k], strlen(hdrs[k]));
        moe_st_set *set = NULL;
        moe_status s = moe_st_parse(buf, len, "mem.safetensors", &set);
        if (k < 2) {
            cr_assert_eq(s, MOE_ERR_FORMAT, "header %d: %s", k, moe_error_message());
            cr_assert(strstr(moe_error_message(), "mem.safetensors") &&
                          strstr(moe_error_message(), "tensor w"),
                      "%s", moe_error_message());
        } else {
            cr_assert_eq(s, MOE_OK, "%s", moe_error_message());
            cr_assert_eq(moe_st_find(set, "w")->dtype, MOE_DT_Q8);
            cr_assert_eq(moe_st_find(set, "w")->n_bytes, 68u);
            /* not a mapping: release never touches caller memory */
            cr_assert_eq(moe_st_release(set, buf + 8 + hl, 68), 0u);
            moe_st_close(set);
        }
        free(buf);
    }
}

/* ---- the memory a long prefill adds ----
 * A step of T tokens needs its per-token activations (hidden state, its norm and the MoE output;
 * the attention output shares the norm's buffer where qdim <= d), one buffer that holds q, k and v
 * during attention and the routed experts' outputs (T*top_k rows of d, computed in place in expert
 * order) in the MoE block, one expert group's gate and up scratch (at most T rows each), and the
 * KV of the T positions. Nothing else grows with T: the routed rows are read from the hidden state
 * in place, not first copied top_k times (that copy was T*top_k*d floats more, over this bound),
 * and no per-group input/output copies (eh, eo: T*2*d more) are made on the local path. */
static size_t prefill_bound(const moe_model_config *c, size_t T)
{
    size_t d = (size_t)c->hidden_size, q = (size_t)c->n_heads * c->head_dim,
           kv = (size_t)c->n_kv_heads * c->head_dim, K = (size_t)c->n_experts_per_tok,
           ffn = (size_t)c->moe_ffn;
    if ((size_t)c->dense_ffn > ffn) /* the expert scratch is strided by the widest FFN */
        ffn = (size_t)c->dense_ffn;
    if ((size_t)c->shared_expert_ffn > ffn)
        ffn = (size_t)c->shared_expert_ffn;
    size_t att = q <= d ? 0 : q;
    size_t back = K * d > q + 2 * kv ? K * d : q + 2 * kv;
    size_t act = T * (3 * d + att + back + 2 * ffn);
    size_t kv_cache = T * (size_t)c->n_layers * 2 * kv;
    return (act + kv_cache) * sizeof(float) + SLACK;
}

Test(quant_memory, long_prefill_rss_bounded)
{
    enum { T = 1024 };
    moe_model *m = load_plain(g_model, "all=q8", false);
    const moe_model_config *c = &m->cfg;
    moe_engine_opts o = {.n_threads = 2, .block_size = 16, .n_kv_blocks = T / 16 + 2,
                         .max_batch_tokens = T, .max_seqs = 1};
    moe_engine *e = NULL;
    cr_assert_eq(moe_engine_create(m, &o, &e), MOE_OK, "%s", moe_error_message());
    int32_t ids[T];
    for (int i = 0; i < T; i++) /* a few embedding rows, so that faulting them in is noise */
        ids[i] = (int32_t)(5 + i % 64);
    if (!reset_peak()) {
        cr_log_info("SKIPPED: VmHWM cannot be reset here (/proc/self/clear_refs)");
        moe_engine_free(e);
        moe_model_free(m);
        return;
    }
    size_t before = status_bytes("VmRSS");
    moe_sampling_params sp = {.temperature = 0, .top_k = 0, .top_p = 1, .seed = 1};
    cr_assert_eq(moe_engine_add(e, 1, ids, T - 1, &sp, 1, true), MOE_OK, "%s", moe_error_message());
    moe_token_event ev;
    int got = 0;
    while (!got) {
        got = moe_engine_step(e, &ev, 1);
        cr_assert_geq(got, 0, "%s", moe_error_message());
    }
    size_t grow = status_bytes("VmHWM") - before, bound = prefill_bound(c, T);
    cr_log_info("prefill of %d tokens: peak RSS grew %.1f MiB, bound %.1f MiB", T - 1,
                (double)grow / MIB, (double)bound / MIB);
    cr_assert_leq(grow, bound, "a %d-token prefill grew peak RSS by %zu bytes, bound %zu", T - 1, grow,
                  bound);
    moe_engine_free(e);
    moe_model_free(m);
}
