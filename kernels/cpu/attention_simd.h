/* The attention chunk kernels on 8-lane AVX2 instructions (scores and P.V), written once and
 * instantiated by attention_avx2.c (16 vector registers) and attention_avx512.c (the same
 * instructions compiled with AVX-512VL: 32 registers, so bigger register blocks). Include only from
 * files built with at least the AVX2+FMA flags, after defining
 *   ATT_FN(name)   the instance's function name (name##_avx2, name##_avx512),
 *   ATT_SQ         query rows per scores block (ATT_SQ rows x 4 K rows; the rows left over form
 *                  one block of their count, and a single row takes 8 K rows per block),
 *   ATT_AQ, ATT_AW query rows x 8-float vectors of o per P.V block.
 *
 * Bit-exactness (the batch-invariance contract): every dot q.k is one 8-lane FMA chain over the
 * head dimension (a masked tail for head_dim % 8), reduced ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))
 * and multiplied by the scale; every output o[d] is o[d] * alpha followed by one FMA per context
 * row in row order. Neither depends on the block a row or column falls in, on how many rows are
 * processed together, nor on the instance: each query's result is the same bits whatever the
 * number of queries and heads given at once, in both files. Blocks only decide how often a
 * loaded q/k/v vector is reused from a register (loads per FMA: 1.1 for one row x 8 K rows,
 * 0.58 for 3 x 4, 0.5 for 4 x 4). Measured on Zen 4 (docs/kernels.md): the AVX2 instance's 3-row
 * blocks come within 3% of the AVX-512VL instance's 4-row ones; wider blocks gained nothing. */
#include <immintrin.h>
#include <string.h>


static inline __m256i att_tail_mask(int n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Scores of rows q[0..nq) against the nk K rows kp (4, or 8 for a single row: 8 FMA chains cover
 * the FMA latency when no other row shares the loads), ncol of them stored, at s + r * s_stride.
 * nq and nk are constants at every call site (the loops unroll into registers). */
static inline __attribute__((always_inline)) void att_scores_block(
    float *s, int s_stride, const float *const *q, int nq, const float *const *kp, int nk,
    int ncol, int d8, int dt, __m256i tm, __m128 sc)
{
    __m256 a[ATT_SQ][8];
#pragma GCC unroll 8
    for (int r = 0; r < nq; r++)
#pragma GCC unroll 8
        for (int i = 0; i < nk; i++)
            a[r][i] = _mm256_setzero_ps();
    for (int d = 0; d < d8; d += 8) {
        __m256 qv[ATT_SQ];
#pragma GCC unroll 8
        for (int r = 0; r < nq; r++)
            qv[r] = _mm256_loadu_ps(q[r] + d);
#pragma GCC unroll 8
        for (int i = 0; i < nk; i++) {
            __m256 kv = _mm256_loadu_ps(kp[i] + d);
#pragma GCC unroll 8
            for (int r = 0; r < nq; r++)
                a[r][i] = _mm256_fmadd_ps(kv, qv[r], a[r][i]);
        }
    }
    if (dt) { /* masked lanes load as 0 and add 0 * 0 */
#pragma GCC unroll 8
        for (int i = 0; i < nk; i++) {
            __m256 kv = _mm256_maskload_ps(kp[i] + d8, tm);
#pragma GCC unroll 8
            for (int r = 0; r < nq; r++)
                a[r][i] = _mm256_fmadd_ps(kv, _mm256_maskload_ps(q[r] + d8, tm), a[r][i]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < nq; r++)
#pragma GCC unroll 2
        for (int i = 0; i < nk && i < ncol; i += 4) {
            /* Each four dots with one tree: ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) per dot. */
            __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[r][i], a[r][i + 1]),
                                      _mm256_hadd_ps(a[r][i + 2], a[r][i + 3]));
            __m128 v = _mm_mul_ps(
                _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), sc);
            float *o = s + (size_t)r * s_stride + i;
            if (ncol - i >= 4) {
                _mm_storeu_ps(o, v);
            } else {
                float b[4];
                _mm_storeu_ps(b, v);
                memcpy(o, b, (size_t)(ncol - i) * sizeof(float));
            }
        }
}

/* Rows q[0..nq) against all nc K rows, nk at a time; a last block of fewer than nk K rows repeats
 * its last row (computed, not stored). */
static inline __attribute__((always_inline)) void att_scores_rows(
    float *s, int s_stride, const float *const *q, int nq, const float *const *k, int nc, int nk,
    int d8, int dt, __m256i tm, __m128 sc)
{
    for (int c = 0; c < nc; c += nk) {
        int ncol = nc - c < nk ? nc - c : nk;
        const float *kp[8];
#pragma GCC unroll 8
        for (int i = 0; i < nk; i++)
            kp[i] = k[c + (i < ncol ? i : ncol - 1)];
        att_scores_block(s + c, s_stride, q, nq, kp, nk, ncol, d8, dt, tm, sc);
    }
}

void ATT_FN(moe_attn_scores)(float *s, int s_stride, const float *const *q, int nr,
                             const float *const *k, int nc, int head_dim, float scale)
{
    int d8 = head_dim & ~7, dt = head_dim - d8;
    __m256i tm = att_tail_mask(dt);
    __m128 sc = _mm_set1_ps(scale);
    int r = 0;
    for (; r + ATT_SQ <= nr; r += ATT_SQ)
        att_scores_rows(s + (size_t)r * s_stride, s_stride, q + r, ATT_SQ, k, nc, 4, d8, dt, tm,
                        sc);
    /* The remaining rows in one block of their count (a decode step's GQA group of 3 is one
     * block, not three single rows); a single row takes 8 K rows per block. Blocks do not change
     * any dot's bits. */
    float *sr = s + (size_t)r * s_stride;
    if (ATT_SQ > 4 && nr - r >= 4) {
        att_scores_rows(sr, s_stride, q + r, 4, k, nc, 4, d8, dt, tm, sc);
        r += 4;
        sr += (size_t)4 * s_stride;
    }
    if (ATT_SQ > 3 && nr - r == 3)
        att_scores_rows(sr, s_stride, q + r, 3, k, nc, 4, d8, dt, tm, sc);
    else if (ATT_SQ > 2 && nr - r == 2)
        att_scores_rows(sr, s_stride, q + r, 2, k, nc, 4, d8, dt, tm, sc);
    else
        for (; r < nr; r++, sr += s_stride)
            att_scores_rows(sr, s_stride, q + r, 1, k, nc, 8, d8, dt, tm, sc);
}

/* o[r][d .. d + 8 nv) of rows r < nq (nq, nv constants at every call site; masked: one vector of
 * the tm lanes): scaled by alpha[r], then p[r][c] * v[c] added for c < nc[r] in c order. The rows
 * share each v load for the context rows they all have; the rest is added row by row. */
static inline __attribute__((always_inline)) void att_accum_block(
    float *const *o, const float *alpha, const float *p, int p_stride, int nq,
    const float *const *v, const int *nc, int d, int nv, int masked, __m256i tm)
{
    __m256 acc[ATT_AQ][ATT_AW > 8 ? ATT_AW : 8];
    int lo = nc[0];
#pragma GCC unroll 8
    for (int r = 0; r < nq; r++) {
        lo = nc[r] < lo ? nc[r] : lo;
        __m256 al = _mm256_set1_ps(alpha[r]);
#pragma GCC unroll 8
        for (int i = 0; i < nv; i++)
            acc[r][i] = _mm256_mul_ps(masked ? _mm256_maskload_ps(o[r] + d, tm)
                                             : _mm256_loadu_ps(o[r] + d + 8 * i),
                                      al);
    }
    for (int c = 0; c < lo; c++) {
        __m256 pb[ATT_AQ];
#pragma GCC unroll 8
        for (int r = 0; r < nq; r++)
            pb[r] = _mm256_broadcast_ss(p + (size_t)r * p_stride + c);
        const float *vc = v[c] + d;
#pragma GCC unroll 8
        for (int i = 0; i < nv; i++) {
            __m256 vv = masked ? _mm256_maskload_ps(vc, tm) : _mm256_loadu_ps(vc + 8 * i);
#pragma GCC unroll 8
            for (int r = 0; r < nq; r++)
                acc[r][i] = _mm256_fmadd_ps(vv, pb[r], acc[r][i]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < nq; r++) {
        for (int c = lo; c < nc[r]; c++) {
            __m256 pb = _mm256_broadcast_ss(p + (size_t)r * p_stride + c);
            const float *vc = v[c] + d;
#pragma GCC unroll 8
            for (int i = 0; i < nv; i++)
                acc[r][i] = _mm256_fmadd_ps(
                    masked ? _mm256_maskload_ps(vc, tm) : _mm256_loadu_ps(vc + 8 * i), pb,
                    acc[r][i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < nv; i++) {
            if (masked)
                _mm256_maskstore_ps(o[r] + d, tm, acc[r][i]);
            else
                _mm256_storeu_ps(o[r] + d + 8 * i, acc[r][i]);
        }
    }
}

/* The rows' d range in blocks of ATT_AW vectors, then single vectors, then the masked tail. */
static inline __attribute__((always_inline)) void att_accum_rows(
    float *const *o, const float *alpha, const float *p, int p_stride, int nq,
    const float *const *v, const int *nc, int head_dim)
{
    /* A single row keeps 8 vectors (8 FMA chains) in registers: nothing else shares its loads. */
    int d8 = head_dim & ~7, dt = head_dim - d8, d = 0, w = nq == 1 ? 8 : ATT_AW;
    for (; d + 8 * w <= d8; d += 8 * w)
        att_accum_block(o, alpha, p, p_stride, nq, v, nc, d, w, 0, _mm256_setzero_si256());
    for (; d < d8; d += 8)
        att_accum_block(o, alpha, p, p_stride, nq, v, nc, d, 1, 0, _mm256_setzero_si256());
    if (dt)
        att_accum_block(o, alpha, p, p_stride, nq, v, nc, d8, 1, 1, att_tail_mask(dt));
}

void ATT_FN(moe_attn_accum)(float *const *o, const float *alpha, const float *p, int p_stride,
                            int nr, const float *const *v, const int *nc, int head_dim)
{
    int r = 0;
    for (; r + ATT_AQ <= nr; r += ATT_AQ)
        att_accum_rows(o + r, alpha + r, p + (size_t)r * p_stride, p_stride, ATT_AQ, v, nc + r,
                       head_dim);
    const float *pr = p + (size_t)r * p_stride;
    /* the remaining rows in blocks of their count, as in the scores */
    if (ATT_AQ > 4 && nr - r >= 4) {
        att_accum_rows(o + r, alpha + r, pr, p_stride, 4, v, nc + r, head_dim);
        r += 4;
        pr += (size_t)4 * p_stride;
    }
    if (ATT_AQ > 3 && nr - r == 3)
        att_accum_rows(o + r, alpha + r, pr, p_stride, 3, v, nc + r, head_dim);
    else if (ATT_AQ > 2 && nr - r == 2)
        att_accum_rows(o + r, alpha + r, pr, p_stride, 2, v, nc + r, head_dim);
    else
        for (; r < nr; r++, pr += p_stride)
            att_accum_rows(o + r, alpha + r, pr, p_stride, 1, v, nc + r, head_dim);
}
