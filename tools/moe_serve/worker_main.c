/* moe-serve, worker ranks: engine options from the command line, then the worker loop until the
 * coordinator says Shutdown. */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include "common/log.h"
#include "ctrl/link_mpi.h"
#include "serve.h"
#include "worker/comm_mpi.h"
#include "worker/worker_loop.h"

static volatile sig_atomic_t signalled = 0;

static void on_signal(int sig)
{
    signalled = sig;
}

/* The coordinator schedules each rank of an expert-parallel instance as its own target (attention
 * is data-parallel): this rank's index among them, in layout order. */
static int target_index(const serve_layout *l, int rank)
{
    for (int i = 0, t = 0; i < l->n_instances; i++)
        for (int j = 0; j < l->instances[i].ep_size; j++, t++)
            if (l->instances[i].ranks[j] == rank)
                return t;
    return -1;
}

void serve_fill_worker_opts(const serve_args *a, moe_worker_role role, int local_ranks,
                            moe_worker_opts *o)
{
    int threads = a->threads;
    if (threads <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = (int)(cores > 0 ? cores : 1) / (local_ranks > 0 ? local_ranks : 1);
        if (threads < 1)
            threads = 1;
    }
    *o = (moe_worker_opts){.model_dir = a->model_dir,
                           .role = role,
                           .instance_id = -1,
                           .instance_comm = MPI_COMM_NULL,
                           .engine = {.n_threads = threads,
                                      .block_size = a->block_size,
                                      .n_kv_blocks = a->kv_blocks,
                                      .kv_budget_bytes = (size_t)a->kv_mb << 20,
                                      .max_batch_tokens = a->batch_tokens,
                                      .max_seqs = a->max_seqs,
                                      .device = a->device},
                           .heartbeat_ms = a->heartbeat_ms,
                           .kv_timeout_ms = a->kv_timeout_ms,
                           .lease_ms = a->lease_ms,
                           .kv_layerwise = !a->kv_block_transfer,
                           .redundant_experts = a->redundant_experts,
                           .eplb_interval = a->eplb_interval};
}

int serve_worker_main(const serve_args *a, const serve_layout *l, MPI_Comm ctrl, MPI_Comm data,
                      MPI_Comm instance_comm, int local_ranks)
{
    /* Workers leave only through the coordinator's Shutdown, so that a drain can finish: mpirun
     * forwards SIGUSR1 (and, when it is itself signalled, SIGTERM) to every rank. */
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int rank;
    MPI_Comm_rank(ctrl, &rank);
    int idx = l->rank_instance[rank];
    moe_worker_role role = MOE_WORKER_SPARE;
    if (idx >= 0)
        role = (moe_worker_role)l->instances[idx].pool; /* common/pool.h: the same values */
    moe_link *link = NULL;
    moe_comm dc;
    moe_status st = moe_link_mpi_create(ctrl, &link);
    if (st == MOE_OK && (st = moe_comm_mpi_create(data, &dc)) != MOE_OK) {
        moe_link_free(link);
        link = NULL;
    }
    if (st != MOE_OK) {
        fprintf(stderr, "moe-serve: rank %d: %s\n", rank, moe_error_message());
        return 1;
    }
    moe_worker_opts o;
    serve_fill_worker_opts(a, role, local_ranks, &o);
    o.instance_id = target_index(l, rank);
    o.link = link;
    o.data = &dc;
    o.instance_comm = instance_comm;
    st = moe_worker_run(&o);
    dc.ops->destroy(dc.ctx);
    moe_link_free(link);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-serve: rank %d: %s\n", rank, moe_error_message());
        return 1;
    }
    return 0;
}
