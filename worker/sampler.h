/* Token sampling: penalties, greedy, temperature, top-k, top-p, log-probabilities. The random draw for generated token index i
 * of a sequence is a pure function of (seed, i): there is no generator state to carry, so a
 * sequence re-prefilled elsewhere after a fault, migrated, preempted or recomputed draws exactly
 * the numbers it would have drawn where it started. */
#ifndef MOE_WORKER_SAMPLER_H
#define MOE_WORKER_SAMPLER_H

#include <stdint.h>
#include "common/sampling.h" /* moe_sampling_params, moe_token_logprobs, moe_finish_reason */

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

/* Applies sp's penalties to logits[0..n) in place (common/sampling.h says which): repetition over
 * tokens[0..n_tokens), presence and frequency over the generated ones, tokens[n_prompt..n_tokens).
 * mark: n zeroed words of scratch kept between calls with its *stamp (no clearing per call).
 * No-op when every penalty is off. */
void moe_sample_penalize(float *logits, int n, const moe_sampling_params *sp, const int32_t *tokens,
                         int n_tokens, int n_prompt, uint32_t *mark, uint32_t *stamp);

/* Fills lp's top list (sp->top_logprobs entries) from logits[0..n) as common/sampling.h's
 * moe_token_logprobs defines them, and returns the log of the softmax's normaliser of the scaled
 * logits: the token t then has log-probability logits[t] * moe_sample_logit_scale(sp) - return.
 * idx, val: scratch of n each. logits unchanged. */
double moe_sample_logprobs_top(const float *logits, int n, const moe_sampling_params *sp,
                               moe_token_logprobs *lp, int *idx, float *val);
/* 1 / temperature, or 1 for greedy: the scale the log-probabilities are taken at. */
float moe_sample_logit_scale(const moe_sampling_params *sp);

/* Everything the engine does for one token: penalise over the sequence's tokens (prompt then
 * generated), take the log-probabilities when sp->logprobs (into *lp), then moe_sample. */
typedef struct {
    int *idx;       /* n */
    float *prob;    /* n */
    uint32_t *mark; /* n, zeroed once */
    uint32_t stamp;
} moe_sample_scratch;

int32_t moe_sample_seq(float *logits, int n, const moe_sampling_params *sp, uint64_t index,
                       const int32_t *tokens, int n_tokens, int n_prompt, moe_sample_scratch *scr,
                       moe_token_logprobs *lp);

#endif
