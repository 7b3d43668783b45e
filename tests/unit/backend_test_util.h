/* Shared by the backend conformance tests (test_backend_ops.c, test_backend_ops_moe.c): the
 * backends under test (every CPU ISA this machine runs, CUDA when a GPU is visible), deterministic
 * random inputs, backend buffers in and out, the per-element comparison, random weights. Static
 * functions: each test binary includes it once. */
#ifndef MOE_TESTS_BACKEND_TEST_UTIL_H
#define MOE_TESTS_BACKEND_TEST_UTIL_H

#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "worker/compute/backend.h"

/* ---- random inputs (deterministic: a failure reproduces) ---- */

static uint64_t rng = 0x243f6a8885a308d3ull;
static uint64_t rnext(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1dull;
}
static float runif(float lo, float hi) { return lo + (hi - lo) * (float)((rnext() >> 40) * 0x1p-24); }
static int rint_in(int lo, int hi) { return lo + (int)(rnext() % (uint64_t)(hi - lo + 1)); }
static void rfill(float *v, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        v[i] = runif(lo, hi);
}
static void *xcalloc(size_t n, size_t s)
{
    void *p = calloc(n ? n : 1, s);
    cr_assert(p);
    return p;
}

/* ---- the backends under test ---- */

typedef struct {
    moe_backend *be;
    char label[64];
} variant;

#define MAX_VARIANTS 8
static variant vars[MAX_VARIANTS];
static int n_vars;
static moe_threadpool_t *tpool;
static moe_backend *cpu_be, *cuda_be;

/* Every backend variant present: the CPU backend (2 threads) under each ISA it can force, and
 * CUDA when it can start. ISA forcing is per process (each Criterion test runs in its own). */
static void setup(void)
{
    tpool = moe_threadpool_create(2);
    cr_assert(tpool);
    cr_assert_eq(moe_backend_cpu_create(tpool, &cpu_be), MOE_OK);
    for (int i = MOE_ISA_SCALAR; i <= MOE_ISA_AMX; i++) {
        moe_isa want = (moe_isa)i;
        moe_isa got = moe_kernels_force_isa(want);
        if (got != want) {
            cr_log_info("cpu/%s: not on this CPU, skipped", moe_isa_name(want));
            continue;
        }
        vars[n_vars].be = cpu_be;
        snprintf(vars[n_vars].label, sizeof vars[n_vars].label, "cpu/%s", moe_isa_name(want));
        n_vars++;
    }
    if (moe_backend_cuda_create(0, &cuda_be) == MOE_OK) {
        vars[n_vars].be = cuda_be;
        snprintf(vars[n_vars].label, sizeof vars[n_vars].label, "cuda");
        n_vars++;
    } else {
        cr_log_info("cuda: skipped (%s)", moe_error_message());
    }
}

static void teardown(void)
{
    moe_backend_free(cpu_be);
    moe_backend_free(cuda_be);
    cpu_be = cuda_be = NULL;
    moe_threadpool_free(tpool);
    n_vars = 0;
}

/* Selects variant v: forces its ISA (CPU), returns its backend. */
static moe_backend *use(int v)
{
    const char *l = vars[v].label;
    if (strncmp(l, "cpu/", 4) == 0) {
        moe_isa isa = MOE_ISA_SCALAR;
        for (int i = MOE_ISA_SCALAR; i <= MOE_ISA_AMX; i++)
            if (!strcmp(l + 4, moe_isa_name((moe_isa)i)))
                isa = (moe_isa)i;
        cr_assert_eq(moe_kernels_force_isa(isa), isa);
    }
    return vars[v].be;
}

/* Backend buffers holding copies of host arrays, freed together at the end of a check. */
typedef struct {
    moe_backend *be;
    void *p[64];
    int n;
} bufs;
static void *bput(bufs *b, const void *src, size_t bytes)
{
    cr_assert_lt(b->n, 64);
    void *d = b->be->ops->alloc(b->be, bytes);
    cr_assert(d, "%s: alloc %zu", b->be->name, bytes);
    if (src && bytes)
        cr_assert_eq(b->be->ops->upload(b->be, d, src, bytes), MOE_OK);
    b->p[b->n++] = d;
    return d;
}
static void bget(bufs *b, void *dst, const void *src, size_t bytes)
{
    cr_assert_eq(b->be->ops->download(b->be, dst, src, bytes), MOE_OK, "%s", moe_error_message());
}
static void bfree_all(bufs *b)
{
    cr_assert_eq(b->be->ops->synchronize(b->be), MOE_OK);
    for (int i = 0; i < b->n; i++)
        b->be->ops->free(b->be, b->p[i]);
    b->n = 0;
}

/* Fails naming the variant, op, case and element when |got - want| > tol[i] (tol NULL: exact). */
static void expect_close(const char *who, const char *what, int cs, const float *got,
                         const double *want, const double *tol, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        double t = tol ? tol[i] : 0.0;
        if (!(err <= t))
            cr_assert_fail("%s %s case %d: element %zu: got %.9g, want %.9g (|err| %.3g > tol %.3g)", who,
                           what, cs, i, (double)got[i], want[i], err, t);
    }
}

static bool skip(moe_backend *be, const char *who, moe_op op, moe_dtype dt)
{
    if (be->ops->supports(be, op, dt))
        return false;
    cr_log_info("%s: %s/%s not supported, skipped", who, moe_op_name(op), moe_dtype_name(dt));
    return true;
}

/* A random weight matrix of dtype dt and its exact values as f32. */
static void *make_weight(moe_dtype dt, int rows, int cols, float *wf)
{
    rfill(wf, (size_t)rows * cols, -1.0f, 1.0f);
    size_t rb = moe_dtype_row_bytes(dt, (size_t)cols);
    char *w = xcalloc((size_t)rows, rb);
    for (int r = 0; r < rows; r++) {
        float *src = wf + (size_t)r * cols;
        char *dst = w + (size_t)r * rb;
        if (dt == MOE_DT_F32)
            memcpy(dst, src, sizeof(float) * cols);
        else if (dt == MOE_DT_BF16)
            for (int c = 0; c < cols; c++)
                ((uint16_t *)dst)[c] = moe_f32_to_bf16(src[c]);
        else if (dt == MOE_DT_F16)
            for (int c = 0; c < cols; c++)
                ((uint16_t *)dst)[c] = moe_f32_to_f16(src[c]);
        else
            cr_assert_eq(moe_quantize(dst, dt, src, MOE_DT_F32, (size_t)cols), 0);
    }
    moe_convert_to_f32(wf, w, dt, (size_t)rows * cols); /* the values the weights really hold */
    return w;
}

/* One output of y = x W^T: want = x_row . w_row in double, and its tolerance (docs/backends.md):
 * (1e-5 + act_round) * sum |x w| (f32 accumulation of exact products; act_round: 2^-16 where a
 * device GEMM carries x as hi + lo 16-bit halves, plus 2^-24 per input for f16's subnormal lo),
 * plus, when x is quantized to int8 blocks (x_quantized: Q8/Q4 weights on the CPU, or a device
 * below 48 tokens), half a step of each block's scale per input. */
static void matmul_ref(const float *xr, const float *wr, int n_in, bool x_quantized, double act_round,
                       double *want, double *tol)
{
    double s = 0, sa = 0, qerr = 0;
    for (int c = 0; c < n_in; c++) {
        s += (double)xr[c] * wr[c];
        sa += fabs((double)xr[c] * wr[c]);
    }
    if (x_quantized)
        for (int c0 = 0; c0 < n_in; c0 += MOE_QK) {
            double amax = 0, wsum = 0;
            for (int c = c0; c < c0 + MOE_QK; c++) {
                amax = fmax(amax, fabs(xr[c]));
                wsum += fabs(wr[c]);
            }
            qerr += amax / 254.0 * wsum * 1.0001;
        }
    *want = s;
    *tol = (1e-5 + act_round) * sa + qerr + (act_round > 0 ? 0x1p-24 * n_in : 0.0) + 1e-30;
}

#endif
