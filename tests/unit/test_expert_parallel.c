/* Expert parallelism: E threads with a loopback comm, each loading only its experts, give the same
 * logits (f32: max abs diff <= 1e-5) and greedy tokens as one rank holding every expert, including
 * steps where some ranks have no tokens at all; with two-batch overlap on (split by experts or by
 * tokens), the very same floats as the plain exchange. Also the loopback backend's non-blocking
 * all-to-all-v on its own. */
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

static const moe_engine_opts base_opts = {
    .n_threads = 1, .block_size = 4, .n_kv_blocks = 64, .max_batch_tokens = 32, .max_seqs = 4};

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
    bool generate; /* this rank runs a sequence in phase 2 (others only serve experts) */
    int overlap;   /* moe_ep_overlap_mode of the exchange */
    float *logits; /* out: (N_PROMPT, vocab) */
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
    eo.ep_overlap = j->overlap;
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

/* Runs the group: one thread per rank over a loopback comm; jobs[r].logits must be allocated. */
static void run_group(const char *dir, int ep, moe_ep_placement *place, int overlap, rank_job *jobs)
{
    moe_comm *comms;
    cr_assert_eq(moe_comm_loopback_create(ep, &comms), MOE_OK);
    pthread_t th[MAX_RANKS];
    for (int r = 0; r < ep; r++) {
        float *logits = jobs[r].logits;
        jobs[r] = (rank_job){.dir = dir,
                             .comm = &comms[r],
                             .place = place,
                             .rank = r,
                             .generate = r % 2 == 0, /* odd ranks idle: they only serve experts */
                             .overlap = overlap,
                             .logits = logits};
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    for (int r = 0; r < ep; r++)
        pthread_join(th[r], NULL);
    moe_comm_loopback_free(comms, ep);
}

static void check_model_opts(const char *name, int ep, int n_redundant, int overlap)
{
    char dir[1024];
    snprintf(dir, sizeof dir, FIXTURES "%s", name);
    moe_model *m;
    cr_assert_eq(moe_model_load(dir, NULL, &m), MOE_OK, "%s", moe_error_message());
    int vocab = m->cfg.vocab_size, n_exp = m->cfg.n_experts;
    size_t full_bytes = moe_model_weight_bytes(m);
    moe_model_free(m);

    moe_ep_placement place;
    cr_assert_eq(moe_ep_placement_contiguous(n_exp, ep, &place), MOE_OK);
    for (int i = 0; i < n_redundant; i++) /* replicas of the first experts on the last rank */
        cr_assert_eq(moe_ep_placement_add_replica(&place, i, ep - 1), MOE_OK);
    size_t nl = N_PROMPT * (size_t)vocab;
    rank_job jobs[MAX_RANKS], plain[MAX_RANKS];
    for (int r = 0; r < ep; r++) {
        jobs[r].logits = malloc(sizeof(float) * nl);
        plain[r].logits = overlap ? malloc(sizeof(float) * nl) : NULL;
    }
    run_group(dir, ep, &place, overlap, jobs);
    if (overlap) /* the same group without overlap: the results must be the same floats */
        run_group(dir, ep, &place, MOE_EP_OVERLAP_OFF, plain);
    float *ref = malloc(sizeof(float) * nl);
    const char *mode = overlap == MOE_EP_OVERLAP_EXPERTS  ? "overlap/experts"
                       : overlap == MOE_EP_OVERLAP_TOKENS ? "overlap/tokens"
                                                          : "plain";
    for (int r = 0; r < ep; r++) {
        cr_assert_str_empty(jobs[r].error, "%s ep=%d %s: %s", name, ep, mode, jobs[r].error);
        int32_t greedy[N_NEW];
        reference(dir, r, ref, greedy);
        double md = 0;
        for (size_t i = 0; i < nl; i++)
            md = fmax(md, fabs((double)ref[i] - jobs[r].logits[i]));
        cr_assert_leq(md, 1e-5, "%s ep=%d %s rank %d: logits differ by %g", name, ep, mode, r, md);
        if (jobs[r].generate) {
            cr_assert_eq(jobs[r].n_greedy, N_NEW);
            cr_assert_arr_eq(jobs[r].greedy, greedy, sizeof greedy,
                             "%s ep=%d %s rank %d: greedy differs", name, ep, mode, r);
        } else {
            cr_assert_eq(jobs[r].n_greedy, 0);
        }
        if (overlap) {
            cr_assert_str_empty(plain[r].error, "%s ep=%d plain: %s", name, ep, plain[r].error);
            cr_assert_arr_eq(jobs[r].logits, plain[r].logits, sizeof(float) * nl,
                             "%s ep=%d rank %d: overlapped logits are not the plain exchange's",
                             name, ep, r);
            cr_assert_eq(jobs[r].n_greedy, plain[r].n_greedy);
            cr_assert_arr_eq(jobs[r].greedy, plain[r].greedy,
                             sizeof(int32_t) * (size_t)jobs[r].n_greedy);
        }
        if (ep > 1)
            cr_assert_lt(jobs[r].weight_bytes, full_bytes, "%s ep=%d rank %d maps all weights",
                         name, ep, r);
        free(jobs[r].logits);
        free(plain[r].logits);
    }
    free(ref);
    moe_ep_placement_free(&place);
}

static void check_model(const char *name, int ep)
{
    check_model_opts(name, ep, 0, MOE_EP_OVERLAP_OFF);
}

#define EP_TEST(model)                                                                             \
    Test(expert_parallel, model, .timeout = 120)                                                   \
    {                                                                                              \
        check_model(#model, 1);                                                                    \
        check_model(#model, 2);                                                                    \
        check_model(#model, 4);                                                                    \
        check_model_opts(#model, 2, 2, MOE_EP_OVERLAP_OFF);                                        \
    }                                                                                              \
    Test(expert_parallel_overlap, model, .timeout = 120)                                           \
    {                                                                                              \
        check_model_opts(#model, 1, 0, MOE_EP_OVERLAP_EXPERTS);                                    \
        check_model_opts(#model, 2, 0, MOE_EP_OVERLAP_EXPERTS);                                    \
        check_model_opts(#model, 4, 0, MOE_EP_OVERLAP_EXPERTS);                                    \
        check_model_opts(#model, 2, 2, MOE_EP_OVERLAP_EXPERTS);                                    \
        check_model_opts(#model, 2, 0, MOE_EP_OVERLAP_TOKENS);                                     \
        check_model_opts(#model, 4, 0, MOE_EP_OVERLAP_TOKENS);                                     \
        check_model_opts(#model, 4, 3, MOE_EP_OVERLAP_TOKENS);                                     \
    }

EP_TEST(mixtral_f32)
EP_TEST(qwen2_moe_f32)
EP_TEST(olmoe_f32)
EP_TEST(qwen3_moe_f32)

/* ---- the loopback backend's non-blocking all-to-all-v ---- */

#define NB_RANKS 3
#define NB_OPS 5

typedef struct {
    moe_comm *comm;
    int rank;
    char error[256];
} nb_job;

/* Op k sends, from rank r to peer p, (r + p + k) % 3 + 1 ints of value 1000k + 100r + 10p + i
 * (some peers get more than others; none is empty, the count arrays of each op are its own). */
static int nb_count(int k, int r, int p)
{
    return (r + p + k) % 3 + 1;
}

static void *nb_main(void *arg)
{
    nb_job *j = arg;
    const moe_comm_ops *ops = j->comm->ops;
    int send[NB_OPS][NB_RANKS * 3], recv[NB_OPS][NB_RANKS * 3];
    int sb[NB_OPS][NB_RANKS], so[NB_OPS][NB_RANKS], rb[NB_OPS][NB_RANKS], ro[NB_OPS][NB_RANKS];
    moe_comm_req *req[NB_OPS];
    for (int k = 0; k < NB_OPS; k++) {
        int s_at = 0, r_at = 0;
        for (int p = 0; p < NB_RANKS; p++) {
            int ns = nb_count(k, j->rank, p), nr = nb_count(k, p, j->rank);
            for (int i = 0; i < ns; i++)
                send[k][s_at + i] = 1000 * k + 100 * j->rank + 10 * p + i;
            sb[k][p] = ns * (int)sizeof(int);
            so[k][p] = s_at * (int)sizeof(int);
            rb[k][p] = nr * (int)sizeof(int);
            ro[k][p] = r_at * (int)sizeof(int);
            s_at += ns;
            r_at += nr;
        }
        memset(recv[k], 0xff, sizeof recv[k]);
        if (ops->ialltoallv(j->comm->ctx, send[k], sb[k], so[k], recv[k], rb[k], ro[k], &req[k]) !=
            MOE_OK) {
            snprintf(j->error, sizeof j->error, "rank %d post %d: %s", j->rank, k,
                     moe_error_message());
            return NULL;
        }
    }
    /* Complete out of order: the last by polling, the rest by waiting from the newest down. */
    bool done = false;
    while (!done)
        if (ops->test(j->comm->ctx, req[NB_OPS - 1], &done) != MOE_OK) {
            snprintf(j->error, sizeof j->error, "rank %d test: %s", j->rank, moe_error_message());
            return NULL;
        }
    for (int k = NB_OPS - 2; k >= 0; k--)
        if (ops->wait(j->comm->ctx, req[k]) != MOE_OK) {
            snprintf(j->error, sizeof j->error, "rank %d wait %d: %s", j->rank, k,
                     moe_error_message());
            return NULL;
        }
    for (int k = 0; k < NB_OPS; k++)
        for (int p = 0, at = 0; p < NB_RANKS; p++)
            for (int i = 0; i < nb_count(k, p, j->rank); i++, at++)
                if (recv[k][at] != 1000 * k + 100 * p + 10 * j->rank + i) {
                    snprintf(j->error, sizeof j->error, "rank %d op %d: int %d from %d is %d",
                             j->rank, k, i, p, recv[k][at]);
                    return NULL;
                }
    return NULL;
}

Test(comm_loopback, nonblocking_alltoallv_out_of_order, .timeout = 30)
{
    moe_comm *comms;
    cr_assert_eq(moe_comm_loopback_create(NB_RANKS, &comms), MOE_OK);
    cr_assert_not_null(comms[0].ops->ialltoallv);
    cr_assert_not_null(comms[0].ops->wait);
    nb_job jobs[NB_RANKS];
    pthread_t th[NB_RANKS];
    for (int r = 0; r < NB_RANKS; r++) {
        jobs[r] = (nb_job){.comm = &comms[r], .rank = r};
        pthread_create(&th[r], NULL, nb_main, &jobs[r]);
    }
    for (int r = 0; r < NB_RANKS; r++)
        pthread_join(th[r], NULL);
    for (int r = 0; r < NB_RANKS; r++)
        cr_assert_str_empty(jobs[r].error, "%s", jobs[r].error);
    /* A ninth outstanding op is refused, not overwritten. */
    moe_comm *one;
    cr_assert_eq(moe_comm_loopback_create(1, &one), MOE_OK);
    int x[9] = {0}, y[9], b = (int)sizeof(int), o = 0;
    moe_comm_req *rq[9];
    for (int k = 0; k < 8; k++)
        cr_assert_eq(one->ops->ialltoallv(one->ctx, &x[k], &b, &o, &y[k], &b, &o, &rq[k]), MOE_OK);
    cr_assert_eq(one->ops->ialltoallv(one->ctx, &x[8], &b, &o, &y[8], &b, &o, &rq[8]),
                 MOE_ERR_FULL);
    for (int k = 0; k < 8; k++)
        cr_assert_eq(one->ops->wait(one->ctx, rq[k]), MOE_OK);
    moe_comm_loopback_free(one, 1);
    moe_comm_loopback_free(comms, NB_RANKS);
}

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
