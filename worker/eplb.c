/* Greedy redundant-expert placement from recorded expert loads. */
#include "worker/eplb.h"

#include <stdlib.h>
#include <string.h>

double moe_eplb_rank_load(const moe_ep_placement *p, const int64_t *load, double *rank_load)
{
    memset(rank_load, 0, sizeof(double) * (size_t)p->n_ranks);
    double total = 0;
    for (int e = 0; e < p->n_experts; e++) {
        double share = (double)load[e] / p->n_holders[e];
        for (int h = 0; h < p->n_holders[e]; h++)
            rank_load[p->holders[e * MOE_EP_MAX_HOLDERS + h]] += share;
        total += (double)load[e];
    }
    double mx = 0;
    for (int r = 0; r < p->n_ranks; r++)
        if (rank_load[r] > mx)
            mx = rank_load[r];
    double mean = total / p->n_ranks;
    return mean > 0 ? mx / mean : 1.0;
}

moe_status moe_eplb_plan(moe_ep_placement *p, const int64_t *load, int n_redundant)
{
    if (n_redundant < 0)
        return moe_error(MOE_ERR_INVALID_ARG, "redundant_experts: %d, must be >= 0", n_redundant);
    int per_rank = (n_redundant + p->n_ranks - 1) / p->n_ranks;
    int *added = calloc((size_t)p->n_ranks, sizeof(int));
    double *rank_load = calloc((size_t)p->n_ranks, sizeof(double));
    if (!added || !rank_load) {
        free(added);
        free(rank_load);
        return moe_error(MOE_ERR_NOMEM, "eplb: out of memory");
    }
    moe_status st = MOE_OK;
    for (int i = 0; i < n_redundant && st == MOE_OK; i++) {
        moe_eplb_rank_load(p, load, rank_load);
        /* Hottest expert per holder that still has a rank to go to. */
        int best_e = -1, best_r = -1;
        double best_share = 0;
        for (int e = 0; e < p->n_experts; e++) {
            double share = (double)load[e] / p->n_holders[e];
            if (share <= best_share || p->n_holders[e] == MOE_EP_MAX_HOLDERS)
                continue;
            int r_min = -1;
            for (int r = 0; r < p->n_ranks; r++)
                if (added[r] < per_rank && !moe_ep_placement_holds(p, r, e) &&
                    (r_min < 0 || rank_load[r] < rank_load[r_min]))
                    r_min = r;
            if (r_min >= 0) {
                best_e = e;
                best_r = r_min;
                best_share = share;
            }
        }
        if (best_e < 0)
            break; /* nothing left worth replicating (no load, or every rank full) */
        st = moe_ep_placement_add_replica(p, best_e, best_r);
        added[best_r]++;
    }
    free(added);
    free(rank_load);
    return st;
}
