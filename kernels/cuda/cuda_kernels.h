/* CUDA kernels of the CUDA compute backend (worker/compute/backend_cuda.c), as plain C launchers:
 * every pointer is device memory, every launch goes on `stream` (a cudaStream_t) and returns at
 * once; the return value is the launch's cudaError_t (0 = cudaSuccess). The GEMMs of bf16/f16/f32
 * weights are cuBLAS calls made by the backend; these are the rest. Built with nvcc only when a
 * toolkit is found (cmake/cuda.cmake). Contracts match the ops of worker/compute/backend.h. */
#ifndef MOE_KERNELS_CUDA_H
#define MOE_KERNELS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dtype codes: kernels/kernels.h's moe_dtype values (F32 0, BF16 1, F16 2, Q8 3, Q4 4). */

/* Activations for a 16-bit cuBLAS GEMM without losing f32 precision: dst[i] = hi = (bf16 or f16,
 * by dt) src[i] and dst[n + i] = lo = the same type of src[i] - hi, round to nearest even; so
 * W (hi + lo) carries x to 2^-16 (bf16) / 2^-22 (f16) relative instead of 2^-9 / 2^-11. */
int moe_cuda_split_half(void *dst, const float *src, size_t n, int dt, void *stream);
/* y[i] = y2[i] + y2[n + i]: the hi and lo halves of a split GEMM summed. */
int moe_cuda_add_halves(float *y, const float *y2, size_t n, void *stream);
/* Many split GEMMs' halves summed in one launch: for every entry, y[i] = y2[i] + y2[n + i].
 * tab: device array of n entries; max_n: the largest entry's n (sizes the grid). */
typedef struct {
    float *y;
    const float *y2;
    size_t n;
} MoeCudaHalves;
int moe_cuda_add_halves_many(const MoeCudaHalves *tab, int n, size_t max_n, void *stream);
/* The routed experts on the device, contracts as worker/compute/backend.h's expert_sort,
 * matmul_grouped and expert_combine (every pointer device memory, w a device array of E weight
 * pointers). expert_sort: one block, E <= 12287 (the counts in shared memory). matmul_grouped:
 * f32 tiles, no tensor cores (x keeps its f32 precision). */
int moe_cuda_expert_sort(const int32_t *idx, int n_tok, int k, int E, int32_t *off,
                         int32_t *src_row, int32_t *slot, int64_t *tally, void *stream);
int moe_cuda_matmul_grouped(float *y, const float *x, const int32_t *x_row, const void *const *w,
                            int dt, const int32_t *off, int E, int n_in, int n_out, int max_rows,
                            void *stream);
int moe_cuda_expert_combine(float *out, const float *y, const int32_t *slot, const float *w,
                            int n_tok, int k, int d, void *stream);
/* y(n_tok, n_out) = x(n_tok, n_in) * W^T for Q8/Q4 weights (dt 3/4), dequantized on the fly in
 * registers, f32 products and accumulation. */
int moe_cuda_matmul_quant(float *y, const float *x, const void *w, int dt, int n_tok, int n_in,
                          int n_out, void *stream);
/* x row t = table row tokens[t] (dtype dt 0/1/2) as f32. */
int moe_cuda_embed(float *x, const void *table, int dt, const int32_t *tokens, int n, int d,
                   void *stream);
int moe_cuda_rmsnorm(float *y, const float *x, const float *w, int n_rows, int n, float eps,
                     void *stream);
int moe_cuda_rope(float *x, int n_tok, size_t row_stride, int n_heads, int head_dim,
                  const int32_t *pos, const float *table, void *stream);
/* dst[t]: block * block_size + slot. Pool layout as worker/kv_cache.h. */
int moe_cuda_kv_write(float *pool, int n_layers, int n_kv_head, int head_dim, int block_size,
                      int layer, const float *k, const float *v, const int32_t *dst, int n_tok,
                      void *stream);
/* Paged attention, decode and prefill alike: token t attends to n_ctx[t] positions of the
 * sequence whose block ids start at blocks + tab_off[t]. One warp per (token, head), online
 * softmax; head_dim <= 256. */
int moe_cuda_attention(float *out, const float *q, const float *pool, int n_layers, int n_kv_head,
                       int head_dim, int block_size, int layer, const int32_t *blocks,
                       const int32_t *tab_off, const int32_t *n_ctx, int n_tok, int n_head,
                       float scale, void *stream);
int moe_cuda_router(float *logits, int n, int E, int k, int renorm, int32_t *idx, float *w,
                    void *stream);
int moe_cuda_silu_mul(float *gate, const float *up, size_t n, void *stream);
int moe_cuda_axpy(float *y, float a, const float *x, size_t n, void *stream);
int moe_cuda_add_rows(float *y, const float *bias, int n_rows, int n, void *stream);
int moe_cuda_clamp(float *x, size_t n, float lim, void *stream);
int moe_cuda_gated_add(float *y, const float *g, const float *x, int n_rows, int n, void *stream);
/* gather (scatter == 0): dst row i = src row idx[i]; scatter: dst row idx[i] = src row i. */
int moe_cuda_rows(float *dst, size_t dst_stride, const float *src, size_t src_stride,
                  const int32_t *idx, int n, int width, int scatter, void *stream);
int moe_cuda_ep_pack(float *send, const float *src, const int32_t *src_row, const int32_t *tag,
                     int n, int d, void *stream);
/* out row tok[s] += w[s] * back row (at ? at[s] : s), s in order (one thread per column). */
int moe_cuda_ep_combine(float *out, const float *back, const int32_t *tok, const float *w,
                        const int32_t *at, int n, int d, void *stream);

#ifdef __cplusplus
}
#endif

#endif
