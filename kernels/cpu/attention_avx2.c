/* AVX2+FMA attention chunk kernels: scores of a chunk of K rows for a set of query rows, the
 * chunk's max and softmax numerators, and the probability-weighted sum of V rows (compiled with
 * the AVX2 flags; dispatch-guarded). Scores and P.V are attention_simd.h's, with blocks sized for
 * 16 vector registers. */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "kernels/cpu/exp_avx2.h"

#define ATT_FN(name) name##_avx2
#define ATT_SQ 3 /* 3 x 4 dots: 12 accumulators, 3 q and 1 k live (all 16 registers) */
#define ATT_AQ 3 /* 3 rows x 4 vectors: 12 accumulators, 3 broadcasts and 1 v live */
#define ATT_AW 4
#include "kernels/cpu/attention_simd.h"

double moe_attn_exp_avx2(float *s, int nc, float m_in, float *m_out)
{
    /* The chunk's max first (exact in any order: 8 lanes, then across them; a NaN score is
     * skipped as the scalar compare does, max_ps returning its second operand), then the softmax
     * numerators: 32 scalar expf calls cost more than the chunk's score and value FMAs together.
     * The sum is taken in f32 lanes (at most 64 terms in [0, 1]: relative error below 2^-18) and
     * the caller adds it to its double total. */
    __m256 mv = _mm256_set1_ps(m_in);
    int c = 0;
    for (; c + 8 <= nc; c += 8)
        mv = _mm256_max_ps(_mm256_loadu_ps(s + c), mv);
    if (c < nc)
        mv = _mm256_max_ps(_mm256_blendv_ps(mv, _mm256_maskload_ps(s + c, att_tail_mask(nc - c)),
                                            _mm256_castsi256_ps(att_tail_mask(nc - c))),
                           mv);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    *m_out = mx;
    __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    c = 0;
    for (; c + 8 <= nc; c += 8) {
        __m256 e = moe_exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + c), m));
        _mm256_storeu_ps(s + c, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (c < nc) {
        float buf[8];
        int n = nc - c;
        __m256 e = moe_exp_nonpos_avx2(_mm256_sub_ps(_mm256_maskload_ps(s + c, att_tail_mask(n)), m));
        _mm256_storeu_ps(buf, e);
        memcpy(s + c, buf, (size_t)n * sizeof(float));
        /* lanes past n held 0 - mx: mask them out of the sum */
        acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(att_tail_mask(n))));
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return (double)_mm_cvtss_f32(t);
}

#else /* built without the flags: never dispatched */

void moe_attn_scores_avx2(float *s, int s_stride, const float *const *q, int nr,
                          const float *const *k, int nc, int head_dim, float scale)
{
    moe_attn_scores_scalar(s, s_stride, q, nr, k, nc, head_dim, scale);
}

void moe_attn_accum_avx2(float *const *o, const float *alpha, const float *p, int p_stride,
                         int nr, const float *const *v, const int *nc, int head_dim)
{
    moe_attn_accum_scalar(o, alpha, p, p_stride, nr, v, nc, head_dim);
}

double moe_attn_exp_avx2(float *s, int nc, float m_in, float *m_out)
{
    return moe_attn_exp_scalar(s, nc, m_in, m_out);
}

#endif
