/* Helpers shared by the x86 int8 kernels of the quantized matmul (quant_avx2.c, quant_avx512.c):
 * the lane sums of the documented output order and the scale-product tables (decode prefetch:
 * moe_prefetch_step in kernels_internal.h). hsum8 is the float rows' horizontal sum too
 * (matmul_avx2.c, matmul_wide_avx512.c). Only included by files built with at least -mavx2 -mfma
 * -mf16c. */
#ifndef MOE_KERNELS_CPU_QUANT_X86_H
#define MOE_KERNELS_CPU_QUANT_X86_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#define AI static inline __attribute__((always_inline))

AI float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);          /* l + l+4 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); /* + (l+2) */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));  /* + (l+1) */
    return _mm_cvtss_f32(s);
}

/* (a0 + a2) + (a1 + a3) */
AI float hsum4(__m128 v)
{
    __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A Q4 tile's NP row pairs from row r (row B is row A for a one-row tile, `single`). */
AI void q4_pair_rows(const moe_block_q4 **wa, const moe_block_q4 **wb, const char *w,
                     size_t row_bytes, int r, int NP, int single)
{
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++) {
        wa[p] = (const moe_block_q4 *)(w + (size_t)(r + 2 * p) * row_bytes);
        wb[p] = single ? wa[p] : (const moe_block_q4 *)(w + (size_t)(r + 2 * p + 1) * row_bytes);
    }
}

/* One block of a row pair's codes: row A's 16 bytes low, row B's high. */
AI __m256i q4_pair_block(const moe_block_q4 *a, const moe_block_q4 *b)
{
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a->q)),
                                   _mm_loadu_si128((const __m128i *)b->q), 1);
}

/* Quantized x and block scales of a tile's n token slots from token t0; slots from nt on repeat
 * token nt - 1 (the zmm tiles' half-used last pair), nt = n elsewhere. */
AI void q_token_rows(const int8_t **xr, const float **dr, const int8_t *xq, const float *xd,
                     int n_in, int t0, int n, int nt)
{
    int nb = n_in / MOE_QK;
#pragma GCC unroll 6
    for (int t = 0; t < n; t++) {
        int tt = t < nt ? t : nt - 1;
        xr[t] = xq + (size_t)(t0 + tt) * n_in;
        dr[t] = xd + (size_t)(t0 + tt) * nb;
    }
}

/* ---- Scale products of a group of up to QG blocks ----
 * Every (row, token, block) adds its integer lanes times d_w * d_x. Those products are formed 8
 * blocks at a time, one vmulps per (row, token) of a tile, instead of one per (row, token, block)
 * in the block loop (plus the per-block f16 conversion of each row's scale): the block loop then
 * only broadcasts its product from L1 (a load, no FP pipe). The product is the same float (d_w
 * and d_x as before, one rounding), so the bits do not change. */
#define QG 8
/* Tiles of one token (the decode matvec, memory bound) keep the per-block product: measured
 * 4-25% slower from DRAM with the table (its 8-block scale gather runs ahead of the stream). */

/* The f16 scales of blocks b0..b0+g-1 of a row (the first field of each block, blk_bytes apart)
 * as 8 floats (zero past g): gathered in general-purpose registers (integer pipes, no store
 * forwarding of 8 narrow stores into one load), converted with one vcvtph2ps. */
AI uint64_t scales4(const char *p, size_t blk_bytes)
{
    uint16_t d[4];
    for (int k = 0; k < 4; k++)
        memcpy(&d[k], p + (size_t)k * blk_bytes, sizeof d[k]);
    return (uint64_t)d[0] | (uint64_t)d[1] << 16 | (uint64_t)d[2] << 32 | (uint64_t)d[3] << 48;
}

AI __m256 scales8(const char *row, size_t blk_bytes, int b0, int g)
{
    const char *p = row + (size_t)b0 * blk_bytes;
    uint64_t h0, h1;
    if (g == QG) {
        h0 = scales4(p, blk_bytes);
        h1 = scales4(p + 4 * blk_bytes, blk_bytes);
    } else { /* in registers too: a table of 16-bit stores read back as one load would stall */
        h0 = h1 = 0;
#pragma GCC unroll 8
        for (int k = 0; k < QG; k++)
            if (k < g) {
                uint16_t d;
                memcpy(&d, p + (size_t)k * blk_bytes, sizeof d);
                if (k < 4)
                    h0 |= (uint64_t)d << (16 * k);
                else
                    h1 |= (uint64_t)d << (16 * (k - 4));
            }
    }
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)h1, (long long)h0));
}

/* d_x of blocks b0..b0+g-1 of a token (not read past g: the last token's scales end the buffer). */
AI __m256 xscales8(const float *d, int b0, int g)
{
    if (g == QG)
        return _mm256_loadu_ps(d + b0);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(d + b0, _mm256_cmpgt_epi32(_mm256_set1_epi32(g), lane));
}

/* d_x of group b0 (g blocks) for each of a tile's n token slots. */
AI void xscales_tile(__m256 *dx, const float *const *dr, int n, int b0, int g)
{
#pragma GCC unroll 6
    for (int t = 0; t < n; t++)
        dx[t] = xscales8(dr[t], b0, g);
}

/* {a_k, b_k} for k = 0..7 at dst (16 floats, 32-byte aligned): a group's scale products of two
 * rows or two tokens side by side, so that a block's pair is one 8-byte broadcast (the unpacks
 * give k = 0, 1, 4, 5 and 2, 3, 6, 7; the lane permutes put them back in order). */
AI void store_scale_pairs(float *dst, __m256 a, __m256 b)
{
    __m256 u0 = _mm256_unpacklo_ps(a, b), u1 = _mm256_unpackhi_ps(a, b);
    _mm256_store_ps(dst, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_store_ps(dst + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
}


#endif
