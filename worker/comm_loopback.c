/* Loopback comm backend: n threads of one process exchange through shared memory with a barrier.
 * Used by tests to run an expert-parallel group without MPI. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "worker/comm.h"

typedef struct {
    int n;
    pthread_barrier_t barrier;
    /* Published by each rank for the current collective. */
    const void **send;
    const int **send_bytes, **send_off;
    int *ints; /* n x n for alltoall_int / n for allreduce */
    int refs;
    pthread_mutex_t lock;
} loop_group;

typedef struct {
    loop_group *g;
    int rank;
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

static moe_status lb_test(void *ctx, moe_comm_req *req, bool *done)
{
    (void)ctx, (void)req;
    *done = true;
    return MOE_OK;
}

static void lb_cancel(void *ctx, moe_comm_req *req) { (void)ctx, (void)req; }

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
    free(g);
}

static void lb_destroy(void *ctx)
{
    loop_ctx *c = ctx;
    group_unref(c->g);
    free(c);
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
    if (!g->send || !g->send_bytes || !g->send_off || !g->ints)
        goto nomem;
    pthread_barrier_init(&g->barrier, NULL, (unsigned)n);
    pthread_mutex_init(&g->lock, NULL);
    for (int i = 0; i < n; i++) {
        loop_ctx *c = calloc(1, sizeof *c);
        if (!c)
            return moe_error(MOE_ERR_NOMEM, "loopback comm: out of memory"); /* test-only path */
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
