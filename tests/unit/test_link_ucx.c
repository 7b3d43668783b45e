/* The UCX cluster link (ctrl/link_ucx.h) and the UCX comm (worker/comm_ucx.h), over real UCX TCP
 * connections on 127.0.0.1: one coordinator and two or three ranks in one process, each link
 * owned by its own thread (links are single-threaded; Criterion forbids fork). The killed-process
 * case is tests/unit/link_ucx_kill.c (a plain program: it forks). */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "ctrl/link_ucx.h"
#include "ctrl/link_ucx_internal.h" /* the wire header, to forge messages */
#include "worker/comm_ucx.h"

#define TOKEN "0123456789abcdef-test-token"
#define MAX_EV 4096

/* ---- an actor per link: a thread that polls it, logs its events and runs commands ---- */

typedef struct {
    moe_link_event_kind kind;
    int src, tag;
    uint8_t *buf;
    size_t len;
} rec;

typedef struct node node;
typedef void (*cmd_fn)(node *n, void *arg);

struct node {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    moe_link *link;
    moe_comm comm;
    bool has_comm;
    cmd_fn fn;
    void *arg;
    bool stop;
    rec ev[MAX_EV];
    int n_ev;
};

static void *node_main(void *p)
{
    node *n = p;
    pthread_mutex_lock(&n->mu);
    while (!n->stop) {
        if (n->fn) {
            cmd_fn f = n->fn;
            pthread_mutex_unlock(&n->mu);
            f(n, n->arg);
            pthread_mutex_lock(&n->mu);
            n->fn = NULL;
            pthread_cond_broadcast(&n->cv);
            continue;
        }
        pthread_mutex_unlock(&n->mu);
        moe_link_event e;
        int got = 0;
        while (n->link && got < 64 && moe_link_poll(n->link, &e)) {
            got++;
            pthread_mutex_lock(&n->mu);
            if (n->n_ev < MAX_EV) {
                rec *r = &n->ev[n->n_ev];
                *r = (rec){e.kind, e.src, e.tag, malloc(e.len ? e.len : 1), e.len};
                memcpy(r->buf, e.buf, e.len);
                n->n_ev++;
            }
            pthread_mutex_unlock(&n->mu);
        }
        if (!got)
            moe_sleep_ns(200000);
        pthread_mutex_lock(&n->mu);
    }
    pthread_mutex_unlock(&n->mu);
    return NULL;
}

static void node_start(node *n)
{
    memset(n, 0, sizeof *n);
    pthread_mutex_init(&n->mu, NULL);
    pthread_cond_init(&n->cv, NULL);
    pthread_create(&n->th, NULL, node_main, n);
}

/* Runs f(n, arg) on n's thread and waits for it. */
static void run_on(node *n, cmd_fn f, void *arg)
{
    pthread_mutex_lock(&n->mu);
    n->fn = f;
    n->arg = arg;
    pthread_cond_broadcast(&n->cv);
    while (n->fn)
        pthread_cond_wait(&n->cv, &n->mu);
    pthread_mutex_unlock(&n->mu);
}

static void cmd_free(node *n, void *arg)
{
    (void)arg;
    if (n->has_comm)
        n->comm.ops->destroy(n->comm.ctx);
    n->has_comm = false;
    moe_link_free(n->link);
    n->link = NULL;
}

static void node_stop(node *n)
{
    run_on(n, cmd_free, NULL);
    pthread_mutex_lock(&n->mu);
    n->stop = true;
    pthread_mutex_unlock(&n->mu);
    pthread_join(n->th, NULL);
    for (int i = 0; i < n->n_ev; i++)
        free(n->ev[i].buf);
}

/* Index of the first event at or after *from matching kind/src (src -1: any), waiting up to ms;
 * -1 if none came. */
static int wait_ev(node *n, int *from, moe_link_event_kind kind, int src, int ms)
{
    int64_t end = moe_now_ns() + (int64_t)ms * 1000000;
    for (;;) {
        pthread_mutex_lock(&n->mu);
        for (int i = *from; i < n->n_ev; i++)
            if (n->ev[i].kind == kind && (src < 0 || n->ev[i].src == src)) {
                pthread_mutex_unlock(&n->mu);
                *from = i + 1;
                return i;
            }
        pthread_mutex_unlock(&n->mu);
        if (moe_now_ns() > end)
            return -1;
        moe_sleep_ns(1000000);
    }
}

static int count_ev(node *n, moe_link_event_kind kind, int src)
{
    int c = 0;
    pthread_mutex_lock(&n->mu);
    for (int i = 0; i < n->n_ev; i++)
        c += n->ev[i].kind == kind && (src < 0 || n->ev[i].src == src);
    pthread_mutex_unlock(&n->mu);
    return c;
}

/* ---- commands ---- */

typedef struct {
    moe_link_ucx_opts o;
    moe_status st;
    char msg[256];
} open_args;

static void cmd_listen(node *n, void *arg)
{
    open_args *a = arg;
    a->st = moe_link_ucx_listen(&a->o, &n->link);
    snprintf(a->msg, sizeof a->msg, "%s", moe_error_message());
}

static void cmd_join(node *n, void *arg)
{
    open_args *a = arg;
    moe_link *l = NULL;
    a->st = moe_link_ucx_join(&a->o, &l);
    snprintf(a->msg, sizeof a->msg, "%s", moe_error_message());
    pthread_mutex_lock(&n->mu);
    n->link = l;
    pthread_mutex_unlock(&n->mu);
}

typedef struct {
    int dest, tag;
    const void *buf;
    size_t len;
    moe_status st;
    char msg[256];
} send_args;

static void cmd_send(node *n, void *arg)
{
    send_args *a = arg;
    a->st = n->link->ops->send(n->link->ctx, a->dest, a->tag, a->buf, a->len);
    snprintf(a->msg, sizeof a->msg, "%s", moe_error_message());
}

static void cmd_fence(node *n, void *arg)
{
    send_args *a = arg;
    a->st = moe_link_fence(n->link, a->dest);
}

static void cmd_self(node *n, void *arg)
{
    *(int *)arg = moe_link_self(n->link);
}

/* A cluster: the coordinator on c, ranks on r[0..k). */
typedef struct {
    node c, r[3];
    int k, port, id[3];
    char addr[64];
} cluster;

static void cluster_up(cluster *cl, int k)
{
    memset(cl, 0, sizeof *cl);
    cl->k = k;
    node_start(&cl->c);
    open_args la = {.o = {.addr = "127.0.0.1:0", .token = TOKEN, .host = "coord"}};
    run_on(&cl->c, cmd_listen, &la);
    cr_assert_eq(la.st, MOE_OK, "listen: %s", la.msg);
    cl->port = moe_link_ucx_port(cl->c.link);
    cr_assert_gt(cl->port, 0);
    snprintf(cl->addr, sizeof cl->addr, "127.0.0.1:%d", cl->port);
    int from = 0;
    for (int i = 0; i < k; i++) {
        char hello[32], host[16];
        snprintf(hello, sizeof hello, "instance-%d", i);
        snprintf(host, sizeof host, "host%d", i);
        node_start(&cl->r[i]);
        open_args ja = {.o = {.addr = cl->addr, .token = TOKEN, .hello = hello,
                              .hello_len = strlen(hello), .timeout_ms = 10000, .host = host}};
        run_on(&cl->r[i], cmd_join, &ja);
        cr_assert_eq(ja.st, MOE_OK, "join %d: %s", i, ja.msg);
        run_on(&cl->r[i], cmd_self, &cl->id[i]);
        cr_assert_gt(cl->id[i], 0);
        int j = wait_ev(&cl->c, &from, MOE_LINK_JOINED, cl->id[i], 5000);
        cr_assert_geq(j, 0, "no JOINED for member %d", cl->id[i]);
        cr_assert_eq(cl->c.ev[j].len, strlen(hello));
        cr_assert_eq(memcmp(cl->c.ev[j].buf, hello, strlen(hello)), 0, "JOINED carries the hello");
        cr_assert_str_eq(moe_link_host(cl->c.link, cl->id[i]), host);
    }
    /* ids are distinct */
    for (int i = 0; i < k; i++)
        for (int j = i + 1; j < k; j++)
            cr_assert_neq(cl->id[i], cl->id[j]);
}

static void cluster_down(cluster *cl)
{
    for (int i = 0; i < cl->k; i++)
        node_stop(&cl->r[i]);
    node_stop(&cl->c);
}

static moe_status send_on(node *n, int dest, int tag, const void *buf, size_t len)
{
    send_args a = {.dest = dest, .tag = tag, .buf = buf, .len = len};
    run_on(n, cmd_send, &a);
    return a.st;
}

/* Sends may race the announcement of the destination (it comes from the coordinator): retry a
 * little while the sender does not know it yet. */
static moe_status send_when_known(node *n, int dest, int tag, const void *buf, size_t len)
{
    moe_status st;
    int64_t end = moe_now_ns() + 3000000000LL;
    while ((st = send_on(n, dest, tag, buf, len)) == MOE_ERR_UNAVAILABLE && moe_now_ns() < end)
        moe_sleep_ns(2000000);
    return st;
}

/* ---- tests ---- */

Test(link_ucx, join_with_token_then_messages_both_ways, .timeout = 60)
{
    cluster cl;
    cluster_up(&cl, 3);
    /* coordinator -> rank, rank -> coordinator, rank -> rank, each a numbered series with large
     * messages (8 MiB, rendezvous) among small ones: intact and in order per sender. */
    enum { N = 12, BIG = 8 << 20 };
    uint8_t *big = malloc(BIG);
    for (int i = 0; i < BIG; i++)
        big[i] = (uint8_t)(i * 131 + 7);
    node *senders[3] = {&cl.c, &cl.r[0], &cl.r[1]};
    int dests[3] = {cl.id[2], 0, cl.id[2]};
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < N; i++) {
            size_t len = i % 4 == 1 ? BIG : (size_t)(i + 1) * 100;
            big[0] = (uint8_t)i;
            cr_assert_eq(send_when_known(senders[s], dests[s], 100 + i, big, len), MOE_OK,
                         "send %d from sender %d", i, s);
        }
    int src_of[3] = {0, cl.id[0], cl.id[1]};
    node *recv_of[3] = {&cl.r[2], &cl.c, &cl.r[2]};
    for (int s = 0; s < 3; s++) {
        int from = 0;
        for (int i = 0; i < N; i++) {
            int j = wait_ev(recv_of[s], &from, MOE_LINK_MSG, src_of[s], 10000);
            cr_assert_geq(j, 0, "message %d from member %d missing", i, src_of[s]);
            rec *r = &recv_of[s]->ev[j];
            size_t len = i % 4 == 1 ? BIG : (size_t)(i + 1) * 100;
            cr_assert_eq(r->tag, 100 + i, "order: got tag %d, want %d", r->tag, 100 + i);
            cr_assert_eq(r->len, len);
            cr_assert_eq(r->buf[0], (uint8_t)i);
            cr_assert_eq(memcmp(r->buf + 1, big + 1, len - 1), 0, "payload intact");
        }
    }
    free(big);
    /* a send to a member nobody announced fails naming it */
    cr_assert_eq(send_on(&cl.r[0], 999, 1, "x", 1), MOE_ERR_UNAVAILABLE);
    cluster_down(&cl);
}

Test(link_ucx, wrong_token_is_refused, .timeout = 30)
{
    cluster cl;
    cluster_up(&cl, 1);
    node bad;
    node_start(&bad);
    open_args ja = {.o = {.addr = cl.addr, .token = "this-is-not-the-token", .hello = "evil",
                          .hello_len = 4, .timeout_ms = 5000}};
    run_on(&bad, cmd_join, &ja);
    cr_assert_eq(ja.st, MOE_ERR_PERMISSION, "got %s: %s", moe_status_name(ja.st), ja.msg);
    cr_assert_null(bad.link);
    moe_sleep_ns(200000000);
    cr_assert_eq(count_ev(&cl.c, MOE_LINK_JOINED, -1), 1, "only the good rank joined");
    /* a short token is refused locally */
    open_args sa = {.o = {.addr = cl.addr, .token = "short", .timeout_ms = 1000}};
    run_on(&bad, cmd_join, &sa);
    cr_assert_eq(sa.st, MOE_ERR_INVALID_ARG);
    /* nothing listening: UNAVAILABLE in time */
    open_args na = {.o = {.addr = "127.0.0.1:1", .token = TOKEN, .timeout_ms = 1000}};
    run_on(&bad, cmd_join, &na);
    cr_assert_eq(na.st, MOE_ERR_UNAVAILABLE, "got %s: %s", moe_status_name(na.st), na.msg);
    node_stop(&bad);
    cluster_down(&cl);
}

Test(link_ucx, fence_gives_lost_on_both_sides, .timeout = 30)
{
    cluster cl;
    cluster_up(&cl, 2);
    int a = cl.id[0], b = cl.id[1];
    cr_assert_eq(send_when_known(&cl.r[1], a, 5, "hi", 2), MOE_OK);
    int from = 0;
    cr_assert_geq(wait_ev(&cl.r[0], &from, MOE_LINK_MSG, b, 5000), 0);
    send_args f = {.dest = a};
    run_on(&cl.c, cmd_fence, &f);
    cr_assert_eq(f.st, MOE_OK);
    int fc = 0, fa = 0, fb = 0;
    cr_assert_geq(wait_ev(&cl.c, &fc, MOE_LINK_LOST, a, 2000), 0, "LOST at the coordinator");
    cr_assert_geq(wait_ev(&cl.r[1], &fb, MOE_LINK_LOST, a, 2000), 0, "LOST at the peer rank");
    cr_assert_geq(wait_ev(&cl.r[0], &fa, MOE_LINK_LOST, 0, 2000), 0,
                  "the fenced rank loses the coordinator");
    cr_assert_eq(send_on(&cl.c, a, 1, "x", 1), MOE_ERR_UNAVAILABLE);
    cr_assert_eq(send_on(&cl.r[1], a, 1, "x", 1), MOE_ERR_UNAVAILABLE);
    /* fencing again raises nothing new */
    run_on(&cl.c, cmd_fence, &f);
    moe_sleep_ns(200000000);
    cr_assert_eq(count_ev(&cl.c, MOE_LINK_LOST, a), 1);
    cr_assert_eq(count_ev(&cl.r[1], MOE_LINK_LOST, a), 1);
    /* the rest of the cluster still works */
    cr_assert_eq(send_on(&cl.r[1], 0, 9, "ok", 2), MOE_OK);
    from = 0;
    cr_assert_geq(wait_ev(&cl.c, &from, MOE_LINK_MSG, b, 5000), 0);
    cluster_down(&cl);
}

static void cmd_rejoin(node *n, void *arg)
{
    open_args *a = arg;
    a->st = moe_link_ucx_rejoin(n->link);
    snprintf(a->msg, sizeof a->msg, "%s", moe_error_message());
}

Test(link_ucx, fenced_rank_rejoins_under_a_new_id, .timeout = 30)
{
    cluster cl;
    cluster_up(&cl, 2);
    int a = cl.id[0];
    send_args f = {.dest = a};
    run_on(&cl.c, cmd_fence, &f);
    int fa = 0;
    cr_assert_geq(wait_ev(&cl.r[0], &fa, MOE_LINK_LOST, 0, 2000), 0);
    open_args ra = {0};
    run_on(&cl.r[0], cmd_rejoin, &ra);
    cr_assert_eq(ra.st, MOE_OK, "rejoin: %s", ra.msg);
    int na;
    run_on(&cl.r[0], cmd_self, &na);
    cr_assert_gt(na, cl.id[1], "a new id, never reused");
    int fc = 0;
    int j = wait_ev(&cl.c, &fc, MOE_LINK_JOINED, na, 5000);
    cr_assert_geq(j, 0);
    cr_assert_eq(memcmp(cl.c.ev[j].buf, "instance-0", 10), 0, "same hello");
    /* the old id stays dead; the new one is reachable from the other rank */
    cr_assert_eq(send_on(&cl.r[1], a, 1, "x", 1), MOE_ERR_UNAVAILABLE);
    cr_assert_eq(send_when_known(&cl.r[1], na, 3, "new", 3), MOE_OK);
    int from = 0;
    cr_assert_geq(wait_ev(&cl.r[0], &from, MOE_LINK_MSG, cl.id[1], 5000), 0);
    cluster_down(&cl);
}

Test(link_ucx, destroyed_rank_is_lost_within_a_second, .timeout = 30)
{
    cluster cl;
    cluster_up(&cl, 2);
    int a = cl.id[0], b = cl.id[1];
    /* b has an endpoint to a (it sent to it) */
    cr_assert_eq(send_when_known(&cl.r[1], a, 5, "hi", 2), MOE_OK);
    int from = 0;
    cr_assert_geq(wait_ev(&cl.r[0], &from, MOE_LINK_MSG, b, 5000), 0);
    int64_t t0 = moe_now_ns();
    run_on(&cl.r[0], cmd_free, NULL);
    int fc = 0, fb = 0;
    cr_assert_geq(wait_ev(&cl.c, &fc, MOE_LINK_LOST, a, 1000), 0, "LOST at the coordinator");
    cr_assert_geq(wait_ev(&cl.r[1], &fb, MOE_LINK_LOST, a, 1000), 0, "LOST at the peer");
    double ms = (double)(moe_now_ns() - t0) / 1e6;
    cr_log_info("destroyed rank lost after %.1f ms", ms);
    cr_assert_eq(count_ev(&cl.c, MOE_LINK_LOST, a), 1);
    cluster_down(&cl);
}

/* ---- comm_ucx ---- */

static void cmd_comm(node *n, void *arg)
{
    *(moe_status *)arg = moe_comm_ucx_create(n->link, &n->comm);
    n->has_comm = *(moe_status *)arg == MOE_OK;
}

typedef struct {
    bool recv;
    void *buf;
    int bytes, peer, tag, n;
    moe_comm_req *req[16];
    moe_status st;
    int done;
    int wait_ms;
    char msg[256];
} xfer;

static void cmd_post(node *n, void *arg)
{
    xfer *x = arg;
    x->st = MOE_OK;
    for (int i = 0; i < x->n && x->st == MOE_OK; i++) {
        uint8_t *b = (uint8_t *)x->buf + (size_t)i * (size_t)x->bytes;
        x->st = x->recv ? n->comm.ops->irecv(n->comm.ctx, b, x->bytes, x->peer, x->tag + i, &x->req[i])
                        : n->comm.ops->isend(n->comm.ctx, b, x->bytes, x->peer, x->tag + i, &x->req[i]);
    }
    snprintf(x->msg, sizeof x->msg, "%s", moe_error_message());
}

/* Tests every request until all are done or one fails, up to wait_ms. */
static void cmd_wait(node *n, void *arg)
{
    xfer *x = arg;
    int64_t end = moe_now_ns() + (int64_t)x->wait_ms * 1000000;
    x->st = MOE_OK;
    while (x->done < x->n && moe_now_ns() < end) {
        for (int i = 0; i < x->n; i++) {
            if (!x->req[i])
                continue;
            bool d = false;
            moe_status st = n->comm.ops->test(n->comm.ctx, x->req[i], &d);
            if (st != MOE_OK) {
                x->req[i] = NULL;
                x->st = st;
                snprintf(x->msg, sizeof x->msg, "%s", moe_error_message());
                return;
            }
            if (d) {
                x->req[i] = NULL;
                x->done++;
            }
        }
    }
}

static void cmd_cancel(node *n, void *arg)
{
    xfer *x = arg;
    for (int i = 0; i < x->n; i++)
        if (x->req[i]) {
            n->comm.ops->cancel(n->comm.ctx, x->req[i]);
            x->req[i] = NULL;
        }
}

static void comm_pair(cluster *cl)
{
    cluster_up(cl, 2);
    moe_status st;
    run_on(&cl->r[0], cmd_comm, &st);
    cr_assert_eq(st, MOE_OK);
    run_on(&cl->r[1], cmd_comm, &st);
    cr_assert_eq(st, MOE_OK);
    /* both must know each other before posting */
    cr_assert_eq(send_when_known(&cl->r[0], cl->id[1], 1, "a", 1), MOE_OK);
    cr_assert_eq(send_when_known(&cl->r[1], cl->id[0], 1, "b", 1), MOE_OK);
}

Test(comm_ucx, kv_blocks_between_two_ranks, .timeout = 60)
{
    cluster cl;
    comm_pair(&cl);
    enum { NB = 8, BYTES = 256 << 10 }; /* KV-block sized, rendezvous */
    uint8_t *src = malloc((size_t)NB * BYTES), *dst = calloc(NB, BYTES);
    for (size_t i = 0; i < (size_t)NB * BYTES; i++)
        src[i] = (uint8_t)(i * 2654435761u >> 13);
    xfer rx = {.recv = true, .buf = dst, .bytes = BYTES, .peer = cl.id[0], .tag = 40, .n = NB,
               .wait_ms = 20000};
    xfer tx = {.recv = false, .buf = src, .bytes = BYTES, .peer = cl.id[1], .tag = 40, .n = NB,
               .wait_ms = 20000};
    run_on(&cl.r[1], cmd_post, &rx);
    cr_assert_eq(rx.st, MOE_OK, "%s", rx.msg);
    run_on(&cl.r[0], cmd_post, &tx);
    cr_assert_eq(tx.st, MOE_OK, "%s", tx.msg);
    run_on(&cl.r[1], cmd_wait, &rx);
    cr_assert_eq(rx.st, MOE_OK, "%s", rx.msg);
    cr_assert_eq(rx.done, NB);
    run_on(&cl.r[0], cmd_wait, &tx);
    cr_assert_eq(tx.st, MOE_OK, "%s", tx.msg);
    cr_assert_eq(memcmp(src, dst, (size_t)NB * BYTES), 0, "blocks intact, each at its tag");
    /* rank() is the member id; collectives are not this comm's business */
    cr_assert_eq(moe_comm_rank(&cl.r[0].comm), cl.id[0]);
    int v = 1;
    cr_assert_eq(cl.r[0].comm.ops->allreduce_sum_int(cl.r[0].comm.ctx, &v), MOE_ERR_UNSUPPORTED);
    /* a send to a member nobody announced fails at once */
    moe_comm_req *q = NULL;
    cr_assert_eq(cl.r[0].comm.ops->isend(cl.r[0].comm.ctx, src, 8, 999, 1, &q), MOE_ERR_UNAVAILABLE);
    free(src);
    free(dst);
    cluster_down(&cl);
}

Test(comm_ucx, receive_from_a_dead_peer_fails_fast, .timeout = 30)
{
    cluster cl;
    comm_pair(&cl);
    enum { BYTES = 256 << 10 };
    uint8_t *dst = malloc(4 * BYTES);
    xfer rx = {.recv = true, .buf = dst, .bytes = BYTES, .peer = cl.id[0], .tag = 7, .n = 4,
               .wait_ms = 5000};
    run_on(&cl.r[1], cmd_post, &rx);
    cr_assert_eq(rx.st, MOE_OK, "%s", rx.msg);
    int64_t t0 = moe_now_ns();
    run_on(&cl.r[0], cmd_free, NULL); /* the sender dies before sending */
    run_on(&cl.r[1], cmd_wait, &rx);
    double ms = (double)(moe_now_ns() - t0) / 1e6;
    cr_assert_eq(rx.st, MOE_ERR_UNAVAILABLE, "got %s: %s", moe_status_name(rx.st), rx.msg);
    cr_log_info("receive failed %.1f ms after the peer died: %s", ms, rx.msg);
    cr_assert_lt(ms, 1500.0, "failed after %.0f ms", ms);
    run_on(&cl.r[1], cmd_cancel, &rx); /* the other three */
    free(dst);
    cluster_down(&cl);
}

Test(comm_ucx, cancel_of_a_posted_receive, .timeout = 30)
{
    cluster cl;
    comm_pair(&cl);
    enum { BYTES = 64 << 10 };
    uint8_t *dst = calloc(2, BYTES), *src = malloc(BYTES);
    memset(src, 0xab, BYTES);
    xfer rx = {.recv = true, .buf = dst, .bytes = BYTES, .peer = cl.id[0], .tag = 11, .n = 1,
               .wait_ms = 1};
    run_on(&cl.r[1], cmd_post, &rx);
    cr_assert_eq(rx.st, MOE_OK);
    run_on(&cl.r[1], cmd_cancel, &rx);
    /* a send on the cancelled tag must not land in the old buffer; a new receive gets it */
    xfer tx = {.recv = false, .buf = src, .bytes = BYTES, .peer = cl.id[1], .tag = 11, .n = 1,
               .wait_ms = 10000};
    run_on(&cl.r[0], cmd_post, &tx);
    cr_assert_eq(tx.st, MOE_OK);
    xfer rx2 = {.recv = true, .buf = dst + BYTES, .bytes = BYTES, .peer = cl.id[0], .tag = 11,
                .n = 1, .wait_ms = 10000};
    run_on(&cl.r[1], cmd_post, &rx2);
    run_on(&cl.r[1], cmd_wait, &rx2);
    cr_assert_eq(rx2.st, MOE_OK, "%s", rx2.msg);
    cr_assert_eq(rx2.done, 1);
    run_on(&cl.r[0], cmd_wait, &tx);
    cr_assert_eq(tx.st, MOE_OK);
    for (int i = 0; i < BYTES; i++) {
        cr_assert_eq(dst[i], 0, "the cancelled buffer was written at %d", i);
        cr_assert_eq(dst[BYTES + i], 0xab);
    }
    free(dst);
    free(src);
    cluster_down(&cl);
}

typedef struct {
    uint8_t *addr;
    size_t len;
} waddr;

static void cmd_addr(node *n, void *arg)
{
    waddr *a = arg;
    ucp_address_t *ad;
    cr_assert_eq(ucp_worker_get_address(moe_link_ucx_worker(n->link), &ad, &a->len), UCS_OK);
    a->addr = malloc(a->len);
    memcpy(a->addr, ad, a->len);
    ucp_worker_release_address(moe_link_ucx_worker(n->link), ad);
}

/* A process that is not a member but knows a rank's worker address sends it link messages, one
 * claiming to be a real member (without its key), one from a member id nobody announced: the
 * rank delivers neither, and still delivers the real member's message. */
Test(link_ucx, forged_messages_are_dropped, .timeout = 30)
{
    cluster cl;
    cluster_up(&cl, 2);
    int a = cl.id[0], b = cl.id[1];
    waddr wa = {0};
    run_on(&cl.r[0], cmd_addr, &wa);
    ucp_config_t *cfg;
    cr_assert_eq(ucp_config_read(NULL, NULL, &cfg), UCS_OK);
    ucp_config_modify(cfg, "TLS", "tcp");
    ucp_params_t prm = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_AM};
    ucp_context_h ctx;
    cr_assert_eq(ucp_init(&prm, cfg, &ctx), UCS_OK);
    ucp_config_release(cfg);
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SINGLE};
    ucp_worker_h w;
    cr_assert_eq(ucp_worker_create(ctx, &wp, &w), UCS_OK);
    ucp_ep_params_t ep = {.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS,
                          .address = (const ucp_address_t *)wa.addr};
    ucp_ep_h e;
    cr_assert_eq(ucp_ep_create(w, &ep, &e), UCS_OK);
    ul_hdr h[2] = {{.magic = UL_MAGIC, .kind = UL_MSG, .src = b, .dest = a, .tag = 66},
                   {.magic = UL_MAGIC, .kind = UL_MSG, .src = 77, .dest = a, .tag = 67}};
    memset(h[0].key, 0x5a, UL_KEY);
    void *req[2];
    for (int i = 0; i < 2; i++) {
        ucp_request_param_t sp = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                  .flags = UCP_AM_SEND_FLAG_REPLY};
        req[i] = ucp_am_send_nbx(e, UL_AM_ID, &h[i], sizeof h[i], "spoof", 5, &sp);
        cr_assert(!UCS_PTR_IS_ERR(req[i]));
    }
    int64_t end = moe_now_ns() + 3000000000LL;
    for (int i = 0; i < 2; i++)
        while (UCS_PTR_IS_PTR(req[i]) && ucp_request_check_status(req[i]) == UCS_INPROGRESS &&
               moe_now_ns() < end)
            ucp_worker_progress(w);
    for (int i = 0; i < 2; i++)
        if (UCS_PTR_IS_PTR(req[i]))
            ucp_request_free(req[i]);
    for (int i = 0; i < 100; i++) { /* give them time to arrive */
        ucp_worker_progress(w);
        moe_sleep_ns(2000000);
    }
    cr_assert_eq(send_when_known(&cl.r[1], a, 68, "real", 4), MOE_OK);
    int from = 0;
    cr_assert_geq(wait_ev(&cl.r[0], &from, MOE_LINK_MSG, b, 5000), 0);
    pthread_mutex_lock(&cl.r[0].mu);
    for (int i = 0; i < cl.r[0].n_ev; i++)
        cr_assert(cl.r[0].ev[i].tag != 66 && cl.r[0].ev[i].tag != 67,
                  "forged message (tag %d) delivered", cl.r[0].ev[i].tag);
    pthread_mutex_unlock(&cl.r[0].mu);
    ucp_request_param_t cp = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                              .flags = UCP_EP_CLOSE_FLAG_FORCE};
    void *cr = ucp_ep_close_nbx(e, &cp);
    if (UCS_PTR_IS_PTR(cr)) {
        while (ucp_request_check_status(cr) == UCS_INPROGRESS)
            ucp_worker_progress(w);
        ucp_request_free(cr);
    }
    ucp_worker_destroy(w);
    ucp_cleanup(ctx);
    free(wa.addr);
    cluster_down(&cl);
}

Test(link_ucx, read_token, .timeout = 10)
{
    char path[] = "/tmp/moe-token-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    const char *t = "abcdefghijklmnopqrstuvwxyz\n\n";
    cr_assert_eq(write(fd, t, strlen(t)), (ssize_t)strlen(t));
    close(fd);
    char *out = NULL;
    cr_assert_eq(moe_link_read_token(path, &out), MOE_OK);
    cr_assert_str_eq(out, "abcdefghijklmnopqrstuvwxyz", "trailing whitespace dropped");
    free(out);
    setenv("MOESERVE_CLUSTER_TOKEN", "0123456789ABCDEF ", 1);
    cr_assert_eq(moe_link_read_token(NULL, &out), MOE_OK);
    cr_assert_str_eq(out, "0123456789ABCDEF");
    free(out);
    setenv("MOESERVE_CLUSTER_TOKEN", "short", 1);
    cr_assert_eq(moe_link_read_token(NULL, &out), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "MOESERVE_CLUSTER_TOKEN"), "%s", moe_error_message());
    unsetenv("MOESERVE_CLUSTER_TOKEN");
    cr_assert_eq(moe_link_read_token(NULL, &out), MOE_ERR_INVALID_ARG);
    cr_assert_eq(moe_link_read_token("/nonexistent/token", &out), MOE_ERR_INVALID_ARG);
    unlink(path);
}
