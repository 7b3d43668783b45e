/* CPU math kernels: pure functions over plain arrays, plus the thread pool they run on.
 * Nothing here knows about requests, models or MPI. Hot-path functions allocate nothing.
 * ISA (AVX-512 BF16/VNNI, AVX2+FMA, scalar) is chosen once at start-up; see moe_kernels_isa(). */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Element type of a weight matrix. Activations are always f32. */
typedef enum {
    MOE_DT_F32 = 0,
    MOE_DT_BF16, /* raw bf16 bits in uint16_t */
    MOE_DT_F16,  /* raw IEEE half bits in uint16_t */
    MOE_DT_Q8,   /* group-wise 8-bit: moe_block_q8 rows (see "quantized weights" below) */
    MOE_DT_Q4,   /* group-wise 4-bit: moe_block_q4 rows */
    MOE_DT_COUNT
} moe_dtype;

const char *moe_dtype_name(moe_dtype dt);

/* ---- ISA dispatch ---- */
typedef enum { MOE_ISA_SCALAR = 0, MOE_ISA_AVX2, MOE_ISA_AVX512, MOE_ISA_AMX } moe_isa;
/* The ISA every kernel dispatches to. Chosen from CPUID at first use; MOE_ISA=scalar|avx2|avx512|amx
 * in the environment forces a lower one (tests use moe_kernels_force_isa). */
moe_isa moe_kernels_isa(void);
const char *moe_isa_name(moe_isa isa);
/* Test hook: force an ISA (must be supported by the CPU, else returns the active one). */
moe_isa moe_kernels_force_isa(moe_isa isa);
/* Which code each kernel runs under the active ISA, one line for logs (a static string): the
 * choice is per kernel, never a path measured slower than another this CPU has (on AVX-512 CPUs
 * f32/f16 weights run the AVX2 rows, and so does bf16 on an Intel CPU left at avx512, from 4
 * tokens on with that arithmetic on zmm registers;
 * docs/kernels.md, ISA dispatch). */
const char *moe_kernels_describe(void);

/* ---- conversions ---- */
static inline float moe_bf16_to_f32(uint16_t h)
{
    union {
        uint32_t u;
        float f;
    } v = {.u = (uint32_t)h << 16};
    return v.f;
}
/* Round-to-nearest-even, NaN kept quiet. */
static inline uint16_t moe_f32_to_bf16(float f)
{
    union {
        float f;
        uint32_t u;
    } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
float moe_f16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float f);
/* dst[i] = (float)src[i] for a whole array of dtype `dt`. F32, BF16, F16; Q8 and Q4 dequantize
 * n / MOE_QK consecutive blocks (n must be a multiple of MOE_QK). */
void moe_convert_to_f32(float *dst, const void *src, moe_dtype dt, size_t n);

/* ---- quantized weights (MOE_DT_Q8, MOE_DT_Q4) ----
 * Group-wise symmetric quantization along the input dimension: every row of a weight matrix is
 * cut into blocks of MOE_QK consecutive inputs, each stored as an f16 scale d and MOE_QK codes.
 * Q8: q in [-127, 127], value d * q (34 bytes per 32 weights, the size of llama.cpp's Q8_0).
 * Q4: 4-bit codes c in [0, 15], value d * (c - 8); byte j holds input j in its low nibble and
 * input j + 16 in its high nibble (18 bytes per 32 weights, the size and layout of Q4_0).
 * A matrix is its rows one after another (n_in / MOE_QK blocks each), so n_in must be a multiple
 * of MOE_QK; callers keep other matrices in their original dtype. See docs/kernels.md. */
#define MOE_QK 32
typedef struct {
    uint16_t d; /* scale, IEEE half bits */
    int8_t q[MOE_QK];
} moe_block_q8;
typedef struct {
    uint16_t d; /* scale, IEEE half bits */
    uint8_t q[MOE_QK / 2];
} moe_block_q4;

/* Bytes of one row of n elements of dtype dt; 0 when dt is quantized and n is not a multiple of
 * MOE_QK (such a row cannot be stored in that dtype). */
size_t moe_dtype_row_bytes(moe_dtype dt, size_t n);
/* Quantizes n elements of src (dtype st: F32, BF16 or F16) into n / MOE_QK blocks of dtype qt (Q8
 * or Q4) at dst. n must be a multiple of MOE_QK. Per block: Q8 takes d = max|x| / 127 and
 * q = round(x / d); Q4 takes d = -m / 8 where m is the entry of largest magnitude, and
 * c = clamp(round(x / d), -8, 7) + 8 (so m is exact and 16 levels are used); d is rounded to f16
 * first and the codes are computed against the rounded scale (round half away from zero).
 * Returns 0, or -1 when src holds an inf or NaN (not representable; dst is then unspecified).
 * Thread-safe, allocates nothing. */
int moe_quantize(void *dst, moe_dtype qt, const void *src, moe_dtype st, size_t n);

/* ---- thread pool ---- */
typedef struct moe_threadpool moe_threadpool_t;
/* A task body: called once for each task index in [0, n_tasks), on some thread. */
typedef void (*moe_task_fn)(void *arg, int task, int thread);

/* n_threads >= 1 (including the caller). Returns NULL on failure. */
moe_threadpool_t *moe_threadpool_create(int n_threads);
void moe_threadpool_free(moe_threadpool_t *pool);
int moe_threadpool_size(const moe_threadpool_t *pool);
/* Runs fn(arg, t, thread) for every t in [0, n_tasks) and returns when all are done. The calling
 * thread takes part. Not reentrant: one run at a time per pool (call from one thread). pool may be
 * NULL: then everything runs on the caller. */
void moe_threadpool_run(moe_threadpool_t *pool, moe_task_fn fn, void *arg, int n_tasks);

/* ---- linear algebra ---- */
/* y[t*n_out + r] = sum_c x[t*n_in + c] * W[r, c]   for t < n_tok, r < n_out.
 * W is row-major (n_out, n_in) of dtype wt: F32, BF16 or F16 (exact products, f32 accumulation;
 * bf16 from AVX-512 on with x as hi + lo bf16), or Q8 / Q4 (n_in a multiple of MOE_QK): x is
 * quantized once per call to int8 blocks of MOE_QK with an f32 scale each, block dot products are
 * exact integers, scaled and accumulated in f32 (docs/kernels.md gives the error of each, and why
 * every n_tok takes the same path). x: (n_tok, n_in) f32, y: (n_tok, n_out) f32, no aliasing.
 * Rows of W are split across the pool's threads and each weight row is read once for all n_tok
 * tokens. Allocation: the x a call prepares once for all its row tasks (Q8/Q4: quantized, n_tok x
 * n_in x 1.125 bytes; AMX bf16 from 16 tokens on: as B tiles, about 4 bytes per value) lives in a
 * scratch buffer of the calling thread that grows when a call needs more than any before it on
 * that thread and is freed when the thread exits (moe_matmul_reserve sizes it up front); the
 * float rows keep their own per-thread scratch. */
void moe_matmul(moe_threadpool_t *pool, float *y, const float *x, const void *w, moe_dtype wt,
                int n_tok, int n_in, int n_out);
/* One matmul of a moe_matmul_batch: y(n_tok, n_out) = x(n_tok, n_in) * W^T, as moe_matmul. */
typedef struct {
    float *y;
    const float *x;
    const void *w;
    moe_dtype wt;
    int n_tok, n_in, n_out;
} moe_matmul_desc;
#define MOE_MATMUL_BATCH_MAX 64
/* Runs n independent matmuls (e.g. gate and up of every expert a step routed tokens to) in one
 * pool run, their rows split into tasks together: one synchronisation instead of n, no thread idle
 * at the tail of each small matrix. Every y is bit-identical to what moe_matmul gives for its desc
 * alone (an output's arithmetic never depends on the row split). Descs may share an x (same
 * pointer, n_tok and n_in: it is prepared once); no y may overlap another y or any x. More than
 * MOE_MATMUL_BATCH_MAX descs run in several pool runs. Allocation as moe_matmul: the calling
 * thread's scratch holds every distinct prepared x of the batch at once (if it cannot grow, each
 * desc runs alone, a quantized x one token at a time on the stack, same results). */
void moe_matmul_batch(moe_threadpool_t *pool, const moe_matmul_desc *descs, int n);
/* Single-threaded variant, for callers that already split work across threads (per expert). */
void moe_matmul_serial(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                       int n_out);
/* Optional: sizes the calling thread's scratch for quantized (Q8/Q4) matmuls of up to n_tok x
 * n_in (every n_tok quantizes x, prefill too), so later calls on this thread allocate nothing. Returns 0,
 * or -1 when out of memory (matmul then still works: without scratch it quantizes x one token at a
 * time on the stack, with identical results, when n_in <= 32768). */
int moe_matmul_reserve(int n_tok, int n_in);

/* ---- elementwise ---- */
/* y = x / sqrt(mean(x^2) + eps) * w, over n elements; y may alias x. */
void moe_rmsnorm(float *y, const float *x, const float *w, int n, float eps);
/* In-place softmax over n elements (max-subtracted). */
void moe_softmax(float *x, int n);
/* gate[i] = silu(gate[i]) * up[i]. */
void moe_silu_mul(float *gate, const float *up, int n);
/* y[i] += a * x[i]. */
void moe_axpy(float *y, float a, const float *x, int n);
/* Indices and values of the k largest of x[0..n), largest first; ties go to the lower index
 * (as torch.topk does on CPU). k <= n. */
void moe_topk(const float *x, int n, int k, int *idx, float *val);

/* Rotary embedding, Hugging Face "rotate half" convention, in place on n_heads heads of head_dim
 * (contiguous, stride head_dim). cos_sin holds head_dim/2 cos values then head_dim/2 sin values for
 * this position (see moe_rope_table). */
void moe_rope(float *x, int n_heads, int head_dim, const float *cos_sin);
/* Fills table[pos * head_dim + ...] with cos then sin for positions [0, n_pos), frequencies
 * theta^(-2i/head_dim), computed in f32 step by step as HF/PyTorch does (inv_freq, pos*inv_freq,
 * cos/sin all f32), so tables agree with PyTorch to ~1e-7 even at large positions: see
 * docs/kernels.md. */
void moe_rope_table(float *table, int n_pos, int head_dim, double theta);

/* ---- attention over a paged KV cache ----
 * One query token of one sequence, all heads. K and V of context token j live in block
 * blocks[j / block_size] at row j % block_size: for kv head h, key = k_base[b] + h * head_stride +
 * (j % block_size) * head_dim (likewise v_base). Grouped-query: query head i reads kv head
 * i / (n_head / n_kv_head). Attends to context tokens [0, n_ctx) (the caller passes the causal
 * length). q: (n_head, head_dim); out: (n_head, head_dim); scratch: at least n_ctx floats.
 * scale is usually 1/sqrt(head_dim). */
typedef struct {
    const float *const *k_base; /* per block: this layer's K base in that block */
    const float *const *v_base; /* per block: this layer's V base in that block */
    int block_size;             /* tokens per block */
    size_t head_stride;         /* floats between kv heads inside a block (block_size*head_dim) */
} moe_kv_view;

void moe_attention(float *out, const float *q, const moe_kv_view *kv, int n_ctx, int n_head,
                   int n_kv_head, int head_dim, float scale, float *scratch);
/* Several consecutive query tokens of one sequence (prefill): query i < n_q reads q + i * q_stride
 * and writes out + i * out_stride (strides in floats; each (n_head, head_dim) as above) and attends
 * to context tokens [0, n_ctx0 + i) (its causal length: positions n_ctx0 - 1 + i). Every query's
 * output is bit-identical to moe_attention's for it alone; the queries share the walk over the
 * context, so each K/V row is loaded once for all of them. 0 <= n_q <= MOE_ATTN_MAX_Q. Allocates
 * nothing; no scratch. */
#define MOE_ATTN_MAX_Q 16
void moe_attention_multi(float *out, size_t out_stride, const float *q, size_t q_stride,
                         const moe_kv_view *kv, int n_q, int n_ctx0, int n_head, int n_kv_head,
                         int head_dim, float scale);

#endif
