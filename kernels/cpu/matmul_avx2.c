/* AVX2+FMA+F16C vector kernels: matmul, dot, axpy (this file is compiled with -mavx2 -mfma
 * -mf16c; it is only called after dispatch.c saw those features in CPUID). */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define AI static inline __attribute__((always_inline))

/* Decode matvec tiles of at most this many bytes get the next tile prefetched (dot_rows_nr). */
#define PF_MAX_TILE_BYTES 16384

/* ---- numerics ----
 * Every output y[t][r] is one 8-lane f32 accumulator over k in steps of 8 (lane l sums
 * k = l mod 8 in increasing k), FMA, the last partial 8 zero-padded into the same accumulator,
 * then hsum8's fixed-order horizontal sum. This holds for every n_tok, tile shape, token chunk and
 * row split, so an output's bits depend only on its row of W, its row of x and n_in: a token
 * computed alone (decode) and the same token inside a 70-token prefill get the same bits
 * (batch invariance, docs/kernels.md). There was a packed sgemm-style panel path for n_tok >= 48
 * (one FMA chain over k per output): faster for prefill, but other bits than the dot tiles. */

/* 8 weights at w[i..i+8) of a row starting at w, as f32. wt is a compile-time constant at every
 * call site. */
AI __m256 load_w8(const void *w, size_t i, int wt)
{
    if (wt == MOE_DT_F32)
        return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (wt == MOE_DT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* The last n_in % 8 weights of a row, zero-padded to 8. */
AI __m256 load_w_tail(const void *w, size_t i, int n, int wt)
{
    if (wt == MOE_DT_F32) {
        float buf[8] = {0};
        memcpy(buf, (const float *)w + i, (size_t)n * sizeof(float));
        return _mm256_loadu_ps(buf);
    }
    uint16_t buf[8] = {0};
    memcpy(buf, (const uint16_t *)w + i, (size_t)n * sizeof(uint16_t));
    return load_w8(buf, 0, wt);
}

AI __m256 load_x_tail(const float *x, int n)
{
    float buf[8] = {0};
    memcpy(buf, x, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(buf);
}

AI float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);          /* l + l+4 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); /* + (l+2) */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));  /* + (l+1) */
    return _mm_cvtss_f32(s);
}

AI size_t elem_size(int wt)
{
    return wt == MOE_DT_F32 ? 4 : 2;
}

/* ---- dot path: NR rows x NT tokens of register accumulators ---- */
AI void dot_tile(float *y, const float *x, const void *w, int wt, int n_in, int n_out, int r,
                 int t0, int NR, int NT, const char *pf)
{
    __m256 acc[8][4];
    const char *wr[8];
    const float *xr[4];
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
        wr[i] = (const char *)w + (size_t)(r + i) * n_in * elem_size(wt);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++)
        xr[t] = x + (size_t)(t0 + t) * n_in;
    int n8 = n_in & ~7;
    for (int k = 0; k < n8; k += 8) {
        __m256 wv[8];
        if (pf) {
            /* The NR rows of this tile are one contiguous block, and so are the next tile's: each
             * step consumes NR * 8 weights here and prefetches as many bytes of the next tile,
             * so the next tile is in cache when it starts. */
            const char *p = pf + (size_t)k * (size_t)NR * elem_size(wt);
#pragma GCC unroll 4
            for (size_t c = 0; c < (size_t)NR * 8 * elem_size(wt); c += 64)
                _mm_prefetch(p + c, _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            wv[i] = load_w8(wr[i], (size_t)k, wt);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            __m256 xv = _mm256_loadu_ps(xr[t] + k);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    if (n8 < n_in) {
        int n = n_in - n8;
        __m256 wv[8];
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            wv[i] = load_w_tail(wr[i], (size_t)n8, n, wt);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            __m256 xv = load_x_tail(xr[t] + n8, n);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = hsum8(acc[i][t]);
}

/* Rows [r0, r1) in tiles of NR rows x 4 tokens (the last token tile 1-3 wide).
 * Prefetch: with rows of n_in <= 1024 bf16 a tile's NR rows are NR short streams (24 cache lines
 * each for n_in = 768) that the hardware prefetcher barely ramps up on: 384x768 bf16 matvecs ran
 * at 55-65% of a long stream's speed on Zen 3. So the first token tile of each row tile (the one
 * that reads the weights from memory; the others re-read them from L1) prefetches the next row
 * tile of this task (its rows are one contiguous block). This matters for decode (n_tok = 1) and
 * for the few tokens per expert of a batched decode step (MoE: batch x top_k / n_experts). Bigger
 * tiles stream well without it, and a whole tile ahead (>= 32 KB) would evict L1: 4096x4096 lost
 * 20% with it. */
AI void dot_rows_nr(float *y, const float *x, const void *w, int wt, int n_tok, int n_in, int n_out,
                    int r0, int r1, int NR)
{
    int r = r0;
    const size_t tile_bytes = (size_t)NR * n_in * elem_size(wt);
    for (; r + NR <= r1; r += NR) {
        const char *pf = r + 2 * NR <= r1 && tile_bytes <= PF_MAX_TILE_BYTES
                             ? (const char *)w + (size_t)(r + NR) * n_in * elem_size(wt)
                             : NULL;
        int t = 0;
        for (; t + 4 <= n_tok; t += 4)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 4, t == 0 ? pf : NULL);
        switch (n_tok - t) {
        case 3:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 3, t == 0 ? pf : NULL);
            break;
        case 2:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 2, t == 0 ? pf : NULL);
            break;
        case 1:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 1, t == 0 ? pf : NULL);
            break;
        default:
            break;
        }
    }
    for (; r < r1; r++) {
        int t = 0;
        for (; t + 4 <= n_tok; t += 4)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 4, NULL);
        switch (n_tok - t) {
        case 3:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 3, NULL);
            break;
        case 2:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 2, NULL);
            break;
        case 1:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 1, NULL);
            break;
        default:
            break;
        }
    }
}

/* Tile shapes measured on Zen 3 (bf16 4096x4096, one core): n_tok = 1 is memory bound, 8 rows
 * stream at once; n_tok = 2: 5 rows x 2 tokens (10 accumulators) beat 4x2 and 6x2; from 3 tokens
 * on, 3 rows x 4 tokens (12 accumulators + 3 weight + 1 x register) reaches 60-70 GFLOP/s, as
 * much as the packed panel path below 20 tokens. The weight tile is read from memory once; the
 * other token tiles re-read it from L1/L2. */
AI void dot_rows(float *y, const float *x, const void *w, int wt, int n_tok, int n_in, int n_out,
                 int r0, int r1)
{
    if (n_tok == 1)
        dot_rows_nr(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 8);
    else if (n_tok == 2)
        dot_rows_nr(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 5);
    else
        dot_rows_nr(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 3);
}

/* Token chunks from DOT_CHUNK_MIN_TOK tokens on (prefill): the chunk's x (DOT_TOKC x n_in floats:
 * 96 KB for n_in = 2048) stays in L2 while every row tile of this task meets it; without chunks
 * each 3-row tile re-read all of x from L3. The weights are read once per chunk. Fewer tokens (a
 * batched decode step's share of an expert) go in one chunk, so every weight row streams once per
 * call. Chunks, like the tile shapes, leave every output's arithmetic unchanged. */
#define DOT_TOKC 12
#define DOT_CHUNK_MIN_TOK 48

static void rows_float(float *y, const float *x, const void *w, int wt, int n_tok, int n_in,
                       int n_out, int r0, int r1)
{
    int chunk = n_tok >= DOT_CHUNK_MIN_TOK ? DOT_TOKC : n_tok;
    for (int tc = 0; tc < n_tok; tc += chunk) {
        int nt = n_tok - tc < chunk ? n_tok - tc : chunk;
        const float *xc = x + (size_t)tc * n_in;
        float *yc = y + (size_t)tc * n_out;
        switch (wt) {
        case MOE_DT_F32:
            dot_rows(yc, xc, w, MOE_DT_F32, nt, n_in, n_out, r0, r1);
            break;
        case MOE_DT_BF16:
            dot_rows(yc, xc, w, MOE_DT_BF16, nt, n_in, n_out, r0, r1);
            break;
        default:
            dot_rows(yc, xc, w, MOE_DT_F16, nt, n_in, n_out, r0, r1);
            break;
        }
    }
}

void moe_matmul_rows_avx2(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1)
{
    MOE_KASSERT((wt == MOE_DT_F32 || wt == MOE_DT_BF16 || wt == MOE_DT_F16) &&
                "moe_matmul (avx2): weight dtype must be F32, BF16 or F16 (Q8/Q4: matmul_rows_q)");
    rows_float(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx2(const float *a, const float *b, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i + 8 <= n) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        i += 8;
    }
    if (i < n)
        s1 = _mm256_fmadd_ps(load_x_tail(a + i, n - i), load_x_tail(b + i, n - i), s1);
    return hsum8(_mm256_add_ps(s0, s1));
}

void moe_axpy_f32_avx2(float *y, float a, const float *x, int n)
{
    /* mul then add, not FMA: the same rounding as the scalar y += a * x. */
    __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i),
                                              _mm256_mul_ps(av, _mm256_loadu_ps(x + i))));
    for (; i < n; i++)
        y[i] += a * x[i];
}

#else /* built without the flags (not x86, or a compiler that ignored them): never dispatched */

void moe_matmul_rows_avx2(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx2(const float *a, const float *b, int n)
{
    return moe_dot_f32_scalar(a, b, n);
}

void moe_axpy_f32_avx2(float *y, float a, const float *x, int n)
{
    moe_axpy_f32_scalar(y, a, x, n);
}

#endif
