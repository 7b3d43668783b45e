/* moe_attention: one query token against a paged KV cache, all heads, grouped-query. */
#include <math.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

/* Context tokens per chunk; query heads of one KV group handled together (their K/V rows are
 * shared); query heads per pass over the context (bounds the running-softmax state). */
#define ATT_CHUNK 32
#define ATT_HEADS 8
#define ATT_PASS_HEADS 64

void moe_attn_scores_scalar(float *s, int s_stride, const float *q, int ng, const float *const *k,
                            int nc, int head_dim, float scale)
{
    for (int g = 0; g < ng; g++)
        for (int c = 0; c < nc; c++)
            s[(size_t)g * s_stride + c] =
                moe_dot_f32_scalar(q + (size_t)g * head_dim, k[c], head_dim) * scale;
}

void moe_attn_accum_scalar(float *o, const float *p, int p_stride, int ng, const float *const *v,
                           int nc, int head_dim)
{
    for (int g = 0; g < ng; g++)
        for (int c = 0; c < nc; c++)
            moe_axpy_f32_scalar(o + (size_t)g * head_dim, p[(size_t)g * p_stride + c], v[c],
                                head_dim);
}

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
     * not needed (kept in the signature for the contract).
     *
     * Loop order: up to ATT_PASS_HEADS query heads per pass; the context in chunks; inside a
     * chunk, the heads in units of at most ATT_HEADS heads sharing one KV head. So each K/V row
     * is read from memory once per pass (GQA heads share it), and a chunk touches all the KV
     * heads of its blocks together: long contiguous runs the hardware prefetcher can follow. */
    (void)scratch;
    const moe_kernel_ops *ops = moe_kernels_ops();
    int group = n_head / n_kv_head;
    for (int hp = 0; hp < n_head; hp += ATT_PASS_HEADS) {
        int hp_end = n_head - hp < ATT_PASS_HEADS ? n_head : hp + ATT_PASS_HEADS;
        float m[ATT_PASS_HEADS];
        double l[ATT_PASS_HEADS];
        for (int h = hp; h < hp_end; h++) {
            m[h - hp] = -INFINITY;
            l[h - hp] = 0.0;
            memset(out + (size_t)h * head_dim, 0, (size_t)head_dim * sizeof(float));
        }
        for (int j0 = 0; j0 < n_ctx; j0 += ATT_CHUNK) {
            int nc = n_ctx - j0 < ATT_CHUNK ? n_ctx - j0 : ATT_CHUNK;
            for (int h0 = hp; h0 < hp_end;) {
                int kvh = h0 / group;
                int ng = (kvh + 1) * group - h0;
                ng = ng < ATT_HEADS ? ng : ATT_HEADS;
                ng = ng < hp_end - h0 ? ng : hp_end - h0;
                float s[ATT_HEADS][ATT_CHUNK];
                const float *rows[ATT_CHUNK];
                for (int c = 0; c < nc; c++)
                    rows[c] = kv_row(kv->k_base, kv, kvh, j0 + c, head_dim);
                ops->attn_scores(&s[0][0], ATT_CHUNK, q + (size_t)h0 * head_dim, ng, rows, nc,
                                 head_dim, scale);
                for (int g = 0; g < ng; g++) {
                    int i = h0 - hp + g;
                    float mx = m[i];
                    for (int c = 0; c < nc; c++)
                        mx = s[g][c] > mx ? s[g][c] : mx;
                    if (mx > m[i]) {
                        /* exp(-inf) = 0 on the first chunk: o and l are still zero. */
                        float alpha = expf(m[i] - mx);
                        l[i] *= alpha;
                        if (j0 > 0)
                            scale_vec(out + (size_t)(h0 + g) * head_dim, alpha, head_dim);
                        m[i] = mx;
                    }
                    for (int c = 0; c < nc; c++) {
                        s[g][c] = expf(s[g][c] - mx);
                        l[i] += s[g][c];
                    }
                }
                for (int c = 0; c < nc; c++)
                    rows[c] = kv_row(kv->v_base, kv, kvh, j0 + c, head_dim);
                ops->attn_accum(out + (size_t)h0 * head_dim, &s[0][0], ATT_CHUNK, ng, rows, nc,
                                head_dim);
                h0 += ng;
            }
        }
        for (int h = hp; h < hp_end; h++)
            scale_vec(out + (size_t)h * head_dim, l[h - hp] > 0 ? (float)(1.0 / l[h - hp]) : 0.f,
                      head_dim);
    }
}
