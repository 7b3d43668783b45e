/* Model loading: binds every weight of the config's architecture by its Hugging Face name and
 * checks presence, shape and dtype before anything runs. Matrices stay zero-copy in the mmaps,
 * except those quantized at load (quantize_experts, quantize_dense). */
#include "worker/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "worker/kv_transfer.h" /* moe_kv_checksum: the checksum of pre-quantized tensors */

/* Behind moe_model.owned: the f32 copies of vectors, the quantized experts, and what this rank
 * binds. */
typedef struct {
    float **bufs;
    int n, cap;
    void **qbufs; /* quantized matrices (experts and dense) */
    int n_q;
    bool experts_quantized; /* some routed expert was quantized at load */
    bool keep_source;       /* opts.keep_source_pages: never release mmap pages */
    size_t weight_bytes;
    /* Every bound matrix by tensor name (moe_model_matrix), in bind order. */
    const char **mat_name;
    moe_weight **mat;
    int n_mat, cap_mat, cap_mat2;
    const moe_st_tensor **pre_q; /* tensors the files hold in Q8/Q4, checked by verify_prequant */
    int n_pre_q, cap_pre_q;
} model_owned;

typedef struct {
    moe_model *m;
    model_owned *own;
    const char *dir;
    char name[256]; /* the tensor name being bound */
    bool name_is_router; /* the matrix being bound must stay in a float dtype */
} binder;

static const char *dtype_str(moe_dtype dt)
{
    const char *tag = moe_st_dtype_tag(dt);
    return tag ? tag : "?";
}

/* Appends to one of model_owned's pointer arrays. Returns 0, or -1 when out of memory. */
static int grow_ptrs(void *pp, int *cap, int need)
{
    if (need <= *cap)
        return 0;
    int c = *cap ? *cap * 2 : 64;
    void **old;
    memcpy(&old, pp, sizeof old);
    void **q = realloc(old, (size_t)c * sizeof *q);
    if (!q)
        return -1;
    memcpy(pp, &q, sizeof q);
    *cap = c;
    return 0;
}

static void shape_str(const moe_st_tensor *t, char *buf, size_t n)
{
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < t->n_dims && k < n; d++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (k < n)
        snprintf(buf + k, n - k, "]");
}

/* Looks the tensor up and checks its shape: dims[0..n_dims). */
static moe_status find_checked(binder *b, int n_dims, const int64_t *dims,
                               const moe_st_tensor **out, bool matrix)
{
    const moe_st_tensor *t = moe_st_find(b->m->st, b->name);
    char want[96];
    size_t k = (size_t)snprintf(want, sizeof want, "[");
    for (int d = 0; d < n_dims; d++)
        k += (size_t)snprintf(want + k, sizeof want - k, "%s%lld", d ? ", " : "",
                              (long long)dims[d]);
    snprintf(want + k, sizeof want - k, "]");
    if (!t)
        return moe_error(MOE_ERR_NOT_FOUND, "%s: tensor %s is missing (expected shape %s, %s)",
                         b->dir, b->name, want, moe_arch_name(b->m->cfg.arch));
    bool ok = t->n_dims == n_dims;
    for (int d = 0; ok && d < n_dims; d++)
        ok = t->shape[d] == dims[d];
    if (!ok) {
        char got[96];
        shape_str(t, got, sizeof got);
        return moe_error(MOE_ERR_FORMAT, "%s: tensor %s has shape %s, expected %s", t->file,
                         b->name, got, want);
    }
    /* Q8/Q4 only for matrices of a pre-quantized model (checked in verify_prequant); vectors
     * are converted to f32 and the kernels take only float sources for them. */
    bool q = t->dtype == MOE_DT_Q8 || t->dtype == MOE_DT_Q4;
    if (q && !matrix)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: tensor %s has dtype %s, expected F32, BF16 or F16 (only matrices "
                         "can be quantized)",
                         t->file, b->name, dtype_str(t->dtype));
    if (!q && t->dtype != MOE_DT_F32 && t->dtype != MOE_DT_BF16 && t->dtype != MOE_DT_F16)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: tensor %s has dtype %s, expected F32, BF16 or F16", t->file, b->name,
                         dtype_str(t->dtype));
    if (q && b->name_is_router)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: tensor %s has dtype %s: the embedding, the router and the shared "
                         "expert gate are never quantized (moe-quantize keeps them)",
                         t->file, b->name, dtype_str(t->dtype));
    *out = t;
    return MOE_OK;
}

/* A (rows, cols) matrix, zero-copy in its file dtype (the kernels take F32, BF16 and F16). */
static moe_status bind_matrix(binder *b, int rows, int cols, moe_weight *w)
{
    const int64_t dims[2] = {rows, cols};
    const moe_st_tensor *t;
    moe_status s = find_checked(b, 2, dims, &t, true);
    if (s != MOE_OK)
        return s;
    model_owned *o = b->own;
    bool q = t->dtype == MOE_DT_Q8 || t->dtype == MOE_DT_Q4;
    if (grow_ptrs(&o->mat_name, &o->cap_mat, o->n_mat + 1) ||
        grow_ptrs(&o->mat, &o->cap_mat2, o->n_mat + 1) ||
        (q && grow_ptrs(&o->pre_q, &o->cap_pre_q, o->n_pre_q + 1)))
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory binding tensor %s", t->file, b->name);
    o->mat_name[o->n_mat] = t->name;
    o->mat[o->n_mat++] = w;
    if (q)
        o->pre_q[o->n_pre_q++] = t;
    w->data = t->data;
    w->dtype = t->dtype;
    w->rows = rows;
    w->cols = cols;
    o->weight_bytes += t->n_bytes;
    return MOE_OK;
}

/* A matrix that must stay in a float dtype: the embedding (rows are gathered), the router and the
 * shared-expert gate (they choose and weigh experts). */
static moe_status bind_float_matrix(binder *b, int rows, int cols, moe_weight *w)
{
    b->name_is_router = true;
    moe_status s = bind_matrix(b, rows, cols, w);
    b->name_is_router = false;
    return s;
}

/* A 1-D vector (norm weight, bias), converted into an owned f32 buffer: they are tiny and the
 * elementwise kernels take f32 only. */
static moe_status bind_vector(binder *b, int n, const float **out)
{
    const int64_t dims[1] = {n};
    const moe_st_tensor *t;
    moe_status s = find_checked(b, 1, dims, &t, false);
    if (s != MOE_OK)
        return s;
    model_owned *o = b->own;
    if (o->n == o->cap) {
        int cap = o->cap ? o->cap * 2 : 64;
        float **nb = realloc(o->bufs, (size_t)cap * sizeof *nb);
        if (!nb)
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory converting tensor %s", t->file,
                             b->name);
        o->bufs = nb;
        o->cap = cap;
    }
    float *v = malloc((size_t)n * sizeof *v);
    if (!v)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory converting tensor %s", t->file, b->name);
    moe_convert_to_f32(v, t->data, t->dtype, (size_t)n);
    if (!o->keep_source) /* copied: the file's pages of it are not read again */
        moe_st_release(b->m->st, t->data, t->n_bytes);
    o->bufs[o->n++] = v;
    o->weight_bytes += t->n_bytes;
    *out = v;
    return MOE_OK;
}

#define NAME(b, ...) snprintf((b)->name, sizeof(b)->name, __VA_ARGS__)

static moe_status bind_attention(binder *b, int l, moe_layer_weights *lw)
{
    const moe_model_config *c = &b->m->cfg;
    const int d = c->hidden_size, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    moe_status s;
    NAME(b, "model.layers.%d.input_layernorm.weight", l);
    if ((s = bind_vector(b, d, &lw->attn_norm)) != MOE_OK)
        return s;
    NAME(b, "model.layers.%d.post_attention_layernorm.weight", l);
    if ((s = bind_vector(b, d, &lw->ffn_norm)) != MOE_OK)
        return s;
    static const char *const proj[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    moe_weight *w[4] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo};
    const int rows[4] = {qd, kvd, kvd, d}, cols[4] = {d, d, d, qd};
    for (int i = 0; i < 4; i++) {
        NAME(b, "model.layers.%d.self_attn.%s.weight", l, proj[i]);
        if ((s = bind_matrix(b, rows[i], cols[i], w[i])) != MOE_OK)
            return s;
    }
    if (c->attn_bias) {
        const float **bias[3] = {&lw->bq, &lw->bk, &lw->bv};
        for (int i = 0; i < 3; i++) {
            NAME(b, "model.layers.%d.self_attn.%s.bias", l, proj[i]);
            if ((s = bind_vector(b, rows[i], bias[i])) != MOE_OK)
                return s;
        }
    }
    if (c->qk_norm) {
        /* OLMoE normalises the whole projection, Qwen3-MoE each head. */
        int qn = c->qk_norm == 1 ? qd : c->head_dim, kn = c->qk_norm == 1 ? kvd : c->head_dim;
        NAME(b, "model.layers.%d.self_attn.q_norm.weight", l);
        if ((s = bind_vector(b, qn, &lw->q_norm)) != MOE_OK)
            return s;
        NAME(b, "model.layers.%d.self_attn.k_norm.weight", l);
        if ((s = bind_vector(b, kn, &lw->k_norm)) != MOE_OK)
            return s;
    }
    return MOE_OK;
}

/* gate/up (ffn, d) and down (d, ffn) under prefix `pre` with the given leaf names. */
static moe_status bind_swiglu(binder *b, const char *pre, const char *const leaf[3], int ffn,
                              moe_weight *gate, moe_weight *up, moe_weight *down)
{
    const int d = b->m->cfg.hidden_size;
    moe_status s;
    NAME(b, "%s.%s.weight", pre, leaf[0]);
    if ((s = bind_matrix(b, ffn, d, gate)) != MOE_OK)
        return s;
    NAME(b, "%s.%s.weight", pre, leaf[1]);
    if ((s = bind_matrix(b, ffn, d, up)) != MOE_OK)
        return s;
    NAME(b, "%s.%s.weight", pre, leaf[2]);
    return bind_matrix(b, d, ffn, down);
}

static moe_status bind_expert(binder *b, int l, int e)
{
    static const char *const hf_leaf[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const mixtral_leaf[3] = {"w1", "w3", "w2"}; /* w1 gate, w3 up, w2 down */
    const moe_model_config *c = &b->m->cfg;
    const bool mixtral = c->arch == MOE_ARCH_MIXTRAL;
    moe_layer_weights *lw = &b->m->layers[l];
    char pre[128];
    snprintf(pre, sizeof pre, "model.layers.%d.%s.experts.%d", l, mixtral ? "block_sparse_moe" : "mlp", e);
    return bind_swiglu(b, pre, mixtral ? mixtral_leaf : hf_leaf, c->moe_ffn, &lw->exp_gate[e], &lw->exp_up[e],
                       &lw->exp_down[e]);
}

static moe_status bind_ffn(binder *b, int l, moe_layer_weights *lw)
{
    const moe_model_config *c = &b->m->cfg;
    const int d = c->hidden_size;
    static const char *const hf_leaf[3] = {"gate_proj", "up_proj", "down_proj"};
    char pre[128];
    moe_status s;
    lw->is_moe = c->layer_is_moe[l];
    if (!lw->is_moe) {
        snprintf(pre, sizeof pre, "model.layers.%d.mlp", l);
        return bind_swiglu(b, pre, hf_leaf, c->dense_ffn, &lw->mlp_gate, &lw->mlp_up,
                           &lw->mlp_down);
    }
    const bool mixtral = c->arch == MOE_ARCH_MIXTRAL;
    const char *block = mixtral ? "block_sparse_moe" : "mlp";
    NAME(b, "model.layers.%d.%s.gate.weight", l, block);
    if ((s = bind_float_matrix(b, c->n_experts, d, &lw->router)) != MOE_OK)
        return s;
    /* Arrays span all experts so the engine indexes them by global id; only this rank's range is
     * bound, the rest stay NULL and their tensors are never looked at. */
    size_t n = (size_t)c->n_experts;
    lw->exp_gate = calloc(3 * n, sizeof(moe_weight));
    if (!lw->exp_gate)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory for %d experts", b->dir, c->n_experts);
    lw->exp_up = lw->exp_gate + n;
    lw->exp_down = lw->exp_gate + 2 * n;
    for (int e = b->m->expert_begin; e < b->m->expert_end; e++)
        if (b->m->expert_bound[e] && (s = bind_expert(b, l, e)) != MOE_OK)
            return s;
    if (c->shared_expert_ffn > 0) {
        snprintf(pre, sizeof pre, "model.layers.%d.mlp.shared_expert", l);
        s = bind_swiglu(b, pre, hf_leaf, c->shared_expert_ffn, &lw->sh_gate, &lw->sh_up,
                        &lw->sh_down);
        if (s != MOE_OK)
            return s;
        NAME(b, "model.layers.%d.mlp.shared_expert_gate.weight", l);
        if ((s = bind_float_matrix(b, 1, d, &lw->sh_expert_gate)) != MOE_OK)
            return s;
    }
    return MOE_OK;
}

static moe_status bind_all(binder *b)
{
    moe_model *m = b->m;
    const moe_model_config *c = &m->cfg;
    moe_status s;
    NAME(b, "model.embed_tokens.weight");
    if ((s = bind_float_matrix(b, c->vocab_size, c->hidden_size, &m->embed)) != MOE_OK)
        return s;
    NAME(b, "model.norm.weight");
    if ((s = bind_vector(b, c->hidden_size, &m->final_norm)) != MOE_OK)
        return s;
    const moe_st_tensor *lm = moe_st_find(m->st, "lm_head.weight");
    if (c->tie_embeddings && lm && (lm->dtype == MOE_DT_Q8 || lm->dtype == MOE_DT_Q4)) {
        /* A pre-quantized tied model: moe-quantize wrote lm_head's own quantized copy (as the
         * load-time quantizer makes one); the embedding keeps the float rows for lookups. */
        NAME(b, "lm_head.weight");
        if ((s = bind_matrix(b, c->vocab_size, c->hidden_size, &m->lm_head)) != MOE_OK)
            return s;
    } else if (c->tie_embeddings) {
        m->lm_head = m->embed; /* same bytes: counted once */
        if (lm)
            MOE_LOG_W("%s: lm_head.weight is present but tie_word_embeddings is true; using "
                      "model.embed_tokens.weight as transformers does",
                      b->dir);
    } else {
        NAME(b, "lm_head.weight");
        if ((s = bind_matrix(b, c->vocab_size, c->hidden_size, &m->lm_head)) != MOE_OK)
            return s;
    }
    for (int l = 0; l < c->n_layers; l++) {
        if ((s = bind_attention(b, l, &m->layers[l])) != MOE_OK ||
            (s = bind_ffn(b, l, &m->layers[l])) != MOE_OK)
            return s;
    }
    return MOE_OK;
}

/* ---- load-time quantization (routed experts, dense matrices) ---- */

typedef struct {
    moe_weight *w;
    moe_dtype qt;
    void *q;     /* quantized copy, NULL when the matrix keeps its dtype */
    int failed;  /* inf/NaN in the weights */
    bool expert; /* a routed expert's matrix (else a dense one) */
    bool shared; /* its source bytes stay in use (tied lm_head: the embedding keeps them) */
    char what[48];
} quant_item;

typedef struct {
    quant_item *items; /* NULL in the counting pass */
    int n;
    const moe_weight *conflict; /* a matrix the file holds in another Q dtype than asked */
} quant_list;

typedef struct {
    quant_item *items;
    const moe_st_set *release; /* NULL: keep the source pages (keep_source_pages) */
} quant_job;

static size_t matrix_bytes(moe_dtype dt, const moe_weight *w)
{
    return moe_dtype_row_bytes(dt, (size_t)w->cols) * (size_t)w->rows;
}

static void quant_task(void *arg, int task, int thread)
{
    (void)thread;
    const quant_job *job = arg;
    quant_item *it = &job->items[task];
    if (!it->q)
        return;
    size_t n = (size_t)it->w->rows * (size_t)it->w->cols;
    it->failed = moe_quantize(it->q, it->qt, it->w->data, it->w->dtype, n) != 0;
    /* Right after its own copy, so the load's peak RSS holds about one source matrix per
     * thread, not the whole bf16 model. A tied lm_head's source is the embedding: its rows
     * fault in again when looked up. A failed matrix keeps being read: its pages stay. */
    if (!it->failed && job->release)
        moe_st_release(job->release, it->w->data, matrix_bytes(it->w->dtype, it->w));
}

/* The tensor name w was bound from ("?" if none). */
static const char *matrix_name(const model_owned *own, const moe_weight *w)
{
    for (int i = 0; i < own->n_mat; i++)
        if (own->mat[i] == w)
            return own->mat_name[i];
    return "?";
}

/* Appends w when it is bound (absent shared experts / dense MLPs have data NULL). */
static void quant_add(quant_list *ql, moe_weight *w, moe_dtype qt, bool expert, bool shared,
                      const char *what)
{
    if (!w->data)
        return;
    if (w->dtype == MOE_DT_Q8 || w->dtype == MOE_DT_Q4) { /* pre-quantized in the file */
        if (w->dtype != qt && !ql->conflict)
            ql->conflict = w;
        return;
    }
    if (ql->items) {
        quant_item *it = &ql->items[ql->n];
        *it = (quant_item){.w = w, .qt = qt, .expert = expert, .shared = shared};
        snprintf(it->what, sizeof it->what, "%s", what);
    }
    ql->n++;
}

static moe_dtype quant_dtype(moe_quant_mode q)
{
    return q == MOE_QUANT_Q8 ? MOE_DT_Q8 : MOE_DT_Q4;
}

/* The matrices the two modes select, in a fixed order. */
static void quant_collect(moe_model *m, moe_quant_mode me, moe_quant_mode md, quant_list *ql)
{
    const moe_model_config *c = &m->cfg;
    static const char *const eproj[3] = {"gate", "up", "down"};
    static const char *const dname[10] = {"q_proj",      "k_proj",        "v_proj",
                                          "o_proj",      "shared_expert gate", "shared_expert up",
                                          "shared_expert down", "mlp gate", "mlp up",
                                          "mlp down"};
    char what[48];
    for (int l = 0; l < c->n_layers; l++) {
        moe_layer_weights *lw = &m->layers[l];
        if (me != MOE_QUANT_NONE && lw->is_moe)
            for (int e = 0; e < c->n_experts; e++) {
                if (!m->expert_bound[e])
                    continue;
                moe_weight *ws[3] = {&lw->exp_gate[e], &lw->exp_up[e], &lw->exp_down[e]};
                for (int i = 0; i < 3; i++) {
                    snprintf(what, sizeof what, "layer %d expert %d %s", l, e, eproj[i]);
                    quant_add(ql, ws[i], quant_dtype(me), true, false, what);
                }
            }
        if (md == MOE_QUANT_NONE)
            continue;
        /* Not the router nor the shared-expert gate: they choose and weigh experts, are a tiny
         * share of the bytes, and a flipped expert choice costs far more than they would save. */
        moe_weight *ws[10] = {&lw->wq,    &lw->wk,      &lw->wv,       &lw->wo,     &lw->sh_gate,
                              &lw->sh_up, &lw->sh_down, &lw->mlp_gate, &lw->mlp_up, &lw->mlp_down};
        for (int i = 0; i < 10; i++) {
            snprintf(what, sizeof what, "layer %d %s", l, dname[i]);
            quant_add(ql, ws[i], quant_dtype(md), false, false, what);
        }
    }
    if (md != MOE_QUANT_NONE) {
        /* Tied: lm_head is its own moe_weight (a copy of the embedding's), so pointing it at a
         * quantized copy leaves the embedding's row lookups on the original bytes. */
        bool tied = m->lm_head.data == m->embed.data;
        quant_add(ql, &m->lm_head, quant_dtype(md), false, tied,
                  tied ? "lm_head (tied: a separate copy)" : "lm_head");
    }
}

/* Replaces the selected matrices with owned Q8/Q4 copies: the one place weights are copied out of
 * the mmap (reading them once, on all online CPUs). */
static moe_status quantize_matrices(moe_model *m, model_owned *own, moe_quant_mode me,
                                    moe_quant_mode md)
{
    quant_list ql = {0};
    quant_collect(m, me, md, &ql);
    if (ql.conflict) {
        const moe_st_tensor *t = moe_st_find(m->st, matrix_name(own, ql.conflict));
        return moe_error(MOE_ERR_INVALID_ARG,
                         "%s: tensor %s is stored as %s; asked for %s: a pre-quantized model "
                         "cannot be quantized again (quantize the float model instead, or ask for "
                         "none)",
                         t ? t->file : m->dir, t ? t->name : "?", moe_dtype_name(ql.conflict->dtype),
                         moe_dtype_name(ql.conflict->dtype == MOE_DT_Q8 ? MOE_DT_Q4 : MOE_DT_Q8));
    }
    int n = ql.n;
    if (n == 0)
        return MOE_OK;
    quant_item *items = calloc((size_t)n, sizeof *items);
    void **qbufs = calloc((size_t)n, sizeof *qbufs);
    if (!items || !qbufs) {
        free(items);
        free(qbufs);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory quantizing %d matrices", m->dir, n);
    }
    own->qbufs = qbufs;
    ql = (quant_list){.items = items};
    quant_collect(m, me, md, &ql);
    /* Per group (0 experts, 1 dense): matrices, quantized, bytes before/after, shape misfits. */
    int total[2] = {0}, done[2] = {0}, n_shape[2] = {0}, shape_cols[2] = {0};
    size_t before[2] = {0}, after[2] = {0};
    moe_status s = MOE_OK;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        quant_item *it = &items[i];
        int g = it->expert ? 0 : 1;
        total[g]++;
        size_t dst = matrix_bytes(it->qt, it->w);
        if (dst == 0) { /* n_in not a multiple of MOE_QK */
            n_shape[g]++;
            shape_cols[g] = it->w->cols;
            continue;
        }
        if (!(it->q = malloc(dst)))
            s = moe_error(MOE_ERR_NOMEM, "%s: out of memory quantizing %s (%zu bytes)", m->dir,
                          it->what, dst);
    }
    if (s != MOE_OK) {
        for (int i = 0; i < n; i++)
            free(items[i].q);
        free(items);
        return s;
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    moe_threadpool_t *pool = moe_threadpool_create(ncpu > 1 ? (int)(ncpu < 64 ? ncpu : 64) : 1);
    quant_job job = {items, own->keep_source ? NULL : m->st};
    moe_threadpool_run(pool, quant_task, &job, n); /* a NULL pool runs on the caller */
    moe_threadpool_free(pool);
    for (int i = 0; i < n; i++) {
        quant_item *it = &items[i];
        int g = it->expert ? 0 : 1;
        size_t src = matrix_bytes(it->w->dtype, it->w);
        before[g] += src;
        if (it->q && it->failed) {
            MOE_LOG_W("%s: %s holds inf or NaN: kept in %s, not quantized", m->dir, it->what,
                      moe_dtype_name(it->w->dtype));
            free(it->q);
            it->q = NULL;
        }
        if (!it->q) {
            after[g] += src;
            continue;
        }
        size_t dst = matrix_bytes(it->qt, it->w);
        if (!it->shared) /* a tied lm_head's source stays mapped and read by the embedding */
            own->weight_bytes -= src;
        own->weight_bytes += dst;
        after[g] += dst;
        it->w->data = it->q;
        it->w->dtype = it->qt;
        qbufs[own->n_q++] = it->q;
        done[g]++;
        own->experts_quantized |= it->expert;
    }
    static const char *const group[2] = {"routed experts", "dense matrices"};
    const moe_quant_mode mode[2] = {me, md};
    for (int g = 0; g < 2; g++) {
        if (total[g] == 0)
            continue;
        MOE_LOG_I("%s: %s quantized to %s: %d of %d matrices, %.1f MiB -> %.1f MiB", m->dir,
                  group[g], moe_dtype_name(quant_dtype(mode[g])), done[g], total[g],
                  (double)before[g] / (1 << 20), (double)after[g] / (1 << 20));
        if (n_shape[g])
            MOE_LOG_I("%s: %d %s with an input size not a multiple of %d (e.g. %d) kept in their "
                      "file dtype",
                      m->dir, n_shape[g], group[g], MOE_QK, shape_cols[g]);
    }
    free(items);
    return MOE_OK;
}

/* ---- pre-quantized models (written by moe-quantize, see moe_model_save) ---- */

typedef struct {
    const moe_st_tensor *const *t;
    const char *const *want; /* the checksum each file's metadata gives */
    uint64_t *got;
} csum_job;

static void csum_task(void *arg, int task, int thread)
{
    (void)thread;
    csum_job *j = arg;
    j->got[task] = moe_kv_checksum(j->t[task]->data, j->t[task]->n_bytes);
}

/* Every Q8/Q4 tensor the model binds must come from a file whose metadata says how it was made
 * (format version, group size) and gives its checksum; the checksums are computed on all online
 * CPUs (reading the bytes once, which serving would do anyway). Errors name the file and the
 * tensor. */
static moe_status verify_prequant(moe_model *m, model_owned *own, int first)
{
    int n = own->n_pre_q - first;
    if (n <= 0)
        return MOE_OK;
    char key[512], grp[16];
    snprintf(grp, sizeof grp, "%d", MOE_QK);
    const char **want = calloc((size_t)n, sizeof *want);
    uint64_t *got = calloc((size_t)n, sizeof *got);
    moe_status s = want && got ? MOE_OK : moe_error(MOE_ERR_NOMEM, "%s: out of memory", m->dir);
    for (int i = 0; i < n && s == MOE_OK; i++) {
        const moe_st_tensor *t = own->pre_q[first + i];
        const char *ver = moe_st_meta(m->st, t->file, MOE_QMETA_VERSION);
        const char *gs = moe_st_meta(m->st, t->file, MOE_QMETA_GROUP);
        snprintf(key, sizeof key, "%s%s", MOE_QMETA_CHECKSUM, t->name);
        want[i] = moe_st_meta(m->st, t->file, key);
        if (!ver)
            s = moe_error(MOE_ERR_FORMAT,
                          "%s: tensor %s is %s but the file has no %s metadata: not written by "
                          "moe-quantize",
                          t->file, t->name, dtype_str(t->dtype), MOE_QMETA_VERSION);
        else if (strcmp(ver, MOE_QMETA_VERSION_NOW) != 0)
            s = moe_error(MOE_ERR_UNSUPPORTED,
                          "%s: tensor %s: quantized format version \"%s\"; this build reads "
                          "version %s",
                          t->file, t->name, ver, MOE_QMETA_VERSION_NOW);
        else if (!gs || strcmp(gs, grp) != 0)
            s = moe_error(MOE_ERR_UNSUPPORTED,
                          "%s: tensor %s: group size %s, this build's kernels use %d", t->file,
                          t->name, gs ? gs : "(missing)", MOE_QK);
        else if (!want[i])
            s = moe_error(MOE_ERR_FORMAT, "%s: tensor %s: no checksum (%s) in the metadata",
                          t->file, t->name, key);
    }
    if (s == MOE_OK) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        moe_threadpool_t *pool =
            moe_threadpool_create(ncpu > 1 ? (int)(ncpu < 64 ? ncpu : 64) : 1);
        csum_job job = {own->pre_q + first, want, got};
        moe_threadpool_run(pool, csum_task, &job, n);
        moe_threadpool_free(pool);
        for (int i = 0; i < n && s == MOE_OK; i++) {
            char hex[17];
            snprintf(hex, sizeof hex, "%016llx", (unsigned long long)got[i]);
            if (strcmp(hex, want[i]) != 0)
                s = moe_error(MOE_ERR_FORMAT,
                              "%s: tensor %s is corrupt: checksum %s, the metadata says %s",
                              own->pre_q[first + i]->file, own->pre_q[first + i]->name, hex,
                              want[i]);
        }
    }
    if (s == MOE_OK)
        MOE_LOG_I("%s: %d pre-quantized matrices, checksums match", m->dir, n);
    free(want);
    free(got);
    return s;
}

static moe_status parse_mode(const char *v, size_t len, moe_quant_mode *out)
{
    if (len == 2 && strncmp(v, "q8", 2) == 0)
        *out = MOE_QUANT_Q8;
    else if (len == 2 && strncmp(v, "q4", 2) == 0)
        *out = MOE_QUANT_Q4;
    else if (len == 4 && strncmp(v, "none", 4) == 0)
        *out = MOE_QUANT_NONE;
    else
        return MOE_ERR_INVALID_ARG;
    return MOE_OK;
}

moe_status moe_model_parse_quantize(const char *spec, moe_model_load_opts *opts)
{
    static const char *const expect =
        "expected a comma list of experts|dense|all=q8|q4|none (e.g. experts=q4,dense=q8 or "
        "all=q8), or none";
    if (!spec || !*spec)
        return moe_error(MOE_ERR_INVALID_ARG, "--quantize '%s': %s", spec ? spec : "(null)",
                         expect);
    moe_quant_mode e = MOE_QUANT_NONE, d = MOE_QUANT_NONE;
    if (strcmp(spec, "none") != 0) {
        for (const char *p = spec;;) {
            const char *end = strchr(p, ',');
            size_t len = end ? (size_t)(end - p) : strlen(p);
            const char *eq = memchr(p, '=', len);
            moe_quant_mode q;
            size_t klen = eq ? (size_t)(eq - p) : 0;
            if (!eq || parse_mode(eq + 1, len - klen - 1, &q) != MOE_OK)
                return moe_error(MOE_ERR_INVALID_ARG, "--quantize '%s': item '%.*s': %s", spec,
                                 (int)len, p, expect);
            if (klen == 7 && strncmp(p, "experts", 7) == 0)
                e = q;
            else if (klen == 5 && strncmp(p, "dense", 5) == 0)
                d = q;
            else if (klen == 3 && strncmp(p, "all", 3) == 0)
                e = d = q;
            else
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "--quantize '%s': item '%.*s': unknown group '%.*s'; %s", spec,
                                 (int)len, p, (int)klen, p, expect);
            if (!end)
                break;
            p = end + 1;
        }
    }
    opts->quantize_experts = e;
    opts->quantize_dense = d;
    return MOE_OK;
}

moe_status moe_model_load(const char *dir, const moe_model_load_opts *opts, moe_model **out)
{
    if (!dir || !out)
        return moe_error(MOE_ERR_INVALID_ARG, "moe_model_load: no directory");
    moe_model *m = calloc(1, sizeof *m);
    model_owned *own = calloc(1, sizeof *own);
    if (!m || !own) {
        free(m);
        free(own);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", dir);
    }
    m->owned = own;
    own->keep_source = opts && opts->keep_source_pages;
    moe_status s = MOE_OK;
    if (strlen(dir) >= sizeof m->dir)
        s = moe_error(MOE_ERR_INVALID_ARG, "%s: path longer than %zu bytes", dir,
                      sizeof m->dir - 1);
    else
        snprintf(m->dir, sizeof m->dir, "%s", dir);
    if (s == MOE_OK)
        s = moe_model_config_load(dir, &m->cfg);
    if (s == MOE_OK) {
        int eb = opts ? opts->expert_begin : 0, ee = opts ? opts->expert_end : 0;
        if (eb == 0 && ee == 0)
            ee = m->cfg.n_experts;
        if (eb < 0 || eb >= ee || ee > m->cfg.n_experts)
            s = moe_error(MOE_ERR_INVALID_ARG, "%s: expert range [%d, %d) is not inside [0, %d)",
                          dir, eb, ee, m->cfg.n_experts);
        m->expert_begin = eb;
        m->expert_end = ee;
        if (s == MOE_OK && !(m->expert_bound = calloc((size_t)m->cfg.n_experts + 1, sizeof(bool))))
            s = moe_error(MOE_ERR_NOMEM, "%s: out of memory", dir);
        if (s == MOE_OK && opts && opts->expert_mask) {
            m->expert_begin = m->cfg.n_experts;
            m->expert_end = 0;
            for (int e = 0; e < m->cfg.n_experts; e++)
                if ((m->expert_bound[e] = opts->expert_mask[e])) {
                    m->expert_begin = e < m->expert_begin ? e : m->expert_begin;
                    m->expert_end = e + 1;
                }
            if (m->expert_end == 0)
                s = moe_error(MOE_ERR_INVALID_ARG, "%s: expert mask selects no expert", dir);
        } else if (s == MOE_OK) {
            for (int e = eb; e < ee; e++)
                m->expert_bound[e] = true;
        }
    }
    if (s == MOE_OK)
        s = moe_st_open_dir(dir, &m->st);
    if (s == MOE_OK && !(m->layers = calloc((size_t)m->cfg.n_layers, sizeof *m->layers)))
        s = moe_error(MOE_ERR_NOMEM, "%s: out of memory", dir);
    if (s == MOE_OK) {
        binder b = {.m = m, .own = own, .dir = m->dir};
        s = bind_all(&b);
    }
    if (s == MOE_OK)
        s = verify_prequant(m, own, 0);
    if (s == MOE_OK && opts) {
        const moe_quant_mode qm[2] = {opts->quantize_experts, opts->quantize_dense};
        static const char *const field[2] = {"quantize_experts", "quantize_dense"};
        for (int i = 0; i < 2 && s == MOE_OK; i++)
            if (qm[i] != MOE_QUANT_NONE && qm[i] != MOE_QUANT_Q8 && qm[i] != MOE_QUANT_Q4)
                s = moe_error(MOE_ERR_INVALID_ARG, "%s: %s %d is not a moe_quant_mode", dir,
                              field[i], (int)qm[i]);
        if (s == MOE_OK && (qm[0] != MOE_QUANT_NONE || qm[1] != MOE_QUANT_NONE))
            s = quantize_matrices(m, own, qm[0], qm[1]);
    }
    if (s != MOE_OK) {
        moe_model_free(m);
        return s;
    }
    MOE_LOG_I("%s: %s, %d layers, %d experts (binding [%d, %d)), %.1f MiB of weights", dir,
              m->cfg.arch_name, m->cfg.n_layers, m->cfg.n_experts, m->expert_begin, m->expert_end,
              (double)own->weight_bytes / (1 << 20));
    *out = m;
    return MOE_OK;
}

moe_status moe_model_bind_experts(moe_model *m, const bool *mask)
{
    model_owned *own = m->owned;
    if (own->experts_quantized)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: binding more experts (redundant experts) is not supported with quantized experts",
                         m->dir);
    binder b = {.m = m, .own = own, .dir = m->dir};
    const int first_q = own->n_pre_q; /* pre-quantized experts bound below are checked too */
    for (int e = 0; e < m->cfg.n_experts; e++) {
        if (!mask[e] || m->expert_bound[e])
            continue;
        for (int l = 0; l < m->cfg.n_layers; l++) {
            moe_status s = m->layers[l].is_moe ? bind_expert(&b, l, e) : MOE_OK;
            if (s != MOE_OK)
                return s;
        }
        m->expert_bound[e] = true;
        if (e < m->expert_begin)
            m->expert_begin = e;
        if (e + 1 > m->expert_end)
            m->expert_end = e + 1;
    }
    return verify_prequant(m, own, first_q);
}

void moe_model_free(moe_model *m)
{
    if (!m)
        return;
    if (m->layers) {
        for (int l = 0; l < m->cfg.n_layers; l++)
            free(m->layers[l].exp_gate); /* exp_up and exp_down live in the same block */
        free(m->layers);
    }
    model_owned *own = m->owned;
    if (own) {
        for (int i = 0; i < own->n; i++)
            free(own->bufs[i]);
        free(own->bufs);
        for (int i = 0; i < own->n_q; i++)
            free(own->qbufs[i]);
        free(own->qbufs);
        free(own->mat_name);
        free(own->mat);
        free(own->pre_q);
        free(own);
    }
    moe_st_close(m->st);
    free(m->expert_bound);
    free(m);
}

size_t moe_model_weight_bytes(const moe_model *m)
{
    return m && m->owned ? ((const model_owned *)m->owned)->weight_bytes : 0;
}

const moe_weight *moe_model_matrix(const moe_model *m, const char *name)
{
    const model_owned *own = m ? m->owned : NULL;
    if (!own || !name)
        return NULL;
    if (strcmp(name, "lm_head.weight") == 0 && m->cfg.tie_embeddings)
        return m->lm_head.data != m->embed.data ? &m->lm_head : NULL;
    for (int i = 0; i < own->n_mat; i++)
        if (strcmp(own->mat_name[i], name) == 0)
            return own->mat[i];
    return NULL;
}
