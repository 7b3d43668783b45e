/* moe_matmul and moe_matmul_batch: the scalar reference kernel, the row split across the thread
 * pool, and the quantized path's activation scratch. */
#include <pthread.h>

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
    case MOE_DT_Q8:
    case MOE_DT_Q4:
        /* off and n are multiples of MOE_QK: n_in is, and so is SCALAR_KC. */
        moe_dequantize(dst, (const char *)w + moe_dtype_row_bytes(wt, off), wt, (size_t)n);
        break;
    default:
        MOE_KASSERT(!"moe_matmul: unknown weight dtype");
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

/* Q8/Q4 matmuls always quantize x and run the int8 block products, for every n_tok: a token's
 * outputs must not depend on how many tokens share the call (batch invariance, docs/kernels.md).
 * There used to be an f32 path for n_tok >= 48 (weights dequantized into the AVX2 panel), faster
 * for prefill on AVX2 without VNNI but with other bits than decode. */
static int is_quant(moe_dtype wt)
{
    return wt == MOE_DT_Q8 || wt == MOE_DT_Q4;
}

static void check_args(moe_dtype wt, int n_in)
{
    MOE_KASSERT(wt == MOE_DT_F32 || wt == MOE_DT_BF16 || wt == MOE_DT_F16 || is_quant(wt));
    MOE_KASSERT(!is_quant(wt) || n_in % MOE_QK == 0);
}

/* ---- row split ---- */

typedef struct {
    const moe_kernel_ops *ops;
    float *y;
    const float *x;
    const int8_t *xq; /* quantized path: x as int8 blocks and their scales */
    const float *xd;
    const void *w;
    moe_dtype wt;
    int n_tok, n_in, n_out;
    int rows_per_task;
} matmul_job;

static void run_rows(const matmul_job *j, int r0, int r1)
{
    if (j->xq)
        j->ops->matmul_rows_q(j->y, j->xq, j->xd, j->w, j->wt, j->n_tok, j->n_in, j->n_out, r0, r1);
    else
        j->ops->matmul_rows(j->y, j->x, j->w, j->wt, j->n_tok, j->n_in, j->n_out, r0, r1);
}

static void matmul_task(void *arg, int task, int thread)
{
    (void)thread;
    const matmul_job *j = arg;
    int r0 = task * j->rows_per_task;
    int r1 = r0 + j->rows_per_task < j->n_out ? r0 + j->rows_per_task : j->n_out;
    run_rows(j, r0, r1);
}

static void split_rows(moe_threadpool_t *pool, matmul_job *j)
{
    int nt = moe_threadpool_size(pool);
    if (nt <= 1 || j->n_out <= j->ops->row_block) {
        run_rows(j, 0, j->n_out);
        return;
    }
    /* About 4 tasks per thread so a slow thread (a busy core) is balanced by the others, in
     * whole row blocks so the kernel's register tile is always full except at the very end. */
    int rb = j->ops->row_block;
    int blocks = (j->n_out + rb - 1) / rb;
    int target = nt * 4;
    int blocks_per_task = (blocks + target - 1) / target;
    if (blocks_per_task < 1)
        blocks_per_task = 1;
    j->rows_per_task = blocks_per_task * rb;
    int n_tasks = (j->n_out + j->rows_per_task - 1) / j->rows_per_task;
    moe_threadpool_run(pool, matmul_task, j, n_tasks);
}

/* ---- per-thread scratch buffers ----
 * One buffer of each kind per thread, grown only when a call needs more than any before on that
 * thread, freed by a pthread key destructor when the thread exits. */
typedef struct {
    void *p;
    size_t cap;
} thread_buf;

enum { BUF_QX, BUF_ROWS, BUF_KINDS };
static pthread_key_t buf_keys[BUF_KINDS];
static int buf_keys_ok[BUF_KINDS];
static pthread_once_t buf_keys_once = PTHREAD_ONCE_INIT;
static int test_no_scratch;

static void buf_keys_init(void)
{
    for (int k = 0; k < BUF_KINDS; k++)
        buf_keys_ok[k] = pthread_key_create(&buf_keys[k], free) == 0;
}

static void *thread_buf_get(thread_buf *b, int kind, size_t need)
{
    if (test_no_scratch)
        return NULL;
    if (need <= b->cap)
        return b->p;
    size_t cap = (need + 4095) & ~(size_t)4095;
    void *p = aligned_alloc(64, cap);
    if (!p)
        return NULL;
    pthread_once(&buf_keys_once, buf_keys_init);
    free(b->p);
    b->p = p;
    b->cap = cap;
    if (buf_keys_ok[kind])
        pthread_setspecific(buf_keys[kind], p);
    return p;
}

void moe_kernels_test_no_scratch(int on)
{
    test_no_scratch = on;
}

int moe_kernels_test_no_scratch_on(void)
{
    return test_no_scratch;
}

/* The quantized path's x as int8 blocks: the thread that calls moe_matmul quantizes x into it
 * before the pool reads it. */
static _Thread_local thread_buf qx_buf;

static size_t qx_bytes(int n_tok, int n_in)
{
    /* int8 codes, then one f32 scale per block (n_in % 32 == 0 keeps the scales aligned). */
    return (size_t)n_tok * (size_t)n_in + (size_t)n_tok * (size_t)(n_in / MOE_QK) * sizeof(float);
}

static void *scratch_get(size_t need) { return thread_buf_get(&qx_buf, BUF_QX, need); }

int moe_matmul_reserve(int n_tok, int n_in)
{
    if (n_tok <= 0 || n_in <= 0)
        return 0;
    return scratch_get(qx_bytes(n_tok, (n_in + MOE_QK - 1) / MOE_QK * MOE_QK)) ? 0 : -1;
}

/* Without scratch: one token at a time through a stack buffer. The arithmetic of an output does
 * not depend on how tokens are grouped, so the result is bit-identical. */
#define QX_STACK_IN 32768

static __attribute__((noinline)) void matmul_q_by_token(moe_threadpool_t *pool, matmul_job *j)
{
    _Alignas(64) int8_t q[QX_STACK_IN];
    float d[QX_STACK_IN / MOE_QK];
    MOE_KASSERT(j->n_in <= QX_STACK_IN && "quantized matmul: out of memory for the x scratch");
    matmul_job one = *j;
    one.n_tok = 1;
    one.xq = q;
    one.xd = d;
    for (int t = 0; t < j->n_tok; t++) {
        j->ops->quantize_x(q, d, j->x + (size_t)t * j->n_in, 1, j->n_in);
        one.y = j->y + (size_t)t * j->n_out;
        split_rows(pool, &one);
    }
}

static void matmul_any(moe_threadpool_t *pool, float *y, const float *x, const void *w,
                       moe_dtype wt, int n_tok, int n_in, int n_out)
{
    check_args(wt, n_in);
    if (n_tok <= 0 || n_out <= 0)
        return;
    matmul_job j = {moe_kernels_ops(), y, x, NULL, NULL, w, wt, n_tok, n_in, n_out, n_out};
    if (is_quant(wt)) {
        int8_t *q = scratch_get(qx_bytes(n_tok, n_in));
        if (!q) {
            matmul_q_by_token(pool, &j);
            return;
        }
        float *d = (float *)(q + (size_t)n_tok * n_in);
        j.ops->quantize_x(q, d, x, n_tok, n_in);
        j.xq = q;
        j.xd = d;
    }
    split_rows(pool, &j);
}

void moe_matmul_serial(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                       int n_out)
{
    matmul_any(NULL, y, x, w, wt, n_tok, n_in, n_out);
}

void moe_matmul(moe_threadpool_t *pool, float *y, const float *x, const void *w, moe_dtype wt,
                int n_tok, int n_in, int n_out)
{
    matmul_any(pool, y, x, w, wt, n_tok, n_in, n_out);
}

/* ---- the float rows' per-thread scratch ----
 * For the x layout a float kernel builds once per call or token chunk (AVX2 bf16: x de-interleaved;
 * AVX-512 bf16: x as bf16). Owned by the thread that runs the rows (a pool worker), one rows call
 * at a time. */
static _Thread_local thread_buf rows_buf;

void *moe_rows_scratch(size_t bytes) { return thread_buf_get(&rows_buf, BUF_ROWS, bytes); }

/* ---- several matmuls in one pool run ---- */

typedef struct {
    const moe_kernel_ops *ops;
    const moe_matmul_desc *d;
    int n;
    int rows_per_task;
    const int8_t *xq[MOE_MATMUL_BATCH_MAX]; /* NULL: the f32 path */
    const float *xd[MOE_MATMUL_BATCH_MAX];
    int task_off[MOE_MATMUL_BATCH_MAX + 1]; /* first task of each desc */
} batch_job;

static void batch_task(void *arg, int task, int thread)
{
    (void)thread;
    const batch_job *b = arg;
    int i = 0;
    while (task >= b->task_off[i + 1])
        i++;
    const moe_matmul_desc *d = &b->d[i];
    int r0 = (task - b->task_off[i]) * b->rows_per_task;
    int r1 = r0 + b->rows_per_task < d->n_out ? r0 + b->rows_per_task : d->n_out;
    if (b->xq[i])
        b->ops->matmul_rows_q(d->y, b->xq[i], b->xd[i], d->w, d->wt, d->n_tok, d->n_in, d->n_out,
                              r0, r1);
    else
        b->ops->matmul_rows(d->y, d->x, d->w, d->wt, d->n_tok, d->n_in, d->n_out, r0, r1);
}

static int needs_qx(const moe_matmul_desc *d)
{
    return is_quant(d->wt);
}

/* The desc before i whose x this one can reuse once quantized, or -1. */
static int same_x(const moe_matmul_desc *d, int i)
{
    for (int k = 0; k < i; k++)
        if (needs_qx(&d[k]) && d[k].x == d[i].x && d[k].n_tok == d[i].n_tok &&
            d[k].n_in == d[i].n_in)
            return k;
    return -1;
}

static void batch_run(moe_threadpool_t *pool, const moe_matmul_desc *d, int n)
{
    batch_job *b = &(batch_job){.ops = moe_kernels_ops(), .d = d, .n = n};
    size_t need = 0;
    int blocks = 0, rb = b->ops->row_block;
    for (int i = 0; i < n; i++) {
        check_args(d[i].wt, d[i].n_in);
        if (needs_qx(&d[i]) && d[i].n_out > 0 && same_x(d, i) < 0)
            need += qx_bytes(d[i].n_tok, d[i].n_in);
        if (d[i].n_tok > 0)
            blocks += (d[i].n_out + rb - 1) / rb;
    }
    int8_t *q = need ? scratch_get(need) : NULL;
    if (need && !q) {
        for (int i = 0; i < n; i++)
            matmul_any(pool, d[i].y, d[i].x, d[i].w, d[i].wt, d[i].n_tok, d[i].n_in, d[i].n_out);
        return;
    }
    for (int i = 0; i < n; i++) {
        if (!needs_qx(&d[i]) || d[i].n_out <= 0)
            continue;
        int k = same_x(d, i);
        if (k >= 0) {
            b->xq[i] = b->xq[k];
            b->xd[i] = b->xd[k];
            continue;
        }
        float *xd = (float *)(q + (size_t)d[i].n_tok * d[i].n_in);
        b->ops->quantize_x(q, xd, d[i].x, d[i].n_tok, d[i].n_in);
        b->xq[i] = q;
        b->xd[i] = xd;
        q += qx_bytes(d[i].n_tok, d[i].n_in);
    }
    /* As split_rows: about 4 tasks per thread over all the rows, in whole row blocks. */
    int nt = moe_threadpool_size(pool);
    int target = nt * 4;
    int blocks_per_task = nt <= 1 ? blocks : (blocks + target - 1) / target;
    b->rows_per_task = (blocks_per_task > 0 ? blocks_per_task : 1) * rb;
    b->task_off[0] = 0;
    for (int i = 0; i < n; i++) {
        int tasks = d[i].n_tok > 0 && d[i].n_out > 0
                        ? (d[i].n_out + b->rows_per_task - 1) / b->rows_per_task
                        : 0;
        b->task_off[i + 1] = b->task_off[i] + tasks;
    }
    if (b->task_off[n] > 0)
        moe_threadpool_run(nt > 1 ? pool : NULL, batch_task, b, b->task_off[n]);
}

void moe_matmul_batch(moe_threadpool_t *pool, const moe_matmul_desc *descs, int n)
{
    for (int i = 0; i < n; i += MOE_MATMUL_BATCH_MAX)
        batch_run(pool, descs + i, n - i < MOE_MATMUL_BATCH_MAX ? n - i : MOE_MATMUL_BATCH_MAX);
}
