/* Q8/Q4 int8 matmul A/B in one process (issue 16): an old kernels/cpu/quant_avx2.c, compiled with
 * its entry point renamed to old_rows_q, against the current one, alternated call by call, best
 * of R, in thread CPU time (the machine is shared: time spent descheduled is not counted), plus
 * the one-core f32 FMA peak measured the same way and a bitwise check of the two outputs. Not
 * part of the build (it needs the old source); from the repository root, with a build in build/:
 *   git show BASE:kernels/cpu/quant_avx2.c > /tmp/old_quant_avx2.c
 *   F="-O3 -mavx2 -mfma -mf16c -I. -Ibuild -std=gnu17"
 *   gcc $F -c /tmp/old_quant_avx2.c -Dmoe_matmul_rows_q_avx2=old_rows_q \
 *       -Dmoe_quantize_x_avx2=old_qx -o /tmp/old.o
 *   gcc $F bench/quant_ab.c kernels/cpu/quant_avx2.c /tmp/old.o build/libmoe_kernels.a -lm \
 *       -lpthread -o /tmp/quant_ab && /tmp/quant_ab [R] [number of n_tok values]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kernels/cpu/kernels_internal.h"
void old_rows_q(float *y, const int8_t *xq, const float *xd, const void *w, moe_dtype wt, int n_tok,
                int n_in, int n_out, int r0, int r1);
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
static unsigned long long s = 88172645463325252ull;
static float fr(void)
{
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return (float)((s >> 40) * 0x1p-24) * 2.f - 1.f;
}
#define FMA(i) "vfmadd231ps %%ymm15, %%ymm14, %%ymm" #i "\n"
static double fma_peak(void)
{
    long n = 20000000;
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t = now();
        for (long k = 0; k < n; k++)
            __asm__ volatile(FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7) FMA(8) FMA(9)
                                 FMA(10) FMA(11)::
                                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                                       "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
        t = now() - t;
        double g = n * 12.0 * 16 / t / 1e9;
        if (g > best)
            best = g;
    }
    return best;
}
int main(int argc, char **argv)
{
    int shapes[][2] = {{1024, 2048}, {2048, 1024}, {384, 768}, {768, 384}};
    int toks[] = {1, 2, 3, 4, 8, 16, 47, 64, 512};
    int nts = argc > 2 ? atoi(argv[2]) : 9;
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    size_t mw = 2048 * 2048;
    float *wf = malloc(mw * 4);
    for (size_t i = 0; i < mw; i++)
        wf[i] = fr() * 0.05f;
    float *x = malloc(512 * 2048 * 4);
    for (size_t i = 0; i < 512 * 2048; i++)
        x[i] = fr();
    int8_t *xq = malloc(512 * 2048);
    float *xd = malloc(512 * 64 * 4);
    float *y0 = malloc(512 * 2048 * 4), *y1 = malloc(512 * 2048 * 4);
    void *w = malloc(mw / 32 * 34);
    double pk0 = fma_peak();
    printf("f32 FMA peak, one core, thread CPU time: %.1f GFLOP/s\n", pk0);
    for (int dt = 0; dt < 2; dt++) {
        moe_dtype wt = dt ? MOE_DT_Q4 : MOE_DT_Q8;
        for (int si = 0; si < 4; si++) {
            int no = shapes[si][0], ni = shapes[si][1];
            moe_quantize(w, wt, wf, MOE_DT_F32, (size_t)no * ni);
            for (int ti = 0; ti < nts; ti++) {
                int nt = toks[ti];
                moe_quantize_x_avx2(xq, xd, x, nt, ni);
                double b0 = 1e30, b1 = 1e30;
                int inner = nt >= 64 ? 1 : (64 / nt);
                for (int r = 0; r < reps; r++) {
                    double t = now();
                    for (int k = 0; k < inner; k++)
                        old_rows_q(y0, xq, xd, w, wt, nt, ni, no, 0, no);
                    t = now() - t;
                    if (t < b0)
                        b0 = t;
                    t = now();
                    for (int k = 0; k < inner; k++)
                        moe_matmul_rows_q_avx2(y1, xq, xd, w, wt, nt, ni, no, 0, no);
                    t = now() - t;
                    if (t < b1)
                        b1 = t;
                }
                int same = memcmp(y0, y1, (size_t)nt * no * 4) == 0;
                double fl = 2.0 * nt * ni * no * inner;
                printf("%s %4dx%-4d n_tok=%-3d old %6.1f new %6.1f GFLOP/s (%3.0f%% -> %3.0f%% of "
                       "peak)  new/old %.2f %s\n",
                       dt ? "q4" : "q8", no, ni, nt, fl / b0 / 1e9, fl / b1 / 1e9,
                       100 * fl / b0 / 1e9 / pk0, 100 * fl / b1 / 1e9 / pk0, b0 / b1,
                       same ? "" : "BITS DIFFER");
            }
        }
    }
    printf("f32 FMA peak again: %.1f GFLOP/s\n", fma_peak());
    return 0;
}
