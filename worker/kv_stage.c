/* Host views of KV block bytes for transfers: zero-copy on host pools, staged otherwise. */
#include "worker/kv_stage.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"

static void free_buf(moe_kv_stage *st)
{
    if (st->buf_ops)
        st->buf_ops->host_free(NULL, st->buf); /* be unused: the backend may be gone (backend.h) */
    else
        free(st->buf);
    st->buf = NULL;
    st->buf_ops = NULL;
    st->cap_buf = 0;
}

moe_status moe_kv_stage_open(moe_kv_stage *st, moe_kv_cache *kv, const int *blocks, int nb,
                             int n_slices, bool staged)
{
    st->nb = 0;
    st->n_slices = 0;
    st->kv = kv;
    size_t block_bytes = moe_kv_block_bytes(moe_kv_get_layout(kv));
    if (nb < 0 || n_slices <= 0 || block_bytes % (size_t)n_slices != 0)
        return moe_error(MOE_ERR_INVALID_ARG, "kv stage: %d blocks in %d slices of %zu-byte blocks",
                         nb, n_slices, block_bytes);
    for (int b = 0; b < nb; b++)
        if (blocks[b] < 0 || blocks[b] >= moe_kv_total_blocks(kv))
            return moe_error(MOE_ERR_INVALID_ARG, "kv stage: block id %d outside the pool of %d",
                             blocks[b], moe_kv_total_blocks(kv));
    size_t slice = block_bytes / (size_t)n_slices, n_views = (size_t)n_slices * (size_t)nb;
    bool direct = moe_kv_host_access(kv) && !staged;
    if (n_views > (size_t)INT32_MAX / 2 ||
        !moe_grow((void **)&st->blocks, &st->cap_blocks, nb ? nb : 1, sizeof *st->blocks) ||
        !moe_grow((void **)&st->views, &st->cap_views, n_views ? (int)n_views : 1,
                  sizeof *st->views))
        return moe_error(MOE_ERR_NOMEM, "kv stage: out of memory for %zu views", n_views);
    if (!direct && n_views * slice > st->cap_buf) {
        /* exact size, not doubled: a staging buffer is a sequence's whole KV. Pinned when the pool
         * is a backend's, so that the block copies are truly asynchronous; the old contents are
         * not needed (every view is downloaded or received before it is read). */
        free_buf(st);
        moe_backend *be = moe_kv_backend(kv);
        st->buf = be ? be->ops->host_alloc(be, n_views * slice) : malloc(n_views * slice);
        if (!st->buf)
            return moe_error(MOE_ERR_NOMEM, "kv stage: out of memory for %zu views of %zu bytes",
                             n_views, slice);
        st->buf_ops = be ? be->ops : NULL;
        st->cap_buf = n_views * slice;
    }
    if (nb)
        memcpy(st->blocks, blocks, (size_t)nb * sizeof *blocks);
    for (int s = 0; s < n_slices; s++)
        for (int b = 0; b < nb; b++) {
            size_t i = (size_t)s * (size_t)nb + (size_t)b;
            st->views[i] =
                direct ? (void *)((char *)moe_kv_block_data(kv, blocks[b]) + (size_t)s * slice)
                       : (void *)(st->buf + i * slice);
        }
    st->direct = direct;
    st->nb = nb;
    st->n_slices = n_slices;
    st->slice_bytes = slice;
    return MOE_OK;
}

void *const *moe_kv_stage_views(const moe_kv_stage *st, int slice)
{
    return st->views + (size_t)slice * (size_t)st->nb;
}

moe_status moe_kv_stage_download(moe_kv_stage *st, int s0, int n)
{
    if (s0 < 0 || n < 0 || s0 + n > st->n_slices)
        return moe_error(MOE_ERR_RANGE, "kv stage: slices %d+%d of %d", s0, n, st->n_slices);
    if (st->direct)
        return MOE_OK;
    for (int s = s0; s < s0 + n; s++)
        for (int b = 0; b < st->nb; b++) {
            moe_status rc =
                moe_kv_read_async(st->kv, st->blocks[b], (size_t)s * st->slice_bytes,
                                  st->views[(size_t)s * (size_t)st->nb + (size_t)b], st->slice_bytes);
            if (rc != MOE_OK) {
                (void)moe_kv_sync(st->kv); /* copies already queued still write the views */
                return rc;
            }
        }
    return moe_kv_sync(st->kv);
}

moe_status moe_kv_stage_upload(moe_kv_stage *st)
{
    if (st->direct)
        return MOE_OK;
    for (int s = 0; s < st->n_slices; s++)
        for (int b = 0; b < st->nb; b++) {
            moe_status rc =
                moe_kv_write_async(st->kv, st->blocks[b], (size_t)s * st->slice_bytes,
                                   st->views[(size_t)s * (size_t)st->nb + (size_t)b], st->slice_bytes);
            if (rc != MOE_OK) {
                (void)moe_kv_sync(st->kv); /* copies already queued still read the views */
                return rc;
            }
        }
    /* the views may be reused or freed once this returns: wait for the copies to read them */
    return moe_kv_sync(st->kv);
}

void moe_kv_stage_free(moe_kv_stage *st)
{
    free(st->blocks);
    free(st->views);
    free_buf(st);
    *st = (moe_kv_stage){0};
}
