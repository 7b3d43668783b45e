/* The coordinator's cluster backend (member 0): the request table, placement of each request on a
 * prefill and a decode instance (or one mixed instance), membership and control messages with the
 * workers over the cluster link (heartbeats, joins, losses), detokenization and stop strings, and
 * drain. It implements the front end's backend vtable (coordinator/frontend.h): the gRPC threads
 * only queue work for it; everything else runs in moe_cluster_run on the thread that owns the
 * link. */
#ifndef MOE_COORDINATOR_CLUSTER_H
#define MOE_COORDINATOR_CLUSTER_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include "common/model_config.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/frontend.h"
#include "ctrl/link.h"

typedef struct moe_cluster moe_cluster;

/* One model replica: ep_size ranks (1 today) that will split the experts between them. */
typedef struct {
    moe_pool_kind pool;
    int ep_size;
    int ranks[MOE_FRONTEND_MAX_EP]; /* world ranks, ranks[0] leads (talks to the coordinator) */
} moe_cluster_instance;

/* The live-migration policy (coordinator/cluster_migrate.c; docs/migration.md explains each
 * knob). Fields <= 0 take the default in brackets. */
typedef struct {
    bool no_policy;           /* true: no balance, de-fragmentation or priority moves (drain
                                 and the forced hook work either way) */
    double high_water;        /* [0.85] virtual KV usage above which an instance sheds requests */
    double low_water;         /* [0.60] ... to instances below this */
    double priority_headroom; /* [0.30] added to the virtual usage of an instance running a
                                 request with priority < 0 */
    int interval_ms;          /* [50] policy period */
    int max_inflight;         /* [4] migrations in flight in the cluster */
    int final_blocks;         /* [2] unsent blocks at most when the source pauses */
    int max_stages;           /* [32] stages before the final one is forced */
    int stage_blocks;         /* [128] blocks per non-final stage */
    int min_remaining;        /* [16] requests this close to their max_new_tokens stay put
                                 (not when draining) */
    int retry_ms;             /* [1000] after an abort, a request waits this long to move again */
    int waiting_ticks;        /* [3] policy periods an instance must keep requests waiting for KV
                                 before de-fragmentation moves requests off it */
    int every_tokens;         /* test/bench hook: move every decoding request to the next
                                 instance of its pool each time it has generated this many
                                 tokens (0 = off; $MOE_TEST_MIGRATE_EVERY when 0) */
} moe_cluster_migrate_opts;

typedef struct {
    const char *model_name;      /* for ClusterStatus and logs */
    const moe_model_config *cfg; /* borrowed: EOS ids, vocabulary, context */
    const moe_tokenizer *tok;    /* borrowed: tokenize, detokenize */
    moe_link *link;              /* control messages with the members (borrowed); we are member 0 */
    /* Elastic (moe-serve coordinator): no instance is known at start; ranks join over the link,
     * each its own placement target, and instances come and go (a lost one's requests go on
     * elsewhere). Otherwise (mpirun): the layout below is fixed, one failure domain. */
    bool elastic;
    int world_size;
    int n_instances;
    const moe_cluster_instance *instances; /* [n_instances], copied */
    const int *spare_ranks; /* ranks outside every instance (they only wait for Shutdown) */
    int n_spare;

    int max_requests; /* admitted and unfinished; more -> RESOURCE_EXHAUSTED. > 0 */
    int max_queue;    /* admitted, not yet sent to a worker; more -> RESOURCE_EXHAUSTED. >= 0 */
    int heartbeat_timeout_ms; /* silence after which an instance is UNREACHABLE. > 0 */
    int startup_timeout_ms;   /* for every worker's WorkerReady. > 0 */
    double drain_timeout_s;   /* running requests may finish for this long after a drain starts */

    /* Called once from moe_cluster_run when every instance is ready (for the start-up line). */
    void (*on_ready)(void *ctx, const moe_cluster *c);
    void *on_ready_ctx;
    /* Set asynchronously (a signal handler) to start the drain. May be NULL. */
    volatile sig_atomic_t *drain_flag;
    moe_cluster_migrate_opts migrate;
} moe_cluster_opts;

/* Copies what it needs from opts (the borrowed pointers must outlive the cluster). */
moe_status moe_cluster_create(const moe_cluster_opts *opts, moe_cluster **out);
/* Frees the table; requests still open get moe_frontend_error(UNAVAILABLE). NULL is a no-op. */
void moe_cluster_free(moe_cluster *c);

/* The backend vtable for moe_grpc_server_start, ctx = c. Thread-safe slots. */
void moe_cluster_backend(moe_cluster *c, moe_frontend_backend *out);

/* Runs the coordinator loop: waits for every worker's WorkerReady (fails with a message naming
 * the rank and its error, or UNAVAILABLE after startup_timeout_ms), then serves until a drain
 * (drain_flag or moe_cluster_drain) has finished: no new requests, running ones finish within
 * drain_timeout_s, the rest end with UNAVAILABLE. Never sleeps a fixed time while tokens are in
 * flight; idle, it blocks on a condition variable the front end signals, polling the link in short
 * naps. Must be called on the thread that initialised MPI. */
moe_status moe_cluster_run(moe_cluster *c);
/* Starts the drain (thread-safe, not async-signal-safe: signal handlers use drain_flag). */
void moe_cluster_drain(moe_cluster *c);
/* After moe_cluster_run: tells every worker to exit and waits up to timeout_ms for their goodbyes.
 * UNAVAILABLE when some rank did not answer (hung): the caller should MPI_Abort rather than
 * MPI_Finalize, which would wait for it forever. */
moe_status moe_cluster_shutdown_workers(moe_cluster *c, int timeout_ms);

/* Drains one instance, or undoes it (thread-safe; the drain_instance backend slot). */
moe_status moe_cluster_drain_instance(moe_cluster *c, uint32_t instance, bool undo,
                                      moe_instance_status *out);

/* A snapshot like the ClusterStatus backend slot (for the start-up line and tests). */
void moe_cluster_snapshot(moe_cluster *c, moe_cluster_status *out);

#endif
