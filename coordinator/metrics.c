/* Prometheus text exposition of the request accounting and the cluster snapshot
 * (coordinator/metrics.h). */
#include "coordinator/metrics.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PFX "moeserve_"

typedef struct {
    char *p;
    size_t len, cap;
    bool oom;
    char model[400]; /* model_name="..." escaped */
} wbuf;

static void put(wbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(wbuf *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap * 2;
        while (cap < b->len + (size_t)n + 1)
            cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
}

/* A label value: backslash, double quote and newline escaped, as the format requires. */
static void escape(char *out, size_t cap, const char *v)
{
    size_t o = 0;
    for (; *v && o + 3 < cap; v++) {
        if (*v == '\\' || *v == '"') {
            out[o++] = '\\';
            out[o++] = *v;
        } else if (*v == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *v;
        }
    }
    out[o] = '\0';
}

/* HELP and TYPE; a counter's lines name it with its _total suffix, as its samples are named. */
static void family(wbuf *b, const char *name, const char *type, const char *help)
{
    const char *sfx = strcmp(type, "counter") == 0 ? "_total" : "";
    put(b, "# HELP " PFX "%s%s %s\n# TYPE " PFX "%s%s %s\n", name, sfx, help, name, sfx, type);
}

/* One sample of a label-less (but model_name) counter or gauge family. */
static void scalar(wbuf *b, const char *name, const char *type, const char *help, double v)
{
    family(b, name, type, help);
    put(b, PFX "%s%s{model_name=\"%s\"} %.17g\n", name,
        strcmp(type, "counter") == 0 ? "_total" : "", b->model, v);
}

static void histogram(wbuf *b, const char *name, const char *help, const moe_hist *h)
{
    family(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        put(b, PFX "%s_bucket{model_name=\"%s\",le=\"%.17g\"} %" PRIu64 "\n", name, b->model,
            h->bounds[i], cum);
    }
    put(b, PFX "%s_bucket{model_name=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", name, b->model, h->count);
    put(b, PFX "%s_sum{model_name=\"%s\"} %.17g\n", name, b->model, h->sum);
    put(b, PFX "%s_count{model_name=\"%s\"} %" PRIu64 "\n", name, b->model, h->count);
}

/* Per-instance gauges: one sample per instance, labelled with its id, pool and host. */
typedef double (*inst_value)(const moe_instance_status *is);
static double v_running(const moe_instance_status *is) { return is->running; }
static double v_waiting(const moe_instance_status *is) { return is->waiting; }
static double v_kv_usage(const moe_instance_status *is)
{
    return is->kv_blocks_total ? (double)is->kv_blocks_used / is->kv_blocks_total : 0.0;
}
static double v_kv_total(const moe_instance_status *is) { return is->kv_blocks_total; }
static double v_kv_used(const moe_instance_status *is) { return is->kv_blocks_used; }
static double v_kv_committed(const moe_instance_status *is) { return is->kv_blocks_committed; }
static double v_pending(const moe_instance_status *is) { return (double)is->pending_prompt_tokens; }
static double v_hb(const moe_instance_status *is) { return is->heartbeat_age_ms * 1e-3; }
static double v_up(const moe_instance_status *is) { return is->state == MOE_INSTANCE_READY; }

static void per_instance(wbuf *b, const moe_cluster_status *cs, const char *name, const char *help,
                         inst_value f)
{
    family(b, name, "gauge", help);
    for (uint32_t i = 0; i < cs->n_instances && i < MOE_FRONTEND_MAX_INSTANCES; i++) {
        const moe_instance_status *is = &cs->instances[i];
        char host[160];
        escape(host, sizeof(host), is->host);
        put(b, PFX "%s{model_name=\"%s\",instance=\"%" PRIu32 "\",pool=\"%s\",host=\"%s\"} %.17g\n",
            name, b->model, is->id, moe_pool_name(is->pool), host, f(is));
    }
}

/* max / mean of the rows routed to each expert in a layer, over the whole cluster (1 = even;
 * EPLB's imbalance measure). Layers with no rows yet are left out. */
static void expert_imbalance(wbuf *b, const moe_cluster_status *cs)
{
    family(b, "expert_load_imbalance", "gauge",
           "Max over mean of routed rows per expert in a MoE layer since start (1 = balanced).");
    const uint32_t L = cs->moe_layers, E = cs->moe_experts;
    if (L == 0 || E == 0)
        return;
    for (uint32_t l = 0; l < L; l++) {
        uint64_t max = 0, sum = 0;
        for (uint32_t e = 0; e < E; e++) {
            uint64_t v = 0;
            for (uint32_t i = 0; i < cs->n_instances && i < MOE_FRONTEND_MAX_INSTANCES; i++) {
                const moe_instance_status *is = &cs->instances[i];
                if (is->expert_tokens && (size_t)l * E + e < is->n_expert_tokens)
                    v += is->expert_tokens[(size_t)l * E + e];
            }
            sum += v;
            if (v > max)
                max = v;
        }
        if (sum > 0)
            put(b, PFX "expert_load_imbalance{model_name=\"%s\",layer=\"%" PRIu32 "\"} %.17g\n",
                b->model, l, (double)max * E / (double)sum);
    }
}

moe_status moe_metrics_render(const moe_fe_stats_snapshot *fs, const moe_cluster_status *cs,
                              const char *model_name, bool serving, char **out, size_t *len)
{
    wbuf b = {.cap = 16384};
    if (!(b.p = malloc(b.cap)))
        return moe_error(MOE_ERR_NOMEM, "/metrics: out of memory");
    b.p[0] = '\0';
    escape(b.model, sizeof(b.model), model_name ? model_name : "");

    /* Requests: one outcome each; received = sum(outcomes) + in flight in every scrape. */
    scalar(&b, "requests_received", "counter", "Generation requests received (gRPC and HTTP).",
           (double)fs->received);
    family(&b, "requests", "counter",
           "Generation requests by outcome: each request ends in exactly one.");
    for (int o = MOE_OUTCOME_FINISHED; o < MOE_OUTCOME_COUNT; o++)
        put(&b, PFX "requests_total{model_name=\"%s\",outcome=\"%s\"} %" PRIu64 "\n", b.model,
            moe_outcome_name((moe_outcome)o), fs->outcome[o]);
    scalar(&b, "requests_in_flight", "gauge", "Requests received without an outcome yet.",
           (double)fs->in_flight);
    family(&b, "request_success", "counter", "Finished requests by finish reason (vLLM's).");
    static const char *const reason[4] = {NULL, "length", "eos", "stop"};
    for (int r = 1; r <= 3; r++)
        put(&b, PFX "request_success_total{model_name=\"%s\",finished_reason=\"%s\"} %" PRIu64 "\n",
            b.model, reason[r], fs->finished_by_reason[r]);
    scalar(&b, "requests_unauthenticated", "counter",
           "Calls refused for a missing or wrong API key (not in requests_received).",
           (double)fs->unauthenticated);
    scalar(&b, "active_streams", "gauge", "Admitted generations whose call is still open.",
           (double)fs->active_streams);
    scalar(&b, "prompt_tokens", "counter", "Prompt tokens of admitted requests.",
           (double)fs->prompt_tokens);
    scalar(&b, "generation_tokens", "counter", "Tokens generated for clients.",
           (double)fs->generated_tokens);
    scalar(&b, "serving", "gauge", "1 when Health answers SERVING.", serving ? 1.0 : 0.0);

    histogram(&b, "time_to_first_token_seconds", "Arrival to the first token, at the front end.",
              &fs->hist[MOE_HIST_TTFT]);
    histogram(&b, "inter_token_latency_seconds", "Time between consecutive tokens of a request.",
              &fs->hist[MOE_HIST_ITL]);
    histogram(&b, "e2e_request_latency_seconds", "Arrival to finish of finished requests.",
              &fs->hist[MOE_HIST_E2E]);
    histogram(&b, "request_admission_time_seconds",
              "Arrival to admission (validation, tokenization, submit) of admitted requests.",
              &fs->hist[MOE_HIST_QUEUE]);
    histogram(&b, "request_prompt_tokens", "Prompt length of finished requests.",
              &fs->hist[MOE_HIST_PROMPT]);
    histogram(&b, "request_generation_tokens", "Tokens generated by finished requests.",
              &fs->hist[MOE_HIST_GENERATION]);

    if (cs) {
        per_instance(&b, cs, "num_requests_running", "Sequences in the instance's batch.", v_running);
        per_instance(&b, cs, "num_requests_waiting", "Sequences queued for the instance.", v_waiting);
        per_instance(&b, cs, "kv_cache_usage_perc", "Fraction of the instance's KV blocks in use (0-1).",
                     v_kv_usage);
        per_instance(&b, cs, "kv_cache_blocks", "KV blocks of the instance.", v_kv_total);
        per_instance(&b, cs, "kv_cache_blocks_used", "KV blocks in use on the instance.", v_kv_used);
        per_instance(&b, cs, "kv_cache_blocks_committed",
                     "KV blocks in use or promised (hand-offs, migrations coming in), counted once.",
                     v_kv_committed);
        per_instance(&b, cs, "pending_prompt_tokens", "Prompt tokens sent and not prefilled yet.",
                     v_pending);
        per_instance(&b, cs, "instance_heartbeat_age_seconds", "Since its last heartbeat.", v_hb);
        per_instance(&b, cs, "instance_ready", "1 when the instance is READY.", v_up);
        const moe_cluster_counters *k = &cs->counters;
        scalar(&b, "kv_transfers", "counter", "KV hand-offs from prefill to decode.",
               (double)k->kv_transfers);
        scalar(&b, "kv_transfers_layerwise", "counter", "Of kv_transfers: pushed layer by layer.",
               (double)k->kv_transfers_layerwise);
        scalar(&b, "kv_pulls_waited", "counter",
               "KV hand-offs that waited on the decode side for free blocks (the prefill side held them).",
               (double)k->kv_pulls_waited);
        scalar(&b, "kv_transfer_bytes", "counter", "Bytes of KV handed off.",
               (double)k->kv_transfer_bytes);
        scalar(&b, "kv_transfer_retries", "counter", "KV transfers retried.",
               (double)k->kv_transfer_retries);
        scalar(&b, "kv_transfer_recomputes", "counter", "Prompts recomputed after a failed transfer.",
               (double)k->kv_transfer_recomputes);
        scalar(&b, "kv_checksum_failures", "counter", "KV blocks that failed their checksum.",
               (double)k->kv_checksum_failures);
        scalar(&b, "kv_transfer_timeouts", "counter", "KV transfer attempts that timed out.",
               (double)k->kv_transfer_timeouts);
        scalar(&b, "kv_lease_expirations", "counter", "Prefill KV freed because nobody pulled it.",
               (double)k->kv_lease_expirations);
        scalar(&b, "num_preemptions", "counter", "Sequences preempted for KV room.",
               (double)k->preemptions);
        scalar(&b, "instance_joins", "counter", "Ranks that joined (elastic clusters).",
               (double)k->instance_joins);
        scalar(&b, "instance_losses", "counter", "Placement targets lost.", (double)k->instance_losses);
        scalar(&b, "requests_resumed", "counter", "Times a request went on elsewhere after a loss.",
               (double)k->requests_resumed);
        const moe_migration_counters *m = &cs->migration;
        scalar(&b, "migrations_started", "counter", "Live migrations started.", (double)m->started);
        scalar(&b, "migrations_completed", "counter", "Live migrations completed.",
               (double)m->completed);
        scalar(&b, "migrations_aborted", "counter", "Live migrations aborted (request kept).",
               (double)m->aborted);
        scalar(&b, "migration_bytes", "counter", "KV bytes moved by completed migrations.",
               (double)m->bytes);
        scalar(&b, "migration_pause_seconds", "counter",
               "Total pause of migrated requests (paused on the source -> resumed).",
               m->pause_ms_total * 1e-3);
        scalar(&b, "migration_pause_max_seconds", "gauge", "Longest migration pause.",
               m->pause_ms_max * 1e-3);
        scalar(&b, "migrations_in_flight", "gauge", "Live migrations in progress.",
               (double)m->in_flight);
        expert_imbalance(&b, cs);
    }
    if (b.oom) {
        free(b.p);
        return moe_error(MOE_ERR_NOMEM, "/metrics: out of memory");
    }
    *out = b.p;
    *len = b.len;
    return MOE_OK;
}
