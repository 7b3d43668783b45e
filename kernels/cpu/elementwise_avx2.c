/* AVX2 element-wise kernels: silu(gate) * up with the vector exp (compiled with the AVX2 flags;
 * dispatch-guarded). */
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "kernels/cpu/exp_avx2.h"

/* silu(g) * up = g / (1 + exp(-g)) * up, computed from e = exp(-|g|) <= 1 so the exp argument is
 * never positive: g >= 0 gives g / (1 + e), g < 0 gives g * e / (1 + e) (the same value). Within
 * a few ulp of the scalar expf formula; +-inf and NaN as it (inf, NaN, NaN). */
static inline __m256 silu_mul8(__m256 g, __m256 u)
{
    __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
    __m256 e = moe_exp_nonpos_avx2(_mm256_sub_ps(_mm256_setzero_ps(), a));
    __m256 num = _mm256_blendv_ps(g, _mm256_mul_ps(g, e), g); /* sign bit of g selects g * e */
    return _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

void moe_silu_mul_avx2(float *gate, const float *up, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(gate + i, silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    if (i < n) {
        float g[8] = {0}, u[8] = {0};
        memcpy(g, gate + i, (size_t)(n - i) * sizeof(float));
        memcpy(u, up + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(g, silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
        memcpy(gate + i, g, (size_t)(n - i) * sizeof(float));
    }
}

#else /* built without the flags: never dispatched */

void moe_silu_mul_avx2(float *gate, const float *up, int n)
{
    moe_silu_mul_scalar(gate, up, n);
}

#endif
