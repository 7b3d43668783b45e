/* moe_matmul: the scalar reference kernel, and the row split across the thread pool. */
#include "kernels/cpu/kernels_internal.h"

/* Weights are converted to f32 this many at a time into a stack buffer, then used for every
 * token: the row is read from memory once whatever n_tok is. */
#define SCALAR_KC 256

static void convert_chunk(float *dst, const void *w, moe_dtype wt, size_t off, int n)
{
    switch (wt) {
    case MOE_DT_F32: {
        const float *s = (const float *)w + off;
        for (int i = 0; i < n; i++)
            dst[i] = s[i];
        break;
    }
    case MOE_DT_BF16: {
        const uint16_t *s = (const uint16_t *)w + off;
        for (int i = 0; i < n; i++)
            dst[i] = moe_bf16_to_f32(s[i]);
        break;
    }
    case MOE_DT_F16: {
        const uint16_t *s = (const uint16_t *)w + off;
        for (int i = 0; i < n; i++)
            dst[i] = moe_f16_to_f32_inline(s[i]);
        break;
    }
    default:
        MOE_KASSERT(!"moe_matmul: weight dtype must be F32, BF16 or F16 (Q8/Q4 not implemented)");
    }
}

float moe_dot_f32_scalar(const float *a, const float *b, int n)
{
    /* Four interleaved partial sums (i mod 4), combined pairwise: the same association the
     * vector paths use per lane, and a smaller error than one running sum. */
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

void moe_matmul_rows_scalar(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                            int n_in, int n_out, int r0, int r1)
{
    float wbuf[SCALAR_KC];
    for (int r = r0; r < r1; r++) {
        for (int t = 0; t < n_tok; t++)
            y[(size_t)t * n_out + r] = 0.f;
        for (int k0 = 0; k0 < n_in; k0 += SCALAR_KC) {
            int kc = n_in - k0 < SCALAR_KC ? n_in - k0 : SCALAR_KC;
            convert_chunk(wbuf, w, wt, (size_t)r * n_in + k0, kc);
            for (int t = 0; t < n_tok; t++)
                y[(size_t)t * n_out + r] += moe_dot_f32_scalar(x + (size_t)t * n_in + k0, wbuf, kc);
        }
    }
}

static void check_dtype(moe_dtype wt)
{
    MOE_KASSERT(wt == MOE_DT_F32 || wt == MOE_DT_BF16 || wt == MOE_DT_F16);
}

void moe_matmul_serial(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                       int n_out)
{
    check_dtype(wt);
    if (n_tok <= 0 || n_out <= 0)
        return;
    moe_kernels_ops()->matmul_rows(y, x, w, wt, n_tok, n_in, n_out, 0, n_out);
}

typedef struct {
    const moe_kernel_ops *ops;
    float *y;
    const float *x;
    const void *w;
    moe_dtype wt;
    int n_tok, n_in, n_out;
    int rows_per_task;
} matmul_job;

static void matmul_task(void *arg, int task, int thread)
{
    (void)thread;
    const matmul_job *j = arg;
    int r0 = task * j->rows_per_task;
    int r1 = r0 + j->rows_per_task < j->n_out ? r0 + j->rows_per_task : j->n_out;
    j->ops->matmul_rows(j->y, j->x, j->w, j->wt, j->n_tok, j->n_in, j->n_out, r0, r1);
}

void moe_matmul(moe_threadpool_t *pool, float *y, const float *x, const void *w, moe_dtype wt,
                int n_tok, int n_in, int n_out)
{
    check_dtype(wt);
    if (n_tok <= 0 || n_out <= 0)
        return;
    const moe_kernel_ops *ops = moe_kernels_ops();
    int nt = moe_threadpool_size(pool);
    if (nt <= 1 || n_out <= ops->row_block) {
        ops->matmul_rows(y, x, w, wt, n_tok, n_in, n_out, 0, n_out);
        return;
    }
    /* About 4 tasks per thread so a slow thread (a busy core) is balanced by the others, in
     * whole row blocks so the kernel's register tile is always full except at the very end. */
    int rb = ops->row_block;
    int blocks = (n_out + rb - 1) / rb;
    int target = nt * 4;
    int blocks_per_task = (blocks + target - 1) / target;
    if (blocks_per_task < 1)
        blocks_per_task = 1;
    matmul_job j = {ops, y, x, w, wt, n_tok, n_in, n_out, blocks_per_task * rb};
    int n_tasks = (n_out + j.rows_per_task - 1) / j.rows_per_task;
    moe_threadpool_run(pool, matmul_task, &j, n_tasks);
}
