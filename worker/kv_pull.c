/* Both sides of the KV pull between a prefill and a decode worker (DistServe): the prefill side
 * parks a sequence, offers it, sends its blocks when the decode side pulls and frees them on the
 * ack or when the lease expires; the decode side reserves blocks (or waits for room, renewing the
 * lease), posts its receives, pulls, verifies the checksums, retries once and recomputes as the
 * last resort. A layer-by-layer push (worker/kv_push.c) is attempt 1 of the same state machine.
 * Driven by the worker loop (worker/worker_loop.c). */
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "worker/seq_state_pb.h"
#include "worker/worker_internal.h"

park_t *moe_kv_pull_find_park(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_parks; i++)
        if (w->parks[i].seq_id == id)
            return &w->parks[i];
    return NULL;
}

void moe_kv_pull_remove_park(worker *w, park_t *p)
{
    moe_kv_send_free(p->send); /* cancels (waits for) the sends before their views go */
    free(p->push_sums);
    moe_kv_stage_free(&p->stage);
    *p = w->parks[--w->n_parks];
}

static pull_t *find_pull(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_pulls; i++)
        if (w->pulls[i].seq_id == id)
            return &w->pulls[i];
    return NULL;
}

void moe_kv_pull_remove_pull(worker *w, pull_t *q)
{
    moe_kv_recv_free(q->recv);
    moe_kv_stage_free(&q->stage);
    if (q->offer)
        protobuf_c_message_free_unpacked(&q->offer->base, NULL);
    *q = w->pulls[--w->n_pulls];
}

void moe_kv_pull_send_done(worker *w, int peer, uint64_t id, bool received)
{
    pb_done d;
    moeserve__cluster__v1__kv_done__init(&d);
    d.seq_id = id;
    d.received = received;
    moe_worker_send_peer(w, peer, TAG(KV_DONE), &d.base);
}

void moe_kv_pull_send_gone(worker *w, int peer, uint64_t id, const char *why)
{
    pb_gone g;
    moeserve__cluster__v1__kv_gone__init(&g);
    g.seq_id = id;
    g.reason = (char *)(uintptr_t)why;
    moe_worker_send_peer(w, peer, TAG(KV_GONE), &g.base);
}

static void add_tomb(worker *w, uint64_t id)
{
    int64_t now = moe_now_ns();
    for (int i = 0; i < w->n_tombs;) { /* expire old ones while here */
        if (w->tombs[i].until < now)
            w->tombs[i] = w->tombs[--w->n_tombs];
        else
            i++;
    }
    if (moe_grow((void **)&w->tombs, &w->cap_tombs, w->n_tombs + 1, sizeof *w->tombs))
        w->tombs[w->n_tombs++] = (tomb_t){.seq_id = id, .until = now + 60 * (int64_t)1000000000};
}

static int find_tomb(const worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_tombs; i++)
        if (w->tombs[i].seq_id == id)
            return i;
    return -1;
}

bool moe_kv_pull_has_tomb(const worker *w, uint64_t id)
{
    return find_tomb(w, id) >= 0;
}

static bool take_tomb(worker *w, uint64_t id)
{
    int i = find_tomb(w, id);
    if (i >= 0)
        w->tombs[i] = w->tombs[--w->n_tombs];
    return i >= 0;
}

void moe_kv_pull_free_seq(worker *w, uint64_t id)
{
    park_t *p = moe_kv_pull_find_park(w, id);
    if (p) {
        /* Sends still in flight are detached, not waited for: the KV pool stays mapped for the
         * process's life, so they can only carry stale bytes, to a receiver the coordinator tells
         * to drop the sequence too (and whose checksums would reject them). Waiting would pin
         * the KV for as long as a hung receiver stays silent. */
        moe_worker_engine_drop(w, id);
        moe_kv_pull_remove_park(w, p);
        return;
    }
    pull_t *q = find_pull(w, id);
    if (q) {
        /* Receiving: the receives are cancelled now (comm.h: a receive's buffer is not written
         * once its cancel returns) and the blocks freed at once. Waiting for them to end held
         * the blocks until kv_timeout_ms whenever the sender stopped (a push cut short by the
         * same Free at the prefill side), and counted a timeout for a transfer nobody wanted. */
        MOE_LOG_D("seq %llu: freed while %s its KV from rank %d", (unsigned long long)id,
                  q->phase != PULL_RECEIVING ? "waiting for"
                  : q->push && !q->offer     ? "receiving the push of"
                                             : "receiving",
                  q->src);
        moe_kv_recv_free(q->recv); /* before its blocks go back to the cache */
        q->recv = NULL;
        moe_kv_pull_send_done(w, q->src, id, false);
        if (q->imported)
            moe_worker_engine_drop(w, id);
        moe_kv_pull_remove_pull(w, q);
        add_tomb(w, id); /* a push's offer may still be on the way: refused, not pulled */
        w->load_dirty = true;
        return;
    }
    if (w->eng && moe_engine_finish(w->eng, id) == MOE_OK) {
        w->load_dirty = true;
        return;
    }
    if (w->o->role == MOE_WORKER_DECODE)
        add_tomb(w, id); /* its offer may still be on the way */
}

/* ---- decode side of the pull ---- */

static void offer_state(const pb_offer *of, moe_seq_state *st, bool recompute)
{
    moe_seq_state_from_pb(of->state, st);
    if (recompute)
        st->n_computed = 0;
}

static void handed_off(worker *w, pull_t *q, bool recomputed, uint64_t bytes)
{
    pb_seq_event ev;
    moeserve__cluster__v1__seq_event__init(&ev);
    ev.seq_id = q->seq_id;
    ev.kind = EVENT(HANDED_OFF);
    ev.transfer_bytes = bytes;
    ev.transfer_ns = q->t0 ? (uint64_t)(moe_now_ns() - q->t0) : 0;
    ev.attempts = (uint32_t)q->attempt;
    ev.recomputed = recomputed;
    ev.message = (char *)"";
    if (moe_worker_send_coord(w, TAG(SEQ_EVENT), &ev.base) != MOE_OK)
        MOE_LOG_E("seq event: %s", moe_error_message());
}

/* Last resort: the decode side computes the prompt (and the first token's K/V) itself. The
 * sampler state came with the offer, so the continuation is the same as after a transfer. */
static void recompute(worker *w, pull_t *q)
{
    uint64_t id = q->seq_id;
    if (q->imported)
        moe_worker_engine_drop(w, id);
    q->imported = false;
    q->held_blocks = 0;
    moe_seq_state st;
    offer_state(q->offer, &st, true);
    const int *blocks;
    int nb;
    moe_status s = moe_engine_import(w->eng, &st, &blocks, &nb);
    if (s == MOE_OK)
        s = moe_engine_resume(w->eng, id);
    if (s != MOE_OK) {
        MOE_LOG_E("seq %llu: recompute failed: %s", (unsigned long long)id, moe_error_message());
        moe_worker_seq_event(w, id, EVENT(FAILED), s, moe_error_message());
        moe_worker_engine_drop(w, id);
    } else {
        MOE_LOG_W("seq %llu: KV not received from rank %d, recomputing its %d prompt tokens here",
                  (unsigned long long)id, q->src, st.n_prompt);
        w->ctr.kv_transfer_recomputes++;
        handed_off(w, q, true, 0);
    }
    moe_kv_pull_remove_pull(w, q);
    w->load_dirty = true;
}

/* Posts the receives of one attempt into the sequence's reserved blocks, then pulls. */
static void start_attempt(worker *w, pull_t *q, int attempt)
{
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (moe_engine_export(w->eng, q->seq_id, &st, &blocks, &nb) != MOE_OK) {
        recompute(w, q);
        return;
    }
    /* The receives land in host views of the blocks: the blocks themselves on a host pool, a
     * staging buffer uploaded once every block verified on a device one (a retry reuses it). */
    if (moe_kv_stage_open(&q->stage, moe_engine_kv_cache(w->eng), blocks, nb, 1,
                          w->hooks.force_staging) != MOE_OK) {
        MOE_LOG_E("seq %llu: %s", (unsigned long long)q->seq_id, moe_error_message());
        recompute(w, q);
        return;
    }
    uint32_t xfer = ++w->next_xfer;
    int64_t now = moe_now_ns();
    moe_status s = moe_kv_recv_start(&w->data, moe_kv_stage_views(&q->stage, 0), nb, w->block_bytes,
                                     q->src, moe_kv_data_tag(xfer),
                                     now + moe_worker_ms_ns(w->o->kv_timeout_ms), &q->recv);
    if (s != MOE_OK) {
        MOE_LOG_E("seq %llu: %s", (unsigned long long)q->seq_id, moe_error_message());
        moe_kv_pull_send_done(w, q->src, q->seq_id, false);
        recompute(w, q);
        return;
    }
    q->phase = PULL_RECEIVING;
    q->attempt = attempt;
    q->xfer_id = xfer;
    if (attempt == 1)
        q->t0 = now;
    pb_pull m;
    moeserve__cluster__v1__kv_pull__init(&m);
    m.seq_id = q->seq_id;
    m.xfer_id = xfer;
    m.attempt = (uint32_t)attempt;
    moe_worker_send_peer(w, q->src, TAG(KV_PULL), &m.base);
}

/* The offer waits for free blocks here (its prefill side holds the KV meanwhile): counted once. */
static void waits_for_room(worker *w, pull_t *q)
{
    if (!q->waited)
        w->ctr.kv_pulls_waited++;
    q->waited = true;
}

/* Tries to reserve blocks for an offer; returns false while there is no room. */
static bool try_import(worker *w, pull_t *q)
{
    moe_seq_state st;
    offer_state(q->offer, &st, false);
    const int *blocks;
    int nb;
    moe_status s = moe_engine_import(w->eng, &st, &blocks, &nb);
    if (s == MOE_ERR_FULL) {
        moe_engine_stats es;
        moe_engine_get_stats(w->eng, &es);
        if (es.kv_blocks_used > 0) {
            waits_for_room(w, q); /* DistServe: the pull slows the prefill instead of failing */
            return false;
        }
    }
    if (s != MOE_OK) {
        MOE_LOG_W("seq %llu: cannot import: %s", (unsigned long long)q->seq_id,
                  moe_error_message());
        moe_worker_seq_event(w, q->seq_id, EVENT(FAILED), s, moe_error_message());
        moe_kv_pull_send_done(w, q->src, q->seq_id, false);
        moe_kv_pull_remove_pull(w, q);
        return true;
    }
    q->imported = true;
    q->held_blocks = nb;
    w->load_dirty = true;
    if ((uint32_t)nb != q->offer->n_blocks || q->offer->block_bytes != w->block_bytes) {
        MOE_LOG_E("seq %llu: offer of %u blocks x %llu bytes does not match %d x %zu here",
                  (unsigned long long)q->seq_id, q->offer->n_blocks,
                  (unsigned long long)q->offer->block_bytes, nb, w->block_bytes);
        moe_kv_pull_send_done(w, q->src, q->seq_id, false);
        recompute(w, q);
        return true;
    }
    start_attempt(w, q, 1);
    return true;
}

/* The offer of a pushed sequence: its final state; the push (or its retry) may finish now. */
static void push_offer(worker *w, pull_t *q, pb_offer *m)
{
    q->offer = m;
    q->t0 = moe_now_ns(); /* the hand-off time counts from the end of the prefill */
    moe_worker_kv_trace(w, q->seq_id, "offer_in", q->recv ? moe_kv_recv_pending(q->recv) : -1);
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (moe_engine_export(w->eng, q->seq_id, &st, &blocks, &nb) != MOE_OK ||
        (uint32_t)nb != m->n_blocks || m->block_bytes != w->block_bytes) {
        MOE_LOG_E("seq %llu: offer of %u blocks x %llu bytes does not match the %d reserved here",
                  (unsigned long long)q->seq_id, m->n_blocks, (unsigned long long)m->block_bytes, nb);
        moe_kv_pull_send_done(w, q->src, q->seq_id, false);
        if (q->recv)
            q->cancelled = true; /* it ends by its deadline, then is dropped */
        else
            recompute(w, q);
        return;
    }
    if (q->phase == PULL_WAIT_OFFER)
        start_attempt(w, q, q->attempt + 1);
    else {
        moe_kv_recv_set_deadline(q->recv, q->t0 + moe_worker_ms_ns(w->o->kv_timeout_ms));
        moe_kv_recv_set_waiting(q->recv, false); /* the prefill is done: every slice is on its way */
    }
}

void moe_kv_pull_on_offer(worker *w, int src, pb_offer *m)
{
    uint64_t id = m->state ? m->state->seq_id : 0;
    pull_t *pq = m->state ? find_pull(w, id) : NULL;
    if (pq && pq->push && !pq->offer && pq->src == src) {
        push_offer(w, pq, m);
        return;
    }
    if (!m->state || take_tomb(w, id) || !w->eng) {
        moe_kv_pull_send_done(w, src, id, false);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return;
    }
    if (!moe_grow((void **)&w->pulls, &w->cap_pulls, w->n_pulls + 1, sizeof *w->pulls)) {
        moe_worker_seq_event(w, id, EVENT(FAILED), MOE_ERR_NOMEM, "worker: out of memory");
        moe_kv_pull_send_done(w, src, id, false);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return;
    }
    int64_t now = moe_now_ns();
    pull_t *q = &w->pulls[w->n_pulls++];
    *q =
        (pull_t){.seq_id = id,
                 .src = src,
                 .offer = m,
                 .phase = PULL_WAIT_ROOM,
                 .next_renew = now + moe_worker_ms_ns((int)(m->lease_ms / 3 ? m->lease_ms / 3 : 1)),
                 .not_before = now + moe_worker_ms_ns(w->pull_delay_ms)};
    if (w->pull_delay_ms == 0)
        try_import(w, q);
}

void moe_kv_pull_on_header(worker *w, const pb_header *m)
{
    pull_t *q = find_pull(w, m->seq_id);
    if (q && q->phase == PULL_RECEIVING && q->xfer_id == m->xfer_id)
        moe_kv_recv_set_checksums(q->recv, m->checksums, (int)m->n_checksums);
}

void moe_kv_pull_on_gone(worker *w, const pb_gone *m)
{
    pull_t *q = find_pull(w, m->seq_id);
    if (!q)
        return;
    MOE_LOG_W("seq %llu: rank %d no longer holds its KV (%s)", (unsigned long long)m->seq_id,
              q->src, m->reason);
    moe_kv_recv_free(q->recv); /* it will never send: cancel the receives */
    q->recv = NULL;
    if (q->cancelled || (q->push && !q->offer)) { /* a push gone before its offer: the request
                                                   * ended at the prefill side */
        if (q->imported)
            moe_worker_engine_drop(w, q->seq_id);
        moe_kv_pull_remove_pull(w, q);
        return;
    }
    recompute(w, q);
}

/* Advances one pull; returns true when it changed something. May remove q. */
bool moe_kv_pull_progress_pull(worker *w, pull_t *q, int64_t now)
{
    if (q->phase == PULL_WAIT_ROOM) {
        if (now < q->not_before)
            return false;
        int free_blocks = w->kv_total;
        if (w->eng) {
            moe_engine_stats es;
            moe_engine_get_stats(w->eng, &es);
            free_blocks = es.kv_blocks_total - es.kv_blocks_used;
        }
        if ((uint32_t)free_blocks >= q->offer->n_blocks) {
            if (try_import(w, q))
                return true;
        } else {
            waits_for_room(w, q);
        }
        if (now >= q->next_renew && w->pull_delay_ms == 0) {
            pb_pull m;
            moeserve__cluster__v1__kv_pull__init(&m);
            m.seq_id = q->seq_id;
            m.renew_only = true;
            moe_worker_send_peer(w, q->src, TAG(KV_PULL), &m.base);
            q->next_renew =
                now + moe_worker_ms_ns((int)(q->offer->lease_ms / 3 ? q->offer->lease_ms / 3 : 1));
        }
        return false;
    }
    if (q->phase == PULL_WAIT_OFFER)
        return false;
    int pending = w->kv_trace ? moe_kv_recv_pending(q->recv) : 0;
    moe_kv_xfer_result r = moe_kv_recv_poll(q->recv, now);
    if (w->kv_trace && moe_kv_recv_pending(q->recv) != pending)
        moe_worker_kv_trace(w, q->seq_id, "recv", moe_kv_recv_pending(q->recv));
    if (r == MOE_KV_XFER_PENDING || (r == MOE_KV_XFER_OK && q->push && !q->offer))
        return false; /* a push that landed waits for its offer (the final state) */
    uint64_t id = q->seq_id;
    if (r == MOE_KV_XFER_OK && q->push) {
        moe_seq_state st;
        const int *blocks;
        int nb;
        offer_state(q->offer, &st, false);
        if (moe_engine_import_extend(w->eng, id, &st, &blocks, &nb) != MOE_OK) {
            MOE_LOG_E("seq %llu: pushed state refused: %s", (unsigned long long)id,
                      moe_error_message());
            r = MOE_KV_XFER_ERROR;
        }
    }
    /* Every block verified: into the engine's blocks (a no-op where they were received in place).
     */
    if (r == MOE_KV_XFER_OK && moe_kv_stage_upload(&q->stage) != MOE_OK) {
        MOE_LOG_E("seq %llu: received KV not stored: %s", (unsigned long long)id,
                  moe_error_message());
        r = MOE_KV_XFER_ERROR;
    }
    if (r == MOE_KV_XFER_OK) {
        uint64_t bytes = (uint64_t)q->offer->n_blocks * w->block_bytes;
        moe_kv_recv_free(q->recv);
        q->recv = NULL;
        moe_kv_pull_send_done(w, q->src, id, true);
        if (q->cancelled) {
            moe_worker_engine_drop(w, id);
            moe_kv_pull_remove_pull(w, q);
            return true;
        }
        w->ctr.kv_transfers++;
        if (q->push && q->attempt == 1)
            w->ctr.kv_transfers_layerwise++;
        w->ctr.kv_transfer_bytes += bytes;
        w->ctr.kv_transfer_ns += (uint64_t)(now - q->t0);
        if (moe_engine_resume(w->eng, id) != MOE_OK) {
            moe_worker_seq_event(w, id, EVENT(FAILED), MOE_ERR_INTERNAL, moe_error_message());
        } else {
            MOE_LOG_D("seq %llu: pulled %u blocks (%llu bytes) from rank %d in %.3f ms, attempt %d",
                      (unsigned long long)id, q->offer->n_blocks, (unsigned long long)bytes, q->src,
                      (double)(now - q->t0) * 1e-6, q->attempt);
            handed_off(w, q, false, bytes);
            moe_worker_kv_trace(w, id, "resumed", q->attempt);
        }
        moe_kv_pull_remove_pull(w, q);
        w->load_dirty = true;
        return true;
    }
    if (q->cancelled) { /* nobody wants it any more: not a failure, nothing to retry */
        moe_kv_recv_free(q->recv);
        q->recv = NULL;
        moe_kv_pull_send_done(w, q->src, id, false);
        moe_worker_engine_drop(w, id);
        moe_kv_pull_remove_pull(w, q);
        return true;
    }
    if (r == MOE_KV_XFER_CORRUPT) {
        w->ctr.kv_checksum_failures++;
        MOE_LOG_W("seq %llu: block %d from rank %d failed its checksum (attempt %d)",
                  (unsigned long long)id, moe_kv_recv_bad_block(q->recv), q->src, q->attempt);
    } else if (r == MOE_KV_XFER_TIMEOUT) {
        w->ctr.kv_transfer_timeouts++;
        MOE_LOG_W("seq %llu: KV from rank %d timed out after %d ms (attempt %d)",
                  (unsigned long long)id, q->src, w->o->kv_timeout_ms, q->attempt);
    } else {
        MOE_LOG_E("seq %llu: KV transfer from rank %d failed: %s", (unsigned long long)id, q->src,
                  moe_error_message());
    }
    moe_kv_recv_free(q->recv);
    q->recv = NULL;
    if (q->push && !q->offer) {
        q->phase = PULL_WAIT_OFFER; /* retry as a pull once the prefill side offers */
        w->ctr.kv_transfer_retries++;
        return true;
    }
    if (q->attempt < MOE_KV_MAX_ATTEMPTS) {
        w->ctr.kv_transfer_retries++;
        start_attempt(w, q, q->attempt + 1);
    } else {
        moe_kv_pull_send_done(w, q->src, id, false);
        recompute(w, q);
    }
    return true;
}

/* ---- prefill side of the pull ---- */

void moe_kv_pull_offer(worker *w, park_t *p)
{
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb) != MOE_OK)
        return;
    moe_seq_state_pb s;
    moe_seq_state_to_pb(&st, &s);
    pb_offer m;
    moeserve__cluster__v1__kv_offer__init(&m);
    m.state = &s.s;
    m.n_blocks = (uint32_t)nb;
    m.block_bytes = w->block_bytes;
    m.lease_ms = (uint32_t)w->o->lease_ms;
    moe_worker_send_peer(w, p->decode_rank, TAG(KV_OFFER), &m.base);
    moe_worker_kv_trace(w, p->seq_id, "park", p->prefill_tokens);
    p->parked = true;
    p->lease_deadline = moe_now_ns() + moe_worker_ms_ns(w->o->lease_ms);
    moe_kv_push_after_park(w, p);
}

void moe_kv_pull_on_pull(worker *w, int src, const pb_pull *m)
{
    if (m->layerwise) {
        moe_kv_push_on_accept(w, src, m);
        return;
    }
    park_t *p = moe_kv_pull_find_park(w, m->seq_id);
    if (!p || !p->parked || src != p->decode_rank) {
        moe_kv_pull_send_gone(w, src, m->seq_id,
                              !p ? "freed (cancelled, or its lease expired)" : "not offered to you");
        return;
    }
    int64_t now = moe_now_ns();
    p->lease_deadline = now + moe_worker_ms_ns(w->o->lease_ms);
    if (m->renew_only)
        return;
    moe_kv_push_stop(p); /* a retry replaces an attempt still in flight (or the push) */
    moe_seq_state st;
    const int *blocks;
    int nb;
    moe_status s = moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb);
    uint64_t *sums = s == MOE_OK ? malloc((size_t)(nb ? nb : 1) * sizeof *sums) : NULL;
    /* A parked sequence's KV no longer changes: one download to the host views, then the sends
     * (checksummed there) read them until done or cancelled. */
    if (sums && ((s = moe_kv_stage_open(&p->stage, moe_engine_kv_cache(w->eng), blocks, nb, 1,
                                        w->hooks.force_staging)) != MOE_OK ||
                 (s = moe_kv_stage_download(&p->stage, 0, 1)) != MOE_OK)) {
        free(sums);
        sums = NULL;
    }
    if (sums)
        s = moe_kv_send_start(&w->data, moe_kv_stage_views(&p->stage, 0), nb, w->block_bytes, src,
                              moe_kv_data_tag(m->xfer_id), (int)m->attempt, &w->hooks, sums,
                              &p->send);
    if (!sums || s != MOE_OK) {
        MOE_LOG_E("seq %llu: cannot send its KV: %s", (unsigned long long)m->seq_id,
                  s != MOE_OK ? moe_error_message() : "out of memory");
        moe_kv_pull_send_gone(w, src, m->seq_id, "the prefill side failed to send");
        moe_worker_engine_drop(w, p->seq_id);
        moe_kv_pull_remove_park(w, p);
    } else {
        pb_header h;
        moeserve__cluster__v1__kv_header__init(&h);
        h.seq_id = m->seq_id;
        h.xfer_id = m->xfer_id;
        h.n_checksums = (size_t)nb;
        h.checksums = sums;
        moe_worker_send_peer(w, src, TAG(KV_HEADER), &h.base);
        p->send_deadline = now + moe_worker_ms_ns(w->o->kv_timeout_ms) * 2;
    }
    free(sums);
}

void moe_kv_pull_on_done(worker *w, const pb_done *m)
{
    park_t *p = moe_kv_pull_find_park(w, m->seq_id);
    if (!p)
        return;
    moe_worker_engine_drop(w, p->seq_id);
    moe_kv_pull_remove_park(w,
                            p); /* detaches sends still in flight; the receiver has what it wants */
}

/* Advances one parked sequence; returns true when it changed something. May remove p. */
bool moe_kv_pull_progress_park(worker *w, park_t *p, int64_t now)
{
    if (p->send) {
        bool done = false;
        if (moe_kv_send_poll(p->send, &done) != MOE_OK) {
            MOE_LOG_E("seq %llu: %s", (unsigned long long)p->seq_id, moe_error_message());
            done = true;
        } else if (done && p->parked && !p->traced_left) {
            p->traced_left = true;
            moe_worker_kv_trace(w, p->seq_id, "left", 0);
        }
        if (p->push_xfer && !p->parked)
            return false; /* a push during the prefill: more layers to come */
        if (!done && now < p->send_deadline)
            return false;
        if (!done)
            MOE_LOG_W(
                "seq %llu: blocks to rank %d still not taken after %d ms; abandoning the sends",
                (unsigned long long)p->seq_id, p->decode_rank, 2 * w->o->kv_timeout_ms);
        moe_kv_send_free(p->send);
        p->send = NULL;
        p->lease_deadline = now + moe_worker_ms_ns(w->o->lease_ms); /* now waiting for the ack */
        return true;
    }
    if (p->parked && now >= p->lease_deadline) {
        MOE_LOG_W("seq %llu: lease expired, no pull from rank %d in %d ms; freeing its KV",
                  (unsigned long long)p->seq_id, p->decode_rank, w->o->lease_ms);
        w->ctr.kv_lease_expirations++;
        moe_worker_seq_event(w, p->seq_id, EVENT(LEASE_EXPIRED), MOE_ERR_TIMEOUT,
                             "KV lease expired");
        moe_worker_engine_drop(w, p->seq_id);
        moe_kv_pull_remove_park(w, p);
        return true;
    }
    return false;
}
