/* The communication backend of a group of ranks (an instance's EP group, or a pool): a vtable
 * plus a context, so the engine never calls MPI or NCCL directly. Backends: MPI (worker/comm_mpi.c,
 * always), NCCL (with CUDA), loopback (threads of one process; tests). Byte counts and offsets are
 * int because MPI 3.1 counts are int (2 GiB per peer per call is far beyond one step's traffic).
 * Slots added after `destroy` may be NULL in older or test backends: check before calling. */
#ifndef MOE_WORKER_COMM_H
#define MOE_WORKER_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include "common/status.h"

typedef struct moe_comm_req moe_comm_req; /* an outstanding non-blocking operation */

typedef struct {
    const char *name; /* "mpi", "nccl", "loopback" */
    /* This rank's index in the group and the group's size. */
    int (*rank)(void *ctx);
    int (*size)(void *ctx);
    /* Collective: every rank sends send[p] to peer p and receives recv[p] from it (one int each). */
    moe_status (*alltoall_int)(void *ctx, const int *send, int *recv);
    /* Collective: bytes send[send_off[p] .. + send_bytes[p]) go to peer p, which receives them at
     * recv[recv_off[src] ..]. Blocking. Buffers do not overlap. */
    moe_status (*alltoallv)(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                            void *recv, const int *recv_bytes, const int *recv_off);
    /* Collective: sum of one int over the group (e.g. "does anyone have work this step"). */
    moe_status (*allreduce_sum_int)(void *ctx, int *value);
    /* Point to point, non-blocking; *req is released by test() returning done or by cancel(). */
    moe_status (*isend)(void *ctx, const void *buf, int bytes, int peer, int tag, moe_comm_req **req);
    moe_status (*irecv)(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req);
    /* Advances req; sets *done and releases it when complete. */
    moe_status (*test)(void *ctx, moe_comm_req *req, bool *done);
    /* Releases req. A receive's buffer is no longer written once this returns (a receive
     * already matched is waited for, boundedly; a backend that gives up says so in the log),
     * so the caller may reuse it at once; a send may be detached (its buffer must stay mapped). */
    void (*cancel)(void *ctx, moe_comm_req *req);
    moe_status (*barrier)(void *ctx);
    /* Frees ctx (not the underlying communicator, which the creator owns). */
    void (*destroy)(void *ctx);
    /* Collective, non-blocking all-to-all-v: the arguments of alltoallv, but it returns at once
     * with *req, which test() (done) or wait() completes and releases; cancel() waits for it (a
     * collective cannot be abandoned). Until then the caller leaves the send and receive buffers
     * and the four count/offset arrays alone (MPI reads the arrays late). Every rank posts its
     * collectives, blocking or not, in the same order. No backend progresses on its own (Open MPI
     * has no progress thread; loopback copies inside test): call test() while computing, or the
     * transfer only happens in wait(). Backends keep at most 8 outstanding per rank. NULL where a
     * backend has none: callers fall back to alltoallv. */
    moe_status (*ialltoallv)(void *ctx, const void *send, const int *send_bytes, const int *send_off,
                             void *recv, const int *recv_bytes, const int *recv_off, moe_comm_req **req);
    /* Blocks until req completes and releases it. NULL where a backend has none: loop on test(). */
    moe_status (*wait)(void *ctx, moe_comm_req *req);
} moe_comm_ops;

typedef struct {
    const moe_comm_ops *ops;
    void *ctx;
} moe_comm;

static inline int moe_comm_rank(const moe_comm *c) { return c->ops->rank(c->ctx); }
static inline int moe_comm_size(const moe_comm *c) { return c->ops->size(c->ctx); }

/* Loopback backend: n communicators for n threads of this process (index i is rank i). Collective
 * calls must be made by all n threads. Returns an array of n comms (free with
 * moe_comm_loopback_free). Point-to-point is not supported by loopback (UNSUPPORTED). */
moe_status moe_comm_loopback_create(int n, moe_comm **comms);
void moe_comm_loopback_free(moe_comm *comms, int n);

#endif
