/* moe-serve, rank 0: loads the tokenizer and model config, starts the gRPC front end over the
 * cluster backend, runs the coordinator loop, and on SIGTERM / SIGINT / SIGUSR1 drains and shuts
 * every rank down. */
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/file.h"
#include "common/log.h"
#include "common/model_config.h"
#include "common/tokenizer.h"
#include "coordinator/cluster.h"
#include "coordinator/grpc_server.h"
#include "coordinator/http_server.h"
#include "ctrl/link_ucx.h"
#include "serve.h"

static volatile sig_atomic_t drain_flag = 0;

static void on_signal(int sig)
{
    (void)sig;
    drain_flag = 1;
}

typedef struct {
    const serve_args *a;
    const serve_layout *l;
    const moe_model_config *cfg;
    moe_grpc_server *srv;
    int cluster_port;
    const char *security; /* "TLS, API keys required" / "OPEN: ..." for the start-up line */
} ready_ctx;

static void print_ranks(char *buf, size_t cap, const serve_layout *l, moe_pool_kind pool)
{
    size_t off = 0;
    buf[0] = 0;
    for (int i = 0; i < l->n_instances && off < cap; i++) {
        if (l->instances[i].pool != pool)
            continue;
        for (int j = 0; j < l->instances[i].ep_size && off < cap; j++)
            off += (size_t)snprintf(buf + off, cap - off, "%s%d", off ? "," : "",
                                    l->instances[i].ranks[j]);
    }
}

/* The one-line summary: model, pools, ranks, KV capacity per instance, address. */
static void on_ready(void *vctx, const moe_cluster *cc)
{
    ready_ctx *rc = vctx;
    moe_cluster_status *st = calloc(1, sizeof *st);
    if (!st)
        return;
    moe_cluster_snapshot((moe_cluster *)(uintptr_t)cc, st);
    const serve_layout *l = rc->l;
    if (!l) { /* elastic: nothing has joined yet */
        printf("moe-serve: coordinator for model %s (%s, %d layers, %d experts); listening on %s "
               "(port %d); instances join at %s (port %d); coordinator pid %d; %s\n",
               st->model, rc->cfg->arch_name, rc->cfg->n_layers, rc->cfg->n_experts, rc->a->listen,
               moe_grpc_server_port(rc->srv), rc->a->cluster_listen, rc->cluster_port, (int)getpid(),
               rc->security);
        fflush(stdout);
        moe_cluster_status_release(st);
        free(st);
        return;
    }
    const moe_model_config *cfg = rc->cfg;
    char pools[512] = "", ranks[256];
    size_t off = 0;
    for (int p = MOE_POOL_PREFILL; p <= MOE_POOL_MIXED; p++) {
        int n = p == MOE_POOL_PREFILL ? l->n_prefill : p == MOE_POOL_DECODE ? l->n_decode : l->n_mixed;
        if (!n)
            continue;
        print_ranks(ranks, sizeof ranks, l, (moe_pool_kind)p);
        int ep = p == MOE_POOL_PREFILL ? rc->a->prefill_ep : p == MOE_POOL_DECODE ? rc->a->decode_ep : rc->a->ep_size;
        off += (size_t)snprintf(pools + off, sizeof pools - off, "%s%s %d x ep%d [rank %s]",
                                off ? ", " : "", moe_pool_name((moe_pool_kind)p), n, ep, ranks);
    }
    uint32_t kv_min = UINT32_MAX, bt = 16;
    for (uint32_t i = 0; i < st->n_instances; i++) {
        if (st->instances[i].kv_blocks_total < kv_min)
            kv_min = st->instances[i].kv_blocks_total;
        bt = st->instances[i].kv_block_tokens;
    }
    double block_mib =
        (double)cfg->n_layers * 2.0 * cfg->n_kv_heads * cfg->head_dim * bt * 4.0 / 1048576.0;
    printf("moe-serve: model %s (%s, %d layers, %d experts), %d ranks: coordinator 0, %s%s%s; KV "
           "per instance "
           "%u blocks x %u tokens (%.1f MiB); listening on %s (port %d); coordinator pid %d; %s\n",
           st->model, cfg->arch_name, cfg->n_layers, cfg->n_experts, l->world, pools,
           l->n_spare ? ", spare ranks " : "", l->n_spare ? "(idle)" : "", kv_min, bt,
           kv_min * block_mib, rc->a->listen, moe_grpc_server_port(rc->srv), (int)getpid(),
           rc->security);
    fflush(stdout);
    moe_cluster_status_release(st);
    free(st);
}

/* TLS material and API keys for both front ends, and the start-up line's summary of them. */
typedef struct {
    char *cert, *key, *ca;
    moe_auth *auth;
    char summary[160];
} security;

/* The same material for both front ends (borrowed from s). */
static moe_tls_pem security_tls(const security *s)
{
    return (moe_tls_pem){.cert = s->cert, .key = s->key, .client_ca = s->ca};
}

static void security_free(security *s)
{
    free(s->cert);
    if (s->key)
        memset(s->key, 0, strlen(s->key));
    free(s->key);
    free(s->ca);
    moe_auth_free(s->auth);
}

static int load_security(const serve_args *a, security *s)
{
    size_t n;
    const struct {
        const char *flag, *path;
        char **out;
    } pem[] = {{"--tls-cert", a->tls_cert, &s->cert},
               {"--tls-key", a->tls_key, &s->key},
               {"--tls-client-ca", a->tls_client_ca, &s->ca}};
    for (size_t i = 0; i < sizeof pem / sizeof pem[0]; i++)
        if (pem[i].path && moe_read_file(pem[i].path, 1 << 20, pem[i].out, &n) != MOE_OK) {
            fprintf(stderr, "moe-serve: %s %s: %s\n", pem[i].flag, pem[i].path, moe_error_message());
            return -1;
        }
    if (a->api_key_file && moe_auth_load(a->api_key_file, &s->auth) != MOE_OK) {
        fprintf(stderr, "moe-serve: %s\n", moe_error_message());
        return -1;
    }
    snprintf(s->summary, sizeof s->summary, "%s, %s",
             !s->cert ? "plaintext" : s->ca ? "TLS with client certificates" : "TLS",
             s->auth ? "API keys required" : "OPEN: no API keys (--api-key-file), anyone who can "
                                             "reach the ports may use them");
    if (!s->auth)
        MOE_LOG_W("open server: no --api-key-file, every client that reaches %s may use it",
                  a->listen);
    return 0;
}

static int rc_cluster_port(moe_link *link, bool elastic)
{
    return elastic ? moe_link_ucx_port(link) : 0;
}

int serve_coordinator_main(const serve_args *a, const serve_layout *l, moe_link *link)
{
    bool elastic = l == NULL;
    int rc = 1;
    moe_model_config cfg;
    moe_tokenizer *tok = NULL;
    moe_cluster *cl = NULL;
    moe_grpc_server *srv = NULL;
    moe_http_server *http = NULL;
    moe_fe_stats *fe_stats = NULL;
    security sec = {0};
    moe_chat_template *chat_tpl = NULL;
    char tpl_err[512] = ""; /* why chat is off; the HTTP server shows it, so it lives as long */
    /* Attention is data-parallel inside an expert-parallel instance: each of its ranks runs its own
     * sequences and KV, so the scheduler sees every rank as a placement target of its own; the
     * ranks of the instance step together and share the experts (worker side). */
    int n_targets = 0;
    for (int i = 0; l && i < l->n_instances; i++)
        n_targets += l->instances[i].ep_size;
    moe_cluster_instance *inst = calloc((size_t)(n_targets ? n_targets : 1), sizeof *inst);
    char tok_path[4200], dirbuf[4096], name[128];
    bool started = false;

    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL); /* mpirun forwards SIGUSR1 to every rank; SIGTERM it does not */
    signal(SIGPIPE, SIG_IGN);

    if (!inst) {
        fprintf(stderr, "moe-serve: out of memory\n");
        goto out;
    }

    if (moe_model_config_load(a->model_dir, &cfg) != MOE_OK) {
        fprintf(stderr, "moe-serve: %s\n", moe_error_message());
        goto out;
    }
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", a->model_dir);
    if (moe_tokenizer_load(tok_path, &tok) != MOE_OK) {
        fprintf(stderr, "moe-serve: %s\n", moe_error_message());
        goto out;
    }
    snprintf(dirbuf, sizeof dirbuf, "%s", a->model_dir);
    size_t dl = strlen(dirbuf);
    while (dl > 1 && dirbuf[dl - 1] == '/')
        dirbuf[--dl] = 0;
    snprintf(name, sizeof name, "%s", basename(dirbuf));
    for (int i = 0, t = 0; l && i < l->n_instances; i++)
        for (int j = 0; j < l->instances[i].ep_size; j++, t++) {
            inst[t].pool = l->instances[i].pool;
            inst[t].ep_size = 1;
            inst[t].ranks[0] = l->instances[i].ranks[j];
        }
    ready_ctx rctx = {.a = a, .l = l, .cfg = &cfg, .cluster_port = rc_cluster_port(link, elastic)};
    moe_cluster_opts co = {.model_name = name,
                           .cfg = &cfg,
                           .tok = tok,
                           .link = link,
                           .elastic = elastic,
                           .world_size = l ? l->world : 0,
                           .n_instances = n_targets,
                           .instances = inst,
                           .spare_ranks = l ? l->spare : NULL,
                           .n_spare = l ? l->n_spare : 0,
                           .max_requests = a->max_requests,
                           .max_queue = a->max_queue,
                           .heartbeat_timeout_ms = a->heartbeat_timeout_ms,
                           .startup_timeout_ms = a->startup_timeout_s * 1000,
                           .drain_timeout_s = a->drain_timeout_s,
                           .on_ready = on_ready,
                           .on_ready_ctx = &rctx,
                           .drain_flag = &drain_flag,
                           .migrate = {.no_policy = a->migration_off,
                                       .high_water = a->mig_high,
                                       .low_water = a->mig_low,
                                       .priority_headroom = a->mig_headroom,
                                       .interval_ms = a->mig_interval_ms,
                                       .max_inflight = a->mig_max_inflight,
                                       .final_blocks = a->mig_final_blocks,
                                       .max_stages = a->mig_max_stages,
                                       .stage_blocks = a->mig_stage_blocks,
                                       .min_remaining = a->mig_min_remaining,
                                       .retry_ms = a->mig_retry_ms,
                                       .waiting_ticks = a->mig_waiting_ticks,
                                       .every_tokens = a->mig_every}};
    if (moe_cluster_create(&co, &cl) != MOE_OK) {
        fprintf(stderr, "moe-serve: %s\n", moe_error_message());
        goto out;
    }
    moe_grpc_server_config gc;
    /* the context both front ends admit: max_position, or a smaller sliding_window */
    moe_grpc_server_config_default(&gc, cfg.vocab_size,
                                   (uint32_t)moe_model_config_context_len(&cfg));
    gc.listen_addr = a->listen;
    gc.n_threads = a->grpc_threads;
    if (a->max_new_tokens > 0 && (uint32_t)a->max_new_tokens < gc.limits.max_new_tokens)
        gc.limits.max_new_tokens = (uint32_t)a->max_new_tokens;
    if (gc.limits.default_max_new_tokens > gc.limits.max_new_tokens)
        gc.limits.default_max_new_tokens = gc.limits.max_new_tokens;
    moe_frontend_backend be;
    moe_cluster_backend(cl, &be);
    /* one account of requests for both front ends: ClusterStatus and /metrics agree */
    if (moe_fe_stats_create(&fe_stats) != MOE_OK) {
        fprintf(stderr, "moe-serve: %s\n", moe_error_message());
        goto out;
    }
    gc.stats = fe_stats;
    if (load_security(a, &sec) != 0)
        goto out;
    gc.auth = sec.auth;
    gc.tls = security_tls(&sec);
    rctx.security = sec.summary;
    /* Listening before the workers are ready: Health answers NOT_SERVING until they are. */
    if (moe_grpc_server_start(&gc, &be, &srv) != MOE_OK) {
        fprintf(stderr, "moe-serve: --listen %s: %s\n", a->listen, moe_error_message());
        goto out;
    }
    if (a->http_listen) {
        /* Chat needs the model's template; without one the HTTP API still serves completions
         * and answers chat requests with a 400 that says why. */
        if (moe_chat_template_load(a->model_dir, a->chat_template, &chat_tpl) != MOE_OK) {
            snprintf(tpl_err, sizeof tpl_err, "%s", moe_error_message());
            if (a->chat_template) {
                fprintf(stderr, "moe-serve: --chat-template: %s\n", tpl_err);
                goto out;
            }
            MOE_LOG_W("chat completions disabled: %s", tpl_err);
        }
        moe_http_server_config hc;
        moe_http_server_config_default(&hc, cfg.vocab_size,
                                       (uint32_t)moe_model_config_context_len(&cfg));
        hc.limits = gc.limits;
        hc.listen_addr = a->http_listen;
        hc.model_name = name;
        hc.chat_template = chat_tpl;
        hc.chat_template_error = tpl_err[0] ? tpl_err : NULL;
        hc.tokenizer = tok;
        hc.stats = fe_stats;
        hc.auth = sec.auth;
        hc.tls = security_tls(&sec);
        if (moe_http_server_start(&hc, &be, &http) != MOE_OK) {
            fprintf(stderr, "moe-serve: %s\n", moe_error_message());
            goto out;
        }
    }
    rctx.srv = srv;
    started = true;
    moe_status st = moe_cluster_run(cl);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-serve: %s\n", moe_error_message());
    } else {
        MOE_LOG_I("drained; stopping");
        rc = 0;
    }
out:
    moe_http_server_free(http, 2.0);
    if (srv) {
        moe_grpc_server_shutdown(srv, 2.0);
        moe_grpc_server_free(srv);
    }
    if (cl || (!started && !elastic)) {
        /* Every worker waits for Shutdown, whatever happened here. */
        if (!cl) {
            moe_cluster_instance one = {.pool = MOE_POOL_MIXED, .ep_size = 1, .ranks = {1}};
            moe_cluster_opts mini = {.link = link,
                                     .world_size = l->world,
                                     .n_instances = 1,
                                     .instances = &one,
                                     .max_requests = 1,
                                     .heartbeat_timeout_ms = 1,
                                     .startup_timeout_ms = 1};
            moe_cluster_create(&mini, &cl);
        }
        if (cl && moe_cluster_shutdown_workers(cl, 15000) != MOE_OK) {
            fprintf(stderr, "moe-serve: %s; aborting the job\n", moe_error_message());
            moe_cluster_free(cl);
            if (!elastic)
                MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    moe_cluster_free(cl);
    moe_fe_stats_free(fe_stats);
    security_free(&sec);
    moe_tokenizer_free(tok);
    moe_chat_template_free(chat_tpl);
    free(inst);
    return rc;
}
