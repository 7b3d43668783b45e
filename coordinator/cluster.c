/* The coordinator's cluster backend: request table and queue, placement (prefill: least pending
 * prompt tokens; decode: most free KV blocks, then fewest running), control messages with the
 * workers over MPI, heartbeats, token delivery (in index order, detokenized, stop strings and stop
 * token ids), cancellation and drain. The front end's threads only fill an inbox; the loop on the
 * MPI thread does the rest. */
#include "coordinator/cluster.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cluster.pb-c.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/stop.h"

#define TAG(x) MOESERVE__CLUSTER__V1__TAG__TAG_##x
#define EVENT(x) MOESERVE__CLUSTER__V1__SEQ_EVENT__KIND__KIND_##x
#define N_BUCKETS 4096
#define LAT_RING 65536

typedef Moeserve__Cluster__V1__Load pb_load;
typedef Moeserve__Cluster__V1__Counters pb_counters;

/* ---- control link: protobuf over MPI, non-blocking sends whose buffers live until done ---- */
typedef struct {
    MPI_Request r;
    uint8_t *buf;
} out_msg;

static bool grow(void **p, int *cap, int need, size_t elem)
{
    if (need <= *cap)
        return true;
    int nc = *cap ? *cap * 2 : 16;
    while (nc < need)
        nc *= 2;
    void *np = realloc(*p, (size_t)nc * elem);
    if (!np)
        return false;
    *p = np;
    *cap = nc;
    return true;
}

static void nap(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    nanosleep(&ts, NULL);
}

/* ---- requests ---- */
typedef enum { RQ_QUEUED = 0, RQ_PREFILL, RQ_TRANSFER, RQ_DECODE } rq_state;

typedef struct {
    uint32_t index;
    int32_t token;
    int finish;
} stash_t;

typedef struct creq {
    uint64_t id;
    moe_frontend_req *stream;
    const moe_gen_request *req;
    rq_state state;
    int pi, di;           /* prefill and decode instance (-1 none; mixed: pi == di) */
    int reserved_blocks;  /* counted in inst[di].reserved_blocks until the hand-off */
    bool counted_pending; /* n_prompt counted in inst[pi].pending_tokens until the first token */
    uint32_t next_index;
    stash_t *stash;
    int n_stash, cap_stash;
    moe_detok *dt;
    moe_stopper *stop;
    char *text; /* everything the detokenizer produced (to name the matched stop string) */
    size_t text_len, text_cap, emitted;
    struct creq *hnext;
    struct creq *qnext;
} creq;

typedef struct {
    moe_cluster_instance def;
    int lead;
    moe_instance_state state;
    bool ready_seen;
    int64_t last_seen;
    uint32_t kv_total, kv_used, block_tokens, running, waiting;
    uint64_t block_bytes;
    int max_batch_tokens, max_seqs;
    uint64_t pending_tokens; /* prompt tokens sent, first token not back (coordinator's count) */
    int n_pending;
    int reserved_blocks;     /* decode: blocks of requests assigned and not yet handed off */
    pb_counters ctr;         /* latest cumulative counters of its lead */
} inst_t;

struct moe_cluster {
    moe_cluster_opts o;
    char model_name[128];
    inst_t *inst;
    int n_inst;
    int *rank_inst;          /* [world] instance of a rank, -1 coordinator/spare */
    bool *rank_ready, *rank_bye;
    int *spares;
    bool disagg;

    MPI_Comm ctrl;
    out_msg *ob;
    int n_ob, cap_ob;

    pthread_mutex_t mu;      /* inbox, admission counters, instance fields read by the front end */
    pthread_cond_t cv;
    creq **in_sub;
    int n_in_sub, cap_in_sub;
    uint64_t *in_cancel;
    int n_in_cancel, cap_in_cancel;
    bool wake;
    int n_active, n_queued;
    bool ready, draining, stopped;
    int cache_tokens;        /* the smallest instance KV cache in tokens: one sequence must fit */
    int usable;              /* every pool a request needs has a READY instance */
    _Atomic uint64_t next_id;

    /* Token path latency (worker send -> pushed to the front end), last LAT_RING tokens, us. */
    float *lat;
    uint64_t n_lat;
    int64_t next_lat_log;

    creq *buckets[N_BUCKETS];
    creq *queue;
    int64_t drain_started;
    uint64_t transfers_logged;
};

static inst_t *inst_of_rank(moe_cluster *c, int rank)
{
    return rank > 0 && rank < c->o.world_size && c->rank_inst[rank] >= 0 ? &c->inst[c->rank_inst[rank]] : NULL;
}

static moe_status ob_send(moe_cluster *c, int dest, int tag, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    if (len > INT_MAX)
        return moe_error(MOE_ERR_RANGE, "control message %s of %zu bytes is too large", m->descriptor->name, len);
    if (!grow((void **)&c->ob, &c->cap_ob, c->n_ob + 1, sizeof *c->ob))
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    protobuf_c_message_pack(m, buf);
    out_msg *om = &c->ob[c->n_ob];
    int rc = MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, c->ctrl, &om->r);
    if (rc != MPI_SUCCESS) {
        free(buf);
        return moe_error(MOE_ERR_INTERNAL, "MPI_Isend of %s to rank %d failed (%d)", m->descriptor->name, dest, rc);
    }
    om->buf = buf;
    c->n_ob++;
    return MOE_OK;
}

static void ob_progress(moe_cluster *c)
{
    for (int i = 0; i < c->n_ob;) {
        int flag = 0;
        MPI_Test(&c->ob[i].r, &flag, MPI_STATUS_IGNORE);
        if (flag) {
            free(c->ob[i].buf);
            c->ob[i] = c->ob[--c->n_ob];
        } else {
            i++;
        }
    }
}

static void send_free(moe_cluster *c, int inst, uint64_t id)
{
    if (inst < 0 || c->inst[inst].state == MOE_INSTANCE_UNREACHABLE)
        return;
    Moeserve__Cluster__V1__FreeSeqs f;
    moeserve__cluster__v1__free_seqs__init(&f);
    f.n_seq_ids = 1;
    f.seq_ids = &id;
    if (ob_send(c, c->inst[inst].lead, TAG(FREE), &f.base) != MOE_OK)
        MOE_LOG_E("free seq %llu: %s", (unsigned long long)id, moe_error_message());
}

/* ---- request table ---- */

static creq *find_req(moe_cluster *c, uint64_t id)
{
    for (creq *r = c->buckets[id % N_BUCKETS]; r; r = r->hnext)
        if (r->id == id)
            return r;
    return NULL;
}

static void unlink_req(moe_cluster *c, creq *r)
{
    for (creq **pp = &c->buckets[r->id % N_BUCKETS]; *pp; pp = &(*pp)->hnext) {
        if (*pp == r) {
            *pp = r->hnext;
            break;
        }
    }
    if (r->state == RQ_QUEUED) {
        for (creq **pp = &c->queue; *pp; pp = &(*pp)->qnext) {
            if (*pp == r) {
                *pp = r->qnext;
                break;
            }
        }
    }
}

/* Releases what the request counts against its instances (under mu: the front end reads them). */
static void release_accounting(moe_cluster *c, creq *r)
{
    pthread_mutex_lock(&c->mu);
    if (r->counted_pending && r->pi >= 0) {
        c->inst[r->pi].pending_tokens -= r->req->n_prompt;
        c->inst[r->pi].n_pending--;
    }
    r->counted_pending = false;
    if (r->reserved_blocks && r->di >= 0)
        c->inst[r->di].reserved_blocks -= r->reserved_blocks;
    r->reserved_blocks = 0;
    if (r->state == RQ_QUEUED)
        c->n_queued--;
    pthread_mutex_unlock(&c->mu);
}

static void destroy_req(moe_cluster *c, creq *r)
{
    pthread_mutex_lock(&c->mu);
    c->n_active--;
    pthread_mutex_unlock(&c->mu);
    moe_detok_free(r->dt);
    moe_stopper_free(r->stop);
    free(r->stash);
    free(r->text);
    free(r);
}

/* Ends a request with an error: frees it on its workers, then the terminal call. */
static void fail_req(moe_cluster *c, creq *r, moe_status code, const char *msg)
{
    unlink_req(c, r);
    release_accounting(c, r);
    if (r->state != RQ_QUEUED) {
        send_free(c, r->pi, r->id);
        if (r->di != r->pi)
            send_free(c, r->di, r->id);
    }
    moe_frontend_error(r->stream, code, msg);
    destroy_req(c, r);
}

static void finish_req(moe_cluster *c, creq *r, moe_finish_reason why, const char *matched, bool free_workers)
{
    unlink_req(c, r);
    release_accounting(c, r);
    if (free_workers) {
        send_free(c, r->pi, r->id);
        if (r->di != r->pi)
            send_free(c, r->di, r->id);
    }
    moe_frontend_finish_info info = {.reason = why, .matched_stop = matched};
    moe_frontend_finish(r->stream, &info);
    destroy_req(c, r);
}

/* ---- token delivery ---- */

static bool append_text(creq *r, const char *s, size_t n)
{
    if (r->text_len + n + 1 > r->text_cap) {
        size_t cap = r->text_cap ? r->text_cap * 2 : 256;
        while (cap < r->text_len + n + 1)
            cap *= 2;
        char *t = realloc(r->text, cap);
        if (!t)
            return false;
        r->text = t;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = 0;
    return true;
}

/* The stop string the stopper matched: the one the text continues with right after what was
 * emitted (the shortest, should several start there). */
static const char *matched_stop(const creq *r)
{
    const char *best = NULL;
    size_t best_len = 0;
    for (uint32_t i = 0; i < r->req->n_stop; i++) {
        const char *s = r->req->stop[i];
        size_t n = strlen(s);
        if (n && r->emitted + n <= r->text_len && !memcmp(r->text + r->emitted, s, n) && (!best || n < best_len)) {
            best = s;
            best_len = n;
        }
    }
    return best;
}

/* One token, in index order. Returns true when the request ended (r is freed). */
static bool emit_token(moe_cluster *c, creq *r, uint32_t index, int32_t token, int finish)
{
    const moe_gen_request *q = r->req;
    bool stop_id = false;
    for (uint32_t i = 0; i < q->n_stop_token_ids; i++)
        stop_id |= q->stop_token_ids[i] == token;
    bool eos = finish == MOESERVE__CLUSTER__V1__FINISH__FINISH_EOS;
    bool last = finish != MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE || stop_id;
    char piece[4096] = "";
    size_t n = 0;
    if (!eos && !stop_id)
        n = moe_detok_push(r->dt, token, piece, sizeof piece);
    if (last)
        n += moe_detok_finish(r->dt, piece + n, sizeof piece - n);
    if (q->n_stop && n)
        append_text(r, piece, n);
    char *out = NULL;
    size_t out_len = 0;
    bool hit = moe_stopper_push(r->stop, piece, n, &out, &out_len);
    const char *stop_str = NULL;
    if (hit) {
        r->emitted += out_len;
        stop_str = matched_stop(r);
        if (q->include_stop_str_in_output && stop_str) {
            size_t sl = strlen(stop_str);
            char *o2 = realloc(out, out_len + sl + 1);
            if (o2) {
                out = o2;
                memcpy(out + out_len, stop_str, sl);
                out_len += sl;
            }
        }
    } else {
        if (last)
            moe_stopper_flush(r->stop, &out, &out_len);
        r->emitted += out_len;
    }
    moe_status st = moe_frontend_push_tokens(r->stream, &token, &index, 1, out ? out : "", out_len);
    free(out);
    if (st != MOE_OK) {
        MOE_LOG_E("request %s: %s", q->request_id, moe_error_message());
        fail_req(c, r, MOE_ERR_INTERNAL, "internal error: token stream out of order");
        return true;
    }
    if (hit || stop_id) {
        char id_text[16];
        snprintf(id_text, sizeof id_text, "%d", token);
        finish_req(c, r, MOE_FINISH_STOP, hit ? stop_str : id_text,
                   finish == MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE);
        return true;
    }
    if (finish != MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE) {
        finish_req(c, r, eos ? MOE_FINISH_EOS : MOE_FINISH_LENGTH, NULL, false);
        return true;
    }
    return false;
}

static void first_token_seen(moe_cluster *c, creq *r, bool finished)
{
    pthread_mutex_lock(&c->mu);
    if (r->counted_pending) {
        c->inst[r->pi].pending_tokens -= r->req->n_prompt;
        c->inst[r->pi].n_pending--;
        r->counted_pending = false;
    }
    pthread_mutex_unlock(&c->mu);
    if (r->state == RQ_PREFILL && !finished)
        r->state = c->disagg ? RQ_TRANSFER : RQ_DECODE;
}

static void deliver(moe_cluster *c, creq *r, uint32_t index, int32_t token, int finish)
{
    if (index == 0)
        first_token_seen(c, r, finish != MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE);
    if (index < r->next_index)
        return; /* a duplicate: never sent twice */
    if (index > r->next_index) {
        if (grow((void **)&r->stash, &r->cap_stash, r->n_stash + 1, sizeof *r->stash))
            r->stash[r->n_stash++] = (stash_t){.index = index, .token = token, .finish = finish};
        return;
    }
    r->next_index++;
    if (emit_token(c, r, index, token, finish))
        return;
    for (bool again = true; again;) { /* tokens that arrived early */
        again = false;
        for (int i = 0; i < r->n_stash; i++) {
            if (r->stash[i].index == r->next_index) {
                stash_t s = r->stash[i];
                r->stash[i] = r->stash[--r->n_stash];
                r->next_index++;
                if (emit_token(c, r, s.index, s.token, s.finish))
                    return;
                again = true;
                break;
            }
        }
    }
}

/* ---- instances ---- */

static void apply_load(moe_cluster *c, inst_t *in, const pb_load *l)
{
    if (!l)
        return;
    pthread_mutex_lock(&c->mu);
    in->kv_total = l->kv_blocks_total;
    in->kv_used = l->kv_blocks_used;
    in->running = l->running;
    in->waiting = l->waiting + l->pulls_waiting; /* offers waiting for room are queued for it */
    pthread_mutex_unlock(&c->mu);
}

static void update_usable(moe_cluster *c)
{
    bool pre = false, dec = false, mixed = false;
    int min_cache = INT_MAX;
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        if (in->state != MOE_INSTANCE_READY)
            continue;
        pre |= in->def.pool == MOE_POOL_PREFILL;
        dec |= in->def.pool == MOE_POOL_DECODE;
        mixed |= in->def.pool == MOE_POOL_MIXED;
        int cache = (int)(in->kv_total * in->block_tokens);
        if (cache < min_cache)
            min_cache = cache;
    }
    pthread_mutex_lock(&c->mu);
    c->usable = c->disagg ? pre && dec : mixed;
    c->cache_tokens = min_cache == INT_MAX ? 0 : min_cache;
    pthread_mutex_unlock(&c->mu);
}

static const char *pool_name(moe_pool_kind k)
{
    return k == MOE_POOL_PREFILL ? "prefill" : k == MOE_POOL_DECODE ? "decode" : "mixed";
}

/* An instance missed its heartbeats: every request that depends on it fails with UNAVAILABLE. */
static void mark_unreachable(moe_cluster *c, int idx, double silent_s)
{
    inst_t *in = &c->inst[idx];
    pthread_mutex_lock(&c->mu);
    in->state = MOE_INSTANCE_UNREACHABLE;
    pthread_mutex_unlock(&c->mu);
    char msg[256];
    snprintf(msg, sizeof msg, "%s instance %d (rank %d) stopped answering: no heartbeat for %.1f s",
             pool_name(in->def.pool), idx, in->lead, silent_s);
    MOE_LOG_E("%s; failing its requests", msg);
    for (int b = 0; b < N_BUCKETS; b++) {
        for (creq *r = c->buckets[b], *next; r; r = next) {
            next = r->hnext;
            bool dep = r->state != RQ_QUEUED &&
                       ((r->pi == idx && r->state == RQ_PREFILL) || r->di == idx);
            if (dep)
                fail_req(c, r, MOE_ERR_UNAVAILABLE, msg);
        }
    }
    update_usable(c);
}

/* ---- placement and dispatch ---- */

static int pick_prefill(moe_cluster *c, const creq *r, bool *gated)
{
    moe_pool_kind want = c->disagg ? MOE_POOL_PREFILL : MOE_POOL_MIXED;
    int best = -1;
    *gated = false;
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        if (in->def.pool != want || in->state != MOE_INSTANCE_READY)
            continue;
        /* Keep a few batches' worth queued on each instance, no more: the rest waits here, where
         * priorities still apply. */
        uint64_t gate = (uint64_t)(4 * in->max_batch_tokens);
        if (in->n_pending > 0 && (in->pending_tokens + r->req->n_prompt > gate || in->n_pending >= 2 * in->max_seqs)) {
            *gated = true;
            continue;
        }
        if (best < 0 || in->pending_tokens < c->inst[best].pending_tokens ||
            (in->pending_tokens == c->inst[best].pending_tokens && in->running < c->inst[best].running))
            best = i;
    }
    return best;
}

static int pick_decode(moe_cluster *c)
{
    int best = -1;
    long best_free = 0;
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        if (in->def.pool != MOE_POOL_DECODE || in->state != MOE_INSTANCE_READY)
            continue;
        long fr = (long)in->kv_total - (long)in->kv_used - (long)in->reserved_blocks;
        if (best < 0 || fr > best_free || (fr == best_free && in->running < c->inst[best].running)) {
            best = i;
            best_free = fr;
        }
    }
    return best;
}

static void dispatch(moe_cluster *c)
{
    while (c->queue) {
        creq *r = c->queue;
        bool gated;
        int pi = pick_prefill(c, r, &gated);
        if (pi < 0) {
            if (gated)
                return; /* every instance has enough queued: wait for first tokens */
            fail_req(c, r, MOE_ERR_UNAVAILABLE, c->disagg ? "no prefill instance is available" : "no instance is available");
            continue;
        }
        int di = pi;
        if (c->disagg && (di = pick_decode(c)) < 0) {
            fail_req(c, r, MOE_ERR_UNAVAILABLE, "no decode instance is available");
            continue;
        }
        const moe_gen_request *q = r->req;
        Moeserve__Cluster__V1__Sampling sp;
        moeserve__cluster__v1__sampling__init(&sp);
        sp.temperature = q->temperature;
        sp.top_p = q->top_p;
        sp.top_k = q->top_k;
        sp.seed = q->seed;
        Moeserve__Cluster__V1__StartSeq m;
        moeserve__cluster__v1__start_seq__init(&m);
        m.seq_id = r->id;
        m.n_prompt = q->n_prompt;
        m.prompt = (int32_t *)(uintptr_t)q->prompt; /* only read by pack */
        m.sampling = &sp;
        m.max_new_tokens = q->max_new_tokens;
        m.ignore_eos = q->ignore_eos;
        m.prefill_only = c->disagg;
        m.decode_rank = (uint32_t)c->inst[di].lead;
        c->queue = r->qnext;
        if (ob_send(c, c->inst[pi].lead, TAG(START), &m.base) != MOE_OK) {
            r->state = RQ_PREFILL; /* it left the queue */
            pthread_mutex_lock(&c->mu);
            c->n_queued--;
            pthread_mutex_unlock(&c->mu);
            fail_req(c, r, MOE_ERR_INTERNAL, moe_error_message());
            continue;
        }
        pthread_mutex_lock(&c->mu);
        c->n_queued--;
        r->state = RQ_PREFILL;
        r->pi = pi;
        r->di = di;
        c->inst[pi].pending_tokens += q->n_prompt;
        c->inst[pi].n_pending++;
        r->counted_pending = true;
        if (c->disagg) {
            uint32_t bt = c->inst[di].block_tokens ? c->inst[di].block_tokens : 16;
            r->reserved_blocks = (int)((q->n_prompt + 1 + bt - 1) / bt);
            c->inst[di].reserved_blocks += r->reserved_blocks;
        }
        pthread_mutex_unlock(&c->mu);
    }
}

static void enqueue(moe_cluster *c, creq *r)
{
    creq **pp = &c->queue;
    while (*pp && ((*pp)->req->priority <= r->req->priority))
        pp = &(*pp)->qnext;
    r->qnext = *pp;
    *pp = r;
}

/* ---- messages from workers ---- */

static void on_ready_msg(moe_cluster *c, int src, const Moeserve__Cluster__V1__WorkerReady *m)
{
    c->rank_ready[src] = true;
    inst_t *in = inst_of_rank(c, src);
    if (!m->ok) {
        MOE_LOG_E("rank %d failed to start: %s", src, m->error);
        if (in) {
            pthread_mutex_lock(&c->mu);
            in->state = MOE_INSTANCE_UNREACHABLE;
            pthread_mutex_unlock(&c->mu);
        }
        return;
    }
    if (!in)
        return;
    pthread_mutex_lock(&c->mu);
    in->ready_seen = true;
    in->state = MOE_INSTANCE_READY;
    in->kv_total = m->kv_blocks_total;
    in->block_tokens = m->kv_block_tokens;
    in->block_bytes = m->kv_block_bytes;
    in->max_batch_tokens = (int)m->max_batch_tokens;
    in->max_seqs = (int)m->max_seqs;
    in->last_seen = moe_now_ns();
    pthread_mutex_unlock(&c->mu);
    MOE_LOG_I("rank %d ready: %s instance %d, KV %u blocks x %u tokens, warm-up %.0f ms", src,
              pool_name(in->def.pool), c->rank_inst[src], m->kv_blocks_total, m->kv_block_tokens, m->warmup_ms);
}

static void on_heartbeat(moe_cluster *c, int src, const Moeserve__Cluster__V1__Heartbeat *m, bool bye)
{
    if (bye)
        c->rank_bye[src] = true;
    inst_t *in = inst_of_rank(c, src);
    if (!in)
        return;
    apply_load(c, in, m->load);
    if (m->counters) {
        pthread_mutex_lock(&c->mu);
        in->ctr = *m->counters;
        pthread_mutex_unlock(&c->mu);
    }
}

static void on_tokens(moe_cluster *c, int src, const Moeserve__Cluster__V1__TokenBatch *m)
{
    inst_t *in = inst_of_rank(c, src);
    if (in)
        apply_load(c, in, m->load);
    int delivered = 0;
    for (size_t i = 0; i < m->n_events; i++) {
        const Moeserve__Cluster__V1__TokenEvent *e = m->events[i];
        creq *r = find_req(c, e->seq_id);
        if (r && r->state != RQ_QUEUED) {
            deliver(c, r, e->index, e->token, e->finish);
            delivered++;
        }
    }
    int64_t lat = moe_now_ns() - m->sent_ns;
    if (c->lat && m->sent_ns > 0 && lat >= 0 && lat < 10 * (int64_t)1000000000) /* same host only */
        for (int i = 0; i < delivered; i++)
            c->lat[c->n_lat++ % LAT_RING] = (float)((double)lat * 1e-3);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Logs the token path's added latency over the last tokens (the coordinator's overhead per
 * streamed token: MPI hop, detokenization, stop strings, hand-over to the gRPC threads). */
static void log_token_latency(moe_cluster *c, const char *when)
{
    size_t n = c->n_lat < LAT_RING ? (size_t)c->n_lat : LAT_RING;
    if (!n)
        return;
    float *v = malloc(n * sizeof *v);
    if (!v)
        return;
    memcpy(v, c->lat, n * sizeof *v);
    qsort(v, n, sizeof *v, cmp_float);
    MOE_LOG_I("%s: token path worker -> front end over the last %zu tokens: p50 %.0f us, p90 %.0f us, p99 %.0f us, "
              "max %.0f us",
              when, n, v[n / 2], v[n * 9 / 10], v[n * 99 / 100], v[n - 1]);
    free(v);
}

static void on_seq_event(moe_cluster *c, int src, const Moeserve__Cluster__V1__SeqEvent *m)
{
    creq *r = find_req(c, m->seq_id);
    switch (m->kind) {
    case EVENT(FAILED):
        if (r) {
            moe_status code = m->status > 0 && m->status < MOE_STATUS_COUNT ? (moe_status)m->status : MOE_ERR_INTERNAL;
            char msg[512];
            snprintf(msg, sizeof msg, "rank %d: %s", src, m->message);
            fail_req(c, r, code, msg);
        }
        break;
    case EVENT(HANDED_OFF):
        if (r) {
            pthread_mutex_lock(&c->mu);
            if (r->reserved_blocks && r->di >= 0)
                c->inst[r->di].reserved_blocks -= r->reserved_blocks;
            r->reserved_blocks = 0;
            pthread_mutex_unlock(&c->mu);
            if (r->state == RQ_TRANSFER || r->state == RQ_PREFILL)
                r->state = RQ_DECODE;
            MOE_LOG_D("request %s: KV %s: %llu bytes in %.3f ms, %u attempt(s)", r->req->request_id,
                      m->recomputed ? "recomputed on the decode side" : "pulled",
                      (unsigned long long)m->transfer_bytes, (double)m->transfer_ns * 1e-6, m->attempts);
        }
        break;
    case EVENT(LEASE_EXPIRED):
        MOE_LOG_W("seq %llu: rank %d let its KV lease expire (the decode side will recompute)",
                  (unsigned long long)m->seq_id, src);
        break;
    default:
        break;
    }
}

static void handle_msg(moe_cluster *c, int src, int tag, const uint8_t *buf, size_t len)
{
    inst_t *in = inst_of_rank(c, src);
    if (in && in->state != MOE_INSTANCE_UNREACHABLE) {
        pthread_mutex_lock(&c->mu);
        in->last_seen = moe_now_ns();
        pthread_mutex_unlock(&c->mu);
    }
    const ProtobufCMessageDescriptor *d;
    switch (tag) {
    case TAG(WORKER_READY): d = &moeserve__cluster__v1__worker_ready__descriptor; break;
    case TAG(HEARTBEAT):
    case TAG(BYE): d = &moeserve__cluster__v1__heartbeat__descriptor; break;
    case TAG(TOKENS): d = &moeserve__cluster__v1__token_batch__descriptor; break;
    case TAG(SEQ_EVENT): d = &moeserve__cluster__v1__seq_event__descriptor; break;
    default: MOE_LOG_W("unexpected control tag %d from rank %d", tag, src); return;
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, buf);
    if (!m) {
        MOE_LOG_E("malformed %s (%zu bytes) from rank %d", d->name, len, src);
        return;
    }
    switch (tag) {
    case TAG(WORKER_READY): on_ready_msg(c, src, (const Moeserve__Cluster__V1__WorkerReady *)m); break;
    case TAG(HEARTBEAT):
    case TAG(BYE): on_heartbeat(c, src, (const Moeserve__Cluster__V1__Heartbeat *)m, tag == TAG(BYE)); break;
    case TAG(TOKENS): on_tokens(c, src, (const Moeserve__Cluster__V1__TokenBatch *)m); break;
    case TAG(SEQ_EVENT): on_seq_event(c, src, (const Moeserve__Cluster__V1__SeqEvent *)m); break;
    default: break;
    }
    protobuf_c_message_free_unpacked(m, NULL);
}

/* Receives up to 256 waiting messages (then the loop serves its inbox before taking more). */
static int drain_mpi(moe_cluster *c, uint8_t **buf, size_t *cap)
{
    int n = 0;
    while (n < 256) {
        int flag = 0;
        MPI_Status st;
        if (MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, c->ctrl, &flag, &st) != MPI_SUCCESS || !flag)
            break;
        int count = 0;
        MPI_Get_count(&st, MPI_BYTE, &count);
        if ((size_t)count > *cap) {
            uint8_t *nb = realloc(*buf, (size_t)count);
            if (!nb) {
                MOE_LOG_E("out of memory for a %d-byte control message", count);
                break;
            }
            *buf = nb;
            *cap = (size_t)count;
        }
        if (MPI_Recv(*buf, count, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG, c->ctrl, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            break;
        handle_msg(c, st.MPI_SOURCE, st.MPI_TAG, *buf, (size_t)count);
        n++;
    }
    return n;
}

/* ---- front end slots ---- */

static moe_status be_submit(void *ctx, const moe_gen_request *req, moe_frontend_req *stream, uint64_t *handle)
{
    moe_cluster *c = ctx;
    creq *r = calloc(1, sizeof *r);
    if (!r)
        return moe_error(MOE_ERR_NOMEM, "out of memory for a request");
    moe_status st = MOE_OK;
    pthread_mutex_lock(&c->mu);
    if (c->draining || c->stopped)
        st = moe_error(MOE_ERR_UNAVAILABLE, "the server is shutting down and takes no new requests");
    else if (!c->ready)
        st = moe_error(MOE_ERR_UNAVAILABLE, "the cluster is still starting (workers are loading the model)");
    else if (!c->usable)
        st = moe_error(MOE_ERR_UNAVAILABLE, "no %s instance is reachable", c->disagg ? "prefill or decode" : "worker");
    else if (c->n_active >= c->o.max_requests)
        st = moe_error(MOE_ERR_FULL, "%d requests are in flight, the server's limit (--max-requests %d)",
                       c->n_active, c->o.max_requests);
    else if (c->n_queued >= c->o.max_queue)
        st = moe_error(MOE_ERR_FULL, "%d requests are queued, the queue's limit (--max-queue %d)", c->n_queued,
                       c->o.max_queue);
    else if (c->cache_tokens > 0 && (int64_t)req->n_prompt + req->max_new_tokens > c->cache_tokens)
        st = moe_error(MOE_ERR_INVALID_ARG,
                       "GenerateRequest.max_new_tokens: a prompt of %u tokens + %u new tokens do not fit the KV "
                       "cache of an instance (%d tokens; see --kv-blocks / --kv-mb)",
                       req->n_prompt, req->max_new_tokens, c->cache_tokens);
    if (st == MOE_OK && !grow((void **)&c->in_sub, &c->cap_in_sub, c->n_in_sub + 1, sizeof *c->in_sub))
        st = moe_error(MOE_ERR_NOMEM, "out of memory for a request");
    if (st == MOE_OK) {
        r->id = atomic_fetch_add(&c->next_id, 1);
        r->stream = stream;
        r->req = req;
        r->pi = r->di = -1;
        c->in_sub[c->n_in_sub++] = r;
        c->n_active++;
        c->n_queued++;
        c->wake = true;
        *handle = r->id;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    if (st != MOE_OK)
        free(r);
    return st;
}

static void be_cancel(void *ctx, uint64_t handle)
{
    moe_cluster *c = ctx;
    pthread_mutex_lock(&c->mu);
    if (grow((void **)&c->in_cancel, &c->cap_in_cancel, c->n_in_cancel + 1, sizeof *c->in_cancel))
        c->in_cancel[c->n_in_cancel++] = handle;
    else
        MOE_LOG_E("out of memory: cancel of request %llu lost", (unsigned long long)handle);
    c->wake = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static moe_status be_tokenize(void *ctx, const char *text, size_t len, bool add_special, int32_t *ids, size_t cap,
                              size_t *n_out)
{
    moe_cluster *c = ctx;
    return moe_tokenizer_encode(c->o.tok, text, len, add_special, ids, cap, n_out);
}

void moe_cluster_snapshot(moe_cluster *c, moe_cluster_status *out)
{
    int64_t now = moe_now_ns();
    pthread_mutex_lock(&c->mu);
    snprintf(out->model, sizeof out->model, "%s", c->model_name);
    out->world_size = (uint32_t)c->o.world_size;
    out->n_instances = (uint32_t)(c->n_inst < MOE_FRONTEND_MAX_INSTANCES ? c->n_inst : MOE_FRONTEND_MAX_INSTANCES);
    moe_cluster_counters *k = &out->counters;
    for (uint32_t i = 0; i < out->n_instances; i++) {
        const inst_t *in = &c->inst[i];
        moe_instance_status *s = &out->instances[i];
        s->id = i;
        s->pool = in->def.pool;
        s->state = (c->draining && in->state == MOE_INSTANCE_READY) ? MOE_INSTANCE_DRAINING : in->state;
        s->ep_size = (uint32_t)in->def.ep_size;
        for (int j = 0; j < in->def.ep_size && j < MOE_FRONTEND_MAX_EP; j++)
            s->ranks[j] = in->def.ranks[j];
        s->kv_blocks_total = in->kv_total;
        s->kv_blocks_used = in->kv_used;
        s->kv_blocks_free = in->kv_total > in->kv_used ? in->kv_total - in->kv_used : 0;
        s->kv_block_tokens = in->block_tokens;
        s->running = in->running;
        s->waiting = in->waiting;
        s->pending_prompt_tokens = in->pending_tokens;
        s->heartbeat_age_ms = in->last_seen ? (double)(now - in->last_seen) * 1e-6 : -1.0;
        k->kv_transfers += in->ctr.kv_transfers;
        k->kv_transfer_bytes += in->ctr.kv_transfer_bytes;
        k->kv_transfer_retries += in->ctr.kv_transfer_retries;
        k->kv_transfer_recomputes += in->ctr.kv_transfer_recomputes;
        k->kv_checksum_failures += in->ctr.kv_checksum_failures;
        k->kv_transfer_timeouts += in->ctr.kv_transfer_timeouts;
        k->kv_lease_expirations += in->ctr.kv_lease_expirations;
    }
    pthread_mutex_unlock(&c->mu);
}

static moe_status be_cluster_status(void *ctx, moe_cluster_status *out)
{
    moe_cluster_snapshot(ctx, out);
    return MOE_OK;
}

static bool be_healthy(void *ctx)
{
    moe_cluster *c = ctx;
    pthread_mutex_lock(&c->mu);
    bool ok = c->ready && c->usable && !c->draining && !c->stopped;
    for (int i = 0; ok && i < c->n_inst; i++)
        ok = c->inst[i].state == MOE_INSTANCE_READY;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

void moe_cluster_backend(moe_cluster *c, moe_frontend_backend *out)
{
    *out = (moe_frontend_backend){.ctx = c, .submit = be_submit, .cancel = be_cancel, .tokenize = be_tokenize,
                                  .cluster_status = be_cluster_status, .healthy = be_healthy};
}

/* ---- life cycle ---- */

moe_status moe_cluster_create(const moe_cluster_opts *opts, moe_cluster **out)
{
    if (opts->n_instances <= 0 || opts->world_size < 2 || opts->max_requests <= 0 || opts->max_queue < 0 ||
        opts->heartbeat_timeout_ms <= 0 || opts->startup_timeout_ms <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "cluster: %d instances over %d ranks, limits %d/%d, timeouts %d/%d ms",
                         opts->n_instances, opts->world_size, opts->max_requests, opts->max_queue,
                         opts->heartbeat_timeout_ms, opts->startup_timeout_ms);
    moe_cluster *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "cluster: out of memory");
    c->o = *opts;
    c->ctrl = opts->ctrl;
    snprintf(c->model_name, sizeof c->model_name, "%s", opts->model_name ? opts->model_name : "");
    c->n_inst = opts->n_instances;
    c->inst = calloc((size_t)c->n_inst, sizeof *c->inst);
    c->rank_inst = malloc((size_t)opts->world_size * sizeof *c->rank_inst);
    c->rank_ready = calloc((size_t)opts->world_size, sizeof *c->rank_ready);
    c->rank_bye = calloc((size_t)opts->world_size, sizeof *c->rank_bye);
    c->spares = calloc((size_t)(opts->n_spare ? opts->n_spare : 1), sizeof *c->spares);
    if (!c->inst || !c->rank_inst || !c->rank_ready || !c->rank_bye || !c->spares) {
        moe_cluster_free(c);
        return moe_error(MOE_ERR_NOMEM, "cluster: out of memory");
    }
    for (int r = 0; r < opts->world_size; r++)
        c->rank_inst[r] = -1;
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        in->def = opts->instances[i];
        in->lead = in->def.ranks[0];
        in->state = MOE_INSTANCE_STARTING;
        c->disagg |= in->def.pool != MOE_POOL_MIXED;
        for (int j = 0; j < in->def.ep_size; j++)
            c->rank_inst[in->def.ranks[j]] = i;
    }
    for (int i = 0; i < opts->n_spare; i++)
        c->spares[i] = opts->spare_ranks[i];
    c->o.instances = NULL;
    c->o.spare_ranks = c->spares;
    c->lat = calloc(LAT_RING, sizeof *c->lat); /* optional: NULL only skips the measurement */
    atomic_init(&c->next_id, 1);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    *out = c;
    return MOE_OK;
}

void moe_cluster_free(moe_cluster *c)
{
    if (!c)
        return;
    for (int b = 0; b < N_BUCKETS; b++)
        while (c->buckets[b])
            fail_req(c, c->buckets[b], MOE_ERR_UNAVAILABLE, "the server is shutting down");
    for (int i = 0; i < c->n_in_sub; i++) {
        moe_frontend_error(c->in_sub[i]->stream, MOE_ERR_UNAVAILABLE, "the server is shutting down");
        free(c->in_sub[i]);
    }
    for (int i = 0; i < c->n_ob; i++) {
        MPI_Cancel(&c->ob[i].r);
        MPI_Request_free(&c->ob[i].r); /* the buffer leaks on purpose: MPI may still read it */
    }
    free(c->ob);
    free(c->lat);
    free(c->in_sub);
    free(c->in_cancel);
    free(c->inst);
    free(c->rank_inst);
    free(c->rank_ready);
    free(c->rank_bye);
    free(c->spares);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
}

void moe_cluster_drain(moe_cluster *c)
{
    pthread_mutex_lock(&c->mu);
    c->draining = true;
    c->wake = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Takes the front end's submissions and cancels; returns true when there were any. */
static bool take_inbox(moe_cluster *c)
{
    creq **subs = NULL;
    uint64_t *cancels = NULL;
    int ns = 0, nc = 0;
    pthread_mutex_lock(&c->mu);
    if (c->n_in_sub) {
        subs = c->in_sub;
        ns = c->n_in_sub;
        c->in_sub = NULL;
        c->n_in_sub = c->cap_in_sub = 0;
    }
    if (c->n_in_cancel) {
        cancels = c->in_cancel;
        nc = c->n_in_cancel;
        c->in_cancel = NULL;
        c->n_in_cancel = c->cap_in_cancel = 0;
    }
    c->wake = false;
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < ns; i++) {
        creq *r = subs[i];
        r->dt = moe_detok_create(c->o.tok, true);
        r->stop = moe_stopper_create(r->req->stop, (int)r->req->n_stop);
        r->hnext = c->buckets[r->id % N_BUCKETS];
        c->buckets[r->id % N_BUCKETS] = r;
        if (!r->dt || !r->stop) {
            fail_req(c, r, MOE_ERR_NOMEM, "out of memory for the detokenizer");
            continue;
        }
        enqueue(c, r);
    }
    for (int i = 0; i < nc; i++) {
        creq *r = find_req(c, cancels[i]);
        if (r) {
            MOE_LOG_D("request %s cancelled by the client", r->req->request_id);
            fail_req(c, r, MOE_ERR_CANCELLED, "cancelled");
        }
    }
    free(subs);
    free(cancels);
    return ns + nc > 0;
}

static bool any_requests(moe_cluster *c)
{
    pthread_mutex_lock(&c->mu);
    bool any = c->n_active > 0;
    pthread_mutex_unlock(&c->mu);
    return any;
}

/* Waits for every worker's WorkerReady. */
static moe_status await_workers(moe_cluster *c, uint8_t **buf, size_t *cap)
{
    int64_t deadline = moe_now_ns() + (int64_t)c->o.startup_timeout_ms * 1000000;
    int64_t idle = 0;
    for (;;) {
        bool busy = drain_mpi(c, buf, cap) > 0;
        int missing = 0, first_missing = -1;
        for (int r = 1; r < c->o.world_size; r++) {
            if (!c->rank_ready[r]) {
                missing++;
                if (first_missing < 0)
                    first_missing = r;
            }
        }
        for (int i = 0; i < c->n_inst; i++)
            if (c->rank_ready[c->inst[i].lead] && !c->inst[i].ready_seen)
                return moe_error(MOE_ERR_UNAVAILABLE, "rank %d (%s instance %d) failed to start; see its log",
                                 c->inst[i].lead, pool_name(c->inst[i].def.pool), i);
        if (!missing)
            return MOE_OK;
        if (moe_now_ns() > deadline)
            return moe_error(MOE_ERR_UNAVAILABLE, "%d worker rank(s) not ready after %d ms (first: rank %d)", missing,
                             c->o.startup_timeout_ms, first_missing);
        if (c->o.drain_flag && *c->o.drain_flag)
            return moe_error(MOE_ERR_CANCELLED, "interrupted while the workers were starting");
        ob_progress(c);
        idle = busy ? 0 : idle ? (idle * 2 > 20000000 ? 20000000 : idle * 2) : 100000;
        if (idle)
            nap(idle);
    }
}

moe_status moe_cluster_run(moe_cluster *c)
{
    uint8_t *buf = NULL;
    size_t cap = 0;
    moe_status st = await_workers(c, &buf, &cap);
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    update_usable(c);
    pthread_mutex_lock(&c->mu);
    c->ready = true;
    pthread_mutex_unlock(&c->mu);
    if (c->o.on_ready)
        c->o.on_ready(c->o.on_ready_ctx, c);

    int64_t idle = 0, next_check = 0;
    for (;;) {
        bool busy = take_inbox(c);
        busy |= drain_mpi(c, &buf, &cap) > 0;
        dispatch(c);
        ob_progress(c);
        int64_t now = moe_now_ns();
        if (now >= next_check) {
            next_check = now + 20000000;
            for (int i = 0; i < c->n_inst; i++) {
                inst_t *in = &c->inst[i];
                double silent = (double)(now - in->last_seen) * 1e-9;
                if (in->state == MOE_INSTANCE_READY && silent * 1000.0 > c->o.heartbeat_timeout_ms)
                    mark_unreachable(c, i, silent);
            }
        }
        if (now >= c->next_lat_log) {
            c->next_lat_log = now + 10 * (int64_t)1000000000;
            if (moe_log_threshold >= MOE_LOG_DEBUG)
                log_token_latency(c, "periodic");
        }
        if (c->o.drain_flag && *c->o.drain_flag && !c->drain_started) {
            moe_cluster_drain(c);
        }
        pthread_mutex_lock(&c->mu);
        bool draining = c->draining;
        int active = c->n_active;
        pthread_mutex_unlock(&c->mu);
        if (draining) {
            if (!c->drain_started) {
                c->drain_started = now;
                MOE_LOG_I("draining: no new requests; %d running may finish within %.0f s", active,
                          c->o.drain_timeout_s);
            }
            bool late = (double)(now - c->drain_started) * 1e-9 > c->o.drain_timeout_s;
            if (active == 0 || late) {
                log_token_latency(c, "at drain");
                if (late)
                    MOE_LOG_W("drain timeout: ending %d request(s) with UNAVAILABLE", active);
                for (int b = 0; b < N_BUCKETS; b++)
                    while (c->buckets[b])
                        fail_req(c, c->buckets[b], MOE_ERR_UNAVAILABLE, "the server is shutting down");
                pthread_mutex_lock(&c->mu);
                c->stopped = true;
                pthread_mutex_unlock(&c->mu);
                break;
            }
        }
        if (busy) {
            idle = 0;
            continue;
        }
        /* Idle: block on the inbox's condition variable (the front end signals it) for a nap that
         * grows to 250 us while requests are in flight (tokens arrive by MPI, which has no
         * wake-up) and to 20 ms otherwise. */
        int64_t cap_ns = any_requests(c) ? 250000 : 20000000;
        idle = idle ? (idle * 2 > cap_ns ? cap_ns : idle * 2) : 20000;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t t = (int64_t)ts.tv_nsec + idle;
        ts.tv_sec += t / 1000000000;
        ts.tv_nsec = t % 1000000000;
        pthread_mutex_lock(&c->mu);
        if (!c->wake)
            pthread_cond_timedwait(&c->cv, &c->mu, &ts);
        pthread_mutex_unlock(&c->mu);
    }
    free(buf);
    return MOE_OK;
}

moe_status moe_cluster_shutdown_workers(moe_cluster *c, int timeout_ms)
{
    Moeserve__Cluster__V1__Shutdown m;
    moeserve__cluster__v1__shutdown__init(&m);
    m.reason = (char *)"coordinator shutdown";
    for (int r = 1; r < c->o.world_size; r++) {
        inst_t *in = inst_of_rank(c, r);
        if (in && in->state == MOE_INSTANCE_UNREACHABLE && in->ready_seen)
            continue; /* hung: it would never answer */
        if (ob_send(c, r, TAG(SHUTDOWN), &m.base) != MOE_OK)
            MOE_LOG_E("shutdown of rank %d: %s", r, moe_error_message());
    }
    uint8_t *buf = NULL;
    size_t cap = 0;
    int64_t deadline = moe_now_ns() + (int64_t)timeout_ms * 1000000;
    int missing;
    for (;;) {
        drain_mpi(c, &buf, &cap);
        ob_progress(c);
        missing = 0;
        for (int r = 1; r < c->o.world_size; r++) {
            inst_t *in = inst_of_rank(c, r);
            missing += !c->rank_bye[r] && !(in && in->state == MOE_INSTANCE_UNREACHABLE && in->ready_seen);
        }
        if (!missing || moe_now_ns() > deadline)
            break;
        nap(200000);
    }
    free(buf);
    missing = 0; /* hung ranks count again: they would block MPI_Finalize */
    for (int r = 1; r < c->o.world_size; r++)
        missing += !c->rank_bye[r];
    if (missing) {
        char list[256] = "";
        size_t off = 0;
        for (int r = 1; r < c->o.world_size && off < sizeof list - 8; r++)
            if (!c->rank_bye[r])
                off += (size_t)snprintf(list + off, sizeof list - off, "%s%d", off ? "," : "", r);
        return moe_error(MOE_ERR_UNAVAILABLE, "rank(s) %s did not acknowledge the shutdown within %d ms", list,
                         timeout_ms);
    }
    return MOE_OK;
}
