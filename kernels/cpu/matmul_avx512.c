/* AVX-512 vector kernels: matmul, dot, axpy (compiled with -mavx512f/bw/vl/dq/bf16/vnni; only
 * called after dispatch.c saw all of those in CPUID). Deliberately simple: the development
 * machine has no AVX-512, so the unit tests exercise this path only on machines that do. */
#include <immintrin.h>

#include "kernels/cpu/kernels_internal.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#define AI static inline __attribute__((always_inline))

/* Lanes [0, n) of 16, n in [0, 16]. */
AI __mmask16 mask16(int n)
{
    return (__mmask16)(n >= 16 ? 0xffffu : ((1u << n) - 1u));
}

/* 16 weights at w[i..), lanes outside `m` zero (masked loads never touch those addresses). */
AI __m512 load_w16(const void *w, size_t i, int wt, __mmask16 m)
{
    if (wt == MOE_DT_F32)
        return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i);
    if (wt == MOE_DT_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* Same numerics as the AVX2 dot path with 16 lanes: one accumulator per output, k in steps of
 * 16, the tail masked (zeros) into the same accumulator, then _mm512_reduce_add_ps. NR rows x
 * NT tokens per tile; the arithmetic of an output never depends on the tiling. */
AI void dot_tile(float *y, const float *x, const void *w, int wt, int n_in, int n_out, int r,
                 int t0, int NR, int NT)
{
    size_t es = wt == MOE_DT_F32 ? 4 : 2;
    __m512 acc[4][2];
    const char *wr[4];
    const float *xr[2];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        wr[i] = (const char *)w + (size_t)(r + i) * n_in * es;
#pragma GCC unroll 2
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm512_setzero_ps();
    }
#pragma GCC unroll 2
    for (int t = 0; t < NT; t++)
        xr[t] = x + (size_t)(t0 + t) * n_in;
    for (int k = 0; k < n_in; k += 16) {
        __mmask16 m = mask16(n_in - k);
        __m512 wv[4];
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++)
            wv[i] = load_w16(wr[i], (size_t)k, wt, m);
#pragma GCC unroll 2
        for (int t = 0; t < NT; t++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, xr[t] + k);
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 2
        for (int t = 0; t < NT; t++)
            y[(size_t)(t0 + t) * n_out + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

AI void dot_rows(float *y, const float *x, const void *w, int wt, int n_tok, int n_in, int n_out,
                 int r0, int r1)
{
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int t = 0;
        for (; t + 2 <= n_tok; t += 2)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 4, 2);
        if (t < n_tok)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 4, 1);
    }
    for (; r < r1; r++) {
        int t = 0;
        for (; t + 2 <= n_tok; t += 2)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 2);
        if (t < n_tok)
            dot_tile(y, x, w, wt, n_in, n_out, r, t, 1, 1);
    }
}

void moe_matmul_rows_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1)
{
    /* Every n_tok through the same 16-lane dot tiles (no hand-off to another kernel for many
     * tokens): an output's bits never depend on how many tokens share the call (batch
     * invariance, docs/kernels.md). */
    switch (wt) {
    case MOE_DT_F32:
        dot_rows(y, x, w, MOE_DT_F32, n_tok, n_in, n_out, r0, r1);
        return;
    case MOE_DT_BF16:
        dot_rows(y, x, w, MOE_DT_BF16, n_tok, n_in, n_out, r0, r1);
        return;
    case MOE_DT_F16:
        dot_rows(y, x, w, MOE_DT_F16, n_tok, n_in, n_out, r0, r1);
        return;
    default:
        MOE_KASSERT(!"moe_matmul (avx512): weight dtype must be F32, BF16 or F16");
    }
}

float moe_dot_f32_avx512(const float *a, const float *b, int n)
{
    __m512 s = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s);
    }
    return _mm512_reduce_add_ps(s);
}

void moe_axpy_f32_avx512(float *y, float a, const float *x, int n)
{
    /* mul then add, not FMA: the same rounding as the scalar y += a * x. */
    __m512 av = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        __m512 r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i),
                                 _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, x + i)));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

#else /* built without the flags: never dispatched */

void moe_matmul_rows_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx512(const float *a, const float *b, int n)
{
    return moe_dot_f32_scalar(a, b, n);
}

void moe_axpy_f32_avx512(float *y, float a, const float *x, int n)
{
    moe_axpy_f32_scalar(y, a, x, n);
}

#endif
