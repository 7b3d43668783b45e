/* The compute backend interface: where the forward pass keeps its tensors and runs its ops, in
 * the style of ggml-backend (a table of function pointers plus a context). The forward pass
 * (worker/forward.c, worker/moe_layer.c) and the KV cache call only this; the CPU backend
 * (backend_cpu.c) is the kernels of kernels/kernels.h behind it, the CUDA backend
 * (backend_cuda.c, kernels/cuda/) is cuBLAS plus our own CUDA kernels. docs/backends.md says how
 * to add one.
 *
 * Memory. Two kinds of pointers cross this interface:
 *  - backend memory ("B:" below): tensors (activations, weights of a mapped model, the KV pool)
 *    allocated with alloc() or reached through moe_backend_map_model(). On the CPU backend that is
 *    host memory; on CUDA it is device memory, and the host must never dereference it.
 *  - host memory ("H:" below): small per-call metadata (token ids, row indices, block tables,
 *    routing weights the host already holds). A device backend copies what it needs
 *    asynchronously (no synchronisation), so passing host metadata is not a round trip.
 * Ops are ordered on one stream per backend: each sees every earlier op's results, and the host
 * sees them after download() or synchronize(). Ops report no errors (shapes are the caller's
 * contract, checked by assertions in debug builds); a device backend records the first failure
 * and returns it from the next synchronize() or download().
 *
 * Not thread-safe: one backend is driven by one thread (the engine's). */
#ifndef MOE_WORKER_COMPUTE_BACKEND_H
#define MOE_WORKER_COMPUTE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "common/status.h"
#include "kernels/kernels.h"

typedef enum { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA } moe_device;

/* "cpu" / "cuda" -> *out; MOE_ERR_INVALID_ARG naming the value otherwise. */
moe_status moe_device_parse(const char *name, moe_device *out);
const char *moe_device_name(moe_device d);

/* The ops, for supports() and for the conformance test's listing. */
typedef enum {
    MOE_OP_MATMUL = 0, /* matmul_batch, per weight dtype */
    MOE_OP_EMBED,      /* per table dtype */
    MOE_OP_RMSNORM,
    MOE_OP_ROPE,
    MOE_OP_KV_WRITE,
    MOE_OP_ATTENTION,
    MOE_OP_ROUTER,
    MOE_OP_SILU_MUL,
    MOE_OP_AXPY,
    MOE_OP_ADD_ROWS,
    MOE_OP_CLAMP,
    MOE_OP_GATED_ADD,
    MOE_OP_GATHER,
    MOE_OP_SCATTER,
    MOE_OP_EP_PACK,
    MOE_OP_EP_COMBINE,
    MOE_OP_EXPERT_SORT,     /* the MoE layer on the backend, no host round trip: */
    MOE_OP_MATMUL_GROUPED,  /* matmul_grouped, per weight dtype */
    MOE_OP_EXPERT_COMBINE,
    MOE_OP_COUNT
} moe_op;
const char *moe_op_name(moe_op op);

/* Geometry of a paged KV pool (worker/kv_cache.h's layout): block b holds, for every layer,
 * K then V, each (n_kv_head, block_size, head_dim) f32. */
typedef struct {
    int n_layers, n_kv_head, head_dim, block_size;
} moe_kv_geom;

/* One sequence's slice of an attention call: query tokens [tok_begin, tok_begin + n) of q/out sit
 * at positions [pos0, pos0 + n) of the sequence whose blocks are blocks[0 .. ceil((pos0+n)/bs)). */
typedef struct {
    const int *blocks; /* H: block ids in position order */
    int pos0, tok_begin, n;
} moe_attn_seg;

typedef struct moe_backend moe_backend;

typedef struct {
    /* ---- buffers ---- */
    /* B: bytes of zeroed memory, aligned to 64 bytes; NULL when out of memory. bytes 0 gives a
     * valid minimal buffer. Large CPU buffers are lazily faulted anonymous maps. */
    void *(*alloc)(moe_backend *be, size_t bytes);
    /* Frees what alloc returned (NULL is a no-op). */
    void (*free)(moe_backend *be, void *p);
    /* H -> B, bytes. Ordered with the ops; src may be reused when it returns. */
    moe_status (*upload)(moe_backend *be, void *dst, const void *src, size_t bytes);
    /* B -> H, bytes. Waits for every op before it (a synchronisation on device backends). */
    moe_status (*download)(moe_backend *be, void *dst, const void *src, size_t bytes);
    /* Pinned (page-locked) host memory for staging transfers, so that the *_async copies below
     * really overlap (CUDA: cudaMallocHost; CPU: malloc); NULL when out of memory. host_free
     * ignores be (it may be NULL or already destroyed: a staging buffer may outlive its backend)
     * and takes only what host_alloc of the same ops table returned (NULL is a no-op). */
    void *(*host_alloc)(moe_backend *be, size_t bytes);
    void (*host_free)(moe_backend *be, void *p);
    /* H -> B and B -> H ordered with the ops, without waiting: the host must leave src (upload)
     * unchanged and not read dst (download) until the next synchronize() returns. Many block
     * copies then cost one synchronisation. */
    moe_status (*upload_async)(moe_backend *be, void *dst, const void *src, size_t bytes);
    moe_status (*download_async)(moe_backend *be, void *dst, const void *src, size_t bytes);
    /* Sets bytes of B memory at p to zero. */
    void (*zero)(moe_backend *be, void *p, size_t bytes);
    /* B -> B on this backend, bytes (regions must not overlap). */
    void (*copy)(moe_backend *be, void *dst, const void *src, size_t bytes);
    /* A host pointer to B memory p when the host can read and write it directly (CPU backend:
     * p itself), else NULL: callers then download/upload. Lets the CPU path skip copies. */
    void *(*host_ptr)(moe_backend *be, void *p);

    /* ---- capability and ordering ---- */
    /* Whether op runs here for weight/table dtype dt (ops without a dtype: pass MOE_DT_F32). */
    bool (*supports)(const moe_backend *be, moe_op op, moe_dtype dt);
    /* Sizes internal scratch so later ops allocate nothing: attention over up to max_segs
     * sequences of up to max_blocks blocks each with n_kv_head KV heads, and index uploads of up
     * to max_rows rows. */
    moe_status (*reserve)(moe_backend *be, int max_segs, int max_blocks, int n_kv_head, int max_rows);
    /* Waits for every op issued; returns the first failure recorded since the last call. */
    moe_status (*synchronize)(moe_backend *be);

    /* ---- ops (all f32 activations; weights in their moe_dtype) ---- */
    /* n independent y(n_tok, n_out) = x(n_tok, n_in) * W^T, as moe_matmul_batch: y, x, w B. Every
     * y bit-identical to the CPU backend's for its desc alone is NOT required of other backends
     * (tolerances: docs/backends.md). */
    void (*matmul_batch)(moe_backend *be, const moe_matmul_desc *d, int n);
    /* x(n, d) B: row i = row tokens[i] (H) of table (B, dtype dt, (vocab, d)), converted to f32. */
    void (*embed)(moe_backend *be, float *x, const void *table, moe_dtype dt, const int32_t *tokens,
                  int n, int d);
    /* y(n_rows, n) = rmsnorm of each row of x(n_rows, n) times w(n) (all B); y may alias x. */
    void (*rmsnorm)(moe_backend *be, float *y, const float *x, const float *w, int n_rows, int n,
                    float eps);
    /* In place on x (B): token t's n_heads heads of head_dim start at x + t * row_stride; rotated
     * with row pos[t] (H) of table (B, (max_pos, head_dim): cos then sin halves). */
    void (*rope)(moe_backend *be, float *x, int n_tok, size_t row_stride, int n_heads, int head_dim,
                 const int *pos, const float *table);
    /* Writes token t's K and V rows (k, v: (n_tok, n_kv_head * head_dim) B) of `layer` into the
     * pool (B) at block dst[t] / block_size, slot dst[t] % block_size (dst H). */
    void (*kv_write)(moe_backend *be, float *pool, const moe_kv_geom *g, int layer, const float *k,
                     const float *v, const int *dst, int n_tok);
    /* Causal attention of q (B, (T, n_head * head_dim)) over `layer` of the pool (B), out (B) same
     * shape: segment s's token i attends to its sequence's positions [0, pos0 + i] (whose K/V must
     * already be written). Grouped-query: head h reads KV head h / (n_head / n_kv_head). */
    void (*attention)(moe_backend *be, float *out, const float *q, const float *pool,
                      const moe_kv_geom *g, int layer, const moe_attn_seg *segs, int n_segs,
                      int n_head, float scale);
    /* Router: softmax over each row of logits (B, (n, E), in place), then the top k (largest
     * first, ties to the lower index) into idx (B, (n, k) int32) and their probabilities into w
     * (B, (n, k)), divided by their sum when renorm. */
    void (*router)(moe_backend *be, float *logits, int n, int E, int k, bool renorm, int32_t *idx,
                   float *w);
    /* gate[i] = silu(gate[i]) * up[i] over n (B). */
    void (*silu_mul)(moe_backend *be, float *gate, const float *up, size_t n);
    /* y[i] += a * x[i] over n (B). */
    void (*axpy)(moe_backend *be, float *y, float a, const float *x, size_t n);
    /* Each of the n_rows rows of y (B, (n_rows, n)) += bias (B, (n)). */
    void (*add_rows)(moe_backend *be, float *y, const float *bias, int n_rows, int n);
    /* x[i] = clamp(x[i], -lim, lim) over n (B). */
    void (*clamp)(moe_backend *be, float *x, size_t n, float lim);
    /* Row r of y (B, (n_rows, n)) += sigmoid(g[r]) * row r of x (g, x B): the shared expert's gate. */
    void (*gated_add)(moe_backend *be, float *y, const float *g, const float *x, int n_rows, int n);
    /* dst row i (stride dst_stride floats) = src row idx[i] (stride src_stride), width floats;
     * idx H, n rows. Groups token rows per expert. */
    void (*gather)(moe_backend *be, float *dst, size_t dst_stride, const float *src,
                   size_t src_stride, const int *idx, int n, int width);
    /* dst row idx[i] (stride dst_stride) = src row i (stride src_stride), width floats; idx H. */
    void (*scatter)(moe_backend *be, float *dst, size_t dst_stride, const float *src,
                    size_t src_stride, const int *idx, int n, int width);
    /* EP pack: send row i ((d + 1) floats, B) = src row src_row[i] (d floats, B), then the bits of
     * tag[i] (H, the expert id) in its last float. n rows. */
    void (*ep_pack)(moe_backend *be, float *send, const float *src, const int *src_row,
                    const int32_t *tag, int n, int d);
    /* EP combine, in order s = 0 .. n-1: out row tok[s] += w[s] * back row (at ? at[s] : s) (out,
     * back B, (., d); tok, w, at H). The order is the contract: it fixes the float sums. */
    void (*ep_combine)(moe_backend *be, float *out, const float *back, const int *tok,
                       const float *w, const int *at, int n, int d);

    /* ---- the routed experts without the host (docs/backends.md, "The MoE layer on a device") ----
     * The router's outputs stay in backend memory: the rows are grouped per expert on the
     * backend, the expert GEMMs take their row counts from backend memory, and the outputs are
     * added up in the same order as ep_combine's. The forward pass uses these on device backends
     * with every expert local (no expert parallelism); the CPU backend has them too (the
     * conformance test, and MOE_TEST_DEVICE_MOE=1 runs the forward pass's device path on it). */
    /* Groups the n = n_tok * k choices of idx (B, (n_tok, k) int32, each in [0, E)) by expert,
     * stably (choice order within an expert): off (B, E + 1 int32) the prefix sums of the
     * per-expert counts (off[0] = 0, off[E] = n); src_row (B, n int32): the token (choice / k)
     * of grouped row s; slot (B, n int32): the grouped row of choice i. tally (B, E int64, may
     * be NULL): += each expert's count (the load statistics). */
    void (*expert_sort)(moe_backend *be, const int32_t *idx, int n_tok, int k, int E, int32_t *off,
                        int32_t *src_row, int32_t *slot, int64_t *tally);
    /* Grouped matmul, row counts in backend memory: for every expert e and every row s in
     * [off[e], off[e + 1]) (off B, E + 1 int32, non-decreasing), y row s (n_out floats, B) =
     * x row (x_row ? x_row[s] : s) (n_in floats, B; x_row B int32 or NULL) times W_e^T, W_e =
     * w[e] (w: H array of E B pointers to (n_out, n_in) weights of dtype wt; NULL only for an
     * expert with no rows). max_rows bounds every expert's count (sizes a device launch; rows
     * beyond it are not computed: the caller's contract). Tolerances as matmul_batch's. */
    void (*matmul_grouped)(moe_backend *be, float *y, const float *x, const int32_t *x_row,
                           const void *const *w, moe_dtype wt, const int32_t *off, int E,
                           int n_in, int n_out, int max_rows);
    /* out row t (d floats) += w[t * k + j] * y row slot[t * k + j] for j = 0 .. k-1 in order
     * (out, y, slot, w B): ep_combine's sums, with the indices in backend memory. */
    void (*expert_combine)(moe_backend *be, float *out, const float *y, const int32_t *slot,
                           const float *w, int n_tok, int k, int d);

    /* ---- lifetime ---- */
    /* One line for logs: the device and what runs on it (a static or backend-owned string). */
    const char *(*describe)(const moe_backend *be);
    void (*destroy)(moe_backend *be);
} moe_backend_ops;

struct moe_backend {
    const moe_backend_ops *ops;
    moe_device device;
    const char *name; /* "cpu", "cuda" */
    bool host_memory; /* backend memory is host memory: ops may read host tensors as they are */
    void *ctx;        /* the backend's own state */
};

/* The CPU backend: kernels/kernels.h on pool (may be NULL: single thread; not owned). */
moe_status moe_backend_cpu_create(moe_threadpool_t *pool, moe_backend **out);
/* The CUDA backend on GPU `gpu`. MOE_ERR_UNAVAILABLE with a message saying why (binary built
 * without CUDA, no driver, no GPU visible) when it cannot run. */
moe_status moe_backend_cuda_create(int gpu, moe_backend **out);
/* Either, by device; index: the GPU (CUDA only), pool: the CPU's (CPU only). */
moe_status moe_backend_create(moe_device dev, int index, moe_threadpool_t *pool, moe_backend **out);
void moe_backend_free(moe_backend *be);
/* The pool behind a CPU backend (NULL for others or a single-threaded CPU backend). */
moe_threadpool_t *moe_backend_cpu_pool(const moe_backend *be);

#endif
