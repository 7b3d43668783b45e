/* MPI backend of the comm vtable: collectives (blocking, and a non-blocking all-to-all-v) and
 * non-blocking point-to-point over one borrowed communicator, with request handles that test() /
 * wait() / cancel() release: heap ones for point to point, a per-communicator pool for the
 * all-to-all-v so the forward pass allocates nothing. */
#include "worker/comm_mpi.h"

#include <stdlib.h>

#include "common/clock.h"
#include "common/log.h"

struct moe_comm_req {
    MPI_Request r;
    bool pooled;     /* a slot of mpi_ctx.pool (non-blocking collective), not heap */
    bool in_use;
    bool recv;       /* a point-to-point receive (cancel must see it end: it writes a buffer) */
    int bytes, peer, tag;
};

/* How long cancel waits for a receive MPI already matched (its bytes are on the way). */
#define MPI_CANCEL_RECV_MS 2000

#define MPI_POOL 8 /* outstanding non-blocking all-to-alls per rank (comm.h promises 8) */

typedef struct {
    MPI_Comm comm;
    int rank, size;
    struct moe_comm_req pool[MPI_POOL];
} mpi_ctx;

moe_status moe_mpi_check_(int rc, const char *call, const char *file, int line)
{
    if (rc == MPI_SUCCESS)
        return MOE_OK;
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return moe_error(MOE_ERR_INTERNAL, "%s:%d: %s failed: %s", file, line, call, msg);
}

static int m_rank(void *ctx)
{
    return ((mpi_ctx *)ctx)->rank;
}
static int m_size(void *ctx)
{
    return ((mpi_ctx *)ctx)->size;
}

static moe_status m_alltoall_int(void *ctx, const int *send, int *recv)
{
    mpi_ctx *c = ctx;
    return MOE_MPI_CHECK(MPI_Alltoall(send, 1, MPI_INT, recv, 1, MPI_INT, c->comm));
}

static moe_status m_alltoallv(void *ctx, const void *send, const int *send_bytes,
                              const int *send_off, void *recv, const int *recv_bytes,
                              const int *recv_off)
{
    mpi_ctx *c = ctx;
    return MOE_MPI_CHECK(MPI_Alltoallv(send, send_bytes, send_off, MPI_BYTE, recv, recv_bytes,
                                       recv_off, MPI_BYTE, c->comm));
}

static moe_status m_allreduce_sum_int(void *ctx, int *value)
{
    mpi_ctx *c = ctx;
    return MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, value, 1, MPI_INT, MPI_SUM, c->comm));
}

static moe_status new_req(moe_comm_req **req)
{
    *req = malloc(sizeof **req);
    if (!*req)
        return moe_error(MOE_ERR_NOMEM, "comm mpi: out of memory for a request");
    /* Every field set: a stale `pooled` would make cancel wait on a receive that never comes. */
    **req = (moe_comm_req){.r = MPI_REQUEST_NULL};
    return MOE_OK;
}

static moe_status m_isend(void *ctx, const void *buf, int bytes, int peer, int tag,
                          moe_comm_req **req)
{
    mpi_ctx *c = ctx;
    moe_status st = new_req(req);
    if (st != MOE_OK)
        return st;
    if ((st = MOE_MPI_CHECK(MPI_Isend(buf, bytes, MPI_BYTE, peer, tag, c->comm, &(*req)->r))) !=
        MOE_OK) {
        free(*req);
        *req = NULL;
    }
    return st;
}

static moe_status m_irecv(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    mpi_ctx *c = ctx;
    moe_status st = new_req(req);
    if (st != MOE_OK)
        return st;
    **req = (moe_comm_req){.r = MPI_REQUEST_NULL, .recv = true, .bytes = bytes, .peer = peer, .tag = tag};
    if ((st = MOE_MPI_CHECK(MPI_Irecv(buf, bytes, MPI_BYTE, peer, tag, c->comm, &(*req)->r))) !=
        MOE_OK) {
        free(*req);
        *req = NULL;
    }
    return st;
}

static void release(moe_comm_req *req)
{
    if (req->pooled)
        req->in_use = false;
    else
        free(req);
}

static moe_status m_test(void *ctx, moe_comm_req *req, bool *done)
{
    (void)ctx;
    int flag = 0;
    MPI_Status status;
    moe_status st = MOE_MPI_CHECK(MPI_Test(&req->r, &flag, &status));
    *done = st == MOE_OK && flag;
    if (*done)
        release(req);
    return st;
}

static moe_status m_wait(void *ctx, moe_comm_req *req)
{
    (void)ctx;
    MPI_Status status;
    moe_status st = MOE_MPI_CHECK(MPI_Wait(&req->r, &status));
    release(req);
    return st;
}

static moe_status m_ialltoallv(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                               void *recv, const int *recv_bytes, const int *recv_off, moe_comm_req **req)
{
    mpi_ctx *c = ctx;
    moe_comm_req *r = NULL;
    for (int i = 0; i < MPI_POOL && !r; i++)
        if (!c->pool[i].in_use)
            r = &c->pool[i];
    if (!r)
        return moe_error(MOE_ERR_FULL, "comm mpi: more than %d non-blocking all-to-alls outstanding", MPI_POOL);
    *r = (moe_comm_req){.r = MPI_REQUEST_NULL, .pooled = true, .in_use = true};
    moe_status st = MOE_MPI_CHECK(MPI_Ialltoallv(send, send_bytes, send_off, MPI_BYTE, recv, recv_bytes,
                                                 recv_off, MPI_BYTE, c->comm, &r->r));
    if (st != MOE_OK) {
        r->in_use = false;
        return st;
    }
    *req = r;
    return MOE_OK;
}

static void m_cancel(void *ctx, moe_comm_req *req)
{
    if (!req)
        return;
    if (req->pooled) { /* MPI forbids cancelling a collective: complete it */
        m_wait(ctx, req);
        return;
    }
    if (req->r != MPI_REQUEST_NULL && !req->recv) {
        /* A send may already be matched: detached, MPI completes (or drops) it on its own and
         * frees the request; the caller's buffer stays mapped (the KV pool), so it can only
         * carry stale bytes. */
        int flag = 0;
        MPI_Test(&req->r, &flag, MPI_STATUS_IGNORE);
        if (!flag)
            MPI_Request_free(&req->r);
    } else if (req->r != MPI_REQUEST_NULL) {
        /* A receive MPI has matched cannot be cancelled: it completes, writing the buffer. The
         * caller reuses the buffer (KV blocks of another sequence) once this returns, so wait
         * until MPI_Test says it ended, then ask MPI_Test_cancelled which way. */
        MPI_Cancel(&req->r);
        MPI_Status status;
        int flag = 0;
        int64_t end = moe_now_ns() + (int64_t)MPI_CANCEL_RECV_MS * 1000000;
        while (MPI_Test(&req->r, &flag, &status) == MPI_SUCCESS && !flag && moe_now_ns() < end)
            moe_sleep_ns(20000);
        int cancelled = 0;
        if (flag)
            MPI_Test_cancelled(&status, &cancelled);
        if (!flag) {
            MOE_LOG_W("comm mpi: a matched %d-byte receive of tag %d from rank %d did not end "
                      "within %d ms of its cancel; detached",
                      req->bytes, req->tag, req->peer, MPI_CANCEL_RECV_MS);
            MPI_Request_free(&req->r);
        } else if (!cancelled) {
            MOE_LOG_D("comm mpi: the %d-byte receive of tag %d from rank %d completed before its "
                      "cancel",
                      req->bytes, req->tag, req->peer);
        }
    }
    free(req);
}

static moe_status m_barrier(void *ctx)
{
    return MOE_MPI_CHECK(MPI_Barrier(((mpi_ctx *)ctx)->comm));
}

static void m_destroy(void *ctx)
{
    free(ctx);
}

static const moe_comm_ops mpi_ops = {
    .name = "mpi",
    .rank = m_rank,
    .size = m_size,
    .alltoall_int = m_alltoall_int,
    .alltoallv = m_alltoallv,
    .allreduce_sum_int = m_allreduce_sum_int,
    .isend = m_isend,
    .irecv = m_irecv,
    .test = m_test,
    .cancel = m_cancel,
    .barrier = m_barrier,
    .destroy = m_destroy,
    .ialltoallv = m_ialltoallv,
    .wait = m_wait,
};

moe_status moe_comm_mpi_create(MPI_Comm comm, moe_comm *out)
{
    mpi_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "comm mpi: out of memory");
    c->comm = comm;
    moe_status st;
    if ((st = MOE_MPI_CHECK(MPI_Comm_rank(comm, &c->rank))) != MOE_OK ||
        (st = MOE_MPI_CHECK(MPI_Comm_size(comm, &c->size))) != MOE_OK) {
        free(c);
        return st;
    }
    *out = (moe_comm){.ops = &mpi_ops, .ctx = c};
    return MOE_OK;
}
