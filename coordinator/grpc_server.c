/* The gRPC front end: completion-queue threads, one state machine per call, the streaming of
 * backend events to Generate calls, and the unary RPCs (Tokenize, ClusterStatus, Drain,
 * Health/Check).
 *
 * How a Generate call lives (all of it driven by completions on one shared queue):
 *   new call -> RECV_CLOSE_ON_SERVER started (its completion = the end of the call: finished,
 *   cancelled, disconnected or past its deadline) -> validate -> backend submit -> the backend
 *   pushes events from its threads into the call's pending buffers and wakes the queue with an
 *   empty batch on the call (an empty grpc_call_start_batch completes at once: the C core's
 *   on-demand alarm) -> a queue thread sends everything pending as one message, and the status
 *   after the last one. One SEND batch at a time per call; pushes that arrive meanwhile are sent
 *   when it completes, merged into one message. No timer or sleep sits on a token's path.
 *
 * Object lifetime: a call object (moe_frontend_req) has two owners, the gRPC side (until every
 * batch completed and the call closed, then grpc_call_unref) and the backend (from submit to its
 * terminal push). It is freed when both let go. */
#include "coordinator/grpc_server.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "common/clock.h"
#include "common/log.h"
#include "health.pb-c.h"
#include "coordinator/grpc_request.h"
#include "moeserve.pb-c.h"

enum call_kind { K_GENERATE, K_TOKENIZE, K_STATUS, K_HEALTH, K_DRAIN, K_UNKNOWN, K_COUNT };

static const char *const METHOD_PATH[K_UNKNOWN] = {
    [K_GENERATE] = "/moeserve.v1.Moeserve/Generate",
    [K_TOKENIZE] = "/moeserve.v1.Moeserve/Tokenize",
    [K_STATUS] = "/moeserve.v1.Moeserve/ClusterStatus",
    [K_HEALTH] = "/grpc.health.v1.Health/Check",
    [K_DRAIN] = "/moeserve.v1.Moeserve/Drain",
};

enum tag_kind { T_NEW, T_CLOSE, T_SEND, T_WAKE, T_UNARY, T_SHUTDOWN };

typedef struct {
    struct gcall *c; /* NULL for T_SHUTDOWN */
    enum tag_kind kind;
} cq_tag;

struct moe_grpc_server {
    moe_grpc_server_config cfg;
    char listen_addr[256];
    moe_frontend_backend be;
    grpc_server *server;
    grpc_completion_queue *cq;
    void *method[K_UNKNOWN];
    pthread_t *threads;
    int n_threads;
    int port;
    int64_t start_ns;
    atomic_bool draining;
    moe_frontend_lat lat; /* push -> gRPC send, per token */
    moe_fe_stats *stats;     /* cfg.stats or own_stats */
    moe_fe_stats *own_stats;

    pthread_mutex_t mu; /* guards the fields below */
    pthread_cond_t cv;
    int live_calls; /* call objects alive, pending request_call ones included */
    bool shutdown_started, shutdown_notified;
    cq_tag shutdown_tag;
};

/* One choice of a Generate call (GenerateRequest.n of them, one mostly): the stream the backend
 * holds and the events pushed to it and not yet sent. Guarded by its call's mu. */
struct gchoice {
    moe_frontend_req base; /* first: what the backend holds (frontend.h dispatches through it) */
    struct gcall *c;
    uint32_t index;
    moe_validated v;
    bool backend_holds, backend_done, submitted, cancel_sent;
    uint64_t handle;

    /* Events pushed and not yet sent. */
    uint32_t *p_ids, *p_idx;
    float *p_times;
    moe_token_logprobs *p_lp; /* when the request asked for logprobs */
    size_t p_n, p_cap;
    char *p_text;
    size_t p_text_len, p_text_cap;
    uint32_t next_index; /* index the next pushed token must have */
    bool have_finish, finish_sent;
    moe_finish_reason finish_reason;
    char *matched_stop;
    uint32_t completion_tokens; /* from the finish info, 0 = count */
    int64_t t_first_ns, t_last_ns, t_finish_ns;
};

struct gcall {
    moe_grpc_server *srv;
    enum call_kind kind;
    cq_tag t_new, t_close, t_send, t_wake, t_unary;

    /* Filled by request_call. */
    grpc_call *call;
    grpc_call_details details; /* K_UNKNOWN only */
    grpc_metadata_array req_md;
    grpc_byte_buffer *payload;
    gpr_timespec deadline;
    int cancelled_flag; /* RECV_CLOSE_ON_SERVER's output */
    int64_t arrival_ns;

    /* Batch resources alive until their batch completes. */
    grpc_byte_buffer *send_buf;
    grpc_slice status_details;
    bool have_status_details;

    /* Generate: request, written by the thread that handles the new call before it is shared. */
    Moeserve__V1__GenerateRequest *msg;
    struct gchoice *ch; /* (n_ch) choices; 0 until the request is decoded */
    uint32_t n_ch;
    bool admitted;
    moe_fe_track track; /* outcome and histograms (coordinator/fe_stats.h), Generate only */
    int key;            /* API key index (-1: none / open server) */
    bool key_held;      /* holds room under its key's limits (moe_auth_acquire) */

    pthread_mutex_t mu; /* guards everything below, and the choices */
    int refs;           /* gRPC side + one per choice the backend holds */
    int grpc_ops;       /* batches started and not completed */
    bool closed;        /* RECV_CLOSE completed */
    bool send_inflight, wake_pending, md_sent, final_started;
    bool cancel_pending; /* closed while choices were being submitted */
    uint32_t n_backend;  /* choices the backend holds */
    uint32_t rr;         /* the choice whose events go first at the next send (round robin) */
    bool have_error;
    grpc_status_code err_code;
    char *err_msg;
};

/* ---------------------------------------------------------------------------------------------
 * Status helpers */

grpc_status_code moe_grpc_status_from_moe(moe_status s)
{
    switch (s) {
    case MOE_OK: return GRPC_STATUS_OK;
    case MOE_ERR_INVALID_ARG:
    case MOE_ERR_RANGE:
    case MOE_ERR_FORMAT: return GRPC_STATUS_INVALID_ARGUMENT;
    case MOE_ERR_FULL:
    case MOE_ERR_NOMEM: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case MOE_ERR_UNAVAILABLE: return GRPC_STATUS_UNAVAILABLE;
    case MOE_ERR_TIMEOUT: return GRPC_STATUS_DEADLINE_EXCEEDED;
    case MOE_ERR_CANCELLED: return GRPC_STATUS_CANCELLED;
    case MOE_ERR_UNSUPPORTED: return GRPC_STATUS_UNIMPLEMENTED;
    case MOE_ERR_NOT_FOUND: return GRPC_STATUS_NOT_FOUND;
    case MOE_ERR_PERMISSION: return GRPC_STATUS_PERMISSION_DENIED;
    default: return GRPC_STATUS_INTERNAL;
    }
}

const char *moe_grpc_status_name(grpc_status_code code)
{
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    if ((int)code >= 0 && (size_t)code < sizeof(names) / sizeof(names[0]))
        return names[code];
    return "UNKNOWN_STATUS";
}

bool moe_grpc_check_(grpc_call_error err, const char *expr, const char *file, int line)
{
    if (err == GRPC_CALL_OK)
        return true;
    MOE_LOG_E("%s:%d: %s failed: %s", file, line, expr, grpc_call_error_to_string(err));
    return false;
}

void moe_grpc_server_config_default(moe_grpc_server_config *cfg, int32_t vocab_size,
                                    uint32_t context_len)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->listen_addr = "0.0.0.0:50051";
    cfg->n_threads = 2;
    cfg->max_request_bytes = 4u << 20;
    moe_validate_limits_default(&cfg->limits, vocab_size, context_len);
}

/* ---------------------------------------------------------------------------------------------
 * Call objects */

static const moe_frontend_ops GRPC_STREAM_OPS;

static struct gcall *call_new(moe_grpc_server *s, enum call_kind kind)
{
    struct gcall *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->srv = s;
    c->kind = kind;
    c->t_new = (cq_tag){c, T_NEW};
    c->t_close = (cq_tag){c, T_CLOSE};
    c->t_send = (cq_tag){c, T_SEND};
    c->t_wake = (cq_tag){c, T_WAKE};
    c->t_unary = (cq_tag){c, T_UNARY};
    c->key = -1;
    grpc_metadata_array_init(&c->req_md);
    grpc_call_details_init(&c->details);
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_lock(&s->mu);
    s->live_calls++;
    pthread_mutex_unlock(&s->mu);
    return c;
}

static void call_free(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    grpc_metadata_array_destroy(&c->req_md);
    grpc_call_details_destroy(&c->details);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    if (c->send_buf)
        grpc_byte_buffer_destroy(c->send_buf);
    if (c->have_status_details)
        grpc_slice_unref(c->status_details);
    if (c->msg)
        moeserve__v1__generate_request__free_unpacked(c->msg, NULL);
    for (uint32_t i = 0; i < c->n_ch; i++) {
        struct gchoice *ch = &c->ch[i];
        moe_validated_free(&ch->v);
        free(ch->p_ids);
        free(ch->p_lp);
        free(ch->p_idx);
        free(ch->p_times);
        free(ch->p_text);
        free(ch->matched_stop);
    }
    free(c->ch);
    free(c->err_msg);
    pthread_mutex_destroy(&c->mu);
    free(c);
    pthread_mutex_lock(&s->mu);
    s->live_calls--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Asks gRPC for the next call of `kind`: one outstanding request per kind and thread keeps new
 * calls flowing while others are being set up. */
static void request_call(moe_grpc_server *s, enum call_kind kind)
{
    struct gcall *c = call_new(s, kind);
    if (!c) {
        MOE_LOG_E("out of memory: no new %s calls will be taken",
                  kind < K_UNKNOWN ? METHOD_PATH[kind] : "unregistered");
        return;
    }
    grpc_call_error err;
    if (kind == K_UNKNOWN) {
        err = grpc_server_request_call(s->server, &c->call, &c->details, &c->req_md, s->cq, s->cq,
                                       &c->t_new);
    } else {
        err = grpc_server_request_registered_call(s->server, s->method[kind], &c->call,
                                                  &c->deadline, &c->req_md, &c->payload, s->cq,
                                                  s->cq, &c->t_new);
    }
    if (!MOE_GRPC_OK(err))
        call_free(c);
}

/* Ends a critical section on c->mu: drops `drop` references (a handler's own), lets the gRPC
 * side go once the call is closed and no batch is outstanding, and frees the object when nobody
 * holds it. Every decision is taken under the lock, so c must not be touched after this. */
static void unlock_and_release(struct gcall *c, int drop)
{
    grpc_call *to_unref = NULL;
    c->refs -= drop;
    if (c->call && c->closed && c->grpc_ops == 0) {
        to_unref = c->call;
        c->call = NULL;
        c->refs--;
        moe_fe_stats_stream_closed(c->srv->stats, &c->track);
        /* Nothing pending will ever be sent now. */
        for (uint32_t i = 0; i < c->n_ch; i++)
            c->ch[i].p_n = c->ch[i].p_text_len = 0;
    }
    bool free_it = c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (to_unref)
        grpc_call_unref(to_unref);
    if (free_it)
        call_free(c);
}

static grpc_byte_buffer *pack_message(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice slice = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(slice));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

/* The request message as one contiguous slice, or false when the client sent none. */
static bool read_payload(grpc_byte_buffer *payload, grpc_slice *out)
{
    if (!payload)
        return false;
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, payload))
        return false;
    *out = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * Unary replies: one batch with everything, then the object goes. */

static void unary_reply(struct gcall *c, grpc_status_code code, const char *details,
                        const ProtobufCMessage *resp)
{
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (resp && code == GRPC_STATUS_OK) {
        c->send_buf = pack_message(resp);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->send_buf;
    }
    if (details) {
        c->status_details = grpc_slice_from_copied_string(details);
        c->have_status_details = true;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details =
        c->have_status_details ? &c->status_details : NULL;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled_flag;
    if (code != GRPC_STATUS_OK)
        MOE_LOG_D("%s: %s: %s", c->kind < K_UNKNOWN ? METHOD_PATH[c->kind] : "call",
                  moe_grpc_status_name(code), details ? details : "");
    if (!MOE_GRPC_OK(grpc_call_start_batch(c->call, ops, n, &c->t_unary, NULL))) {
        grpc_call_unref(c->call);
        c->call = NULL;
        call_free(c);
    }
}

static void on_unary_done(struct gcall *c)
{
    grpc_call_unref(c->call);
    c->call = NULL;
    call_free(c);
}

/* Checks the size limit; on failure replies and returns false. */
static bool check_size(struct gcall *c, const char *what)
{
    size_t len = c->payload ? grpc_byte_buffer_length(c->payload) : 0;
    if (len <= c->srv->cfg.max_request_bytes)
        return true;
    char msg[256];
    snprintf(msg, sizeof(msg),
             "%s: message is %zu bytes, over the limit of %zu bytes (max_request_bytes)", what, len,
             c->srv->cfg.max_request_bytes);
    unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
    return false;
}

static void handle_health(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!check_size(c, "HealthCheckRequest"))
        return;
    grpc_slice slice;
    Grpc__Health__V1__HealthCheckRequest *req = NULL;
    if (read_payload(c->payload, &slice)) {
        req = grpc__health__v1__health_check_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                             GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
    }
    if (!req) {
        unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed HealthCheckRequest", NULL);
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
        unary_reply(c, GRPC_STATUS_NOT_FOUND, msg, NULL);
        return;
    }
    grpc__health__v1__health_check_request__free_unpacked(req, NULL);
    Grpc__Health__V1__HealthCheckResponse resp;
    grpc__health__v1__health_check_response__init(&resp);
    bool serving = !atomic_load(&s->draining) && s->be.healthy(s->be.ctx);
    resp.status = serving ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                          : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
}

static void handle_tokenize(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!check_size(c, "TokenizeRequest"))
        return;
    grpc_slice slice;
    Moeserve__V1__TokenizeRequest *req = NULL;
    if (read_payload(c->payload, &slice)) {
        moe_status st = moe_grpc_check_strings(&moeserve__v1__tokenize_request__descriptor,
                                               GRPC_SLICE_START_PTR(slice),
                                               GRPC_SLICE_LENGTH(slice));
        if (st == MOE_OK)
            req = moeserve__v1__tokenize_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                         GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
        if (st != MOE_OK) {
            unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, moe_error_message(), NULL);
            return;
        }
    }
    if (!req) {
        unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed TokenizeRequest", NULL);
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
        unary_reply(c, code, msg, NULL);
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
    unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
    free(ids);
    free(uids);
}

static void handle_status(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!check_size(c, "ClusterStatusRequest"))
        return;
    moe_cluster_status *st = calloc(1, sizeof(*st));
    if (!st) {
        unary_reply(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "ClusterStatus: out of memory", NULL);
        return;
    }
    if (s->be.cluster_status) {
        moe_status rc = s->be.cluster_status(s->be.ctx, st);
        if (rc != MOE_OK) {
            char msg[256];
            snprintf(msg, sizeof(msg), "ClusterStatus: %s", moe_error_message());
            moe_cluster_status_release(st);
            free(st);
            unary_reply(c, moe_grpc_status_from_moe(rc), msg, NULL);
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
        unary_reply(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "ClusterStatus: out of memory", NULL);
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
        moeserve__v1__instance__init(o);
        uint32_t ep = is->ep_size <= MOE_FRONTEND_MAX_EP ? is->ep_size : MOE_FRONTEND_MAX_EP;
        o->id = is->id;
        o->pool = (Moeserve__V1__PoolKind)is->pool;
        o->state = (Moeserve__V1__InstanceState)is->state;
        o->ep_size = ep;
        o->n_ranks = ep;
        o->ranks = &ranks[(size_t)i * MOE_FRONTEND_MAX_EP];
        for (uint32_t r = 0; r < ep; r++)
            o->ranks[r] = (uint32_t)is->ranks[r];
        o->kv_blocks_total = is->kv_blocks_total;
        o->kv_blocks_used = is->kv_blocks_used;
        o->kv_blocks_free = is->kv_blocks_free;
        o->kv_block_tokens = is->kv_block_tokens;
        o->running = is->running;
        o->waiting = is->waiting;
        o->pending_prompt_tokens = is->pending_prompt_tokens;
        o->heartbeat_age_ms = is->heartbeat_age_ms;
        o->expert_begin = is->expert_begin;
        o->expert_end = is->expert_end;
        uint32_t g = is->ep_group_size <= MOE_FRONTEND_MAX_EP ? is->ep_group_size : MOE_FRONTEND_MAX_EP;
        o->n_ep_group_ranks = g;
        o->ep_group_ranks = &group[(size_t)i * MOE_FRONTEND_MAX_EP];
        for (uint32_t r = 0; r < g; r++)
            o->ep_group_ranks[r] = (uint32_t)is->ep_group_ranks[r];
        o->n_expert_tokens = is->n_expert_tokens;
        o->expert_tokens = is->expert_tokens;
        o->host = (char *)(uintptr_t)is->host;
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
    unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
    moe_cluster_status_release(st);
    free(inst);
    free(inst_p);
    free(ranks);
    free(group);
    free(st);
}

/* Drain: hands one instance's drain (or its undoing) to the backend, answers with its row. */
static void handle_drain(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!check_size(c, "DrainRequest"))
        return;
    if (!s->be.drain_instance) {
        unary_reply(c, GRPC_STATUS_UNIMPLEMENTED, "Drain: this backend cannot drain instances",
                    NULL);
        return;
    }
    grpc_slice slice;
    Moeserve__V1__DrainRequest *req = NULL;
    if (read_payload(c->payload, &slice)) {
        req = moeserve__v1__drain_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                  GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
    }
    if (!req) {
        unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed DrainRequest", NULL);
        return;
    }
    moe_instance_status is;
    memset(&is, 0, sizeof(is));
    moe_status rc = s->be.drain_instance(s->be.ctx, req->instance, req->undo, &is);
    moeserve__v1__drain_request__free_unpacked(req, NULL);
    if (rc != MOE_OK) {
        char msg[320];
        snprintf(msg, sizeof(msg), "%s", moe_error_message());
        unary_reply(c, moe_grpc_status_from_moe(rc), msg, NULL);
        return;
    }
    uint32_t ranks[MOE_FRONTEND_MAX_EP];
    uint32_t ep = is.ep_size <= MOE_FRONTEND_MAX_EP ? is.ep_size : MOE_FRONTEND_MAX_EP;
    Moeserve__V1__Instance o;
    moeserve__v1__instance__init(&o);
    o.id = is.id;
    o.pool = (Moeserve__V1__PoolKind)is.pool;
    o.state = (Moeserve__V1__InstanceState)is.state;
    o.ep_size = ep;
    o.n_ranks = ep;
    o.ranks = ranks;
    for (uint32_t r = 0; r < ep; r++)
        ranks[r] = (uint32_t)is.ranks[r];
    o.kv_blocks_total = is.kv_blocks_total;
    o.kv_blocks_used = is.kv_blocks_used;
    o.kv_blocks_free = is.kv_blocks_free;
    o.kv_block_tokens = is.kv_block_tokens;
    o.running = is.running;
    o.waiting = is.waiting;
    o.pending_prompt_tokens = is.pending_prompt_tokens;
    o.heartbeat_age_ms = is.heartbeat_age_ms;
    Moeserve__V1__DrainResponse resp;
    moeserve__v1__drain_response__init(&resp);
    resp.instance = &o;
    unary_reply(c, GRPC_STATUS_OK, NULL, &resp.base);
}

/* ---------------------------------------------------------------------------------------------
 * Generate */

/* GenerateResponse.logprobs for n pending tokens: the messages and the id arrays they point to. */
typedef struct {
    Moeserve__V1__TokenLogprobs *msgs, **ptrs;
    uint32_t *ids;
} lp_msgs;

static bool lp_msgs_fill(lp_msgs *m, const moe_token_logprobs *lp, size_t n)
{
    m->msgs = calloc(n, sizeof(*m->msgs));
    m->ptrs = calloc(n, sizeof(*m->ptrs));
    m->ids = calloc(n * MOE_MAX_TOP_LOGPROBS + 1, sizeof(*m->ids));
    if (!m->msgs || !m->ptrs || !m->ids)
        return false; /* the tokens still go, without their logprobs */
    for (size_t i = 0; i < n; i++) {
        Moeserve__V1__TokenLogprobs *t = &m->msgs[i];
        moeserve__v1__token_logprobs__init(t);
        t->logprob = lp[i].logprob;
        uint32_t *ids = m->ids + i * MOE_MAX_TOP_LOGPROBS;
        for (int k = 0; k < lp[i].n_top; k++)
            ids[k] = (uint32_t)lp[i].top_ids[k];
        t->n_top_ids = t->n_top_logprobs = (size_t)lp[i].n_top;
        t->top_ids = ids;
        t->top_logprobs = (float *)(uintptr_t)lp[i].top_logprobs; /* only read by pack */
        m->ptrs[i] = t;
    }
    return true;
}

static void lp_msgs_free(lp_msgs *m)
{
    free(m->msgs);
    free(m->ptrs);
    free(m->ids);
}

/* The call's id in logs: its first choice's request id, once decoded. */
static const char *call_id(const struct gcall *c)
{
    return c->n_ch && c->ch[0].v.req.request_id[0] ? c->ch[0].v.req.request_id : "-";
}

static bool choice_pending(const struct gchoice *ch)
{
    return ch->p_n > 0 || ch->p_text_len > 0 || (ch->have_finish && !ch->finish_sent);
}

/* The choice whose events go next, round robin so that one busy choice does not hold back the
 * others' (one message in flight per call); NULL when none has any. Called with c->mu held. */
static struct gchoice *next_pending(struct gcall *c)
{
    for (uint32_t k = 0; k < c->n_ch; k++) {
        struct gchoice *ch = &c->ch[(c->rr + k) % c->n_ch];
        if (choice_pending(ch)) {
            c->rr = (ch->index + 1) % c->n_ch;
            return ch;
        }
    }
    return NULL;
}

/* Every choice's last message went (or goes with this batch). Called with c->mu held. */
static bool all_finish_sent(const struct gcall *c)
{
    for (uint32_t i = 0; i < c->n_ch; i++)
        if (!c->ch[i].finish_sent)
            return false;
    return c->n_ch > 0;
}

/* One choice's pending events as a GenerateResponse (the request's id, the choice's index),
 * packed into c->send_buf; clears them. Called with c->mu held. */
static void pack_choice(struct gcall *c, struct gchoice *ch)
{
    Moeserve__V1__GenerateResponse m;
    Moeserve__V1__Usage usage;
    Moeserve__V1__Timing timing;
    moeserve__v1__generate_response__init(&m);
    char empty[1] = "";
    m.request_id = c->ch[0].v.req.request_id; /* the client's, for every choice */
    m.index = ch->index;
    m.text = ch->p_text_len > 0 ? ch->p_text : empty;
    m.n_token_ids = m.n_token_indices = m.n_token_times_ms = ch->p_n;
    m.token_ids = ch->p_ids;
    m.token_indices = ch->p_idx;
    m.token_times_ms = ch->p_times;
    if (ch->have_finish) {
        m.finish_reason = (Moeserve__V1__FinishReason)ch->finish_reason;
        if (ch->matched_stop)
            m.matched_stop = ch->matched_stop;
        moeserve__v1__usage__init(&usage);
        usage.prompt_tokens = ch->v.req.n_prompt;
        usage.completion_tokens = ch->completion_tokens ? ch->completion_tokens : ch->next_index;
        moeserve__v1__timing__init(&timing);
        if (ch->next_index > 0) {
            timing.ttft_ms = (double)(ch->t_first_ns - c->arrival_ns) * 1e-6;
            if (ch->next_index > 1)
                timing.tpot_ms = (double)(ch->t_last_ns - ch->t_first_ns) * 1e-6 /
                                 (double)(ch->next_index - 1);
        }
        timing.e2e_ms = (double)(ch->t_finish_ns - c->arrival_ns) * 1e-6;
        m.usage = &usage;
        m.timing = &timing;
        ch->finish_sent = true;
    }
    lp_msgs lpm = {0};
    if (ch->p_lp && ch->p_n && lp_msgs_fill(&lpm, ch->p_lp, ch->p_n)) {
        m.n_logprobs = ch->p_n;
        m.logprobs = lpm.ptrs;
    }
    c->send_buf = pack_message(&m.base);
    lp_msgs_free(&lpm);
    /* p_times: ms since arrival at each token's push */
    const double now_ms = (double)(moe_now_ns() - c->arrival_ns) * 1e-6;
    for (size_t i = 0; i < ch->p_n; i++)
        moe_frontend_lat_add(&c->srv->lat, (now_ms - ch->p_times[i]) * 1e3, 1);
    ch->p_n = 0;
    ch->p_text_len = 0;
}

/* Sends whatever is pending, if the call can send now: one choice's events per message, and the
 * status once every choice's last message went (OK) or a failure ended the call (its status
 * after the message in the same batch, if any). Called with c->mu held. */
static void gen_flush(struct gcall *c)
{
    if (!c->call || c->closed || c->final_started || c->send_inflight)
        return;
    struct gchoice *ch = next_pending(c);
    if (!ch && !c->have_error)
        return;

    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    if (ch) {
        pack_choice(c, ch);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->send_buf;
    }
    if (c->have_error || all_finish_sent(c)) {
        grpc_status_code code = c->have_error ? c->err_code : GRPC_STATUS_OK;
        if (c->have_error) {
            c->status_details = grpc_slice_from_copied_string(c->err_msg ? c->err_msg : "");
            c->have_status_details = true;
        }
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = code;
        ops[n++].data.send_status_from_server.status_details =
            c->have_status_details ? &c->status_details : NULL;
        c->final_started = true;
    }
    if (MOE_GRPC_OK(grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL))) {
        c->send_inflight = true;
        c->grpc_ops++;
    } else {
        /* Only a bug gets here; end the call rather than leave the client waiting. */
        if (c->send_buf) {
            grpc_byte_buffer_destroy(c->send_buf);
            c->send_buf = NULL;
        }
        grpc_call_cancel_with_status(c->call, GRPC_STATUS_INTERNAL, "server failed to send",
                                     NULL);
    }
}

/* Wakes a queue thread to send the pending events. Called with c->mu held. */
static void gen_kick(struct gcall *c)
{
    if (!c->call || c->closed || c->final_started || c->send_inflight || c->wake_pending)
        return;
    c->wake_pending = true;
    c->grpc_ops++;
    if (!MOE_GRPC_OK(grpc_call_start_batch(c->call, NULL, 0, &c->t_wake, NULL))) {
        c->wake_pending = false;
        c->grpc_ops--;
    }
}

/* Ends the call with an error status before or instead of admission (or after it: the choices
 * the backend still holds are cancelled when the call closes). Called with c->mu held. */
static void gen_fail_locked(struct gcall *c, grpc_status_code code, const char *msg)
{
    free(c->err_msg);
    c->err_msg = strdup(msg ? msg : "");
    c->err_code = code;
    c->have_error = true;
    MOE_LOG_D("Generate %s: %s: %s", call_id(c), moe_grpc_status_name(code), msg ? msg : "");
    gen_flush(c);
}

/* What a generation holds under its key's max-tokens limit: every choice's prompt and tokens. */
static uint64_t key_tokens(const struct gcall *c)
{
    return (uint64_t)c->n_ch * (c->ch[0].v.req.n_prompt + c->ch[0].v.req.max_new_tokens);
}

/* Gives back the key's room once the backend let go of every choice (or never had them). */
static void key_release_locked(struct gcall *c)
{
    if (c->key_held) {
        c->key_held = false;
        moe_auth_release(c->srv->cfg.auth, c->key, key_tokens(c));
    }
}

/* Asks the backend to stop every choice it holds that was submitted and not cancelled yet:
 * collects their handles in h (cancel outside the lock). Called with c->mu held. */
static size_t take_cancels_locked(struct gcall *c, uint64_t h[MOE_API_MAX_N])
{
    size_t k = 0;
    for (uint32_t i = 0; i < c->n_ch; i++) {
        struct gchoice *ch = &c->ch[i];
        if (ch->backend_holds && !ch->backend_done && ch->submitted && !ch->cancel_sent) {
            ch->cancel_sent = true;
            h[k++] = ch->handle;
        }
    }
    return k;
}

/* GenerateRequest.n and what goes with it; the message for INVALID_ARGUMENT into msg. */
static bool check_n(const Moeserve__V1__GenerateRequest *m, char *msg, size_t cap)
{
    if (m->n > MOE_API_MAX_N) {
        snprintf(msg, cap, "GenerateRequest.n = %" PRIu32 ": must be in [1, %d] (0 means 1)",
                 m->n, MOE_API_MAX_N);
        return false;
    }
    if (m->n > 1 && m->prefill_group) {
        snprintf(msg, cap, "GenerateRequest.n = %" PRIu32 ": cannot be combined with "
                           "prefill_group (n choices in one call share their prefill already)",
                 m->n);
        return false;
    }
    return true;
}

/* Validates every choice of the request (moe_validate_choice: seeds, one prefill group), choice
 * i's id "ID-i" inside the cluster (the client's ID in every response). Built outside the lock
 * (validation tokenizes through the backend), then published in c->ch under it, also on failure
 * (call_free frees what was made). */
static moe_status validate_choices(struct gcall *c, const moe_grpc_generate *dec)
{
    moe_grpc_server *s = c->srv;
    const uint32_t n = c->msg->n ? c->msg->n : 1;
    struct gchoice *chs = calloc(n, sizeof(*chs));
    if (!chs)
        return moe_error(MOE_ERR_NOMEM, "GenerateRequest: out of memory");
    moe_status st = MOE_OK;
    uint32_t made = 0;
    for (uint32_t i = 0; i < n && st == MOE_OK; i++) {
        struct gchoice *ch = &chs[i];
        ch->base.ops = &GRPC_STREAM_OPS;
        ch->c = c;
        ch->index = i;
        made = i + 1;
        st = moe_validate_choice(&s->cfg.limits, &dec->req, i, n, (uint64_t)(uintptr_t)c,
                                 s->be.tokenize, s->be.ctx, &ch->v);
        if (st == MOE_OK && i > 0) {
            char id[MOE_REQUEST_ID_MAX + 1];
            snprintf(id, sizeof(id), "%.*s-%u", MOE_REQUEST_ID_MAX - 3, chs[0].v.req.request_id,
                     i & 0x3fu /* i < 16 */);
            memcpy(ch->v.req.request_id, id, sizeof(id));
        }
    }
    pthread_mutex_lock(&c->mu);
    c->ch = chs;
    c->n_ch = made;
    pthread_mutex_unlock(&c->mu);
    return st;
}

/* Submits every choice to the backend. On a refusal, the call fails with its status and the
 * choices already admitted are cancelled. Consumes the handler's reference. */
static void submit_choices(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    char msg[512];
    pthread_mutex_lock(&c->mu);
    c->key_held = true;
    if (c->closed) { /* gone before admission: nothing to tell the backend */
        moe_fe_stats_end(s->stats, &c->track, MOE_OUTCOME_CANCELLED, 0);
        key_release_locked(c);
        unlock_and_release(c, 1);
        return;
    }
    for (uint32_t i = 0; i < c->n_ch; i++) {
        c->ch[i].backend_holds = true;
        c->refs++;
        c->n_backend++;
    }
    pthread_mutex_unlock(&c->mu);

    moe_status st = MOE_OK;
    uint32_t i = 0;
    for (; i < c->n_ch && st == MOE_OK; i++) {
        struct gchoice *ch = &c->ch[i];
        uint64_t handle = 0;
        moe_error_clear();
        st = s->be.submit(s->be.ctx, &ch->v.req, &ch->base, &handle);
        pthread_mutex_lock(&c->mu);
        if (st == MOE_OK) {
            ch->submitted = true;
            ch->handle = handle;
        } else {
            const char *em = moe_error_message();
            snprintf(msg, sizeof(msg), "%s", em[0] ? em : moe_status_text(st));
            for (uint32_t j = i; j < c->n_ch; j++) { /* this one and those never submitted */
                c->ch[j].backend_holds = false;
                c->refs--;
                c->n_backend--;
            }
        }
        pthread_mutex_unlock(&c->mu);
    }

    uint64_t cancels[MOE_API_MAX_N];
    size_t n_cancel = 0;
    pthread_mutex_lock(&c->mu);
    if (st != MOE_OK) {
        /* (a client that left meanwhile was counted cancelled already: first outcome wins) */
        moe_fe_stats_end(s->stats, &c->track, MOE_OUTCOME_REJECTED_BUSY, 0);
        if (c->n_backend == 0)
            key_release_locked(c);
        n_cancel = take_cancels_locked(c, cancels); /* the choices admitted before it */
        gen_fail_locked(c, moe_grpc_status_from_moe(st), msg);
    } else {
        c->admitted = true;
        /* An active stream only while the call is still ours: a call that closed and was let
         * go while submit ran must not open one that nothing would close. */
        if (c->call)
            moe_fe_stats_admitted(s->stats, &c->track, c->ch[0].v.req.n_prompt);
        MOE_LOG_D("Generate %s: admitted, %" PRIu32 " choice(s), %" PRIu32 " prompt tokens, max "
                  "%" PRIu32, call_id(c), c->n_ch, c->ch[0].v.req.n_prompt,
                  c->ch[0].v.req.max_new_tokens);
        if (c->cancel_pending)
            n_cancel = take_cancels_locked(c, cancels);
    }
    unlock_and_release(c, 1);
    /* c may be gone; the handles are all cancel needs. */
    for (size_t k = 0; k < n_cancel; k++)
        s->be.cancel(s->be.ctx, cancels[k]);
}

static void gen_start(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    moe_fe_stats_received(s->stats, &c->track, c->arrival_ns);
    /* The gRPC side's reference, and this handler's own: RECV_CLOSE may complete on another
     * thread and the backend may finish before submit returns. */
    c->refs = 2;

    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled_flag;
    c->grpc_ops = 1;
    if (!MOE_GRPC_OK(grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL))) {
        c->grpc_ops = 0;
        grpc_call_cancel_with_status(c->call, GRPC_STATUS_INTERNAL, "server failed to start",
                                     NULL);
        moe_fe_stats_end(s->stats, &c->track, MOE_OUTCOME_FAILED, 0);
        grpc_call_unref(c->call);
        c->call = NULL;
        call_free(c);
        return;
    }
    /* From here on RECV_CLOSE may complete on another thread: shared state goes under c->mu. */

    char msg[512];
    grpc_status_code code = GRPC_STATUS_OK;
    bool no_message = false;
    size_t len = c->payload ? grpc_byte_buffer_length(c->payload) : 0;
    grpc_slice slice;
    if (len > s->cfg.max_request_bytes) {
        snprintf(msg, sizeof(msg),
                 "GenerateRequest: message is %zu bytes, over the limit of %zu bytes "
                 "(max_request_bytes)",
                 len, s->cfg.max_request_bytes);
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else if (!read_payload(c->payload, &slice)) {
        snprintf(msg, sizeof(msg), "GenerateRequest: no request message");
        code = GRPC_STATUS_INVALID_ARGUMENT;
        no_message = true;
    } else {
        moe_status st = moe_grpc_check_strings(&moeserve__v1__generate_request__descriptor,
                                               GRPC_SLICE_START_PTR(slice),
                                               GRPC_SLICE_LENGTH(slice));
        if (st == MOE_OK)
            c->msg = moeserve__v1__generate_request__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                            GRPC_SLICE_START_PTR(slice));
        grpc_slice_unref(slice);
        moe_grpc_generate dec;
        memset(&dec, 0, sizeof(dec));
        if (st != MOE_OK) {
            snprintf(msg, sizeof(msg), "%s", moe_error_message());
            code = moe_grpc_status_from_moe(st);
        } else if (!c->msg) {
            snprintf(msg, sizeof(msg), "GenerateRequest: malformed message (protobuf decoding "
                                       "failed)");
            code = GRPC_STATUS_INVALID_ARGUMENT;
        } else if (!check_n(c->msg, msg, sizeof(msg))) {
            code = GRPC_STATUS_INVALID_ARGUMENT;
        } else if ((st = moe_grpc_generate_decode(c->msg, &dec)) != MOE_OK ||
                   (st = validate_choices(c, &dec)) != MOE_OK) {
            snprintf(msg, sizeof(msg), "%s", moe_error_message());
            code = moe_grpc_status_from_moe(st);
        }
        moe_grpc_generate_free(&dec);
    }
    if (c->payload) {
        grpc_byte_buffer_destroy(c->payload);
        c->payload = NULL;
    }
    if (code != GRPC_STATUS_OK) {
        pthread_mutex_lock(&c->mu);
        /* No message: the call ended before it arrived (client deadline passed, cancel, reset;
         * seen with 1 ms deadlines while our RECV_CLOSE had not completed yet and the server's
         * copy of the deadline was still ahead). Every gRPC stub sends the one message of a
         * server-streaming call, so this is a cancelled request, not an invalid one. */
        moe_fe_stats_end(s->stats, &c->track,
                         no_message ? MOE_OUTCOME_CANCELLED : MOE_OUTCOME_REJECTED_INVALID, 0);
        gen_fail_locked(c, code, msg);
        unlock_and_release(c, 1);
        return;
    }
    int64_t deadline_ns = 0;
    if (gpr_time_cmp(c->deadline, gpr_inf_future(c->deadline.clock_type)) != 0) {
        gpr_timespec left = gpr_time_sub(c->deadline, gpr_now(c->deadline.clock_type));
        deadline_ns = moe_now_ns() + (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
    }
    for (uint32_t i = 0; i < c->n_ch; i++) {
        c->ch[i].v.req.arrival_ns = c->arrival_ns;
        c->ch[i].v.req.client = (uint32_t)(c->key + 1);
        c->ch[i].v.req.deadline_ns = deadline_ns;
    }

    /* per-key limits and priority permission (coordinator/auth.h), for all n choices */
    moe_status kst =
        moe_auth_acquire(s->cfg.auth, c->key, key_tokens(c), c->ch[0].v.req.priority);
    if (kst != MOE_OK) {
        snprintf(msg, sizeof(msg), "%s", moe_error_message());
        pthread_mutex_lock(&c->mu);
        moe_fe_stats_end(s->stats, &c->track, kst == MOE_ERR_FULL ? MOE_OUTCOME_REJECTED_BUSY
                                                                  : MOE_OUTCOME_REJECTED_INVALID, 0);
        gen_fail_locked(c, moe_grpc_status_from_moe(kst), msg);
        unlock_and_release(c, 1);
        return;
    }
    submit_choices(c);
}

static void gen_on_close(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    uint64_t cancels[MOE_API_MAX_N];
    pthread_mutex_lock(&c->mu);
    c->grpc_ops--;
    c->closed = true;
    /* `cancelled` is also set when we sent a non-OK status ourselves; what matters is whether
     * the backend still works on the request. */
    /* The call ended. Whatever happened first is the request's outcome: a finish or error the
     * backend made (even if its last message never reached the client), or this close. */
    moe_fe_stats_end(s->stats, &c->track, MOE_OUTCOME_CANCELLED, 0);
    size_t n_cancel = take_cancels_locked(c, cancels);
    bool unsubmitted = false;
    for (uint32_t i = 0; i < c->n_ch; i++)
        unsubmitted |= c->ch[i].backend_holds && !c->ch[i].submitted;
    if (unsubmitted)
        c->cancel_pending = true; /* submit_choices cancels them once submitted */
    if (n_cancel || unsubmitted)
        MOE_LOG_D("Generate %s: cancelled by the client, disconnect, deadline or a failed "
                  "choice", call_id(c));
    unlock_and_release(c, 0);
    for (size_t k = 0; k < n_cancel; k++)
        s->be.cancel(s->be.ctx, cancels[k]);
}

static void gen_on_wake(struct gcall *c)
{
    pthread_mutex_lock(&c->mu);
    c->grpc_ops--;
    c->wake_pending = false;
    gen_flush(c);
    unlock_and_release(c, 0);
}

static void gen_on_send(struct gcall *c, bool ok)
{
    pthread_mutex_lock(&c->mu);
    c->grpc_ops--;
    c->send_inflight = false;
    if (c->send_buf) {
        grpc_byte_buffer_destroy(c->send_buf);
        c->send_buf = NULL;
    }
    if (c->have_status_details) {
        grpc_slice_unref(c->status_details);
        c->have_status_details = false;
    }
    (void)ok; /* a failed send means the call is going away: RECV_CLOSE will say so */
    gen_flush(c);
    unlock_and_release(c, 0);
}

/* ---------------------------------------------------------------------------------------------
 * Backend pushes */

/* Room for n_tok pending tokens and text_bytes of text. Called with c->mu held. */
static bool ensure_pending(struct gchoice *ch, size_t n_tok, size_t text_bytes)
{
    if (n_tok > ch->p_cap) {
        size_t cap = ch->p_cap ? ch->p_cap * 2 : 16;
        while (cap < n_tok)
            cap *= 2;
        uint32_t *ids = realloc(ch->p_ids, cap * sizeof(uint32_t));
        if (ids)
            ch->p_ids = ids;
        uint32_t *idx = realloc(ch->p_idx, cap * sizeof(uint32_t));
        if (idx)
            ch->p_idx = idx;
        float *times = realloc(ch->p_times, cap * sizeof(float));
        if (times)
            ch->p_times = times;
        bool lp_ok = true;
        if (ch->v.req.sampling.logprobs) {
            moe_token_logprobs *lp = realloc(ch->p_lp, cap * sizeof(*lp));
            if (lp)
                ch->p_lp = lp;
            lp_ok = lp != NULL;
        }
        if (!ids || !idx || !times || !lp_ok)
            return false;
        ch->p_cap = cap;
    }
    if (text_bytes > ch->p_text_cap) {
        size_t cap = ch->p_text_cap ? ch->p_text_cap * 2 : 256;
        while (cap < text_bytes)
            cap *= 2;
        char *t = realloc(ch->p_text, cap);
        if (!t)
            return false;
        ch->p_text = t;
        ch->p_text_cap = cap;
    }
    return true;
}

static moe_status gc_push_tokens(moe_frontend_req *r, const int32_t *ids, const uint32_t *indices,
                                 const moe_token_logprobs *lp, size_t n, const char *text,
                                 size_t text_len)
{
    struct gchoice *ch = (struct gchoice *)r;
    struct gcall *c = ch->c;
    const int64_t now = moe_now_ns();
    moe_status st = MOE_OK;
    pthread_mutex_lock(&c->mu);
    if (ch->backend_done) {
        st = moe_error(MOE_ERR_INVALID_ARG, "request %s: tokens pushed after finish/error",
                       ch->v.req.request_id);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (indices[i] != ch->next_index + i) {
            st = moe_error(MOE_ERR_INVALID_ARG,
                           "request %s: pushed token index %" PRIu32 " where %zu was expected",
                           ch->v.req.request_id, indices[i], (size_t)ch->next_index + i);
            goto out;
        }
    }
    moe_fe_stats_tokens(c->srv->stats, &c->track, n, now);
    if (n > 0 && ch->next_index == 0)
        ch->t_first_ns = now;
    if (n > 0)
        ch->t_last_ns = now;
    ch->next_index += (uint32_t)n;
    if (c->closed || c->final_started)
        goto out; /* the client is gone: keep counting, drop the data */

    if (!ensure_pending(ch, ch->p_n + n, ch->p_text_len + text_len + 1)) {
        st = moe_error(MOE_ERR_NOMEM, "request %s: out of memory", ch->v.req.request_id);
        goto out;
    }
    const float t_ms = (float)((double)(now - c->arrival_ns) * 1e-6);
    for (size_t i = 0; i < n; i++) {
        ch->p_ids[ch->p_n + i] = (uint32_t)ids[i];
        ch->p_idx[ch->p_n + i] = indices[i];
        ch->p_times[ch->p_n + i] = t_ms;
        if (ch->p_lp)
            ch->p_lp[ch->p_n + i] = lp ? lp[i] : (moe_token_logprobs){0};
    }
    ch->p_n += n;
    if (text_len > 0)
        memcpy(ch->p_text + ch->p_text_len, text, text_len);
    ch->p_text_len += text_len;
    ch->p_text[ch->p_text_len] = '\0';
    gen_kick(c);
out:
    pthread_mutex_unlock(&c->mu);
    return st;
}

/* Drops the backend's reference of one choice; frees the call if nobody else holds it. */
static void backend_release_locked_then_unlock(struct gchoice *ch)
{
    struct gcall *c = ch->c;
    ch->backend_done = true;
    ch->backend_holds = false;
    if (--c->n_backend == 0)
        key_release_locked(c);
    unlock_and_release(c, 1);
}

static void gc_finish(moe_frontend_req *r, const moe_frontend_finish_info *info)
{
    struct gchoice *ch = (struct gchoice *)r;
    struct gcall *c = ch->c;
    pthread_mutex_lock(&c->mu);
    MOE_ASSERT(!ch->backend_done);
    ch->t_finish_ns = moe_now_ns();
    ch->have_finish = true;
    ch->finish_reason = info ? info->reason : MOE_FINISH_LENGTH;
    ch->completion_tokens = info ? info->completion_tokens : 0;
    bool all = true;
    for (uint32_t i = 0; i < c->n_ch; i++)
        all &= c->ch[i].have_finish;
    if (all) /* one outcome for the call, once its last choice finished (first outcome wins) */
        moe_fe_stats_end(c->srv->stats, &c->track, MOE_OUTCOME_FINISHED, ch->finish_reason);
    if (!c->closed && !c->final_started) {
        if (info && info->matched_stop)
            ch->matched_stop = strdup(info->matched_stop);
        MOE_LOG_D("Generate %s: finished, %" PRIu32 " tokens", ch->v.req.request_id,
                  ch->next_index);
        gen_kick(c);
    }
    backend_release_locked_then_unlock(ch);
}

static void gc_error(moe_frontend_req *r, moe_status code, const char *message)
{
    struct gchoice *ch = (struct gchoice *)r;
    struct gcall *c = ch->c;
    pthread_mutex_lock(&c->mu);
    MOE_ASSERT(!ch->backend_done);
    moe_fe_stats_end(c->srv->stats, &c->track, MOE_OUTCOME_FAILED, 0);
    /* one failed choice fails the call; its status ends it and the close cancels the others */
    if (!c->closed && !c->final_started && !c->have_error) {
        free(c->err_msg);
        c->err_msg = strdup(message ? message : moe_status_text(code));
        c->err_code = moe_grpc_status_from_moe(code);
        if (c->err_code == GRPC_STATUS_OK)
            c->err_code = GRPC_STATUS_INTERNAL;
        c->have_error = true;
        MOE_LOG_W("Generate %s: failed: %s: %s", ch->v.req.request_id,
                  moe_grpc_status_name(c->err_code), c->err_msg ? c->err_msg : "");
        gen_kick(c);
    }
    backend_release_locked_then_unlock(ch);
}

static const moe_gen_request *gc_request(const moe_frontend_req *r)
{
    return &((const struct gchoice *)r)->v.req;
}

static const moe_frontend_ops GRPC_STREAM_OPS = {
    .push_tokens = gc_push_tokens,
    .finish = gc_finish,
    .error = gc_error,
    .request = gc_request,
};

/* ---------------------------------------------------------------------------------------------
 * Completion-queue threads */

/* API keys: every call but Health/Check (probes carry no key) needs one; Drain an admin one.
 * Replies and returns false when the call may not go on. */
static bool authorized(struct gcall *c)
{
    moe_grpc_server *s = c->srv;
    if (!s->cfg.auth || c->kind == K_HEALTH)
        return true;
    const char *value = NULL;
    size_t len = 0;
    for (size_t i = 0; i < c->req_md.count; i++) {
        const grpc_metadata *m = &c->req_md.metadata[i];
        if (grpc_slice_str_cmp(m->key, "authorization") == 0) {
            value = (const char *)GRPC_SLICE_START_PTR(m->value);
            len = GRPC_SLICE_LENGTH(m->value);
            break;
        }
    }
    moe_auth_role role = moe_auth_check(s->cfg.auth, value, len, &c->key);
    if (role == MOE_AUTH_NONE) {
        moe_fe_stats_unauthenticated(s->stats);
        unary_reply(c, GRPC_STATUS_UNAUTHENTICATED,
                    value ? "the API key in `authorization` is not valid"
                          : "missing API key: send metadata `authorization: Bearer KEY`",
                    NULL);
        return false;
    }
    if (c->kind == K_DRAIN && role != MOE_AUTH_ADMIN) {
        char msg[160];
        snprintf(msg, sizeof(msg), "Drain needs an admin API key (key %.64s is not one)",
                 moe_auth_name(s->cfg.auth, c->key));
        unary_reply(c, GRPC_STATUS_PERMISSION_DENIED, msg, NULL);
        return false;
    }
    return true;
}

static void on_new_call(struct gcall *c, bool ok)
{
    moe_grpc_server *s = c->srv;
    if (!ok) { /* the server is shutting down: this request will never get a call */
        call_free(c);
        return;
    }
    c->arrival_ns = moe_now_ns();
    if (!atomic_load(&s->draining))
        request_call(s, c->kind);
    if (!authorized(c))
        return;
    switch (c->kind) {
    case K_GENERATE: gen_start(c); break;
    case K_TOKENIZE: handle_tokenize(c); break;
    case K_STATUS: handle_status(c); break;
    case K_HEALTH: handle_health(c); break;
    case K_DRAIN: handle_drain(c); break;
    default: {
        char msg[320];
        snprintf(msg, sizeof(msg), "method %.*s is not implemented by this server",
                 (int)GRPC_SLICE_LENGTH(c->details.method),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
        unary_reply(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
    }
    }
}

static void *cq_thread(void *arg)
{
    moe_grpc_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                                   NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        cq_tag *t = ev.tag;
        switch (t->kind) {
        case T_NEW: on_new_call(t->c, ev.success != 0); break;
        case T_CLOSE: gen_on_close(t->c); break;
        case T_SEND: gen_on_send(t->c, ev.success != 0); break;
        case T_WAKE: gen_on_wake(t->c); break;
        case T_UNARY: on_unary_done(t->c); break;
        case T_SHUTDOWN:
            pthread_mutex_lock(&s->mu);
            s->shutdown_notified = true;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            break;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Lifecycle */

moe_status moe_grpc_server_start(const moe_grpc_server_config *cfg,
                                 const moe_frontend_backend *backend, moe_grpc_server **out)
{
    *out = NULL;
    if (!cfg->listen_addr || !cfg->listen_addr[0] ||
        strlen(cfg->listen_addr) >= sizeof(((moe_grpc_server *)0)->listen_addr))
        return moe_error(MOE_ERR_INVALID_ARG, "grpc server: listen_addr missing or too long");
    if (cfg->n_threads < 1 || cfg->n_threads > 64)
        return moe_error(MOE_ERR_INVALID_ARG, "grpc server: n_threads = %d: must be in [1, 64]",
                         cfg->n_threads);
    if (cfg->max_request_bytes < 1024 || cfg->max_request_bytes > (size_t)INT_MAX / 2)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "grpc server: max_request_bytes = %zu: must be in [1024, %d]",
                         cfg->max_request_bytes, INT_MAX / 2);
    if (cfg->limits.vocab_size < 1 || cfg->limits.context_len < 2)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "grpc server: limits.vocab_size = %" PRId32 ", limits.context_len = %" PRIu32
                         ": need a vocabulary and a context of at least 2",
                         cfg->limits.vocab_size, cfg->limits.context_len);
    if (!backend->submit || !backend->cancel || !backend->tokenize || !backend->healthy)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "grpc server: backend slots submit, cancel, tokenize and healthy are "
                         "required");

    moe_grpc_server *s = calloc(1, sizeof(*s));
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "grpc server: out of memory");
    s->cfg = *cfg;
    snprintf(s->listen_addr, sizeof(s->listen_addr), "%s", cfg->listen_addr);
    s->cfg.listen_addr = s->listen_addr;
    s->be = *backend;
    s->start_ns = moe_now_ns();
    if (cfg->stats) {
        s->stats = cfg->stats;
    } else if (moe_fe_stats_create(&s->own_stats) == MOE_OK) {
        s->stats = s->own_stats;
    } else {
        free(s);
        return moe_error(MOE_ERR_NOMEM, "grpc server: out of memory");
    }
    s->shutdown_tag = (cq_tag){NULL, T_SHUTDOWN};
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    grpc_init();

    /* Our own limit (max_request_bytes) answers INVALID_ARGUMENT naming it; gRPC's, set above
     * it, bounds what a client can make us buffer before we get to look. */
    grpc_arg args[3];
    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)(uintptr_t)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)(2 * cfg->max_request_bytes);
    /* Keepalive pings find clients whose network vanished without a FIN: their streams are
     * cancelled (and their KV freed) within about a minute instead of hours. */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)(uintptr_t)GRPC_ARG_KEEPALIVE_TIME_MS;
    args[1].value.integer = 30000;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)(uintptr_t)GRPC_ARG_KEEPALIVE_TIMEOUT_MS;
    args[2].value.integer = 20000;
    grpc_channel_args chargs = {.num_args = 3, .args = args};

    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->server = grpc_server_create(&chargs, NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    for (int k = 0; k < K_UNKNOWN; k++)
        s->method[k] = grpc_server_register_method(s->server, METHOD_PATH[k], NULL,
                                                   GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    grpc_server_credentials *creds;
    if (cfg->tls.cert) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = cfg->tls.key,
                                           .cert_chain = cfg->tls.cert};
        creds = grpc_ssl_server_credentials_create_ex(
            cfg->tls.client_ca, &pair, 1,
            cfg->tls.client_ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                   : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    s->port = creds ? grpc_server_add_http2_port(s->server, s->listen_addr, creds) : 0;
    if (creds)
        grpc_server_credentials_release(creds);
    if (s->port <= 0) {
        grpc_server_destroy(s->server);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        moe_fe_stats_free(s->own_stats);
        free(s);
        return moe_error(MOE_ERR_IO, "grpc server: cannot listen on %s (address in use or invalid)",
                         cfg->listen_addr);
    }
    (void)moe_frontend_lat_init(&s->lat); /* without it, no latency log: nothing else changes */
    grpc_server_start(s->server);
    for (int i = 0; i < cfg->n_threads; i++)
        for (int k = 0; k <= K_UNKNOWN; k++)
            request_call(s, (enum call_kind)k);

    s->threads = calloc((size_t)cfg->n_threads, sizeof(pthread_t));
    for (int i = 0; s->threads && i < cfg->n_threads; i++) {
        if (pthread_create(&s->threads[i], NULL, cq_thread, s) != 0)
            break;
        s->n_threads++;
    }
    if (s->n_threads == 0) {
        MOE_LOG_E("grpc server: cannot start any completion-queue thread");
        free(s->threads);
        s->threads = NULL;
        /* Without threads nothing would drain the queue: tear down from here. */
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
        grpc_server_cancel_all_calls(s->server);
        grpc_completion_queue_shutdown(s->cq);
        s->n_threads = 0;
        cq_thread(s);
        grpc_server_destroy(s->server);
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        moe_fe_stats_free(s->own_stats);
        free(s);
        return moe_error(MOE_ERR_NOMEM, "grpc server: cannot start threads");
    }
    MOE_LOG_I("gRPC server listening on %s (port %d), %d threads, max request %zu bytes, %s, %s",
              s->listen_addr, s->port, s->n_threads, s->cfg.max_request_bytes,
              !cfg->tls.cert ? "plaintext" : cfg->tls.client_ca ? "TLS with client certificates" : "TLS",
              cfg->auth ? "API keys required" : "OPEN: no API key needed");
    *out = s;
    return MOE_OK;
}

int moe_grpc_server_port(const moe_grpc_server *s) { return s->port; }

static bool wait_until(moe_grpc_server *s, bool (*cond)(const moe_grpc_server *), double secs)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t ns = (int64_t)(secs * 1e9);
    ts.tv_sec += ns / 1000000000;
    ts.tv_nsec += ns % 1000000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    bool met;
    pthread_mutex_lock(&s->mu);
    while (!(met = cond(s))) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) == ETIMEDOUT) {
            met = cond(s);
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return met;
}

static bool cond_notified(const moe_grpc_server *s) { return s->shutdown_notified; }
static bool cond_no_calls(const moe_grpc_server *s) { return s->live_calls == 0; }

void moe_grpc_server_shutdown(moe_grpc_server *s, double grace_s)
{
    pthread_mutex_lock(&s->mu);
    bool already = s->shutdown_started;
    s->shutdown_started = true;
    pthread_mutex_unlock(&s->mu);
    if (already)
        return;
    if (grace_s < 0)
        grace_s = 0;
    atomic_store(&s->draining, true);
    MOE_LOG_I("gRPC server draining (grace %.1f s)", grace_s);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    if (!wait_until(s, cond_notified, grace_s)) {
        MOE_LOG_W("gRPC server: calls still open after %.1f s: cancelling them", grace_s);
        grpc_server_cancel_all_calls(s->server);
        wait_until(s, cond_notified, 1e9);
    }
    /* Cancelled calls told the backend; give it time to make its terminal calls. */
    if (!wait_until(s, cond_no_calls, grace_s > 1.0 ? grace_s : 1.0)) {
        pthread_mutex_lock(&s->mu);
        MOE_LOG_W("gRPC server: %d requests still held by the backend after shutdown",
                  s->live_calls);
        pthread_mutex_unlock(&s->mu);
    }
}

void moe_grpc_server_free(moe_grpc_server *s)
{
    if (!s)
        return;
    moe_grpc_server_shutdown(s, 0);
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->n_threads; i++)
        pthread_join(s->threads[i], NULL);
    grpc_completion_queue_destroy(s->cq);
    free(s->threads);
    moe_frontend_lat_log(&s->lat, "gRPC");
    pthread_mutex_lock(&s->mu);
    int live = s->live_calls;
    pthread_mutex_unlock(&s->mu);
    if (live == 0) {
        moe_frontend_lat_free(&s->lat);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        moe_fe_stats_free(s->own_stats);
        free(s);
    } else {
        /* Those requests point at us and the backend may still push to them (pushes to a closed
         * call touch only the call and our counters): leaking beats a use after free. */
        MOE_LOG_W("gRPC server: leaking %d requests the backend never finished", live);
    }
    grpc_shutdown();
}
