/* Forward pass of the supported MoE decoders (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE) over a
 * flattened multi-sequence batch, with K/V written to and read from the paged cache. */
#include "worker/forward.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/compute/model_map.h"
#include "worker/forward_internal.h"

static void *xcalloc_count(size_t n, size_t size, int *failed)
{
    void *p = calloc(n ? n : 1, size);
    if (!p)
        *failed = 1;
    return p;
}

/* A zeroed backend buffer of n elements of size bytes. */
static void *balloc(moe_forward *f, size_t n, size_t size, int *failed)
{
    void *p = f->be->ops->alloc(f->be, n * size);
    if (!p)
        *failed = 1;
    return p;
}

static void bfree(moe_forward *f, void *p)
{
    if (p)
        f->be->ops->free(f->be, p);
}

moe_status moe_forward_create(const moe_model *m, moe_threadpool_t *pool, int max_tokens,
                              int max_segs, int max_ctx, int block_size, moe_forward **out)
{
    moe_backend *be;
    moe_status st = moe_backend_cpu_create(pool, &be);
    if (st != MOE_OK)
        return st;
    if ((st = moe_forward_create_on(m, be, max_tokens, max_segs, max_ctx, block_size, out)) != MOE_OK) {
        moe_backend_free(be);
        return st;
    }
    (*out)->be_owned = true;
    return MOE_OK;
}

moe_status moe_forward_create_on(const moe_model *m, moe_backend *be, int max_tokens, int max_segs,
                                 int max_ctx, int block_size, moe_forward **out)
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
        MOE_LOG_I("compute: %s backend: %s", be->name, be->ops->describe(be));
    f->be = be;
    f->m_host = m;
    f->c = c;
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
    f->geom = (moe_kv_geom){.n_layers = c->n_layers, .n_kv_head = f->nkv, .head_dim = f->hd,
                            .block_size = block_size};
    moe_status st = moe_model_map(be, m, &f->m);
    if (st != MOE_OK) {
        free(f);
        return st;
    }

    size_t T = (size_t)max_tokens, E = (size_t)(f->n_exp > 0 ? f->n_exp : 1), K = (size_t)f->topk;
    int failed = 0;
    f->x = balloc(f, T * f->d, sizeof(float), &failed);
    f->xb = balloc(f, T * f->d, sizeof(float), &failed);
    /* The attention output lives in xb where it fits: xb (the normed input) is dead once q, k, v
     * are projected and is next written by the FFN norm, after wo has read the attention out. */
    f->att = f->qdim <= f->d ? f->xb : balloc(f, T * f->qdim, sizeof(float), &failed);
    f->router = balloc(f, T * E, sizeof(float), &failed);
    f->top_idx = balloc(f, T * K, sizeof(int32_t), &failed);
    f->top_w = balloc(f, T * K, sizeof(float), &failed);
    f->moe_out = balloc(f, T * f->d, sizeof(float), &failed);
    f->sh_gate = balloc(f, T, sizeof(float), &failed);
    f->rope = balloc(f, (size_t)max_ctx * f->hd, sizeof(float), &failed);
    f->host_mem = !failed && be->ops->host_ptr(be, f->x) != NULL;
    if (f->host_mem) {
        f->top_idx_h = f->top_idx;
        f->top_w_h = f->top_w;
    } else {
        f->top_idx_h = xcalloc_count(T * K, sizeof(int32_t), &failed);
        f->top_w_h = xcalloc_count(T * K, sizeof(float), &failed);
    }
    f->kv_dst = xcalloc_count(T, sizeof(int), &failed);
    f->attn_segs = xcalloc_count((size_t)max_segs, sizeof(moe_attn_seg), &failed);
    f->exp_count = xcalloc_count((size_t)f->n_exp + 1, sizeof(int), &failed);
    f->exp_off = xcalloc_count((size_t)f->n_exp + 2, sizeof(int), &failed);
    f->expert_tokens = xcalloc_count((size_t)c->n_layers * E, sizeof(int64_t), &failed);
    f->tok_pos = xcalloc_count(T, sizeof(int), &failed);
    f->tok_seg = xcalloc_count(T, sizeof(int), &failed);
    float *rope_h = xcalloc_count((size_t)max_ctx * f->hd, sizeof(float), &failed);
    f->ep_size = 1;
    if (failed || moe_fwd_ep_alloc(f) != MOE_OK || moe_fwd_dev_moe_alloc(f) != MOE_OK) {
        free(rope_h);
        moe_forward_free(f);
        return moe_error(MOE_ERR_NOMEM, "forward: cannot allocate buffers for %d tokens", max_tokens);
    }
    moe_rope_table(rope_h, max_ctx, f->hd, c->rope_theta);
    st = be->ops->upload(be, f->rope, rope_h, sizeof(float) * (size_t)max_ctx * f->hd);
    free(rope_h);
    if (st == MOE_OK)
        st = be->ops->reserve(be, max_segs, f->max_blocks, f->nkv, max_tokens * f->topk);
    if (st != MOE_OK) {
        moe_forward_free(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

void moe_forward_free(moe_forward *f)
{
    if (!f)
        return;
    void *dev[] = {f->x, f->xb, f->att != f->xb ? f->att : NULL, f->router, f->top_idx, f->top_w,
                   f->moe_out, f->sh_gate, f->rope, f->logits_dev};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        bfree(f, dev[i]);
    if (!f->host_mem) {
        free(f->top_idx_h);
        free(f->top_w_h);
    }
    void *bufs[] = {f->kv_dst, f->attn_segs, f->exp_count, f->exp_off, f->expert_tokens,
                    f->tok_pos, f->tok_seg};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    moe_fwd_ep_free(f);
    moe_fwd_dev_moe_free(f);
    moe_ep_placement_free(&f->place);
    if (f->m)
        moe_model_unmap(f->be, f->m_host, f->m);
    if (f->be_owned)
        moe_backend_free(f->be);
    free(f);
}

moe_backend *moe_forward_backend(const moe_forward *f) { return f->be; }

/* Expert-side buffers depend on the group size S: a rank may receive rows from every peer, and one
 * expert at most one row per token of each peer. */
moe_status moe_fwd_ep_alloc(moe_forward *f)
{
    moe_fwd_ep_free(f);
    size_t T = (size_t)f->max_tokens, K = (size_t)f->topk, S = (size_t)f->ep_size, d = (size_t)f->d;
    size_t rows = S * T, recv = S * T * K;
    /* q, k and v live in the back buffer: it holds expert outputs only inside the MoE block, whose
     * exchanges all complete before it returns, and the projections are dead once attention has
     * read q and kv_write has copied k and v into the cache. Attention and the MoE block never
     * overlap, so the step touches one of the two sets of pages, not both (at 2048 tokens of the
     * OLMoE shape, 48 MiB less resident). Each part starts on a cache line of its own. */
    size_t line = 16; /* floats per 64-byte line */
    size_t q_len = (T * (size_t)f->qdim + line - 1) / line * line;
    size_t kv_len = (T * (size_t)f->kvdim + line - 1) / line * line;
    size_t back_len = T * K * d > q_len + 2 * kv_len ? T * K * d : q_len + 2 * kv_len;
    int failed = 0;
    if (f->ep) { /* the local path computes its experts in place in ep_back (moe_layer.c) */
        f->eh = balloc(f, rows * d, sizeof(float), &failed);
        f->eo = balloc(f, rows * d, sizeof(float), &failed);
    }
    f->eg = balloc(f, rows * (size_t)f->ffn_max, sizeof(float), &failed);
    f->eu = balloc(f, rows * (size_t)f->ffn_max, sizeof(float), &failed);
    f->ep_send = balloc(f, T * K * (d + 1), sizeof(float), &failed);
    f->ep_back = balloc(f, back_len, sizeof(float), &failed);
    if (f->ep_back) {
        f->q = f->ep_back;
        f->k = f->q + q_len;
        f->v = f->k + kv_len;
    }
    f->ep_recv = balloc(f, recv * (d + 1), sizeof(float), &failed);
    f->ep_out = balloc(f, recv * d, sizeof(float), &failed);
    if (!f->host_mem && S > 1)
        f->ep_recv_h = xcalloc_count(recv * (d + 1), sizeof(float), &failed);
    f->ep_send_tok = xcalloc_count(T * K, sizeof(int), &failed);
    f->ep_send_w = xcalloc_count(T * K, sizeof(float), &failed);
    f->pk_row = xcalloc_count(T * K, sizeof(int), &failed);
    f->pk_tag = xcalloc_count(T * K, sizeof(int32_t), &failed);
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
    void *dev[] = {f->eh, f->eo, f->eg, f->eu, f->ep_send, f->ep_back, f->ep_recv, f->ep_out};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        bfree(f, dev[i]);
    void *bufs[] = {f->ep_recv_h, f->ep_send_tok, f->ep_send_w, f->pk_row, f->pk_tag, f->exp_tok,
                    f->ep_order, f->cnt_send, f->cnt_recv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    moe_fwd_tbo_free(f);
    f->eh = f->eo = f->eg = f->eu = f->ep_send = f->ep_send_w = f->ep_back = f->ep_recv = f->ep_out = NULL;
    f->q = f->k = f->v = NULL;
    f->ep_recv_h = NULL;
    f->ep_send_tok = f->exp_tok = f->ep_order = f->pk_row = NULL;
    f->pk_tag = NULL;
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

void moe_forward_layer_hook_reads_kv(moe_forward *f, bool reads) { f->layer_hook_reads_kv = reads; }

void moe_forward_set_progress_hook(moe_forward *f, void (*fn)(void *ctx), void *ctx)
{
    f->progress_hook = fn;
    f->progress_hook_ctx = ctx;
}

static void add_bias(moe_forward *f, float *y, const float *bias, int n_tok, int n)
{
    if (bias)
        f->be->ops->add_rows(f->be, y, bias, n_tok, n);
}

/* ---- attention ---- */

static void attention_layer(moe_forward *f, moe_kv_cache *kv, const moe_batch *b, int layer)
{
    const moe_model_config *c = f->c;
    const moe_layer_weights *lw = &f->m->layers[layer];
    const moe_backend_ops *o = f->be->ops;
    moe_backend *be = f->be;
    int T = b->n_tokens;

    /* q, k and v in one batch: one synchronisation, x quantized once for Q8/Q4 */
    const moe_matmul_desc qkv[3] = {moe_fwd_desc(f->q, f->xb, &lw->wq, T),
                                    moe_fwd_desc(f->k, f->xb, &lw->wk, T),
                                    moe_fwd_desc(f->v, f->xb, &lw->wv, T)};
    o->matmul_batch(be, qkv, 3);
    add_bias(f, f->q, lw->bq, T, f->qdim);
    add_bias(f, f->k, lw->bk, T, f->kvdim);
    add_bias(f, f->v, lw->bv, T, f->kvdim);
    if (c->qk_norm == 1) { /* OLMoE: RMSNorm over the whole projection */
        o->rmsnorm(be, f->q, f->q, lw->q_norm, T, f->qdim, c->rms_eps);
        o->rmsnorm(be, f->k, f->k, lw->k_norm, T, f->kvdim, c->rms_eps);
    } else if (c->qk_norm == 2) { /* Qwen3: RMSNorm per head */
        o->rmsnorm(be, f->q, f->q, lw->q_norm, T * f->nh, f->hd, c->rms_eps);
        o->rmsnorm(be, f->k, f->k, lw->k_norm, T * f->nkv, f->hd, c->rms_eps);
    }
    if (c->clip_qkv > 0) { /* OLMoE clamps after the q/k norms */
        o->clamp(be, f->q, (size_t)T * f->qdim, c->clip_qkv);
        o->clamp(be, f->k, (size_t)T * f->kvdim, c->clip_qkv);
        o->clamp(be, f->v, (size_t)T * f->kvdim, c->clip_qkv);
    }
    o->rope(be, f->q, T, (size_t)f->qdim, f->nh, f->hd, f->tok_pos, f->rope);
    o->rope(be, f->k, T, (size_t)f->kvdim, f->nkv, f->hd, f->tok_pos, f->rope);

    /* Write this layer's K/V of every token into its sequence's blocks: all writes land before
     * any token of the batch attends. */
    float *pool = moe_kv_pool(kv);
    o->kv_write(be, pool, &f->geom, layer, f->k, f->v, f->kv_dst, T);
    o->attention(be, f->att, f->q, pool, &f->geom, layer, f->attn_segs, b->n_segs, f->nh,
                 1.0f / sqrtf((float)f->hd));

    /* moe_out is idle outside the MoE block: the local path then never touches eo */
    moe_fwd_linear(f, f->moe_out, f->att, &lw->wo, T);
    o->axpy(be, f->x, 1.0f, f->moe_out, (size_t)T * f->d);
}

static void dense_layer(moe_forward *f, const moe_layer_weights *lw, int T)
{
    moe_fwd_swiglu(f, f->moe_out, f->xb, T, &lw->mlp_gate, &lw->mlp_up, &lw->mlp_down);
    f->be->ops->axpy(f->be, f->x, 1.0f, f->moe_out, (size_t)T * f->d);
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
    moe_backend *be = f->be;
    const moe_backend_ops *o = be->ops;
    int T = b->n_tokens, d = f->d;
    if (T == 0) {
        for (int l = 0; l < c->n_layers; l++)
            if (m->layers[l].is_moe && (st = moe_fwd_moe_layer(f, &m->layers[l], l, 0)) != MOE_OK)
                return st;
        return o->synchronize(be);
    }

    /* Host metadata of the step: positions, K/V slots and the attention segments. */
    int bs = f->block_size;
    for (int s = 0; s < b->n_segs; s++) {
        const moe_batch_seg *sg = &b->segs[s];
        f->attn_segs[s] = (moe_attn_seg){.blocks = sg->kv->blocks, .pos0 = sg->pos0,
                                         .tok_begin = sg->tok_begin, .n = sg->n};
        for (int i = 0; i < sg->n; i++) {
            int t = sg->tok_begin + i, pos = sg->pos0 + i;
            f->tok_seg[t] = s;
            f->tok_pos[t] = pos;
            f->kv_dst[t] = sg->kv->blocks[pos / bs] * bs + pos % bs;
        }
    }
    o->embed(be, f->x, m->embed.data, m->embed.dtype, b->tokens, T, d);

    for (int l = 0; l < c->n_layers; l++) {
        const moe_layer_weights *lw = &m->layers[l];
        o->rmsnorm(be, f->xb, f->x, lw->attn_norm, T, d, c->rms_eps);
        attention_layer(f, kv, b, l);
        if (f->layer_hook) {
            /* a hook that reads this layer's K/V from the cache needs it landed */
            if (f->layer_hook_reads_kv && (st = o->synchronize(be)) != MOE_OK)
                return st;
            f->layer_hook(f->layer_hook_ctx, l);
        }
        o->rmsnorm(be, f->xb, f->x, lw->ffn_norm, T, d, c->rms_eps);
        if (lw->is_moe) {
            if ((st = moe_fwd_moe_layer(f, lw, l, T)) != MOE_OK)
                return st;
        } else
            dense_layer(f, lw, T);
        if (f->progress_hook)
            f->progress_hook(f->progress_hook_ctx);
    }

    if (b->n_logit_rows > 0) {
        int n = b->n_logit_rows;
        size_t vocab = (size_t)c->vocab_size;
        float *rows = f->moe_out; /* the final-norm rows: n <= max_tokens, moe_out is free */
        o->gather(be, rows, (size_t)d, f->x, (size_t)d, b->logit_rows, n, d);
        o->rmsnorm(be, rows, rows, m->final_norm, n, d, c->rms_eps);
        if (f->host_mem) {
            moe_fwd_linear(f, b->logits, rows, &m->lm_head, n);
        } else {
            if (!f->logits_dev &&
                !(f->logits_dev = o->alloc(be, sizeof(float) * (size_t)f->max_tokens * vocab)))
                return moe_error(MOE_ERR_NOMEM, "forward: %s backend cannot hold logits of %d rows",
                                 be->name, f->max_tokens);
            moe_fwd_linear(f, f->logits_dev, rows, &m->lm_head, n);
            st = o->download(be, b->logits, f->logits_dev, sizeof(float) * (size_t)n * vocab);
            return st != MOE_OK ? st : moe_fwd_dev_moe_step_end(f);
        }
    }
    st = o->synchronize(be);
    return st != MOE_OK ? st : moe_fwd_dev_moe_step_end(f);
}
