/* Loopback comm backend: n threads of one process exchange through shared memory, with a barrier
 * for the blocking collectives and published slots for the non-blocking all-to-all-v (each
 * receiver copies its part inside its own test/wait, as soon as the sender has posted; a send is
 * complete once every peer has copied it). Used by tests to run an expert-parallel group without
 * MPI: the non-blocking path really is asynchronous, so a caller touching buffers or count arrays
 * before completion shows up in the results. No time is saved by overlap here: the copies run on
 * the threads that wait for them. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "worker/comm.h"

#define LB_SLOTS 8 /* outstanding non-blocking all-to-alls per rank (comm.h promises 8) */

/* One rank's posting of one non-blocking all-to-all-v; rank r's op k lives in slot k % LB_SLOTS. */
typedef struct {
    atomic_long seq; /* op number posted here (-1: none); published last, with release */
    const void *send;
    const int *send_bytes, *send_off;
    atomic_int consumed; /* ranks (self included) that have copied their part */
} lb_slot;

/* The receive side of one outstanding op of this rank: preallocated, so posting allocates nothing. */
struct moe_comm_req {
    long seq;
    int slot;
    void *recv;
    const int *recv_bytes, *recv_off;
    unsigned char *copied; /* [n] part from peer p copied */
    int n_copied;
    moe_status err;
    bool active;
};

typedef struct {
    int n;
    pthread_barrier_t barrier;
    /* Published by each rank for the current collective. */
    const void **send;
    const int **send_bytes, **send_off;
    int *ints; /* n x n for alltoall_int / n for allreduce */
    lb_slot *slots; /* (n, LB_SLOTS) */
    int refs;
    pthread_mutex_t lock;
} loop_group;

typedef struct {
    loop_group *g;
    int rank;
    long next_seq;
    struct moe_comm_req reqs[LB_SLOTS];
} loop_ctx;

static int lb_rank(void *ctx) { return ((loop_ctx *)ctx)->rank; }
static int lb_size(void *ctx) { return ((loop_ctx *)ctx)->g->n; }

static moe_status lb_alltoall_int(void *ctx, const int *send, int *recv)
{
    loop_ctx *c = ctx;
    loop_group *g = c->g;
    memcpy(g->ints + (size_t)c->rank * g->n, send, sizeof(int) * (size_t)g->n);
    pthread_barrier_wait(&g->barrier);
    for (int p = 0; p < g->n; p++)
        recv[p] = g->ints[(size_t)p * g->n + c->rank];
    pthread_barrier_wait(&g->barrier);
    return MOE_OK;
}

static moe_status lb_alltoallv(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                               void *recv, const int *recv_bytes, const int *recv_off)
{
    loop_ctx *c = ctx;
    loop_group *g = c->g;
    g->send[c->rank] = send;
    g->send_bytes[c->rank] = send_bytes;
    g->send_off[c->rank] = send_off;
    pthread_barrier_wait(&g->barrier);
    moe_status st = MOE_OK;
    for (int p = 0; p < g->n; p++) {
        int n = g->send_bytes[p][c->rank];
        if (n != recv_bytes[p]) {
            st = moe_error(MOE_ERR_INTERNAL, "loopback alltoallv: rank %d sends %d bytes to %d, which expects %d",
                           p, n, c->rank, recv_bytes[p]);
            continue;
        }
        if (n)
            memcpy((char *)recv + recv_off[p], (const char *)g->send[p] + g->send_off[p][c->rank], (size_t)n);
    }
    pthread_barrier_wait(&g->barrier);
    return st;
}

static moe_status lb_allreduce_sum_int(void *ctx, int *value)
{
    loop_ctx *c = ctx;
    loop_group *g = c->g;
    g->ints[c->rank] = *value;
    pthread_barrier_wait(&g->barrier);
    int s = 0;
    for (int p = 0; p < g->n; p++)
        s += g->ints[p];
    pthread_barrier_wait(&g->barrier);
    *value = s;
    return MOE_OK;
}

static moe_status lb_p2p(void *ctx, const void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    (void)ctx, (void)buf, (void)bytes, (void)peer, (void)tag, (void)req;
    return moe_error(MOE_ERR_UNSUPPORTED, "loopback comm: point-to-point is not supported");
}

static moe_status lb_irecv(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    return lb_p2p(ctx, buf, bytes, peer, tag, req);
}

static moe_status lb_ialltoallv(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                                void *recv, const int *recv_bytes, const int *recv_off, moe_comm_req **req)
{
    loop_ctx *c = ctx;
    long k = c->next_seq;
    int s = (int)(k % LB_SLOTS);
    moe_comm_req *r = &c->reqs[s];
    if (r->active)
        return moe_error(MOE_ERR_FULL, "loopback: more than %d non-blocking all-to-alls outstanding", LB_SLOTS);
    c->next_seq++;
    lb_slot *sl = &c->g->slots[(size_t)c->rank * LB_SLOTS + s];
    /* Every peer finished with this slot's previous op: our completion of it waited for that. */
    sl->send = send;
    sl->send_bytes = send_bytes;
    sl->send_off = send_off;
    atomic_store_explicit(&sl->consumed, 0, memory_order_relaxed);
    atomic_store_explicit(&sl->seq, k, memory_order_release);
    r->seq = k;
    r->slot = s;
    r->recv = recv;
    r->recv_bytes = recv_bytes;
    r->recv_off = recv_off;
    memset(r->copied, 0, (size_t)c->g->n);
    r->n_copied = 0;
    r->err = MOE_OK;
    r->active = true;
    *req = r;
    return MOE_OK;
}

/* Copies every part whose sender has posted; true when the op is complete on this rank. */
static bool lb_advance(loop_ctx *c, moe_comm_req *r)
{
    loop_group *g = c->g;
    for (int p = 0; p < g->n && r->n_copied < g->n; p++) {
        if (r->copied[p])
            continue;
        lb_slot *ps = &g->slots[(size_t)p * LB_SLOTS + r->slot];
        if (atomic_load_explicit(&ps->seq, memory_order_acquire) != r->seq)
            continue;
        int n = ps->send_bytes[c->rank];
        if (n != r->recv_bytes[p]) {
            if (r->err == MOE_OK)
                r->err = moe_error(MOE_ERR_INTERNAL, "loopback ialltoallv: rank %d sends %d bytes to %d, which "
                                   "expects %d", p, n, c->rank, r->recv_bytes[p]);
        } else if (n) {
            memcpy((char *)r->recv + r->recv_off[p], (const char *)ps->send + ps->send_off[c->rank], (size_t)n);
        }
        r->copied[p] = 1;
        r->n_copied++;
        atomic_fetch_add_explicit(&ps->consumed, 1, memory_order_release);
    }
    lb_slot *mine = &g->slots[(size_t)c->rank * LB_SLOTS + r->slot];
    return r->n_copied == g->n && atomic_load_explicit(&mine->consumed, memory_order_acquire) == g->n;
}

static moe_status lb_test(void *ctx, moe_comm_req *req, bool *done)
{
    *done = true;
    if (!req) /* point to point is unsupported: nothing was ever posted */
        return MOE_OK;
    *done = lb_advance(ctx, req);
    if (!*done)
        return MOE_OK;
    req->active = false;
    return req->err;
}

static moe_status lb_wait(void *ctx, moe_comm_req *req)
{
    bool done = false;
    moe_status st;
    while ((st = lb_test(ctx, req, &done)) == MOE_OK && !done)
        sched_yield();
    return st;
}

static void lb_cancel(void *ctx, moe_comm_req *req)
{
    if (req) /* a collective cannot be abandoned: the peers read our buffers */
        lb_wait(ctx, req);
}

static moe_status lb_barrier(void *ctx)
{
    pthread_barrier_wait(&((loop_ctx *)ctx)->g->barrier);
    return MOE_OK;
}

static void group_unref(loop_group *g)
{
    pthread_mutex_lock(&g->lock);
    int left = --g->refs;
    pthread_mutex_unlock(&g->lock);
    if (left)
        return;
    pthread_barrier_destroy(&g->barrier);
    pthread_mutex_destroy(&g->lock);
    free(g->send);
    free(g->send_bytes);
    free(g->send_off);
    free(g->ints);
    free(g->slots);
    free(g);
}

static void ctx_free(loop_ctx *c)
{
    for (int i = 0; i < LB_SLOTS; i++)
        free(c->reqs[i].copied);
    free(c);
}

static void lb_destroy(void *ctx)
{
    loop_ctx *c = ctx;
    group_unref(c->g);
    ctx_free(c);
}

static const moe_comm_ops loopback_ops = {
    .name = "loopback",
    .rank = lb_rank,
    .size = lb_size,
    .alltoall_int = lb_alltoall_int,
    .alltoallv = lb_alltoallv,
    .allreduce_sum_int = lb_allreduce_sum_int,
    .isend = lb_p2p,
    .irecv = lb_irecv,
    .test = lb_test,
    .cancel = lb_cancel,
    .barrier = lb_barrier,
    .destroy = lb_destroy,
    .ialltoallv = lb_ialltoallv,
    .wait = lb_wait,
};

moe_status moe_comm_loopback_create(int n, moe_comm **comms)
{
    if (n <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "loopback comm: group size %d", n);
    loop_group *g = calloc(1, sizeof *g);
    moe_comm *cs = calloc((size_t)n, sizeof *cs);
    if (!g || !cs)
        goto nomem;
    g->n = n;
    g->refs = n;
    g->send = calloc((size_t)n, sizeof *g->send);
    g->send_bytes = calloc((size_t)n, sizeof *g->send_bytes);
    g->send_off = calloc((size_t)n, sizeof *g->send_off);
    g->ints = calloc((size_t)n * n, sizeof *g->ints);
    g->slots = calloc((size_t)n * LB_SLOTS, sizeof *g->slots);
    if (!g->send || !g->send_bytes || !g->send_off || !g->ints || !g->slots)
        goto nomem;
    for (size_t i = 0; i < (size_t)n * LB_SLOTS; i++) {
        atomic_init(&g->slots[i].seq, -1);
        atomic_init(&g->slots[i].consumed, 0);
    }
    pthread_barrier_init(&g->barrier, NULL, (unsigned)n);
    pthread_mutex_init(&g->lock, NULL);
    for (int i = 0; i < n; i++) {
        loop_ctx *c = calloc(1, sizeof *c);
        bool ok = c != NULL;
        for (int k = 0; ok && k < LB_SLOTS; k++)
            ok = (c->reqs[k].copied = calloc((size_t)n, 1)) != NULL;
        if (!ok) {
            if (c)
                ctx_free(c);
            return moe_error(MOE_ERR_NOMEM, "loopback comm: out of memory"); /* test-only path */
        }
        c->g = g;
        c->rank = i;
        cs[i] = (moe_comm){.ops = &loopback_ops, .ctx = c};
    }
    *comms = cs;
    return MOE_OK;
nomem:
    if (g) {
        free(g->send);
        free(g->send_bytes);
        free(g->send_off);
        free(g->ints);
        free(g->slots);
    }
    free(g);
    free(cs);
    return moe_error(MOE_ERR_NOMEM, "loopback comm: out of memory");
}

void moe_comm_loopback_free(moe_comm *comms, int n)
{
    if (!comms)
        return;
    for (int i = 0; i < n; i++)
        comms[i].ops->destroy(comms[i].ctx);
    free(comms);
}
