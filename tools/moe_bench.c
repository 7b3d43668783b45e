/* moe-bench: a load generator for a moeserve cluster. Requests arrive as a Poisson process at a
 * given rate (or all at once), with prompt and output lengths drawn from distributions, each on
 * its own stream; prints TTFT, TPOT and end-to-end latency percentiles and throughput, measured
 * at the client. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "moeserve.pb-c.h"
#include "tools/moe_client/client.h"

typedef struct {
    enum { DIST_FIXED, DIST_UNIFORM, DIST_EXP } kind;
    double a, b; /* fixed: a; uniform: [a, b]; exp: mean a */
} dist;

typedef struct {
    const char *addr;
    int requests;
    double rate; /* requests per second; 0 = all at once */
    int concurrency;
    dist prompt_len, output_len;
    int vocab;
    uint64_t seed;
    float temperature;
    bool ignore_eos, json;
    int64_t timeout_ms;
} bench_opts;

typedef struct {
    int prompt_len, max_new;
    int64_t t_arrival, t_sent, t_first, t_second, t_last; /* ns, moe_now_ns clock */
    int n_tokens;
    grpc_status_code code;
    char details[160];
    double server_ttft_ms;
} record;

typedef struct {
    const bench_opts *o;
    moe_rpc_client *cli;
    record *rec;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int in_flight, done;
} bench;

static void usage(FILE *f)
{
    fputs("usage: moe-bench [--addr HOST:PORT] [options]\n"
          "  --addr HOST:PORT     server (default $MOE_SERVER_ADDR, else 127.0.0.1:50051)\n"
          "  --requests N         requests to send (default 200)\n"
          "  --rate R             mean arrivals per second, Poisson (default 0: all at once)\n"
          "  --concurrency C      most streams open at once (default 256)\n"
          "  --prompt-len D       prompt tokens: N | A-B (uniform) | exp:MEAN (default 128)\n"
          "  --output-len D       max new tokens, same forms (default 128)\n"
          "  --vocab V            prompt ids drawn from [0, V) (default: the server's vocabulary)\n"
          "  --temperature T      default 0 (greedy)\n"
          "  --no-ignore-eos      stop at EOS (default: ignore it, so outputs have exact lengths)\n"
          "  --seed S             arrivals and lengths (default 1)\n"
          "  --timeout-ms MS      per request (default 600000)\n"
          "  --json               one JSON object instead of the table\n",
          f);
}

static bool parse_dist(const char *s, dist *d)
{
    char *end;
    if (!strncmp(s, "exp:", 4)) {
        d->kind = DIST_EXP;
        d->a = strtod(s + 4, &end);
        return *end == 0 && d->a >= 1;
    }
    d->a = strtod(s, &end);
    if (*end == '-') {
        d->kind = DIST_UNIFORM;
        d->b = strtod(end + 1, &end);
        return *end == 0 && d->a >= 1 && d->b >= d->a;
    }
    d->kind = DIST_FIXED;
    return *end == 0 && d->a >= 1;
}

/* xorshift64*: arrivals and lengths reproducible from --seed. */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static int draw(const dist *d, uint64_t *s)
{
    double v = d->a;
    if (d->kind == DIST_UNIFORM)
        v = d->a + floor(rng_unit(s) * (d->b - d->a + 1));
    else if (d->kind == DIST_EXP)
        v = ceil(-d->a * log(1.0 - rng_unit(s)));
    return v < 1 ? 1 : (int)v;
}

typedef struct {
    bench *b;
    int idx;
    uint32_t *prompt;
} job;

static void *run_one(void *arg)
{
    job *j = arg;
    bench *b = j->b;
    record *r = &b->rec[j->idx];
    Moeserve__V1__TokenIds ids;
    moeserve__v1__token_ids__init(&ids);
    ids.n_ids = (size_t)r->prompt_len;
    ids.ids = j->prompt;
    Moeserve__V1__SamplingParams sp;
    moeserve__v1__sampling_params__init(&sp);
    sp.temperature_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = b->o->temperature;
    sp.seed_opt_case = MOESERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = (uint64_t)j->idx;
    Moeserve__V1__GenerateRequest req;
    moeserve__v1__generate_request__init(&req);
    req.prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    req.sampling = &sp;
    req.max_new_tokens = (uint32_t)r->max_new;
    req.ignore_eos = b->o->ignore_eos;
    r->t_sent = moe_now_ns();
    moe_rpc_stream *s =
        moe_rpc_stream_open(b->cli, "/moeserve.v1.Moeserve/Generate", &req.base, b->o->timeout_ms);
    if (!s) {
        r->code = GRPC_STATUS_INTERNAL;
        snprintf(r->details, sizeof r->details, "could not start the call");
    } else {
        ProtobufCMessage *m;
        while ((m = moe_rpc_stream_next(s, &moeserve__v1__generate_response__descriptor))) {
            const Moeserve__V1__GenerateResponse *g = (const Moeserve__V1__GenerateResponse *)m;
            int64_t now = moe_now_ns();
            if (g->n_token_ids) {
                if (!r->n_tokens)
                    r->t_first = now;
                if (r->n_tokens < 2 && r->n_tokens + (int)g->n_token_ids >= 2)
                    r->t_second = now;
                r->t_last = now;
                r->n_tokens += (int)g->n_token_ids;
            }
            if (g->timing)
                r->server_ttft_ms = g->timing->ttft_ms;
            protobuf_c_message_free_unpacked(m, NULL);
        }
        r->code = moe_rpc_stream_close(s, r->details, sizeof r->details);
    }
    free(j->prompt);
    free(j);
    pthread_mutex_lock(&b->mu);
    b->in_flight--;
    b->done++;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, int n, double p)
{
    if (n == 0)
        return NAN;
    double k = p / 100.0 * (n - 1);
    int i = (int)floor(k);
    return i + 1 < n ? v[i] + (v[i + 1] - v[i]) * (k - i) : v[n - 1];
}

static int server_vocab(moe_rpc_client *cli)
{
    Moeserve__V1__ClusterStatusRequest req;
    moeserve__v1__cluster_status_request__init(&req);
    ProtobufCMessage *resp = NULL;
    char det[256];
    if (moe_rpc_unary(cli, "/moeserve.v1.Moeserve/ClusterStatus", &req.base, 10000,
                      &moeserve__v1__cluster_status_response__descriptor, &resp, det,
                      sizeof det) != GRPC_STATUS_OK) {
        fprintf(stderr, "moe-bench: ClusterStatus: %s\n", det);
        return -1;
    }
    int v = (int)((Moeserve__V1__ClusterStatusResponse *)resp)->vocab_size;
    protobuf_c_message_free_unpacked(resp, NULL);
    return v;
}

static int parse_args(int argc, char **argv, bench_opts *o)
{
    const char *env = getenv("MOE_SERVER_ADDR");
    *o = (bench_opts){.addr = env && *env ? env : "127.0.0.1:50051",
                      .requests = 200,
                      .concurrency = 256,
                      .prompt_len = {DIST_FIXED, 128, 0},
                      .output_len = {DIST_FIXED, 128, 0},
                      .seed = 1,
                      .ignore_eos = true,
                      .timeout_ms = 600000};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true;
        char *end = NULL;
        if (!strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
            continue;
        } else if (!strcmp(a, "--no-ignore-eos")) {
            o->ignore_eos = false;
            continue;
        }
        if (!v) {
            fprintf(stderr, "moe-bench: %s needs a value\n", a);
            return -1;
        }
        errno = 0;
        if (!strcmp(a, "--addr"))
            o->addr = v;
        else if (!strcmp(a, "--requests"))
            ok = (o->requests = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(a, "--rate"))
            ok = (o->rate = strtod(v, &end)) >= 0 && !*end;
        else if (!strcmp(a, "--concurrency"))
            ok = (o->concurrency = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(a, "--prompt-len"))
            ok = parse_dist(v, &o->prompt_len);
        else if (!strcmp(a, "--output-len"))
            ok = parse_dist(v, &o->output_len);
        else if (!strcmp(a, "--vocab"))
            ok = (o->vocab = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(a, "--temperature"))
            ok = (o->temperature = strtof(v, &end)) >= 0 && !*end;
        else if (!strcmp(a, "--seed"))
            o->seed = strtoull(v, &end, 10), ok = !*end;
        else if (!strcmp(a, "--timeout-ms"))
            ok = (o->timeout_ms = strtoll(v, &end, 10)) > 0 && !*end;
        else {
            fprintf(stderr, "moe-bench: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (!ok || errno) {
            fprintf(stderr, "moe-bench: %s: bad value '%s'\n", a, v);
            return -1;
        }
        i++;
    }
    return 0;
}

static void summary(const char *name, double *v, int n, bool json, bool last)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double mean = 0;
    for (int i = 0; i < n; i++)
        mean += v[i];
    mean = n ? mean / n : NAN;
    if (json)
        printf("\"%s_ms\": {\"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}%s", name,
               mean, pct(v, n, 50), pct(v, n, 90), pct(v, n, 99), last ? "" : ", ");
    else
        printf("%-6s ms   mean %9.2f   p50 %9.2f   p90 %9.2f   p99 %9.2f\n", name, mean,
               pct(v, n, 50), pct(v, n, 90), pct(v, n, 99));
}

int main(int argc, char **argv)
{
    bench_opts o;
    int prc = parse_args(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    bench b = {.o = &o};
    b.cli = moe_rpc_connect(o.addr);
    b.rec = calloc((size_t)o.requests, sizeof *b.rec);
    if (!b.cli || !b.rec) {
        fprintf(stderr, "moe-bench: out of memory\n");
        return 1;
    }
    if (!o.vocab && (o.vocab = server_vocab(b.cli)) <= 0) {
        moe_rpc_close(b.cli);
        return 1;
    }
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    uint64_t rs = o.seed * 0x9E3779B97F4A7C15ULL + 1;
    int64_t t0 = moe_now_ns(), next = t0;
    for (int i = 0; i < o.requests; i++) {
        record *r = &b.rec[i];
        r->prompt_len = draw(&o.prompt_len, &rs);
        r->max_new = draw(&o.output_len, &rs);
        if (o.rate > 0 && i > 0)
            next += (int64_t)(-log(1.0 - rng_unit(&rs)) / o.rate * 1e9);
        job *j = calloc(1, sizeof *j);
        uint32_t *p = malloc((size_t)r->prompt_len * sizeof *p);
        if (!j || !p) {
            fprintf(stderr, "moe-bench: out of memory\n");
            return 1;
        }
        for (int k = 0; k < r->prompt_len; k++)
            p[k] = (uint32_t)(rng_next(&rs) % (uint64_t)o.vocab);
        *j = (job){.b = &b, .idx = i, .prompt = p};
        int64_t now = moe_now_ns();
        if (next > now) {
            struct timespec ts = {.tv_sec = (next - now) / 1000000000,
                                  .tv_nsec = (next - now) % 1000000000};
            nanosleep(&ts, NULL);
        }
        r->t_arrival = next > now ? next : now;
        pthread_mutex_lock(&b.mu);
        while (b.in_flight >= o.concurrency)
            pthread_cond_wait(&b.cv, &b.mu);
        b.in_flight++;
        pthread_mutex_unlock(&b.mu);
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&at, 256 << 10);
        if (pthread_create(&th, &at, run_one, j) != 0) {
            fprintf(stderr, "moe-bench: cannot start a thread\n");
            return 1;
        }
        pthread_attr_destroy(&at);
    }
    pthread_mutex_lock(&b.mu);
    while (b.done < o.requests)
        pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    int64_t t_end = moe_now_ns();

    double *ttft = calloc((size_t)o.requests, sizeof(double)),
           *tpot = calloc((size_t)o.requests, sizeof(double));
    double *e2e = calloc((size_t)o.requests, sizeof(double)),
           *sttft = calloc((size_t)o.requests, sizeof(double)),
           *gap2 = calloc((size_t)o.requests, sizeof(double));
    int n_ok = 0, n_tpot = 0;
    long long out_tokens = 0, in_tokens = 0;
    const char *first_err = NULL;
    int n_err = 0;
    for (int i = 0; i < o.requests; i++) {
        record *r = &b.rec[i];
        if (r->code != GRPC_STATUS_OK || !r->n_tokens) {
            n_err++;
            if (!first_err)
                first_err = r->details;
            continue;
        }
        /* TTFT from the arrival time, so that client-side queueing (--concurrency) counts too. */
        ttft[n_ok] = (double)(r->t_first - r->t_arrival) * 1e-6;
        e2e[n_ok] = (double)(r->t_last - r->t_arrival) * 1e-6;
        sttft[n_ok] = r->server_ttft_ms;
        n_ok++;
        if (r->n_tokens > 1) {
            /* The first-to-second token gap: in a disaggregated cluster, the KV hand-off. */
            gap2[n_tpot] = (double)(r->t_second - r->t_first) * 1e-6;
            tpot[n_tpot++] = (double)(r->t_last - r->t_first) * 1e-6 / (r->n_tokens - 1);
        }
        out_tokens += r->n_tokens;
        in_tokens += r->prompt_len;
    }
    double wall = (double)(t_end - t0) * 1e-9;
    if (o.json) {
        printf(
            "{\"requests\": %d, \"ok\": %d, \"failed\": %d, \"wall_s\": %.3f, \"req_per_s\": %.3f, "
            "\"output_tok_per_s\": %.2f, \"total_tok_per_s\": %.2f, ",
            o.requests, n_ok, n_err, wall, n_ok / wall, out_tokens / wall,
            (out_tokens + in_tokens) / wall);
        summary("ttft", ttft, n_ok, true, false);
        summary("server_ttft", sttft, n_ok, true, false);
        summary("tpot", tpot, n_tpot, true, false);
        summary("second_token_gap", gap2, n_tpot, true, false);
        summary("e2e", e2e, n_ok, true, true);
        printf("}\n");
    } else {
        printf("moe-bench: %d requests (%d ok, %d failed) in %.2f s at %s, rate %s%.2f/s, "
               "concurrency <= %d\n",
               o.requests, n_ok, n_err, wall, o.addr, o.rate > 0 ? "" : "all at once ", o.rate,
               o.concurrency);
        printf("throughput: %.2f req/s, %.1f output tok/s, %.1f total tok/s (%lld prompt + %lld "
               "output tokens)\n",
               n_ok / wall, out_tokens / wall, (out_tokens + in_tokens) / wall, in_tokens,
               out_tokens);
        summary("TTFT", ttft, n_ok, false, false);
        summary("sTTFT", sttft, n_ok, false, false);
        summary("TPOT", tpot, n_tpot, false, false);
        summary("T1-T2", gap2, n_tpot, false, false);
        summary("E2E", e2e, n_ok, false, true);
        if (n_err)
            printf("first error: %s\n", first_err);
    }
    free(ttft);
    free(tpot);
    free(e2e);
    free(sttft);
    free(gap2);
    free(b.rec);
    moe_rpc_close(b.cli);
    return n_err ? 1 : 0;
}
