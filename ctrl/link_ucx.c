/* The UCX transport of the cluster link (ctrl/link_ucx.h): one UCP context and single-threaded
 * worker per link, control messages as Active Messages copied into the link's own queue, every
 * endpoint in peer-failure mode so that a dead peer becomes one MOE_LINK_LOST event. The join
 * handshake and the directory live in link_ucx_join.c. */
#include "ctrl/link_ucx_internal.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"

static const moe_link_ops ul_ops;

static ul_link *ul_of(const moe_link *l)
{
    return l && l->ops == &ul_ops ? l->ctx : NULL;
}

/* ---- the member directory ---- */

ul_member *ul_member_at(ul_link *L, int id, bool grow)
{
    if (id < 0)
        return NULL;
    if (id >= L->n_m) {
        if (!grow)
            return NULL;
        if (id >= L->cap_m) {
            int cap = L->cap_m ? L->cap_m : 8;
            while (cap <= id)
                cap *= 2;
            ul_member *v = realloc(L->m, (size_t)cap * sizeof *v);
            if (!v)
                return NULL;
            memset(v + L->cap_m, 0, (size_t)(cap - L->cap_m) * sizeof *v);
            L->m = v;
            L->cap_m = cap;
        }
        L->n_m = id + 1;
    }
    return &L->m[id];
}

static ul_member *active(ul_link *L, int id)
{
    ul_member *m = ul_member_at(L, id, false);
    return m && m->state == UL_M_ACTIVE ? m : NULL;
}

/* ---- endpoints ---- */

static void ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)ep;
    ul_peer *p = arg;
    MOE_LOG_D("ucx link: endpoint to member %d failed: %s", p->member, ucs_status_string(status));
    p->failed = true;
    p->L->any_failed = true; /* handled at the next progress: closing inside UCX's callback is
                              * allowed, but sending the loss to others from there is not */
}

ucp_err_handler_t ul_err_handler(ul_peer *p)
{
    return (ucp_err_handler_t){.cb = ep_error, .arg = p};
}

ul_peer *ul_peer_new(ul_link *L, int member)
{
    ul_peer *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->L = L;
    p->member = member;
    p->next = L->peers;
    L->peers = p;
    return p;
}

static void peer_close_mode(ul_peer *p, bool force)
{
    if (p->closed)
        return;
    p->closed = true;
    if (!p->ep)
        return;
    ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                               .flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0};
    void *r = ucp_ep_close_nbx(p->ep, &prm);
    if (UCS_PTR_IS_PTR(r))
        p->close_req = r;
    p->ep = NULL;
}

void ul_peer_close(ul_peer *p)
{
    peer_close_mode(p, true);
}

void ul_peer_close_flush(ul_peer *p)
{
    peer_close_mode(p, false);
}

static void peer_free(ul_peer *p)
{
    free(p->addr);
    free(p->host);
    free(p->hello);
    free(p);
}

/* Frees the peers whose close has completed. */
static void reap(ul_link *L)
{
    for (ul_peer **pp = &L->peers; *pp;) {
        ul_peer *p = *pp;
        if (p->closed && p->close_req && ucp_request_check_status(p->close_req) != UCS_INPROGRESS) {
            ucp_request_free(p->close_req);
            p->close_req = NULL;
        }
        if (p->closed && !p->close_req) {
            *pp = p->next;
            peer_free(p);
        } else {
            pp = &p->next;
        }
    }
}

static ul_peer *peer_of_ep(ul_link *L, ucp_ep_h ep)
{
    if (!ep)
        return NULL;
    for (ul_peer *p = L->peers; p; p = p->next)
        if (p->ep == ep && !p->closed)
            return p;
    return NULL;
}

/* The endpoint to an active member, created from its announced worker address on first use. */
static ul_peer *member_peer(ul_link *L, int id)
{
    ul_member *m = active(L, id);
    if (!m || id == L->self)
        return NULL;
    if (m->peer)
        return m->peer;
    if (L->coordinator || id == MOE_LINK_COORDINATOR || !m->addr)
        return NULL; /* the coordinator reaches ranks only over the endpoints they opened */
    ul_peer *p = ul_peer_new(L, id);
    if (!p)
        return NULL;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .address = (const ucp_address_t *)m->addr,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = ul_err_handler(p),
    };
    ucs_status_t s = ucp_ep_create(L->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        MOE_LOG_W("ucx link: cannot connect to member %d (%s): %s", id, m->host ? m->host : "",
                  ucs_status_string(s));
        p->ep = NULL;
        p->closed = true;
        return NULL;
    }
    m->peer = p;
    return p;
}

/* ---- the receive queue ---- */

static void append(ul_event **head, ul_event **tail, ul_event *e)
{
    e->next = NULL;
    if (*tail)
        (*tail)->next = e;
    else
        *head = e;
    *tail = e;
}

/* A new event at the end of the queue, or (hold) of the held list. */
static ul_event *event_new_in(ul_link *L, moe_link_event_kind kind, int src, int tag, size_t len,
                              bool hold)
{
    ul_event *e = calloc(1, sizeof *e);
    if (!e || !(e->owned = malloc(len ? len : 1))) {
        free(e);
        MOE_LOG_E("ucx link: out of memory for a %zu-byte message from member %d: dropped", len,
                  src);
        return NULL;
    }
    e->ev = (moe_link_event){.kind = kind, .src = src, .tag = tag, .buf = e->owned, .len = len};
    if (hold) {
        e->hold_until_ns = moe_now_ns() + (int64_t)UL_HOLD_MS * 1000000;
        append(&L->held, &L->held_tail, e);
        L->n_held++;
    } else {
        append(&L->head, &L->tail, e);
    }
    return e;
}

static ul_event *event_new(ul_link *L, moe_link_event_kind kind, int src, int tag, size_t len)
{
    return event_new_in(L, kind, src, tag, len, false);
}

static void event_free(ul_event *e)
{
    if (e) {
        free(e->owned);
        free(e);
    }
}

moe_status ul_push_event(ul_link *L, moe_link_event_kind kind, int src, int tag, const void *buf,
                         size_t len)
{
    ul_event *e = event_new(L, kind, src, tag, len);
    if (!e)
        return moe_error(MOE_ERR_NOMEM, "ucx link: out of memory for an event");
    if (len)
        memcpy(e->owned, buf, len);
    e->ready = true;
    return MOE_OK;
}

static void rndv_done(void *request, ucs_status_t status, size_t length, void *user_data)
{
    ul_event *e = user_data;
    if (status != UCS_OK || length != e->ev.len) {
        MOE_LOG_W("ucx link: a %zu-byte message from member %d did not arrive: %s", e->ev.len,
                  e->ev.src, ucs_status_string(status));
        e->drop = true;
    }
    e->ready = true;
    ucp_request_free(request);
}

#define UL_HOLD -2

/* Who sent a control message, -1 to drop it, or UL_HOLD to keep it until its sender is
 * announced. The coordinator knows each rank by the endpoint it accepted; a rank knows the
 * coordinator by its own endpoint and other ranks from the directory the coordinator gave it. */
static int sender_of(ul_link *L, const ul_peer *p, const ul_hdr *h)
{
    if (L->coordinator)
        return p && p->member > 0 && active(L, p->member) && h->src == p->member ? p->member : -1;
    if (p && p == L->coord)
        return h->src == MOE_LINK_COORDINATOR && active(L, 0) ? 0 : -1;
    if (h->src <= MOE_LINK_COORDINATOR || h->src == L->self || (p && p->member != h->src))
        return -1;
    ul_member *m = ul_member_at(L, h->src, false);
    if (!m || m->state == UL_M_NONE)
        return L->n_held < UL_HOLD_MAX ? UL_HOLD : -1;
    return m->state == UL_M_ACTIVE && !CRYPTO_memcmp(h->key, m->key, UL_KEY) ? h->src : -1;
}

void ul_release_held(ul_link *L, int member)
{
    ul_event *keep = NULL, *keep_tail = NULL;
    ul_member *m = ul_member_at(L, member, false);
    for (ul_event *e = L->held, *n; e; e = n) {
        n = e->next;
        if (e->ev.src == member) {
            L->n_held--;
            if (!m || CRYPTO_memcmp(e->key, m->key, UL_KEY)) {
                MOE_LOG_W("ucx link: dropped a message (tag %d) claiming member %d: wrong key",
                          e->ev.tag, member);
                e->drop = true;
            }
            append(&L->head, &L->tail, e);
        } else {
            append(&keep, &keep_tail, e);
        }
    }
    L->held = keep;
    L->held_tail = keep_tail;
}

/* Drops the held messages whose sender was never announced in time (their receive done). */
static void expire_held(ul_link *L)
{
    int64_t now = moe_now_ns();
    ul_event *keep = NULL, *keep_tail = NULL;
    for (ul_event *e = L->held, *n; e; e = n) {
        n = e->next;
        if (e->ready && (e->drop || now > e->hold_until_ns)) {
            if (!e->drop)
                MOE_LOG_W("ucx link: dropped a message (tag %d, %zu bytes) from member %d: the "
                      "coordinator never announced it",
                      e->ev.tag, e->ev.len, e->ev.src);
            L->n_held--;
            event_free(e);
        } else {
            append(&keep, &keep_tail, e);
        }
    }
    L->held = keep;
    L->held_tail = keep_tail;
}

static ucs_status_t am_recv(void *arg, const void *header, size_t header_length, void *data,
                            size_t length, const ucp_am_recv_param_t *param)
{
    ul_link *L = arg;
    ul_hdr h;
    if (header_length != sizeof h)
        return UCS_OK;
    memcpy(&h, header, sizeof h);
    if (h.magic != UL_MAGIC)
        return UCS_OK;
    ucp_ep_h rep = param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP ? param->reply_ep : NULL;
    ul_peer *p = peer_of_ep(L, rep);
    bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
    if (h.kind != UL_MSG) {
        if (!p || rndv)
            MOE_LOG_W("ucx link: dropped a link message (kind %u) from an unknown endpoint",
                      (unsigned)h.kind);
        else
            ul_on_join_msg(L, p, &h, data, length);
        return UCS_OK;
    }
    if (h.dest != L->self) {
        MOE_LOG_D("ucx link: dropped a message (tag %d) to member %d: we are %d now", h.tag,
                  h.dest, L->self);
        return UCS_OK;
    }
    int src = sender_of(L, p, &h);
    if (src == -1) {
        /* Expected after a fence (the peer has not heard yet); anything else is worth a line. */
        ul_member *m = ul_member_at(L, h.src, false);
        if (m && m->state == UL_M_LOST)
            MOE_LOG_D("ucx link: dropped a message (tag %d) from lost member %d", h.tag, h.src);
        else
            MOE_LOG_W("ucx link: dropped a message (tag %d, %zu bytes) claiming member %d: %s",
                      h.tag, length, h.src,
                      m && m->state == UL_M_ACTIVE && !L->coordinator && p != L->coord
                          ? "wrong member key"
                          : "not from that member's endpoint, or not announced");
        return UCS_OK;
    }
    ul_event *e = event_new_in(L, MOE_LINK_MSG, src == UL_HOLD ? h.src : src, h.tag, length,
                               src == UL_HOLD);
    if (!e)
        return UCS_OK;
    memcpy(e->key, h.key, UL_KEY);
    if (!rndv) {
        memcpy(e->owned, data, length);
        e->ready = true;
        return UCS_OK;
    }
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.recv_am = rndv_done,
        .user_data = e,
    };
    void *r = ucp_am_recv_data_nbx(L->worker, data, e->owned, length, &prm);
    if (UCS_PTR_IS_ERR(r)) {
        MOE_LOG_W("ucx link: cannot receive a %zu-byte message from member %d: %s", length, src,
                  ucs_status_string(UCS_PTR_STATUS(r)));
        e->drop = true;
        e->ready = true;
    } else if (!r) {
        e->ready = true;
    }
    return UCS_OK;
}

/* ---- sends ---- */

typedef struct {
    ul_link *L;
    ul_hdr h; /* UCX reads the header until the send completes */
    uint8_t data[];
} ul_send;

static void send_done(void *request, ucs_status_t status, void *user_data)
{
    ul_send *s = user_data;
    s->L->n_sends--;
    if (status != UCS_OK)
        MOE_LOG_D("ucx link: a message (kind %u, tag %d) to member %d failed: %s",
                  (unsigned)s->h.kind, s->h.tag, s->h.dest, ucs_status_string(status));
    free(s);
    ucp_request_free(request);
}

moe_status ul_send_raw(ul_link *L, ul_peer *p, uint32_t kind, int dest, int tag, const void *buf,
                       size_t len)
{
    if (!p || !p->ep || p->closed)
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: member %d is not connected", dest);
    ul_send *s = malloc(sizeof *s + (len ? len : 1));
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "ucx link: out of memory for %zu bytes to member %d", len,
                         dest);
    s->L = L;
    s->h = (ul_hdr){.magic = UL_MAGIC, .kind = kind, .src = L->self, .dest = dest, .tag = tag};
    memcpy(s->h.key, L->key, UL_KEY);
    if (len)
        memcpy(s->data, buf, len);
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                        UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = send_done,
        .user_data = s,
        /* Reply: the receiver learns the endpoint, which is how it knows the sender. The link's
         * own messages are small: eager, so they are handled in one callback. */
        .flags = UCP_AM_SEND_FLAG_REPLY | (kind != UL_MSG ? UCP_AM_SEND_FLAG_EAGER : 0),
    };
    void *r = ucp_am_send_nbx(p->ep, UL_AM_ID, &s->h, sizeof s->h, s->data, len, &prm);
    if (UCS_PTR_IS_ERR(r)) {
        free(s);
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: send of %zu bytes to member %d failed: %s",
                         len, dest, ucs_status_string(UCS_PTR_STATUS(r)));
    }
    if (r)
        L->n_sends++;
    else
        free(s);
    return MOE_OK;
}

static moe_status l_send(void *ctx, int dest, int tag, const void *buf, size_t len)
{
    ul_link *L = ctx;
    if (dest == L->self && L->self >= 0)
        return ul_push_event(L, MOE_LINK_MSG, dest, tag, buf, len);
    ul_member *m = ul_member_at(L, dest, false);
    if (!m || m->state != UL_M_ACTIVE)
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: member %d is %s", dest,
                         m && m->state == UL_M_LOST ? "lost" : "unknown");
    ul_peer *p = member_peer(L, dest);
    if (!p)
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: member %d cannot be reached", dest);
    return ul_send_raw(L, p, UL_MSG, dest, tag, buf, len);
}

/* ---- losses ---- */

void ul_member_lost(ul_link *L, int id, bool fenced)
{
    ul_member *m = active(L, id);
    if (!m || id == L->self)
        return;
    m->state = UL_M_LOST;
    if (m->peer) {
        if (L->coord == m->peer)
            L->coord = NULL;
        ul_peer_close(m->peer);
        m->peer = NULL;
    }
    if (fenced) /* what it sent and we have not handed out is discarded too */
        for (ul_event *e = L->head; e; e = e->next)
            if (e->ev.kind == MOE_LINK_MSG && e->ev.src == id)
                e->drop = true;
    MOE_LOG_I("ucx link: member %d (%s) %s", id, m->host ? m->host : "",
              fenced ? "fenced" : "lost");
    ul_push_event(L, MOE_LINK_LOST, id, 0, NULL, 0);
    if (L->coordinator) {
        int32_t who = id;
        for (int k = 1; k < L->n_m; k++)
            if (L->m[k].state == UL_M_ACTIVE && L->m[k].peer)
                ul_send_raw(L, L->m[k].peer, UL_GONE, k, 0, &who, sizeof who);
    }
}

static void handle_failures(ul_link *L)
{
    L->any_failed = false;
    for (ul_peer *p = L->peers; p; p = p->next) {
        if (!p->failed || p->closed)
            continue;
        ul_member *m = ul_member_at(L, p->member, false);
        if (p == L->coord && L->join_state == 0) {
            L->join_state = -2;
            L->coord = NULL;
            ul_peer_close(p);
        } else if (m && m->peer == p) {
            ul_member_lost(L, p->member, false);
        } else {
            if (L->coordinator && p->member < 0 && p->hs > 0)
                MOE_LOG_W("ucx link: join from %s: connection failed during the handshake",
                          p->from);
            ul_peer_close(p);
        }
    }
}

void ul_progress(void *ctx)
{
    ul_link *L = ctx;
    for (int i = 0; i < 64 && ucp_worker_progress(L->worker); i++)
        ;
    if (L->any_failed)
        handle_failures(L);
    if (L->held)
        expire_held(L);
    ul_join_tick(L);
    reap(L);
}

static bool l_poll(void *ctx, moe_link_event *ev)
{
    ul_link *L = ctx;
    ul_progress(L);
    event_free(L->given);
    L->given = NULL;
    while (L->head && L->head->ready) {
        ul_event *e = L->head;
        L->head = e->next;
        if (!L->head)
            L->tail = NULL;
        if (e->drop) {
            event_free(e);
            continue;
        }
        L->given = e;
        *ev = e->ev;
        return true;
    }
    return false;
}

static void l_flush(void *ctx, int timeout_ms)
{
    ul_link *L = ctx;
    int64_t end = moe_now_ns() + (int64_t)timeout_ms * 1000000;
    while (L->n_sends > 0 && moe_now_ns() < end) {
        ul_progress(L);
        if (L->n_sends > 0)
            moe_sleep_ns(100000);
    }
}

static moe_status l_fence(void *ctx, int member)
{
    ul_link *L = ctx;
    if (member == L->self)
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: member %d cannot fence itself", member);
    ul_member *m = ul_member_at(L, member, false);
    if (!m || m->state == UL_M_NONE)
        return moe_error(MOE_ERR_NOT_FOUND, "ucx link: no member %d to fence", member);
    ul_member_lost(L, member, true); /* a lost member is fenced already: nothing happens */
    return MOE_OK;
}

static int l_self(void *ctx)
{
    return ((ul_link *)ctx)->self;
}

static const char *l_host(void *ctx, int member)
{
    ul_member *m = ul_member_at(ctx, member, false);
    return m && m->host ? m->host : "";
}

void ul_close_all(ul_link *L, bool force)
{
    for (ul_peer *p = L->peers; p; p = p->next)
        peer_close_mode(p, force);
    for (int i = 0; i < L->n_m; i++) {
        free(L->m[i].addr);
        free(L->m[i].host);
    }
    L->n_m = 0;
    if (L->m)
        memset(L->m, 0, (size_t)L->cap_m * sizeof *L->m);
    L->coord = NULL;
    for (ul_event *e = L->head; e; e = e->next)
        e->drop = true;
    for (ul_event *e = L->held; e; e = e->next)
        e->drop = true;
}

void ul_destroy(void *ctx)
{
    ul_link *L = ctx;
    if (!L)
        return;
    if (L->worker) {
        /* Flushing closes: what flush() saw leave UCX's queue still has to leave its socket
         * buffers (a forced close drops it). Then wait, briefly, for the closes and the sends,
         * so that no UCX callback outlives the buffers it writes; a dead peer's close fails at
         * once. */
        ul_close_all(L, false);
        int64_t end = moe_now_ns() + 500 * 1000000LL;
        bool pending = true;
        while (pending && moe_now_ns() < end) {
            ucp_worker_progress(L->worker);
            reap(L);
            pending = L->n_sends > 0 || L->peers;
            for (int q = 0; q < 2; q++)
                for (ul_event *e = q ? L->held : L->head; e && !pending; e = e->next)
                    pending = !e->ready;
        }
        if (pending) {
            int closes = 0;
            for (ul_peer *p = L->peers; p; p = p->next)
                closes++;
            MOE_LOG_W("ucx link: after 500 ms, %d sends and %d endpoint closes still pending at "
                      "shutdown (a peer not progressing?)",
                      L->n_sends, closes);
        }
        /* UCX releases a freed request when it completes (or with the worker). */
        for (ul_peer *p = L->peers, *n; p; p = n) {
            n = p->next;
            if (p->close_req)
                ucp_request_free(p->close_req);
            peer_free(p);
        }
        L->peers = NULL;
    }
    for (int q = 0; q < 2; q++)
        for (ul_event *e = q ? L->held : L->head; e;) {
            ul_event *n = e->next;
            event_free(e);
            e = n;
        }
    event_free(L->given);
    if (L->listener)
        ucp_listener_destroy(L->listener);
    if (L->waddr)
        ucp_worker_release_address(L->worker, (ucp_address_t *)L->waddr);
    if (L->worker)
        ucp_worker_destroy(L->worker);
    if (L->ctx)
        ucp_cleanup(L->ctx);
    free(L->m);
    free(L->token);
    free(L->own_addr);
    free(L->own_host);
    free(L->own_hello);
    free(L);
}

static const moe_link_ops ul_ops = {
    .name = "ucx",
    .send = l_send,
    .poll = l_poll,
    .progress = ul_progress,
    .flush = l_flush,
    .fence = l_fence,
    .self = l_self,
    .host = l_host,
    .destroy = ul_destroy,
};

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

moe_status ul_create(const moe_link_ucx_opts *o, bool coordinator, ul_link **out)
{
    if (!o || !o->addr || !*o->addr)
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: no address given");
    size_t tl = o->token ? strlen(o->token) : 0;
    if (tl < 16)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "ucx link: the cluster token is %zu bytes; at least 16 are needed", tl);
    ul_link *L = calloc(1, sizeof *L);
    if (!L)
        return moe_error(MOE_ERR_NOMEM, "ucx link: out of memory");
    L->coordinator = coordinator;
    L->self = coordinator ? MOE_LINK_COORDINATOR : -1;
    L->next_id = 1;
    L->token = strdup(o->token);
    L->token_len = tl;
    L->opts = *o;
    L->opts.addr = L->own_addr = dup_or_null(o->addr);
    L->opts.host = L->own_host = dup_or_null(o->host && *o->host ? o->host : NULL);
    L->opts.token = NULL;
    L->opts.hello = L->own_hello = o->hello_len ? malloc(o->hello_len) : NULL;
    if (L->own_hello)
        memcpy(L->own_hello, o->hello, o->hello_len);
    if (!L->token || !L->opts.addr || (o->hello_len && !L->opts.hello)) {
        ul_destroy(L);
        return moe_error(MOE_ERR_NOMEM, "ucx link: out of memory");
    }

    /* The listener: a restarted coordinator rebinds its port while the old one's connections
     * still sit in TIME_WAIT (UCX 1.13 says "Device is busy" otherwise); its instances come back
     * to that address. An environment variable, not ucp_config_modify: UCX 1.13 reads the
     * connection manager's settings from the environment only (a modified key is not passed on
     * to it; checked). An explicit setting wins. */
    if (coordinator)
        setenv("UCX_TCP_CM_REUSEADDR", "y", 0);
    ucp_config_t *cfg = NULL;
    ucs_status_t s = ucp_config_read(NULL, NULL, &cfg);
    if (s == UCS_OK && !getenv("UCX_TLS"))
        /* TCP unless the user chose: shared memory would bypass the network (and netem) between
         * namespaces of one machine, and the link is about hosts. */
        s = ucp_config_modify(cfg, "TLS", "tcp");
    ucp_params_t prm = {.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
                        .features = UCP_FEATURE_AM | UCP_FEATURE_TAG,
                        .name = coordinator ? "moe-coordinator" : "moe-rank"};
    if (s == UCS_OK)
        s = ucp_init(&prm, cfg, &L->ctx);
    if (cfg)
        ucp_config_release(cfg);
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SINGLE};
    if (s == UCS_OK)
        s = ucp_worker_create(L->ctx, &wp, &L->worker);
    ucp_address_t *wa = NULL;
    if (s == UCS_OK)
        s = ucp_worker_get_address(L->worker, &wa, &L->waddr_len);
    L->waddr = (uint8_t *)wa;
    ucp_am_handler_param_t ah = {
        .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                      UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
        .id = UL_AM_ID,
        .flags = UCP_AM_FLAG_WHOLE_MSG,
        .cb = am_recv,
        .arg = L,
    };
    if (s == UCS_OK)
        s = ucp_worker_set_am_recv_handler(L->worker, &ah);
    if (s != UCS_OK) {
        ul_destroy(L);
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: cannot start UCX: %s",
                         ucs_status_string(s));
    }
    *out = L;
    return MOE_OK;
}

moe_status ul_wrap(ul_link *L, moe_link **out)
{
    moe_link *l = malloc(sizeof *l);
    if (!l) {
        ul_destroy(L);
        return moe_error(MOE_ERR_NOMEM, "ucx link: out of memory");
    }
    *l = (moe_link){.ops = &ul_ops, .ctx = L};
    *out = l;
    return MOE_OK;
}

int moe_link_ucx_port(const moe_link *l)
{
    ul_link *L = ul_of(l);
    return L ? L->port : -1;
}

void *moe_link_ucx_worker(moe_link *l)
{
    ul_link *L = ul_of(l);
    return L ? L->worker : NULL;
}

void *moe_link_ucx_ep(moe_link *l, int member)
{
    ul_link *L = ul_of(l);
    ul_peer *p = L ? member_peer(L, member) : NULL;
    return p && !p->closed ? p->ep : NULL;
}

moe_status moe_link_ucx_rejoin(moe_link *l)
{
    ul_link *L = ul_of(l);
    if (!L || L->coordinator)
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: rejoin is for a rank's link");
    ul_close_all(L, true);
    L->self = -1;
    return ul_join_run(L);
}
