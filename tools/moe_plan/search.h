/* moe-plan's runs at a rate, the goodput search over rates, and the layout search. */
#ifndef MOE_TOOLS_PLAN_SEARCH_H
#define MOE_TOOLS_PLAN_SEARCH_H

#include <stdio.h>

#include "tools/moe_bench/report.h"
#include "tools/moe_bench/workload.h"
#include "tools/moe_plan/sim.h"

typedef struct {
    const mp_costs *c;
    const mp_layout *l;
    mp_sim_opts sim;
    wl_opts wl;
    rp_slo slo;
    FILE *jsonl;       /* requests, timeline and summary lines of every run (NULL: none) */
    double timeline_s; /* with jsonl */
    char source[256];  /* the last run's workload, for the report */
} mp_run_ctx;

/* Builds the workload at `rate` (< 0: as given), simulates it, summarizes into *s. */
moe_status mp_run_at(mp_run_ctx *x, double rate, rp_summary *s, mp_sim_stats *st);
/* DistServe's goodput: the highest rate whose attainment is at least target (doubling from
 * 1/64 req/s, then 12 bisections); 0 when even the lowest fails. *attain_out (may be NULL): the
 * attainment at that rate. */
double mp_goodput(mp_run_ctx *x, double target, double *attain_out);

typedef struct {
    int ranks, machine_ranks, top;
    double target;
    mp_sim_opts sim;
    wl_opts wl;
    rp_slo slo;
    const char *profile;
} mp_search_opts;

/* Ranks the layouts of at most o->ranks worker ranks (disaggregated P x EP + D x EP, and colocated
 * M x EP, EP sizes powers of two dividing the expert count) by goodput per rank and prints the
 * best o->top with their predicted attainment at the best layout's goodput rate. */
moe_status mp_search(const mp_costs *c, const mp_search_opts *o, FILE *out);

#endif
