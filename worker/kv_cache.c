/* Paged KV cache: block pool, free list, reference counts, per-sequence block tables. */
#include "worker/kv_cache.h"

#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "common/log.h"

struct moe_kv_cache {
    moe_kv_layout lay;
    size_t block_floats;
    int n_blocks;
    float *pool;       /* n_blocks * block_floats, anonymous mmap: pages touched on first write */
    size_t pool_bytes;
    int *refcount;     /* [n_blocks] */
    int *free_stack;   /* [n_blocks] free block ids; top at n_free - 1 */
    int n_free;
    moe_backend *be;   /* NULL: the pool is this file's own mmap */
};

size_t moe_kv_block_floats(const moe_kv_layout *lay)
{
    return (size_t)lay->n_layers * 2 * (size_t)lay->n_kv_heads * (size_t)lay->block_size *
           (size_t)lay->head_dim;
}

size_t moe_kv_block_bytes(const moe_kv_layout *lay) { return moe_kv_block_floats(lay) * sizeof(float); }

moe_status moe_kv_create(const moe_kv_layout *lay, int n_blocks, moe_kv_cache **out)
{
    return moe_kv_create_on(NULL, lay, n_blocks, out);
}

moe_status moe_kv_create_on(moe_backend *be, const moe_kv_layout *lay, int n_blocks, moe_kv_cache **out)
{
    if (n_blocks <= 0 || lay->n_layers <= 0 || lay->n_kv_heads <= 0 || lay->head_dim <= 0 ||
        lay->block_size <= 0)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "kv cache: bad layout (blocks %d, layers %d, kv heads %d, head dim %d, "
                         "block size %d)",
                         n_blocks, lay->n_layers, lay->n_kv_heads, lay->head_dim, lay->block_size);
    moe_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv)
        return moe_error(MOE_ERR_NOMEM, "kv cache: out of memory");
    kv->lay = *lay;
    kv->block_floats = moe_kv_block_floats(lay);
    kv->n_blocks = n_blocks;
    kv->pool_bytes = kv->block_floats * sizeof(float) * (size_t)n_blocks;
    kv->be = be;
    void *p = be ? be->ops->alloc(be, kv->pool_bytes)
                 : mmap(NULL, kv->pool_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!p)
        p = MAP_FAILED;
    kv->refcount = calloc((size_t)n_blocks, sizeof(int));
    kv->free_stack = malloc((size_t)n_blocks * sizeof(int));
    if (p == MAP_FAILED || !kv->refcount || !kv->free_stack) {
        if (p != MAP_FAILED && be)
            be->ops->free(be, p);
        else if (p != MAP_FAILED)
            munmap(p, kv->pool_bytes);
        size_t bytes = kv->pool_bytes;
        free(kv->refcount);
        free(kv->free_stack);
        free(kv);
        return moe_error(MOE_ERR_NOMEM, "kv cache: cannot allocate %d blocks (%zu bytes) on %s", n_blocks,
                         bytes, be ? be->name : "the host");
    }
    kv->pool = p;
    /* Low ids on top so that allocation order is predictable (helps debugging and tests). */
    for (int i = 0; i < n_blocks; i++)
        kv->free_stack[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    *out = kv;
    return MOE_OK;
}

void moe_kv_free(moe_kv_cache *kv)
{
    if (!kv)
        return;
    if (kv->be)
        kv->be->ops->free(kv->be, kv->pool);
    else
        munmap(kv->pool, kv->pool_bytes);
    free(kv->refcount);
    free(kv->free_stack);
    free(kv);
}

float *moe_kv_pool(moe_kv_cache *kv) { return kv->pool; }

bool moe_kv_host_access(const moe_kv_cache *kv)
{
    return !kv->be || kv->be->ops->host_ptr(kv->be, kv->pool) != NULL;
}

static moe_status check_span(const moe_kv_cache *kv, int block, size_t off, size_t n)
{
    if (block < 0 || block >= kv->n_blocks || off > kv->block_floats * sizeof(float) ||
        n > kv->block_floats * sizeof(float) - off)
        return moe_error(MOE_ERR_RANGE, "kv cache: bytes %zu+%zu of block %d outside %d blocks of %zu bytes",
                         off, n, block, kv->n_blocks, kv->block_floats * sizeof(float));
    return MOE_OK;
}

/* One copy between a span of a block and host memory: memcpy on a host pool, else the backend's
 * copy (`to_host`: download, else upload; `async`: the stream-ordered variant). */
static moe_status copy_span(moe_kv_cache *kv, int block, size_t off, void *host, size_t n,
                            bool to_host, bool async)
{
    moe_status st = check_span(kv, block, off, n);
    if (st != MOE_OK)
        return st;
    char *span = (char *)moe_kv_block_data(kv, block) + off;
    if (!kv->be) {
        memcpy(to_host ? host : span, to_host ? span : host, n);
        return MOE_OK;
    }
    const moe_backend_ops *o = kv->be->ops;
    if (to_host)
        return (async ? o->download_async : o->download)(kv->be, host, span, n);
    return (async ? o->upload_async : o->upload)(kv->be, span, host, n);
}

moe_status moe_kv_read(moe_kv_cache *kv, int block, size_t off, void *dst, size_t n)
{
    return copy_span(kv, block, off, dst, n, true, false);
}

moe_status moe_kv_write(moe_kv_cache *kv, int block, size_t off, const void *src, size_t n)
{
    return copy_span(kv, block, off, (void *)(uintptr_t)src, n, false, false);
}

moe_status moe_kv_read_async(moe_kv_cache *kv, int block, size_t off, void *dst, size_t n)
{
    return copy_span(kv, block, off, dst, n, true, true);
}

moe_status moe_kv_write_async(moe_kv_cache *kv, int block, size_t off, const void *src, size_t n)
{
    return copy_span(kv, block, off, (void *)(uintptr_t)src, n, false, true);
}

moe_status moe_kv_sync(moe_kv_cache *kv) { return kv->be ? kv->be->ops->synchronize(kv->be) : MOE_OK; }

moe_backend *moe_kv_backend(const moe_kv_cache *kv) { return kv->be; }

const moe_kv_layout *moe_kv_get_layout(const moe_kv_cache *kv) { return &kv->lay; }
int moe_kv_total_blocks(const moe_kv_cache *kv) { return kv->n_blocks; }
int moe_kv_free_blocks(const moe_kv_cache *kv) { return kv->n_free; }
int moe_kv_used_blocks(const moe_kv_cache *kv) { return kv->n_blocks - kv->n_free; }

int moe_kv_blocks_for(const moe_kv_cache *kv, int n_tokens)
{
    return (n_tokens + kv->lay.block_size - 1) / kv->lay.block_size;
}

int moe_kv_block_alloc(moe_kv_cache *kv)
{
    if (kv->n_free == 0)
        return -1;
    int b = kv->free_stack[--kv->n_free];
    kv->refcount[b] = 1;
    return b;
}

void moe_kv_block_ref(moe_kv_cache *kv, int block)
{
    MOE_ASSERT(block >= 0 && block < kv->n_blocks && kv->refcount[block] > 0);
    kv->refcount[block]++;
}

void moe_kv_block_unref(moe_kv_cache *kv, int block)
{
    MOE_ASSERT(block >= 0 && block < kv->n_blocks && kv->refcount[block] > 0);
    if (--kv->refcount[block] == 0)
        kv->free_stack[kv->n_free++] = block;
}

int moe_kv_block_refcount(const moe_kv_cache *kv, int block)
{
    MOE_ASSERT(block >= 0 && block < kv->n_blocks);
    return kv->refcount[block];
}

float *moe_kv_block_data(moe_kv_cache *kv, int block)
{
    MOE_ASSERT(block >= 0 && block < kv->n_blocks);
    return kv->pool + (size_t)block * kv->block_floats;
}

static size_t layer_stride(const moe_kv_cache *kv)
{
    return 2 * (size_t)kv->lay.n_kv_heads * (size_t)kv->lay.block_size * (size_t)kv->lay.head_dim;
}

float *moe_kv_block_k(moe_kv_cache *kv, int block, int layer)
{
    return moe_kv_block_data(kv, block) + (size_t)layer * layer_stride(kv);
}

float *moe_kv_block_v(moe_kv_cache *kv, int block, int layer)
{
    return moe_kv_block_k(kv, block, layer) + layer_stride(kv) / 2;
}

moe_status moe_kv_seq_reserve(moe_kv_cache *kv, moe_kv_seq *seq, int n_tokens)
{
    int need = moe_kv_blocks_for(kv, n_tokens);
    if (need <= seq->n_blocks)
        return MOE_OK;
    int extra = need - seq->n_blocks;
    if (extra > kv->n_free)
        return moe_error(MOE_ERR_FULL, "kv cache: %d more blocks needed, %d free", extra, kv->n_free);
    if (need > seq->cap) {
        int cap = seq->cap ? seq->cap : 8;
        while (cap < need)
            cap *= 2;
        int *nb = realloc(seq->blocks, (size_t)cap * sizeof(int));
        if (!nb)
            return moe_error(MOE_ERR_NOMEM, "kv cache: block table of %d entries", cap);
        seq->blocks = nb;
        seq->cap = cap;
    }
    while (seq->n_blocks < need)
        seq->blocks[seq->n_blocks++] = moe_kv_block_alloc(kv);
    return MOE_OK;
}

moe_status moe_kv_seq_fork(moe_kv_cache *kv, const moe_kv_seq *from, int n_tokens, moe_kv_seq *to)
{
    int need = moe_kv_blocks_for(kv, n_tokens), full = n_tokens / kv->lay.block_size;
    if (need > from->n_blocks || to->n_blocks)
        return moe_error(MOE_ERR_INVALID_ARG, "kv cache: fork of %d positions from %d blocks into a "
                         "table of %d", n_tokens, from->n_blocks, to->n_blocks);
    int *nb = malloc((size_t)(need ? need : 1) * sizeof(int));
    if (!nb)
        return moe_error(MOE_ERR_NOMEM, "kv cache: block table of %d entries", need);
    if (need > full) {
        int b = moe_kv_block_alloc(kv);
        if (b < 0) {
            free(nb);
            return moe_error(MOE_ERR_FULL, "kv cache: no free block for a forked sequence's last one");
        }
        /* block to block on the pool's backend: device memory on CUDA, never a host memcpy there */
        if (kv->be)
            kv->be->ops->copy(kv->be, moe_kv_block_data(kv, b),
                              moe_kv_block_data(kv, from->blocks[full]),
                              moe_kv_block_bytes(&kv->lay));
        else
            memcpy(moe_kv_block_data(kv, b), moe_kv_block_data(kv, from->blocks[full]),
                   moe_kv_block_bytes(&kv->lay));
        nb[full] = b;
    }
    for (int i = 0; i < full; i++) {
        nb[i] = from->blocks[i];
        moe_kv_block_ref(kv, nb[i]);
    }
    free(to->blocks);
    *to = (moe_kv_seq){.blocks = nb, .n_blocks = need, .cap = need ? need : 1};
    return MOE_OK;
}

void moe_kv_seq_release(moe_kv_cache *kv, moe_kv_seq *seq)
{
    for (int i = 0; i < seq->n_blocks; i++)
        moe_kv_block_unref(kv, seq->blocks[i]);
    free(seq->blocks);
    memset(seq, 0, sizeof *seq);
}
