/* Token sampling: greedy, temperature, top-k, top-p. The random draw for generated token index i
 * of a sequence is a pure function of (seed, i): there is no generator state to carry, so a
 * sequence re-prefilled elsewhere after a fault, migrated, preempted or recomputed draws exactly
 * the numbers it would have drawn where it started. */
#ifndef MOE_WORKER_SAMPLER_H
#define MOE_WORKER_SAMPLER_H

#include <stdint.h>

typedef struct {
    float temperature; /* 0 = greedy (argmax, lowest id on ties) */
    int top_k;         /* 0 = off */
    float top_p;       /* in (0, 1]; 1 = off */
    uint64_t seed;     /* with the token index, fixes every draw (the client's, else the server's) */
} moe_sampling_params;

/* The uniform draw in [0, 1) (53 random bits) for generated token `index` (0 = the first token,
 * the one the prefill samples) of a sequence sampled with `seed`: Philox2x64-10 (Random123) of the
 * counter (index, 0) under the key seed. Pure, thread-safe. */
double moe_sample_uniform(uint64_t seed, uint64_t index);

/* Picks generated token `index` of a sequence from logits[0..n) (logits are modified: scaled /
 * softmaxed in place); greedy ignores seed and index. scratch needs n ints + n floats of room:
 * (int *) idx of n, (float *) prob of n. Not thread-safe (top-p's sort uses a static key table);
 * call from the engine thread. */
int32_t moe_sample(float *logits, int n, const moe_sampling_params *sp, uint64_t index, int *idx_scratch,
                   float *prob_scratch);

#endif
