/* Shared by the backends' own files (worker/compute/backend_*.c); nobody else includes it. */
#ifndef MOE_WORKER_COMPUTE_BACKEND_INTERNAL_H
#define MOE_WORKER_COMPUTE_BACKEND_INTERNAL_H

#include "common/log.h"

/* Programmer errors in op arguments (the caller's contract): checked in debug builds. */
#ifdef NDEBUG
#define MOE_BE_ASSERT(cond) ((void)0)
#else
#define MOE_BE_ASSERT(cond) MOE_ASSERT(cond)
#endif

#endif
