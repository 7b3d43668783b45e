/* moe-serve: the cluster binary. `moe-serve coordinator` and `moe-serve instance` run one failure
 * domain each of an elastic cluster (tools/moe_serve/elastic_main.c). Otherwise, under mpirun,
 * rank 0 is the coordinator (gRPC front end, tokenizer, scheduler) and every other rank a worker
 * of a prefill, decode or mixed instance: every rank parses the same argv and computes the same
 * layout; communicators: one for control messages, one for KV data, one per instance (its
 * expert-parallel group) and one per pool. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctrl/link_mpi.h"

#include "common/log.h"
#include "moe_serve/serve.h"

/* ASan builds: Open MPI keeps what it allocates in init/finalize (and the components it unloads
 * make those stacks unreadable), so LeakSanitizer ignores allocations made inside them. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#else
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

int main(int argc, char **argv)
{
    if (argc > 1 && (!strcmp(argv[1], "coordinator") || !strcmp(argv[1], "instance"))) {
        serve_args ea;
        moe_log_init(0);
        int prc = serve_parse_args(argc, argv, &ea, true);
        if (prc != 0)
            return prc > 0 ? 0 : 2;
        return ea.mode == SERVE_MODE_COORDINATOR ? serve_elastic_coordinator(&ea)
                                                 : serve_instance_main(&ea);
    }
    int provided = 0;
    LSAN_OFF();
    /* FUNNELED: only this thread calls MPI; gRPC's threads never do. */
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "moe-serve: MPI_Init_thread failed\n");
        LSAN_ON();
        return 1;
    }
    int rank = 0, world = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    LSAN_ON();
    moe_log_init(rank);

    serve_args a;
    int prc = serve_parse_args(argc, argv, &a, rank == 0);
    if (prc != 0) {
        LSAN_OFF();
        MPI_Finalize();
        return prc > 0 ? 0 : 2;
    }
    serve_layout l;
    char err[512];
    if (serve_plan_layout(&a, world, &l, err, sizeof err) != 0) {
        if (rank == 0)
            fprintf(stderr, "moe-serve: %s\n", err);
        LSAN_OFF();
        MPI_Finalize();
        return 2;
    }
    if (rank == 0 && l.auto_colocated)
        fprintf(stderr, "moe-serve: one worker rank: running it as a mixed (colocated) instance\n");
    if (rank == 0 && l.n_spare)
        fprintf(stderr, "moe-serve: %d rank(s) beyond the layout stay idle\n", l.n_spare);

    MPI_Comm ctrl, data, inst, pool, node;
    LSAN_OFF();
    MPI_Comm_dup(MPI_COMM_WORLD, &ctrl);
    MPI_Comm_dup(MPI_COMM_WORLD, &data);
    int idx = l.rank_instance[rank];
    MPI_Comm_split(MPI_COMM_WORLD, idx >= 0 ? idx : MPI_UNDEFINED, rank, &inst);
    MPI_Comm_split(MPI_COMM_WORLD, idx >= 0 ? (int)l.instances[idx].pool : MPI_UNDEFINED, rank,
                   &pool);
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    int local = 1;
    MPI_Comm_size(node, &local);
    MPI_Comm_set_errhandler(ctrl, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(data, MPI_ERRORS_RETURN);
    LSAN_ON();

    int rc = 1;
    if (rank == 0) {
        moe_link *link = NULL;
        if (moe_link_mpi_create(ctrl, &link) != MOE_OK)
            fprintf(stderr, "moe-serve: %s\n", moe_error_message());
        else
            rc = serve_coordinator_main(&a, &l, link);
        moe_link_free(link);
    } else {
        rc = serve_worker_main(&a, &l, ctrl, data, inst, local);
    }

    LSAN_OFF();
    if (inst != MPI_COMM_NULL)
        MPI_Comm_free(&inst);
    if (pool != MPI_COMM_NULL)
        MPI_Comm_free(&pool);
    MPI_Comm_free(&node);
    MPI_Comm_free(&data);
    MPI_Comm_free(&ctrl);
    serve_layout_free(&l);
    MPI_Finalize();
    return rc;
}
