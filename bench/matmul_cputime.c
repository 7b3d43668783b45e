/* A/B timing of one matmul shape on a shared machine: moe_matmul_serial (one thread) timed by
 * the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), best of REPS, so that time the scheduler gives
 * to other engineers' processes is not counted (contention for caches and memory still is).
 * Usage: matmul_cputime N_OUT N_IN N_TOK_LIST [f32|bf16|f16|q8|q4] [REPS] [ab|abz]
 *   e.g. matmul_cputime 1024 2048 1,2,4,16,512 bf16 5
 * Prints one line per n_tok: ms and GFLOP/s (2 * n_tok * n_out * n_in per call).
 * q8/q4 with "ab": the int8 row kernels themselves, AVX2 (A) against AVX512-VNNI (B), called in
 * turn (A B, B A, A B ...) on the same quantized x, best of REPS each, plus a bitwise check of the
 * two outputs (they must match: moe_matmul_rows_q_fn). Needs a CPU with AVX512-VNNI. "abz": the
 * VNNI rows (A) against the same with the zmm Q8/Q4 batch tiles (B, moe_matmul_rows_q_avx512z).
 * matmul_cputime probe (AVX-512 CPUs): the throughput of the instructions those kernels are made
 * of, 10 independent ones per loop: FMA, vdpbf16ps and vpdpbusd on ymm, vpdpbusd on zmm (does a
 * 512-bit op do twice the work per second?), vpdpbusd mixed with FMA (do they share pipes?) and the
 * Q8 work of one (row, token, block), vpdpbusd + convert + FMA.
 * matmul_cputime amxloop (CPUs where the kernels chose amx): the AMX bf16 kernel's k loop alone
 * (matmul_amx.c block(): per 32-k step 2 A tiles of W rows, 2 B tiles of x, 4 tdpbf16ps), 64
 * tokens as hi + lo (4 token-tile pairs meet each 32-row block), 1024 x 2048 W, the operands
 * placed three ways: W rows as the kernel reads them (4 MB, 4 KB apart: each row block from L3 or
 * memory for its first pair, from L2 after), one row block over and over (L2-resident, same
 * strides), and that block packed tile after tile (contiguous, L2-resident). What the memory
 * behind the A tiles costs the products, against bench/roofline's registers-only peak. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu/kernels_internal.h" /* the int8 row kernels, for "ab" */
#include "kernels/kernels.h"

static double cpu_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint32_t rng = 1;
static float frand(void)
{
    rng = rng * 1103515245u + 12345u;
    return (float)((rng >> 9) & 0xffff) / 65536.f - 0.5f;
}

#if defined(__x86_64__)
#define PROBE_LOOPS 50000000L
/* Registers 0-15 only: this file is built without AVX-512 flags, which the compiler needs before
 * it lets an asm clobber 16-31. Sources 13-15, accumulators 0-11. */
#define Y3(op, i) op " %%ymm14, %%ymm15, %%ymm" #i "\n"
#define Z3(op, i) op " %%zmm14, %%zmm15, %%zmm" #i "\n"
#define TEN(M, op)                                                                                 \
    M(op, 0) M(op, 1) M(op, 2) M(op, 3) M(op, 4) M(op, 5) M(op, 6) M(op, 7) M(op, 8) M(op, 9)
#define MIX(i, j) Y3("vpdpbusd", i) Y3("vfmadd231ps", j)
#define Q8W(i, j, k) Y3("vpdpbusd", i) "vcvtdq2ps %%ymm13, %%ymm" #j "\n" Y3("vfmadd231ps", k)
#define PROBE_CLOBBER                                                                              \
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define PROBE(name, body, unit, per_loop)                                                          \
    do {                                                                                           \
        double t0 = cpu_s();                                                                       \
        for (long k = 0; k < PROBE_LOOPS; k++)                                                     \
            __asm__ volatile(body ::: PROBE_CLOBBER);                                              \
        double t = cpu_s() - t0;                                                                   \
        printf("%-40s %6.3f ns per loop  %6.1f %s\n", name, t / PROBE_LOOPS * 1e9,                 \
               (double)PROBE_LOOPS * (per_loop) / t / 1e9, unit);                                  \
    } while (0)

static int probe(void)
{
    if (moe_kernels_isa() != MOE_ISA_AVX512) {
        fprintf(stderr, "matmul_cputime: probe needs AVX-512 (isa %s)\n",
                moe_isa_name(moe_kernels_isa()));
        return 2;
    }
    printf("# matmul_cputime probe: one thread, thread CPU time, 10 independent ops per loop\n");
    PROBE("vfmadd231ps ymm", TEN(Y3, "vfmadd231ps"), "GFLOP/s", 10 * 16);
    PROBE("vdpbf16ps ymm", TEN(Y3, "vdpbf16ps"), "GFLOP/s", 10 * 32);
    PROBE("vpdpbusd ymm", TEN(Y3, "vpdpbusd"), "int8 GOP/s", 10 * 64);
    PROBE("vpdpbusd zmm", TEN(Z3, "vpdpbusd"), "int8 GOP/s", 10 * 128);
    PROBE("5 vpdpbusd + 5 vfmadd231ps ymm", MIX(0, 5) MIX(1, 6) MIX(2, 7) MIX(3, 8) MIX(4, 9),
          "G ops/s", 10);
    PROBE("4 x (vpdpbusd + vcvtdq2ps + vfmadd) ymm",
          Q8W(0, 4, 8) Q8W(1, 5, 9) Q8W(2, 6, 10) Q8W(3, 7, 11), "GFLOP/s of Q8 work", 4 * 64);
    return 0;
}
#endif

#if defined(__x86_64__)
#include <immintrin.h>

enum { AL_OUT = 1024, AL_IN = 2048, AL_KS = AL_IN / 32, AL_PAIRS = 4, AL_REPS = 20 };

/* One placement of A: tile (row block rb, step s) at w + rb * block + s * step, rows `stride`
 * bytes apart, the second A tile `half` bytes after the first. Thread CPU seconds. */
__attribute__((target("amx-tile,amx-bf16"))) static double
amx_loop(const uint8_t *w, size_t stride, size_t step, size_t half, size_t block, const uint8_t *xa)
{
    float c[16 * 16];
    _tile_loadconfig(&moe_amx_tiles_16x64);
    double t0 = cpu_s();
    for (int rep = 0; rep < AL_REPS; rep++)
        for (int rb = 0; rb < AL_OUT / 32; rb++)
            for (int tp = 0; tp < AL_PAIRS; tp++) {
                const uint8_t *b0 = xa + (size_t)2 * tp * AL_KS * 1024, *b1 = b0 + AL_KS * 1024;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int s = 0; s < AL_KS; s++) {
                    const uint8_t *a = w + rb * block + s * step;
                    _tile_loadd(4, a, stride);
                    _tile_loadd(5, a + half, stride);
                    _tile_loadd(6, b0 + s * 1024, 64);
                    _tile_loadd(7, b1 + s * 1024, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, c, 64);
            }
    double t = cpu_s() - t0;
    _tile_release();
    return t + 0 * c[0];
}

static int amxloop(void)
{
    if (moe_kernels_isa() != MOE_ISA_AMX) {
        fprintf(stderr, "matmul_cputime: amxloop needs the amx level (isa %s)\n",
                moe_isa_name(moe_kernels_isa()));
        return 2;
    }
    const size_t wbytes = (size_t)AL_OUT * AL_IN * 2, xbytes = (size_t)2 * AL_PAIRS * AL_KS * 1024;
    uint8_t *w = aligned_alloc(4096, wbytes), *xa = aligned_alloc(4096, xbytes);
    uint8_t *packed = aligned_alloc(4096, (size_t)32 * AL_IN * 2);
    if (!w || !xa || !packed)
        return 1;
    for (size_t i = 0; i < wbytes / 2; i++)
        ((uint16_t *)w)[i] = 0x3a83; /* ~1e-3 in bf16: sums stay finite */
    memset(xa, 0, xbytes);
    memset(packed, 0, (size_t)32 * AL_IN * 2);
    const size_t row = AL_IN * 2;
    const double flop = (double)AL_REPS * (AL_OUT / 32) * AL_PAIRS * AL_KS * 4 * 16 * 16 * 32 * 2;
    printf("# matmul_cputime amxloop: one thread, thread CPU time, %d x %d W, %d token-tile pairs, "
           "GFLOP/s of tile work (hi + lo counted twice)\n",
           AL_OUT, AL_IN, AL_PAIRS);
    for (int round = 0; round < 3; round++) {
        double t_kernel = amx_loop(w, row, 64, 16 * row, 32 * row, xa);
        double t_l2 = amx_loop(w, row, 64, 16 * row, 0, xa);
        double t_packed = amx_loop(packed, 64, 2048, 1024, 0, xa);
        printf("W rows as the kernel reads them %7.1f | one row block, L2 %7.1f | packed, L2 "
               "%7.1f\n",
               flop / t_kernel / 1e9, flop / t_l2 / 1e9, flop / t_packed / 1e9);
    }
    free(w);
    free(xa);
    free(packed);
    return 0;
}
#endif

int main(int argc, char **argv)
{
#if defined(__x86_64__)
    if (argc == 2 && strcmp(argv[1], "probe") == 0)
        return probe();
    if (argc == 2 && strcmp(argv[1], "amxloop") == 0)
        return amxloop();
#endif
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s N_OUT N_IN N_TOK_LIST [f32|bf16|f16|q8|q4] [REPS] [ab|abz]\n"
                "       %s probe | amxloop\n",
                argv[0], argv[0]);
        return 2;
    }
    int n_out = atoi(argv[1]), n_in = atoi(argv[2]);
    const char *dts = argc > 4 ? argv[4] : "bf16";
    moe_dtype dt = strcmp(dts, "f32") == 0   ? MOE_DT_F32
                   : strcmp(dts, "f16") == 0 ? MOE_DT_F16
                   : strcmp(dts, "q8") == 0  ? MOE_DT_Q8
                   : strcmp(dts, "q4") == 0  ? MOE_DT_Q4
                                             : MOE_DT_BF16;
    int quant = dt == MOE_DT_Q8 || dt == MOE_DT_Q4;
    int reps = argc > 5 ? atoi(argv[5]) : 20;
    /* ab: the AVX2 int8 rows (A) against the VNNI ones (B); abz: the VNNI rows (A) against the
     * same with the zmm Q8/Q4 batch tiles (B) */
    int abz = argc > 6 && strcmp(argv[6], "abz") == 0;
    int ab = abz || (argc > 6 && strcmp(argv[6], "ab") == 0);
    moe_matmul_rows_q_fn kern_a = abz ? moe_matmul_rows_q_avx512 : moe_matmul_rows_q_avx2;
    moe_matmul_rows_q_fn kern_b = abz ? moe_matmul_rows_q_avx512z : moe_matmul_rows_q_avx512;
    if (ab && (!quant || moe_kernels_isa() < MOE_ISA_AVX512)) {
        fprintf(stderr, "matmul_cputime: ab needs q8/q4 and an AVX512-VNNI CPU (isa %s)\n",
                moe_isa_name(moe_kernels_isa()));
        return 2;
    }
    int max_tok = 0;
    char list[256];
    snprintf(list, sizeof list, "%s", argv[3]);
    for (char *p = strtok(list, ","); p; p = strtok(NULL, ","))
        max_tok = atoi(p) > max_tok ? atoi(p) : max_tok;
    if (n_out <= 0 || n_in <= 0 || max_tok <= 0 || reps <= 0) {
        fprintf(stderr, "matmul_cputime: sizes, n_tok and reps must be positive\n");
        return 2;
    }
    size_t n = (size_t)n_out * n_in;
    /* page-aligned, as an mmapped weight file's big tensors are */
    void *w = aligned_alloc(4096, (n * 4 + 4095) & ~(size_t)4095);
    float *x = malloc(sizeof(float) * (size_t)max_tok * n_in);
    float *y = malloc(sizeof(float) * (size_t)max_tok * n_out);
    float *y2 = malloc(sizeof(float) * (size_t)max_tok * n_out);
    int8_t *xq = malloc((size_t)max_tok * n_in);
    float *xd = malloc(sizeof(float) * (size_t)max_tok * (size_t)(n_in / 32 + 1));
    if (!w || !x || !y || !y2 || !xq || !xd) {
        fprintf(stderr, "matmul_cputime: out of memory\n");
        return 1;
    }
    if (quant) {
        float *wf = malloc(sizeof(float) * n);
        for (size_t i = 0; wf && i < n; i++)
            wf[i] = 0.05f * frand();
        if (!wf || moe_quantize(w, dt, wf, MOE_DT_F32, n) != 0) {
            fprintf(stderr, "matmul_cputime: n_in must be a multiple of 32 for %s\n", dts);
            return 2;
        }
        free(wf);
    }
    for (size_t i = 0; i < n && !quant; i++) {
        float f = frand();
        if (dt == MOE_DT_F32)
            ((float *)w)[i] = f;
        else
            ((uint16_t *)w)[i] = dt == MOE_DT_BF16 ? moe_f32_to_bf16(f) : moe_f32_to_f16(f);
    }
    for (size_t i = 0; i < (size_t)max_tok * n_in; i++)
        x[i] = frand();
    printf("# matmul_cputime: isa %s, %s, one thread, best of %d%s\n",
           moe_isa_name(moe_kernels_isa()), moe_dtype_name(dt), reps,
           abz  ? ", int8 rows avx512-vnni (A) vs the zmm batch tiles (B) alternated"
           : ab ? ", int8 rows avx2 (A) vs avx512-vnni (B) alternated"
                : "");
    snprintf(list, sizeof list, "%s", argv[3]);
    for (char *p = strtok(list, ","); p; p = strtok(NULL, ",")) {
        int nt = atoi(p);
        if (ab) {
            moe_quantize_x_avx2(xq, xd, x, nt, n_in);
            double ba = 1e30, bb = 1e30;
            for (int r = 0; r < reps; r++) {
                /* A first on even reps, B first on odd ones: neither always follows the other */
                for (int k = 0; k < 2; k++) {
                    int vnni = (k + r) % 2;
                    double t0 = cpu_s();
                    (vnni ? kern_b : kern_a)(vnni ? y2 : y, xq, xd, w, dt, nt, n_in, n_out, 0,
                                             n_out);
                    double t = cpu_s() - t0;
                    if (vnni)
                        bb = t < bb ? t : bb;
                    else
                        ba = t < ba ? t : ba;
                }
            }
            int same = memcmp(y, y2, sizeof(float) * (size_t)nt * n_out) == 0;
            printf("%dx%d n_tok=%-3d A %8.3f ms %6.1f GFLOP/s  B %8.3f ms %6.1f GFLOP/s  "
                   "B/A speed %.2fx%s\n",
                   n_out, n_in, nt, ba * 1e3, 2.0 * nt * (double)n / ba / 1e9, bb * 1e3,
                   2.0 * nt * (double)n / bb / 1e9, ba / bb, same ? "" : "  BITS DIFFER");
            if (!same)
                return 1;
            continue;
        }
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            double t0 = cpu_s();
            moe_matmul_serial(y, x, w, dt, nt, n_in, n_out);
            double t = cpu_s() - t0;
            best = t < best ? t : best;
        }
        printf("%dx%d n_tok=%-3d %8.3f ms %6.1f GFLOP/s\n", n_out, n_in, nt, best * 1e3,
               2.0 * nt * (double)n / best / 1e9);
    }
    free(w);
    free(x);
    free(y);
    free(y2);
    free(xq);
    free(xd);
    return 0;
}
