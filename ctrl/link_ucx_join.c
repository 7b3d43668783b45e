/* The UCX link's membership (ctrl/link_ucx.h): the coordinator's listener, the join handshake on
 * both sides (nonces, HMAC-SHA256 proof of the token), the directory the coordinator hands out
 * and announces, and reading the token. */
#include "ctrl/link_ucx_internal.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/file.h"
#include "common/log.h"

#define UL_HANDSHAKE_MS 10000 /* a joining rank that says nothing for this long is dropped */
#define UL_JOIN_TAG "moeserve-join"

/* ---- a tiny length-prefixed encoding for the link's own messages ---- */

typedef struct {
    uint8_t *b;
    size_t n, cap;
    bool oom;
} wbuf;

static void put(wbuf *w, const void *p, size_t n)
{
    if (w->oom)
        return;
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->n + n)
            cap *= 2;
        uint8_t *b = realloc(w->b, cap);
        if (!b) {
            w->oom = true;
            return;
        }
        w->b = b;
        w->cap = cap;
    }
    if (n)
        memcpy(w->b + w->n, p, n);
    w->n += n;
}

static void put_u32(wbuf *w, uint32_t v)
{
    put(w, &v, sizeof v);
}

static void put_bytes(wbuf *w, const void *p, size_t n)
{
    put_u32(w, (uint32_t)n);
    put(w, p, n);
}

typedef struct {
    const uint8_t *p;
    size_t left;
    bool bad;
} rbuf;

static const uint8_t *get(rbuf *r, size_t n)
{
    if (r->bad || r->left < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}

static uint32_t get_u32(rbuf *r)
{
    uint32_t v = 0;
    const uint8_t *p = get(r, sizeof v);
    if (p)
        memcpy(&v, p, sizeof v);
    return v;
}

static const uint8_t *get_bytes(rbuf *r, size_t *n)
{
    *n = get_u32(r);
    return get(r, *n);
}

static char *dup_str(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        if (n)
            memcpy(s, p, n);
        s[n] = 0;
    }
    return s;
}

static uint8_t *dup_mem(const void *p, size_t n)
{
    uint8_t *d = malloc(n ? n : 1);
    if (d && n)
        memcpy(d, p, n);
    return d;
}

/* A directory entry: member id, worker address, host label. */
static void put_entry(wbuf *w, int id, const ul_member *m)
{
    put_u32(w, (uint32_t)id);
    put(w, m->key, UL_KEY);
    put_bytes(w, m->addr, m->addr_len);
    put_bytes(w, m->host, m->host ? strlen(m->host) : 0);
}

static bool get_entry(ul_link *L, rbuf *r)
{
    int id = (int)get_u32(r);
    const uint8_t *key = get(r, UL_KEY);
    size_t al, hl;
    const uint8_t *a = get_bytes(r, &al);
    const uint8_t *h = get_bytes(r, &hl);
    if (r->bad || id <= 0 || id == L->self)
        return !r->bad;
    ul_member *m = ul_member_at(L, id, true);
    if (!m || m->state != UL_M_NONE)
        return true; /* ids are never reused: a lost member stays lost */
    m->addr = dup_mem(a, al);
    m->addr_len = al;
    m->host = dup_str(h, hl);
    memcpy(m->key, key, UL_KEY);
    m->state = UL_M_ACTIVE;
    ul_release_held(L, id); /* what it sent before we heard of it */
    return true;
}

/* ---- the proof ---- */

static void proof(const ul_link *L, const uint8_t *cn, const uint8_t *sn, uint8_t mac[UL_MAC])
{
    uint8_t msg[sizeof UL_JOIN_TAG - 1 + 2 * UL_NONCE];
    memcpy(msg, UL_JOIN_TAG, sizeof UL_JOIN_TAG - 1);
    memcpy(msg + sizeof UL_JOIN_TAG - 1, cn, UL_NONCE);
    memcpy(msg + sizeof UL_JOIN_TAG - 1 + UL_NONCE, sn, UL_NONCE);
    unsigned int n = UL_MAC;
    HMAC(EVP_sha256(), L->token, (int)L->token_len, msg, sizeof msg, mac, &n);
}

/* ---- coordinator side ---- */

static void refuse(ul_link *L, ul_peer *p, const char *why)
{
    MOE_LOG_W("ucx link: refused a join from %s: %s", p->from, why);
    ul_send_raw(L, p, UL_REFUSE, -1, 0, why, strlen(why));
    ul_peer_close_flush(p); /* the refusal leaves before the connection closes */
}

static void admit(ul_link *L, ul_peer *p)
{
    int id = L->next_id;
    ul_member *m = ul_member_at(L, id, true);
    wbuf w = {0};
    if (!m) {
        refuse(L, p, "coordinator out of memory");
        return;
    }
    L->next_id++;
    *m = (ul_member){.state = UL_M_ACTIVE, .addr = p->addr, .addr_len = p->addr_len,
                     .host = p->host, .peer = p};
    memcpy(m->key, p->key, UL_KEY);
    p->addr = NULL;
    p->host = NULL;
    p->member = id;
    int n = 0;
    for (int k = 1; k < L->n_m; k++)
        n += k != id && L->m[k].state == UL_M_ACTIVE;
    put_u32(&w, (uint32_t)n);
    for (int k = 1; k < L->n_m; k++)
        if (k != id && L->m[k].state == UL_M_ACTIVE)
            put_entry(&w, k, &L->m[k]);
    if (w.oom || ul_send_raw(L, p, UL_WELCOME, id, 0, w.b, w.n) != MOE_OK) {
        free(w.b);
        MOE_LOG_W("ucx link: could not welcome member %d (%s): %s", id, m->host,
                  w.oom ? "out of memory" : moe_error_message());
        ul_member_lost(L, id, true);
        return;
    }
    w.n = 0;
    put_entry(&w, id, m);
    for (int k = 1; k < L->n_m && !w.oom; k++)
        if (k != id && L->m[k].state == UL_M_ACTIVE && L->m[k].peer)
            ul_send_raw(L, L->m[k].peer, UL_ANNOUNCE, k, 0, w.b, w.n);
    free(w.b);
    MOE_LOG_I("ucx link: member %d joined from %s (%s)", id, p->from, m->host);
    ul_push_event(L, MOE_LINK_JOINED, id, 0, p->hello, p->hello_len);
    free(p->hello);
    p->hello = NULL;
}

static void coordinator_msg(ul_link *L, ul_peer *p, const ul_hdr *h, const uint8_t *buf,
                            size_t len)
{
    if (p->member >= 0 || p->closed)
        return; /* a member repeating the handshake: nothing to do */
    rbuf r = {buf, len, false};
    if (h->kind == UL_JOIN && p->hs == 0) {
        const uint8_t *cn = get(&r, UL_NONCE);
        const uint8_t *key = get(&r, UL_KEY);
        size_t al, hl, hel;
        const uint8_t *a = get_bytes(&r, &al);
        const uint8_t *host = get_bytes(&r, &hl);
        const uint8_t *hello = get_bytes(&r, &hel);
        if (r.bad || al == 0) {
            refuse(L, p, "malformed join");
            return;
        }
        memcpy(p->cnonce, cn, UL_NONCE);
        memcpy(p->key, key, UL_KEY);
        p->addr = dup_mem(a, al);
        p->addr_len = al;
        p->host = hl ? dup_str(host, hl) : strdup(p->from);
        p->hello = dup_mem(hello, hel);
        p->hello_len = hel;
        if (!p->addr || !p->host || !p->hello || RAND_bytes(p->snonce, UL_NONCE) != 1) {
            refuse(L, p, "coordinator out of memory");
            return;
        }
        p->hs = 1;
        ul_send_raw(L, p, UL_CHALLENGE, -1, 0, p->snonce, UL_NONCE);
    } else if (h->kind == UL_PROOF && p->hs == 1) {
        uint8_t want[UL_MAC];
        proof(L, p->cnonce, p->snonce, want);
        if (len != UL_MAC || CRYPTO_memcmp(want, buf, UL_MAC) != 0)
            refuse(L, p, "wrong cluster token");
        else
            admit(L, p);
    } else {
        refuse(L, p, "unexpected message in the join handshake");
    }
}

static void conn_request(ucp_conn_request_h req, void *arg)
{
    ul_link *L = arg;
    char from[64] = "?";
    ucp_conn_request_attr_t ca = {.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR};
    if (ucp_conn_request_query(req, &ca) == UCS_OK) {
        const struct sockaddr *sa = (const struct sockaddr *)&ca.client_address;
        char ip[INET6_ADDRSTRLEN] = "";
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof ip);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof ip);
        snprintf(from, sizeof from, "%s", ip);
    }
    ul_peer *p = ul_peer_new(L, -1);
    if (!p) {
        ucp_listener_reject(L->listener, req);
        return;
    }
    snprintf(p->from, sizeof p->from, "%s", from);
    p->hs_deadline_ns = moe_now_ns() + (int64_t)UL_HANDSHAKE_MS * 1000000;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .conn_request = req,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = ul_err_handler(p),
    };
    ucs_status_t s = ucp_ep_create(L->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        MOE_LOG_W("ucx link: cannot accept a connection from %s: %s", from, ucs_status_string(s));
        p->ep = NULL;
        p->closed = true;
    }
}

void ul_join_tick(ul_link *L)
{
    if (!L->coordinator)
        return;
    int64_t now = moe_now_ns();
    for (ul_peer *p = L->peers; p; p = p->next)
        if (p->member < 0 && !p->closed && now > p->hs_deadline_ns) {
            MOE_LOG_W("ucx link: join from %s: no handshake within %d ms, closed", p->from,
                      UL_HANDSHAKE_MS);
            ul_peer_close(p);
        }
}

/* ---- rank side ---- */

static void rank_msg(ul_link *L, ul_peer *p, const ul_hdr *h, const uint8_t *buf, size_t len)
{
    if (p != L->coord)
        return; /* only the coordinator speaks the link's own messages */
    rbuf r = {buf, len, false};
    switch (h->kind) {
    case UL_CHALLENGE: {
        if (len != UL_NONCE || L->join_state != 0)
            return;
        uint8_t mac[UL_MAC];
        proof(L, L->cnonce, buf, mac);
        ul_send_raw(L, p, UL_PROOF, 0, 0, mac, sizeof mac);
        return;
    }
    case UL_WELCOME: {
        if (L->join_state != 0 || h->dest <= 0)
            return;
        L->self = h->dest;
        uint32_t n = get_u32(&r);
        for (uint32_t i = 0; i < n && get_entry(L, &r); i++)
            ;
        ul_member *c = ul_member_at(L, MOE_LINK_COORDINATOR, true);
        ul_member *me = ul_member_at(L, L->self, true);
        if (r.bad || !c || !me) {
            MOE_LOG_W("ucx link: malformed welcome from the coordinator");
            L->join_state = -2;
            return;
        }
        c = &L->m[MOE_LINK_COORDINATOR]; /* the second call may have moved the array */
        free(c->host);
        *c = (ul_member){.state = UL_M_ACTIVE, .host = strdup(L->opts.addr), .peer = p};
        me = &L->m[L->self];
        free(me->host);
        *me = (ul_member){.state = UL_M_ACTIVE,
                          .host = L->opts.host ? strdup(L->opts.host) : NULL};
        L->join_state = 1;
        return;
    }
    case UL_REFUSE:
        snprintf(L->join_reason, sizeof L->join_reason, "%.*s", (int)len, (const char *)buf);
        L->join_state = -1;
        return;
    case UL_ANNOUNCE:
        if (!get_entry(L, &r))
            MOE_LOG_W("ucx link: malformed member announcement from the coordinator");
        return;
    case UL_GONE: {
        int32_t who = (int32_t)get_u32(&r);
        if (!r.bad)
            ul_member_lost(L, who, false);
        return;
    }
    default:
        return;
    }
}

void ul_on_join_msg(ul_link *L, ul_peer *p, const ul_hdr *h, const uint8_t *buf, size_t len)
{
    if (L->coordinator)
        coordinator_msg(L, p, h, buf, len);
    else
        rank_msg(L, p, h, buf, len);
}

/* "HOST:PORT" or "[V6]:PORT" into a socket address (passive: for listening; "" or "*" host is
 * any). */
moe_status ul_parse_sockaddr(const char *addr, bool passive, struct sockaddr_storage *ss,
                             socklen_t *len)
{
    const char *colon = strrchr(addr, ':');
    if (!colon || !colon[1])
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: address '%s' is not HOST:PORT", addr);
    char host[256];
    size_t hl = (size_t)(colon - addr);
    if (hl >= sizeof host)
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: host in '%s' is too long", addr);
    memcpy(host, addr, hl);
    host[hl] = 0;
    char *h = host;
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h[hl - 1] = 0;
        h++;
    }
    char *end = NULL;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535)
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: port in '%s' is not 0..65535", addr);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = passive ? AI_PASSIVE : 0};
    struct addrinfo *ai = NULL;
    int rc = getaddrinfo(*h && strcmp(h, "*") ? h : NULL, colon + 1, &hints, &ai);
    if (rc != 0 || !ai)
        return moe_error(MOE_ERR_INVALID_ARG, "ucx link: cannot resolve '%s': %s", addr,
                         gai_strerror(rc));
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    *len = ai->ai_addrlen;
    freeaddrinfo(ai);
    return MOE_OK;
}

moe_status ul_listen_start(ul_link *L, const char *addr)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    moe_status st = ul_parse_sockaddr(addr, true, &ss, &sl);
    if (st != MOE_OK)
        return st;
    ucp_listener_params_t lp = {
        .field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
        .sockaddr = {.addr = (const struct sockaddr *)&ss, .addrlen = sl},
        .conn_handler = {.cb = conn_request, .arg = L},
    };
    ucs_status_t s = ucp_listener_create(L->worker, &lp, &L->listener);
    if (s != UCS_OK) {
        L->listener = NULL;
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: cannot listen on %s: %s", addr,
                         ucs_status_string(s));
    }
    ucp_listener_attr_t la = {.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR};
    if (ucp_listener_query(L->listener, &la) == UCS_OK) {
        const struct sockaddr *sa = (const struct sockaddr *)&la.sockaddr;
        L->port = ntohs(sa->sa_family == AF_INET6
                            ? ((const struct sockaddr_in6 *)sa)->sin6_port
                            : ((const struct sockaddr_in *)sa)->sin_port);
    }
    MOE_LOG_I("ucx link: coordinator listening on %s (port %d)", addr, L->port);
    return MOE_OK;
}

moe_status ul_join_run(ul_link *L)
{
    const char *addr = L->opts.addr;
    struct sockaddr_storage ss;
    socklen_t sl;
    moe_status st = ul_parse_sockaddr(addr, false, &ss, &sl);
    if (st != MOE_OK)
        return st;
    ul_peer *p = ul_peer_new(L, MOE_LINK_COORDINATOR);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "ucx link: out of memory");
    L->coord = p;
    L->join_state = 0;
    L->join_reason[0] = 0;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
        .sockaddr = {.addr = (const struct sockaddr *)&ss, .addrlen = sl},
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = ul_err_handler(p),
    };
    ucs_status_t s = ucp_ep_create(L->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        p->ep = NULL;
        p->closed = true;
        L->coord = NULL;
        return moe_error(MOE_ERR_UNAVAILABLE, "ucx link: cannot connect to the coordinator at %s: %s",
                         addr, ucs_status_string(s));
    }
    wbuf w = {0};
    if (RAND_bytes(L->cnonce, UL_NONCE) != 1 || RAND_bytes(L->key, UL_KEY) != 1)
        w.oom = true;
    put(&w, L->cnonce, UL_NONCE);
    put(&w, L->key, UL_KEY);
    put_bytes(&w, L->waddr, L->waddr_len);
    put_bytes(&w, L->opts.host, L->opts.host ? strlen(L->opts.host) : 0);
    put_bytes(&w, L->opts.hello, L->opts.hello_len);
    st = w.oom ? moe_error(MOE_ERR_NOMEM, "ucx link: out of memory")
               : ul_send_raw(L, p, UL_JOIN, MOE_LINK_COORDINATOR, 0, w.b, w.n);
    free(w.b);
    int timeout = L->opts.timeout_ms > 0 ? L->opts.timeout_ms : 10000;
    int64_t end = moe_now_ns() + (int64_t)timeout * 1000000;
    while (st == MOE_OK && L->join_state == 0 && moe_now_ns() < end) {
        if (!ucp_worker_progress(L->worker))
            moe_sleep_ns(100000);
        ul_progress(L);
    }
    if (st == MOE_OK && L->join_state == 1) {
        MOE_LOG_I("ucx link: joined the coordinator at %s as member %d", addr, L->self);
        return MOE_OK;
    }
    if (st == MOE_OK) {
        if (L->join_state == -1)
            st = moe_error(MOE_ERR_PERMISSION, "ucx link: the coordinator at %s refused the join: %s",
                           addr, L->join_reason);
        else if (L->join_state == -2)
            st = moe_error(MOE_ERR_UNAVAILABLE, "ucx link: connection to the coordinator at %s failed",
                           addr);
        else
            st = moe_error(MOE_ERR_UNAVAILABLE,
                           "ucx link: no answer from the coordinator at %s within %d ms", addr,
                           timeout);
    }
    if (L->coord)
        ul_peer_close(L->coord);
    L->coord = NULL;
    L->self = -1;
    return st;
}

/* ---- public entry points ---- */

moe_status moe_link_ucx_listen(const moe_link_ucx_opts *o, moe_link **out)
{
    ul_link *L = NULL;
    moe_status st = ul_create(o, true, &L);
    if (st != MOE_OK)
        return st;
    ul_member *me = ul_member_at(L, MOE_LINK_COORDINATOR, true);
    if (me)
        *me = (ul_member){.state = UL_M_ACTIVE,
                          .host = strdup(L->opts.host ? L->opts.host : L->opts.addr)};
    if (!me || (st = ul_listen_start(L, o->addr)) != MOE_OK) {
        ul_destroy(L);
        return me ? st : moe_error(MOE_ERR_NOMEM, "ucx link: out of memory");
    }
    return ul_wrap(L, out);
}

moe_status moe_link_ucx_join(const moe_link_ucx_opts *o, moe_link **out)
{
    ul_link *L = NULL;
    moe_status st = ul_create(o, false, &L);
    if (st != MOE_OK)
        return st;
    if ((st = ul_join_run(L)) != MOE_OK) {
        ul_destroy(L);
        return st;
    }
    return ul_wrap(L, out);
}

moe_status moe_link_read_token(const char *path, char **out)
{
    char *t = NULL;
    size_t n = 0;
    const char *where;
    if (path && *path) {
        moe_status st = moe_read_file(path, 1 << 16, &t, &n);
        if (st != MOE_OK)
            return moe_error_context(MOE_ERR_INVALID_ARG, "cluster token file: ");
        where = path;
    } else {
        const char *e = getenv("MOESERVE_CLUSTER_TOKEN");
        if (!e)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "no cluster token: no token file given and MOESERVE_CLUSTER_TOKEN "
                             "is not set");
        t = strdup(e);
        if (!t)
            return moe_error(MOE_ERR_NOMEM, "cluster token: out of memory");
        n = strlen(t);
        where = "MOESERVE_CLUSTER_TOKEN";
    }
    while (n > 0 && isspace((unsigned char)t[n - 1]))
        t[--n] = 0;
    if (n < 16 || strlen(t) != n) {
        free(t);
        return moe_error(MOE_ERR_INVALID_ARG,
                         "cluster token from %s is %zu bytes (or holds a NUL); at least 16 are "
                         "needed",
                         where, n);
    }
    *out = t;
    return MOE_OK;
}
