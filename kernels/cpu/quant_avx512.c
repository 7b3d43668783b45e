/* AVX512-VNNI kernels of the quantized (Q8/Q4) matmul: the int8 block dot products of
 * quant_avx2.c with vpdpbusd (u8 x s8, four products summed into each int32 lane in one
 * instruction) on 256-bit vectors (AVX512VL), and the 32 vector registers AVX-512 gives for bigger
 * batch tiles. Compiled with -mavx512f/bw/vl/dq/bf16/vnni; only called after dispatch.c saw them in
 * CPUID. Integer dots are exact, and every output keeps the documented float order
 * (moe_matmul_rows_q_fn): the same bits as the scalar and AVX2 kernels. */
#include <immintrin.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) &&                   \
    defined(__FMA__) && defined(__F16C__)

#include "kernels/cpu/quant_x86.h"

/* Largest tile: rows (Q4: 2 x pairs) x tokens. */
#define QV_MAXR 8
#define QV_MAXT 4

/* ---- Q8 tile: NR rows x NT tokens, one 8-lane f32 accumulator per output ----
 * Lane j of a block's integer dot holds inputs 4j..4j+3, as vpmaddubsw + vpmaddwd leave it in
 * quant_avx2.c; vpdpbusd forms it in one instruction, but multiplies unsigned by signed bytes:
 * - one token (decode, memory bound): the sign trick, |x| (once per token and block) times w with
 *   x's sign moved onto it (one vpsignb per row; a masked vpsubb instead measured no faster in
 *   cache and 4-15% slower streaming from DRAM in three noisy runs);
 * - more tokens: x + 128 as unsigned bytes (an XOR, once per token and block) times w, minus 128 *
 *   the sum of w's 4 bytes; that correction is formed once per row and block (a vpdpbusd of
 *   0x80 bytes by w) and is the accumulator the token's vpdpbusd starts from, so each (row, token)
 *   costs one vpdpbusd. Products stay below 255 * 127 * 4 (no int32 overflow).
 * Then one FMA per block adds lane * (d_w * d_x), the product from the group's table (scales8),
 * or per block for one token (see QG): the arithmetic of the scalar kernel, bit for bit. */
AI void q8_tile(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                int n_in, int n_out, int r, int t0, int NR, int NT, const char *pf)
{
    int nb = n_in / MOE_QK;
    const __m256i zero = _mm256_setzero_si256(), bias = _mm256_set1_epi8((char)0x80);
    __m256 acc[QV_MAXR][QV_MAXT];
    const moe_block_q8 *wr[QV_MAXR];
    const int8_t *xr[QV_MAXT];
    const float *dr[QV_MAXT];
    /* d_w * d_x of the group: [token][row][block] */
    float pr[QV_MAXT][QV_MAXR][QG] __attribute__((aligned(32)));
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
        __m256 dx[QV_MAXT];
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
            __m256i wv[QV_MAXR];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (size_t)NR * sizeof(moe_block_q8),
                                  (size_t)NR * sizeof(moe_block_q8), MOE_PF_L1);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                wv[i] = _mm256_loadu_si256((const __m256i *)wr[i][b].q);
            if (NT == 1) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[0] + (size_t)b * MOE_QK));
                __m256i ax = _mm256_abs_epi8(xv);
                __m256 dx1 = _mm256_broadcast_ss(dr[0] + b);
#pragma GCC unroll 8
                for (int i = 0; i < NR; i++) {
                    __m256i l = _mm256_dpbusd_epi32(zero, ax, _mm256_sign_epi8(wv[i], xv));
                    __m256 sc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(wr[i][b].d)), dx1);
                    acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l), sc, acc[i][0]);
                }
                continue;
            }
            __m256i nc[QV_MAXR]; /* -128 * (sum of w's bytes) per lane */
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                nc[i] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, bias, wv[i]));
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                __m256i xo = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(xr[t] + (size_t)b * MOE_QK)), bias);
#pragma GCC unroll 8
                for (int i = 0; i < NR; i++) {
                    __m256i l = _mm256_dpbusd_epi32(nc[i], xo, wv[i]);
                    acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l),
                                                _mm256_broadcast_ss(&pr[t][i][k]), acc[i][t]);
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
 * A pair of rows shares one register, interleaved by 4-byte groups: int32 lane 2j holds row A's
 * code bytes 4j..4j+3, lane 2j + 1 row B's (j = 0..3; one vpermd after the two 16-byte loads). "lo"
 * (AND 0x0f) holds the codes of inputs 4j..4j+3, "hi" (shift, AND) of 16+4j..16+4j+3; x is laid out
 * to match, each 4-byte group of x twice ([x0..3 x0..3 x4..7 x4..7 ...], one vpermd per half and
 * token). The codes c = w + 8 are unsigned, vpdpbusd's unsigned side: lane 2j (2j + 1) = row A's
 * (B's) sum of c * x over inputs 4j..4j+3 and 16+4j..16+4j+3 (two vpdpbusd into one
 * accumulator), minus 8 * the sum of those x, formed once per token and block (two vpdpbusd of 8s
 * by x, negated) as the accumulator's start. Exactly the integer lanes of quant_avx2.c's q4_tile,
 * in another order. Why interleaved: the per-block scale [pA pB pA pB ...] is then one 8-byte
 * broadcast load from the group's table ({pA, pB} adjacent), where [pA x 4 | pB x 4] took two
 * broadcasts and a blend per (pair, token, block). One token (decode, scales per block, see QG)
 * keeps quant_avx2.c's layout (row A's 16 bytes low, row B's high; x halves by broadcast loads):
 * the shuffles would buy it nothing (measured 1.12x AVX2 against 1.04x interleaved). One FMA per
 * block per lane; at the end each row's lanes l0..l3 are summed as (l0 + l2) + (l1 + l3),
 * hsum4's order: the scalar kernel's bits. */
AI void q4_tile(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                int n_in, int n_out, int r, int t0, int NP, int NT, int single, const char *pf)
{
    int nb = n_in / MOE_QK;
    const __m256i zero = _mm256_setzero_si256(), m4 = _mm256_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi8(8);
    const __m256i ilv = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i xlo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    const __m256i xhi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const int il = NT > 1; /* interleaved rows (see above) */
    __m256 acc[QV_MAXR / 2][QV_MAXT];
    const moe_block_q4 *wa[QV_MAXR / 2], *wb[QV_MAXR / 2];
    const int8_t *xr[QV_MAXT];
    const float *dr[QV_MAXT];
    /* d_w * d_x of the group: [token][pair][block][row A, row B] */
    float pr[QV_MAXT][QV_MAXR / 2][QG][2] __attribute__((aligned(32)));
    q4_pair_rows(wa, wb, w, row_bytes, r, NP, single);
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[p][t] = _mm256_setzero_ps();
    q_token_rows(xr, dr, xq, xd, n_in, t0, NT, NT);
    for (int b0 = 0; b0 < nb; b0 += QG) {
        int g = nb - b0 < QG ? nb - b0 : QG;
        __m256 dx[QV_MAXT];
        xscales_tile(dx, dr, NT, b0, g);
#pragma GCC unroll 4
        for (int p = 0; p < NP && NT > 1; p++) { /* one token: per block (see QG) */
            __m256 da = scales8((const char *)wa[p], sizeof(moe_block_q4), b0, g);
            __m256 db = single ? da : scales8((const char *)wb[p], sizeof(moe_block_q4), b0, g);
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++)
                store_scale_pairs(pr[t][p][0], _mm256_mul_ps(da, dx[t]), _mm256_mul_ps(db, dx[t]));
        }
        for (int k = 0; k < g; k++) {
            int b = b0 + k;
            __m256i lo[QV_MAXR / 2], hi[QV_MAXR / 2];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (single ? 1 : 2 * NP) * sizeof(moe_block_q4),
                                  (size_t)(single ? 1 : 2 * NP) * sizeof(moe_block_q4), MOE_PF_L1);
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
                __m256i v = q4_pair_block(&wa[p][b], &wb[p][b]);
                if (il)
                    v = _mm256_permutexvar_epi32(ilv, v);
                lo[p] = _mm256_and_si256(v, m4);
                hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                const int8_t *xb = xr[t] + (size_t)b * MOE_QK;
                __m256i xl, xh;
                if (il) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)xb);
                    xl = _mm256_permutexvar_epi32(xlo, xv);
                    xh = _mm256_permutexvar_epi32(xhi, xv);
                } else { /* broadcast loads */
                    xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xb));
                    xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xb + 1));
                }
                /* -8 * (x_4j..4j+3 + x_16+4j..16+4j+3), in both lanes of each pair */
                __m256i ncc = _mm256_sub_epi32(
                    zero, _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, eight, xl), eight, xh));
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    __m256i l = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(ncc, lo[p], xl), hi[p], xh);
                    __m256 s;
                    if (NT > 1) {
                        s = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)pr[t][p][k]));
                    } else {
                        __m128i h = _mm_insert_epi16(_mm_cvtsi32_si128(wa[p][b].d), wb[p][b].d, 1);
                        __m256 dw =
                            _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(h)), dup);
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
            if (!il) {
                yt[0] = hsum4(_mm256_castps256_ps128(acc[p][t]));
                if (!single)
                    yt[1] = hsum4(_mm256_extractf128_ps(acc[p][t], 1));
                continue;
            }
            /* lane 0 = A l0 + l2, 1 = B l0 + l2, 2 = A l1 + l3, 3 = B l1 + l3 */
            __m128 s =
                _mm_add_ps(_mm256_castps256_ps128(acc[p][t]), _mm256_extractf128_ps(acc[p][t], 1));
            yt[0] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(s, s)));
            if (!single)
                yt[1] = _mm_cvtss_f32(_mm_add_ss(_mm_movehdup_ps(s), _mm_permute_ps(s, 0xff)));
        }
}

/* ---- Q4 tile on 512-bit vectors: NP row pairs x NTP token pairs ----
 * On Intel a zmm vpdpbusd does twice a ymm one's work per cycle (`matmul_cputime probe` on the
 * issue 16 Xeon: 550-560 against 222-238 int8 GOP/s; on Zen 4 the two are equal, see
 * moe_matmul_rows_q_avx512z). The same integer lanes and FMAs as q4_tile's interleaved layout,
 * two tokens per register: 128-bit lane j (j = 0..3) holds group j of [row A token t, row B
 * token t, row A token t + 1, row B token t + 1], so each float lane runs exactly the
 * accumulator chain of one ymm lane (the same integer, the same product d_w * d_x, the same FMA
 * in block order) and the output sums the four 128-bit lanes as (l0 + l2) + (l1 + l3), hsum4's
 * order: the bits of every other kernel. The block scale of a lane is then one 16-byte
 * broadcast load from the group's table ({pA t, pB t, pA t+1, pB t+1} adjacent); W and x reach
 * their lanes with one vpermd each (per pair, per token pair and half). */
#define QZ_MAXP 4
#define QZ_MAXTP 3
#define QZ_MAXT (2 * QZ_MAXTP)
/* An odd NT leaves the last pair's second half on a copy of its first token (computed, not
 * stored); `single` (one row, NP = 1) the same for row B, as in q4_tile. */
AI void q4_tile_z(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                  int n_in, int n_out, int r, int t0, int NP, int NT, int single, const char *pf)
{
    const int NTP = (NT + 1) / 2;
    int nb = n_in / MOE_QK;
    const __m512i zero = _mm512_setzero_si512(), m4 = _mm512_set1_epi8(0x0f);
    const __m512i eight = _mm512_set1_epi8(8);
    const __m512i wix = _mm512_setr_epi32(0, 4, 0, 4, 1, 5, 1, 5, 2, 6, 2, 6, 3, 7, 3, 7);
    const __m512i xlo = _mm512_setr_epi32(0, 0, 8, 8, 1, 1, 9, 9, 2, 2, 10, 10, 3, 3, 11, 11);
    const __m512i xhi = _mm512_setr_epi32(4, 4, 12, 12, 5, 5, 13, 13, 6, 6, 14, 14, 7, 7, 15, 15);
    __m512 acc[QZ_MAXP][QZ_MAXTP];
    const moe_block_q4 *wa[QZ_MAXP], *wb[QZ_MAXP];
    const int8_t *xr[2 * QZ_MAXTP];
    const float *dr[2 * QZ_MAXTP];
    /* d_w * d_x of the group: [token pair][pair][block][A t, B t, A t + 1, B t + 1] */
    float pr[QZ_MAXTP][QZ_MAXP][QG][4] __attribute__((aligned(32)));
    q4_pair_rows(wa, wb, w, row_bytes, r, NP, single);
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 3
        for (int tp = 0; tp < NTP; tp++)
            acc[p][tp] = _mm512_setzero_ps();
    q_token_rows(xr, dr, xq, xd, n_in, t0, 2 * NTP, NT);
    for (int b0 = 0; b0 < nb; b0 += QG) {
        int g = nb - b0 < QG ? nb - b0 : QG;
        __m256 dx[QZ_MAXT];
        xscales_tile(dx, dr, 2 * NTP, b0, g);
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) {
            __m256 da = scales8((const char *)wa[p], sizeof(moe_block_q4), b0, g);
            __m256 db = single ? da : scales8((const char *)wb[p], sizeof(moe_block_q4), b0, g);
#pragma GCC unroll 3
            for (int tp = 0; tp < NTP; tp++) {
                __m256 a0 = _mm256_mul_ps(da, dx[2 * tp]), b0v = _mm256_mul_ps(db, dx[2 * tp]);
                __m256 a1 = _mm256_mul_ps(da, dx[2 * tp + 1]), b1 = _mm256_mul_ps(db, dx[2 * tp + 1]);
                /* a 4 x 8 transpose: u = {a0_k, b0_k} pairs (k = 0, 1, 4, 5 / 2, 3, 6, 7), v the
                 * same for token t + 1, q the 4-tuples (k = 0, 4 / 1, 5 / 2, 6 / 3, 7) */
                __m256d u0 = _mm256_castps_pd(_mm256_unpacklo_ps(a0, b0v));
                __m256d u1 = _mm256_castps_pd(_mm256_unpackhi_ps(a0, b0v));
                __m256d v0 = _mm256_castps_pd(_mm256_unpacklo_ps(a1, b1));
                __m256d v1 = _mm256_castps_pd(_mm256_unpackhi_ps(a1, b1));
                __m256 q0 = _mm256_castpd_ps(_mm256_unpacklo_pd(u0, v0));
                __m256 q1 = _mm256_castpd_ps(_mm256_unpackhi_pd(u0, v0));
                __m256 q2 = _mm256_castpd_ps(_mm256_unpacklo_pd(u1, v1));
                __m256 q3 = _mm256_castpd_ps(_mm256_unpackhi_pd(u1, v1));
                _mm256_store_ps(pr[tp][p][0], _mm256_permute2f128_ps(q0, q1, 0x20));
                _mm256_store_ps(pr[tp][p][2], _mm256_permute2f128_ps(q2, q3, 0x20));
                _mm256_store_ps(pr[tp][p][4], _mm256_permute2f128_ps(q0, q1, 0x31));
                _mm256_store_ps(pr[tp][p][6], _mm256_permute2f128_ps(q2, q3, 0x31));
            }
        }
        for (int k = 0; k < g; k++) {
            int b = b0 + k;
            __m512i lo[QZ_MAXP], hi[QZ_MAXP];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (single ? 1 : 2 * NP) * sizeof(moe_block_q4),
                                  (size_t)(single ? 1 : 2 * NP) * sizeof(moe_block_q4), MOE_PF_L1);
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
                __m256i v = q4_pair_block(&wa[p][b], &wb[p][b]);
                __m512i wv = _mm512_permutexvar_epi32(wix, _mm512_castsi256_si512(v));
                lo[p] = _mm512_and_si512(wv, m4);
                hi[p] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
            }
#pragma GCC unroll 3
            for (int tp = 0; tp < NTP; tp++) {
                __m512i xv = _mm512_inserti64x4(
                    _mm512_castsi256_si512(
                        _mm256_loadu_si256((const __m256i *)(xr[2 * tp] + (size_t)b * MOE_QK))),
                    _mm256_loadu_si256((const __m256i *)(xr[2 * tp + 1] + (size_t)b * MOE_QK)), 1);
                __m512i xl = _mm512_permutexvar_epi32(xlo, xv);
                __m512i xh = _mm512_permutexvar_epi32(xhi, xv);
                /* -8 * (x_4j..4j+3 + x_16+4j..16+4j+3) of each token, in both rows' lanes */
                __m512i ncc = _mm512_sub_epi32(
                    zero, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, eight, xl), eight, xh));
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    __m512i l = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ncc, lo[p], xl), hi[p], xh);
                    __m512 sc = _mm512_broadcast_f32x4(_mm_load_ps(pr[tp][p][k]));
                    acc[p][tp] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), sc, acc[p][tp]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 3
        for (int tp = 0; tp < NTP; tp++) {
            __m512 a = acc[p][tp];
            __m128 s = _mm_add_ps(_mm_add_ps(_mm512_castps512_ps128(a), _mm512_extractf32x4_ps(a, 2)),
                                  _mm_add_ps(_mm512_extractf32x4_ps(a, 1), _mm512_extractf32x4_ps(a, 3)));
            float o[4];
            _mm_storeu_ps(o, s);
            float *y0 = y + (size_t)(t0 + 2 * tp) * n_out + r + 2 * p;
            y0[0] = o[0];
            if (!single)
                y0[1] = o[1];
            if (2 * tp + 1 < NT) {
                y0[n_out] = o[2];
                if (!single)
                    y0[n_out + 1] = o[3];
            }
        }
}

/* ---- helpers of the zmm Q8 tiles: two 8-lane chains interleaved by int32 lane ---- */

/* Lane 2j = a's lane j, lane 2j + 1 = b's (vpermt2d). */
AI __m512i interleave_lanes(__m256i a, __m256i b)
{
    const __m512i ilv = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    return _mm512_permutex2var_epi32(_mm512_castsi256_si512(a), ilv, _mm512_castsi256_si512(b));
}

/* Lanes 2j and 2j + 1 = v's lane j (vpermd). */
AI __m512i double_lanes(__m256i v)
{
    const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return _mm512_permutexvar_epi32(dup, _mm512_castsi256_si512(v));
}

/* acc + lanes * {pair[0], pair[1]} repeated: each chain's block FMA with its own scale. */
AI __m512 fma_pair_scale(__m512 acc, __m512i lanes, const float *pair)
{
    __m512 sc = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_load_sd((const double *)pair)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), sc, acc);
}

/* The two interleaved chains' sums, each hsum8 of its 8 lanes in order: *a the even lanes', *b
 * (if not NULL) the odd ones'. */
AI void store_chain_sums(float *a, float *b, __m512 acc)
{
    const __m512i deint = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m512 d = _mm512_permutexvar_ps(deint, acc);
    *a = hsum8(_mm512_castps512_ps256(d));
    if (b)
        *b = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
}

/* ---- Q8 tile on 512-bit vectors: NR rows x NTP token pairs ----
 * q8_tile's batch arithmetic (x + 128 times w from the -128 * sum(w) correction, one FMA per
 * block by the group's d_w * d_x), two tokens per register interleaved by int32 lane: lane 2j
 * runs ymm lane j of token t, lane 2j + 1 that of token t + 1. So W's lane j goes to both (one
 * vpermd per row and block, shared by every token pair, and the correction formed on it), x of
 * a token pair is one vpermt2d of its two 32-byte loads, and the block scale {p_t, p_t+1} is one
 * 8-byte broadcast from the group's table. Every float lane runs exactly the chain of one ymm
 * lane; the output de-interleaves (one vpermps) and sums each token's 8 lanes with hsum8: the
 * bits of q8_tile. An odd NT leaves the last pair's second half on a copy of its first token
 * (computed, not stored), as in q4_tile_z. */
AI void q8_tile_z(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                  int n_in, int n_out, int r, int t0, int NR, int NT, const char *pf)
{
    const int NTP = (NT + 1) / 2;
    int nb = n_in / MOE_QK;
    const __m512i zero = _mm512_setzero_si512(), bias = _mm512_set1_epi8((char)0x80);
    __m512 acc[QV_MAXR][QZ_MAXTP];
    const moe_block_q8 *wr[QV_MAXR];
    const int8_t *xr[2 * QZ_MAXTP];
    const float *dr[2 * QZ_MAXTP];
    /* d_w * d_x of the group: [token pair][row][block][token t, token t + 1] */
    float pr[QZ_MAXTP][QV_MAXR][QG][2] __attribute__((aligned(32)));
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
        wr[i] = (const moe_block_q8 *)(w + (size_t)(r + i) * row_bytes);
#pragma GCC unroll 3
        for (int tp = 0; tp < NTP; tp++)
            acc[i][tp] = _mm512_setzero_ps();
    }
    q_token_rows(xr, dr, xq, xd, n_in, t0, 2 * NTP, NT);
    for (int b0 = 0; b0 < nb; b0 += QG) {
        int g = nb - b0 < QG ? nb - b0 : QG;
        __m256 dx[QZ_MAXT];
        xscales_tile(dx, dr, 2 * NTP, b0, g);
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++) {
            __m256 dw = scales8((const char *)wr[i], sizeof(moe_block_q8), b0, g);
#pragma GCC unroll 3
            for (int tp = 0; tp < NTP; tp++) {
                store_scale_pairs(pr[tp][i][0], _mm256_mul_ps(dw, dx[2 * tp]),
                                  _mm256_mul_ps(dw, dx[2 * tp + 1]));
            }
        }
        for (int k = 0; k < g; k++) {
            int b = b0 + k;
            __m512i wv[QV_MAXR], nc[QV_MAXR];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (size_t)NR * sizeof(moe_block_q8),
                                  (size_t)NR * sizeof(moe_block_q8), MOE_PF_L1);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++) {
                wv[i] = double_lanes(_mm256_loadu_si256((const __m256i *)wr[i][b].q));
                nc[i] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv[i]));
            }
#pragma GCC unroll 3
            for (int tp = 0; tp < NTP; tp++) {
                __m256i xa = _mm256_loadu_si256((const __m256i *)(xr[2 * tp] + (size_t)b * MOE_QK));
                __m256i xb =
                    _mm256_loadu_si256((const __m256i *)(xr[2 * tp + 1] + (size_t)b * MOE_QK));
                __m512i xo = _mm512_xor_si512(interleave_lanes(xa, xb), bias);
#pragma GCC unroll 8
                for (int i = 0; i < NR; i++)
                    acc[i][tp] = fma_pair_scale(acc[i][tp], _mm512_dpbusd_epi32(nc[i], xo, wv[i]),
                                                pr[tp][i][k]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 3
        for (int tp = 0; tp < NTP; tp++) {
            float *y0 = y + (size_t)(t0 + 2 * tp) * n_out + r + i;
            store_chain_sums(y0, 2 * tp + 1 < NT ? y0 + n_out : NULL, acc[i][tp]);
        }
}

/* ---- Q8 tile on 512-bit vectors: NP row pairs x NT tokens ----
 * q8_tile_z with the roles of rows and tokens swapped, for the few tokens an expert gets in
 * batched decode (2-4): int32 lane 2j runs ymm lane j of row A, lane 2j + 1 that of row B. So a
 * row pair's block is one vpermt2d of its two 32-byte loads (shared by every token, the
 * correction formed on it), x's lane j goes to both (one vpermd per token and block, shared by
 * every pair), and the block scale {pA, pB} is one 8-byte broadcast from the group's table.
 * Every float lane runs exactly the chain of one ymm lane; the output de-interleaves (one
 * vpermps) and sums each row's 8 lanes with hsum8: the bits of q8_tile. `single` (one row, NP =
 * 1): row B is a copy of row A (computed, not stored). */
#define QR_MAXP 4
AI void q8_tile_zr(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,
                   int n_in, int n_out, int r, int t0, int NP, int NT, int single, const char *pf)
{
    int nb = n_in / MOE_QK;
    const __m512i zero = _mm512_setzero_si512(), bias = _mm512_set1_epi8((char)0x80);
    __m512 acc[QR_MAXP][QV_MAXT];
    const moe_block_q8 *wa[QR_MAXP], *wb[QR_MAXP];
    const int8_t *xr[QV_MAXT];
    const float *dr[QV_MAXT];
    /* d_w * d_x of the group: [token][pair][block][row A, row B] */
    float pr[QV_MAXT][QR_MAXP][QG][2] __attribute__((aligned(32)));
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++) {
        wa[p] = (const moe_block_q8 *)(w + (size_t)(r + 2 * p) * row_bytes);
        wb[p] = single ? wa[p] : (const moe_block_q8 *)(w + (size_t)(r + 2 * p + 1) * row_bytes);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[p][t] = _mm512_setzero_ps();
    }
    q_token_rows(xr, dr, xq, xd, n_in, t0, NT, NT);
    for (int b0 = 0; b0 < nb; b0 += QG) {
        int g = nb - b0 < QG ? nb - b0 : QG;
        __m256 dx[QV_MAXT];
        xscales_tile(dx, dr, NT, b0, g);
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) {
            __m256 da = scales8((const char *)wa[p], sizeof(moe_block_q8), b0, g);
            __m256 db = single ? da : scales8((const char *)wb[p], sizeof(moe_block_q8), b0, g);
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++)
                store_scale_pairs(pr[t][p][0], _mm256_mul_ps(da, dx[t]), _mm256_mul_ps(db, dx[t]));
        }
        for (int k = 0; k < g; k++) {
            int b = b0 + k;
            __m512i wv[QR_MAXP], nc[QR_MAXP];
            if (pf) /* see moe_prefetch_step */
                moe_prefetch_step(pf, (size_t)b * (single ? 1 : 2 * NP) * sizeof(moe_block_q8),
                                  (size_t)(single ? 1 : 2 * NP) * sizeof(moe_block_q8), MOE_PF_L1);
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
                __m256i va = _mm256_loadu_si256((const __m256i *)wa[p][b].q);
                __m256i vb = _mm256_loadu_si256((const __m256i *)wb[p][b].q);
                wv[p] = interleave_lanes(va, vb);
                nc[p] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv[p]));
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[t] + (size_t)b * MOE_QK));
                __m512i xo = _mm512_xor_si512(double_lanes(xv), bias);
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++)
                    acc[p][t] = fma_pair_scale(acc[p][t], _mm512_dpbusd_epi32(nc[p], xo, wv[p]),
                                               pr[t][p][k]);
            }
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            float *yt = y + (size_t)(t0 + t) * n_out + r + 2 * p;
            store_chain_sums(yt, single ? NULL : yt + 1, acc[p][t]);
        }
}

/* pf: the next row tile to prefetch (moe_prefetch_step), or NULL. */
typedef void (*q_tile_fn)(float *y, const int8_t *xq, const float *xd, const char *w,
                          size_t row_bytes, int n_in, int n_out, int r, int t0, const char *pf);

/* One out-of-line function per shape: readable code and a small binary. */
/* Tiles of NR rows; BODY q8_tile or q8_tile_z. */
#define ROW_TILE_AS(FN, BODY, NR, NT)                                                              \
    static void FN(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,   \
                   int n_in, int n_out, int r, int t0, const char *pf)                             \
    {                                                                                              \
        BODY(y, xq, xd, w, row_bytes, n_in, n_out, r, t0, NR, NT, pf);                             \
    }
/* Tiles of row pairs: NR rows = NP pairs, or one row alone (NR = 1); BODY q4_tile, q4_tile_z or
 * q8_tile_zr. */
#define PAIR_TILE_AS(FN, BODY, NR, NT)                                                             \
    static void FN(float *y, const int8_t *xq, const float *xd, const char *w, size_t row_bytes,   \
                   int n_in, int n_out, int r, int t0, const char *pf)                             \
    {                                                                                              \
        BODY(y, xq, xd, w, row_bytes, n_in, n_out, r, t0, NR == 1 ? 1 : NR / 2, NT, NR == 1, pf);  \
    }
#define Q8_TILE(NR, NT) ROW_TILE_AS(q8_tile_##NR##x##NT, q8_tile, NR, NT)
#define Q4_TILE(NR, NT) PAIR_TILE_AS(q4_tile_##NR##x##NT, q4_tile, NR, NT)
#define Q_TILES(T)                                                                                 \
    T(4, 4)                                                                                        \
    T(4, 3)                                                                                        \
    T(4, 2)                                                                                        \
    T(4, 1)                                                                                        \
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
Q8_TILE(8, 1) /* Q8: 8 rows for one token only (see QV_NR_Q8) */
Q4_TILE(8, 1)
Q4_TILE(8, 2)
Q4_TILE(8, 3)
Q4_TILE(8, 4)
/* Q8 on zmm: NT tokens (5 and 6) */
#define Q8Z_TILE(NR, NT) ROW_TILE_AS(q8z_tile_##NR##x##NT, q8_tile_z, NR, NT)
#define Q8Z_TILES(NR) Q8Z_TILE(NR, 5) Q8Z_TILE(NR, 6)
Q8Z_TILES(4)
Q8Z_TILES(2)
Q8Z_TILES(1)
/* Q8 on zmm in row pairs: NT tokens (2 to 4); NR rows = NR / 2 pairs, or one row alone */
#define Q8R_TILE(NR, NT) PAIR_TILE_AS(q8r_tile_##NR##x##NT, q8_tile_zr, NR, NT)
#define Q8R_TILES(NR) Q8R_TILE(NR, 2) Q8R_TILE(NR, 3) Q8R_TILE(NR, 4)
Q8R_TILES(8)
Q8R_TILES(4)
Q8R_TILES(2)
Q8R_TILES(1)
/* Q4 on zmm: NT tokens (4 to 6) */
#define Q4Z_TILE(NR, NT) PAIR_TILE_AS(q4z_tile_##NR##x##NT, q4_tile_z, NR, NT)
#define Q4Z_TILES(NR) Q4Z_TILE(NR, 4) Q4Z_TILE(NR, 5) Q4Z_TILE(NR, 6)
Q4Z_TILES(8)
Q4Z_TILES(4)
Q4Z_TILES(2)
Q4Z_TILES(1)
/* Every tile, [rows][tokens - 1]; the zmm tables have QZ_MAXT columns, the others QV_MAXT */
static const q_tile_fn tiles_q8[QV_MAXR + 1][QZ_MAXT] = {
    [1] = {q8_tile_1x1, q8_tile_1x2, q8_tile_1x3, q8_tile_1x4},
    [2] = {q8_tile_2x1, q8_tile_2x2, q8_tile_2x3, q8_tile_2x4},
    [4] = {q8_tile_4x1, q8_tile_4x2, q8_tile_4x3, q8_tile_4x4},
    [8] = {q8_tile_8x1}};
static const q_tile_fn tiles_q4[QV_MAXR + 1][QZ_MAXT] = {
    [1] = {q4_tile_1x1, q4_tile_1x2, q4_tile_1x3, q4_tile_1x4},
    [2] = {q4_tile_2x1, q4_tile_2x2, q4_tile_2x3, q4_tile_2x4},
    [4] = {q4_tile_4x1, q4_tile_4x2, q4_tile_4x3, q4_tile_4x4},
    [8] = {q4_tile_8x1, q4_tile_8x2, q4_tile_8x3, q4_tile_8x4}};
/* Q4 with the zmm tiles from four tokens on: 2 and 3 keep q4_tile (abz: 2 equal, 3 on zmm, a
 * half-empty pair, 0.83-0.86x), one token its decode layout */
#define Q4Z_ROW(NR)                                                                                \
    {q4_tile_##NR##x1, q4_tile_##NR##x2, q4_tile_##NR##x3, q4z_tile_##NR##x4, q4z_tile_##NR##x5, \
     q4z_tile_##NR##x6}
static const q_tile_fn tiles_q4z[QV_MAXR + 1][QZ_MAXT] = {
    [1] = Q4Z_ROW(1), [2] = Q4Z_ROW(2), [4] = Q4Z_ROW(4), [8] = Q4Z_ROW(8)};
/* Q8 on zmm: 2-4 tokens in row pairs (q8_tile_zr, 8 rows: QR_NR_Q8), 5 and 6 in token pairs
 * (q8_tile_z, 4 rows; token pairs for 2-4 measured 0.91x / 0.83x / 0.97-0.99x the ymm tiles: the
 * per-row W permute and correction and the per-pair x permute were shared by too few products) */
#define Q8Z_ROW(NR)                                                                                \
    {q8_tile_##NR##x1, q8r_tile_##NR##x2, q8r_tile_##NR##x3, q8r_tile_##NR##x4, q8z_tile_##NR##x5, \
     q8z_tile_##NR##x6}
static const q_tile_fn tiles_q8z[QV_MAXR + 1][QZ_MAXT] = {
    [1] = Q8Z_ROW(1), [2] = Q8Z_ROW(2), [4] = Q8Z_ROW(4),
    [8] = {q8_tile_8x1, q8r_tile_8x2, q8r_tile_8x3, q8r_tile_8x4}};

/* Tiles (measured on Zen 4, one thread, bench/matmul_cputime ab; bench/RESULTS.md): one token, 8
 * rows side by side (Q4: 4 pairs), 1.1-1.3x faster than 4; more tokens, Q8 4 rows x 4 tokens (best
 * of 2x4, 4x3, 4x4, 8x2, 8x3, 8x4: 8-row tiles spill the 32 registers), Q4 8 rows (4 pairs) x 4
 * tokens (best of 2x4, 4x3, 4x4, 8x2, 8x3, 8x4 with 8x3 close: the per-token 8 * x correction is
 * shared by 4 pairs). Both for batched decode and prefill, which only differ in the token chunk:
 * all of a decode call's tokens (each row tile streams from memory once, its later token tiles
 * re-read it from L1: an expert's share of a batched step) vs 96 at a time for prefill (96 x n_in
 * bytes of x stay in L2 while the rows of a task pass), as in quant_avx2.c. */
#define QV_NR_Q8 4
#define QV_NR_Q4 8
#define QV_NT 4
/* Intel, Q8, 2-4 tokens (batched decode's share of an expert): 8 rows, 4 pairs of q8_tile_zr
 * (abz against the ymm 4 x NT tiles: 2 tokens 1.00-1.08x, 3 1.08-1.10x, 4 1.09-1.10x; with 4 rows,
 * 2 pairs, 0.97-1.07x / 1.07-1.09x / 1.02-1.03x) */
#define QR_NR_Q8 8
#define QP_TOKC 96
#define Q_TOKC (MOE_Q_PREFILL_TOK - 1)

/* tiles: [rows][tokens - 1], batch tiles of up to nt_max tokens and nr_batch rows */
static void rows_q(float *y, const int8_t *xq, const float *xd, const void *w, moe_dtype wt,
                   int n_tok, int n_in, int n_out, int r0, int r1,
                   const q_tile_fn (*tiles)[QZ_MAXT], int nt_max, int nr_batch)
{
    size_t row_bytes = moe_dtype_row_bytes(wt, (size_t)n_in);
    const char *wc = w;
    int prefill = n_tok >= MOE_Q_PREFILL_TOK;
    int nr = n_tok == 1 ? 8 : nr_batch;
    int nt = n_tok == 1 ? 1 : nt_max;
    int tokc = prefill ? QP_TOKC : Q_TOKC;
    for (int tc = 0; tc < n_tok; tc += tokc) {
        int te = tc + tokc < n_tok ? tc + tokc : n_tok;
        for (int r = r0; r < r1;) {
            int rn = r + nr <= r1 ? nr : r + 4 <= r1 && nr > 4 ? 4 : r + 2 <= r1 ? 2 : 1;
            /* The next row tile of this task, prefetched by the first token tile of this one
             * (decode only: prefill tiles re-read each row tile for many tokens) */
            const char *pf = !prefill && r + 2 * rn <= r1 &&
                                     moe_pf_rows_int8((size_t)rn * row_bytes) != MOE_PF_NONE
                                 ? wc + (size_t)(r + rn) * row_bytes
                                 : NULL;
            for (int t = tc, tn; t < te; t += tn) {
                tn = te - t < nt ? te - t : nt;
                if (nt == QZ_MAXT && te - t == nt + 1) /* 7 tokens: 4 + 3, no token alone */
                    tn = 4;
                tiles[rn][tn - 1](y, xq, xd, wc, row_bytes, n_in, n_out, r, t, t == tc ? pf : NULL);
            }
            r += rn;
        }
    }
}

void moe_matmul_rows_q_avx512(float *y, const int8_t *xq, const float *xd, const void *w,
                              moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    rows_q(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1, wt == MOE_DT_Q8 ? tiles_q8 : tiles_q4,
           QV_NT, wt == MOE_DT_Q8 ? QV_NR_Q8 : QV_NR_Q4);
}

void moe_matmul_rows_q_avx512z(float *y, const int8_t *xq, const float *xd, const void *w,
                               moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    if (wt == MOE_DT_Q8)
        rows_q(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1, tiles_q8z, QZ_MAXT,
               n_tok <= QV_NT ? QR_NR_Q8 : QV_NR_Q8);
    else
        rows_q(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1, tiles_q4z, QZ_MAXT, QV_NR_Q4);
}

#else /* built without the flags: never dispatched */

void moe_matmul_rows_q_avx512z(float *y, const int8_t *xq, const float *xd, const void *w,
                               moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_q_scalar(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1);
}

void moe_matmul_rows_q_avx512(float *y, const int8_t *xq, const float *xd, const void *w,
                              moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_q_scalar(y, xq, xd, w, wt, n_tok, n_in, n_out, r0, r1);
}

#endif
