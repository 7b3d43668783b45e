/* Expert placement tables: contiguous primary ranges plus replicas. */
#include "worker/ep_placement.h"

#include <stdlib.h>
#include <string.h>

moe_status moe_ep_placement_contiguous(int n_experts, int n_ranks, moe_ep_placement *p)
{
    memset(p, 0, sizeof *p);
    if (n_ranks <= 0 || n_experts <= 0 || n_ranks > n_experts)
        return moe_error(MOE_ERR_INVALID_ARG, "ep_size: %d ranks for %d experts (each rank needs at least one)",
                         n_ranks, n_experts);
    p->n_experts = n_experts;
    p->n_ranks = n_ranks;
    p->range_begin = calloc((size_t)n_ranks, sizeof(int));
    p->range_end = calloc((size_t)n_ranks, sizeof(int));
    p->n_holders = calloc((size_t)n_experts, sizeof(int));
    p->holders = calloc((size_t)n_experts * MOE_EP_MAX_HOLDERS, sizeof(int));
    if (!p->range_begin || !p->range_end || !p->n_holders || !p->holders) {
        moe_ep_placement_free(p);
        return moe_error(MOE_ERR_NOMEM, "ep placement: out of memory");
    }
    for (int r = 0; r < n_ranks; r++) {
        p->range_begin[r] = (int)((long)r * n_experts / n_ranks);
        p->range_end[r] = (int)((long)(r + 1) * n_experts / n_ranks);
        for (int e = p->range_begin[r]; e < p->range_end[r]; e++) {
            p->holders[e * MOE_EP_MAX_HOLDERS] = r;
            p->n_holders[e] = 1;
        }
    }
    return MOE_OK;
}

bool moe_ep_placement_holds(const moe_ep_placement *p, int rank, int expert)
{
    for (int i = 0; i < p->n_holders[expert]; i++)
        if (p->holders[expert * MOE_EP_MAX_HOLDERS + i] == rank)
            return true;
    return false;
}

moe_status moe_ep_placement_add_replica(moe_ep_placement *p, int expert, int rank)
{
    if (expert < 0 || expert >= p->n_experts || rank < 0 || rank >= p->n_ranks)
        return moe_error(MOE_ERR_INVALID_ARG, "ep placement: replica of expert %d on rank %d out of range",
                         expert, rank);
    if (moe_ep_placement_holds(p, rank, expert))
        return MOE_OK;
    if (p->n_holders[expert] == MOE_EP_MAX_HOLDERS)
        return moe_error(MOE_ERR_FULL, "ep placement: expert %d already has %d holders", expert,
                         MOE_EP_MAX_HOLDERS);
    p->holders[expert * MOE_EP_MAX_HOLDERS + p->n_holders[expert]++] = rank;
    return MOE_OK;
}

moe_status moe_ep_placement_copy(moe_ep_placement *dst, const moe_ep_placement *src)
{
    moe_status st = moe_ep_placement_contiguous(src->n_experts, src->n_ranks, dst);
    if (st != MOE_OK)
        return st;
    memcpy(dst->range_begin, src->range_begin, sizeof(int) * (size_t)src->n_ranks);
    memcpy(dst->range_end, src->range_end, sizeof(int) * (size_t)src->n_ranks);
    memcpy(dst->n_holders, src->n_holders, sizeof(int) * (size_t)src->n_experts);
    memcpy(dst->holders, src->holders, sizeof(int) * (size_t)src->n_experts * MOE_EP_MAX_HOLDERS);
    return MOE_OK;
}

void moe_ep_placement_free(moe_ep_placement *p)
{
    free(p->range_begin);
    free(p->range_end);
    free(p->n_holders);
    free(p->holders);
    memset(p, 0, sizeof *p);
}
