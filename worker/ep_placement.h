/* Expert placement of an expert-parallel instance: which ranks hold which experts. Each rank has a
 * primary contiguous range; redundant replicas (EPLB) add more holders for hot experts. */
#ifndef MOE_WORKER_EP_PLACEMENT_H
#define MOE_WORKER_EP_PLACEMENT_H

#include <stdbool.h>
#include "common/status.h"

#define MOE_EP_MAX_HOLDERS 8

typedef struct {
    int n_experts, n_ranks;
    int *range_begin, *range_end; /* [n_ranks] primary experts [begin, end) of each rank */
    int *n_holders;               /* [n_experts] ranks holding each expert (>= 1) */
    int *holders;                 /* [n_experts * MOE_EP_MAX_HOLDERS] their ranks, primary first */
} moe_ep_placement;

/* Rank r holds experts [r*n/R, (r+1)*n/R) (sizes differ by at most one). INVALID_ARG when there are
 * more ranks than experts. */
moe_status moe_ep_placement_contiguous(int n_experts, int n_ranks, moe_ep_placement *p);
/* Adds rank as a holder of expert (a replica). FULL past MOE_EP_MAX_HOLDERS. */
moe_status moe_ep_placement_add_replica(moe_ep_placement *p, int expert, int rank);
bool moe_ep_placement_holds(const moe_ep_placement *p, int rank, int expert);
/* Deep copy (dst must not own memory). */
moe_status moe_ep_placement_copy(moe_ep_placement *dst, const moe_ep_placement *src);
void moe_ep_placement_free(moe_ep_placement *p);

#endif
