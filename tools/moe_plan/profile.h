/* `moe-plan profile`: this machine's costs measured with the real engine and comm backend. */
#ifndef MOE_TOOLS_PLAN_PROFILE_H
#define MOE_TOOLS_PLAN_PROFILE_H

#include <stdbool.h>
#include "tools/moe_plan/costs.h"

typedef struct {
    const char *model_dir, *out, *note;
    int threads, max_batch_tokens, max_seqs, block_size;
    int reps;   /* timed repetitions per point (median), 1..16 */
    bool quick; /* fewer points (CI) */
    int share_max; /* the sharing curve: up to this many other engines stepping beside (0: none) */
    bool verbose;
} mp_profile_opts;

/* Runs the measurements (MPI_Init inside: run alone or under mpirun -np N), writes o->out on rank
 * 0. Returns the process exit status (0 ok, 1 failure with a message on stderr). */
int mp_profile_main(const mp_profile_opts *o);

#endif
