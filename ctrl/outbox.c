/* Non-blocking control sends with their buffers (see ctrl/outbox.h). */
#include "ctrl/outbox.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/grow.h"

moe_status moe_outbox_send_bytes(moe_outbox *ob, int dest, int tag, const void *data, size_t len)
{
    if (len > INT_MAX)
        return moe_error(MOE_ERR_RANGE, "control message of %zu bytes is too large", len);
    /* The three arrays grow in step: moe_grow picks the same capacity from the same (cap, need). */
    int cap_req = ob->cap, cap_buf = ob->cap, cap_done = ob->cap;
    if (!moe_grow((void **)&ob->req, &cap_req, ob->n + 1, sizeof *ob->req) ||
        !moe_grow((void **)&ob->buf, &cap_buf, ob->n + 1, sizeof *ob->buf) ||
        !moe_grow((void **)&ob->done, &cap_done, ob->n + 1, sizeof *ob->done))
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    ob->cap = cap_req;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    if (len)
        memcpy(buf, data, len);
    int rc = MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, ob->comm, &ob->req[ob->n]);
    if (rc != MPI_SUCCESS) {
        free(buf);
        return moe_error(MOE_ERR_INTERNAL, "MPI_Isend of %zu bytes (tag %d) to rank %d failed (error %d)",
                         len, tag, dest, rc);
    }
    ob->buf[ob->n++] = buf;
    return MOE_OK;
}

void moe_outbox_progress(moe_outbox *ob)
{
    if (ob->n == 0)
        return;
    int n_done = 0;
    if (MPI_Testsome(ob->n, ob->req, &n_done, ob->done, MPI_STATUSES_IGNORE) != MPI_SUCCESS ||
        n_done <= 0)
        return;
    for (int i = 0; i < n_done; i++) {
        free(ob->buf[ob->done[i]]);
        ob->buf[ob->done[i]] = NULL;
    }
    int kept = 0; /* completed requests are MPI_REQUEST_NULL now: keep the rest in order */
    for (int i = 0; i < ob->n; i++)
        if (ob->buf[i]) {
            ob->req[kept] = ob->req[i];
            ob->buf[kept++] = ob->buf[i];
        }
    ob->n = kept;
}

void moe_outbox_flush(moe_outbox *ob, int timeout_ms)
{
    int64_t end = moe_now_ns() + (int64_t)timeout_ms * 1000000;
    while (ob->n > 0 && moe_now_ns() < end) {
        moe_outbox_progress(ob);
        if (ob->n)
            moe_sleep_ns(100000);
    }
}

void moe_outbox_free(moe_outbox *ob)
{
    for (int i = 0; i < ob->n; i++) {
        MPI_Cancel(&ob->req[i]);
        MPI_Request_free(&ob->req[i]);
    }
    free(ob->req);
    free(ob->buf);
    free(ob->done);
    *ob = (moe_outbox){.comm = ob->comm};
}
