/* NCCL comm backend: all-to-all-v as grouped ncclSend/ncclRecv per peer (blocking, or posted on the
 * stream and tracked with a CUDA event), all-reduce, and non-blocking point to point tracked with
 * CUDA events. Host buffers are staged through device memory so the same engine code runs over
 * either backend. */
#include "worker/comm_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

struct moe_comm_req {
    cudaEvent_t done;
    void *dev;          /* staging buffer of this request, or NULL */
    void *host_dst;     /* receive into host memory: copy from dev (+ dev_off) when done */
    size_t bytes;
    size_t dev_off;
    /* Pooled requests (non-blocking all-to-all-v) keep their event and staging buffer. */
    bool pooled, in_use;
    size_t dev_cap;
};

#define NCCL_POOL 8 /* outstanding non-blocking all-to-alls per rank (comm.h promises 8) */

typedef struct {
    ncclComm_t comm;
    cudaStream_t stream;
    int rank, size, device;
    void *stage;        /* device staging buffer for host memory */
    size_t stage_bytes;
    struct moe_comm_req pool[NCCL_POOL];
} nccl_ctx;

moe_status moe_cuda_check_(int rc, const char *call, const char *file, int line)
{
    if (rc == 0)
        return MOE_OK;
    return moe_error(MOE_ERR_INTERNAL, "%s failed (%d: %s) at %s:%d", call, rc,
                     cudaGetErrorString((cudaError_t)rc), file, line);
}

static moe_status nccl_check(ncclResult_t rc, const char *call, const char *file, int line)
{
    if (rc == ncclSuccess)
        return MOE_OK;
    return moe_error(MOE_ERR_INTERNAL, "%s failed (%d: %s) at %s:%d", call, (int)rc, ncclGetErrorString(rc), file,
                     line);
}
#define NCCL_CHECK(call) nccl_check((call), #call, __FILE__, __LINE__)

static bool is_device_ptr(const void *p)
{
    struct cudaPointerAttributes a;
    if (!p || cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "invalid value" of plain host pointers */
        return false;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

static moe_status ensure_stage(nccl_ctx *c, size_t bytes)
{
    if (bytes <= c->stage_bytes)
        return MOE_OK;
    if (c->stage)
        cudaFree(c->stage);
    c->stage = NULL;
    c->stage_bytes = 0;
    moe_status st = MOE_CUDA_CHECK(cudaMalloc(&c->stage, bytes));
    if (st == MOE_OK)
        c->stage_bytes = bytes;
    return st;
}

static int n_rank(void *ctx) { return ((nccl_ctx *)ctx)->rank; }
static int n_size(void *ctx) { return ((nccl_ctx *)ctx)->size; }

/* Bytes spanned by per-peer (bytes, offset) pairs: the staging size of one side. */
static size_t extent(const int *bytes, const int *off, int n)
{
    size_t end = 0;
    for (int p = 0; p < n; p++)
        if ((size_t)off[p] + (size_t)bytes[p] > end)
            end = (size_t)off[p] + (size_t)bytes[p];
    return end;
}

/* Posts every peer's send and receive as one NCCL group on c->stream (device buffers). */
static moe_status group_exchange(nccl_ctx *c, const char *sbuf, const int *send_bytes, const int *send_off,
                                 char *rbuf, const int *recv_bytes, const int *recv_off)
{
    moe_status st = NCCL_CHECK(ncclGroupStart());
    if (st != MOE_OK)
        return st;
    for (int p = 0; p < c->size && st == MOE_OK; p++) {
        if (send_bytes[p])
            st = NCCL_CHECK(ncclSend(sbuf + send_off[p], (size_t)send_bytes[p], ncclChar, p, c->comm, c->stream));
        if (st == MOE_OK && recv_bytes[p])
            st = NCCL_CHECK(ncclRecv(rbuf + recv_off[p], (size_t)recv_bytes[p], ncclChar, p, c->comm, c->stream));
    }
    moe_status end = NCCL_CHECK(ncclGroupEnd());
    return st != MOE_OK ? st : end;
}

static moe_status n_alltoallv(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                              void *recv, const int *recv_bytes, const int *recv_off)
{
    nccl_ctx *c = ctx;
    size_t s_total = extent(send_bytes, send_off, c->size), r_total = extent(recv_bytes, recv_off, c->size);
    bool dev_s = is_device_ptr(send), dev_r = is_device_ptr(recv);
    const char *sbuf = send;
    char *rbuf = recv;
    moe_status st = ensure_stage(c, (dev_s ? 0 : s_total) + (dev_r ? 0 : r_total) + 1);
    if (st != MOE_OK)
        return st;
    if (!dev_s) {
        if ((st = MOE_CUDA_CHECK(cudaMemcpyAsync(c->stage, send, s_total, cudaMemcpyHostToDevice, c->stream))))
            return st;
        sbuf = c->stage;
    }
    if (!dev_r)
        rbuf = (char *)c->stage + (dev_s ? 0 : s_total);
    if ((st = group_exchange(c, sbuf, send_bytes, send_off, rbuf, recv_bytes, recv_off)))
        return st;
    if (!dev_r && (st = MOE_CUDA_CHECK(cudaMemcpyAsync(recv, rbuf, r_total, cudaMemcpyDeviceToHost, c->stream))))
        return st;
    return MOE_CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

static moe_status n_alltoall_int(void *ctx, const int *send, int *recv)
{
    nccl_ctx *c = ctx;
    int bytes[c->size], off[c->size];
    for (int p = 0; p < c->size; p++) {
        bytes[p] = (int)sizeof(int);
        off[p] = p * (int)sizeof(int);
    }
    return n_alltoallv(ctx, send, bytes, off, recv, bytes, off);
}

static moe_status n_allreduce_sum_int(void *ctx, int *value)
{
    nccl_ctx *c = ctx;
    moe_status st = ensure_stage(c, sizeof(int));
    if (st == MOE_OK)
        st = MOE_CUDA_CHECK(cudaMemcpyAsync(c->stage, value, sizeof(int), cudaMemcpyHostToDevice, c->stream));
    if (st == MOE_OK)
        st = NCCL_CHECK(ncclAllReduce(c->stage, c->stage, 1, ncclInt32, ncclSum, c->comm, c->stream));
    if (st == MOE_OK)
        st = MOE_CUDA_CHECK(cudaMemcpyAsync(value, c->stage, sizeof(int), cudaMemcpyDeviceToHost, c->stream));
    if (st == MOE_OK)
        st = MOE_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return st;
}

/* Exactly one of sbuf (send) and rbuf (receive) is non-NULL. */
static moe_status p2p(nccl_ctx *c, const void *sbuf, void *rbuf, int bytes, int peer, moe_comm_req **out)
{
    bool sending = sbuf != NULL;
    const void *buf = sending ? sbuf : rbuf;
    moe_comm_req *r = calloc(1, sizeof *r);
    if (!r)
        return moe_error(MOE_ERR_NOMEM, "nccl: out of memory");
    r->bytes = (size_t)bytes;
    moe_status st = MOE_CUDA_CHECK(cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming));
    const void *dsend = sbuf;
    void *drecv = rbuf;
    if (st == MOE_OK && !is_device_ptr(buf)) {
        st = MOE_CUDA_CHECK(cudaMalloc(&r->dev, (size_t)bytes + 1));
        dsend = drecv = r->dev;
        if (st == MOE_OK && sending)
            st = MOE_CUDA_CHECK(cudaMemcpyAsync(r->dev, sbuf, (size_t)bytes, cudaMemcpyHostToDevice, c->stream));
        if (!sending)
            r->host_dst = rbuf;
    }
    if (st == MOE_OK)
        st = sending ? NCCL_CHECK(ncclSend(dsend, (size_t)bytes, ncclChar, peer, c->comm, c->stream))
                     : NCCL_CHECK(ncclRecv(drecv, (size_t)bytes, ncclChar, peer, c->comm, c->stream));
    if (st == MOE_OK && r->host_dst)
        st = MOE_CUDA_CHECK(cudaMemcpyAsync(r->host_dst, r->dev, (size_t)bytes, cudaMemcpyDeviceToHost, c->stream));
    if (st == MOE_OK)
        st = MOE_CUDA_CHECK(cudaEventRecord(r->done, c->stream));
    if (st != MOE_OK) {
        if (r->dev)
            cudaFree(r->dev);
        free(r);
        return st;
    }
    *out = r;
    return MOE_OK;
}

/* NCCL matches point-to-point by order per peer, not by tag: callers keep one stream of messages
 * per peer in order (as the KV transfer protocol does). */
static moe_status n_isend(void *ctx, const void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    (void)tag;
    return p2p(ctx, buf, NULL, bytes, peer, req);
}

static moe_status n_irecv(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    (void)tag;
    return p2p(ctx, NULL, buf, bytes, peer, req);
}

static void release(moe_comm_req *r)
{
    if (r->pooled) {
        r->in_use = false;
        return;
    }
    cudaEventDestroy(r->done);
    if (r->dev)
        cudaFree(r->dev);
    free(r);
}

/* The event has fired: land a staged host receive (a non-blocking all-to-all-v's; point-to-point
 * receives copy on the stream). */
static moe_status finish(moe_comm_req *r)
{
    moe_status st = MOE_OK;
    if (r->pooled && r->host_dst && r->bytes)
        st = MOE_CUDA_CHECK(cudaMemcpy(r->host_dst, (char *)r->dev + r->dev_off, r->bytes, cudaMemcpyDeviceToHost));
    release(r);
    return st;
}

static moe_status n_test(void *ctx, moe_comm_req *req, bool *done)
{
    (void)ctx;
    cudaError_t rc = cudaEventQuery(req->done);
    *done = rc == cudaSuccess;
    if (rc != cudaSuccess && rc != cudaErrorNotReady)
        return MOE_CUDA_CHECK(rc);
    return *done ? finish(req) : MOE_OK;
}

static moe_status n_wait(void *ctx, moe_comm_req *req)
{
    (void)ctx;
    moe_status st = MOE_CUDA_CHECK(cudaEventSynchronize(req->done));
    moe_status fst = finish(req);
    return st != MOE_OK ? st : fst;
}

static void n_cancel(void *ctx, moe_comm_req *req)
{
    /* NCCL cannot cancel a posted operation: wait for it (the peer posts its side too). */
    n_wait(ctx, req);
}

/* Posts the grouped sends/receives on the stream and records the request's event; host buffers go
 * through the request's own staging buffer (kept between calls), the receive lands in test/wait. */
static moe_status n_ialltoallv(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                               void *recv, const int *recv_bytes, const int *recv_off, moe_comm_req **req)
{
    nccl_ctx *c = ctx;
    moe_comm_req *r = NULL;
    for (int i = 0; i < NCCL_POOL && !r; i++)
        if (!c->pool[i].in_use)
            r = &c->pool[i];
    if (!r)
        return moe_error(MOE_ERR_FULL, "nccl: more than %d non-blocking all-to-alls outstanding", NCCL_POOL);
    size_t s_total = extent(send_bytes, send_off, c->size), r_total = extent(recv_bytes, recv_off, c->size);
    bool dev_s = is_device_ptr(send), dev_r = is_device_ptr(recv);
    size_t need = (dev_s ? 0 : s_total) + (dev_r ? 0 : r_total) + 1;
    moe_status st = MOE_OK;
    if (!r->done)
        st = MOE_CUDA_CHECK(cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming));
    if (st == MOE_OK && need > r->dev_cap) {
        if (r->dev)
            cudaFree(r->dev);
        r->dev = NULL;
        r->dev_cap = 0;
        if ((st = MOE_CUDA_CHECK(cudaMalloc(&r->dev, need))) == MOE_OK)
            r->dev_cap = need;
    }
    if (st != MOE_OK)
        return st;
    r->pooled = true;
    r->host_dst = dev_r ? NULL : recv;
    r->bytes = dev_r ? 0 : r_total;
    r->dev_off = dev_s ? 0 : s_total;
    const char *sbuf = send;
    char *rbuf = dev_r ? recv : (char *)r->dev + r->dev_off;
    if (!dev_s) {
        /* From pageable memory the copy has read `send` when it returns: the caller may reuse it. */
        if ((st = MOE_CUDA_CHECK(cudaMemcpyAsync(r->dev, send, s_total, cudaMemcpyHostToDevice, c->stream))))
            return st;
        sbuf = r->dev;
    }
    st = group_exchange(c, sbuf, send_bytes, send_off, rbuf, recv_bytes, recv_off);
    if (st == MOE_OK)
        st = MOE_CUDA_CHECK(cudaEventRecord(r->done, c->stream));
    if (st != MOE_OK)
        return st;
    r->in_use = true;
    *req = r;
    return MOE_OK;
}

static moe_status n_barrier(void *ctx)
{
    int one = 1;
    return n_allreduce_sum_int(ctx, &one);
}

static void n_destroy(void *ctx)
{
    nccl_ctx *c = ctx;
    ncclCommDestroy(c->comm);
    cudaStreamDestroy(c->stream);
    for (int i = 0; i < NCCL_POOL; i++) {
        if (c->pool[i].done)
            cudaEventDestroy(c->pool[i].done);
        if (c->pool[i].dev)
            cudaFree(c->pool[i].dev);
    }
    if (c->stage)
        cudaFree(c->stage);
    free(c);
}

static const moe_comm_ops nccl_ops = {
    .name = "nccl",
    .rank = n_rank,
    .size = n_size,
    .alltoall_int = n_alltoall_int,
    .alltoallv = n_alltoallv,
    .allreduce_sum_int = n_allreduce_sum_int,
    .isend = n_isend,
    .irecv = n_irecv,
    .test = n_test,
    .cancel = n_cancel,
    .barrier = n_barrier,
    .destroy = n_destroy,
    .ialltoallv = n_ialltoallv,
    .wait = n_wait,
};

moe_status moe_comm_nccl_create(MPI_Comm mpi_comm, int device, moe_comm *out)
{
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        return moe_error(MOE_ERR_UNAVAILABLE, "nccl: no CUDA device visible");
    }
    nccl_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "nccl: out of memory");
    c->device = device;
    MPI_Comm_rank(mpi_comm, &c->rank);
    MPI_Comm_size(mpi_comm, &c->size);
    ncclUniqueId id;
    moe_status st = MOE_OK;
    if (c->rank == 0)
        st = NCCL_CHECK(ncclGetUniqueId(&id));
    /* Everyone takes part in the broadcast even if rank 0 failed, so nobody hangs. */
    int ok = st == MOE_OK, all_ok = 0;
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, mpi_comm);
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, mpi_comm);
    if (!all_ok) {
        free(c);
        return st != MOE_OK ? st : moe_error(MOE_ERR_INTERNAL, "nccl: rank 0 could not create the unique id");
    }
    if ((st = MOE_CUDA_CHECK(cudaSetDevice(device))) != MOE_OK ||
        (st = MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking))) != MOE_OK ||
        (st = NCCL_CHECK(ncclCommInitRank(&c->comm, c->size, id, c->rank))) != MOE_OK) {
        free(c);
        return st;
    }
    MOE_LOG_I("nccl: rank %d of %d on device %d", c->rank, c->size, device);
    *out = (moe_comm){.ops = &nccl_ops, .ctx = c};
    return MOE_OK;
}
