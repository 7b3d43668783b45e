/* Shared by the backends' own files (worker/compute/backend_*.c); nobody else includes it. */
#ifndef MOE_WORKER_COMPUTE_BACKEND_INTERNAL_H
#define MOE_WORKER_COMPUTE_BACKEND_INTERNAL_H

#include <stdbool.h>

#include "common/log.h"
#include "worker/compute/backend.h"

/* Programmer errors in op arguments (the caller's contract): checked in debug builds. */
#ifdef NDEBUG
#define MOE_BE_ASSERT(cond) ((void)0)
#else
#define MOE_BE_ASSERT(cond) MOE_ASSERT(cond)
#endif

/* What both backends run today: every op, matmul over every weight dtype, embedding rows of
 * float types only (quantized tables are dequantized at load). A backend with gaps says so in
 * its own supports(). */
static inline bool moe_be_supports_all(moe_op op, moe_dtype dt)
{
    if (op == MOE_OP_MATMUL || op == MOE_OP_MATMUL_GROUPED)
        return dt < MOE_DT_COUNT;
    if (op == MOE_OP_EMBED)
        return dt == MOE_DT_F32 || dt == MOE_DT_BF16 || dt == MOE_DT_F16;
    return op < MOE_OP_COUNT;
}

#endif
