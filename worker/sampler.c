/* Token sampling (greedy, temperature, top-k, top-p) and the seeded per-sequence RNG. */
#include "worker/sampler.h"

#include <math.h>
#include <stdlib.h>

#include "kernels/kernels.h"

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void moe_rng_seed(moe_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(moe_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double moe_rng_uniform(moe_rng *r) { return (double)(xoshiro_next(r) >> 11) * 0x1.0p-53; }

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

int32_t moe_sample(float *logits, int n, const moe_sampling_params *sp, moe_rng *rng, int *idx,
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
    double u = moe_rng_uniform(rng) * sum, acc = 0.0;
    for (int i = 0; i < m; i++) {
        acc += prob[i];
        if (u < acc)
            return idx[i];
    }
    return idx[m - 1];
}
