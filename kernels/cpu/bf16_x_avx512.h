/* x fed to bf16 dot products (vdpbf16ps, AMX tdpbf16ps): 32 f32 values of x at a time as one bf16
 * each, or as hi + lo bf16. Shared by matmul_avx512.c and matmul_amx.c, both compiled with the
 * AVX-512 F/BW/VL/DQ/BF16 flags, so the two paths feed exactly the same bf16 values. */
#ifndef MOE_KERNELS_CPU_BF16_X_AVX512_H
#define MOE_KERNELS_CPU_BF16_X_AVX512_H

#include <immintrin.h>

#define BX_AI static inline __attribute__((always_inline))

/* Lanes [0, n) of 16, n in [0, 16]. */
BX_AI __mmask16 mask16(int n)
{
    return (__mmask16)(n >= 16 ? 0xffffu : ((1u << n) - 1u));
}

/* The f32 values of the 32 bf16 in v: low 16 (h = 0) or high 16 (h = 1), exact. */
BX_AI __m512 bf16_half_f32(__m512i v, int h)
{
    __m256i q = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(q), 16));
}

/* x[k, k + 32) of a row of n_in (zero past n_in) as 32 bf16 in k order: *hi = bf16(x), round to
 * nearest even; with lo (NX = 2) *lo = bf16(x - hi) (x - hi is exact in f32; a non-finite x gets
 * lo = 0, so inf stays inf). Each (hi + lo) is within 2^-16 of x, hi alone within 2^-8. */
BX_AI void bf16_x32(const float *x, int k, int n_in, __m512i *hi, __m512i *lo)
{
    __m512 a, b;
    if (k + 32 <= n_in) {
        a = _mm512_loadu_ps(x + k);
        b = _mm512_loadu_ps(x + k + 16);
    } else {
        a = _mm512_maskz_loadu_ps(mask16(n_in - k), x + k);
        b = _mm512_maskz_loadu_ps(mask16(n_in - k - 16 > 0 ? n_in - k - 16 : 0), x + k + 16);
    }
    /* cvtne2ps: the second operand fills the low 16 bf16 */
    __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    *hi = h;
    if (lo) {
        __m512 ra = _mm512_sub_ps(a, bf16_half_f32(h, 0));
        __m512 rb = _mm512_sub_ps(b, bf16_half_f32(h, 1));
        /* inf - inf and NaN - NaN are NaN: those lanes' lo part is 0 */
        ra = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ra, ra, _CMP_ORD_Q), ra);
        rb = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(rb, rb, _CMP_ORD_Q), rb);
        *lo = (__m512i)_mm512_cvtne2ps_pbh(rb, ra);
    }
}

#endif
