/* The cluster simulator: an event heap, the coordinator's queue and placement, one engine model
 * per rank (the placement targets, as in the coordinator), lock-step groups for expert parallelism. */
#include "tools/moe_plan/sim_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"

/* ---- the event heap ---- */

static bool ev_before(const event *a, const event *b) { return a->t < b->t || (a->t == b->t && a->order < b->order); }

bool mp_sim_push(sim *s, double t, int kind, int a, int gen)
{
    if (!moe_grow((void **)&s->heap, &s->cap_heap, s->n_heap + 1, sizeof *s->heap))
        return false;
    int i = s->n_heap++;
    event e = {.t = t, .order = s->order++, .kind = kind, .a = a, .gen = gen};
    while (i > 0 && ev_before(&e, &s->heap[(i - 1) / 2])) {
        s->heap[i] = s->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    s->heap[i] = e;
    return true;
}

static bool push(sim *s, double t, int kind, int a) { return mp_sim_push(s, t, kind, a, 0); }

static event pop(sim *s)
{
    event top = s->heap[0], last = s->heap[--s->n_heap];
    int i = 0;
    for (;;) {
        int k = 2 * i + 1;
        if (k >= s->n_heap)
            break;
        if (k + 1 < s->n_heap && ev_before(&s->heap[k + 1], &s->heap[k]))
            k++;
        if (!ev_before(&s->heap[k], &last))
            break;
        s->heap[i] = s->heap[k];
        i = k;
    }
    if (s->n_heap)
        s->heap[i] = last;
    return top;
}

/* ---- one rank's engine (worker/engine.c's policies) ---- */

static int blocks_for(const sim *s, int positions) { return (positions + s->bs - 1) / s->bs; }

static int find_seq(const rank_t *r, int req)
{
    for (int i = 0; i < r->n_seqs; i++)
        if (r->seqs[i].req == req)
            return i;
    return -1;
}

static eseq *add_seq(rank_t *r, int req)
{
    if (!moe_grow((void **)&r->seqs, &r->cap_seqs, r->n_seqs + 1, sizeof *r->seqs))
        return NULL;
    eseq *e = &r->seqs[r->n_seqs++];
    memset(e, 0, sizeof *e);
    e->req = req;
    return e;
}

static void remove_seq(rank_t *r, int i)
{
    r->kv_used -= r->seqs[i].blocks;
    memmove(r->seqs + i, r->seqs + i + 1, (size_t)(r->n_seqs - i - 1) * sizeof *r->seqs);
    r->n_seqs--;
}

static void preempt(sim *s, rank_t *r, eseq *e)
{
    s->st.preemptions++;
    r->kv_used -= e->blocks;
    e->blocks = 0;
    e->n_computed = 0;
}

static bool preempt_later(sim *s, rank_t *r, int after)
{
    for (int i = r->n_seqs - 1; i > after; i--) {
        eseq *e = &r->seqs[i];
        if (e->blocks > 0 && !e->paused) {
            preempt(s, r, e);
            return true;
        }
    }
    return false;
}

/* Grows e's blocks to cover `positions`; false when the cache has no room. */
static bool reserve(sim *s, rank_t *r, eseq *e, int positions)
{
    int need = blocks_for(s, positions) - e->blocks;
    if (need <= 0)
        return true;
    if (r->kv_total - r->kv_used < need)
        return false;
    r->kv_used += need;
    e->blocks += need;
    return true;
}

/* Plans this rank's next step like moe_engine_step: running sequences (holding KV) first, then
 * waiting ones, in arrival order, chunked under the token budget. Returns the step's tokens. */
static int plan_step(sim *s, rank_t *r, double *attn)
{
    int budget = s->mbt, n_segs = 0, n_tok = 0;
    *attn = 0;
    for (int pass = 0; pass < 2 && budget > 0; pass++) {
        for (int i = 0; i < r->n_seqs && budget > 0 && n_segs < s->max_seqs; i++) {
            eseq *e = &r->seqs[i];
            if (e->paused)
                continue;
            bool holds = e->blocks > 0 || e->n_computed > 0;
            if (holds != (pass == 0))
                continue;
            int want = e->n_tokens - e->n_computed;
            if (want <= 0)
                continue;
            int chunk = want < budget ? want : budget;
            bool ok;
            while (!(ok = reserve(s, r, e, e->n_computed + chunk)) && pass == 0 && preempt_later(s, r, i))
                ;
            if (!ok) {
                if (pass == 0) {
                    preempt(s, r, e);
                    continue;
                }
                break;
            }
            e->chunk = chunk;
            /* The layer hook pushes a prefill-only sequence's layers in the step of its final
             * chunk (worker/engine.c's hook_ids), once the accept is in. */
            e->layered = e->prefill_only && e->n_computed + chunk == e->n_tokens &&
                         s->rq[e->req].res == RES_ACCEPTED && s->rq[e->req].accept_in;
            *attn += mp_attn_work(e->n_computed, chunk);
            n_segs++;
            n_tok += chunk;
            budget -= chunk;
        }
    }
    return n_tok;
}

static bool has_work(const rank_t *r)
{
    for (int i = 0; i < r->n_seqs; i++)
        if (!r->seqs[i].paused)
            return true;
    return false;
}

/* Sequences holding KV blocks, paused ones too: the engine's n_running (moe_engine_get_stats),
 * which the load reports carry and the decode side's reserve check uses. */
static int holding(const rank_t *r)
{
    int n = 0;
    for (int i = 0; i < r->n_seqs; i++)
        n += r->seqs[i].blocks > 0;
    return n;
}

/* ---- the coordinator (coordinator/cluster_sched.c) ---- */

static int pick_prefill(sim *s, int req, bool *gated)
{
    mp_pool want = s->disagg ? MP_POOL_PREFILL : MP_POOL_MIXED;
    int best = -1;
    *gated = false;
    for (int i = 0; i < s->n_ranks; i++) {
        rank_t *in = &s->ranks[i];
        if (in->pool != want)
            continue;
        long gate = (long)(s->o->gate_batches > 0 ? s->o->gate_batches : 4) * s->mbt;
        if (in->n_pending > 0 &&
            (in->pending_tokens + s->w->req[req].n_in > gate || in->n_pending >= 2 * s->max_seqs)) {
            *gated = true;
            continue;
        }
        if (best < 0 || in->pending_tokens < s->ranks[best].pending_tokens ||
            (in->pending_tokens == s->ranks[best].pending_tokens && holding(in) < holding(&s->ranks[best])))
            best = i;
    }
    return best;
}

static int running(const rank_t *r)
{
    int n = 0;
    for (int i = 0; i < r->n_seqs; i++)
        n += r->seqs[i].blocks > 0 && !r->seqs[i].paused;
    return n;
}

static int pick_decode(sim *s)
{
    int best = -1;
    long best_free = 0;
    for (int i = 0; i < s->n_ranks; i++) {
        rank_t *in = &s->ranks[i];
        if (in->pool != MP_POOL_DECODE)
            continue;
        /* As moe_cluster_inst_kv_committed: blocks held for incoming KV (paused sequences the
         * hand-offs fill) are already in the coordinator's reservations, counted once. */
        long incoming = 0;
        for (int k = 0; k < in->n_seqs; k++)
            incoming += in->seqs[k].paused ? in->seqs[k].blocks : 0;
        long fr = (long)in->kv_total - (in->kv_used - incoming) - in->reserved;
        if (best < 0 || fr > best_free || (fr == best_free && running(in) < running(&s->ranks[best]))) {
            best = i;
            best_free = fr;
        }
    }
    return best;
}

static bool dispatch(sim *s)
{
    while (s->q_len) {
        int req = s->queue[s->q_head];
        bool gated;
        int pi = pick_prefill(s, req, &gated);
        if (pi < 0)
            return true; /* gated: waits for first tokens */
        int di = s->disagg ? pick_decode(s) : pi;
        s->q_head++;
        s->q_len--;
        sreq *q = &s->rq[req];
        q->state = RQ_PREFILL;
        q->pi = pi;
        q->di = di;
        q->counted = true;
        s->ranks[pi].pending_tokens += s->w->req[req].n_in;
        s->ranks[pi].n_pending++;
        if (s->disagg && s->w->req[req].n_out > 1) {
            q->reserved = blocks_for(s, s->w->req[req].n_in + 1);
            s->ranks[di].reserved += q->reserved;
        }
        if (!push(s, s->now + s->c->dispatch_ms * 1e-3, EV_START, req))
            return false;
    }
    return true;
}

/* ---- steps ---- */

static bool kick(sim *s, int g)
{
    group_t *gr = &s->groups[g];
    if (gr->busy)
        return true;
    bool any = false;
    for (int k = 0; k < gr->ep; k++)
        any |= has_work(&s->ranks[gr->first + k]);
    if (!any)
        return true;
    int n[64];
    double attn[64];
    int total = 0;
    for (int k = 0; k < gr->ep; k++) {
        n[k] = plan_step(s, &s->ranks[gr->first + k], &attn[k]);
        total += n[k];
    }
    if (total == 0)
        return true; /* nothing fits (all waiting for KV): a free will kick again */
    double attn_sum = 0;
    for (int k = 0; k < gr->ep; k++)
        attn_sum += attn[k];
    double dt = (s->o->step_ms_fn ? s->o->step_ms_fn(s->o->step_ctx, g, total, attn_sum)
                                  : mp_ep_step_ms(s->c, &s->o->net, gr->ep, n, attn)) *
                1e-3;
    if (s->ps) {
        double comm = mp_ep_comm_ms(s->c, &s->o->net, gr->ep, n) * 1e-3;
        gr->busy = true;
        gr->work = gr->work0 = dt - comm;
        gr->comm = comm;
        gr->rate = 0;
        gr->t_last = gr->t_start = s->now;
        s->st.steps++;
        for (int k = 0; k < gr->ep; k++)
            s->host_busy[s->ranks[gr->first + k].host]++;
        return mp_sim_reshare(s, g);
    }
    if (!s->o->step_ms_fn && s->c->n_av > 0) {
        /* The CPU time, stretched as the probe saw bursts of that length stretched on the
         * machine: at this time of the run (timed), or by a fixed sequence of draws spread over
         * the samples (deterministic either way). */
        double comm = mp_ep_comm_ms(s->c, &s->o->net, gr->ep, n) * 1e-3, cpu = dt - comm;
        dt = comm + cpu * mp_avail_ratio_at(s->c, cpu * 1e3, s->now,
                                            (long)((s->st.steps * 2654435761u + (unsigned)g * 40503u) % 1000003u));
    } else if (s->o->cores > 0) {
        int stepping = 0;
        for (int i = 0; i < s->n_groups; i++)
            stepping += s->groups[i].busy || i == g ? s->groups[i].ep : 0;
        if (stepping > s->o->cores)
            dt *= (double)stepping / s->o->cores;
    }
    gr->busy = true;
    gr->t_end = s->now + dt;
    s->st.steps++;
    s->st.busy_s[s->ranks[gr->first].pool] += dt;
    return push(s, s->now + dt, EV_STEP_END, g);
}

static void deliver(sim *s, int req)
{
    rp_record *r = &s->rec[req];
    double t = s->now + s->c->token_path_ms * 1e-3;
    if (r->n_tokens == 0)
        r->t_first = t;
    else
        rp_record_add_itl(r, (float)((t - r->t_last) * 1e3));
    if (r->n_tokens == 1)
        r->t_second = t;
    r->t_last = t;
    r->n_tokens++;
}

/* From the park (or the accept after it) to the decode side holding the KV: the bytes still to
 * move (layered: only the last layer's, the others left during the final chunk's step), one
 * message latency, and the calibrated fixed part. */
static double handoff_ms(const sim *s, int req, bool layered)
{
    double bytes = s->c->kv_bytes_per_token * s->w->req[req].n_in;
    if (layered && s->c->n_layers > 0)
        bytes /= s->c->n_layers;
    return mp_xfer_ms(s->c, &s->o->net, bytes) + s->c->handoff_ms;
}

/* A parked prefill whose decode side has (or now has) room: the KV moves. */
/* The decode rank takes `need` blocks for req's incoming KV: a paused sequence until the hand-off. */
static bool hold_paused(rank_t *d, int req, int need)
{
    eseq *e = add_seq(d, req);
    if (!e)
        return false;
    e->paused = true;
    e->blocks = need;
    d->kv_used += need;
    return true;
}

static bool start_pull(sim *s, int req)
{
    sreq *q = &s->rq[req];
    rank_t *d = &s->ranks[q->di];
    int need = blocks_for(s, s->w->req[req].n_in);
    if (d->kv_total - d->kv_used < need) {
        if (!moe_grow((void **)&s->pulls, &s->cap_pulls, s->n_pulls + 1, sizeof *s->pulls))
            return false;
        s->pulls[s->n_pulls++] = req;
        return true;
    }
    if (!hold_paused(d, req, need))
        return false;
    return push(s, s->now + handoff_ms(s, req, false) * 1e-3, EV_HANDOFF, req);
}

static double msg_ms(const sim *s) { return mp_xfer_ms(s->c, &s->o->net, 0); }

static bool to_inbox(rank_t *r, int kind, int req)
{
    if (!moe_grow((void **)&r->inbox[kind], &r->cap_inbox[kind], r->n_inbox[kind] + 1, sizeof *r->inbox[kind]))
        return false;
    r->inbox[kind][r->n_inbox[kind]++] = req;
    return true;
}

/* The decode side takes a KvReserve in (worker/kv_push.c moe_kv_push_on_reserve): room for the
 * prompt's blocks and one more per sequence it holds -> a paused sequence holds them and the
 * accept goes back; else no answer, and the KV is pulled after the prefill. */
static bool take_reserve(sim *s, int req)
{
    sreq *q = &s->rq[req];
    if (q->state == RQ_DONE)
        return true;
    rank_t *d = &s->ranks[q->di];
    int need = blocks_for(s, s->w->req[req].n_in);
    if (d->kv_total - d->kv_used < need + holding(d)) {
        q->res = RES_DECLINED;
        q->pull = true;
        return q->state != RQ_XFER || start_pull(s, req);
    }
    if (!hold_paused(d, req, need))
        return false;
    q->res = RES_ACCEPTED;
    return push(s, s->now + msg_ms(s) * 1e-3, EV_ACCEPT, req);
}

/* The prefill side takes the accept in: a prefill already parked pushes every layer now. */
static bool take_accept(sim *s, int req)
{
    sreq *q = &s->rq[req];
    q->accept_in = true;
    return q->state != RQ_XFER || push(s, s->now + handoff_ms(s, req, false) * 1e-3, EV_HANDOFF, req);
}

/* A message for rank r's loop: taken in now when it is between steps, else after its step. */
static bool deliver_msg(sim *s, int r, int kind, int req)
{
    if (s->groups[s->ranks[r].group].busy)
        return to_inbox(&s->ranks[r], kind, req);
    return kind == IN_RESERVE ? take_reserve(s, req) : take_accept(s, req);
}

static bool take_inbox(sim *s, rank_t *r)
{
    for (int kind = 0; kind < 2; kind++) {
        int n = r->n_inbox[kind];
        r->n_inbox[kind] = 0;
        for (int i = 0; i < n; i++)
            if (!(kind == IN_RESERVE ? take_reserve(s, r->inbox[kind][i]) : take_accept(s, r->inbox[kind][i])))
                return false;
    }
    return true;
}

static bool retry_pulls(sim *s)
{
    int n = s->n_pulls;
    s->n_pulls = 0;
    for (int i = 0; i < n; i++)
        if (!start_pull(s, s->pulls[i]))
            return false;
    return true;
}

static bool on_step_end(sim *s, int g)
{
    group_t *gr = &s->groups[g];
    gr->busy = false;
    if (s->ps) {
        s->st.busy_s[s->ranks[gr->first].pool] += s->now - gr->t_start;
        for (int k = 0; k < gr->ep; k++)
            s->host_busy[s->ranks[gr->first + k].host]--;
        if (!mp_sim_reshare(s, g))
            return false;
    }
    bool freed = false;
    for (int k = 0; k < gr->ep; k++) {
        rank_t *r = &s->ranks[gr->first + k];
        for (int i = 0; i < r->n_seqs; i++) {
            eseq *e = &r->seqs[i];
            if (!e->chunk)
                continue;
            e->n_computed += e->chunk;
            e->chunk = 0;
            if (e->n_computed < e->n_tokens)
                continue;
            int req = e->req;
            e->n_tokens++;
            e->n_generated++;
            deliver(s, req);
            if (e->n_generated == 1 && !push(s, s->now + s->c->token_path_ms * 1e-3, EV_FIRST_SEEN, req))
                return false;
            if (e->n_generated >= s->w->req[req].n_out) {
                s->rec[req].ok = true;
                s->rq[req].state = RQ_DONE;
                s->in_flight--;
                s->done++;
                if (s->disagg && s->rq[req].reserved) { /* one token: the reservation goes */
                    s->ranks[s->rq[req].di].reserved -= s->rq[req].reserved;
                    s->rq[req].reserved = 0;
                    int j = find_seq(&s->ranks[s->rq[req].di], req);
                    if (j >= 0)
                        remove_seq(&s->ranks[s->rq[req].di], j);
                }
                remove_seq(r, i--);
                freed = true;
            } else if (e->prefill_only) {
                sreq *q = &s->rq[req];
                e->paused = true;
                q->state = RQ_XFER;
                if (q->pull) {
                    if (!start_pull(s, req))
                        return false;
                } else if (q->res == RES_ACCEPTED && q->accept_in &&
                           !push(s, s->now + handoff_ms(s, req, e->layered) * 1e-3, EV_HANDOFF, req)) {
                    return false;
                } /* else the handshake is still under way: take_reserve / take_accept go on */
            }
        }
    }
    /* The next loop turn: the messages that came during the step, then the next step. */
    for (int k = 0; k < gr->ep; k++)
        if (!take_inbox(s, &s->ranks[gr->first + k]))
            return false;
    if (freed && s->n_pulls && !retry_pulls(s))
        return false;
    return kick(s, g);
}

static bool on_start(sim *s, int req)
{
    sreq *q = &s->rq[req];
    rank_t *p = &s->ranks[q->pi];
    eseq *e = add_seq(p, req);
    if (!e)
        return false;
    e->n_tokens = s->w->req[req].n_in;
    e->prefill_only = s->disagg;
    if (s->disagg && s->w->req[req].n_out > 1) {
        q->pull = s->o->kv_block_mode;
        if (!q->pull) { /* KvReserve, sent when the worker takes the start in: after a step in flight */
            group_t *g = &s->groups[p->group];
            q->res = RES_SENT;
            if (!push(s, (g->busy ? g->t_end : s->now) + msg_ms(s) * 1e-3, EV_RESERVE, req))
                return false;
        }
    }
    /* The worker drains every control message before it steps: starts arriving together share
     * the step, so the step begins after this instant's other events. */
    return push(s, s->now, EV_KICK, p->group);
}

static bool on_handoff(sim *s, int req)
{
    sreq *q = &s->rq[req];
    rank_t *p = &s->ranks[q->pi], *d = &s->ranks[q->di];
    int i = find_seq(p, req);
    eseq pe = p->seqs[i];
    remove_seq(p, i);
    int j = find_seq(d, req);
    eseq *de = &d->seqs[j];
    de->n_tokens = pe.n_tokens;
    de->n_computed = pe.n_computed;
    de->n_generated = pe.n_generated;
    de->paused = false;
    de->prefill_only = false;
    d->reserved -= q->reserved;
    q->reserved = 0;
    q->state = RQ_DECODE;
    s->st.handoffs++;
    if (s->n_pulls && !retry_pulls(s))
        return false;
    return kick(s, d->group) && kick(s, p->group);
}

static bool on_arrive(sim *s, int req)
{
    if (s->in_flight >= s->o->max_requests) {
        s->st.rejected++;
        s->rq[req].state = RQ_DONE;
        snprintf(s->rec[req].error, sizeof s->rec[req].error, "RESOURCE_EXHAUSTED: too many requests");
        s->done++;
        return true;
    }
    int cache = 0;
    for (int i = 0; i < s->n_ranks; i++)
        if (s->ranks[i].pool != MP_POOL_PREFILL && (cache == 0 || s->ranks[i].kv_total < cache))
            cache = s->ranks[i].kv_total;
    if (blocks_for(s, s->w->req[req].n_in + 1) > cache) {
        s->rq[req].state = RQ_DONE;
        snprintf(s->rec[req].error, sizeof s->rec[req].error, "INVALID_ARGUMENT: prompt larger than the KV cache");
        s->done++;
        return true;
    }
    s->in_flight++;
    s->queue[s->q_head + s->q_len++] = req;
    return dispatch(s);
}

static void timeline(sim *s)
{
    FILE *f = s->o->timeline;
    for (int i = 0; i < s->n_ranks; i++) {
        const rank_t *r = &s->ranks[i];
        int run = 0, wait = 0;
        for (int k = 0; k < r->n_seqs; k++) {
            run += r->seqs[k].blocks > 0;
            wait += r->seqs[k].blocks == 0;
        }
        static const char *names[] = {"prefill", "decode", "mixed"};
        fprintf(f,
                "{\"type\": \"timeline\"%s%s, \"t_s\": %.4f, \"instance\": %d, \"pool\": \"%s\", \"kv_used\": %d, "
                "\"kv_total\": %d, \"running\": %d, \"waiting\": %d, \"pending_tokens\": %ld, \"queued\": %d}\n",
                s->o->label ? ", " : "", s->o->label ? s->o->label : "", s->now, i, names[r->pool], r->kv_used,
                r->kv_total, run, wait, r->pending_tokens, s->q_len);
    }
}

/* ---- layout ---- */

static moe_status build(sim *s, const mp_layout *l)
{
    s->disagg = l->count[MP_POOL_PREFILL] > 0;
    if (s->disagg ? l->count[MP_POOL_DECODE] < 1 : l->count[MP_POOL_MIXED] < 1)
        return moe_error(MOE_ERR_INVALID_ARG, "layout: needs P and D pools, or an M pool");
    int kv = s->o->kv_blocks > 0 ? s->o->kv_blocks : s->c->kv_blocks;
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < l->count[p]; k++) {
            if (l->ep[p] < 1 || l->ep[p] > 64)
                return moe_error(MOE_ERR_INVALID_ARG, "layout: EP size %d outside [1, 64]", l->ep[p]);
            if (!moe_grow((void **)&s->groups, &s->cap_groups, s->n_groups + 1, sizeof *s->groups))
                return MOE_ERR_NOMEM;
            group_t *g = &s->groups[s->n_groups];
            *g = (group_t){.first = s->n_ranks, .ep = l->ep[p]};
            for (int r = 0; r < l->ep[p]; r++) {
                if (!moe_grow((void **)&s->ranks, &s->cap_ranks, s->n_ranks + 1, sizeof *s->ranks))
                    return MOE_ERR_NOMEM;
                rank_t *rk = &s->ranks[s->n_ranks];
                memset(rk, 0, sizeof *rk);
                rk->pool = (mp_pool)p;
                rk->group = s->n_groups;
                rk->host = s->o->host_ranks > 0 ? s->n_ranks / s->o->host_ranks : s->n_ranks;
                rk->kv_total = kv;
                s->n_ranks++;
            }
            s->n_groups++;
        }
    return MOE_OK;
}

static void sim_free(sim *s)
{
    for (int i = 0; i < s->n_ranks; i++) {
        free(s->ranks[i].seqs);
        free(s->ranks[i].inbox[0]);
        free(s->ranks[i].inbox[1]);
    }
    free(s->ranks);
    free(s->groups);
    free(s->rq);
    free(s->queue);
    free(s->pulls);
    free(s->heap);
    free(s->host_busy);
}

moe_status mp_simulate(const mp_costs *c, const mp_layout *l, const mp_sim_opts *o, const wl_workload *w,
                       rp_record *rec, mp_sim_stats *st)
{
    sim s = {.c = c, .o = o, .w = w, .rec = rec};
    s.mbt = o->max_batch_tokens > 0 ? o->max_batch_tokens : c->max_batch_tokens;
    s.max_seqs = o->max_seqs > 0 ? o->max_seqs : c->max_seqs;
    s.bs = o->block_size > 0 ? o->block_size : c->block_size;
    moe_status rc = build(&s, l);
    if (rc != MOE_OK) {
        sim_free(&s);
        return rc;
    }
    s.ps = o->host_ranks > 0 && !o->step_ms_fn;
    if (s.ps && o->client_cpu_ms_per_token > 0 && w->n > 1) {
        double tokens = 0, t0 = w->req[0].t_s, t1 = t0;
        for (int i = 0; i < w->n; i++) {
            tokens += w->req[i].n_out;
            t0 = w->req[i].t_s < t0 ? w->req[i].t_s : t0;
            t1 = w->req[i].t_s > t1 ? w->req[i].t_s : t1;
        }
        if (t1 > t0)
            s.client_busy = fmin(1, o->client_cpu_ms_per_token * tokens * 1e-3 / (t1 - t0));
    }
    s.rq = calloc((size_t)w->n + 1, sizeof *s.rq);
    s.queue = calloc((size_t)w->n + 1, sizeof *s.queue);
    s.host_busy = calloc((size_t)s.n_ranks + 1, sizeof *s.host_busy);
    if (!s.rq || !s.queue || !s.host_busy) {
        sim_free(&s);
        return moe_error(MOE_ERR_NOMEM, "simulate: out of memory for %d requests", w->n);
    }
    bool ok = true;
    for (int i = 0; i < w->n && ok; i++) {
        rec[i] = (rp_record){.t_arrival = w->req[i].t_s, .n_in = w->req[i].n_in, .n_out = w->req[i].n_out,
                             .server_ttft_ms = NAN};
        ok = push(&s, w->req[i].t_s, EV_ARRIVE, i);
    }
    if (ok && o->timeline && o->timeline_s > 0)
        ok = push(&s, 0, EV_TIMELINE, 0);
    while (ok && s.n_heap && s.done < w->n) {
        event e = pop(&s);
        s.now = e.t;
        switch (e.kind) {
        case EV_ARRIVE:
            ok = on_arrive(&s, e.a);
            break;
        case EV_START:
            ok = on_start(&s, e.a);
            break;
        case EV_STEP_END:
            if (e.gen == s.groups[e.a].gen) /* else a schedule that processor sharing moved */
                ok = on_step_end(&s, e.a);
            break;
        case EV_HANDOFF:
            ok = on_handoff(&s, e.a);
            break;
        case EV_FIRST_SEEN: {
            sreq *q = &s.rq[e.a];
            if (q->counted) {
                s.ranks[q->pi].pending_tokens -= w->req[e.a].n_in;
                s.ranks[q->pi].n_pending--;
                q->counted = false;
            }
            ok = dispatch(&s);
            break;
        }
        case EV_KICK:
            ok = kick(&s, e.a);
            break;
        case EV_RESERVE:
            ok = deliver_msg(&s, s.rq[e.a].di, IN_RESERVE, e.a);
            break;
        case EV_ACCEPT:
            ok = deliver_msg(&s, s.rq[e.a].pi, IN_ACCEPT, e.a);
            break;
        case EV_TIMELINE:
            timeline(&s);
            ok = push(&s, s.now + o->timeline_s, EV_TIMELINE, 0);
            break;
        }
    }
    for (int i = 0; i < w->n; i++)
        if (s.rq[i].state != RQ_DONE && !rec[i].error[0])
            snprintf(rec[i].error, sizeof rec[i].error, "never finished in the simulation (stuck)");
    s.st.end_s = s.now;
    if (st)
        *st = s.st;
    sim_free(&s);
    return ok ? MOE_OK : moe_error(MOE_ERR_NOMEM, "simulate: out of memory");
}
