/* The AVX2 vector exp of non-positive arguments shared by the attention softmax and silu (include
 * only from files built with the AVX2+FMA flags). */
#ifndef MOE_KERNELS_CPU_EXP_AVX2_H
#define MOE_KERNELS_CPU_EXP_AVX2_H

#include <immintrin.h>

/* exp(x) for x <= 0 (Cephes expf: n = round(x / ln 2), r = x - n ln 2 in two steps, a degree-6
 * polynomial, times 2^n built in the exponent bits): within 2 ulp of exp. Below -87 it returns 0
 * (exp(-87) = 1.6e-38: the true value is smaller than that, invisible next to the values it is
 * summed or compared with; -inf gives 0 as expf does), so 2^n stays a normal float. NaN
 * propagates. Positive x are outside the contract (the exponent bits would overflow past 88). */
static inline __m256 moe_exp_nonpos_avx2(__m256 x)
{
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ); /* x >= -87 or NaN */
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* second operand returned for NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e)), keep);
}

#endif
