/* `moe-plan profile`: measures this machine's costs with the real engine (worker/engine.h, as
 * bench/engine_bench.c does) and the real MPI comm backend, fits the cost model (costs.h) and
 * writes the profile file. Under `mpirun -np N` (N >= 2) it also measures the KV hand-off rate
 * between two ranks and the expert-parallel all-to-all over N ranks; alone, a memcpy rate stands
 * for the hand-off and the all-to-all is left to the network model. */
#include "tools/moe_plan/profile.h"

#include <math.h>
#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "worker/comm_mpi.h"
#include "worker/engine.h"
#include "worker/model.h"

#define MAX_SAMPLES 256

typedef struct {
    double n, attn, ms, cpu; /* wall and CPU ms */
} sample;

typedef struct {
    moe_engine *e;
    const moe_model *m;
    const mp_profile_opts *o;
    sample s[MAX_SAMPLES];
    int n;
    uint64_t next_id, rng;
    moe_token_event ev[1024];
    double last_cpu; /* CPU ms of the last timed_step */
} prof;

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void add_sample(prof *p, double n, double attn, double ms, double cpu)
{
    if (p->n < MAX_SAMPLES)
        p->s[p->n++] = (sample){n, attn, ms, cpu};
}

static double process_cpu_ms(void) { return (double)moe_process_cpu_ns() * 1e-6; }

static moe_status add_seqs(prof *p, int b, int len, int max_new, uint64_t *first)
{
    int32_t *ids = malloc((size_t)len * sizeof *ids);
    if (!ids)
        return moe_error(MOE_ERR_NOMEM, "profile: out of memory");
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    *first = p->next_id;
    moe_status st = MOE_OK;
    for (int k = 0; k < b && st == MOE_OK; k++) {
        for (int i = 0; i < len; i++) {
            p->rng = p->rng * 6364136223846793005ULL + 1442695040888963407ULL;
            ids[i] = (int32_t)((p->rng >> 33) % (uint64_t)p->m->cfg.vocab_size);
        }
        st = moe_engine_add(p->e, p->next_id++, ids, len, &sp, max_new, true);
    }
    free(ids);
    return st;
}

/* Wall ms of one step; its CPU ms in p->last_cpu (the process's: the engine's threads). */
static double timed_step(prof *p, int *n_ev)
{
    double c0 = process_cpu_ms();
    int64_t t0 = moe_now_ns();
    *n_ev = moe_engine_step(p->e, p->ev, 1024);
    double wall = (double)(moe_now_ns() - t0) * 1e-6;
    p->last_cpu = process_cpu_ms() - c0;
    return wall;
}

static void finish_all(prof *p, uint64_t first, int b)
{
    for (int k = 0; k < b; k++)
        moe_engine_finish(p->e, first + (uint64_t)k); /* NOT_FOUND when it already ended: fine */
}

/* b sequences of `len` prompt tokens each, one step (b * len within the budget). */
static moe_status measure_prefill(prof *p, int b, int len)
{
    double v[16], u[16];
    int reps = p->o->reps;
    for (int r = 0; r < reps; r++) {
        uint64_t first;
        moe_status st = add_seqs(p, b, len, 1, &first);
        if (st != MOE_OK)
            return st;
        int n_ev;
        v[r] = timed_step(p, &n_ev);
        u[r] = p->last_cpu;
        if (n_ev < 0)
            return MOE_ERR_INTERNAL;
        finish_all(p, first, b);
    }
    double ms = median(v, reps), cpu = median(u, reps);
    add_sample(p, (double)b * len, b * mp_attn_work(0, len), ms, cpu);
    if (p->o->verbose)
        fprintf(stderr, "moe-plan profile: prefill %d x %d tokens: %.3f ms (CPU %.3f ms)\n", b, len, ms, cpu);
    return MOE_OK;
}

/* One long prompt in budget-sized chunks: each chunk is a step at a growing position. */
static moe_status measure_chunked(prof *p, int len)
{
    uint64_t first;
    moe_status st = add_seqs(p, 1, len, 1, &first);
    if (st != MOE_OK)
        return st;
    int mbt = p->o->max_batch_tokens, pos = 0, n_ev = 0;
    while (pos < len) {
        int chunk = len - pos < mbt ? len - pos : mbt;
        double ms = timed_step(p, &n_ev);
        if (n_ev < 0)
            return MOE_ERR_INTERNAL;
        add_sample(p, chunk, mp_attn_work(pos, chunk), ms, p->last_cpu);
        if (p->o->verbose)
            fprintf(stderr, "moe-plan profile: prefill chunk %d at %d: %.3f ms (CPU %.3f ms)\n", chunk, pos, ms,
                    p->last_cpu);
        pos += chunk;
    }
    finish_all(p, first, 1);
    return MOE_OK;
}

/* b sequences at context ctx: prefill them, then time decode steps (one token each). */
static moe_status measure_decode(prof *p, int b, int ctx)
{
    int reps = p->o->reps;
    uint64_t first;
    moe_status st = add_seqs(p, b, ctx, reps + 4, &first);
    if (st != MOE_OK)
        return st;
    int n_ev, have = 0;
    while (have < b) { /* prefill steps until every sequence has its first token */
        if (timed_step(p, &n_ev) < 0 || n_ev < 0)
            return MOE_ERR_INTERNAL;
        for (int i = 0; i < n_ev; i++)
            have += p->ev[i].index == 0;
    }
    double v[16], u[16];
    for (int r = 0; r < reps; r++) {
        v[r] = timed_step(p, &n_ev);
        u[r] = p->last_cpu;
        if (n_ev < 0)
            return MOE_ERR_INTERNAL;
    }
    double ms = median(v, reps), cpu = median(u, reps);
    int c_mid = ctx + 1 + reps / 2;
    add_sample(p, b, (double)b * c_mid, ms, cpu);
    if (p->o->verbose)
        fprintf(stderr, "moe-plan profile: decode batch %d at context %d: %.3f ms (CPU %.3f ms)\n", b, ctx, ms, cpu);
    finish_all(p, first, b);
    return MOE_OK;
}

/* ---- the sharing curve: our own ranks on one host stretching each other ---- */

/* Another rank of ours: its own engine on the same model, stepping a batch-1 decode back to back
 * (a prompt of 32, then 150 tokens, again) while `active`, napping otherwise, until `stop`. A
 * thread of this process is scheduled as an mpirun rank is: its own task in the session's
 * scheduling group (autogroup), so the measured rank meets it as it meets the cluster's other
 * ranks, and the machine's other jobs as they are at this moment. */
typedef struct {
    const moe_model *m;
    int block_size;
    atomic_bool stop, active, ready;
    atomic_long steps;
    moe_status st;
} share_helper;

static void *helper_main(void *arg)
{
    share_helper *h = arg;
    moe_engine_opts eo = {.n_threads = 1, .max_batch_tokens = 64, .max_seqs = 1, .block_size = h->block_size,
                          .n_kv_blocks = 16};
    moe_engine *e = NULL;
    h->st = moe_engine_create(h->m, &eo, &e);
    atomic_store(&h->ready, true);
    if (h->st != MOE_OK)
        return NULL;
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    int32_t ids[32];
    for (int i = 0; i < 32; i++)
        ids[i] = (int32_t)((i * 7919 + 13) % h->m->cfg.vocab_size);
    moe_token_event ev[4];
    for (uint64_t id = 1; !atomic_load(&h->stop) && h->st == MOE_OK; id++) {
        if ((h->st = moe_engine_add(e, id, ids, 32, &sp, 150, true)) != MOE_OK)
            break;
        for (bool done = false; !done && !atomic_load(&h->stop);) {
            if (!atomic_load(&h->active)) {
                moe_sleep_ns(1000000);
                continue;
            }
            int n_ev = moe_engine_step(e, ev, 4);
            atomic_fetch_add(&h->steps, 1);
            if (n_ev < 0) {
                h->st = MOE_ERR_INTERNAL;
                break;
            }
            for (int i = 0; i < n_ev; i++)
                done |= ev[i].finish != MOE_FINISH_NONE;
        }
        moe_engine_finish(e, id);
    }
    moe_engine_free(e);
    return NULL;
}

/* Helpers [0, k) stepping (each has stepped since), the others napping. */
static void share_activate(share_helper *h, int n, int k)
{
    long seen[MP_MAX_SHARE];
    for (int i = 0; i < n; i++) {
        seen[i] = atomic_load(&h[i].steps);
        atomic_store(&h[i].active, i < k);
    }
    for (int i = 0; i < k; i++)
        while (atomic_load(&h[i].steps) == seen[i] && h[i].st == MOE_OK)
            moe_sleep_ns(200000);
}

#define SHARE_ROUNDS 5
#define SHARE_DECODES 3 /* decode steps per round and k */
#define SHARE_NAP_MS 200 /* all of ours idle before each round and k */

/* share[l][k]: wall of step l with k more engines busy, over its CPU time alone. The k are
 * interleaved in rounds (0, 1, .., K, 0, 1, ..) so that the machine's load drifting during the
 * measurement reaches every k alike; medians over the rounds. Step 0: a batch-1 decode (context
 * 32 and growing), step 1: a one-prompt prefill of up to 128 tokens. */
static moe_status measure_share(prof *p, mp_costs *c)
{
    int kmax = p->o->share_max < MP_MAX_SHARE - 1 ? p->o->share_max : MP_MAX_SHARE - 1;
    int plen = p->o->max_batch_tokens < 128 ? p->o->max_batch_tokens : 128;
    if (plen > p->m->cfg.max_position / 2)
        plen = p->m->cfg.max_position / 2;
    int n_dec = SHARE_ROUNDS * (kmax + 1) * SHARE_DECODES;
    share_helper *h = calloc((size_t)kmax + 1, sizeof *h);
    pthread_t *th = calloc((size_t)kmax + 1, sizeof *th);
    double *wall = calloc((size_t)2 * (kmax + 1) * n_dec, sizeof *wall), cpu[2][SHARE_ROUNDS * SHARE_DECODES];
    if (!h || !th || !wall) {
        free(h);
        free(th);
        free(wall);
        return moe_error(MOE_ERR_NOMEM, "profile: out of memory");
    }
    int n_wall[2][MP_MAX_SHARE] = {{0}}, n_cpu[2] = {0, 0}, started = 0;
    moe_status st = MOE_OK;
    /* The helpers are threads of this process, so they share its CPU affinity: under mpirun -np 2
     * Open MPI binds each rank to one core (above 2 it binds none), and the curve then measures
     * our engines crowding one core (a 2x stretch with one more busy engine on an idle 2-core
     * machine, bench/RESULTS.md issue 14, session 9) where a live cluster's ranks spread over all
     * of them. Recorded in the profile, and said. */
    cpu_set_t aff;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    c->share_cpus = sched_getaffinity(0, sizeof aff, &aff) == 0 ? CPU_COUNT(&aff) : (int)online;
    if (online > 0 && c->share_cpus < online)
        fprintf(stderr,
                "moe-plan profile: warning: this process may run on %d of the %ld online CPUs (mpirun binds a "
                "rank to one core when -np <= 2; run it with --bind-to none), so the sharing curve is our "
                "engines on %d CPU(s), not on the host's\n",
                c->share_cpus, online, c->share_cpus);
    for (; started < kmax && st == MOE_OK; started++) {
        h[started] = (share_helper){.m = p->m, .block_size = p->o->block_size};
        if (pthread_create(&th[started], NULL, helper_main, &h[started]) != 0) {
            st = moe_error(MOE_ERR_INTERNAL, "profile: cannot start a sharing thread");
            break;
        }
        while (!atomic_load(&h[started].ready))
            moe_sleep_ns(1000000);
        st = h[started].st;
    }
    /* The decode sequence also takes a token in each prefill step (the engine batches them): room
     * for both. */
    uint64_t dec, first;
    int n_ev;
    if (st == MOE_OK && (st = add_seqs(p, 1, 32, 2 * n_dec + 8, &dec)) == MOE_OK &&
        (timed_step(p, &n_ev) < 0 || n_ev < 0)) /* the decode sequence's prompt */
        st = MOE_ERR_INTERNAL;
    for (int r = 0; r < SHARE_ROUNDS && st == MOE_OK; r++)
        for (int k = 0; k <= kmax && st == MOE_OK; k++) {
            /* Everything of ours idle first, as a cluster is between bursts of work: the scheduler
             * treats a group that has slept unlike one that has run for seconds (a live rank
             * stepping alone after a pause gets a core at once at loads where a process that runs
             * on is stretched 2-3x, bench/RESULTS.md), and the measured steps should meet the
             * former. */
            share_activate(h, started, 0);
            moe_sleep_ns((int64_t)SHARE_NAP_MS * 1000000);
            share_activate(h, started, k);
            for (int i = 0; i < kmax; i++)
                if (h[i].st != MOE_OK)
                    st = h[i].st;
            for (int j = 0; j <= SHARE_DECODES && st == MOE_OK; j++) {
                int l = j == SHARE_DECODES; /* SHARE_DECODES decodes, then the prefill */
                if (l && (st = add_seqs(p, 1, plen, 1, &first)) != MOE_OK)
                    break;
                double w = timed_step(p, &n_ev);
                if (n_ev < 0)
                    st = MOE_ERR_INTERNAL;
                if (l)
                    finish_all(p, first, 1);
                wall[((size_t)l * (kmax + 1) + k) * n_dec + n_wall[l][k]++] = w;
                if (k == 0)
                    cpu[l][n_cpu[l]++] = p->last_cpu;
            }
        }
    share_activate(h, started, 0);
    for (int i = 0; i < started; i++)
        atomic_store(&h[i].stop, true);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    finish_all(p, dec, 1);
    if (st == MOE_OK) {
        c->n_share = kmax + 1;
        for (int l = 0; l < 2; l++) {
            double c0 = median(cpu[l], n_cpu[l]);
            c->share_cpu[l] = c0 > 1e-3 ? c0 : 1e-3;
            for (int k = 0; k <= kmax; k++) {
                double w = median(wall + ((size_t)l * (kmax + 1) + k) * n_dec, n_wall[l][k]);
                c->share[l][k] = w / c->share_cpu[l] > 1 ? w / c->share_cpu[l] : 1;
            }
        }
        /* The two lengths in increasing CPU order (the curve is interpolated in log CPU ms). */
        c->n_share_lens = c->share_cpu[1] > c->share_cpu[0] ? 2 : 1;
        if (p->o->verbose)
            for (int l = 0; l < 2; l++) {
                fprintf(stderr, "moe-plan profile: sharing curve, %s (CPU %.3f ms alone): stretch with 0..%d "
                                "more engines busy:", l ? "prefill" : "decode", c->share_cpu[l], kmax);
                for (int k = 0; k <= kmax; k++)
                    fprintf(stderr, " %.2f", c->share[l][k]);
                fputc('\n', stderr);
            }
    }
    free(h);
    free(th);
    free(wall);
    return st;
}

static double val(const sample *x, bool cpu) { return cpu ? x->cpu : x->ms; }

/* Least squares: ms = T(n) + k * attn with one T per distinct n; k pooled over the groups of
 * samples sharing n (the within-group slope), T(n) the group's mean residual, made
 * non-decreasing in n (a step with more tokens is never cheaper). Fits the wall times, or the
 * CPU times with cpu: the same points c->tok either way. */
static void fit_curve(const prof *p, bool cpu, mp_costs *c, double *ms, double *k_out)
{
    double sxy = 0, sxx = 0;
    double ns[MAX_SAMPLES];
    int nn = 0;
    for (int i = 0; i < p->n; i++) {
        bool seen = false;
        for (int k = 0; k < nn; k++)
            seen |= ns[k] == p->s[i].n;
        if (!seen)
            ns[nn++] = p->s[i].n;
    }
    qsort(ns, (size_t)nn, sizeof *ns, cmp_d);
    for (int g = 0; g < nn; g++) {
        double ma = 0, mm = 0;
        int cnt = 0;
        for (int i = 0; i < p->n; i++)
            if (p->s[i].n == ns[g]) {
                ma += p->s[i].attn;
                mm += val(&p->s[i], cpu);
                cnt++;
            }
        ma /= cnt;
        mm /= cnt;
        for (int i = 0; i < p->n; i++)
            if (p->s[i].n == ns[g]) {
                sxy += (p->s[i].attn - ma) * (val(&p->s[i], cpu) - mm);
                sxx += (p->s[i].attn - ma) * (p->s[i].attn - ma);
            }
    }
    double k = sxx > 0 && sxy > 0 ? sxy / sxx : 0;
    /* On a loaded machine the slope is noise-prone; attention is never more than half of any
     * measured step at these contexts (bench/RESULTS.md: 512-token prefill attention is ~5% of
     * the step), so cap k there: the residual T(n) then stays positive. */
    for (int i = 0; i < p->n; i++)
        if (p->s[i].attn > 0 && k > 0.5 * val(&p->s[i], cpu) / p->s[i].attn)
            k = 0.5 * val(&p->s[i], cpu) / p->s[i].attn;
    *k_out = k;
    /* Group means of the residuals, then pool-adjacent-violators (weighted by sample count) for
     * the non-decreasing T: on a loaded machine one slow point must not lift every later one, as
     * a running maximum would. */
    double w[MAX_SAMPLES];
    c->n_pts = 0;
    for (int g = 0; g < nn && c->n_pts < MP_MAX_PTS; g++) {
        double r = 0;
        int cnt = 0;
        for (int i = 0; i < p->n; i++)
            if (p->s[i].n == ns[g]) {
                r += val(&p->s[i], cpu) - k * p->s[i].attn;
                cnt++;
            }
        c->tok[c->n_pts] = ns[g];
        ms[c->n_pts] = r / cnt;
        w[c->n_pts++] = cnt;
    }
    double v[MP_MAX_PTS], wt[MP_MAX_PTS];
    int len[MP_MAX_PTS], nb = 0;
    for (int i = 0; i < c->n_pts; i++) {
        v[nb] = ms[i];
        wt[nb] = w[i];
        len[nb++] = 1;
        while (nb > 1 && v[nb - 2] > v[nb - 1]) {
            double ww = wt[nb - 2] + wt[nb - 1];
            v[nb - 2] = (v[nb - 2] * wt[nb - 2] + v[nb - 1] * wt[nb - 1]) / ww;
            wt[nb - 2] = ww;
            len[nb - 2] += len[nb - 1];
            nb--;
        }
    }
    for (int b = 0, i = 0; b < nb; b++)
        for (int j = 0; j < len[b]; j++)
            ms[i++] = v[b];
}

static void fit(const prof *p, mp_costs *c)
{
    fit_curve(p, false, c, c->ms, &c->attn_ms);
    fit_curve(p, true, c, c->ms_cpu, &c->attn_cpu_ms);
    c->has_cpu = true;
    c->n_samples = p->n < MP_MAX_SAMPLES ? p->n : MP_MAX_SAMPLES;
    for (int i = 0; i < c->n_samples; i++) {
        c->samples[i][0] = p->s[i].n;
        c->samples[i][1] = p->s[i].attn;
        c->samples[i][2] = p->s[i].ms;
        c->samples[i][3] = p->s[i].cpu;
    }
}

static void model_shape(const moe_model *m, mp_costs *c)
{
    const moe_model_config *k = &m->cfg;
    double d = k->hidden_size, q = (double)k->n_heads * k->head_dim, kv = (double)k->n_kv_heads * k->head_dim;
    double dense = 0, experts = 0;
    c->moe_layers = 0;
    for (int l = 0; l < k->n_layers; l++) {
        dense += d * (2 * q + 2 * kv);
        if (m->layers[l].is_moe) {
            c->moe_layers++;
            experts += (double)k->n_experts_per_tok * 3 * d * k->moe_ffn;
            dense += d * k->n_experts + 3 * d * k->shared_expert_ffn;
        } else {
            dense += 3 * d * k->dense_ffn;
        }
    }
    dense += d * k->vocab_size;
    c->n_layers = k->n_layers;
    c->hidden = k->hidden_size;
    c->top_k = k->n_experts_per_tok;
    c->n_experts = k->n_experts;
    c->kv_bytes_per_token = 2.0 * k->n_layers * kv * sizeof(float);
    c->expert_frac = experts / (dense + experts);
}

/* Ranks 0 and 1: one-way time of MPI messages of two sizes -> latency and rate. */
static void measure_xfer(int rank, mp_costs *c, bool verbose)
{
    size_t sizes[2] = {4096, 32u << 20};
    double t[2];
    char *buf = malloc(sizes[1]);
    if (!buf)
        return;
    memset(buf, 1, sizes[1]);
    for (int s = 0; s < 2; s++) {
        double v[8];
        for (int r = 0; r < 8; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            if (rank == 0) {
                MPI_Send(buf, (int)sizes[s], MPI_BYTE, 1, 7, MPI_COMM_WORLD);
                MPI_Recv(buf, 1, MPI_BYTE, 1, 8, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                MPI_Recv(buf, (int)sizes[s], MPI_BYTE, 0, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(buf, 1, MPI_BYTE, 0, 8, MPI_COMM_WORLD);
            }
            v[r] = (MPI_Wtime() - t0) * 1e3;
        }
        t[s] = median(v, 8);
    }
    free(buf);
    /* The small message is a round trip of two latencies; the big one a latency, the bytes, a latency. */
    c->xfer_latency_ms = t[0] / 2;
    double bytes_ms = t[1] - t[0];
    c->xfer_gbps = bytes_ms > 0 ? (double)sizes[1] / (bytes_ms * 1e-3) / 1e9 : c->xfer_gbps;
    if (verbose && rank == 0)
        fprintf(stderr, "moe-plan profile: MPI rank 0 -> 1: latency %.3f ms, %.2f GB/s\n", c->xfer_latency_ms,
                c->xfer_gbps);
}

static void measure_memcpy(mp_costs *c, bool verbose)
{
    size_t n = 64u << 20;
    char *a = malloc(n), *b = malloc(n);
    if (a && b) {
        memset(a, 1, n);
        memset(b, 2, n);
        double v[5];
        for (int r = 0; r < 5; r++) {
            int64_t t0 = moe_now_ns();
            memcpy(b, a, n);
            v[r] = (double)(moe_now_ns() - t0) * 1e-9;
        }
        c->xfer_gbps = (double)n / median(v, 5) / 1e9;
        c->xfer_latency_ms = 0.05; /* a control message between processes, not measured alone */
        if (verbose)
            fprintf(stderr, "moe-plan profile: memcpy %.2f GB/s (no second rank: stands for the hand-off)\n",
                    c->xfer_gbps);
    }
    free(a);
    free(b);
}

/* Every rank: alltoallv of `tokens` routed rows (top-k, f32 hidden) per rank. */
static void measure_a2a(int rank, int world, mp_costs *c, bool verbose)
{
    moe_comm comm;
    if (moe_comm_mpi_create(MPI_COMM_WORLD, &comm) != MOE_OK)
        return;
    static const int toks[] = {1, 8, 64, 256, 512};
    for (size_t t = 0; t < sizeof toks / sizeof toks[0] && c->n_a2a < MP_MAX_A2A; t++) {
        size_t row = (size_t)c->hidden * 4, rows = (size_t)toks[t] * (size_t)c->top_k;
        int per = (int)((rows + (size_t)world - 1) / (size_t)world * row);
        char *send = calloc((size_t)world, (size_t)per), *recv = calloc((size_t)world, (size_t)per);
        int *cnt = malloc((size_t)world * sizeof *cnt), *off = malloc((size_t)world * sizeof *off);
        if (!send || !recv || !cnt || !off) {
            free(send);
            free(recv);
            free(cnt);
            free(off);
            break;
        }
        for (int p = 0; p < world; p++) {
            cnt[p] = per;
            off[p] = p * per;
        }
        double v[10];
        for (int r = 0; r < 10; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            comm.ops->alltoallv(comm.ctx, send, cnt, off, recv, cnt, off);
            double dt = (MPI_Wtime() - t0) * 1e3;
            MPI_Allreduce(&dt, &v[r], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        }
        double ms = median(v, 10);
        c->a2a[c->n_a2a++] = (mp_a2a_pt){.ep = world, .tokens = toks[t], .ms = ms};
        if (verbose && rank == 0)
            fprintf(stderr, "moe-plan profile: all-to-all over %d ranks, %d tokens per rank: %.3f ms\n", world,
                    toks[t], ms);
        free(send);
        free(recv);
        free(cnt);
        free(off);
    }
    comm.ops->destroy(comm.ctx);
}

static void cpu_name(char *out, size_t cap)
{
    snprintf(out, cap, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            char *v = strchr(line, ':');
            if (v) {
                v += 1 + (v[1] == ' ');
                v[strcspn(v, "\n")] = 0;
                snprintf(out, cap, "%s (%ld cpus)", v, sysconf(_SC_NPROCESSORS_ONLN));
            }
            break;
        }
    if (f)
        fclose(f);
}

static moe_status run_engine(const mp_profile_opts *o, mp_costs *c)
{
    moe_model *m;
    moe_status st = moe_model_load(o->model_dir, NULL, &m);
    if (st != MOE_OK)
        return st;
    model_shape(m, c);
    moe_engine_opts eo = {.n_threads = o->threads, .max_batch_tokens = o->max_batch_tokens,
                          .max_seqs = o->max_seqs, .block_size = o->block_size, .n_kv_blocks = 0,
                          .kv_budget_bytes = 0};
    prof *p = calloc(1, sizeof *p);
    if (!p) {
        moe_model_free(m);
        return moe_error(MOE_ERR_NOMEM, "profile: out of memory");
    }
    if ((st = moe_engine_create(m, &eo, &p->e)) != MOE_OK) {
        free(p);
        moe_model_free(m);
        return st;
    }
    p->m = m;
    p->o = o;
    p->rng = 12345;
    p->next_id = 1;
    moe_engine_stats es;
    moe_engine_get_stats(p->e, &es);
    c->kv_blocks = es.kv_blocks_total;
    /* Warm-up: first touches of the weights and the scratch. */
    st = measure_prefill(p, 1, 64);
    p->n = 0;
    int mbt = o->max_batch_tokens, ctx = m->cfg.max_position - o->reps - 8; /* points must fit the context */
    static const int plen[] = {16, 32, 64, 128, 256, 512};
    for (size_t i = 0; i < sizeof plen / sizeof plen[0] && st == MOE_OK; i++)
        if (plen[i] <= mbt && plen[i] < ctx)
            st = measure_prefill(p, 1, plen[i]);
    if (st == MOE_OK && 4 * 64 <= mbt)
        st = measure_prefill(p, 4, 64);
    if (st == MOE_OK && !o->quick)
        st = measure_chunked(p, 4 * mbt < ctx ? 4 * mbt : ctx);
    static const int db[] = {1, 2, 4, 8, 16, 32, 64};
    for (size_t i = 0; i < sizeof db / sizeof db[0] && st == MOE_OK; i++)
        if (db[i] <= o->max_seqs && (!o->quick || db[i] <= 16))
            st = measure_decode(p, db[i], 32);
    static const int dc[] = {256, 1024, 2048};
    for (size_t i = 0; i < sizeof dc / sizeof dc[0] && st == MOE_OK; i++)
        if ((!o->quick || dc[i] <= 1024) && dc[i] < ctx)
            st = measure_decode(p, 4, dc[i]);
    if (st == MOE_OK && o->share_max > 0)
        st = measure_share(p, c);
    if (st == MOE_OK)
        fit(p, c);
    else if (moe_error_message()[0] == 0)
        st = moe_error(MOE_ERR_INTERNAL, "profile: engine step failed");
    moe_engine_free(p->e);
    free(p);
    moe_model_free(m);
    return st;
}

int mp_profile_main(const mp_profile_opts *o)
{
    int provided, rank = 0, world = 1;
    MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    mp_costs c;
    mp_costs_init(&c);
    c.threads = o->threads;
    c.block_size = o->block_size;
    c.max_batch_tokens = o->max_batch_tokens;
    c.max_seqs = o->max_seqs;
    snprintf(c.model, sizeof c.model, "%s", o->model_dir);
    cpu_name(c.cpu, sizeof c.cpu);
    snprintf(c.note, sizeof c.note, "%s", o->note ? o->note : "");
    moe_status st = MOE_OK;
    if (rank == 0)
        st = run_engine(o, &c);
    /* The other ranks wait asleep: a rank spinning in a collective would take a core from the
     * engine being measured (Open MPI polls). */
    MPI_Request bar;
    MPI_Ibarrier(MPI_COMM_WORLD, &bar);
    for (int done = 0; !done;) {
        MPI_Test(&bar, &done, MPI_STATUS_IGNORE);
        if (!done)
            moe_sleep_ns(2000000);
    }
    MPI_Bcast(&c.hidden, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Bcast(&c.top_k, 1, MPI_INT, 0, MPI_COMM_WORLD);
    int bad = st != MOE_OK;
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    int rc = 0;
    if (bad) {
        if (st != MOE_OK)
            fprintf(stderr, "moe-plan profile: %s\n", moe_error_message());
        rc = 1;
    } else {
        if (world >= 2) {
            measure_xfer(rank, &c, o->verbose);
            measure_a2a(rank, world, &c, o->verbose);
        } else {
            measure_memcpy(&c, o->verbose);
        }
        if (rank == 0 && (st = mp_costs_save(o->out, &c)) != MOE_OK) {
            fprintf(stderr, "moe-plan profile: %s\n", moe_error_message());
            rc = 1;
        } else if (rank == 0) {
            fprintf(stderr, "moe-plan profile: wrote %s (step: %d points, attention %.3g ms per position; "
                            "hand-off %.2f GB/s + %.3f ms; %d all-to-all points)\n",
                    o->out, c.n_pts, c.attn_ms, c.xfer_gbps, c.xfer_latency_ms, c.n_a2a);
        }
    }
    MPI_Finalize();
    return rc;
}
