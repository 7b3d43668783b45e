/* Batch invariance of the CPU backend (docs/kernels.md): a token's outputs are the same bits
 * whether it is computed alone or among other tokens (1..70 of them, both sides of every row-count
 * switch of the kernels), and a sequence's logits are the same bits whether its last position was
 * computed in one prefill, in a decode step after a shorter prefill, or in a batch with other
 * sequences. What a greedy or seeded request relies on after a fault, a migration by recompute or
 * a preemption (issue 10). */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/cpu/kernels_internal.h" /* moe_kernels_test_bf16_x_round */
#include "kernels/kernels.h"
#include "worker/forward.h"
#include "worker/kv_cache.h"
#include "worker/model.h"
#include "tests/unit/kernel_test_util.h"

#define MAX_TOK 70

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static float rng_uniform(float lo, float hi)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return lo + (hi - lo) * (float)((rng_state >> 40) * 0x1p-24);
}

/* W (n_out x n_in) in dtype dt from uniform f32 values. */
static void *make_weights(moe_dtype dt, int n_in, int n_out)
{
    size_t n = (size_t)n_in * n_out;
    float *wf = xmalloc(n * sizeof *wf);
    for (size_t i = 0; i < n; i++)
        wf[i] = rng_uniform(-1.f, 1.f);
    if (dt == MOE_DT_F32)
        return wf;
    void *w = xmalloc(moe_dtype_row_bytes(dt, (size_t)n_in) * (size_t)n_out);
    if (dt == MOE_DT_Q8 || dt == MOE_DT_Q4)
        cr_assert_eq(moe_quantize(w, dt, wf, MOE_DT_F32, n), 0, "moe_quantize to %s", moe_dtype_name(dt));
    else
        for (size_t i = 0; i < n; i++)
            ((uint16_t *)w)[i] = dt == MOE_DT_BF16 ? moe_f32_to_bf16(wf[i]) : moe_f32_to_f16(wf[i]);
    free(wf);
    return w;
}

/* For every n_tok in 1..MAX_TOK: y of the first n_tok tokens of x (serial, through the pool, and
 * through moe_matmul_batch) equals, bit for bit, each token computed alone. */
static void invariance_case(moe_dtype dt, int n_in, int n_out, moe_threadpool_t *pool, const char *isa)
{
    void *w = make_weights(dt, n_in, n_out);
    float *x = xmalloc((size_t)MAX_TOK * n_in * sizeof *x);
    for (size_t i = 0; i < (size_t)MAX_TOK * n_in; i++)
        x[i] = rng_uniform(-2.f, 2.f) * (i % 89 == 3 ? 20.f : 1.f);
    float *one = xmalloc((size_t)MAX_TOK * n_out * sizeof *one);
    float *y = xmalloc((size_t)MAX_TOK * n_out * sizeof *y);
    for (int t = 0; t < MAX_TOK; t++)
        moe_matmul_serial(one + (size_t)t * n_out, x + (size_t)t * n_in, w, dt, 1, n_in, n_out);
    for (int n_tok = 1; n_tok <= MAX_TOK; n_tok++) {
        size_t ny = (size_t)n_tok * n_out;
        for (int how = 0; how < 3; how++) {
            for (size_t k = 0; k < ny; k++)
                y[k] = -1.f;
            if (how == 0)
                moe_matmul_serial(y, x, w, dt, n_tok, n_in, n_out);
            else if (how == 1)
                moe_matmul(pool, y, x, w, dt, n_tok, n_in, n_out);
            else {
                moe_matmul_desc d = {.y = y, .x = x, .w = w, .wt = dt, .n_tok = n_tok, .n_in = n_in,
                                     .n_out = n_out};
                moe_matmul_batch(pool, &d, 1);
            }
            if (memcmp(y, one, ny * sizeof *y) != 0) {
                size_t k = 0;
                while (memcmp(&y[k], &one[k], sizeof *y) == 0)
                    k++;
                cr_assert_fail("%s %s n_in=%d n_out=%d: %d tokens (%s) differ from one at a time: "
                               "token %zu row %zu: %.9g vs %.9g",
                               isa, moe_dtype_name(dt), n_in, n_out, n_tok,
                               how == 0 ? "serial" : how == 1 ? "pool" : "batch", k / n_out,
                               k % n_out, (double)y[k], (double)one[k]);
            }
        }
    }
    free(w);
    free(x);
    free(one);
    free(y);
}

static void invariance_sweep(moe_dtype dt)
{
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    moe_threadpool_t *pool = moe_threadpool_create(3);
    cr_assert_not_null(pool);
    int quant = dt == MOE_DT_Q8 || dt == MOE_DT_Q4;
    /* Float shapes with a k tail (n_in % 8, % 16 != 0) and row tails of every tile; Q8/Q4 need
     * n_in % 32 == 0. */
    const int n_ins[2] = {quant ? 96 : 100, quant ? 288 : 283};
    const int n_outs[2] = {37, 19};
    for (int i = 0; i < n_isa; i++) {
        /* AVX-512 and AMX: both ways of feeding x to the bf16 dot products (hi + lo, and
         * MOE_BF16_X=round) */
        for (int round = 0; round < 1 + (isas[i] >= MOE_ISA_AVX512); round++) {
            cr_assert_eq(moe_kernels_force_isa(isas[i]), isas[i]);
            moe_kernels_test_bf16_x_round(round);
            char isa[48];
            snprintf(isa, sizeof isa, "%s%s", moe_isa_name(isas[i]),
                     round ? " (MOE_BF16_X=round)" : "");
            for (int s = 0; s < 2; s++)
                invariance_case(dt, n_ins[s], n_outs[s], pool, isa);
        }
        moe_kernels_test_bf16_x_round(0);
    }
    cr_log_info("ran scalar .. %s (%s)", moe_isa_name(isas[n_isa - 1]), moe_kernels_describe());
    if (isas[n_isa - 1] < MOE_ISA_AMX)
        cr_log_info("this CPU (or OS) has no %s: its kernels were not run here (built only)",
                    isas[n_isa - 1] < MOE_ISA_AVX512 ? "AVX-512 or AMX" : "AMX");
    moe_threadpool_free(pool);
}

Test(batch_invariance, matmul_f32, .timeout = 240) { invariance_sweep(MOE_DT_F32); }
Test(batch_invariance, matmul_bf16, .timeout = 240) { invariance_sweep(MOE_DT_BF16); }
Test(batch_invariance, matmul_f16, .timeout = 240) { invariance_sweep(MOE_DT_F16); }
Test(batch_invariance, matmul_q8, .timeout = 240) { invariance_sweep(MOE_DT_Q8); }
Test(batch_invariance, matmul_q4, .timeout = 240) { invariance_sweep(MOE_DT_Q4); }

/* ---- the forward pass ---- */

#define FIXTURE_ROOT MOE_SOURCE_DIR "/tests/reference/fixtures/models"
#define N_PROMPT 61 /* a prefill of >= 48 tokens and decode steps of 1 */
#define N_OTHER 3
#define BLOCK 16

typedef struct {
    moe_model *m;
    moe_threadpool_t *pool;
    moe_forward *f;
    moe_kv_cache *kv;
    int vocab;
} fwd;

static void fwd_open(fwd *s, const char *name, moe_quant_mode q)
{
    memset(s, 0, sizeof *s);
    moe_log_threshold = MOE_LOG_WARN;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", FIXTURE_ROOT, name);
    moe_model_load_opts o = {.quantize_experts = q, .quantize_dense = q};
    moe_status st = moe_model_load(dir, &o, &s->m);
    cr_assert_eq(st, MOE_OK, "%s: %s", name, moe_error_message());
    s->vocab = s->m->cfg.vocab_size;
    s->pool = moe_threadpool_create(2);
    int max_tok = N_PROMPT + N_OTHER * N_PROMPT;
    st = moe_forward_create(s->m, s->pool, max_tok, 1 + N_OTHER, 2 * N_PROMPT, BLOCK, &s->f);
    cr_assert_eq(st, MOE_OK, "%s: moe_forward_create: %s", name, moe_error_message());
    moe_kv_layout lay = {.n_layers = s->m->cfg.n_layers, .n_kv_heads = s->m->cfg.n_kv_heads,
                         .head_dim = s->m->cfg.head_dim, .block_size = BLOCK};
    st = moe_kv_create(&lay, (1 + N_OTHER) * (2 * N_PROMPT / BLOCK + 2), &s->kv);
    cr_assert_eq(st, MOE_OK, "moe_kv_create: %s", moe_error_message());
}

static void fwd_close(fwd *s)
{
    moe_kv_free(s->kv);
    moe_forward_free(s->f);
    moe_threadpool_free(s->pool);
    moe_model_free(s->m);
}

/* One forward run over n_seq sequences: sequence i gets tokens toks[i][pos0[i] .. pos0[i] + n[i])
 * and the logits of its last token go to out + i * vocab. */
static void run_step(fwd *s, moe_kv_seq *seqs, int32_t (*toks)[N_PROMPT], const int *pos0,
                     const int *n, int n_seq, float *out)
{
    int32_t flat[(1 + N_OTHER) * N_PROMPT];
    moe_batch_seg segs[1 + N_OTHER];
    int rows[1 + N_OTHER], at = 0;
    for (int i = 0; i < n_seq; i++) {
        cr_assert_eq(moe_kv_seq_reserve(s->kv, &seqs[i], pos0[i] + n[i]), MOE_OK);
        memcpy(flat + at, toks[i] + pos0[i], (size_t)n[i] * sizeof *flat);
        segs[i] = (moe_batch_seg){.kv = &seqs[i], .pos0 = pos0[i], .tok_begin = at, .n = n[i]};
        at += n[i];
        rows[i] = at - 1;
    }
    moe_batch b = {.tokens = flat, .n_tokens = at, .segs = segs, .n_segs = n_seq,
                   .logit_rows = rows, .n_logit_rows = n_seq, .logits = out};
    moe_status st = moe_forward_run(s->f, s->kv, &b);
    cr_assert_eq(st, MOE_OK, "moe_forward_run: %s", moe_error_message());
}

static void expect_same(const float *got, const float *want, int vocab, const char *fx, const char *what)
{
    if (memcmp(got, want, (size_t)vocab * sizeof *got) == 0)
        return;
    int k = 0;
    while (memcmp(&got[k], &want[k], sizeof *got) == 0)
        k++;
    cr_assert_fail("%s: last-position logits of %s differ from one whole prefill: token %d: "
                   "%.9g vs %.9g",
                   fx, what, k, (double)got[k], (double)want[k]);
}

/* The last position's logits by (a) one prefill of the whole prompt, (b) prefill of a prefix, then
 * decode steps of one token, (c) prefill chunks inside a batch with other sequences (other
 * lengths, other positions), (d) decode steps inside a batch whose other sequences prefill. */
static void forward_invariance(const char *name, moe_quant_mode q)
{
    fwd s;
    fwd_open(&s, name, q);
    int32_t toks[1 + N_OTHER][N_PROMPT];
    for (int i = 0; i <= N_OTHER; i++)
        for (int t = 0; t < N_PROMPT; t++)
            toks[i][t] = (int32_t)(rng_uniform(0.f, 1.f) * (float)(s.vocab - 1));
    float *want = xmalloc((size_t)(1 + N_OTHER) * s.vocab * sizeof *want);
    float *got = xmalloc((size_t)(1 + N_OTHER) * s.vocab * sizeof *got);
    char what[128];

    /* (a) */
    moe_kv_seq a = {0};
    run_step(&s, &a, toks, (int[]){0}, (int[]){N_PROMPT}, 1, want);
    moe_kv_seq_release(s.kv, &a);

    /* (b) prefixes on both sides of the 48-row switch, then decode one token at a time */
    static const int prefixes[] = {1, 13, 47, 49, N_PROMPT - 1};
    for (size_t pi = 0; pi < sizeof prefixes / sizeof *prefixes; pi++) {
        moe_kv_seq b = {0};
        int p = prefixes[pi];
        run_step(&s, &b, toks, (int[]){0}, (int[]){p}, 1, got);
        for (; p < N_PROMPT; p++)
            run_step(&s, &b, toks, (int[]){p}, (int[]){1}, 1, got);
        snprintf(what, sizeof what, "prefill %d + decode steps", prefixes[pi]);
        expect_same(got, want, s.vocab, name, what);
        moe_kv_seq_release(s.kv, &b);
    }

    /* (c) sequence 0 in chunks of 20, 20, 21, each step shared with the other sequences' chunks
     * (other lengths, other positions) */
    moe_kv_seq c[1 + N_OTHER] = {0};
    static const int chunk0[3] = {20, 20, 21};
    static const int other[3][N_OTHER] = {{7, 1, 19}, {1, 15, 2}, {11, 1, 30}};
    int pos[1 + N_OTHER] = {0};
    for (int step = 0; step < 3; step++) {
        int n[1 + N_OTHER] = {chunk0[step]};
        for (int i = 1; i <= N_OTHER; i++)
            n[i] = other[step][i - 1];
        run_step(&s, c, toks, pos, n, 1 + N_OTHER, got);
        for (int i = 0; i <= N_OTHER; i++)
            pos[i] += n[i];
    }
    expect_same(got, want, s.vocab, name, "chunks in a batch with 3 other sequences");
    for (int i = 0; i <= N_OTHER; i++)
        moe_kv_seq_release(s.kv, &c[i]);

    /* (d) prefill of N_PROMPT - 1 alone, then the last token as a decode step among 3 prefills */
    moe_kv_seq d[1 + N_OTHER] = {0};
    run_step(&s, d, toks, (int[]){0}, (int[]){N_PROMPT - 1}, 1, got);
    run_step(&s, d, toks, (int[]){N_PROMPT - 1, 0, 0, 0}, (int[]){1, 30, 5, 52}, 1 + N_OTHER, got);
    expect_same(got, want, s.vocab, name, "a decode step among 3 prefills");
    for (int i = 0; i <= N_OTHER; i++)
        moe_kv_seq_release(s.kv, &d[i]);

    free(want);
    free(got);
    fwd_close(&s);
}

Test(batch_invariance, forward_qwen3_moe_bf16, .timeout = 120)
{
    forward_invariance("qwen3_moe_bf16", MOE_QUANT_NONE);
}
Test(batch_invariance, forward_olmoe_f32, .timeout = 120)
{
    forward_invariance("olmoe_f32", MOE_QUANT_NONE);
}
Test(batch_invariance, forward_mixtral_f32, .timeout = 120)
{
    forward_invariance("mixtral_f32", MOE_QUANT_NONE);
}
Test(batch_invariance, forward_qwen2_moe_q8, .timeout = 120)
{
    forward_invariance("qwen2_moe_f32", MOE_QUANT_Q8);
}
Test(batch_invariance, forward_qwen3_moe_q4, .timeout = 120)
{
    forward_invariance("qwen3_moe_f32", MOE_QUANT_Q4);
}
