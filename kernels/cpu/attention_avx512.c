/* The attention scores and P.V chunk kernels of attention_simd.h compiled with the AVX-512 flags:
 * the same 8-lane instructions (so the same bits as attention_avx2.c), but AVX-512VL's 32 vector
 * registers hold bigger register blocks, so each loaded q, k and v vector feeds more FMAs
 * (dispatch-guarded). */
#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX512F__) && defined(__AVX512VL__)
#define ATT_FN(name) name##_avx512
#define ATT_SQ 4 /* 4 x 4 dots: 16 accumulators, 4 q and 1 k live */
#define ATT_AQ 4 /* 4 rows x 4 vectors: 16 accumulators, 4 broadcasts and 1 v live */
#define ATT_AW 4
#include "kernels/cpu/attention_simd.h"

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

#endif
