/* The cluster link over MPI (ctrl/link_mpi.h): MPI_Isend through the outbox, MPI_Iprobe/MPI_Recv
 * with MPI_ANY_TAG so that one sender's messages keep their order whatever their kind. */
#include "ctrl/link_mpi.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "ctrl/outbox.h"

typedef struct {
    MPI_Comm comm;
    int self, size;
    moe_outbox ob;
    uint8_t *buf; /* the last received message (valid until the next poll) */
    size_t cap;
    char host[MPI_MAX_PROCESSOR_NAME];
} link_mpi;

static moe_status m_send(void *ctx, int dest, int tag, const void *buf, size_t len)
{
    link_mpi *l = ctx;
    if (dest < 0 || dest >= l->size)
        return moe_error(MOE_ERR_UNAVAILABLE, "no member %d (the MPI job has %d ranks)", dest,
                         l->size);
    return moe_outbox_send_bytes(&l->ob, dest, tag, buf, len);
}

static bool m_poll(void *ctx, moe_link_event *ev)
{
    link_mpi *l = ctx;
    moe_outbox_progress(&l->ob);
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, l->comm, &flag, &st) != MPI_SUCCESS || !flag)
        return false;
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    if ((size_t)count > l->cap) {
        uint8_t *nb = realloc(l->buf, (size_t)count);
        if (!nb) {
            MOE_LOG_E("out of memory for a %d-byte control message", count);
            return false;
        }
        l->buf = nb;
        l->cap = (size_t)count;
    }
    if (MPI_Recv(l->buf, count, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG, l->comm,
                 MPI_STATUS_IGNORE) != MPI_SUCCESS)
        return false;
    *ev = (moe_link_event){.kind = MOE_LINK_MSG,
                           .src = st.MPI_SOURCE,
                           .tag = st.MPI_TAG,
                           .buf = l->buf,
                           .len = (size_t)count};
    return true;
}

static void m_progress(void *ctx)
{
    link_mpi *l = ctx;
    moe_outbox_progress(&l->ob);
}

static void m_flush(void *ctx, int timeout_ms)
{
    link_mpi *l = ctx;
    moe_outbox_flush(&l->ob, timeout_ms);
}

static moe_status m_fence(void *ctx, int member)
{
    (void)ctx;
    return moe_error(MOE_ERR_UNSUPPORTED,
                     "member %d: an mpirun job is one failure domain; its ranks cannot be fenced",
                     member);
}

static int m_self(void *ctx)
{
    return ((link_mpi *)ctx)->self;
}

static const char *m_host(void *ctx, int member)
{
    link_mpi *l = ctx;
    return member == l->self ? l->host : "";
}

static void m_destroy(void *ctx)
{
    link_mpi *l = ctx;
    moe_outbox_free(&l->ob);
    free(l->buf);
    free(l);
}

static const moe_link_ops mpi_ops = {.name = "mpi",
                                     .send = m_send,
                                     .poll = m_poll,
                                     .progress = m_progress,
                                     .flush = m_flush,
                                     .fence = m_fence,
                                     .self = m_self,
                                     .host = m_host,
                                     .destroy = m_destroy};

moe_status moe_link_mpi_create(MPI_Comm comm, moe_link **out)
{
    link_mpi *l = calloc(1, sizeof *l);
    moe_link *k = calloc(1, sizeof *k);
    if (!l || !k) {
        free(l);
        free(k);
        return moe_error(MOE_ERR_NOMEM, "MPI link: out of memory");
    }
    l->comm = comm;
    l->ob.comm = comm;
    MPI_Comm_rank(comm, &l->self);
    MPI_Comm_size(comm, &l->size);
    int n = 0;
    MPI_Get_processor_name(l->host, &n);
    k->ops = &mpi_ops;
    k->ctx = l;
    *out = k;
    return MOE_OK;
}
