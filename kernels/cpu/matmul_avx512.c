/* AVX-512 kernels: the bf16 matmul rows on vdpbf16ps (AVX512_BF16), f32 dot and axpy (compiled
 * with -mavx512f/bw/vl/dq/bf16/vnni; only called after dispatch.c saw all of those in CPUID). */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) &&                      \
    defined(__AVX512DQ__) && defined(__AVX512BF16__)

#define AI static inline __attribute__((always_inline))

#include "kernels/cpu/bf16_x_avx512.h"

/* Lanes [0, n) of 32, n in [0, 32]. */
AI __mmask32 mask32(int n)
{
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

/* ---- bf16 rows: numerics ----
 * vdpbf16ps takes, per f32 lane l, the bf16 pair (2l, 2l+1) of each operand, multiplies both
 * pairs exactly and adds them to the lane. The weights' row-major bf16 are already in that
 * pairing, so they are read as stored; x is converted once per call (token chunk) into a
 * per-thread buffer in the same order (x_to_bf16): as hi + lo bf16 (NX = 2, the default: 16
 * significand bits of x, each term within 2^-16 of the f32 product) or as one bf16 (NX = 1,
 * MOE_BF16_X=round: each term within 2^-8, which fails the HF bf16 fixture's tolerance).
 * Every output y[t][r] is one accumulator of 16 f32 lanes over k in steps of DP_K (lane l takes
 * k + 2l and k + 2l + 1, with hi and then with lo), the last partial step masked (weights zero, x
 * zero-padded) into the same accumulator, then hsum's fixed order. This holds for every n_tok,
 * tile shape, token chunk and row split, so an output's bits depend only on its row of W, its row
 * of x and n_in: batch invariance (docs/kernels.md) as on the AVX2 path, with other bits than
 * AVX2's. vdpbf16ps flushes subnormal inputs and results to zero (immaterial at model scales). */

/* zmm (16 lanes, 32 k per step) rather than ymm (AVX512VL, 8 lanes, 16 k): Zen 4 runs a 512-bit
 * op as two 256-bit halves, so both have the same peak there and measured the same in the kernel;
 * zmm issues half the instructions and loads per k. */
#define DP_K 32
typedef __m512 vacc;

/* DP_K bf16 at p. */
AI __m512i load_bf16(const uint16_t *p)
{
    return _mm512_loadu_si512((const void *)p);
}

/* The first n of DP_K bf16 at p, the rest zero (n in [1, DP_K]; masked lanes are never touched). */
AI __m512i load_bf16_tail(const uint16_t *p, int n)
{
    return _mm512_maskz_loadu_epi16(mask32(n), p);
}

AI vacc dp(vacc acc, __m512i a, __m512i b)
{
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

/* Fixed order: l + l+8, then + l+4, + l+2, + l+1 (lane 0 of each step). */
AI float hsum(vacc v)
{
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* hsum of 16 accumulators at once, v[4i + t] being row i, token t of a 4x4 tile: lanes 4t..4t+3 of
 * the result are rows 0..3 of token t. Every output takes exactly hsum's additions (l + l+8, then
 * + l+4, + l+2, + l+1; the shuffles only move lanes), so its bits are those of hsum: batch
 * invariance holds against the 1-token tiles. 15 adds and 30 shuffles for 16 outputs instead of 64
 * adds and 64 extracts/shuffles (at 4 tokens and n_in = 384 that was ~10% of the tile). */
AI __m512 hsum16(const vacc v[16])
{
    __m512 x[8], z[4], p[2];
    for (int k = 0; k < 8; k++) /* l + l+8: 256-bit halves of v[2k] | v[2k+1] */
        x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; k++) /* + l+4: blocks of v[4k..4k+3] in order */
        z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int k = 0; k < 2; k++) /* + l+2 */
        p[k] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* + l+1; block j: v[j], v[4 + j], v[8 + j], v[12 + j] */
    return _mm512_add_ps(_mm512_shuffle_ps(p[0], p[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(p[0], p[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* bf16 values per token and part of the x buffer: n_in zero-padded to a multiple of DP_K. */
AI int xb_n(int n_in)
{
    return (n_in + DP_K - 1) & ~(DP_K - 1);
}

/* x (n_tok rows of n_in f32) -> xb (n_tok rows of NX * xb_n(n_in) bf16). Per DP_K block of a
 * token: NX = 1: bf16(x), round to nearest even; NX = 2: hi = bf16(x) then lo = bf16(x - hi)
 * (x - hi is exact in f32; a non-finite x gets lo = 0, so inf stays inf). */
AI void x_to_bf16(uint16_t *xb, const float *x, int n_tok, int n_in, int NX)
{
    int np = xb_n(n_in);
    for (int t = 0; t < n_tok; t++) {
        const float *xt = x + (size_t)t * n_in;
        uint16_t *o = xb + (size_t)t * np * NX;
        for (int k = 0; k < np; k += 32) {
            __m512i hi, lo;
            bf16_x32(xt, k, n_in, &hi, NX == 2 ? &lo : NULL);
            _mm512_storeu_si512((void *)(o + NX * k), hi);
            if (NX == 2)
                _mm512_storeu_si512((void *)(o + NX * k + 32), lo);
        }
    }
}

/* NR rows x NT tokens of accumulators from row r, token t0. xb: the tokens' bf16 rows, xs apart.
 * pf: the next row tile to prefetch, or NULL. */
AI void dot_tile(float *y, const uint16_t *xb, size_t xs, const uint16_t *w, int n_in, int n_out,
                 int r, int t0, int NR, int NT, int NX, const char *pf)
{
    vacc acc[8][6];
    const uint16_t *wr[8], *xr[6];
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
        wr[i] = w + (size_t)(r + i) * n_in;
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm512_setzero_ps();
    }
#pragma GCC unroll 6
    for (int t = 0; t < NT; t++)
        xr[t] = xb + (size_t)(t0 + t) * xs;
    const int nk = n_in / DP_K * DP_K;
    for (int k = 0; k < nk; k += DP_K) {
        if (pf) /* see moe_prefetch_step */
            moe_prefetch_step(pf, (size_t)k * NR * 2, (size_t)NR * DP_K * 2,
                              moe_pf_rows_into_l2((size_t)NR * n_in * 2));
        __m512i wv[8];
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            wv[i] = load_bf16(wr[i] + k);
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) {
#pragma GCC unroll 2
            for (int h = 0; h < NX; h++) {
                __m512i xv = load_bf16(xr[t] + NX * k + DP_K * h);
#pragma GCC unroll 8
                for (int i = 0; i < NR; i++)
                    acc[i][t] = dp(acc[i][t], wv[i], xv);
            }
        }
    }
    if (nk < n_in) {
        __m512i wv[8];
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            wv[i] = load_bf16_tail(wr[i] + nk, n_in - nk);
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) {
#pragma GCC unroll 2
            for (int h = 0; h < NX; h++) {
                /* zero-padded by x_to_bf16 */
                __m512i xv = load_bf16(xr[t] + NX * nk + DP_K * h);
#pragma GCC unroll 8
                for (int i = 0; i < NR; i++)
                    acc[i][t] = dp(acc[i][t], wv[i], xv);
            }
        }
    }
    if (NR == 4 && NT == 4) {
        vacc v[16];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++)
                v[4 * i + t] = acc[i][t];
        __m512 s = hsum16(v);
        _mm_storeu_ps(y + (size_t)t0 * n_out + r, _mm512_castps512_ps128(s));
        _mm_storeu_ps(y + (size_t)(t0 + 1) * n_out + r, _mm512_extractf32x4_ps(s, 1));
        _mm_storeu_ps(y + (size_t)(t0 + 2) * n_out + r, _mm512_extractf32x4_ps(s, 2));
        _mm_storeu_ps(y + (size_t)(t0 + 3) * n_out + r, _mm512_extractf32x4_ps(s, 3));
        return;
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = hsum(acc[i][t]);
}

/* One row tile's tokens in tiles of NT (the last 1..NT-1 wide); the first token tile prefetches. */
AI void dot_row_tile(float *y, const uint16_t *xb, size_t xs, const uint16_t *w, int n_tok,
                     int n_in, int n_out, int r, int NR, int NT, int NX, const char *pf)
{
    int t = 0;
    for (; t + NT <= n_tok; t += NT)
        dot_tile(y, xb, xs, w, n_in, n_out, r, t, NR, NT, NX, t == 0 ? pf : NULL);
    const char *p = t == 0 ? pf : NULL;
    switch (n_tok - t) {
    case 5:
        dot_tile(y, xb, xs, w, n_in, n_out, r, t, NR, 5, NX, p);
        break;
    case 4:
        dot_tile(y, xb, xs, w, n_in, n_out, r, t, NR, 4, NX, p);
        break;
    case 3:
        dot_tile(y, xb, xs, w, n_in, n_out, r, t, NR, 3, NX, p);
        break;
    case 2:
        dot_tile(y, xb, xs, w, n_in, n_out, r, t, NR, 2, NX, p);
        break;
    case 1:
        dot_tile(y, xb, xs, w, n_in, n_out, r, t, NR, 1, NX, p);
        break;
    default:
        break;
    }
}

/* Rows [r0, r1) in tiles of NR rows, the last rows one at a time. As on the AVX2 path, the first
 * token tile of a row tile prefetches the next one (moe_pf_rows_into_l2): short rows
 * are short streams the hardware prefetcher barely ramps up on. */
AI void dot_rows_nr(float *y, const uint16_t *xb, size_t xs, const uint16_t *w, int n_tok, int n_in,
                    int n_out, int r0, int r1, int NR, int NT, int NX)
{
    int r = r0;
    const size_t tile_bytes = (size_t)NR * n_in * 2;
    for (; r + NR <= r1; r += NR) {
        const char *pf = r + 2 * NR <= r1 && moe_pf_rows_into_l2(tile_bytes) != MOE_PF_NONE
                             ? (const char *)(w + (size_t)(r + NR) * n_in)
                             : NULL;
        dot_row_tile(y, xb, xs, w, n_tok, n_in, n_out, r, NR, NT, NX, pf);
    }
    for (; r < r1; r++)
        dot_row_tile(y, xb, xs, w, n_tok, n_in, n_out, r, 1, NT, NX, NULL);
}

/* Tile shapes (Zen 4, one core). The decode matvec (n_tok = 1) streams its weights from memory:
 * with rows of n_in <= DP_SHORT_ROW, 4-row tiles (8 KB at n_in = 1024, the next one prefetched)
 * ran 5-15% faster than the AVX2 rows from DRAM where 8-row ones ran 10-25% slower; longer rows
 * stream on the hardware prefetcher and take 8 rows (50304x2048: 8 rows 1.2x AVX2, 4 rows 0.8x).
 * From 2 tokens on 4 rows x 2 and 4 x 4 tokens (16 of the 32 zmm). In cache every shape is 1.8-2.2x
 * the AVX2 rows at n_tok = 1. */
#define DP_SHORT_ROW 1024

AI void dot_rows(float *y, const uint16_t *xb, size_t xs, const uint16_t *w, int n_tok, int n_in,
                 int n_out, int r0, int r1, int NX)
{
    if (n_tok == 1 && n_in <= DP_SHORT_ROW)
        dot_rows_nr(y, xb, xs, w, n_tok, n_in, n_out, r0, r1, 4, 1, NX);
    else if (n_tok == 1)
        dot_rows_nr(y, xb, xs, w, n_tok, n_in, n_out, r0, r1, 8, 1, NX);
    else if (n_tok == 2)
        dot_rows_nr(y, xb, xs, w, n_tok, n_in, n_out, r0, r1, 4, 2, NX);
    else
        dot_rows_nr(y, xb, xs, w, n_tok, n_in, n_out, r0, r1, 4, 4, NX);
}

/* Token chunks from DP_CHUNK_MIN_TOK tokens on (prefill): the chunk's bf16 x stays in L2 while
 * every row tile of the task meets it. Fewer tokens go in one chunk, so every weight row streams
 * once per call. Chunks leave every output's arithmetic unchanged. */
#define DP_TOKC 24
#define DP_CHUNK_MIN_TOK 48
/* The no-scratch path's stack buffer (bf16 values): NX * n_in up to 65536. */
#define XB_STACK 65536

static __attribute__((noinline)) void rows_bf16_by_token(float *y, const float *x,
                                                         const uint16_t *w, int n_tok, int n_in,
                                                         int n_out, int r0, int r1, int NX)
{
    _Alignas(64) uint16_t xb[XB_STACK];
    MOE_KASSERT(NX * xb_n(n_in) <= XB_STACK &&
                "moe_matmul (avx512, bf16): out of memory for the x scratch");
    for (int t = 0; t < n_tok; t++) {
        x_to_bf16(xb, x + (size_t)t * n_in, 1, n_in, NX);
        dot_rows(y + (size_t)t * n_out, xb, (size_t)NX * xb_n(n_in), w, 1, n_in, n_out, r0, r1, NX);
    }
}

AI void rows_bf16(float *y, const float *x, const uint16_t *w, int n_tok, int n_in, int n_out,
                  int r0, int r1, int NX)
{
    int chunk = n_tok >= DP_CHUNK_MIN_TOK ? DP_TOKC : n_tok;
    size_t xs = (size_t)NX * xb_n(n_in);
    uint16_t *xb = moe_rows_scratch((size_t)chunk * xs * sizeof *xb);
    if (!xb) {
        rows_bf16_by_token(y, x, w, n_tok, n_in, n_out, r0, r1, NX);
        return;
    }
    for (int tc = 0; tc < n_tok; tc += chunk) {
        int nt = n_tok - tc < chunk ? n_tok - tc : chunk;
        x_to_bf16(xb, x + (size_t)tc * n_in, nt, n_in, NX);
        dot_rows(y + (size_t)tc * n_out, xb, xs, w, nt, n_in, n_out, r0, r1, NX);
    }
}

static void rows_bf16_split(float *y, const float *x, const uint16_t *w, int n_tok, int n_in,
                            int n_out, int r0, int r1)
{
    rows_bf16(y, x, w, n_tok, n_in, n_out, r0, r1, 2);
}

static void rows_bf16_round(float *y, const float *x, const uint16_t *w, int n_tok, int n_in,
                            int n_out, int r0, int r1)
{
    rows_bf16(y, x, w, n_tok, n_in, n_out, r0, r1, 1);
}

void moe_matmul_rows_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1)
{
    /* f32 and f16 weights: the AVX2 rows, measured faster on Zen 4 than 16-lane FMA tiles
     * (docs/kernels.md); bf16: the vdpbf16ps rows, x split into hi + lo, for every n_tok (batch
     * invariance). */
    if (wt == MOE_DT_BF16)
        rows_bf16_split(y, x, w, n_tok, n_in, n_out, r0, r1);
    else
        moe_matmul_rows_avx2(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

void moe_matmul_rows_avx512_xbf16(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                                  int n_in, int n_out, int r0, int r1)
{
    if (wt == MOE_DT_BF16)
        rows_bf16_round(y, x, w, n_tok, n_in, n_out, r0, r1);
    else
        moe_matmul_rows_avx2(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx512(const float *a, const float *b, int n)
{
    __m512 s = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s);
    }
    return _mm512_reduce_add_ps(s);
}

void moe_axpy_f32_avx512(float *y, float a, const float *x, int n)
{
    /* mul then add, not FMA: the same rounding as the scalar y += a * x. */
    __m512 av = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        __m512 r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i),
                                 _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, x + i)));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

#else /* built without the flags: never dispatched */

void moe_matmul_rows_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

void moe_matmul_rows_avx512_xbf16(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                                  int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx512(const float *a, const float *b, int n)
{
    return moe_dot_f32_scalar(a, b, n);
}

void moe_axpy_f32_avx512(float *y, float a, const float *x, int n)
{
    moe_axpy_f32_scalar(y, a, x, n);
}

#endif
