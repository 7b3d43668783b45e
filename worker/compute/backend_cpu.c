/* The CPU backend: the kernels of kernels/kernels.h behind the backend interface, on the engine's
 * thread pool. Backend memory is host memory, so host_ptr is the identity and upload/download are
 * memcpy. Every op is the loop the forward pass ran before the interface existed, so results are
 * the same floats (the HF reference tests hold bit for bit) and the cost is one indirect call per
 * op. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "worker/compute/backend.h"
#include "worker/compute/backend_internal.h"

typedef struct {
    moe_threadpool_t *pool;
    float *xrows;     /* matmul_grouped: one expert's gathered x rows (grown, never shrunk) */
    size_t xrows_cap; /* floats */
    /* attention: per (segment, kv head) block base tables, sized by reserve() */
    const float **kptr, **vptr;
    size_t n_ptr;
    int max_blocks;
} cpu_ctx;

/* Buffers carry a 64-byte header with their size and kind: large ones are anonymous maps
 * (pages faulted on first touch, as the KV pool always was), small ones come from calloc. */
#define HDR 64
#define MAP_MIN ((size_t)1 << 20)

static void *cpu_alloc(moe_backend *be, size_t bytes)
{
    (void)be;
    size_t total = bytes + HDR;
    char *p;
    if (total >= MAP_MIN) {
        p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
    } else {
        p = aligned_alloc(HDR, (total + HDR - 1) / HDR * HDR);
        if (!p)
            return NULL;
        memset(p, 0, total);
    }
    memcpy(p, &total, sizeof total);
    return p + HDR;
}

static void cpu_free(moe_backend *be, void *ptr)
{
    (void)be;
    if (!ptr)
        return;
    char *p = (char *)ptr - HDR;
    size_t total;
    memcpy(&total, p, sizeof total);
    if (total >= MAP_MIN)
        munmap(p, total);
    else
        free(p);
}

static moe_status cpu_upload(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes)
        memcpy(dst, src, bytes);
    return MOE_OK;
}

static void cpu_copy(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes)
        memcpy(dst, src, bytes);
}

static void *cpu_host_alloc(moe_backend *be, size_t bytes)
{
    (void)be;
    return malloc(bytes ? bytes : 1);
}

static void cpu_host_free(moe_backend *be, void *p)
{
    (void)be;
    free(p);
}

static void cpu_zero(moe_backend *be, void *p, size_t bytes)
{
    (void)be;
    if (bytes)
        memset(p, 0, bytes);
}

static void *cpu_host_ptr(moe_backend *be, void *p)
{
    (void)be;
    return p;
}

static bool cpu_supports(const moe_backend *be, moe_op op, moe_dtype dt)
{
    (void)be;
    return moe_be_supports_all(op, dt);
}

static moe_status cpu_reserve(moe_backend *be, int max_segs, int max_blocks, int n_kv_head, int max_rows)
{
    (void)max_rows;
    cpu_ctx *c = be->ctx;
    size_t n = (size_t)max_segs * (size_t)n_kv_head * (size_t)max_blocks;
    if (n <= c->n_ptr && max_blocks <= c->max_blocks)
        return MOE_OK;
    const float **k = calloc(n ? n : 1, sizeof *k), **v = calloc(n ? n : 1, sizeof *v);
    if (!k || !v) {
        free(k);
        free(v);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: attention tables for %zu blocks", n);
    }
    free(c->kptr);
    free(c->vptr);
    c->kptr = k;
    c->vptr = v;
    c->n_ptr = n;
    c->max_blocks = max_blocks;
    return MOE_OK;
}

static moe_status cpu_synchronize(moe_backend *be)
{
    (void)be;
    return MOE_OK;
}

static void cpu_matmul_batch(moe_backend *be, const moe_matmul_desc *d, int n)
{
    cpu_ctx *c = be->ctx;
    if (n == 1)
        moe_matmul(c->pool, d->y, d->x, d->w, d->wt, d->n_tok, d->n_in, d->n_out);
    else
        moe_matmul_batch(c->pool, d, n);
}

static void cpu_embed(moe_backend *be, float *x, const void *table, moe_dtype dt,
                      const int32_t *tokens, int n, int d)
{
    (void)be;
    size_t row_bytes = moe_dtype_row_bytes(dt, (size_t)d);
    for (int t = 0; t < n; t++)
        moe_convert_to_f32(x + (size_t)t * d, (const char *)table + (size_t)tokens[t] * row_bytes, dt,
                           (size_t)d);
}

static void cpu_rmsnorm(moe_backend *be, float *y, const float *x, const float *w, int n_rows, int n,
                        float eps)
{
    (void)be;
    for (int r = 0; r < n_rows; r++)
        moe_rmsnorm(y + (size_t)r * n, x + (size_t)r * n, w, n, eps);
}

static void cpu_rope(moe_backend *be, float *x, int n_tok, size_t row_stride, int n_heads,
                     int head_dim, const int *pos, const float *table)
{
    (void)be;
    for (int t = 0; t < n_tok; t++)
        moe_rope(x + (size_t)t * row_stride, n_heads, head_dim, table + (size_t)pos[t] * head_dim);
}

static size_t layer_stride(const moe_kv_geom *g)
{
    return 2 * (size_t)g->n_kv_head * (size_t)g->block_size * (size_t)g->head_dim;
}

static void cpu_kv_write(moe_backend *be, float *pool, const moe_kv_geom *g, int layer,
                         const float *k, const float *v, const int *dst, int n_tok)
{
    (void)be;
    int bs = g->block_size, hd = g->head_dim, nkv = g->n_kv_head;
    size_t ls = layer_stride(g), kvdim = (size_t)nkv * hd;
    for (int t = 0; t < n_tok; t++) {
        int blk = dst[t] / bs, slot = dst[t] % bs;
        float *kb = pool + ((size_t)blk * g->n_layers + layer) * ls, *vb = kb + ls / 2;
        for (int h = 0; h < nkv; h++) {
            size_t off = ((size_t)h * bs + slot) * hd;
            memcpy(kb + off, k + (size_t)t * kvdim + (size_t)h * hd, sizeof(float) * hd);
            memcpy(vb + off, v + (size_t)t * kvdim + (size_t)h * hd, sizeof(float) * hd);
        }
    }
}

/* Query tokens of one sequence per attention task: moe_attention_multi reads each K/V chunk once
 * for all of them (prefill: 8 queries share what 8 tasks re-read from L2/L3 before). A decode
 * sequence (one token) is a task of its own. */
#define ATTN_TILE 8

typedef struct {
    cpu_ctx *c;
    float *out;
    const float *q;
    const moe_kv_geom *g;
    const moe_attn_seg *segs;
    int nkv, group, qdim;
    float scale;
} attn_job;

static void attn_task(void *arg, int task, int thread)
{
    (void)thread;
    const attn_job *j = arg;
    int tile = task / j->nkv, h = task % j->nkv;
    int seg = 0;
    for (;; seg++) { /* the segment holding this tile: segments are few, tasks short */
        int n_tiles = (j->segs[seg].n + ATTN_TILE - 1) / ATTN_TILE;
        if (tile < n_tiles)
            break;
        tile -= n_tiles;
    }
    const moe_attn_seg *sg = &j->segs[seg];
    int hd = j->g->head_dim;
    int i0 = tile * ATTN_TILE, n = sg->n - i0 < ATTN_TILE ? sg->n - i0 : ATTN_TILE;
    int t = sg->tok_begin + i0;
    size_t base = ((size_t)seg * j->nkv + h) * j->c->max_blocks;
    moe_kv_view view = {
        .k_base = j->c->kptr + base,
        .v_base = j->c->vptr + base,
        .block_size = j->g->block_size,
        .head_stride = (size_t)j->g->block_size * hd,
    };
    size_t qoff = (size_t)t * j->qdim + (size_t)h * j->group * hd;
    moe_attention_multi(j->out + qoff, (size_t)j->qdim, j->q + qoff, (size_t)j->qdim, &view, n,
                        sg->pos0 + i0 + 1, j->group, 1, hd, j->scale);
}

static void cpu_attention(moe_backend *be, float *out, const float *q, const float *pool,
                          const moe_kv_geom *g, int layer, const moe_attn_seg *segs, int n_segs,
                          int n_head, float scale)
{
    cpu_ctx *c = be->ctx;
    int bs = g->block_size, nkv = g->n_kv_head;
    size_t ls = layer_stride(g);
    /* Point the per-head block tables at this layer's K/V of every block of every segment. */
    int n_tiles = 0;
    for (int s = 0; s < n_segs; s++) {
        const moe_attn_seg *sg = &segs[s];
        int nblk = (sg->pos0 + sg->n + bs - 1) / bs;
        MOE_BE_ASSERT(nblk <= c->max_blocks && (size_t)(s + 1) * nkv * c->max_blocks <= c->n_ptr);
        for (int h = 0; h < nkv; h++) {
            size_t base = ((size_t)s * nkv + h) * c->max_blocks;
            size_t hoff = (size_t)h * bs * g->head_dim;
            for (int i = 0; i < nblk; i++) {
                const float *kb = pool + ((size_t)sg->blocks[i] * g->n_layers + layer) * ls;
                c->kptr[base + i] = kb + hoff;
                c->vptr[base + i] = kb + ls / 2 + hoff;
            }
        }
        n_tiles += (sg->n + ATTN_TILE - 1) / ATTN_TILE;
    }
    attn_job job = {.c = c, .out = out, .q = q, .g = g, .segs = segs, .nkv = nkv,
                    .group = n_head / nkv, .qdim = n_head * g->head_dim, .scale = scale};
    moe_threadpool_run(c->pool, attn_task, &job, n_tiles * nkv);
}

static void cpu_router(moe_backend *be, float *logits, int n, int E, int k, bool renorm,
                       int32_t *idx, float *w)
{
    (void)be;
    for (int t = 0; t < n; t++) {
        float *p = logits + (size_t)t * E;
        moe_softmax(p, E);
        int *ti = idx + (size_t)t * k;
        float *tw = w + (size_t)t * k;
        moe_topk(p, E, k, ti, tw);
        if (renorm) {
            float s = 0.0f;
            for (int i = 0; i < k; i++)
                s += tw[i];
            for (int i = 0; i < k; i++)
                tw[i] /= s;
        }
    }
}

static void cpu_silu_mul(moe_backend *be, float *gate, const float *up, size_t n)
{
    (void)be;
    /* moe_silu_mul takes an int count: go in pieces when n exceeds it */
    for (size_t i = 0; i < n; i += (size_t)1 << 30) {
        size_t m = n - i < ((size_t)1 << 30) ? n - i : ((size_t)1 << 30);
        moe_silu_mul(gate + i, up + i, (int)m);
    }
}

static void cpu_axpy(moe_backend *be, float *y, float a, const float *x, size_t n)
{
    (void)be;
    for (size_t i = 0; i < n; i += (size_t)1 << 30) {
        size_t m = n - i < ((size_t)1 << 30) ? n - i : ((size_t)1 << 30);
        moe_axpy(y + i, a, x + i, (int)m);
    }
}

static void cpu_add_rows(moe_backend *be, float *y, const float *bias, int n_rows, int n)
{
    (void)be;
    for (int r = 0; r < n_rows; r++)
        moe_axpy(y + (size_t)r * n, 1.0f, bias, n);
}

static void cpu_clamp(moe_backend *be, float *x, size_t n, float lim)
{
    (void)be;
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] > lim ? lim : (x[i] < -lim ? -lim : x[i]);
}

static void cpu_gated_add(moe_backend *be, float *y, const float *g, const float *x, int n_rows, int n)
{
    (void)be;
    for (int r = 0; r < n_rows; r++) {
        float s = 1.0f / (1.0f + expf(-g[r]));
        moe_axpy(y + (size_t)r * n, s, x + (size_t)r * n, n);
    }
}

static void cpu_gather(moe_backend *be, float *dst, size_t dst_stride, const float *src,
                       size_t src_stride, const int *idx, int n, int width)
{
    (void)be;
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)i * dst_stride, src + (size_t)idx[i] * src_stride, sizeof(float) * width);
}

static void cpu_scatter(moe_backend *be, float *dst, size_t dst_stride, const float *src,
                        size_t src_stride, const int *idx, int n, int width)
{
    (void)be;
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)idx[i] * dst_stride, src + (size_t)i * src_stride, sizeof(float) * width);
}

static void cpu_ep_pack(moe_backend *be, float *send, const float *src, const int *src_row,
                        const int32_t *tag, int n, int d)
{
    (void)be;
    size_t row = (size_t)d + 1;
    for (int i = 0; i < n; i++) {
        float *r = send + (size_t)i * row;
        memcpy(r, src + (size_t)src_row[i] * d, sizeof(float) * d);
        memcpy(r + d, &tag[i], sizeof tag[i]);
    }
}

static void cpu_ep_combine(moe_backend *be, float *out, const float *back, const int *tok,
                           const float *w, const int *at, int n, int d)
{
    (void)be;
    for (int s = 0; s < n; s++)
        moe_axpy(out + (size_t)tok[s] * d, w[s], back + (size_t)(at ? at[s] : s) * d, d);
}

/* The routed experts without host metadata (backend.h). The forward pass's CPU path groups on the
 * host as before (worker/moe_layer.c); these serve the conformance test and MOE_TEST_DEVICE_MOE,
 * which runs the device path's code here. Each expert's GEMM is moe_matmul over its rows, so the
 * results are the floats the host-grouped path computes. */
static void cpu_expert_sort(moe_backend *be, const int32_t *idx, int n_tok, int k, int E,
                            int32_t *off, int32_t *src_row, int32_t *slot, int64_t *tally)
{
    (void)be;
    int n = n_tok * k;
    memset(off, 0, sizeof(int32_t) * ((size_t)E + 1));
    for (int i = 0; i < n; i++)
        off[idx[i] + 1]++;
    for (int e = 0; e < E; e++) {
        if (tally)
            tally[e] += off[e + 1];
        off[e + 1] += off[e];
    }
    /* stable: choice order within an expert; off[e] walks forward, then is put back */
    for (int i = 0; i < n; i++) {
        int s = off[idx[i]]++;
        src_row[s] = i / k;
        slot[i] = s;
    }
    for (int e = E; e > 0; e--)
        off[e] = off[e - 1];
    off[0] = 0;
}

static void cpu_matmul_grouped(moe_backend *be, float *y, const float *x, const int32_t *x_row,
                               const void *const *w, moe_dtype wt, const int32_t *off, int E,
                               int n_in, int n_out, int max_rows)
{
    cpu_ctx *c = be->ctx;
    for (int e = 0; e < E; e++) {
        int s0 = off[e], cnt = off[e + 1] - off[e];
        if (cnt > max_rows)
            cnt = max_rows; /* the device launch's bound, kept alike */
        if (cnt <= 0)
            continue;
        const float *xe = x + (size_t)s0 * n_in;
        if (x_row) {
            size_t need = (size_t)cnt * n_in;
            if (need > c->xrows_cap) {
                float *g = realloc(c->xrows, need * sizeof *g);
                if (!g) {
                    MOE_LOG_E("cpu backend: matmul_grouped: no memory for %zu floats", need);
                    return;
                }
                c->xrows = g;
                c->xrows_cap = need;
            }
            for (int r = 0; r < cnt; r++)
                memcpy(c->xrows + (size_t)r * n_in, x + (size_t)x_row[s0 + r] * n_in,
                       sizeof(float) * n_in);
            xe = c->xrows;
        }
        moe_matmul(c->pool, y + (size_t)s0 * n_out, xe, w[e], wt, cnt, n_in, n_out);
    }
}

static void cpu_expert_combine(moe_backend *be, float *out, const float *y, const int32_t *slot,
                               const float *w, int n_tok, int k, int d)
{
    (void)be;
    for (int i = 0; i < n_tok * k; i++) /* ep_combine's order: token by token, choice by choice */
        moe_axpy(out + (size_t)(i / k) * d, w[i], y + (size_t)slot[i] * d, d);
}

static const char *cpu_describe(const moe_backend *be)
{
    (void)be;
    return moe_kernels_describe();
}

static void cpu_destroy(moe_backend *be)
{
    cpu_ctx *c = be->ctx;
    free(c->kptr);
    free(c->vptr);
    free(c->xrows);
    free(c);
    free(be);
}

static const moe_backend_ops cpu_ops = {
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_upload,
    .download = cpu_upload, /* host to host: the same memcpy */
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .upload_async = cpu_upload, /* a memcpy is done when it returns */
    .download_async = cpu_upload,
    .zero = cpu_zero,
    .copy = cpu_copy,
    .host_ptr = cpu_host_ptr,
    .supports = cpu_supports,
    .reserve = cpu_reserve,
    .synchronize = cpu_synchronize,
    .matmul_batch = cpu_matmul_batch,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
    .router = cpu_router,
    .silu_mul = cpu_silu_mul,
    .axpy = cpu_axpy,
    .add_rows = cpu_add_rows,
    .clamp = cpu_clamp,
    .gated_add = cpu_gated_add,
    .gather = cpu_gather,
    .scatter = cpu_scatter,
    .ep_pack = cpu_ep_pack,
    .ep_combine = cpu_ep_combine,
    .expert_sort = cpu_expert_sort,
    .matmul_grouped = cpu_matmul_grouped,
    .expert_combine = cpu_expert_combine,
    .describe = cpu_describe,
    .destroy = cpu_destroy,
};

moe_status moe_backend_cpu_create(moe_threadpool_t *pool, moe_backend **out)
{
    moe_backend *be = calloc(1, sizeof *be);
    cpu_ctx *c = calloc(1, sizeof *c);
    if (!be || !c) {
        free(be);
        free(c);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory");
    }
    c->pool = pool;
    be->ops = &cpu_ops;
    be->device = MOE_DEVICE_CPU;
    be->name = "cpu";
    be->host_memory = true;
    be->ctx = c;
    *out = be;
    return MOE_OK;
}

moe_threadpool_t *moe_backend_cpu_pool(const moe_backend *be)
{
    return be && be->ops == &cpu_ops ? ((const cpu_ctx *)be->ctx)->pool : NULL;
}
