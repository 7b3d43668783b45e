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
    if (!moe_grow((void **)&ob->v, &ob->cap, ob->n + 1, sizeof *ob->v))
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    if (len)
        memcpy(buf, data, len);
    moe_outbox_msg *o = &ob->v[ob->n];
    int rc = MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, ob->comm, &o->r);
    if (rc != MPI_SUCCESS) {
        free(buf);
        return moe_error(MOE_ERR_INTERNAL, "MPI_Isend of %zu bytes (tag %d) to rank %d failed (error %d)",
                         len, tag, dest, rc);
    }
    o->buf = buf;
    ob->n++;
    return MOE_OK;
}

void moe_outbox_progress(moe_outbox *ob)
{
    for (int i = 0; i < ob->n;) {
        int flag = 0;
        MPI_Test(&ob->v[i].r, &flag, MPI_STATUS_IGNORE);
        if (flag) {
            free(ob->v[i].buf);
            ob->v[i] = ob->v[--ob->n];
        } else {
            i++;
        }
    }
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
        MPI_Cancel(&ob->v[i].r);
        MPI_Request_free(&ob->v[i].r);
    }
    free(ob->v);
    *ob = (moe_outbox){.comm = ob->comm};
}
