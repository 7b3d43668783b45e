/* The HTTP front end's server: libmicrohttpd with one thread per connection, request bodies,
 * routing, and the generation streams the backend pushes into.
 *
 * How a generation lives: the connection's thread parses and validates the body, submits to
 * the backend and then waits, in poll(), on two things at once: the stream's eventfd (the
 * backend's pushes write it) and the client's socket (POLLRDHUP: the client went away, which
 * cancels the request and frees its KV). Non-streamed requests answer once finished; streamed
 * ones are a libmicrohttpd callback response whose reader turns pending text into SSE chunks.
 * No timer sits on a token's path: a push wakes the connection's thread at once.
 *
 * Lifetime: a stream has up to three owners, the connection (until libmicrohttpd's completion
 * notice), the streaming response (until libmicrohttpd frees it) and the backend (from submit
 * to its terminal call); it is freed when the last lets go. */
#include "coordinator/http_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "common/clock.h"
#include "common/grow.h"
#include "common/log.h"
#include "coordinator/http_internal.h"

struct hstream {
    moe_frontend_req base; /* first: what the backend holds */
    moe_http_server *srv;
    moe_validated v;
    char id[80];
    int efd, client_fd; /* efd: a dup of the group's first stream's, so one poll sees all */

    pthread_mutex_t mu; /* guards everything below */
    int refs;
    bool backend_holds, submitted, done, failed, cancel_sent;
    uint64_t handle;
    uint32_t next_index;
    char *text; /* pending (streamed) or all (not streamed) output text */
    size_t text_len, text_cap;
    moe_finish_reason reason;
    uint32_t completion_tokens;
    int err_status;
    char *err_msg;
    bool sent_role, sent_finish; /* streamed: this choice's role and finish chunks went out */
    /* logprobs requested: every token's id and log-probabilities, lp_sent of them streamed
     * (lp_offset: their token strings' bytes, the completions text_offset of the next) */
    int32_t *lp_ids;
    moe_token_logprobs *lps;
    size_t n_lp, cap_lp, lp_sent, lp_offset;
    int64_t *push_ns; /* streamed: when each token not yet in a chunk was pushed */
    int n_push, cap_push;
    moe_fe_track *track;         /* the request's accounting (a reference) */
    hstream *prev, *next;
};

/* The n generations of one request (n = 1 mostly) and the SSE writer. Held by the request and,
 * when streamed, by the response; it holds the connection's reference of each stream. */
typedef struct {
    atomic_int refs;
    int n;
    hstream *h[MOE_HTTP_MAX_N];
    moe_http_resp_info ri;
    const moe_tokenizer *tok; /* token strings of logprobs */
    bool include_usage;
    pthread_mutex_t mu; /* the writer state below */
    char *out;          /* SSE bytes built and not yet handed to libmicrohttpd */
    size_t out_len, out_cap, out_off;
    bool sent_end;
    moe_fe_track *track; /* the request's accounting: one outcome for its n choices */
    int key;             /* API key holding room for it under its limits (-1: none) */
    uint64_t key_tokens;
    bool key_held;
} hgroup;

/* One HTTP request's state (libmicrohttpd's per-request pointer). */
typedef struct {
    char *body;
    size_t len, cap;
    bool too_big;
    int key;   /* API key index (-1: none) */
    hgroup *g; /* a generation's streams */
} hreq;

/* ---------------------------------------------------------------------------------------------
 * Streams */

static void stream_free(hstream *h)
{
    moe_http_server *s = h->srv;
    pthread_mutex_lock(&s->mu);
    if (h->prev)
        h->prev->next = h->next;
    else
        s->streams = h->next;
    if (h->next)
        h->next->prev = h->prev;
    s->n_streams--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (h->efd >= 0)
        close(h->efd);
    moe_validated_free(&h->v);
    moe_fe_track_drop(h->track);
    free(h->text);
    free(h->lp_ids);
    free(h->lps);
    free(h->push_ns);
    free(h->err_msg);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* Drops one reference, with h->mu held; frees on the last. */
static void unlock_release(hstream *h)
{
    bool last = --h->refs == 0;
    pthread_mutex_unlock(&h->mu);
    if (last)
        stream_free(h);
}

static void wake(hstream *h)
{
    uint64_t one = 1;
    ssize_t r = write(h->efd, &one, sizeof(one));
    (void)r; /* the counter saturating still leaves it readable */
}

static bool append(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap * 2 : 256;
        while (c < *len + n + 1)
            c *= 2;
        char *p = realloc(*buf, c);
        if (!p)
            return false;
        *buf = p;
        *cap = c;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return true;
}

/* Keeps n tokens' logprobs (zeros when the backend sent none for a token). With h->mu held. */
static bool keep_logprobs(hstream *h, const int32_t *ids, const moe_token_logprobs *lp, size_t n)
{
    if (!n || !h->v.req.sampling.logprobs)
        return true;
    if (h->n_lp + n > h->cap_lp) {
        size_t cap = h->cap_lp ? h->cap_lp * 2 : 64;
        while (cap < h->n_lp + n)
            cap *= 2;
        int32_t *ni = realloc(h->lp_ids, cap * sizeof(*ni));
        if (ni)
            h->lp_ids = ni;
        moe_token_logprobs *nl = realloc(h->lps, cap * sizeof(*nl));
        if (nl)
            h->lps = nl;
        if (!ni || !nl)
            return false;
        h->cap_lp = cap;
    }
    for (size_t i = 0; i < n; i++) {
        h->lp_ids[h->n_lp + i] = ids[i];
        h->lps[h->n_lp + i] = lp ? lp[i] : (moe_token_logprobs){0};
    }
    h->n_lp += n;
    return true;
}

static moe_status hs_push_tokens(moe_frontend_req *r, const int32_t *ids, const uint32_t *indices,
                                 const moe_token_logprobs *lp, size_t n, const char *text,
                                 size_t text_len)
{
    hstream *h = (hstream *)r;
    moe_status st = MOE_OK;
    pthread_mutex_lock(&h->mu);
    if (h->done) {
        st = moe_error(MOE_ERR_INVALID_ARG, "request %s: tokens pushed after finish/error", h->id);
    } else {
        for (size_t i = 0; i < n && st == MOE_OK; i++)
            if (indices[i] != h->next_index + i)
                st = moe_error(MOE_ERR_INVALID_ARG,
                               "request %s: pushed token index %" PRIu32 " where %zu was expected",
                               h->id, indices[i], (size_t)h->next_index + i);
        if (st == MOE_OK) {
            moe_fe_stats_tokens(h->srv->stats, h->track, n, moe_now_ns());
            h->next_index += (uint32_t)n;
            if ((text_len && !append(&h->text, &h->text_len, &h->text_cap, text, text_len)) ||
                !keep_logprobs(h, ids, lp, n))
                st = moe_error(MOE_ERR_NOMEM, "request %s: out of memory", h->id);
            if (n && moe_grow((void **)&h->push_ns, &h->cap_push, h->n_push + (int)n, sizeof(int64_t))) {
                int64_t now = moe_now_ns();
                for (size_t i = 0; i < n; i++)
                    h->push_ns[h->n_push++] = now;
            }
        }
    }
    pthread_mutex_unlock(&h->mu);
    if (st == MOE_OK)
        wake(h);
    return st;
}

static void hs_finish(moe_frontend_req *r, const moe_frontend_finish_info *info)
{
    hstream *h = (hstream *)r;
    pthread_mutex_lock(&h->mu);
    MOE_ASSERT(h->backend_holds);
    h->done = true;
    h->reason = info ? info->reason : MOE_FINISH_LENGTH;
    h->completion_tokens = (info && info->completion_tokens) ? info->completion_tokens : h->next_index;
    h->backend_holds = false;
    wake(h);
    unlock_release(h);
}

static void hs_error(moe_frontend_req *r, moe_status code, const char *message)
{
    hstream *h = (hstream *)r;
    pthread_mutex_lock(&h->mu);
    MOE_ASSERT(h->backend_holds);
    h->done = h->failed = true;
    h->err_status = moe_http_status_from_moe(code);
    if (h->err_status < 400 || code == MOE_ERR_CANCELLED)
        h->err_status = 500;
    free(h->err_msg);
    h->err_msg = strdup(message ? message : moe_status_text(code));
    h->backend_holds = false;
    MOE_LOG_W("HTTP %s: failed: %s", h->id, h->err_msg ? h->err_msg : "");
    wake(h);
    unlock_release(h);
}

static const moe_gen_request *hs_request(const moe_frontend_req *r)
{
    return &((const hstream *)r)->v.req;
}

static const moe_frontend_ops HTTP_STREAM_OPS = {
    .push_tokens = hs_push_tokens,
    .finish = hs_finish,
    .error = hs_error,
    .request = hs_request,
};

/* Asks the backend to stop (client gone, shutdown); the stream stays until its terminal call. */
static void stream_cancel(hstream *h)
{
    bool do_cancel = false;
    pthread_mutex_lock(&h->mu);
    if (h->backend_holds && h->submitted && !h->cancel_sent) {
        h->cancel_sent = true;
        do_cancel = true;
    }
    uint64_t handle = h->handle;
    pthread_mutex_unlock(&h->mu);
    if (do_cancel) {
        MOE_LOG_D("HTTP %s: cancelled (client gone or shutdown)", h->id);
        h->srv->be.cancel(h->srv->be.ctx, handle);
    }
}

static void group_cancel(hgroup *g)
{
    for (int i = 0; i < g->n; i++)
        stream_cancel(g->h[i]);
}

static void group_release(hgroup *g)
{
    if (atomic_fetch_sub(&g->refs, 1) != 1)
        return;
    if (g->n > 0) { /* an outcome for every request, whatever path let go of it */
        moe_fe_stats_end(g->h[0]->srv->stats, g->track, MOE_OUTCOME_CANCELLED, 0);
        moe_fe_stats_stream_closed(g->h[0]->srv->stats, g->track);
    }
    moe_fe_track_drop(g->track);
    if (g->key_held)
        moe_auth_release(g->h[0]->srv->cfg.auth, g->key, g->key_tokens);
    for (int i = 0; i < g->n; i++) {
        pthread_mutex_lock(&g->h[i]->mu);
        unlock_release(g->h[i]);
    }
    free(g->out);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

/* True when every choice finished (or one failed); *failed: the first failed stream. */
static bool group_done(hgroup *g, hstream **failed)
{
    bool all = true;
    *failed = NULL;
    for (int i = 0; i < g->n; i++) {
        pthread_mutex_lock(&g->h[i]->mu);
        all &= g->h[i]->done;
        if (g->h[i]->failed && !*failed)
            *failed = g->h[i];
        pthread_mutex_unlock(&g->h[i]->mu);
    }
    return all || *failed;
}

/* Waits for the backend's next push, or the client hanging up / shutdown (false). */
static bool wait_event(hstream *h)
{
    struct pollfd p[2] = {{.fd = h->efd, .events = POLLIN},
                          {.fd = h->client_fd, .events = POLLRDHUP}};
    int np = h->client_fd >= 0 ? 2 : 1;
    for (;;) {
        int r = poll(p, (nfds_t)np, -1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return false;
        break;
    }
    if (p[0].revents & POLLIN) {
        uint64_t v;
        ssize_t rr = read(h->efd, &v, sizeof(v));
        (void)rr;
    }
    if (np == 2 && (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)))
        return false;
    pthread_mutex_lock(&h->srv->mu);
    bool stopping = h->srv->stopping;
    pthread_mutex_unlock(&h->srv->mu);
    return !stopping;
}

/* ---------------------------------------------------------------------------------------------
 * Responses */

enum MHD_Result moe_http_reply(struct MHD_Connection *conn, int status, const char *json)
{
    const char *body = json ? json : "{}";
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), (void *)(uintptr_t)body, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result moe_http_reply_error(struct MHD_Connection *conn, int status, const char *msg,
                                   const char *param)
{
    char *j = moe_http_error_json(status, msg, param);
    enum MHD_Result r = moe_http_reply(conn, status, j);
    free(j);
    return r;
}

enum MHD_Result moe_http_reply_json(struct MHD_Connection *conn, int status, cJSON *o)
{
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    enum MHD_Result r = s ? moe_http_reply(conn, status, s) : MHD_NO;
    free(s);
    return r;
}

/* Appends one SSE event ("data: X\n\n"), with g->mu held. */
static void sse_event(hgroup *g, char *json)
{
    if (!json)
        return;
    append(&g->out, &g->out_len, &g->out_cap, "data: ", 6);
    append(&g->out, &g->out_len, &g->out_cap, json, strlen(json));
    append(&g->out, &g->out_len, &g->out_cap, "\n\n", 2);
    free(json);
}

/* Turns what the backend pushed into SSE events, with g->mu held; false when nothing new.
 * Choices are interleaved as their tokens come, each chunk naming its index. */
static bool sse_build(hgroup *g)
{
    if (g->sent_end)
        return false;
    bool more = false, all_done = true;
    hstream *failed = NULL;
    uint32_t tokens = 0;
    for (int i = 0; i < g->n; i++) {
        hstream *h = g->h[i];
        pthread_mutex_lock(&h->mu);
        if (g->ri.chat && !h->sent_role) {
            sse_event(g, moe_http_chunk(&g->ri, i, "", 0, true, NULL, NULL));
            h->sent_role = more = true;
        }
        /* the tokens since the last chunk ride with the text since then (which the detokenizer
         * may hold back by a token or two) */
        moe_http_logprobs lp = {.tok = g->tok, .ids = h->lp_ids + h->lp_sent,
                                .lp = h->lps + h->lp_sent, .n = h->n_lp - h->lp_sent,
                                .offset = h->lp_offset};
        if (h->text_len > 0 || lp.n > 0) {
            sse_event(g, moe_http_chunk(&g->ri, i, h->text, h->text_len, false, NULL,
                                        lp.n ? &lp : NULL));
            int64_t now = moe_now_ns(); /* the reader hands these bytes to libmicrohttpd next */
            for (int k = 0; k < h->n_push; k++)
                moe_frontend_lat_add(&h->srv->lat, (double)(now - h->push_ns[k]) * 1e-3, 1);
            h->n_push = 0;
            h->text_len = 0;
            h->lp_offset += moe_http_logprobs_text_len(&lp);
            h->lp_sent = h->n_lp;
            more = true;
        }
        if (h->done && !h->failed && !h->sent_finish) {
            sse_event(g, moe_http_chunk(&g->ri, i, "", 0, false, moe_http_finish_name(h->reason),
                                        NULL));
            h->sent_finish = more = true;
        }
        if (h->failed && !failed)
            failed = h;
        all_done &= h->done;
        tokens += h->done ? h->completion_tokens : h->next_index;
        pthread_mutex_unlock(&h->mu);
    }
    if (failed) {
        pthread_mutex_lock(&failed->mu);
        sse_event(g, moe_http_error_json(failed->err_status, failed->err_msg, NULL));
        pthread_mutex_unlock(&failed->mu);
        moe_fe_stats_end(failed->srv->stats, g->track, MOE_OUTCOME_FAILED, 0);
        group_cancel(g); /* the other choices are of no use now */
    } else if (all_done) {
        moe_fe_stats_end(g->h[0]->srv->stats, g->track, MOE_OUTCOME_FINISHED, g->h[0]->reason);
        g->ri.completion_tokens = tokens;
        if (g->include_usage)
            sse_event(g, moe_http_usage_chunk(&g->ri));
    } else {
        return more;
    }
    append(&g->out, &g->out_len, &g->out_cap, "data: [DONE]\n\n", 14);
    g->sent_end = true;
    return true;
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    hgroup *g = cls;
    (void)pos;
    for (;;) {
        pthread_mutex_lock(&g->mu);
        if (g->out_off < g->out_len) {
            size_t n = g->out_len - g->out_off < max ? g->out_len - g->out_off : max;
            memcpy(buf, g->out + g->out_off, n);
            g->out_off += n;
            if (g->out_off == g->out_len)
                g->out_off = g->out_len = 0;
            pthread_mutex_unlock(&g->mu);
            return (ssize_t)n;
        }
        if (g->sent_end) {
            pthread_mutex_unlock(&g->mu);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        bool more = sse_build(g);
        pthread_mutex_unlock(&g->mu);
        if (!more && !wait_event(g->h[0])) {
            moe_fe_stats_end(g->h[0]->srv->stats, g->track, MOE_OUTCOME_CANCELLED, 0);
            group_cancel(g);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void sse_free(void *cls) { group_release(cls); }

/* ---------------------------------------------------------------------------------------------
 * Generation requests */

static void random_hex(char *out, size_t cap)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
        v = (uint64_t)moe_now_ns() * 0x9E3779B97F4A7C15ull;
    snprintf(out, cap, "%016" PRIx64, v);
}

/* share_efd: the group's first stream's eventfd (dup'd), or -1 for a new one */
static hstream *stream_new(moe_http_server *s, struct MHD_Connection *conn, int share_efd)
{
    hstream *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->base.ops = &HTTP_STREAM_OPS;
    h->srv = s;
    h->efd = share_efd >= 0 ? fcntl(share_efd, F_DUPFD_CLOEXEC, 0) : eventfd(0, EFD_CLOEXEC);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    h->client_fd = ci ? ci->connect_fd : -1;
    pthread_mutex_init(&h->mu, NULL);
    h->refs = 1; /* the connection's */
    if (h->efd < 0) {
        pthread_mutex_destroy(&h->mu);
        free(h);
        return NULL;
    }
    pthread_mutex_lock(&s->mu);
    h->next = s->streams;
    if (s->streams)
        s->streams->prev = h;
    s->streams = h;
    s->n_streams++;
    pthread_mutex_unlock(&s->mu);
    return h;
}

/* echo: every choice's text starts with the prompt's, before the backend holds any of them:
 * a text prompt as the client sent it, token ids as the tokenizer decodes them (as vLLM). */
static moe_status echo_prompt(moe_http_server *s, const moe_http_gen *g, hgroup *grp)
{
    char *dec = NULL;
    const char *t = g->api.text.s;
    size_t len = g->api.text.len;
    if (!g->api.has_text) {
        const moe_gen_request *q = &grp->h[0]->v.req;
        moe_status st = s->cfg.tokenizer ? moe_tokenizer_decode(s->cfg.tokenizer, q->prompt,
                                                                q->n_prompt, false, NULL, 0, &len)
                                         : moe_error(MOE_ERR_UNSUPPORTED, "echo: no tokenizer");
        if (st != MOE_OK)
            return st;
        if (!(dec = malloc(len + 1)))
            return moe_error(MOE_ERR_NOMEM, "echo: out of memory");
        st = moe_tokenizer_decode(s->cfg.tokenizer, q->prompt, q->n_prompt, false, dec, len + 1,
                                  &len);
        if (st != MOE_OK) {
            free(dec);
            return st;
        }
        t = dec;
    }
    moe_status st = MOE_OK;
    for (int i = 0; i < grp->n && st == MOE_OK; i++)
        if (len && !append(&grp->h[i]->text, &grp->h[i]->text_len, &grp->h[i]->text_cap, t, len))
            st = moe_error(MOE_ERR_NOMEM, "echo: out of memory");
    free(dec);
    return st;
}

static enum MHD_Result handle_generate(moe_http_server *s, struct MHD_Connection *conn, hreq *rq,
                                       const cJSON *body, bool chat)
{
    moe_fe_track *track = moe_fe_track_new(); /* NULL (out of memory): not counted */
    moe_fe_stats_received(s->stats, track, moe_now_ns());
    moe_http_gen g;
    moe_status st = moe_http_parse_gen(body, chat, s->cfg.chat_template, s->cfg.chat_template_error,
                                       &g);
    if (st != MOE_OK || (g.model && strcmp(g.model, s->model) != 0)) {
        moe_fe_stats_end(s->stats, track, MOE_OUTCOME_REJECTED_INVALID, 0);
        moe_fe_track_drop(track);
    }
    if (st != MOE_OK) {
        enum MHD_Result r =
            moe_http_reply_error(conn, moe_http_status_from_moe(st), moe_error_message(), g.param);
        moe_http_gen_free(&g);
        return r;
    }
    if (g.model && strcmp(g.model, s->model) != 0) {
        char m[512];
        snprintf(m, sizeof(m), "The model `%.200s` does not exist (this server serves `%.200s`)",
                 g.model, s->model);
        moe_http_gen_free(&g);
        return moe_http_reply_error(conn, 404, m, "model");
    }
    hgroup *grp = calloc(1, sizeof(*grp));
    if (!grp) {
        moe_fe_stats_end(s->stats, track, MOE_OUTCOME_FAILED, 0);
        moe_fe_track_drop(track);
        moe_http_gen_free(&g);
        return moe_http_reply_error(conn, 500, "out of memory", NULL);
    }
    atomic_init(&grp->refs, 1); /* the request's */
    grp->track = track; /* from here on group_release ends it (cancelled) if nothing else did */
    pthread_mutex_init(&grp->mu, NULL);
    rq->g = grp;
    const char *hdr_id = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
    char hex[24], base_id[64];
    random_hex(hex, sizeof(hex));
    snprintf(base_id, sizeof(base_id), "%s-%s", chat ? "chatcmpl" : "cmpl", hex);
    const bool stream = g.stream;
    char param[64];
    snprintf(param, sizeof(param), "%s", g.param);
    /* n choices: n generations of the prompt (moe_validate_choice: seeds, one group whose
     * prompt the backend prefills once when it holds them together) */
    st = MOE_OK;
    for (int i = 0; i < g.n && st == MOE_OK; i++) {
        hstream *h = stream_new(s, conn, i ? grp->h[0]->efd : -1);
        if (!h) {
            st = moe_error(MOE_ERR_NOMEM, "out of memory");
            break;
        }
        grp->h[grp->n++] = h;
        moe_fe_track_hold(track);
        h->track = track;
        snprintf(h->id, sizeof(h->id), "%.70s", hdr_id ? hdr_id : base_id);
        if (i > 0)
            snprintf(h->id + strlen(h->id), sizeof(h->id) - strlen(h->id), "-%d", i);
        g.api.request_id = (moe_api_str){h->id, strlen(h->id)};
        st = moe_validate_choice(&s->cfg.limits, &g.api, (uint32_t)i, (uint32_t)g.n,
                                 (uint64_t)(uintptr_t)grp, s->be.tokenize, s->be.ctx, &h->v);
        h->v.req.arrival_ns = moe_now_ns();
    }
    grp->include_usage = g.include_usage;
    grp->tok = s->cfg.tokenizer;
    if (st == MOE_OK && g.echo)
        st = echo_prompt(s, &g, grp);
    moe_http_gen_free(&g);
    if (st != MOE_OK) {
        moe_fe_stats_end(s->stats, track, st == MOE_ERR_NOMEM ? MOE_OUTCOME_FAILED
                                                              : MOE_OUTCOME_REJECTED_INVALID, 0);
        /* validation names the field first, in moe_api_names_http's terms: that is the param */
        const char *m = moe_error_message();
        size_t n = strspn(m, "abcdefghijklmnopqrstuvwxyz_");
        if (n > 0 && n < sizeof(param)) {
            snprintf(param, sizeof(param), "%.*s", (int)n, m);
            if (chat && strcmp(param, "prompt") == 0)
                snprintf(param, sizeof(param), "messages");
        }
        return moe_http_reply_error(conn, moe_http_status_from_moe(st), m, param);
    }
    /* per-key limits and priority permission (coordinator/auth.h), for all n choices */
    grp->key = rq->key;
    grp->key_tokens = (uint64_t)grp->n * (grp->h[0]->v.req.n_prompt + grp->h[0]->v.req.max_new_tokens);
    st = moe_auth_acquire(s->cfg.auth, grp->key, grp->key_tokens, grp->h[0]->v.req.priority);
    if (st != MOE_OK) {
        moe_fe_stats_end(s->stats, track, st == MOE_ERR_FULL ? MOE_OUTCOME_REJECTED_BUSY
                                                             : MOE_OUTCOME_REJECTED_INVALID, 0);
        return moe_http_reply_error(conn, st == MOE_ERR_FULL ? 429 : 403, moe_error_message(), NULL);
    }
    grp->key_held = true;
    for (int i = 0; i < grp->n; i++)
        grp->h[i]->v.req.client = (uint32_t)(grp->key + 1);
    grp->ri = (moe_http_resp_info){.id = grp->h[0]->id, .model = s->model,
                                   .created = (long long)time(NULL), .chat = chat,
                                   .prompt_tokens = grp->h[0]->v.req.n_prompt};
    for (int i = 0; i < grp->n; i++) {
        hstream *h = grp->h[i];
        pthread_mutex_lock(&h->mu);
        h->backend_holds = true;
        h->refs++;
        pthread_mutex_unlock(&h->mu);
        uint64_t handle = 0;
        moe_error_clear();
        st = s->be.submit(s->be.ctx, &h->v.req, &h->base, &handle);
        pthread_mutex_lock(&h->mu);
        if (st != MOE_OK) {
            h->backend_holds = false;
            h->refs--;
            pthread_mutex_unlock(&h->mu);
            char em[512];
            snprintf(em, sizeof(em), "%s", moe_error_message()[0] ? moe_error_message()
                                                                  : moe_status_text(st));
            moe_fe_stats_end(s->stats, track, MOE_OUTCOME_REJECTED_BUSY, 0);
            group_cancel(grp); /* the choices admitted before this one */
            return moe_http_reply_error(conn, moe_http_status_from_moe(st), em, NULL);
        }
        h->submitted = true;
        h->handle = handle;
        pthread_mutex_unlock(&h->mu);
        MOE_LOG_D("HTTP %s: admitted, %" PRIu32 " prompt tokens, max %" PRIu32, h->id,
                  h->v.req.n_prompt, h->v.req.max_new_tokens);
    }
    moe_fe_stats_admitted(s->stats, track, grp->h[0]->v.req.n_prompt);

    if (stream) {
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, sse_reader, grp, sse_free);
        if (!r) {
            group_cancel(grp);
            return MHD_NO;
        }
        atomic_fetch_add(&grp->refs, 1); /* the response's */
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ret;
    }
    hstream *failed;
    while (!group_done(grp, &failed)) {
        if (!wait_event(grp->h[0])) {
            moe_fe_stats_end(s->stats, track, MOE_OUTCOME_CANCELLED, 0);
            group_cancel(grp);
            return MHD_NO; /* the client is gone: close */
        }
    }
    char *json = NULL;
    int status = 200;
    if (failed) {
        moe_fe_stats_end(s->stats, track, MOE_OUTCOME_FAILED, 0);
        group_cancel(grp);
        pthread_mutex_lock(&failed->mu);
        status = failed->err_status;
        json = moe_http_error_json(status, failed->err_msg, NULL);
        pthread_mutex_unlock(&failed->mu);
    } else {
        /* every stream is done: the backend writes none of them any more */
        moe_http_choice ch[MOE_HTTP_MAX_N];
        moe_http_logprobs lp[MOE_HTTP_MAX_N];
        moe_fe_stats_end(s->stats, track, MOE_OUTCOME_FINISHED, grp->h[0]->reason);
        grp->ri.completion_tokens = 0;
        for (int i = 0; i < grp->n; i++) {
            hstream *h = grp->h[i];
            lp[i] = (moe_http_logprobs){.tok = s->cfg.tokenizer, .ids = h->lp_ids, .lp = h->lps,
                                        .n = h->n_lp};
            ch[i] = (moe_http_choice){h->text ? h->text : "", h->text_len,
                                      moe_http_finish_name(h->reason),
                                      h->v.req.sampling.logprobs ? &lp[i] : NULL};
            grp->ri.completion_tokens += h->completion_tokens;
        }
        json = moe_http_full_response(&grp->ri, ch, grp->n);
    }
    enum MHD_Result r = json ? moe_http_reply(conn, status, json) : MHD_NO;
    free(json);
    return r;
}

/* ---------------------------------------------------------------------------------------------
 * libmicrohttpd callbacks */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size, void **con_cls)
{
    moe_http_server *s = cls;
    (void)version;
    hreq *rq = *con_cls;
    if (!rq) {
        if (!(rq = calloc(1, sizeof(*rq))))
            return MHD_NO;
        *con_cls = rq;
        enum MHD_Result denied;
        if (!moe_http_authorized(s, conn, url, &rq->key, &denied))
            return denied;
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->cfg.max_body_bytes) {
            char m[160];
            snprintf(m, sizeof(m), "request body: %s bytes, over the limit of %zu bytes", cl,
                     s->cfg.max_body_bytes);
            return moe_http_reply_error(conn, 413, m, NULL);
        }
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        if (!rq->too_big && rq->len + *upload_data_size > s->cfg.max_body_bytes)
            rq->too_big = true;
        if (!rq->too_big && !append(&rq->body, &rq->len, &rq->cap, upload_data, *upload_data_size))
            return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (rq->too_big) {
        char m[160];
        snprintf(m, sizeof(m), "request body: over the limit of %zu bytes", s->cfg.max_body_bytes);
        return moe_http_reply_error(conn, 413, m, NULL);
    }
    const bool get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    if (strcmp(url, "/metrics") == 0)
        return get ? moe_http_handle_metrics(s, conn)
                   : moe_http_reply_error(conn, 405, "use GET for this path", NULL);
    if (strcmp(url, "/health") == 0 || strcmp(url, "/v1/models") == 0) {
        if (!get)
            return moe_http_reply_error(conn, 405, "use GET for this path", NULL);
        if (url[1] == 'h')
            return s->be.healthy(s->be.ctx) ? moe_http_reply(conn, 200, "{}")
                                            : moe_http_reply_error(conn, 503, "not serving yet (loading, "
                                                          "a worker is lost, or draining)", NULL);
        return moe_http_handle_models(s, conn);
    }
    const bool is_gen = strcmp(url, "/v1/completions") == 0 ||
                        strcmp(url, "/v1/chat/completions") == 0;
    const bool is_tok = strcmp(url, "/tokenize") == 0, is_detok = strcmp(url, "/detokenize") == 0;
    if (!is_gen && !is_tok && !is_detok) {
        char m[300];
        snprintf(m, sizeof(m), "no such path: %s %.200s", method, url);
        return moe_http_reply_error(conn, 404, m, NULL);
    }
    if (!post)
        return moe_http_reply_error(conn, 405, "use POST for this path", NULL);
    pthread_mutex_lock(&s->mu);
    bool stopping = s->stopping;
    pthread_mutex_unlock(&s->mu);
    if (stopping)
        return moe_http_reply_error(conn, 503, "the server is shutting down", NULL);
    cJSON *body = NULL;
    bool marks = false;
    char param[64] = "";
    moe_status st = moe_http_parse_json(rq->body ? rq->body : "", rq->len, &body, &marks);
    if (st == MOE_OK && marks)
        st = moe_http_check_nul(body, param, sizeof(param));
    if (st == MOE_OK && !cJSON_IsObject(body))
        st = moe_error(MOE_ERR_INVALID_ARG, "request body: expected a JSON object");
    enum MHD_Result r;
    if (st != MOE_OK && is_gen) /* counted like a gRPC message that does not decode */
        moe_fe_stats_refused(s->stats, MOE_OUTCOME_REJECTED_INVALID);
    if (st != MOE_OK)
        r = moe_http_reply_error(conn, moe_http_status_from_moe(st), moe_error_message(), param);
    else if (is_tok)
        r = moe_http_handle_tokenize(s, conn, body);
    else if (is_detok)
        r = moe_http_handle_detokenize(s, conn, body);
    else
        r = handle_generate(s, conn, rq, body, strcmp(url, "/v1/chat/completions") == 0);
    cJSON_Delete(body);
    return r;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    hreq *rq = *con_cls;
    if (!rq)
        return;
    if (rq->g) {
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
            group_cancel(rq->g);
        group_release(rq->g);
    }
    free(rq->body);
    free(rq);
    *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char m[512];
    vsnprintf(m, sizeof(m), fmt, ap);
    size_t n = strlen(m);
    while (n && m[n - 1] == '\n')
        m[--n] = '\0';
    MOE_LOG_D("libmicrohttpd: %s", m);
}

/* ---------------------------------------------------------------------------------------------
 * Start and stop */

void moe_http_server_config_default(moe_http_server_config *cfg, int32_t vocab_size,
                                    uint32_t context_len)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->max_body_bytes = (size_t)8 << 20;
    cfg->max_connections = 1024;
    cfg->idle_timeout_s = 60;
    moe_validate_limits_default(&cfg->limits, vocab_size, context_len);
}

static bool parse_addr(const char *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || (size_t)(colon - addr) >= sizeof(host))
        return false;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535 || colon[1] == '\0')
        return false;
    memset(ss, 0, sizeof(*ss));
    size_t hl = strlen(host);
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*a6);
        return inet_pton(AF_INET6, host + 1, &a6->sin6_addr) == 1;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    *len = sizeof(*a4);
    if (strcmp(host, "localhost") == 0)
        snprintf(host, sizeof(host), "127.0.0.1");
    return inet_pton(AF_INET, host, &a4->sin_addr) == 1;
}

moe_status moe_http_server_start(const moe_http_server_config *cfg,
                                 const moe_frontend_backend *backend, moe_http_server **out)
{
    *out = NULL;
    if (!cfg->listen_addr || !backend || !backend->submit || !backend->cancel ||
        !backend->tokenize || !backend->healthy || cfg->max_body_bytes == 0)
        return moe_error(MOE_ERR_INVALID_ARG, "HTTP server: incomplete configuration or backend");
    struct sockaddr_storage ss;
    socklen_t sl;
    if (!parse_addr(cfg->listen_addr, &ss, &sl))
        return moe_error(MOE_ERR_INVALID_ARG,
                         "--http-listen %s: expected IPv4:PORT, localhost:PORT or [IPv6]:PORT",
                         cfg->listen_addr);
    moe_http_server *s = calloc(1, sizeof(*s));
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "HTTP server: out of memory");
    s->cfg = *cfg;
    s->be = *backend;
    s->stats = cfg->stats;
    if (!s->stats && moe_fe_stats_create(&s->own_stats) == MOE_OK)
        s->stats = s->own_stats;
    if (!s->stats) {
        free(s);
        return moe_error(MOE_ERR_NOMEM, "HTTP server: out of memory");
    }
    snprintf(s->model, sizeof(s->model), "%s", cfg->model_name ? cfg->model_name : "model");
    s->started = (long long)time(NULL);
    (void)moe_frontend_lat_init(&s->lat); /* without it, no latency log: nothing else changes */
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_ERROR_LOG | MHD_USE_ITC | (ss.ss_family == AF_INET6 ? MHD_USE_IPv6 : 0) |
                     (cfg->tls.cert ? MHD_USE_TLS : 0);
    /* TLS options go first (an empty trust string would ask for client certificates) */
    struct MHD_OptionItem tls[4];
    int nt = 0;
    if (cfg->tls.cert) {
        tls[nt++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, (void *)(uintptr_t)cfg->tls.key};
        tls[nt++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, (void *)(uintptr_t)cfg->tls.cert};
        if (cfg->tls.client_ca)
            tls[nt++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0,
                                                (void *)(uintptr_t)cfg->tls.client_ca};
    }
    tls[nt] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    s->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_CONNECTION_LIMIT, cfg->max_connections,
                            MHD_OPTION_CONNECTION_TIMEOUT, cfg->idle_timeout_s,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024,
                            MHD_OPTION_THREAD_STACK_SIZE, (size_t)512 * 1024,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
                            MHD_OPTION_ARRAY, tls,
                            MHD_OPTION_END);
    if (!s->d) {
        moe_frontend_lat_free(&s->lat);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        moe_fe_stats_free(s->own_stats);
        free(s);
        return moe_error(MOE_ERR_IO, "--http-listen %s: cannot listen there (in use, or no such "
                         "address)", cfg->listen_addr);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : 0;
    MOE_LOG_I("HTTP (OpenAI API) listening on %s (port %d), model %s, %s, %s", cfg->listen_addr,
              s->port, s->model,
              !cfg->tls.cert ? "plain HTTP" : cfg->tls.client_ca ? "HTTPS with client certificates" : "HTTPS",
              cfg->auth ? "API keys required" : "OPEN: no API key needed");
    *out = s;
    return MOE_OK;
}

int moe_http_server_port(const moe_http_server *s) { return s->port; }

void moe_http_server_free(moe_http_server *s, double grace_s)
{
    if (!s)
        return;
    /* Stop taking requests, cancel the running ones and let their threads return. */
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    hstream *list[4096];
    int n = 0;
    for (hstream *h = s->streams; h && n < 4096; h = h->next) {
        pthread_mutex_lock(&h->mu);
        h->refs++; /* keep it while we cancel outside the server lock */
        pthread_mutex_unlock(&h->mu);
        list[n++] = h;
    }
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n; i++) {
        stream_cancel(list[i]);
        wake(list[i]);
        pthread_mutex_lock(&list[i]->mu);
        unlock_release(list[i]);
    }
    MHD_stop_daemon(s->d); /* joins the connection threads: each one's stream lets go */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)grace_s;
    until.tv_nsec += (long)((grace_s - (double)(time_t)grace_s) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->mu);
    while (s->n_streams > 0 && pthread_cond_timedwait(&s->cv, &s->mu, &until) == 0) {
    }
    int left = s->n_streams;
    pthread_mutex_unlock(&s->mu);
    moe_frontend_lat_log(&s->lat, "HTTP");
    if (left > 0) {
        /* the backend still holds these: leak rather than free under it */
        MOE_LOG_W("HTTP server: %d streams still held by the backend at shutdown; leaked", left);
        return;
    }
    moe_frontend_lat_free(&s->lat);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    moe_fe_stats_free(s->own_stats);
    free(s);
}
