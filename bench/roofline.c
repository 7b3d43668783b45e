/* roofline: this machine's two ceilings for the engine benchmark: memory bandwidth (a STREAM-style
 * triad, plus a read-only sweep, with all threads) and the register-only multiply-add peak in f32
 * and on the bf16 path the kernels run. Prints `name=value` lines that bench/run.sh parses.
 *
 *   roofline [--threads N] [--mib M] [--bw-only] [--cpu-time]
 *   (N: 0 = all cores; M: MiB per triad array, default 128; --bw-only: bandwidth only, no peaks;
 *   --cpu-time: each peak as the sum over threads of the rate by that thread's CPU time, so that
 *   time a shared machine's scheduler gives other processes is not counted; default: wall time)
 *
 * bench/run.sh also runs it with --mib set to a third of each model's weight bytes (--bw-only): a
 * model that fits the caches is then held against the bandwidth at its own size, not DRAM's.
 *
 * Why these kernels: decode streams every active weight once per token, so its ceiling is
 * bytes/s; prefill reuses each weight over hundreds of tokens, so its ceiling is multiply-adds/s.
 * The peak loops keep everything in registers (no loads) with enough independent accumulators to
 * cover the FMA latency on every port, so they measure the core, not the caches. */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "kernels/cpu/kernels_internal.h" /* the AMX tile configuration */
#include "kernels/kernels.h"

/* ---- thread team: every thread runs the same body between two barriers ---- */
typedef struct team team;
typedef void (*team_fn)(team *t, int id);
struct team {
    int n;
    pthread_barrier_t bar;
    team_fn fn;
    int reps;
    /* triad / read */
    double *a, *b, *c;
    size_t len;
    double sink[64];
    /* peaks */
    long iters;
    int kind;
};

typedef struct {
    team *t;
    int id;
} team_arg;

static void slice(size_t len, int n, int id, size_t *lo, size_t *hi)
{
    *lo = len * (size_t)id / (size_t)n;
    *hi = len * (size_t)(id + 1) / (size_t)n;
}

static void *team_main(void *p)
{
    team_arg *ta = p;
    ta->t->fn(ta->t, ta->id);
    return NULL;
}

/* Runs fn on n threads (the caller is thread 0) and returns when all have finished. */
static int team_run(team *t, team_fn fn)
{
    pthread_t th[256];
    team_arg args[256];
    t->fn = fn;
    if (t->n > 256)
        t->n = 256;
    if (pthread_barrier_init(&t->bar, NULL, (unsigned)t->n) != 0)
        return -1;
    int started = 1;
    for (int i = 1; i < t->n; i++) {
        args[i] = (team_arg){t, i};
        if (pthread_create(&th[i], NULL, team_main, &args[i]) != 0) {
            fprintf(stderr, "roofline: cannot start thread %d\n", i);
            abort(); /* the barrier would wait forever */
        }
        started++;
    }
    fn(t, 0);
    for (int i = 1; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&t->bar);
    return 0;
}

/* ---- bandwidth ---- */
static double g_best_triad_s, g_best_read_s;
static int g_has_avx2;

/* Sum of a, b and c over [lo, hi), the three streams read side by side (as decode reads a row
 * of gate, up and several rows at once), in independent vector sums so the loop is bound by the
 * loads, not by add latency. */
__attribute__((target("avx2"))) static double read_sum_avx2(const double *a, const double *b, const double *c,
                                                            size_t lo, size_t hi)
{
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0;
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        s0 = _mm256_add_pd(s0, _mm256_loadu_pd(a + i));
        s1 = _mm256_add_pd(s1, _mm256_loadu_pd(a + i + 4));
        s2 = _mm256_add_pd(s2, _mm256_loadu_pd(b + i));
        s3 = _mm256_add_pd(s3, _mm256_loadu_pd(b + i + 4));
        s4 = _mm256_add_pd(s4, _mm256_loadu_pd(c + i));
        s5 = _mm256_add_pd(s5, _mm256_loadu_pd(c + i + 4));
    }
    double out[4];
    __m256d t = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(_mm256_add_pd(s2, s3), _mm256_add_pd(s4, s5)));
    _mm256_storeu_pd(out, t);
    double s = out[0] + out[1] + out[2] + out[3];
    for (; i < hi; i++)
        s += a[i] + b[i] + c[i];
    return s;
}

static double read_sum(const double *a, const double *b, const double *c, size_t lo, size_t hi)
{
    if (g_has_avx2)
        return read_sum_avx2(a, b, c, lo, hi);
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0; /* independent sums: no -ffast-math here */
    size_t i = lo;
    for (; i + 2 <= hi; i += 2) {
        s0 += a[i] + b[i];
        s1 += c[i];
        s2 += a[i + 1] + b[i + 1];
        s3 += c[i + 1];
    }
    for (; i < hi; i++)
        s0 += a[i] + b[i] + c[i];
    return s0 + s1 + s2 + s3;
}

static void bw_body(team *t, int id)
{
    size_t lo, hi;
    slice(t->len, t->n, id, &lo, &hi);
    double *restrict a = t->a, *restrict b = t->b, *restrict c = t->c;
    /* First touch by the thread that will stream the slice (NUMA placement). */
    for (size_t i = lo; i < hi; i++) {
        a[i] = 0.0;
        b[i] = 1.0 + (double)(i & 7);
        c[i] = 2.0;
    }
    const double s = 3.0;
    double acc = 0.0;
    for (int r = 0; r < t->reps; r++) {
        pthread_barrier_wait(&t->bar);
        int64_t t0 = moe_now_ns();
        for (size_t i = lo; i < hi; i++)
            a[i] = b[i] + s * c[i];
        pthread_barrier_wait(&t->bar);
        if (id == 0) {
            double dt = (double)(moe_now_ns() - t0) * 1e-9;
            if (r == 0 || dt < g_best_triad_s)
                g_best_triad_s = dt;
        }
    }
    for (int r = 0; r < t->reps; r++) {
        pthread_barrier_wait(&t->bar);
        int64_t t0 = moe_now_ns();
        acc += read_sum(a, b, c, lo, hi);
        pthread_barrier_wait(&t->bar);
        if (id == 0) {
            double dt = (double)(moe_now_ns() - t0) * 1e-9;
            if (r == 0 || dt < g_best_read_s)
                g_best_read_s = dt;
        }
    }
    t->sink[id % 64] = acc;
}

/* ---- register-only peaks ----
 * Each loop runs NACC independent accumulator chains; 12 chains cover 4-cycle FMA latency on two
 * FMA pipes (8 needed) with room to spare on Zen 3 / Ice Lake / Sapphire Rapids. */
#define NACC 12
#define NACC_I8 4 /* the AVX2 int8 probe's chains, each with its own operand (peak_int8_avx2) */

enum {
    PEAK_F32_AVX2 = 0,
    PEAK_BF16_AVX2,
    PEAK_F32_AVX512,
    PEAK_BF16_DP,
    PEAK_BF16_AMX,
    PEAK_INT8_AVX2,
    PEAK_INT8_VNNI,
    PEAK_F32_SCALAR
};

/* One AMX step: 4 tdpbf16ps of 16 x 16 outputs x 32 bf16 products each (the kernels' block). */
#define AMX_TDP_PER_ITER 4

static double peak_flops_per_iter(int kind)
{
    switch (kind) {
    case PEAK_F32_AVX2: return NACC * 8 * 2;
    case PEAK_BF16_AVX2: return NACC * 8 * 2;
    case PEAK_F32_AVX512: return NACC * 16 * 2;
    case PEAK_BF16_DP: return NACC * 16 * 2 * 2; /* 16 lanes x 2 bf16 pairs x (mul + add) */
    case PEAK_BF16_AMX: return AMX_TDP_PER_ITER * 16 * 16 * 32 * 2;
    case PEAK_INT8_AVX2: return NACC_I8 * 32 * 2; /* 32 u8 x s8 products (mul + add) per chain step */
    case PEAK_INT8_VNNI: return NACC * 64 * 2; /* zmm vpdpbusd: 16 lanes x 4 products */
    default: return NACC * 2;
    }
}

__attribute__((target("avx2,fma"))) static double peak_f32_avx2(long iters)
{
    __m256 acc[NACC];
    const __m256 m = _mm256_set1_ps(0.999f), x = _mm256_set1_ps(1e-3f);
    for (int j = 0; j < NACC; j++)
        acc[j] = _mm256_set1_ps((float)j);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < NACC; j++)
            acc[j] = _mm256_fmadd_ps(acc[j], m, x);
    }
    __m256 s = acc[0];
    for (int j = 1; j < NACC; j++)
        s = _mm256_add_ps(s, acc[j]);
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}

/* The AVX2 kernels' bf16 step (matmul_avx2.c load_w8): zero-extend 8 bf16 to 32 bits, shift into
 * the high half (an exact f32), FMA in f32. One FMA per converted vector: the rate when nothing
 * amortises the conversion. The empty asm makes the compiler believe the packed weights change
 * every iteration, so the conversion stays inside the loop. */
__attribute__((target("avx2,fma"))) static double peak_bf16_avx2(long iters)
{
    __m256 acc[NACC];
    const __m256 x = _mm256_set1_ps(1e-6f);
    __m128i w0 = _mm_set1_epi16(0x3f80), w1 = _mm_set1_epi16(0x3f00), w2 = _mm_set1_epi16(0x3e80),
            w3 = _mm_set1_epi16(0x3e00);
    for (int j = 0; j < NACC; j++)
        acc[j] = _mm256_setzero_ps();
    for (long i = 0; i < iters; i++) {
        __asm__("" : "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3));
        const __m128i w[4] = {w0, w1, w2, w3};
#pragma GCC unroll 12
        for (int j = 0; j < NACC; j++) {
            __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w[j & 3]), 16));
            acc[j] = _mm256_fmadd_ps(wf, x, acc[j]);
        }
    }
    __m256 s = acc[0];
    for (int j = 1; j < NACC; j++)
        s = _mm256_add_ps(s, acc[j]);
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}

__attribute__((target("avx512f"))) static double peak_f32_avx512(long iters)
{
    __m512 acc[NACC];
    const __m512 m = _mm512_set1_ps(0.999f), x = _mm512_set1_ps(1e-3f);
    for (int j = 0; j < NACC; j++)
        acc[j] = _mm512_set1_ps((float)j);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < NACC; j++)
            acc[j] = _mm512_fmadd_ps(acc[j], m, x);
    }
    __m512 s = acc[0];
    for (int j = 1; j < NACC; j++)
        s = _mm512_add_ps(s, acc[j]);
    return _mm512_reduce_add_ps(s);
}

/* AVX-512 BF16: vdpbf16ps multiplies 16 x 2 bf16 pairs and adds them into 16 f32 lanes. */
__attribute__((target("avx512f,avx512bf16"))) static double peak_bf16_dp(long iters)
{
    __m512 acc[NACC];
    __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
    __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
    for (int j = 0; j < NACC; j++)
        acc[j] = _mm512_setzero_ps();
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < NACC; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    }
    __m512 s = acc[0];
    for (int j = 1; j < NACC; j++)
        s = _mm512_add_ps(s, acc[j]);
    return _mm512_reduce_add_ps(s);
}

/* The int8 dot of the Q8/Q4 rows (quant_avx2.c): vpmaddubsw (u8 x s8 pairs into s16), vpmaddwd by
 * ones (into s32), vpaddd, per 32 products. Each chain has its own operand, passed through an
 * empty asm every step, so the products are neither shared between chains nor hoisted out of
 * the loop (the empty asm adds no latency, so successive steps' products overlap); NACC_I8
 * chains cover the accumulator chain, one vpaddd, and leave the 16 ymm registers unspilled. */
__attribute__((target("avx2"))) static double peak_int8_avx2(long iters)
{
    /* Named registers, not arrays: an asm operand on an array element kept the array on the
     * stack (a load and a store per step). */
    const __m256i b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_set1_epi8(3), a1 = _mm256_set1_epi8(4), a2 = _mm256_set1_epi8(5);
    __m256i a3 = _mm256_set1_epi8(6);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
#define I8_STEP(a, c) c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones))
    for (long i = 0; i < iters; i++) {
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));
        I8_STEP(a0, c0);
        I8_STEP(a1, c1);
        I8_STEP(a2, c2);
        I8_STEP(a3, c3);
    }
#undef I8_STEP
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
    return (double)_mm256_extract_epi32(s, 0);
}

/* AVX512-VNNI: vpdpbusd multiplies 16 x 4 u8 x s8 pairs and adds them into 16 s32 lanes (zmm:
 * what the Intel tables' batch tiles use; on Zen 4 a zmm one costs two ymm ones, the same rate). */
__attribute__((target("avx512f,avx512vnni"))) static double peak_int8_vnni(long iters)
{
    __m512i acc[NACC];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int j = 0; j < NACC; j++)
        acc[j] = _mm512_setzero_si512();
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < NACC; j++)
            acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
    }
    __m512i s = acc[0];
    for (int j = 1; j < NACC; j++)
        s = _mm512_add_epi32(s, acc[j]);
    return (double)_mm512_reduce_add_epi32(s);
}

/* AMX: the kernels' block (matmul_amx.c), 4 C tiles from 2 A and 2 B tiles, with the operands
 * loaded once (registers only, like the other peaks); 4 independent accumulator tiles cover the
 * instruction's latency. The process must have been granted the tile state (moe_kernels_isa()
 * asks for it; this probe runs only where it chose amx). */
__attribute__((target("amx-tile,amx-bf16"))) static double peak_bf16_amx(long iters)
{
    static _Alignas(64) uint16_t ops[16 * 32];
    for (int i = 0; i < 16 * 32; i++)
        ops[i] = 0x3a83; /* ~1e-3 in bf16: sums stay finite */
    float out[16 * 16];
    _tile_loadconfig(&moe_amx_tiles_16x64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ops, 64);
    _tile_loadd(5, ops, 64);
    _tile_loadd(6, ops, 64);
    _tile_loadd(7, ops, 64);
    for (long i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    _tile_release();
    return out[0];
}

static double peak_f32_scalar(long iters)
{
    float acc[NACC];
    for (int j = 0; j < NACC; j++)
        acc[j] = (float)j;
    for (long i = 0; i < iters; i++)
        for (int j = 0; j < NACC; j++)
            acc[j] = acc[j] * 0.999f + 1e-3f;
    float s = 0;
    for (int j = 0; j < NACC; j++)
        s += acc[j];
    return s;
}

static double g_peak_s;
static int g_cpu_time;
static double g_peak_cpu_s[256]; /* per thread, best CPU time of a repetition */

static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void peak_body(team *t, int id)
{
    double best = 0, best_cpu = 0, v = 0;
    for (int r = 0; r < t->reps; r++) {
        pthread_barrier_wait(&t->bar);
        int64_t t0 = moe_now_ns();
        double c0 = thread_cpu_s();
        switch (t->kind) {
        case PEAK_F32_AVX2: v += peak_f32_avx2(t->iters); break;
        case PEAK_BF16_AVX2: v += peak_bf16_avx2(t->iters); break;
        case PEAK_F32_AVX512: v += peak_f32_avx512(t->iters); break;
        case PEAK_BF16_DP: v += peak_bf16_dp(t->iters); break;
        case PEAK_BF16_AMX: v += peak_bf16_amx(t->iters); break;
        case PEAK_INT8_AVX2: v += peak_int8_avx2(t->iters); break;
        case PEAK_INT8_VNNI: v += peak_int8_vnni(t->iters); break;
        default: v += peak_f32_scalar(t->iters); break;
        }
        double dc = thread_cpu_s() - c0;
        pthread_barrier_wait(&t->bar);
        double dt = (double)(moe_now_ns() - t0) * 1e-9;
        if (r == 0 || dt < best)
            best = dt;
        if (r == 0 || dc < best_cpu)
            best_cpu = dc;
    }
    t->sink[id % 64] = v;
    g_peak_cpu_s[id] = best_cpu;
    if (id == 0)
        g_peak_s = best;
}

/* GFLOP/s of `kind` on n threads together: by wall time, the slowest thread sets the time; with
 * --cpu-time, the sum of each thread's rate by its own CPU time. */
static double peak_gflops(int n, int kind)
{
    team t = {.n = n, .kind = kind, .reps = 5};
    /* ~0.2 s per repetition at a few GFLOP/s per core keeps the whole probe about a second. */
    t.iters = kind == PEAK_F32_SCALAR ? 20000000L : kind == PEAK_BF16_AMX ? 1000000L : 4000000L;
    team_run(&t, peak_body);
    double flops = peak_flops_per_iter(kind) * (double)t.iters;
    if (!g_cpu_time)
        return flops * t.n / g_peak_s * 1e-9;
    double sum = 0;
    for (int i = 0; i < t.n; i++)
        sum += flops / g_peak_cpu_s[i] * 1e-9;
    return sum;
}

static int cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int main(int argc, char **argv)
{
    int threads = 0, bw_only = 0;
    long mib = 128;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc)
            mib = atol(argv[++i]);
        else if (strcmp(argv[i], "--bw-only") == 0)
            bw_only = 1;
        else if (strcmp(argv[i], "--cpu-time") == 0)
            g_cpu_time = 1;
        else {
            fprintf(stderr, "usage: %s [--threads N] [--mib MiB per array] [--bw-only] [--cpu-time]\n", argv[0]);
            return 2;
        }
    }
    if (threads <= 0)
        threads = cpu_count();
    if (mib < 1)
        mib = 1;

    __builtin_cpu_init();
    int has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    g_has_avx2 = has_avx2;
    int has_avx512 = __builtin_cpu_supports("avx512f");
    int has_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
    /* the int8 unit the Q8/Q4 rows run on: VNNI where the kernels chose avx512 or amx */
    int has_vnni = has_avx512 && __builtin_cpu_supports("avx512vnni") && moe_kernels_isa() >= MOE_ISA_AVX512;
    /* AMX only where the kernels chose it: that is where the tile state was granted */
    int has_amx = moe_kernels_isa() == MOE_ISA_AMX;
    printf("# roofline: %d threads, kernels ISA %s, CPU avx2+fma=%d avx512f=%d avx512bf16=%d "
           "amx-bf16 (granted, chosen)=%d\n",
           threads, moe_isa_name(moe_kernels_isa()), has_avx2, has_avx512, has_bf16, has_amx);
    printf("threads=%d\n", threads);
    printf("kernels_isa=%s\n", moe_isa_name(moe_kernels_isa()));

    /* Triad: three arrays of `mib` MiB each (STREAM asks for 4x the last-level cache). */
    team bw = {.n = threads, .reps = 20};
    bw.len = (size_t)mib * 1048576 / sizeof(double);
    /* small (cache-sized) arrays: more repetitions, so each best-of time is not a few microseconds */
    if (mib < 128)
        bw.reps = (int)(20 * 128 / mib < 2000 ? 20 * 128 / mib : 2000);
    bw.a = aligned_alloc(64, bw.len * sizeof(double));
    bw.b = aligned_alloc(64, bw.len * sizeof(double));
    bw.c = aligned_alloc(64, bw.len * sizeof(double));
    if (!bw.a || !bw.b || !bw.c) {
        fprintf(stderr, "roofline: cannot allocate 3 x %ld MiB\n", mib);
        return 1;
    }
    team_run(&bw, bw_body);
    double bytes = 3.0 * (double)bw.len * sizeof(double);
    /* STREAM convention: the triad moves 2 reads + 1 write = 24 bytes per element (the write-
     * allocate read of a[] is real traffic but not counted). */
    printf("# triad a=b+s*c over 3 x %ld MiB, best of %d; read = sum of the same arrays\n", mib, bw.reps);
    /* Decode only reads weights; the triad's counted 24 bytes hide the write-allocate traffic of
     * a[], so a pure read sweep can beat it. The decode roofline takes the better of the two. */
    printf("triad_gbs=%.2f\n", bytes / g_best_triad_s * 1e-9);
    double triad = bytes / g_best_triad_s * 1e-9, read = bytes / g_best_read_s * 1e-9;
    printf("read_gbs=%.2f\n", read);
    printf("bandwidth_gbs=%.2f\n", read > triad ? read : triad);
    printf("bandwidth_mib=%.0f\n", bytes / 1048576.0);
    free(bw.a);
    free(bw.b);
    free(bw.c);
    if (bw_only)
        return 0;

    printf("# peaks by %s\n", g_cpu_time ? "thread CPU time (summed over threads)" : "wall time");
    double f32 = 0, bf16_cvt = 0, bf16_dp = 0;
    if (has_avx512)
        f32 = peak_gflops(threads, PEAK_F32_AVX512);
    if (has_avx2) {
        double f = peak_gflops(threads, PEAK_F32_AVX2);
        f32 = f > f32 ? f : f32;
        bf16_cvt = peak_gflops(threads, PEAK_BF16_AVX2);
    }
    if (!has_avx2 && !has_avx512)
        f32 = peak_gflops(threads, PEAK_F32_SCALAR);
    if (has_bf16)
        bf16_dp = peak_gflops(threads, PEAK_BF16_DP);
    double bf16_amx = has_amx ? peak_gflops(threads, PEAK_BF16_AMX) : 0;
    /* The bf16 compute ceiling: the fastest unit this CPU multiply-adds bf16 weights on. With
     * AVX512_BF16 that is vdpbf16ps (zmm: 16 lanes x 2 products; Zen 4 measured 2x its f32 FMA
     * rate); otherwise the f32 FMA peak (the AVX2 rows widen bf16 exactly and FMA in f32, the
     * widening amortised over the tokens of a tile). The kernels' default vdpbf16ps rows feed x as
     * hi + lo (two vdpbf16ps per product pair, docs/kernels.md): their own ceiling is half of
     * bf16_dpbf16_gflops, printed as bf16_dpbf16_split_x_gflops (derived, not measured apart).
     * With AMX (where the kernels run the bf16 rows on it) the tiles' tdpbf16ps; the kernels give
     * x two columns (hi, lo), so their ceiling is again half: bf16_amx_split_x_gflops. */
    double bf16_peak = bf16_dp > f32 ? bf16_dp : f32;
    if (bf16_amx > bf16_peak)
        bf16_peak = bf16_amx;
    printf("f32_fma_gflops=%.1f\n", f32);
    printf("bf16_cvt_fma_gflops=%.1f\n", bf16_cvt);
    if (has_bf16) {
        printf("bf16_dpbf16_gflops=%.1f\n", bf16_dp);
        printf("bf16_dpbf16_split_x_gflops=%.1f\n", bf16_dp / 2);
    } else {
        printf("bf16_dpbf16_gflops=n/a\n");
    }
    if (has_amx) {
        printf("bf16_amx_gflops=%.1f\n", bf16_amx);
        printf("bf16_amx_split_x_gflops=%.1f\n", bf16_amx / 2);
    } else {
        printf("bf16_amx_gflops=n/a\n");
    }
    printf("bf16_peak_gflops=%.1f\n", bf16_peak);
    /* The int8 unit the Q8/Q4 rows multiply on (their decode and prefill compute ceiling; they
     * add one f32 FMA per 32 products besides, not counted): vpdpbusd where AVX512-VNNI is (the
     * kernels' choice there), else the AVX2 vpmaddubsw + vpmaddwd pair. Not AMX int8: the
     * kernels do not use it (docs/kernels.md). GOP/s, a multiply and an add per product. */
    if (has_vnni || has_avx2) {
        printf("int8_dot_gops=%.1f\n", peak_gflops(threads, has_vnni ? PEAK_INT8_VNNI : PEAK_INT8_AVX2));
        printf("int8_dot_path=%s\n", has_vnni ? "vpdpbusd (AVX512-VNNI, zmm)" : "vpmaddubsw + vpmaddwd (AVX2)");
    } else {
        printf("int8_dot_gops=n/a\n");
    }
    printf("bf16_peak_path=%s\n", bf16_amx >= bf16_peak && has_amx ? "tdpbf16ps (AMX-BF16 tiles)"
                                   : bf16_dp > f32                  ? "vdpbf16ps (AVX512_BF16, zmm)"
                                                : has_avx512 ? "f32-fma (AVX-512 or AVX2, the faster)"
                                                : has_avx2   ? "f32-fma (AVX2)"
                                                             : "f32 scalar");
    return 0;
}
