/* Internal to the cluster backend (coordinator/cluster.c: loop, MPI, front-end slots;
 * cluster_requests.c: request table and token delivery; cluster_sched.c: instances and
 * placement; cluster_migrate.c: live-migration policy and drain). Nobody else includes this. Everything here runs on the coordinator loop's thread
 * unless it says otherwise; fields the front end's threads read are written under mu. */
#ifndef MOE_COORDINATOR_CLUSTER_INTERNAL_H
#define MOE_COORDINATOR_CLUSTER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "cluster.pb-c.h"
#include "common/stop.h"
#include "common/grow.h"
#include "ctrl/link.h"
#include "coordinator/cluster.h"
#include "coordinator/cluster_migrate.h"

#define TAG(x) MOESERVE__CLUSTER__V1__TAG__TAG_##x
#define EVENT(x) MOESERVE__CLUSTER__V1__SEQ_EVENT__KIND__KIND_##x
#define N_BUCKETS 4096
#define LAT_RING 65536
#define FQ_CLIENTS 1024 /* fair-queueing classes (API keys + 1; more share slots modulo) */

typedef Moeserve__Cluster__V1__Load pb_load;
typedef Moeserve__Cluster__V1__Counters pb_counters;

typedef enum { RQ_QUEUED = 0, RQ_PREFILL, RQ_TRANSFER, RQ_DECODE } rq_state;

typedef struct {
    uint32_t index;
    int32_t token;
    int finish;
    bool has_lp;
    moe_token_logprobs lp;
} stash_t;

/* A request's id on the workers is its front-end handle (low 48 bits) plus its placement epoch
 * (the times it resumed, high 16 bits): a resumed request is a new sequence to every worker, so
 * nothing an old placement left behind (a tombstone, a cancelled receive, a late token or event)
 * can match the new one. Buckets hash the handle, so the handle finds it too (cancels). */
#define CREQ_EPOCH_SHIFT 48
#define CREQ_HANDLE(id) ((id) & ((UINT64_C(1) << CREQ_EPOCH_SHIFT) - 1))

typedef struct creq {
    uint64_t id; /* handle | epoch << CREQ_EPOCH_SHIFT: what workers know it by */
    moe_frontend_req *stream;
    const moe_gen_request *req;
    rq_state state;
    int pi, di;           /* prefill and decode instance (-1 none; mixed: pi == di) */
    uint32_t first_index; /* the first token index its current placement produces (resumed: > 0) */
    int32_t *gen;         /* the tokens streamed so far, in index order (a resume re-sends them) */
    int n_gen, cap_gen;
    uint32_t resumes;     /* times it went on elsewhere after losing an instance */
    int reserved_blocks;  /* counted in inst[di].reserved_blocks until the hand-off */
    bool counted_pending; /* n_prompt counted in inst[pi].pending_tokens until the first token */
    uint32_t next_index;
    stash_t *stash;
    int n_stash, cap_stash;
    moe_detok *dt;
    moe_stopper *stop;
    char *text; /* everything the detokenizer produced (to name the matched stop string) */
    size_t text_len, text_cap, emitted;
    creq_mig mig; /* live migration (cluster_migrate.c) */
    double fq_start; /* fair queueing: start tag in the coordinator's queue (cluster_sched.c) */
    struct creq *hnext;
    struct creq *qnext;
} creq;

typedef struct {
    moe_cluster_instance def;
    int lead;           /* its member id on the link */
    char uuid[64];      /* joined: the instance (mpirun job) this target is a rank of */
    char host[64];
    int64_t leave_ns;   /* joined: when it asked to leave (Leave), 0 if it did not: it drains
                         * (mig.drain) and gets Shutdown once nothing depends on it */
    moe_instance_state state;
    bool ready_seen;
    int64_t last_seen;
    uint32_t kv_total, kv_used, block_tokens, running, waiting;
    uint64_t block_bytes;
    int max_batch_tokens, max_seqs;
    uint64_t pending_tokens; /* prompt tokens sent, first token not back (coordinator's count) */
    int n_pending;
    int reserved_blocks; /* decode: blocks of requests assigned and not yet handed off */
    uint32_t kv_incoming; /* of kv_used, reported held for those hand-offs (counted in reserved) */
    pb_counters ctr;     /* latest cumulative counters of its lead */
    uint32_t expert_begin, expert_end;          /* placement reported by WorkerReady */
    uint32_t ep_group_size;
    int32_t ep_group_ranks[MOE_FRONTEND_MAX_EP];
    uint64_t *expert_tokens;                    /* latest heartbeat's (layers x experts) */
    uint32_t n_expert_tokens;
    inst_mig mig;        /* live migration: drain, flights (cluster_migrate.c) */
} inst_t;

struct moe_cluster {
    moe_cluster_opts o;
    char model_name[128];
    inst_t *inst;
    int n_inst;
    /* Per member id (MPI: world rank): its target, -1 coordinator/spare/unknown. Grown on joins. */
    int *rank_inst;
    bool *rank_ready, *rank_bye;
    int n_members;
    bool elastic; /* instances join and leave over the network (opts.elastic) */
    int64_t last_turn; /* the loop's last turn: a stalled coordinator does not judge others by it */
    uint64_t n_joins, n_losses, n_resumed; /* under mu: ClusterStatus counters */
    uint64_t n_prefills_shared;
    int *spares;
    bool disagg;

    moe_link *link; /* control messages with the members (borrowed) */

    pthread_mutex_t mu; /* inbox, admission counters, instance fields read by the front end */
    pthread_cond_t cv;
    creq **in_sub;
    int n_in_sub, cap_in_sub;
    uint64_t *in_cancel;
    int n_in_cancel, cap_in_cancel;
    bool wake;
    int n_active, n_queued;
    bool ready, draining, stopped;
    int cache_tokens; /* the smallest instance KV cache in tokens: one sequence must fit */
    uint32_t moe_layers, moe_experts; /* from WorkerReady: shape of expert_tokens */
    int usable;       /* every pool a request needs has a READY instance */
    _Atomic uint64_t next_id;

    /* Token path latency (worker send -> pushed to the front end), last LAT_RING tokens, us. */
    float *lat;
    uint64_t n_lat;
    int64_t next_lat_log;

    creq *buckets[N_BUCKETS];
    creq *queue;
    /* Start-time fair queueing between clients (moe_gen_request.client): the virtual time (the
     * start tag of the request dispatched last) and each client's last finish tag, in tokens. */
    double fq_vtime;
    double fq_finish[FQ_CLIENTS];
    int64_t drain_started;
    uint64_t transfers_logged;
    cluster_mig mig; /* live migration policy (cluster_migrate.c) */
};

/* ---- cluster.c ---- */
/* Queues a control message to a worker rank (non-blocking). */
moe_status moe_cluster_send(moe_cluster *c, int dest, int tag, const ProtobufCMessage *m);
/* Tells an instance to free a sequence (no-op for inst < 0 or an unreachable instance). */
void moe_cluster_send_free(moe_cluster *c, int inst, uint64_t id);
inst_t *moe_cluster_inst_of_rank(moe_cluster *c, int rank);

/* ---- cluster_requests.c ---- */
/* The request workers know as id (exact: an old placement's id finds nothing). */
creq *moe_cluster_req_find(moe_cluster *c, uint64_t id);
/* The request of a front-end handle, whatever its placement epoch. */
creq *moe_cluster_req_find_handle(moe_cluster *c, uint64_t handle);
/* Whether r is placed on target idx: its prefill (until its KV is handed off: the decode side
 * pulls from it) or its decode. Losing idx resumes r. */
bool moe_cluster_req_placed_on(const creq *r, int idx);
/* Placed on idx, or idx is its migration's destination: idx cannot leave yet. */
bool moe_cluster_req_depends_on(const creq *r, int idx);
/* Ends a request with an error: frees it on its workers, makes the terminal call, frees r. */
void moe_cluster_req_fail(moe_cluster *c, creq *r, moe_status code, const char *msg);
/* One sampled token from a worker: put in index order, detokenized, checked against stop strings
 * and stop ids, pushed to the front end; the request may end (and r be freed) here. */
void moe_cluster_req_deliver(moe_cluster *c, creq *r, uint32_t index, int32_t token, int finish,
                             const moe_token_logprobs *lp /* NULL: none */);

/* ---- cluster_sched.c ---- */
void moe_cluster_inst_apply_load(moe_cluster *c, inst_t *in, const Moeserve__Cluster__V1__Load *l);
/* A decode instance's KV blocks in use or promised, each counted once: the reported use, less
 * what it reports held for hand-offs and incoming migrations not done yet, plus every block
 * reserved for the requests assigned to it and not handed off (whether or not its rank has taken
 * them yet) and the blocks of the migrations coming to it. */
long moe_cluster_inst_kv_committed(const inst_t *in);
/* Recomputes whether every pool a request needs has a READY instance, and the cache limit. */
void moe_cluster_inst_update_usable(moe_cluster *c);
/* An instance is gone (missed its heartbeats, its connection failed, it left): it becomes
 * UNREACHABLE. Elastic clusters resume each of its requests elsewhere from prompt + the tokens
 * already streamed; an mpirun cluster (one failure domain) fails them UNAVAILABLE with why. */
void moe_cluster_inst_lost(moe_cluster *c, int idx, const char *why);
/* ---- cluster_requests.c: resume after a lost instance ---- */
/* Takes r off its instances (freeing it on those still alive) and queues it again: the next
 * placement computes prompt + the streamed tokens and goes on from the next index. */
void moe_cluster_req_resume(moe_cluster *c, creq *r, const char *why);
/* Queues an admitted request by priority, then arrival. */
void moe_cluster_sched_enqueue(moe_cluster *c, creq *r);
/* Sends queued requests to instances while they have room for more prompt tokens. */
void moe_cluster_sched_dispatch(moe_cluster *c);

#endif
