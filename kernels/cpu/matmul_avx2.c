/* AVX2+FMA+F16C vector kernels: matmul, dot, axpy (this file is compiled with -mavx2 -mfma
 * -mf16c; it is only called after dispatch.c saw those features in CPUID). */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define AI static inline __attribute__((always_inline))

#include "kernels/cpu/quant_x86.h" /* hsum8, the horizontal sum order of every output */

/* ---- numerics ----
 * Every output y[t][r] is one 8-lane f32 accumulator over k in steps of 16, FMA, each step two
 * FMAs per lane (the "first" and "second" 8 of the step), the last partial step zero-padded
 * into the same accumulator, then hsum8's fixed-order horizontal sum:
 * - f32 / f16: first = k + l, second = k + 8 + l, so lane l sums k = l mod 8 in increasing k
 *   (the order of the 8-step loop before the bf16 change: the same bits); a tail of 8 or more is
 *   one full 8 then a zero-padded partial one, a tail under 8 one zero-padded 8.
 * - bf16: first = k + 2l (even), second = k + 2l + 1 (odd), so lane l sums k = 2l, 2l + 1 mod 16
 *   in increasing k. One 256-bit load of 16 bf16 gives the even ones as f32 by a 16-bit shift left
 *   and the odd ones by masking the low half (one integer op per 8 weights, exact), and x is
 *   de-interleaved to match once per call and token chunk (x_split). A tail is zero-padded to 16
 *   (weights and x) and takes both FMAs.
 * This holds for every n_tok, tile shape, token chunk and row split, so an output's bits depend
 * only on its row of W, its row of x and n_in: a token computed alone (decode) and the same token
 * inside a 70-token prefill get the same bits (batch invariance, docs/kernels.md). There was a
 * packed sgemm-style panel path for n_tok >= 48 (one FMA chain over k per output): faster for
 * prefill, but other bits than the dot tiles. */

/* 8 weights at w[i..i+8) of a row starting at w, as f32 (f32 / f16). wt is a compile-time
 * constant at every call site. */
AI __m256 load_w8(const void *w, size_t i, int wt)
{
    if (wt == MOE_DT_F32)
        return _mm256_loadu_ps((const float *)w + i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
}

static const uint32_t bf16_hi_mask[8] __attribute__((aligned(32))) = {
    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u};

/* Half h (0: first, 1: second; see numerics) of the 16 weights at w[k..k+16), as f32. */
AI __m256 load_w_half(const void *w, size_t k, int wt, int h)
{
    if (wt == MOE_DT_BF16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
        if (h == 0)
            return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        /* The mask as a memory operand: a 3x4 tile's 12 accumulators, 3 weights and 1 x take all
         * 16 registers, and with the mask in one GCC folded every x load into the FMAs (3 loads
         * of each x instead of 1). */
        __asm__("vpand %1, %0, %0" : "+x"(v) : "m"(bf16_hi_mask));
        return _mm256_castsi256_ps(v);
    }
    return load_w8(w, k + 8 * (size_t)h, wt);
}

/* The last n weights (n < 8 for f32/f16, n < 16 for bf16) of a row from w[i] into buf (zeroed by
 * the caller), which the load functions then read at offset 0. */
AI void copy_w_tail(void *buf, const void *w, size_t i, int n, int wt)
{
    if (wt == MOE_DT_F32)
        memcpy(buf, (const float *)w + i, (size_t)n * sizeof(float));
    else
        memcpy(buf, (const uint16_t *)w + i, (size_t)n * sizeof(uint16_t));
}

AI __m256 load_x_tail(const float *x, int n)
{
    float buf[8] = {0};
    memcpy(buf, x, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(buf);
}

AI size_t elem_size(int wt)
{
    return wt == MOE_DT_F32 ? 4 : 2;
}

/* bf16's x layout: n_in rounded up to 16 (moe_bf16_split_n, zero-padded); each 16-block of a
 * token's x holds its 8 even then its 8 odd entries, so that x_split(x)[k .. k+8) and
 * [k+8 .. k+16) meet the two halves of load_w_half(w, k). */

static void x_split(float *xs, const float *x, int n_tok, int n_in)
{
    int np = moe_bf16_split_n(n_in);
    const __m256i ev = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int t = 0; t < n_tok; t++) {
        const float *xt = x + (size_t)t * n_in;
        float *o = xs + (size_t)t * np;
        int k = 0;
        for (; k + 16 <= n_in; k += 16) {
            /* a = x0..x7 -> x0 x2 x4 x6 | x1 x3 x5 x7, b likewise; then the halves recombined */
            __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xt + k), ev);
            __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xt + k + 8), ev);
            _mm256_storeu_ps(o + k, _mm256_permute2f128_ps(a, b, 0x20));
            _mm256_storeu_ps(o + k + 8, _mm256_permute2f128_ps(a, b, 0x31));
        }
        if (k < n_in) {
            float buf[16] = {0};
            memcpy(buf, xt + k, (size_t)(n_in - k) * sizeof(float));
            for (int j = 0; j < 8; j++) {
                o[k + j] = buf[2 * j];
                o[k + 8 + j] = buf[2 * j + 1];
            }
        }
    }
}

/* ---- dot path: NR rows x NT tokens of register accumulators ---- */

/* acc[i][t] += wv[i] * (8 floats of token t's x at xr[t] + off; xn < 8: only xn, zero-padded). */
AI void tile_fma(__m256 acc[8][4], const __m256 wv[8], const float *const xr[4], size_t off, int xn,
                 int NR, int NT)
{
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        __m256 xv = xn == 8 ? _mm256_loadu_ps(xr[t] + off) : load_x_tail(xr[t] + off, xn);
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++)
            acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
    }
}

/* The bf16 3 rows x 4 tokens main loop (k in [0, n16)) written out: the same arithmetic as the C
 * loop below (per 16-k step and output, the even FMA then the odd one), but GCC's allocation of
 * that loop's 16 live registers (12 accumulators, 3 weights, 1 x) spilled an accumulator to the
 * stack on every step (a store-to-load chain that ran the tile at ~60% of its FMA rate). pp: the
 * bytes to prefetch, 96 per step, into L1 (the tile's own rows when there is no next tile or the
 * rule wants another cache: harmless; under the Intel rule 4+ tokens go to the zmm token pairs). */
AI void bf16_3x4_loop(__m256 acc[8][4], const char *const wr[8], const float *const xr[4], int n16,
                      const char *pp)
{
    /* accumulator j of av = row j % 3, token j / 3, in ymm j inside the loop */
    __m256 av[12];
    for (int j = 0; j < 12; j++)
        av[j] = acc[j % 3][j / 3];
    size_t k = 0, n = (size_t)n16;
    __asm__ volatile(
            "vmovups 0(%[av]), %%ymm0\n\t"
            "vmovups 32(%[av]), %%ymm1\n\t"
            "vmovups 64(%[av]), %%ymm2\n\t"
            "vmovups 96(%[av]), %%ymm3\n\t"
            "vmovups 128(%[av]), %%ymm4\n\t"
            "vmovups 160(%[av]), %%ymm5\n\t"
            "vmovups 192(%[av]), %%ymm6\n\t"
            "vmovups 224(%[av]), %%ymm7\n\t"
            "vmovups 256(%[av]), %%ymm8\n\t"
            "vmovups 288(%[av]), %%ymm9\n\t"
            "vmovups 320(%[av]), %%ymm10\n\t"
            "vmovups 352(%[av]), %%ymm11\n\t"
            "1:\n\t"
            "prefetcht0 (%[pp])\n\t"
            "prefetcht0 64(%[pp])\n\t"
            "vmovdqu (%[w0],%[k],2), %%ymm12\n\t"
            "vmovdqu (%[w1],%[k],2), %%ymm13\n\t"
            "vmovdqu (%[w2],%[k],2), %%ymm14\n\t"
            "vpslld $16, %%ymm12, %%ymm12\n\t"
            "vpslld $16, %%ymm13, %%ymm13\n\t"
            "vpslld $16, %%ymm14, %%ymm14\n\t"
            "vmovups (%[x0],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm0\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm1\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n\t"
            "vmovups (%[x1],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm3\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm4\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"
            "vmovups (%[x2],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm6\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm7\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n\t"
            "vmovups (%[x3],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm9\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm10\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n\t"
            "vmovdqu (%[w0],%[k],2), %%ymm12\n\t"
            "vmovdqu (%[w1],%[k],2), %%ymm13\n\t"
            "vmovdqu (%[w2],%[k],2), %%ymm14\n\t"
            "vpand %[mask], %%ymm12, %%ymm12\n\t"
            "vpand %[mask], %%ymm13, %%ymm13\n\t"
            "vpand %[mask], %%ymm14, %%ymm14\n\t"
            "vmovups 32(%[x0],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm0\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm1\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n\t"
            "vmovups 32(%[x1],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm3\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm4\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"
            "vmovups 32(%[x2],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm6\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm7\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n\t"
            "vmovups 32(%[x3],%[k],4), %%ymm15\n\t"
            "vfmadd231ps %%ymm12, %%ymm15, %%ymm9\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %%ymm10\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n\t"
            "addq $96, %[pp]\n\t"
            "addq $16, %[k]\n\t"
            "cmpq %[n], %[k]\n\t"
            "jb 1b\n\t"
            "vmovups %%ymm0, 0(%[av])\n\t"
            "vmovups %%ymm1, 32(%[av])\n\t"
            "vmovups %%ymm2, 64(%[av])\n\t"
            "vmovups %%ymm3, 96(%[av])\n\t"
            "vmovups %%ymm4, 128(%[av])\n\t"
            "vmovups %%ymm5, 160(%[av])\n\t"
            "vmovups %%ymm6, 192(%[av])\n\t"
            "vmovups %%ymm7, 224(%[av])\n\t"
            "vmovups %%ymm8, 256(%[av])\n\t"
            "vmovups %%ymm9, 288(%[av])\n\t"
            "vmovups %%ymm10, 320(%[av])\n\t"
            "vmovups %%ymm11, 352(%[av])\n\t"
            : [k] "+r"(k), [pp] "+r"(pp)
            : [w0] "r"(wr[0]), [w1] "r"(wr[1]), [w2] "r"(wr[2]), [x0] "r"(xr[0]),
              [x1] "r"(xr[1]), [x2] "r"(xr[2]), [x3] "r"(xr[3]), [n] "r"(n),
              [mask] "m"(bf16_hi_mask), [av] "r"(av)
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
              "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
    for (int j = 0; j < 12; j++)
        acc[j % 3][j / 3] = av[j];
}

/* x: the tokens' rows, xs_stride floats apart (bf16: the x_split layout; f32/f16: x itself). */
AI void dot_tile(float *y, const float *x, size_t xs_stride, const void *w, int wt, int n_in,
                 int n_out, int r, int t0, int NR, int NT, const char *pf, moe_pf_level pfl)
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
        xr[t] = x + (size_t)(t0 + t) * xs_stride;
    /* ks weights per row and step: bf16 16 (two halves), f32/f16 8 (one) */
    const int ks = wt == MOE_DT_BF16 ? 16 : 8, nk = n_in / ks * ks;
    int k0 = 0;
    if (wt == MOE_DT_BF16 && NR == 3 && NT == 4 && nk > 0) {
        bf16_3x4_loop(acc, wr, xr, nk, pf && pfl == MOE_PF_L1 ? pf : wr[0]);
        k0 = nk;
    }
    for (int k = k0; k < nk; k += ks) {
        if (pf) /* each step consumes NR * ks weights: see moe_prefetch_step */
            moe_prefetch_step(pf, (size_t)k * (size_t)NR * elem_size(wt),
                              (size_t)NR * ks * elem_size(wt), pfl);
#pragma GCC unroll 2
        for (int h = 0; h < ks / 8; h++) {
            __m256 wv[8];
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                wv[i] = load_w_half(wr[i], (size_t)k, wt, h);
            tile_fma(acc, wv, xr, (size_t)k + 8 * (size_t)h, 8, NR, NT);
        }
    }
    if (nk < n_in) {
        /* The last n_in % ks weights zero-padded to ks; bf16's x is padded by x_split, f32/f16's
         * by load_x_tail. */
        _Alignas(32) char wbuf[8][32];
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++) {
            memset(wbuf[i], 0, sizeof wbuf[i]);
            copy_w_tail(wbuf[i], wr[i], (size_t)nk, n_in - nk, wt);
        }
#pragma GCC unroll 2
        for (int h = 0; h < ks / 8; h++) {
            __m256 wv[8];
#pragma GCC unroll 8
            for (int i = 0; i < NR; i++)
                wv[i] = load_w_half(wbuf[i], 0, wt, h);
            tile_fma(acc, wv, xr, (size_t)nk + 8 * (size_t)h,
                     wt == MOE_DT_BF16 ? 8 : n_in - nk, NR, NT);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = hsum8(acc[i][t]);
}

/* One row tile's tokens in tiles of NT <= 4 (the last 1..NT-1 wide); the first token tile
 * prefetches. */
AI void dot_row_tile(float *y, const float *x, size_t xs, const void *w, int wt, int n_tok, int n_in,
                     int n_out, int r, int NR, int NT, const char *pf, moe_pf_level pfl)
{
    int t = 0;
    for (; t + NT <= n_tok; t += NT)
        dot_tile(y, x, xs, w, wt, n_in, n_out, r, t, NR, NT, t == 0 ? pf : NULL, pfl);
    switch (n_tok - t) {
    case 3:
        dot_tile(y, x, xs, w, wt, n_in, n_out, r, t, NR, 3, t == 0 ? pf : NULL, pfl);
        break;
    case 2:
        dot_tile(y, x, xs, w, wt, n_in, n_out, r, t, NR, 2, t == 0 ? pf : NULL, pfl);
        break;
    case 1:
        dot_tile(y, x, xs, w, wt, n_in, n_out, r, t, NR, 1, t == 0 ? pf : NULL, pfl);
        break;
    default:
        break;
    }
}

/* Rows [r0, r1) in tiles of NR rows x NT tokens, the last rows one at a time. The first token
 * tile of each row tile prefetches the next row tile of this task (moe_prefetch_step): this
 * matters for decode (n_tok = 1) and for the few tokens per expert of a batched decode step (MoE:
 * batch x top_k / n_experts); on Zen 3 384x768 bf16 matvecs ran at 55-65% of a long stream's
 * speed without it. */
AI void dot_rows_nr(float *y, const float *x, size_t xs, const void *w, int wt, int n_tok, int n_in,
                    int n_out, int r0, int r1, int NR, int NT, moe_pf_rule pf_rule)
{
    int r = r0;
    const moe_pf_level pfl = pf_rule((size_t)NR * n_in * elem_size(wt));
    for (; r + NR <= r1; r += NR) {
        const char *pf = r + 2 * NR <= r1 && pfl != MOE_PF_NONE
                             ? (const char *)w + (size_t)(r + NR) * n_in * elem_size(wt)
                             : NULL;
        dot_row_tile(y, x, xs, w, wt, n_tok, n_in, n_out, r, NR, NT, pf, pfl);
    }
    for (; r < r1; r++)
        dot_row_tile(y, x, xs, w, wt, n_tok, n_in, n_out, r, 1, NT, NULL, MOE_PF_NONE);
}

/* Tile shapes measured on Zen 3 (one core): n_tok = 1 is memory bound, 8 rows stream at once;
 * n_tok = 2: f32/f16 5 rows x 2 tokens (10 accumulators) beat 4x2 and 6x2; bf16 4x2 (5x2's 16
 * live registers left GCC none for the odd-half mask: 53 against 66 GFLOP/s at 1024x2048); from
 * 3 tokens on, 3 rows x 4 tokens (12 accumulators + 3 weight + 1 x register; bf16 in asm) does
 * 80-90 GFLOP/s, 2x6, 2x4 and 4x3 measured slower. The weight tile is read from memory once; the
 * other token tiles re-read it from L1/L2. */
AI void dot_rows(float *y, const float *x, size_t xs, const void *w, int wt, int n_tok, int n_in,
                 int n_out, int r0, int r1, moe_pf_rule pf_rule)
{
    if (n_tok == 1)
        dot_rows_nr(y, x, xs, w, wt, n_tok, n_in, n_out, r0, r1, 8, 1, pf_rule);
    else if (n_tok == 2)
        dot_rows_nr(y, x, xs, w, wt, n_tok, n_in, n_out, r0, r1, wt == MOE_DT_BF16 ? 4 : 5, 2,
                    pf_rule);
    else
        dot_rows_nr(y, x, xs, w, wt, n_tok, n_in, n_out, r0, r1, 3, 4, pf_rule);
}

/* Token chunks from DOT_CHUNK_MIN_TOK tokens on (prefill): the chunk's x (DOT_TOKC x n_in floats:
 * 96 KB for n_in = 2048) stays in L2 while every row tile of this task meets it; without chunks
 * each 3-row tile re-read all of x from L3. The weights are read once per chunk. Fewer tokens (a
 * batched decode step's share of an expert) go in one chunk, so every weight row streams once per
 * call. Chunks, like the tile shapes, leave every output's arithmetic unchanged. */
#define DOT_TOKC 12
#define DOT_CHUNK_MIN_TOK 48

/* ---- bf16: x_split's buffer ----
 * The float rows' per-thread scratch (moe_rows_scratch). Without it (out of memory, or the test
 * hook of matmul.c), tokens go one at a time through a stack buffer: the same bits (an output's
 * arithmetic does not depend on the grouping). */
#define XS_STACK_FLOATS 16384

static __attribute__((noinline)) void rows_bf16_by_token(float *y, const float *x, const void *w,
                                                         int n_tok, int n_in, int n_out, int r0,
                                                         int r1, moe_pf_rule pf_rule)
{
    _Alignas(64) float xs[XS_STACK_FLOATS];
    MOE_KASSERT(moe_bf16_split_n(n_in) <= XS_STACK_FLOATS &&
                "moe_matmul (avx2, bf16): out of memory for the x scratch");
    for (int t = 0; t < n_tok; t++) {
        x_split(xs, x + (size_t)t * n_in, 1, n_in);
        dot_rows(y + (size_t)t * n_out, xs, (size_t)moe_bf16_split_n(n_in), w, MOE_DT_BF16, 1, n_in,
                 n_out, r0, r1, pf_rule);
    }
}

static void rows_float(float *y, const float *x, const void *w, int wt, int n_tok, int n_in,
                       int n_out, int r0, int r1, moe_pf_rule pf_rule)
{
    int chunk = n_tok >= DOT_CHUNK_MIN_TOK ? DOT_TOKC : n_tok;
    float *xs = NULL;
    if (wt == MOE_DT_BF16) {
        xs = moe_rows_scratch((size_t)chunk * (size_t)moe_bf16_split_n(n_in) * sizeof *xs);
        if (!xs) {
            rows_bf16_by_token(y, x, w, n_tok, n_in, n_out, r0, r1, pf_rule);
            return;
        }
    }
    for (int tc = 0; tc < n_tok; tc += chunk) {
        int nt = n_tok - tc < chunk ? n_tok - tc : chunk;
        const float *xc = x + (size_t)tc * n_in;
        float *yc = y + (size_t)tc * n_out;
        switch (wt) {
        case MOE_DT_F32:
            dot_rows(yc, xc, (size_t)n_in, w, MOE_DT_F32, nt, n_in, n_out, r0, r1, pf_rule);
            break;
        case MOE_DT_BF16:
            x_split(xs, xc, nt, n_in);
            dot_rows(yc, xs, (size_t)moe_bf16_split_n(n_in), w, MOE_DT_BF16, nt, n_in, n_out, r0,
                     r1, pf_rule);
            break;
        default:
            dot_rows(yc, xc, (size_t)n_in, w, MOE_DT_F16, nt, n_in, n_out, r0, r1, pf_rule);
            break;
        }
    }
}

void moe_matmul_rows_avx2_pf(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                             int n_in, int n_out, int r0, int r1, moe_pf_rule pf_rule)
{
    MOE_KASSERT((wt == MOE_DT_F32 || wt == MOE_DT_BF16 || wt == MOE_DT_F16) &&
                "moe_matmul (avx2): weight dtype must be F32, BF16 or F16 (Q8/Q4: matmul_rows_q)");
    rows_float(y, x, w, wt, n_tok, n_in, n_out, r0, r1, pf_rule);
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

void moe_matmul_rows_avx2_pf(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                             int n_in, int n_out, int r0, int r1, moe_pf_rule pf_rule)
{
    (void)pf_rule;
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

/* The default prefetch rule (moe_pf_rows_float): one definition for both builds above. */
void moe_matmul_rows_avx2(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_avx2_pf(y, x, w, wt, n_tok, n_in, n_out, r0, r1, moe_pf_rows_float);
}
