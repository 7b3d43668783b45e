/* The gRPC front end's frame: completion-queue threads, call objects and their references, the
 * dispatch of each completion to its call's state machine, authorisation, start and shutdown.
 * The Generate stream is grpc_generate.c, the unary RPCs grpc_unary.c.
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
#include "coordinator/grpc_server_internal.h"
#include "moeserve.pb-c.h"

const char *const moe_grpc_method_path[K_UNKNOWN] = {
    [K_GENERATE] = "/moeserve.v1.Moeserve/Generate",
    [K_TOKENIZE] = "/moeserve.v1.Moeserve/Tokenize",
    [K_STATUS] = "/moeserve.v1.Moeserve/ClusterStatus",
    [K_HEALTH] = "/grpc.health.v1.Health/Check",
    [K_DRAIN] = "/moeserve.v1.Moeserve/Drain",
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

void moe_gcall_free(struct gcall *c)
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
                  kind < K_UNKNOWN ? moe_grpc_method_path[kind] : "unregistered");
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
        moe_gcall_free(c);
}

void moe_gcall_unlock_and_release(struct gcall *c, int drop)
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
        moe_gcall_free(c);
}

grpc_byte_buffer *moe_grpc_pack_message(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice slice = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(slice));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

bool moe_grpc_read_payload(grpc_byte_buffer *payload, grpc_slice *out)
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

void moe_gcall_unary_reply(struct gcall *c, grpc_status_code code, const char *details,
                           const ProtobufCMessage *resp)
{
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (resp && code == GRPC_STATUS_OK) {
        c->send_buf = moe_grpc_pack_message(resp);
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
        MOE_LOG_D("%s: %s: %s", c->kind < K_UNKNOWN ? moe_grpc_method_path[c->kind] : "call",
                  moe_grpc_status_name(code), details ? details : "");
    if (!MOE_GRPC_OK(grpc_call_start_batch(c->call, ops, n, &c->t_unary, NULL))) {
        grpc_call_unref(c->call);
        c->call = NULL;
        moe_gcall_free(c);
    }
}

static void on_unary_done(struct gcall *c)
{
    grpc_call_unref(c->call);
    c->call = NULL;
    moe_gcall_free(c);
}

bool moe_gcall_check_size(struct gcall *c, const char *what)
{
    size_t len = c->payload ? grpc_byte_buffer_length(c->payload) : 0;
    if (len <= c->srv->cfg.max_request_bytes)
        return true;
    char msg[256];
    snprintf(msg, sizeof(msg),
             "%s: message is %zu bytes, over the limit of %zu bytes (max_request_bytes)", what, len,
             c->srv->cfg.max_request_bytes);
    moe_gcall_unary_reply(c, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
    return false;
}

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
        moe_gcall_unary_reply(c, GRPC_STATUS_UNAUTHENTICATED,
                              value ? "the API key in `authorization` is not valid"
                                    : "missing API key: send metadata `authorization: Bearer KEY`",
                              NULL);
        return false;
    }
    if (c->kind == K_DRAIN && role != MOE_AUTH_ADMIN) {
        char msg[160];
        snprintf(msg, sizeof(msg), "Drain needs an admin API key (key %.64s is not one)",
                 moe_auth_name(s->cfg.auth, c->key));
        moe_gcall_unary_reply(c, GRPC_STATUS_PERMISSION_DENIED, msg, NULL);
        return false;
    }
    return true;
}

static void on_new_call(struct gcall *c, bool ok)
{
    moe_grpc_server *s = c->srv;
    if (!ok) { /* the server is shutting down: this request will never get a call */
        moe_gcall_free(c);
        return;
    }
    c->arrival_ns = moe_now_ns();
    if (!atomic_load(&s->draining))
        request_call(s, c->kind);
    if (!authorized(c))
        return;
    switch (c->kind) {
    case K_GENERATE:
        moe_grpc_gen_start(c);
        break;
    case K_TOKENIZE:
        moe_grpc_handle_tokenize(c);
        break;
    case K_STATUS:
        moe_grpc_handle_status(c);
        break;
    case K_HEALTH:
        moe_grpc_handle_health(c);
        break;
    case K_DRAIN:
        moe_grpc_handle_drain(c);
        break;
    default: {
        char msg[320];
        snprintf(msg, sizeof(msg), "method %.*s is not implemented by this server",
                 (int)GRPC_SLICE_LENGTH(c->details.method),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
        moe_gcall_unary_reply(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
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
        case T_CLOSE:
            moe_grpc_gen_on_close(t->c);
            break;
        case T_SEND:
            moe_grpc_gen_on_send(t->c, ev.success != 0);
            break;
        case T_WAKE:
            moe_grpc_gen_on_wake(t->c);
            break;
        case T_UNARY:
            on_unary_done(t->c);
            break;
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
        s->method[k] = grpc_server_register_method(s->server, moe_grpc_method_path[k], NULL,
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

