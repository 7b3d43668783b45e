/* moe_attention and moe_attention_multi: query tokens against a paged KV cache, all heads,
 * grouped-query. */
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

double moe_attn_exp_scalar(float *s, int nc, float mx)
{
    double l = 0.0;
    for (int c = 0; c < nc; c++) {
        s[c] = expf(s[c] - mx);
        l += s[c];
    }
    return l;
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

/* The shared body of moe_attention and moe_attention_multi: query i (q + i * q_stride, out + i *
 * out_stride) attends to context [0, n_ctx0 + i). Each query's arithmetic is exactly that of a
 * single query (the same chunks, the same kernel calls per head, the same softmax updates); the
 * queries only share the walk over the context, so each K/V chunk (32 rows) is loaded from L2/L3
 * once and reused from L1 by all of them. */
static void attention_q(float *out, size_t out_stride, const float *q, size_t q_stride,
                        const moe_kv_view *kv, int n_q, int n_ctx0, int n_head, int n_kv_head,
                        int head_dim, float scale)
{
    /* One pass with a running max (online softmax, as flash-attention): per head keep m (max
     * score so far), l (sum of exp(s - m), in double) and o (sum of exp(s - m) * v); when m
     * grows, l and o are rescaled by exp(m_old - m_new). Every exponent is <= 0, so nothing
     * overflows; the result is o / l. The scores of a chunk live on the stack.
     *
     * Loop order: up to ATT_PASS_HEADS query heads per pass; the context in chunks; inside a
     * chunk, the heads in units of at most ATT_HEADS heads sharing one KV head, then the queries.
     * So each K/V row is read from memory once per pass (GQA heads and the queries share it), and
     * a chunk touches all the KV heads of its blocks together: long contiguous runs the hardware
     * prefetcher can follow. */
    const moe_kernel_ops *ops = moe_kernels_ops();
    int group = n_head / n_kv_head;
    int n_ctx_max = n_ctx0 + n_q - 1;
    for (int hp = 0; hp < n_head; hp += ATT_PASS_HEADS) {
        int hp_end = n_head - hp < ATT_PASS_HEADS ? n_head : hp + ATT_PASS_HEADS;
        float m[MOE_ATTN_MAX_Q][ATT_PASS_HEADS];
        double l[MOE_ATTN_MAX_Q][ATT_PASS_HEADS];
        for (int qi = 0; qi < n_q; qi++)
            for (int h = hp; h < hp_end; h++) {
                m[qi][h - hp] = -INFINITY;
                l[qi][h - hp] = 0.0;
                memset(out + qi * out_stride + (size_t)h * head_dim, 0,
                       (size_t)head_dim * sizeof(float));
            }
        for (int j0 = 0; j0 < n_ctx_max; j0 += ATT_CHUNK) {
            int nc_max = n_ctx_max - j0 < ATT_CHUNK ? n_ctx_max - j0 : ATT_CHUNK;
            for (int h0 = hp; h0 < hp_end;) {
                int kvh = h0 / group;
                int ng = (kvh + 1) * group - h0;
                ng = ng < ATT_HEADS ? ng : ATT_HEADS;
                ng = ng < hp_end - h0 ? ng : hp_end - h0;
                const float *krows[ATT_CHUNK], *vrows[ATT_CHUNK];
                for (int c = 0; c < nc_max; c++) {
                    krows[c] = kv_row(kv->k_base, kv, kvh, j0 + c, head_dim);
                    vrows[c] = kv_row(kv->v_base, kv, kvh, j0 + c, head_dim);
                }
                for (int qi = 0; qi < n_q; qi++) {
                    int n_ctx = n_ctx0 + qi;
                    if (j0 >= n_ctx)
                        continue;
                    int nc = n_ctx - j0 < ATT_CHUNK ? n_ctx - j0 : ATT_CHUNK;
                    float *o = out + qi * out_stride;
                    float s[ATT_HEADS][ATT_CHUNK];
                    ops->attn_scores(&s[0][0], ATT_CHUNK, q + qi * q_stride + (size_t)h0 * head_dim,
                                     ng, krows, nc, head_dim, scale);
                    for (int g = 0; g < ng; g++) {
                        int i = h0 - hp + g;
                        float mx = m[qi][i];
                        for (int c = 0; c < nc; c++)
                            mx = s[g][c] > mx ? s[g][c] : mx;
                        if (mx > m[qi][i]) {
                            /* exp(-inf) = 0 on the first chunk: o and l are still zero. */
                            float alpha = expf(m[qi][i] - mx);
                            l[qi][i] *= alpha;
                            if (j0 > 0)
                                scale_vec(o + (size_t)(h0 + g) * head_dim, alpha, head_dim);
                            m[qi][i] = mx;
                        }
                        l[qi][i] += ops->attn_exp(s[g], nc, mx);
                    }
                    ops->attn_accum(o + (size_t)h0 * head_dim, &s[0][0], ATT_CHUNK, ng, vrows, nc,
                                    head_dim);
                }
                h0 += ng;
            }
        }
        for (int qi = 0; qi < n_q; qi++)
            for (int h = hp; h < hp_end; h++)
                scale_vec(out + qi * out_stride + (size_t)h * head_dim,
                          l[qi][h - hp] > 0 ? (float)(1.0 / l[qi][h - hp]) : 0.f, head_dim);
    }
}

void moe_attention(float *out, const float *q, const moe_kv_view *kv, int n_ctx, int n_head,
                   int n_kv_head, int head_dim, float scale, float *scratch)
{
    /* `scratch` is not needed (the chunk's scores live on the stack); kept for the contract. */
    (void)scratch;
    attention_q(out, 0, q, 0, kv, 1, n_ctx, n_head, n_kv_head, head_dim, scale);
}

void moe_attention_multi(float *out, size_t out_stride, const float *q, size_t q_stride,
                         const moe_kv_view *kv, int n_q, int n_ctx0, int n_head, int n_kv_head,
                         int head_dim, float scale)
{
    MOE_KASSERT(n_q >= 0 && n_q <= MOE_ATTN_MAX_Q && n_ctx0 >= 0);
    if (n_q > 0)
        attention_q(out, out_stride, q, q_stride, kv, n_q, n_ctx0, n_head, n_kv_head, head_dim,
                    scale);
}
