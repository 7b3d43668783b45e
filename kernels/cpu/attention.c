/* moe_attention: one query token against a paged KV cache, all heads, grouped-query. */
#include <math.h>

#include "kernels/cpu/kernels_internal.h"

/* Context tokens per pass, and query heads of one KV group handled together: each K and V row
 * is read from memory once for all the group's heads (GQA), not once per query head. */
#define ATT_CHUNK 64
#define ATT_HEADS 8

static inline const float *kv_row(const float *const *base, const moe_kv_view *kv, int kvh, int j,
                                  int head_dim)
{
    return base[j / kv->block_size] + (size_t)kvh * kv->head_stride +
           (size_t)(j % kv->block_size) * head_dim;
}

static void scale_vec(float *v, float a, int n)
{
    for (int i = 0; i < n; i++)
        v[i] *= a;
}

void moe_attention(float *out, const float *q, const moe_kv_view *kv, int n_ctx, int n_head,
                   int n_kv_head, int head_dim, float scale, float *scratch)
{
    /* One pass with a running max (online softmax, as flash-attention): per head keep m (max
     * score so far), l (sum of exp(s - m), in double) and o (sum of exp(s - m) * v); when m
     * grows, l and o are rescaled by exp(m_old - m_new). Every exponent is <= 0, so nothing
     * overflows; the result is o / l. The scores of a chunk live on the stack, so `scratch` is
     * not needed (kept in the signature for the contract). */
    (void)scratch;
    const moe_kernel_ops *ops = moe_kernels_ops();
    int group = n_head / n_kv_head;
    for (int kvh = 0; kvh < n_kv_head; kvh++) {
        for (int g0 = 0; g0 < group; g0 += ATT_HEADS) {
            int ng = group - g0 < ATT_HEADS ? group - g0 : ATT_HEADS;
            int h0 = kvh * group + g0;
            float m[ATT_HEADS];
            double l[ATT_HEADS];
            float s[ATT_HEADS][ATT_CHUNK];
            for (int g = 0; g < ng; g++) {
                m[g] = -INFINITY;
                l[g] = 0.0;
                float *o = out + (size_t)(h0 + g) * head_dim;
                for (int d = 0; d < head_dim; d++)
                    o[d] = 0.f;
            }
            for (int j0 = 0; j0 < n_ctx; j0 += ATT_CHUNK) {
                int nc = n_ctx - j0 < ATT_CHUNK ? n_ctx - j0 : ATT_CHUNK;
                for (int c = 0; c < nc; c++) {
                    const float *k = kv_row(kv->k_base, kv, kvh, j0 + c, head_dim);
                    for (int g = 0; g < ng; g++)
                        s[g][c] = ops->dot_f32(q + (size_t)(h0 + g) * head_dim, k, head_dim) *
                                  scale;
                }
                for (int g = 0; g < ng; g++) {
                    float mx = m[g];
                    for (int c = 0; c < nc; c++)
                        mx = s[g][c] > mx ? s[g][c] : mx;
                    if (mx > m[g]) {
                        /* exp(-inf) = 0 on the first chunk: o and l are still zero. */
                        float alpha = expf(m[g] - mx);
                        l[g] *= alpha;
                        if (j0 > 0)
                            scale_vec(out + (size_t)(h0 + g) * head_dim, alpha, head_dim);
                        m[g] = mx;
                    }
                    for (int c = 0; c < nc; c++) {
                        s[g][c] = expf(s[g][c] - mx);
                        l[g] += s[g][c];
                    }
                }
                for (int c = 0; c < nc; c++) {
                    const float *v = kv_row(kv->v_base, kv, kvh, j0 + c, head_dim);
                    for (int g = 0; g < ng; g++)
                        ops->axpy_f32(out + (size_t)(h0 + g) * head_dim, s[g][c], v, head_dim);
                }
            }
            for (int g = 0; g < ng; g++)
                scale_vec(out + (size_t)(h0 + g) * head_dim, l[g] > 0 ? (float)(1.0 / l[g]) : 0.f,
                          head_dim);
        }
    }
}
