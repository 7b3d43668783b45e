/* AVX2+FMA attention chunk kernels: scores of a chunk of K rows for a group of query heads, and
 * the probability-weighted sum of V rows (compiled with the AVX2 flags; dispatch-guarded). */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "kernels/cpu/exp_avx2.h"

static inline __m256 load_tail(const float *x, int n)
{
    float buf[8] = {0};
    memcpy(buf, x, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(buf);
}

void moe_attn_scores_avx2(float *s, int s_stride, const float *q, int ng, const float *const *k,
                          int nc, int head_dim, float scale)
{
    int d8 = head_dim & ~7, dt = head_dim - d8;
    __m128 sc = _mm_set1_ps(scale);
    for (int g = 0; g < ng; g++) {
        const float *qg = q + (size_t)g * head_dim;
        float *sg = s + (size_t)g * s_stride;
        int c = 0;
        /* Eight K rows at a time: one q load feeds eight independent FMA chains (enough to
         * cover the FMA latency); each four sums are reduced together with three hadds. */
        for (; c + 8 <= nc; c += 8) {
            __m256 a[8];
            for (int i = 0; i < 8; i++)
                a[i] = _mm256_setzero_ps();
            for (int d = 0; d < d8; d += 8) {
                __m256 qv = _mm256_loadu_ps(qg + d);
                for (int i = 0; i < 8; i++)
                    a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(k[c + i] + d), qv, a[i]);
            }
            if (dt) {
                __m256 qv = load_tail(qg + d8, dt);
                for (int i = 0; i < 8; i++)
                    a[i] = _mm256_fmadd_ps(load_tail(k[c + i] + d8, dt), qv, a[i]);
            }
            for (int i = 0; i < 8; i += 4) {
                __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[i], a[i + 1]),
                                          _mm256_hadd_ps(a[i + 2], a[i + 3]));
                __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                _mm_storeu_ps(sg + c + i, _mm_mul_ps(r, sc));
            }
        }
        for (; c < nc; c++)
            sg[c] = moe_dot_f32_avx2(qg, k[c], head_dim) * scale;
    }
}

void moe_attn_accum_avx2(float *o, const float *p, int p_stride, int ng, const float *const *v,
                         int nc, int head_dim)
{
    for (int g = 0; g < ng; g++) {
        float *og = o + (size_t)g * head_dim;
        const float *pg = p + (size_t)g * p_stride;
        int d = 0;
        /* 64 outputs in 8 registers across the whole chunk: V rows are read once per head from
         * L1, o is loaded and stored once per chunk. */
        for (; d + 64 <= head_dim; d += 64) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_loadu_ps(og + d + 8 * i);
            for (int c = 0; c < nc; c++) {
                __m256 pv = _mm256_broadcast_ss(pg + c);
                const float *vc = v[c] + d;
                for (int i = 0; i < 8; i++)
                    acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(vc + 8 * i), pv, acc[i]);
            }
            for (int i = 0; i < 8; i++)
                _mm256_storeu_ps(og + d + 8 * i, acc[i]);
        }
        for (; d + 8 <= head_dim; d += 8) {
            __m256 acc = _mm256_loadu_ps(og + d);
            for (int c = 0; c < nc; c++)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(v[c] + d), _mm256_broadcast_ss(pg + c), acc);
            _mm256_storeu_ps(og + d, acc);
        }
        for (; d < head_dim; d++) {
            float a = og[d];
            for (int c = 0; c < nc; c++)
                a += pg[c] * v[c][d];
            og[d] = a;
        }
    }
}

double moe_attn_exp_avx2(float *s, int nc, float mx)
{
    /* The softmax numerators of a chunk: 32 scalar expf calls cost more than the chunk's score and
     * value FMAs together. The sum is taken in f32 lanes (at most 32 terms in [0, 1]: relative
     * error below 2^-19) and the caller adds it to its double total. */
    __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= nc; c += 8) {
        __m256 e = moe_exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + c), m));
        _mm256_storeu_ps(s + c, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (c < nc) {
        float buf[8];
        int n = nc - c;
        __m256 e = moe_exp_nonpos_avx2(_mm256_sub_ps(load_tail(s + c, n), m));
        _mm256_storeu_ps(buf, e);
        memcpy(s + c, buf, (size_t)n * sizeof(float));
        /* lanes past n held 0 - mx: mask them out of the sum */
        __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
        acc = _mm256_add_ps(acc, _mm256_and_ps(e, keep));
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return (double)_mm_cvtss_f32(h);
}

#else /* built without the flags: never dispatched */

void moe_attn_scores_avx2(float *s, int s_stride, const float *q, int ng, const float *const *k,
                          int nc, int head_dim, float scale)
{
    moe_attn_scores_scalar(s, s_stride, q, ng, k, nc, head_dim, scale);
}

void moe_attn_accum_avx2(float *o, const float *p, int p_stride, int ng, const float *const *v,
                         int nc, int head_dim)
{
    moe_attn_accum_scalar(o, p, p_stride, ng, v, nc, head_dim);
}

double moe_attn_exp_avx2(float *s, int nc, float mx)
{
    return moe_attn_exp_scalar(s, nc, mx);
}

#endif
