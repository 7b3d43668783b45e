/* Internal to the cluster backend: the migration policy's state (per request, per instance, per
 * cluster) and the calls the coordinator loop makes into coordinator/cluster_migrate.c. Included
 * by cluster_internal.h only. Runs on the coordinator loop's thread; counters and the drain flag
 * that the front end's threads read or write are under the cluster's mu. */
#ifndef MOE_COORDINATOR_CLUSTER_MIGRATE_H
#define MOE_COORDINATOR_CLUSTER_MIGRATE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "cluster.pb-c.h"
#include "coordinator/cluster.h"

#define MIG_PAUSE_RING 1024

typedef enum {
    MIG_WHY_BALANCE = 0,
    MIG_WHY_DEFRAG,
    MIG_WHY_PRIORITY,
    MIG_WHY_DRAIN,
    MIG_WHY_FORCED
} mig_why;

/* A request's migration state. */
typedef struct {
    uint32_t id;         /* in flight (0: none) */
    int dst;             /* its destination instance while in flight */
    int64_t retry_after; /* after an abort */
    uint32_t mark;       /* tokens generated at the last hand-over (forced hook) */
    uint32_t n_done;     /* completed migrations */
} creq_mig;

/* An instance's. */
typedef struct {
    atomic_bool drain;   /* takes no new requests; running ones move away (set by the front end) */
    bool drained_logged; /* its drain completed and was logged */
    int out, in;         /* migrations in flight from / to it */
    int in_blocks;       /* blocks that incoming migrations will take */
    int64_t load_ns;     /* its last load report */
    int64_t end_ns;      /* a migration from or to it last ended */
    int waiting_ticks;   /* consecutive policy periods with requests waiting for KV */
    bool has_priority;   /* runs a request with priority < 0 (recomputed each period) */
} inst_mig;

typedef struct {
    uint32_t id;
    uint64_t seq_id;
    int src, dst, blocks;
    mig_why why;
    int64_t t0;
} mig_flight;

/* The cluster's. */
typedef struct {
    moe_cluster_migrate_opts o;
    uint32_t next_id;
    mig_flight *flights;
    int n_flights, cap_flights;
    int64_t next_tick, next_forced;
    moe_migration_counters ctr; /* under mu */
    float pause_ms[MIG_PAUSE_RING];
    uint64_t n_pause;
} cluster_mig;

struct moe_cluster;
struct creq;

/* moe_cluster_create: defaults for unset knobs, the forced hook from the environment. */
void moe_cluster_mig_init(struct moe_cluster *c);
void moe_cluster_mig_free(struct moe_cluster *c);
/* Every coordinator loop turn: policy periods, forced moves, lost flights. True when it started
 * something. */
bool moe_cluster_mig_tick(struct moe_cluster *c, int64_t now);
/* A source worker's MigrateEnd. */
void moe_cluster_mig_on_end(struct moe_cluster *c, int src_rank,
                            const Moeserve__Cluster__V1__MigrateEnd *m);
/* A request ends (finished, failed, cancelled) while it may be migrating: the destination frees
 * whatever it reserved for it. */
void moe_cluster_mig_on_request_end(struct moe_cluster *c, struct creq *r);
/* Fills the snapshot's migration counters (caller holds mu). */
void moe_cluster_mig_snapshot(struct moe_cluster *c, moe_cluster_status *out);

#endif
