/* UCX backend of the comm vtable (worker/comm_ucx.h): point-to-point KV bytes between cluster
 * members with UCX's TAG API on the link's worker; a lost peer fails the operation instead of
 * hanging it. */
#include "worker/comm_ucx.h"

#include <stdint.h>
#include <stdlib.h>
#include <ucp/api/ucp.h>

#include "common/clock.h"
#include "common/log.h"
#include "ctrl/link_ucx.h"

struct moe_comm_req {
    void *r; /* UCX request; NULL when it completed at once */
    int peer, tag;
    bool recv;
    int bytes;
};

typedef struct {
    moe_link *link;
    ucp_worker_h w;
} uc_ctx;

#define UC_CANCEL_RECV_MS 2000 /* a cancelled receive completes in the next progress, normally */
#define UC_CANCEL_SEND_MS 200  /* a send a live peer does not take cannot be recalled */

static uint64_t tag_of(int src, int tag)
{
    return (uint64_t)(uint32_t)src << 32 | (uint32_t)tag;
}

static int uc_rank(void *ctx)
{
    return moe_link_self(((uc_ctx *)ctx)->link);
}

static int uc_size(void *ctx)
{
    (void)ctx;
    return 0;
}

static moe_status unsupported(const char *what)
{
    return moe_error(MOE_ERR_UNSUPPORTED, "comm ucx: %s is not supported (point to point only)",
                     what);
}

static moe_status uc_alltoall_int(void *ctx, const int *send, int *recv)
{
    (void)ctx, (void)send, (void)recv;
    return unsupported("alltoall_int");
}

static moe_status uc_alltoallv(void *ctx, const void *send, const int *sb, const int *so,
                               void *recv, const int *rb, const int *ro)
{
    (void)ctx, (void)send, (void)sb, (void)so, (void)recv, (void)rb, (void)ro;
    return unsupported("alltoallv");
}

static moe_status uc_allreduce(void *ctx, int *value)
{
    (void)ctx, (void)value;
    return unsupported("allreduce_sum_int");
}

static moe_status uc_barrier(void *ctx)
{
    (void)ctx;
    return unsupported("barrier");
}

static moe_status post(uc_ctx *c, bool recv, void *buf, int bytes, int peer, int tag,
                       moe_comm_req **req)
{
    *req = NULL;
    if (bytes < 0)
        return moe_error(MOE_ERR_INVALID_ARG, "comm ucx: %d bytes", bytes);
    /* The endpoint also for a receive: it is how a peer's death reaches us as an error. */
    ucp_ep_h ep = moe_link_ucx_ep(c->link, peer);
    if (!ep)
        return moe_error(MOE_ERR_UNAVAILABLE, "comm ucx: member %d is unknown or lost (%s of tag %d)",
                         peer, recv ? "receive" : "send", tag);
    moe_comm_req *q = malloc(sizeof *q);
    if (!q)
        return moe_error(MOE_ERR_NOMEM, "comm ucx: out of memory for a request");
    *q = (moe_comm_req){.peer = peer, .tag = tag, .recv = recv, .bytes = bytes};
    ucp_request_param_t prm = {.op_attr_mask = 0};
    void *r = recv ? ucp_tag_recv_nbx(c->w, buf, (size_t)bytes, tag_of(peer, tag), UINT64_MAX, &prm)
                   : ucp_tag_send_nbx(ep, buf, (size_t)bytes, tag_of(moe_link_self(c->link), tag),
                                      &prm);
    if (UCS_PTR_IS_ERR(r)) {
        free(q);
        return moe_error(MOE_ERR_UNAVAILABLE, "comm ucx: %s of %d bytes (tag %d) %s member %d: %s",
                         recv ? "receive" : "send", bytes, tag, recv ? "from" : "to", peer,
                         ucs_status_string(UCS_PTR_STATUS(r)));
    }
    q->r = r;
    *req = q;
    return MOE_OK;
}

static moe_status uc_isend(void *ctx, const void *buf, int bytes, int peer, int tag,
                           moe_comm_req **req)
{
    /* UCX reads, never writes, a send buffer; its API takes void *. */
    union {
        const void *c;
        void *m;
    } u = {.c = buf};
    return post(ctx, false, u.m, bytes, peer, tag, req);
}

static moe_status uc_irecv(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    return post(ctx, true, buf, bytes, peer, tag, req);
}

static ucs_status_t status_of(const moe_comm_req *q, size_t *len)
{
    if (!q->recv)
        return ucp_request_check_status(q->r);
    ucp_tag_recv_info_t info = {0};
    ucs_status_t s = ucp_tag_recv_request_test(q->r, &info);
    *len = info.length;
    return s;
}

/* Cancels (a receive) and waits until UCX is done with the buffer, or gives up after ms. */
static void finish(uc_ctx *c, moe_comm_req *q, int ms)
{
    size_t len = 0;
    if (status_of(q, &len) == UCS_INPROGRESS) {
        ucp_request_cancel(c->w, q->r);
        int64_t end = moe_now_ns() + (int64_t)ms * 1000000;
        while (status_of(q, &len) == UCS_INPROGRESS && moe_now_ns() < end)
            moe_link_progress(c->link);
        if (status_of(q, &len) == UCS_INPROGRESS)
            MOE_LOG_W("comm ucx: a %s of tag %d %s member %d did not end within %d ms; detached",
                      q->recv ? "receive" : "send", q->tag, q->recv ? "from" : "to", q->peer, ms);
    }
    ucp_request_free(q->r); /* an unfinished one is released by UCX when it ends */
    q->r = NULL;
}

static moe_status uc_test(void *ctx, moe_comm_req *q, bool *done)
{
    uc_ctx *c = ctx;
    *done = false;
    if (!q->r) {
        free(q);
        *done = true;
        return MOE_OK;
    }
    moe_link_progress(c->link);
    size_t len = (size_t)q->bytes;
    ucs_status_t s = status_of(q, &len);
    if (s == UCS_INPROGRESS) {
        if (moe_link_ucx_ep(c->link, q->peer))
            return MOE_OK;
        finish(c, q, UC_CANCEL_RECV_MS); /* the peer is gone: its bytes will never come */
        moe_status st = moe_error(MOE_ERR_UNAVAILABLE,
                                  "comm ucx: member %d lost with a %d-byte %s of tag %d in flight",
                                  q->peer, q->bytes, q->recv ? "receive" : "send", q->tag);
        free(q);
        return st;
    }
    ucp_request_free(q->r);
    moe_status st = MOE_OK;
    if (s != UCS_OK)
        st = moe_error(MOE_ERR_UNAVAILABLE, "comm ucx: %s of %d bytes (tag %d) %s member %d: %s",
                       q->recv ? "receive" : "send", q->bytes, q->tag, q->recv ? "from" : "to",
                       q->peer, ucs_status_string(s));
    else if (q->recv && len != (size_t)q->bytes)
        st = moe_error(MOE_ERR_FORMAT, "comm ucx: received %zu bytes of tag %d from member %d, "
                       "expected %d", len, q->tag, q->peer, q->bytes);
    *done = st == MOE_OK;
    free(q);
    return st;
}

static void uc_cancel(void *ctx, moe_comm_req *q)
{
    uc_ctx *c = ctx;
    if (!q)
        return;
    if (q->r)
        finish(c, q, q->recv || !moe_link_ucx_ep(c->link, q->peer) ? UC_CANCEL_RECV_MS
                                                                    : UC_CANCEL_SEND_MS);
    free(q);
}

static void uc_destroy(void *ctx)
{
    free(ctx);
}

static const moe_comm_ops uc_ops = {
    .name = "ucx",
    .rank = uc_rank,
    .size = uc_size,
    .alltoall_int = uc_alltoall_int,
    .alltoallv = uc_alltoallv,
    .allreduce_sum_int = uc_allreduce,
    .isend = uc_isend,
    .irecv = uc_irecv,
    .test = uc_test,
    .cancel = uc_cancel,
    .barrier = uc_barrier,
    .destroy = uc_destroy,
    .ialltoallv = NULL,
    .wait = NULL,
};

moe_status moe_comm_ucx_create(moe_link *link, moe_comm *out)
{
    ucp_worker_h w = moe_link_ucx_worker(link);
    if (!w)
        return moe_error(MOE_ERR_INVALID_ARG, "comm ucx: the link is not a UCX link");
    uc_ctx *c = malloc(sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "comm ucx: out of memory");
    *c = (uc_ctx){.link = link, .w = w};
    *out = (moe_comm){.ops = &uc_ops, .ctx = c};
    return MOE_OK;
}
