/* Helpers shared by the kernel tests (each test file is its own binary, so these are static). */
#ifndef MOE_TESTS_KERNEL_TEST_UTIL_H
#define MOE_TESTS_KERNEL_TEST_UTIL_H

#include <criterion/criterion.h>
#include <stdbool.h>
#include <stdlib.h>

#include "kernels/kernels.h"

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    cr_assert_not_null(p);
    return p;
}

/* Whether this CPU runs isa's kernels; the ISA in use stays as it was. */
static inline bool cpu_runs_isa(moe_isa isa)
{
    moe_isa was = moe_kernels_isa();
    bool has = moe_kernels_force_isa(isa) == isa;
    moe_kernels_force_isa(was);
    return has;
}

/* Every ISA there is: the size of an array supported_isas fills. */
#define MOE_N_ISA (MOE_ISA_AMX + 1)

/* The ISAs this CPU runs, lowest first (each later one needs more of the CPU); returns how many
 * and leaves the scalar kernels selected. */
static inline int supported_isas(moe_isa *out)
{
    int n = 0;
    for (int i = MOE_ISA_SCALAR; i <= MOE_ISA_AMX; i++)
        if (moe_kernels_force_isa((moe_isa)i) == (moe_isa)i)
            out[n++] = (moe_isa)i;
    moe_kernels_force_isa(MOE_ISA_SCALAR);
    return n;
}

#endif
