/* One measured run of moe-bench: sends a workload's requests at their arrival times, each on its
 * own stream, records when every token reached the client; meanwhile a progress line on stderr and
 * a timeline of the cluster's queues and KV usage (ClusterStatus polled). */
#ifndef MOE_TOOLS_BENCH_RUN_H
#define MOE_TOOLS_BENCH_RUN_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "tools/moe_bench/report.h"
#include "tools/moe_bench/workload.h"
#include "tools/moe_client/client.h"

typedef struct {
    int concurrency; /* most streams open at once (later arrivals wait: their TTFT counts it) */
    int vocab;
    float temperature;
    bool ignore_eos;
    int64_t timeout_ms;
    int status_ms; /* ClusterStatus poll period for the timeline; 0: none */
    bool progress; /* the progress line on stderr */
    FILE *jsonl;   /* timeline lines go here (NULL: not kept) */
    const char *label; /* JSON members added to every timeline line ("\"rate\": 2"), or NULL */
} bench_cfg;

/* The server's vocabulary size from ClusterStatus, or -1 (message on stderr). */
int bench_server_vocab(moe_rpc_client *cli);

/* Sends w's requests (prompts from wl_prompt with wo's seed) and fills rec[0..w->n) (the caller
 * frees them with rp_records_free). Fails with NOMEM or INTERNAL (a thread could not start);
 * requests that fail at the server are records with ok = false, not a failure of the run. */
moe_status bench_run(moe_rpc_client *cli, const bench_cfg *c, const wl_workload *w, const wl_opts *wo,
                     rp_record *rec);

#endif
