/* Internal to the worker loop (worker/worker_loop.c) and its KV pull protocol (worker/kv_pull.c):
 * the worker's state and the helpers they share. Nobody else includes this. */
#ifndef MOE_WORKER_WORKER_INTERNAL_H
#define MOE_WORKER_WORKER_INTERNAL_H

#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "cluster.pb-c.h"
#include "ctrl/link.h"
#include "worker/comm.h"
#include "common/grow.h"
#include "worker/engine.h"
#include "worker/ep_placement.h"
#include "worker/kv_transfer.h"
#include "worker/migrate.h"
#include "worker/model.h"
#include "worker/kv_stage.h"
#include "worker/worker_loop.h"

typedef Moeserve__Cluster__V1__StartSeq pb_start;
typedef Moeserve__Cluster__V1__FreeSeqs pb_free;
typedef Moeserve__Cluster__V1__KvOffer pb_offer;
typedef Moeserve__Cluster__V1__KvPull pb_pull;
typedef Moeserve__Cluster__V1__KvHeader pb_header;
typedef Moeserve__Cluster__V1__KvDone pb_done;
typedef Moeserve__Cluster__V1__KvGone pb_gone;
typedef Moeserve__Cluster__V1__KvReserve pb_reserve;
typedef Moeserve__Cluster__V1__SeqState pb_state;
typedef Moeserve__Cluster__V1__Load pb_load;
typedef Moeserve__Cluster__V1__Counters pb_counters;
typedef Moeserve__Cluster__V1__SeqEvent pb_seq_event;

#define TAG(x) MOESERVE__CLUSTER__V1__TAG__TAG_##x
#define EVENT(x) MOESERVE__CLUSTER__V1__SEQ_EVENT__KIND__KIND_##x


/* Prefill side: a prefill-only sequence from StartSeq until its KV is freed. */
typedef struct {
    uint64_t seq_id;
    int decode_rank;
    int prefill_tokens;     /* positions the prefill computes: prompt + tokens of a resumed one */
    bool parked;            /* first token sampled, offer sent */
    int64_t lease_deadline; /* parked, no send in flight: freed at this time */
    moe_kv_send *send;
    int64_t send_deadline;
    /* Layer-by-layer push (worker/kv_push.c), once the decode side accepted with push_xfer: */
    uint32_t push_xfer;  /* 0: none accepted */
    int push_layers;     /* layers whose slices are posted (all: push_sums complete) */
    int push_blocks;     /* blocks per layer */
    uint64_t *push_sums; /* [n_layers * push_blocks] checksums, layer-major */
    moe_kv_stage stage;  /* host views of what `send` reads (worker/kv_stage.h) */
    bool traced_left;    /* MOE_KV_TRACE: the "left" event (every slice sent) is written */
} park_t;

/* Decode side: an offered sequence until it is imported and resumed (or dropped). */
typedef enum {
    PULL_WAIT_ROOM = 0,
    PULL_RECEIVING,
    PULL_WAIT_OFFER, /* a push failed before its offer came: the pull (attempt 2) waits for it */
} pull_phase;

typedef struct {
    uint64_t seq_id;
    int src;
    pb_offer *offer; /* owned (unpacked) */
    pull_phase phase;
    int attempt;
    uint32_t xfer_id;
    moe_kv_recv *recv;
    int64_t t0; /* first pull sent */
    int64_t next_renew;
    int64_t not_before; /* test hook: pull delay */
    bool cancelled;     /* freed while receiving: dropped once the receive ends */
    bool imported;
    int held_blocks; /* KV blocks imported for it here (0 until then): reported as incoming */
    bool waited;     /* counted in kv_pulls_waited (once) */
    /* Layer-by-layer push (worker/kv_push.c): receives posted when the prefill started; offer stays
     * NULL until the KvOffer after the prefill brings the final state. */
    bool push;
    bool push_failed; /* the push failed before the offer came: pull (attempt 2) once it does */
    moe_kv_stage stage; /* host views `recv` writes, uploaded once verified (worker/kv_stage.h) */
} pull_t;

/* Decode side: a seq freed before its offer arrived (the offer must then be refused). */
typedef struct {
    uint64_t seq_id;
    int64_t until;
} tomb_t;

#define MOE_WORKER_MAX_EP 64 /* ranks in one expert-parallel group */

typedef struct {
    const moe_worker_opts *o;
    int rank;
    moe_model *model;
    moe_engine *eng;
    char load_error[512];
    moe_comm data; /* borrowed from moe_worker_opts */
    /* Expert parallelism: the instance's ranks (ep_size > 1) split the experts and step together. */
    int ep_size, ep_rank;
    moe_comm ep_comm;
    bool have_ep;
    moe_ep_placement place;
    int64_t ep_steps; /* steps taken in lock-step with the group (EPLB re-plans on a multiple) */
    size_t block_bytes;
    int block_tokens;
    int kv_total;

    park_t *parks;
    int n_parks, cap_parks;
    pull_t *pulls;
    int n_pulls, cap_pulls;
    tomb_t *tombs;
    int n_tombs, cap_tombs;

    moe_token_event *events;
    int cap_events;
    Moeserve__Cluster__V1__TokenEvent *pev;
    Moeserve__Cluster__V1__TokenEvent **pevp;

    pb_counters ctr;
    uint64_t hb_seq;
    int64_t next_hb;
    int64_t last_hb;
    bool load_dirty;
    int last_free_blocks;
    uint32_t next_xfer;
    moe_kv_test_hooks hooks;
    moe_mig *mig; /* live migration, both roles (worker/migrate.c); NULL without an engine */
    int hang_rank, hang_after, n_starts;
    int pull_delay_ms;
    int layer_delay_ms; /* test hook: each layer of a step lasts this much longer (a slow step) */
    bool shutdown;
    bool coord_lost; /* the link lost the coordinator: rejoin once the whole group agrees */
    /* Member ids of this rank's expert-parallel group (from the last WorkerReady), and whether the
     * link said one of them is gone: then the instance is lost and this rank must not wait for it
     * in a collective (which would block until mpirun kills the job). */
    uint32_t group[MOE_WORKER_MAX_EP];
    size_t n_group;
    int peer_lost; /* the lost member's id, 0 while every peer is there */
    bool leave_sent; /* Leave sent after the leave flag (SIGTERM) */
    /* MOE_STEP_TRACE=PREFIX: one JSON line per engine step in PREFIX.RANK.jsonl (moe-plan compares
     * its cost model with these); NULL when unset. */
    FILE *step_trace;
    moe_engine_stats trace_prev;
    /* MOE_KV_TRACE=PREFIX: one JSON line per hand-off event in PREFIX.RANK.jsonl (where a
     * hand-off's time goes, bench/plan_handoff.py); NULL when unset. */
    FILE *kv_trace;
    int64_t push_progress_ns; /* the last moe_kv_push_progress (the step's progress hook paces by it) */
} worker;

static inline int64_t moe_worker_ms_ns(int ms)
{
    return (int64_t)ms * 1000000;
}

/* ---- worker_loop.c ---- */
moe_status moe_worker_send_coord(worker *w, int tag, const ProtobufCMessage *m);
/* Queues m for a peer worker; a failure is logged (the peer's timeouts cover a lost message). */
void moe_worker_send_peer(worker *w, int peer, int tag, const ProtobufCMessage *m);
void moe_worker_seq_event(worker *w, uint64_t id, Moeserve__Cluster__V1__SeqEvent__Kind kind,
                          moe_status code, const char *msg);
/* Frees a sequence in the engine if it is there. */
void moe_worker_engine_drop(worker *w, uint64_t id);
/* MOE_KV_TRACE: writes {rank, t_ns, seq, ev, arg} when the trace is on (a no-op otherwise). */
void moe_worker_kv_trace(worker *w, uint64_t seq, const char *ev, int arg);

/* ---- kv_pull.c: both sides of the pull ---- */
park_t *moe_kv_pull_find_park(worker *w, uint64_t id);
void moe_kv_pull_remove_park(worker *w, park_t *p);
void moe_kv_pull_remove_pull(worker *w, pull_t *q);
/* The coordinator freed a sequence: engine, parked KV (sends in flight detached), pending offer. */
void moe_kv_pull_free_seq(worker *w, uint64_t id);
/* Decode side. on_offer takes ownership of m. */
void moe_kv_pull_on_offer(worker *w, int src, pb_offer *m);
void moe_kv_pull_on_header(worker *w, const pb_header *m);
void moe_kv_pull_on_gone(worker *w, const pb_gone *m);
/* Advances one pull; true when something changed. May remove q. */
bool moe_kv_pull_progress_pull(worker *w, pull_t *q, int64_t now);
/* Prefill side: offer a parked sequence to its decode rank; answer pulls and acks. */
void moe_kv_pull_offer(worker *w, park_t *p);
void moe_kv_pull_on_pull(worker *w, int src, const pb_pull *m);
void moe_kv_pull_on_done(worker *w, const pb_done *m);
/* Advances one parked sequence (sends, lease); true when something changed. May remove p. */
bool moe_kv_pull_progress_park(worker *w, park_t *p, int64_t now);
/* Shared with the push: the ack to the prefill side, "gone" to the decode side, and whether the
 * coordinator freed a sequence whose KV had not arrived yet (its offer must be refused). */
void moe_kv_pull_send_done(worker *w, int peer, uint64_t id, bool received);
void moe_kv_pull_send_gone(worker *w, int peer, uint64_t id, const char *why);
bool moe_kv_pull_has_tomb(const worker *w, uint64_t id);

/* ---- kv_push.c: layer-by-layer hand-off (moe_worker_opts.kv_layerwise) ---- */
/* Prefill side. reserve: after StartSeq, ask the decode rank to reserve (KvReserve). */
void moe_kv_push_reserve(worker *w, park_t *p);
/* The decode side accepted (KvPull with layerwise): remember the transfer; push what is final. */
void moe_kv_push_on_accept(worker *w, int src, const pb_pull *m);
/* The engine's layer hook (moe_engine_set_layer_hook; ctx is the worker). */
void moe_kv_push_layer_hook(void *ctx, int layer, const uint64_t *ids, int n);
/* Advances every push in flight: tests all its pending sends, or with one_test only its first
 * (the step's progress hook, called often: moe_kv_send_progress); the layer hook calls it too. */
void moe_kv_push_progress(worker *w, bool one_test);
/* Ends p's push (or pull attempt) on the prefill side: sends detached, push state dropped. */
void moe_kv_push_stop(park_t *p);
/* After the sequence parked: post the layers not sent yet, then the checksums (KvHeader). */
void moe_kv_push_after_park(worker *w, park_t *p);
/* Decode side. on_reserve takes ownership of m. */
void moe_kv_push_on_reserve(worker *w, int src, pb_reserve *m);

#endif
