/* moe_attention: one query token against a paged KV cache, all heads, grouped-query. */
#include <math.h>

#include "kernels/cpu/kernels_internal.h"

void moe_attention(float *out, const float *q, const moe_kv_view *kv, int n_ctx, int n_head,
                   int n_kv_head, int head_dim, float scale, float *scratch)
{
    const moe_kernel_ops *ops = moe_kernels_ops();
    int group = n_head / n_kv_head;
    int bs = kv->block_size;
    for (int h = 0; h < n_head; h++) {
        int kvh = h / group;
        const float *qh = q + (size_t)h * head_dim;
        float *oh = out + (size_t)h * head_dim;
        /* Scores, max-subtracted softmax in f32 (sum in double: it is n_ctx terms of [0,1]). */
        float mx = -INFINITY;
        for (int j = 0; j < n_ctx; j++) {
            const float *k = kv->k_base[j / bs] + (size_t)kvh * kv->head_stride +
                             (size_t)(j % bs) * head_dim;
            float s = ops->dot_f32(qh, k, head_dim) * scale;
            scratch[j] = s;
            mx = s > mx ? s : mx;
        }
        double sum = 0.0;
        for (int j = 0; j < n_ctx; j++) {
            scratch[j] = expf(scratch[j] - mx);
            sum += scratch[j];
        }
        float inv = n_ctx > 0 ? (float)(1.0 / sum) : 0.f;
        for (int d = 0; d < head_dim; d++)
            oh[d] = 0.f;
        for (int j = 0; j < n_ctx; j++) {
            const float *v = kv->v_base[j / bs] + (size_t)kvh * kv->head_stride +
                             (size_t)(j % bs) * head_dim;
            moe_axpy(oh, scratch[j] * inv, v, head_dim);
        }
    }
}
