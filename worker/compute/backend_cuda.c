/* The CUDA backend: backend memory is device memory on one GPU, every op goes on one stream of
 * it. GEMMs over bf16/f16/f32 weights are cublasGemmEx with f32 accumulation. cuBLAS multiplies
 * like types only, and rounding the f32 activations to bf16 is exactly what the HF reference tests
 * reject (tests/unit/test_reference.c: a rounded activation flips routers), so x is split into
 * hi + lo 16-bit halves stacked as 2 n_tok rows of one GEMM (weights read once) and the halves
 * summed: x is carried to 2^-16 relative. The 16-bit GEMMs of a batch (gate and up of every expert
 * of a group, then every down) are one cublasGemmGroupedBatchedEx (cuBLAS >= 12.5; else, or when
 * it refuses, one cublasGemmEx per matrix). The routed experts of a layer can also run without
 * the host (expert_sort, matmul_grouped: our f32-tiled kernel reading the row counts from device
 * memory, expert_combine).
 * Q8/Q4 weights and everything else are our kernels (kernels/cuda/). Host metadata of an op (row
 * indices, positions, block tables, routing weights) is copied to a device ring with
 * cudaMemcpyAsync, so no op waits for the host; only download() and synchronize() do.
 * Built and linked in CI, not yet run on a GPU (docs/backends.md). */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_kernels.h"
#include "worker/compute/backend.h"
#include "worker/compute/backend_internal.h"

_Static_assert(sizeof(int) == sizeof(int32_t), "host int indices are passed to int32 kernels");

typedef struct {
    int gpu;
    cudaStream_t stream;
    cublasHandle_t blas;
    moe_status err;   /* first failure since the last synchronize */
    char *ring;       /* device ring for host metadata */
    size_t ring_cap, ring_off;
    void *xh;         /* activations split into bf16/f16 hi and lo halves for cuBLAS */
    size_t xh_cap;
    float *y2;        /* the split GEMM's output, (2 n_tok, n_out) */
    size_t y2_cap;
    int32_t *hbuf;    /* host staging for attention tables */
    size_t hbuf_cap;
    bool no_grouped;  /* cublasGemmGroupedBatchedEx refused a call: per-matrix GEMMs from then on */
    char desc[512];
} cuda_ctx;

static void record(cuda_ctx *c, int rc, const char *what)
{
    if (rc != 0 && c->err == MOE_OK)
        c->err = moe_error(MOE_ERR_INTERNAL, "cuda backend (GPU %d): %s failed: %s (%d)", c->gpu, what,
                           cudaGetErrorString((cudaError_t)rc), rc);
}

static void record_blas(cuda_ctx *c, cublasStatus_t rc, const char *what)
{
    if (rc != CUBLAS_STATUS_SUCCESS && c->err == MOE_OK)
        c->err = moe_error(MOE_ERR_INTERNAL, "cuda backend (GPU %d): %s failed: cuBLAS status %d", c->gpu,
                           what, (int)rc);
}

static void *cu_alloc(moe_backend *be, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 64) != cudaSuccess)
        return NULL;
    if (cudaMemsetAsync(p, 0, bytes ? bytes : 64, c->stream) != cudaSuccess) {
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cu_free(moe_backend *be, void *p)
{
    (void)be;
    if (p)
        cudaFree(p);
}

static moe_status cu_upload(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    /* from pageable memory the copy is staged before the call returns: src may be reused */
    if (bytes)
        record(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), "upload");
    return c->err;
}

static moe_status cu_download(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    if (bytes)
        record(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), "download");
    record(c, cudaStreamSynchronize(c->stream), "download (stream synchronise)");
    return c->err;
}

static void *cu_host_alloc(moe_backend *be, size_t bytes)
{
    (void)be;
    void *p = NULL;
    return cudaMallocHost(&p, bytes ? bytes : 64) == cudaSuccess ? p : NULL;
}

static void cu_host_free(moe_backend *be, void *p)
{
    (void)be; /* pinned memory belongs to the process, not to the stream: be may be gone */
    if (p)
        cudaFreeHost(p);
}

static moe_status cu_upload_async(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    if (bytes)
        record(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), "upload (async)");
    return c->err;
}

static moe_status cu_download_async(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    if (bytes)
        record(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), "download (async)");
    return c->err;
}

static void cu_zero(moe_backend *be, void *p, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    if (bytes)
        record(c, cudaMemsetAsync(p, 0, bytes, c->stream), "zero");
}

static void cu_copy(moe_backend *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = be->ctx;
    if (bytes)
        record(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream), "copy");
}

static void *cu_host_ptr(moe_backend *be, void *p)
{
    (void)be;
    (void)p;
    return NULL;
}

static bool cu_supports(const moe_backend *be, moe_op op, moe_dtype dt)
{
    (void)be;
    return moe_be_supports_all(op, dt);
}

/* Grows a device buffer (rare: sized by reserve() up front). Waits for the stream: the old one
 * may still be read. */
static bool grow_dev(cuda_ctx *c, void **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return true;
    record(c, cudaStreamSynchronize(c->stream), "grow (stream synchronise)");
    cudaFree(*buf);
    *buf = NULL;
    *cap = 0;
    size_t n = need < ((size_t)1 << 20) ? ((size_t)1 << 20) : need;
    if (cudaMalloc(buf, n) != cudaSuccess) {
        *buf = NULL;
        if (c->err == MOE_OK)
            c->err = moe_error(MOE_ERR_NOMEM, "cuda backend (GPU %d): cannot allocate %zu bytes of scratch", c->gpu, n);
        return false;
    }
    *cap = n;
    return true;
}

/* Copies host metadata to the device ring; NULL after a failure. When the ring wraps, the stream
 * is waited for (earlier ops may still read the old contents): rare with a ring sized by reserve(). */
static const void *ring_put(cuda_ctx *c, const void *src, size_t bytes)
{
    if (!src)
        return NULL;
    size_t need = (bytes + 255) / 256 * 256;
    if (c->ring_off + need > c->ring_cap) {
        record(c, cudaStreamSynchronize(c->stream), "ring wrap (stream synchronise)");
        c->ring_off = 0;
        if (need > c->ring_cap && !grow_dev(c, (void **)&c->ring, &c->ring_cap, 2 * need))
            return NULL;
    }
    char *dst = c->ring + c->ring_off;
    c->ring_off += need;
    if (bytes)
        record(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), "metadata upload");
    return dst;
}

static moe_status cu_reserve(moe_backend *be, int max_segs, int max_blocks, int n_kv_head, int max_rows)
{
    (void)n_kv_head;
    cuda_ctx *c = be->ctx;
    /* a layer's worth of metadata: attention tables plus a few index arrays of max_rows */
    size_t need = 64 * ((size_t)max_segs * (size_t)max_blocks + 16 * (size_t)max_rows) + ((size_t)4 << 20);
    grow_dev(c, (void **)&c->ring, &c->ring_cap, need);
    return c->err;
}

static moe_status cu_synchronize(moe_backend *be)
{
    cuda_ctx *c = be->ctx;
    record(c, cudaStreamSynchronize(c->stream), "synchronize");
    moe_status st = c->err;
    if (st != MOE_OK)
        c->err = MOE_OK; /* reported once; the message stays in moe_error_message() */
    return st;
}

/* One GEMM of a desc: y = x W^T, for 16-bit weights with x as hi + lo rows in xs and the output
 * halves in ys (summed by the caller). */
static void gemm_one(cuda_ctx *c, const moe_matmul_desc *m, const void *xs, float *ys)
{
    const float one = 1.0f, zero = 0.0f;
    bool half = m->wt == MOE_DT_BF16 || m->wt == MOE_DT_F16;
    cudaDataType_t t = m->wt == MOE_DT_BF16 ? CUDA_R_16BF : m->wt == MOE_DT_F16 ? CUDA_R_16F : CUDA_R_32F;
    /* row-major y(cols, n_out) is column-major (n_out, cols) = W^T(col-major) * x */
    record_blas(c,
                cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, m->n_out, half ? 2 * m->n_tok : m->n_tok, m->n_in, &one,
                             m->w, t, m->n_in, half ? xs : (const void *)m->x, t, m->n_in, &zero, half ? ys : m->y,
                             CUDA_R_32F, m->n_out, half ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC,
                             CUBLAS_GEMM_DEFAULT),
                "cublasGemmEx");
}

#if CUBLAS_VERSION >= 120500
/* Every 16-bit desc of type dt in sel[0..n) as ONE cublasGemmGroupedBatchedEx (cuBLAS >= 12.5): a
 * group per desc (their shapes differ: an expert group has a row count per expert). The pointer
 * arrays go to the device ring; the shape arrays are host arrays, as cuBLAS wants them. Returns
 * false when cuBLAS refuses (e.g. an unsupported type combination on this version): the caller
 * then runs the descs one by one. */
static bool gemm_grouped(cuda_ctx *c, const moe_matmul_desc *d, const int *sel, int n, moe_dtype dt,
                         void *const *xs, float *const *ys)
{
    enum { G = MOE_MATMUL_BATCH_MAX };
    cublasOperation_t ta[G], tb[G];
    int m[G], nn[G], k[G], lda[G], ldb[G], ldc[G], gs[G];
    float al[G], be[G];
    const void *A[G], *B[G];
    void *C[G];
    for (int i = 0; i < n; i++) {
        const moe_matmul_desc *q = &d[sel[i]];
        ta[i] = CUBLAS_OP_T;
        tb[i] = CUBLAS_OP_N;
        m[i] = q->n_out;
        nn[i] = 2 * q->n_tok;
        k[i] = lda[i] = ldb[i] = q->n_in;
        ldc[i] = q->n_out;
        gs[i] = 1;
        al[i] = 1.0f;
        be[i] = 0.0f;
        A[i] = q->w;
        B[i] = xs[i];
        C[i] = ys[i];
    }
    const void *dA = ring_put(c, A, sizeof(void *) * (size_t)n), *dB = ring_put(c, B, sizeof(void *) * (size_t)n),
               *dC = ring_put(c, C, sizeof(void *) * (size_t)n);
    if (!dA || !dB || !dC)
        return true; /* the failure is recorded */
    cudaDataType_t t = dt == MOE_DT_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    cublasStatus_t rc = cublasGemmGroupedBatchedEx(c->blas, ta, tb, m, nn, k, al, (const void *const *)dA, t, lda,
                                                   (const void *const *)dB, t, ldb, be, (void *const *)dC, CUDA_R_32F,
                                                   ldc, n, gs, CUBLAS_COMPUTE_32F);
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED || rc == CUBLAS_STATUS_INVALID_VALUE) {
        MOE_LOG_W("cuda backend (GPU %d): cublasGemmGroupedBatchedEx refused (status %d): one GEMM per matrix",
                  c->gpu, (int)rc);
        c->no_grouped = true;
        return false;
    }
    record_blas(c, rc, "cublasGemmGroupedBatchedEx");
    return true;
}
#else
static bool gemm_grouped(cuda_ctx *c, const moe_matmul_desc *d, const int *sel, int n, moe_dtype dt,
                         void *const *xs, float *const *ys)
{
    (void)c, (void)d, (void)sel, (void)n, (void)dt, (void)xs, (void)ys;
    return false; /* cuBLAS older than 12.5: no grouped GEMM */
}
#endif

/* The 16-bit descs of type dt: each distinct x split once into hi/lo rows (c->xh), every GEMM
 * into its own slice of c->y2, all GEMMs in one grouped call (else one per desc), the halves
 * summed in one launch. Scratch is sized for the whole batch before the first launch (growing
 * waits for the stream and frees the old buffer). */
static void matmul_half(cuda_ctx *c, const moe_matmul_desc *d, const int *sel, int n, moe_dtype dt)
{
    enum { G = MOE_MATMUL_BATCH_MAX };
    size_t xoff[G], yoff[G], xtot = 0, ytot = 0, ymax = 0;
    int xsrc[G]; /* the earlier desc of this batch whose x this one shares, or itself */
    for (int i = 0; i < n; i++) {
        const moe_matmul_desc *q = &d[sel[i]];
        xsrc[i] = i;
        for (int j = 0; j < i; j++)
            if (d[sel[j]].x == q->x && d[sel[j]].n_tok == q->n_tok && d[sel[j]].n_in == q->n_in) {
                xsrc[i] = j;
                break;
            }
        if (xsrc[i] == i) {
            xoff[i] = xtot;
            xtot += 4 * (size_t)q->n_tok * q->n_in; /* 2 halves x 2 bytes */
        } else
            xoff[i] = xoff[xsrc[i]];
        size_t ny = (size_t)q->n_tok * q->n_out;
        yoff[i] = ytot;
        ytot += 2 * ny;
        ymax = ny > ymax ? ny : ymax;
    }
    if (!grow_dev(c, &c->xh, &c->xh_cap, xtot) || !grow_dev(c, (void **)&c->y2, &c->y2_cap, ytot * sizeof(float)))
        return;
    void *xs[G];
    float *ys[G];
    MoeCudaHalves halves[G];
    for (int i = 0; i < n; i++) {
        const moe_matmul_desc *q = &d[sel[i]];
        xs[i] = (char *)c->xh + xoff[i];
        ys[i] = c->y2 + yoff[i];
        if (xsrc[i] == i)
            record(c, moe_cuda_split_half(xs[i], q->x, (size_t)q->n_tok * q->n_in, (int)dt, c->stream),
                   "activation split");
        halves[i] = (MoeCudaHalves){q->y, ys[i], (size_t)q->n_tok * q->n_out};
    }
    if (c->no_grouped || n == 1 || !gemm_grouped(c, d, sel, n, dt, xs, ys))
        for (int i = 0; i < n; i++)
            gemm_one(c, &d[sel[i]], xs[i], ys[i]);
    const MoeCudaHalves *dh = ring_put(c, halves, sizeof halves[0] * (size_t)n);
    if (dh)
        record(c, moe_cuda_add_halves_many(dh, n, ymax, c->stream), "split GEMM sums");
}

/* A batch: Q8/Q4 through our kernel, f32 weights one cublasGemmEx each (pedantic f32: no TF32),
 * bf16 and f16 each as one grouped GEMM (matmul_half). At most MOE_MATMUL_BATCH_MAX descs per
 * round. */
static void cu_matmul_batch(moe_backend *be, const moe_matmul_desc *d, int n)
{
    cuda_ctx *c = be->ctx;
    for (int base = 0; base < n; base += MOE_MATMUL_BATCH_MAX) {
        int cnt = n - base < MOE_MATMUL_BATCH_MAX ? n - base : MOE_MATMUL_BATCH_MAX;
        int sel_bf[MOE_MATMUL_BATCH_MAX], sel_f16[MOE_MATMUL_BATCH_MAX], nbf = 0, nf16 = 0;
        for (int i = base; i < base + cnt; i++) {
            const moe_matmul_desc *m = &d[i];
            if (m->n_tok <= 0 || m->n_out <= 0)
                continue;
            if (m->wt == MOE_DT_Q8 || m->wt == MOE_DT_Q4)
                record(c, moe_cuda_matmul_quant(m->y, m->x, m->w, (int)m->wt, m->n_tok, m->n_in, m->n_out, c->stream),
                       "quantized matmul");
            else if (m->wt == MOE_DT_BF16)
                sel_bf[nbf++] = i;
            else if (m->wt == MOE_DT_F16)
                sel_f16[nf16++] = i;
            else
                gemm_one(c, m, NULL, NULL);
        }
        if (nbf)
            matmul_half(c, d, sel_bf, nbf, MOE_DT_BF16);
        if (nf16)
            matmul_half(c, d, sel_f16, nf16, MOE_DT_F16);
    }
}

static void cu_embed(moe_backend *be, float *x, const void *table, moe_dtype dt, const int32_t *tokens, int n,
                     int d)
{
    cuda_ctx *c = be->ctx;
    const int32_t *dtok = ring_put(c, tokens, sizeof(int32_t) * (size_t)n);
    if (dtok)
        record(c, moe_cuda_embed(x, table, (int)dt, dtok, n, d, c->stream), "embed");
}

static void cu_rmsnorm(moe_backend *be, float *y, const float *x, const float *w, int n_rows, int n, float eps)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_rmsnorm(y, x, w, n_rows, n, eps, c->stream), "rmsnorm");
}

static void cu_rope(moe_backend *be, float *x, int n_tok, size_t row_stride, int n_heads, int head_dim,
                    const int *pos, const float *table)
{
    cuda_ctx *c = be->ctx;
    const int32_t *dpos = ring_put(c, pos, sizeof(int32_t) * (size_t)n_tok);
    if (dpos)
        record(c, moe_cuda_rope(x, n_tok, row_stride, n_heads, head_dim, dpos, table, c->stream), "rope");
}

static void cu_kv_write(moe_backend *be, float *pool, const moe_kv_geom *g, int layer, const float *k,
                        const float *v, const int *dst, int n_tok)
{
    cuda_ctx *c = be->ctx;
    const int32_t *ddst = ring_put(c, dst, sizeof(int32_t) * (size_t)n_tok);
    if (ddst)
        record(c,
               moe_cuda_kv_write(pool, g->n_layers, g->n_kv_head, g->head_dim, g->block_size, layer, k, v, ddst,
                                 n_tok, c->stream),
               "kv_write");
}

static void cu_attention(moe_backend *be, float *out, const float *q, const float *pool, const moe_kv_geom *g,
                         int layer, const moe_attn_seg *segs, int n_segs, int n_head, float scale)
{
    cuda_ctx *c = be->ctx;
    int bs = g->block_size, T = 0, nb = 0;
    for (int s = 0; s < n_segs; s++) {
        T += segs[s].n;
        nb += (segs[s].pos0 + segs[s].n + bs - 1) / bs;
    }
    size_t need = (size_t)nb + 2 * (size_t)T;
    if (need > c->hbuf_cap) {
        int32_t *h = realloc(c->hbuf, need * sizeof *h);
        if (!h) {
            if (c->err == MOE_OK)
                c->err = moe_error(MOE_ERR_NOMEM, "cuda backend: attention tables of %zu entries", need);
            return;
        }
        c->hbuf = h;
        c->hbuf_cap = need;
    }
    /* one table of block ids per segment, then per token: its table's offset and causal length */
    int32_t *blocks = c->hbuf, *tab_off = blocks + nb, *n_ctx = tab_off + T;
    for (int s = 0, o = 0; s < n_segs; s++) {
        const moe_attn_seg *sg = &segs[s];
        int k = (sg->pos0 + sg->n + bs - 1) / bs;
        memcpy(blocks + o, sg->blocks, sizeof(int32_t) * (size_t)k);
        for (int i = 0; i < sg->n; i++) {
            tab_off[sg->tok_begin + i] = o;
            n_ctx[sg->tok_begin + i] = sg->pos0 + i + 1;
        }
        o += k;
    }
    const int32_t *d = ring_put(c, c->hbuf, sizeof(int32_t) * need);
    if (d)
        record(c,
               moe_cuda_attention(out, q, pool, g->n_layers, g->n_kv_head, g->head_dim, bs, layer, d, d + nb,
                                  d + nb + T, T, n_head, scale, c->stream),
               "attention");
}

static void cu_router(moe_backend *be, float *logits, int n, int E, int k, bool renorm, int32_t *idx, float *w)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_router(logits, n, E, k, renorm, idx, w, c->stream), "router");
}

static void cu_silu_mul(moe_backend *be, float *gate, const float *up, size_t n)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_silu_mul(gate, up, n, c->stream), "silu_mul");
}

static void cu_axpy(moe_backend *be, float *y, float a, const float *x, size_t n)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_axpy(y, a, x, n, c->stream), "axpy");
}

static void cu_add_rows(moe_backend *be, float *y, const float *bias, int n_rows, int n)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_add_rows(y, bias, n_rows, n, c->stream), "add_rows");
}

static void cu_clamp(moe_backend *be, float *x, size_t n, float lim)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_clamp(x, n, lim, c->stream), "clamp");
}

static void cu_gated_add(moe_backend *be, float *y, const float *g, const float *x, int n_rows, int n)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_gated_add(y, g, x, n_rows, n, c->stream), "gated_add");
}

static void rows(moe_backend *be, float *dst, size_t ds, const float *src, size_t ss, const int *idx, int n,
                 int width, int scatter)
{
    cuda_ctx *c = be->ctx;
    const int32_t *di = ring_put(c, idx, sizeof(int32_t) * (size_t)n);
    if (di)
        record(c, moe_cuda_rows(dst, ds, src, ss, di, n, width, scatter, c->stream), scatter ? "scatter" : "gather");
}

static void cu_gather(moe_backend *be, float *dst, size_t ds, const float *src, size_t ss, const int *idx, int n,
                      int width)
{
    rows(be, dst, ds, src, ss, idx, n, width, 0);
}

static void cu_scatter(moe_backend *be, float *dst, size_t ds, const float *src, size_t ss, const int *idx, int n,
                       int width)
{
    rows(be, dst, ds, src, ss, idx, n, width, 1);
}

static void cu_ep_pack(moe_backend *be, float *send, const float *src, const int *src_row, const int32_t *tag,
                       int n, int d)
{
    cuda_ctx *c = be->ctx;
    const int32_t *dr = ring_put(c, src_row, sizeof(int32_t) * (size_t)n), *dt = ring_put(c, tag, sizeof(int32_t) * (size_t)n);
    if (dr && dt)
        record(c, moe_cuda_ep_pack(send, src, dr, dt, n, d, c->stream), "ep_pack");
}

static void cu_ep_combine(moe_backend *be, float *out, const float *back, const int *tok, const float *w,
                          const int *at, int n, int d)
{
    cuda_ctx *c = be->ctx;
    const int32_t *dtok = ring_put(c, tok, sizeof(int32_t) * (size_t)n);
    const float *dw = ring_put(c, w, sizeof(float) * (size_t)n);
    const int32_t *dat = at ? ring_put(c, at, sizeof(int32_t) * (size_t)n) : NULL;
    if (dtok && dw && (dat || !at))
        record(c, moe_cuda_ep_combine(out, back, dtok, dw, dat, n, d, c->stream), "ep_combine");
}

static void cu_expert_sort(moe_backend *be, const int32_t *idx, int n_tok, int k, int E, int32_t *off,
                           int32_t *src_row, int32_t *slot, int64_t *tally)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_expert_sort(idx, n_tok, k, E, off, src_row, slot, tally, c->stream), "expert_sort");
}

static void cu_matmul_grouped(moe_backend *be, float *y, const float *x, const int32_t *x_row, const void *const *w,
                              moe_dtype wt, const int32_t *off, int E, int n_in, int n_out, int max_rows)
{
    cuda_ctx *c = be->ctx;
    const void *const *dw = ring_put(c, w, sizeof(void *) * (size_t)E); /* E weight pointers: host metadata */
    if (dw)
        record(c, moe_cuda_matmul_grouped(y, x, x_row, dw, (int)wt, off, E, n_in, n_out, max_rows, c->stream),
               "matmul_grouped");
}

static void cu_expert_combine(moe_backend *be, float *out, const float *y, const int32_t *slot, const float *w,
                              int n_tok, int k, int d)
{
    cuda_ctx *c = be->ctx;
    record(c, moe_cuda_expert_combine(out, y, slot, w, n_tok, k, d, c->stream), "expert_combine");
}

static const char *cu_describe(const moe_backend *be) { return ((const cuda_ctx *)be->ctx)->desc; }

static void cu_destroy(moe_backend *be)
{
    cuda_ctx *c = be->ctx;
    cudaStreamSynchronize(c->stream);
    cudaFree(c->ring);
    cudaFree(c->xh);
    cudaFree(c->y2);
    free(c->hbuf);
    cublasDestroy(c->blas);
    cudaStreamDestroy(c->stream);
    free(c);
    free(be);
}

static const moe_backend_ops cuda_ops = {
    .alloc = cu_alloc,
    .free = cu_free,
    .upload = cu_upload,
    .download = cu_download,
    .host_alloc = cu_host_alloc,
    .host_free = cu_host_free,
    .upload_async = cu_upload_async,
    .download_async = cu_download_async,
    .zero = cu_zero,
    .copy = cu_copy,
    .host_ptr = cu_host_ptr,
    .supports = cu_supports,
    .reserve = cu_reserve,
    .synchronize = cu_synchronize,
    .matmul_batch = cu_matmul_batch,
    .embed = cu_embed,
    .rmsnorm = cu_rmsnorm,
    .rope = cu_rope,
    .kv_write = cu_kv_write,
    .attention = cu_attention,
    .router = cu_router,
    .silu_mul = cu_silu_mul,
    .axpy = cu_axpy,
    .add_rows = cu_add_rows,
    .clamp = cu_clamp,
    .gated_add = cu_gated_add,
    .gather = cu_gather,
    .scatter = cu_scatter,
    .ep_pack = cu_ep_pack,
    .ep_combine = cu_ep_combine,
    .expert_sort = cu_expert_sort,
    .matmul_grouped = cu_matmul_grouped,
    .expert_combine = cu_expert_combine,
    .describe = cu_describe,
    .destroy = cu_destroy,
};

moe_status moe_backend_cuda_create(int gpu, moe_backend **out)
{
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess)
        return moe_error(MOE_ERR_UNAVAILABLE, "device cuda: no usable CUDA driver or GPU: %s (%d); use --device cpu",
                         cudaGetErrorString(rc), (int)rc);
    if (gpu < 0 || gpu >= n)
        return moe_error(MOE_ERR_UNAVAILABLE, "device cuda: GPU %d asked for, %d visible; use --device cpu", gpu, n);
    struct cudaDeviceProp prop;
    if ((rc = cudaSetDevice(gpu)) != cudaSuccess || (rc = cudaGetDeviceProperties(&prop, gpu)) != cudaSuccess)
        return moe_error(MOE_ERR_UNAVAILABLE, "device cuda: GPU %d: %s", gpu, cudaGetErrorString(rc));
    moe_backend *be = calloc(1, sizeof *be);
    cuda_ctx *c = calloc(1, sizeof *c);
    if (!be || !c) {
        free(be);
        free(c);
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of memory");
    }
    c->gpu = gpu;
    if ((rc = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        free(be);
        free(c);
        return moe_error(MOE_ERR_UNAVAILABLE, "device cuda: GPU %d: stream: %s", gpu, cudaGetErrorString(rc));
    }
    cublasStatus_t bs = cublasCreate(&c->blas);
    if (bs != CUBLAS_STATUS_SUCCESS || cublasSetStream(c->blas, c->stream) != CUBLAS_STATUS_SUCCESS) {
        if (bs == CUBLAS_STATUS_SUCCESS)
            cublasDestroy(c->blas);
        cudaStreamDestroy(c->stream);
        free(be);
        free(c);
        return moe_error(MOE_ERR_UNAVAILABLE, "device cuda: GPU %d: cuBLAS init failed (status %d)", gpu, (int)bs);
    }
    snprintf(c->desc, sizeof c->desc,
             "GPU %d %.120s (sm_%d%d, %.0f GiB): cuBLAS GEMMs (split hi/lo 16-bit activations, f32 accumulation), own kernels "
             "for Q8/Q4, norms, RoPE, paged attention, routing",
             gpu, prop.name, prop.major, prop.minor, (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    be->ops = &cuda_ops;
    be->device = MOE_DEVICE_CUDA;
    be->name = "cuda";
    be->host_memory = false;
    be->ctx = c;
    *out = be;
    return MOE_OK;
}
