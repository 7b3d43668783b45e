/* The vector exp of non-positive arguments shared by the attention softmax and silu, on 8 lanes
 * (AVX2) and, in files built with AVX-512, on 16 with the same bits (include only from files
 * built with at least the AVX2+FMA flags). */
#ifndef MOE_KERNELS_CPU_EXP_AVX2_H
#define MOE_KERNELS_CPU_EXP_AVX2_H

#include <immintrin.h>

/* Cephes expf's constants: log2(e), ln 2 in two parts (high part exact in 9 bits), the degree-6
 * polynomial's coefficients. */
#define MOE_EXP_LOG2E 1.44269504088896341f
#define MOE_EXP_LN2_HI 0.693359375f
#define MOE_EXP_LN2_LO -2.12194440e-4f
#define MOE_EXP_P0 1.9875691500e-4f
#define MOE_EXP_P1 1.3981999507e-3f
#define MOE_EXP_P2 8.3334519073e-3f
#define MOE_EXP_P3 4.1665795894e-2f
#define MOE_EXP_P4 1.6666665459e-1f
#define MOE_EXP_P5 5.0000001201e-1f
#define MOE_EXP_MIN -87.0f

/* exp(x) for x <= 0 (Cephes expf: n = round(x / ln 2), r = x - n ln 2 in two steps, a degree-6
 * polynomial, times 2^n built in the exponent bits): within 2 ulp of exp. Below -87 it returns 0
 * (exp(-87) = 1.6e-38: the true value is smaller than that, invisible next to the values it is
 * summed or compared with; -inf gives 0 as expf does), so 2^n stays a normal float. NaN
 * propagates. Positive x are outside the contract (the exponent bits would overflow past 88). */
static inline __m256 moe_exp_nonpos_avx2(__m256 x)
{
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(MOE_EXP_MIN), _CMP_NLT_UQ); /* x >= -87 or NaN */
    x = _mm256_max_ps(_mm256_set1_ps(MOE_EXP_MIN), x); /* second operand returned for NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(MOE_EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(MOE_EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(MOE_EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(MOE_EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MOE_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MOE_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MOE_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MOE_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MOE_EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e)), keep);
}

#ifdef __AVX512F__
/* The same exp on 16 lanes: every lane the AVX2 function's operations in its order (the round is
 * vrndscaleps to nearest, the AND with keep a zero-masking move), so the same bits per lane. */
static inline __m512 moe_exp_nonpos_avx512(__m512 x)
{
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(MOE_EXP_MIN), _CMP_NLT_UQ);
    x = _mm512_max_ps(_mm512_set1_ps(MOE_EXP_MIN), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(MOE_EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(MOE_EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(MOE_EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(MOE_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(MOE_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(MOE_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(MOE_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(MOE_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(MOE_EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_maskz_mov_ps(keep,
                               _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e)));
}
#endif

#endif
