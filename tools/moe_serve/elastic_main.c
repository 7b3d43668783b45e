/* moe-serve coordinator / moe-serve instance: one failure domain each of an elastic cluster
 * (docs/cluster.md). The coordinator listens for instances on --cluster-listen; an instance (one
 * process, or the E ranks of one `mpirun -np E` job splitting the experts) joins it with the
 * cluster token, serves until told to shut down, rejoins a coordinator that went away, and on
 * SIGTERM/SIGINT asks to be drained (its requests migrate away) and exits 0. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cluster.pb-c.h"
#include "common/clock.h"
#include "common/log.h"
#include "ctrl/link_ucx.h"
#include "serve.h"
#include "worker/comm_ucx.h"

static volatile sig_atomic_t leave_flag = 0;

static void on_leave_signal(int sig)
{
    (void)sig;
    leave_flag = 1;
}

int serve_elastic_coordinator(const serve_args *a)
{
    char *token = NULL;
    if (moe_link_read_token(a->token_file, &token) != MOE_OK) {
        fprintf(stderr, "moe-serve coordinator: %s\n", moe_error_message());
        return 2;
    }
    moe_link_ucx_opts lo = {.addr = a->cluster_listen, .token = token};
    moe_link *link = NULL;
    if (moe_link_ucx_listen(&lo, &link) != MOE_OK) {
        fprintf(stderr, "moe-serve coordinator: --cluster-listen %s: %s\n", a->cluster_listen,
                moe_error_message());
        free(token);
        return 2;
    }
    int rc = serve_coordinator_main(a, NULL, link);
    moe_link_free(link);
    free(token);
    return rc;
}

/* An id naming this instance (every rank of the job shares rank 0's). */
static void make_uuid(char *out, size_t cap)
{
    unsigned char b[12] = {0};
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(b, 1, sizeof b, f) : 0;
    if (f)
        fclose(f);
    if (got != sizeof b) { /* no urandom: time and pid still tell instances apart */
        int64_t t = moe_now_ns();
        memcpy(b, &t, sizeof t);
        int pid = (int)getpid();
        memcpy(b + 8, &pid, sizeof pid);
    }
    size_t n = 0;
    for (size_t i = 0; i < sizeof b && n + 3 < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%02x", b[i]);
}

/* mpirun passes its --mca settings on to the ranks as OMPI_MCA_*: say how long a SIGTERM to
 * mpirun leaves this instance to drain, loudly when it is Open MPI's default of 1 s (SIGKILL
 * 1 s after the ranks' SIGTERM: every request in flight would be resumed, not migrated). */
static void log_drain_window(void)
{
    const char *v = getenv("OMPI_MCA_odls_base_sigkill_timeout");
    int s = v ? atoi(v) : 1;
    if (s < 10)
        MOE_LOG_W("a SIGTERM to mpirun gives this instance %d s to drain before SIGKILL "
                  "(odls_base_sigkill_timeout%s): start it with `mpirun --mca "
                  "odls_base_sigkill_timeout S`, S above the drain time (SIGUSR1 to mpirun drains "
                  "at once)",
                  s, v ? "" : " not set: Open MPI's default");
    else
        MOE_LOG_I("a SIGTERM to mpirun reaches the ranks %d s later; they then have %d s to drain "
                  "(odls_base_sigkill_timeout)",
                  s, s);
}

static bool under_mpirun(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") != NULL;
}

int serve_instance_main(const serve_args *a)
{
    /* Expert parallelism inside the instance: its ranks are this mpirun job's. One rank alone
     * needs no MPI at all. */
    bool mpi = under_mpirun();
    MPI_Comm inst = MPI_COMM_NULL;
    int ep_rank = 0, ep_size = 1, local = 1;
    if (mpi) {
        int provided = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            fprintf(stderr, "moe-serve instance: MPI_Init_thread failed\n");
            return 1;
        }
        MPI_Comm_dup(MPI_COMM_WORLD, &inst);
        MPI_Comm_set_errhandler(inst, MPI_ERRORS_RETURN);
        MPI_Comm_rank(inst, &ep_rank);
        MPI_Comm_size(inst, &ep_size);
        const char *ls = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
        local = ls ? atoi(ls) : 1;
    }
    /* After MPI_Init, which may install handlers of its own: SIGTERM, SIGINT and SIGUSR1 mean
     * "leave". mpirun forwards SIGUSR1 to every rank at once; a SIGTERM to mpirun reaches the
     * ranks only odls_base_sigkill_timeout seconds later, and SIGKILL as many after that
     * (docs/cluster.md). */
    struct sigaction sa = {.sa_handler = on_leave_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    moe_log_init(ep_rank);
    if (mpi && ep_rank == 0)
        log_drain_window();
    char uuid[64] = "";
    if (ep_rank == 0)
        make_uuid(uuid, sizeof uuid);
    if (mpi)
        MPI_Bcast(uuid, sizeof uuid, MPI_CHAR, 0, inst);

    char host[64] = "";
    if (a->host_label)
        snprintf(host, sizeof host, "%s", a->host_label);
    else
        gethostname(host, sizeof host - 1);
    moe_worker_role role = (moe_worker_role)a->pool; /* common/pool.h: the same values */
    Moeserve__Cluster__V1__Join j;
    moeserve__cluster__v1__join__init(&j);
    j.instance_uuid = uuid;
    j.ep_size = (uint32_t)ep_size;
    j.ep_rank = (uint32_t)ep_rank;
    j.role = (Moeserve__Cluster__V1__Role)role;
    j.host = host;
    size_t hello_len = moeserve__cluster__v1__join__get_packed_size(&j);
    uint8_t hello[512];
    int rc = 1;
    char *token = NULL;
    moe_link *link = NULL;
    moe_comm dc;
    bool have_dc = false;
    if (hello_len > sizeof hello) {
        fprintf(stderr, "moe-serve instance: --host-label too long\n");
        goto out;
    }
    moeserve__cluster__v1__join__pack(&j, hello);
    if (moe_link_read_token(a->token_file, &token) != MOE_OK) {
        fprintf(stderr, "moe-serve instance: %s\n", moe_error_message());
        rc = 2;
        goto out;
    }
    moe_link_ucx_opts lo = {.addr = a->join,
                            .token = token,
                            .hello = hello,
                            .hello_len = hello_len,
                            .timeout_ms = 5000,
                            .host = host};
    /* The coordinator may not be up yet (or restarting): keep trying, but a refused token is
     * final. */
    int64_t give_up = moe_now_ns() + (int64_t)a->startup_timeout_s * 1000000000;
    for (;;) {
        moe_status st = moe_link_ucx_join(&lo, &link);
        if (st == MOE_OK)
            break;
        if (st == MOE_ERR_PERMISSION || moe_now_ns() > give_up || leave_flag) {
            fprintf(stderr, "moe-serve instance: --join %s: %s\n", a->join, moe_error_message());
            rc = st == MOE_ERR_PERMISSION ? 3 : leave_flag ? 0 : 1;
            goto out;
        }
        MOE_LOG_W("--join %s: %s; retrying", a->join, moe_error_message());
        moe_sleep_ns(1000000000);
    }
    if (moe_comm_ucx_create(link, &dc) != MOE_OK) {
        fprintf(stderr, "moe-serve instance: %s\n", moe_error_message());
        goto out;
    }
    have_dc = true;
    MOE_LOG_I("joined %s as member %d (%s, rank %d of %d, instance %s)", a->join,
              moe_link_self(link), moe_pool_name((moe_pool_kind)a->pool), ep_rank, ep_size, uuid);
    moe_worker_opts o;
    serve_fill_worker_opts(a, role, local, &o);
    o.link = link;
    o.data = &dc;
    o.instance_comm = inst;
    o.rejoin = moe_link_ucx_rejoin;
    o.leave_flag = &leave_flag;
    moe_status st = moe_worker_run(&o);
    if (st != MOE_OK)
        fprintf(stderr, "moe-serve instance: %s\n", moe_error_message());
    if (st != MOE_OK && ep_size > 1) {
        /* The group is broken (a peer is gone or hung): a collective may be pending, so no
         * MPI_Finalize; the abort ends this mpirun job, the instance's failure domain, at once. */
        fflush(NULL);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    rc = st == MOE_OK ? 0 : 1;
out:
    if (have_dc)
        dc.ops->destroy(dc.ctx);
    moe_link_free(link);
    free(token);
    if (mpi) {
        MPI_Comm_free(&inst);
        MPI_Finalize();
    }
    return rc;
}
