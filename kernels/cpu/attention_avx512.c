/* AVX-512 attention chunk kernels: the scores and P.V of attention_simd.h on 16-lane registers,
 * with exactly its arithmetic, so the same bits as attention_avx2.c (dispatch-guarded).
 *
 * A 16-lane register holds two of the 8-lane vectors that contract is written in: P.V keeps each
 * output o[d] in its own lane (o * alpha, then one FMA per context row in row order), so 16 of
 * them at once are 16 independent lanes as before. Scores keep each dot q.k one 8-lane FMA chain
 * over the head dimension: the register's low half is row a's chain and its high half row b's,
 * the K vector broadcast into both halves; the reduction is attention_simd.h's tree on each half.
 * Where two FMA units take 512-bit operands (Intel server cores) this is twice the 8-lane
 * instructions' rate; on Zen 4 (512-bit operations issued as two halves) the same. A single row
 * has no partner for the high half and takes the 8-lane blocks (attention_simd.h, with the
 * AVX-512VL register count). */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/exp_avx2.h"
#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
/* The 8-lane blocks, for single rows: the same instructions as the AVX2 instance, 32 registers. */
void moe_attn_scores_avx512vl(float *s, int s_stride, const float *const *q, int nr,
                              const float *const *k, int nc, int head_dim, float scale);
void moe_attn_accum_avx512vl(float *const *o, const float *alpha, const float *p, int p_stride,
                             int nr, const float *const *v, const int *nc, int head_dim);
#define ATT_FN(name) name##_avx512vl
#define ATT_SQ 4 /* 4 x 4 dots: 16 accumulators, 4 q and 1 k live */
#define ATT_AQ 4 /* 4 rows x 4 vectors: 16 accumulators, 4 broadcasts and 1 v live */
#define ATT_AW 4
#include "kernels/cpu/attention_simd.h"

#define AI static inline __attribute__((always_inline))

/* ---- scores ----
 * q as row pairs: for pair j and 8-float step t of d, 16 floats at qp[(t * np + j) * 16]: row
 * 2j's 8 in the low half, row 2j + 1's in the high half, the head_dim % 8 tail and a missing odd
 * row zero (as attention_simd.h's masked loads give). Packed once per call, read for every K row. */
enum {
    ZS_PAIRS = 4,     /* row pairs per register block: 4 pairs x 4 K rows = 16 accumulators */
    ZS_MAX_PAIRS = 16, /* row pairs packed per pass (32 rows: attention.c's ATT_ROWS) */
    ZS_MAX_STEPS = 32, /* 8-float steps of d packed (head_dim up to 256) */
    ZS_MIN_ROWS = 4,   /* fewer rows take the 8-lane blocks (see moe_attn_scores_avx512) */
};

static void pack_q_pairs(float *qp, const float *const *q, int nr, int head_dim, int steps)
{
    int np = (nr + 1) / 2;
    for (int t = 0; t < steps; t++) {
        int n = head_dim - 8 * t < 8 ? head_dim - 8 * t : 8;
        __mmask8 m = (__mmask8)((1u << n) - 1u);
        for (int j = 0; j < np; j++) {
            __m256 a = _mm256_maskz_loadu_ps(m, q[2 * j] + 8 * t);
            __m256 b = 2 * j + 1 < nr ? _mm256_maskz_loadu_ps(m, q[2 * j + 1] + 8 * t)
                                      : _mm256_setzero_ps();
            _mm512_store_ps(qp + ((size_t)t * np + j) * 16,
                            _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1));
        }
    }
}

/* attention_simd.h's tree on four 8-lane dots, scaled, ncol of them stored at o. */
AI void store_dots4(float *o, __m256 x0, __m256 x1, __m256 x2, __m256 x3, int ncol, __m128 sc)
{
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(x0, x1), _mm256_hadd_ps(x2, x3));
    __m128 v = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), sc);
    if (ncol >= 4) {
        _mm_storeu_ps(o, v);
    } else {
        float b[4];
        _mm_storeu_ps(b, v);
        memcpy(o, b, (size_t)ncol * sizeof(float));
    }
}

/* Pairs [0, npb) of the block at qp (np pairs per step in the packing) against the 4 K rows kp,
 * ncol of them stored; rows of the block: nrb (the last pair may have one). npb is a constant at
 * every call site. */
AI void zscores_block(float *s, int s_stride, const float *qp, int np, int npb, int nrb,
                      const float *const *kp, int ncol, int d8, int steps, __mmask8 tm,
                      __m128 sc)
{
    __m512 a[ZS_PAIRS][4];
#pragma GCC unroll 4
    for (int j = 0; j < npb; j++)
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            a[j][i] = _mm512_setzero_ps();
    int t = 0;
    for (; 8 * t < d8; t++) {
        __m512 qv[ZS_PAIRS];
#pragma GCC unroll 4
        for (int j = 0; j < npb; j++)
            qv[j] = _mm512_load_ps(qp + ((size_t)t * np + j) * 16);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512 kv = _mm512_broadcast_f32x8(_mm256_loadu_ps(kp[i] + 8 * t));
#pragma GCC unroll 4
            for (int j = 0; j < npb; j++)
                a[j][i] = _mm512_fmadd_ps(kv, qv[j], a[j][i]);
        }
    }
    /* The tail: masked lanes are 0 * 0 on both sides. Its own copy of the step: one loop with a
     * mask on every step ran the 8-query tiles at 0.96x the 8-lane time instead of 0.85x. */
    if (t < steps) {
        __m512 qv[ZS_PAIRS];
#pragma GCC unroll 4
        for (int j = 0; j < npb; j++)
            qv[j] = _mm512_load_ps(qp + ((size_t)t * np + j) * 16);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512 kv = _mm512_broadcast_f32x8(_mm256_maskz_loadu_ps(tm, kp[i] + 8 * t));
#pragma GCC unroll 4
            for (int j = 0; j < npb; j++)
                a[j][i] = _mm512_fmadd_ps(kv, qv[j], a[j][i]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < npb; j++) {
        float *o = s + (size_t)(2 * j) * s_stride;
        store_dots4(o, _mm512_castps512_ps256(a[j][0]), _mm512_castps512_ps256(a[j][1]),
                    _mm512_castps512_ps256(a[j][2]), _mm512_castps512_ps256(a[j][3]), ncol, sc);
        if (2 * j + 1 < nrb)
            store_dots4(o + s_stride, _mm512_extractf32x8_ps(a[j][0], 1),
                        _mm512_extractf32x8_ps(a[j][1], 1), _mm512_extractf32x8_ps(a[j][2], 1),
                        _mm512_extractf32x8_ps(a[j][3], 1), ncol, sc);
    }
}

/* The block's pairs against all nc K rows, 4 at a time; a last block of fewer repeats its last
 * row (computed, not stored). */
AI void zscores_rows(float *s, int s_stride, const float *qp, int np, int npb, int nrb,
                     const float *const *k, int nc, int d8, int steps, __mmask8 tm, __m128 sc)
{
    for (int c = 0; c < nc; c += 4) {
        int ncol = nc - c < 4 ? nc - c : 4;
        const float *kp[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            kp[i] = k[c + (i < ncol ? i : ncol - 1)];
        zscores_block(s + c, s_stride, qp, np, npb, nrb, kp, ncol, d8, steps, tm, sc);
    }
}

void moe_attn_scores_avx512(float *s, int s_stride, const float *const *q, int nr,
                            const float *const *k, int nc, int head_dim, float scale)
{
    int steps = (head_dim + 7) / 8, d8 = head_dim & ~7;
    if (nr < ZS_MIN_ROWS || steps > ZS_MAX_STEPS) {
        moe_attn_scores_avx512vl(s, s_stride, q, nr, k, nc, head_dim, scale);
        return;
    }
    __mmask8 tm = (__mmask8)((1u << (head_dim - d8)) - 1u);
    __m128 sc = _mm_set1_ps(scale);
    _Alignas(64) float qp[ZS_MAX_PAIRS * ZS_MAX_STEPS * 16];
    for (int r0 = 0; r0 < nr; r0 += 2 * ZS_MAX_PAIRS) {
        int nrp = nr - r0 < 2 * ZS_MAX_PAIRS ? nr - r0 : 2 * ZS_MAX_PAIRS, np = (nrp + 1) / 2;
        pack_q_pairs(qp, q + r0, nrp, head_dim, steps);
        float *sp = s + (size_t)r0 * s_stride;
        int j = 0;
        for (; j + ZS_PAIRS <= np; j += ZS_PAIRS) {
            int nrb = nrp - 2 * j < 2 * ZS_PAIRS ? nrp - 2 * j : 2 * ZS_PAIRS;
            zscores_rows(sp + (size_t)(2 * j) * s_stride, s_stride, qp + (size_t)j * 16, np,
                         ZS_PAIRS, nrb, k, nc, d8, steps, tm, sc);
        }
        /* the remaining 1-3 pairs in one block of their count */
        float *sj = sp + (size_t)(2 * j) * s_stride;
        const float *qj = qp + (size_t)j * 16;
        int nrb = nrp - 2 * j;
        if (np - j == 3)
            zscores_rows(sj, s_stride, qj, np, 3, nrb, k, nc, d8, steps, tm, sc);
        else if (np - j == 2)
            zscores_rows(sj, s_stride, qj, np, 2, nrb, k, nc, d8, steps, tm, sc);
        else if (np - j == 1)
            zscores_rows(sj, s_stride, qj, np, 1, nrb, k, nc, d8, steps, tm, sc);
    }
}

/* ---- P.V ----
 * o[r][d .. d + 16 nv) of rows r < nq (masked: one vector of the m lanes): scaled by alpha[r],
 * then p[r][c] * v[c] added for c < nc[r] in c order; the rows share each v load for the context
 * rows they all have, the rest row by row (attention_simd.h's att_accum_block, 16 lanes). */
enum { ZA_ROWS = 4, ZA_VECS = 4 }; /* 4 rows x 4 vectors: 16 accumulators */

AI void zaccum_block(float *const *o, const float *alpha, const float *p, int p_stride, int nq,
                     const float *const *v, const int *nc, int d, int nv, __mmask16 m)
{
    __m512 acc[ZA_ROWS][ZA_VECS];
    int lo = nc[0];
#pragma GCC unroll 4
    for (int r = 0; r < nq; r++) {
        lo = nc[r] < lo ? nc[r] : lo;
        __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
        for (int i = 0; i < nv; i++)
            acc[r][i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o[r] + d + 16 * i), al);
    }
    for (int c = 0; c < lo; c++) {
        __m512 pb[ZA_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < nq; r++)
            pb[r] = _mm512_set1_ps(p[(size_t)r * p_stride + c]);
        const float *vc = v[c] + d;
#pragma GCC unroll 4
        for (int i = 0; i < nv; i++) {
            __m512 vv = _mm512_maskz_loadu_ps(m, vc + 16 * i);
#pragma GCC unroll 4
            for (int r = 0; r < nq; r++)
                acc[r][i] = _mm512_fmadd_ps(vv, pb[r], acc[r][i]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < nq; r++) {
        for (int c = lo; c < nc[r]; c++) {
            __m512 pb = _mm512_set1_ps(p[(size_t)r * p_stride + c]);
            const float *vc = v[c] + d;
#pragma GCC unroll 4
            for (int i = 0; i < nv; i++)
                acc[r][i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, vc + 16 * i), pb, acc[r][i]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < nv; i++)
            _mm512_mask_storeu_ps(o[r] + d + 16 * i, m, acc[r][i]);
    }
}

/* The rows' d range in blocks of ZA_VECS vectors, then single vectors, then the masked tail. nq
 * is a constant at every call site. */
AI void zaccum_rows(float *const *o, const float *alpha, const float *p, int p_stride, int nq,
                    const float *const *v, const int *nc, int head_dim)
{
    int d16 = head_dim & ~15, d = 0;
    for (; d + 16 * ZA_VECS <= d16; d += 16 * ZA_VECS)
        zaccum_block(o, alpha, p, p_stride, nq, v, nc, d, ZA_VECS, 0xffff);
    for (; d < d16; d += 16)
        zaccum_block(o, alpha, p, p_stride, nq, v, nc, d, 1, 0xffff);
    if (head_dim > d16)
        zaccum_block(o, alpha, p, p_stride, nq, v, nc, d16, 1,
                     (__mmask16)((1u << (head_dim - d16)) - 1u));
}

void moe_attn_accum_avx512(float *const *o, const float *alpha, const float *p, int p_stride,
                           int nr, const float *const *v, const int *nc, int head_dim)
{
    if (nr < ZA_ROWS) {
        moe_attn_accum_avx512vl(o, alpha, p, p_stride, nr, v, nc, head_dim);
        return;
    }
    int r = 0;
    for (; r + ZA_ROWS <= nr; r += ZA_ROWS)
        zaccum_rows(o + r, alpha + r, p + (size_t)r * p_stride, p_stride, ZA_ROWS, v, nc + r,
                    head_dim);
    const float *pr = p + (size_t)r * p_stride;
    if (nr - r == 3)
        zaccum_rows(o + r, alpha + r, pr, p_stride, 3, v, nc + r, head_dim);
    else if (nr - r == 2)
        zaccum_rows(o + r, alpha + r, pr, p_stride, 2, v, nc + r, head_dim);
    else if (nr - r == 1) /* a single row: 8 chains of 8 lanes (nothing shares its loads) */
        moe_attn_accum_avx512vl(o + r, alpha + r, pr, p_stride, 1, v, nc + r, head_dim);
}

/* ---- softmax numerators ----
 * moe_attn_exp_avx2 on 16 lanes, the same bits: the max is exact in any order; each exp is the
 * same per-lane arithmetic (moe_exp_nonpos_avx512); and the sum keeps the AVX2 kernel's f32
 * order: one 8-lane accumulator that adds each 16-lane vector's low half, then its high half,
 * as the AVX2 kernel adds its consecutive 8-lane vectors, the tail's unused lanes masked to +0
 * as it does, and the same final reduction. The polynomial is most of the cost (prefill 2048
 * tokens on the Intel Xeon: 11% of the time in the AVX2 exp, bench/RESULTS.md). */
double moe_attn_exp_avx512(float *s, int nc, float m_in, float *m_out)
{
    __m512 mv = _mm512_set1_ps(m_in);
    int c = 0;
    for (; c + 16 <= nc; c += 16)
        mv = _mm512_max_ps(_mm512_loadu_ps(s + c), mv);
    if (c < nc) /* masked-off lanes keep mv: NaN scores are skipped as in the loop */
        mv = _mm512_mask_max_ps(mv, (__mmask16)((1u << (nc - c)) - 1u),
                                _mm512_maskz_loadu_ps((__mmask16)((1u << (nc - c)) - 1u), s + c),
                                mv);
    __m256 h8 = _mm256_max_ps(_mm512_castps512_ps256(mv), _mm512_extractf32x8_ps(mv, 1));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    *m_out = mx;
    __m512 m = _mm512_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    c = 0;
    for (; c + 16 <= nc; c += 16) {
        __m512 e = moe_exp_nonpos_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + c), m));
        _mm512_storeu_ps(s + c, e);
        acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
        acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
    }
    if (c < nc) {
        int n = nc - c;
        __mmask16 tm = (__mmask16)((1u << n) - 1u);
        __m512 e = moe_exp_nonpos_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, s + c), m));
        _mm512_mask_storeu_ps(s + c, tm, e);
        e = _mm512_maskz_mov_ps(tm, e); /* the lanes past n held 0 - mx */
        acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
        if (n > 8)
            acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return (double)_mm_cvtss_f32(t);
}

#else /* built without the flags: never dispatched */

void moe_attn_scores_avx512(float *s, int s_stride, const float *const *q, int nr,
                            const float *const *k, int nc, int head_dim, float scale)
{
    moe_attn_scores_scalar(s, s_stride, q, nr, k, nc, head_dim, scale);
}

void moe_attn_accum_avx512(float *const *o, const float *alpha, const float *p, int p_stride,
                           int nr, const float *const *v, const int *nc, int head_dim)
{
    moe_attn_accum_scalar(o, alpha, p, p_stride, nr, v, nc, head_dim);
}

double moe_attn_exp_avx512(float *s, int nc, float m_in, float *m_out)
{
    return moe_attn_exp_scalar(s, nc, m_in, m_out);
}

#endif
