/* moe_attention and moe_attention_multi: query tokens against a paged KV cache, all heads,
 * grouped-query. */
#include <math.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

/* Context tokens per chunk; query heads of one KV group handled together (their K/V rows are
 * shared); query heads per pass over the context (bounds the running-softmax state). 64 tokens
 * per chunk against 32: prefill attention 0.90x the time at head_dim 64 and 0.95x at 128, decode
 * 0.93-0.96x / within noise (kernels_bench 1 attn [128 16 1], bench/RESULTS.md "Issue 16,
 * attention context chunks"). */
#define ATT_CHUNK 64
#define ATT_HEADS 8
#define ATT_PASS_HEADS 64
/* Rows (query x head) per kernel call: their chunk scores (8 KiB) stay in L1 beside the chunk's
 * K/V rows. */
#define ATT_ROWS 32

void moe_attn_scores_scalar(float *s, int s_stride, const float *const *q, int nr,
                            const float *const *k, int nc, int head_dim, float scale)
{
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++)
            s[(size_t)r * s_stride + c] = moe_dot_f32_scalar(q[r], k[c], head_dim) * scale;
}

static void scale_vec(float *v, float a, int n)
{
    for (int i = 0; i < n; i++)
        v[i] *= a;
}

void moe_attn_accum_scalar(float *const *o, const float *alpha, const float *p, int p_stride,
                           int nr, const float *const *v, const int *nc, int head_dim)
{
    for (int r = 0; r < nr; r++) {
        scale_vec(o[r], alpha[r], head_dim);
        for (int c = 0; c < nc[r]; c++)
            moe_axpy_f32_scalar(o[r], p[(size_t)r * p_stride + c], v[c], head_dim);
    }
}

double moe_attn_exp_scalar(float *s, int nc, float m_in, float *m_out)
{
    float mx = m_in;
    for (int c = 0; c < nc; c++)
        mx = s[c] > mx ? s[c] : mx;
    *m_out = mx;
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

/* The shared body of moe_attention and moe_attention_multi: query i (q + i * q_stride, out + i *
 * out_stride) attends to context [0, n_ctx0 + i). Each query's arithmetic is exactly that of a
 * single query (the same chunks, the same per-row kernel arithmetic and softmax updates); the
 * queries only share the walk over the context and the kernel calls, so each K/V chunk (64 rows)
 * is loaded from L2/L3 once and each K/V vector loaded from L1 feeds several rows' FMAs. */
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
     * chunk, the heads in units of at most ATT_HEADS heads sharing one KV head; the unit's rows
     * (every query x head of the unit that reaches the chunk, at most ATT_ROWS per kernel call)
     * go to the scores and P.V kernels together. So each K/V row is read from memory once per
     * pass (GQA heads and the queries share it), and a chunk touches all the KV heads of its
     * blocks together: long contiguous runs the hardware prefetcher can follow. */
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
                /* Queries before first_q end before this chunk. */
                int first_q = j0 - n_ctx0 + 1 > 0 ? j0 - n_ctx0 + 1 : 0;
                for (int r0 = first_q * ng; r0 < n_q * ng; r0 += ATT_ROWS) {
                    int nr = n_q * ng - r0 < ATT_ROWS ? n_q * ng - r0 : ATT_ROWS;
                    const float *qp[ATT_ROWS];
                    float *op[ATT_ROWS], alpha[ATT_ROWS], s[ATT_ROWS][ATT_CHUNK];
                    int nc[ATT_ROWS];
                    for (int r = 0; r < nr; r++) {
                        int qi = (r0 + r) / ng, g = (r0 + r) % ng;
                        int n = n_ctx0 + qi - j0;
                        nc[r] = n < ATT_CHUNK ? n : ATT_CHUNK;
                        qp[r] = q + qi * q_stride + (size_t)(h0 + g) * head_dim;
                        op[r] = out + qi * out_stride + (size_t)(h0 + g) * head_dim;
                    }
                    /* Rows of shorter queries get (unused) scores up to the longest one's. */
                    ops->attn_scores(&s[0][0], ATT_CHUNK, qp, nr, krows, nc[nr - 1], head_dim,
                                     scale);
                    for (int r = 0; r < nr; r++) {
                        int qi = (r0 + r) / ng, i = h0 - hp + (r0 + r) % ng;
                        float mx;
                        double sum = ops->attn_exp(s[r], nc[r], m[qi][i], &mx);
                        alpha[r] = 1.f;
                        if (mx > m[qi][i]) {
                            /* exp(-inf) = 0 on the first chunk: o and l are still zero. */
                            alpha[r] = expf(m[qi][i] - mx);
                            l[qi][i] *= alpha[r];
                            m[qi][i] = mx;
                        }
                        l[qi][i] += sum;
                    }
                    ops->attn_accum(op, alpha, &s[0][0], ATT_CHUNK, nr, vrows, nc, head_dim);
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
