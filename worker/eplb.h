/* Redundant-expert planner (EPLB): given how many tokens each expert received, adds replicas of the
 * hottest experts on the least loaded ranks so that the per-rank expert load evens out. Pure
 * function over plain arrays: the coordinator or a worker can run it from recorded statistics. */
#ifndef MOE_WORKER_EPLB_H
#define MOE_WORKER_EPLB_H

#include <stdint.h>
#include "common/status.h"
#include "worker/ep_placement.h"

/* Adds up to n_redundant replicas to p (which holds the primary placement), at most
 * ceil(n_redundant / n_ranks) per rank, greedily: the expert with the largest load per holder gets
 * a replica on the rank with the smallest projected load that does not hold it yet. load[e]: tokens
 * routed to expert e (summed over layers, or for one layer). */
moe_status moe_eplb_plan(moe_ep_placement *p, const int64_t *load, int n_redundant);

/* Projected per-rank load when each expert's tokens split evenly over its holders (what the
 * least-loaded routing of the exchange achieves); rank_load has n_ranks entries. Returns max/mean. */
double moe_eplb_rank_load(const moe_ep_placement *p, const int64_t *load, double *rank_load);

#endif
