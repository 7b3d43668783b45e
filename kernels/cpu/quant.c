/* Group-wise Q8/Q4 weights: the block format, quantize/dequantize, activation quantization and
 * the scalar reference kernel of the quantized matmul (bit-identical to the AVX2 one). */
#include <float.h>
#include <math.h>

#include "kernels/cpu/kernels_internal.h"

size_t moe_dtype_row_bytes(moe_dtype dt, size_t n)
{
    switch (dt) {
    case MOE_DT_F32:
        return n * 4;
    case MOE_DT_BF16:
    case MOE_DT_F16:
        return n * 2;
    case MOE_DT_Q8:
        return n % MOE_QK ? 0 : n / MOE_QK * sizeof(moe_block_q8);
    case MOE_DT_Q4:
        return n % MOE_QK ? 0 : n / MOE_QK * sizeof(moe_block_q4);
    default:
        return 0;
    }
}

/* One block of source values as f32. */
static void load_block(float *v, const void *src, moe_dtype st, size_t off)
{
    switch (st) {
    case MOE_DT_F32:
        memcpy(v, (const float *)src + off, MOE_QK * sizeof(float));
        break;
    case MOE_DT_BF16:
        for (int i = 0; i < MOE_QK; i++)
            v[i] = moe_bf16_to_f32(((const uint16_t *)src)[off + (size_t)i]);
        break;
    case MOE_DT_F16:
        for (int i = 0; i < MOE_QK; i++)
            v[i] = moe_f16_to_f32_inline(((const uint16_t *)src)[off + (size_t)i]);
        break;
    default:
        MOE_KASSERT(!"moe_quantize: source dtype must be F32, BF16 or F16");
    }
}

/* The f16 scale for a block whose largest code magnitude `lim` must represent `top` (|top| is the
 * block's max |x|): d = top / lim rounded to f16, clamped to the largest finite half, and moved
 * one half-ulp outward when rounding made top / d exceed the code range by more than half a step
 * (subnormal scales are coarse), so the largest entry is never clipped by more than rounding; a
 * nonzero block never gets a zero scale (the smallest subnormal instead). */
static uint16_t block_scale(float top, float lim)
{
    uint16_t h = moe_f32_to_f16(top / lim);
    if ((h & 0x7fffu) > 0x7bffu) /* inf: |top| beyond 65504 * lim */
        h = (uint16_t)((h & 0x8000u) | 0x7bffu);
    if ((h & 0x7fffu) == 0 && top != 0.0f) /* below half the smallest subnormal: keep it */
        h = (uint16_t)((h & 0x8000u) | 1u);
    float d = moe_f16_to_f32_inline(h);
    if (d != 0.0f && fabsf(top / d) > lim + 0.5f && (h & 0x7fffu) < 0x7bffu)
        h++; /* the next half away from zero */
    return h;
}

/* round(clamp(v, -lim, lim)), half away from zero, as roundf would (clamping first is the same
 * thing for integer limits) but inline, so the block loops vectorize: |v| <= lim < 2^23 makes
 * the truncation and the fraction exact. */
static int round_clamp(float v, float lim)
{
    v = v < -lim ? -lim : v > lim ? lim : v;
    int i = (int)v;
    float f = v - (float)i;
    return i + (f >= 0.5f) - (f <= -0.5f);
}

int moe_quantize(void *dst, moe_dtype qt, const void *src, moe_dtype st, size_t n)
{
    MOE_KASSERT(n % MOE_QK == 0 && (qt == MOE_DT_Q8 || qt == MOE_DT_Q4));
    float v[MOE_QK];
    for (size_t b = 0; b < n / MOE_QK; b++) {
        load_block(v, src, st, b * MOE_QK);
        float amax = 0.0f, m = 0.0f;
        for (int i = 0; i < MOE_QK; i++) {
            float a = fabsf(v[i]);
            if (!(a <= FLT_MAX))
                return -1;
            if (a > amax) {
                amax = a;
                m = v[i];
            }
        }
        if (qt == MOE_DT_Q8) {
            moe_block_q8 *blk = (moe_block_q8 *)dst + b;
            blk->d = block_scale(amax, 127.0f);
            float d = moe_f16_to_f32_inline(blk->d);
            for (int i = 0; i < MOE_QK; i++)
                blk->q[i] = (int8_t)(d == 0.0f ? 0 : round_clamp(v[i] / d, 127.f));
        } else {
            /* d = m / -8: the largest-magnitude entry maps to code 0 (value -8 d) exactly, its
             * opposite side gets 7 steps (as llama.cpp's Q4_0). */
            moe_block_q4 *blk = (moe_block_q4 *)dst + b;
            blk->d = block_scale(-m, 8.0f);
            float d = moe_f16_to_f32_inline(blk->d);
            uint8_t c[MOE_QK];
            /* codes -8..7: clamp to [-8, 8] then 8 -> 7 (x / d = 8 exactly is the one case) */
            for (int i = 0; i < MOE_QK; i++) {
                int k = d == 0.0f ? 0 : round_clamp(v[i] / d, 8.f);
                c[i] = (uint8_t)((k > 7 ? 7 : k) + 8);
            }
            for (int j = 0; j < MOE_QK / 2; j++)
                blk->q[j] = (uint8_t)(c[j] | c[j + MOE_QK / 2] << 4);
        }
    }
    return 0;
}

void moe_dequantize(float *dst, const void *src, moe_dtype qt, size_t n)
{
    MOE_KASSERT(n % MOE_QK == 0 && (qt == MOE_DT_Q8 || qt == MOE_DT_Q4));
    for (size_t b = 0; b < n / MOE_QK; b++) {
        float *o = dst + b * MOE_QK;
        if (qt == MOE_DT_Q8) {
            const moe_block_q8 *blk = (const moe_block_q8 *)src + b;
            float d = moe_f16_to_f32_inline(blk->d);
            for (int i = 0; i < MOE_QK; i++)
                o[i] = d * (float)blk->q[i];
        } else {
            const moe_block_q4 *blk = (const moe_block_q4 *)src + b;
            float d = moe_f16_to_f32_inline(blk->d);
            for (int j = 0; j < MOE_QK / 2; j++) {
                o[j] = d * (float)((blk->q[j] & 0x0f) - 8);
                o[j + MOE_QK / 2] = d * (float)((blk->q[j] >> 4) - 8);
            }
        }
    }
}

void moe_quantize_x_scalar(int8_t *q, float *d, const float *x, int n_tok, int n_in)
{
    int nb = n_in / MOE_QK;
    for (int t = 0; t < n_tok; t++)
        for (int b = 0; b < nb; b++) {
            const float *v = x + (size_t)t * n_in + (size_t)b * MOE_QK;
            int8_t *o = q + (size_t)t * n_in + (size_t)b * MOE_QK;
            float amax = 0.0f;
            int bad = 0;
            for (int i = 0; i < MOE_QK; i++) {
                float a = fabsf(v[i]);
                bad |= !(a <= FLT_MAX);
                amax = a > amax ? a : amax;
            }
            if (bad || amax < MOE_QX_MIN_AMAX) {
                d[(size_t)t * nb + b] = bad ? NAN : 0.0f;
                memset(o, 0, MOE_QK);
                continue;
            }
            float id = 127.0f / amax;
            d[(size_t)t * nb + b] = amax / 127.0f;
            /* nearbyintf: the current rounding mode, ties to even, as vcvtps2dq does. */
            for (int i = 0; i < MOE_QK; i++)
                o[i] = (int8_t)nearbyintf(v[i] * id);
        }
}

/* Block b of a Q8/Q4 row as 32 signed codes (inputs in order) and its scale. */
static float load_wblock(int8_t *c, const void *row, moe_dtype wt, int b)
{
    if (wt == MOE_DT_Q8) {
        const moe_block_q8 *blk = (const moe_block_q8 *)row + b;
        memcpy(c, blk->q, MOE_QK);
        return moe_f16_to_f32_inline(blk->d);
    }
    const moe_block_q4 *blk = (const moe_block_q4 *)row + b;
    for (int j = 0; j < MOE_QK / 2; j++) {
        c[j] = (int8_t)((blk->q[j] & 0x0f) - 8);
        c[j + MOE_QK / 2] = (int8_t)((blk->q[j] >> 4) - 8);
    }
    return moe_f16_to_f32_inline(blk->d);
}

void moe_matmul_rows_q_scalar(float *y, const int8_t *xq, const float *xd, const void *w,
                              moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1)
{
    /* The lanes of quant_avx2.c. Q8: 8 lanes, lane j = inputs 4j..4j+3, summed in hsum8 order.
     * Q4: 4 lanes, lane j = inputs 4j..4j+3 and 16+4j..16+4j+3, summed as (l0 + l2) + (l1 + l3). */
    int nb = n_in / MOE_QK;
    size_t row_bytes = moe_dtype_row_bytes(wt, (size_t)n_in);
    int8_t c[MOE_QK];
    for (int r = r0; r < r1; r++) {
        const char *row = (const char *)w + (size_t)r * row_bytes;
        for (int t = 0; t < n_tok; t++) {
            const int8_t *xt = xq + (size_t)t * n_in;
            float acc[8] = {0};
            for (int b = 0; b < nb; b++) {
                float s = load_wblock(c, row, wt, b) * xd[(size_t)t * nb + b];
                const int8_t *xb = xt + (size_t)b * MOE_QK;
                if (wt == MOE_DT_Q8) {
                    for (int j = 0; j < 8; j++) {
                        int32_t dot = 0;
                        for (int i = 4 * j; i < 4 * j + 4; i++)
                            dot += (int32_t)c[i] * (int32_t)xb[i];
                        acc[j] = fmaf((float)dot, s, acc[j]);
                    }
                } else {
                    for (int j = 0; j < 4; j++) {
                        int32_t dot = 0;
                        for (int i = 4 * j; i < 4 * j + 4; i++)
                            dot += (int32_t)c[i] * (int32_t)xb[i] +
                                   (int32_t)c[i + 16] * (int32_t)xb[i + 16];
                        acc[j] = fmaf((float)dot, s, acc[j]);
                    }
                }
            }
            y[(size_t)t * n_out + r] = wt == MOE_DT_Q8 ? ((acc[0] + acc[4]) + (acc[2] + acc[6])) +
                                                             ((acc[1] + acc[5]) + (acc[3] + acc[7]))
                                                       : (acc[0] + acc[2]) + (acc[1] + acc[3]);
        }
    }
}
