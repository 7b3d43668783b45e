/* Private to kernels/cpu: the per-ISA function table and the scalar/AVX2/AVX-512 entry points. */
#ifndef MOE_KERNELS_CPU_INTERNAL_H
#define MOE_KERNELS_CPU_INTERNAL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

/* Programmer errors only (a dtype a kernel does not take, a bad shape): always on, prints the
 * condition and place, aborts. kernels/ depends on nothing of ours, so not common/log.h's
 * MOE_ASSERT (same behaviour). */
#define MOE_KASSERT(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: %s: assertion failed: %s\n", __FILE__, __LINE__, __func__,     \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static inline float moe_bits_f32_(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t moe_f32_bits_(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* moe_f16_to_f32, inlinable for the scalar kernels. */
static inline float moe_f16_to_f32_inline(uint16_t h)
{
    /* Branch-light (the scalar matmul calls this per weight): move exponent and mantissa into
     * place and rebias by 112; inf/nan get 112 more (31 + 224 = 255); a subnormal is fixed up
     * by one exact f32 subtraction (2^-14 * (1 + man/1024) - 2^-14 = man * 2^-24). */
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = o & 0x0f800000u;
    o += 112u << 23;
    if (exp == 0x0f800000u) {
        o += 112u << 23;
    } else if (exp == 0) {
        o += 1u << 23;
        o = moe_f32_bits_(moe_bits_f32_(o) - 0x1p-14f);
    }
    return moe_bits_f32_(o | ((uint32_t)(h & 0x8000u) << 16));
}

/* Computes rows [r0, r1) of y = x * W^T for all n_tok tokens (see moe_matmul). Single-threaded;
 * every ISA implements exactly this contract, so the threading layer (matmul.c) is shared. */
typedef void (*moe_matmul_rows_fn)(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                                   int n_in, int n_out, int r0, int r1);
/* sum_i a[i] * b[i] over f32 arrays (attention's q.k), several accumulators. */
typedef float (*moe_dot_f32_fn)(const float *a, const float *b, int n);
/* y[i] += a * x[i] (moe_axpy, attention's p.V). */
typedef void (*moe_axpy_f32_fn)(float *y, float a, const float *x, int n);
/* Attention chunk kernels. A "row" is one query head of one query token (its q vector, its o
 * vector, its context length); attention.c hands a chunk's kernels every row of the queries and
 * GQA heads that read the same K/V rows, so a loaded K/V vector feeds several rows. Each row's
 * arithmetic is the same whatever the other rows, their number and their order (batch
 * invariance: a query's result does not depend on how many queries ran with it).
 *
 * Scores: s[r * s_stride + c] = scale * dot(q[r], k[c]) for r < nr, c < nc (k: row pointers into
 * the paged cache). */
typedef void (*moe_attn_scores_fn)(float *s, int s_stride, const float *const *q, int nr,
                                   const float *const *k, int nc, int head_dim, float scale);
/* Values: o[r][d] = alpha[r] * o[r][d] + sum_{c < nc[r]} p[r * p_stride + c] * v[c][d], the
 * terms added in c order (alpha: the online softmax's rescale, 1 when the max did not grow). */
typedef void (*moe_attn_accum_fn)(float *const *o, const float *alpha, const float *p,
                                  int p_stride, int nr, const float *const *v, const int *nc,
                                  int head_dim);

/* Softmax step of one row: *m_out = max(m_in, s[0..nc)) (NaN scores skipped), then s[c] =
 * exp(s[c] - *m_out) for c < nc (each in [0, 1]; NaN stays NaN); returns their sum. Scalar: expf
 * and a running double sum; AVX2: a polynomial exp within 2 ulp of expf (0 below -87) and an f32
 * vector sum (not the same bits). */
typedef double (*moe_attn_exp_fn)(float *s, int nc, float m_in, float *m_out);
/* Quantizes activations for Q8/Q4 matmuls: for each token t and block b of MOE_QK inputs,
 * d[t * nb + b] = max|x| / 127 and q[t * n_in + b * MOE_QK + i] = round-half-even(x * (127 /
 * max|x|)) (nb = n_in / MOE_QK). A block with an inf or NaN gets d = NaN (its outputs become NaN),
 * an all-(near-)zero block d = 0. Every ISA produces the same bytes. */
typedef void (*moe_quantize_x_fn)(int8_t *q, float *d, const float *x, int n_tok, int n_in);
/* Rows [r0, r1) of y = x * W^T for Q8/Q4 weights and x quantized as above. Every output is
 * computed as the AVX2 kernel does it, whatever the ISA: per block, each f32 lane adds the exact
 * integer dot of its inputs times the f32 scale (d_w * d_x) with one FMA; lanes are summed at the
 * end in a fixed order (Q8: 8 lanes of inputs 4j..4j+3, hsum8 order; Q4: 4 lanes of inputs
 * 4j..4j+3 and 16+4j..16+4j+3, (l0 + l2) + (l1 + l3)); so every ISA and tiling gives the same
 * bits. */
typedef void (*moe_matmul_rows_q_fn)(float *y, const int8_t *xq, const float *xd, const void *w,
                                     moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1);

typedef struct {
    moe_matmul_rows_fn matmul_rows;
    moe_dot_f32_fn dot_f32;
    moe_axpy_f32_fn axpy_f32;
    moe_attn_scores_fn attn_scores;
    moe_attn_accum_fn attn_accum;
    moe_quantize_x_fn quantize_x;
    moe_matmul_rows_q_fn matmul_rows_q;
    /* Preferred granularity of rows handed to matmul_rows (its register/panel block). */
    int row_block;
    moe_attn_exp_fn attn_exp;
    /* moe_silu_mul */
    void (*silu_mul)(float *gate, const float *up, int n);
    /* bf16 weights on x prepared once per matmul (matmul.c), for a table whose bf16 rows would
     * otherwise build an x layout in every call (AMX: the B tiles); NULL in the others.
     * rows_x_bytes: the prepared x of n_tok tokens of n_in; rows_x_prep: tokens [t0, t0 + nt) of
     * x (its row 0 at x) into it, t0 a multiple of MOE_ROWS_X_TOK_ALIGN, the same bytes however
     * the tokens are split; matmul_rows_px: matmul_rows for bf16 weights reading it, the same
     * bits as matmul_rows. */
    size_t (*rows_x_bytes)(int n_tok, int n_in);
    void (*rows_x_prep)(void *xp, const float *x, int t0, int nt, int n_in);
    void (*matmul_rows_px)(float *y, const void *xp, const void *w, int n_tok, int n_in, int n_out,
                           int r0, int r1);
} moe_kernel_ops;
/* Token granularity of moe_kernel_ops.rows_x_prep's pieces (AMX: a whole number of B tiles). */
#define MOE_ROWS_X_TOK_ALIGN 16

/* The table of the active ISA (moe_kernels_isa()); never NULL. */
const moe_kernel_ops *moe_kernels_ops(void);
/* The table for isa, x rounded to one bf16 or not (MOE_BF16_X), and the Intel rule (bf16 on the
 * AVX2 rows at avx512) on or off: what moe_kernels_ops() picks from; tests call it directly. */
const moe_kernel_ops *moe_kernels_table(moe_isa isa, int x_round, int intel_rule);
/* CPUID's vendor is GenuineIntel. */
int moe_kernels_cpu_is_intel(void);
/* Test hook: 1 makes the AVX-512 table's bf16 rows round x to one bf16 (as MOE_BF16_X=round
 * does), 0 split it into hi + lo (the default). No effect under other ISAs. */
void moe_kernels_test_bf16_x_round(int on);

void moe_matmul_rows_scalar(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1);
float moe_dot_f32_scalar(const float *a, const float *b, int n);
void moe_axpy_f32_scalar(float *y, float a, const float *x, int n);
void moe_attn_scores_scalar(float *s, int s_stride, const float *const *q, int nr,
                            const float *const *k, int nc, int head_dim, float scale);
void moe_attn_accum_scalar(float *const *o, const float *alpha, const float *p, int p_stride,
                           int nr, const float *const *v, const int *nc, int head_dim);
double moe_attn_exp_scalar(float *s, int nc, float m_in, float *m_out);
void moe_silu_mul_scalar(float *gate, const float *up, int n);

void moe_quantize_x_scalar(int8_t *q, float *d, const float *x, int n_tok, int n_in);
void moe_matmul_rows_q_scalar(float *y, const int8_t *xq, const float *xd, const void *w,
                              moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1);
/* quant.c: dequantizes n (a multiple of MOE_QK) values of Q8/Q4 blocks. */
void moe_dequantize(float *dst, const void *src, moe_dtype qt, size_t n);
/* From this many tokens on, the AVX2 int8 matmul uses its prefill tiles (4 rows x 3 tokens)
 * instead of the decode tiles; both give every output the same bits (see moe_matmul_rows_q_fn), so
 * the switch is invisible in the results. */
#define MOE_Q_PREFILL_TOK 48
/* Activation blocks below this max |x| quantize to zero (127 / max|x| must stay finite). */
#define MOE_QX_MIN_AMAX 1e-30f

/* Test hook (test_kernels): nonzero makes quantized matmuls (and the float rows' scratch below)
 * behave as if the scratch buffer could not be allocated (the one-token-at-a-time stack path).
 * moe_kernels_test_no_scratch_on() reads it. */
void moe_kernels_test_no_scratch(int on);
int moe_kernels_test_no_scratch_on(void);
/* matmul.c: the calling thread's buffer of at least `bytes` (64-byte aligned) for the x layout a
 * float matmul_rows builds (AVX2 bf16: x_split; AVX-512 bf16: x as bf16); NULL when out of memory
 * or under the no-scratch hook. Valid until that thread's next call. */
void *moe_rows_scratch(size_t bytes);

/* The AVX2 bf16 rows' x length per token: n_in rounded up to 16, zero-padded (x_split in
 * matmul_avx2.c; matmul_wide_avx512.c's token pairs use it too). */
static inline int moe_bf16_split_n(int n_in)
{
    return (n_in + 15) & ~15;
}

/* ---- Decode prefetch of the next row tile (the SIMD row kernels, float and int8) ----
 * With a few tokens per call (decode, a batched step's share of an expert) a row kernel streams its
 * weights from memory in row tiles of 1-8 rows, one contiguous block, and so is the next tile. The
 * hardware prefetchers ramp up badly on that: each row is a short stream (768 bf16 inputs: 24
 * cache lines; a row of 2048 bf16 is one 4 KiB page, where the L2 streamer stops). So the first
 * token tile of a row tile (the one that reads it from memory; the others re-read it from cache)
 * prefetches the next tile at the pace it consumes its own: each step of `step` bytes asks for as
 * many bytes of the next tile from byte `off` on, so the prefetches run one tile ahead of the
 * loads, never more. Into which cache, and for which tile sizes, is a rule per kernel and CPU
 * (moe_pf_rule; MOE_PF_NONE: the tile is big enough to stream well on the hardware prefetcher
 * alone), each as measured:
 * - L1 (prefetcht0) holds one of the core's few L1 fill buffers for the whole trip to memory, which
 *   caps the misses in flight; L2 (prefetcht1) does not, but the loads then miss L1.
 * - moe_pf_rows_float (the AVX2 rows on other CPUs than below): up to 16 KiB into L1. On Zen 3
 *   384x768 bf16 matvecs from DRAM ran at 55-65% of a long stream's GB/s without it; a whole
 *   32-64 KiB tile ahead into L1 evicts the one being read (4096x4096 lost 20%).
 * - moe_pf_rows_into_l2 (the AVX2 rows and the zmm token pairs under dispatch.c's Intel rule; the
 *   vdpbf16ps rows of matmul_avx512.c, Zen 4): up to 64 KiB into L2. On the Intel Xeon of issue
 *   16 (`kernels_bench 2 experts 64 1024 2048 bf16`, 2 threads, weights from DRAM) 1-2 tokens per
 *   matrix went from 77-80% of a plain read to 88-91%, 4 tokens from 69% to 80%; engine decode of
 *   OLMoE b=16 +7-9%. Weights that sit in the last-level cache prefer L1 (the small preset's b=1
 *   decode, largely cache-resident: 4-9% slower into L2), but served models stream from DRAM.
 *   bench/RESULTS.md "Issue 16, decode prefetch into L2". On Zen 4 (the vdpbf16ps rows, same
 *   command, quiet machine) the 32 KiB one-token tiles of 1024x2048 went from 84-92% of the read
 *   to 90-99%, the 50304x2048 lm_head 85-89% -> 95-100%, 1024x4096 at 1-4 tokens 1.02-1.25x; OLMoE
 *   b=1 decode +7-10% (bench/RESULTS.md "Issue 16, Zen 4 again"). The earlier Zen 4 rule (up to
 *   16 KiB: prefetching 32 KiB tiles measured 15-20% slower) had been measured with the
 *   machine's bandwidth at half its quiet figure.
 * - moe_pf_rows_int8 (Q8/Q4): up to 32 KiB into L1. Their unpacking keeps them nearer their
 *   compute bound than their memory one at 1-2 tokens, and loads that miss L1 stall it (Q4 one
 *   token, OLMoE gate/up from DRAM, Intel Xeon: 5.4-5.7 ms into L1, 7.0 into L2, same run). */
typedef enum { MOE_PF_NONE, MOE_PF_L1, MOE_PF_L2 } moe_pf_level;
typedef moe_pf_level (*moe_pf_rule)(size_t tile_bytes);

static inline moe_pf_level moe_pf_rows_float(size_t tile_bytes)
{
    return tile_bytes <= 16384 ? MOE_PF_L1 : MOE_PF_NONE;
}

static inline moe_pf_level moe_pf_rows_into_l2(size_t tile_bytes)
{
    return tile_bytes <= 65536 ? MOE_PF_L2 : MOE_PF_NONE;
}

static inline moe_pf_level moe_pf_rows_int8(size_t tile_bytes)
{
    return tile_bytes <= 32768 ? MOE_PF_L1 : MOE_PF_NONE;
}

static inline void moe_prefetch_step(const char *next_tile, size_t off, size_t step,
                                     moe_pf_level level)
{
    /* A step that does not end on a line boundary requests that line again in the next step:
     * harmless (it is in flight or in cache). __builtin_prefetch locality 3 = prefetcht0, 2 =
     * prefetcht1 on x86 (constants: level is known at every call site after inlining). */
    for (size_t c = off & ~(size_t)63; c < off + step; c += 64) {
        if (level == MOE_PF_L2)
            __builtin_prefetch(next_tile + c, 0, 2);
        else
            __builtin_prefetch(next_tile + c, 0, 3);
    }
}

/* Defined in matmul_avx2.c / matmul_avx512.c: only called when the CPU has the ISA. */
void moe_matmul_rows_avx2(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1);
/* The same rows with another decode prefetch rule (matmul_wide_avx512.c: the Intel one). */
void moe_matmul_rows_avx2_pf(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                             int n_in, int n_out, int r0, int r1, moe_pf_rule pf_rule);
float moe_dot_f32_avx2(const float *a, const float *b, int n);
/* quant_avx2.c; the AVX-512 table uses these too. */
void moe_quantize_x_avx2(int8_t *q, float *d, const float *x, int n_tok, int n_in);
void moe_matmul_rows_q_avx2(float *y, const int8_t *xq, const float *xd, const void *w,
                            moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1);
void moe_axpy_f32_avx2(float *y, float a, const float *x, int n);
/* attention_avx2.c (the AVX-512 table uses its exp) and attention_avx512.c: the same bits. */
void moe_attn_scores_avx2(float *s, int s_stride, const float *const *q, int nr,
                          const float *const *k, int nc, int head_dim, float scale);
void moe_attn_accum_avx2(float *const *o, const float *alpha, const float *p, int p_stride,
                         int nr, const float *const *v, const int *nc, int head_dim);
double moe_attn_exp_avx2(float *s, int nc, float m_in, float *m_out);
double moe_attn_exp_avx512(float *s, int nc, float m_in, float *m_out);
void moe_attn_scores_avx512(float *s, int s_stride, const float *const *q, int nr,
                            const float *const *k, int nc, int head_dim, float scale);
void moe_attn_accum_avx512(float *const *o, const float *alpha, const float *p, int p_stride,
                           int nr, const float *const *v, const int *nc, int head_dim);
/* elementwise_avx2.c; the AVX-512 table uses it too. */
void moe_silu_mul_avx2(float *gate, const float *up, int n);
/* quant_avx512.c: the int8 matmul with AVX512-VNNI vpdpbusd (same bits as the AVX2 one). */
void moe_matmul_rows_q_avx512(float *y, const int8_t *xq, const float *xd, const void *w,
                              moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1);
/* The same with the Q4 batch tiles on zmm (quant_avx512.c q4_tile_z; Intel CPUs, same bits). */
void moe_matmul_rows_q_avx512z(float *y, const int8_t *xq, const float *xd, const void *w,
                               moe_dtype wt, int n_tok, int n_in, int n_out, int r0, int r1);
/* matmul_avx512.c: bf16 weights on vdpbf16ps, f32/f16 through moe_matmul_rows_avx2. x is fed as
 * hi + lo bf16 (within 2^-16 of x) or, by the _xbf16 variant (MOE_BF16_X=round), as one bf16
 * (within 2^-8): other bits and a larger error bound than the f32-x kernels, docs/kernels.md. */
void moe_matmul_rows_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1);
void moe_matmul_rows_avx512_xbf16(float *y, const float *x, const void *w, moe_dtype wt,
                                  int n_tok, int n_in, int n_out, int r0, int r1);
/* matmul_wide_avx512.c: the AVX2 rows' bf16 arithmetic, two tokens' 8-lane accumulators per zmm
 * (the same bits as moe_matmul_rows_avx2); f32/f16 and fewer than 4 tokens through it. */
void moe_matmul_rows_wide_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                                 int n_in, int n_out, int r0, int r1);
/* The AMX tile configuration (ldtilecfg's 64-byte operand, palette 1) and the one the kernels
 * use: tiles 0-7 all 16 rows x 64 bytes (matmul_amx.c; bench/roofline's AMX peak loads it too). A
 * constant in .rodata, not a stack struct filled before the load: the compiler does not see
 * ldtilecfg read it and may drop the stores (llama.cpp's AMX path crashed so, ggml-org/llama.cpp
 * PR 26954). */
typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} moe_amx_tile_config;
extern const moe_amx_tile_config moe_amx_tiles_16x64;

/* matmul_amx.c: bf16 weights on the AMX tiles (tdpbf16ps), x as hi + lo bf16 (the _xbf16
 * variant: one bf16), exactly the values the vdpbf16ps rows feed, summed in another order; f32/f16
 * through moe_matmul_rows_avx2. */
void moe_matmul_rows_amx(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                         int n_in, int n_out, int r0, int r1);
void moe_matmul_rows_amx_xbf16(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                               int n_in, int n_out, int r0, int r1);
/* Their prepared x (moe_kernel_ops.rows_x_bytes and the two after it). */
size_t moe_amx_x_bytes(int n_tok, int n_in);
size_t moe_amx_x_bytes_xbf16(int n_tok, int n_in);
void moe_amx_x_prep(void *xp, const float *x, int t0, int nt, int n_in);
void moe_amx_x_prep_xbf16(void *xp, const float *x, int t0, int nt, int n_in);
void moe_matmul_rows_amx_px(float *y, const void *xp, const void *w, int n_tok, int n_in,
                            int n_out, int r0, int r1);
void moe_matmul_rows_amx_px_xbf16(float *y, const void *xp, const void *w, int n_tok, int n_in,
                                  int n_out, int r0, int r1);
float moe_dot_f32_avx512(const float *a, const float *b, int n);
void moe_axpy_f32_avx512(float *y, float a, const float *x, int n);

#endif
