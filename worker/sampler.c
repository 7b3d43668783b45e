/* Token sampling (penalties, greedy, temperature, top-k, top-p, log-probabilities) and its
 * counter-based random draw. */
#include "worker/sampler.h"

#include <math.h>
#include <stdlib.h>

#include <Random123/philox.h>

#include "kernels/kernels.h"

/* Why a counter-based generator: the draw for token i must not depend on how many draws came
 * before it on this engine (a sequence may be re-prefilled on another instance after a crash,
 * migrated or recomputed), so there is no state to carry, only (seed, i). Why Philox2x64-10 from
 * Random123 (Debian librandom123-dev, header only) rather than a hand-written hash: it is built
 * for exactly this (Salmon et al., SC'11: counter-based, passes TestU01's BigCrush for any key),
 * is the generator of cuRAND, PyTorch and JAX (a GPU sampler can compute the same function with
 * the same header under nvcc), and its known-answer vectors ship with the package. The second
 * counter word (0 here) is free for other per-token draws should they come. */
double moe_sample_uniform(uint64_t seed, uint64_t index)
{
    philox2x64_ctr_t ctr = {{index, 0}};
    philox2x64_key_t key = {{seed}};
    philox2x64_ctr_t r = philox2x64(ctr, key);
    return (double)(r.v[0] >> 11) * 0x1.0p-53;
}

/* The lowest index of the largest value (an x[0] that is NaN: 0; other NaNs never win), as
 * `if (x[i] > x[best]) best = i` gives. That loop is one chain of load x[best], compare, cmov per
 * element (~8 cycles: 2 ms of a 64-sequence greedy step over a 8192 vocabulary, serial on the
 * engine thread), so: the largest value first, over ARGMAX_LANES independent running maxima
 * (`a > m ? a : m` keeps m when a is NaN; +0 and -0 compare equal, so which zero survives does
 * not matter to the == below), then the first index holding it. */
#define ARGMAX_LANES 16

static int32_t argmax(const float *x, int n)
{
    float m[ARGMAX_LANES];
    for (int l = 0; l < ARGMAX_LANES; l++)
        m[l] = x[0];
    int i = 0;
    for (; i + ARGMAX_LANES <= n; i += ARGMAX_LANES)
        for (int l = 0; l < ARGMAX_LANES; l++)
            m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    for (; i < n; i++)
        m[0] = x[i] > m[0] ? x[i] : m[0];
    float mx = m[0];
    for (int l = 1; l < ARGMAX_LANES; l++)
        mx = m[l] > mx ? m[l] : mx;
    for (i = 0; i < n; i++)
        if (x[i] == mx)
            return i;
    return 0; /* mx is NaN: x[0] was */
}

/* Sorts candidate indices by descending logit (ties: lower id first) for top-p's cumulative cut. */
static const float *sort_keys;
static int cmp_desc(const void *a, const void *b)
{
    int ia = *(const int *)a, ib = *(const int *)b;
    float va = sort_keys[ia], vb = sort_keys[ib];
    if (va != vb)
        return va > vb ? -1 : 1;
    return ia - ib;
}

int32_t moe_sample(float *logits, int n, const moe_sampling_params *sp, uint64_t index, int *idx,
                   float *prob)
{
    if (sp->temperature <= 0.0f)
        return argmax(logits, n);
    /* 0 (a zeroed struct) or >= 1: off */
    const float top_p = sp->top_p > 0.0f && sp->top_p < 1.0f ? sp->top_p : 1.0f;

    /* Candidates: the top-k ids (by logit), or every id; sorted descending. */
    int m;
    if (sp->top_k > 0 && sp->top_k < n) {
        m = sp->top_k;
        moe_topk(logits, n, m, idx, prob); /* already sorted, ties to the lower id */
    } else {
        m = n;
        for (int i = 0; i < n; i++)
            idx[i] = i;
        if (top_p < 1.0f) {
            /* qsort's comparator has no context argument; sampling runs on the engine thread. */
            sort_keys = logits;
            qsort(idx, (size_t)n, sizeof(int), cmp_desc);
        }
    }
    float inv_t = 1.0f / sp->temperature;
    float mx = logits[idx[0]];
    if (m == n && top_p >= 1.0f)
        mx = logits[argmax(logits, n)];
    double sum = 0.0;
    for (int i = 0; i < m; i++) {
        prob[i] = expf((logits[idx[i]] - mx) * inv_t);
        sum += prob[i];
    }
    /* top-p: keep the smallest prefix whose mass reaches top_p (always at least one token). */
    if (top_p < 1.0f) {
        double cum = 0.0, cut = top_p * sum;
        int keep = m;
        for (int i = 0; i < m; i++) {
            cum += prob[i];
            if (cum >= cut) {
                keep = i + 1;
                break;
            }
        }
        m = keep;
        sum = cum;
    }
    double u = moe_sample_uniform(sp->seed, index) * sum, acc = 0.0;
    for (int i = 0; i < m; i++) {
        acc += prob[i];
        if (u < acc)
            return idx[i];
    }
    return idx[m - 1];
}

/* A fresh stamp for the mark array: words equal to it are "seen in this pass". */
static uint32_t next_stamp(uint32_t *mark, int n, uint32_t *stamp)
{
    if (++*stamp == 0) { /* wrapped: old marks could alias */
        for (int i = 0; i < n; i++)
            mark[i] = 0;
        *stamp = 1;
    }
    return *stamp;
}

void moe_sample_penalize(float *logits, int n, const moe_sampling_params *sp, const int32_t *tokens,
                         int n_tokens, int n_prompt, uint32_t *mark, uint32_t *stamp)
{
    float rep = sp->repetition_penalty;
    /* vLLM's order (vllm/model_executor/layers/utils.py apply_penalties): repetition first, on
     * every token id seen in prompt or output, each id once; then frequency per occurrence and
     * presence once per id, over the output only. */
    if (rep > 0.0f && rep != 1.0f) {
        uint32_t st = next_stamp(mark, n, stamp);
        for (int i = 0; i < n_tokens; i++) {
            int32_t t = tokens[i];
            if (t < 0 || t >= n || mark[t] == st)
                continue;
            mark[t] = st;
            logits[t] = logits[t] > 0.0f ? logits[t] / rep : logits[t] * rep;
        }
    }
    if (sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f) {
        uint32_t st = next_stamp(mark, n, stamp);
        for (int i = n_prompt; i < n_tokens; i++) {
            int32_t t = tokens[i];
            if (t < 0 || t >= n)
                continue;
            logits[t] -= sp->frequency_penalty;
            if (mark[t] != st) {
                mark[t] = st;
                logits[t] -= sp->presence_penalty;
            }
        }
    }
}

float moe_sample_logit_scale(const moe_sampling_params *sp)
{
    return sp->temperature > 0.0f ? 1.0f / sp->temperature : 1.0f;
}

double moe_sample_logprobs_top(const float *logits, int n, const moe_sampling_params *sp,
                               moe_token_logprobs *lp, int *idx, float *val)
{
    double s = moe_sample_logit_scale(sp);
    float mx = logits[argmax(logits, n)];
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += exp(((double)logits[i] - mx) * s);
    double lse = (double)mx * s + log(sum);
    int k = sp->top_logprobs;
    if (k > MOE_MAX_TOP_LOGPROBS)
        k = MOE_MAX_TOP_LOGPROBS;
    if (k > n)
        k = n;
    if (k < 0)
        k = 0;
    if (k > 0)
        moe_topk(logits, n, k, idx, val); /* the order of scaled logits: s > 0 */
    lp->n_top = k;
    for (int i = 0; i < k; i++) {
        lp->top_ids[i] = idx[i];
        lp->top_logprobs[i] = (float)((double)logits[idx[i]] * s - lse);
    }
    return lse;
}

int32_t moe_sample_seq(float *logits, int n, const moe_sampling_params *sp, uint64_t index,
                       const int32_t *tokens, int n_tokens, int n_prompt, moe_sample_scratch *scr,
                       moe_token_logprobs *lp)
{
    moe_sample_penalize(logits, n, sp, tokens, n_tokens, n_prompt, scr->mark, &scr->stamp);
    double lse = 0.0;
    if (sp->logprobs && lp)
        lse = moe_sample_logprobs_top(logits, n, sp, lp, scr->idx, scr->prob);
    int32_t tok = moe_sample(logits, n, sp, index, scr->idx, scr->prob);
    if (sp->logprobs && lp)
        lp->logprob = (float)((double)logits[tok] * moe_sample_logit_scale(sp) - lse);
    return tok;
}
