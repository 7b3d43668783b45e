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

/* ---- per-thread scratch buffers ----
 * One buffer of each kind per thread, grown only when a call needs more than any before on that
 * thread, freed by a pthread key destructor when the thread exits. */
typedef struct {
    void *p;
    size_t cap;
} thread_buf;

enum { BUF_X, BUF_ROWS, BUF_KINDS };
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

/* Every x a call prepares once for its row tasks (below): the thread that calls moe_matmul fills
 * it before the pool reads it. */
static _Thread_local thread_buf x_buf;

static size_t qx_bytes(int n_tok, int n_in)
{
    /* int8 codes, then one f32 scale per block (n_in % 32 == 0 keeps the scales aligned). */
    return (size_t)n_tok * (size_t)n_in + (size_t)n_tok * (size_t)(n_in / MOE_QK) * sizeof(float);
}

static void *scratch_get(size_t need) { return thread_buf_get(&x_buf, BUF_X, need); }

int moe_matmul_reserve(int n_tok, int n_in)
{
    if (n_tok <= 0 || n_in <= 0)
        return 0;
    return scratch_get(qx_bytes(n_tok, (n_in + MOE_QK - 1) / MOE_QK * MOE_QK)) ? 0 : -1;
}

/* ---- the float rows' per-thread scratch ----
 * For the x layout a float kernel builds once per call or token chunk (AVX2 bf16: x de-interleaved;
 * AVX-512 bf16: x as bf16; AMX: B tiles when x was not prepared). Owned by the thread that runs
 * the rows (a pool worker), one rows call at a time. */
static _Thread_local thread_buf rows_buf;

void *moe_rows_scratch(size_t bytes) { return thread_buf_get(&rows_buf, BUF_ROWS, bytes); }

/* ---- the row tasks ----
 * A call (moe_matmul: one desc; moe_matmul_batch: up to MOE_MATMUL_BATCH_MAX) is one pool run of
 * row tasks over all its descs: about 4 tasks per thread, so a slow thread (a busy core) is
 * balanced by the others, in whole row blocks so the kernel's register tile is always full except
 * at the very end. Before it, each distinct x that needs it is prepared once (below). */

typedef struct {
    const moe_kernel_ops *ops;
    const moe_matmul_desc *d;
    int n;
    int rows_per_task;
    int task_off[MOE_MATMUL_BATCH_MAX + 1]; /* first task of each desc */
    int8_t *xq[MOE_MATMUL_BATCH_MAX]; /* Q8/Q4: x as int8 blocks and their scales */
    float *xd[MOE_MATMUL_BATCH_MAX];
    void *xp[MOE_MATMUL_BATCH_MAX]; /* bf16: x in the rows' layout, or NULL */
    int piece_off[MOE_MATMUL_BATCH_MAX + 1]; /* x preparation: first piece of each desc */
} batch_job;

static void plan_tasks(batch_job *b, int threads)
{
    int blocks = 0, rb = b->ops->row_block;
    for (int i = 0; i < b->n; i++)
        if (b->d[i].n_tok > 0)
            blocks += (b->d[i].n_out + rb - 1) / rb;
    int target = threads * 4;
    int blocks_per_task = threads <= 1 ? blocks : (blocks + target - 1) / target;
    b->rows_per_task = (blocks_per_task > 0 ? blocks_per_task : 1) * rb;
    b->task_off[0] = 0;
    for (int i = 0; i < b->n; i++) {
        const moe_matmul_desc *d = &b->d[i];
        int tasks =
            d->n_tok > 0 && d->n_out > 0 ? (d->n_out + b->rows_per_task - 1) / b->rows_per_task : 0;
        b->task_off[i + 1] = b->task_off[i] + tasks;
    }
}

/* The desc whose range [off[i], off[i + 1]) holds task k. */
static int desc_of(const int *off, int k)
{
    int i = 0;
    while (k >= off[i + 1])
        i++;
    return i;
}

static void batch_task(void *arg, int task, int thread)
{
    (void)thread;
    const batch_job *b = arg;
    int i = desc_of(b->task_off, task);
    const moe_matmul_desc *d = &b->d[i];
    int r0 = (task - b->task_off[i]) * b->rows_per_task;
    int r1 = r0 + b->rows_per_task < d->n_out ? r0 + b->rows_per_task : d->n_out;
    if (b->xq[i])
        b->ops->matmul_rows_q(d->y, b->xq[i], b->xd[i], d->w, d->wt, d->n_tok, d->n_in, d->n_out,
                              r0, r1);
    else if (b->xp[i])
        b->ops->matmul_rows_px(d->y, b->xp[i], d->w, d->n_tok, d->n_in, d->n_out, r0, r1);
    else
        b->ops->matmul_rows(d->y, d->x, d->w, d->wt, d->n_tok, d->n_in, d->n_out, r0, r1);
}

static void run_tasks(moe_threadpool_t *pool, batch_job *b)
{
    moe_threadpool_run(pool, batch_task, b, b->task_off[b->n]);
}

/* ---- x prepared once ----
 * Q8/Q4 always quantize x (every n_tok: batch invariance). bf16 on a table with rows_x_prep (AMX)
 * converts x into the rows' layout once where two or more tasks read it (a projection split across
 * threads; gate and up of an expert; q, k and v), instead of in each task: measured, each of a
 * small-model prefill's tasks converting all of x again took 15% of the CPU samples (perf). Descs
 * with the same x, n_tok and n_in share it. Large x (PREP_POOL_MIN_TOK tokens or more in all) is
 * prepared by the pool in pieces of PREP_TOK tokens, each token's bytes the same whichever piece
 * it is in, the rest by the calling thread. */
enum { PREP_NONE, PREP_QUANT, PREP_ROWS };
#define PREP_TOK 64
#define PREP_POOL_MIN_TOK 128
/* Below this many tokens a bf16 x is left to the tasks: the rows' layout pads it to whole tiles
 * (AMX: 8 tokens, 8x the bytes of x at one token), which the other cores read slower than they
 * convert x themselves (decode b=1 4% more CPU time with it prepared). */
#define PREP_ROWS_MIN_TOK 16
_Static_assert(PREP_TOK % MOE_ROWS_X_TOK_ALIGN == 0, "a piece starts on a rows_x_prep boundary");

static int prep_kind(const moe_kernel_ops *ops, const moe_matmul_desc *d)
{
    if (d->n_tok <= 0 || d->n_out <= 0)
        return PREP_NONE;
    if (is_quant(d->wt))
        return PREP_QUANT;
    return d->wt == MOE_DT_BF16 && ops->rows_x_prep && d->n_tok >= PREP_ROWS_MIN_TOK ? PREP_ROWS
                                                                                     : PREP_NONE;
}

static size_t prep_bytes(const batch_job *b, int i, int kind)
{
    const moe_matmul_desc *d = &b->d[i];
    size_t n = kind == PREP_QUANT ? qx_bytes(d->n_tok, d->n_in)
                                  : b->ops->rows_x_bytes(d->n_tok, d->n_in);
    return (n + 63) & ~(size_t)63;
}

static void prep_piece(const batch_job *b, int i, int t0)
{
    const moe_matmul_desc *d = &b->d[i];
    int nt = d->n_tok - t0 < PREP_TOK ? d->n_tok - t0 : PREP_TOK;
    if (b->xq[i]) {
        int nb = d->n_in / MOE_QK;
        b->ops->quantize_x(b->xq[i] + (size_t)t0 * d->n_in, b->xd[i] + (size_t)t0 * nb,
                           d->x + (size_t)t0 * d->n_in, nt, d->n_in);
    } else {
        b->ops->rows_x_prep(b->xp[i], d->x, t0, nt, d->n_in);
    }
}

static void prep_task(void *arg, int piece, int thread)
{
    (void)thread;
    const batch_job *b = arg;
    int i = desc_of(b->piece_off, piece);
    prep_piece(b, i, (piece - b->piece_off[i]) * PREP_TOK);
}

/* Chooses which x to prepare, places them in the calling thread's scratch and fills them. Returns
 * 0, or -1 when a quantized x found no scratch (nothing prepared then); a bf16 x that finds none
 * is left to the tasks, as when it is read by one task only. */
static int prepare_x(moe_threadpool_t *pool, batch_job *b)
{
    const moe_matmul_desc *d = b->d;
    /* owner[i]: the desc whose x desc i reads (itself, or the first with the same x) */
    int kind[MOE_MATMUL_BATCH_MAX], owner[MOE_MATMUL_BATCH_MAX], readers[MOE_MATMUL_BATCH_MAX];
    int quant = 0;
    for (int i = 0; i < b->n; i++) {
        kind[i] = prep_kind(b->ops, &d[i]);
        readers[i] = 0;
        owner[i] = i;
        for (int k = 0; k < i && kind[i] != PREP_NONE; k++)
            if (kind[k] == kind[i] && owner[k] == k && d[k].x == d[i].x &&
                d[k].n_tok == d[i].n_tok && d[k].n_in == d[i].n_in) {
                owner[i] = k;
                break;
            }
        readers[owner[i]] += b->task_off[i + 1] - b->task_off[i];
        quant |= kind[i] == PREP_QUANT;
    }
    size_t need = 0;
    for (int i = 0; i < b->n; i++) {
        if (kind[i] == PREP_ROWS && readers[owner[i]] < 2)
            kind[i] = PREP_NONE;
        if (kind[i] != PREP_NONE && owner[i] == i)
            need += prep_bytes(b, i, kind[i]);
    }
    char *p = need ? scratch_get(need) : NULL;
    if (need && !p) {
        if (quant)
            return -1;
        for (int i = 0; i < b->n; i++) /* only bf16 x: the tasks convert it */
            kind[i] = PREP_NONE;
    }
    int tokens = 0;
    b->piece_off[0] = 0;
    for (int i = 0; i < b->n; i++) {
        int k = owner[i], pieces = 0;
        if (kind[i] != PREP_NONE && k == i) {
            if (kind[i] == PREP_QUANT) {
                b->xq[i] = (int8_t *)p;
                b->xd[i] = (float *)(p + (size_t)d[i].n_tok * d[i].n_in);
            } else {
                b->xp[i] = p;
            }
            p += prep_bytes(b, i, kind[i]);
            pieces = (d[i].n_tok + PREP_TOK - 1) / PREP_TOK;
            tokens += d[i].n_tok;
        } else if (kind[i] != PREP_NONE) {
            b->xq[i] = b->xq[k];
            b->xd[i] = b->xd[k];
            b->xp[i] = b->xp[k];
        }
        b->piece_off[i + 1] = b->piece_off[i] + pieces;
    }
    if (tokens >= PREP_POOL_MIN_TOK)
        moe_threadpool_run(pool, prep_task, b, b->piece_off[b->n]);
    else
        for (int q = 0; q < b->piece_off[b->n]; q++)
            prep_task(b, q, 0);
    return 0;
}

/* Without scratch for a quantized x: one token at a time through a stack buffer. The arithmetic of
 * an output does not depend on how tokens are grouped, so the result is bit-identical. */
#define QX_STACK_IN 32768

static __attribute__((noinline)) void matmul_q_by_token(moe_threadpool_t *pool,
                                                        const moe_matmul_desc *d)
{
    _Alignas(64) int8_t q[QX_STACK_IN];
    float xd[QX_STACK_IN / MOE_QK];
    MOE_KASSERT(d->n_in <= QX_STACK_IN && "quantized matmul: out of memory for the x scratch");
    int threads = moe_threadpool_size(pool);
    for (int t = 0; t < d->n_tok; t++) {
        moe_matmul_desc one = *d;
        one.n_tok = 1;
        one.x = d->x + (size_t)t * d->n_in;
        one.y = d->y + (size_t)t * d->n_out;
        batch_job *b = &(batch_job){.ops = moe_kernels_ops(), .d = &one, .n = 1};
        b->ops->quantize_x(q, xd, one.x, 1, one.n_in);
        b->xq[0] = q;
        b->xd[0] = xd;
        plan_tasks(b, threads);
        run_tasks(pool, b);
    }
}

static void batch_run(moe_threadpool_t *pool, const moe_matmul_desc *d, int n)
{
    batch_job *b = &(batch_job){.ops = moe_kernels_ops(), .d = d, .n = n};
    int threads = moe_threadpool_size(pool);
    for (int i = 0; i < n; i++)
        check_args(d[i].wt, d[i].n_in);
    plan_tasks(b, threads);
    if (prepare_x(pool, b) == 0) {
        run_tasks(pool, b);
        return;
    }
    for (int i = 0; i < n; i++) { /* out of scratch: each desc alone, the quantized by token */
        if (is_quant(d[i].wt) && d[i].n_tok > 0 && d[i].n_out > 0)
            matmul_q_by_token(pool, &d[i]);
        else
            batch_run(pool, &d[i], 1);
    }
}

void moe_matmul_serial(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                       int n_out)
{
    moe_matmul_desc d = {y, x, w, wt, n_tok, n_in, n_out};
    batch_run(NULL, &d, 1);
}

void moe_matmul(moe_threadpool_t *pool, float *y, const float *x, const void *w, moe_dtype wt,
                int n_tok, int n_in, int n_out)
{
    moe_matmul_desc d = {y, x, w, wt, n_tok, n_in, n_out};
    batch_run(pool, &d, 1);
}

void moe_matmul_batch(moe_threadpool_t *pool, const moe_matmul_desc *descs, int n)
{
    for (int i = 0; i < n; i += MOE_MATMUL_BATCH_MAX)
        batch_run(pool, descs + i, n - i < MOE_MATMUL_BATCH_MAX ? n - i : MOE_MATMUL_BATCH_MAX);
}
