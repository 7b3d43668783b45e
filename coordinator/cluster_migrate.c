/* The coordinator's live-migration policy (Llumnix): each instance's virtual KV usage (blocks used
 * and promised, plus one whole cache for requests kept waiting for KV, a headroom for priority
 * requests, and infinity for a draining instance) decides which instance sheds a request and which
 * takes it; the cheapest request (fewest blocks) moves. Also drain on request, the forced hook the
 * tests and benches use, and the bookkeeping of every migration (log line, ClusterStatus
 * counters). The mechanism is the workers' (worker/migrate.c); docs/migration.md has both. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/test_hook.h"
#include "coordinator/cluster_internal.h"

#define REASON(x) MOESERVE__CLUSTER__V1__MIG_REASON__MIG_##x

static const char *const WHY_NAME[] = {"balance", "defrag", "priority", "drain", "forced"};

void moe_cluster_mig_init(moe_cluster *c)
{
    moe_cluster_migrate_opts *o = &c->mig.o;
    *o = c->o.migrate;
    if (o->high_water <= 0)
        o->high_water = 0.85;
    if (o->low_water <= 0)
        o->low_water = 0.60;
    if (o->priority_headroom <= 0)
        o->priority_headroom = 0.30;
    if (o->interval_ms <= 0)
        o->interval_ms = 50;
    if (o->max_inflight <= 0)
        o->max_inflight = 4;
    if (o->final_blocks <= 0)
        o->final_blocks = 2;
    if (o->max_stages <= 0)
        o->max_stages = 32;
    if (o->stage_blocks <= 0)
        o->stage_blocks = 128;
    if (o->min_remaining <= 0)
        o->min_remaining = 16;
    if (o->retry_ms <= 0)
        o->retry_ms = 1000;
    if (o->waiting_ticks <= 0)
        o->waiting_ticks = 3;
    if (o->low_water >= o->high_water) {
        MOE_LOG_W("migration: low-water mark %.2f is not below the high-water mark %.2f; using "
                  "%.2f",
                  o->low_water, o->high_water, 0.7 * o->high_water);
        o->low_water = 0.7 * o->high_water;
    }
    if (o->every_tokens <= 0) {
        const char *v = moe_test_hook("MOE_TEST_MIGRATE_EVERY");
        o->every_tokens = v && *v ? atoi(v) : 0;
        if (o->every_tokens > 0)
            MOE_LOG_W("test hook MOE_TEST_MIGRATE_EVERY=%d: every decoding request moves every "
                      "%d tokens",
                      o->every_tokens, o->every_tokens);
    }
    if (o->every_tokens < 0)
        o->every_tokens = 0;
}

void moe_cluster_mig_free(moe_cluster *c)
{
    free(c->mig.flights);
    c->mig.flights = NULL;
    c->mig.n_flights = c->mig.cap_flights = 0;
}

static bool decodes(const moe_cluster *c, const inst_t *in)
{
    return in->def.pool == (c->disagg ? MOE_POOL_DECODE : MOE_POOL_MIXED);
}

static int req_blocks(const inst_t *in, const creq *r)
{
    uint32_t bt = in->block_tokens ? in->block_tokens : 16;
    return (int)((r->req->n_prompt + r->next_index + bt - 1) / bt);
}

/* Blocks used and promised (hand-offs not done, migrations coming in), as a fraction. */
static double usage(const inst_t *in)
{
    if (!in->kv_total)
        return 1.0;
    return (double)moe_cluster_inst_kv_committed(in) / (double)in->kv_total;
}

static long free_blocks(const inst_t *in)
{
    return (long)in->kv_total - moe_cluster_inst_kv_committed(in);
}

static bool start(moe_cluster *c, creq *r, int src, int dst, mig_why why, int64_t now)
{
    cluster_mig *g = &c->mig;
    if (!moe_grow((void **)&g->flights, &g->cap_flights, g->n_flights + 1,
                          sizeof *g->flights))
        return false;
    uint32_t id = ++g->next_id ? g->next_id : ++g->next_id;
    Moeserve__Cluster__V1__MigrateSeq m;
    moeserve__cluster__v1__migrate_seq__init(&m);
    m.seq_id = r->id;
    m.mig_id = id;
    m.dest_rank = (uint32_t)c->inst[dst].lead;
    m.final_blocks = (uint32_t)g->o.final_blocks;
    m.max_stages = (uint32_t)g->o.max_stages;
    m.stage_blocks = (uint32_t)g->o.stage_blocks;
    if (moe_cluster_send(c, c->inst[src].lead, TAG(MIGRATE), &m.base) != MOE_OK) {
        MOE_LOG_E("migration of request %s: %s", r->req->request_id, moe_error_message());
        return false;
    }
    int blocks = req_blocks(&c->inst[src], r);
    g->flights[g->n_flights++] = (mig_flight){
        .id = id, .seq_id = r->id, .src = src, .dst = dst, .blocks = blocks, .why = why, .t0 = now};
    r->mig.id = id;
    r->mig.dst = dst;
    c->inst[src].mig.out++;
    c->inst[dst].mig.in++;
    pthread_mutex_lock(&c->mu);
    c->inst[dst].mig.in_blocks += blocks;
    moe_migration_counters *k = &g->ctr;
    k->started++;
    k->by_balance += why == MIG_WHY_BALANCE;
    k->by_defrag += why == MIG_WHY_DEFRAG;
    k->by_priority += why == MIG_WHY_PRIORITY;
    k->by_drain += why == MIG_WHY_DRAIN;
    k->by_forced += why == MIG_WHY_FORCED;
    k->in_flight = (uint32_t)g->n_flights;
    pthread_mutex_unlock(&c->mu);
    MOE_LOG_D("migration %u (%s): request %s, %u tokens, %d blocks: instance %d -> %d", id,
              WHY_NAME[why], r->req->request_id, r->req->n_prompt + r->next_index, blocks, src,
              dst);
    return true;
}

/* Removes flight i and releases what it counts against its instances. */
static void end_flight(moe_cluster *c, int i, int64_t now)
{
    cluster_mig *g = &c->mig;
    mig_flight f = g->flights[i];
    g->flights[i] = g->flights[--g->n_flights];
    inst_t *s = &c->inst[f.src], *d = &c->inst[f.dst];
    s->mig.out--;
    d->mig.in--;
    s->mig.end_ns = d->mig.end_ns = now;
    pthread_mutex_lock(&c->mu);
    d->mig.in_blocks -= f.blocks;
    g->ctr.in_flight = (uint32_t)g->n_flights;
    pthread_mutex_unlock(&c->mu);
}

static void count_abort(moe_migration_counters *k, Moeserve__Cluster__V1__MigReason r)
{
    k->aborted++;
    switch (r) {
    case REASON(DEST_FULL):
        k->aborted_dest_full++;
        break;
    case REASON(SEQ_GONE):
        k->aborted_seq_gone++;
        break;
    case REASON(PREEMPTED):
        k->aborted_preempted++;
        break;
    case REASON(TRANSFER):
        k->aborted_transfer++;
        break;
    case REASON(TIMEOUT):
        k->aborted_timeout++;
        break;
    default:
        k->aborted_other++;
        break;
    }
}

static const char *reason_name(Moeserve__Cluster__V1__MigReason r)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&moeserve__cluster__v1__mig_reason__descriptor, r);
    return v ? v->name : "?";
}

void moe_cluster_mig_on_end(moe_cluster *c, int src_rank,
                            const Moeserve__Cluster__V1__MigrateEnd *m)
{
    cluster_mig *g = &c->mig;
    int i = 0;
    while (i < g->n_flights && g->flights[i].id != m->mig_id)
        i++;
    if (i == g->n_flights) {
        MOE_LOG_W("MigrateEnd for unknown migration %u from rank %d", m->mig_id, src_rank);
        return;
    }
    mig_flight f = g->flights[i];
    int64_t now = moe_now_ns();
    end_flight(c, i, now);
    bool ok = m->reason == REASON(OK);
    creq *r = moe_cluster_req_find(c, f.seq_id);
    if (r && r->mig.id == f.id) {
        r->mig.id = 0;
        if (ok) {
            pthread_mutex_lock(&c->mu);
            if (r->pi == r->di)
                r->pi = f.dst; /* colocated: the mixed instance that runs it */
            r->di = f.dst;
            pthread_mutex_unlock(&c->mu);
            r->mig.n_done++;
            r->mig.mark = r->next_index;
        } else {
            r->mig.retry_after = now + (int64_t)g->o.retry_ms * 1000000;
        }
    }
    double pause_ms = (double)m->pause_ns * 1e-6;
    pthread_mutex_lock(&c->mu);
    moe_migration_counters *k = &g->ctr;
    if (ok) {
        k->completed++;
        k->bytes += m->bytes;
        k->blocks += m->blocks;
        k->stages += m->stages;
        k->pause_ms_total += pause_ms;
        if (pause_ms > k->pause_ms_max)
            k->pause_ms_max = pause_ms;
        g->pause_ms[g->n_pause++ % MIG_PAUSE_RING] = (float)pause_ms;
    } else {
        count_abort(k, m->reason);
    }
    pthread_mutex_unlock(&c->mu);
    const char *rid = r ? r->req->request_id : "(ended)";
    if (ok)
        MOE_LOG_I(
            "migration %u (%s): request %s instance %d -> %d: %u tokens, %u stages, %u blocks "
            "(%.2f MiB), pause %.3f ms, total %.2f ms",
            f.id, WHY_NAME[f.why], rid, f.src, f.dst, m->n_tokens, m->stages, m->blocks,
            (double)m->bytes / 1048576.0, pause_ms, (double)m->total_ns * 1e-6);
    else
        MOE_LOG_I("migration %u (%s): request %s instance %d -> %d aborted: %s%s%s (%u stages "
                  "done); it stays on instance %d",
                  f.id, WHY_NAME[f.why], rid, f.src, f.dst, reason_name(m->reason),
                  *m->detail ? ": " : "", m->detail, m->stages, f.src);
}

void moe_cluster_mig_on_request_end(moe_cluster *c, creq *r)
{
    if (r->mig.id)
        moe_cluster_send_free(c, r->mig.dst, r->id); /* its flight ends with the source's report */
}

void moe_cluster_mig_snapshot(moe_cluster *c, moe_cluster_status *out)
{
    cluster_mig *g = &c->mig;
    out->migration = g->ctr;
    size_t n = g->n_pause < MIG_PAUSE_RING ? (size_t)g->n_pause : MIG_PAUSE_RING;
    if (n) {
        float v[MIG_PAUSE_RING];
        memcpy(v, g->pause_ms, n * sizeof *v);
        for (size_t i = 1; i < n; i++) { /* insertion sort: n <= 1024, status calls are rare */
            float x = v[i];
            size_t j = i;
            for (; j > 0 && v[j - 1] > x; j--)
                v[j] = v[j - 1];
            v[j] = x;
        }
        out->migration.pause_ms_p50 = v[n / 2];
        out->migration.pause_ms_p99 = v[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1];
    }
    out->counters.migrations = g->ctr.completed;
    out->counters.migrations_aborted = g->ctr.aborted;
}

/* ---- drain ---- */

moe_status moe_cluster_drain_instance(moe_cluster *c, uint32_t idx, bool undo,
                                      moe_instance_status *out)
{
    pthread_mutex_lock(&c->mu);
    if (idx >= (uint32_t)c->n_inst) {
        pthread_mutex_unlock(&c->mu);
        return moe_error(MOE_ERR_NOT_FOUND, "DrainRequest.instance: %u, the cluster has %d", idx,
                         c->n_inst);
    }
    inst_t *in = &c->inst[idx];
    if (!undo && !atomic_load(&in->mig.drain)) {
        int others = 0;
        for (int i = 0; i < c->n_inst; i++)
            others += i != (int)idx && c->inst[i].def.pool == in->def.pool &&
                      c->inst[i].state == MOE_INSTANCE_READY && !atomic_load(&c->inst[i].mig.drain);
        if (!others) {
            pthread_mutex_unlock(&c->mu);
            return moe_error(MOE_ERR_INVALID_ARG,
                             "DrainRequest.instance: %u is the last %s instance taking requests",
                             idx, moe_pool_name(in->def.pool));
        }
    }
    bool was = atomic_exchange(&in->mig.drain, !undo);
    in->mig.drained_logged = false;
    if (out) {
        memset(out, 0, sizeof *out);
        out->id = idx;
        out->pool = in->def.pool;
        out->state = !undo && in->state == MOE_INSTANCE_READY ? MOE_INSTANCE_DRAINING : in->state;
        out->ep_size = (uint32_t)in->def.ep_size;
        for (int j = 0; j < in->def.ep_size && j < MOE_FRONTEND_MAX_EP; j++)
            out->ranks[j] = in->def.ranks[j];
        out->kv_blocks_total = in->kv_total;
        out->kv_blocks_used = in->kv_used;
        out->kv_blocks_free = in->kv_total > in->kv_used ? in->kv_total - in->kv_used : 0;
        out->kv_block_tokens = in->block_tokens;
        out->running = in->running;
        out->waiting = in->waiting;
        out->pending_prompt_tokens = in->pending_tokens;
    }
    c->wake = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (was != !undo)
        MOE_LOG_I("instance %u: %s", idx,
                  undo ? "drain undone, it takes requests again"
                       : "draining: no new requests, its running ones migrate away");
    return MOE_OK;
}

/* ---- the policy ---- */

/* Per instance, for one policy period. */
typedef struct {
    bool src_ok, dst_ok, drain, queued;
    double vu;
    creq *cheapest, *cheapest_normal; /* movable requests with the fewest blocks */
    int cheapest_blocks, cheapest_normal_blocks;
} view_t;

static bool movable(const moe_cluster *c, const creq *r, int64_t now, bool drain)
{
    return r->state == RQ_DECODE && r->di >= 0 && !r->mig.id && now >= r->mig.retry_after &&
           (drain || r->req->max_new_tokens >= r->next_index + (uint32_t)c->mig.o.min_remaining);
}

/* The destination for `blocks` more from src: the lowest virtual usage that fits. */
static int pick_dst(moe_cluster *c, const view_t *v, int src, int blocks, bool drain)
{
    const moe_cluster_migrate_opts *o = &c->mig.o;
    int best = -1;
    for (int i = 0; i < c->n_inst; i++) {
        const inst_t *in = &c->inst[i];
        if (i == src || !v[i].dst_ok || in->def.pool != c->inst[src].def.pool)
            continue;
        if (free_blocks(in) < blocks + 2)
            continue;
        double after = usage(in) + (double)blocks / (double)(in->kv_total ? in->kv_total : 1);
        /* Balance needs a cold destination that stays below the high-water mark after the move
         * (no ping-pong); a drain takes any instance with room. */
        if (!drain && (v[i].vu >= o->low_water || after >= o->high_water))
            continue;
        if (best < 0 || v[i].vu < v[best].vu)
            best = i;
    }
    return best;
}

static bool policy(moe_cluster *c, int64_t now)
{
    cluster_mig *g = &c->mig;
    const moe_cluster_migrate_opts *o = &g->o;
    int n = c->n_inst;
    view_t *v = calloc((size_t)n, sizeof *v);
    if (!v)
        return false;
    for (int i = 0; i < n; i++) {
        inst_t *in = &c->inst[i];
        in->mig.has_priority = false;
        v[i].drain = atomic_load(&in->mig.drain);
        in->mig.waiting_ticks = in->waiting > 0 ? in->mig.waiting_ticks + 1 : 0;
        v[i].queued = in->mig.waiting_ticks >= o->waiting_ticks;
        if (v[i].drain && !in->mig.drained_logged && in->kv_used == 0 && in->running == 0 &&
            in->waiting == 0 && in->mig.out == 0 && in->mig.load_ns > in->mig.end_ns) {
            in->mig.drained_logged = true;
            MOE_LOG_I("instance %d drained: no KV in use, no requests", i);
        }
    }
    for (int b = 0; b < N_BUCKETS; b++) {
        for (creq *r = c->buckets[b]; r; r = r->hnext) {
            if (r->state == RQ_QUEUED || r->di < 0)
                continue;
            if (r->req->priority < 0)
                c->inst[r->di].mig.has_priority = true;
            if (!movable(c, r, now, v[r->di].drain))
                continue;
            view_t *x = &v[r->di];
            int nb = req_blocks(&c->inst[r->di], r);
            if (!x->cheapest || nb < x->cheapest_blocks) {
                x->cheapest = r;
                x->cheapest_blocks = nb;
            }
            if (r->req->priority >= 0 && (!x->cheapest_normal || nb < x->cheapest_normal_blocks)) {
                x->cheapest_normal = r;
                x->cheapest_normal_blocks = nb;
            }
        }
    }
    for (int i = 0; i < n; i++) {
        inst_t *in = &c->inst[i];
        bool live = in->state == MOE_INSTANCE_READY && decodes(c, in) && in->kv_total > 0 &&
                    in->mig.load_ns > in->mig.end_ns; /* its load reflects its last move */
        v[i].vu = usage(in) + (v[i].queued ? 1.0 : 0.0) +
                  (in->mig.has_priority ? o->priority_headroom : 0.0) + (v[i].drain ? 1e6 : 0.0);
        v[i].src_ok = live && in->mig.out < (v[i].drain ? 2 : 1);
        v[i].dst_ok = live && !v[i].drain && in->mig.in == 0 && !v[i].queued;
    }
    bool started = false;
    for (;;) {
        if (g->n_flights >= o->max_inflight)
            break;
        int src = -1;
        for (int i = 0; i < n; i++)
            if (v[i].src_ok && (v[i].drain || !o->no_policy) && v[i].vu > o->high_water &&
                (src < 0 || v[i].vu > v[src].vu))
                src = i;
        if (src < 0)
            break;
        v[src].src_ok = false; /* one move per source and period */
        view_t *s = &v[src];
        inst_t *in = &c->inst[src];
        double phys = usage(in);
        /* Promised more blocks than it has (hand-offs waiting for room), or kept requests
         * waiting: moving running requests away makes room for them. */
        bool short_of_room =
            s->queued || moe_cluster_inst_kv_committed(in) > (long)in->kv_total;
        mig_why why = s->drain                                        ? MIG_WHY_DRAIN
                      : short_of_room                                 ? MIG_WHY_DEFRAG
                      : in->mig.has_priority && phys <= o->high_water ? MIG_WHY_PRIORITY
                                                                      : MIG_WHY_BALANCE;
        /* Priority headroom moves normal requests only; so does balance when it can. */
        creq *r = why == MIG_WHY_DRAIN || why == MIG_WHY_DEFRAG ? s->cheapest : s->cheapest_normal;
        int blocks = r == s->cheapest ? s->cheapest_blocks : s->cheapest_normal_blocks;
        if (!r && why == MIG_WHY_BALANCE) {
            r = s->cheapest;
            blocks = s->cheapest_blocks;
        }
        if (!r)
            continue;
        int dst = pick_dst(c, v, src, blocks, why == MIG_WHY_DRAIN);
        if (dst < 0)
            continue;
        if (start(c, r, src, dst, why, now)) {
            started = true;
            v[dst].dst_ok = false;
        }
    }
    free(v);
    return started;
}

/* The forced hook: every decoding request moves to the next instance of its pool each time it
 * has generated every_tokens more tokens. */
static bool forced(moe_cluster *c, int64_t now)
{
    bool started = false;
    uint32_t every = (uint32_t)c->mig.o.every_tokens;
    for (int b = 0; b < N_BUCKETS; b++) {
        for (creq *r = c->buckets[b], *next; r; r = next) {
            next = r->hnext;
            if (r->state != RQ_DECODE || r->di < 0 || r->mig.id || now < r->mig.retry_after ||
                r->next_index < r->mig.mark + every)
                continue;
            int src = r->di, dst = -1;
            for (int k = 1; k < c->n_inst && dst < 0; k++) {
                int i = (src + k) % c->n_inst;
                const inst_t *in = &c->inst[i];
                if (in->def.pool == c->inst[src].def.pool && in->state == MOE_INSTANCE_READY &&
                    !atomic_load(&in->mig.drain))
                    dst = i;
            }
            if (dst >= 0 && c->inst[src].state == MOE_INSTANCE_READY)
                started |= start(c, r, src, dst, MIG_WHY_FORCED, now);
        }
    }
    return started;
}

bool moe_cluster_mig_tick(moe_cluster *c, int64_t now)
{
    cluster_mig *g = &c->mig;
    /* A source that stopped answering never reports: its flights end here. */
    for (int i = 0; i < g->n_flights;) {
        mig_flight *f = &g->flights[i];
        if (c->inst[f->src].state != MOE_INSTANCE_UNREACHABLE) {
            i++;
            continue;
        }
        creq *r = moe_cluster_req_find(c, f->seq_id);
        if (r && r->mig.id == f->id)
            r->mig.id = 0;
        pthread_mutex_lock(&c->mu);
        count_abort(&g->ctr, REASON(TIMEOUT));
        pthread_mutex_unlock(&c->mu);
        end_flight(c, i, now);
    }
    pthread_mutex_lock(&c->mu);
    bool draining = c->draining;
    pthread_mutex_unlock(&c->mu);
    if (draining)
        return false; /* the whole cluster drains: requests finish where they are */
    bool started = false;
    if (g->o.every_tokens > 0 && now >= g->next_forced) {
        g->next_forced = now + 1000000;
        started |= forced(c, now);
    }
    if (now >= g->next_tick) {
        g->next_tick = now + (int64_t)g->o.interval_ms * 1000000;
        started |= policy(c, now);
    }
    return started;
}
