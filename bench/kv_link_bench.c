/* KV hand-off throughput, UCX comm (worker/comm_ucx.c over the cluster link) vs Open MPI point to
 * point, between two processes: `mpirun -np 3 kv_link_bench [--block BYTES] [--mib TOTAL]
 * [--window N] [--reps R] [--listen ADDR:0]`. World rank 2 is the link's coordinator, ranks 0 and
 * 1 join it; the same blocks go from rank 1 to rank 0 with the same window of outstanding
 * transfers, MPI first, then UCX, and the best of R repetitions is printed as GB/s
 * (1 GB = 1e9 bytes). MPI is only the launcher and the reference: which transport each side uses
 * is whatever UCX_TLS / Open MPI's MCA settings say (our link forces UCX's tcp unless UCX_TLS is
 * set). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "ctrl/link_ucx.h"
#include "worker/comm_mpi.h"
#include "worker/comm_ucx.h"

#define TOKEN "kv-link-bench-token-0123456789"

typedef struct {
    size_t block;
    int n, window, reps;
    const char *listen;
} opts;

/* Moves o->n blocks from member src to member dst through comm c, window outstanding at a time;
 * returns seconds, or -1 on error. */
static double transfer(moe_comm *c, bool sender, int peer, uint8_t *buf, const opts *o)
{
    moe_comm_req **req = calloc((size_t)o->window, sizeof *req);
    int *idx = calloc((size_t)o->window, sizeof *idx);
    int posted = 0, done = 0;
    int64_t t0 = moe_now_ns();
    while (done < o->n) {
        for (int w = 0; w < o->window; w++) {
            if (!req[w] && posted < o->n) {
                uint8_t *b = buf + (size_t)w * o->block;
                if (sender) /* the block number, checked by the receiver */
                    b[0] = (uint8_t)posted;
                moe_status st = sender ? c->ops->isend(c->ctx, b, (int)o->block, peer, posted, &req[w])
                                       : c->ops->irecv(c->ctx, b, (int)o->block, peer, posted, &req[w]);
                if (st != MOE_OK) {
                    fprintf(stderr, "post: %s\n", moe_error_message());
                    return -1;
                }
                idx[w] = posted++;
            }
            if (req[w]) {
                bool d = false;
                if (c->ops->test(c->ctx, req[w], &d) != MOE_OK) {
                    fprintf(stderr, "test: %s\n", moe_error_message());
                    return -1;
                }
                if (d) {
                    req[w] = NULL;
                    done++;
                    /* spot check: the receiver sees the block number the sender wrote */
                    if (!sender && buf[(size_t)w * o->block] != (uint8_t)idx[w]) {
                        fprintf(stderr, "block %d corrupt\n", idx[w]);
                        return -1;
                    }
                }
            }
        }
    }
    double s = (double)(moe_now_ns() - t0) * 1e-9;
    free(req);
    free(idx);
    return s;
}

static double best(moe_comm *c, bool sender, int peer, uint8_t *buf, const opts *o,
                   MPI_Comm world)
{
    double b = 1e30;
    for (int r = 0; r < o->reps; r++) {
        MPI_Barrier(world);
        double s = transfer(c, sender, peer, buf, o);
        if (s < 0)
            return -1;
        /* the receiver's time is the transfer's: it ends when the last byte is in */
        MPI_Bcast(&s, 1, MPI_DOUBLE, 0, world);
        if (s < b)
            b = s;
    }
    return b;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int wrank, wsize;
    MPI_Comm_rank(MPI_COMM_WORLD, &wrank);
    MPI_Comm_size(MPI_COMM_WORLD, &wsize);
    moe_log_init(wrank);
    if (moe_log_threshold > MOE_LOG_WARN)
        moe_log_threshold = MOE_LOG_WARN;
    opts o = {.block = 256 << 10, .window = 16, .reps = 3, .listen = "127.0.0.1:0"};
    size_t mib = 256;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--block"))
            o.block = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--mib"))
            mib = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--window"))
            o.window = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            o.reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--listen"))
            o.listen = argv[i + 1];
    }
    o.n = (int)((mib << 20) / o.block);
    if (wsize != 3 || o.n < 1 || o.window < 1) {
        if (wrank == 0)
            fprintf(stderr, "kv_link_bench: run with mpirun -np 3; --block, --mib, --window > 0\n");
        MPI_Finalize();
        return 2;
    }
    /* World rank 2 is the coordinator; ranks 0 and 1 (their own communicator) move the bytes,
     * 1 to 0, as a prefill and a decode rank of two instances would. */
    bool coord = wrank == 2;
    MPI_Comm pair;
    MPI_Comm_split(MPI_COMM_WORLD, coord, wrank, &pair);
    moe_link *l = NULL;
    int port = 0;
    char host[64] = "";
    if (coord) {
        moe_link_ucx_opts lo = {.addr = o.listen, .token = TOKEN};
        if (moe_link_ucx_listen(&lo, &l) != MOE_OK) {
            fprintf(stderr, "listen: %s\n", moe_error_message());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        port = moe_link_ucx_port(l);
        snprintf(host, sizeof host, "%.*s", (int)(strrchr(o.listen, ':') - o.listen), o.listen);
        if (!strcmp(host, "0.0.0.0"))
            snprintf(host, sizeof host, "127.0.0.1");
    }
    MPI_Bcast(&port, 1, MPI_INT, 2, MPI_COMM_WORLD);
    MPI_Bcast(host, sizeof host, MPI_CHAR, 2, MPI_COMM_WORLD);
    if (coord) { /* serve the link until the pair is done */
        MPI_Request done;
        MPI_Ibarrier(MPI_COMM_WORLD, &done);
        int flag = 0;
        moe_link_event ev;
        while (!flag) {
            while (moe_link_poll(l, &ev))
                ;
            moe_sleep_ns(1000000);
            MPI_Test(&done, &flag, MPI_STATUS_IGNORE);
        }
        moe_link_free(l);
        MPI_Comm_free(&pair);
        MPI_Finalize();
        return 0;
    }
    int rank = wrank;
    bool sender = rank == 1;
    uint8_t *buf = calloc((size_t)o.window, o.block);
    moe_comm mc;
    if (moe_comm_mpi_create(pair, &mc) != MOE_OK) {
        fprintf(stderr, "comm mpi: %s\n", moe_error_message());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    double t_mpi = best(&mc, sender, 1 - rank, buf, &o, pair);

    char addr[96];
    snprintf(addr, sizeof addr, "%s:%d", host, port);
    moe_link_ucx_opts jo = {.addr = addr, .token = TOKEN, .timeout_ms = 20000};
    if (moe_link_ucx_join(&jo, &l) != MOE_OK) {
        fprintf(stderr, "join: %s\n", moe_error_message());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int me = moe_link_self(l), peer = -1;
    MPI_Sendrecv(&me, 1, MPI_INT, 1 - rank, 0, &peer, 1, MPI_INT, 1 - rank, 0, pair,
                 MPI_STATUS_IGNORE);
    /* wait until the link has announced the other one */
    int64_t end = moe_now_ns() + 20000000000LL;
    moe_link_event ev;
    while (!moe_link_ucx_ep(l, peer) && moe_now_ns() < end)
        moe_link_poll(l, &ev);
    moe_comm uc;
    if (!moe_link_ucx_ep(l, peer) || moe_comm_ucx_create(l, &uc) != MOE_OK)
        MPI_Abort(MPI_COMM_WORLD, 1);
    double t_ucx = best(&uc, sender, peer, buf, &o, pair);
    if (rank == 0) {
        double bytes = (double)o.n * (double)o.block;
        const char *tls = getenv("UCX_TLS");
        printf("kv_link_bench: %d blocks of %zu bytes (%.0f MiB), window %d, best of %d; UCX_TLS=%s\n",
               o.n, o.block, bytes / (1 << 20), o.window, o.reps, tls ? tls : "(unset: link forces tcp)");
        printf("  mpi point-to-point : %7.3f GB/s  (%.3f s)\n", t_mpi > 0 ? bytes / t_mpi / 1e9 : 0, t_mpi);
        printf("  ucx comm over link : %7.3f GB/s  (%.3f s)\n", t_ucx > 0 ? bytes / t_ucx / 1e9 : 0, t_ucx);
    }
    uc.ops->destroy(uc.ctx);
    MPI_Barrier(pair);
    moe_link_free(l);
    mc.ops->destroy(mc.ctx);
    free(buf);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Comm_free(&pair);
    MPI_Finalize();
    return t_mpi < 0 || t_ucx < 0;
}
