/* Engine behaviour beyond the HF reference: refused inputs name the field, KV usage returns to zero
 * after finishing and cancelling, preemption under a tiny KV cache keeps greedy and seeded outputs
 * exact, and a seeded token depends only on (seed, index), also in a restarted engine. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "worker/engine.h"

#define MODEL MOE_SOURCE_DIR "/tests/reference/fixtures/models/qwen3_moe_f32"

static moe_model *model;

static void setup(void)
{
    cr_assert_eq(moe_model_load(MODEL, NULL, &model), MOE_OK, "%s", moe_error_message());
}

static void teardown(void)
{
    moe_model_free(model);
}

TestSuite(engine, .init = setup, .fini = teardown);

static const moe_sampling_params greedy = {.temperature = 0, .top_p = 1};

Test(engine, bad_prompts_are_refused_naming_the_field)
{
    moe_engine_opts o = {.n_threads = 1, .max_seqs = 4};
    moe_engine *e;
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK);
    int32_t ok[3] = {1, 2, 3};
    cr_assert_eq(moe_engine_add(e, 1, ok, 0, &greedy, 4, false), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "prompt"), "%s", moe_error_message());
    int32_t bad[2] = {1, model->cfg.vocab_size};
    cr_assert_eq(moe_engine_add(e, 2, bad, 2, &greedy, 4, false), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "outside the vocabulary"), "%s", moe_error_message());
    int n_long = model->cfg.max_position;
    int32_t *lng = calloc((size_t)n_long, sizeof *lng);
    cr_assert_eq(moe_engine_add(e, 3, lng, n_long, &greedy, 4, false), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "context"), "%s", moe_error_message());
    free(lng);
    cr_assert_eq(moe_engine_add(e, 4, ok, 3, &greedy, 0, false), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "max_new_tokens"), "%s", moe_error_message());
    cr_assert_eq(moe_engine_add(e, 5, ok, 3, &greedy, 4, false), MOE_OK);
    cr_assert_eq(moe_engine_add(e, 5, ok, 3, &greedy, 4, false), MOE_ERR_INVALID_ARG, "duplicate id");
    cr_assert_eq(moe_engine_finish(e, 99), MOE_ERR_NOT_FOUND);
    moe_engine_free(e);
}

static int used_blocks(const moe_engine *e)
{
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    return st.kv_blocks_used;
}

Test(engine, kv_usage_returns_to_zero_after_finish_and_cancel)
{
    moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 8};
    moe_engine *e;
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK);
    int32_t p[9] = {5, 6, 7, 8, 9, 10, 11, 12, 13};
    for (uint64_t id = 1; id <= 4; id++)
        cr_assert_eq(moe_engine_add(e, id, p, 9, &greedy, 8 + (int)id, true), MOE_OK);
    moe_token_event ev[8];
    for (int i = 0; i < 3; i++)
        cr_assert_geq(moe_engine_step(e, ev, 8), 0);
    cr_assert_gt(used_blocks(e), 0);
    cr_assert_eq(moe_engine_finish(e, 2), MOE_OK); /* a cancel mid-stream */
    while (moe_engine_has_work(e))
        cr_assert_geq(moe_engine_step(e, ev, 8), 0);
    cr_assert_eq(used_blocks(e), 0, "KV blocks still held after every sequence ended");
    moe_engine_free(e);
}

/* Tokens of sequences with a roomy cache, then with a cache so small that sequences preempt each
 * other (recompute): the tokens must not change. */
static int64_t run(const moe_engine_opts *o, const moe_sampling_params *sp, int n_seqs, int32_t out[][24])
{
    moe_engine *e;
    cr_assert_eq(moe_engine_create(model, o, &e), MOE_OK, "%s", moe_error_message());
    for (int s = 0; s < n_seqs; s++) {
        int32_t p[6] = {10 + s, 20 + s, 30, 40, 50, 60 + s};
        cr_assert_eq(moe_engine_add(e, (uint64_t)s, p, 6, sp, 24, true), MOE_OK, "%s", moe_error_message());
    }
    int n[8] = {0};
    moe_token_event ev[8];
    while (moe_engine_has_work(e)) {
        int k = moe_engine_step(e, ev, 8);
        cr_assert_geq(k, 0, "%s", moe_error_message());
        for (int i = 0; i < k; i++) {
            cr_assert_eq(ev[i].index, n[ev[i].seq_id], "token index must count up without gaps");
            out[ev[i].seq_id][n[ev[i].seq_id]++] = ev[i].token;
        }
    }
    for (int s = 0; s < n_seqs; s++)
        cr_assert_eq(n[s], 24);
    cr_assert_eq(used_blocks(e), 0);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    moe_engine_free(e);
    return st.preemptions;
}

Test(engine, preemption_by_recompute_keeps_outputs_exact)
{
    int32_t roomy[4][24], tight[4][24];
    moe_engine_opts big = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 256, .max_seqs = 4};
    moe_engine_opts small = big;
    small.n_kv_blocks = 10; /* 4 sequences of 30 positions need 32 blocks: they must take turns */
    const moe_sampling_params seeded = {.temperature = 0.9f, .top_p = 0.95f, .seed = 77};
    const moe_sampling_params *modes[2] = {&greedy, &seeded};
    for (int m = 0; m < 2; m++) {
        cr_assert_eq(run(&big, modes[m], 4, roomy), 0);
        cr_assert_gt(run(&small, modes[m], 4, tight), 0, "the small cache must force preemptions");
        cr_assert_arr_eq(roomy, tight, sizeof roomy, "%s outputs changed by preemption", m ? "seeded" : "greedy");
    }
}

/* The layer hook: called once per layer of a step; the prefill-only sequence is named only in the
 * step that completes its prompt, and each layer's slice of its blocks is final when named (a copy
 * taken inside the hook equals the cache after the step). */
typedef struct {
    moe_engine *e;
    uint64_t want;
    int calls, named_calls, layers_named;
    unsigned char *snap; /* [layers][blocks][layer bytes] */
    int n_blocks;
} hook_rec;

static void record_layer(void *ctx, int layer, const uint64_t *ids, int n)
{
    hook_rec *h = ctx;
    h->calls++;
    for (int i = 0; i < n; i++) {
        if (ids[i] != h->want)
            continue;
        h->named_calls++;
        cr_assert_eq(layer, h->layers_named, "layers are named in order");
        h->layers_named++;
        moe_seq_state st;
        const int *blocks;
        cr_assert_eq(moe_engine_export(h->e, ids[i], &st, &blocks, &h->n_blocks), MOE_OK);
        size_t lb = moe_engine_kv_layer_bytes(h->e);
        if (!h->snap)
            h->snap = calloc((size_t)moe_engine_kv_layers(h->e) * (size_t)h->n_blocks, lb);
        for (int b = 0; b < h->n_blocks; b++)
            memcpy(h->snap + ((size_t)layer * (size_t)h->n_blocks + (size_t)b) * lb,
                   moe_engine_kv_layer(h->e, blocks[b], layer), lb);
    }
}

Test(engine, layer_hook_names_completing_prompts_with_final_kv)
{
    moe_engine *e;
    moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_batch_tokens = 8};
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
    hook_rec h = {.e = e, .want = 7};
    moe_engine_set_layer_hook(e, record_layer, &h);
    int32_t prompt[19];
    for (int i = 0; i < 19; i++)
        prompt[i] = 3 + i * 5;
    cr_assert_eq(moe_engine_add_prefill_only(e, 7, prompt, 19, &greedy, 8, false), MOE_OK);
    moe_token_event ev[4];
    int layers = moe_engine_kv_layers(e), steps = 0, n = 0;
    while (n == 0) { /* 19 tokens in chunks of 8: three steps, the last one completes the prompt */
        n = moe_engine_step(e, ev, 4);
        cr_assert_geq(n, 0, "%s", moe_error_message());
        steps++;
    }
    cr_assert_eq(steps, 3);
    cr_assert(ev[0].parked);
    cr_assert_eq(h.calls, 3 * layers, "one call per layer per step");
    cr_assert_eq(h.named_calls, layers, "named only in the completing step");
    moe_seq_state st;
    const int *blocks;
    int nb;
    cr_assert_eq(moe_engine_export(e, 7, &st, &blocks, &nb), MOE_OK);
    cr_assert_eq(nb, h.n_blocks);
    size_t lb = moe_engine_kv_layer_bytes(e);
    cr_assert_eq(lb * (size_t)layers, moe_engine_kv_block_bytes(e));
    for (int l = 0; l < layers; l++)
        for (int b = 0; b < nb; b++)
            cr_assert(!memcmp(h.snap + ((size_t)l * (size_t)nb + (size_t)b) * lb,
                              moe_engine_kv_layer(e, blocks[b], l), lb),
                      "layer %d block %d changed after the hook named it", l, b);
    free(h.snap);
    moe_engine_free(e);
}

/* Seeded sampling is a function of (seed, token index) only: a fresh engine (a restart, another
 * instance re-prefilling after a crash) given a sequence's state at token k, with no KV at all,
 * and sharing its steps with an unrelated sequence, samples tokens k.. exactly as the engine
 * that ran the sequence from its prompt. */
#define SEEDED_NEW 20
static void run_seeded(const moe_sampling_params *sp, int32_t out[SEEDED_NEW])
{
    moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 4};
    moe_engine *e;
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
    int32_t p[7] = {11, 23, 35, 47, 59, 61, 73};
    cr_assert_eq(moe_engine_add(e, 1, p, 7, sp, SEEDED_NEW, true), MOE_OK, "%s", moe_error_message());
    moe_token_event ev[4];
    int n = 0;
    while (moe_engine_has_work(e)) {
        int k = moe_engine_step(e, ev, 4);
        cr_assert_geq(k, 0, "%s", moe_error_message());
        for (int i = 0; i < k; i++)
            out[n++] = ev[i].token;
    }
    cr_assert_eq(n, SEEDED_NEW);
    moe_engine_free(e);
}

static void check_restarts(const moe_sampling_params *spp)
{
    const moe_sampling_params sp = *spp;
    moe_sampling_params other = sp;
    other.seed++;
    int32_t ref[SEEDED_NEW], g[SEEDED_NEW], o2[SEEDED_NEW];
    run_seeded(&sp, ref);
    run_seeded(&greedy, g);
    run_seeded(&other, o2);
    /* the test means something only if the draws choose the tokens */
    cr_assert(memcmp(ref, g, sizeof ref), "seeded output equals greedy: the draws decide nothing");
    cr_assert(memcmp(ref, o2, sizeof ref), "another seed gave the same tokens");

    const int32_t p[7] = {11, 23, 35, 47, 59, 61, 73};
    const int ks[] = {1, 2, 7, 13, SEEDED_NEW - 1};
    for (size_t t = 0; t < sizeof ks / sizeof ks[0]; t++) {
        int k = ks[t];
        moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 4};
        moe_engine *e;
        cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
        int32_t toks[7 + SEEDED_NEW], noise[5] = {3, 1, 4, 1, 5};
        memcpy(toks, p, sizeof p);
        memcpy(toks + 7, ref, (size_t)k * sizeof(int32_t));
        moe_sampling_params noise_sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 5};
        cr_assert_eq(moe_engine_add(e, 9, noise, 5, &noise_sp, 30, true), MOE_OK); /* other draws in between */
        moe_seq_state st = {.seq_id = 1, .tokens = toks, .n_tokens = 7 + k, .n_prompt = 7, .n_generated = k,
                            .n_computed = 0, .max_new_tokens = SEEDED_NEW, .ignore_eos = true, .sp = sp};
        const int *blocks;
        int nb;
        cr_assert_eq(moe_engine_import(e, &st, &blocks, &nb), MOE_OK, "%s", moe_error_message());
        cr_assert_eq(nb, 0, "nothing computed: no KV to fill");
        cr_assert_eq(moe_engine_resume(e, 1), MOE_OK);
        moe_token_event ev[4];
        int next = k;
        while (moe_engine_has_work(e)) {
            int n = moe_engine_step(e, ev, 4);
            cr_assert_geq(n, 0, "%s", moe_error_message());
            for (int i = 0; i < n; i++) {
                if (ev[i].seq_id != 1)
                    continue;
                cr_assert_eq(ev[i].index, next, "restart at %d: index %d", k, ev[i].index);
                cr_assert_eq(ev[i].token, ref[next], "restart at %d: token %d is %d, %d from the start", k, next,
                             ev[i].token, ref[next]);
                next++;
            }
        }
        cr_assert_eq(next, SEEDED_NEW, "restart at %d ended at %d", k, next);
        moe_engine_free(e);
    }
}

Test(engine, seeded_token_depends_only_on_seed_and_index_after_restart)
{
    const moe_sampling_params sp = {.temperature = 1.5f, .top_p = 0.95f, .seed = 20261203};
    check_restarts(&sp);
}

/* Penalties depend on the tokens so far, which the moved state carries: a sequence restarted
 * from its tokens continues exactly, penalised as it would have been. */
Test(engine, penalised_sampling_continues_exactly_after_restart)
{
    const moe_sampling_params sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 77,
                                    .presence_penalty = 1.5f, .frequency_penalty = 0.7f,
                                    .repetition_penalty = 1.8f, .logprobs = true, .top_logprobs = 3};
    moe_sampling_params plain = sp;
    plain.presence_penalty = plain.frequency_penalty = 0.0f;
    plain.repetition_penalty = 1.0f;
    int32_t a[SEEDED_NEW], b[SEEDED_NEW];
    run_seeded(&sp, a);
    run_seeded(&plain, b);
    cr_assert(memcmp(a, b, sizeof a), "the penalties changed no token: the test means nothing");
    check_restarts(&sp);
    /* resumed after a lost instance (StartSeq.generated): prompt + the streamed tokens */
    const int32_t p[7] = {11, 23, 35, 47, 59, 61, 73};
    for (int k = 1; k < SEEDED_NEW; k += 6) {
        moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 4};
        moe_engine *e;
        cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
        cr_assert_eq(moe_engine_add_resumed(e, 1, p, 7, a, k, &sp, SEEDED_NEW, true, false), MOE_OK,
                     "%s", moe_error_message());
        moe_token_event ev[4];
        int next = k;
        while (moe_engine_has_work(e)) {
            int n = moe_engine_step(e, ev, 4);
            cr_assert_geq(n, 0, "%s", moe_error_message());
            for (int i = 0; i < n; i++, next++)
                cr_assert_eq(ev[i].token, a[next], "resumed at %d: token %d is %d, %d uninterrupted", k,
                             next, ev[i].token, a[next]);
        }
        cr_assert_eq(next, SEEDED_NEW);
        moe_engine_free(e);
    }
}

/* The logprobs the engine reports are the log-softmax of the logits it drew from:
 * at temperature 1 without penalties, of the model's own logits (moe_engine_logits). */
Test(engine, logprobs_are_the_log_softmax_of_the_model_logits)
{
    moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 4};
    moe_engine *e;
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
    const int32_t p[5] = {11, 23, 35, 47, 59};
    const moe_sampling_params sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 9, .logprobs = true,
                                    .top_logprobs = 5};
    cr_assert_eq(moe_engine_add(e, 1, p, 5, &sp, 4, true), MOE_OK, "%s", moe_error_message());
    int32_t toks[9];
    memcpy(toks, p, sizeof p);
    moe_token_logprobs lp[4];
    int n = 0;
    moe_token_event ev[4];
    while (moe_engine_has_work(e)) {
        int k = moe_engine_step(e, ev, 4);
        cr_assert_geq(k, 0, "%s", moe_error_message());
        for (int i = 0; i < k; i++) {
            cr_assert(ev[i].has_lp);
            lp[n] = ev[i].lp;
            toks[5 + n++] = ev[i].token;
        }
    }
    cr_assert_eq(n, 4);
    int vocab = model->cfg.vocab_size;
    float *logits = malloc((size_t)9 * (size_t)vocab * sizeof(float));
    cr_assert_eq(moe_engine_logits(e, toks, 8, 0, logits), MOE_OK, "%s", moe_error_message());
    for (int t = 0; t < 4; t++) {
        const float *row = logits + (size_t)(4 + t) * (size_t)vocab; /* predicts toks[5 + t] */
        double mx = row[0], sum = 0.0;
        for (int v = 1; v < vocab; v++)
            mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < vocab; v++)
            sum += exp(row[v] - mx);
        double lse = mx + log(sum);
        cr_assert_float_eq(lp[t].logprob, row[toks[5 + t]] - lse, 1e-4, "token %d", t);
        cr_assert_eq(lp[t].n_top, 5);
        for (int k = 0; k < 5; k++) {
            cr_assert_float_eq(lp[t].top_logprobs[k], row[lp[t].top_ids[k]] - lse, 1e-4);
            if (k)
                cr_assert_geq(lp[t].top_logprobs[k - 1], lp[t].top_logprobs[k]);
            int above = 0; /* the k-th most likely: exactly k ids score higher */
            for (int v = 0; v < vocab; v++)
                above += row[v] > row[lp[t].top_ids[k]];
            cr_assert_leq(above, k, "top %d of token %d", k, t);
        }
    }
    free(logits);
    moe_engine_free(e);
}

/* n choices of one prompt: siblings share the parent's prefill (its prompt is computed once, the
 * full KV blocks are shared) and still generate exactly what each would alone with its seed. */
Test(engine, siblings_share_the_prefill_and_sample_as_alone)
{
    enum { NS = 3, NEW = 12 };
    const int32_t p[11] = {11, 23, 35, 47, 59, 61, 73, 5, 9, 13, 17}; /* 2 full blocks + 3 */
    moe_sampling_params sp[NS];
    int32_t alone[NS][NEW];
    for (int k = 0; k < NS; k++) {
        sp[k] = (moe_sampling_params){.temperature = 1.0f, .top_p = 1.0f, .seed = 500 + (uint64_t)k,
                                      .presence_penalty = 0.5f};
        moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 4};
        moe_engine *e;
        cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
        cr_assert_eq(moe_engine_add(e, 1, p, 11, &sp[k], NEW, true), MOE_OK);
        moe_token_event ev[4];
        int n = 0;
        while (moe_engine_has_work(e)) {
            int m = moe_engine_step(e, ev, 4);
            cr_assert_geq(m, 0, "%s", moe_error_message());
            for (int i = 0; i < m; i++)
                alone[k][n++] = ev[i].token;
        }
        cr_assert_eq(n, NEW);
        moe_engine_free(e);
    }
    cr_assert(memcmp(alone[0], alone[1], sizeof alone[0]), "seeds gave the same tokens");

    moe_engine_opts o = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_seqs = 4};
    moe_engine *e;
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_engine_add(e, 10, p, 11, &sp[0], NEW, true), MOE_OK);
    for (int k = 1; k < NS; k++)
        cr_assert_eq(moe_engine_add_sibling(e, 10, 10 + (uint64_t)k, &sp[k]), MOE_OK, "%s",
                     moe_error_message());
    cr_assert_eq(moe_engine_add_sibling(e, 99, 20, &sp[0]), MOE_ERR_NOT_FOUND);
    int next[NS] = {0}, steps = 0;
    moe_token_event ev[8];
    while (moe_engine_has_work(e)) {
        int m = moe_engine_step(e, ev, 8);
        cr_assert_geq(m, 0, "%s", moe_error_message());
        if (++steps == 1) {
            cr_assert_eq(m, NS, "every choice's first token in the prefill's step");
            moe_engine_stats st;
            moe_engine_get_stats(e, &st);
            cr_assert_eq(st.prefill_tokens, 11, "the prompt prefilled once, not %d times",
                         (int)(st.prefill_tokens / 11));
            /* 3 blocks for the parent; each sibling shares 2 and copies the partial third */
            cr_assert_eq(st.kv_blocks_used, 3 + (NS - 1), "blocks in use %d", st.kv_blocks_used);
        }
        for (int i = 0; i < m; i++) {
            int k = (int)(ev[i].seq_id - 10);
            cr_assert_eq(ev[i].index, next[k]);
            cr_assert_eq(ev[i].token, alone[k][next[k]], "choice %d token %d: %d, alone %d", k,
                         next[k], ev[i].token, alone[k][next[k]]);
            next[k]++;
        }
    }
    for (int k = 0; k < NS; k++)
        cr_assert_eq(next[k], NEW, "choice %d: %d tokens", k, next[k]);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    cr_assert_eq(st.kv_blocks_used, 0, "KV left behind");
    /* a parent cancelled before its prefill: the sibling prefills on its own */
    cr_assert_eq(moe_engine_add(e, 30, p, 11, &sp[0], 2, true), MOE_OK);
    cr_assert_eq(moe_engine_add_sibling(e, 30, 31, &sp[1]), MOE_OK);
    cr_assert_eq(moe_engine_finish(e, 30), MOE_OK);
    int got = 0;
    while (moe_engine_has_work(e)) {
        int m = moe_engine_step(e, ev, 8);
        for (int i = 0; i < m; i++) {
            cr_assert_eq(ev[i].seq_id, 31);
            cr_assert_eq(ev[i].token, alone[1][got++]);
        }
    }
    cr_assert_eq(got, 2);
    moe_engine_free(e);
}
