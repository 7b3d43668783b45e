/* Live migration between decode engines: the source's and the destination's state machines
 * (protocol in worker/migrate.h and docs/migration.md). */
#include "worker/migrate.h"

#include <stdlib.h>
#include <string.h>

#include "cluster.pb-c.h"
#include "common/clock.h"
#include "common/grow.h"
#include "common/log.h"
#include "common/test_hook.h"
#include "worker/kv_stage.h"
#include "worker/kv_transfer.h"
#include "worker/seq_state_pb.h"

#define TAG(x) MOESERVE__CLUSTER__V1__TAG__TAG_##x
#define REASON(x) MOESERVE__CLUSTER__V1__MIG_REASON__MIG_##x

typedef Moeserve__Cluster__V1__MigReason mig_reason;
typedef Moeserve__Cluster__V1__SeqState pb_state;

/* ---- test hooks ---- */

static int parse_stage(const char *s)
{
    if (!strcmp(s, "final"))
        return MOE_MIG_FINAL_STAGE;
    char *end;
    long v = strtol(s, &end, 10);
    return end != s && *end == 0 && v >= 0 && v < 1000000 ? (int)v : -2;
}

void moe_mig_test_hooks_from_env(moe_mig_test_hooks *h)
{
    *h = (moe_mig_test_hooks){0};
    const char *v = moe_test_hook("MOE_TEST_MIGRATE_ABORT");
    if (v && *v) {
        char buf[64];
        snprintf(buf, sizeof buf, "%s", v);
        char *who = buf, *stage = strchr(buf, ':'), *count = NULL;
        if (stage) {
            *stage++ = 0;
            if ((count = strchr(stage, ':')))
                *count++ = 0;
        }
        moe_mig_hook_kind k = !strcmp(who, "dest")      ? MOE_MIG_HOOK_DEST
                              : !strcmp(who, "src")     ? MOE_MIG_HOOK_SRC
                              : !strcmp(who, "sent")    ? MOE_MIG_HOOK_SENT
                              : !strcmp(who, "corrupt") ? MOE_MIG_HOOK_CORRUPT
                                                        : MOE_MIG_HOOK_NONE;
        int st = stage ? parse_stage(stage) : -2;
        int n = !count ? 1 : !strcmp(count, "all") ? -1 : atoi(count);
        if (k == MOE_MIG_HOOK_NONE || st == -2 || n == 0 ||
            (k == MOE_MIG_HOOK_SENT && st == MOE_MIG_FINAL_STAGE)) {
            MOE_LOG_E("MOE_TEST_MIGRATE_ABORT=%s: expected dest|src|sent|corrupt:STAGE[:N|all] "
                      "(sent: not the final stage); ignored",
                      v);
        } else {
            h->abort_kind = k;
            h->abort_stage = st;
            h->abort_count = n;
            MOE_LOG_W("test hook MOE_TEST_MIGRATE_ABORT=%s: migrations will be aborted", v);
        }
    }
    const char *s = moe_test_hook("MOE_TEST_MIGRATE_STALL_MS");
    if (s && *s)
        h->stall_ms = atoi(s);
    s = moe_test_hook("MOE_TEST_MIGRATE_MIN_STAGES");
    if (s && *s)
        h->min_stages = atoi(s);
    h->kv_staging = moe_test_hook_int("MOE_TEST_KV_STAGING", 0) != 0;
}

/* ---- state ---- */

typedef enum {
    SRC_WAIT = 0,  /* the next stage's MigPrepare waits (stall hook, or a new full block) */
    SRC_PREPARING, /* MigPrepare sent, waiting for MigReady */
    SRC_SENDING,   /* data posted, waiting for MigAck */
} src_phase;

typedef struct {
    uint32_t mig_id;
    uint64_t seq_id;
    int dest;
    int final_blocks, max_stages, stage_blocks;
    int stage;  /* the current stage */
    bool final; /* the current stage is the final one: the sequence is paused */
    src_phase phase;
    int *sent; /* block ids whose data was posted, in position order */
    int n_sent, cap_sent;
    int first, n; /* the current stage's block range */
    moe_kv_send *send;
    moe_kv_stage views; /* host views of the current stage's blocks, read by send */
    bool stalled; /* the stall hook already delayed the current stage */
    bool hooked;  /* a test hook aborts this migration */
    int64_t t0, pause_t0, deadline, not_before;
    uint64_t bytes;
    uint32_t blocks, stages;
    uint32_t n_tokens;
} src_mig;

typedef enum {
    DST_IDLE = 0,  /* between stages: waiting for the next MigPrepare */
    DST_RECEIVING, /* MigReady sent, receives posted */
    DST_DRAINING,  /* aborted while receives may be matched: free once they end */
} dst_phase;

typedef struct {
    uint32_t mig_id;
    uint64_t seq_id;
    int src;
    int stage;
    bool final;
    dst_phase phase;
    bool imported;
    int held_blocks; /* blocks the import holds here (0 before the first stage's import) */
    bool hooked;
    mig_reason aborted; /* why, once aborted (logged when the reservation is freed) */
    moe_kv_recv *recv;
    moe_kv_stage views; /* host views recv writes, uploaded once the stage verified */
    uint32_t xfer;
    int64_t deadline;
} dst_mig;

struct moe_mig {
    moe_engine *eng;
    moe_comm *data;
    moe_mig_io io;
    moe_mig_opts o;
    size_t block_bytes;
    int bs;
    src_mig **src;
    int n_src, cap_src;
    dst_mig **dst;
    int n_dst, cap_dst;
    int hook_uses;
    moe_mig_stats st;
};


static int64_t ms_ns(int ms)
{
    return (int64_t)ms * 1000000;
}

/* A peer's answer to one stage may take a transfer's time plus a few engine steps. */
static int64_t answer_ns(const moe_mig *m)
{
    return 2 * ms_ns(m->o.kv_timeout_ms) + ms_ns(1000);
}

static const char *reason_name(mig_reason r)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&moeserve__cluster__v1__mig_reason__descriptor, r);
    return v ? v->name : "?";
}

/* Claims one use of the abort hook when it names this kind and stage. */
static bool hook_fires(moe_mig *m, moe_mig_hook_kind kind, int stage, bool final)
{
    const moe_mig_test_hooks *h = &m->o.hooks;
    if (h->abort_kind != kind)
        return false;
    if (final ? h->abort_stage != MOE_MIG_FINAL_STAGE : h->abort_stage != stage)
        return false;
    if (h->abort_count >= 0 && m->hook_uses >= h->abort_count)
        return false;
    m->hook_uses++;
    MOE_LOG_W("test hook MOE_TEST_MIGRATE_ABORT: aborting at stage %d%s", stage,
              final ? " (final)" : "");
    return true;
}

moe_status moe_mig_create(moe_engine *eng, moe_comm *data, const moe_mig_io *io,
                          const moe_mig_opts *opts, moe_mig **out)
{
    if (!eng || !data || !io || !io->send || !opts || !opts->next_xfer || opts->kv_timeout_ms <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "migrate: engine, comm, io.send, next_xfer and "
                                              "kv_timeout_ms > 0 are required");
    moe_mig *m = calloc(1, sizeof *m);
    if (!m)
        return moe_error(MOE_ERR_NOMEM, "migrate: out of memory");
    m->eng = eng;
    m->data = data;
    m->io = *io;
    m->o = *opts;
    m->block_bytes = moe_engine_kv_block_bytes(eng);
    m->bs = moe_engine_kv_block_size(eng);
    *out = m;
    return MOE_OK;
}

/* ---- messages ---- */

static void send_abort(moe_mig *m, int peer, uint32_t mig_id, uint64_t seq_id, mig_reason why,
                       const char *detail, bool data_posted)
{
    Moeserve__Cluster__V1__MigAbort a;
    moeserve__cluster__v1__mig_abort__init(&a);
    a.mig_id = mig_id;
    a.seq_id = seq_id;
    a.reason = why;
    a.detail = (char *)(uintptr_t)(detail ? detail : "");
    a.data_posted = data_posted;
    m->io.send(m->io.ctx, peer, TAG(MIG_ABORT), &a.base);
}

/* ---- source side ---- */

static src_mig *find_src(moe_mig *m, uint32_t mig_id, int dest)
{
    for (int i = 0; i < m->n_src; i++)
        if (m->src[i]->mig_id == mig_id && (dest < 0 || m->src[i]->dest == dest))
            return m->src[i];
    return NULL;
}

static src_mig *find_src_seq(moe_mig *m, uint64_t seq_id)
{
    for (int i = 0; i < m->n_src; i++)
        if (m->src[i]->seq_id == seq_id)
            return m->src[i];
    return NULL;
}

static void report_end(moe_mig *m, uint32_t mig_id, uint64_t seq_id, int dest, mig_reason why,
                       const char *detail, const src_mig *s, int64_t pause_ns)
{
    Moeserve__Cluster__V1__MigrateEnd e;
    moeserve__cluster__v1__migrate_end__init(&e);
    e.mig_id = mig_id;
    e.seq_id = seq_id;
    e.dest_rank = dest >= 0 ? (uint32_t)dest : 0;
    e.reason = why;
    e.detail = (char *)(uintptr_t)(detail ? detail : "");
    if (s) {
        e.stages = s->stages;
        e.blocks = s->blocks;
        e.bytes = s->bytes;
        e.total_ns = moe_now_ns() - s->t0;
        e.n_tokens = s->n_tokens;
    }
    e.pause_ns = pause_ns;
    m->io.send(m->io.ctx, m->o.coordinator_rank, TAG(MIGRATE_END), &e.base);
}

static void remove_src(moe_mig *m, src_mig *s)
{
    for (int i = 0; i < m->n_src; i++) {
        if (m->src[i] == s) {
            m->src[i] = m->src[--m->n_src];
            break;
        }
    }
    moe_kv_send_free(s->send); /* cancels (waits for) the sends before their views go */
    moe_kv_stage_free(&s->views);
    free(s->sent);
    free(s);
}

/* Ends a migration on the source without handing the sequence over: tells the destination (unless
 * it is the one that aborted), resumes the sequence if it was paused, reports to the coordinator.
 */
static void src_abort(moe_mig *m, src_mig *s, mig_reason why, const char *detail, bool tell_dest)
{
    if (tell_dest)
        send_abort(m, s->dest, s->mig_id, s->seq_id, why, detail, s->phase == SRC_SENDING);
    if (s->final && s->pause_t0)
        moe_engine_resume(m->eng, s->seq_id); /* NOT_FOUND when it is gone: nothing to resume */
    MOE_LOG_I("seq %llu: migration %u to rank %d aborted at stage %d (%s%s%s)",
              (unsigned long long)s->seq_id, s->mig_id, s->dest, s->stage, reason_name(why),
              detail && *detail ? ": " : "", detail ? detail : "");
    m->st.out_aborted++;
    report_end(m, s->mig_id, s->seq_id, s->dest, why, detail, s, 0);
    remove_src(m, s);
}

/* Checks that the engine still holds the blocks already sent, in the same places. Returns
 * MIG_OK, MIG_SEQ_GONE or MIG_PREEMPTED; fills st/blocks/nb on MIG_OK. */
static mig_reason src_check(moe_mig *m, const src_mig *s, moe_seq_state *st, const int **blocks,
                            int *nb)
{
    if (moe_engine_export(m->eng, s->seq_id, st, blocks, nb) != MOE_OK)
        return REASON(SEQ_GONE);
    /* Preemption by recompute drops the table and n_computed (the last block sent may be the
     * partial one of the final stage). */
    if (*nb < s->n_sent || (st->n_computed + m->bs - 1) / m->bs < s->n_sent)
        return REASON(PREEMPTED);
    for (int i = 0; i < s->n_sent; i++)
        if ((*blocks)[i] != s->sent[i])
            return REASON(PREEMPTED);
    return REASON(OK);
}

/* Decides and announces the next stage (or waits for a reason to). */
static void src_next_stage(moe_mig *m, src_mig *s, int64_t now)
{
    moe_seq_state st;
    const int *blocks;
    int nb;
    mig_reason r = src_check(m, s, &st, &blocks, &nb);
    if (r != REASON(OK)) {
        src_abort(m, s, r, NULL, true);
        return;
    }
    if (m->o.hooks.stall_ms > 0 && !s->stalled) {
        s->stalled = true;
        s->phase = SRC_WAIT;
        s->not_before = now + ms_ns(m->o.hooks.stall_ms);
        return;
    }
    int full = st.n_computed / m->bs;
    int needed = (st.n_computed + m->bs - 1) / m->bs;
    int left = needed - s->n_sent;
    bool final =
        (left <= s->final_blocks && s->stage >= m->o.hooks.min_stages) || s->stage >= s->max_stages;
    if (!final && full == s->n_sent) {
        s->phase = SRC_WAIT; /* min_stages hook: wait for the next full block */
        s->not_before = now + ms_ns(1);
        return;
    }
    int first = s->n_sent, n = final ? needed - first : full - first;
    if (!final && s->stage_blocks > 0 && n > s->stage_blocks)
        n = s->stage_blocks; /* bounds one stage's checksum work in either loop */
    if (final) {
        moe_engine_pause(m->eng, s->seq_id);
        s->pause_t0 = now;
        s->n_tokens = (uint32_t)st.n_tokens;
    } else {
        st.n_computed = (first + n) * m->bs; /* what the destination holds after this stage */
    }
    s->final = final;
    s->first = first;
    s->n = n;
    s->phase = SRC_PREPARING;
    s->deadline = now + answer_ns(m);
    s->stalled = false;

    moe_seq_state_pb ps;
    moe_seq_state_to_pb(&st, &ps);
    Moeserve__Cluster__V1__MigPrepare p;
    moeserve__cluster__v1__mig_prepare__init(&p);
    p.mig_id = s->mig_id;
    p.seq_id = s->seq_id;
    p.stage = (uint32_t)s->stage;
    p.final = final;
    p.state = &ps.s;
    p.first_block = (uint32_t)first;
    p.n_blocks = (uint32_t)n;
    p.block_bytes = m->block_bytes;
    m->io.send(m->io.ctx, s->dest, TAG(MIG_PREPARE), &p.base);
}

static void on_migrate(moe_mig *m, const Moeserve__Cluster__V1__MigrateSeq *q)
{
    int dest = (int)q->dest_rank;
    const char *why = NULL;
    mig_reason r = REASON(NOT_MIGRATABLE);
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (dest == m->o.self_rank || dest == m->o.coordinator_rank)
        why = "the destination is not another worker";
    else if (find_src_seq(m, q->seq_id))
        why = "already migrating";
    else if (m->io.seq_busy && m->io.seq_busy(m->io.ctx, q->seq_id))
        why = "in a KV pull";
    else if (moe_engine_export(m->eng, q->seq_id, &st, &blocks, &nb) != MOE_OK) {
        r = REASON(SEQ_GONE);
        why = "not running here (finished or freed)";
    } else if (st.n_generated < 1 || st.n_computed != st.n_tokens - 1)
        why = "not decoding (prefilling or recomputing)";
    else if (!moe_grow((void **)&m->src, &m->cap_src, m->n_src + 1, sizeof *m->src))
        why = "out of memory";
    src_mig *s = why ? NULL : calloc(1, sizeof *s);
    if (!s) {
        if (!why)
            why = "out of memory";
        MOE_LOG_I("seq %llu: migration %u refused: %s", (unsigned long long)q->seq_id, q->mig_id,
                  why);
        m->st.out_aborted++;
        report_end(m, q->mig_id, q->seq_id, dest, r, why, NULL, 0);
        return;
    }
    *s = (src_mig){.mig_id = q->mig_id,
                   .seq_id = q->seq_id,
                   .dest = dest,
                   .final_blocks = q->final_blocks > 0 ? (int)q->final_blocks : 2,
                   .max_stages = q->max_stages > 0 ? (int)q->max_stages : 32,
                   .stage_blocks = (int)q->stage_blocks,
                   .t0 = moe_now_ns()};
    m->src[m->n_src++] = s;
    m->st.out_started++;
    MOE_LOG_D("seq %llu: migration %u to rank %d starts (%d tokens, %d blocks)",
              (unsigned long long)q->seq_id, q->mig_id, dest, st.n_tokens, nb);
    src_next_stage(m, s, s->t0);
}

static void on_ready(moe_mig *m, int from, const Moeserve__Cluster__V1__MigReady *q)
{
    src_mig *s = find_src(m, q->mig_id, from);
    if (!s || s->phase != SRC_PREPARING || q->stage != (uint32_t)s->stage)
        return; /* stale: this migration was aborted (the destination was told) */
    if (hook_fires(m, MOE_MIG_HOOK_SRC, s->stage, s->final)) {
        src_abort(m, s, REASON(TEST_HOOK), "source aborts before sending", true);
        return;
    }
    moe_seq_state st;
    const int *blocks;
    int nb;
    mig_reason r = src_check(m, s, &st, &blocks, &nb);
    if (r == REASON(OK) && nb < s->first + s->n)
        r = REASON(PREEMPTED);
    if (r != REASON(OK)) {
        src_abort(m, s, r, NULL, true);
        return;
    }
    uint64_t *sums = malloc((size_t)(s->n ? s->n : 1) * sizeof *sums);
    bool ok =
        sums && moe_grow((void **)&s->sent, &s->cap_sent, s->first + s->n + 1, sizeof *s->sent);
    moe_status rc = MOE_ERR_NOMEM;
    /* A stage's blocks are full (never written again) or the sequence is paused: one download to
     * the host views (none on a host pool), which the sends then read. */
    if (ok && ((rc = moe_kv_stage_open(&s->views, moe_engine_kv_cache(m->eng), blocks + s->first,
                                       s->n, 1, m->o.hooks.kv_staging)) != MOE_OK ||
               (rc = moe_kv_stage_download(&s->views, 0, 1)) != MOE_OK)) {
        free(sums);
        src_abort(m, s, REASON(TRANSFER), moe_error_message(), true);
        return;
    }
    if (ok) {
        moe_kv_test_hooks kh = {0};
        if (hook_fires(m, MOE_MIG_HOOK_CORRUPT, s->stage, s->final))
            kh.corrupt_attempts = 1;
        rc = moe_kv_send_start(m->data, moe_kv_stage_views(&s->views, 0), s->n, m->block_bytes,
                               s->dest, moe_kv_data_tag(q->xfer_id), 1, &kh, sums, &s->send);
    }
    if (rc != MOE_OK) {
        free(sums);
        src_abort(m, s, REASON(TRANSFER), ok ? moe_error_message() : "out of memory", true);
        return;
    }
    for (int i = 0; i < s->n; i++)
        s->sent[s->first + i] = blocks[s->first + i];
    s->n_sent = s->first + s->n;
    Moeserve__Cluster__V1__MigData d;
    moeserve__cluster__v1__mig_data__init(&d);
    d.mig_id = s->mig_id;
    d.stage = (uint32_t)s->stage;
    d.xfer_id = q->xfer_id;
    d.n_checksums = (size_t)s->n;
    d.checksums = sums;
    m->io.send(m->io.ctx, s->dest, TAG(MIG_DATA), &d.base);
    free(sums);
    s->phase = SRC_SENDING;
    s->deadline = moe_now_ns() + answer_ns(m);
    if (!s->final && hook_fires(m, MOE_MIG_HOOK_SENT, s->stage, false))
        src_abort(m, s, REASON(TEST_HOOK), "source aborts with its data in flight", true);
}

static void on_ack(moe_mig *m, int from, const Moeserve__Cluster__V1__MigAck *q)
{
    src_mig *s = find_src(m, q->mig_id, from);
    if (!s || s->phase != SRC_SENDING || q->stage != (uint32_t)s->stage)
        return;
    int64_t now = moe_now_ns();
    moe_kv_send_free(s->send); /* the destination verified every block: the sends are done */
    s->send = NULL;
    s->bytes += (uint64_t)s->n * m->block_bytes;
    s->blocks += (uint32_t)s->n;
    s->stages++;
    m->st.bytes_sent += (uint64_t)s->n * m->block_bytes;
    m->st.stages_sent++;
    if (!s->final) {
        s->stage++;
        src_next_stage(m, s, now);
        return;
    }
    /* The destination resumed the sequence: it is its own now. Same host, same monotonic clock:
     * its resume time bounds the pause exactly; otherwise the Ack's arrival does. */
    int64_t pause = now - s->pause_t0;
    if (q->resumed_ns > s->pause_t0 && q->resumed_ns <= now)
        pause = q->resumed_ns - s->pause_t0;
    moe_engine_finish(m->eng, s->seq_id);
    m->st.out_completed++;
    MOE_LOG_I("seq %llu: migrated to rank %d: %u tokens, %u stages, %u blocks (%.2f MiB) in "
              "%.2f ms, paused %.3f ms",
              (unsigned long long)s->seq_id, s->dest, s->n_tokens, s->stages, s->blocks,
              (double)s->bytes / 1048576.0, (double)(now - s->t0) * 1e-6, (double)pause * 1e-6);
    report_end(m, s->mig_id, s->seq_id, s->dest, REASON(OK), NULL, s, pause);
    remove_src(m, s);
}

static void on_abort_from_dest(moe_mig *m, int from, const Moeserve__Cluster__V1__MigAbort *q)
{
    src_mig *s = find_src(m, q->mig_id, from);
    if (s)
        src_abort(m, s, q->reason, q->detail, false);
}

/* ---- destination side ---- */

static dst_mig *find_dst(moe_mig *m, uint32_t mig_id, int src)
{
    for (int i = 0; i < m->n_dst; i++)
        if (m->dst[i]->mig_id == mig_id && m->dst[i]->src == src)
            return m->dst[i];
    return NULL;
}

static void remove_dst(moe_mig *m, dst_mig *d)
{
    for (int i = 0; i < m->n_dst; i++) {
        if (m->dst[i] == d) {
            m->dst[i] = m->dst[--m->n_dst];
            break;
        }
    }
    moe_kv_recv_free(d->recv);
    moe_kv_stage_free(&d->views);
    free(d);
}

/* Frees what the destination reserved, now. The log line is what the tests check: the
 * destination's KV usage after an abort. */
static void dst_drop(moe_mig *m, dst_mig *d)
{
    if (d->imported)
        moe_engine_finish(m->eng, d->seq_id);
    moe_engine_stats es;
    moe_engine_get_stats(m->eng, &es);
    MOE_LOG_I("seq %llu: incoming migration %u from rank %d aborted at stage %d (%s); reservation "
              "freed, %d KV blocks in use here",
              (unsigned long long)d->seq_id, d->mig_id, d->src, d->stage, reason_name(d->aborted),
              es.kv_blocks_used);
    remove_dst(m, d);
}

/* Ends a migration on the destination. Receives that may already be matched (data_posted) run
 * out first: their blocks must not be handed to another sequence under a write in flight. */
static void dst_abort(moe_mig *m, dst_mig *d, mig_reason why, const char *detail, bool tell_src,
                      bool data_posted)
{
    if (tell_src)
        send_abort(m, d->src, d->mig_id, d->seq_id, why, detail, false);
    MOE_LOG_D("seq %llu: incoming migration %u from rank %d: abort at stage %d (%s%s%s)",
              (unsigned long long)d->seq_id, d->mig_id, d->src, d->stage, reason_name(why),
              detail && *detail ? ": " : "", detail ? detail : "");
    d->aborted = why;
    m->st.in_aborted++;
    if (d->phase == DST_RECEIVING && d->recv && data_posted) {
        d->phase = DST_DRAINING;
        return;
    }
    dst_drop(m, d);
}

static void on_prepare(moe_mig *m, int from, const Moeserve__Cluster__V1__MigPrepare *q)
{
    dst_mig *d = find_dst(m, q->mig_id, from);
    const char *why = NULL;
    mig_reason r = REASON(DEST_REFUSED);
    if (!q->state)
        why = "no sequence state";
    else if (q->block_bytes != m->block_bytes)
        why = "KV block layouts differ";
    else if (d && (d->phase != DST_IDLE || q->stage != (uint32_t)d->stage + 1))
        why = "stage out of order";
    else if (!d && q->stage != 0)
        why = "unknown migration";
    else if (!d && !moe_grow((void **)&m->dst, &m->cap_dst, m->n_dst + 1, sizeof *m->dst))
        why = "out of memory";
    if (why) {
        if (d)
            dst_abort(m, d, r, why, true, false);
        else
            send_abort(m, from, q->mig_id, q->seq_id, r, why, false);
        return;
    }
    if (!d) {
        if (!(d = calloc(1, sizeof *d))) {
            send_abort(m, from, q->mig_id, q->seq_id, r, "out of memory", false);
            return;
        }
        *d = (dst_mig){.mig_id = q->mig_id, .seq_id = q->seq_id, .src = from, .stage = -1};
        m->dst[m->n_dst++] = d;
    }
    d->stage = (int)q->stage;
    d->final = q->final;
    if (hook_fires(m, MOE_MIG_HOOK_DEST, d->stage, d->final)) {
        dst_abort(m, d, REASON(TEST_HOOK), "destination refuses the reservation", true, false);
        return;
    }
    moe_seq_state st;
    moe_seq_state_from_pb(q->state, &st);
    const int *blocks;
    int nb;
    moe_status rc = d->imported ? moe_engine_import_extend(m->eng, d->seq_id, &st, &blocks, &nb)
                                : moe_engine_import(m->eng, &st, &blocks, &nb);
    if (rc != MOE_OK) {
        dst_abort(m, d, rc == MOE_ERR_FULL ? REASON(DEST_FULL) : REASON(DEST_REFUSED),
                  moe_error_message(), true, false);
        return;
    }
    d->imported = true;
    d->held_blocks = nb;
    if (nb != (int)(q->first_block + q->n_blocks)) {
        dst_abort(m, d, REASON(DEST_REFUSED), "block table does not match the stage", true, false);
        return;
    }
    if (moe_kv_stage_open(&d->views, moe_engine_kv_cache(m->eng), blocks + q->first_block,
                          (int)q->n_blocks, 1, m->o.hooks.kv_staging) != MOE_OK) {
        dst_abort(m, d, REASON(DEST_REFUSED), moe_error_message(), true, false);
        return;
    }
    uint32_t xfer = ++*m->o.next_xfer;
    int64_t now = moe_now_ns();
    rc = moe_kv_recv_start(m->data, moe_kv_stage_views(&d->views, 0), (int)q->n_blocks,
                           m->block_bytes, from, moe_kv_data_tag(xfer),
                           now + ms_ns(m->o.kv_timeout_ms), &d->recv);
    if (rc != MOE_OK) {
        d->recv = NULL;
        dst_abort(m, d, REASON(TRANSFER), moe_error_message(), true, false);
        return;
    }
    d->xfer = xfer;
    d->phase = DST_RECEIVING;
    d->deadline = now + ms_ns(m->o.kv_timeout_ms);
    Moeserve__Cluster__V1__MigReady y;
    moeserve__cluster__v1__mig_ready__init(&y);
    y.mig_id = d->mig_id;
    y.stage = (uint32_t)d->stage;
    y.xfer_id = xfer;
    m->io.send(m->io.ctx, from, TAG(MIG_READY), &y.base);
}

static void on_data(moe_mig *m, int from, const Moeserve__Cluster__V1__MigData *q)
{
    dst_mig *d = find_dst(m, q->mig_id, from);
    if (d && d->recv && d->xfer == q->xfer_id &&
        (d->phase == DST_RECEIVING || d->phase == DST_DRAINING))
        moe_kv_recv_set_checksums(d->recv, q->checksums, (int)q->n_checksums);
}

static void on_abort_from_src(moe_mig *m, int from, const Moeserve__Cluster__V1__MigAbort *q)
{
    dst_mig *d = find_dst(m, q->mig_id, from);
    if (d && d->phase != DST_DRAINING)
        dst_abort(m, d, q->reason, q->detail, false, q->data_posted);
}

/* Advances one incoming migration; true when something changed. May free d. */
static bool dst_progress(moe_mig *m, dst_mig *d, int64_t now)
{
    if (d->phase == DST_IDLE) {
        if (now < d->deadline)
            return false;
        dst_abort(m, d, REASON(TIMEOUT), "no next stage from the source", true, false);
        return true;
    }
    moe_kv_xfer_result r = moe_kv_recv_poll(d->recv, now);
    if (r == MOE_KV_XFER_PENDING)
        return false;
    if (d->phase == DST_DRAINING) {
        dst_drop(m, d);
        return true;
    }
    moe_kv_recv_free(d->recv);
    d->recv = NULL;
    if (r != MOE_KV_XFER_OK) {
        dst_abort(m, d, REASON(TRANSFER), moe_kv_xfer_result_name(r), true, false);
        return true;
    }
    /* Every block verified: into the engine's blocks (a no-op where they were received in place).
     */
    if (moe_kv_stage_upload(&d->views) != MOE_OK) {
        dst_abort(m, d, REASON(TRANSFER), moe_error_message(), true, false);
        return true;
    }
    Moeserve__Cluster__V1__MigAck a;
    moeserve__cluster__v1__mig_ack__init(&a);
    a.mig_id = d->mig_id;
    a.stage = (uint32_t)d->stage;
    if (d->final) {
        if (moe_engine_resume(m->eng, d->seq_id) != MOE_OK) {
            dst_abort(m, d, REASON(DEST_REFUSED), moe_error_message(), true, false);
            return true;
        }
        a.resumed_ns = moe_now_ns();
        m->io.send(m->io.ctx, d->src, TAG(MIG_ACK), &a.base);
        m->st.in_completed++;
        MOE_LOG_D("seq %llu: migrated in from rank %d, resumed", (unsigned long long)d->seq_id,
                  d->src);
        remove_dst(m, d); /* the engine owns the sequence from here */
        return true;
    }
    m->io.send(m->io.ctx, d->src, TAG(MIG_ACK), &a.base);
    d->phase = DST_IDLE;
    /* The source's next MigPrepare may wait for its stall hook or a full block. */
    d->deadline = now + answer_ns(m) + ms_ns(m->o.hooks.stall_ms);
    return true;
}

/* ---- the worker loop's entry points ---- */

static bool in_migrate(void *self, int src, int tag, ProtobufCMessage *msg)
{
    (void)src, (void)tag;
    on_migrate(self, (const Moeserve__Cluster__V1__MigrateSeq *)msg);
    return false;
}

static bool in_prepare(void *self, int src, int tag, ProtobufCMessage *msg)
{
    (void)tag;
    on_prepare(self, src, (const Moeserve__Cluster__V1__MigPrepare *)msg);
    return false;
}

static bool in_ready(void *self, int src, int tag, ProtobufCMessage *msg)
{
    (void)tag;
    on_ready(self, src, (const Moeserve__Cluster__V1__MigReady *)msg);
    return false;
}

static bool in_data(void *self, int src, int tag, ProtobufCMessage *msg)
{
    (void)tag;
    on_data(self, src, (const Moeserve__Cluster__V1__MigData *)msg);
    return false;
}

static bool in_ack(void *self, int src, int tag, ProtobufCMessage *msg)
{
    (void)tag;
    on_ack(self, src, (const Moeserve__Cluster__V1__MigAck *)msg);
    return false;
}

static bool in_abort(void *self, int src, int tag, ProtobufCMessage *msg)
{
    (void)tag;
    moe_mig *m = self;
    const Moeserve__Cluster__V1__MigAbort *a = (const Moeserve__Cluster__V1__MigAbort *)msg;
    /* A migration id names one pair; the receiver plays whichever role it has in it. */
    if (find_dst(m, a->mig_id, src))
        on_abort_from_src(m, src, a);
    else
        on_abort_from_dest(m, src, a);
    return false;
}

static const moe_inbox_kind MIG_INBOX[] = {
    {TAG(MIGRATE), &moeserve__cluster__v1__migrate_seq__descriptor, in_migrate},
    {TAG(MIG_PREPARE), &moeserve__cluster__v1__mig_prepare__descriptor, in_prepare},
    {TAG(MIG_READY), &moeserve__cluster__v1__mig_ready__descriptor, in_ready},
    {TAG(MIG_DATA), &moeserve__cluster__v1__mig_data__descriptor, in_data},
    {TAG(MIG_ACK), &moeserve__cluster__v1__mig_ack__descriptor, in_ack},
    {TAG(MIG_ABORT), &moeserve__cluster__v1__mig_abort__descriptor, in_abort},
};

moe_inbox_result moe_mig_deliver(moe_mig *m, int src, int tag, const uint8_t *buf, size_t len)
{
    return moe_inbox_deliver(MIG_INBOX, sizeof MIG_INBOX / sizeof *MIG_INBOX, m, src, tag, buf, len);
}

bool moe_mig_progress(moe_mig *m, int64_t now)
{
    bool changed = false;
    for (int i = 0; i < m->n_src;) {
        src_mig *s = m->src[i];
        int before = m->n_src;
        if (s->send) {
            bool done = false;
            if (moe_kv_send_poll(s->send, &done) != MOE_OK) {
                src_abort(m, s, REASON(TRANSFER), moe_error_message(), true);
                changed = true;
                continue;
            }
        }
        if (s->phase == SRC_WAIT && now >= s->not_before) {
            src_next_stage(m, s, now);
            changed = true;
        } else if (s->phase != SRC_WAIT && now >= s->deadline) {
            src_abort(m, s, REASON(TIMEOUT), "the destination did not answer", true);
            changed = true;
        }
        if (m->n_src == before && m->src[i] == s)
            i++;
    }
    for (int i = 0; i < m->n_dst;) {
        dst_mig *d = m->dst[i];
        int before = m->n_dst;
        changed |= dst_progress(m, d, now);
        if (m->n_dst == before && m->dst[i] == d)
            i++;
    }
    return changed;
}

void moe_mig_after_step(moe_mig *m, const moe_token_event *events, int n)
{
    if (m->n_src == 0)
        return;
    for (int i = 0; i < n; i++) {
        if (events[i].finish == MOE_FINISH_NONE)
            continue;
        src_mig *s = find_src_seq(m, events[i].seq_id);
        if (s)
            src_abort(m, s, REASON(SEQ_GONE), moe_finish_name(events[i].finish), true);
    }
    for (int i = 0; i < m->n_src;) {
        src_mig *s = m->src[i];
        moe_seq_state st;
        const int *blocks;
        int nb;
        mig_reason r = src_check(m, s, &st, &blocks, &nb);
        if (r != REASON(OK))
            src_abort(m, s, r, NULL, true);
        else
            i++;
    }
}

bool moe_mig_on_free(moe_mig *m, uint64_t seq_id)
{
    src_mig *s = find_src_seq(m, seq_id);
    if (s)
        src_abort(m, s, REASON(SEQ_GONE), "freed by the coordinator", true);
    for (int i = 0; i < m->n_dst; i++) {
        dst_mig *d = m->dst[i];
        if (d->seq_id != seq_id)
            continue;
        /* Receives this side posted may be matched by sends already under way. */
        if (d->phase != DST_DRAINING)
            dst_abort(m, d, REASON(SEQ_GONE), "freed by the coordinator", true,
                      d->phase == DST_RECEIVING);
        return true;
    }
    return false;
}

int moe_mig_blocks_incoming(const moe_mig *m)
{
    int n = 0;
    for (int i = 0; m && i < m->n_dst; i++)
        n += m->dst[i]->held_blocks;
    return n;
}

int moe_mig_active(const moe_mig *m)
{
    return m ? m->n_src + m->n_dst : 0;
}

bool moe_mig_hold(const moe_mig *m)
{
    if (!m)
        return false;
    for (int i = 0; i < m->n_src; i++)
        if (m->src[i]->final && m->src[i]->phase != SRC_WAIT)
            return true;
    for (int i = 0; i < m->n_dst; i++)
        if (m->dst[i]->final && m->dst[i]->phase == DST_RECEIVING)
            return true;
    return false;
}

bool moe_mig_transferring(const moe_mig *m)
{
    if (!m)
        return false;
    for (int i = 0; i < m->n_src; i++)
        if (m->src[i]->phase != SRC_WAIT)
            return true;
    return m->n_dst > 0;
}

void moe_mig_get_stats(const moe_mig *m, moe_mig_stats *st)
{
    *st = m->st;
}

void moe_mig_free(moe_mig *m)
{
    if (!m)
        return;
    while (m->n_src)
        src_abort(m, m->src[0], REASON(SHUTDOWN), "the worker is shutting down", true);
    while (m->n_dst) {
        dst_mig *d = m->dst[0];
        send_abort(m, d->src, d->mig_id, d->seq_id, REASON(SHUTDOWN), "the worker is shutting down",
                   false);
        d->aborted = REASON(SHUTDOWN);
        dst_drop(m, d);
    }
    free(m->src);
    free(m->dst);
    free(m);
}
