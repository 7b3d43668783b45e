/* Sampler: greedy ties, determinism per seed, top-k / top-p support sets, distribution. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "worker/sampler.h"

#define N 8

static int32_t draw(const float *logits, const moe_sampling_params *sp, moe_rng *rng)
{
    float l[N];
    int idx[N];
    float prob[N];
    memcpy(l, logits, sizeof l);
    return moe_sample(l, N, sp, rng, idx, prob);
}

Test(sampler, greedy_takes_argmax_and_lowest_id_on_ties)
{
    const float l[N] = {0, 3, 1, 3, -1, 2, 0, 0};
    moe_sampling_params sp = {.temperature = 0, .top_p = 1};
    moe_rng rng;
    moe_rng_seed(&rng, 1);
    cr_assert_eq(draw(l, &sp, &rng), 1);
}

Test(sampler, same_seed_same_sequence_other_seed_differs)
{
    const float l[N] = {0, 0.5f, 1, 0.2f, 0.1f, 0.3f, 0.9f, 0.4f};
    moe_sampling_params sp = {.temperature = 1.0f, .top_p = 1.0f};
    moe_rng a, b, c;
    moe_rng_seed(&a, 42);
    moe_rng_seed(&b, 42);
    moe_rng_seed(&c, 43);
    int same = 1, diff = 0;
    for (int i = 0; i < 64; i++) {
        int x = draw(l, &sp, &a), y = draw(l, &sp, &b), z = draw(l, &sp, &c);
        same &= x == y;
        diff += x != z;
    }
    cr_assert(same);
    cr_assert_gt(diff, 0);
}

Test(sampler, top_k_and_top_p_restrict_the_support)
{
    const float l[N] = {5, 4, 3, 0, 0, 0, 0, 0};
    moe_rng rng;
    moe_rng_seed(&rng, 7);
    moe_sampling_params k2 = {.temperature = 1.0f, .top_k = 2, .top_p = 1.0f};
    int seen[N] = {0};
    for (int i = 0; i < 2000; i++)
        seen[draw(l, &k2, &rng)]++;
    cr_assert_gt(seen[0], 0);
    cr_assert_gt(seen[1], 0);
    for (int i = 2; i < N; i++)
        cr_assert_eq(seen[i], 0, "top-k 2 drew id %d", i);
    /* p(0) = e^5 / sum ~ 0.66, p(1) ~ 0.24: top_p 0.5 keeps only id 0. */
    moe_sampling_params p5 = {.temperature = 1.0f, .top_p = 0.5f};
    for (int i = 0; i < 200; i++)
        cr_assert_eq(draw(l, &p5, &rng), 0);
}

Test(sampler, frequencies_follow_softmax_with_temperature)
{
    const float l[N] = {1, 0, 0, 0, 0, 0, 0, 0};
    moe_sampling_params sp = {.temperature = 0.5f, .top_p = 1.0f};
    moe_rng rng;
    moe_rng_seed(&rng, 3);
    int hits = 0, n = 20000;
    for (int i = 0; i < n; i++)
        hits += draw(l, &sp, &rng) == 0;
    double p = exp(2.0) / (exp(2.0) + 7.0); /* logits / T = 2 for id 0 */
    cr_assert_lt(fabs((double)hits / n - p), 0.02, "got %f want %f", (double)hits / n, p);
}
