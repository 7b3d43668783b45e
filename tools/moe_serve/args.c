/* moe-serve's command line and the cluster layout (which rank serves which instance of which
 * pool), computed identically on every rank from the same argv. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve.h"
#include "worker/compute/backend.h"

static void usage(FILE *f)
{
    fputs(
        "usage: mpirun -np N moe-serve --model DIR [options]          (one job, one failure domain)\n"
        "       moe-serve coordinator --model DIR --cluster-listen ADDR:PORT [options]\n"
        "       [mpirun -np E] moe-serve instance --join HOST:PORT --pool P --model DIR [options]\n"
        "  under mpirun, rank 0 is the coordinator (gRPC, tokenizer, scheduler) and ranks 1..N-1\n"
        "  are workers; `coordinator` and `instance` run an elastic cluster whose instances (E ranks\n"
        "  each, splitting the experts) join over the network and may come and go (docs/cluster.md)\n"
        "elastic cluster:\n"
        "  --cluster-listen ADDR:PORT  coordinator: where instances join (UCX; port 0 picks one)\n"
        "  --join HOST:PORT        instance: the coordinator's --cluster-listen\n"
        "  --pool prefill|decode|mixed  instance: its pool\n"
        "  --cluster-token-file F  the shared cluster token (default: $MOESERVE_CLUSTER_TOKEN);\n"
        "                          joins without it are refused\n"
        "  --host-label NAME       instance: its host in status tables (default: its address)\n",
        f);
    fputs(
        "layout:\n"
        "  --prefill-instances P   prefill instances (default 1, or N-1 minus --decode-instances)\n"
        "  --decode-instances D    decode instances (default: the remaining workers)\n"
        "  --colocated             every worker is a mixed prefill+decode instance (vLLM-style)\n"
        "  --ep-size E             ranks per instance: they split the experts (default 1)\n"
        "  --prefill-ep E          ranks per prefill instance (default --ep-size)\n"
        "  --decode-ep E           ranks per decode instance (default --ep-size)\n"
        "  --redundant-experts R   EPLB: replicas of the hottest experts per expert-parallel\n"
        "                          instance, re-planned from the routed loads (default 0: off)\n"
        "  --eplb-interval N       engine steps between EPLB re-plans (default 256)\n"
        "serving:\n"
        "  --listen ADDR:PORT      gRPC address (default 127.0.0.1:50051, this host only; serving\n"
        "                          others takes an explicit address, e.g. 0.0.0.0:50051)\n"
        "  --http-listen ADDR:PORT also serve the OpenAI HTTP API and /metrics there (off by default)\n"
        "  --tls-cert F --tls-key F  TLS on both ports (PEM certificate chain and key)\n"
        "  --tls-client-ca F       also require client certificates signed by this CA (mTLS)\n"
        "  --api-key-file F        API keys, one `NAME KEY [admin]` a line: `Authorization: Bearer\n"
        "                          KEY` (HTTP) / metadata `authorization` (gRPC); admin for Drain\n"
        "  --chat-template FILE    Jinja chat template (default: tokenizer_config.json's)\n"
        "  --grpc-threads N        completion-queue threads (default 2)\n"
        "  --max-requests N        requests in flight before RESOURCE_EXHAUSTED (default 1024)\n"
        "  --max-queue N           requests waiting for a prefill slot before RESOURCE_EXHAUSTED\n"
        "                          (default: --max-requests)\n"
        "  --max-new-tokens N      largest max_new_tokens a request may ask (default: the "
        "context)\n"
        "  --drain-timeout-s S     on SIGTERM, running requests may finish for S s (default 30)\n"
        "engine (per worker):\n",
        f);
    fputs( /* split: one literal may hold at most 4095 characters (ISO C) */
        "  --threads T             kernel threads (default: cores / ranks on the node)\n"
        "  --device cpu|cuda       compute backend of the workers (default cpu; cuda: GPU 0, or\n"
        "                          GPU r for rank r of an expert-parallel instance, all-to-all\n"
        "                          over NCCL; built, not yet run on a GPU: docs/backends.md)\n"
        "  --kv-blocks N           KV cache blocks per instance\n"
        "  --kv-mb MB              KV cache size per instance, when --kv-blocks is not given\n"
        "  --kv-block-size N       tokens per KV block (default 16)\n"
        "  --batch-tokens N        tokens per engine step, prefill chunks included (default 512)\n"
        "  --max-seqs N            sequences per engine step (default 64)\n"
        "failure handling:\n"
        "  --heartbeat-ms N        worker heartbeat interval (default 200)\n"
        "  --heartbeat-timeout-ms N  silence before an instance is UNREACHABLE (default 5000)\n"
        "  --kv-timeout-ms N       one KV transfer attempt (default 5000)\n"
        "  --kv-lease-ms N         prefill frees KV nobody pulled for this long (default 10000)\n"
        "  --kv-transfer MODE      layer: the decode side reserves at admission and each layer's KV\n"
        "                          leaves while later layers compute (default); block: whole\n"
        "                          blocks are pulled after the prefill\n"
        "  --startup-timeout-s S   for every worker to load the model (default 600)\n"
        "live migration (docs/migration.md):\n"
        "  --migration on|off      balance / de-fragmentation / priority moves (default on;\n"
        "                          drain works either way)\n"
        "  --migrate-high F        virtual KV usage above which an instance sheds (default 0.85)\n"
        "  --migrate-low F         destinations must be below this (default 0.60)\n"
        "  --migrate-priority-headroom F  added for a priority request (default 0.30)\n"
        "  --migrate-interval-ms N policy period (default 50)\n"
        "  --migrate-max-inflight N  migrations in flight in the cluster (default 4)\n"
        "  --migrate-final-blocks N  unsent blocks at most when the source pauses (default 2)\n"
        "  --migrate-max-stages N  stages before the final one is forced (default 32)\n"
        "  --migrate-stage-blocks N  blocks per non-final stage (default 128)\n"
        "  --migrate-min-remaining N  requests this close to their end stay (default 16)\n"
        "  --migrate-retry-ms N    a request waits this long after an aborted move (default 1000)\n"
        "  --migrate-waiting-ticks N  periods of queued demand before defrag (default 3)\n"
        "  --migrate-every N       test/bench: move every decoding request every N tokens (0 off)\n",
        f);
}

static int perr(bool print, const char *fmt, ...)
{
    if (print) {
        va_list ap;
        va_start(ap, fmt);
        fputs("moe-serve: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    }
    return -1;
}

static int parse_int(const char *flag, const char *v, long lo, long hi, int *out, bool print)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi)
        return perr(print, "%s: '%s' is not an integer in [%ld, %ld]", flag, v, lo, hi);
    *out = (int)x;
    return 0;
}

/* A fraction in (0, 10] (virtual usage may exceed 1). */
static int parse_frac(const char *flag, const char *v, double *out, bool print)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || *end || end == v || !(x > 0.0 && x <= 10.0))
        return perr(print, "%s: '%s' is not a number in (0, 10]", flag, v);
    *out = x;
    return 0;
}

int serve_parse_args(int argc, char **argv, serve_args *a, bool print)
{
    enum {
        O_MODEL = 1,
        O_P,
        O_D,
        O_COLO,
        O_EP,
        O_PEP,
        O_DEP,
        O_REDUNDANT,
        O_EPLB_INTERVAL,
        O_LISTEN,
        O_HTTP_LISTEN,
        O_TLS_CERT,
        O_TLS_KEY,
        O_TLS_CA,
        O_API_KEYS,
        O_CHAT_TEMPLATE,
        O_GRPC,
        O_MAXREQ,
        O_MAXQ,
        O_MAXNEW,
        O_DRAIN,
        O_THREADS,
        O_DEVICE,
        O_KVB,
        O_KVMB,
        O_BS,
        O_BATCH,
        O_SEQS,
        O_HB,
        O_HBT,
        O_KVT,
        O_LEASE,
        O_KVX,
        O_START,
        O_MIG,
        O_MIG_HIGH,
        O_MIG_LOW,
        O_MIG_HEAD,
        O_MIG_INT,
        O_MIG_INFL,
        O_MIG_FINAL,
        O_MIG_STAGES,
        O_MIG_SBLK,
        O_MIG_MINREM,
        O_MIG_RETRY,
        O_MIG_WAIT,
        O_MIG_EVERY,
        O_HELP,
        O_CLUSTER_LISTEN,
        O_JOIN,
        O_POOL,
        O_TOKEN_FILE,
        O_HOST_LABEL
    };
    static const struct option opts[] = {{"model", required_argument, 0, O_MODEL},
                                         {"prefill-instances", required_argument, 0, O_P},
                                         {"decode-instances", required_argument, 0, O_D},
                                         {"colocated", no_argument, 0, O_COLO},
                                         {"ep-size", required_argument, 0, O_EP},
                                         {"prefill-ep", required_argument, 0, O_PEP},
                                         {"decode-ep", required_argument, 0, O_DEP},
                                         {"redundant-experts", required_argument, 0, O_REDUNDANT},
                                         {"eplb-interval", required_argument, 0, O_EPLB_INTERVAL},
                                         {"listen", required_argument, 0, O_LISTEN},
                                         {"http-listen", required_argument, 0, O_HTTP_LISTEN},
                                         {"tls-cert", required_argument, 0, O_TLS_CERT},
                                         {"tls-key", required_argument, 0, O_TLS_KEY},
                                         {"tls-client-ca", required_argument, 0, O_TLS_CA},
                                         {"api-key-file", required_argument, 0, O_API_KEYS},
                                         {"chat-template", required_argument, 0, O_CHAT_TEMPLATE},
                                         {"grpc-threads", required_argument, 0, O_GRPC},
                                         {"max-requests", required_argument, 0, O_MAXREQ},
                                         {"max-queue", required_argument, 0, O_MAXQ},
                                         {"max-new-tokens", required_argument, 0, O_MAXNEW},
                                         {"drain-timeout-s", required_argument, 0, O_DRAIN},
                                         {"threads", required_argument, 0, O_THREADS},
                                         {"device", required_argument, 0, O_DEVICE},
                                         {"kv-blocks", required_argument, 0, O_KVB},
                                         {"kv-mb", required_argument, 0, O_KVMB},
                                         {"kv-block-size", required_argument, 0, O_BS},
                                         {"batch-tokens", required_argument, 0, O_BATCH},
                                         {"max-seqs", required_argument, 0, O_SEQS},
                                         {"heartbeat-ms", required_argument, 0, O_HB},
                                         {"heartbeat-timeout-ms", required_argument, 0, O_HBT},
                                         {"kv-timeout-ms", required_argument, 0, O_KVT},
                                         {"kv-lease-ms", required_argument, 0, O_LEASE},
                                         {"kv-transfer", required_argument, 0, O_KVX},
                                         {"startup-timeout-s", required_argument, 0, O_START},
                                         {"migration", required_argument, 0, O_MIG},
                                         {"migrate-high", required_argument, 0, O_MIG_HIGH},
                                         {"migrate-low", required_argument, 0, O_MIG_LOW},
                                         {"migrate-priority-headroom", required_argument, 0,
                                          O_MIG_HEAD},
                                         {"migrate-interval-ms", required_argument, 0, O_MIG_INT},
                                         {"migrate-max-inflight", required_argument, 0,
                                          O_MIG_INFL},
                                         {"migrate-final-blocks", required_argument, 0,
                                          O_MIG_FINAL},
                                         {"migrate-max-stages", required_argument, 0,
                                          O_MIG_STAGES},
                                         {"migrate-stage-blocks", required_argument, 0,
                                          O_MIG_SBLK},
                                         {"migrate-min-remaining", required_argument, 0,
                                          O_MIG_MINREM},
                                         {"migrate-retry-ms", required_argument, 0, O_MIG_RETRY},
                                         {"migrate-waiting-ticks", required_argument, 0,
                                          O_MIG_WAIT},
                                         {"migrate-every", required_argument, 0, O_MIG_EVERY},
                                         {"help", no_argument, 0, O_HELP},
                                         {"cluster-listen", required_argument, 0, O_CLUSTER_LISTEN},
                                         {"join", required_argument, 0, O_JOIN},
                                         {"pool", required_argument, 0, O_POOL},
                                         {"cluster-token-file", required_argument, 0, O_TOKEN_FILE},
                                         {"host-label", required_argument, 0, O_HOST_LABEL},
                                         {0, 0, 0, 0}};
    *a = (serve_args){.prefill = -1,
                      .decode = -1,
                      .ep_size = 1,
                      .eplb_interval = 256,
                      .listen = "127.0.0.1:50051",
                      .block_size = 16,
                      .batch_tokens = 512,
                      .max_seqs = 64,
                      .max_requests = 1024,
                      .max_queue = -1,
                      .heartbeat_ms = 200,
                      .heartbeat_timeout_ms = 5000,
                      .kv_timeout_ms = 5000,
                      .lease_ms = 10000,
                      .drain_timeout_s = 30.0,
                      .startup_timeout_s = 600,
                      .grpc_threads = 2};
    /* The launch mode is the first word, if any: `moe-serve coordinator ...`, `moe-serve instance`. */
    if (argc > 1 && !strcmp(argv[1], "coordinator"))
        a->mode = SERVE_MODE_COORDINATOR;
    else if (argc > 1 && !strcmp(argv[1], "instance"))
        a->mode = SERVE_MODE_INSTANCE;
    if (a->mode != SERVE_MODE_MPIRUN) {
        argv[1] = argv[0];
        argv++;
        argc--;
        a->heartbeat_timeout_ms = 3000; /* a lost instance costs its requests a resume: be quick */
    }
    opterr = print;
    optind = 1;
    int c, drain = 30;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case O_MODEL:
            a->model_dir = optarg;
            break;
        case O_P:
            rc = parse_int("--prefill-instances", optarg, 1, 4096, &a->prefill, print);
            break;
        case O_D:
            rc = parse_int("--decode-instances", optarg, 1, 4096, &a->decode, print);
            break;
        case O_COLO:
            a->colocated = true;
            break;
        case O_EP:
            rc = parse_int("--ep-size", optarg, 1, SERVE_MAX_EP, &a->ep_size, print);
            break;
        case O_PEP:
            rc = parse_int("--prefill-ep", optarg, 1, SERVE_MAX_EP, &a->prefill_ep, print);
            break;
        case O_DEP:
            rc = parse_int("--decode-ep", optarg, 1, SERVE_MAX_EP, &a->decode_ep, print);
            break;
        case O_REDUNDANT:
            rc = parse_int("--redundant-experts", optarg, 0, 4096, &a->redundant_experts, print);
            break;
        case O_EPLB_INTERVAL:
            rc = parse_int("--eplb-interval", optarg, 1, 1 << 30, &a->eplb_interval, print);
            break;
        case O_HTTP_LISTEN: a->http_listen = optarg; break;
        case O_TLS_CERT: a->tls_cert = optarg; break;
        case O_TLS_KEY: a->tls_key = optarg; break;
        case O_TLS_CA: a->tls_client_ca = optarg; break;
        case O_API_KEYS: a->api_key_file = optarg; break;
        case O_CHAT_TEMPLATE: a->chat_template = optarg; break;
        case O_LISTEN:
            a->listen = optarg;
            break;
        case O_CLUSTER_LISTEN:
            a->cluster_listen = optarg;
            break;
        case O_JOIN:
            a->join = optarg;
            break;
        case O_TOKEN_FILE:
            a->token_file = optarg;
            break;
        case O_HOST_LABEL:
            a->host_label = optarg;
            break;
        case O_POOL:
            a->pool = (int)moe_pool_parse(optarg);
            if (!a->pool) {
                if (print)
                    fprintf(stderr, "moe-serve: --pool: '%s', want prefill, decode or mixed\n", optarg);
                rc = -1;
            }
            break;
        case O_GRPC:
            rc = parse_int("--grpc-threads", optarg, 1, 64, &a->grpc_threads, print);
            break;
        case O_MAXREQ:
            rc = parse_int("--max-requests", optarg, 1, 1 << 20, &a->max_requests, print);
            break;
        case O_MAXQ:
            rc = parse_int("--max-queue", optarg, 0, 1 << 20, &a->max_queue, print);
            break;
        case O_MAXNEW:
            rc = parse_int("--max-new-tokens", optarg, 1, INT_MAX / 2, &a->max_new_tokens, print);
            break;
        case O_DRAIN:
            rc = parse_int("--drain-timeout-s", optarg, 0, 86400, &drain, print);
            break;
        case O_THREADS:
            rc = parse_int("--threads", optarg, 1, 1024, &a->threads, print);
            break;
        case O_DEVICE: {
            moe_device dv = MOE_DEVICE_CPU;
            rc = moe_device_parse(optarg, &dv) == MOE_OK ? 0 : perr(print, "--device: %s", moe_error_message());
            a->device = (int)dv;
            break;
        }
        case O_KVB:
            rc = parse_int("--kv-blocks", optarg, 1, INT_MAX / 2, &a->kv_blocks, print);
            break;
        case O_KVMB:
            rc = parse_int("--kv-mb", optarg, 1, 1 << 24, &a->kv_mb, print);
            break;
        case O_BS:
            rc = parse_int("--kv-block-size", optarg, 1, 4096, &a->block_size, print);
            break;
        case O_BATCH:
            rc = parse_int("--batch-tokens", optarg, 1, 1 << 20, &a->batch_tokens, print);
            break;
        case O_SEQS:
            rc = parse_int("--max-seqs", optarg, 1, 1 << 16, &a->max_seqs, print);
            break;
        case O_HB:
            rc = parse_int("--heartbeat-ms", optarg, 10, 60000, &a->heartbeat_ms, print);
            break;
        case O_HBT:
            rc = parse_int("--heartbeat-timeout-ms", optarg, 50, 3600000, &a->heartbeat_timeout_ms,
                           print);
            break;
        case O_KVT:
            rc = parse_int("--kv-timeout-ms", optarg, 10, 3600000, &a->kv_timeout_ms, print);
            break;
        case O_LEASE:
            rc = parse_int("--kv-lease-ms", optarg, 10, 3600000, &a->lease_ms, print);
            break;
        case O_KVX:
            if (!strcmp(optarg, "layer") || !strcmp(optarg, "block"))
                a->kv_block_transfer = !strcmp(optarg, "block");
            else
                rc = perr(print, "--kv-transfer: '%s' is not layer or block", optarg);
            break;
        case O_START:
            rc = parse_int("--startup-timeout-s", optarg, 1, 86400, &a->startup_timeout_s, print);
            break;
        case O_MIG:
            if (!strcmp(optarg, "on") || !strcmp(optarg, "off"))
                a->migration_off = !strcmp(optarg, "off");
            else
                rc = perr(print, "--migration: '%s' is not on or off", optarg);
            break;
        case O_MIG_HIGH:
            rc = parse_frac("--migrate-high", optarg, &a->mig_high, print);
            break;
        case O_MIG_LOW:
            rc = parse_frac("--migrate-low", optarg, &a->mig_low, print);
            break;
        case O_MIG_HEAD:
            rc = parse_frac("--migrate-priority-headroom", optarg, &a->mig_headroom, print);
            break;
        case O_MIG_INT:
            rc = parse_int("--migrate-interval-ms", optarg, 1, 60000, &a->mig_interval_ms, print);
            break;
        case O_MIG_INFL:
            rc = parse_int("--migrate-max-inflight", optarg, 1, 4096, &a->mig_max_inflight, print);
            break;
        case O_MIG_FINAL:
            rc = parse_int("--migrate-final-blocks", optarg, 1, 4096, &a->mig_final_blocks, print);
            break;
        case O_MIG_STAGES:
            rc = parse_int("--migrate-max-stages", optarg, 1, 4096, &a->mig_max_stages, print);
            break;
        case O_MIG_SBLK:
            rc = parse_int("--migrate-stage-blocks", optarg, 1, 1 << 20, &a->mig_stage_blocks,
                           print);
            break;
        case O_MIG_MINREM:
            rc = parse_int("--migrate-min-remaining", optarg, 1, 1 << 30, &a->mig_min_remaining,
                           print);
            break;
        case O_MIG_RETRY:
            rc = parse_int("--migrate-retry-ms", optarg, 1, 3600000, &a->mig_retry_ms, print);
            break;
        case O_MIG_WAIT:
            rc = parse_int("--migrate-waiting-ticks", optarg, 1, 1000, &a->mig_waiting_ticks,
                           print);
            break;
        case O_MIG_EVERY:
            rc = parse_int("--migrate-every", optarg, 0, 1 << 30, &a->mig_every, print);
            break;
        case O_HELP:
            if (print)
                usage(stdout);
            return 1;
        default:
            if (print)
                usage(stderr);
            return -1;
        }
        if (rc)
            return -1;
    }
    a->drain_timeout_s = drain;
    if (a->mig_high > 0 && a->mig_low > 0 && a->mig_low >= a->mig_high)
        return perr(print, "--migrate-low %g must be below --migrate-high %g", a->mig_low,
                    a->mig_high);
    if (optind < argc)
        return perr(print, "unexpected argument '%s'", argv[optind]);
    if (!a->model_dir)
        return perr(print, "--model DIR is required (see --help)");
    if (!a->tls_cert != !a->tls_key)
        return perr(print, "--tls-cert and --tls-key go together");
    if (a->tls_client_ca && !a->tls_cert)
        return perr(print, "--tls-client-ca needs --tls-cert and --tls-key");
    if (a->mode == SERVE_MODE_COORDINATOR && !a->cluster_listen)
        return perr(print, "moe-serve coordinator: --cluster-listen ADDR:PORT is required");
    if (a->mode == SERVE_MODE_INSTANCE && (!a->join || !a->pool))
        return perr(print, "moe-serve instance: --join HOST:PORT and --pool are required");
    if (a->mode == SERVE_MODE_MPIRUN && (a->cluster_listen || a->join || a->pool))
        return perr(print, "--cluster-listen, --join and --pool belong to `moe-serve coordinator` "
                           "and `moe-serve instance`");
    if (a->max_queue < 0)
        a->max_queue = a->max_requests;
    if (a->heartbeat_timeout_ms < 3 * a->heartbeat_ms)
        return perr(print, "--heartbeat-timeout-ms %d must be at least 3 x --heartbeat-ms %d",
                    a->heartbeat_timeout_ms, a->heartbeat_ms);
    if (a->prefill_ep <= 0)
        a->prefill_ep = a->ep_size;
    if (a->decode_ep <= 0)
        a->decode_ep = a->ep_size;
    if (a->colocated && (a->prefill_ep != a->ep_size || a->decode_ep != a->ep_size))
        return perr(print, "--colocated has one pool: use --ep-size, not --prefill-ep/--decode-ep");
    if (a->device == MOE_DEVICE_CUDA) {
        /* say so before any rank loads a model: every rank parses the same argv */
        moe_backend *be;
        if (moe_backend_cuda_create(0, &be) != MOE_OK)
            return perr(print, "--device cuda: %s", moe_error_message());
        moe_backend_free(be);
    }
    return 0;
}

int serve_plan_layout(const serve_args *a, int world, serve_layout *l, char *err, size_t err_cap)
{
    *l = (serve_layout){.world = world};
    int workers = world - 1, ep = a->ep_size, pe = a->prefill_ep, de = a->decode_ep;
    if (pe <= 0)
        pe = ep;
    if (de <= 0)
        de = ep;
    if (workers < 1) {
        snprintf(err, err_cap,
                 "needs at least 2 ranks (a coordinator and a worker): run mpirun -np 2 or more");
        return -1;
    }
    bool colocated = a->colocated;
    if (colocated && (a->prefill > 0 || a->decode > 0)) {
        snprintf(err, err_cap,
                 "--colocated makes every worker a mixed instance; drop --prefill-instances and "
                 "--decode-instances");
        return -1;
    }
    int P = a->prefill, D = a->decode, M = 0;
    if (!colocated && P < 0 && D < 0 && workers < pe + de && pe == ep && de == ep) {
        colocated = true; /* too few workers for two pools (and no per-pool EP size asked) */
        l->auto_colocated = true;
    }
    if (colocated) {
        M = workers / ep;
        if (M < 1) {
            snprintf(err, err_cap,
                     "--ep-size %d needs %d worker ranks per instance, mpirun -np %d gives %d", ep,
                     ep, world, workers);
            return -1;
        }
        P = D = 0;
    } else {
        if (P < 0 && D < 0)
            P = 1;
        if (P < 0)
            P = (workers - D * de) / pe;
        if (D < 0)
            D = (workers - P * pe) / de;
        if (P < 1 || D < 1 || P * pe + D * de > workers) {
            int p = P < 1 ? 1 : P, d = D < 1 ? 1 : D;
            snprintf(err, err_cap,
                     "%d prefill instance(s) of %d rank(s) + %d decode instance(s) of %d rank(s) "
                     "need %d worker ranks plus the coordinator: run mpirun -np %d (got -np %d), "
                     "or use --colocated",
                     p, pe, d, de, p * pe + d * de, p * pe + d * de + 1, world);
            return -1;
        }
    }
    l->n_instances = P + D + M;
    l->n_prefill = P;
    l->n_decode = D;
    l->n_mixed = M;
    l->instances = calloc((size_t)l->n_instances, sizeof *l->instances);
    l->rank_instance = malloc((size_t)world * sizeof *l->rank_instance);
    l->spare = calloc((size_t)world, sizeof *l->spare);
    if (!l->instances || !l->rank_instance || !l->spare) {
        serve_layout_free(l);
        snprintf(err, err_cap, "out of memory");
        return -1;
    }
    for (int r = 0; r < world; r++)
        l->rank_instance[r] = -1;
    int rank = 1;
    for (int i = 0; i < l->n_instances; i++) {
        serve_instance *in = &l->instances[i];
        in->pool = i < P ? MOE_POOL_PREFILL : i < P + D ? MOE_POOL_DECODE : MOE_POOL_MIXED;
        in->ep_size = in->pool == MOE_POOL_PREFILL ? pe : in->pool == MOE_POOL_DECODE ? de : ep;
        for (int j = 0; j < in->ep_size; j++) {
            in->ranks[j] = rank;
            l->rank_instance[rank++] = i;
        }
    }
    for (; rank < world; rank++)
        l->spare[l->n_spare++] = rank;
    return 0;
}

void serve_layout_free(serve_layout *l)
{
    free(l->instances);
    free(l->rank_instance);
    free(l->spare);
    *l = (serve_layout){0};
}
