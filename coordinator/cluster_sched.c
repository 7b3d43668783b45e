/* The coordinator's view of its instances (load, reachability) and placement: the prefill (or
 * mixed) instance with the fewest pending prompt tokens, the decode instance with the most free KV
 * blocks, then the fewest running; requests wait at the coordinator, by priority, while every
 * instance has a few batches of prompt tokens pending. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/cluster_internal.h"
#include "ctrl/sampling_pb.h"

/* ---- instances ---- */

void moe_cluster_inst_apply_load(moe_cluster *c, inst_t *in, const pb_load *l)
{
    if (!l)
        return;
    pthread_mutex_lock(&c->mu);
    in->mig.load_ns = moe_now_ns();
    in->kv_total = l->kv_blocks_total;
    in->kv_used = l->kv_blocks_used;
    in->running = l->running;
    in->kv_incoming = l->kv_blocks_incoming;
    in->waiting = l->waiting + l->pulls_waiting; /* offers waiting for room are queued for it */
    pthread_mutex_unlock(&c->mu);
}

long moe_cluster_inst_kv_committed(const inst_t *in)
{
    long reported = (long)in->kv_used - (long)(in->kv_incoming < in->kv_used ? in->kv_incoming : in->kv_used);
    return reported + in->reserved_blocks + in->mig.in_blocks;
}

void moe_cluster_inst_update_usable(moe_cluster *c)
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

void moe_cluster_inst_lost(moe_cluster *c, int idx, const char *why)
{
    inst_t *in = &c->inst[idx];
    pthread_mutex_lock(&c->mu);
    in->state = MOE_INSTANCE_UNREACHABLE;
    c->n_losses++;
    pthread_mutex_unlock(&c->mu);
    char msg[384];
    snprintf(msg, sizeof msg, "%s instance %d (%s %d%s%s) %s",
             moe_pool_name(in->def.pool), idx, c->elastic ? "member" : "rank", in->lead,
             *in->host ? " on " : "", in->host, why);
    int moved = 0, failed = 0;
    for (int b = 0; b < N_BUCKETS; b++) {
        for (creq *r = c->buckets[b], *next; r; r = next) {
            next = r->hnext;
            /* Elastic: a request whose KV was still to come from idx goes on too (the decode side
             * may wait for an offer that died with it). mpirun: idx hung (a death ends the job),
             * and the decode side recomputes what it cannot pull; only what runs on idx fails. */
            bool dep = c->elastic ? moe_cluster_req_placed_on(r, idx)
                                  : r->state != RQ_QUEUED &&
                                        ((r->pi == idx && r->state == RQ_PREFILL) || r->di == idx);
            if (!dep)
                continue;
            if (c->elastic) {
                moe_cluster_req_resume(c, r, msg);
                moved++;
            } else {
                moe_cluster_req_fail(c, r, MOE_ERR_UNAVAILABLE, msg);
                failed++;
            }
        }
    }
    if (c->elastic)
        MOE_LOG_W("%s: %d request(s) go on elsewhere", msg, moved);
    else
        MOE_LOG_E("%s: failing its %d request(s)", msg, failed);
    moe_cluster_inst_update_usable(c);
}

/* ---- placement and dispatch ---- */

static int pick_prefill(moe_cluster *c, const creq *r, bool *gated)
{
    moe_pool_kind want = c->disagg ? MOE_POOL_PREFILL : MOE_POOL_MIXED;
    int best = -1;
    *gated = false;
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        if (in->def.pool != want || in->state != MOE_INSTANCE_READY ||
            atomic_load(&in->mig.drain))
            continue;
        /* Keep a few batches' worth queued on each instance, no more: the rest waits here, where
         * priorities still apply. */
        uint64_t gate = (uint64_t)(4 * in->max_batch_tokens);
        if (in->n_pending > 0 &&
            (in->pending_tokens + r->req->n_prompt > gate || in->n_pending >= 2 * in->max_seqs)) {
            *gated = true;
            continue;
        }
        if (best < 0 || in->pending_tokens < c->inst[best].pending_tokens ||
            (in->pending_tokens == c->inst[best].pending_tokens &&
             in->running < c->inst[best].running))
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
        if (in->def.pool != MOE_POOL_DECODE || in->state != MOE_INSTANCE_READY ||
            atomic_load(&in->mig.drain))
            continue;
        long fr = (long)in->kv_total - moe_cluster_inst_kv_committed(in);
        if (best < 0 || fr > best_free ||
            (fr == best_free && in->running < c->inst[best].running)) {
            best = i;
            best_free = fr;
        }
    }
    return best;
}

#define MAX_SIBLINGS 15

/* Queued requests that can share r's prefill: fresh choices of r's client request with r's
 * prompt and options (only the seed differs). Taken out of the queue; *n of them in sib. */
static void take_siblings(moe_cluster *c, const creq *r, creq **sib, int *n)
{
    const moe_gen_request *q = r->req;
    *n = 0;
    if (!q->prefill_group || r->n_gen)
        return;
    for (creq **pp = &c->queue; *pp && *n < MAX_SIBLINGS;) {
        creq *s = *pp;
        const moe_gen_request *o = s->req;
        if (s != r && !s->n_gen && o->prefill_group == q->prefill_group &&
            o->n_prompt == q->n_prompt && o->max_new_tokens == q->max_new_tokens &&
            o->ignore_eos == q->ignore_eos &&
            moe_sampling_same_but_seed(&o->sampling, &q->sampling) &&
            !memcmp(o->prompt, q->prompt, q->n_prompt * sizeof *q->prompt)) {
            *pp = s->qnext;
            sib[(*n)++] = s;
        } else {
            pp = &s->qnext;
        }
    }
}

/* r (or a sibling of it) left the queue for its instances (pi prefill, di decode). */
static void placed(moe_cluster *c, creq *r, int pi, int di, bool computes_prompt)
{
    const moe_gen_request *q = r->req;
    pthread_mutex_lock(&c->mu);
    c->n_queued--;
    r->state = RQ_PREFILL;
    r->pi = pi;
    r->di = di;
    r->first_index = (uint32_t)r->n_gen;
    if (computes_prompt) {
        c->inst[pi].pending_tokens += q->n_prompt;
        c->inst[pi].n_pending++;
        r->counted_pending = true;
    }
    if (c->disagg && q->max_new_tokens > (uint32_t)r->n_gen + 1) { /* one token: it ends on the prefill side */
        uint32_t bt = c->inst[di].block_tokens ? c->inst[di].block_tokens : 16;
        r->reserved_blocks = (int)((q->n_prompt + (uint32_t)r->n_gen + 1 + bt - 1) / bt);
        c->inst[di].reserved_blocks += r->reserved_blocks;
    }
    pthread_mutex_unlock(&c->mu);
}

void moe_cluster_sched_dispatch(moe_cluster *c)
{
    while (c->queue) {
        creq *r = c->queue;
        bool gated;
        int pi = pick_prefill(c, r, &gated);
        if (pi < 0) {
            if (gated)
                return; /* every instance has enough queued: wait for first tokens */
            moe_cluster_req_fail(c, r, MOE_ERR_UNAVAILABLE,
                                 c->disagg ? "no prefill instance is available"
                                           : "no instance is available");
            continue;
        }
        int di = pi;
        if (c->disagg && (di = pick_decode(c)) < 0) {
            moe_cluster_req_fail(c, r, MOE_ERR_UNAVAILABLE, "no decode instance is available");
            continue;
        }
        const moe_gen_request *q = r->req;
        Moeserve__Cluster__V1__Sampling sp;
        moe_sampling_to_pb(&q->sampling, &sp);
        Moeserve__Cluster__V1__StartSeq m;
        moeserve__cluster__v1__start_seq__init(&m);
        m.seq_id = r->id;
        m.n_prompt = q->n_prompt;
        m.prompt = (int32_t *)(uintptr_t)q->prompt; /* only read by pack */
        m.sampling = &sp;
        m.max_new_tokens = q->max_new_tokens;
        m.ignore_eos = q->ignore_eos;
        m.n_generated = (size_t)r->n_gen; /* resumed: the tokens already streamed */
        m.generated = r->gen;
        m.prefill_only = c->disagg;
        m.decode_rank = (uint32_t)c->inst[di].lead;
        c->queue = r->qnext;
        creq *sib[MAX_SIBLINGS];
        uint64_t sib_ids[MAX_SIBLINGS], sib_seeds[MAX_SIBLINGS];
        int n_sib;
        take_siblings(c, r, sib, &n_sib);
        for (int k = 0; k < n_sib; k++) {
            sib_ids[k] = sib[k]->id;
            sib_seeds[k] = sib[k]->req->sampling.seed;
        }
        m.n_sibling_ids = m.n_sibling_seeds = (size_t)n_sib;
        m.sibling_ids = sib_ids;
        m.sibling_seeds = sib_seeds;
        if (r->fq_start > c->fq_vtime)
            c->fq_vtime = r->fq_start;
        if (moe_cluster_send(c, c->inst[pi].lead, TAG(START), &m.base) != MOE_OK) {
            char why[256];
            snprintf(why, sizeof why, "%s", moe_error_message());
            for (int k = -1; k < n_sib; k++) {
                creq *x = k < 0 ? r : sib[k];
                x->state = RQ_PREFILL; /* it left the queue */
                pthread_mutex_lock(&c->mu);
                c->n_queued--;
                pthread_mutex_unlock(&c->mu);
                moe_cluster_req_fail(c, x, MOE_ERR_INTERNAL, why);
            }
            continue;
        }
        placed(c, r, pi, di, true);
        for (int k = 0; k < n_sib; k++)
            placed(c, sib[k], pi, di, false);
        pthread_mutex_lock(&c->mu);
        c->n_prefills_shared += (uint64_t)n_sib;
        pthread_mutex_unlock(&c->mu);
        if (n_sib)
            MOE_LOG_D("request %s: %d more choices share its prefill", q->request_id, n_sib);
    }
}

/* By priority, then start-time fair queueing between clients (API keys): a request's start tag
 * is the later of the virtual time and its client's previous finish tag, its cost its tokens
 * (prompt + max_new_tokens). One client alone is served in arrival order, as before; a client
 * flooding the queue pushes only its own requests back, never another's. */
void moe_cluster_sched_enqueue(moe_cluster *c, creq *r)
{
    double *fin = &c->fq_finish[r->req->client % FQ_CLIENTS];
    r->fq_start = *fin > c->fq_vtime ? *fin : c->fq_vtime;
    *fin = r->fq_start + (double)r->req->n_prompt + (double)r->req->max_new_tokens;
    creq **pp = &c->queue;
    while (*pp && ((*pp)->req->priority < r->req->priority ||
                   ((*pp)->req->priority == r->req->priority && (*pp)->fq_start <= r->fq_start)))
        pp = &(*pp)->qnext;
    r->qnext = *pp;
    *pp = r;
}
