/* Redundant-expert planner: replicas go to the hottest experts, respect the per-rank slot limit,
 * and bring the max/mean per-rank load down on a skewed load. */
#include <criterion/criterion.h>

#include "worker/eplb.h"

Test(eplb, skewed_load_gets_balanced)
{
    /* 8 experts on 4 ranks; expert 0 gets most tokens (Zipf-like). */
    const int64_t load[8] = {1000, 300, 200, 150, 100, 80, 60, 50};
    moe_ep_placement p;
    cr_assert_eq(moe_ep_placement_contiguous(8, 4, &p), MOE_OK);
    double rl[4];
    double before = moe_eplb_rank_load(&p, load, rl);
    cr_assert_gt(before, 2.0); /* rank 0 holds experts 0 and 1: 1300 of 1940 */
    cr_assert_eq(moe_eplb_plan(&p, load, 4), MOE_OK);
    double after = moe_eplb_rank_load(&p, load, rl);
    cr_assert_lt(after, before * 0.6, "max/mean %f -> %f", before, after);
    cr_assert_geq(p.n_holders[0], 2, "the hottest expert must be replicated");
    int replicas = 0;
    for (int e = 0; e < 8; e++)
        replicas += p.n_holders[e] - 1;
    cr_assert_eq(replicas, 4);
    /* At most one replica per rank (ceil(4 / 4)). */
    int per_rank[4] = {0};
    for (int e = 0; e < 8; e++)
        for (int h = 1; h < p.n_holders[e]; h++)
            per_rank[p.holders[e * MOE_EP_MAX_HOLDERS + h]]++;
    for (int r = 0; r < 4; r++)
        cr_assert_leq(per_rank[r], 1);
    moe_ep_placement_free(&p);
}

Test(eplb, uniform_load_stays_flat_and_zero_load_adds_nothing)
{
    const int64_t flat[4] = {100, 100, 100, 100}, zero[4] = {0};
    moe_ep_placement p;
    double rl[2];
    cr_assert_eq(moe_ep_placement_contiguous(4, 2, &p), MOE_OK);
    cr_assert_float_eq(moe_eplb_rank_load(&p, flat, rl), 1.0, 1e-9);
    cr_assert_eq(moe_eplb_plan(&p, zero, 2), MOE_OK);
    for (int e = 0; e < 4; e++)
        cr_assert_eq(p.n_holders[e], 1);
    cr_assert_eq(moe_eplb_plan(&p, flat, -1), MOE_ERR_INVALID_ARG);
    moe_ep_placement_free(&p);
}
