/* A worker rank's main loop: loads the model, runs the engine of its instance, obeys the
 * coordinator's control messages (start, free, shutdown), reports every engine step's tokens in
 * one message, heartbeats, and moves KV between prefill and decode instances (DistServe pull:
 * the prefill side parks a sequence and offers it, the decode side reserves blocks, posts its
 * receives and pulls, verifies the checksums, and acks; a lease frees an offer nobody pulls). */
#ifndef MOE_WORKER_WORKER_LOOP_H
#define MOE_WORKER_WORKER_LOOP_H

#include <mpi.h>
#include <signal.h>

#include "common/status.h"
#include "ctrl/link.h"
#include "common/pool.h"
#include "worker/comm.h"
#include "worker/engine.h"

typedef enum {
    /* A worker serves its instance's pool (values match moeserve.cluster.v1.Role too) */
    MOE_WORKER_PREFILL = MOE_POOL_PREFILL,
    MOE_WORKER_DECODE = MOE_POOL_DECODE,
    MOE_WORKER_MIXED = MOE_POOL_MIXED,
    MOE_WORKER_SPARE = 4, /* beyond the layout: loads nothing, waits for Shutdown */
} moe_worker_role;

typedef struct {
    const char *model_dir;
    moe_worker_role role;
    int instance_id;        /* the layout's target index (mpirun launch); -1 when joined */
    moe_link *link;         /* control messages (cluster.proto, tag = kind); borrowed */
    moe_comm *data;         /* raw KV blocks to and from other members (by member id); borrowed */
    MPI_Comm instance_comm; /* the ranks of this instance (ep_size of them), or MPI_COMM_NULL */
    /* Joined over the network (moe-serve instance): the coordinator may be lost and come back,
     * so the loop calls rejoin (moe_link_ucx_rejoin) instead of ending; and the instance may leave on
     * its own: when *leave_flag becomes non-zero (SIGTERM) it asks the coordinator to drain it
     * and exits once told to shut down. NULL leave_flag: only Shutdown ends the loop. */
    moe_status (*rejoin)(moe_link *link); /* NULL: a lost coordinator ends the loop */
    const volatile sig_atomic_t *leave_flag;
    moe_engine_opts engine;
    int heartbeat_ms;  /* > 0 */
    int kv_timeout_ms; /* one KV transfer attempt, > 0 */
    int lease_ms;      /* an offered KV is freed after this long without a pull or renewal */
    /* Layer-by-layer KV hand-off: the prefill side asks its decode rank to reserve at admission
     * (KvReserve) and, once accepted, sends each layer's KV as soon as its attention wrote it;
     * otherwise (or when the decode side has no room) whole blocks are pulled after the prefill. */
    bool kv_layerwise;
    /* EPLB (expert-parallel instances): every eplb_interval steps the group sums its expert loads
     * and places redundant_experts replicas of the hottest experts (worker/eplb.h). 0: off. */
    int redundant_experts;
    int eplb_interval;
} moe_worker_opts;

/* Runs the worker until the coordinator sends Shutdown (or the control link fails). Failures to
 * load are reported to the coordinator (WorkerReady.ok = false) and the worker still waits for
 * Shutdown, so that every rank exits through the same path. Returns MOE_OK after a clean
 * shutdown; otherwise the error (moe_error_message says what). An expert-parallel rank whose peer
 * is gone returns MOE_ERR_UNAVAILABLE with the group's all-reduce still pending: its caller must
 * end the process with MPI_Abort, not MPI_Finalize (which would wait for the dead peer).
 * Test hooks (environment, active only with MOE_TEST_HOOKS=1: common/test_hook.h): MOE_TEST_CORRUPT_KV (see worker/kv_transfer.h);
 * MOE_TEST_HANG_RANK=R with MOE_TEST_HANG_AFTER=K: world rank R stops answering anything once it
 * has received K StartSeq or KvOffer messages (a hung rank); MOE_TEST_PULL_DELAY_MS=N: a decode
 * rank waits N ms after each offer before pulling and renews no lease meanwhile (lease expiry). */
moe_status moe_worker_run(const moe_worker_opts *o);

#endif
