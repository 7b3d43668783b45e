/* Token sampling: greedy, temperature, top-k, top-p, with a per-sequence seeded RNG whose state
 * is plain data (it travels with a migrated sequence). */
#ifndef MOE_WORKER_SAMPLER_H
#define MOE_WORKER_SAMPLER_H

#include <stdint.h>

typedef struct {
    float temperature; /* 0 = greedy (argmax, lowest id on ties) */
    int top_k;         /* 0 = off */
    float top_p;       /* in (0, 1]; 1 = off */
    uint64_t seed;
} moe_sampling_params;

typedef struct {
    uint64_t s[4]; /* xoshiro256** state */
} moe_rng;

void moe_rng_seed(moe_rng *r, uint64_t seed);
/* Uniform in [0, 1). */
double moe_rng_uniform(moe_rng *r);

/* Picks a token from logits[0..n) (logits are modified: scaled/softmaxed in place). scratch
 * needs n ints + n floats of room: (int *) idx of n, (float *) prob of n. */
int32_t moe_sample(float *logits, int n, const moe_sampling_params *sp, moe_rng *rng, int *idx_scratch,
                   float *prob_scratch);

#endif
