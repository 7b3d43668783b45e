/* The unary RPCs of the gRPC front end: Health/Check, Tokenize, ClusterStatus, Drain. Each
 * handler replies with one batch (moe_gcall_unary_reply) and the call object goes. */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>

#include "common/clock.h"
#include "common/log.h"
#include "health.pb-c.h"
#include "coordinator/grpc_request.h"
#include "coordinator/grpc_server_internal.h"
#include "moeserve.pb-c.h"

void moe_grpc_handle_health(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!moe_gcall_check_size(c, "HealthCheckRequest"))
        return;
    grpc_slice slice;
    Grpc__Health__V1__HealthCheckRequest *req = NULL;
    if (moe_grpc_read_payload(c->payload, &slice)) {
        req = grpc__health__v1__health_check_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                             GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
    }
    if (!req) {
        moe_gcall_unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed HealthCheckRequest",
                              NULL);
        return;
    }
    const char *svc = req->service ? req->service : "";
    if (svc[0] && strcmp(svc, "moeserve.v1.Moeserve") != 0) {
        char msg[320];
        snprintf(msg, sizeof(msg),
                 "HealthCheckRequest.service: unknown service \"%.200s\" (known: \"\", "
                 "\"moeserve.v1.Moeserve\")",
                 svc);
        grpc__health__v1__health_check_request__free_unpacked(req, NULL);
        moe_gcall_unary_reply(c, GRPC_STATUS_NOT_FOUND, msg, NULL);
        return;
    }
    grpc__health__v1__health_check_request__free_unpacked(req, NULL);
    Grpc__Health__V1__HealthCheckResponse resp;
    grpc__health__v1__health_check_response__init(&resp);
    bool serving = !atomic_load(&s->draining) && s->be.healthy(s->be.ctx);
    resp.status = serving ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                          : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    moe_gcall_unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
}

void moe_grpc_handle_tokenize(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!moe_gcall_check_size(c, "TokenizeRequest"))
        return;
    grpc_slice slice;
    Moeserve__V1__TokenizeRequest *req = NULL;
    if (moe_grpc_read_payload(c->payload, &slice)) {
        moe_status st =
            moe_grpc_check_strings(&moeserve__v1__tokenize_request__descriptor,
                                   GRPC_SLICE_START_PTR(slice), GRPC_SLICE_LENGTH(slice));
        if (st == MOE_OK)
            req = moeserve__v1__tokenize_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                         GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
        if (st != MOE_OK) {
            moe_gcall_unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, moe_error_message(), NULL);
            return;
        }
    }
    if (!req) {
        moe_gcall_unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed TokenizeRequest", NULL);
        return;
    }
    char msg[256];
    const char *text = req->text ? req->text : "";
    size_t len = strlen(text);
    long bad;
    int32_t *ids = NULL;
    uint32_t *uids = NULL;
    size_t n = 0;
    grpc_status_code code = GRPC_STATUS_OK;
    if (len > s->cfg.limits.max_prompt_bytes) {
        snprintf(msg, sizeof(msg),
                 "TokenizeRequest.text: %zu bytes, over the limit of %" PRIu32 " bytes", len,
                 s->cfg.limits.max_prompt_bytes);
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else if ((bad = moe_validate_utf8(text, len)) >= 0) {
        snprintf(msg, sizeof(msg), "TokenizeRequest.text: invalid UTF-8 at byte %ld", bad);
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else {
        bool add_special = req->add_special_tokens_opt_case !=
                               MOESERVE__V1__TOKENIZE_REQUEST__ADD_SPECIAL_TOKENS_OPT_ADD_SPECIAL_TOKENS ||
                           req->add_special_tokens;
        size_t cap = len + 16;
        moe_status st = MOE_OK;
        for (int attempt = 0; attempt < 2; attempt++) {
            free(ids);
            ids = malloc(cap * sizeof(int32_t));
            if (!ids) {
                st = moe_error(MOE_ERR_NOMEM, "TokenizeRequest: out of memory");
                break;
            }
            st = s->be.tokenize(s->be.ctx, text, len, add_special, ids, cap, &n);
            if (st != MOE_OK || n <= cap)
                break;
            cap = n;
        }
        if (st == MOE_OK && n > cap)
            st = moe_error(MOE_ERR_INTERNAL, "tokenizer asked for more room twice");
        if (st != MOE_OK) {
            snprintf(msg, sizeof(msg), "TokenizeRequest.text: %s", moe_error_message());
            code = moe_grpc_status_from_moe(st);
        } else if (n > 0 && !(uids = malloc(n * sizeof(uint32_t)))) {
            snprintf(msg, sizeof(msg), "TokenizeRequest: out of memory");
            code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        }
    }
    moeserve__v1__tokenize_request__free_unpacked(req, NULL);
    if (code != GRPC_STATUS_OK) {
        free(ids);
        moe_gcall_unary_reply(c, code, msg, NULL);
        return;
    }
    for (size_t i = 0; i < n; i++)
        uids[i] = (uint32_t)ids[i];
    Moeserve__V1__TokenizeResponse resp;
    moeserve__v1__tokenize_response__init(&resp);
    resp.n_token_ids = n;
    resp.token_ids = uids;
    resp.count = (uint32_t)n;
    resp.max_model_len = s->cfg.limits.context_len;
    moe_gcall_unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
    free(ids);
    free(uids);
}

/* One instance's status as a message; ranks and group (MOE_FRONTEND_MAX_EP each) hold its rank
 * lists, and the message points into them and into is (expert_tokens, host). */
static void pack_instance(Moeserve__V1__Instance *o, const moe_instance_status *is, uint32_t *ranks,
                          uint32_t *group)
{
    moeserve__v1__instance__init(o);
    uint32_t ep = is->ep_size <= MOE_FRONTEND_MAX_EP ? is->ep_size : MOE_FRONTEND_MAX_EP;
    o->id = is->id;
    o->pool = (Moeserve__V1__PoolKind)is->pool;
    o->state = (Moeserve__V1__InstanceState)is->state;
    o->ep_size = ep;
    o->n_ranks = ep;
    o->ranks = ranks;
    for (uint32_t r = 0; r < ep; r++)
        ranks[r] = (uint32_t)is->ranks[r];
    o->kv_blocks_total = is->kv_blocks_total;
    o->kv_blocks_used = is->kv_blocks_used;
    o->kv_blocks_free = is->kv_blocks_free;
    o->kv_blocks_committed = is->kv_blocks_committed;
    o->kv_block_tokens = is->kv_block_tokens;
    o->running = is->running;
    o->waiting = is->waiting;
    o->pending_prompt_tokens = is->pending_prompt_tokens;
    o->heartbeat_age_ms = is->heartbeat_age_ms;
    o->expert_begin = is->expert_begin;
    o->expert_end = is->expert_end;
    uint32_t g = is->ep_group_size <= MOE_FRONTEND_MAX_EP ? is->ep_group_size : MOE_FRONTEND_MAX_EP;
    o->n_ep_group_ranks = g;
    o->ep_group_ranks = group;
    for (uint32_t r = 0; r < g; r++)
        group[r] = (uint32_t)is->ep_group_ranks[r];
    o->n_expert_tokens = is->n_expert_tokens;
    o->expert_tokens = is->expert_tokens;
    o->host = (char *)(uintptr_t)is->host;
}

void moe_grpc_handle_status(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!moe_gcall_check_size(c, "ClusterStatusRequest"))
        return;
    moe_cluster_status *st = calloc(1, sizeof(*st));
    if (!st) {
        moe_gcall_unary_reply(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "ClusterStatus: out of memory",
                              NULL);
        return;
    }
    if (s->be.cluster_status) {
        moe_status rc = s->be.cluster_status(s->be.ctx, st);
        if (rc != MOE_OK) {
            char msg[256];
            snprintf(msg, sizeof(msg), "ClusterStatus: %s", moe_error_message());
            moe_cluster_status_release(st);
            free(st);
            moe_gcall_unary_reply(c, moe_grpc_status_from_moe(rc), msg, NULL);
            return;
        }
    }
    uint32_t ni = st->n_instances <= MOE_FRONTEND_MAX_INSTANCES ? st->n_instances
                                                                : MOE_FRONTEND_MAX_INSTANCES;
    st->model[sizeof(st->model) - 1] = '\0';

    Moeserve__V1__Instance *inst = calloc(ni ? ni : 1, sizeof(*inst));
    Moeserve__V1__Instance **inst_p = calloc(ni ? ni : 1, sizeof(*inst_p));
    uint32_t *ranks = calloc((size_t)(ni ? ni : 1) * MOE_FRONTEND_MAX_EP, sizeof(uint32_t));
    Moeserve__V1__Pool pools[3];
    Moeserve__V1__Pool *pools_p[3];
    Moeserve__V1__Totals totals;
    Moeserve__V1__Counters ctr;
    Moeserve__V1__ClusterStatusResponse resp;
    uint32_t *group = calloc((size_t)(ni ? ni : 1) * MOE_FRONTEND_MAX_EP, sizeof(uint32_t));
    if (!inst || !inst_p || !ranks || !group) {
        moe_cluster_status_release(st);
        free(inst), free(inst_p), free(ranks), free(group), free(st);
        moe_gcall_unary_reply(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "ClusterStatus: out of memory",
                              NULL);
        return;
    }
    moeserve__v1__totals__init(&totals);
    moeserve__v1__counters__init(&ctr);
    moeserve__v1__cluster_status_response__init(&resp);
    size_t n_pools = 0;
    for (int k = MOE_POOL_PREFILL; k <= MOE_POOL_MIXED; k++) {
        Moeserve__V1__Pool *p = &pools[n_pools];
        moeserve__v1__pool__init(p);
        p->kind = (Moeserve__V1__PoolKind)k;
        for (uint32_t i = 0; i < ni; i++) {
            const moe_instance_status *is = &st->instances[i];
            if ((int)is->pool != k)
                continue;
            uint32_t ep = is->ep_size <= MOE_FRONTEND_MAX_EP ? is->ep_size : MOE_FRONTEND_MAX_EP;
            p->instances++;
            p->ranks += ep;
            if (ep > p->ep_size)
                p->ep_size = ep;
            if (is->ep_group_size > p->ep_size) /* data-parallel attention ranks of an EP group */
                p->ep_size = is->ep_group_size;
            p->running += is->running;
            p->waiting += is->waiting;
            p->kv_blocks_total += is->kv_blocks_total;
            p->kv_blocks_used += is->kv_blocks_used;
            p->kv_blocks_free += is->kv_blocks_free;
        }
        if (p->instances > 0) {
            totals.instances += p->instances;
            totals.worker_ranks += p->ranks;
            totals.running += p->running;
            totals.waiting += p->waiting;
            totals.kv_blocks_total += p->kv_blocks_total;
            totals.kv_blocks_used += p->kv_blocks_used;
            totals.kv_blocks_free += p->kv_blocks_free;
            pools_p[n_pools] = p;
            n_pools++;
        }
    }
    for (uint32_t i = 0; i < ni; i++) {
        const moe_instance_status *is = &st->instances[i];
        Moeserve__V1__Instance *o = &inst[i];
        pack_instance(o, is, &ranks[(size_t)i * MOE_FRONTEND_MAX_EP],
                      &group[(size_t)i * MOE_FRONTEND_MAX_EP]);
        inst_p[i] = o;
    }
    /* one snapshot: the outcome identity holds in every answer */
    moe_fe_stats_snapshot *fs = malloc(sizeof(*fs));
    if (fs)
        moe_fe_stats_get(s->stats, fs);
    else
        fs = calloc(1, sizeof(*fs)); /* may be NULL too: then every counter reads 0 */
    if (fs) {
        totals.active_streams = fs->active_streams;
        ctr.requests_received = fs->received;
        ctr.requests_finished = fs->outcome[MOE_OUTCOME_FINISHED];
        ctr.requests_cancelled = fs->outcome[MOE_OUTCOME_CANCELLED];
        ctr.requests_failed = fs->outcome[MOE_OUTCOME_FAILED];
        ctr.requests_rejected_invalid = fs->outcome[MOE_OUTCOME_REJECTED_INVALID];
        ctr.requests_rejected_busy = fs->outcome[MOE_OUTCOME_REJECTED_BUSY];
        ctr.requests_in_flight = fs->in_flight;
        ctr.requests_finished_length = fs->finished_by_reason[MOE_FINISH_LENGTH];
        ctr.requests_finished_eos = fs->finished_by_reason[MOE_FINISH_EOS];
        ctr.requests_finished_stop = fs->finished_by_reason[MOE_FINISH_STOP];
        ctr.requests_unauthenticated = fs->unauthenticated;
        ctr.prompt_tokens = fs->prompt_tokens;
        ctr.generated_tokens = fs->generated_tokens;
        free(fs);
    }
    const moe_cluster_counters *bc = &st->counters;
    ctr.kv_transfers = bc->kv_transfers;
    ctr.kv_transfer_bytes = bc->kv_transfer_bytes;
    ctr.kv_transfer_retries = bc->kv_transfer_retries;
    ctr.kv_transfer_recomputes = bc->kv_transfer_recomputes;
    ctr.kv_checksum_failures = bc->kv_checksum_failures;
    ctr.kv_transfer_timeouts = bc->kv_transfer_timeouts;
    ctr.kv_lease_expirations = bc->kv_lease_expirations;
    ctr.migrations = bc->migrations;
    ctr.migrations_aborted = bc->migrations_aborted;
    ctr.preemptions = bc->preemptions;
    ctr.kv_transfers_layerwise = bc->kv_transfers_layerwise;
    ctr.kv_pulls_waited = bc->kv_pulls_waited;
    ctr.instance_joins = bc->instance_joins;
    ctr.instance_losses = bc->instance_losses;
    ctr.requests_resumed = bc->requests_resumed;
    ctr.prefills_shared = bc->prefills_shared;
    const moe_migration_counters *mc = &st->migration;
    Moeserve__V1__Migration mig;
    moeserve__v1__migration__init(&mig);
    mig.started = mc->started;
    mig.completed = mc->completed;
    mig.aborted = mc->aborted;
    mig.aborted_dest_full = mc->aborted_dest_full;
    mig.aborted_seq_gone = mc->aborted_seq_gone;
    mig.aborted_preempted = mc->aborted_preempted;
    mig.aborted_transfer = mc->aborted_transfer;
    mig.aborted_timeout = mc->aborted_timeout;
    mig.aborted_other = mc->aborted_other;
    mig.bytes = mc->bytes;
    mig.blocks = mc->blocks;
    mig.stages = mc->stages;
    mig.pause_ms_total = mc->pause_ms_total;
    mig.pause_ms_max = mc->pause_ms_max;
    mig.pause_ms_p50 = mc->pause_ms_p50;
    mig.pause_ms_p99 = mc->pause_ms_p99;
    mig.by_balance = mc->by_balance;
    mig.by_defrag = mc->by_defrag;
    mig.by_priority = mc->by_priority;
    mig.by_drain = mc->by_drain;
    mig.by_forced = mc->by_forced;
    mig.in_flight = mc->in_flight;

    char version[] = MOE_SERVER_VERSION;
    resp.model = st->model;
    resp.server_version = version;
    resp.world_size = st->world_size;
    resp.serving = !atomic_load(&s->draining) && s->be.healthy(s->be.ctx);
    resp.uptime_s = (double)(moe_now_ns() - s->start_ns) * 1e-9;
    resp.max_model_len = s->cfg.limits.context_len;
    resp.vocab_size = (uint32_t)s->cfg.limits.vocab_size;
    resp.n_pools = n_pools;
    resp.pools = pools_p;
    resp.n_instances = ni;
    resp.instances = inst_p;
    resp.totals = &totals;
    resp.counters = &ctr;
    resp.migration = &mig;
    resp.moe_layers = st->moe_layers;
    resp.moe_experts = st->moe_experts;
    moe_gcall_unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
    moe_cluster_status_release(st);
    free(inst);
    free(inst_p);
    free(ranks);
    free(group);
    free(st);
}

/* Drain: hands one instance's drain (or its undoing) to the backend, answers with its row. */
void moe_grpc_handle_drain(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!moe_gcall_check_size(c, "DrainRequest"))
        return;
    if (!s->be.drain_instance) {
        moe_gcall_unary_reply(c, GRPC_STATUS_UNIMPLEMENTED,
                              "Drain: this backend cannot drain instances", NULL);
        return;
    }
    grpc_slice slice;
    Moeserve__V1__DrainRequest *req = NULL;
    if (moe_grpc_read_payload(c->payload, &slice)) {
        req = moeserve__v1__drain_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                  GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
    }
    if (!req) {
        moe_gcall_unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed DrainRequest", NULL);
        return;
    }
    moe_instance_status is;
    memset(&is, 0, sizeof(is));
    moe_status rc = s->be.drain_instance(s->be.ctx, req->instance, req->undo, &is);
    moeserve__v1__drain_request__free_unpacked(req, NULL);
    if (rc != MOE_OK) {
        char msg[320];
        snprintf(msg, sizeof(msg), "%s", moe_error_message());
        moe_gcall_unary_reply(c, moe_grpc_status_from_moe(rc), msg, NULL);
        return;
    }
    uint32_t ranks[MOE_FRONTEND_MAX_EP], group[MOE_FRONTEND_MAX_EP];
    Moeserve__V1__Instance o;
    pack_instance(&o, &is, ranks, group);
    Moeserve__V1__DrainResponse resp;
    moeserve__v1__drain_response__init(&resp);
    resp.instance = &o;
    moe_gcall_unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
}
