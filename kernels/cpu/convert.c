/* Scalar IEEE half <-> single conversions and whole-array conversion to f32. */
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float moe_f16_to_f32(uint16_t h)
{
    return moe_f16_to_f32_inline(h);
}

uint16_t moe_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: quiet, keep the top payload bits */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* >= 65520 rounds to inf (65504 is the largest finite) */
        return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) { /* normal half: 2^-14 and up */
        /* Rebias exponent (127 -> 15) and round the 13 dropped bits to nearest even; a carry
         * out of the mantissa correctly bumps the exponent. */
        uint32_t r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) /* < 2^-25: rounds to zero (2^-25 exactly is a tie to even 0) */
        return sign;
    /* Subnormal half: value = m * 2^-24 with m = round(a * 2^24). Shift the full 24-bit
     * significand right, rounding to nearest even. */
    uint32_t e = a >> 23;                     /* 102..112 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u; /* significand with the implicit bit */
    uint32_t shift = 126u - e;                /* 14..24 */
    uint32_t half = 1u << (shift - 1);
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t q = m >> shift;
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}

void moe_convert_to_f32(float *dst, const void *src, moe_dtype dt, size_t n)
{
    switch (dt) {
    case MOE_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        return;
    case MOE_DT_BF16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = moe_bf16_to_f32(s[i]);
        return;
    }
    case MOE_DT_F16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = moe_f16_to_f32_inline(s[i]);
        return;
    }
    case MOE_DT_Q8:
    case MOE_DT_Q4:
        moe_dequantize(dst, src, dt, n);
        return;
    default:
        MOE_KASSERT(!"moe_convert_to_f32: unknown dtype");
    }
}
