/* Host views of KV block bytes for a transfer (KV hand-off, live migration). The transfer layer
 * (worker/kv_transfer.h) sends, receives and checksums host memory; KV blocks live in the
 * engine's backend buffers (worker/kv_cache.h). A stage bridges the two:
 *  - direct (the pool is host memory: the CPU backend, a host cache): the views are the blocks
 *    themselves, zero copies, as before the backend interface; download and upload do nothing;
 *  - staged (a device pool, CUDA): the views are one host buffer, pinned (the backend's
 *    host_alloc); download copies the blocks' bytes into it through the backend before a send,
 *    upload copies it back after a receive was verified: one asynchronous copy per view
 *    (moe_kv_read_async / moe_kv_write_async) and ONE synchronisation per call.
 * Checksums are computed and verified by the transfer layer on the views, so on a staged path they
 * cover the bytes that crossed the link, and a block whose checksum failed is never uploaded.
 *
 * The regions: n_slices equal slices of each of blocks[0..nb); view s*nb + b is bytes
 * [s*slice_bytes, (s+1)*slice_bytes) of block blocks[b] (slice-major, as the layer-by-layer push
 * sends them: n_slices = n_layers, one layer's K and V per slice). n_slices 1: whole blocks.
 *
 * `staged` forces the staged path on a host pool too: the test hook MOE_TEST_KV_STAGING=1
 * (worker/kv_transfer.h, worker/migrate.h) sets it, so that the CPU integration tests run the
 * code path a device backend takes.
 *
 * A moe_kv_stage is a plain struct owned by the transfer's owner (zero-initialise it); it may be
 * moved (no pointers into itself). Not thread-safe (the engine's thread). */
#ifndef MOE_WORKER_KV_STAGE_H
#define MOE_WORKER_KV_STAGE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"
#include "worker/kv_cache.h"

typedef struct {
    moe_kv_cache *kv;
    bool direct;
    int nb, n_slices;
    size_t slice_bytes;
    int *blocks;               /* [nb] copy of the block ids */
    void **views;              /* [n_slices * nb] */
    unsigned char *buf;        /* staged: n_slices * nb * slice_bytes; NULL when direct */
    const moe_backend_ops *buf_ops; /* buf came from these ops' host_alloc (pinned); NULL: malloc */
    int cap_blocks, cap_views; /* kept across re-opens: a retry allocates nothing */
    size_t cap_buf;
} moe_kv_stage;

/* (Re)opens st over n_slices slices (block bytes divisible by n_slices) of blocks[0..nb) of kv.
 * nb may be 0. Reuses st's buffers. MOE_ERR_INVALID_ARG for a bad slicing or block id,
 * MOE_ERR_NOMEM. On failure st is closed (empty) but its capacity kept. */
moe_status moe_kv_stage_open(moe_kv_stage *st, moe_kv_cache *kv, const int *blocks, int nb,
                             int n_slices, bool staged);
/* The nb views of slice s (host pointers the transfer layer reads or writes). */
void *const *moe_kv_stage_views(const moe_kv_stage *st, int slice);
/* Backend -> views for slices [s0, s0 + n) of every block (ordered after the backend's earlier
 * ops, so a layer's K/V written by this step are included; returns when the views hold them).
 * No-op when direct. */
moe_status moe_kv_stage_download(moe_kv_stage *st, int s0, int n);
/* Views -> backend, every region. No-op when direct (the receives wrote the blocks). */
moe_status moe_kv_stage_upload(moe_kv_stage *st);
/* Frees st's buffers; st is zeroed (may be reopened). */
void moe_kv_stage_free(moe_kv_stage *st);

#endif
