/* Live migration of a running sequence from one decode engine to another (Llumnix), both sides'
 * state machines: the source copies the sequence's KV blocks in stages while it keeps decoding,
 * pauses it only for the last small delta and the sampler state, and the destination resumes it.
 * The protocol (messages in proto/cluster.proto, diagram in docs/migration.md):
 *
 *   coordinator -> src  MigrateSeq
 *   src -> dst          MigPrepare(stage k, blocks [first, first+n), state)   dst reserves blocks
 *   dst -> src          MigReady(xfer)                                       receives posted
 *   src -> dst          MigData(checksums) + the blocks on the data comm     (kv_transfer.h)
 *   dst -> src          MigAck(k)                                            verified
 *   ... stage k+1 sends the blocks filled since stage k; once at most final_blocks are left, the
 *   source pauses the sequence and the final stage carries the rest (the partial last block
 *   included) with the exact state; on its Ack the destination has resumed it and the source
 *   frees its copy and reports MigrateEnd to the coordinator.
 *
 * Only full blocks travel before the final stage: a full block never changes, so nothing is ever
 * sent twice, and the source may keep decoding into its partial last block meanwhile. Either side
 * may abort at any point before the final Ack (MigAbort): the source keeps (or resumes) the
 * sequence and the destination frees what it reserved, after letting receives that may already be
 * matched run out so that no block is freed under an in-flight write.
 *
 * Nothing here blocks: the worker loop feeds messages in and calls moe_mig_progress. Control
 * messages go out through a callback (the worker's outbox, or a test's mailbox), KV blocks through
 * a moe_comm. Not thread-safe: owned by the worker loop's thread, like the engine. */
#ifndef MOE_WORKER_MIGRATE_H
#define MOE_WORKER_MIGRATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "common/status.h"
#include "ctrl/inbox.h"
#include "worker/comm.h"
#include "worker/engine.h"

typedef struct moe_mig moe_mig;

/* Where control messages go. */
typedef struct {
    void *ctx;
    /* Queues m (a cluster.proto message, tag = its Tag value) for world rank `peer` (the
     * coordinator too); must not block. A lost message is covered by the peers' deadlines. */
    void (*send)(void *ctx, int peer, int tag, const ProtobufCMessage *m);
    /* True while the sequence is busy with something else on this worker (a KV pull): it cannot
     * move now. May be NULL. */
    bool (*seq_busy)(void *ctx, uint64_t seq_id);
} moe_mig_io;

/* Test hooks (environment, moe_mig_test_hooks_from_env). MOE_TEST_MIGRATE_ABORT=WHO:STAGE[:N]
 * makes the first N migrations this rank takes part in (default 1; "all" = every one) abort:
 *   dest:K     the destination refuses the reservation of stage K (as if it were full)
 *   src:K      the source aborts when stage K's MigReady arrives (before any data is posted)
 *   sent:K     the source aborts right after posting stage K's data (non-final stages only:
 *              after the final data the destination decides)
 *   corrupt:K  one block of stage K is corrupted in flight (the destination aborts: TRANSFER)
 * K is a stage number or "final". MOE_TEST_MIGRATE_STALL_MS=N: the source waits N ms before each
 * stage's MigPrepare (a slow link: the sequence may finish or be cancelled meanwhile).
 * MOE_TEST_MIGRATE_MIN_STAGES=N: at least N non-final stages (each waits for a new full block). */
typedef enum {
    MOE_MIG_HOOK_NONE = 0,
    MOE_MIG_HOOK_DEST,
    MOE_MIG_HOOK_SRC,
    MOE_MIG_HOOK_SENT,
    MOE_MIG_HOOK_CORRUPT,
} moe_mig_hook_kind;

#define MOE_MIG_FINAL_STAGE (-1)

typedef struct {
    moe_mig_hook_kind abort_kind;
    int abort_stage; /* a stage number, or MOE_MIG_FINAL_STAGE */
    int abort_count; /* migrations affected; -1 every one */
    int stall_ms;
    int min_stages;
    bool kv_staging; /* MOE_TEST_KV_STAGING=1: blocks through host buffers (worker/kv_stage.h) */
} moe_mig_test_hooks;

/* Reads the hooks above; a malformed value is logged and ignored. */
void moe_mig_test_hooks_from_env(moe_mig_test_hooks *h);

typedef struct {
    int self_rank;        /* this worker's world rank (a migration to itself is refused) */
    int coordinator_rank; /* where MigrateEnd goes */
    int kv_timeout_ms;    /* one stage's transfer; the peers' answer deadlines derive from it */
    uint32_t *next_xfer;  /* data tag allocator shared with the KV pull (moe_kv_data_tag) */
    moe_mig_test_hooks hooks;
} moe_mig_opts;

/* Cumulative counters of this worker (both roles). */
typedef struct {
    uint64_t out_started, out_completed, out_aborted; /* as the source */
    uint64_t in_completed, in_aborted;                /* as the destination */
    uint64_t bytes_sent, stages_sent;
} moe_mig_stats;

/* eng, data and everything in io/opts must outlive the migrator (next_xfer included). */
moe_status moe_mig_create(moe_engine *eng, moe_comm *data, const moe_mig_io *io,
                          const moe_mig_opts *opts, moe_mig **out);
/* Aborts every migration in flight (MIG_SHUTDOWN, peers told; sources resume their sequences),
 * then frees. NULL is a no-op. */
void moe_mig_free(moe_mig *m);

/* A control message from member src, through this module's inbox (ctrl/inbox.h): UNKNOWN when tag
 * is not a migration message (MIGRATE, MIG_*), MALFORMED (logged, dropped) or HANDLED. */
moe_inbox_result moe_mig_deliver(moe_mig *m, int src, int tag, const uint8_t *buf, size_t len);
/* Advances transfers, deadlines and stalled stages; true when something changed. */
bool moe_mig_progress(moe_mig *m, int64_t now_ns);
/* After each engine step, with its events: a sequence that finished aborts its migration
 * (MIG_SEQ_GONE); one whose blocks the engine took back aborts with MIG_PREEMPTED. */
void moe_mig_after_step(moe_mig *m, const moe_token_event *events, int n);
/* The coordinator freed seq_id (cancel, stop string). Aborts a migration of it. Returns true when
 * the migrator took the sequence over (a destination-side import whose receives must end before
 * its blocks are freed: it frees it itself); false when the caller should free it as usual. */
bool moe_mig_on_free(moe_mig *m, uint64_t seq_id);

/* True while a final stage is in flight here (either role): the sequence is paused, so the worker
 * loop may hold its engine steps and poll instead, keeping the pause to a few loop turns rather
 * than a few of the peers' engine steps (the issue allows a stall in the last stage only).
 * Bounded: a final stage ends within its deadlines. */
bool moe_mig_hold(const moe_mig *m);
/* KV blocks held here for incoming migrations not done yet (imported stages, and aborted ones
 * whose receives have not ended): the coordinator counts a migration's blocks on its destination
 * until MigrateEnd, so Load.kv_blocks_incoming reports these too, and they are counted once.
 * NULL (no migrator: a prefill rank) holds none; so does moe_mig_active. */
int moe_mig_blocks_incoming(const moe_mig *m);
/* Migrations in flight here (either role), and whether any moves bytes right now. */
int moe_mig_active(const moe_mig *m);
bool moe_mig_transferring(const moe_mig *m);
void moe_mig_get_stats(const moe_mig *m, moe_mig_stats *st);

#endif
