/* The AVX2 bf16 rows' arithmetic on 512-bit registers, for Intel CPUs whose bf16 rows are the AVX2
 * ones (ops_avx512_intel: AVX512_BF16 without AMX, where vdpbf16ps issues once per two cycles and
 * loses to the AVX2 rows, dispatch.c). Those rows use 8-lane FMAs: half the width of the two
 * 512-bit FMA ports, so bf16 prefill ran at a third of the f32 FMA peak there (bench/
 * RESULTS-issue16-intel-avx512.md). Here each zmm holds two of those 8-lane accumulators, one per
 * token of a token pair: the lower 256 bits token t's, the upper token t+1's, of the same row.
 * Each step broadcasts the row's 16 bf16 weights into both halves (a load, no shuffle), makes the
 * even and odd ones f32 with the same shift and mask as matmul_avx2.c, and FMAs them with the
 * pair's x, which is laid out so that one 512-bit load gives both tokens' 8 even (then odd)
 * entries. Every output's FMAs, their order, the zero-padded tail and the final hsum8 are those of
 * matmul_avx2.c's numerics: the same bits for every output (test_kernels compares them bit for
 * bit), so the dispatch can pick this path or the AVX2 one per call (by n_tok) without breaking
 * batch invariance. f32/f16 weights and calls of fewer than WIDE_MIN_TOK tokens (a batched
 * decode step's few tokens per expert, where the weight conversion, not the FMA width, bounds the
 * tile) go to the AVX2 rows. */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) &&                      \
    defined(__AVX512DQ__)

#include "kernels/cpu/quant_x86.h" /* hsum8: the AVX2 rows' horizontal sum order */

/* Rows x token pairs per tile: 20 accumulators, 4 even + 4 odd weight registers, an x one and
 * the odd-half mask, 30 of the 32 zmm registers. Each step's weight conversion (a shift and an AND
 * per row, on the FMA ports) is shared by 5 pairs instead of 4: 512 tokens 1.03-1.09x, 10 and 20
 * tokens 1.10-1.24x, other counts equal (bench/RESULTS.md "Issue 16, zmm pair tiles of 5");
 * tiles of 2 x 8, 3 x 5, 3 x 6 and 3 x 7 measured slower. */
#define WIDE_NR 4
#define WIDE_NP 5
/* Fewer tokens go to the AVX2 rows (see the file comment). */
#define WIDE_MIN_TOK 4
/* From WIDE_CHUNK_MIN_TOK tokens on (prefill), tokens in chunks of WIDE_TOKC (two pair tiles),
 * so the chunk's x (WIDE_TOKC x n_in floats: 160 KB at n_in = 2048) stays in L2 while every row
 * tile of the task meets it; fewer tokens go in one chunk, so every weight row streams once per
 * call. */
#define WIDE_TOKC 20
#define WIDE_CHUNK_MIN_TOK 48

/* The pair layout of tokens t and t + 1 (x1 NULL: a zero token): per 16 inputs k..k+16, 32
 * floats: t's 8 even entries, t+1's 8 even, t's 8 odd, t+1's 8 odd (x_split's halves of the two
 * tokens interleaved by 8); the tail zero-padded to 16. */
static void wide_pair_x(float *o, const float *x0, const float *x1, int n_in)
{
    const __m512i eo = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int k = 0; k < n_in; k += 16) {
        __mmask16 m = n_in - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n_in - k)) - 1u);
        __m512 a = _mm512_permutexvar_ps(eo, _mm512_maskz_loadu_ps(m, x0 + k));
        __m512 b = x1 ? _mm512_permutexvar_ps(eo, _mm512_maskz_loadu_ps(m, x1 + k))
                      : _mm512_setzero_ps();
        /* a = t even | t odd, b likewise: [a.even | b.even] then [a.odd | b.odd] */
        _mm512_storeu_ps(o + 2 * k, _mm512_shuffle_f32x4(a, b, 0x44));
        _mm512_storeu_ps(o + 2 * k + 16, _mm512_shuffle_f32x4(a, b, 0xee));
    }
}

/* A tile of NR rows from r x NP pairs from pair p0 (xp: the chunk's pairs, 2 * n16 floats
 * apart); nt: the chunk's tokens (an odd last pair has no second output). pf: the next row tile
 * to prefetch, or NULL. */
static inline __attribute__((always_inline)) void
wide_tile(float *y, const float *xp, const uint16_t *w, int n_in, int n_out, int r, int p0, int nt,
          int NR, int NP, const char *pf)
{
    const int n16 = moe_bf16_split_n(n_in), nk = n_in & ~15;
    const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[WIDE_NR][WIDE_NP];
    const uint16_t *wr[WIDE_NR];
    const float *xr[WIDE_NP];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        wr[i] = w + (size_t)(r + i) * n_in;
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
            acc[i][p] = _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; p++)
        xr[p] = xp + (size_t)(p0 + p) * 2 * n16;
    for (int k = 0; k < n16; k += 16) {
        __m512 we[WIDE_NR], wo[WIDE_NR];
        if (pf && k < nk) /* each step consumes NR * 32 bytes: see moe_prefetch_step */
            moe_prefetch_step(pf, (size_t)k * NR * 2, (size_t)NR * 32,
                              moe_pf_rows_into_l2((size_t)NR * n_in * 2));
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++) {
            /* the last n_in % 16 weights zero-padded to 16, both halves FMAed as on AVX2 */
            __m256i h = k < nk ? _mm256_loadu_si256((const __m256i *)(wr[i] + k))
                               : _mm256_maskz_loadu_epi16((__mmask16)((1u << (n_in - k)) - 1u),
                                                          wr[i] + k);
            __m512i v = _mm512_broadcast_i32x8(h);
            we[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[i] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
        }
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) {
            __m512 xe = _mm512_loadu_ps(xr[p] + 2 * k);
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                acc[i][p] = _mm512_fmadd_ps(we[i], xe, acc[i][p]);
        }
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) {
            __m512 xo = _mm512_loadu_ps(xr[p] + 2 * k + 16);
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                acc[i][p] = _mm512_fmadd_ps(wo[i], xo, acc[i][p]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) {
            int t = 2 * (p0 + p);
            y[(size_t)t * n_out + r + i] = hsum8(_mm512_castps512_ps256(acc[i][p]));
            if (t + 1 < nt)
                y[(size_t)(t + 1) * n_out + r + i] = hsum8(_mm512_extractf32x8_ps(acc[i][p], 1));
        }
}

/* One row tile (NR rows) against the chunk's n_pairs pairs, WIDE_NP at a time; the first pair
 * tile (the one that reads the weights from memory) prefetches the next row tile. */
static inline __attribute__((always_inline)) void
wide_row_tile(float *y, const float *xp, const uint16_t *w, int n_in, int n_out, int r, int n_pairs,
              int nt, int NR, const char *pf)
{
    int p = 0;
    for (; p + WIDE_NP <= n_pairs; p += WIDE_NP)
        wide_tile(y, xp, w, n_in, n_out, r, p, nt, NR, WIDE_NP, p == 0 ? pf : NULL);
    switch (n_pairs - p) {
    case 4:
        wide_tile(y, xp, w, n_in, n_out, r, p, nt, NR, 4, p == 0 ? pf : NULL);
        break;
    case 3:
        wide_tile(y, xp, w, n_in, n_out, r, p, nt, NR, 3, p == 0 ? pf : NULL);
        break;
    case 2:
        wide_tile(y, xp, w, n_in, n_out, r, p, nt, NR, 2, p == 0 ? pf : NULL);
        break;
    case 1:
        wide_tile(y, xp, w, n_in, n_out, r, p, nt, NR, 1, p == 0 ? pf : NULL);
        break;
    default:
        break;
    }
}

static void wide_rows(float *y, const float *xp, const uint16_t *w, int n_in, int n_out, int r0,
                      int r1, int nt)
{
    int n_pairs = (nt + 1) / 2, r = r0;
    const size_t tile_bytes = (size_t)WIDE_NR * n_in * sizeof(uint16_t);
    for (; r + WIDE_NR <= r1; r += WIDE_NR) {
        const char *pf = r + 2 * WIDE_NR <= r1 && moe_pf_rows_into_l2(tile_bytes) != MOE_PF_NONE
                             ? (const char *)(w + (size_t)(r + WIDE_NR) * n_in)
                             : NULL;
        wide_row_tile(y, xp, w, n_in, n_out, r, n_pairs, nt, WIDE_NR, pf);
    }
    switch (r1 - r) {
    case 3:
        wide_row_tile(y, xp, w, n_in, n_out, r, n_pairs, nt, 3, NULL);
        break;
    case 2:
        wide_row_tile(y, xp, w, n_in, n_out, r, n_pairs, nt, 2, NULL);
        break;
    case 1:
        wide_row_tile(y, xp, w, n_in, n_out, r, n_pairs, nt, 1, NULL);
        break;
    default:
        break;
    }
}

void moe_matmul_rows_wide_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                                 int n_in, int n_out, int r0, int r1)
{
    int chunk = n_tok >= WIDE_CHUNK_MIN_TOK ? WIDE_TOKC : n_tok;
    float *xp = wt == MOE_DT_BF16 && n_tok >= WIDE_MIN_TOK
                    ? moe_rows_scratch((size_t)(chunk + 1) * (size_t)moe_bf16_split_n(n_in) * sizeof *xp)
                    : NULL;
    if (!xp) {
        /* f32/f16, few tokens, or no scratch (the AVX2 rows' own stack fallback): the same bits */
        moe_matmul_rows_avx2_pf(y, x, w, wt, n_tok, n_in, n_out, r0, r1, moe_pf_rows_into_l2);
        return;
    }
    for (int tc = 0; tc < n_tok; tc += chunk) {
        int nt = n_tok - tc < chunk ? n_tok - tc : chunk;
        const float *xc = x + (size_t)tc * n_in;
        for (int t = 0; t < nt; t += 2)
            wide_pair_x(xp + (size_t)t * moe_bf16_split_n(n_in), xc + (size_t)t * n_in,
                        t + 1 < nt ? xc + (size_t)(t + 1) * n_in : NULL, n_in);
        wide_rows(y + (size_t)tc * n_out, xp, (const uint16_t *)w, n_in, n_out, r0, r1, nt);
    }
}

#else
void moe_matmul_rows_wide_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                                 int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_avx2(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}
#endif
