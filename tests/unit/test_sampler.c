/* Sampler: greedy ties, the counter-based draw (Random123's known answers, a pure function of
 * (seed, index), chi-square uniform along the index, across seeds and in successive pairs),
 * top-k / top-p support sets, the distribution of sampled tokens. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include <Random123/philox.h>

#include "worker/sampler.h"

#define N 8

static int32_t draw(const float *logits, const moe_sampling_params *sp, uint64_t index)
{
    float l[N];
    int idx[N];
    float prob[N];
    memcpy(l, logits, sizeof l);
    return moe_sample(l, N, sp, index, idx, prob);
}

Test(sampler, greedy_takes_argmax_and_lowest_id_on_ties)
{
    const float l[N] = {0, 3, 1, 3, -1, 2, 0, 0};
    moe_sampling_params sp = {.temperature = 0, .top_p = 1, .seed = 1};
    cr_assert_eq(draw(l, &sp, 0), 1);
    cr_assert_eq(draw(l, &sp, 17), 1);
}

/* Greedy over vocabulary-sized rows against the plain loop it replaced (`if (x[i] > x[best])
 * best = i`): random values with repeated maxima, lengths that are and are not multiples of the
 * lane count, the maximum in the tail, +0 against -0, infinities and NaNs (a NaN in front gives 0,
 * elsewhere it never wins). */
static int32_t argmax_ref(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

Test(sampler, greedy_matches_the_first_index_of_the_maximum)
{
    enum { MAXN = 8203 };
    static float l[MAXN], keep[MAXN];
    static int idx[MAXN];
    static float prob[MAXN];
    moe_sampling_params sp = {.temperature = 0, .top_p = 1, .seed = 1};
    const int lens[] = {1, 2, 15, 16, 17, 31, 33, 1000, 8192, 8203};
    uint64_t r = 12345;
    for (int li = 0; li < (int)(sizeof lens / sizeof lens[0]); li++) {
        int n = lens[li];
        for (int trial = 0; trial < 40; trial++) {
            for (int i = 0; i < n; i++) {
                r = r * 6364136223846793005ull + 1442695040888963407ull;
                /* few distinct values: maxima repeat */
                l[i] = (float)((int)(r >> 59) - 16) * 0.5f;
            }
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            int at = (int)((r >> 33) % (uint64_t)n);
            switch (trial % 8) {
            case 1: l[n - 1] = 100.f; break;                 /* the maximum in the tail */
            case 2: l[at] = NAN; break;                      /* a NaN somewhere */
            case 3: l[0] = NAN; break;                       /* a NaN in front: 0 */
            case 4: for (int i = 0; i < n; i++) l[i] = (i & 1) ? 0.0f : -0.0f; break;
            case 5: l[at] = INFINITY; break;
            case 6: for (int i = 0; i < n; i++) l[i] = -INFINITY; break;
            case 7: l[at] = 50.f; if (n > 1) l[(at + n / 2) % n] = 50.f; break;
            default: break;
            }
            memcpy(keep, l, sizeof(float) * (size_t)n);
            int32_t want = argmax_ref(keep, n);
            cr_assert_eq(moe_sample(l, n, &sp, 0, idx, prob), want, "n %d trial %d", n, trial);
        }
    }
}

/* Known answers from Random123's own test vectors (/usr/share/doc/librandom123-dev/tests/
 * kat_vectors.gz, "philox2x64 10" lines): the header works on this compiler, and our draw is its
 * first output word's top 53 bits for counter (index, 0) and key seed. */
Test(sampler, draw_is_philox2x64_with_random123s_known_answers)
{
    philox2x64_ctr_t c0 = {{0, 0}}, c1 = {{~0ull, ~0ull}}, c2 = {{0x243f6a8885a308d3ull, 0x13198a2e03707344ull}};
    philox2x64_key_t k0 = {{0}}, k1 = {{~0ull}}, k2 = {{0xa4093822299f31d0ull}};
    philox2x64_ctr_t r0 = philox2x64(c0, k0), r1 = philox2x64(c1, k1), r2 = philox2x64(c2, k2);
    cr_assert_eq(r0.v[0], 0xca00a0459843d731ull);
    cr_assert_eq(r0.v[1], 0x66c24222c9a845b5ull);
    cr_assert_eq(r1.v[0], 0x65b021d60cd8310full);
    cr_assert_eq(r1.v[1], 0x4d02f3222f86df20ull);
    cr_assert_eq(r2.v[0], 0x0a5e742c2997341cull);
    cr_assert_eq(r2.v[1], 0xb0f883d38000de5dull);
    cr_assert_eq(moe_sample_uniform(0, 0), (double)(0xca00a0459843d731ull >> 11) * 0x1.0p-53);
}

/* A pure function of (seed, index): the same numbers whatever order they are asked in and
 * whatever other sequences drew in between (what an engine restart, a migration or a recompute
 * relies on). */
Test(sampler, draw_depends_only_on_seed_and_index)
{
    enum { K = 256 };
    double fwd[K];
    for (int i = 0; i < K; i++)
        fwd[i] = moe_sample_uniform(42, (uint64_t)i);
    for (int i = K - 1; i >= 0; i--) {
        (void)moe_sample_uniform(43, (uint64_t)i); /* another sequence's draws in between */
        cr_assert_eq(moe_sample_uniform(42, (uint64_t)i), fwd[i], "index %d", i);
    }
    int diff = 0;
    for (int i = 0; i < K; i++) {
        double u = moe_sample_uniform(43, (uint64_t)i);
        cr_assert(u >= 0.0 && u < 1.0);
        diff += u != fwd[i];
    }
    cr_assert_eq(diff, K, "another seed must give other draws");

    const float l[N] = {0, 0.5f, 1, 0.2f, 0.1f, 0.3f, 0.9f, 0.4f};
    moe_sampling_params a = {.temperature = 1.0f, .top_p = 1.0f, .seed = 42}, b = a;
    b.seed = 43;
    int32_t ta[64];
    int tokens_differ = 0;
    for (int i = 0; i < 64; i++) {
        ta[i] = draw(l, &a, (uint64_t)i);
        tokens_differ += ta[i] != draw(l, &b, (uint64_t)i);
    }
    for (int i = 63; i >= 0; i -= 3)
        cr_assert_eq(draw(l, &a, (uint64_t)i), ta[i], "token %d", i);
    cr_assert_gt(tokens_differ, 0);
}

/* Pearson's chi-square over equal bins, two-sided at p = 0.001 per side (Wilson-Hilferty
 * quantiles): too large means non-uniform, too small means too regular to be random (a Weyl
 * sequence or a stratified counter would pass the upper bound and fail this one). */
static void chi_square_check(const int *count, int bins, int n, const char *what)
{
    double expect = (double)n / bins, chi = 0.0;
    for (int b = 0; b < bins; b++)
        chi += (count[b] - expect) * (count[b] - expect) / expect;
    double k = bins - 1, z = 3.0902, h = 2.0 / (9.0 * k);
    double lo = k * pow(1.0 - h - z * sqrt(h), 3), hi = k * pow(1.0 - h + z * sqrt(h), 3);
    cr_assert(chi > lo && chi < hi, "%s: chi-square %.1f outside (%.1f, %.1f) for %d bins", what, chi, lo, hi);
}

Test(sampler, draws_are_uniform_by_chi_square)
{
    enum { BINS = 64, PAIR_BINS = 16, NDRAW = 1 << 16 };
    static int count[PAIR_BINS * PAIR_BINS];

    /* along the token index of one sequence */
    memset(count, 0, sizeof count);
    for (int i = 0; i < NDRAW; i++)
        count[(int)(moe_sample_uniform(0x5eed, (uint64_t)i) * BINS)]++;
    chi_square_check(count, BINS, NDRAW, "index 0..65535, seed 0x5eed");

    /* across consecutive seeds at one index (clients often pick 1, 2, 3...) */
    memset(count, 0, sizeof count);
    for (int s = 0; s < NDRAW; s++)
        count[(int)(moe_sample_uniform((uint64_t)s, 3) * BINS)]++;
    chi_square_check(count, BINS, NDRAW, "seeds 0..65535, index 3");

    /* successive pairs (u_i, u_i+1): no serial correlation */
    memset(count, 0, sizeof count);
    for (int i = 0; i < NDRAW; i++) {
        int x = (int)(moe_sample_uniform(7, 2 * (uint64_t)i) * PAIR_BINS);
        int y = (int)(moe_sample_uniform(7, 2 * (uint64_t)i + 1) * PAIR_BINS);
        count[x * PAIR_BINS + y]++;
    }
    chi_square_check(count, PAIR_BINS * PAIR_BINS, NDRAW, "pairs of successive indices, seed 7");
}

Test(sampler, top_k_and_top_p_restrict_the_support)
{
    const float l[N] = {5, 4, 3, 0, 0, 0, 0, 0};
    moe_sampling_params k2 = {.temperature = 1.0f, .top_k = 2, .top_p = 1.0f, .seed = 7};
    int seen[N] = {0};
    for (int i = 0; i < 2000; i++)
        seen[draw(l, &k2, (uint64_t)i)]++;
    cr_assert_gt(seen[0], 0);
    cr_assert_gt(seen[1], 0);
    for (int i = 2; i < N; i++)
        cr_assert_eq(seen[i], 0, "top-k 2 drew id %d", i);
    /* p(0) = e^5 / sum ~ 0.66, p(1) ~ 0.24: top_p 0.5 keeps only id 0. */
    moe_sampling_params p5 = {.temperature = 1.0f, .top_p = 0.5f, .seed = 7};
    for (int i = 0; i < 200; i++)
        cr_assert_eq(draw(l, &p5, (uint64_t)i), 0);
}

Test(sampler, frequencies_follow_softmax_with_temperature)
{
    const float l[N] = {1, 0, 0, 0, 0, 0, 0, 0};
    moe_sampling_params sp = {.temperature = 0.5f, .top_p = 1.0f, .seed = 3};
    int hits = 0, n = 20000;
    for (int i = 0; i < n; i++)
        hits += draw(l, &sp, (uint64_t)i) == 0;
    double p = exp(2.0) / (exp(2.0) + 7.0); /* logits / T = 2 for id 0 */
    cr_assert_lt(fabs((double)hits / n - p), 0.02, "got %f want %f", (double)hits / n, p);
}

/* The penalties on numbers worked by hand from their definitions: Hugging Face's
 * RepetitionPenaltyLogitsProcessor (score < 0 ? score * p : score / p, every id in the input
 * once) and OpenAI's / vLLM's presence and frequency penalties (logit -= c[j] * frequency +
 * (c[j] > 0) * presence, c counted over the generated tokens only). */
Test(sampler, penalties_follow_their_definitions)
{
    float l[N] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f, 0.0f, 4.0f};
    /* prompt: ids 0, 1, 1; generated: 3, 3, 4 */
    const int32_t toks[6] = {0, 1, 1, 3, 3, 4};
    uint32_t mark[N] = {0}, stamp = 0;
    moe_sampling_params sp = {.temperature = 1.0f, .top_p = 1.0f, .repetition_penalty = 2.0f,
                              .presence_penalty = 0.5f, .frequency_penalty = 0.25f};
    moe_sample_penalize(l, N, &sp, toks, 6, 3, mark, &stamp);
    const float want[N] = {2.0f / 2,             /* prompt, positive: divided once */
                           -1.0f * 2,            /* prompt twice, negative: multiplied once */
                           0.5f,                 /* unseen */
                           3.0f / 2 - 0.5f - 2 * 0.25f, /* generated twice */
                           -2.0f * 2 - 0.5f - 0.25f,    /* generated once, negative */
                           1.0f, 0.0f, 4.0f};
    for (int i = 0; i < N; i++)
        cr_assert_float_eq(l[i], want[i], 1e-6, "id %d: %f, want %f", i, l[i], want[i]);
    /* all off (a zeroed struct's 0 repetition included): unchanged */
    float m2[N];
    memcpy(m2, want, sizeof m2);
    moe_sampling_params off = {.temperature = 1.0f};
    moe_sample_penalize(m2, N, &off, toks, 6, 3, mark, &stamp);
    cr_assert(!memcmp(m2, want, sizeof m2));
}

/* Logprobs are log-softmax(logits / T) (greedy: T = 1) over the whole vocabulary, even where
 * top-k would cut; the top list is sorted and its first entry is the greedy choice. */
Test(sampler, logprobs_are_log_softmax_after_temperature)
{
    const float l0[N] = {1, 3, 0.5f, 3, -1, 2, 0, 0};
    const float temps[3] = {0.0f, 1.0f, 0.5f};
    for (int t = 0; t < 3; t++) {
        float l[N];
        memcpy(l, l0, sizeof l);
        int idx[N];
        float prob[N];
        uint32_t mark[N] = {0};
        moe_sample_scratch scr = {.idx = idx, .prob = prob, .mark = mark};
        moe_sampling_params sp = {.temperature = temps[t], .top_k = 2, .top_p = 1.0f, .seed = 5,
                                  .logprobs = true, .top_logprobs = 4};
        moe_token_logprobs lp;
        int32_t tok = moe_sample_seq(l, N, &sp, 0, NULL, 0, 0, &scr, &lp);
        double s = temps[t] > 0 ? 1.0 / temps[t] : 1.0, sum = 0.0;
        for (int i = 0; i < N; i++)
            sum += exp(l0[i] * s);
        cr_assert_float_eq(lp.logprob, l0[tok] * s - log(sum), 1e-5, "T %g", temps[t]);
        cr_assert_eq(lp.n_top, 4);
        const int order[4] = {1, 3, 5, 0}; /* ties to the lower id */
        for (int k = 0; k < 4; k++) {
            cr_assert_eq(lp.top_ids[k], order[k], "T %g: top %d is %d", temps[t], k, lp.top_ids[k]);
            cr_assert_float_eq(lp.top_logprobs[k], l0[order[k]] * s - log(sum), 1e-5);
        }
    }
}
