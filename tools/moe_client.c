/* moe-client: command-line client of a moeserve cluster (Generate, status table, Tokenize,
 * health), built on the gRPC C core. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/file.h"
#include "common/pool.h"
#include "health.pb-c.h"
#include "moeserve.pb-c.h"
#include "tools/moe_client/client.h"
#include "tools/moe_client/drain.h"

#define MAX_STOPS 64
#define MOE_CLIENT_MAX_N 16 /* GenerateRequest.n the server takes at most */
#define MAX_PROMPT_IDS 65536

static void usage(FILE *f)
{
    fprintf(f,
            "usage:\n"
            "  moe-client [--addr HOST:PORT] --prompt TEXT [options]   generate\n"
            "  moe-client [--addr HOST:PORT] status                    cluster table\n"
            "  moe-client [--addr HOST:PORT] tokenize TEXT [--no-special-tokens]\n"
            "  moe-client [--addr HOST:PORT] health [--service NAME]\n"
            "  moe-client [--addr HOST:PORT] drain INSTANCE [--undo] [--no-wait]\n"
            "                         move every request off an instance (live migration) and\n"
            "                         wait until it holds no KV; --undo: take requests again\n"
            "\n"
            "  --addr HOST:PORT       server (default $MOE_SERVER_ADDR, else 127.0.0.1:50051)\n"
            "  --tls                  TLS with the system's CAs; --tls-ca FILE: trust this CA\n"
            "  --tls-cert F --tls-key F  client certificate (servers with --tls-client-ca)\n"
            "  --api-key KEY          sent as `authorization: Bearer KEY` (default $MOE_API_KEY)\n"
            "generate options:\n"
            "  --prompt TEXT          prompt text (or --prompt-ids 1,2,3 for token ids)\n"
            "  --stream               print text as it arrives (default: all at the end)\n"
            "  --max-new-tokens N     0 = server default\n"
            "  --temperature T        0 = greedy (server default 1.0)\n"
            "  --top-p P  --top-k K  --seed S\n"
            "  --stop STR             stop string (repeatable); --stop-token-id ID (repeatable)\n"
            "  --ignore-eos  --priority N  --request-id ID  --no-special-tokens\n"
            "  --show-ids             print the generated token ids after the text\n"
            "  --n N                  N choices sharing one prefill (1..16); N > 1 prints each\n"
            "                         choice's text after a \"[choice I]\" line, at the end\n"
            "  --timeout-ms MS        call deadline (default 600000)\n"
            "The summary line (tokens, finish reason, TTFT, tokens/s) goes to stderr.\n"
            "Exit status: 0 ok, 1 the server returned an error, 2 bad usage.\n");
}

typedef struct {
    const char *addr;
    const char *tls_ca, *tls_cert, *tls_key, *api_key;
    bool tls;
    const char *cmd; /* "generate", "status", "tokenize", "health", "drain" */
    uint32_t drain_instance;
    bool undo, no_wait;
    const char *prompt, *prompt_ids, *text, *service, *request_id;
    bool stream, ignore_eos, no_special, show_ids;
    uint32_t max_new, n_choices;
    bool has_temp, has_top_p, has_seed;
    float temperature, top_p;
    int32_t top_k, priority;
    uint64_t seed;
    char *stops[MAX_STOPS];
    size_t n_stops;
    uint32_t stop_ids[MAX_STOPS];
    size_t n_stop_ids;
    int64_t timeout_ms;
} opts;

static bool parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static bool parse_f(const char *s, float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end)
        return false;
    *out = (float)v;
    return true;
}

/* Returns 0 ok, 2 usage error (message printed), -1 after printing --help. */
static int parse_args(int argc, char **argv, opts *o)
{
    memset(o, 0, sizeof(*o));
    o->addr = getenv("MOE_SERVER_ADDR");
    if (!o->addr || !o->addr[0])
        o->addr = "127.0.0.1:50051";
    o->timeout_ms = 600000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int64_t n;
#define NEED_VALUE                                                   \
    do {                                                             \
        if (!v) {                                                    \
            fprintf(stderr, "moe-client: %s needs a value\n", a);    \
            return 2;                                                \
        }                                                            \
        i++;                                                         \
    } while (0)
#define BAD_VALUE()                                                            \
    do {                                                                       \
        fprintf(stderr, "moe-client: %s: bad value \"%s\"\n", a, v);           \
        return 2;                                                              \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return -1;
        } else if (!strcmp(a, "--addr")) {
            NEED_VALUE;
            o->addr = v;
        } else if (!strcmp(a, "--tls")) {
            o->tls = true;
        } else if (!strcmp(a, "--tls-ca")) {
            NEED_VALUE;
            o->tls_ca = v;
            o->tls = true;
        } else if (!strcmp(a, "--tls-cert")) {
            NEED_VALUE;
            o->tls_cert = v;
            o->tls = true;
        } else if (!strcmp(a, "--tls-key")) {
            NEED_VALUE;
            o->tls_key = v;
        } else if (!strcmp(a, "--api-key")) {
            NEED_VALUE;
            o->api_key = v;
        } else if (!strcmp(a, "--prompt")) {
            NEED_VALUE;
            o->prompt = v;
        } else if (!strcmp(a, "--prompt-ids")) {
            NEED_VALUE;
            o->prompt_ids = v;
        } else if (!strcmp(a, "--stream")) {
            o->stream = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            o->ignore_eos = true;
        } else if (!strcmp(a, "--no-special-tokens")) {
            o->no_special = true;
        } else if (!strcmp(a, "--show-ids")) {
            o->show_ids = true;
        } else if (!strcmp(a, "--max-new-tokens")) {
            NEED_VALUE;
            if (!parse_i64(v, 0, UINT32_MAX, &n))
                BAD_VALUE();
            o->max_new = (uint32_t)n;
        } else if (!strcmp(a, "--temperature")) {
            NEED_VALUE;
            if (!parse_f(v, &o->temperature))
                BAD_VALUE();
            o->has_temp = true;
        } else if (!strcmp(a, "--top-p")) {
            NEED_VALUE;
            if (!parse_f(v, &o->top_p))
                BAD_VALUE();
            o->has_top_p = true;
        } else if (!strcmp(a, "--top-k")) {
            NEED_VALUE;
            if (!parse_i64(v, INT32_MIN, INT32_MAX, &n))
                BAD_VALUE();
            o->top_k = (int32_t)n;
        } else if (!strcmp(a, "--seed")) {
            NEED_VALUE;
            char *end;
            errno = 0;
            o->seed = strtoull(v, &end, 10);
            if (errno || end == v || *end)
                BAD_VALUE();
            o->has_seed = true;
        } else if (!strcmp(a, "--n")) {
            NEED_VALUE;
            if (!parse_i64(v, 1, UINT32_MAX, &n))
                BAD_VALUE();
            o->n_choices = (uint32_t)n; /* the server checks the range, naming the field */
        } else if (!strcmp(a, "--priority")) {
            NEED_VALUE;
            if (!parse_i64(v, INT32_MIN, INT32_MAX, &n))
                BAD_VALUE();
            o->priority = (int32_t)n;
        } else if (!strcmp(a, "--request-id")) {
            NEED_VALUE;
            o->request_id = v;
        } else if (!strcmp(a, "--stop")) {
            NEED_VALUE;
            if (o->n_stops == MAX_STOPS)
                BAD_VALUE();
            o->stops[o->n_stops++] = argv[i];
        } else if (!strcmp(a, "--stop-token-id")) {
            NEED_VALUE;
            if (o->n_stop_ids == MAX_STOPS || !parse_i64(v, 0, UINT32_MAX, &n))
                BAD_VALUE();
            o->stop_ids[o->n_stop_ids++] = (uint32_t)n;
        } else if (!strcmp(a, "--timeout-ms")) {
            NEED_VALUE;
            if (!parse_i64(v, 1, INT64_MAX / 1000000, &n))
                BAD_VALUE();
            o->timeout_ms = n;
        } else if (!strcmp(a, "--undo")) {
            o->undo = true;
        } else if (!strcmp(a, "--no-wait")) {
            o->no_wait = true;
        } else if (!strcmp(a, "--service")) {
            NEED_VALUE;
            o->service = v;
        } else if (a[0] == '-') {
            fprintf(stderr, "moe-client: unknown option %s (see --help)\n", a);
            return 2;
        } else if (!o->cmd && (!strcmp(a, "status") || !strcmp(a, "health"))) {
            o->cmd = a;
        } else if (!o->cmd && !strcmp(a, "drain")) {
            o->cmd = a;
            if (!v || !parse_i64(v, 0, UINT32_MAX, &n)) {
                fprintf(stderr, "moe-client: drain needs an instance id (see moe-client status)\n");
                return 2;
            }
            o->drain_instance = (uint32_t)n;
            i++;
        } else if (!o->cmd && !strcmp(a, "tokenize")) {
            o->cmd = a;
            if (!v) {
                fprintf(stderr, "moe-client: tokenize needs the text\n");
                return 2;
            }
            o->text = v;
            i++;
        } else {
            fprintf(stderr, "moe-client: unexpected argument \"%s\" (see --help)\n", a);
            return 2;
        }
#undef NEED_VALUE
#undef BAD_VALUE
    }
    if (!o->cmd) {
        if (!o->prompt && !o->prompt_ids) {
            usage(stderr);
            return 2;
        }
        if (o->prompt && o->prompt_ids) {
            fprintf(stderr, "moe-client: give --prompt or --prompt-ids, not both\n");
            return 2;
        }
        o->cmd = "generate";
    }
    return 0;
}

static int rpc_failed(const char *what, const char *addr, grpc_status_code code, const char *details)
{
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    const char *name = (int)code >= 0 && (size_t)code < sizeof(names) / sizeof(names[0])
                           ? names[code]
                           : "UNKNOWN";
    fprintf(stderr, "moe-client: %s at %s failed: %s: %s\n", what, addr, name, details);
    return 1;
}

static const char *finish_name(Moeserve__V1__FinishReason r)
{
    switch (r) {
    case MOESERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH: return "length";
    case MOESERVE__V1__FINISH_REASON__FINISH_REASON_EOS: return "eos";
    case MOESERVE__V1__FINISH_REASON__FINISH_REASON_STOP: return "stop";
    default: return "none";
    }
}

static int cmd_generate(moe_rpc_client *c, const opts *o)
{
    Moeserve__V1__GenerateRequest req;
    Moeserve__V1__SamplingParams sp;
    Moeserve__V1__TokenIds ids;
    moeserve__v1__generate_request__init(&req);
    moeserve__v1__sampling_params__init(&sp);
    moeserve__v1__token_ids__init(&ids);
    uint32_t *prompt_ids = NULL;
    char text_buf[1];
    if (o->prompt_ids) {
        prompt_ids = malloc(MAX_PROMPT_IDS * sizeof(uint32_t));
        if (!prompt_ids)
            return 1;
        const char *p = o->prompt_ids;
        while (*p) {
            char *end;
            errno = 0;
            unsigned long v = strtoul(p, &end, 10);
            if (errno || end == p || v > UINT32_MAX || ids.n_ids == MAX_PROMPT_IDS ||
                (*end && *end != ',')) {
                fprintf(stderr, "moe-client: --prompt-ids: bad list at \"%s\"\n", p);
                free(prompt_ids);
                return 2;
            }
            prompt_ids[ids.n_ids++] = (uint32_t)v;
            p = *end ? end + 1 : end;
        }
        ids.ids = prompt_ids;
        req.prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
        req.token_ids = &ids;
    } else {
        req.prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
        /* protobuf-c wants a char *; the text is only read. */
        req.text = o->prompt[0] ? (char *)(uintptr_t)o->prompt : text_buf;
        text_buf[0] = '\0';
    }
    if (o->has_temp) {
        sp.temperature_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
        sp.temperature = o->temperature;
    }
    if (o->has_top_p) {
        sp.top_p_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TOP_P_OPT_TOP_P;
        sp.top_p = o->top_p;
    }
    if (o->has_seed) {
        sp.seed_opt_case = MOESERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        sp.seed = o->seed;
    }
    sp.top_k = o->top_k;
    req.sampling = &sp;
    req.max_new_tokens = o->max_new;
    req.n_stop = o->n_stops;
    req.stop = (char **)(uintptr_t)o->stops;
    req.n_stop_token_ids = o->n_stop_ids;
    req.stop_token_ids = (uint32_t *)(uintptr_t)o->stop_ids;
    req.ignore_eos = o->ignore_eos;
    req.priority = o->priority;
    req.n = o->n_choices;
    if (o->request_id)
        req.request_id = (char *)(uintptr_t)o->request_id;
    if (o->no_special) {
        req.add_special_tokens_opt_case =
            MOESERVE__V1__GENERATE_REQUEST__ADD_SPECIAL_TOKENS_OPT_ADD_SPECIAL_TOKENS;
        req.add_special_tokens = 0;
    }

    const int64_t t0 = moe_now_ns();
    int64_t t_first = 0, t_last = 0;
    moe_rpc_stream *s = moe_rpc_stream_open(c, "/moeserve.v1.Moeserve/Generate", &req.base,
                                            o->timeout_ms);
    free(prompt_ids);
    if (!s)
        return rpc_failed("Generate", o->addr, GRPC_STATUS_INTERNAL, "could not start the call");

    char *text = NULL, *out_ids = NULL;
    size_t text_len = 0, ids_len = 0;
    /* n > 1: each choice's text and finish, printed at the end */
    const bool many = o->n_choices > 1;
    char *ctext[MOE_CLIENT_MAX_N] = {0};
    size_t ctext_len[MOE_CLIENT_MAX_N] = {0};
    Moeserve__V1__FinishReason cfinish[MOE_CLIENT_MAX_N] = {0};
    uint32_t n_tokens = 0, prompt_tokens = 0, usage_completion = 0;
    char request_id[160] = "";
    Moeserve__V1__FinishReason finish = 0;
    char matched[300] = "";
    double server_ttft = -1, server_tpot = -1;
    ProtobufCMessage *m;
    while ((m = moe_rpc_stream_next(s, &moeserve__v1__generate_response__descriptor))) {
        Moeserve__V1__GenerateResponse *r = (Moeserve__V1__GenerateResponse *)m;
        int64_t now = moe_now_ns();
        if (r->n_token_ids > 0) {
            if (!t_first)
                t_first = now;
            t_last = now;
        }
        n_tokens += (uint32_t)r->n_token_ids;
        snprintf(request_id, sizeof(request_id), "%s", r->request_id);
        size_t tl = strlen(r->text);
        if (many && r->index < MOE_CLIENT_MAX_N) {
            char *t = realloc(ctext[r->index], ctext_len[r->index] + tl + 1);
            if (t) {
                ctext[r->index] = t;
                memcpy(t + ctext_len[r->index], r->text, tl + 1);
                ctext_len[r->index] += tl;
            }
            if (r->finish_reason)
                cfinish[r->index] = r->finish_reason;
        } else if (o->stream) {
            fwrite(r->text, 1, tl, stdout);
            fflush(stdout);
        } else if (tl > 0) {
            char *t = realloc(text, text_len + tl + 1);
            if (t) {
                text = t;
                memcpy(text + text_len, r->text, tl + 1);
                text_len += tl;
            }
        }
        if (o->show_ids) {
            for (size_t i = 0; i < r->n_token_ids; i++) {
                char num[16];
                int k = snprintf(num, sizeof(num), "%s%" PRIu32, ids_len ? " " : "", r->token_ids[i]);
                char *t = realloc(out_ids, ids_len + (size_t)k + 1);
                if (t) {
                    out_ids = t;
                    memcpy(out_ids + ids_len, num, (size_t)k + 1);
                    ids_len += (size_t)k;
                }
            }
        }
        if (r->finish_reason) {
            finish = r->finish_reason;
            snprintf(matched, sizeof(matched), "%s", r->matched_stop);
        }
        if (r->usage) {
            prompt_tokens = r->usage->prompt_tokens;
            usage_completion += r->usage->completion_tokens; /* every choice's (n > 1) */
        }
        if (r->timing) {
            server_ttft = r->timing->ttft_ms;
            server_tpot = r->timing->tpot_ms;
        }
        protobuf_c_message_free_unpacked(m, NULL);
    }
    char details[1024];
    grpc_status_code code = moe_rpc_stream_close(s, details, sizeof(details));
    const int64_t t_end = moe_now_ns();
    if (!o->stream && text)
        fwrite(text, 1, text_len, stdout);
    if (text_len || (o->stream && !many))
        fputc('\n', stdout);
    for (uint32_t i = 0; many && i < o->n_choices && i < MOE_CLIENT_MAX_N; i++) {
        if (code == GRPC_STATUS_OK) {
            printf("[choice %" PRIu32 "] finish %s\n", i, finish_name(cfinish[i]));
            if (ctext[i])
                fwrite(ctext[i], 1, ctext_len[i], stdout);
            fputc('\n', stdout);
        }
        free(ctext[i]);
    }
    if (o->show_ids)
        printf("ids: %s\n", out_ids ? out_ids : "");
    fflush(stdout);
    free(text);
    free(out_ids);
    if (code != GRPC_STATUS_OK)
        return rpc_failed("Generate", o->addr, code, details);

    double total_s = (double)(t_end - t0) * 1e-9;
    double ttft_ms = t_first ? (double)(t_first - t0) * 1e-6 : 0.0;
    double decode_s = (double)(t_last - t_first) * 1e-9;
    fprintf(stderr, "[%s] %" PRIu32 " tokens (prompt %" PRIu32 "), finish %s%s%s%s, TTFT %.1f ms, "
                    "%.1f tokens/s overall",
            request_id, usage_completion ? usage_completion : n_tokens, prompt_tokens,
            finish_name(finish), matched[0] ? " \"" : "", matched, matched[0] ? "\"" : "", ttft_ms,
            total_s > 0 ? (double)n_tokens / total_s : 0.0);
    if (n_tokens > 1 && decode_s > 0)
        fprintf(stderr, ", %.1f tokens/s decode", (double)(n_tokens - 1) / decode_s);
    if (server_ttft >= 0)
        fprintf(stderr, " (server: TTFT %.1f ms, %.2f ms/token)", server_ttft, server_tpot);
    fprintf(stderr, ", %.3f s total\n", total_s);
    return 0;
}

static const char *state_name(Moeserve__V1__InstanceState s)
{
    switch (s) {
    case MOESERVE__V1__INSTANCE_STATE__INSTANCE_STATE_STARTING: return "starting";
    case MOESERVE__V1__INSTANCE_STATE__INSTANCE_STATE_READY: return "ready";
    case MOESERVE__V1__INSTANCE_STATE__INSTANCE_STATE_DRAINING: return "draining";
    case MOESERVE__V1__INSTANCE_STATE__INSTANCE_STATE_UNREACHABLE: return "UNREACHABLE";
    default: return "?";
    }
}

/* Expert placement and load: each rank's experts, its EP group, the rows its experts computed
 * (summed over layers) and how uneven they are (max / mean over the experts it holds). */
static void print_experts(const Moeserve__V1__ClusterStatusResponse *r)
{
    uint32_t L = r->moe_layers, E = r->moe_experts;
    if (!L || !E)
        return;
    printf("\n%-4s %-12s %-10s %12s %-18s %9s\n", "INST", "EP GROUP", "EXPERTS", "ROWS", "HOTTEST (ROWS)",
           "MAX/MEAN");
    for (size_t i = 0; i < r->n_instances; i++) {
        const Moeserve__V1__Instance *in = r->instances[i];
        char group[64] = "";
        size_t len = 0;
        for (size_t k = 0; k < in->n_ep_group_ranks && len < sizeof(group) - 12; k++)
            len += (size_t)snprintf(group + len, sizeof(group) - len, "%s%" PRIu32, k ? "," : "",
                                    in->ep_group_ranks[k]);
        char experts[32];
        snprintf(experts, sizeof(experts), "[%" PRIu32 ", %" PRIu32 ")", in->expert_begin, in->expert_end);
        uint64_t total = 0, best = 0;
        uint32_t hot = 0, held = 0;
        for (uint32_t e = in->expert_begin; e < in->expert_end && e < E; e++) {
            uint64_t sum = 0;
            for (uint32_t l = 0; l < L && (size_t)l * E + e < in->n_expert_tokens; l++)
                sum += in->expert_tokens[(size_t)l * E + e];
            total += sum;
            held++;
            if (sum > best) {
                best = sum;
                hot = e;
            }
        }
        char hottest[40] = "-";
        if (best)
            snprintf(hottest, sizeof(hottest), "%" PRIu32 " (%" PRIu64 ")", hot, best);
        double ratio = total && held ? (double)best / ((double)total / held) : 0.0;
        printf("%-4" PRIu32 " %-12s %-10s %12" PRIu64 " %-18s %9.2f\n", in->id, group, experts, total, hottest,
               ratio);
    }
}

static int cmd_status(moe_rpc_client *c, const opts *o)
{
    Moeserve__V1__ClusterStatusRequest req;
    moeserve__v1__cluster_status_request__init(&req);
    ProtobufCMessage *m;
    char details[1024];
    grpc_status_code code = moe_rpc_unary(c, "/moeserve.v1.Moeserve/ClusterStatus", &req.base,
                                          o->timeout_ms < 30000 ? o->timeout_ms : 30000,
                                          &moeserve__v1__cluster_status_response__descriptor, &m,
                                          details, sizeof(details));
    if (code != GRPC_STATUS_OK)
        return rpc_failed("ClusterStatus", o->addr, code, details);
    const Moeserve__V1__ClusterStatusResponse *r = (const Moeserve__V1__ClusterStatusResponse *)m;
    /* world_size is the mpirun launch's MPI world; an elastic coordinator has none (0). */
    char layout[48];
    if (r->world_size)
        snprintf(layout, sizeof layout, "world %" PRIu32 " ranks", r->world_size);
    else
        snprintf(layout, sizeof layout, "elastic, %" PRIu32 " ranks joined",
                 r->totals ? r->totals->worker_ranks : 0);
    printf("model %s  server %s  %s  %s  context %" PRIu32 "  vocab %" PRIu32 "  up %.1f s\n",
           r->model, r->server_version, r->serving ? "SERVING" : "NOT SERVING", layout,
           r->max_model_len, r->vocab_size, r->uptime_s);
    printf("\n%-8s %9s %5s %3s %7s %7s %21s\n", "POOL", "INSTANCES", "RANKS", "EP", "RUNNING",
           "WAITING", "KV BLOCKS USED/TOTAL");
    for (size_t i = 0; i < r->n_pools; i++) {
        const Moeserve__V1__Pool *p = r->pools[i];
        char kv[48];
        snprintf(kv, sizeof(kv), "%" PRIu64 "/%" PRIu64, p->kv_blocks_used, p->kv_blocks_total);
        printf("%-8s %9" PRIu32 " %5" PRIu32 " %3" PRIu32 " %7" PRIu32 " %7" PRIu32 " %21s\n",
               moe_pool_name((moe_pool_kind)p->kind), p->instances, p->ranks, p->ep_size, p->running, p->waiting, kv);
    }
    printf("\n%-4s %-8s %-11s %-12s %7s %7s %8s %8s %9s %10s %9s  %s\n", "INST", "POOL", "STATE",
           "RANKS", "RUNNING", "WAITING", "KV USED", "KV FREE", "KV TOTAL", "PEND.PROMPT",
           "HEARTBEAT", "HOST");
    for (size_t i = 0; i < r->n_instances; i++) {
        const Moeserve__V1__Instance *in = r->instances[i];
        char ranks[64] = "";
        size_t len = 0;
        for (size_t k = 0; k < in->n_ranks && len < sizeof(ranks) - 12; k++)
            len += (size_t)snprintf(ranks + len, sizeof(ranks) - len, "%s%" PRIu32, k ? "," : "",
                                    in->ranks[k]);
        printf("%-4" PRIu32 " %-8s %-11s %-12s %7" PRIu32 " %7" PRIu32 " %8" PRIu32 " %8" PRIu32
               " %9" PRIu32 " %10" PRIu64 " %7.0f ms  %s\n",
               in->id, moe_pool_name((moe_pool_kind)in->pool), state_name(in->state), ranks, in->running, in->waiting,
               in->kv_blocks_used, in->kv_blocks_free, in->kv_blocks_total, in->pending_prompt_tokens,
               in->heartbeat_age_ms, in->host);
    }
    const Moeserve__V1__Totals *t = r->totals;
    if (t)
        printf("%-4s %-8s %-11s %-12" PRIu32 " %7" PRIu32 " %7" PRIu32 " %8" PRIu64 " %8" PRIu64
               " %9" PRIu64 "    streams open: %" PRIu32 "\n",
               "ALL", "", "", t->worker_ranks, t->running, t->waiting, t->kv_blocks_used,
               t->kv_blocks_free, t->kv_blocks_total, t->active_streams);
    print_experts(r);
    const Moeserve__V1__Counters *k = r->counters;
    if (k) {
        printf("\nrequests: %" PRIu64 " received, %" PRIu64 " finished, %" PRIu64 " cancelled, %" PRIu64
               " failed, %" PRIu64 " invalid, %" PRIu64 " refused busy\n",
               k->requests_received, k->requests_finished, k->requests_cancelled, k->requests_failed,
               k->requests_rejected_invalid, k->requests_rejected_busy);
        printf("tokens:   %" PRIu64 " prompt, %" PRIu64 " generated\n", k->prompt_tokens,
               k->generated_tokens);
        printf("kv:       %" PRIu64 " transfers (%" PRIu64 " layer by layer, %.1f MiB), %" PRIu64 " retries, %" PRIu64
               " recomputes, %" PRIu64 " checksum failures, %" PRIu64 " timeouts, %" PRIu64
               " lease expirations\n",
               k->kv_transfers, k->kv_transfers_layerwise, (double)k->kv_transfer_bytes / (1024.0 * 1024.0),
               k->kv_transfer_retries, k->kv_transfer_recomputes, k->kv_checksum_failures,
               k->kv_transfer_timeouts, k->kv_lease_expirations);
        printf("sched:    %" PRIu64 " migrations (%" PRIu64 " aborted), %" PRIu64 " preemptions\n",
               k->migrations, k->migrations_aborted, k->preemptions);
        if (k->instance_joins)
            printf("members:  %" PRIu64 " joined, %" PRIu64 " lost; %" PRIu64
                   " request resumes after a loss\n",
                   k->instance_joins, k->instance_losses, k->requests_resumed);
    }
    const Moeserve__V1__Migration *g = r->migration;
    if (g && g->started) {
        printf("migrate:  %" PRIu64 " started, %" PRIu64 " completed, %" PRIu32 " in flight, %" PRIu64
               " aborted (dest full %" PRIu64 ", gone %" PRIu64 ", preempted %" PRIu64
               ", transfer %" PRIu64 ", timeout %" PRIu64 ", other %" PRIu64 ")\n",
               g->started, g->completed, g->in_flight, g->aborted, g->aborted_dest_full,
               g->aborted_seq_gone, g->aborted_preempted, g->aborted_transfer, g->aborted_timeout,
               g->aborted_other);
        printf("          %.1f MiB in %" PRIu64 " stages; pause p50 %.2f ms, p99 %.2f ms, max %.2f "
               "ms; by balance %" PRIu64 ", defrag %" PRIu64 ", priority %" PRIu64 ", drain %" PRIu64
               ", forced %" PRIu64 "\n",
               (double)g->bytes / (1024.0 * 1024.0), g->stages, g->pause_ms_p50, g->pause_ms_p99,
               g->pause_ms_max, g->by_balance, g->by_defrag, g->by_priority, g->by_drain,
               g->by_forced);
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

static int cmd_tokenize(moe_rpc_client *c, const opts *o)
{
    Moeserve__V1__TokenizeRequest req;
    moeserve__v1__tokenize_request__init(&req);
    req.text = (char *)(uintptr_t)o->text;
    if (o->no_special) {
        req.add_special_tokens_opt_case =
            MOESERVE__V1__TOKENIZE_REQUEST__ADD_SPECIAL_TOKENS_OPT_ADD_SPECIAL_TOKENS;
        req.add_special_tokens = 0;
    }
    ProtobufCMessage *m;
    char details[1024];
    grpc_status_code code = moe_rpc_unary(c, "/moeserve.v1.Moeserve/Tokenize", &req.base,
                                          o->timeout_ms < 30000 ? o->timeout_ms : 30000,
                                          &moeserve__v1__tokenize_response__descriptor, &m,
                                          details, sizeof(details));
    if (code != GRPC_STATUS_OK)
        return rpc_failed("Tokenize", o->addr, code, details);
    const Moeserve__V1__TokenizeResponse *r = (const Moeserve__V1__TokenizeResponse *)m;
    for (size_t i = 0; i < r->n_token_ids; i++)
        printf("%s%" PRIu32, i ? "," : "", r->token_ids[i]);
    printf("\n");
    fprintf(stderr, "%" PRIu32 " tokens (context %" PRIu32 ")\n", r->count, r->max_model_len);
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

static int cmd_health(moe_rpc_client *c, const opts *o)
{
    Grpc__Health__V1__HealthCheckRequest req;
    grpc__health__v1__health_check_request__init(&req);
    if (o->service)
        req.service = (char *)(uintptr_t)o->service;
    ProtobufCMessage *m;
    char details[1024];
    grpc_status_code code = moe_rpc_unary(c, "/grpc.health.v1.Health/Check", &req.base,
                                          o->timeout_ms < 10000 ? o->timeout_ms : 10000,
                                          &grpc__health__v1__health_check_response__descriptor, &m,
                                          details, sizeof(details));
    if (code != GRPC_STATUS_OK)
        return rpc_failed("Health/Check", o->addr, code, details);
    int st = ((const Grpc__Health__V1__HealthCheckResponse *)m)->status;
    protobuf_c_message_free_unpacked(m, NULL);
    const char *name = st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING       ? "SERVING"
                       : st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING ? "NOT_SERVING"
                                                                                                    : "UNKNOWN";
    printf("%s\n", name);
    /* Scripts and probes can test the exit status: 0 only when serving. */
    return st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0 : 1;
}

int main(int argc, char **argv)
{
    opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc)
        return rc < 0 ? 0 : rc;
    char *pem[3] = {NULL, NULL, NULL};
    const char *files[3] = {o.tls_ca, o.tls_cert, o.tls_key};
    for (int i = 0; i < 3; i++)
        if (files[i] && moe_read_file(files[i], 1 << 20, &pem[i], NULL) != MOE_OK) {
            fprintf(stderr, "moe-client: %s\n", moe_error_message());
            return 2;
        }
    if (!pem[1] != !pem[2]) {
        fprintf(stderr, "moe-client: --tls-cert and --tls-key go together\n");
        return 2;
    }
    moe_rpc_security sec = {.tls = o.tls, .ca_pem = pem[0], .cert_pem = pem[1], .key_pem = pem[2],
                            .api_key = o.api_key ? o.api_key : getenv("MOE_API_KEY")};
    moe_rpc_client *c = moe_rpc_connect_secure(o.addr, &sec);
    for (int i = 0; i < 3; i++)
        free(pem[i]);
    if (!c) {
        fprintf(stderr, "moe-client: out of memory\n");
        return 1;
    }
    if (!strcmp(o.cmd, "status"))
        rc = cmd_status(c, &o);
    else if (!strcmp(o.cmd, "tokenize"))
        rc = cmd_tokenize(c, &o);
    else if (!strcmp(o.cmd, "health"))
        rc = cmd_health(c, &o);
    else if (!strcmp(o.cmd, "drain"))
        rc = moe_client_drain(c, o.addr, o.drain_instance, o.undo, o.no_wait, o.timeout_ms);
    else
        rc = cmd_generate(c, &o);
    moe_rpc_close(c);
    return rc;
}
