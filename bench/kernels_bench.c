/* Kernel throughput against the machine's own read bandwidth, measured in the same run:
 * matvec (n_tok = 1, memory bound) in GB/s of weights, matmul (n_tok > 1) in GFLOP/s. */
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

int main(int argc, char **argv)
{
    int max_threads = argc > 1 ? atoi(argv[1]) : 2;
    /* argv[2]: quick (fewer reps, n_tok <= 64), or one section only: matvec, batched. */
    const char *mode = argc > 2 ? argv[2] : "";
    int quick = strcmp(mode, "quick") == 0;
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
                    const void *w = dt == MOE_DT_F32                          ? (const void *)wf
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
    free(wf);
    free(wh);
    free(wqz);
    free(x);
    free(y);
    return 0;
}
