/* AVX2 kernels of the quantized (Q8/Q4) matmul: activation quantization and int8 block dot
 * products (compiled with -mavx2 -mfma -mf16c; only called after dispatch.c saw them in CPUID). */
#include <float.h>
#include <immintrin.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#include "kernels/cpu/quant_x86.h"

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
            __m256 fin = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(a0, fmax, _CMP_LE_OQ),
                                                     _mm256_cmp_ps(a1, fmax, _CMP_LE_OQ)),
                                       _mm256_and_ps(_mm256_cmp_ps(a2, fmax, _CMP_LE_OQ),
                                                     _mm256_cmp_ps(a3, fmax, _CMP_LE_OQ)));
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

/* ---- Q8 tile: NR rows x NT tokens, one 8-lane f32 accumulator per output ----
 * vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16; vpmaddwd by ones then
 * adds pairs of those, so lane j of a block holds the exact integer dot of inputs 4j..4j+3.
 * Both operands are signed: |x| * (w * sign(x)) = w * x, |x| once per token and block, shared by
 * the NR rows (pairs stay below 2 * 127 * 127: no int16 saturation). One FMA per block adds
 * lane * (d_w * d_x), the product taken from the group's table (scales8): the scalar kernel's
 * arithmetic, bit for bit. */
AI void q8_tile(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                int n_in, int n_out, int r, int t0, int NR, int NT, const char *pf)
{
    int nb = n_in / MOE_QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[8][4];
    const moe_block_q8 *wr[8];
    const int8_t *xr[4];
    const float *dr[4];
    /* d_w * d_x of the group: [token][row][block] */
    float pr[4][8][QG] __attribute__((aligned(32)));
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
        wr[i] = (const moe_block_q8 *)(w + (size_t)(r + i) * row_bytes);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    }
    q_token_rows(xr, dr, xq, xd, n_in, t0, NT, NT);
    for (int b0 = 0; b0 < nb; b0 += QG) {
        int g = nb - b0 < QG ? nb - b0 : QG;
        __m256 dx[4];
        xscales_tile(dx, dr, NT, b0, g);
#pragma GCC unroll 8
        for (int i = 0; i < NR && NT > 1; i++) { /* one token: per block (see QG) */
            __m256 dw = scales8((const char *)wr[i], sizeof(moe_block_q8), b0, g);
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++)
                _mm256_store_ps(pr[t][i], _mm256_mul_ps(dw, dx[t]));
        }
        for (int k = 0; k < g; k++) {
            int b = b0 + k;
            __m256i wv[8];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (size_t)NR * sizeof(moe_block_q8),
                                  (size_t)NR * sizeof(moe_block_q8), MOE_PF_L1);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                wv[i] = _mm256_loadu_si256((const __m256i *)wr[i][b].q);
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[t] + (size_t)b * MOE_QK));
                __m256i ax = _mm256_sign_epi8(xv, xv);
#pragma GCC unroll 8
                for (int i = 0; i < NR; i++) {
                    __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[i], xv));
                    __m256 l = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                    __m256 sc = NT > 1 ? _mm256_broadcast_ss(&pr[t][i][k])
                                       : _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(wr[i][b].d)),
                                                       _mm256_broadcast_ss(dr[t] + b));
                    acc[i][t] = _mm256_fmadd_ps(l, sc, acc[i][t]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = hsum8(acc[i][t]);
}

/* ---- Q4 tile: NP row pairs x NT tokens ----
 * A pair of rows shares one register: the 16 code bytes of row A in the low 128 bits, of row B in
 * the high ones, so one AND and one shift+AND unpack both rows: "lo" holds codes of inputs 0..15,
 * "hi" of inputs 16..31, of each row in its half. x is laid out to match ([x0..15 | x0..15] and
 * [x16..31 | x16..31]). The codes c = w + 8 are unsigned, so c * x needs no sign trick; 8 * x is
 * subtracted in int16 (pairs of c * x below 2 * 15 * 127; the int16 sum below 2^14). vpmaddwd then
 * leaves per row 4 int32 lanes, lane j = the exact integer dot over inputs 4j..4j+3 and
 * 16+4j..16+4j+3, and one FMA per block adds lane * (d_w * d_x), [pA x 4 | pB x 4] blended from
 * the group's table (scales8); the result is hsum4 of the lanes. The scalar kernel does exactly
 * this (bit for bit). */
AI void q4_tile(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                int n_in, int n_out, int r, int t0, int NP, int NT, int single, const char *pf)
{
    int nb = n_in / MOE_QK;
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi8(8);
    const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[4][4];
    const moe_block_q4 *wa[4], *wb[4];
    const int8_t *xr[4];
    const float *dr[4];
    /* d_w * d_x of the group: [token][pair][row A, row B][block] */
    float pr[4][4][2][QG] __attribute__((aligned(32)));
    q4_pair_rows(wa, wb, w, row_bytes, r, NP, single);
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[p][t] = _mm256_setzero_ps();
    q_token_rows(xr, dr, xq, xd, n_in, t0, NT, NT);
    for (int b0 = 0; b0 < nb; b0 += QG) {
        int g = nb - b0 < QG ? nb - b0 : QG;
        __m256 dx[4];
        xscales_tile(dx, dr, NT, b0, g);
#pragma GCC unroll 4
        for (int p = 0; p < NP && NT > 1; p++) { /* one token: per block (see QG) */
            __m256 da = scales8((const char *)wa[p], sizeof(moe_block_q4), b0, g);
            __m256 db = single ? da : scales8((const char *)wb[p], sizeof(moe_block_q4), b0, g);
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                _mm256_store_ps(pr[t][p][0], _mm256_mul_ps(da, dx[t]));
                _mm256_store_ps(pr[t][p][1], _mm256_mul_ps(db, dx[t]));
            }
        }
        for (int k = 0; k < g; k++) {
            int b = b0 + k;
            __m256i lo[4], hi[4];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (single ? 1 : 2 * NP) * sizeof(moe_block_q4),
                                  (size_t)(single ? 1 : 2 * NP) * sizeof(moe_block_q4), MOE_PF_L1);
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
                __m256i v = q4_pair_block(&wa[p][b], &wb[p][b]);
                lo[p] = _mm256_and_si256(v, m4);
                hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                /* Broadcast loads (no shuffle on the vector pipes) */
                const __m128i *xb = (const __m128i *)(xr[t] + (size_t)b * MOE_QK);
                __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(xb));
                __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(xb + 1));
                /* 8 * (x_2k + x_2k+1) + 8 * (x_16+2k + x_17+2k), in both halves */
                __m256i cc = _mm256_add_epi16(_mm256_maddubs_epi16(eight, xl),
                                              _mm256_maddubs_epi16(eight, xh));
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[p], xl),
                                                   _mm256_maddubs_epi16(hi[p], xh));
                    __m256i l = _mm256_madd_epi16(_mm256_sub_epi16(s16, cc), ones);
                    __m256 s;
                    if (NT > 1) {
                        s = _mm256_blend_ps(_mm256_broadcast_ss(&pr[t][p][0][k]),
                                            _mm256_broadcast_ss(&pr[t][p][1][k]), 0xf0);
                    } else {
                        __m128i h = _mm_insert_epi16(_mm_cvtsi32_si128(wa[p][b].d), wb[p][b].d, 1);
                        __m256 dw = _mm256_permutevar8x32_ps(
                            _mm256_castps128_ps256(_mm_cvtph_ps(h)), dup);
                        s = _mm256_mul_ps(dw, _mm256_broadcast_ss(dr[t] + b));
                    }
                    acc[p][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l), s, acc[p][t]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            float *yt = y + (size_t)(t0 + t) * n_out + r + 2 * p;
            yt[0] = hsum4(_mm256_castps256_ps128(acc[p][t]));
            if (!single)
                yt[1] = hsum4(_mm256_extractf128_ps(acc[p][t], 1));
        }
}

/* pf: the next row tile to prefetch (moe_prefetch_step), or NULL. */
typedef void (*q_tile_fn)(float *y, const int8_t *xq, const float *xd, const char *w,
                          size_t row_bytes, int n_in, int n_out, int r, int t0, const char *pf);

/* One out-of-line function per shape: readable code and a small binary. */
#define Q8_TILE(NR, NT)                                                                            \
    static void q8_tile_##NR##x##NT(float *y, const int8_t *xq, const float *xd, const char *w,    \
                                    size_t row_bytes, int n_in, int n_out, int r, int t0,          \
                                    const char *pf)                                                \
    {                                                                                              \
        q8_tile(y, xq, xd, w, row_bytes, n_in, n_out, r, t0, NR, NT, pf);                          \
    }
/* Q4: NR rows = NP pairs, or one row alone (NR = 1). */
#define Q4_TILE(NR, NT)                                                                            \
    static void q4_tile_##NR##x##NT(float *y, const int8_t *xq, const float *xd, const char *w,    \
                                    size_t row_bytes, int n_in, int n_out, int r, int t0,          \
                                    const char *pf)                                                \
    {                                                                                              \
        q4_tile(y, xq, xd, w, row_bytes, n_in, n_out, r, t0, NR == 1 ? 1 : NR / 2, NT, NR == 1,    \
                pf);                                                                               \
    }
#define Q_TILES(T)                                                                                 \
    T(2, 4)                                                                                        \
    T(2, 3)                                                                                        \
    T(2, 2)                                                                                        \
    T(2, 1)                                                                                        \
    T(1, 4)                                                                                        \
    T(1, 3)                                                                                        \
    T(1, 2)                                                                                        \
    T(1, 1)
Q_TILES(Q8_TILE)
Q_TILES(Q4_TILE)
Q8_TILE(8, 1) /* the decode tile: 8 rows, one token (Q4: 4 row pairs) */
Q4_TILE(8, 1)

/* Prefill tiles (n_tok >= MOE_Q_PREFILL_TOK; same bits as the decode tiles): Q8 4 rows x 3 tokens,
 * so each token's x and |x| serve 4 rows (best of 2x4, 4x2, 3x3, 4x3 on Zen 3; 2x4 and 4x2 again
 * after the scale tables: no better); Q4 4 rows (2 pairs) x 4 tokens, so each token's x halves
 * and 8x correction serve 2 pairs (4x4 beat 4x3 by 3-14% once the scales moved to the tables,
 * 2 x 4 by 20-40% in decode). One thread, Zen 3: Q8 ~70, Q4 ~77-83 GFLOP/s, against the f32
 * panel's 80-85. Tokens in chunks of QP_TOKC (96 x n_in bytes of x stay in L2 while the rows of a
 * task pass). Since every Q8/Q4 matmul runs int8 (batch invariance), these serve every prefill of
 * a quantized model. */
#define QP_NR 4
#define QP_NT 3
#define QP_NR_Q4 4
#define QP_NT_Q4 4
#define QP_TOKC 96
Q8_TILE(4, 1)
Q8_TILE(4, 2)
Q8_TILE(4, 3)
Q4_TILE(4, 1)
Q4_TILE(4, 2)
Q4_TILE(4, 3)
Q4_TILE(4, 4)
/* Every tile, [rows][tokens - 1] (decode and prefill) */
#define Q_MAXR 8
static const q_tile_fn tiles_q8[Q_MAXR + 1][4] = {
    [1] = {q8_tile_1x1, q8_tile_1x2, q8_tile_1x3, q8_tile_1x4},
    [2] = {q8_tile_2x1, q8_tile_2x2, q8_tile_2x3, q8_tile_2x4},
    [4] = {q8_tile_4x1, q8_tile_4x2, q8_tile_4x3},
    [8] = {q8_tile_8x1}};
static const q_tile_fn tiles_q4[Q_MAXR + 1][4] = {
    [1] = {q4_tile_1x1, q4_tile_1x2, q4_tile_1x3, q4_tile_1x4},
    [2] = {q4_tile_2x1, q4_tile_2x2, q4_tile_2x3, q4_tile_2x4},
    [4] = {q4_tile_4x1, q4_tile_4x2, q4_tile_4x3, q4_tile_4x4},
    [8] = {q4_tile_8x1}};

static void rows_q_prefill(float *y, const int8_t *xq, const float *xd, const void *w, moe_dtype wt,
                           int n_tok, int n_in, int n_out, int r0, int r1)
{
    const q_tile_fn(*tiles)[4] = wt == MOE_DT_Q8 ? tiles_q8 : tiles_q4;
    int nr = wt == MOE_DT_Q8 ? QP_NR : QP_NR_Q4, nt = wt == MOE_DT_Q8 ? QP_NT : QP_NT_Q4;
    size_t row_bytes = moe_dtype_row_bytes(wt, (size_t)n_in);
    const char *wc = w;
    for (int tc = 0; tc < n_tok; tc += QP_TOKC) {
        int te = tc + QP_TOKC < n_tok ? tc + QP_TOKC : n_tok;
        for (int r = r0; r < r1;) {
            int rn = r + nr <= r1 ? nr : r + 2 <= r1 ? 2 : 1;
            for (int t = tc; t < te; t += nt) {
                int tn = te - t < nt ? te - t : nt;
                tiles[rn][tn - 1](y, xq, xd, wc, row_bytes, n_in, n_out, r, t, NULL);
            }
            r += rn;
        }
    }
}

/* All the tokens of a call (at most MOE_Q_PREFILL_TOK - 1; more go to rows_q_prefill) in one
 * chunk, so each row tile is read from memory once and its later token tiles re-read it from L1:
 * every weight row streams once per call whatever the number of tokens (an expert's share of a
 * batched decode step). Chunks of 32 tokens, as before, streamed every row twice from 33 to 47
 * tokens. The quantized x of 47 tokens (47 x n_in x 1.06 bytes: 100 KB at n_in = 2048) stays in
 * L2 while the rows pass. */
#define Q_TOKC (MOE_Q_PREFILL_TOK - 1)

void moe_matmul_rows_q_avx2(float *y, const int8_t *xq, const float *xd, const void *w,
                            moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    if (n_tok >= MOE_Q_PREFILL_TOK) {
        rows_q_prefill(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1);
        return;
    }
    const q_tile_fn(*tiles)[4] = wt == MOE_DT_Q8 ? tiles_q8 : tiles_q4;
    size_t row_bytes = moe_dtype_row_bytes(wt, (size_t)n_in);
    const char *wc = w;
    /* One token: 8 rows stream side by side (Q4: 4 pairs), 7-10% faster than 4 on Zen 3. More:
     * Q8 2 rows x 4 tokens (4x2 and 4x3 no better), Q4 4 rows x 4 tokens (see QP_NR_Q4). */
    int nr = n_tok == 1 ? 8 : wt == MOE_DT_Q8 ? 2 : 4;
    int nt = n_tok == 1 ? 1 : 4;
    for (int tc = 0; tc < n_tok; tc += Q_TOKC) {
        int te = tc + Q_TOKC < n_tok ? tc + Q_TOKC : n_tok;
        for (int r = r0; r < r1;) {
            int rn = r + nr <= r1 ? nr : r + 2 <= r1 ? 2 : 1;
            /* The next row tile of this task, prefetched by the first token tile of this one */
            const char *pf = r + 2 * rn <= r1 &&
                                     moe_pf_rows_int8((size_t)rn * row_bytes) != MOE_PF_NONE
                                 ? wc + (size_t)(r + rn) * row_bytes
                                 : NULL;
            for (int t = tc; t < te; t += nt) {
                int tn = te - t < nt ? te - t : nt;
                tiles[rn][tn - 1](y, xq, xd, wc, row_bytes, n_in, n_out, r, t, t == tc ? pf : NULL);
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
