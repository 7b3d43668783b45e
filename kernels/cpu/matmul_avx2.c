/* AVX2+FMA+F16C vector kernels: matmul, dot, axpy (this file is compiled with -mavx2 -mfma
 * -mf16c; it is only called after dispatch.c saw those features in CPUID). */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define AI static inline __attribute__((always_inline))

/* Decode matvec tiles of at most this many bytes get the next tile prefetched (dot_rows_nr). */
#define PF_MAX_TILE_BYTES 16384

/* ---- numerics, shared by both matmul paths ----
 * Small n_tok ("dot" path): every output y[t][r] is one 8-lane f32 accumulator over k in steps
 * of 8 (lane l sums k = l mod 8), FMA, the last partial 8 zero-padded into the same accumulator,
 * then a fixed-order horizontal sum. Large n_tok (>= PANEL_MIN_TOK, "panel" path): every output is
 * one f32 FMA chain over k in order (like a BLAS sgemm). Either way the arithmetic of an output
 * depends only on (n_tok, n_in), never on which rows a thread got, so threaded == serial bit for
 * bit. */

/* 8 weights at w[i..i+8) of a row starting at w, as f32. wt is a compile-time constant at every
 * call site. Q8/Q4 (panel path only): i is a multiple of 8, the 8 values d * code exactly as
 * moe_convert_to_f32 gives them (an int8 or nibble times the f16 scale is exact in f32). */
AI __m256 load_w8(const void *w, size_t i, int wt)
{
    if (wt == MOE_DT_Q8) {
        const moe_block_q8 *blk = (const moe_block_q8 *)w + i / MOE_QK;
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk->q + i % MOE_QK)));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(_cvtsh_ss(blk->d)));
    }
    if (wt == MOE_DT_Q4) {
        /* Inputs j < 16 are low nibbles of bytes j, inputs j >= 16 high nibbles of bytes j - 16. */
        const moe_block_q4 *blk = (const moe_block_q4 *)w + i / MOE_QK;
        int j = (int)(i % MOE_QK);
        __m128i p = _mm_loadl_epi64((const __m128i *)(blk->q + (j & 15)));
        if (j >= 16)
            p = _mm_srli_epi16(p, 4);
        p = _mm_sub_epi8(_mm_and_si128(p, _mm_set1_epi8(0x0f)), _mm_set1_epi8(8));
        __m256i q = _mm256_cvtepi8_epi32(p);
        return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(_cvtsh_ss(blk->d)));
    }
    if (wt == MOE_DT_F32)
        return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (wt == MOE_DT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* The last n_in % 8 weights of a row, zero-padded to 8. */
AI __m256 load_w_tail(const void *w, size_t i, int n, int wt)
{
    if (wt == MOE_DT_Q8 || wt == MOE_DT_Q4) /* never: their n_in is a multiple of MOE_QK */
        return _mm256_setzero_ps();
    if (wt == MOE_DT_F32) {
        float buf[8] = {0};
        memcpy(buf, (const float *)w + i, (size_t)n * sizeof(float));
        return _mm256_loadu_ps(buf);
    }
    uint16_t buf[8] = {0};
    memcpy(buf, (const uint16_t *)w + i, (size_t)n * sizeof(uint16_t));
    return load_w8(buf, 0, wt);
}

AI __m256 load_x_tail(const float *x, int n)
{
    float buf[8] = {0};
    memcpy(buf, x, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(buf);
}

AI float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);          /* l + l+4 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); /* + (l+2) */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));  /* + (l+1) */
    return _mm_cvtss_f32(s);
}

AI size_t elem_size(int wt)
{
    return wt == MOE_DT_F32 ? 4 : 2;
}

/* Bytes of one weight row (Q8/Q4: n_in is a multiple of MOE_QK). */
AI size_t row_size(int wt, int n_in)
{
    if (wt == MOE_DT_Q8)
        return (size_t)n_in / MOE_QK * sizeof(moe_block_q8);
    if (wt == MOE_DT_Q4)
        return (size_t)n_in / MOE_QK * sizeof(moe_block_q4);
    return (size_t)n_in * elem_size(wt);
}

/* ---- dot path: NR rows x NT tokens of register accumulators ---- */
AI void dot_tile(float *y, const float *x, const void *w, int wt, int n_in, int n_out, int r,
                 int t0, int NR, int NT, const char *pf)
{
    __m256 acc[8][4];
    const char *wr[8];
    const float *xr[4];
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
        wr[i] = (const char *)w + (size_t)(r + i) * n_in * elem_size(wt);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++)
        xr[t] = x + (size_t)(t0 + t) * n_in;
    int n8 = n_in & ~7;
    for (int k = 0; k < n8; k += 8) {
        __m256 wv[8];
        if (pf) {
            /* The NR rows of this tile are one contiguous block, and so are the next tile's: each
             * step consumes NR * 8 weights here and prefetches as many bytes of the next tile,
             * so the next tile is in cache when it starts. */
            const char *p = pf + (size_t)k * (size_t)NR * elem_size(wt);
#pragma GCC unroll 4
            for (size_t c = 0; c < (size_t)NR * 8 * elem_size(wt); c += 64)
                _mm_prefetch(p + c, _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            wv[i] = load_w8(wr[i], (size_t)k, wt);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            __m256 xv = _mm256_loadu_ps(xr[t] + k);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    if (n8 < n_in) {
        int n = n_in - n8;
        __m256 wv[8];
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            wv[i] = load_w_tail(wr[i], (size_t)n8, n, wt);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            __m256 xv = load_x_tail(xr[t] + n8, n);
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = hsum8(acc[i][t]);
}

/* Rows [r0, r1) in tiles of NR rows x 4 tokens (the last token tile 1-3 wide).
 * Prefetch: with rows of n_in <= 1024 bf16 a tile's NR rows are NR short streams (24 cache lines
 * each for n_in = 768) that the hardware prefetcher barely ramps up on: 384x768 bf16 matvecs ran
 * at 55-65% of a long stream's speed on Zen 3. So the first token tile of each row tile (the one
 * that reads the weights from memory; the others re-read them from L1) prefetches the next row
 * tile of this task (its rows are one contiguous block). This matters for decode (n_tok = 1) and
 * for the few tokens per expert of a batched decode step (MoE: batch x top_k / n_experts). Bigger
 * tiles stream well without it, and a whole tile ahead (>= 32 KB) would evict L1: 4096x4096 lost
 * 20% with it. */
AI void dot_rows_nr(float *y, const float *x, const void *w, int wt, int n_tok, int n_in, int n_out,
                    int r0, int r1, int NR)
{
    int r = r0;
    const size_t tile_bytes = (size_t)NR * n_in * elem_size(wt);
    for (; r + NR <= r1; r += NR) {
        const char *pf = r + 2 * NR <= r1 && tile_bytes <= PF_MAX_TILE_BYTES
                             ? (const char *)w + (size_t)(r + NR) * n_in * elem_size(wt)
                             : NULL;
        int t = 0;
        for (; t + 4 <= n_tok; t += 4)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 4, t == 0 ? pf : NULL);
        switch (n_tok - t) {
        case 3:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 3, t == 0 ? pf : NULL);
            break;
        case 2:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 2, t == 0 ? pf : NULL);
            break;
        case 1:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, NR, 1, t == 0 ? pf : NULL);
            break;
        default:
            break;
        }
    }
    for (; r < r1; r++) {
        int t = 0;
        for (; t + 4 <= n_tok; t += 4)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 4, NULL);
        switch (n_tok - t) {
        case 3:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 3, NULL);
            break;
        case 2:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 2, NULL);
            break;
        case 1:
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 1, NULL);
            break;
        default:
            break;
        }
    }
}

/* Tile shapes measured on Zen 3 (bf16 4096x4096, one core): n_tok = 1 is memory bound, 8 rows
 * stream at once; n_tok = 2: 5 rows x 2 tokens (10 accumulators) beat 4x2 and 6x2; from 3 tokens
 * on, 3 rows x 4 tokens (12 accumulators + 3 weight + 1 x register) reaches 60-70 GFLOP/s, as
 * much as the packed panel path below 20 tokens. The weight tile is read from memory once; the
 * other token tiles re-read it from L1/L2. */
AI void dot_rows(float *y, const float *x, const void *w, int wt, int n_tok, int n_in, int n_out,
                 int r0, int r1)
{
    if (n_tok == 1)
        dot_rows_nr(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 8);
    else if (n_tok == 2)
        dot_rows_nr(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 5);
    else
        dot_rows_nr(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 3);
}

/* ---- panel path (n_tok >= PANEL_MIN_TOK): sgemm-style, weights packed k-major in f32 ----
 * For a panel of PANEL_ROWS rows and a KC slice of k, the weights are converted once into
 * pack[k][16 rows] (sub-panels of 16 rows = 2 registers). Then for every tile of 6 tokens each
 * output keeps one accumulator per 8 rows: 12 accumulators, 2 weight registers, 1 broadcast of
 * x. The x tile (6 x KC floats) stays in L1 and the pack in L1/L2 while all tokens pass, so
 * weights are read from memory once and x once per panel. Partial sums live in y between KC
 * slices (an f32 store/reload is exact, so each output is one FMA chain over k in order). */
#define PANEL_KC 256
#define PANEL_ROWS 32
#define PANEL_TOK 6

/* 8x8 transpose of r[0..7] in place. */
AI void transpose8(__m256 r[8])
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* pack[k * 16 + i] = W[r + i][k0 + k] for i < nr (zero for nr <= i < 16), k < kc. */
AI void pack16(float *pack, const void *w, int wt, int n_in, int r, int nr, int k0, int kc)
{
    size_t rs = row_size(wt, n_in);
    for (int half = 0; half < 2; half++) {
        const char *rows[8];
        int valid[8];
        for (int i = 0; i < 8; i++) {
            int ri = half * 8 + i;
            valid[i] = ri < nr;
            rows[i] = (const char *)w + (size_t)(r + (valid[i] ? ri : 0)) * rs;
        }
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            __m256 v[8];
            for (int i = 0; i < 8; i++)
                v[i] = valid[i] ? load_w8(rows[i], (size_t)(k0 + k), wt) : _mm256_setzero_ps();
            transpose8(v);
            for (int j = 0; j < 8; j++)
                _mm256_store_ps(pack + (size_t)(k + j) * 16 + half * 8, v[j]);
        }
        if (k < kc) {
            __m256 v[8];
            for (int i = 0; i < 8; i++)
                v[i] = valid[i] ? load_w_tail(rows[i], (size_t)(k0 + k), kc - k, wt)
                                : _mm256_setzero_ps();
            transpose8(v);
            for (int j = 0; k + j < kc; j++)
                _mm256_store_ps(pack + (size_t)(k + j) * 16 + half * 8, v[j]);
        }
    }
}

/* Lanes [0, n) of an 8-lane mask. */
AI __m256i lane_mask(int n)
{
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

/* y[t0 + t][r + 0..nr) (+)= sum_k pack[k] * x[t0 + t][k0 + k] for t < NT. */
AI void panel_tile(float *y, const float *x, const float *pack, int n_in, int n_out, int r, int nr,
                   int t0, int k0, int kc, int NT)
{
    __m256 acc[PANEL_TOK][2];
    const float *xr[PANEL_TOK];
    __m256i m0 = lane_mask(nr), m1 = lane_mask(nr - 8);
#pragma GCC unroll 6
    for (int t = 0; t < NT; t++) {
        xr[t] = x + (size_t)(t0 + t) * n_in + k0;
        float *yr = y + (size_t)(t0 + t) * n_out + r;
        if (k0 == 0) {
            acc[t][0] = _mm256_setzero_ps();
            acc[t][1] = _mm256_setzero_ps();
        } else if (nr == 16) {
            acc[t][0] = _mm256_loadu_ps(yr);
            acc[t][1] = _mm256_loadu_ps(yr + 8);
        } else {
            acc[t][0] = _mm256_maskload_ps(yr, m0);
            acc[t][1] = _mm256_maskload_ps(yr + 8, m1);
        }
    }
    for (int k = 0; k < kc; k++) {
        __m256 w0 = _mm256_load_ps(pack + (size_t)k * 16);
        __m256 w1 = _mm256_load_ps(pack + (size_t)k * 16 + 8);
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) {
            __m256 b = _mm256_broadcast_ss(xr[t] + k);
            acc[t][0] = _mm256_fmadd_ps(w0, b, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, b, acc[t][1]);
        }
    }
#pragma GCC unroll 6
    for (int t = 0; t < NT; t++) {
        float *yr = y + (size_t)(t0 + t) * n_out + r;
        if (nr == 16) {
            _mm256_storeu_ps(yr, acc[t][0]);
            _mm256_storeu_ps(yr + 8, acc[t][1]);
        } else {
            _mm256_maskstore_ps(yr, m0, acc[t][0]);
            _mm256_maskstore_ps(yr + 8, m1, acc[t][1]);
        }
    }
}

static void panel_tile_n(float *y, const float *x, const float *pack, int n_in, int n_out, int r,
                         int nr, int t0, int k0, int kc, int nt)
{
    switch (nt) {
    case 6:
        panel_tile(y, x, pack, n_in, n_out, r, nr, t0, k0, kc, 6);
        break;
    case 5:
        panel_tile(y, x, pack, n_in, n_out, r, nr, t0, k0, kc, 5);
        break;
    case 4:
        panel_tile(y, x, pack, n_in, n_out, r, nr, t0, k0, kc, 4);
        break;
    case 3:
        panel_tile(y, x, pack, n_in, n_out, r, nr, t0, k0, kc, 3);
        break;
    case 2:
        panel_tile(y, x, pack, n_in, n_out, r, nr, t0, k0, kc, 2);
        break;
    default:
        panel_tile(y, x, pack, n_in, n_out, r, nr, t0, k0, kc, 1);
        break;
    }
}

/* Tokens in chunks of PANEL_TOKC: the chunk's x slice (PANEL_TOKC x PANEL_KC floats, 192 KB)
 * stays in L2 while every row panel of this thread meets it (the order of a Goto/BLIS GEMM);
 * without chunks, 512 tokens made it 512 KB and x came from L3 for every panel. Each panel is
 * packed again per chunk (weights read n_tok / PANEL_TOKC times, small against the FMAs). The
 * chunks do not change any output's arithmetic. */
#define PANEL_TOKC 192

AI void panel_rows(float *y, const float *x, const void *w, int wt, int n_tok, int n_in, int n_out,
                   int r0, int r1)
{
    _Alignas(32) float pack[PANEL_ROWS / 16][PANEL_KC * 16];
    if (n_in == 0) { /* empty sums: y = 0 */
        for (int t = 0; t < n_tok; t++)
            memset(y + (size_t)t * n_out + r0, 0, (size_t)(r1 - r0) * sizeof(float));
        return;
    }
    for (int tc = 0; tc < n_tok; tc += PANEL_TOKC) {
        int te = n_tok - tc < PANEL_TOKC ? n_tok : tc + PANEL_TOKC;
        for (int k0 = 0; k0 < n_in; k0 += PANEL_KC) {
            int kc = n_in - k0 < PANEL_KC ? n_in - k0 : PANEL_KC;
            for (int rp = r0; rp < r1; rp += PANEL_ROWS) {
                int nr = r1 - rp < PANEL_ROWS ? r1 - rp : PANEL_ROWS;
                int n_sub = (nr + 15) / 16;
                for (int s = 0; s < n_sub; s++) {
                    int sr = nr - s * 16 < 16 ? nr - s * 16 : 16;
                    pack16(pack[s], w, wt, n_in, rp + s * 16, sr, k0, kc);
                }
                for (int t0 = tc; t0 < te; t0 += PANEL_TOK) {
                    int nt = te - t0 < PANEL_TOK ? te - t0 : PANEL_TOK;
                    for (int s = 0; s < n_sub; s++) {
                        int sr = nr - s * 16 < 16 ? nr - s * 16 : 16;
                        panel_tile_n(y, x, pack[s], n_in, n_out, rp + s * 16, sr, t0, k0, kc, nt);
                    }
                }
            }
        }
    }
}

/* From this many tokens on, the packed panel path beats the 3x4 dot tiles (measured crossover
 * on Zen 3 for n_in = 2048..14336: below it packing costs more than re-reading x from L2/L3). */
#define PANEL_MIN_TOK 48

static void rows_f32(float *y, const float *x, const void *w, int n_tok, int n_in, int n_out,
                     int r0, int r1)
{
    if (n_tok >= PANEL_MIN_TOK)
        panel_rows(y, x, w, MOE_DT_F32, n_tok, n_in, n_out, r0, r1);
    else
        dot_rows(y, x, w, MOE_DT_F32, n_tok, n_in, n_out, r0, r1);
}

static void rows_bf16(float *y, const float *x, const void *w, int n_tok, int n_in, int n_out,
                      int r0, int r1)
{
    if (n_tok >= PANEL_MIN_TOK)
        panel_rows(y, x, w, MOE_DT_BF16, n_tok, n_in, n_out, r0, r1);
    else
        dot_rows(y, x, w, MOE_DT_BF16, n_tok, n_in, n_out, r0, r1);
}

static void rows_f16(float *y, const float *x, const void *w, int n_tok, int n_in, int n_out,
                     int r0, int r1)
{
    if (n_tok >= PANEL_MIN_TOK)
        panel_rows(y, x, w, MOE_DT_F16, n_tok, n_in, n_out, r0, r1);
    else
        dot_rows(y, x, w, MOE_DT_F16, n_tok, n_in, n_out, r0, r1);
}

/* Quantized weights with many tokens (matmul.c sends only n_tok >= MOE_Q_F32_MIN_TOK here):
 * dequantized while packing; compute bound, so the same speed as bf16 and no x quantization. */
static void rows_q8(float *y, const float *x, const void *w, int n_tok, int n_in, int n_out, int r0,
                    int r1)
{
    panel_rows(y, x, w, MOE_DT_Q8, n_tok, n_in, n_out, r0, r1);
}

static void rows_q4(float *y, const float *x, const void *w, int n_tok, int n_in, int n_out, int r0,
                    int r1)
{
    panel_rows(y, x, w, MOE_DT_Q4, n_tok, n_in, n_out, r0, r1);
}

void moe_matmul_rows_avx2(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1)
{
    switch (wt) {
    case MOE_DT_Q8:
        rows_q8(y, x, w, n_tok, n_in, n_out, r0, r1);
        return;
    case MOE_DT_Q4:
        rows_q4(y, x, w, n_tok, n_in, n_out, r0, r1);
        return;
    case MOE_DT_F32:
        rows_f32(y, x, w, n_tok, n_in, n_out, r0, r1);
        return;
    case MOE_DT_BF16:
        rows_bf16(y, x, w, n_tok, n_in, n_out, r0, r1);
        return;
    case MOE_DT_F16:
        rows_f16(y, x, w, n_tok, n_in, n_out, r0, r1);
        return;
    default:
        MOE_KASSERT(!"moe_matmul (avx2): weight dtype must be F32, BF16 or F16");
    }
}

float moe_dot_f32_avx2(const float *a, const float *b, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i + 8 <= n) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        i += 8;
    }
    if (i < n)
        s1 = _mm256_fmadd_ps(load_x_tail(a + i, n - i), load_x_tail(b + i, n - i), s1);
    return hsum8(_mm256_add_ps(s0, s1));
}

void moe_axpy_f32_avx2(float *y, float a, const float *x, int n)
{
    /* mul then add, not FMA: the same rounding as the scalar y += a * x. */
    __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i),
                                              _mm256_mul_ps(av, _mm256_loadu_ps(x + i))));
    for (; i < n; i++)
        y[i] += a * x[i];
}

#else /* built without the flags (not x86, or a compiler that ignored them): never dispatched */

void moe_matmul_rows_avx2(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx2(const float *a, const float *b, int n)
{
    return moe_dot_f32_scalar(a, b, n);
}

void moe_axpy_f32_avx2(float *y, float a, const float *x, int n)
{
    moe_axpy_f32_scalar(y, a, x, n);
}

#endif
