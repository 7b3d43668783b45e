/* The Generate stream of the gRPC front end (how a Generate call lives: grpc_server.c): decoding
 * and validating the request and its n choices, submitting them to the backend, the pushes the
 * backend makes from its threads, and sending them as messages. */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/grpc_request.h"
#include "coordinator/grpc_server_internal.h"
#include "moeserve.pb-c.h"

static const moe_frontend_ops GRPC_STREAM_OPS;

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
    c->send_buf = moe_grpc_pack_message(&m.base);
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
 * (moe_gcall_free frees what was made). */
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
        moe_gcall_unlock_and_release(c, 1);
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
    moe_gcall_unlock_and_release(c, 1);
    /* c may be gone; the handles are all cancel needs. */
    for (size_t k = 0; k < n_cancel; k++)
        s->be.cancel(s->be.ctx, cancels[k]);
}

void moe_grpc_gen_start(struct gcall *c)
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
        moe_gcall_free(c);
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
    } else if (!moe_grpc_read_payload(c->payload, &slice)) {
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
        moe_gcall_unlock_and_release(c, 1);
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
        moe_gcall_unlock_and_release(c, 1);
        return;
    }
    submit_choices(c);
}

void moe_grpc_gen_on_close(struct gcall *c)
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
    moe_gcall_unlock_and_release(c, 0);
    for (size_t k = 0; k < n_cancel; k++)
        s->be.cancel(s->be.ctx, cancels[k]);
}

void moe_grpc_gen_on_wake(struct gcall *c)
{
    pthread_mutex_lock(&c->mu);
    c->grpc_ops--;
    c->wake_pending = false;
    gen_flush(c);
    moe_gcall_unlock_and_release(c, 0);
}

void moe_grpc_gen_on_send(struct gcall *c, bool ok)
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
    moe_gcall_unlock_and_release(c, 0);
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
    moe_gcall_unlock_and_release(c, 1);
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

