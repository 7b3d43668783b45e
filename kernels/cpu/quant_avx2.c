/* AVX2 kernels of the quantized (Q8/Q4) matmul: activation quantization and int8 block dot
 * products (compiled with -mavx2 -mfma -mf16c; only called after dispatch.c saw them in CPUID). */
#include <float.h>
#include <immintrin.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define AI static inline __attribute__((always_inline))

void moe_quantize_x_avx2(int8_t *q, float *d, const float *x, int n_tok, int n_in)
{
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(FLT_MAX);
    /* packs_epi32/packs_epi16 interleave 128-bit lanes: this puts the dwords back in order. */
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int nb = n_in / MOE_QK;
    for (int t = 0; t < n_tok; t++)
        for (int b = 0; b < nb; b++) {
            const float *v = x + (size_t)t * n_in + (size_t)b * MOE_QK;
            int8_t *o = q + (size_t)t * n_in + (size_t)b * MOE_QK;
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
            __m256 a0 = _mm256_andnot_ps(sign, v0), a1 = _mm256_andnot_ps(sign, v1);
            __m256 a2 = _mm256_andnot_ps(sign, v2), a3 = _mm256_andnot_ps(sign, v3);
            /* All finite (NaN compares false). */
            __m256 fin = _mm256_and_ps(
                _mm256_and_ps(_mm256_cmp_ps(a0, fmax, _CMP_LE_OQ), _mm256_cmp_ps(a1, fmax, _CMP_LE_OQ)),
                _mm256_and_ps(_mm256_cmp_ps(a2, fmax, _CMP_LE_OQ), _mm256_cmp_ps(a3, fmax, _CMP_LE_OQ)));
            __m256 m = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float amax = _mm_cvtss_f32(m4);
            int bad = _mm256_movemask_ps(fin) != 0xff;
            if (bad || amax < MOE_QX_MIN_AMAX) {
                d[(size_t)t * nb + b] = bad ? __builtin_nanf("") : 0.0f;
                _mm256_storeu_si256((__m256i *)o, _mm256_setzero_si256());
                continue;
            }
            float id = 127.0f / amax;
            d[(size_t)t * nb + b] = amax / 127.0f;
            __m256 s = _mm256_set1_ps(id);
            /* vcvtps2dq rounds to nearest even (default MXCSR), as nearbyintf in the scalar path */
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, s));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, s));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, s));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, s));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)o, _mm256_permutevar8x32_epi32(p, perm));
        }
}

AI float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- the tile: NR rows x NT tokens, one 8-lane f32 accumulator per output ----
 * vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16; vpmaddwd by ones then
 * adds pairs of those, so lane j of a block holds the exact integer dot of inputs 4j..4j+3.
 * Q8 (both operands signed): |x| * (w * sign(x)) = w * x, |x| computed once per token and block
 * and shared by the NR rows (pairs stay below 2 * 127 * 127, no int16 saturation).
 * Q4: the codes c = w + 8 are already unsigned: c * x - 8 * x, with 8 * x (as pair sums) once per
 * token and block (pairs below 2 * 15 * 127). Either way the lane sums are the same integers, and
 * one FMA per block adds lane * (d_w * d_x): the scalar kernel's arithmetic, bit for bit. */
AI void q_tile(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
               int wt, int n_in, int n_out, int r, int t0, int NR, int NT)
{
    int nb = n_in / MOE_QK;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi8(8);
    __m256 acc[4][4];
    const char *wr[4];
    const int8_t *xr[4];
    const float *dr[4];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        wr[i] = w + (size_t)(r + i) * row_bytes;
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        xr[t] = xq + (size_t)(t0 + t) * n_in;
        dr[t] = xd + (size_t)(t0 + t) * nb;
    }
    for (int b = 0; b < nb; b++) {
        __m256i wv[4];
        __m256 dw[4];
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++) {
            if (wt == MOE_DT_Q8) {
                const moe_block_q8 *blk = (const moe_block_q8 *)wr[i] + b;
                dw[i] = _mm256_set1_ps(_cvtsh_ss(blk->d));
                wv[i] = _mm256_loadu_si256((const __m256i *)blk->q);
            } else {
                const moe_block_q4 *blk = (const moe_block_q4 *)wr[i] + b;
                dw[i] = _mm256_set1_ps(_cvtsh_ss(blk->d));
                __m128i p = _mm_loadu_si128((const __m128i *)blk->q);
                __m256i both = _mm256_set_m128i(_mm_srli_epi16(p, 4), p);
                wv[i] = _mm256_and_si256(both, _mm256_set_m128i(lo4, lo4)); /* codes 0..15 */
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[t] + (size_t)b * MOE_QK));
            __m256 dx = _mm256_broadcast_ss(dr[t] + b);
            __m256i ax = wt == MOE_DT_Q8 ? _mm256_sign_epi8(xv, xv) : _mm256_setzero_si256();
            __m256i x8 = wt == MOE_DT_Q4 ? _mm256_maddubs_epi16(eight, xv) : _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++) {
                __m256i p;
                if (wt == MOE_DT_Q8)
                    p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[i], xv));
                else
                    p = _mm256_sub_epi16(_mm256_maddubs_epi16(wv[i], xv), x8);
                __m256 l = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                acc[i][t] = _mm256_fmadd_ps(l, _mm256_mul_ps(dw[i], dx), acc[i][t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = hsum8(acc[i][t]);
}

typedef void (*q_tile_fn)(float *y, const int8_t *xq, const float *xd, const char *w,
                          size_t row_bytes, int n_in, int n_out, int r, int t0);

/* One out-of-line function per (dtype, rows, tokens): readable code and a small binary. */
#define Q_TILE(WT, NR, NT)                                                                     \
    static void q_tile_##WT##_##NR##x##NT(float *y, const int8_t *xq, const float *xd,         \
                                          const char *w, size_t row_bytes, int n_in, int n_out, \
                                          int r, int t0)                                       \
    {                                                                                          \
        q_tile(y, xq, xd, w, row_bytes, MOE_DT_##WT, n_in, n_out, r, t0, NR, NT);              \
    }
#define Q_TILES(WT)                                                                            \
    Q_TILE(WT, 4, 1)                                                                           \
    Q_TILE(WT, 2, 4)                                                                           \
    Q_TILE(WT, 2, 3)                                                                           \
    Q_TILE(WT, 2, 2)                                                                           \
    Q_TILE(WT, 2, 1)                                                                           \
    Q_TILE(WT, 1, 4)                                                                           \
    Q_TILE(WT, 1, 3)                                                                           \
    Q_TILE(WT, 1, 2)                                                                           \
    Q_TILE(WT, 1, 1)
Q_TILES(Q8)
Q_TILES(Q4)

/* [rows: 0 = 1, 1 = 2, 2 = 4][tokens - 1] */
static const q_tile_fn tiles_q8[3][4] = {
    {q_tile_Q8_1x1, q_tile_Q8_1x2, q_tile_Q8_1x3, q_tile_Q8_1x4},
    {q_tile_Q8_2x1, q_tile_Q8_2x2, q_tile_Q8_2x3, q_tile_Q8_2x4},
    {q_tile_Q8_4x1, NULL, NULL, NULL}};
static const q_tile_fn tiles_q4[3][4] = {
    {q_tile_Q4_1x1, q_tile_Q4_1x2, q_tile_Q4_1x3, q_tile_Q4_1x4},
    {q_tile_Q4_2x1, q_tile_Q4_2x2, q_tile_Q4_2x3, q_tile_Q4_2x4},
    {q_tile_Q4_4x1, NULL, NULL, NULL}};

/* Tokens in chunks of Q_TOKC so a chunk's quantized x (Q_TOKC x n_in bytes) stays in L2 while
 * the rows pass; each weight row is read from memory once per chunk. */
#define Q_TOKC 64

void moe_matmul_rows_q_avx2(float *y, const int8_t *xq, const float *xd, const void *w,
                            moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    const q_tile_fn(*tiles)[4] = wt == MOE_DT_Q8 ? tiles_q8 : tiles_q4;
    size_t row_bytes = moe_dtype_row_bytes(wt, (size_t)n_in);
    const char *wc = w;
    /* Decode (one token): 4 rows stream side by side; more tokens: 2 rows x 4 tokens (8
     * accumulators; x and its |x| or 8x shared by 2 rows). Measured on Zen 3 (kernels_bench). */
    int nr = n_tok == 1 ? 4 : 2, nr_idx = n_tok == 1 ? 2 : 1, nt = n_tok == 1 ? 1 : 4;
    for (int tc = 0; tc < n_tok; tc += Q_TOKC) {
        int te = tc + Q_TOKC < n_tok ? tc + Q_TOKC : n_tok;
        for (int r = r0; r < r1;) {
            int ri = r + nr <= r1 ? nr_idx : 0, rn = r + nr <= r1 ? nr : 1;
            for (int t = tc; t < te; t += nt) {
                int tn = te - t < nt ? te - t : nt;
                tiles[ri][tn - 1](y, xq, xd, wc, row_bytes, n_in, n_out, r, t);
            }
            r += rn;
        }
    }
}

#else /* built without the flags: never dispatched */

void moe_quantize_x_avx2(int8_t *q, float *d, const float *x, int n_tok, int n_in)
{
    moe_quantize_x_scalar(q, d, x, n_tok, n_in);
}

void moe_matmul_rows_q_avx2(float *y, const int8_t *xq, const float *xd, const void *w,
                            moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_q_scalar(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1);
}

#endif
