/* avx512 matmul and dot kernels (this file is compiled with the avx512 flags; see CMakeLists). */
#include "kernels/cpu/kernels_internal.h"

/* Placeholder until the vector kernel lands: same contract as the scalar path. */
void moe_matmul_rows_avx512(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                          int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

float moe_dot_f32_avx512(const float *a, const float *b, int n)
{
    return moe_dot_f32_scalar(a, b, n);
}
