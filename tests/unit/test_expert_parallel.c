/* Expert parallelism: E threads with a loopback comm, each loading only its experts, give the same
 * logits (f32: max abs diff <= 1e-5) and greedy tokens as one rank holding every expert, including
 * steps where some ranks have no tokens at all. */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/engine.h"

#define FIXTURES MOE_SOURCE_DIR "/tests/reference/fixtures/models/"
#define N_PROMPT 13
#define N_NEW 12
#define MAX_RANKS 4

static void prompt_for(int rank, int vocab, int32_t *ids)
{
    uint32_t x = 2654435761u * (uint32_t)(rank + 1);
    for (int i = 0; i < N_PROMPT; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)((x >> 8) % (uint32_t)vocab);
    }
}

static const moe_engine_opts base_opts = {.n_threads = 1, .block_size = 4, .n_kv_blocks = 64,
                                          .max_batch_tokens = 32, .max_seqs = 4};

/* Single-rank reference: logits of every prompt position and the greedy continuation. */
static void reference(const char *dir, int rank, float *logits, int32_t *greedy)
{
    moe_model *m;
    cr_assert_eq(moe_model_load(dir, NULL, &m), MOE_OK, "%s", moe_error_message());
    moe_engine *e;
    cr_assert_eq(moe_engine_create(m, &base_opts, &e), MOE_OK, "%s", moe_error_message());
    int32_t ids[N_PROMPT];
    prompt_for(rank, m->cfg.vocab_size, ids);
    cr_assert_eq(moe_engine_logits(e, ids, N_PROMPT, 5, logits), MOE_OK, "%s", moe_error_message());
    moe_sampling_params sp = {.temperature = 0, .top_p = 1};
    cr_assert_eq(moe_engine_add(e, 1, ids, N_PROMPT, &sp, N_NEW, true), MOE_OK);
    int k = 0;
    moe_token_event ev[4];
    while (moe_engine_has_work(e)) {
        int n = moe_engine_step(e, ev, 4);
        cr_assert_geq(n, 0, "%s", moe_error_message());
        for (int i = 0; i < n; i++)
            greedy[k++] = ev[i].token;
    }
    cr_assert_eq(k, N_NEW);
    moe_engine_free(e);
    moe_model_free(m);
}

typedef struct {
    const char *dir;
    moe_comm *comm;
    moe_ep_placement *place;
    int rank;
    bool generate;      /* this rank runs a sequence in phase 2 (others only serve experts) */
    float *logits;      /* out: (N_PROMPT, vocab) */
    int32_t greedy[N_NEW];
    int n_greedy;
    size_t weight_bytes;
    char error[512];
} rank_job;

static void *rank_main(void *arg)
{
    rank_job *j = arg;
    moe_model *m = NULL;
    moe_engine *e = NULL;
    bool mask[256] = {false};
    for (int x = 0; x < j->place->n_experts && x < 256; x++)
        mask[x] = moe_ep_placement_holds(j->place, j->rank, x);
    moe_model_load_opts lo = {.expert_mask = mask};
    moe_engine_opts eo = base_opts;
    eo.ep_comm = j->comm;
    eo.ep_placement = j->place;
    int32_t ids[N_PROMPT];
    if (moe_model_load(j->dir, &lo, &m) != MOE_OK || moe_engine_create(m, &eo, &e) != MOE_OK) {
        snprintf(j->error, sizeof j->error, "rank %d: %s", j->rank, moe_error_message());
        return NULL; /* the others would hang in the exchange: the test fails on the timeout */
    }
    j->weight_bytes = moe_model_weight_bytes(m);
    prompt_for(j->rank, m->cfg.vocab_size, ids);
    /* Phase 1: every rank has its own prompt (same length, so the same number of steps). */
    if (moe_engine_logits(e, ids, N_PROMPT, 5, j->logits) != MOE_OK)
        snprintf(j->error, sizeof j->error, "rank %d: %s", j->rank, moe_error_message());
    /* Phase 2: only some ranks generate; all step together until nobody has work. */
    moe_sampling_params sp = {.temperature = 0, .top_p = 1};
    if (j->generate)
        moe_engine_add(e, 1, ids, N_PROMPT, &sp, N_NEW, true);
    for (;;) {
        int any = moe_engine_has_work(e) ? 1 : 0;
        j->comm->ops->allreduce_sum_int(j->comm->ctx, &any);
        if (!any)
            break;
        moe_token_event ev[4];
        int n = moe_engine_step(e, ev, 4);
        if (n < 0) {
            snprintf(j->error, sizeof j->error, "rank %d: step: %s", j->rank, moe_error_message());
            break;
        }
        for (int i = 0; i < n; i++)
            j->greedy[j->n_greedy++] = ev[i].token;
    }
    moe_engine_free(e);
    moe_model_free(m);
    return NULL;
}

static void check_model_replicas(const char *name, int ep, int n_redundant)
{
    char dir[1024];
    snprintf(dir, sizeof dir, FIXTURES "%s", name);
    moe_model *m;
    cr_assert_eq(moe_model_load(dir, NULL, &m), MOE_OK, "%s", moe_error_message());
    int vocab = m->cfg.vocab_size, n_exp = m->cfg.n_experts;
    size_t full_bytes = moe_model_weight_bytes(m);
    moe_model_free(m);

    moe_comm *comms;
    cr_assert_eq(moe_comm_loopback_create(ep, &comms), MOE_OK);
    moe_ep_placement place;
    cr_assert_eq(moe_ep_placement_contiguous(n_exp, ep, &place), MOE_OK);
    for (int i = 0; i < n_redundant; i++) /* replicas of the first experts on the last rank */
        cr_assert_eq(moe_ep_placement_add_replica(&place, i, ep - 1), MOE_OK);
    rank_job jobs[MAX_RANKS];
    pthread_t th[MAX_RANKS];
    for (int r = 0; r < ep; r++) {
        jobs[r] = (rank_job){.dir = dir, .comm = &comms[r], .place = &place, .rank = r,
                             .generate = r % 2 == 0, /* odd ranks idle: they only serve experts */
                             .logits = malloc(sizeof(float) * N_PROMPT * (size_t)vocab)};
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    for (int r = 0; r < ep; r++)
        pthread_join(th[r], NULL);
    float *ref = malloc(sizeof(float) * N_PROMPT * (size_t)vocab);
    for (int r = 0; r < ep; r++) {
        cr_assert_str_empty(jobs[r].error, "%s ep=%d: %s", name, ep, jobs[r].error);
        int32_t greedy[N_NEW];
        reference(dir, r, ref, greedy);
        double md = 0;
        for (size_t i = 0; i < (size_t)N_PROMPT * vocab; i++)
            md = fmax(md, fabs((double)ref[i] - jobs[r].logits[i]));
        cr_assert_leq(md, 1e-5, "%s ep=%d rank %d: logits differ by %g", name, ep, r, md);
        if (jobs[r].generate) {
            cr_assert_eq(jobs[r].n_greedy, N_NEW);
            cr_assert_arr_eq(jobs[r].greedy, greedy, sizeof greedy, "%s ep=%d rank %d: greedy differs", name, ep, r);
        } else {
            cr_assert_eq(jobs[r].n_greedy, 0);
        }
        if (ep > 1)
            cr_assert_lt(jobs[r].weight_bytes, full_bytes, "%s ep=%d rank %d maps all weights", name, ep, r);
        free(jobs[r].logits);
    }
    free(ref);
    moe_ep_placement_free(&place);
    moe_comm_loopback_free(comms, ep);
}

static void check_model(const char *name, int ep) { check_model_replicas(name, ep, 0); }

#define EP_TEST(model)                                   \
    Test(expert_parallel, model, .timeout = 120)         \
    {                                                    \
        check_model(#model, 1);                          \
        check_model(#model, 2);                          \
        check_model(#model, 4);                          \
        check_model_replicas(#model, 2, 2);              \
    }

EP_TEST(mixtral_f32)
EP_TEST(qwen2_moe_f32)
EP_TEST(olmoe_f32)
EP_TEST(qwen3_moe_f32)

Test(expert_parallel, placement_is_contiguous_and_balanced)
{
    moe_ep_placement p;
    cr_assert_eq(moe_ep_placement_contiguous(10, 4, &p), MOE_OK);
    int total = 0;
    for (int r = 0; r < 4; r++) {
        int n = p.range_end[r] - p.range_begin[r];
        cr_assert(n == 2 || n == 3);
        total += n;
        if (r > 0)
            cr_assert_eq(p.range_begin[r], p.range_end[r - 1]);
    }
    cr_assert_eq(total, 10);
    cr_assert(moe_ep_placement_holds(&p, 3, 9));
    cr_assert_eq(moe_ep_placement_add_replica(&p, 9, 0), MOE_OK);
    cr_assert(moe_ep_placement_holds(&p, 0, 9));
    cr_assert_eq(p.n_holders[9], 2);
    moe_ep_placement_free(&p);
    cr_assert_eq(moe_ep_placement_contiguous(2, 3, &p), MOE_ERR_INVALID_ARG);
}
