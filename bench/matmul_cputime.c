/* A/B timing of one matmul shape on a shared machine: moe_matmul_serial (one thread) timed by
 * the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), best of REPS, so that time the scheduler gives
 * to other engineers' processes is not counted (contention for caches and memory still is).
 * Usage: matmul_cputime N_OUT N_IN N_TOK_LIST [f32|bf16|f16] [REPS]
 *   e.g. matmul_cputime 1024 2048 1,2,4,16,512 bf16 5
 * Prints one line per n_tok: ms and GFLOP/s (2 * n_tok * n_out * n_in per call). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s N_OUT N_IN N_TOK_LIST [f32|bf16|f16] [REPS]\n", argv[0]);
        return 2;
    }
    int n_out = atoi(argv[1]), n_in = atoi(argv[2]);
    const char *dts = argc > 4 ? argv[4] : "bf16";
    moe_dtype dt = strcmp(dts, "f32") == 0 ? MOE_DT_F32
                   : strcmp(dts, "f16") == 0 ? MOE_DT_F16
                                             : MOE_DT_BF16;
    int reps = argc > 5 ? atoi(argv[5]) : 20;
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
    if (!w || !x || !y) {
        fprintf(stderr, "matmul_cputime: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        float f = frand();
        if (dt == MOE_DT_F32)
            ((float *)w)[i] = f;
        else
            ((uint16_t *)w)[i] = dt == MOE_DT_BF16 ? moe_f32_to_bf16(f) : moe_f32_to_f16(f);
    }
    for (size_t i = 0; i < (size_t)max_tok * n_in; i++)
        x[i] = frand();
    printf("# matmul_cputime: isa %s, %s, one thread, best of %d\n",
           moe_isa_name(moe_kernels_isa()), moe_dtype_name(dt), reps);
    snprintf(list, sizeof list, "%s", argv[3]);
    for (char *p = strtok(list, ","); p; p = strtok(NULL, ",")) {
        int nt = atoi(p);
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
    return 0;
}
