/* Mapping a loaded model's tensors into a backend's memory (worker/compute/model_map.h). */
#include "worker/compute/model_map.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The device copy: the moe_model the forward pass reads, plus what to free. */
typedef struct {
    moe_model m; /* first: the mapped model's address is this struct's */
    moe_layer_weights *layers;
    moe_weight *experts; /* 3 * n_layers * n_experts */
    void **bufs;
    size_t n_bufs, cap_bufs;
    moe_status err;
} mapped_t;

static const void *put(moe_backend *be, mapped_t *mm, const void *src, size_t bytes)
{
    if (!src || mm->err != MOE_OK)
        return NULL;
    if (mm->n_bufs == mm->cap_bufs) {
        size_t cap = mm->cap_bufs ? 2 * mm->cap_bufs : 256;
        void **nb = realloc(mm->bufs, cap * sizeof *nb);
        if (!nb) {
            mm->err = moe_error(MOE_ERR_NOMEM, "model map: buffer list of %zu", cap);
            return NULL;
        }
        mm->bufs = nb;
        mm->cap_bufs = cap;
    }
    void *dst = be->ops->alloc(be, bytes);
    if (!dst) {
        mm->err = moe_error(MOE_ERR_NOMEM, "model map: %s backend cannot hold %zu more bytes", be->name, bytes);
        return NULL;
    }
    mm->bufs[mm->n_bufs++] = dst;
    moe_status st = be->ops->upload(be, dst, src, bytes);
    if (st != MOE_OK)
        mm->err = st;
    return dst;
}

static void put_weight(moe_backend *be, mapped_t *mm, moe_weight *w)
{
    if (w->data)
        w->data = put(be, mm, w->data, moe_dtype_row_bytes(w->dtype, (size_t)w->cols) * (size_t)w->rows);
}

static const float *put_vec(moe_backend *be, mapped_t *mm, const float *v, int n)
{
    return put(be, mm, v, sizeof(float) * (size_t)n);
}

moe_status moe_model_map(moe_backend *be, const moe_model *m, const moe_model **out)
{
    if (be->host_memory) {
        *out = m;
        return MOE_OK;
    }
    const moe_model_config *c = &m->cfg;
    int L = c->n_layers, E = c->n_experts > 0 ? c->n_experts : 0;
    int d = c->hidden_size, qdim = c->n_heads * c->head_dim, kvdim = c->n_kv_heads * c->head_dim;
    mapped_t *mm = calloc(1, sizeof *mm);
    if (!mm)
        return moe_error(MOE_ERR_NOMEM, "model map: out of memory");
    mm->m = *m;
    mm->m.st = NULL;
    mm->m.owned = NULL;
    mm->layers = calloc((size_t)L, sizeof *mm->layers);
    mm->experts = calloc((size_t)3 * L * (size_t)(E ? E : 1), sizeof *mm->experts);
    if (!mm->layers || !mm->experts)
        mm->err = moe_error(MOE_ERR_NOMEM, "model map: layer tables");
    mm->m.layers = mm->layers;
    bool tied = m->lm_head.data == m->embed.data;
    put_weight(be, mm, &mm->m.embed);
    if (tied)
        mm->m.lm_head.data = mm->m.embed.data;
    else
        put_weight(be, mm, &mm->m.lm_head);
    mm->m.final_norm = put_vec(be, mm, m->final_norm, d);
    for (int l = 0; l < L && mm->err == MOE_OK; l++) {
        moe_layer_weights *w = &mm->layers[l];
        *w = m->layers[l];
        w->attn_norm = put_vec(be, mm, w->attn_norm, d);
        w->ffn_norm = put_vec(be, mm, w->ffn_norm, d);
        w->bq = put_vec(be, mm, w->bq, qdim);
        w->bk = put_vec(be, mm, w->bk, kvdim);
        w->bv = put_vec(be, mm, w->bv, kvdim);
        w->q_norm = put_vec(be, mm, w->q_norm, c->qk_norm == 1 ? qdim : c->head_dim);
        w->k_norm = put_vec(be, mm, w->k_norm, c->qk_norm == 1 ? kvdim : c->head_dim);
        moe_weight *mats[] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->router, &w->sh_gate, &w->sh_up,
                              &w->sh_down, &w->sh_expert_gate, &w->mlp_gate, &w->mlp_up, &w->mlp_down};
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++)
            put_weight(be, mm, mats[i]);
        if (w->is_moe && E > 0) {
            moe_weight *eg = mm->experts + (size_t)3 * l * E;
            memcpy(eg, m->layers[l].exp_gate, sizeof *eg * (size_t)E);
            memcpy(eg + E, m->layers[l].exp_up, sizeof *eg * (size_t)E);
            memcpy(eg + 2 * E, m->layers[l].exp_down, sizeof *eg * (size_t)E);
            for (int i = 0; i < 3 * E; i++)
                put_weight(be, mm, &eg[i]);
            w->exp_gate = eg;
            w->exp_up = eg + E;
            w->exp_down = eg + 2 * E;
        }
    }
    moe_status st = mm->err;
    if (st == MOE_OK)
        st = be->ops->synchronize(be);
    if (st != MOE_OK) {
        moe_model_unmap(be, m, &mm->m);
        return st;
    }
    *out = &mm->m;
    return MOE_OK;
}

void moe_model_unmap(moe_backend *be, const moe_model *host, const moe_model *mapped)
{
    if (!mapped || mapped == host)
        return;
    mapped_t *mm = (mapped_t *)(uintptr_t)mapped; /* moe_model_map made it: the struct's head */
    for (size_t i = 0; i < mm->n_bufs; i++)
        be->ops->free(be, mm->bufs[i]);
    free(mm->bufs);
    free(mm->layers);
    free(mm->experts);
    free(mm);
}
