/* Token sampling (greedy, temperature, top-k, top-p) and its counter-based random draw. */
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

static int32_t argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
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

    /* Candidates: the top-k ids (by logit), or every id; sorted descending. */
    int m;
    if (sp->top_k > 0 && sp->top_k < n) {
        m = sp->top_k;
        moe_topk(logits, n, m, idx, prob); /* already sorted, ties to the lower id */
    } else {
        m = n;
        for (int i = 0; i < n; i++)
            idx[i] = i;
        if (sp->top_p < 1.0f) {
            /* qsort's comparator has no context argument; sampling runs on the engine thread. */
            sort_keys = logits;
            qsort(idx, (size_t)n, sizeof(int), cmp_desc);
        }
    }
    float inv_t = 1.0f / sp->temperature;
    float mx = logits[idx[0]];
    if (m == n && sp->top_p >= 1.0f)
        mx = logits[argmax(logits, n)];
    double sum = 0.0;
    for (int i = 0; i < m; i++) {
        prob[i] = expf((logits[idx[i]] - mx) * inv_t);
        sum += prob[i];
    }
    /* top-p: keep the smallest prefix whose mass reaches top_p (always at least one token). */
    if (sp->top_p < 1.0f) {
        double cum = 0.0, cut = sp->top_p * sum;
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
