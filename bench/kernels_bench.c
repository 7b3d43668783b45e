/* Kernel throughput against the machine's own read bandwidth, measured in the same run:
 * matvec (n_tok = 1, memory bound) in GB/s of weights, matmul (n_tok > 1) in GFLOP/s, and the
 * prefill shapes against BLAS sgemm (OpenBLAS, BLIS: loaded with dlopen when installed). */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/kernels.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * 0x1p-24) * 2.f - 1.f;
}

/* ---- STREAM-like read: sum a buffer with 8 independent 8-lane accumulators ---- */
typedef struct {
    const float *buf;
    size_t n;
    int n_tasks;
    float partial[64];
} read_job;

#if defined(__x86_64__)
#include <immintrin.h>
/* The buffer is read as 8 equal segments walked side by side: 8 concurrent sequential streams,
 * the access shape of the matvec (8 weight rows at once). A single stream measures less on this
 * VM (the prefetcher keeps fewer lines in flight), which would flatter the kernels. */
__attribute__((target("avx2,fma"))) static float sum_avx2(const float *p, size_t n)
{
    size_t seg = n / 8 / 8 * 8;
    __m256 a[8];
    for (int i = 0; i < 8; i++)
        a[i] = _mm256_setzero_ps();
    for (size_t i = 0; i < seg; i += 8)
        for (int j = 0; j < 8; j++)
            a[j] = _mm256_add_ps(a[j], _mm256_loadu_ps(p + (size_t)j * seg + i));
    for (int j = 1; j < 8; j++)
        a[0] = _mm256_add_ps(a[0], a[j]);
    float t[8], s = 0;
    _mm256_storeu_ps(t, a[0]);
    for (int j = 0; j < 8; j++)
        s += t[j];
    for (size_t i = 8 * seg; i < n; i++)
        s += p[i];
    return s;
}
#endif

static float sum_plain(const float *p, size_t n)
{
    float s[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++)
            s[j] += p[i + j];
    for (; i < n; i++)
        s[0] += p[i];
    float t = 0;
    for (int j = 0; j < 16; j++)
        t += s[j];
    return t;
}

static int have_avx2;

static void read_task(void *arg, int task, int thread)
{
    (void)thread;
    read_job *j = arg;
    size_t per = (j->n + (size_t)j->n_tasks - 1) / (size_t)j->n_tasks;
    size_t a = per * (size_t)task, b = a + per < j->n ? a + per : j->n;
#if defined(__x86_64__)
    if (have_avx2) {
        j->partial[task] = sum_avx2(j->buf + a, b - a);
        return;
    }
#endif
    j->partial[task] = sum_plain(j->buf + a, b - a);
}

/* Best-of-reps read bandwidth in GB/s over `bytes`. */
static double read_bw(moe_threadpool_t *pool, const float *buf, size_t bytes, int reps)
{
    read_job j = {buf, bytes / sizeof(float), moe_threadpool_size(pool), {0}};
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        moe_threadpool_run(pool, read_task, &j, j.n_tasks);
        double dt = now_s() - t0;
        best = dt < best ? dt : best;
    }
    volatile float sink = j.partial[0];
    (void)sink;
    return (double)bytes / best / 1e9;
}

static double time_matmul(moe_threadpool_t *pool, float *y, const float *x, const void *w,
                          moe_dtype dt, int n_tok, int n_in, int n_out, int reps)
{
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        moe_matmul(pool, y, x, w, dt, n_tok, n_in, n_out);
        double d = now_s() - t0;
        best = d < best ? d : best;
    }
    return best;
}

/* Prefill GEMM shapes (n_out, n_in): the `small` preset (d 768, experts 384, kv 4 x 64) and
 * OLMoE-1B-7B (d 2048, experts 1024, attention 2048 x 2048). */
static const struct {
    const char *what;
    int n_out, n_in;
} gemm_shapes[] = {{"small attn q/o", 768, 768},       {"small attn k/v", 256, 768},
                   {"small expert gate/up", 384, 768}, {"small expert down", 768, 384},
                   {"olmoe attn", 2048, 2048},         {"olmoe expert gate/up", 1024, 2048},
                   {"olmoe expert down", 2048, 1024}};

/* ---- prefill shapes: our bf16 matmul against a BLAS sgemm on f32 weights ----
 * BLAS has no bf16 GEMM, so its path converts the weight matrix to f32 first (on the pool's
 * threads) and that time is counted; "sgemm alone" is what it would cost with f32 weights kept
 * in memory (twice the bytes of the model). */
typedef void (*cblas_sgemm_fn)(int order, int ta, int tb, int m, int n, int k, float alpha,
                               const float *a, int lda, const float *b, int ldb, float beta,
                               float *c, int ldc);
typedef void (*set_threads_fn)(int n);

typedef struct {
    const char *name;
    const char *const *libs;
    const char *set_threads;
    cblas_sgemm_fn sgemm;
    set_threads_fn threads;
} blas_lib;

static const char *const openblas_libs[] = {"libopenblas.so.0", "libopenblas.so", NULL};
static const char *const blis_libs[] = {"libblis.so.4", "libblis.so", NULL};

static void blas_open(blas_lib *b)
{
    for (int i = 0; b->libs[i] && !b->sgemm; i++) {
        void *h = dlopen(b->libs[i], RTLD_NOW | RTLD_LOCAL);
        if (!h)
            continue;
        void *f = dlsym(h, "cblas_sgemm"), *t = dlsym(h, b->set_threads);
        memcpy(&b->sgemm, &f, sizeof f); /* object pointer to function pointer, as POSIX allows */
        memcpy(&b->threads, &t, sizeof t);
    }
}

typedef struct {
    float *dst;
    const uint16_t *src;
    int rows, cols, n_tasks;
} convert_job;

static void convert_task(void *arg, int task, int thread)
{
    (void)thread;
    convert_job *j = arg;
    int per = (j->rows + j->n_tasks - 1) / j->n_tasks;
    int r0 = task * per, r1 = r0 + per < j->rows ? r0 + per : j->rows;
    if (r0 < r1)
        moe_convert_to_f32(j->dst + (size_t)r0 * j->cols, j->src + (size_t)r0 * j->cols,
                           MOE_DT_BF16, (size_t)(r1 - r0) * j->cols);
}

static void prefill_vs_blas(int max_threads, int quick)
{
    blas_lib libs[2] = {{"openblas", openblas_libs, "openblas_set_num_threads", NULL, NULL},
                        {"blis", blis_libs, "bli_thread_set_num_threads", NULL, NULL}};
    for (int i = 0; i < 2; i++) {
        blas_open(&libs[i]);
        printf("%s: %s\n", libs[i].name, libs[i].sgemm ? "loaded" : "not installed (skipped)");
    }
    static const int toks[] = {64, 128, 256, 512};
    size_t max_w = (size_t)2048 * 2048, max_x = (size_t)512 * 2048;
    uint16_t *w = malloc(max_w * sizeof *w);
    float *wf = malloc(max_w * sizeof *wf), *x = malloc(max_x * sizeof *x);
    float *y0 = malloc(max_x * sizeof *y0), *y1 = malloc(max_x * sizeof *y1);
    if (!w || !wf || !x || !y0 || !y1) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < max_w; i++)
        w[i] = moe_f32_to_bf16(frand() * 0.05f);
    for (size_t i = 0; i < max_x; i++)
        x[i] = frand();
    int reps = quick ? 2 : 5;
    for (int nt = 1; nt <= max_threads; nt++) {
        moe_threadpool_t *pool = moe_threadpool_create(nt);
        for (int i = 0; i < 2; i++)
            if (libs[i].threads)
                libs[i].threads(nt);
        printf("\n== prefill, %d thread(s): ms (GFLOP/s); BLAS = convert bf16->f32 + sgemm ==\n",
               nt);
        for (size_t s = 0; s < sizeof gemm_shapes / sizeof *gemm_shapes; s++) {
            int n_out = gemm_shapes[s].n_out, n_in = gemm_shapes[s].n_in;
            for (size_t k = 0; k < sizeof toks / sizeof *toks; k++) {
                int n_tok = toks[k];
                double flop = 2.0 * n_tok * n_in * n_out;
                double t_ours = 1e30, t_conv = 1e30, t_gemm[2] = {1e30, 1e30};
                for (int r = 0; r < reps; r++) { /* interleaved: the same quiet moments */
                    double t0 = now_s();
                    moe_matmul(pool, y0, x, w, MOE_DT_BF16, n_tok, n_in, n_out);
                    double t1 = now_s();
                    convert_job cj = {wf, w, n_out, n_in, 4 * nt};
                    moe_threadpool_run(pool, convert_task, &cj, cj.n_tasks);
                    double t2 = now_s();
                    t_ours = fmin(t_ours, t1 - t0);
                    t_conv = fmin(t_conv, t2 - t1);
                    for (int i = 0; i < 2; i++) {
                        if (!libs[i].sgemm)
                            continue;
                        double t3 = now_s();
                        /* y (n_tok, n_out) = x (n_tok, n_in) * W^T, W (n_out, n_in) row-major */
                        libs[i].sgemm(101, 111, 112, n_tok, n_out, n_in, 1.0f, x, n_in, wf, n_in,
                                      0.0f, y1, n_out);
                        t_gemm[i] = fmin(t_gemm[i], now_s() - t3);
                    }
                }
                printf("%-21s %4dx%-4d n_tok=%-3d ours %7.3f (%5.1f)", gemm_shapes[s].what, n_out, n_in,
                       n_tok, t_ours * 1e3, flop / t_ours / 1e9);
                const char *best = "ours";
                double t_best = t_ours;
                for (int i = 0; i < 2; i++) {
                    if (!libs[i].sgemm)
                        continue;
                    double t = t_conv + t_gemm[i];
                    printf(" | %s %7.3f (%5.1f) [sgemm %7.3f]", libs[i].name, t * 1e3,
                           flop / t / 1e9, t_gemm[i] * 1e3);
                    if (t < t_best) {
                        t_best = t;
                        best = libs[i].name;
                    }
                }
                /* Sanity: the last BLAS result agrees with ours (both f32 accumulation). */
                double md = 0, mm = 1e-30;
                for (size_t i = 0; i < (size_t)n_tok * n_out; i++) {
                    md = fmax(md, fabs((double)y0[i] - (double)y1[i]));
                    mm = fmax(mm, fabs((double)y0[i]));
                }
                printf(" | convert %6.3f | best %s%s\n", t_conv * 1e3, best,
                       libs[0].sgemm || libs[1].sgemm ? (md / mm < 1e-5 ? "" : " (RESULTS DIFFER)")
                                                      : "");
            }
        }
        moe_threadpool_free(pool);
    }
    free(w);
    free(wf);
    free(x);
    free(y0);
    free(y1);
}

/* ---- prefill shapes over bf16 / Q8 / Q4 weights: our moe_matmul only, GFLOP/s ----
 * Q8/Q4 prefill runs int8 block products (the only Q8/Q4 path since batch invariance). */
static void qprefill(int max_threads)
{
    static const int toks[] = {64, 512};
    static const moe_dtype dts[] = {MOE_DT_BF16, MOE_DT_Q8, MOE_DT_Q4};
    size_t max_w = (size_t)2048 * 2048, max_x = (size_t)512 * 2048;
    float *wf = malloc(max_w * sizeof *wf), *x = malloc(max_x * sizeof *x);
    float *y = malloc(max_x * sizeof *y);
    void *wd[3] = {malloc(max_w * 2), malloc(max_w / MOE_QK * sizeof(moe_block_q8)),
                   malloc(max_w / MOE_QK * sizeof(moe_block_q4))};
    if (!wf || !x || !y || !wd[0] || !wd[1] || !wd[2]) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < max_w; i++)
        wf[i] = frand() * 0.05f;
    for (size_t i = 0; i < max_x; i++)
        x[i] = frand();
    for (int nt = 1; nt <= max_threads; nt++) {
        moe_threadpool_t *pool = moe_threadpool_create(nt);
        printf("\n== prefill shapes, %d thread(s), q8/q4 int8: ms (GFLOP/s), best of 5 ==\n", nt);
        for (size_t s = 0; s < sizeof gemm_shapes / sizeof *gemm_shapes; s++) {
            int n_out = gemm_shapes[s].n_out, n_in = gemm_shapes[s].n_in;
            size_t n = (size_t)n_out * n_in;
            for (size_t i = 0; i < n; i++)
                ((uint16_t *)wd[0])[i] = moe_f32_to_bf16(wf[i]);
            moe_quantize(wd[1], MOE_DT_Q8, wf, MOE_DT_F32, n);
            moe_quantize(wd[2], MOE_DT_Q4, wf, MOE_DT_F32, n);
            for (size_t k = 0; k < sizeof toks / sizeof *toks; k++) {
                int n_tok = toks[k];
                double flop = 2.0 * n_tok * n_in * n_out, best[3] = {1e30, 1e30, 1e30};
                for (int r = 0; r < 5; r++) /* interleaved: the same quiet moments */
                    for (int d = 0; d < 3; d++)
                        best[d] = fmin(best[d], time_matmul(pool, y, x, wd[d], dts[d], n_tok, n_in,
                                                            n_out, 1));
                printf("%-21s %4dx%-4d n_tok=%-3d", gemm_shapes[s].what, n_out, n_in, n_tok);
                for (int d = 0; d < 3; d++)
                    printf(" | %s %7.3f (%5.1f)", moe_dtype_name(dts[d]), best[d] * 1e3,
                           flop / best[d] / 1e9);
                printf("\n");
            }
        }
        moe_threadpool_free(pool);
    }
    free(wf);
    free(x);
    free(y);
    for (int d = 0; d < 3; d++)
        free(wd[d]);
}

/* ---- prefill attention: every query of a 512-token prompt against its causal prefix ----
 * One thread, `small`'s heads by default (4 KV heads x 3 query heads, head_dim 64; `attn HD NKV G`
 * for others, e.g. 128 16 1 as OLMoE), blocks of 16: one moe_attention call per (token, KV head)
 * as the forward pass did, against moe_attention_multi over tiles of 1..16 consecutive tokens.
 * Best of 5, interleaved. */
static void attn_prefill(int HD, int NKV, int G)
{
    enum { T = 512, BS = 16 };
    int nb = T / BS;
    size_t hs = (size_t)BS * HD, bf = hs * NKV, qdim = (size_t)NKV * G * HD;
    float *k = malloc(bf * nb * sizeof *k), *v = malloc(bf * nb * sizeof *v);
    float *q = malloc(qdim * T * sizeof *q), *o = malloc(qdim * T * sizeof *o);
    float *scratch = malloc(T * sizeof *scratch);
    const float **kp = malloc(NKV * nb * sizeof *kp), **vp = malloc(NKV * nb * sizeof *vp);
    if (!k || !v || !q || !o || !scratch || !kp || !vp) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < bf * nb; i++) {
        k[i] = frand();
        v[i] = frand();
    }
    for (size_t i = 0; i < qdim * T; i++)
        q[i] = frand();
    for (int h = 0; h < NKV; h++)
        for (int b = 0; b < nb; b++) {
            kp[h * nb + b] = k + bf * b + hs * h;
            vp[h * nb + b] = v + bf * b + hs * h;
        }
    float scale = 0.125f;
    static const int tiles[] = {1, 4, 8, 16};
    double best[5] = {1e30, 1e30, 1e30, 1e30, 1e30};
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NKV; h++) {
                moe_kv_view kv = {kp + h * nb, vp + h * nb, BS, hs};
                size_t off = (size_t)t * qdim + (size_t)h * G * HD;
                moe_attention(o + off, q + off, &kv, t + 1, G, 1, HD, scale, scratch);
            }
        best[0] = fmin(best[0], now_s() - t0);
        for (int m = 0; m < 4; m++) {
            t0 = now_s();
            for (int t = 0; t < T; t += tiles[m])
                for (int h = 0; h < NKV; h++) {
                    moe_kv_view kv = {kp + h * nb, vp + h * nb, BS, hs};
                    size_t off = (size_t)t * qdim + (size_t)h * G * HD;
                    int n = T - t < tiles[m] ? T - t : tiles[m];
                    moe_attention_multi(o + off, qdim, q + off, qdim, &kv, n, t + 1, G, 1, HD,
                                        scale);
                }
            best[m + 1] = fmin(best[m + 1], now_s() - t0);
        }
    }
    double flop = 4.0 * HD * NKV * G * (double)T * (T + 1) / 2;
    printf("attention prefill, %d tokens, %d kv x %d heads, head_dim %d, 1 thread: "
           "moe_attention per token %.3f ms (%.1f GFLOP/s)",
           T, NKV, G, HD, best[0] * 1e3, flop / best[0] / 1e9);
    for (int m = 0; m < 4; m++)
        printf(" | multi x%d %.3f ms (%.1f)", tiles[m], best[m + 1] * 1e3, flop / best[m + 1] / 1e9);
    printf("\n");
    free(k);
    free(v);
    free(q);
    free(o);
    free(scratch);
    free(kp);
    free(vp);
}

/* ---- the grouped expert product of a batched decode step ----
 * E experts of ROWS x COLS (default 64 of the OLMoE gate/up shape, 1024 x 2048), every one touched
 * with n_tok tokens (the tokens a step routes to it), all run in moe_matmul_batch pool runs as the
 * MoE layer runs them. Their weights (default bf16 512 MiB, Q8 272, Q4 144) are far beyond the
 * caches, so each step reads them from DRAM: the time against a read of the same bytes,
 * interleaved round by round (best of each), says how many times the weights are streamed (about
 * once whatever n_tok while the step stays memory bound) and how far the product is from its
 * memory roofline. */
typedef struct {
    int experts, rows, cols;
    int dtypes; /* bit 0 bf16, 1 q8, 2 q4 */
    int toks[16], n_toks;
} experts_args;

static void experts_bench(int n_threads, const experts_args *a)
{
    enum { MAXT = 64 };
    const int E = a->experts, ROWS = a->rows, COLS = a->cols;
    const size_t n = (size_t)ROWS * COLS;
    moe_threadpool_t *pool = moe_threadpool_create(n_threads);
    float *wf = malloc(n * sizeof(float));
    float *x = malloc((size_t)E * MAXT * COLS * sizeof(float));
    float *y = malloc((size_t)2 * E * MAXT * ROWS * sizeof(float));
    void *w = malloc((size_t)2 * E * n * sizeof(uint16_t)); /* the largest: bf16 */
    if (!pool || !wf || !x || !y || !w) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        wf[i] = frand() * 0.05f;
    for (size_t i = 0; i < (size_t)E * MAXT * COLS; i++)
        x[i] = frand();
    printf("experts: %d x 2 matrices %dx%d, %d threads, ISA %s, best of 5 rounds (each round: a "
           "read of the same bytes, then the product)\n",
           E, ROWS, COLS, n_threads, moe_isa_name(moe_kernels_isa()));
    static const moe_dtype dts[] = {MOE_DT_BF16, MOE_DT_Q8, MOE_DT_Q4};
    moe_matmul_desc *ds = malloc((size_t)2 * E * sizeof *ds);
    if (!ds) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (int d = 0; d < 3; d++) {
        if (!(a->dtypes & (1 << d)))
            continue;
        moe_dtype dt = dts[d];
        size_t mb = moe_dtype_row_bytes(dt, COLS) * ROWS, bytes = 2 * E * mb;
        for (int m = 0; m < 2 * E; m++) {
            char *dst = (char *)w + (size_t)m * mb;
            if (dt == MOE_DT_BF16)
                for (size_t i = 0; i < n; i++)
                    ((uint16_t *)(void *)dst)[i] = moe_f32_to_bf16(wf[i] * (1.0f + 0.01f * m));
            else
                moe_quantize(dst, dt, wf, MOE_DT_F32, n);
        }
        for (int k = 0; k < a->n_toks; k++) {
            int nt = a->toks[k];
            for (int e = 0; e < E; e++)
                for (int g = 0; g < 2; g++)
                    ds[2 * e + g] = (moe_matmul_desc){
                        y + ((size_t)(2 * e + g) * MAXT) * ROWS, x + (size_t)e * MAXT * COLS,
                        (const char *)w + (size_t)(2 * e + g) * mb, dt, nt, COLS, ROWS};
            double best = 1e30, best_bw = 0;
            for (int r = 0; r < 5; r++) {
                double bw = read_bw(pool, w, bytes, 1);
                best_bw = bw > best_bw ? bw : best_bw;
                double t0 = now_s();
                moe_matmul_batch(pool, ds, 2 * E);
                double t = now_s() - t0;
                best = t < best ? t : best;
            }
            double gbs = (double)bytes / best / 1e9;
            printf("experts %-4s n_tok=%-2d: %8.2f ms  %6.1f GB/s of weights | read %5.1f GB/s | "
                   "%3.0f%% of the read | %6.1f GFLOP/s\n",
                   moe_dtype_name(dt), nt, best * 1e3, gbs, best_bw, 100.0 * gbs / best_bw,
                   2.0 * nt * (double)n * 2 * E / best / 1e9);
        }
    }
    moe_threadpool_free(pool);
    free(ds);
    free(wf);
    free(x);
    free(y);
    free(w);
}

/* experts [E ROWS COLS [DTYPES [TOKENS]]]: DTYPES a comma list of bf16, q8, q4; TOKENS of n_tok
 * (1-64). Returns 0, or -1 with a message for a bad argument. */
static int experts_parse(experts_args *a, int argc, char **argv)
{
    *a = (experts_args){64, 1024, 2048, 7, {1, 2, 4, 8, 16, 32, 40, 47}, 8};
    if (argc > 3) {
        if (argc < 6) {
            fprintf(stderr, "kernels_bench: experts [E ROWS COLS [DTYPES [TOKENS]]]\n");
            return -1;
        }
        a->experts = atoi(argv[3]), a->rows = atoi(argv[4]), a->cols = atoi(argv[5]);
        if (a->experts < 1 || a->experts > 4096 || a->rows < 1 || a->cols < MOE_QK ||
            a->cols % MOE_QK) {
            fprintf(stderr, "kernels_bench: experts E (1-4096) ROWS (>= 1) COLS (a multiple of "
                            "%d)\n", MOE_QK);
            return -1;
        }
    }
    if (argc > 6) {
        a->dtypes = 0;
        char *list = strdup(argv[6]);
        for (char *t = strtok(list, ","); t; t = strtok(NULL, ","))
            a->dtypes |= strcmp(t, "bf16") == 0 ? 1 : strcmp(t, "q8") == 0 ? 2
                         : strcmp(t, "q4") == 0 ? 4 : 8;
        free(list);
        if (a->dtypes == 0 || a->dtypes & 8) {
            fprintf(stderr, "kernels_bench: experts DTYPES: a comma list of bf16, q8, q4\n");
            return -1;
        }
    }
    if (argc > 7) {
        a->n_toks = 0;
        char *list = strdup(argv[7]);
        for (char *t = strtok(list, ","); t && a->n_toks < 16; t = strtok(NULL, ","))
            a->toks[a->n_toks++] = atoi(t);
        free(list);
        for (int k = 0; k < a->n_toks; k++)
            if (a->toks[k] < 1 || a->toks[k] > 64) {
                fprintf(stderr, "kernels_bench: experts TOKENS: a comma list of 1-64\n");
                return -1;
            }
    }
    return 0;
}

int main(int argc, char **argv)
{
    int max_threads = argc > 1 ? atoi(argv[1]) : 2;
    /* argv[2]: quick (fewer reps, n_tok <= 64, no prefill), or one section only: matvec,
     * batched, prefill, qprefill (bf16/Q8/Q4 prefill shapes, ours only), attn (prefill
     * attention, per token against multi-query tiles), experts [E ROWS COLS [DTYPES [TOKENS]]]
     * (the grouped expert product of a batched decode step, against a read of its bytes). */
    const char *mode = argc > 2 ? argv[2] : "";
    int quick = strcmp(mode, "quick") == 0;
    if (strcmp(mode, "attn") == 0) {
        int hd = argc > 3 ? atoi(argv[3]) : 64, nkv = argc > 4 ? atoi(argv[4]) : 4,
            g = argc > 5 ? atoi(argv[5]) : 3;
        if (hd < 1 || hd > 512 || nkv < 1 || nkv > 64 || g < 1 || g > 64) {
            fprintf(stderr, "kernels_bench: attn HEAD_DIM (1-512) N_KV (1-64) GROUP (1-64)\n");
            return 2;
        }
        attn_prefill(hd, nkv, g);
        return 0;
    }
    if (strcmp(mode, "qprefill") == 0) {
        qprefill(max_threads);
        return 0;
    }
    if (strcmp(mode, "experts") == 0) {
#if defined(__x86_64__)
        __builtin_cpu_init();
        have_avx2 = __builtin_cpu_supports("avx2");
#endif
        experts_args ea;
        if (experts_parse(&ea, argc, argv) != 0)
            return 2;
        experts_bench(max_threads, &ea);
        return 0;
    }
    int prefill = !*mode || strcmp(mode, "prefill") == 0;
    int matvec = !*mode || quick || strcmp(mode, "matvec") == 0;
    int batched = !*mode || quick || strcmp(mode, "batched") == 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    moe_isa best_isa = moe_kernels_isa();
    printf("kernels_bench: best ISA %s, up to %d threads\n", moe_isa_name(best_isa), max_threads);

    /* Matrices: 4096x4096 (bf16 32 MB: about this machine's L3) and 8192x8192 (bf16 128 MB:
     * far beyond it, the honest memory-bound case). */
    static const int shapes[][2] = {{4096, 4096}, {8192, 8192}};
    size_t max_elems = (size_t)8192 * 8192;
    float *wf = malloc(max_elems * sizeof(float));
    uint16_t *wh = malloc(max_elems * sizeof(uint16_t));
    void *wqz = malloc(max_elems / MOE_QK * sizeof(moe_block_q8));
    float *x = malloc((size_t)256 * 8192 * sizeof(float));
    float *y = malloc((size_t)256 * 8192 * sizeof(float));
    if (!wf || !wh || !wqz || !x || !y) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < max_elems; i++)
        wf[i] = frand() * 0.05f;
    for (size_t i = 0; i < (size_t)256 * 8192; i++)
        x[i] = frand();

    for (int nt = 1; nt <= max_threads; nt++) {
        moe_threadpool_t *pool = moe_threadpool_create(nt);
        printf("\n== %d thread(s) ==\n", nt);
        for (int s = 0; matvec && s < 2; s++) {
            int n_out = shapes[s][0], n_in = shapes[s][1];
            size_t n = (size_t)n_out * n_in;
            for (int isa = MOE_ISA_SCALAR; isa <= (int)best_isa; isa++) {
                if (isa == MOE_ISA_SCALAR && s == 1)
                    continue; /* slow, and says nothing the 4096 case does not */
                moe_kernels_force_isa((moe_isa)isa);
                static const moe_dtype dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16, MOE_DT_Q8,
                                                MOE_DT_Q4};
                for (int d = 0; d < 5; d++) {
                    moe_dtype dt = dts[d];
                    if (dt == MOE_DT_BF16 || dt == MOE_DT_F16)
                        for (size_t i = 0; i < n; i++)
                            wh[i] =
                                dt == MOE_DT_BF16 ? moe_f32_to_bf16(wf[i]) : moe_f32_to_f16(wf[i]);
                    if (dt == MOE_DT_Q8 || dt == MOE_DT_Q4)
                        moe_quantize(wqz, dt, wf, MOE_DT_F32, n);
                    const void *w = dt == MOE_DT_F32                        ? (const void *)wf
                                    : dt == MOE_DT_BF16 || dt == MOE_DT_F16 ? (const void *)wh
                                                                            : wqz;
                    size_t bytes = moe_dtype_row_bytes(dt, (size_t)n_in) * (size_t)n_out;
                    /* Interleave a read of the same number of bytes with each matvec and keep
                     * the best of each: on a shared machine both see the same quiet moments. */
                    int reps = isa == MOE_ISA_SCALAR ? 2 : (quick ? 4 : 12);
                    double best_mv = 1e30, best_bw = 0;
                    for (int r = 0; r < reps; r++) {
                        double bw = read_bw(pool, (const float *)w, bytes, 1);
                        best_bw = bw > best_bw ? bw : best_bw;
                        double t = time_matmul(pool, y, x, w, dt, 1, n_in, n_out, 1);
                        best_mv = t < best_mv ? t : best_mv;
                    }
                    double bw = (double)bytes / best_mv / 1e9;
                    printf("matvec %-6s %-4s %5dx%-5d (%4zu MB): %8.3f ms %6.1f GB/s | read %6.1f "
                           "GB/s | %3.0f%%\n",
                           moe_isa_name((moe_isa)isa), moe_dtype_name(dt), n_out, n_in, bytes >> 20,
                           best_mv * 1e3, bw, best_bw, 100.0 * bw / best_bw);
                }
            }
        }
        /* Batched (prefill-like) matmul on the 4096x4096 bf16 matrix. */
        for (size_t i = 0; i < (size_t)4096 * 4096; i++)
            wh[i] = moe_f32_to_bf16(wf[i]);
        static const int toks[] = {1, 2, 4, 8, 16, 32, 64, 256};
        for (int isa = MOE_ISA_AVX2 <= best_isa ? MOE_ISA_AVX2 : MOE_ISA_SCALAR;
             batched && isa <= (int)best_isa; isa++) {
            moe_kernels_force_isa((moe_isa)isa);
            static const moe_dtype bdts[] = {MOE_DT_BF16, MOE_DT_Q8, MOE_DT_Q4};
            for (int d = 0; d < 3; d++) {
                moe_dtype dt = bdts[d];
                const void *w = dt == MOE_DT_BF16 ? (const void *)wh : wqz;
                if (dt != MOE_DT_BF16)
                    moe_quantize(wqz, dt, wf, MOE_DT_F32, (size_t)4096 * 4096);
                for (size_t k = 0; k < sizeof toks / sizeof *toks; k++) {
                    int n_tok = toks[k];
                    if (quick && n_tok > 64)
                        continue;
                    double t = time_matmul(pool, y, x, w, dt, n_tok, 4096, 4096, 3);
                    printf("matmul %-6s %-4s 4096x4096 n_tok=%-3d: %8.3f ms  %6.1f GFLOP/s  %6.1f "
                           "GB/s of weights\n",
                           moe_isa_name((moe_isa)isa), moe_dtype_name(dt), n_tok, t * 1e3,
                           2.0 * n_tok * 4096.0 * 4096.0 / t / 1e9,
                           (double)moe_dtype_row_bytes(dt, 4096) * 4096 / t / 1e9);
                }
            }
        }
        moe_kernels_force_isa(best_isa);
        moe_threadpool_free(pool);
    }
    if (prefill)
        prefill_vs_blas(max_threads, quick);
    free(wf);
    free(wh);
    free(wqz);
    free(x);
    free(y);
    return 0;
}
