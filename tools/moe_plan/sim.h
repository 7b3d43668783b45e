/* moe-plan's discrete-event simulator of a moeserve cluster: the coordinator's placement and
 * admission (coordinator/cluster_sched.c), each instance's continuous batching with chunked prefill
 * under the token budget and preemption by recompute (worker/engine.c), the KV hand-off (layer by
 * layer during the prefill, or whole blocks after it), expert-parallel instances stepping in lock
 * step; step durations from the cost model (costs.h). Migration is not simulated (see
 * docs/benchmarks.md). Deterministic. */
#ifndef MOE_TOOLS_PLAN_SIM_H
#define MOE_TOOLS_PLAN_SIM_H

#include <stdbool.h>
#include <stdio.h>

#include "tools/moe_bench/report.h"
#include "tools/moe_bench/workload.h"
#include "tools/moe_plan/costs.h"

typedef enum { MP_POOL_PREFILL, MP_POOL_DECODE, MP_POOL_MIXED } mp_pool;

/* "P=1x1,D=2x1": pools of COUNTxEP (instances x ranks each); "M=2x1" colocated (mixed). */
typedef struct {
    int count[3], ep[3]; /* by mp_pool; count 0: no such pool */
} mp_layout;

/* Parses s; INVALID_ARG naming the bad part (also: mixed together with P or D, P without D). */
moe_status mp_layout_parse(const char *s, mp_layout *l);
void mp_layout_format(const mp_layout *l, char *buf, size_t cap);
/* Worker ranks the layout needs (the coordinator not counted). */
int mp_layout_ranks(const mp_layout *l);

typedef struct {
    int max_batch_tokens, max_seqs, kv_blocks, block_size; /* 0: the profile's */
    bool kv_block_mode; /* --kv-transfer block: whole blocks pulled after the prefill */
    int max_requests;   /* in flight before RESOURCE_EXHAUSTED (default 1024) */
    mp_net net;         /* between instances and between EP ranks; unset: the profile's rates */
    int cores;          /* CPU cores the ranks share (one machine); 0: a core per rank. A step that
                           starts while more ranks step than there are cores takes longer in
                           proportion (fixed at its start). Unused when the costs carry a
                           measured availability curve (costs.h), which includes that sharing */
    /* Worker ranks per host (0: not modelled, every rank has its host to itself): the ranks, in
     * layout order (P, then D, then M pools; an instance's EP ranks together), fill hosts of this
     * many. Ranks on one host share its cores as processor sharing: a step's CPU work (the
     * profile's CPU times; the caller sets mp_costs.cpu_steps) progresses at 1 / the stretch for
     * the number of the host's ranks in a step at that moment (mp_share_ratio: the profile's
     * measured sharing curve, else --cores), recomputed whenever a step on the host starts or
     * ends; an EP step at the pace of its most loaded host, its all-to-alls not stretched. A
     * layout over many hosts of few ranks each is unaffected. Replaces the availability curve
     * and the fixed-at-start --cores model. */
    int host_ranks;
    /* With host_ranks: CPU ms the coordinator and the client spend per streamed token (their
     * gRPC streams, token path and bookkeeping; 0: not modelled). They run on the first host, as
     * one more participant in its processor sharing busy for the share of the run their CPU
     * takes (mean field: u = this x the workload's tokens / its arrival span, at most 1; a step
     * there is stretched by s(n) + u (s(n+1) - s(n)) instead of s(n)). */
    double client_cpu_ms_per_token;
    int gate_batches;   /* the coordinator holds requests while an instance has this many batches
                           of prompt tokens pending (0: 4, as coordinator/cluster_sched.c) */
    /* Replay (tests): when set, step durations come from here instead of the cost model, with the
     * step's group, token count and attention work. */
    double (*step_ms_fn)(void *ctx, int group, int n_tokens, double attn_work);
    void *step_ctx;
    double timeline_s;  /* timeline period (0: none) */
    FILE *timeline;     /* its JSON lines */
    const char *label;  /* JSON members added to each timeline line, or NULL */
} mp_sim_opts;

typedef struct {
    long steps, preemptions, handoffs, rejected;
    double busy_s[3]; /* summed step time of the pool's instances */
    double end_s;
} mp_sim_stats;

/* Simulates w's requests on layout l and fills rec[0..w->n) (times in seconds from the start;
 * free with rp_records_free). st may be NULL. Fails with INVALID_ARG (a layout without a way to
 * serve, a request larger than an instance's KV cache is reported per request instead) or NOMEM. */
moe_status mp_simulate(const mp_costs *c, const mp_layout *l, const mp_sim_opts *o, const wl_workload *w,
                       rp_record *rec, mp_sim_stats *st);

#endif
