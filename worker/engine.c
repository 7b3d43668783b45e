/* Continuous-batching engine: schedules prefill chunks and decode tokens into steps under a token
 * budget (running sequences first, then waiting ones in arrival order), preempts by recompute when
 * the KV cache runs out, runs the forward pass and samples. */
#include "worker/engine.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "worker/forward.h"
#include "worker/kv_cache.h"

typedef struct {
    uint64_t id;
    int32_t *tokens; /* prompt then generated ids */
    int n_tokens, cap;
    int n_prompt;
    int n_computed;  /* positions whose K/V are in the cache */
    int n_generated;
    int max_new;
    bool ignore_eos;
    bool prefill_only; /* park after the first sampled token */
    int n_gen0;        /* generated tokens it was added with (resumed after a lost instance) */
    bool paused;       /* parked, paused, or being imported: takes no steps */
    bool has_parent;   /* a sibling (moe_engine_add_sibling) waiting for parent's prompt */
    uint64_t parent;
    moe_kv_seq kv;
    moe_sampling_params sp;
} seq_t;

struct moe_engine {
    const moe_model *m;
    moe_threadpool_t *pool;
    moe_backend *be; /* compute backend of the forward pass and the KV pool */
    moe_kv_cache *kv;
    moe_forward *fw;
    int max_batch_tokens, max_seqs, max_ctx, vocab;

    seq_t **seqs; /* all live sequences, in arrival order */
    int n_seqs, cap_seqs;

    /* per-step scratch, sized at create */
    int32_t *btok;
    moe_batch_seg *segs;
    seq_t **seg_seq;
    int *logit_rows;
    int *logit_seg;
    float *logits;
    moe_sample_scratch sample; /* idx, prob, mark: vocab each */
    float *row_keep, *row_tmp;  /* vocab each: a first token's logits, kept for its siblings */
    int n_siblings;             /* siblings waiting (has_parent) */

    bool ep; /* expert parallel: steps run even when empty */
    moe_engine_stats st;

    /* Layer-by-layer hand-off (moe_engine_set_layer_hook); hook_ids: this step's prefill-only
     * sequences whose prompt completes in it. */
    moe_engine_layer_hook layer_fn;
    void *layer_ctx;
    uint64_t *hook_ids; /* [max_seqs] */
    int n_hook_ids;
};

static int default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

moe_status moe_engine_create(const moe_model *model, const moe_engine_opts *opts, moe_engine **out)
{
    moe_engine_opts o = opts ? *opts : (moe_engine_opts){0};
    const moe_model_config *c = &model->cfg;
    if (o.n_threads <= 0)
        o.n_threads = default_threads();
    if (o.block_size <= 0)
        o.block_size = 16;
    if (o.max_batch_tokens <= 0)
        o.max_batch_tokens = 512;
    if (o.max_seqs <= 0)
        o.max_seqs = 64;

    moe_engine *e = calloc(1, sizeof *e);
    if (!e)
        return moe_error(MOE_ERR_NOMEM, "engine: out of memory");
    e->m = model;
    e->max_batch_tokens = o.max_batch_tokens;
    e->max_seqs = o.max_seqs;
    e->max_ctx = c->max_position;
    e->vocab = c->vocab_size;
    e->ep = o.ep_comm != NULL;
    if (e->ep && !o.ep_placement) {
        free(e);
        return moe_error(MOE_ERR_INVALID_ARG, "engine: ep_comm given without ep_placement");
    }

    moe_kv_layout lay = {.n_layers = c->n_layers, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
                         .block_size = o.block_size};
    int n_blocks = o.n_kv_blocks;
    if (n_blocks <= 0) {
        size_t budget = o.kv_budget_bytes;
        size_t want = (size_t)o.max_seqs * (size_t)e->max_ctx / (size_t)o.block_size + (size_t)o.max_seqs;
        if (budget == 0)
            budget = (size_t)1 << 30; /* 1 GiB unless told otherwise */
        size_t fit = budget / moe_kv_block_bytes(&lay);
        n_blocks = (int)(fit < want ? fit : want);
        if (n_blocks < 1)
            n_blocks = 1;
    }
    moe_status st;
    e->pool = moe_threadpool_create(o.n_threads);
    if (!e->pool) {
        free(e);
        return moe_error(MOE_ERR_NOMEM, "engine: cannot start %d threads", o.n_threads);
    }
    if ((st = moe_backend_create((moe_device)o.device, o.device_index, e->pool, &e->be)) != MOE_OK ||
        (st = moe_kv_create_on(e->be, &lay, n_blocks, &e->kv)) != MOE_OK ||
        (st = moe_forward_create_on(model, e->be, o.max_batch_tokens, o.max_seqs, e->max_ctx,
                                    o.block_size, &e->fw)) != MOE_OK ||
        (o.ep_comm && (st = moe_forward_set_ep(e->fw, o.ep_comm, o.ep_placement)) != MOE_OK)) {
        moe_engine_free(e);
        return st;
    }
    _Static_assert((int)MOE_EP_OVERLAP_EXPERTS == (int)MOE_FWD_OVERLAP_EXPERTS &&
                       (int)MOE_EP_OVERLAP_TOKENS == (int)MOE_FWD_OVERLAP_TOKENS,
                   "engine and forward overlap modes differ");
    moe_forward_set_ep_overlap(e->fw, o.ep_overlap);
    size_t T = (size_t)o.max_batch_tokens, S = (size_t)o.max_seqs;
    e->btok = calloc(T, sizeof *e->btok);
    e->segs = calloc(S, sizeof *e->segs);
    e->seg_seq = calloc(S, sizeof *e->seg_seq);
    e->hook_ids = calloc(S, sizeof *e->hook_ids);
    e->logit_rows = calloc(S, sizeof *e->logit_rows);
    e->logit_seg = calloc(S, sizeof *e->logit_seg);
    e->logits = calloc(S * (size_t)e->vocab, sizeof *e->logits);
    e->sample.idx = calloc((size_t)e->vocab, sizeof *e->sample.idx);
    e->sample.prob = calloc((size_t)e->vocab, sizeof *e->sample.prob);
    e->sample.mark = calloc((size_t)e->vocab, sizeof *e->sample.mark);
    e->row_keep = calloc((size_t)e->vocab, sizeof *e->row_keep);
    e->row_tmp = calloc((size_t)e->vocab, sizeof *e->row_tmp);
    if (!e->btok || !e->segs || !e->seg_seq || !e->hook_ids || !e->logit_rows || !e->logit_seg || !e->logits ||
        !e->sample.idx || !e->sample.prob || !e->sample.mark || !e->row_keep || !e->row_tmp) {
        moe_engine_free(e);
        return moe_error(MOE_ERR_NOMEM, "engine: out of memory for step buffers");
    }
    MOE_LOG_I("engine: %s backend, %d threads (%s kernels), KV %d blocks x %d tokens (%.1f MiB), batch %d tokens / %d seqs",
              e->be->name, o.n_threads, moe_isa_name(moe_kernels_isa()), n_blocks, o.block_size,
              (double)n_blocks * (double)moe_kv_block_bytes(&lay) / 1048576.0, o.max_batch_tokens, o.max_seqs);
    *out = e;
    return MOE_OK;
}

static void seq_free(moe_engine *e, seq_t *s)
{
    if (s->has_parent)
        e->n_siblings--;
    moe_kv_seq_release(e->kv, &s->kv);
    free(s->tokens);
    free(s);
}

void moe_engine_free(moe_engine *e)
{
    if (!e)
        return;
    for (int i = 0; i < e->n_seqs; i++)
        seq_free(e, e->seqs[i]);
    free(e->seqs);
    moe_forward_free(e->fw);
    moe_kv_free(e->kv);
    moe_backend_free(e->be);
    moe_threadpool_free(e->pool);
    free(e->btok);
    free(e->segs);
    free(e->seg_seq);
    free(e->hook_ids);
    free(e->logit_rows);
    free(e->logit_seg);
    free(e->logits);
    free(e->sample.idx);
    free(e->sample.prob);
    free(e->sample.mark);
    free(e->row_keep);
    free(e->row_tmp);
    free(e);
}

static int find_seq(const moe_engine *e, uint64_t id)
{
    for (int i = 0; i < e->n_seqs; i++)
        if (e->seqs[i]->id == id)
            return i;
    return -1;
}

static moe_status add_seq(moe_engine *e, uint64_t seq_id, const int32_t *prompt, int n_prompt,
                          const moe_sampling_params *sp, int max_new_tokens, bool ignore_eos, seq_t **out)
{
    const moe_model_config *c = &e->m->cfg;
    if (n_prompt <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "prompt: empty");
    if (n_prompt >= e->max_ctx)
        return moe_error(MOE_ERR_INVALID_ARG, "prompt: %d tokens, the context holds %d (max_position_embeddings)",
                         n_prompt, e->max_ctx);
    if (max_new_tokens <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "max_new_tokens: %d, must be positive", max_new_tokens);
    if (c->sliding_window > 0 && n_prompt + max_new_tokens > c->sliding_window)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "prompt: %d + %d new tokens exceed sliding_window %d, which is not supported",
                         n_prompt, max_new_tokens, c->sliding_window);
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= e->vocab)
            return moe_error(MOE_ERR_INVALID_ARG, "prompt: token id %d at %d outside the vocabulary (%d)",
                             prompt[i], i, e->vocab);
    if (moe_kv_blocks_for(e->kv, n_prompt + 1) > moe_kv_total_blocks(e->kv))
        return moe_error(MOE_ERR_FULL, "prompt: %d tokens need more KV blocks than the cache has (%d)", n_prompt,
                         moe_kv_total_blocks(e->kv));
    if (find_seq(e, seq_id) >= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "seq_id: %llu already running", (unsigned long long)seq_id);
    if (e->n_seqs == e->cap_seqs) {
        int cap = e->cap_seqs ? 2 * e->cap_seqs : 16;
        seq_t **ns = realloc(e->seqs, (size_t)cap * sizeof *ns);
        if (!ns)
            return moe_error(MOE_ERR_NOMEM, "engine: out of memory");
        e->seqs = ns;
        e->cap_seqs = cap;
    }
    seq_t *s = calloc(1, sizeof *s);
    /* A sequence never outgrows the context nor the whole cache (else it could never run alone). */
    int limit = n_prompt + max_new_tokens;
    if (limit > e->max_ctx)
        limit = e->max_ctx;
    int cache_tokens = moe_kv_total_blocks(e->kv) * moe_kv_get_layout(e->kv)->block_size;
    if (limit > cache_tokens)
        limit = cache_tokens;
    if (!s || !(s->tokens = malloc((size_t)limit * sizeof(int32_t)))) {
        free(s);
        return moe_error(MOE_ERR_NOMEM, "engine: out of memory");
    }
    memcpy(s->tokens, prompt, (size_t)n_prompt * sizeof(int32_t));
    s->id = seq_id;
    s->n_tokens = s->n_prompt = n_prompt;
    s->cap = limit;
    s->max_new = max_new_tokens;
    s->ignore_eos = ignore_eos;
    s->sp = sp ? *sp : (moe_sampling_params){.temperature = 0.0f, .top_p = 1.0f};
    e->seqs[e->n_seqs++] = s;
    if (out)
        *out = s;
    return MOE_OK;
}

moe_status moe_engine_add(moe_engine *e, uint64_t seq_id, const int32_t *prompt, int n_prompt,
                          const moe_sampling_params *sp, int max_new_tokens, bool ignore_eos)
{
    return add_seq(e, seq_id, prompt, n_prompt, sp, max_new_tokens, ignore_eos, NULL);
}

moe_status moe_engine_add_prefill_only(moe_engine *e, uint64_t seq_id, const int32_t *prompt,
                                       int n_prompt, const moe_sampling_params *sp, int max_new_tokens,
                                       bool ignore_eos)
{
    seq_t *s;
    moe_status st = add_seq(e, seq_id, prompt, n_prompt, sp, max_new_tokens, ignore_eos, &s);
    if (st == MOE_OK)
        s->prefill_only = true;
    return st;
}

moe_status moe_engine_add_sibling(moe_engine *e, uint64_t parent_id, uint64_t seq_id,
                                  const moe_sampling_params *sp)
{
    int pi = find_seq(e, parent_id);
    if (pi < 0)
        return moe_error(MOE_ERR_NOT_FOUND, "sibling of %llu: no such sequence",
                         (unsigned long long)parent_id);
    const seq_t *p = e->seqs[pi];
    if (p->n_generated > 0 || p->n_gen0 > 0)
        return moe_error(MOE_ERR_INVALID_ARG, "sibling of %llu: it already sampled its first token",
                         (unsigned long long)parent_id);
    seq_t *s;
    moe_status st = add_seq(e, seq_id, p->tokens, p->n_prompt, sp, p->max_new, p->ignore_eos, &s);
    if (st != MOE_OK)
        return st;
    s->prefill_only = p->prefill_only;
    s->has_parent = true;
    s->parent = parent_id;
    e->n_siblings++;
    return MOE_OK;
}

/* A sibling takes no step while its parent is there and has not sampled its first token; once
 * the parent is gone (finished or cancelled first) it prefills the prompt itself. */
static bool waits_for_parent(moe_engine *e, seq_t *s)
{
    if (!s->has_parent)
        return false;
    int pi = find_seq(e, s->parent);
    if (pi >= 0 && e->seqs[pi]->n_generated == 0)
        return true;
    s->has_parent = false;
    e->n_siblings--;
    return false;
}

moe_status moe_engine_add_resumed(moe_engine *e, uint64_t seq_id, const int32_t *prompt, int n_prompt,
                                  const int32_t *generated, int n_generated,
                                  const moe_sampling_params *sp, int max_new_tokens, bool ignore_eos,
                                  bool prefill_only)
{
    if (n_generated < 0 || n_generated >= max_new_tokens)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "generated: %d tokens already generated of max_new_tokens %d", n_generated,
                         max_new_tokens);
    if (n_prompt + n_generated >= e->max_ctx)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "generated: %d prompt + %d generated tokens fill the context (%d)", n_prompt,
                         n_generated, e->max_ctx);
    for (int i = 0; i < n_generated; i++)
        if (generated[i] < 0 || generated[i] >= e->vocab)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "generated: token id %d at %d outside the vocabulary (%d)", generated[i],
                             i, e->vocab);
    seq_t *s;
    moe_status st = add_seq(e, seq_id, prompt, n_prompt, sp, max_new_tokens, ignore_eos, &s);
    if (st != MOE_OK)
        return st;
    if (n_prompt + n_generated >= s->cap) { /* the cache cannot hold one more token */
        moe_engine_finish(e, seq_id);
        return moe_error(MOE_ERR_FULL, "generated: %d + %d tokens fill the KV cache", n_prompt,
                         n_generated);
    }
    memcpy(s->tokens + n_prompt, generated, (size_t)n_generated * sizeof(int32_t));
    s->n_tokens = n_prompt + n_generated;
    s->n_generated = s->n_gen0 = n_generated;
    s->prefill_only = prefill_only;
    return MOE_OK;
}

static void remove_at(moe_engine *e, int i)
{
    seq_free(e, e->seqs[i]);
    memmove(e->seqs + i, e->seqs + i + 1, (size_t)(e->n_seqs - i - 1) * sizeof *e->seqs);
    e->n_seqs--;
}

void moe_engine_finish_all(moe_engine *e)
{
    while (e->n_seqs)
        remove_at(e, e->n_seqs - 1);
}

moe_status moe_engine_finish(moe_engine *e, uint64_t seq_id)
{
    int i = find_seq(e, seq_id);
    if (i < 0)
        return moe_error(MOE_ERR_NOT_FOUND, "seq_id: %llu is not running", (unsigned long long)seq_id);
    remove_at(e, i);
    return MOE_OK;
}

const int64_t *moe_engine_expert_load(const moe_engine *e) { return moe_forward_expert_tokens(e->fw); }

moe_status moe_engine_set_placement(moe_engine *e, const moe_ep_placement *place)
{
    const moe_comm *comm = moe_forward_ep_comm(e->fw);
    if (!comm)
        return moe_error(MOE_ERR_INVALID_ARG, "engine: not expert parallel, no placement to change");
    return moe_forward_set_ep(e->fw, comm, place);
}

bool moe_engine_has_work(const moe_engine *e)
{
    for (int i = 0; i < e->n_seqs; i++)
        if (!e->seqs[i]->paused)
            return true;
    return false;
}

void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *st)
{
    *st = e->st;
    st->kv_blocks_total = moe_kv_total_blocks(e->kv);
    st->kv_blocks_used = moe_kv_used_blocks(e->kv);
    st->n_running = st->n_waiting = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        if (e->seqs[i]->kv.n_blocks > 0)
            st->n_running++;
        else
            st->n_waiting++;
    }
}

static void preempt(moe_engine *e, seq_t *s, moe_kv_cache *kv)
{
    e->st.preemptions++;
    MOE_LOG_D("preempting seq %llu (%d tokens)", (unsigned long long)s->id, s->n_tokens);
    moe_kv_seq_release(kv, &s->kv);
    s->n_computed = 0;
}

/* Frees the KV of the latest-arrived sequence after position `after` that holds any, so that it
 * will be recomputed later (vLLM's preemption by recompute). Sequences at or before `after` may
 * already be in this step's batch and are never touched. Returns false when there is none. */
static bool preempt_later(moe_engine *e, int after)
{
    for (int i = e->n_seqs - 1; i > after; i--) {
        seq_t *s = e->seqs[i];
        if (s->kv.n_blocks > 0 && !s->paused) {
            preempt(e, s, e->kv);
            return true;
        }
    }
    return false;
}

static bool is_eos(const moe_model_config *c, int32_t tok)
{
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == tok)
            return true;
    return false;
}

/* Samples s's next token from row, appends it and its event; true when s finished (the caller
 * removes it). */
static bool sample_and_emit(moe_engine *e, seq_t *s, float *row, moe_token_event *events, int cap,
                            int *n_ev)
{
    const moe_model_config *c = &e->m->cfg;
    /* The draw depends only on (seed, index) and the penalties only on the sequence's tokens,
     * so a recomputed, migrated or re-prefilled sequence draws what it would have drawn here. */
    moe_token_logprobs lp;
    int32_t tok = moe_sample_seq(row, e->vocab, &s->sp, (uint64_t)s->n_generated, s->tokens,
                                 s->n_tokens, s->n_prompt, &e->sample, &lp);
    s->tokens[s->n_tokens++] = tok;
    moe_finish_reason fin = MOE_FINISH_NONE;
    if (!s->ignore_eos && is_eos(c, tok))
        fin = MOE_FINISH_EOS;
    else if (++s->n_generated >= s->max_new || s->n_tokens >= s->cap)
        fin = MOE_FINISH_LENGTH;
    if (fin == MOE_FINISH_EOS)
        s->n_generated++;
    bool park = fin == MOE_FINISH_NONE && s->prefill_only;
    if (park)
        s->paused = true;
    if (*n_ev < cap) {
        events[*n_ev] = (moe_token_event){.seq_id = s->id, .token = tok, .index = s->n_generated - 1,
                                          .finish = fin, .parked = park, .has_lp = s->sp.logprobs};
        if (s->sp.logprobs)
            events[*n_ev].lp = lp;
        (*n_ev)++;
    } else {
        MOE_LOG_W("event buffer of %d too small; seq %llu's token dropped", cap,
                  (unsigned long long)s->id);
    }
    return fin != MOE_FINISH_NONE;
}

/* p just sampled its first token from e->row_keep's logits: each sibling waiting for it takes
 * p's prompt KV (full blocks shared, the partial one copied) and samples its own first token
 * from the same logits. The prompt is prefilled once for all of them. A sibling that cannot get
 * a block stays and prefills on its own later. */
static void fork_siblings(moe_engine *e, seq_t *p, moe_token_event *events, int cap, int *n_ev)
{
    for (int i = 0; i < e->n_seqs; i++) {
        seq_t *s = e->seqs[i];
        if (!s->has_parent || s->parent != p->id || s->n_computed > 0 || s->kv.n_blocks > 0)
            continue;
        s->has_parent = false;
        e->n_siblings--;
        if (moe_kv_seq_fork(e->kv, &p->kv, p->n_prompt, &s->kv) != MOE_OK) {
            MOE_LOG_D("seq %llu: no block to share its sibling's prompt: it prefills it itself",
                      (unsigned long long)s->id);
            continue;
        }
        s->n_computed = p->n_prompt;
        memcpy(e->row_tmp, e->row_keep, (size_t)e->vocab * sizeof(float));
        if (sample_and_emit(e, s, e->row_tmp, events, cap, n_ev))
            remove_at(e, i--);
    }
}

int moe_engine_step(moe_engine *e, moe_token_event *events, int cap)
{
    int budget = e->max_batch_tokens, n_segs = 0, n_tok = 0, n_rows = 0;
    e->n_hook_ids = 0;
    /* Pass 1 schedules sequences that already hold KV (decodes and started prefills), pass 2 the
     * waiting ones, each in arrival order. */
    for (int pass = 0; pass < 2 && budget > 0; pass++) {
        for (int i = 0; i < e->n_seqs && budget > 0 && n_segs < e->max_seqs; i++) {
            seq_t *s = e->seqs[i];
            if (s->paused || waits_for_parent(e, s))
                continue;
            bool holds = s->kv.n_blocks > 0 || s->n_computed > 0;
            if (holds != (pass == 0))
                continue;
            int want = s->n_tokens - s->n_computed;
            if (want <= 0)
                continue;
            int chunk = want < budget ? want : budget;
            moe_status st;
            while ((st = moe_kv_seq_reserve(e->kv, &s->kv, s->n_computed + chunk)) == MOE_ERR_FULL &&
                   pass == 0 && preempt_later(e, i))
                ;
            if (st != MOE_OK) {
                if (pass == 0) {
                    preempt(e, s, e->kv); /* no later sequence to take from: it yields and waits */
                    continue;
                }
                break; /* no room: later arrivals wait too (FCFS) */
            }
            moe_batch_seg *sg = &e->segs[n_segs];
            sg->kv = &s->kv;
            sg->pos0 = s->n_computed;
            sg->tok_begin = n_tok;
            sg->n = chunk;
            memcpy(e->btok + n_tok, s->tokens + s->n_computed, (size_t)chunk * sizeof(int32_t));
            if (s->n_computed + chunk == s->n_tokens) {
                e->logit_rows[n_rows] = n_tok + chunk - 1;
                e->logit_seg[n_rows++] = n_segs;
                if (e->layer_fn && s->prefill_only && s->n_generated == s->n_gen0)
                    e->hook_ids[e->n_hook_ids++] = s->id;
            }
            e->seg_seq[n_segs++] = s;
            n_tok += chunk;
            budget -= chunk;
        }
    }
    if (n_tok == 0) {
        if (!e->ep)
            return 0;
        moe_batch empty = {.n_tokens = 0};
        return moe_forward_run(e->fw, e->kv, &empty) == MOE_OK ? 0 : -1;
    }

    moe_batch b = {.tokens = e->btok, .n_tokens = n_tok, .segs = e->segs, .n_segs = n_segs,
                   .logit_rows = e->logit_rows, .n_logit_rows = n_rows, .logits = e->logits};
    /* The hook reads K/V only of the sequences whose prompt completes in this step. */
    moe_forward_layer_hook_reads_kv(e->fw, e->n_hook_ids > 0);
    if (moe_forward_run(e->fw, e->kv, &b) != MOE_OK)
        return -1;
    e->st.steps++;
    for (int k = 0; k < n_segs; k++) {
        seq_t *s = e->seg_seq[k];
        if (s->n_computed < s->n_prompt)
            e->st.prefill_tokens += e->segs[k].n;
        else
            e->st.decode_tokens += e->segs[k].n;
        s->n_computed += e->segs[k].n;
        e->st.attn_positions += (int64_t)e->segs[k].n * e->segs[k].pos0 + (int64_t)e->segs[k].n * (e->segs[k].n + 1) / 2;
    }

    int n_ev = 0;
    for (int r = 0; r < n_rows; r++) {
        seq_t *s = e->seg_seq[e->logit_seg[r]];
        float *row = e->logits + (size_t)r * e->vocab;
        bool first = s->n_generated == 0 && e->n_siblings > 0;
        if (first) /* its siblings draw from the same logits (sampling changes them in place) */
            memcpy(e->row_keep, row, (size_t)e->vocab * sizeof(float));
        bool done = sample_and_emit(e, s, row, events, cap, &n_ev);
        if (first)
            fork_siblings(e, s, events, cap, &n_ev);
        if (done)
            remove_at(e, find_seq(e, s->id));
    }
    return n_ev;
}

moe_status moe_engine_logits(moe_engine *e, const int32_t *tokens, int n, int chunk, float *logits)
{
    if (n <= 0 || n >= e->max_ctx)
        return moe_error(MOE_ERR_INVALID_ARG, "tokens: %d, must be in [1, %d)", n, e->max_ctx);
    if (chunk <= 0 || chunk > e->max_batch_tokens)
        chunk = e->max_batch_tokens;
    moe_kv_seq kvs = {0};
    moe_status st = moe_kv_seq_reserve(e->kv, &kvs, n);
    if (st != MOE_OK)
        return st;
    int rows[e->max_batch_tokens];
    for (int p = 0; p < n && st == MOE_OK; p += chunk) {
        int len = n - p < chunk ? n - p : chunk;
        for (int i = 0; i < len; i++)
            rows[i] = i;
        moe_batch_seg seg = {.kv = &kvs, .pos0 = p, .tok_begin = 0, .n = len};
        moe_batch b = {.tokens = tokens + p, .n_tokens = len, .segs = &seg, .n_segs = 1,
                       .logit_rows = rows, .n_logit_rows = len, .logits = logits + (size_t)p * e->vocab};
        st = moe_forward_run(e->fw, e->kv, &b);
    }
    moe_kv_seq_release(e->kv, &kvs);
    return st;
}

static seq_t *get_seq(const moe_engine *e, uint64_t id)
{
    int i = find_seq(e, id);
    if (i < 0)
        moe_error(MOE_ERR_NOT_FOUND, "seq_id: %llu is not on this engine", (unsigned long long)id);
    return i < 0 ? NULL : e->seqs[i];
}

moe_status moe_engine_pause(moe_engine *e, uint64_t seq_id)
{
    seq_t *s = get_seq(e, seq_id);
    if (!s)
        return MOE_ERR_NOT_FOUND;
    s->paused = true;
    return MOE_OK;
}

moe_status moe_engine_resume(moe_engine *e, uint64_t seq_id)
{
    seq_t *s = get_seq(e, seq_id);
    if (!s)
        return MOE_ERR_NOT_FOUND;
    s->paused = false;
    s->prefill_only = false;
    return MOE_OK;
}

static void layer_tramp(void *ctx, int layer)
{
    moe_engine *e = ctx;
    e->layer_fn(e->layer_ctx, layer, e->hook_ids, e->n_hook_ids);
}

void moe_engine_set_layer_hook(moe_engine *e, moe_engine_layer_hook fn, void *ctx)
{
    e->layer_fn = fn;
    e->layer_ctx = ctx;
    moe_forward_set_layer_hook(e->fw, fn ? layer_tramp : NULL, e);
}

void moe_engine_set_progress_hook(moe_engine *e, void (*fn)(void *ctx), void *ctx)
{
    moe_forward_set_progress_hook(e->fw, fn, ctx);
}

float *moe_engine_kv_layer(moe_engine *e, int block, int layer) { return moe_kv_block_k(e->kv, block, layer); }

size_t moe_engine_kv_layer_bytes(const moe_engine *e)
{
    return moe_engine_kv_block_bytes(e) / (size_t)moe_kv_get_layout(e->kv)->n_layers;
}

int moe_engine_kv_layers(const moe_engine *e) { return moe_kv_get_layout(e->kv)->n_layers; }

moe_status moe_engine_export(const moe_engine *e, uint64_t seq_id, moe_seq_state *st, const int **blocks,
                             int *n_blocks)
{
    const seq_t *s = get_seq(e, seq_id);
    if (!s)
        return MOE_ERR_NOT_FOUND;
    *st = (moe_seq_state){.seq_id = s->id, .tokens = s->tokens, .n_tokens = s->n_tokens,
                          .n_prompt = s->n_prompt, .n_generated = s->n_generated,
                          .n_computed = s->n_computed, .max_new_tokens = s->max_new,
                          .ignore_eos = s->ignore_eos, .sp = s->sp};
    *blocks = s->kv.blocks;
    *n_blocks = s->kv.n_blocks;
    return MOE_OK;
}

/* Copies the movable state into s (tokens included) without touching its KV. */
static void apply_state(seq_t *s, const moe_seq_state *st)
{
    memcpy(s->tokens, st->tokens, (size_t)st->n_tokens * sizeof(int32_t));
    s->n_tokens = st->n_tokens;
    s->n_prompt = st->n_prompt;
    s->n_generated = st->n_generated;
    s->n_computed = st->n_computed;
}

moe_status moe_engine_import(moe_engine *e, const moe_seq_state *st, const int **blocks, int *n_blocks)
{
    if (st->n_tokens <= 0 || st->n_computed < 0 || st->n_computed > st->n_tokens ||
        st->n_prompt > st->n_tokens || st->n_tokens - st->n_prompt != st->n_generated)
        return moe_error(MOE_ERR_INVALID_ARG, "import: inconsistent sequence state (%d tokens, %d prompt, "
                         "%d generated, %d computed)", st->n_tokens, st->n_prompt, st->n_generated, st->n_computed);
    seq_t *s;
    moe_status rc = add_seq(e, st->seq_id, st->tokens, st->n_prompt, &st->sp, st->max_new_tokens,
                            st->ignore_eos, &s);
    if (rc != MOE_OK)
        return rc;
    if (st->n_tokens > s->cap) {
        remove_at(e, find_seq(e, s->id));
        return moe_error(MOE_ERR_INVALID_ARG, "import: %d tokens exceed the sequence's limit %d", st->n_tokens,
                         s->cap);
    }
    s->paused = true;
    apply_state(s, st);
    if ((rc = moe_kv_seq_reserve(e->kv, &s->kv, st->n_computed)) != MOE_OK) {
        remove_at(e, find_seq(e, s->id));
        return rc;
    }
    *blocks = s->kv.blocks;
    *n_blocks = s->kv.n_blocks;
    return MOE_OK;
}

moe_status moe_engine_import_extend(moe_engine *e, uint64_t seq_id, const moe_seq_state *st,
                                    const int **blocks, int *n_blocks)
{
    seq_t *s = get_seq(e, seq_id);
    if (!s)
        return MOE_ERR_NOT_FOUND;
    if (!s->paused || st->n_tokens > s->cap || st->n_computed < s->n_computed)
        return moe_error(MOE_ERR_INVALID_ARG, "import: seq %llu cannot be extended to %d positions",
                         (unsigned long long)seq_id, st->n_computed);
    moe_status rc = moe_kv_seq_reserve(e->kv, &s->kv, st->n_computed);
    if (rc != MOE_OK)
        return rc;
    apply_state(s, st);
    *blocks = s->kv.blocks;
    *n_blocks = s->kv.n_blocks;
    return MOE_OK;
}

float *moe_engine_kv_block(moe_engine *e, int block) { return moe_kv_block_data(e->kv, block); }
bool moe_engine_kv_host_access(const moe_engine *e) { return moe_kv_host_access(e->kv); }
moe_kv_cache *moe_engine_kv_cache(moe_engine *e) { return e->kv; }
moe_status moe_engine_kv_read(moe_engine *e, int block, size_t off, void *dst, size_t n)
{
    return moe_kv_read(e->kv, block, off, dst, n);
}
moe_status moe_engine_kv_write(moe_engine *e, int block, size_t off, const void *src, size_t n)
{
    return moe_kv_write(e->kv, block, off, src, n);
}

size_t moe_engine_kv_block_bytes(const moe_engine *e) { return moe_kv_block_bytes(moe_kv_get_layout(e->kv)); }

int moe_engine_kv_block_size(const moe_engine *e) { return moe_kv_get_layout(e->kv)->block_size; }
