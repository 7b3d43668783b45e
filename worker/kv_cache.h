/* Paged KV cache: a pool of fixed-size blocks with reference counts and a free list, and the
 * per-sequence block tables that index it. A block holds every layer's K and V for block_size
 * token positions, laid out identically on every rank, so one block is one contiguous buffer that
 * can be sent between ranks as is:
 *     block[layer][0=K,1=V][kv_head][slot][head_dim]   (f32)
 * Not thread-safe: owned by the engine's thread. */
#ifndef MOE_WORKER_KV_CACHE_H
#define MOE_WORKER_KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "common/status.h"
#include "worker/compute/backend.h"

typedef struct {
    int n_layers;
    int n_kv_heads;
    int head_dim;
    int block_size; /* token positions per block */
} moe_kv_layout;

typedef struct moe_kv_cache moe_kv_cache;

/* Floats / bytes in one block of this layout. */
size_t moe_kv_block_floats(const moe_kv_layout *lay);
size_t moe_kv_block_bytes(const moe_kv_layout *lay);

/* Creates a cache of n_blocks blocks (> 0). The pool is one allocation, touched lazily. */
moe_status moe_kv_create(const moe_kv_layout *lay, int n_blocks, moe_kv_cache **out);
/* The same with the pool in backend be's memory (be not owned, must outlive the cache). Block
 * pointers (moe_kv_block_data / _k / _v) are then backend memory: host code may dereference them
 * only when moe_kv_host_access says so, else it goes through moe_kv_read / moe_kv_write. */
moe_status moe_kv_create_on(moe_backend *be, const moe_kv_layout *lay, int n_blocks, moe_kv_cache **out);
void moe_kv_free(moe_kv_cache *kv);
/* The pool (backend memory, n_blocks contiguous blocks), for the forward pass's ops. */
float *moe_kv_pool(moe_kv_cache *kv);
/* Whether the host can read and write block memory directly (a host cache or the CPU backend). */
bool moe_kv_host_access(const moe_kv_cache *kv);
/* Copies bytes [off, off + n) of block `block` to host dst (read) or from host src (write),
 * through the backend (staged through host memory on device backends). */
moe_status moe_kv_read(moe_kv_cache *kv, int block, size_t off, void *dst, size_t n);
moe_status moe_kv_write(moe_kv_cache *kv, int block, size_t off, const void *src, size_t n);
/* The same without waiting (the backend's upload_async / download_async): dst must not be read,
 * src not changed, until moe_kv_sync returns. A batch of block copies then costs one
 * synchronisation; from pinned host memory (the backend's host_alloc) the copies overlap. */
moe_status moe_kv_read_async(moe_kv_cache *kv, int block, size_t off, void *dst, size_t n);
moe_status moe_kv_write_async(moe_kv_cache *kv, int block, size_t off, const void *src, size_t n);
/* Waits for every copy and op issued on the cache's backend; its first failure. */
moe_status moe_kv_sync(moe_kv_cache *kv);
/* The backend the pool lives on; NULL for a cache of its own host memory (moe_kv_create). */
moe_backend *moe_kv_backend(const moe_kv_cache *kv);

const moe_kv_layout *moe_kv_get_layout(const moe_kv_cache *kv);
int moe_kv_total_blocks(const moe_kv_cache *kv);
int moe_kv_free_blocks(const moe_kv_cache *kv);
int moe_kv_used_blocks(const moe_kv_cache *kv);
/* Blocks needed to hold n_tokens positions. */
int moe_kv_blocks_for(const moe_kv_cache *kv, int n_tokens);

/* Takes a free block with refcount 1; -1 when none is free. */
int moe_kv_block_alloc(moe_kv_cache *kv);
void moe_kv_block_ref(moe_kv_cache *kv, int block);
/* Drops one reference; the block returns to the free list at zero. */
void moe_kv_block_unref(moe_kv_cache *kv, int block);
int moe_kv_block_refcount(const moe_kv_cache *kv, int block);

/* The whole block as one contiguous buffer (moe_kv_block_floats floats). */
float *moe_kv_block_data(moe_kv_cache *kv, int block);
/* Base of K (or V) of `layer` inside `block`: kv head h, slot s is at base + (h*block_size + s)*head_dim. */
float *moe_kv_block_k(moe_kv_cache *kv, int block, int layer);
float *moe_kv_block_v(moe_kv_cache *kv, int block, int layer);

/* A sequence's block table. Zero-initialise before first use. */
typedef struct {
    int *blocks;   /* [n_blocks] block ids, in position order */
    int n_blocks;
    int cap;
} moe_kv_seq;

/* Makes the table hold at least n_tokens positions, allocating blocks as needed. All or nothing:
 * on MOE_ERR_FULL (not enough free blocks) or MOE_ERR_NOMEM the table is unchanged. */
moe_status moe_kv_seq_reserve(moe_kv_cache *kv, moe_kv_seq *seq, int n_tokens);
/* Makes `to` (empty) hold the first n_tokens positions of `from` without recomputing them: the
 * full blocks are shared (one more reference each: they are never written again, since a
 * sequence only appends), the last, partial one is copied (both will append into it). All or
 * nothing: MOE_ERR_FULL when no block is free for the copy, MOE_ERR_NOMEM. */
moe_status moe_kv_seq_fork(moe_kv_cache *kv, const moe_kv_seq *from, int n_tokens, moe_kv_seq *to);
/* Drops the sequence's references to all its blocks and frees the table. */
void moe_kv_seq_release(moe_kv_cache *kv, moe_kv_seq *seq);

#endif
