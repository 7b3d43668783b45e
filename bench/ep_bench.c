/* ep_bench: expert parallelism measured under mpirun, one rank per expert shard (E = the MPI world
 * size); each rank maps only its experts (expert mask). Three parts, printed by rank 0:
 *
 *   layer   the MoE layer alone (white box: moe_fwd_moe_layer on hidden states made from embedding
 *           rows): time per layer call and bytes exchanged per step, per batch of tokens per rank,
 *           without and with two-batch overlap;
 *   decode  decode tokens/s of the whole instance (every rank decodes its own sequences, steps in
 *           lock-step), without and with overlap;
 *   skew    a skewed workload (prompt tokens drawn from a Zipf law, so a few hidden states dominate
 *           and the routing concentrates): the measured per-rank expert load max/mean
 *           (moe_engine_expert_load), then replicas placed by moe_eplb_plan from those statistics,
 *           the model reloaded with them and the same workload measured again.
 *
 *   mpirun --oversubscribe -np E build/bench/ep_bench --model DIR [--parts layer,decode,skew]
 *          [--threads N] [--batches 1,16,64] [--iters 10] [--repeat 3] [--decode-batch 1,16]
 *          [--decode-steps 32] [--prompt 16] [--zipf 1.2] [--skew-seqs 8] [--skew-steps 32]
 * [--redundant R]
 *
 * --threads: kernel threads per rank (default: online cores / E, at least 1). Results are
 * `name=value` lines (one per figure) so a script can collect them. */
#include <getopt.h>
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/model_config.h"
#include "worker/comm_mpi.h"
#include "worker/engine.h"
#include "worker/eplb.h"
#include "worker/forward.h"
#include "worker/forward_internal.h" /* the layer part drives one MoE layer and reads its counters */
#include "worker/model.h"

#define MAX_LIST 8

typedef struct {
    const char *model_dir;
    bool part_layer, part_decode, part_skew;
    int threads;
    int batches[MAX_LIST], n_batches;
    int iters, repeat;
    int dbatches[MAX_LIST], n_dbatches;
    int decode_steps, prompt;
    double zipf;
    int skew_seqs, skew_steps, redundant;
} bench_args;

typedef struct {
    int rank, size;
    MPI_Comm world;
    moe_comm comm;
} group_t;

static int parse_list(const char *s, int *out, int cap)
{
    int n = 0;
    char *end;
    while (*s && n < cap) {
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 1 << 20)
            return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return n;
}

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

/* Loads the model with the experts `place` gives this rank. */
static moe_status load_for(const bench_args *a, const group_t *g, const moe_ep_placement *place,
                           moe_model **m)
{
    bool *mask = calloc((size_t)place->n_experts, sizeof *mask);
    if (!mask)
        return moe_error(MOE_ERR_NOMEM, "ep_bench: out of memory");
    for (int e = 0; e < place->n_experts; e++)
        mask[e] = moe_ep_placement_holds(place, g->rank, e);
    moe_model_load_opts lo = {.expert_mask = mask};
    moe_status st = moe_model_load(a->model_dir, &lo, m);
    free(mask);
    return st;
}

static double max_over_ranks(const group_t *g, double v)
{
    double r = v;
    MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, g->world);
    return r;
}

static double sum_over_ranks(const group_t *g, double v)
{
    double r = v;
    MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_SUM, g->world);
    return r;
}

/* ---- layer: one MoE layer, white box ---- */

static moe_status bench_layer(const bench_args *a, const group_t *g, const moe_model *m,
                              const moe_ep_placement *place, moe_threadpool_t *pool)
{
    const moe_model_config *c = &m->cfg;
    int max_t = 1;
    for (int i = 0; i < a->n_batches; i++)
        max_t = a->batches[i] > max_t ? a->batches[i] : max_t;
    moe_forward *f;
    moe_status st = moe_forward_create(m, pool, max_t, 1, 16, 16, &f);
    if (st != MOE_OK)
        return st;
    if ((st = moe_forward_set_ep(f, &g->comm, place)) != MOE_OK) {
        moe_forward_free(f);
        return st;
    }
    int first_moe = -1, n_moe = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (m->layers[l].is_moe) {
            n_moe++;
            if (first_moe < 0)
                first_moe = l;
        }
    if (n_moe == 0) {
        moe_forward_free(f);
        return moe_error(MOE_ERR_INVALID_ARG, "ep_bench: %s has no MoE layer", a->model_dir);
    }
    /* Inputs: normalised embedding rows of random tokens (each rank its own), like a layer's
     * post-attention norm output at the bottom of the stack. */
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(g->rank + 1);
    size_t row_bytes = (size_t)c->hidden_size * (m->embed.dtype == MOE_DT_F32 ? 4 : 2);
    for (int t = 0; t < max_t; t++) {
        int tok = (int)(rng_next(&seed) % (uint64_t)c->vocab_size);
        float *xb = f->xb + (size_t)t * c->hidden_size;
        moe_convert_to_f32(xb, (const char *)m->embed.data + (size_t)tok * row_bytes,
                           m->embed.dtype, (size_t)c->hidden_size);
        moe_rmsnorm(xb, xb, m->layers[first_moe].ffn_norm, c->hidden_size, c->rms_eps);
    }
    if (g->rank == 0)
        printf("# layer: MoE layer calls, %d MoE layers x %d iterations, best of %d interleaved "
               "repeats; time = "
               "slowest rank's mean per layer call (wait: blocked in the exchange; expert: "
               "routed-expert compute); "
               "bytes = per rank per layer call (payload rows, dispatch + combine, own share "
               "included / remote "
               "only), mean over ranks\n",
               n_moe, a->iters, a->repeat);
    /* off; overlap split by experts; split by tokens (DeepSeek's); split by experts
     * without the progress calls between matmuls */
    enum { N_MODES = 4 };
    static const char *const mode_name[N_MODES] = {"off", "experts", "tokens",
                                                   "experts-no-progress"};
    static const int mode_ov[N_MODES] = {MOE_FWD_OVERLAP_OFF, MOE_FWD_OVERLAP_EXPERTS,
                                         MOE_FWD_OVERLAP_TOKENS, MOE_FWD_OVERLAP_EXPERTS};
    for (int bi = 0; bi < a->n_batches; bi++) {
        int T = a->batches[bi];
        double best[N_MODES][5];
        for (int md = 0; md < N_MODES; md++)
            best[md][0] = 1e300;
        /* Modes interleaved and repeated, the best of each kept: the machine is shared. */
        for (int rep = 0; rep < a->repeat; rep++)
            for (int md = 0; md < N_MODES; md++) {
                moe_forward_set_ep_overlap(f, mode_ov[md]);
                f->tbo_no_progress = md == 3;
                for (int l = 0; l < c->n_layers;
                     l++) /* warm-up: page in the experts, settle the exchange */
                    if (m->layers[l].is_moe &&
                        (st = moe_fwd_moe_layer(f, &m->layers[l], l, T)) != MOE_OK)
                        goto out;
                MPI_Barrier(g->world);
                moe_fwd_ep_stat s0 = f->ep_stat;
                int64_t t0 = moe_now_ns();
                for (int it = 0; it < a->iters; it++)
                    for (int l = 0; l < c->n_layers; l++)
                        if (m->layers[l].is_moe &&
                            (st = moe_fwd_moe_layer(f, &m->layers[l], l, T)) != MOE_OK)
                            goto out;
                double wall = (double)(moe_now_ns() - t0);
                double calls = (double)(f->ep_stat.layers - s0.layers);
                double v[5] = {
                    max_over_ranks(g, wall / calls) / 1e3,
                    max_over_ranks(g, (double)(f->ep_stat.wait_ns - s0.wait_ns) / calls) / 1e3,
                    max_over_ranks(g, (double)(f->ep_stat.expert_ns - s0.expert_ns) / calls) / 1e3,
                    sum_over_ranks(g, (double)(f->ep_stat.bytes_sent - s0.bytes_sent) / calls) /
                        g->size,
                    sum_over_ranks(g, (double)(f->ep_stat.bytes_remote - s0.bytes_remote) / calls) /
                        g->size};
                if (v[0] < best[md][0])
                    memcpy(best[md], v, sizeof v);
            }
        for (int md = 0; md < N_MODES; md++)
            if (g->rank == 0)
                printf("layer E=%d T=%d overlap=%s: layer_us=%.1f wait_us=%.1f expert_us=%.1f "
                       "bytes_sent=%.0f "
                       "bytes_remote=%.0f\n",
                       g->size, T, mode_name[md], best[md][0], best[md][1], best[md][2],
                       best[md][3], best[md][4]);
    }
out:
    moe_forward_free(f);
    return st;
}

/* ---- the engine under lock-step (the worker loop's protocol) ---- */

/* One lock-step round: every rank steps while anyone has work (force: step even if nobody has).
 * Returns events produced here (-1 on error), *any = whether anyone had work. */
static int lockstep(const group_t *g, moe_engine *e, moe_token_event *ev, int cap, bool force,
                    int *any)
{
    *any = moe_engine_has_work(e) ? 1 : 0;
    g->comm.ops->allreduce_sum_int(g->comm.ctx, any);
    if (!*any && !force)
        return 0;
    return moe_engine_step(e, ev, cap);
}

static void make_prompt(uint64_t *seed, int vocab, const int *perm, double zipf, int n,
                        int32_t *ids)
{
    for (int i = 0; i < n; i++) {
        if (zipf <= 0) {
            ids[i] = (int32_t)(rng_next(seed) % (uint64_t)vocab);
            continue;
        }
        /* Zipf over ranks 1..vocab by inverse transform of the continuous approximation. */
        double u = rng_unit(seed), s = zipf;
        double hmax = (pow((double)vocab, 1.0 - s) - 1.0) / (1.0 - s);
        double k = pow(u * hmax * (1.0 - s) + 1.0, 1.0 / (1.0 - s));
        int r = (int)k - 1;
        r = r < 0 ? 0 : (r >= vocab ? vocab - 1 : r);
        ids[i] = (int32_t)perm[r];
    }
}

typedef struct {
    int seqs, prompt, steps;
    double zipf;
    const int *perm; /* token rank -> id (the Zipf law's order), shared by all ranks */
} workload;

/* Runs the workload on this rank's engine: prompts, prefill until every rank's sequences decode,
 * then `steps` timed decode steps. *tok_s: the instance's decode tokens/s (all ranks). */
static moe_status run_workload(const group_t *g, moe_engine *e, const moe_model *m,
                               const workload *w, double *tok_s)
{
    int vocab = m->cfg.vocab_size;
    uint64_t seed = 0x2545f4914f6cdd1dull * (uint64_t)(g->rank + 7);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(w->prompt > 0 ? w->prompt : 1));
    moe_token_event *ev = malloc(sizeof *ev * (size_t)(w->seqs > 0 ? w->seqs : 1));
    if (!ids || !ev) {
        free(ids);
        free(ev);
        return moe_error(MOE_ERR_NOMEM, "ep_bench: out of memory");
    }
    moe_sampling_params sp = {.temperature = 0, .top_p = 1};
    moe_status st = MOE_OK;
    for (int s = 0; s < w->seqs && st == MOE_OK; s++) {
        make_prompt(&seed, vocab, w->perm, w->zipf, w->prompt, ids);
        st = moe_engine_add(e, (uint64_t)s + 1, ids, w->prompt, &sp, w->steps + 64, true);
    }
    int pending = w->seqs, any = 0; /* sequences here still waiting for their first token */
    while (st == MOE_OK) {
        int left = pending;
        g->comm.ops->allreduce_sum_int(g->comm.ctx, &left);
        if (!left)
            break;
        int n = lockstep(g, e, ev, w->seqs, true, &any);
        if (n < 0)
            st = MOE_ERR_INTERNAL;
        for (int i = 0; i < n; i++)
            if (ev[i].index == 0)
                pending--;
    }
    MPI_Barrier(g->world);
    int64_t t0 = moe_now_ns(), produced = 0;
    for (int k = 0; k < w->steps && st == MOE_OK; k++) {
        int n = lockstep(g, e, ev, w->seqs, true, &any);
        if (n < 0)
            st = MOE_ERR_INTERNAL;
        else
            produced += n;
    }
    double wall = max_over_ranks(g, (double)(moe_now_ns() - t0) * 1e-9);
    double total = sum_over_ranks(g, (double)produced);
    *tok_s = total / wall;
    for (int s = 0; s < w->seqs; s++)
        moe_engine_finish(e, (uint64_t)s + 1);
    free(ids);
    free(ev);
    return st;
}

static moe_status make_engine(const bench_args *a, const group_t *g, const moe_model *m,
                              const moe_ep_placement *place, int seqs, int prompt, int overlap,
                              moe_engine **e)
{
    moe_engine_opts eo = {.n_threads = a->threads,
                          .max_seqs = seqs > 0 ? seqs : 1,
                          .max_batch_tokens = 256,
                          .ep_comm = &g->comm,
                          .ep_placement = place,
                          .ep_overlap = overlap,
                          .kv_budget_bytes = (size_t)64 << 20};
    (void)prompt;
    return moe_engine_create(m, &eo, e);
}

static moe_status bench_decode(const bench_args *a, const group_t *g, const moe_model *m,
                               const moe_ep_placement *place)
{
    if (g->rank == 0)
        printf("# decode: every rank decodes its own B sequences (prompt %d random tokens), %d "
               "timed decode "
               "steps in lock-step; tok/s = all ranks' tokens / slowest rank's time, best of %d "
               "repeats\n",
               a->prompt, a->decode_steps, a->repeat);
    static const char *const ov_name[3] = {"off", "experts", "tokens"};
    for (int bi = 0; bi < a->n_dbatches; bi++) {
        int B = a->dbatches[bi];
        double best[3] = {0, 0, 0};
        for (int rep = 0; rep < a->repeat; rep++)
            for (int ov = 0; ov < 3; ov++) { /* moe_ep_overlap_mode */
                moe_engine *e;
                moe_status st = make_engine(a, g, m, place, B, a->prompt, ov, &e);
                if (st != MOE_OK)
                    return st;
                workload w = {.seqs = B, .prompt = a->prompt, .steps = a->decode_steps, .zipf = 0};
                double tok_s = 0;
                st = run_workload(g, e, m, &w, &tok_s);
                moe_engine_free(e);
                if (st != MOE_OK)
                    return st;
                best[ov] = tok_s > best[ov] ? tok_s : best[ov];
            }
        for (int ov = 0; ov < 3; ov++)
            if (g->rank == 0)
                printf("decode E=%d batch_per_rank=%d instance_batch=%d overlap=%s threads=%d: "
                       "tok_s=%.1f\n",
                       g->size, B, B * g->size, ov_name[ov], a->threads, best[ov]);
    }
    return MOE_OK;
}

/* ---- skew: measured loads without and with EPLB replicas ---- */

/* Loads of this run (after - before), summed over ranks per (layer, expert) into global, and this
 * rank's own rows per layer into mine_layer. */
static void loads(const group_t *g, const moe_model *m, const int64_t *before, const int64_t *after,
                  double *global, double *mine_layer)
{
    int L = m->cfg.n_layers, X = m->cfg.n_experts;
    for (int l = 0; l < L; l++) {
        mine_layer[l] = 0;
        for (int x = 0; x < X; x++) {
            double v = (double)(after[(size_t)l * X + x] - before[(size_t)l * X + x]);
            global[(size_t)l * X + x] = v;
            mine_layer[l] += v;
        }
    }
    MPI_Allreduce(MPI_IN_PLACE, global, L * X, MPI_DOUBLE, MPI_SUM, g->world);
}

/* max/mean over ranks of the rows computed: over the whole run, and the mean over MoE layers of
 * each layer's max/mean (each layer's exchange waits for its slowest rank). */
static void imbalance(const group_t *g, const moe_model *m, const double *mine_layer, double *whole,
                      double *per_layer)
{
    int L = m->cfg.n_layers, n_moe = 0;
    double mine = 0, acc = 0;
    for (int l = 0; l < L; l++) {
        mine += mine_layer[l];
        if (!m->layers[l].is_moe)
            continue;
        double mx = max_over_ranks(g, mine_layer[l]),
               mean = sum_over_ranks(g, mine_layer[l]) / g->size;
        acc += mean > 0 ? mx / mean : 1.0;
        n_moe++;
    }
    double mx = max_over_ranks(g, mine), mean = sum_over_ranks(g, mine) / g->size;
    *whole = mean > 0 ? mx / mean : 1.0;
    *per_layer = n_moe ? acc / n_moe : 1.0;
}

static moe_status skew_run(const bench_args *a, const group_t *g, const moe_ep_placement *place,
                           const workload *w, moe_model **m_out, double *global, double *mine_layer,
                           double *tok_s)
{
    moe_model *m;
    moe_status st = load_for(a, g, place, &m);
    if (st != MOE_OK)
        return st;
    moe_engine *e;
    if ((st = make_engine(a, g, m, place, w->seqs, w->prompt, MOE_EP_OVERLAP_OFF, &e)) != MOE_OK) {
        moe_model_free(m);
        return st;
    }
    size_t n = (size_t)m->cfg.n_layers * m->cfg.n_experts;
    int64_t *before = calloc(n, sizeof *before);
    if (!before) {
        moe_engine_free(e);
        moe_model_free(m);
        return moe_error(MOE_ERR_NOMEM, "ep_bench: out of memory");
    }
    memcpy(before, moe_engine_expert_load(e), n * sizeof *before);
    /* The same workload `repeat` times (greedy: the same tokens, so the same loads each time); the
     * best tokens/s is kept, the loads are summed. */
    *tok_s = 0;
    for (int rep = 0; rep < a->repeat && st == MOE_OK; rep++) {
        double t = 0;
        st = run_workload(g, e, m, w, &t);
        *tok_s = t > *tok_s ? t : *tok_s;
    }
    if (st == MOE_OK)
        loads(g, m, before, moe_engine_expert_load(e), global, mine_layer);
    free(before);
    moe_engine_free(e);
    *m_out = m;
    return st;
}

static moe_status bench_skew(const bench_args *a, const group_t *g, const moe_ep_placement *primary,
                             const moe_model_config *c)
{
    int V = c->vocab_size, X = c->n_experts, L = c->n_layers;
    int *perm = malloc(sizeof(int) * (size_t)V);
    double *global = calloc((size_t)L * X, sizeof(double)),
           *mine = calloc((size_t)L, sizeof(double));
    int64_t *per_expert = calloc((size_t)X, sizeof(int64_t));
    if (!perm || !global || !mine || !per_expert) {
        free(perm);
        free(global);
        free(mine);
        free(per_expert);
        return moe_error(MOE_ERR_NOMEM, "ep_bench: out of memory");
    }
    uint64_t seed = 12345; /* the same Zipf order of tokens on every rank */
    for (int i = 0; i < V; i++)
        perm[i] = i;
    for (int i = V - 1; i > 0; i--) {
        int j = (int)(rng_next(&seed) % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    workload w = {.seqs = a->skew_seqs,
                  .prompt = a->prompt,
                  .steps = a->skew_steps,
                  .zipf = a->zipf,
                  .perm = perm};
    int R = a->redundant >= 0 ? a->redundant : g->size;
    if (g->rank == 0)
        printf(
            "# skew: %d sequences per rank, prompt %d tokens from Zipf(s=%.2f) over the "
            "vocabulary, %d decode steps, best tok/s of %d runs; load = rows each rank's experts "
            "computed (moe_engine_expert_load), max/mean over ranks; replicas: "
            "moe_eplb_plan(R=%d) from the first placement's loads summed over layers\n",
            w.seqs, w.prompt, w.zipf, w.steps, a->repeat, R);

    moe_ep_placement place = {0};
    moe_model *m = NULL;
    double tok_s = 0, whole = 0, per_layer = 0;
    moe_status st = moe_ep_placement_copy(&place, primary);
    for (int pass = 0; pass < 2 && st == MOE_OK; pass++) {
        if (pass == 1) {
            for (int x = 0; x < X; x++) {
                per_expert[x] = 0;
                for (int l = 0; l < L; l++)
                    per_expert[x] += (int64_t)global[(size_t)l * X + x];
            }
            double proj[64];
            if ((st = moe_eplb_plan(&place, per_expert, R)) != MOE_OK)
                break;
            double projected = g->size <= 64 ? moe_eplb_rank_load(&place, per_expert, proj) : 0;
            if (g->rank == 0) {
                printf("skew E=%d expert_load:", g->size);
                for (int x = 0; x < X; x++)
                    printf(" %lld", (long long)per_expert[x]);
                printf("\nskew E=%d replicas=%d: projected_max_mean=%.3f holders:", g->size, R,
                       projected);
                for (int x = 0; x < X; x++)
                    if (place.n_holders[x] > 1)
                        printf(" e%d@%d", x,
                               place.holders[x * MOE_EP_MAX_HOLDERS + place.n_holders[x] - 1]);
                printf("\n");
            }
        }
        if ((st = skew_run(a, g, &place, &w, &m, global, mine, &tok_s)) != MOE_OK)
            break;
        imbalance(g, m, mine, &whole, &per_layer);
        size_t wb = moe_model_weight_bytes(m);
        double wb_max = max_over_ranks(g, (double)wb);
        moe_model_free(m);
        m = NULL;
        if (g->rank == 0)
            printf("skew E=%d replicas=%d: max_mean=%.3f per_layer_max_mean=%.3f tok_s=%.1f "
                   "max_rank_weight_mib=%.1f\n",
                   g->size, pass ? R : 0, whole, per_layer, tok_s, wb_max / 1048576.0);
    }
    moe_ep_placement_free(&place);
    free(perm);
    free(global);
    free(mine);
    free(per_expert);
    return st;
}

/* ---- main ---- */

static void usage(void)
{
    fprintf(stderr,
            "usage: mpirun -np E ep_bench --model DIR [--parts layer,decode,skew] [--threads N]\n"
            "       [--batches 1,16,64] [--iters N] [--repeat N] [--decode-batch 1,16] "
            "[--decode-steps N]\n"
            "       [--prompt N]"
            " [--zipf S] [--skew-seqs N] [--skew-steps N] [--redundant R]\n");
}

static int parse_args(int argc, char **argv, bench_args *a)
{
    *a = (bench_args){.batches = {1, 16, 64},
                      .n_batches = 3,
                      .iters = 10,
                      .repeat = 3,
                      .dbatches = {1, 16},
                      .n_dbatches = 2,
                      .decode_steps = 32,
                      .prompt = 16,
                      .zipf = 1.2,
                      .skew_seqs = 8,
                      .skew_steps = 32,
                      .redundant = -1,
                      .part_layer = true,
                      .part_decode = true,
                      .part_skew = true};
    enum {
        O_MODEL = 1,
        O_PARTS,
        O_THREADS,
        O_BATCHES,
        O_ITERS,
        O_DBATCH,
        O_DSTEPS,
        O_PROMPT,
        O_ZIPF,
        O_SSEQS,
        O_SSTEPS,
        O_RED,
        O_REPEAT
    };
    static const struct option opts[] = {{"model", required_argument, 0, O_MODEL},
                                         {"parts", required_argument, 0, O_PARTS},
                                         {"threads", required_argument, 0, O_THREADS},
                                         {"batches", required_argument, 0, O_BATCHES},
                                         {"iters", required_argument, 0, O_ITERS},
                                         {"decode-batch", required_argument, 0, O_DBATCH},
                                         {"decode-steps", required_argument, 0, O_DSTEPS},
                                         {"prompt", required_argument, 0, O_PROMPT},
                                         {"zipf", required_argument, 0, O_ZIPF},
                                         {"skew-seqs", required_argument, 0, O_SSEQS},
                                         {"skew-steps", required_argument, 0, O_SSTEPS},
                                         {"redundant", required_argument, 0, O_RED},
                                         {"repeat", required_argument, 0, O_REPEAT},
                                         {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case O_MODEL:
            a->model_dir = optarg;
            break;
        case O_PARTS:
            a->part_layer = strstr(optarg, "layer") != NULL;
            a->part_decode = strstr(optarg, "decode") != NULL;
            a->part_skew = strstr(optarg, "skew") != NULL;
            break;
        case O_THREADS:
            a->threads = atoi(optarg);
            break;
        case O_BATCHES:
            a->n_batches = parse_list(optarg, a->batches, MAX_LIST);
            break;
        case O_ITERS:
            a->iters = atoi(optarg);
            break;
        case O_DBATCH:
            a->n_dbatches = parse_list(optarg, a->dbatches, MAX_LIST);
            break;
        case O_DSTEPS:
            a->decode_steps = atoi(optarg);
            break;
        case O_PROMPT:
            a->prompt = atoi(optarg);
            break;
        case O_ZIPF:
            a->zipf = atof(optarg);
            break;
        case O_SSEQS:
            a->skew_seqs = atoi(optarg);
            break;
        case O_SSTEPS:
            a->skew_steps = atoi(optarg);
            break;
        case O_RED:
            a->redundant = atoi(optarg);
            break;
        case O_REPEAT:
            a->repeat = atoi(optarg);
            break;
        default:
            return -1;
        }
    }
    if (!a->model_dir || a->n_batches <= 0 || a->n_dbatches <= 0 || a->iters <= 0 ||
        a->repeat <= 0 || a->prompt <= 0 || a->decode_steps <= 0 || a->skew_seqs < 0 ||
        a->skew_steps <= 0)
        return -1;
    return 0;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    group_t g = {.world = MPI_COMM_WORLD};
    MPI_Comm_rank(g.world, &g.rank);
    MPI_Comm_size(g.world, &g.size);
    bench_args a;
    if (parse_args(argc, argv, &a) != 0) {
        if (g.rank == 0)
            usage();
        MPI_Finalize();
        return 2;
    }
    if (a.threads <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        a.threads = cores > g.size ? (int)(cores / g.size) : 1;
    }
    moe_log_init(g.rank);
    moe_log_threshold = MOE_LOG_WARN;
    moe_status st = moe_comm_mpi_create(g.world, &g.comm);
    moe_model_config cfg = {0};
    moe_ep_placement place = {0};
    moe_model *m = NULL;
    moe_threadpool_t *pool = NULL;
    if (st == MOE_OK)
        st = moe_model_config_load(a.model_dir, &cfg);
    if (st == MOE_OK)
        st = moe_ep_placement_contiguous(cfg.n_experts, g.size, &place);
    if (st == MOE_OK)
        st = load_for(&a, &g, &place, &m);
    if (st == MOE_OK && g.rank == 0) {
        char load[64] = "?";
        FILE *fl = fopen("/proc/loadavg", "r");
        if (fl) {
            if (!fgets(load, sizeof load, fl))
                strcpy(load, "?");
            load[strcspn(load, "\n")] = 0;
            fclose(fl);
        }
        printf("# ep_bench: %s, E=%d ranks, %d kernel threads per rank, %ld online cores%s, load "
               "average %s\n",
               a.model_dir, g.size, a.threads, sysconf(_SC_NPROCESSORS_ONLN),
               (long)g.size * a.threads > sysconf(_SC_NPROCESSORS_ONLN) ? " (oversubscribed)" : "",
               load);
    }
    if (st == MOE_OK && a.part_layer) {
        if (!(pool = moe_threadpool_create(a.threads)))
            st = moe_error(MOE_ERR_NOMEM, "ep_bench: cannot start %d threads", a.threads);
        else
            st = bench_layer(&a, &g, m, &place, pool);
    }
    if (st == MOE_OK && a.part_decode)
        st = bench_decode(&a, &g, m, &place);
    if (st == MOE_OK && a.part_skew)
        st = bench_skew(&a, &g, &place, &cfg);
    int rc = 0;
    if (st != MOE_OK) {
        fprintf(stderr, "ep_bench rank %d: %s\n", g.rank, moe_error_message());
        rc = 1;
    }
    fflush(stdout);
    if (pool)
        moe_threadpool_free(pool);
    moe_model_free(m);
    moe_ep_placement_free(&place);
    if (g.comm.ops)
        g.comm.ops->destroy(g.comm.ctx);
    if (rc)
        MPI_Abort(g.world, rc); /* the other ranks may wait in a collective */
    MPI_Finalize();
    return rc;
}
