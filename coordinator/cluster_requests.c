/* The coordinator's request table and token delivery: tokens put back in index order,
 * detokenized without splitting UTF-8, stop strings and stop token ids applied, pushed to the
 * front end; terminal calls and the bookkeeping they release. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/cluster_internal.h"

/* ---- request table ---- */

creq *moe_cluster_req_find(moe_cluster *c, uint64_t id)
{
    for (creq *r = c->buckets[CREQ_HANDLE(id) % N_BUCKETS]; r; r = r->hnext)
        if (r->id == id)
            return r;
    return NULL;
}

creq *moe_cluster_req_find_handle(moe_cluster *c, uint64_t handle)
{
    for (creq *r = c->buckets[CREQ_HANDLE(handle) % N_BUCKETS]; r; r = r->hnext)
        if (CREQ_HANDLE(r->id) == handle)
            return r;
    return NULL;
}

bool moe_cluster_req_placed_on(const creq *r, int idx)
{
    return r->state != RQ_QUEUED &&
           ((r->pi == idx && (r->state == RQ_PREFILL || r->state == RQ_TRANSFER)) || r->di == idx);
}

bool moe_cluster_req_depends_on(const creq *r, int idx)
{
    return moe_cluster_req_placed_on(r, idx) ||
           (r->state != RQ_QUEUED && r->mig.id && r->mig.dst == idx);
}

static void unlink_req(moe_cluster *c, creq *r)
{
    for (creq **pp = &c->buckets[CREQ_HANDLE(r->id) % N_BUCKETS]; *pp; pp = &(*pp)->hnext) {
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
    free(r->gen);
    free(r->text);
    free(r);
}

/* Ends a request with an error: frees it on its workers, then the terminal call. */
void moe_cluster_req_fail(moe_cluster *c, creq *r, moe_status code, const char *msg)
{
    unlink_req(c, r);
    release_accounting(c, r);
    moe_cluster_mig_on_request_end(c, r);
    if (r->state != RQ_QUEUED) {
        moe_cluster_send_free(c, r->pi, r->id);
        if (r->di != r->pi)
            moe_cluster_send_free(c, r->di, r->id);
    }
    moe_frontend_error(r->stream, code, msg);
    destroy_req(c, r);
}

static void finish_req(moe_cluster *c, creq *r, moe_finish_reason why, const char *matched,
                       bool free_workers)
{
    unlink_req(c, r);
    release_accounting(c, r);
    moe_cluster_mig_on_request_end(c, r);
    if (free_workers) {
        moe_cluster_send_free(c, r->pi, r->id);
        if (r->di != r->pi)
            moe_cluster_send_free(c, r->di, r->id);
    }
    moe_frontend_finish_info info = {.reason = why, .matched_stop = matched};
    moe_frontend_finish(r->stream, &info);
    destroy_req(c, r);
}

void moe_cluster_req_resume(moe_cluster *c, creq *r, const char *why)
{
    release_accounting(c, r); /* it was not queued: n_queued is untouched */
    moe_cluster_mig_on_request_end(c, r);
    r->mig.id = 0;
    /* Whichever of its instances is still alive drops its copy (parked KV, a prefill in flight). */
    for (int k = 0; k < 2; k++) {
        int i = k ? r->di : r->pi;
        if (i >= 0 && (k == 0 || r->di != r->pi) && c->inst[i].state != MOE_INSTANCE_UNREACHABLE)
            moe_cluster_send_free(c, i, r->id);
    }
    r->n_stash = 0; /* early tokens of the lost placement: the next one recomputes them */
    r->resumes++;
    /* A new sequence id for the next placement (same bucket): the alive instance that just got
     * the Free keeps a tombstone for the old id, and may be picked again. */
    r->id = CREQ_HANDLE(r->id) | ((uint64_t)(r->resumes & 0xffff) << CREQ_EPOCH_SHIFT);
    MOE_LOG_I("request %s goes on elsewhere from token %u: %s", r->req->request_id, r->next_index,
              why);
    pthread_mutex_lock(&c->mu);
    r->state = RQ_QUEUED;
    r->pi = r->di = -1;
    c->n_queued++;
    c->n_resumed++;
    pthread_mutex_unlock(&c->mu);
    moe_cluster_sched_enqueue(c, r);
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
        if (n && r->emitted + n <= r->text_len && !memcmp(r->text + r->emitted, s, n) &&
            (!best || n < best_len)) {
            best = s;
            best_len = n;
        }
    }
    return best;
}

/* One token, in index order. Returns true when the request ended (r is freed). */
static bool emit_token(moe_cluster *c, creq *r, uint32_t index, int32_t token, int finish,
                       const moe_token_logprobs *lp)
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
    if (moe_grow((void **)&r->gen, &r->cap_gen, r->n_gen + 1, sizeof *r->gen))
        r->gen[r->n_gen++] = token;
    else
        MOE_LOG_E("request %s: out of memory for its token record (it cannot resume)", q->request_id);
    moe_status st = moe_frontend_push_tokens_lp(r->stream, &token, &index, lp, 1, out ? out : "",
                                                out_len);
    free(out);
    if (st != MOE_OK) {
        MOE_LOG_E("request %s: %s", q->request_id, moe_error_message());
        moe_cluster_req_fail(c, r, MOE_ERR_INTERNAL, "internal error: token stream out of order");
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

void moe_cluster_req_deliver(moe_cluster *c, creq *r, uint32_t index, int32_t token, int finish,
                             const moe_token_logprobs *lp)
{
    if (index == r->first_index)
        first_token_seen(c, r, finish != MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE);
    if (index < r->next_index)
        return; /* a duplicate: never sent twice */
    if (index > r->next_index) {
        if (moe_grow((void **)&r->stash, &r->cap_stash, r->n_stash + 1, sizeof *r->stash))
            r->stash[r->n_stash++] = (stash_t){.index = index, .token = token, .finish = finish,
                                               .has_lp = lp != NULL, .lp = lp ? *lp : (moe_token_logprobs){0}};
        return;
    }
    r->next_index++;
    if (emit_token(c, r, index, token, finish, lp))
        return;
    for (bool again = true; again;) { /* tokens that arrived early */
        again = false;
        for (int i = 0; i < r->n_stash; i++) {
            if (r->stash[i].index == r->next_index) {
                stash_t s = r->stash[i];
                r->stash[i] = r->stash[--r->n_stash];
                r->next_index++;
                if (emit_token(c, r, s.index, s.token, s.finish, s.has_lp ? &s.lp : NULL))
                    return;
                again = true;
                break;
            }
        }
    }
}
