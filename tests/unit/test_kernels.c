/* Unit tests for kernels/: every kernel of every ISA this CPU runs, against the scalar path and a
 * double-precision reference; thread pool exactness; f16 edge cases; paged GQA attention. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu/kernels_internal.h" /* moe_attn_exp_*: the softmax numerators */
#include "kernels/kernels.h"
#include "tests/unit/kernel_test_util.h"

/* ---- helpers ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void)
{
    /* xorshift64*: deterministic across runs, so a failure reproduces. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

static float rng_uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)((rng_next() >> 40) * 0x1p-24);
}

static void fill(float *v, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        v[i] = rng_uniform(lo, hi);
}

static double f16_ref_value(uint16_t h)
{
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double s = (h & 0x8000) ? -1.0 : 1.0;
    if (e == 0x1f)
        return m ? NAN : s * INFINITY;
    if (e == 0)
        return s * ldexp(m, -24);
    return s * ldexp(1024 + m, e - 25);
}

/* ---- dispatch ---- */

Test(kernels, isa_names_and_force)
{
    cr_assert_str_eq(moe_isa_name(MOE_ISA_SCALAR), "scalar");
    cr_assert_str_eq(moe_isa_name(MOE_ISA_AVX2), "avx2");
    cr_assert_str_eq(moe_isa_name(MOE_ISA_AVX512), "avx512");
    cr_assert_str_eq(moe_isa_name(MOE_ISA_AMX), "amx");
    cr_assert_str_eq(moe_dtype_name(MOE_DT_BF16), "bf16");
    cr_assert_str_eq(moe_dtype_name(MOE_DT_F16), "f16");
    cr_assert_str_eq(moe_dtype_name(MOE_DT_F32), "f32");
    /* The CPU's best, whatever MOE_ISA lowered the first choice to: the highest ISA forcing
     * accepts. */
    moe_isa isas[MOE_N_ISA];
    moe_isa best = isas[supported_isas(isas) - 1];
    cr_log_info("this CPU's best ISA: %s", moe_isa_name(best));
    cr_assert_eq(moe_kernels_force_isa(MOE_ISA_SCALAR), MOE_ISA_SCALAR);
    cr_assert_eq(moe_kernels_isa(), MOE_ISA_SCALAR);
    /* Forcing back up to the CPU's best works; beyond it is refused. */
    cr_assert_eq(moe_kernels_force_isa(best), best);
    if (best < MOE_ISA_AMX)
        cr_assert_eq(moe_kernels_force_isa((moe_isa)(best + 1)), best);
}

Test(kernels, isa_env_override)
{
    setenv("MOE_ISA", "scalar", 1);
    cr_assert_eq(moe_kernels_isa(), MOE_ISA_SCALAR);
}

/* CPUID's vendor, against the kernel's own reading of it. */
Test(kernels, cpu_vendor_matches_proc_cpuinfo)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) {
        cr_log_info("SKIPPED: no /proc/cpuinfo");
        return;
    }
    char line[256];
    int intel = -1;
    while (intel < 0 && fgets(line, sizeof line, f))
        if (strncmp(line, "vendor_id", 9) == 0)
            intel = strstr(line, "GenuineIntel") != NULL;
    fclose(f);
    if (intel < 0) {
        cr_log_info("SKIPPED: /proc/cpuinfo names no vendor_id (not x86)");
        return;
    }
    cr_assert_eq(moe_kernels_cpu_is_intel(), intel);
}

/* The Intel rule: at avx512 by the CPU's own choice an Intel CPU runs bf16 with the AVX2 rows'
 * arithmetic, on zmm token pairs (vdpbf16ps rows measured slower there), the Q8/Q4 batch tiles on zmm and the 16-lane softmax
 * exp (as the amx tables); everything else in its table is the AVX-512 one. */
Test(kernels, intel_rule_tables)
{
    const moe_kernel_ops *rule = moe_kernels_table(MOE_ISA_AVX512, 0, 1);
    const moe_kernel_ops *plain = moe_kernels_table(MOE_ISA_AVX512, 0, 0);
    cr_assert(rule->matmul_rows == moe_matmul_rows_wide_avx512);
    cr_assert(plain->matmul_rows == moe_matmul_rows_avx512);
    cr_assert(plain->matmul_rows_q == moe_matmul_rows_q_avx512);
    cr_assert(rule->matmul_rows_q == moe_matmul_rows_q_avx512z);
    cr_assert(moe_kernels_table(MOE_ISA_AMX, 0, 0)->matmul_rows_q == moe_matmul_rows_q_avx512z);
    cr_assert(rule->quantize_x == plain->quantize_x);
    cr_assert(rule->attn_exp == moe_attn_exp_avx512 && plain->attn_exp == moe_attn_exp_avx2);
    cr_assert(moe_kernels_table(MOE_ISA_AMX, 0, 0)->attn_exp == moe_attn_exp_avx512);
    cr_assert(rule->attn_scores == plain->attn_scores && rule->attn_accum == plain->attn_accum &&
              rule->dot_f32 == plain->dot_f32 &&
              rule->axpy_f32 == plain->axpy_f32 && rule->silu_mul == plain->silu_mul &&
              rule->row_block == plain->row_block);
    /* MOE_BF16_X=round asks for the vdpbf16ps rows with x rounded: the rule does not apply. */
    cr_assert(moe_kernels_table(MOE_ISA_AVX512, 1, 1)->matmul_rows ==
              moe_matmul_rows_avx512_xbf16);
    cr_assert(moe_kernels_table(MOE_ISA_AMX, 0, 1)->matmul_rows == moe_matmul_rows_amx);
}

/* MOE_ISA=avx512 names the level: its own kernels, the vdpbf16ps rows, on any vendor. */
Test(kernels, intel_rule_not_under_moe_isa)
{
    setenv("MOE_ISA", "avx512", 1);
    if (moe_kernels_isa() != MOE_ISA_AVX512) {
        cr_log_info("SKIPPED: this CPU has no AVX-512 BF16 level");
        return;
    }
    cr_assert(moe_kernels_ops()->matmul_rows == moe_matmul_rows_avx512);
    cr_assert(strstr(moe_kernels_describe(), "bf16:avx512-dpbf16-xsplit"), "%s",
              moe_kernels_describe());
}

/* Left at its default: a CPU whose best is avx512 runs the AVX2 rows for bf16 if and only if it
 * is an Intel one (an AMX CPU's best is amx: not this case). */
Test(kernels, intel_rule_at_the_default)
{
    unsetenv("MOE_ISA");
    if (moe_kernels_isa() != MOE_ISA_AVX512) {
        cr_log_info("SKIPPED: this CPU's best ISA is %s, not avx512", moe_isa_name(moe_kernels_isa()));
        return;
    }
    int intel = moe_kernels_cpu_is_intel();
    cr_log_info("avx512 by default on %s: %s", intel ? "Intel" : "another vendor",
                moe_kernels_describe());
    cr_assert(moe_kernels_ops()->matmul_rows ==
              (intel ? moe_matmul_rows_wide_avx512 : moe_matmul_rows_avx512));
    cr_assert(strstr(moe_kernels_describe(), intel ? "matmul float=avx2-arith:zmm-token-pairs"
                                                   : "avx512-dpbf16-xsplit"),
              "%s", moe_kernels_describe());
}

/* ---- conversions ---- */

Test(kernels, f16_to_f32_exhaustive)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = moe_f16_to_f32((uint16_t)h);
        double ref = f16_ref_value((uint16_t)h);
        if (isnan(ref)) {
            cr_assert(isnan(f), "h=%04x", h);
            /* Round trip keeps it a NaN with the sign. */
            uint16_t back = moe_f32_to_f16(f);
            cr_assert((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0, "h=%04x", h);
            cr_assert_eq(back & 0x8000, h & 0x8000);
            continue;
        }
        cr_assert_eq((double)f, ref, "h=%04x", h);
        cr_assert_eq(signbit(f) != 0, (h & 0x8000) != 0, "h=%04x", h);
        cr_assert_eq(moe_f32_to_f16(f), h, "round trip h=%04x", h);
    }
}

/* The nearest half (ties to even mantissa), by checking the neighbours in double. */
static void check_f32_to_f16(float f)
{
    uint16_t h = moe_f32_to_f16(f);
    double v = (double)f;
    double got = f16_ref_value(h);
    cr_assert_eq(h & 0x8000, signbit(f) ? 0x8000 : 0, "f=%a", (double)f);
    if (fabs(v) >= 65520.0) {
        cr_assert(isinf(got), "f=%a -> %04x", (double)f, h);
        return;
    }
    cr_assert(!isinf(got), "f=%a -> %04x", (double)f, h);
    double err = fabs(got - v);
    uint16_t mag = h & 0x7fff;
    /* Neighbours in magnitude: compare against each. */
    for (int d = -1; d <= 1; d += 2) {
        int nm = (int)mag + d;
        if (nm < 0 || nm > 0x7bff)
            continue;
        double other = f16_ref_value((uint16_t)((h & 0x8000) | nm));
        double oerr = fabs(other - v);
        cr_assert(err <= oerr, "f=%a -> %04x not nearest", (double)f, h);
        if (err == oerr)
            cr_assert((mag & 1) == 0, "f=%a -> %04x tie not even", (double)f, h);
    }
}

Test(kernels, f32_to_f16_edges_and_random)
{
    cr_assert_eq(moe_f32_to_f16(0.0f), 0x0000);
    cr_assert_eq(moe_f32_to_f16(-0.0f), 0x8000);
    cr_assert_eq(moe_f32_to_f16(1.0f), 0x3c00);
    cr_assert_eq(moe_f32_to_f16(-2.0f), 0xc000);
    cr_assert_eq(moe_f32_to_f16(65504.0f), 0x7bff);
    cr_assert_eq(moe_f32_to_f16(65519.99f), 0x7bff);
    cr_assert_eq(moe_f32_to_f16(65520.0f), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(1e10f), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(-1e10f), 0xfc00);
    cr_assert_eq(moe_f32_to_f16(INFINITY), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(-INFINITY), 0xfc00);
    uint16_t qn = moe_f32_to_f16(NAN);
    cr_assert((qn & 0x7c00) == 0x7c00 && (qn & 0x0200), "NaN -> quiet NaN, got %04x", qn);
    /* A signalling-looking f32 NaN with only low payload bits must not become inf. */
    uint32_t snan_bits = 0x7f800001u;
    float snan;
    memcpy(&snan, &snan_bits, sizeof snan);
    uint16_t hs = moe_f32_to_f16(snan);
    cr_assert((hs & 0x7c00) == 0x7c00 && (hs & 0x3ff) != 0, "got %04x", hs);
    cr_assert_eq(moe_f32_to_f16(0x1p-24f), 0x0001);        /* smallest subnormal */
    cr_assert_eq(moe_f32_to_f16(0x1p-25f), 0x0000);        /* tie to even: zero */
    cr_assert_eq(moe_f32_to_f16(0x1.000002p-25f), 0x0001); /* just above the tie */
    cr_assert_eq(moe_f32_to_f16(0x3p-25f), 0x0002);        /* 1.5 ulp: tie to even 2 */
    cr_assert_eq(moe_f32_to_f16(0x1p-14f), 0x0400);        /* smallest normal */
    cr_assert_eq(moe_f32_to_f16(0x1.ff8p-15f), 0x03ff);    /* largest subnormal */
    cr_assert_eq(moe_f32_to_f16(0x1.ffcp-15f), 0x0400);    /* its half-ulp tie rounds to even */
    cr_assert_eq(moe_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie: even stays */
    cr_assert_eq(moe_f32_to_f16(1.0f + 0x3p-11f), 0x3c02); /* tie: odd rounds up */
    cr_assert_eq(moe_f32_to_f16(1e-10f), 0x0000);
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)rng_next();
        /* Bias toward the half range: exponents 96..143 (2^-31 .. 2^16). */
        u = (u & 0x807fffffu) | ((96u + (uint32_t)(rng_next() % 48)) << 23);
        float f;
        memcpy(&f, &u, sizeof f);
        check_f32_to_f16(f);
    }
}

Test(kernels, convert_to_f32)
{
    enum { N = 37 };
    float src[N], dst[N];
    uint16_t b[N], h[N];
    fill(src, N, -100.f, 100.f);
    for (int i = 0; i < N; i++) {
        b[i] = moe_f32_to_bf16(src[i]);
        h[i] = moe_f32_to_f16(src[i]);
    }
    moe_convert_to_f32(dst, src, MOE_DT_F32, N);
    cr_assert_arr_eq(dst, src, sizeof src);
    moe_convert_to_f32(dst, b, MOE_DT_BF16, N);
    for (int i = 0; i < N; i++)
        cr_assert_eq(dst[i], moe_bf16_to_f32(b[i]));
    moe_convert_to_f32(dst, h, MOE_DT_F16, N);
    for (int i = 0; i < N; i++)
        cr_assert_eq(dst[i], moe_f16_to_f32(h[i]));
    /* bf16 rounding is to nearest even. */
    cr_assert_eq(moe_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
    cr_assert_eq(moe_f32_to_bf16(1.0f + 0x3p-8f), 0x3f82);
}

/* ---- thread pool ---- */

#define POOL_MAX_TASKS 200

typedef struct {
    _Atomic int count[POOL_MAX_TASKS];
    _Atomic int bad_thread;
    int n_threads;
    _Atomic long total;
} pool_probe;

static void probe_task(void *arg, int task, int thread)
{
    pool_probe *p = arg;
    if (thread < 0 || thread >= p->n_threads)
        atomic_fetch_add(&p->bad_thread, 1);
    atomic_fetch_add(&p->count[task], 1);
    atomic_fetch_add(&p->total, task + 1);
}

static void pool_exercise(moe_threadpool_t *pool, int n_threads, int runs)
{
    pool_probe *p = xmalloc(sizeof *p);
    for (int r = 0; r < runs; r++) {
        memset(p, 0, sizeof *p);
        p->n_threads = n_threads;
        int n_tasks = (int)(rng_next() % POOL_MAX_TASKS) + 1;
        if (r % 50 == 7) {
            /* Let the workers fall asleep so the futex wake-up path runs too. */
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
        moe_threadpool_run(pool, probe_task, p, n_tasks);
        for (int t = 0; t < POOL_MAX_TASKS; t++)
            cr_assert_eq(atomic_load(&p->count[t]), t < n_tasks ? 1 : 0, "run %d task %d of %d", r,
                         t, n_tasks);
        cr_assert_eq(atomic_load(&p->total), (long)n_tasks * (n_tasks + 1) / 2);
        cr_assert_eq(atomic_load(&p->bad_thread), 0);
    }
    free(p);
}

Test(kernels, threadpool_exact_counts, .timeout = 60)
{
    for (int nt = 1; nt <= 4; nt++) {
        moe_threadpool_t *pool = moe_threadpool_create(nt);
        cr_assert_not_null(pool);
        cr_assert_eq(moe_threadpool_size(pool), nt);
        pool_exercise(pool, nt, 1500);
        moe_threadpool_free(pool);
    }
    /* NULL pool: everything on the caller, thread 0. */
    cr_assert_eq(moe_threadpool_size(NULL), 1);
    pool_exercise(NULL, 1, 20);
    cr_assert_null(moe_threadpool_create(0));
}

Test(kernels, threadpool_create_free_churn, .timeout = 60)
{
    /* Free right after create (workers may not have started) and right after a run. */
    for (int i = 0; i < 100; i++) {
        moe_threadpool_t *pool = moe_threadpool_create(1 + i % 4);
        cr_assert_not_null(pool);
        if (i % 2)
            pool_exercise(pool, 1 + i % 4, 3);
        moe_threadpool_free(pool);
    }
}

static void sleepy_task(void *arg, int task, int thread)
{
    (void)thread;
    /* Uneven task lengths: the caller must wait for the slow ones, not just its own. */
    struct timespec ts = {0, (task % 3) * 300000L};
    nanosleep(&ts, NULL);
    atomic_fetch_add((_Atomic int *)arg, 1);
}

Test(kernels, threadpool_waits_for_slow_tasks)
{
    moe_threadpool_t *pool = moe_threadpool_create(3);
    cr_assert_not_null(pool);
    for (int r = 0; r < 20; r++) {
        _Atomic int n = 0;
        moe_threadpool_run(pool, sleepy_task, &n, 7);
        cr_assert_eq(atomic_load(&n), 7);
    }
    moe_threadpool_free(pool);
}

/* ---- matmul ---- */

static const void *make_weights(const float *wf, float *wq, moe_dtype dt, size_t n, void **own)
{
    /* Returns the weights in dtype dt and writes their exact f32 values to wq. */
    if (dt == MOE_DT_F32) {
        memcpy(wq, wf, n * sizeof(float));
        *own = NULL;
        return wf;
    }
    uint16_t *w = xmalloc(n * sizeof *w);
    for (size_t i = 0; i < n; i++) {
        w[i] = dt == MOE_DT_BF16 ? moe_f32_to_bf16(wf[i]) : moe_f32_to_f16(wf[i]);
        wq[i] = dt == MOE_DT_BF16 ? moe_bf16_to_f32(w[i]) : moe_f16_to_f32(w[i]);
    }
    *own = w;
    return w;
}

/* How the active float rows feed x to weights of dtype dt: the AVX-512 rows take bf16 weights on
 * vdpbf16ps, which multiplies bf16 by bf16, so x becomes hi + lo (two bf16) or, with
 * MOE_BF16_X=round, one bf16. */
enum { X_F32, X_SPLIT, X_ROUND };

static int x_mode(moe_dtype dt)
{
    if (dt != MOE_DT_BF16)
        return X_F32;
    moe_matmul_rows_fn f = moe_kernels_ops()->matmul_rows;
    return f == moe_matmul_rows_avx512 || f == moe_matmul_rows_amx ? X_SPLIT
           : f == moe_matmul_rows_avx512_xbf16 || f == moe_matmul_rows_amx_xbf16 ? X_ROUND
                                                                                 : X_F32;
}

/* x as vcvtne2ps2bf16 rounds it: to nearest even, f32 subnormals to zero (their sign kept). */
static float x_as_bf16(float x)
{
    if (fabsf(x) < 0x1p-126f)
        return copysignf(0.f, x);
    return moe_bf16_to_f32(moe_f32_to_bf16(x));
}

/* The value of x the vdpbf16ps rows multiply by, exactly (a double holds hi + lo). */
static double x_as_fed(float x, int mode)
{
    float hi = x_as_bf16(x);
    if (mode == X_ROUND)
        return (double)hi;
    if (mode == X_SPLIT)
        return (double)hi + (double)x_as_bf16(x - hi); /* x - hi is exact in f32 */
    return (double)x;
}

/* How far that value can be from x, relative: one bf16 (8-bit significand) is within half an ulp,
 * 2^-8; hi + lo within 2^-8 of x - hi, itself within 2^-8 of x: 2^-16. */
static double x_fed_rel(int mode)
{
    return mode == X_ROUND ? 0x1p-8 : mode == X_SPLIT ? 0x1p-16 : 0.0;
}

/* |got - exact| within a bound on f32 accumulation: a few ulps of sum |x*w| per sqrt-ish of
 * n terms; (n_in * 2^-23) covers the worst case of any summation order. */
static void check_matmul_close(const float *y, const double *ref, const double *mag, int n_tok,
                               int n_out, int n_in, const char *what)
{
    double rel = (double)(n_in + 4) * 0x1p-23;
    for (int i = 0; i < n_tok * n_out; i++) {
        double tol = rel * mag[i] + 1e-30;
        cr_assert(fabs((double)y[i] - ref[i]) <= tol,
                  "%s: n_tok=%d n_in=%d n_out=%d i=%d got %.9g want %.9g (tol %.3g)", what, n_tok,
                  n_in, n_out, i, (double)y[i], ref[i], tol);
    }
}

static void matmul_case(moe_dtype dt, int n_tok, int n_in, int n_out, const moe_isa *isas,
                        int n_isa, moe_threadpool_t **pools)
{
    size_t nw = (size_t)n_in * n_out;
    float *wf = xmalloc(nw * sizeof *wf), *wq = xmalloc(nw * sizeof *wq);
    float *x = xmalloc((size_t)n_tok * n_in * sizeof *x);
    float *y = xmalloc((size_t)n_tok * n_out * sizeof *y);
    float *y_scalar = xmalloc((size_t)n_tok * n_out * sizeof *y);
    float *y_serial = xmalloc((size_t)n_tok * n_out * sizeof *y);
    double *ref = xmalloc((size_t)n_tok * n_out * sizeof *ref);
    double *mag = xmalloc((size_t)n_tok * n_out * sizeof *mag);
    double *ref_fed =
        xmalloc((size_t)n_tok * n_out * sizeof *ref_fed); /* x as the kernel feeds it */
    double *mag_fed = xmalloc((size_t)n_tok * n_out * sizeof *mag_fed);
    fill(wf, nw, -1.f, 1.f);
    fill(x, (size_t)n_tok * n_in, -2.f, 2.f);
    void *own;
    const void *w = make_weights(wf, wq, dt, nw, &own);
    for (int t = 0; t < n_tok; t++)
        for (int r = 0; r < n_out; r++) {
            double s = 0, m = 0;
            for (int c = 0; c < n_in; c++) {
                double p = (double)x[(size_t)t * n_in + c] * (double)wq[(size_t)r * n_in + c];
                s += p;
                m += fabs(p);
            }
            ref[(size_t)t * n_out + r] = s;
            mag[(size_t)t * n_out + r] = m;
        }
    char what[80];
    for (int i = 0; i < n_isa; i++) {
        cr_assert_eq(moe_kernels_force_isa(isas[i]), isas[i]);
        int xm = x_mode(dt);
        snprintf(what, sizeof what, "%s/%s%s serial", moe_isa_name(isas[i]), moe_dtype_name(dt),
                 xm == X_SPLIT   ? " (x as hi+lo bf16)"
                 : xm == X_ROUND ? " (x as bf16)"
                                 : "");
        for (int k = 0; k < n_tok * n_out; k++)
            y_serial[k] = NAN; /* every output must be written */
        moe_matmul_serial(y_serial, x, w, dt, n_tok, n_in, n_out);
        if (i == 0)
            memcpy(y_scalar, y_serial, (size_t)n_tok * n_out * sizeof *y);
        if (xm != X_F32) {
            /* Exactly the f32 accumulation bound against the product of x as fed, and within
             * that plus x_fed_rel of the f32 product. */
            for (int t = 0; t < n_tok; t++)
                for (int r = 0; r < n_out; r++) {
                    double sf = 0, mf = 0;
                    for (int c = 0; c < n_in; c++) {
                        double p = x_as_fed(x[(size_t)t * n_in + c], xm) *
                                   (double)wq[(size_t)r * n_in + c];
                        sf += p;
                        mf += fabs(p);
                    }
                    ref_fed[(size_t)t * n_out + r] = sf;
                    mag_fed[(size_t)t * n_out + r] = mf;
                }
            check_matmul_close(y_serial, ref_fed, mag_fed, n_tok, n_out, n_in, what);
            double rel = (double)(n_in + 4) * 0x1p-23 + x_fed_rel(xm);
            for (int k = 0; k < n_tok * n_out; k++)
                cr_assert(fabs((double)y_serial[k] - ref[k]) <= rel * mag[k] + 1e-30,
                          "%s vs the f32-x product at %d: %.9g vs %.9g", what, k,
                          (double)y_serial[k], ref[k]);
        } else {
            check_matmul_close(y_serial, ref, mag, n_tok, n_out, n_in, what);
        }
        /* Vector path vs scalar path: both near the exact value, hence near each other. */
        double rel = (double)(n_in + 4) * 0x1p-22 + x_fed_rel(xm);
        for (int k = 0; k < n_tok * n_out; k++)
            cr_assert(fabs((double)y_serial[k] - (double)y_scalar[k]) <= rel * mag[k] + 1e-30,
                      "%s vs scalar at %d", what, k);
        /* Threaded: the same per-row arithmetic, so bit-identical to serial for any thread
         * count (results do not depend on how rows were split). */
        for (int p = 0; p < 4; p++) {
            for (int k = 0; k < n_tok * n_out; k++)
                y[k] = NAN;
            moe_matmul(pools[p], y, x, w, dt, n_tok, n_in, n_out);
            cr_assert_arr_eq(y, y_serial, (size_t)n_tok * n_out * sizeof *y,
                             "%s: threads=%d differs from serial (n_tok=%d n_in=%d n_out=%d)", what,
                             moe_threadpool_size(pools[p]), n_tok, n_in, n_out);
        }
        /* Without the AVX2 bf16 x buffer (as when out of memory): one token at a time through a
         * stack buffer, the same bits. */
        moe_kernels_test_no_scratch(1);
        for (int k = 0; k < n_tok * n_out; k++)
            y[k] = NAN;
        moe_matmul(pools[1], y, x, w, dt, n_tok, n_in, n_out);
        moe_kernels_test_no_scratch(0);
        cr_assert_arr_eq(y, y_serial, (size_t)n_tok * n_out * sizeof *y,
                         "%s: no-scratch path differs (n_tok=%d n_in=%d n_out=%d)", what, n_tok,
                         n_in, n_out);
    }
    free(own);
    free(wf);
    free(wq);
    free(x);
    free(y);
    free(y_scalar);
    free(y_serial);
    free(ref);
    free(mag);
    free(ref_fed);
    free(mag_fed);
}

static void matmul_sweep(moe_dtype dt)
{
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    moe_threadpool_t *pools[4] = {NULL, moe_threadpool_create(2), moe_threadpool_create(3),
                                  moe_threadpool_create(4)};
    static const int n_ins[] = {1, 7, 8, 9, 16, 31, 33, 64, 257, 1000};
    static const int n_toks[] = {1, 2, 3, 4, 5, 16, 37, 50};
    static const int n_outs[] = {1, 3, 16, 17, 61};
    for (size_t a = 0; a < sizeof n_ins / sizeof *n_ins; a++)
        for (size_t b = 0; b < sizeof n_toks / sizeof *n_toks; b++)
            for (size_t c = 0; c < sizeof n_outs / sizeof *n_outs; c++)
                matmul_case(dt, n_toks[b], n_ins[a], n_outs[c], isas, n_isa, pools);
    /* A few random shapes, including a tall one that is split into many tasks. */
    for (int i = 0; i < 6; i++) {
        int n_tok = (int)(rng_next() % 40) + 1;
        int n_in = (int)(rng_next() % 600) + 1;
        int n_out = (int)(rng_next() % 300) + 1;
        matmul_case(dt, n_tok, n_in, n_out, isas, n_isa, pools);
    }
    matmul_case(dt, 1, 300, 1111, isas, n_isa, pools);
    /* An expert's few tokens of a batched decode step (small preset shape): row tiles that
     * prefetch the next one in their first token tile, and tails. */
    matmul_case(dt, 4, 768, 100, isas, n_isa, pools);
    matmul_case(dt, 6, 384, 47, isas, n_isa, pools);
    matmul_case(dt, 70, 130, 90, isas, n_isa, pools);
    /* Many 12-token chunks of a prefill call, k across 256. */
    matmul_case(dt, 200, 300, 40, isas, n_isa, pools);
    for (int p = 1; p < 4; p++)
        moe_threadpool_free(pools[p]);
}

/* Every ISA the CPU has (AVX-512: bf16 on the vdpbf16ps rows, AMX: on the tiles, f32/f16 on
 * AVX2's); bf16 then once more with x rounded to one bf16 (MOE_BF16_X=round). */
static void matmul_sweep_all_rows(moe_dtype dt)
{
    matmul_sweep(dt);
    if (moe_kernels_force_isa(MOE_ISA_AVX512) == MOE_ISA_AVX512) {
        cr_log_info("%s", moe_kernels_describe());
        if (dt == MOE_DT_BF16) {
            moe_kernels_test_bf16_x_round(1);
            cr_log_info("%s", moe_kernels_describe());
            matmul_sweep(dt);
            moe_kernels_test_bf16_x_round(0);
        }
    } else { /* (cr_log_info: cr_log_warn would make Criterion 2.4.1 exit non-zero) */
        cr_log_info("this CPU has no AVX-512 (F/BW/VL/DQ/BF16/VNNI): the avx512 rows did not run");
    }
    if (moe_kernels_force_isa(MOE_ISA_AMX) != MOE_ISA_AMX)
        cr_log_info("this CPU (or OS) has no AMX-BF16 tiles: the amx rows did not run");
}

Test(kernels, matmul_f32, .timeout = 240)
{
    matmul_sweep_all_rows(MOE_DT_F32);
}

Test(kernels, matmul_bf16, .timeout = 240)
{
    matmul_sweep_all_rows(MOE_DT_BF16);
}

Test(kernels, matmul_f16, .timeout = 240)
{
    matmul_sweep_all_rows(MOE_DT_F16);
}

/* One ISA's bf16 rows on a set of shapes around their tiles: against the exact product of x as
 * fed (the f32 accumulation bound), serial = pooled = without the scratch (one token at a time:
 * batch invariance up to the largest n_tok), and rows [r0, r1) mid-tile equal to the whole call's
 * with nothing outside them written. */
typedef struct {
    const int *n_toks, *n_ins, *n_outs;
    int nt, ni, no;
} shape_set;

static void bf16_rows_shapes(moe_isa isa, const shape_set *sh)
{
    cr_assert_eq(moe_kernels_force_isa(isa), isa);
    cr_log_info("%s", moe_kernels_describe());
    moe_isa isas[1] = {isa};
    moe_threadpool_t *pools[4] = {NULL, moe_threadpool_create(2), moe_threadpool_create(3),
                                  moe_threadpool_create(4)};
    for (int b = 0; b < sh->nt; b++)
        for (int a = 0; a < sh->ni; a++)
            for (int c = 0; c < sh->no; c++)
                matmul_case(MOE_DT_BF16, sh->n_toks[b], sh->n_ins[a], sh->n_outs[c], isas, 1,
                            pools);
    for (int p = 1; p < 4; p++)
        moe_threadpool_free(pools[p]);

    /* rows [r0, r1) straight into the rows kernel */
    enum { NT = 19, NI = 100, NO = 53 };
    uint16_t *w = xmalloc((size_t)NO * NI * sizeof *w);
    float *x = xmalloc((size_t)NT * NI * sizeof *x), whole[NT * NO], part[NT * NO];
    for (int i = 0; i < NO * NI; i++)
        w[i] = moe_f32_to_bf16(rng_uniform(-1.f, 1.f));
    fill(x, (size_t)NT * NI, -2.f, 2.f);
    static const int ranges[][2] = {{0, NO},  {3, 11},  {5, 6},   {1, 28},
                                    {9, 27},  {13, 29}, {0, 16},  {16, 48},
                                    {21, 53}, {2, 35},  {37, 53}, {40, 52}};
    moe_matmul_rows_fn rows = moe_kernels_ops()->matmul_rows;
    for (int n_tok = 1; n_tok <= NT; n_tok++) {
        rows(whole, x, w, MOE_DT_BF16, n_tok, NI, NO, 0, NO);
        for (size_t q = 0; q < sizeof ranges / sizeof *ranges; q++) {
            int r0 = ranges[q][0], r1 = ranges[q][1];
            for (int k = 0; k < n_tok * NO; k++)
                part[k] = -7.f;
            rows(part, x, w, MOE_DT_BF16, n_tok, NI, NO, r0, r1);
            for (int t = 0; t < n_tok; t++)
                for (int r = 0; r < NO; r++) {
                    float got = part[t * NO + r],
                          want = r >= r0 && r < r1 ? whole[t * NO + r] : -7.f;
                    cr_assert(memcmp(&got, &want, sizeof got) == 0,
                              "rows [%d, %d) n_tok=%d: token %d row %d: %.9g, want %.9g", r0, r1,
                              n_tok, t, r, (double)got, (double)want);
                }
        }
    }
    free(w);
    free(x);
}

/* The vdpbf16ps rows' tiles: 4 rows at n_tok = 1, 8 beyond n_in = 1024, 4 x 2, 4 x 4 from 3 tokens
 * on; 32 k per step; token chunks of 24 from 48 tokens on: n_tok 1..9, 17, 64, 130; n_in odd
 * multiples of 2, 16 and 32 and odd n_in; n_out off every row tile. */
static void dpbf16_shapes(void)
{
    static const int n_toks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64, 130};
    static const int n_ins[] = {1, 2, 6, 30, 31, 32, 48, 96, 160, 226, 2 * 511, 2 * 515, 32 * 65};
    static const int n_outs[] = {1, 5, 13, 37};
    shape_set sh = {n_toks, n_ins, n_outs, 12, 13, 4};
    bf16_rows_shapes(MOE_ISA_AVX512, &sh);
}

Test(kernels, matmul_bf16_dpbf16_shapes, .timeout = 240)
{
    if (moe_kernels_force_isa(MOE_ISA_AVX512) != MOE_ISA_AVX512) {
        cr_log_info("SKIPPED: this CPU has no AVX-512 BF16 (F/BW/VL/DQ/BF16/VNNI): the vdpbf16ps "
                    "rows cannot run here");
        return;
    }
    dpbf16_shapes(); /* x as hi + lo */
    moe_kernels_test_bf16_x_round(1);
    dpbf16_shapes(); /* MOE_BF16_X=round */
    moe_kernels_test_bf16_x_round(0);
}

/* The AMX rows on the shapes around their tiles (16 rows of W per A tile, blocks of 32 rows then
 * 16, a last partial block overlapping the one before, fewer than 16 rows staged; 8 tokens per B
 * tile with hi + lo, 16 with MOE_BF16_X=round, tiles in pairs; 32 k per step, the last staged;
 * token chunks of 64 from 96 tokens on): the same checks as the vdpbf16ps rows'. */
static void amx_shapes(void)
{
    static const int n_toks[] = {1, 2, 7, 8, 9, 15, 16, 17, 33, 95, 96, 130};
    static const int n_ins[] = {1, 2, 31, 32, 33, 64, 226, 2 * 515, 32 * 65};
    static const int n_outs[] = {1, 15, 16, 17, 31, 32, 33, 47, 50, 100};
    shape_set sh = {n_toks, n_ins, n_outs, 12, 9, 10};
    bf16_rows_shapes(MOE_ISA_AMX, &sh);
}

Test(kernels, matmul_bf16_amx_shapes, .timeout = 300)
{
    if (moe_kernels_force_isa(MOE_ISA_AMX) != MOE_ISA_AMX) {
        cr_log_info("SKIPPED: this CPU (or OS) has no AMX-BF16 tiles granted to the process: the "
                    "amx rows cannot run here");
        return;
    }
    amx_shapes(); /* x as hi + lo */
    moe_kernels_test_bf16_x_round(1);
    amx_shapes(); /* MOE_BF16_X=round */
    moe_kernels_test_bf16_x_round(0);
}

/* The AVX2 bf16 rows' arithmetic on zmm token pairs (matmul_wide_avx512.c, the Intel avx512
 * table) against the AVX2 rows themselves, bit for bit: every pair-tile and row-tile remainder (4
 * rows x 5 pairs; odd token counts leave a lone last token), the 4-token threshold, token chunks of
 * 20 from 48 tokens on (48, 49, 64 and 67 end on chunks of 8, 9, 4 and 7), n_in tails of 1..15, row ranges starting off a tile, negative zeros and
 * infinities in x, and the no-scratch fallback. */
static void wide_vs_avx2(int n_tok, int n_in, int n_out, int r0, int r1)
{
    size_t nw = (size_t)n_out * n_in, nx = (size_t)n_tok * n_in, ny = (size_t)n_tok * n_out;
    uint16_t *w = malloc(nw * sizeof *w);
    float *x = malloc(nx * sizeof *x), *ya = malloc(ny * sizeof *ya), *yb = malloc(ny * sizeof *yb);
    cr_assert(w && x && ya && yb);
    for (size_t i = 0; i < nw; i++)
        w[i] = moe_f32_to_bf16(rng_uniform(-1.f, 1.f));
    fill(x, nx, -2.f, 2.f);
    x[nx / 2] = -0.f;
    if (nx > 3)
        x[nx - 2] = INFINITY;
    for (size_t i = 0; i < ny; i++)
        ya[i] = yb[i] = (float)i; /* rows outside [r0, r1) must stay as they are */
    moe_matmul_rows_avx2(ya, x, w, MOE_DT_BF16, n_tok, n_in, n_out, r0, r1);
    moe_matmul_rows_wide_avx512(yb, x, w, MOE_DT_BF16, n_tok, n_in, n_out, r0, r1);
    for (size_t i = 0; i < ny; i++) {
        uint32_t a, b;
        memcpy(&a, &ya[i], 4);
        memcpy(&b, &yb[i], 4);
        cr_assert_eq(a, b, "n_tok %d n_in %d n_out %d rows [%d, %d): y[%zu][%zu] %a (avx2) vs %a "
                     "(zmm pairs)", n_tok, n_in, n_out, r0, r1, i / n_out, i % n_out,
                     (double)ya[i], (double)yb[i]);
    }
    free(w);
    free(x);
    free(ya);
    free(yb);
}

Test(kernels, matmul_bf16_zmm_pairs_bits, .timeout = 240)
{
    if (!cpu_runs_isa(MOE_ISA_AVX512)) {
        cr_log_info("SKIPPED: this CPU has no AVX-512 (F/BW/VL/DQ/BF16/VNNI): the zmm token-pair "
                    "rows cannot run here");
        return;
    }
    cr_log_info("ran the zmm token-pair bf16 rows (AVX-512) against the AVX2 rows");
    static const int n_toks[] = {1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 47, 48, 49, 64, 67};
    static const int n_ins[] = {1, 7, 15, 16, 17, 31, 48, 226, 1030};
    static const int n_outs[] = {1, 3, 4, 5, 7, 13, 37};
    for (size_t a = 0; a < sizeof n_toks / sizeof *n_toks; a++)
        for (size_t b = 0; b < sizeof n_ins / sizeof *n_ins; b++)
            for (size_t c = 0; c < sizeof n_outs / sizeof *n_outs; c++)
                wide_vs_avx2(n_toks[a], n_ins[b], n_outs[c], 0, n_outs[c]);
    /* a task's row range, as moe_matmul splits them (off a 4-row tile on both ends) */
    wide_vs_avx2(9, 226, 37, 3, 30);
    wide_vs_avx2(50, 2080, 70, 16, 48);
    moe_kernels_test_no_scratch(1);
    wide_vs_avx2(9, 226, 13, 0, 13);
    moe_kernels_test_no_scratch(0);
}

/* The per-kernel choice is stated, and names the ISA of every kernel. */
Test(kernels, describe_names_each_kernel)
{
    moe_isa isas[MOE_N_ISA];
    int n = supported_isas(isas);
    for (int i = 0; i < n; i++) {
        moe_kernels_force_isa(isas[i]);
        const char *d = moe_kernels_describe();
        cr_log_info("%s", d);
        char want[32];
        snprintf(want, sizeof want, "isa=%s", moe_isa_name(isas[i]));
        cr_assert(strstr(d, want), "%s", d);
        if (isas[i] != MOE_ISA_SCALAR)
            cr_assert(strstr(d, "matmul float=") && strstr(d, "attention="), "%s", d);
        if (isas[i] == MOE_ISA_AVX512) {
            cr_assert(moe_kernels_ops()->matmul_rows == moe_matmul_rows_avx512);
            cr_assert(strstr(d, "bf16:avx512-dpbf16-xsplit"), "%s", d);
            moe_kernels_test_bf16_x_round(1);
            cr_assert(moe_kernels_ops()->matmul_rows == moe_matmul_rows_avx512_xbf16);
            cr_assert(strstr(moe_kernels_describe(), "bf16:avx512-dpbf16-xround"), "%s",
                      moe_kernels_describe());
            moe_kernels_test_bf16_x_round(0);
        }
        if (isas[i] == MOE_ISA_AMX) {
            cr_assert(moe_kernels_ops()->matmul_rows == moe_matmul_rows_amx);
            cr_assert(strstr(d, "bf16:amx-tiles-xsplit"), "%s", d);
            moe_kernels_test_bf16_x_round(1);
            cr_assert(moe_kernels_ops()->matmul_rows == moe_matmul_rows_amx_xbf16);
            cr_assert(strstr(moe_kernels_describe(), "bf16:amx-tiles-xround"), "%s",
                      moe_kernels_describe());
            moe_kernels_test_bf16_x_round(0);
        }
    }
}

Test(kernels, matmul_special_values)
{
    /* f32 accumulation, no fast-math: inf and NaN in the input propagate as IEEE says. */
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    enum { N_IN = 19, N_OUT = 5 };
    float w[N_OUT * N_IN], x[N_IN], y[N_OUT];
    for (int i = 0; i < N_OUT * N_IN; i++)
        w[i] = 1.0f;
    for (int i = 0; i < N_IN; i++)
        x[i] = 0.5f;
    w[2 * N_IN + 18] = INFINITY;
    w[3 * N_IN + 5] = NAN;
    uint16_t wb[N_OUT * N_IN];
    for (int i = 0; i < N_OUT * N_IN; i++)
        wb[i] = moe_f32_to_bf16(w[i]);
    for (int i = 0; i < n_isa; i++) {
        moe_kernels_force_isa(isas[i]);
        for (int round = 0; round < 1 + (isas[i] >= MOE_ISA_AVX512); round++) {
            moe_kernels_test_bf16_x_round(round);
            for (int bf = 0; bf < 2; bf++) { /* f32 and bf16 weights (AVX-512: vdpbf16ps) */
                moe_matmul_serial(y, x, bf ? (const void *)wb : w, bf ? MOE_DT_BF16 : MOE_DT_F32, 1,
                                  N_IN, N_OUT);
                int xm = x_mode(bf ? MOE_DT_BF16 : MOE_DT_F32);
                cr_assert_eq(y[0], 9.5f, "%s bf16=%d", moe_isa_name(isas[i]), bf);
                cr_assert_eq(y[4], 9.5f, "%s bf16=%d", moe_isa_name(isas[i]), bf);
                /* hi + lo: the inf weight also meets lo = 0, inf * 0 = NaN */
                if (xm == X_SPLIT)
                    cr_assert(!isfinite(y[2]), "%s split: %g", moe_isa_name(isas[i]), (double)y[2]);
                else
                    cr_assert(isinf(y[2]) && y[2] > 0, "%s bf16=%d", moe_isa_name(isas[i]), bf);
                cr_assert(isnan(y[3]), "%s bf16=%d", moe_isa_name(isas[i]), bf);
            }
        }
        moe_kernels_test_bf16_x_round(0);
    }
    /* Non-finite activations: inf x against finite weights stays inf on every path (the split's
     * lo part of a non-finite x is 0, not NaN). */
    for (int i = 0; i < N_IN; i++)
        x[i] = i == 4 ? INFINITY : 0.5f;
    for (int i = 0; i < n_isa; i++) {
        moe_kernels_force_isa(isas[i]);
        moe_matmul_serial(y, x, wb, MOE_DT_BF16, 1, N_IN, N_OUT);
        cr_assert(isinf(y[0]) && y[0] > 0, "%s inf x: %g", moe_isa_name(isas[i]), (double)y[0]);
        cr_assert(isnan(y[3]), "%s", moe_isa_name(isas[i]));
    }
}

/* ---- elementwise ---- */

Test(kernels, rmsnorm)
{
    static const int ns[] = {1, 7, 64, 257, 4096};
    for (size_t k = 0; k < sizeof ns / sizeof *ns; k++) {
        int n = ns[k];
        float *x = xmalloc(n * sizeof *x), *w = xmalloc(n * sizeof *w), *y = xmalloc(n * sizeof *y);
        fill(x, n, -3.f, 3.f);
        fill(w, n, 0.5f, 1.5f);
        double ss = 0;
        for (int i = 0; i < n; i++)
            ss += (double)x[i] * x[i];
        double inv = 1.0 / sqrt(ss / n + 1e-6);
        moe_rmsnorm(y, x, w, n, 1e-6f);
        for (int i = 0; i < n; i++)
            cr_assert(fabs(y[i] - x[i] * inv * w[i]) <= 1e-6 * (1 + fabs(x[i] * inv * w[i])));
        /* In place (y aliases x) gives the same result. */
        moe_rmsnorm(x, x, w, n, 1e-6f);
        cr_assert_arr_eq(x, y, n * sizeof *x);
        free(x);
        free(w);
        free(y);
    }
}

Test(kernels, softmax)
{
    float x[300];
    double e[300];
    for (int n = 1; n < 300; n += 37) {
        fill(x, n, -20.f, 20.f);
        x[n / 2] = 80.f + (float)n; /* would overflow expf without the max subtraction */
        double mx = -INFINITY, s = 0;
        for (int i = 0; i < n; i++)
            mx = fmax(mx, x[i]);
        for (int i = 0; i < n; i++)
            s += (e[i] = exp((double)x[i] - mx));
        moe_softmax(x, n);
        double tot = 0;
        for (int i = 0; i < n; i++) {
            cr_assert(fabs(x[i] - e[i] / s) <= 1e-6, "n=%d i=%d", n, i);
            tot += x[i];
        }
        cr_assert(fabs(tot - 1.0) < 1e-5);
    }
}

Test(kernels, silu_mul_and_axpy)
{
    enum { N = 133 };
    float g[N], u[N], g0[N], y[N], y0[N];
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    /* silu dispatches by ISA (AVX2: the vector exp): every ISA, lengths with every tail, large
     * |g| (exp far out of range), the specials of the scalar formula. */
    for (int ii = 0; ii < n_isa; ii++) {
        moe_kernels_force_isa(isas[ii]);
        for (int n = 1; n <= N; n += (n < 20 ? 1 : 19)) {
            fill(g, N, n % 2 ? -10.f : -120.f, n % 2 ? 10.f : 120.f);
            fill(u, N, -2.f, 2.f);
            memcpy(g0, g, sizeof g);
            moe_silu_mul(g, u, n);
            for (int i = 0; i < N; i++) {
                double r = i < n ? (double)g0[i] / (1.0 + exp(-(double)g0[i])) * u[i] : g0[i];
                cr_assert(fabs(g[i] - r) <= 1e-6 * (1 + fabs(r)), "%s n=%d i=%d: %.9g want %.9g",
                          moe_isa_name(isas[ii]), n, i, (double)g[i], r);
            }
        }
        float s[4] = {INFINITY, -INFINITY, NAN, 0.f}, one[4] = {1.f, 1.f, 1.f, 1.f};
        moe_silu_mul(s, one, 4);
        cr_assert(s[0] == INFINITY && isnan(s[1]) && isnan(s[2]) && s[3] == 0.f, "%s specials",
                  moe_isa_name(isas[ii]));
    }
    /* axpy dispatches by ISA: every ISA, every length's tail, the same rounding (mul, add). */
    fill(y0, N, -1.f, 1.f);
    for (int ii = 0; ii < n_isa; ii++) {
        moe_kernels_force_isa(isas[ii]);
        for (int n = 0; n <= N; n += (n < 20 ? 1 : 19)) {
            memcpy(y, y0, sizeof y);
            moe_axpy(y, 0.75f, u, n);
            for (int i = 0; i < N; i++) {
                float want = i < n ? y0[i] + 0.75f * u[i] : y0[i];
                cr_assert_eq(y[i], want, "%s n=%d i=%d", moe_isa_name(isas[ii]), n, i);
            }
        }
    }
}

Test(kernels, topk_ties_and_random)
{
    const float x[] = {1.f, 3.f, 3.f, 2.f, 3.f, -1.f};
    int idx[6];
    float val[6];
    moe_topk(x, 6, 3, idx, val);
    cr_assert(idx[0] == 1 && idx[1] == 2 && idx[2] == 4);
    cr_assert(val[0] == 3.f && val[2] == 3.f);
    moe_topk(x, 6, 6, idx, val);
    const int want[] = {1, 2, 4, 3, 0, 5};
    cr_assert_arr_eq(idx, want, sizeof want);
    moe_topk(x, 6, 1, idx, val);
    cr_assert(idx[0] == 1 && val[0] == 3.f);
    /* All equal: indices in order. */
    const float z[] = {0.5f, 0.5f, 0.5f, 0.5f};
    moe_topk(z, 4, 3, idx, val);
    cr_assert(idx[0] == 0 && idx[1] == 1 && idx[2] == 2);
    /* Random against a selection reference (values drawn from a small set: many ties). */
    for (int it = 0; it < 300; it++) {
        int n = (int)(rng_next() % 64) + 1, k = (int)(rng_next() % n) + 1;
        float v[64];
        int used[64] = {0};
        for (int i = 0; i < n; i++)
            v[i] = (float)(rng_next() % 8);
        int ti[64];
        float tv[64];
        moe_topk(v, n, k, ti, tv);
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int i = 0; i < n; i++)
                if (!used[i] && (best < 0 || v[i] > v[best]))
                    best = i;
            used[best] = 1;
            cr_assert_eq(ti[j], best, "n=%d k=%d j=%d", n, k, j);
            cr_assert_eq(tv[j], v[best]);
        }
    }
}

Test(kernels, rope_rotate_half)
{
    enum { H = 3, D = 10 };
    float x[H * D], x0[H * D], cs[D];
    fill(x, H * D, -1.f, 1.f);
    memcpy(x0, x, sizeof x);
    fill(cs, D, -1.f, 1.f);
    moe_rope(x, H, D, cs);
    for (int h = 0; h < H; h++)
        for (int i = 0; i < D / 2; i++) {
            const float *v = x0 + h * D;
            double a = (double)v[i] * cs[i] - (double)v[i + D / 2] * cs[D / 2 + i];
            double b = (double)v[i + D / 2] * cs[i] + (double)v[i] * cs[D / 2 + i];
            cr_assert(fabs(x[h * D + i] - a) < 1e-6);
            cr_assert(fabs(x[h * D + i + D / 2] - b) < 1e-6);
        }
}

Test(kernels, rope_table_matches_f32_pytorch_recipe)
{
    enum { P = 64, D = 128 };
    float *t = xmalloc((size_t)P * D * sizeof *t);
    moe_rope_table(t, P, D, 1000000.0);
    for (int p = 0; p < P; p++)
        for (int i = 0; i < D / 2; i++) {
            /* PyTorch: inv_freq in f32 (pow rounded to f32, reciprocal rounded to f32), then
             * freq = f32(p * inv_freq), cos/sin of that f32 angle. */
            float e = (float)(2 * i) / (float)D;
            float inv = (float)(1.0 / (double)(float)pow(1000000.0, (double)e));
            float f = (float)p * inv;
            cr_assert(fabs(t[p * D + i] - cos((double)f)) <= 1e-6, "p=%d i=%d", p, i);
            cr_assert(fabs(t[p * D + D / 2 + i] - sin((double)f)) <= 1e-6, "p=%d i=%d", p, i);
        }
    /* Position 0 is the identity rotation. */
    cr_assert_eq(t[0], 1.0f);
    cr_assert_eq(t[D / 2], 0.0f);
    free(t);
}

/* ---- attention ---- */

static void attention_case(int block_size, int n_kv_head, int group, int head_dim, int n_ctx,
                           float spread)
{
    int n_head = n_kv_head * group;
    int n_blocks = (n_ctx + block_size - 1) / block_size;
    size_t head_stride = (size_t)block_size * head_dim;
    size_t block_floats = head_stride * n_kv_head;
    /* Blocks live at shuffled places in one arena, as in a real cache. */
    int n_arena = n_blocks + 3;
    float *karena = xmalloc(block_floats * n_arena * sizeof(float));
    float *varena = xmalloc(block_floats * n_arena * sizeof(float));
    fill(karena, block_floats * n_arena, -spread, spread);
    fill(varena, block_floats * n_arena, -1.f, 1.f);
    int *perm = xmalloc(n_arena * sizeof *perm);
    for (int i = 0; i < n_arena; i++)
        perm[i] = i;
    for (int i = n_arena - 1; i > 0; i--) {
        int j = (int)(rng_next() % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    const float **kb = xmalloc(n_blocks * sizeof *kb), **vb = xmalloc(n_blocks * sizeof *vb);
    for (int b = 0; b < n_blocks; b++) {
        kb[b] = karena + block_floats * perm[b];
        vb[b] = varena + block_floats * perm[b];
    }
    moe_kv_view kv = {kb, vb, block_size, head_stride};
    float *q = xmalloc((size_t)n_head * head_dim * sizeof *q);
    float *out = xmalloc((size_t)n_head * head_dim * sizeof *out);
    float *scratch = xmalloc((size_t)n_ctx * sizeof *scratch);
    double *p = xmalloc((size_t)n_ctx * sizeof *p);
    fill(q, (size_t)n_head * head_dim, -1.f, 1.f);
    float scale = 1.0f / sqrtf((float)head_dim);

    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    for (int ii = 0; ii < n_isa; ii++) {
        moe_kernels_force_isa(isas[ii]);
        moe_attention(out, q, &kv, n_ctx, n_head, n_kv_head, head_dim, scale, scratch);
        for (int h = 0; h < n_head; h++) {
            int kvh = h / group;
            double mx = -INFINITY, s = 0;
            for (int j = 0; j < n_ctx; j++) {
                const float *k =
                    kb[j / block_size] + kvh * head_stride + (size_t)(j % block_size) * head_dim;
                double d = 0;
                for (int c = 0; c < head_dim; c++)
                    d += (double)q[h * head_dim + c] * k[c];
                p[j] = d * scale;
                mx = fmax(mx, p[j]);
            }
            for (int j = 0; j < n_ctx; j++)
                s += (p[j] = exp(p[j] - mx));
            for (int c = 0; c < head_dim; c++) {
                double o = 0;
                for (int j = 0; j < n_ctx; j++)
                    o += p[j] / s *
                         vb[j / block_size]
                           [kvh * head_stride + (size_t)(j % block_size) * head_dim + c];
                float got = out[h * head_dim + c];
                cr_assert(fabs(got - o) <= 2e-5 * (1 + fabs(o)),
                          "%s bs=%d kv=%d group=%d d=%d ctx=%d h=%d c=%d got %g want %g",
                          moe_isa_name(isas[ii]), block_size, n_kv_head, group, head_dim, n_ctx, h,
                          c, (double)got, o);
            }
        }
    }
    free(karena);
    free(varena);
    free(perm);
    free(kb);
    free(vb);
    free(q);
    free(out);
    free(scratch);
    free(p);
}

Test(kernels, attention_paged_gqa, .timeout = 60)
{
    static const int bss[] = {1, 3, 16};
    static const int groups[] = {1, 2, 4};
    static const int ctxs[] = {1, 2, 17, 50};
    static const int dims[] = {8, 17, 64};
    for (size_t a = 0; a < 3; a++)
        for (size_t g = 0; g < 3; g++)
            for (size_t c = 0; c < 4; c++)
                for (size_t d = 0; d < 3; d++)
                    attention_case(bss[a], 2, groups[g], dims[d], ctxs[c], 1.f);
    /* Large scores: softmax must subtract the max (exp(200) overflows f32). */
    attention_case(3, 1, 2, 64, 40, 30.f);
    /* Several 64-token chunks (the running max grows: rescaling), large scores, and groups wider
     * than the 8 heads handled together. */
    attention_case(16, 2, 4, 64, 200, 1.f);
    attention_case(5, 1, 2, 32, 300, 30.f);
    attention_case(16, 1, 16, 16, 129, 3.f);
    attention_case(1, 3, 12, 8, 70, 1.f);
    /* Odd head dims and context lengths around the 32-row chunks. */
    static const int odims[] = {5, 40, 128};
    static const int octx[] = {1, 3, 31, 33, 257};
    for (size_t d = 0; d < 3; d++)
        for (size_t c = 0; c < 5; c++)
            attention_case(16, 1, 3, odims[d], octx[c], 2.f);
}

/* moe_attention_multi: n_q consecutive queries sharing the walk over the context; each must give
 * exactly moe_attention's bits for it alone (strided q and out, contexts that start empty, end
 * mid-chunk or mid-block, more heads than one pass of 64). */
static void attention_multi_case(int block_size, int n_kv_head, int group, int head_dim, int n_q,
                                 int n_ctx0, float spread)
{
    int n_head = n_kv_head * group, n_ctx = n_ctx0 + n_q - 1;
    int n_blocks = n_ctx / block_size + 1;
    size_t head_stride = (size_t)block_size * head_dim, block_floats = head_stride * n_kv_head;
    float *karena = xmalloc(block_floats * n_blocks * sizeof(float));
    float *varena = xmalloc(block_floats * n_blocks * sizeof(float));
    fill(karena, block_floats * n_blocks, -spread, spread);
    fill(varena, block_floats * n_blocks, -1.f, 1.f);
    const float **kb = xmalloc(n_blocks * sizeof *kb), **vb = xmalloc(n_blocks * sizeof *vb);
    for (int b = 0; b < n_blocks; b++) { /* blocks in reverse order: not one contiguous run */
        kb[b] = karena + block_floats * (size_t)(n_blocks - 1 - b);
        vb[b] = varena + block_floats * (size_t)(n_blocks - 1 - b);
    }
    moe_kv_view kv = {kb, vb, block_size, head_stride};
    size_t hq = (size_t)n_head * head_dim, qs = hq + 3, os = hq + 5;
    float *q = xmalloc(qs * n_q * sizeof *q), *out = xmalloc(os * n_q * sizeof *out);
    float *one = xmalloc(hq * sizeof *one), *scratch = xmalloc((size_t)(n_ctx + 1) * sizeof(float));
    fill(q, qs * n_q, -1.f, 1.f);
    float scale = 1.0f / sqrtf((float)head_dim);
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    for (int ii = 0; ii < n_isa; ii++) {
        moe_kernels_force_isa(isas[ii]);
        fill(out, os * n_q, -9.f, 9.f);
        moe_attention_multi(out, os, q, qs, &kv, n_q, n_ctx0, n_head, n_kv_head, head_dim, scale);
        for (int i = 0; i < n_q; i++) {
            moe_attention(one, q + qs * i, &kv, n_ctx0 + i, n_head, n_kv_head, head_dim, scale,
                          scratch);
            cr_assert_arr_eq(out + os * i, one, hq * sizeof *one,
                             "%s bs=%d kv=%d group=%d d=%d n_q=%d ctx0=%d: query %d differs",
                             moe_isa_name(isas[ii]), block_size, n_kv_head, group, head_dim, n_q,
                             n_ctx0, i);
        }
    }
    free(karena);
    free(varena);
    free(kb);
    free(vb);
    free(q);
    free(out);
    free(one);
    free(scratch);
}

Test(kernels, attention_multi_query, .timeout = 60)
{
    static const int nqs[] = {1, 2, 5, 8, 16};
    static const int ctx0s[] = {0, 1, 30, 33, 70};
    for (size_t a = 0; a < 5; a++)
        for (size_t b = 0; b < 5; b++) {
            attention_multi_case(16, 2, 3, 64, nqs[a], ctx0s[b], 1.f);
            attention_multi_case(5, 1, 2, 17, nqs[a], ctx0s[b], 3.f);
        }
    attention_multi_case(3, 1, 2, 64, 7, 40, 30.f); /* large scores */
    attention_multi_case(1, 8, 9, 8, 4, 20, 1.f);   /* 72 heads: two passes */
    attention_multi_case(16, 1, 16, 16, 9, 120, 3.f);
    /* Odd head dims (masked tails of the 8-lane kernels), context lengths around the 32-row
     * chunks and odd query counts: rows of one kernel call reach different chunk lengths. */
    static const int odims[] = {5, 40, 128};
    static const int octx[] = {1, 3, 31, 33, 257};
    static const int onq[] = {3, 7, 13};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 5; b++)
            for (size_t c = 0; c < 3; c++)
                attention_multi_case(16, 2, 3, odims[a], onq[c], octx[b], 2.f);
    moe_attention_multi(NULL, 0, NULL, 0, NULL, 0, 5, 2, 1, 8, 0.3f); /* n_q = 0: nothing */
}

/* The chunk kernels themselves (scores, P.V) on every ISA: each row's result must be the same
 * bits whether the row is given alone or among nr rows at any position (batch invariance: a
 * query's output does not depend on how many queries and heads share the kernel call), within
 * 1e-5 of a double reference, and the same bits on AVX2 and AVX-512 (one instruction sequence,
 * two register blockings). Odd head dims (masked tails), odd row counts (block tails) and every
 * chunk length class (K-row tails of the 4-row blocks, rows with different context lengths). */
#define CK_MAXR 33
static void chunk_kernels_case(int head_dim, int nr, int nc, float (*ref_s)[32], float **ref_o,
                               int have_ref, const char *isa)
{
    const moe_kernel_ops *ops = moe_kernels_ops();
    float *qbuf = xmalloc((size_t)CK_MAXR * (head_dim + 3) * sizeof(float));
    float *kbuf = xmalloc((size_t)32 * (head_dim + 7) * sizeof(float));
    float *vbuf = xmalloc((size_t)32 * (head_dim + 7) * sizeof(float));
    const float *qp[CK_MAXR], *kp[32], *vp[32];
    float *op[CK_MAXR], *o1 = xmalloc((size_t)head_dim * sizeof(float));
    float s[CK_MAXR][32], s1[32], alpha[CK_MAXR], p[CK_MAXR][32];
    int ncr[CK_MAXR];
    fill(qbuf, (size_t)CK_MAXR * (head_dim + 3), -1.f, 1.f);
    fill(kbuf, (size_t)32 * (head_dim + 7), -2.f, 2.f);
    fill(vbuf, (size_t)32 * (head_dim + 7), -1.f, 1.f);
    for (int r = 0; r < nr; r++) {
        qp[r] = qbuf + (size_t)r * (head_dim + 3); /* unaligned, odd strides */
        op[r] = xmalloc((size_t)head_dim * sizeof(float));
        fill(op[r], head_dim, -1.f, 1.f);
        alpha[r] = r % 3 == 0 ? 1.f : rng_uniform(0.f, 1.f);
        ncr[r] = 1 + (int)(rng_next() % (uint64_t)nc); /* any order, not only ascending */
        fill(p[r], 32, 0.f, 1.f);
    }
    ncr[nr / 2] = nc;
    for (int c = 0; c < 32; c++) { /* K/V rows scattered in reverse */
        kp[c] = kbuf + (size_t)(31 - c) * (head_dim + 7);
        vp[c] = vbuf + (size_t)(31 - c) * (head_dim + 7);
    }
    float scale = 0.37f;
    ops->attn_scores(&s[0][0], 32, qp, nr, kp, nc, head_dim, scale);
    for (int r = 0; r < nr; r++) {
        ops->attn_scores(s1, 32, qp + r, 1, kp, nc, head_dim, scale);
        cr_assert_arr_eq(s1, s[r], (size_t)nc * sizeof(float),
                         "%s scores d=%d nr=%d nc=%d: row %d alone differs", isa, head_dim, nr, nc,
                         r);
        for (int c = 0; c < nc; c++) {
            double want = 0;
            for (int d = 0; d < head_dim; d++)
                want += (double)qp[r][d] * kp[c][d];
            want *= scale;
            cr_assert(fabs(s[r][c] - want) <= 1e-5 * (1 + fabs(want)),
                      "%s scores d=%d nr=%d nc=%d r=%d c=%d: %g want %g", isa, head_dim, nr, nc,
                      r, c, (double)s[r][c], want);
        }
        if (have_ref)
            cr_assert_arr_eq(s[r], ref_s[r], (size_t)nc * sizeof(float),
                             "%s scores d=%d nr=%d nc=%d r=%d: not the AVX2 bits", isa, head_dim,
                             nr, nc, r);
    }
    /* P.V: all rows at once, then each row alone from the same o. */
    float **o0 = xmalloc((size_t)nr * sizeof *o0);
    for (int r = 0; r < nr; r++) {
        o0[r] = xmalloc((size_t)head_dim * sizeof(float));
        memcpy(o0[r], op[r], (size_t)head_dim * sizeof(float));
    }
    ops->attn_accum(op, alpha, &p[0][0], 32, nr, vp, ncr, head_dim);
    for (int r = 0; r < nr; r++) {
        memcpy(o1, o0[r], (size_t)head_dim * sizeof(float));
        float *o1p[1] = {o1};
        ops->attn_accum(o1p, alpha + r, p[r], 32, 1, vp, ncr + r, head_dim);
        cr_assert_arr_eq(o1, op[r], (size_t)head_dim * sizeof(float),
                         "%s accum d=%d nr=%d nc=%d: row %d alone differs", isa, head_dim, nr, nc,
                         r);
        for (int d = 0; d < head_dim; d++) {
            double want = (double)o0[r][d] * alpha[r];
            for (int c = 0; c < ncr[r]; c++)
                want += (double)p[r][c] * vp[c][d];
            cr_assert(fabs(op[r][d] - want) <= 1e-5 * (1 + fabs(want)),
                      "%s accum d=%d nr=%d r=%d d=%d: %g want %g", isa, head_dim, nr, r, d,
                      (double)op[r][d], want);
        }
        if (have_ref)
            cr_assert_arr_eq(op[r], ref_o[r], (size_t)head_dim * sizeof(float),
                             "%s accum d=%d nr=%d nc=%d r=%d: not the AVX2 bits", isa, head_dim,
                             nr, nc, r);
        else if (ref_s) {
            memcpy(ref_s[r], s[r], sizeof s[r]);
            memcpy(ref_o[r], op[r], (size_t)head_dim * sizeof(float));
        }
        free(o0[r]);
        free(op[r]);
    }
    free(o0);
    free(o1);
    free(qbuf);
    free(kbuf);
    free(vbuf);
}

Test(kernels, attention_chunk_kernels, .timeout = 120)
{
    static const int dims[] = {5, 8, 17, 40, 64, 128};
    static const int nrs[] = {1, 2, 3, 4, 5, 7, 13, 32, 33};
    static const int ncs[] = {1, 3, 4, 5, 31, 32};
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    float ref_s[CK_MAXR][32];
    float *ref_o[CK_MAXR];
    for (int r = 0; r < CK_MAXR; r++)
        ref_o[r] = xmalloc(128 * sizeof(float));
    for (size_t a = 0; a < sizeof dims / sizeof *dims; a++)
        for (size_t b = 0; b < sizeof nrs / sizeof *nrs; b++)
            for (size_t c = 0; c < sizeof ncs / sizeof *ncs; c++) {
                uint64_t seed = rng_state;
                for (int ii = 0; ii < n_isa; ii++) {
                    moe_kernels_force_isa(isas[ii]);
                    /* AVX2 stores its bits, AVX-512 must match them; scalar: the tolerance. */
                    int have_ref = isas[ii] >= MOE_ISA_AVX512;
                    if (isas[ii] == MOE_ISA_SCALAR)
                        chunk_kernels_case(dims[a], nrs[b], ncs[c], NULL, NULL, 0, "scalar");
                    else
                        chunk_kernels_case(dims[a], nrs[b], ncs[c], ref_s, ref_o, have_ref,
                                           moe_isa_name(isas[ii]));
                    rng_state = seed;
                }
                rng_next();
            }
    for (int r = 0; r < CK_MAXR; r++)
        free(ref_o[r]);
    cr_log_info("chunk kernels ran on %s .. %s", moe_isa_name(isas[0]),
                moe_isa_name(isas[n_isa - 1]));
}

/* The attention chunk's softmax numerators: the AVX2 polynomial exp against exp (2 ulp, absolute
 * 2e-38: 0 below -87), the returned sum against a double sum, every chunk length 1..64,
 * NaN propagation; the scalar kernel is expf itself. */
Test(kernels, attention_exp)
{
    moe_isa isas[MOE_N_ISA];
    int n_isa = supported_isas(isas);
    for (int ii = 0; ii < n_isa; ii++) {
        moe_kernels_force_isa(isas[ii]);
        moe_attn_exp_fn ex = moe_kernels_ops()->attn_exp;
        float s[64], in[64];
        for (int it = 0; it < 640; it++) {
            int nc = it % 64 + 1;
            float range = it < 200 ? 100.f : 2.f;
            for (int c = 0; c < nc; c++)
                in[c] = s[c] = rng_uniform(-range, 0.f) + (c == 7 ? 1e-3f : 0.f);
            float mx = 1e-3f; /* >= every s */
            float mo;
            double sum = ex(s, nc, mx, &mo), want_sum = 0; /* m_in >= every s: max is m_in */
            cr_assert_eq(mo, mx);
            for (int c = 0; c < nc; c++) {
                double w = exp((double)(in[c] - mx)); /* the kernels subtract in f32 */
                want_sum += w;
                cr_assert(fabs(s[c] - w) <= 2.5e-7 * w + 2e-38, "%s: exp(%.9g) = %.9g, want %.9g",
                          moe_isa_name(isas[ii]), (double)(in[c] - mx), (double)s[c], w);
            }
            cr_assert(fabs(sum - want_sum) <= 1e-6 * want_sum + 1e-30, "%s: sum %.9g, want %.9g",
                      moe_isa_name(isas[ii]), sum, want_sum);
        }
        /* Exact points and NaN. */
        float e[9] = {0.f, -1.f, -88.f, -1e30f, NAN, -0.5f, -20.f, 0.f, -3.f};
        float mo;
        double sum = ex(e, 9, 0.f, &mo);
        cr_assert_eq(e[0], 1.0f, "%s: exp(0) = %.9g", moe_isa_name(isas[ii]), (double)e[0]);
        cr_assert(fabs(e[1] - 0.36787944117) <= 1e-7);
        cr_assert(e[2] >= 0.f && e[2] <= 2e-38f && e[3] == 0.f);
        cr_assert(isnan(e[4]) && isnan(sum), "%s: NaN must propagate", moe_isa_name(isas[ii]));
    }
}

/* The 16-lane softmax numerators (moe_attn_exp_avx512, the Intel tables' choice) against the
 * 8-lane ones bit for bit: every exp and the returned sum, at every chunk length 1..64 (the
 * 16-lane loop, its tail below and above 8 lanes), with m_in above and below the scores, scores
 * under -87, -inf and NaN. Skipped, saying so, on CPUs without AVX-512. */
Test(kernels, attention_exp_avx512_bits)
{
    if (!cpu_runs_isa(MOE_ISA_AVX512)) {
        printf("kernels/attention_exp_avx512_bits: skipped, this CPU lacks AVX-512 (best isa %s)\n",
               moe_isa_name(moe_kernels_isa()));
        cr_skip_test("this CPU lacks AVX-512");
    }
    printf("kernels/attention_exp_avx512_bits: 16-lane exp against the 8-lane one\n");
    for (int it = 0; it < 1280; it++) {
        int nc = it % 64 + 1;
        float a[64], b[64];
        float range = it % 3 == 0 ? 100.f : 3.f;
        for (int c = 0; c < nc; c++)
            a[c] = b[c] = rng_uniform(-range, range);
        if (it % 7 == 1)
            a[it % nc] = b[it % nc] = NAN;
        if (it % 5 == 2)
            a[(it / 5) % nc] = b[(it / 5) % nc] = -INFINITY;
        float m_in = it % 2 ? -INFINITY : rng_uniform(-range, 2 * range), ma, mb;
        double sa = moe_attn_exp_avx2(a, nc, m_in, &ma);
        double sb = moe_attn_exp_avx512(b, nc, m_in, &mb);
        cr_assert(memcmp(&ma, &mb, sizeof ma) == 0, "nc=%d: max %.9g vs %.9g", nc, (double)ma,
                  (double)mb);
        cr_assert(memcmp(&sa, &sb, sizeof sa) == 0 || (isnan(sa) && isnan(sb)),
                  "nc=%d: sum %.17g (avx2) vs %.17g (avx512)", nc, sa, sb);
        for (int c = 0; c < nc; c++)
            cr_assert(memcmp(&a[c], &b[c], sizeof a[c]) == 0 || (isnan(a[c]) && isnan(b[c])),
                      "nc=%d c=%d: exp %.9g (avx2) vs %.9g (avx512)", nc, c, (double)a[c],
                      (double)b[c]);
    }
}

Test(kernels, attention_empty_context)
{
    float q[2 * 8], out[2 * 8], scratch[1];
    fill(q, 16, -1.f, 1.f);
    fill(out, 16, -1.f, 1.f);
    const float *base[1] = {q};
    moe_kv_view kv = {base, base, 4, 32};
    moe_attention(out, q, &kv, 0, 2, 1, 8, 0.3f, scratch);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(out[i], 0.f);
}
