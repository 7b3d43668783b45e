/* Unit tests for the quantized (Q8/Q4) weights of kernels/: block format and round-trip error
 * bounds, and the quantized matmul on every ISA this CPU runs: bit-identical to the scalar path
 * and to itself under any thread count or without scratch, and within a derived bound of the
 * exact product of the dequantized weights with the f32 activations. */
#include <criterion/criterion.h>
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h" /* moe_kernels_test_no_scratch */
#include "kernels/kernels.h"
#include "tests/unit/kernel_test_util.h"

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint64_t rng_next(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

static float rng_uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)((rng_next() >> 40) * 0x1p-24);
}

/* A block's values with varied structure: uniform, one outlier, all equal, zeros, tiny scales
 * (f16 subnormal), large ones. */
static void fill_block(float *v, int kind)
{
    float scale = kind % 7 == 3 ? 1e-6f : kind % 7 == 4 ? 3000.f : kind % 7 == 5 ? 0.02f : 1.f;
    for (int i = 0; i < MOE_QK; i++)
        v[i] = rng_uniform(-scale, scale);
    if (kind % 7 == 1)
        v[rng_next() % MOE_QK] = 20.f * scale * (rng_next() & 1 ? 1.f : -1.f);
    if (kind % 7 == 2)
        for (int i = 0; i < MOE_QK; i++)
            v[i] = -scale;
    if (kind % 7 == 6)
        for (int i = 0; i < MOE_QK; i++)
            v[i] = i % 5 ? 0.f : v[i];
}

Test(quant, format_sizes)
{
    cr_assert_eq(sizeof(moe_block_q8), 34, "Q8 block is llama.cpp Q8_0's size");
    cr_assert_eq(sizeof(moe_block_q4), 18, "Q4 block is llama.cpp Q4_0's size");
    cr_assert_eq(moe_dtype_row_bytes(MOE_DT_Q8, 64), 68);
    cr_assert_eq(moe_dtype_row_bytes(MOE_DT_Q4, 2048), 64 * 18);
    cr_assert_eq(moe_dtype_row_bytes(MOE_DT_Q8, 48), 0, "not a multiple of 32");
    cr_assert_eq(moe_dtype_row_bytes(MOE_DT_BF16, 48), 96);
    cr_assert_eq(moe_dtype_row_bytes(MOE_DT_F32, 3), 12);
    cr_assert_str_eq(moe_dtype_name(MOE_DT_Q8), "q8");
    cr_assert_str_eq(moe_dtype_name(MOE_DT_Q4), "q4");
}

Test(quant, q4_layout_and_exact_values)
{
    /* Values that are exact multiples of a power-of-two scale come back exactly; the layout is
     * Q4_0's: byte j = code of input j (low nibble) | code of input j + 16 (high nibble). */
    float v[MOE_QK], back[MOE_QK];
    for (int i = 0; i < MOE_QK; i++)
        v[i] = 0.25f * (float)((i % 16) - 8); /* -2 .. 1.75, m = -2 -> d = 0.25 */
    moe_block_q4 b;
    cr_assert_eq(moe_quantize(&b, MOE_DT_Q4, v, MOE_DT_F32, MOE_QK), 0);
    cr_assert_eq(moe_f16_to_f32(b.d), 0.25f);
    for (int j = 0; j < 16; j++)
        cr_assert_eq(b.q[j], (uint8_t)(j | j << 4), "byte %d = %02x", j, b.q[j]);
    moe_convert_to_f32(back, &b, MOE_DT_Q4, MOE_QK);
    cr_assert_arr_eq(back, v, sizeof v);

    moe_block_q8 b8;
    for (int i = 0; i < MOE_QK; i++)
        v[i] = (float)(i * 8 - 127) / 64.f; /* max |v| = 127/64 -> d = 1/64 */
    cr_assert_eq(moe_quantize(&b8, MOE_DT_Q8, v, MOE_DT_F32, MOE_QK), 0);
    cr_assert_eq(moe_f16_to_f32(b8.d), 1.f / 64.f);
    for (int i = 0; i < MOE_QK; i++)
        cr_assert_eq(b8.q[i], i * 8 - 127);
    moe_convert_to_f32(back, &b8, MOE_DT_Q8, MOE_QK);
    cr_assert_arr_eq(back, v, sizeof v);
}

Test(quant, refuses_non_finite)
{
    float v[2 * MOE_QK];
    for (int i = 0; i < 2 * MOE_QK; i++)
        v[i] = 1.f;
    moe_block_q8 b[2];
    v[40] = INFINITY;
    cr_assert_eq(moe_quantize(b, MOE_DT_Q8, v, MOE_DT_F32, 2 * MOE_QK), -1);
    v[40] = NAN;
    cr_assert_eq(moe_quantize(b, MOE_DT_Q4, v, MOE_DT_F32, 2 * MOE_QK), -1);
    v[40] = 1e30f; /* finite but beyond what an f16 scale holds: saturates, no inf/NaN */
    cr_assert_eq(moe_quantize(b, MOE_DT_Q8, v, MOE_DT_F32, 2 * MOE_QK), 0);
    float back[2 * MOE_QK];
    moe_convert_to_f32(back, b, MOE_DT_Q8, 2 * MOE_QK);
    cr_assert_eq(back[40], 65504.f * 127.f);
    cr_assert(fabsf(back[0] - 1.f) <= 0.5f * moe_f16_to_f32(b[0].d), "%g", (double)back[0]);
}

/* Round trip on every source dtype: |x - deq(x)| <= d/2 (Q8) and <= |d| (Q4: inputs on the
 * opposite side of the largest one may clip at +7 steps, see lim), with d close to amax/127 (Q8) or
 * amax/8 (Q4) unless that scale is an f16 subnormal; and Q4's largest-magnitude entry is exact
 * up to the f16 rounding of its scale. */
static void round_trip(moe_dtype qt, moe_dtype st)
{
    enum { NB = 700 };
    float *v = xmalloc(NB * MOE_QK * sizeof *v), *back = xmalloc(NB * MOE_QK * sizeof *back);
    uint16_t *h = xmalloc(NB * MOE_QK * sizeof *h);
    void *q = xmalloc(NB * sizeof(moe_block_q8));
    for (int b = 0; b < NB; b++)
        fill_block(v + b * MOE_QK, b);
    /* The source in its dtype; v becomes its exact f32 value. */
    for (int i = 0; i < NB * MOE_QK; i++) {
        if (st == MOE_DT_BF16) {
            h[i] = moe_f32_to_bf16(v[i]);
            v[i] = moe_bf16_to_f32(h[i]);
        } else if (st == MOE_DT_F16) {
            h[i] = moe_f32_to_f16(v[i]);
            v[i] = moe_f16_to_f32(h[i]);
        }
    }
    const void *src = st == MOE_DT_F32 ? (const void *)v : (const void *)h;
    cr_assert_eq(moe_quantize(q, qt, src, st, NB * MOE_QK), 0);
    moe_convert_to_f32(back, q, qt, NB * MOE_QK);
    double worst = 0;
    for (int b = 0; b < NB; b++) {
        const float *x = v + b * MOE_QK, *y = back + b * MOE_QK;
        uint16_t dh = qt == MOE_DT_Q8 ? ((moe_block_q8 *)q)[b].d : ((moe_block_q4 *)q)[b].d;
        double d = fabs((double)moe_f16_to_f32(dh));
        double amax = 0;
        int im = 0;
        for (int i = 0; i < MOE_QK; i++)
            if (fabs((double)x[i]) > amax) {
                amax = fabs((double)x[i]);
                im = i;
            }
        double want_d = amax / (qt == MOE_DT_Q8 ? 127.0 : 8.0);
        if (want_d >= 0x1p-14) /* normal f16 scale: within half an f16 ulp (+ the bump) */
            cr_assert(fabs(d - want_d) <= want_d * 0x1p-10, "block %d: d %g want %g", b, d, want_d);
        /* Q4: an entry opposite the largest clips at 7 steps (amax - 7 d; = d unless d rounded
         * down, which only a subnormal scale does noticeably). */
        double lim = qt == MOE_DT_Q8 ? 0.5 * d : fmax(d, amax - 7 * d);
        for (int i = 0; i < MOE_QK; i++) {
            double e = fabs((double)x[i] - (double)y[i]);
            cr_assert(e <= lim * (1 + 1e-6) + 1e-30, "%s<-%s block %d i %d: %g -> %g (d %g)",
                      moe_dtype_name(qt), moe_dtype_name(st), b, i, (double)x[i], (double)y[i], d);
            if (want_d >= 0x1p-14)
                worst = fmax(worst, e / amax);
        }
        if (qt == MOE_DT_Q4 && want_d >= 0x1p-14)
            cr_assert(fabs((double)y[im] - (double)x[im]) <= amax * 0x1p-10, "block %d max", b);
    }
    /* Relative to each block's max, where the scale is a normal f16. */
    cr_assert(worst <= (qt == MOE_DT_Q8 ? 0.5 / 127 : 1.0 / 8) * 1.01, "worst %g", worst);
    free(v);
    free(back);
    free(h);
    free(q);
}

Test(quant, round_trip_bounds)
{
    static const moe_dtype qts[] = {MOE_DT_Q8, MOE_DT_Q4};
    static const moe_dtype sts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16};
    for (int a = 0; a < 2; a++)
        for (int s = 0; s < 3; s++)
            round_trip(qts[a], sts[s]);
}

/* ---- quantized matmul ---- */

/* Bound on |y - sum_i w_i x_i| (w the dequantized weights, x the f32 activations): x is quantized
 * per block of 32 with step amax/127, so each x_i moves by at most half a step (plus the f32
 * rounding of x * 127/amax); the f32 accumulation of nb block terms in 8 lanes adds at most
 * (nb + 8) ulps of sum |w_i x_i|. */
static void q_reference(const float *wd, const float *x, int n_tok, int n_in, int n_out,
                        double *ref, double *tol)
{
    int nb = n_in / MOE_QK;
    for (int t = 0; t < n_tok; t++)
        for (int r = 0; r < n_out; r++) {
            double s = 0, mag = 0, qerr = 0;
            for (int b = 0; b < nb; b++) {
                const float *xb = x + (size_t)t * n_in + (size_t)b * MOE_QK;
                const float *wb = wd + (size_t)r * n_in + (size_t)b * MOE_QK;
                double amax = 0;
                for (int i = 0; i < MOE_QK; i++)
                    amax = fmax(amax, fabs((double)xb[i]));
                for (int i = 0; i < MOE_QK; i++) {
                    double p = (double)wb[i] * (double)xb[i];
                    s += p;
                    mag += fabs(p);
                    qerr += fabs((double)wb[i]) * (0.5 + 1e-4) * amax / 127.0;
                }
            }
            ref[(size_t)t * n_out + r] = s;
            tol[(size_t)t * n_out + r] = qerr + (nb + 8) * 0x1p-22 * mag + 1e-30;
        }
}

static void q_matmul_case(moe_dtype qt, int n_tok, int n_in, int n_out, const moe_isa *isas,
                          int n_isa, moe_threadpool_t **pools)
{
    size_t nw = (size_t)n_in * n_out, ny = (size_t)n_tok * n_out;
    float *wf = xmalloc(nw * sizeof *wf), *wd = xmalloc(nw * sizeof *wd);
    void *w = xmalloc(nw / MOE_QK * sizeof(moe_block_q8));
    float *x = xmalloc((size_t)n_tok * n_in * sizeof *x);
    float *y = xmalloc(ny * sizeof *y), *y0 = xmalloc(ny * sizeof *y0),
          *ys = xmalloc(ny * sizeof *ys);
    double *ref = xmalloc(ny * sizeof *ref), *tol = xmalloc(ny * sizeof *tol);
    for (size_t b = 0; b < nw / MOE_QK; b++)
        fill_block(wf + b * MOE_QK, (int)(rng_next() % 7));
    for (size_t i = 0; i < (size_t)n_tok * n_in; i++)
        x[i] = rng_uniform(-2.f, 2.f) * (i % 97 == 5 ? 30.f : 1.f); /* some outliers */
    if (n_tok * n_in > 64)
        for (int i = 0; i < MOE_QK; i++)
            x[32 + i] = 0.f; /* an all-zero x block */
    cr_assert_eq(moe_quantize(w, qt, wf, MOE_DT_F32, nw), 0);
    moe_convert_to_f32(wd, w, qt, nw);
    q_reference(wd, x, n_tok, n_in, n_out, ref, tol);
    /* Every n_tok runs the int8 block products (batch invariance): one bound, one set of bits. */
    char what[96];
    for (int i = 0; i < n_isa; i++) {
        cr_assert_eq(moe_kernels_force_isa(isas[i]), isas[i]);
        snprintf(what, sizeof what, "%s/%s n_tok=%d n_in=%d n_out=%d", moe_isa_name(isas[i]),
                 moe_dtype_name(qt), n_tok, n_in, n_out);
        for (size_t k = 0; k < ny; k++)
            ys[k] = NAN;
        moe_matmul_serial(ys, x, w, qt, n_tok, n_in, n_out);
        for (size_t k = 0; k < ny; k++)
            cr_assert(fabs((double)ys[k] - ref[k]) <= tol[k],
                      "%s: y[%zu] = %.9g, exact %.9g (tol %.3g)", what, k, (double)ys[k], ref[k],
                      tol[k]);
        /* Every ISA does the scalar path's arithmetic: the same bits. */
        if (i == 0)
            memcpy(y0, ys, ny * sizeof *y0);
        else
            cr_assert_arr_eq(ys, y0, ny * sizeof *ys, "%s differs from scalar", what);
        for (int p = 0; p < 4; p++) {
            for (size_t k = 0; k < ny; k++)
                y[k] = NAN;
            moe_matmul(pools[p], y, x, w, qt, n_tok, n_in, n_out);
            cr_assert_arr_eq(y, ys, ny * sizeof *y, "%s: %d threads differ from serial", what,
                             moe_threadpool_size(pools[p]));
        }
        /* Without scratch (as when out of memory): one token at a time, same bits (batch
         * invariance: a token alone = the same token among n_tok, both sides of the 48-token
         * switch to the prefill tiles). */
        moe_kernels_test_no_scratch(1);
        for (size_t k = 0; k < ny; k++)
            y[k] = NAN;
        moe_matmul(pools[2], y, x, w, qt, n_tok, n_in, n_out);
        moe_kernels_test_no_scratch(0);
        cr_assert_arr_eq(y, ys, ny * sizeof *y, "%s: no-scratch path differs", what);
    }
    free(wf);
    free(wd);
    free(w);
    free(x);
    free(y);
    free(y0);
    free(ys);
    free(ref);
    free(tol);
}

static void q_matmul_sweep(moe_dtype qt)
{
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    moe_threadpool_t *pools[4] = {NULL, moe_threadpool_create(2), moe_threadpool_create(3),
                                  moe_threadpool_create(4)};
    static const int n_ins[] = {32, 64, 96, 160, 544};
    static const int n_toks[] = {1, 2, 3, 4, 5, 7, 9, 16, 33};
    static const int n_outs[] = {1, 2, 3, 5, 16, 17, 61};
    for (size_t a = 0; a < sizeof n_ins / sizeof *n_ins; a++)
        for (size_t b = 0; b < sizeof n_toks / sizeof *n_toks; b++)
            for (size_t c = 0; c < sizeof n_outs / sizeof *n_outs; c++)
                q_matmul_case(qt, n_toks[b], n_ins[a], n_outs[c], isas, n_isa, pools);
    /* Both sides of the int8 / f32-panel switch, token chunks and their tails, a tall matrix split
     * into many tasks, random shapes. */
    q_matmul_case(qt, 47, 96, 37, isas, n_isa, pools);
    q_matmul_case(qt, 48, 96, 37, isas, n_isa, pools);
    q_matmul_case(qt, 67, 288, 37, isas, n_isa, pools);  /* f32 panel: k chunks of 256 + 32 */
    q_matmul_case(qt, 200, 544, 50, isas, n_isa, pools); /* and a token chunk (192) */
    q_matmul_case(qt, 1, 2048, 600, isas, n_isa, pools); /* decode tiles prefetching the next */
    /* Decode tiles too big to prefetch the next one (Q8: 8 x 4352 bytes), and the last tile of a
     * task (never prefetches), with odd row counts: both decode tile variants against scalar. */
    q_matmul_case(qt, 1, 4096, 41, isas, n_isa, pools);
    q_matmul_case(qt, 1, 768, 27, isas, n_isa, pools);
    for (int i = 0; i < 6; i++)
        q_matmul_case(qt, (int)(rng_next() % 70) + 1, ((int)(rng_next() % 20) + 1) * MOE_QK,
                      (int)(rng_next() % 100) + 1, isas, n_isa, pools);
    for (int p = 1; p < 4; p++)
        moe_threadpool_free(pools[p]);
}

Test(quant, matmul_q8, .timeout = 120)
{
    q_matmul_sweep(MOE_DT_Q8);
}

Test(quant, matmul_q4, .timeout = 120)
{
    q_matmul_sweep(MOE_DT_Q4);
}

/* Prefill (n_tok >= 48) through the AVX2 prefill tiles (4 rows x 3 tokens,
 * tokens in chunks of 96): bit-identical to the scalar kernel, to every thread count and to the
 * one-token-at-a-time path (the decode tiles), on shapes that leave row tails (1, 2, 3 rows past
 * the 4-row tiles), token tails (1, 2 past the 3-token tiles) and chunk tails. */
static void q_prefill_sweep(moe_dtype qt)
{
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    moe_threadpool_t *pools[4] = {NULL, moe_threadpool_create(2), moe_threadpool_create(3),
                                  moe_threadpool_create(4)};
    static const int n_toks[] = {48, 49, 50, 97, 197};
    static const int n_outs[] = {1, 2, 3, 5, 6, 7, 37};
    for (size_t b = 0; b < sizeof n_toks / sizeof *n_toks; b++)
        for (size_t c = 0; c < sizeof n_outs / sizeof *n_outs; c++)
            q_matmul_case(qt, n_toks[b], b % 2 ? 96 : 160, n_outs[c], isas, n_isa, pools);
    q_matmul_case(qt, 100, 544, 61, isas, n_isa, pools);
    for (int p = 1; p < 4; p++)
        moe_threadpool_free(pools[p]);
}

Test(quant, matmul_q8_prefill, .timeout = 120)
{
    q_prefill_sweep(MOE_DT_Q8);
}

Test(quant, matmul_q4_prefill, .timeout = 120)
{
    q_prefill_sweep(MOE_DT_Q4);
}

Test(quant, matmul_special_activations)
{
    /* An inf or NaN in a block of x makes that token's outputs NaN (not a silent finite value);
     * other tokens are unaffected. */
    enum { N_IN = 64, N_OUT = 5 };
    float wf[N_OUT * N_IN], x[2 * N_IN], y[2 * N_OUT];
    moe_block_q8 w[N_OUT * N_IN / MOE_QK];
    for (int i = 0; i < N_OUT * N_IN; i++)
        wf[i] = rng_uniform(-1.f, 1.f);
    for (int i = 0; i < 2 * N_IN; i++)
        x[i] = rng_uniform(-1.f, 1.f);
    cr_assert_eq(moe_quantize(w, MOE_DT_Q8, wf, MOE_DT_F32, N_OUT * N_IN), 0);
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < n_isa; i++) {
            moe_kernels_force_isa(isas[i]);
            x[N_IN + 40] = s ? NAN : INFINITY;
            moe_matmul_serial(y, x, w, MOE_DT_Q8, 2, N_IN, N_OUT);
            for (int r = 0; r < N_OUT; r++) {
                cr_assert(isfinite(y[r]), "%s: token 0 row %d", moe_isa_name(isas[i]), r);
                cr_assert(isnan(y[N_OUT + r]), "%s: token 1 row %d", moe_isa_name(isas[i]), r);
            }
        }
}

Test(quant, reserve)
{
    cr_assert_eq(moe_matmul_reserve(16, 4096), 0);
    cr_assert_eq(moe_matmul_reserve(0, 0), 0);
}

/* moe_matmul_batch: every desc's y bit-identical to moe_matmul_serial on it alone, for every dtype
 * (Q8/Q4 on both sides of the AVX2 decode / prefill tile switch), shared and distinct x (x
 * prepared once for all the tasks that read it, by the pool from 128 tokens on), odd shapes, empty
 * descs, more descs than one run takes, every ISA (AVX-512 and AMX: x as hi + lo and rounded),
 * 1-4 threads, and without scratch. */
typedef struct {
    moe_matmul_desc d;
    float *yref;
    void *w; /* owned copy of d.w */
} batch_case;

static void batch_check(batch_case *bc, int n, moe_threadpool_t *pool, const char *what)
{
    moe_matmul_desc descs[80];
    cr_assert_leq(n, 80);
    for (int i = 0; i < n; i++) {
        descs[i] = bc[i].d;
        for (size_t k = 0; k < (size_t)bc[i].d.n_tok * bc[i].d.n_out; k++)
            bc[i].d.y[k] = NAN;
    }
    moe_matmul_batch(pool, descs, n);
    for (int i = 0; i < n; i++)
        cr_assert_arr_eq(bc[i].d.y, bc[i].yref,
                         (size_t)bc[i].d.n_tok * bc[i].d.n_out * sizeof(float),
                         "%s: desc %d (%s n_tok=%d n_in=%d n_out=%d), %d threads", what, i,
                         moe_dtype_name(bc[i].d.wt), bc[i].d.n_tok, bc[i].d.n_in, bc[i].d.n_out,
                         moe_threadpool_size(pool));
}

/* bc: n_out x n_in uniform weights in wt, on x (not owned), y and yref allocated. */
static void batch_case_init(batch_case *bc, const float *x, moe_dtype wt, int n_tok, int n_in,
                            int n_out)
{
    size_t nw = (size_t)n_out * n_in;
    float *wf = xmalloc(sizeof(float) * (nw ? nw : 1));
    for (size_t k = 0; k < nw; k++)
        wf[k] = rng_uniform(-1.0f, 1.0f);
    void *w = xmalloc(nw * 4 + 64);
    if (wt == MOE_DT_Q8 || wt == MOE_DT_Q4) {
        cr_assert_eq(moe_quantize(w, wt, wf, MOE_DT_F32, nw), 0);
    } else if (wt == MOE_DT_F32) {
        memcpy(w, wf, nw * 4);
    } else {
        uint16_t *h = w;
        for (size_t k = 0; k < nw; k++)
            h[k] = wt == MOE_DT_BF16 ? moe_f32_to_bf16(wf[k]) : moe_f32_to_f16(wf[k]);
    }
    free(wf);
    size_t ny = (size_t)n_tok * n_out;
    bc->d = (moe_matmul_desc){xmalloc(sizeof(float) * (ny ? ny : 1)), x, w, wt, n_tok, n_in, n_out};
    bc->yref = xmalloc(sizeof(float) * (ny ? ny : 1));
    bc->w = w;
}

static void batch_case_free(batch_case *bc)
{
    free(bc->d.y);
    free(bc->w);
    free(bc->yref);
}

/* Every ISA (both x modes from AVX-512 on), 1-4 threads and without scratch: batch_check against
 * each desc alone through moe_matmul_serial. */
static void batch_sweep(batch_case *bc, int n, moe_threadpool_t **pools);

Test(quant, matmul_batch, .timeout = 120)
{
    moe_threadpool_t *pools[4] = {NULL, moe_threadpool_create(2), moe_threadpool_create(3),
                                  moe_threadpool_create(4)};
    static const moe_dtype dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16, MOE_DT_Q8, MOE_DT_Q4};
    static const int toks[] = {1, 1, 2, 3, 5, 16, 47, 48, 53, 130, 200};
    enum { N = 72 }; /* > MOE_MATMUL_BATCH_MAX: two runs */
    cr_assert_gt(N, MOE_MATMUL_BATCH_MAX);
    batch_case bc[N];
    float *xs[N];
    for (int i = 0; i < N; i++) {
        moe_dtype wt = dts[rng_next() % 5];
        bool q = wt == MOE_DT_Q8 || wt == MOE_DT_Q4;
        int n_in = q ? ((int)(rng_next() % 6) + 1) * MOE_QK : (int)(rng_next() % 90) + 1;
        int n_out = i % 11 == 5 ? 0 : (int)(rng_next() % 70) + 1; /* some empty */
        int n_tok = i < 40 ? 1 : toks[rng_next() % (sizeof toks / sizeof *toks)];
        /* Every third desc shares the previous one's x when the shapes allow (gate and up). */
        bool share = i > 0 && i % 3 == 2 && bc[i - 1].d.n_in == n_in && bc[i - 1].d.n_tok == n_tok;
        if (i > 0 && i % 3 == 2 && !share) { /* force a shareable shape */
            n_in = bc[i - 1].d.n_in;
            n_tok = bc[i - 1].d.n_tok;
            if (q && n_in % MOE_QK) {
                wt = MOE_DT_BF16;
                q = false;
            }
            share = true;
        }
        float *x;
        if (share) {
            x = xs[i - 1];
            xs[i] = NULL; /* not owned */
        } else {
            x = xmalloc(sizeof(float) * (size_t)(n_tok > 0 ? n_tok : 1) * n_in);
            for (int k = 0; k < n_tok * n_in; k++)
                x[k] = rng_uniform(-2.0f, 2.0f);
            xs[i] = x;
        }
        batch_case_init(&bc[i], x, wt, n_tok, n_in, n_out);
    }
    batch_sweep(bc, N, pools);
    moe_matmul_batch(pools[1], NULL, 0); /* nothing to do */
    for (int i = 0; i < N; i++) {
        free(xs[i]);
        batch_case_free(&bc[i]);
    }
    for (int p = 1; p < 4; p++)
        moe_threadpool_free(pools[p]);
}

/* A prefill's batches as the forward pass makes them: q, k and v (and gate and up) on one x of 200
 * tokens, one matrix split across every thread, Q8/Q4 beside bf16 on that x, another x of 130:
 * x prepared once by the pool, in pieces, and read by many tasks. */
Test(quant, matmul_batch_prefill, .timeout = 120)
{
    moe_threadpool_t *pools[4] = {NULL, moe_threadpool_create(2), moe_threadpool_create(3),
                                  moe_threadpool_create(4)};
    enum { T = 200, T2 = 130, IN = 96, N = 7 };
    float *x = xmalloc(sizeof(float) * T * IN), *x2 = xmalloc(sizeof(float) * T2 * IN);
    for (int k = 0; k < T * IN; k++)
        x[k] = rng_uniform(-2.0f, 2.0f);
    for (int k = 0; k < T2 * IN; k++)
        x2[k] = rng_uniform(-2.0f, 2.0f);
    batch_case bc[N];
    batch_case_init(&bc[0], x, MOE_DT_BF16, T, IN, 300);
    batch_case_init(&bc[1], x, MOE_DT_BF16, T, IN, 40);
    batch_case_init(&bc[2], x, MOE_DT_BF16, T, IN, 17);
    batch_case_init(&bc[3], x, MOE_DT_Q8, T, IN, 50);
    batch_case_init(&bc[4], x, MOE_DT_Q4, T, IN, 33);
    batch_case_init(&bc[5], x2, MOE_DT_BF16, T2, IN, 70);
    batch_case_init(&bc[6], x2, MOE_DT_Q8, T2, IN, 70);
    batch_sweep(bc, N, pools);
    for (int i = 0; i < N; i++)
        batch_case_free(&bc[i]);
    free(x);
    free(x2);
    for (int p = 1; p < 4; p++)
        moe_threadpool_free(pools[p]);
}

static void batch_sweep(batch_case *bc, int n, moe_threadpool_t **pools)
{
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    char what[64];
    for (int s = 0; s < n_isa; s++) {
        for (int round = 0; round < 1 + (isas[s] >= MOE_ISA_AVX512); round++) {
            cr_assert_eq(moe_kernels_force_isa(isas[s]), isas[s]);
            moe_kernels_test_bf16_x_round(round);
            for (int i = 0; i < n; i++)
                moe_matmul_serial(bc[i].yref, bc[i].d.x, bc[i].d.w, bc[i].d.wt, bc[i].d.n_tok,
                                  bc[i].d.n_in, bc[i].d.n_out);
            snprintf(what, sizeof what, "%s%s", moe_isa_name(isas[s]),
                     round ? " (MOE_BF16_X=round)" : "");
            for (int p = 0; p < 4; p++) {
                batch_check(bc, n, pools[p], what);
                if (n > 57)
                    batch_check(bc + 50, 7, pools[p], what); /* a short batch */
            }
            moe_kernels_test_no_scratch(1);
            snprintf(what, sizeof what, "%s%s without scratch", moe_isa_name(isas[s]),
                     round ? " (MOE_BF16_X=round)" : "");
            batch_check(bc, n, pools[2], what);
            moe_kernels_test_no_scratch(0);
        }
        moe_kernels_test_bf16_x_round(0);
    }
}

/* ---- the AVX512-VNNI int8 rows (quant_avx512.c), called directly ----
 * Whatever dispatch.c picks for this CPU, the VNNI kernel must give the scalar kernel's bits and
 * the AVX2 kernel's: on row ranges that start and end inside its tiles (8-row decode tiles, 4-row
 * batch tiles, the 2- and 1-row tails), token counts on both sides of every tile and chunk switch
 * (1..9, 17, 47, 48, 64, 130), decode tiles with and without prefetch, and x blocks that are all
 * zero or hold a NaN (that token's outputs NaN, in every kernel). The same for its variant with
 * the zmm Q8 and Q4 batch tiles (moe_matmul_rows_q_avx512z: Q4 4-6 token tiles, Q8 5 and 6, odd
 * ones with a copied half, one-row tiles, 7 tokens as 4 + 3). */
static void vnni_case(moe_dtype qt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    size_t nw = (size_t)n_in * n_out, ny = (size_t)n_tok * n_out;
    int nb = n_in / MOE_QK;
    float *wf = xmalloc(nw * sizeof *wf), *x = xmalloc((size_t)n_tok * n_in * sizeof *x);
    void *w = xmalloc(nw / MOE_QK * sizeof(moe_block_q8));
    int8_t *xq = xmalloc((size_t)n_tok * n_in);
    float *xd = xmalloc((size_t)n_tok * nb * sizeof *xd);
    float *ys = xmalloc(ny * sizeof *ys), *y2 = xmalloc(ny * sizeof *y2),
          *yv = xmalloc(ny * sizeof *yv), *yz = xmalloc(ny * sizeof *yz);
    for (size_t b = 0; b < nw / MOE_QK; b++)
        fill_block(wf + b * MOE_QK, (int)(rng_next() % 7));
    for (size_t i = 0; i < (size_t)n_tok * n_in; i++)
        x[i] = rng_uniform(-2.f, 2.f) * (i % 89 == 7 ? 40.f : 1.f);
    /* block 1 of token 0 all zero; some block of the last token NaN (if it has two blocks and
     * there are two tokens, so that other tokens stay finite) */
    if (nb > 1)
        for (int i = 0; i < MOE_QK; i++)
            x[MOE_QK + i] = 0.f;
    if (n_tok > 1)
        x[(size_t)(n_tok - 1) * n_in + (size_t)(rng_next() % (unsigned)n_in)] = NAN;
    cr_assert_eq(moe_quantize(w, qt, wf, MOE_DT_F32, nw), 0);
    moe_quantize_x_scalar(xq, xd, x, n_tok, n_in);
    for (size_t k = 0; k < ny; k++)
        ys[k] = y2[k] = yv[k] = yz[k] = -1.f; /* rows outside [r0, r1) must stay untouched */
    moe_matmul_rows_q_scalar(ys, xq, xd, w, qt, n_tok, n_in, n_out, r0, r1);
    moe_matmul_rows_q_avx2(y2, xq, xd, w, qt, n_tok, n_in, n_out, r0, r1);
    moe_matmul_rows_q_avx512(yv, xq, xd, w, qt, n_tok, n_in, n_out, r0, r1);
    moe_matmul_rows_q_avx512z(yz, xq, xd, w, qt, n_tok, n_in, n_out, r0, r1);
    for (int t = 0; t < n_tok; t++)
        for (int r = 0; r < n_out; r++) {
            size_t k = (size_t)t * n_out + r;
            uint32_t bs, b2, bv, bz;
            memcpy(&bs, &ys[k], 4);
            memcpy(&b2, &y2[k], 4);
            memcpy(&bv, &yv[k], 4);
            memcpy(&bz, &yz[k], 4);
            cr_assert(bv == bs && bv == b2 && bz == bs,
                      "vnni %s n_tok=%d n_in=%d n_out=%d rows [%d,%d): y[t=%d][r=%d] vnni %.9g "
                      "(%08x) zmm tiles %.9g (%08x) scalar %.9g (%08x) avx2 %.9g (%08x)",
                      moe_dtype_name(qt), n_tok, n_in, n_out, r0, r1, t, r, (double)yv[k], bv,
                      (double)yz[k], bz, (double)ys[k], bs, (double)y2[k], b2);
            if (r < r0 || r >= r1)
                cr_assert(yv[k] == -1.f && yz[k] == -1.f, "row %d outside [%d,%d) written", r,
                          r0, r1);
            else if (n_tok > 1 && t == n_tok - 1)
                cr_assert(isnan(yv[k]), "NaN x block: t=%d r=%d finite", t, r);
        }
    free(wf);
    free(x);
    free(w);
    free(xq);
    free(xd);
    free(ys);
    free(y2);
    free(yv);
    free(yz);
}

static void vnni_sweep(moe_dtype qt)
{
    if (!cpu_runs_isa(MOE_ISA_AVX512)) { /* the AVX-512 level requires VNNI (dispatch.c) */
        printf("quant/vnni_%s: skipped, this CPU lacks AVX512-VNNI (best isa %s)\n",
               moe_dtype_name(qt), moe_isa_name(moe_kernels_isa()));
        cr_skip_test("this CPU lacks AVX512-VNNI");
    }
    printf("quant/vnni_%s: AVX512-VNNI rows against scalar and AVX2 (dispatch: %s)\n",
           moe_dtype_name(qt), moe_kernels_describe());
    static const int n_toks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 47, 48, 64, 130};
    static const int n_ins[] = {32, 96, 544, 2048};
    static const int n_outs[] = {1, 3, 7, 13, 37};
    for (size_t a = 0; a < sizeof n_ins / sizeof *n_ins; a++)
        for (size_t b = 0; b < sizeof n_toks / sizeof *n_toks; b++)
            for (size_t c = 0; c < sizeof n_outs / sizeof *n_outs; c++) {
                int n_out = n_outs[c];
                if (n_ins[a] == 2048 && n_toks[b] > 9 && n_out > 13)
                    continue; /* keeps the sweep short; big n_tok runs at n_in <= 544 */
                vnni_case(qt, n_toks[b], n_ins[a], n_out, 0, n_out);
                if (n_out > 3) /* a row range starting and ending inside tiles */
                    vnni_case(qt, n_toks[b], n_ins[a], n_out, 1, n_out - 2);
            }
    /* Decode tiles too big to prefetch the next (Q8: 8 x 4352 bytes), long tasks that prefetch,
     * ranges that split the 8-row decode tile. */
    vnni_case(qt, 1, 4096, 41, 0, 41);
    vnni_case(qt, 1, 768, 600, 5, 597);
    vnni_case(qt, 16, 768, 100, 3, 94);
    vnni_case(qt, 130, 160, 61, 9, 60);
}

Test(quant, vnni_q8, .timeout = 120)
{
    vnni_sweep(MOE_DT_Q8);
}

Test(quant, vnni_q4, .timeout = 120)
{
    vnni_sweep(MOE_DT_Q4);
}
