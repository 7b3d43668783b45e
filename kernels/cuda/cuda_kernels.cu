// CUDA kernels of the CUDA compute backend (contracts: kernels/cuda/cuda_kernels.h). Written for
// correctness first and simple enough to review: one thread per element, one block per row for
// reductions, one warp per (token, head) for attention, one warp per weight row for the quantized
// matmul. Not yet run on a GPU (docs/backends.md).
#include "kernels/cuda/cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

namespace {

constexpr int QK = 32; // kernels/kernels.h MOE_QK
struct BlockQ8 {
    uint16_t d;
    int8_t q[QK];
};
struct BlockQ4 {
    uint16_t d;
    uint8_t q[QK / 2];
};
static_assert(sizeof(BlockQ8) == 34 && sizeof(BlockQ4) == 18, "block layout as kernels/kernels.h");

__device__ inline float half_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ inline float bf16_bits_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

__device__ inline float load_elem(const void *row, int dt, int c)
{
    if (dt == 0)
        return ((const float *)row)[c];
    uint16_t h = ((const uint16_t *)row)[c];
    return dt == 1 ? bf16_bits_to_f32(h) : half_bits_to_f32(h);
}

__device__ inline float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

unsigned grid_for(size_t n, unsigned threads)
{
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g ? (g < 65535u * 64u ? g : 65535u * 64u) : 1);
}

int done() { return (int)cudaGetLastError(); }

__global__ void k_split_half(void *dst, const float *src, size_t n, int dt)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = src[i];
        if (dt == 1) {
            __nv_bfloat16 hi = __float2bfloat16_rn(x);
            ((__nv_bfloat16 *)dst)[i] = hi;
            ((__nv_bfloat16 *)dst)[n + i] = __float2bfloat16_rn(x - __bfloat162float(hi));
        } else {
            __half hi = __float2half_rn(x);
            ((__half *)dst)[i] = hi;
            ((__half *)dst)[n + i] = __float2half_rn(x - __half2float(hi));
        }
    }
}

__global__ void k_add_halves(float *y, const float *y2, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = y2[i] + y2[n + i];
}

// One warp per weight row r, tokens in tiles of 8: the row's blocks are read once per tile.
constexpr int QTILE = 8;
__global__ void k_matmul_quant(float *y, const float *x, const void *w, int dt, int n_tok, int n_in, int n_out)
{
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    int t0 = blockIdx.y * QTILE;
    if (r >= n_out)
        return;
    int nb = n_in / QK;
    float acc[QTILE];
    for (int i = 0; i < QTILE; i++)
        acc[i] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        float wv[QK];
        if (dt == 3) {
            const BlockQ8 *blk = (const BlockQ8 *)w + (size_t)r * nb + b;
            float d = half_bits_to_f32(blk->d);
            for (int j = 0; j < QK; j++)
                wv[j] = d * (float)blk->q[j];
        } else {
            const BlockQ4 *blk = (const BlockQ4 *)w + (size_t)r * nb + b;
            float d = half_bits_to_f32(blk->d);
            for (int j = 0; j < QK / 2; j++) {
                wv[j] = d * (float)((int)(blk->q[j] & 15) - 8);
                wv[j + QK / 2] = d * (float)((int)(blk->q[j] >> 4) - 8);
            }
        }
        for (int i = 0; i < QTILE && t0 + i < n_tok; i++) {
            const float *xr = x + (size_t)(t0 + i) * n_in + (size_t)b * QK;
            float s = 0.0f;
            for (int j = 0; j < QK; j++)
                s += xr[j] * wv[j];
            acc[i] += s;
        }
    }
    for (int i = 0; i < QTILE && t0 + i < n_tok; i++) {
        float s = warp_sum(acc[i]);
        if (lane == 0)
            y[(size_t)(t0 + i) * n_out + r] = s;
    }
}

__global__ void k_embed(float *x, const void *table, int dt, const int32_t *tokens, int d)
{
    int t = blockIdx.x;
    size_t esz = dt == 0 ? 4 : 2;
    const char *row = (const char *)table + (size_t)tokens[t] * d * esz;
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        x[(size_t)t * d + c] = load_elem(row, dt, c);
}

// Sum of squares in double (the CPU kernel's order-independent choice), HF's f32 recipe after.
__global__ void k_rmsnorm(float *y, const float *x, const float *w, int n, float eps)
{
    __shared__ double part[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *yr = y + (size_t)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += (double)xr[i] * xr[i];
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < (int)(blockDim.x / 32); i++)
            t += part[i];
        part[0] = t;
    }
    __syncthreads();
    float inv = 1.0f / sqrtf((float)(part[0] / n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = xr[i] * inv * w[i];
}

__global__ void k_rope(float *x, size_t row_stride, int n_heads, int head_dim, const int32_t *pos, const float *table)
{
    int t = blockIdx.x, h = blockIdx.y, half = head_dim / 2;
    const float *cs = table + (size_t)pos[t] * head_dim;
    float *v = x + (size_t)t * row_stride + (size_t)h * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = v[i], b = v[i + half], c = cs[i], s = cs[half + i];
        float p = __fmul_rn(a, c), q = __fmul_rn(b, s), r = __fmul_rn(b, c), u = __fmul_rn(a, s);
        v[i] = __fsub_rn(p, q);
        v[i + half] = __fadd_rn(r, u);
    }
}

__global__ void k_kv_write(float *pool, int n_layers, int n_kv_head, int head_dim, int bs, int layer,
                           const float *k, const float *v, const int32_t *dst)
{
    int t = blockIdx.x, kvdim = n_kv_head * head_dim;
    size_t ls = 2 * (size_t)kvdim * bs;
    int blk = dst[t] / bs, slot = dst[t] % bs;
    float *kb = pool + ((size_t)blk * n_layers + layer) * ls, *vb = kb + ls / 2;
    for (int c = threadIdx.x; c < kvdim; c += blockDim.x) {
        int h = c / head_dim, i = c % head_dim;
        size_t off = ((size_t)h * bs + slot) * head_dim + i;
        kb[off] = k[(size_t)t * kvdim + c];
        vb[off] = v[(size_t)t * kvdim + c];
    }
}

constexpr int MAX_HD_PER_LANE = 8; // head_dim <= 256
__global__ void k_attention(float *out, const float *q, const float *pool, int n_layers, int n_kv_head,
                            int head_dim, int bs, int layer, const int32_t *blocks, const int32_t *tab_off,
                            const int32_t *n_ctx, int n_tok, int n_head, float scale)
{
    int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp >= n_tok * n_head)
        return;
    int t = warp / n_head, h = warp % n_head, kh = h / (n_head / n_kv_head);
    int qdim = n_head * head_dim;
    size_t ls = 2 * (size_t)n_kv_head * bs * head_dim;
    float qv[MAX_HD_PER_LANE], o[MAX_HD_PER_LANE];
    for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        int c = lane + 32 * i;
        qv[i] = c < head_dim ? q[(size_t)t * qdim + (size_t)h * head_dim + c] : 0.0f;
        o[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int32_t *tab = blocks + tab_off[t];
    for (int j = 0; j < n_ctx[t]; j++) {
        const float *kb = pool + ((size_t)tab[j / bs] * n_layers + layer) * ls +
                          ((size_t)kh * bs + j % bs) * head_dim;
        const float *vb = kb + ls / 2;
        float s = 0.0f;
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            int c = lane + 32 * i;
            if (c < head_dim)
                s += qv[i] * kb[c];
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            int c = lane + 32 * i;
            o[i] = o[i] * corr + (c < head_dim ? p * vb[c] : 0.0f);
        }
        m = mn;
    }
    for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        int c = lane + 32 * i;
        if (c < head_dim)
            out[(size_t)t * qdim + (size_t)h * head_dim + c] = l > 0.0f ? o[i] / l : 0.0f;
    }
}

// One thread per row: softmax (max-subtracted, sum in double) then top-k by insertion, strict '>'
// so ties keep the lower index, as the CPU's moe_topk.
__global__ void k_router(float *logits, int n, int E, int k, int renorm, int32_t *idx, float *w)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n)
        return;
    float *p = logits + (size_t)t * E;
    float mx = p[0];
    for (int e = 1; e < E; e++)
        mx = fmaxf(mx, p[e]);
    double s = 0.0;
    for (int e = 0; e < E; e++) {
        p[e] = expf(p[e] - mx);
        s += p[e];
    }
    float inv = (float)(1.0 / s);
    for (int e = 0; e < E; e++)
        p[e] *= inv;
    int32_t *ti = idx + (size_t)t * k;
    float *tw = w + (size_t)t * k;
    int cnt = 0;
    for (int e = 0; e < E; e++) {
        float v = p[e];
        if (cnt == k && !(v > tw[k - 1]))
            continue;
        int pos = cnt < k ? cnt : k - 1;
        while (pos > 0 && v > tw[pos - 1]) {
            tw[pos] = tw[pos - 1];
            ti[pos] = ti[pos - 1];
            pos--;
        }
        tw[pos] = v;
        ti[pos] = e;
        if (cnt < k)
            cnt++;
    }
    if (renorm) {
        float sum = 0.0f;
        for (int i = 0; i < k; i++)
            sum += tw[i];
        for (int i = 0; i < k; i++)
            tw[i] /= sum;
    }
}

#define GRID_LOOP(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

__global__ void k_silu_mul(float *g, const float *u, size_t n)
{
    GRID_LOOP(i, n) { g[i] = g[i] / (1.0f + expf(-g[i])) * u[i]; }
}
__global__ void k_axpy(float *y, float a, const float *x, size_t n)
{
    GRID_LOOP(i, n) { y[i] = __fadd_rn(y[i], __fmul_rn(a, x[i])); }
}
__global__ void k_add_rows(float *y, const float *b, size_t total, int n)
{
    GRID_LOOP(i, total) { y[i] += b[i % n]; }
}
__global__ void k_clamp(float *x, size_t n, float lim)
{
    GRID_LOOP(i, n) { x[i] = x[i] > lim ? lim : (x[i] < -lim ? -lim : x[i]); }
}
__global__ void k_gated_add(float *y, const float *g, const float *x, size_t total, int n)
{
    GRID_LOOP(i, total)
    {
        float s = 1.0f / (1.0f + expf(-g[i / n]));
        y[i] = __fadd_rn(y[i], __fmul_rn(s, x[i]));
    }
}
__global__ void k_rows(float *dst, size_t ds, const float *src, size_t ss, const int32_t *idx, int width, int scatter)
{
    int i = blockIdx.x;
    float *d = dst + (size_t)(scatter ? idx[i] : i) * ds;
    const float *s = src + (size_t)(scatter ? i : idx[i]) * ss;
    for (int c = threadIdx.x; c < width; c += blockDim.x)
        d[c] = s[c];
}
__global__ void k_ep_pack(float *send, const float *src, const int32_t *src_row, const int32_t *tag, int d)
{
    int i = blockIdx.x;
    float *r = send + (size_t)i * (d + 1);
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        r[c] = src[(size_t)src_row[i] * d + c];
    if (threadIdx.x == 0)
        r[d] = __int_as_float(tag[i]);
}
__global__ void k_ep_combine(float *out, const float *back, const int32_t *tok, const float *w, const int32_t *at,
                             int n, int d)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d)
        return;
    for (int s = 0; s < n; s++) {
        float *o = out + (size_t)tok[s] * d + c;
        *o = __fadd_rn(*o, __fmul_rn(w[s], back[(size_t)(at ? at[s] : s) * d + c]));
    }
}

// ---- split GEMMs of a batch: the hi and lo halves summed, every desc in one launch ----

__global__ void k_add_halves_many(const MoeCudaHalves *tab)
{
    const MoeCudaHalves t = tab[blockIdx.y];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < t.n; i += (size_t)gridDim.x * blockDim.x)
        t.y[i] = t.y2[i] + t.y2[t.n + i];
}

// ---- the routed experts on the device (backend.h: expert_sort, matmul_grouped, expert_combine) ----

// One block: per-expert counts with shared atomics, the prefix sums by one thread, then the
// stable placement: thread e walks all choices in order and places those of expert e. O(E * n /
// blockDim) reads, all broadcasts; a first version (decode's n is small; see docs/backends.md).
__global__ void k_expert_sort(const int32_t *idx, int n, int k, int E, int32_t *off, int32_t *src_row,
                              int32_t *slot, long long *tally)
{
    extern __shared__ int sh[]; // [E + 1]: counts, then offsets
    for (int e = threadIdx.x; e <= E; e += blockDim.x)
        sh[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        atomicAdd(&sh[idx[i] + 1], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int e = 0; e < E; e++) {
            if (tally)
                tally[e] += sh[e + 1];
            sh[e + 1] += sh[e];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= E; e += blockDim.x)
        off[e] = sh[e];
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int s = sh[e], end = sh[e + 1];
        for (int i = 0; i < n && s < end; i++)
            if (idx[i] == e) {
                src_row[s] = i / k;
                slot[i] = s;
                s++;
            }
    }
}

// Element (r, c) of an (n_out, n_in) weight matrix of dtype dt as f32 (Q8/Q4 blocks as
// kernels/kernels.h: Q4 keeps column j of a block in the low nibble of byte j, j + 16 in its high).
__device__ inline float weight_at(const void *w, int dt, int r, int c, int n_in)
{
    if (dt <= 2)
        return load_elem((const char *)w + (size_t)r * n_in * (dt == 0 ? 4 : 2), dt, c);
    int nb = n_in / QK, b = c / QK, j = c % QK;
    if (dt == 3) {
        const BlockQ8 *blk = (const BlockQ8 *)w + (size_t)r * nb + b;
        return half_bits_to_f32(blk->d) * (float)blk->q[j];
    }
    const BlockQ4 *blk = (const BlockQ4 *)w + (size_t)r * nb + b;
    int q = j < QK / 2 ? (blk->q[j] & 15) : (blk->q[j - QK / 2] >> 4);
    return half_bits_to_f32(blk->d) * (float)(q - 8);
}

// Grouped GEMM whose row counts live on the device: block (bx, by, e) computes rows
// [by * GM, by * GM + GM) of expert e's rows (off[e] .. off[e + 1]) and outputs [bx * GN, + GN).
// Blocks past an expert's count return at once, so only the experts that got rows read their
// weights. Plain shared-memory tiling in f32: x keeps its f32 precision (no 16-bit rounding, unlike
// a tensor-core GEMM), products of exact weight values, f32 accumulation. 16 x 16 threads, each
// GM / 16 rows x GN / 16 outputs.
constexpr int GM = 32, GN = 64, GK = 32;
__global__ void __launch_bounds__(256) k_matmul_grouped(float *y, const float *x, const int32_t *x_row,
                                                        const void *const *w, int dt, const int32_t *off,
                                                        int n_in, int n_out, int max_rows)
{
    __shared__ float xs[GM][GK + 1], ws[GN][GK + 1];
    int e = blockIdx.z, s0 = off[e], cnt = min(off[e + 1] - s0, max_rows);
    int r0 = blockIdx.y * GM, o0 = blockIdx.x * GN;
    if (r0 >= cnt) // uniform over the block: before any barrier
        return;
    const void *we = w[e];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[GM / 16][GN / 16] = {};
    for (int k0 = 0; k0 < n_in; k0 += GK) {
        for (int i = threadIdx.x; i < GM * GK; i += 256) {
            int r = i / GK, c = i % GK, row = r0 + r, col = k0 + c;
            float v = 0.0f;
            if (row < cnt && col < n_in) {
                int src = x_row ? x_row[s0 + row] : s0 + row;
                v = x[(size_t)src * n_in + col];
            }
            xs[r][c] = v;
        }
        for (int i = threadIdx.x; i < GN * GK; i += 256) {
            int o = i / GK, c = i % GK, orow = o0 + o, col = k0 + c;
            ws[o][c] = orow < n_out && col < n_in ? weight_at(we, dt, orow, col, n_in) : 0.0f;
        }
        __syncthreads();
        for (int c = 0; c < GK; c++)
            for (int a = 0; a < GM / 16; a++) {
                float xv = xs[ty * (GM / 16) + a][c];
                for (int b = 0; b < GN / 16; b++)
                    acc[a][b] = fmaf(xv, ws[tx + 16 * b][c], acc[a][b]);
            }
        __syncthreads();
    }
    for (int a = 0; a < GM / 16; a++) {
        int row = r0 + ty * (GM / 16) + a;
        if (row >= cnt)
            continue;
        for (int b = 0; b < GN / 16; b++) {
            int o = o0 + tx + 16 * b;
            if (o < n_out)
                y[(size_t)(s0 + row) * n_out + o] = acc[a][b];
        }
    }
}

// One thread per (token, column): the k choices added in order, as ep_combine.
__global__ void k_expert_combine(float *out, const float *y, const int32_t *slot, const float *w, int n_tok, int k,
                                 int d)
{
    GRID_LOOP(i, (size_t)n_tok * d)
    {
        size_t t = i / d, c = i % d;
        float o = out[i];
        for (int j = 0; j < k; j++) {
            size_t a = t * k + j;
            o = __fadd_rn(o, __fmul_rn(w[a], y[(size_t)slot[a] * d + c]));
        }
        out[i] = o;
    }
}

} // namespace

#define S(stream) ((cudaStream_t)(stream))

extern "C" {

int moe_cuda_split_half(void *dst, const float *src, size_t n, int dt, void *stream)
{
    k_split_half<<<grid_for(n, 256), 256, 0, S(stream)>>>(dst, src, n, dt);
    return done();
}

int moe_cuda_add_halves(float *y, const float *y2, size_t n, void *stream)
{
    k_add_halves<<<grid_for(n, 256), 256, 0, S(stream)>>>(y, y2, n);
    return done();
}

int moe_cuda_matmul_quant(float *y, const float *x, const void *w, int dt, int n_tok, int n_in, int n_out, void *stream)
{
    if (n_tok <= 0 || n_out <= 0)
        return 0;
    dim3 grid((unsigned)((n_out + 3) / 4), (unsigned)((n_tok + QTILE - 1) / QTILE));
    k_matmul_quant<<<grid, 128, 0, S(stream)>>>(y, x, w, dt, n_tok, n_in, n_out);
    return done();
}

int moe_cuda_embed(float *x, const void *table, int dt, const int32_t *tokens, int n, int d, void *stream)
{
    if (n <= 0)
        return 0;
    k_embed<<<(unsigned)n, 256, 0, S(stream)>>>(x, table, dt, tokens, d);
    return done();
}

int moe_cuda_rmsnorm(float *y, const float *x, const float *w, int n_rows, int n, float eps, void *stream)
{
    if (n_rows <= 0)
        return 0;
    k_rmsnorm<<<(unsigned)n_rows, 256, 0, S(stream)>>>(y, x, w, n, eps);
    return done();
}

int moe_cuda_rope(float *x, int n_tok, size_t row_stride, int n_heads, int head_dim, const int32_t *pos,
                  const float *table, void *stream)
{
    if (n_tok <= 0 || n_heads <= 0)
        return 0;
    k_rope<<<dim3((unsigned)n_tok, (unsigned)n_heads), 64, 0, S(stream)>>>(x, row_stride, n_heads, head_dim, pos, table);
    return done();
}

int moe_cuda_kv_write(float *pool, int n_layers, int n_kv_head, int head_dim, int block_size, int layer,
                      const float *k, const float *v, const int32_t *dst, int n_tok, void *stream)
{
    if (n_tok <= 0)
        return 0;
    k_kv_write<<<(unsigned)n_tok, 256, 0, S(stream)>>>(pool, n_layers, n_kv_head, head_dim, block_size, layer, k, v,
                                                        dst);
    return done();
}

int moe_cuda_attention(float *out, const float *q, const float *pool, int n_layers, int n_kv_head, int head_dim,
                       int block_size, int layer, const int32_t *blocks, const int32_t *tab_off,
                       const int32_t *n_ctx, int n_tok, int n_head, float scale, void *stream)
{
    if (head_dim > 32 * MAX_HD_PER_LANE)
        return (int)cudaErrorInvalidValue;
    int warps = n_tok * n_head;
    if (warps <= 0)
        return 0;
    k_attention<<<(unsigned)((warps + 3) / 4), 128, 0, S(stream)>>>(out, q, pool, n_layers, n_kv_head, head_dim,
                                                                     block_size, layer, blocks, tab_off, n_ctx,
                                                                     n_tok, n_head, scale);
    return done();
}

int moe_cuda_router(float *logits, int n, int E, int k, int renorm, int32_t *idx, float *w, void *stream)
{
    if (n <= 0)
        return 0;
    k_router<<<(unsigned)((n + 63) / 64), 64, 0, S(stream)>>>(logits, n, E, k, renorm, idx, w);
    return done();
}

int moe_cuda_silu_mul(float *gate, const float *up, size_t n, void *stream)
{
    k_silu_mul<<<grid_for(n, 256), 256, 0, S(stream)>>>(gate, up, n);
    return done();
}

int moe_cuda_axpy(float *y, float a, const float *x, size_t n, void *stream)
{
    k_axpy<<<grid_for(n, 256), 256, 0, S(stream)>>>(y, a, x, n);
    return done();
}

int moe_cuda_add_rows(float *y, const float *bias, int n_rows, int n, void *stream)
{
    size_t total = (size_t)n_rows * n;
    k_add_rows<<<grid_for(total, 256), 256, 0, S(stream)>>>(y, bias, total, n);
    return done();
}

int moe_cuda_clamp(float *x, size_t n, float lim, void *stream)
{
    k_clamp<<<grid_for(n, 256), 256, 0, S(stream)>>>(x, n, lim);
    return done();
}

int moe_cuda_gated_add(float *y, const float *g, const float *x, int n_rows, int n, void *stream)
{
    size_t total = (size_t)n_rows * n;
    k_gated_add<<<grid_for(total, 256), 256, 0, S(stream)>>>(y, g, x, total, n);
    return done();
}

int moe_cuda_rows(float *dst, size_t dst_stride, const float *src, size_t src_stride, const int32_t *idx, int n,
                  int width, int scatter, void *stream)
{
    if (n <= 0)
        return 0;
    k_rows<<<(unsigned)n, 128, 0, S(stream)>>>(dst, dst_stride, src, src_stride, idx, width, scatter);
    return done();
}

int moe_cuda_ep_pack(float *send, const float *src, const int32_t *src_row, const int32_t *tag, int n, int d,
                     void *stream)
{
    if (n <= 0)
        return 0;
    k_ep_pack<<<(unsigned)n, 128, 0, S(stream)>>>(send, src, src_row, tag, d);
    return done();
}

int moe_cuda_ep_combine(float *out, const float *back, const int32_t *tok, const float *w, const int32_t *at, int n,
                        int d, void *stream)
{
    if (n <= 0 || d <= 0)
        return 0;
    k_ep_combine<<<(unsigned)((d + 127) / 128), 128, 0, S(stream)>>>(out, back, tok, w, at, n, d);
    return done();
}

int moe_cuda_add_halves_many(const MoeCudaHalves *tab, int n, size_t max_n, void *stream)
{
    if (n <= 0)
        return 0;
    unsigned gx = grid_for(max_n, 256);
    k_add_halves_many<<<dim3(gx < 1024 ? gx : 1024, (unsigned)n), 256, 0, S(stream)>>>(tab);
    return done();
}

int moe_cuda_expert_sort(const int32_t *idx, int n_tok, int k, int E, int32_t *off, int32_t *src_row,
                         int32_t *slot, int64_t *tally, void *stream)
{
    if (E <= 0 || (size_t)(E + 1) * sizeof(int) > 48 * 1024)
        return (int)cudaErrorInvalidValue;
    k_expert_sort<<<1, 1024, (size_t)(E + 1) * sizeof(int), S(stream)>>>(idx, n_tok * k, k, E, off, src_row, slot,
                                                                         (long long *)tally);
    return done();
}

int moe_cuda_matmul_grouped(float *y, const float *x, const int32_t *x_row, const void *const *w, int dt,
                            const int32_t *off, int E, int n_in, int n_out, int max_rows, void *stream)
{
    if (E <= 0 || max_rows <= 0 || n_out <= 0)
        return 0;
    if (E > 65535 || (max_rows + GM - 1) / GM > 65535)
        return (int)cudaErrorInvalidValue;
    dim3 grid((unsigned)((n_out + GN - 1) / GN), (unsigned)((max_rows + GM - 1) / GM), (unsigned)E);
    k_matmul_grouped<<<grid, 256, 0, S(stream)>>>(y, x, x_row, w, dt, off, n_in, n_out, max_rows);
    return done();
}

int moe_cuda_expert_combine(float *out, const float *y, const int32_t *slot, const float *w, int n_tok, int k, int d,
                            void *stream)
{
    size_t n = (size_t)n_tok * d;
    if (n == 0)
        return 0;
    k_expert_combine<<<grid_for(n, 256), 256, 0, S(stream)>>>(out, y, slot, w, n_tok, k, d);
    return done();
}

} // extern "C"
