/* Forward pass of the supported MoE decoders (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE) over a
 * flattened multi-sequence batch, with K/V written to and read from the paged cache. */
#include "worker/forward.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/forward_internal.h"

static void *xcalloc_count(size_t n, size_t size, int *failed)
{
    void *p = calloc(n ? n : 1, size);
    if (!p)
        *failed = 1;
    return p;
}

moe_status moe_forward_create(const moe_model *m, moe_threadpool_t *pool, int max_tokens,
                              int max_segs, int max_ctx, int block_size, moe_forward **out)
{
    const moe_model_config *c = &m->cfg;
    if (max_tokens <= 0 || max_segs <= 0 || max_ctx <= 0 || block_size <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "forward: bad sizes (tokens %d, segs %d, ctx %d, block %d)",
                         max_tokens, max_segs, max_ctx, block_size);
    moe_forward *f = calloc(1, sizeof *f);
    if (!f)
        return moe_error(MOE_ERR_NOMEM, "forward: out of memory");
    /* Which code each kernel runs (the choice is per kernel and per process): once per process. */
    static _Atomic int kernels_logged;
    if (!atomic_exchange(&kernels_logged, 1))
        MOE_LOG_I("kernels: %s", moe_kernels_describe());
    f->m = m;
    f->c = c;
    f->pool = pool;
    f->n_threads = pool ? moe_threadpool_size(pool) : 1;
    f->max_tokens = max_tokens;
    f->max_segs = max_segs;
    f->max_ctx = max_ctx;
    f->block_size = block_size;
    f->max_blocks = (max_ctx + block_size - 1) / block_size;
    f->d = c->hidden_size;
    f->nh = c->n_heads;
    f->nkv = c->n_kv_heads;
    f->hd = c->head_dim;
    f->qdim = f->nh * f->hd;
    f->kvdim = f->nkv * f->hd;
    f->n_exp = c->n_experts;
    f->topk = c->n_experts_per_tok > 0 ? c->n_experts_per_tok : 1;
    f->ffn_max = c->moe_ffn;
    if (c->dense_ffn > f->ffn_max)
        f->ffn_max = c->dense_ffn;
    if (c->shared_expert_ffn > f->ffn_max)
        f->ffn_max = c->shared_expert_ffn;

    size_t T = (size_t)max_tokens;
    int failed = 0;
    f->x = xcalloc_count(T * f->d, sizeof(float), &failed);
    f->xb = xcalloc_count(T * f->d, sizeof(float), &failed);
    f->q = xcalloc_count(T * f->qdim, sizeof(float), &failed);
    f->k = xcalloc_count(T * f->kvdim, sizeof(float), &failed);
    f->v = xcalloc_count(T * f->kvdim, sizeof(float), &failed);
    f->att = xcalloc_count(T * f->qdim, sizeof(float), &failed);
    f->router = xcalloc_count(T * (size_t)(f->n_exp > 0 ? f->n_exp : 1), sizeof(float), &failed);
    f->top_idx = xcalloc_count(T * f->topk, sizeof(int), &failed);
    f->top_w = xcalloc_count(T * f->topk, sizeof(float), &failed);
    f->moe_out = xcalloc_count(T * f->d, sizeof(float), &failed);
    f->sh_gate = xcalloc_count(T, sizeof(float), &failed);
    f->exp_count = xcalloc_count((size_t)f->n_exp + 1, sizeof(int), &failed);
    f->exp_off = xcalloc_count((size_t)f->n_exp + 2, sizeof(int), &failed);
    f->expert_tokens = xcalloc_count((size_t)c->n_layers * (size_t)(f->n_exp > 0 ? f->n_exp : 1),
                                     sizeof(int64_t), &failed);
    f->tok_pos = xcalloc_count(T, sizeof(int), &failed);
    f->tok_seg = xcalloc_count(T, sizeof(int), &failed);
    f->rope = xcalloc_count((size_t)max_ctx * f->hd, sizeof(float), &failed);
    size_t nptr = (size_t)max_segs * f->nkv * f->max_blocks;
    f->kptr = xcalloc_count(nptr, sizeof(float *), &failed);
    f->vptr = xcalloc_count(nptr, sizeof(float *), &failed);
    f->ep_size = 1;
    if (failed || moe_fwd_ep_alloc(f) != MOE_OK) {
        moe_forward_free(f);
        return moe_error(MOE_ERR_NOMEM, "forward: cannot allocate buffers for %d tokens", max_tokens);
    }
    moe_rope_table(f->rope, max_ctx, f->hd, c->rope_theta);
    *out = f;
    return MOE_OK;
}

void moe_forward_free(moe_forward *f)
{
    if (!f)
        return;
    void *bufs[] = {f->x, f->xb, f->q, f->k, f->v, f->att, f->router, f->top_idx, f->top_w,
                    f->moe_out, f->sh_gate, f->exp_count, f->exp_off, f->expert_tokens,
                    f->tok_pos, f->tok_seg, f->rope, (void *)f->kptr, (void *)f->vptr};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    moe_fwd_ep_free(f);
    moe_ep_placement_free(&f->place);
    free(f);
}

/* Expert-side buffers depend on the group size S: a rank may receive rows from every peer, and one
 * expert at most one row per token of each peer. */
moe_status moe_fwd_ep_alloc(moe_forward *f)
{
    moe_fwd_ep_free(f);
    size_t T = (size_t)f->max_tokens, K = (size_t)f->topk, S = (size_t)f->ep_size, d = (size_t)f->d;
    size_t rows = S * T, recv = S * T * K;
    int failed = 0;
    f->eh = xcalloc_count(rows * d, sizeof(float), &failed);
    f->eo = xcalloc_count(rows * d, sizeof(float), &failed);
    f->eg = xcalloc_count(rows * (size_t)f->ffn_max, sizeof(float), &failed);
    f->eu = xcalloc_count(rows * (size_t)f->ffn_max, sizeof(float), &failed);
    f->ep_send = xcalloc_count(T * K * (d + 1), sizeof(float), &failed);
    f->ep_send_tok = xcalloc_count(T * K, sizeof(int), &failed);
    f->ep_send_w = xcalloc_count(T * K, sizeof(float), &failed);
    f->ep_back = xcalloc_count(T * K * d, sizeof(float), &failed);
    f->ep_recv = xcalloc_count(recv * (d + 1), sizeof(float), &failed);
    f->ep_out = xcalloc_count(recv * d, sizeof(float), &failed);
    f->exp_tok = xcalloc_count(recv, sizeof(int), &failed);
    f->ep_order = xcalloc_count(recv, sizeof(int), &failed);
    f->cnt_send = xcalloc_count(S, sizeof(int), &failed);
    f->cnt_recv = xcalloc_count(S, sizeof(int), &failed);
    f->ep_cap_recv = (int)recv;
    if (failed || moe_fwd_tbo_alloc(f) != MOE_OK)
        return moe_error(MOE_ERR_NOMEM, "forward: cannot allocate expert buffers for %zu rows", recv);
    return MOE_OK;
}

void moe_fwd_ep_free(moe_forward *f)
{
    void *bufs[] = {f->eh, f->eo, f->eg, f->eu, f->ep_send, f->ep_send_tok, f->ep_send_w, f->ep_back,
                    f->ep_recv, f->ep_out, f->exp_tok, f->ep_order, f->cnt_send, f->cnt_recv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    moe_fwd_tbo_free(f);
    f->eh = f->eo = f->eg = f->eu = f->ep_send = f->ep_send_w = f->ep_back = f->ep_recv = f->ep_out = NULL;
    f->ep_send_tok = f->exp_tok = f->ep_order = NULL;
    f->cnt_send = f->cnt_recv = NULL;
}

moe_status moe_forward_set_ep(moe_forward *f, const moe_comm *comm, const moe_ep_placement *place)
{
    int rank = moe_comm_rank(comm), size = moe_comm_size(comm);
    if (place->n_ranks != size || place->n_experts != f->n_exp)
        return moe_error(MOE_ERR_INVALID_ARG, "expert parallel: placement for %d ranks / %d experts, group has %d "
                         "ranks, model %d experts", place->n_ranks, place->n_experts, size, f->n_exp);
    for (int e = 0; e < f->n_exp; e++) {
        bool held = moe_ep_placement_holds(place, rank, e);
        for (int l = 0; l < f->c->n_layers; l++)
            if (f->m->layers[l].is_moe && held && !f->m->layers[l].exp_gate[e].data)
                return moe_error(MOE_ERR_INVALID_ARG, "expert parallel: rank %d should hold expert %d but the "
                                 "model was loaded without it", rank, e);
    }
    moe_ep_placement_free(&f->place);
    moe_status st = moe_ep_placement_copy(&f->place, place);
    if (st != MOE_OK)
        return st;
    f->ep = comm;
    f->ep_rank = rank;
    f->ep_size = size;
    return moe_fwd_ep_alloc(f);
}

void moe_forward_set_ep_overlap(moe_forward *f, int mode)
{
    bool known = mode == MOE_FWD_OVERLAP_EXPERTS || mode == MOE_FWD_OVERLAP_TOKENS;
    f->ep_overlap = known ? mode : MOE_FWD_OVERLAP_OFF;
}

const int64_t *moe_forward_expert_tokens(const moe_forward *f) { return f->expert_tokens; }

const moe_comm *moe_forward_ep_comm(const moe_forward *f) { return f->ep; }

void moe_forward_set_layer_hook(moe_forward *f, void (*fn)(void *ctx, int layer), void *ctx)
{
    f->layer_hook = fn;
    f->layer_hook_ctx = ctx;
}

static void add_bias(float *y, const float *bias, int n_tok, int n)
{
    if (!bias)
        return;
    for (int t = 0; t < n_tok; t++)
        moe_axpy(y + (size_t)t * n, 1.0f, bias, n);
}

static void clamp_all(float *x, size_t n, float lim)
{
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] > lim ? lim : (x[i] < -lim ? -lim : x[i]);
}

/* ---- attention ---- */

/* Query tokens of one sequence per attention task: moe_attention_multi reads each K/V chunk once
 * for all of them (prefill: 8 queries share what 8 tasks re-read from L2/L3 before). A decode
 * sequence (one token) is a task of its own, as before. */
#define ATTN_TILE 8

typedef struct {
    moe_forward *f;
    const moe_batch *b;
    float scale;
    int group; /* query heads per kv head */
} attn_job;

static void attn_task(void *arg, int task, int thread)
{
    (void)thread;
    const attn_job *j = arg;
    moe_forward *f = j->f;
    int tile = task / f->nkv, h = task % f->nkv;
    int seg = 0;
    for (;; seg++) { /* the segment holding this tile: segments are few, tasks short */
        int n_tiles = (j->b->segs[seg].n + ATTN_TILE - 1) / ATTN_TILE;
        if (tile < n_tiles)
            break;
        tile -= n_tiles;
    }
    const moe_batch_seg *sg = &j->b->segs[seg];
    int i0 = tile * ATTN_TILE, n = sg->n - i0 < ATTN_TILE ? sg->n - i0 : ATTN_TILE;
    int t = sg->tok_begin + i0;
    size_t base = ((size_t)seg * f->nkv + h) * f->max_blocks;
    moe_kv_view view = {
        .k_base = f->kptr + base,
        .v_base = f->vptr + base,
        .block_size = f->block_size,
        .head_stride = (size_t)f->block_size * f->hd,
    };
    size_t qoff = (size_t)t * f->qdim + (size_t)h * j->group * f->hd;
    moe_attention_multi(f->att + qoff, (size_t)f->qdim, f->q + qoff, (size_t)f->qdim, &view, n,
                        f->tok_pos[t] + 1, j->group, 1, f->hd, j->scale);
}

static void attention_layer(moe_forward *f, moe_kv_cache *kv, const moe_batch *b, int layer)
{
    const moe_model_config *c = f->c;
    const moe_layer_weights *lw = &f->m->layers[layer];
    int T = b->n_tokens;

    /* q, k and v in one pool run: one synchronisation, x quantized once for Q8/Q4 */
    const moe_matmul_desc qkv[3] = {moe_fwd_desc(f->q, f->xb, &lw->wq, T),
                                    moe_fwd_desc(f->k, f->xb, &lw->wk, T),
                                    moe_fwd_desc(f->v, f->xb, &lw->wv, T)};
    moe_matmul_batch(f->pool, qkv, 3);
    add_bias(f->q, lw->bq, T, f->qdim);
    add_bias(f->k, lw->bk, T, f->kvdim);
    add_bias(f->v, lw->bv, T, f->kvdim);
    if (c->qk_norm == 1) { /* OLMoE: RMSNorm over the whole projection */
        for (int t = 0; t < T; t++) {
            moe_rmsnorm(f->q + (size_t)t * f->qdim, f->q + (size_t)t * f->qdim, lw->q_norm, f->qdim, c->rms_eps);
            moe_rmsnorm(f->k + (size_t)t * f->kvdim, f->k + (size_t)t * f->kvdim, lw->k_norm, f->kvdim, c->rms_eps);
        }
    } else if (c->qk_norm == 2) { /* Qwen3: RMSNorm per head */
        for (int i = 0; i < T * f->nh; i++)
            moe_rmsnorm(f->q + (size_t)i * f->hd, f->q + (size_t)i * f->hd, lw->q_norm, f->hd, c->rms_eps);
        for (int i = 0; i < T * f->nkv; i++)
            moe_rmsnorm(f->k + (size_t)i * f->hd, f->k + (size_t)i * f->hd, lw->k_norm, f->hd, c->rms_eps);
    }
    if (c->clip_qkv > 0) { /* OLMoE clamps after the q/k norms */
        clamp_all(f->q, (size_t)T * f->qdim, c->clip_qkv);
        clamp_all(f->k, (size_t)T * f->kvdim, c->clip_qkv);
        clamp_all(f->v, (size_t)T * f->kvdim, c->clip_qkv);
    }
    for (int t = 0; t < T; t++) {
        const float *cs = f->rope + (size_t)f->tok_pos[t] * f->hd;
        moe_rope(f->q + (size_t)t * f->qdim, f->nh, f->hd, cs);
        moe_rope(f->k + (size_t)t * f->kvdim, f->nkv, f->hd, cs);
    }

    /* Write this layer's K/V of every token into its sequence's blocks, then point the per-head
     * block tables at them: all writes land before any token of the batch attends. */
    int bs = f->block_size;
    for (int t = 0; t < T; t++) {
        const moe_kv_seq *sq = b->segs[f->tok_seg[t]].kv;
        int pos = f->tok_pos[t];
        int blk = sq->blocks[pos / bs], slot = pos % bs;
        float *kb = moe_kv_block_k(kv, blk, layer), *vb = moe_kv_block_v(kv, blk, layer);
        for (int h = 0; h < f->nkv; h++) {
            size_t off = ((size_t)h * bs + slot) * f->hd;
            memcpy(kb + off, f->k + (size_t)t * f->kvdim + (size_t)h * f->hd, sizeof(float) * f->hd);
            memcpy(vb + off, f->v + (size_t)t * f->kvdim + (size_t)h * f->hd, sizeof(float) * f->hd);
        }
    }
    for (int s = 0; s < b->n_segs; s++) {
        const moe_batch_seg *sg = &b->segs[s];
        int nblk = (sg->pos0 + sg->n + bs - 1) / bs;
        for (int h = 0; h < f->nkv; h++) {
            size_t base = ((size_t)s * f->nkv + h) * f->max_blocks;
            size_t hoff = (size_t)h * bs * f->hd;
            for (int i = 0; i < nblk; i++) {
                f->kptr[base + i] = moe_kv_block_k(kv, sg->kv->blocks[i], layer) + hoff;
                f->vptr[base + i] = moe_kv_block_v(kv, sg->kv->blocks[i], layer) + hoff;
            }
        }
    }
    attn_job job = {.f = f, .b = b, .scale = 1.0f / sqrtf((float)f->hd), .group = f->nh / f->nkv};
    int n_tiles = 0;
    for (int s = 0; s < b->n_segs; s++)
        n_tiles += (b->segs[s].n + ATTN_TILE - 1) / ATTN_TILE;
    moe_threadpool_run(f->pool, attn_task, &job, n_tiles * f->nkv);

    moe_fwd_linear(f, f->eo, f->att, &lw->wo, T);
    for (int t = 0; t < T; t++)
        moe_axpy(f->x + (size_t)t * f->d, 1.0f, f->eo + (size_t)t * f->d, f->d);
}

static void dense_layer(moe_forward *f, const moe_layer_weights *lw, int T)
{
    moe_fwd_swiglu(f, f->eo, f->xb, T, &lw->mlp_gate, &lw->mlp_up, &lw->mlp_down);
    for (int t = 0; t < T; t++)
        moe_axpy(f->x + (size_t)t * f->d, 1.0f, f->eo + (size_t)t * f->d, f->d);
}

/* ---- the whole pass ---- */

static moe_status check_batch(const moe_forward *f, const moe_batch *b)
{
    if (b->n_tokens == 0 && f->ep)
        return MOE_OK; /* an expert-parallel rank with nothing of its own still serves its experts */
    if (b->n_tokens <= 0 || b->n_tokens > f->max_tokens || b->n_segs <= 0 || b->n_segs > f->max_segs ||
        b->n_logit_rows > f->max_tokens)
        return moe_error(MOE_ERR_INVALID_ARG, "forward: batch of %d tokens / %d sequences over the limits (%d / %d)",
                         b->n_tokens, b->n_segs, f->max_tokens, f->max_segs);
    int next = 0;
    for (int s = 0; s < b->n_segs; s++) {
        const moe_batch_seg *sg = &b->segs[s];
        if (sg->tok_begin != next || sg->n <= 0 || sg->pos0 < 0 || sg->pos0 + sg->n > f->max_ctx ||
            sg->kv->n_blocks * f->block_size < sg->pos0 + sg->n)
            return moe_error(MOE_ERR_INVALID_ARG, "forward: segment %d (tokens %d+%d at position %d) is inconsistent",
                             s, sg->tok_begin, sg->n, sg->pos0);
        next += sg->n;
    }
    if (next != b->n_tokens)
        return moe_error(MOE_ERR_INVALID_ARG, "forward: segments cover %d of %d tokens", next, b->n_tokens);
    for (int t = 0; t < b->n_tokens; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= f->c->vocab_size)
            return moe_error(MOE_ERR_INVALID_ARG, "forward: token id %d outside the vocabulary (%d)",
                             b->tokens[t], f->c->vocab_size);
    return MOE_OK;
}

moe_status moe_forward_run(moe_forward *f, moe_kv_cache *kv, const moe_batch *b)
{
    moe_status st = check_batch(f, b);
    if (st != MOE_OK)
        return st;
    const moe_model *m = f->m;
    const moe_model_config *c = f->c;
    int T = b->n_tokens, d = f->d;
    size_t row_bytes = (size_t)d * (m->embed.dtype == MOE_DT_F32 ? 4 : 2);
    if (T == 0) {
        for (int l = 0; l < c->n_layers; l++)
            if (m->layers[l].is_moe && (st = moe_fwd_moe_layer(f, &m->layers[l], l, 0)) != MOE_OK)
                return st;
        return MOE_OK;
    }

    for (int s = 0; s < b->n_segs; s++)
        for (int i = 0; i < b->segs[s].n; i++) {
            int t = b->segs[s].tok_begin + i;
            f->tok_seg[t] = s;
            f->tok_pos[t] = b->segs[s].pos0 + i;
        }
    for (int t = 0; t < T; t++)
        moe_convert_to_f32(f->x + (size_t)t * d,
                           (const char *)m->embed.data + (size_t)b->tokens[t] * row_bytes,
                           m->embed.dtype, (size_t)d);

    for (int l = 0; l < c->n_layers; l++) {
        const moe_layer_weights *lw = &m->layers[l];
        for (int t = 0; t < T; t++)
            moe_rmsnorm(f->xb + (size_t)t * d, f->x + (size_t)t * d, lw->attn_norm, d, c->rms_eps);
        attention_layer(f, kv, b, l);
        if (f->layer_hook)
            f->layer_hook(f->layer_hook_ctx, l);
        for (int t = 0; t < T; t++)
            moe_rmsnorm(f->xb + (size_t)t * d, f->x + (size_t)t * d, lw->ffn_norm, d, c->rms_eps);
        if (lw->is_moe) {
            if ((st = moe_fwd_moe_layer(f, lw, l, T)) != MOE_OK)
                return st;
        } else
            dense_layer(f, lw, T);
    }

    if (b->n_logit_rows > 0) {
        for (int r = 0; r < b->n_logit_rows; r++)
            moe_rmsnorm(f->eh + (size_t)r * d, f->x + (size_t)b->logit_rows[r] * d, m->final_norm, d,
                        c->rms_eps);
        moe_fwd_linear(f, b->logits, f->eh, &m->lm_head, b->n_logit_rows);
    }
    return MOE_OK;
}
