/* moe-bench's measured run: one thread per request stream, a progress thread, a timeline thread. */
#include "tools/moe_bench/run.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/pool.h"
#include "moeserve.pb-c.h"

typedef struct {
    const bench_cfg *c;
    const wl_workload *w;
    moe_rpc_client *cli;
    rp_record *rec;
    int64_t t0;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sent, in_flight, done, failed;
    bool finished; /* every request done: the helper threads leave */
} run_state;

typedef struct {
    run_state *b;
    int idx;
    uint32_t *prompt;
} job;

static double since(const run_state *b, int64_t t) { return (double)(t - b->t0) * 1e-9; }

static void *run_one(void *arg)
{
    job *j = arg;
    run_state *b = j->b;
    rp_record *r = &b->rec[j->idx];
    Moeserve__V1__TokenIds ids;
    moeserve__v1__token_ids__init(&ids);
    ids.n_ids = (size_t)r->n_in;
    ids.ids = j->prompt;
    Moeserve__V1__SamplingParams sp;
    moeserve__v1__sampling_params__init(&sp);
    sp.temperature_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = b->c->temperature;
    sp.seed_opt_case = MOESERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = (uint64_t)j->idx;
    Moeserve__V1__GenerateRequest req;
    moeserve__v1__generate_request__init(&req);
    req.prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    req.sampling = &sp;
    req.max_new_tokens = (uint32_t)r->n_out;
    req.ignore_eos = b->c->ignore_eos;
    moe_rpc_stream *s = moe_rpc_stream_open(b->cli, "/moeserve.v1.Moeserve/Generate", &req.base, b->c->timeout_ms);
    grpc_status_code code = GRPC_STATUS_INTERNAL;
    if (!s) {
        snprintf(r->error, sizeof r->error, "could not start the call");
    } else {
        ProtobufCMessage *m;
        double t_prev = 0;
        while ((m = moe_rpc_stream_next(s, &moeserve__v1__generate_response__descriptor))) {
            const Moeserve__V1__GenerateResponse *g = (const Moeserve__V1__GenerateResponse *)m;
            double now = since(b, moe_now_ns());
            if (g->n_token_ids) {
                if (!r->n_tokens)
                    r->t_first = now;
                else
                    rp_record_add_itl(r, (float)((now - t_prev) * 1e3));
                if (r->n_tokens < 2 && r->n_tokens + (int)g->n_token_ids >= 2)
                    r->t_second = now;
                r->t_last = t_prev = now;
                r->n_tokens += (int)g->n_token_ids;
            }
            if (g->timing)
                r->server_ttft_ms = g->timing->ttft_ms;
            protobuf_c_message_free_unpacked(m, NULL);
        }
        code = moe_rpc_stream_close(s, r->error, sizeof r->error);
    }
    r->ok = code == GRPC_STATUS_OK && r->n_tokens > 0;
    if (code == GRPC_STATUS_OK)
        r->error[0] = 0;
    free(j->prompt);
    free(j);
    pthread_mutex_lock(&b->mu);
    b->in_flight--;
    b->done++;
    b->failed += !r->ok;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

/* Waits up to ms for the run to finish; true when it has. */
static bool wait_finished(run_state *b, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&b->mu);
    while (!b->finished && pthread_cond_timedwait(&b->cv, &b->mu, &ts) == 0)
        ;
    bool f = b->finished;
    pthread_mutex_unlock(&b->mu);
    return f;
}

static void *progress_main(void *arg)
{
    run_state *b = arg;
    bool tty = isatty(2);
    int ticks = 0;
    while (!wait_finished(b, 1000)) {
        if (!tty && ++ticks % 10) /* logs: a line every 10 s */
            continue;
        pthread_mutex_lock(&b->mu);
        fprintf(stderr, "%smoe-bench: %5.1f s  sent %d/%d  done %d  in flight %d  failed %d%s",
                tty ? "\r" : "", since(b, moe_now_ns()), b->sent, b->w->n, b->done, b->in_flight, b->failed,
                tty ? "   " : "\n");
        pthread_mutex_unlock(&b->mu);
    }
    if (tty)
        fputc('\n', stderr);
    return NULL;
}

static void *timeline_main(void *arg)
{
    run_state *b = arg;
    const bench_cfg *c = b->c;
    do {
        Moeserve__V1__ClusterStatusRequest req;
        moeserve__v1__cluster_status_request__init(&req);
        ProtobufCMessage *resp = NULL;
        double t = since(b, moe_now_ns());
        if (moe_rpc_unary(b->cli, "/moeserve.v1.Moeserve/ClusterStatus", &req.base, 5000,
                          &moeserve__v1__cluster_status_response__descriptor, &resp, NULL, 0) != GRPC_STATUS_OK)
            continue;
        const Moeserve__V1__ClusterStatusResponse *st = (const Moeserve__V1__ClusterStatusResponse *)resp;
        unsigned active = st->totals ? st->totals->active_streams : 0;
        for (size_t i = 0; i < st->n_instances; i++) {
            const Moeserve__V1__Instance *in = st->instances[i];
            const char *pool = moe_pool_name((moe_pool_kind)in->pool);
            pthread_mutex_lock(&b->mu);
            fprintf(c->jsonl,
                    "{\"type\": \"timeline\"%s%s, \"t_s\": %.4f, \"instance\": %u, \"pool\": \"%s\", "
                    "\"kv_used\": %u, \"kv_total\": %u, \"running\": %u, \"waiting\": %u, "
                    "\"pending_tokens\": %llu, \"active_streams\": %u}\n",
                    c->label ? ", " : "", c->label ? c->label : "", t, in->id, pool, in->kv_blocks_used,
                    in->kv_blocks_total, in->running, in->waiting, (unsigned long long)in->pending_prompt_tokens,
                    active);
            pthread_mutex_unlock(&b->mu);
        }
        protobuf_c_message_free_unpacked(resp, NULL);
    } while (!wait_finished(b, c->status_ms));
    return NULL;
}

int bench_server_vocab(moe_rpc_client *cli)
{
    Moeserve__V1__ClusterStatusRequest req;
    moeserve__v1__cluster_status_request__init(&req);
    ProtobufCMessage *resp = NULL;
    char det[256];
    if (moe_rpc_unary(cli, "/moeserve.v1.Moeserve/ClusterStatus", &req.base, 10000,
                      &moeserve__v1__cluster_status_response__descriptor, &resp, det, sizeof det) != GRPC_STATUS_OK) {
        fprintf(stderr, "moe-bench: ClusterStatus: %s\n", det);
        return -1;
    }
    int v = (int)((Moeserve__V1__ClusterStatusResponse *)resp)->vocab_size;
    protobuf_c_message_free_unpacked(resp, NULL);
    return v;
}

static bool start_detached(void *(*fn)(void *), void *arg, size_t stack)
{
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, stack);
    bool ok = pthread_create(&th, &at, fn, arg) == 0;
    pthread_attr_destroy(&at);
    return ok;
}

moe_status bench_run(moe_rpc_client *cli, const bench_cfg *c, const wl_workload *w, const wl_opts *wo,
                     rp_record *rec)
{
    run_state b = {.c = c, .w = w, .cli = cli, .rec = rec};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    for (int i = 0; i < w->n; i++)
        rec[i] = (rp_record){.n_in = w->req[i].n_in, .n_out = w->req[i].n_out, .server_ttft_ms = NAN};
    b.t0 = moe_now_ns();
    pthread_t helpers[2];
    int n_helpers = 0;
    if (c->progress && pthread_create(&helpers[n_helpers], NULL, progress_main, &b) == 0)
        n_helpers++;
    if (c->status_ms > 0 && c->jsonl && pthread_create(&helpers[n_helpers], NULL, timeline_main, &b) == 0)
        n_helpers++;
    moe_status st = MOE_OK;
    int launched = 0;
    for (int i = 0; i < w->n && st == MOE_OK; i++) {
        job *j = calloc(1, sizeof *j);
        uint32_t *p = malloc((size_t)w->req[i].n_in * sizeof *p);
        if (!j || !p) {
            free(j);
            free(p);
            st = moe_error(MOE_ERR_NOMEM, "moe-bench: out of memory for request %d's prompt", i);
            break;
        }
        wl_prompt(w, wo, i, c->vocab, p);
        *j = (job){.b = &b, .idx = i, .prompt = p};
        int64_t next = b.t0 + (int64_t)(w->req[i].t_s * 1e9), now = moe_now_ns();
        if (next > now)
            moe_sleep_ns(next - now);
        now = moe_now_ns();
        /* A late send (a busy client machine) starts the clock when it happens: that lateness is
         * the client's, not the server's. Waiting for --concurrency does count. */
        rec[i].t_arrival = since(&b, next > now ? next : now);
        pthread_mutex_lock(&b.mu);
        while (b.in_flight >= c->concurrency)
            pthread_cond_wait(&b.cv, &b.mu);
        b.in_flight++;
        b.sent++;
        pthread_mutex_unlock(&b.mu);
        if (!start_detached(run_one, j, 256 << 10)) {
            free(p);
            free(j);
            pthread_mutex_lock(&b.mu);
            b.in_flight--;
            b.sent--;
            pthread_mutex_unlock(&b.mu);
            st = moe_error(MOE_ERR_INTERNAL, "moe-bench: cannot start a thread for request %d", i);
            break;
        }
        launched++;
    }
    pthread_mutex_lock(&b.mu);
    while (b.done < launched)
        pthread_cond_wait(&b.cv, &b.mu);
    b.finished = true;
    pthread_cond_broadcast(&b.cv);
    pthread_mutex_unlock(&b.mu);
    for (int i = 0; i < n_helpers; i++)
        pthread_join(helpers[i], NULL);
    pthread_cond_destroy(&b.cv);
    pthread_mutex_destroy(&b.mu);
    return st;
}
