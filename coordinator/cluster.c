/* The coordinator's cluster backend: the coordinator loop, control messages with the members over
 * the cluster link (ctrl/link.h: MPI, or UCX for instances that join over the network), membership
 * (joins, losses, leaves), heartbeats, the front end's slots (admission, cancel, status, health),
 * start-up and drain. The front end's threads only fill an inbox; the loop does the rest (request
 * delivery: cluster_requests.c; instances and placement: cluster_sched.c). */
#include "coordinator/cluster.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/cluster_internal.h"
#include "ctrl/inbox.h"
#include "ctrl/sampling_pb.h"



inst_t *moe_cluster_inst_of_rank(moe_cluster *c, int rank)
{
    return rank > 0 && rank < c->n_members && c->rank_inst[rank] >= 0
               ? &c->inst[c->rank_inst[rank]]
               : NULL;
}

/* Grows the per-member arrays to hold member m (joins bring new ids). */
static bool ensure_member(moe_cluster *c, int m)
{
    if (m < c->n_members)
        return true;
    int n = c->n_members ? c->n_members : 16;
    while (n <= m)
        n *= 2;
    int *ri = realloc(c->rank_inst, (size_t)n * sizeof *ri);
    if (ri)
        c->rank_inst = ri;
    bool *rr = realloc(c->rank_ready, (size_t)n * sizeof *rr);
    if (rr)
        c->rank_ready = rr;
    bool *rb = realloc(c->rank_bye, (size_t)n * sizeof *rb);
    if (rb)
        c->rank_bye = rb;
    if (!ri || !rr || !rb)
        return false;
    for (int i = c->n_members; i < n; i++) {
        c->rank_inst[i] = -1;
        c->rank_ready[i] = c->rank_bye[i] = false;
    }
    c->n_members = n;
    return true;
}

moe_status moe_cluster_send(moe_cluster *c, int dest, int tag, const ProtobufCMessage *m)
{
    return moe_link_send(c->link, dest, tag, m);
}

void moe_cluster_send_free(moe_cluster *c, int inst, uint64_t id)
{
    if (inst < 0 || c->inst[inst].state == MOE_INSTANCE_UNREACHABLE)
        return;
    Moeserve__Cluster__V1__FreeSeqs f;
    moeserve__cluster__v1__free_seqs__init(&f);
    f.n_seq_ids = 1;
    f.seq_ids = &id;
    if (moe_cluster_send(c, c->inst[inst].lead, TAG(FREE), &f.base) != MOE_OK)
        MOE_LOG_E("free seq %llu: %s", (unsigned long long)id, moe_error_message());
}

static void lose_instance(moe_cluster *c, int idx, const char *why);

/* ---- messages from workers ---- */

static void on_ready_msg(moe_cluster *c, int src, const Moeserve__Cluster__V1__WorkerReady *m)
{
    c->rank_ready[src] = true;
    inst_t *in = moe_cluster_inst_of_rank(c, src);
    if (!m->ok) {
        MOE_LOG_E("rank %d failed to start: %s", src, m->error);
        if (in && c->elastic)
            lose_instance(c, (int)(in - c->inst), "failed to start");
        else if (in) {
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
    in->expert_begin = m->expert_begin;
    in->expert_end = m->expert_end;
    in->ep_group_size = 0;
    for (size_t j = 0; j < m->n_ep_group_ranks && j < MOE_FRONTEND_MAX_EP; j++)
        in->ep_group_ranks[in->ep_group_size++] = (int32_t)m->ep_group_ranks[j];
    c->moe_layers = m->n_layers;
    c->moe_experts = m->n_experts;
    pthread_mutex_unlock(&c->mu);
    MOE_LOG_I("rank %d ready: %s instance %d, KV %u blocks x %u tokens, warm-up %.0f ms", src,
              moe_pool_name(in->def.pool), c->rank_inst[src], m->kv_blocks_total,
              m->kv_block_tokens, m->warmup_ms);
    if (c->elastic)
        moe_cluster_inst_update_usable(c); /* it takes requests from now on */
}

static void on_heartbeat(moe_cluster *c, int src, const Moeserve__Cluster__V1__Heartbeat *m,
                         bool bye)
{
    if (bye)
        c->rank_bye[src] = true;
    inst_t *in = moe_cluster_inst_of_rank(c, src);
    if (!in)
        return;
    moe_cluster_inst_apply_load(c, in, m->load);
    if (m->counters) {
        pthread_mutex_lock(&c->mu);
        in->ctr = *m->counters;
        pthread_mutex_unlock(&c->mu);
    }
    if (m->n_expert_tokens) {
        pthread_mutex_lock(&c->mu);
        if (in->n_expert_tokens != m->n_expert_tokens) {
            uint64_t *grown = realloc(in->expert_tokens, m->n_expert_tokens * sizeof *grown);
            if (grown) {
                in->expert_tokens = grown;
                in->n_expert_tokens = (uint32_t)m->n_expert_tokens;
            }
        }
        if (in->n_expert_tokens == m->n_expert_tokens)
            memcpy(in->expert_tokens, m->expert_tokens, m->n_expert_tokens * sizeof *in->expert_tokens);
        pthread_mutex_unlock(&c->mu);
    }
}

static void on_tokens(moe_cluster *c, int src, const Moeserve__Cluster__V1__TokenBatch *m)
{
    inst_t *in = moe_cluster_inst_of_rank(c, src);
    if (in)
        moe_cluster_inst_apply_load(c, in, m->load);
    int delivered = 0;
    for (size_t i = 0; i < m->n_events; i++) {
        const Moeserve__Cluster__V1__TokenEvent *e = m->events[i];
        creq *r = moe_cluster_req_find(c, e->seq_id);
        /* Only the request's current placement speaks for it: a late token of a placement it
         * left (resumed elsewhere) is dropped; a migration's destination may speak before its
         * source's MigrateEnd arrives. */
        int from = in ? (int)(in - c->inst) : -1;
        bool placed = r && (from == r->pi || from == r->di || (r->mig.id && from == r->mig.dst));
        if (r && r->state != RQ_QUEUED && placed) {
            moe_token_logprobs lp;
            bool has_lp = moe_token_logprobs_from_pb(e, &lp);
            moe_cluster_req_deliver(c, r, e->index, e->token, e->finish, has_lp ? &lp : NULL);
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
 * streamed token: link hop, detokenization, stop strings, hand-over to the gRPC threads). */
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
    MOE_LOG_I("%s: token path worker -> front end over the last %zu tokens: p50 %.0f us, p90 %.0f "
              "us, p99 %.0f us, "
              "max %.0f us",
              when, n, v[n / 2], v[n * 9 / 10], v[n * 99 / 100], v[n - 1]);
    free(v);
}

static void on_seq_event(moe_cluster *c, int src, const Moeserve__Cluster__V1__SeqEvent *m)
{
    creq *r = moe_cluster_req_find(c, m->seq_id);
    switch (m->kind) {
    case EVENT(FAILED):
        if (r) {
            moe_status code = m->status > 0 && m->status < MOE_STATUS_COUNT ? (moe_status)m->status
                                                                            : MOE_ERR_INTERNAL;
            char msg[512];
            snprintf(msg, sizeof msg, "rank %d: %s", src, m->message);
            moe_cluster_req_fail(c, r, code, msg);
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
                      (unsigned long long)m->transfer_bytes, (double)m->transfer_ns * 1e-6,
                      m->attempts);
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

/* ---- membership (elastic clusters: ctrl/link_ucx.h) ---- */

static moe_pool_kind pool_of_role(Moeserve__Cluster__V1__Role r)
{
    return r == MOESERVE__CLUSTER__V1__ROLE__ROLE_PREFILL  ? MOE_POOL_PREFILL
           : r == MOESERVE__CLUSTER__V1__ROLE__ROLE_DECODE ? MOE_POOL_DECODE
                                                           : MOE_POOL_MIXED;
}

/* A rank passed the token check: it becomes a placement target (STARTING until WorkerReady). */
static void on_joined(moe_cluster *c, int m, const uint8_t *buf, size_t len)
{
    Moeserve__Cluster__V1__Join *j = moeserve__cluster__v1__join__unpack(NULL, len, buf);
    const char *refuse = NULL;
    char why[160];
    if (!j)
        refuse = "its Join message is malformed";
    else if (j->role < MOESERVE__CLUSTER__V1__ROLE__ROLE_PREFILL ||
             j->role > MOESERVE__CLUSTER__V1__ROLE__ROLE_MIXED)
        refuse = "its Join names no pool";
    else if (c->n_inst >= MOE_FRONTEND_MAX_INSTANCES)
        refuse = "the cluster has no room for more instances";
    else if (!ensure_member(c, m))
        refuse = "out of memory";
    else {
        moe_pool_kind pool = pool_of_role(j->role);
        bool live_disagg = false, live_mixed = false;
        for (int i = 0; i < c->n_inst; i++) {
            if (c->inst[i].state == MOE_INSTANCE_UNREACHABLE)
                continue;
            live_mixed |= c->inst[i].def.pool == MOE_POOL_MIXED;
            live_disagg |= c->inst[i].def.pool != MOE_POOL_MIXED;
        }
        if ((pool == MOE_POOL_MIXED && live_disagg) || (pool != MOE_POOL_MIXED && live_mixed)) {
            snprintf(why, sizeof why, "a %s instance cannot join a %s cluster",
                     moe_pool_name(pool), live_mixed ? "colocated" : "disaggregated");
            refuse = why;
        }
    }
    if (refuse) {
        MOE_LOG_W("member %d (%s) refused: %s", m, moe_link_host(c->link, m), refuse);
        moe_link_fence(c->link, m);
        if (j)
            moeserve__cluster__v1__join__free_unpacked(j, NULL);
        return;
    }
    pthread_mutex_lock(&c->mu);
    int idx = c->n_inst;
    inst_t *in = &c->inst[idx];
    memset(in, 0, sizeof *in);
    in->def.pool = pool_of_role(j->role);
    in->def.ep_size = 1;
    in->def.ranks[0] = m;
    in->lead = m;
    in->state = MOE_INSTANCE_STARTING;
    in->last_seen = moe_now_ns();
    atomic_init(&in->mig.drain, false);
    snprintf(in->uuid, sizeof in->uuid, "%s", j->instance_uuid);
    snprintf(in->host, sizeof in->host, "%s", *j->host ? j->host : moe_link_host(c->link, m));
    c->rank_inst[m] = idx;
    c->n_inst++;
    c->n_joins++;
    c->disagg = in->def.pool != MOE_POOL_MIXED;
    pthread_mutex_unlock(&c->mu);
    MOE_LOG_I("member %d joined from %s: %s instance %d (rank %u of %u of %s)", m, in->host,
              moe_pool_name(in->def.pool), idx, j->ep_rank, j->ep_size, in->uuid);
    moeserve__cluster__v1__join__free_unpacked(j, NULL);
}

/* Fences every target of the instance (mpirun job) that target idx belongs to: an
 * expert-parallel instance is lost whole, since its ranks step together. */
/* The next live target after i (start at -1) of the instance (mpirun job) target idx belongs to,
 * idx included; -1 after the last. */
static int next_of_instance(const moe_cluster *c, int idx, int i)
{
    const char *uuid = c->inst[idx].uuid;
    while (++i < c->n_inst) {
        const inst_t *in = &c->inst[i];
        if (in->state != MOE_INSTANCE_UNREACHABLE && (i == idx || (*uuid && !strcmp(in->uuid, uuid))))
            return i;
    }
    return -1;
}

static void lose_instance(moe_cluster *c, int idx, const char *why)
{
    for (int i = next_of_instance(c, idx, -1); i >= 0; i = next_of_instance(c, idx, i)) {
        inst_t *in = &c->inst[i];
        if (c->elastic)
            moe_link_fence(c->link, in->lead); /* its late messages are dropped from here on */
        moe_cluster_inst_lost(c, i, why);
    }
}

static void on_member_lost(moe_cluster *c, int m)
{
    inst_t *in = moe_cluster_inst_of_rank(c, m);
    if (!in || in->state == MOE_INSTANCE_UNREACHABLE)
        return;
    lose_instance(c, (int)(in - c->inst), in->leave_ns ? "left" : "is gone: its connection failed");
}

/* The instance asked to leave (SIGTERM): no new requests, its running ones migrate away (the
 * migration policy drains it); check_leaving sends Shutdown once nothing depends on it. */
static void on_leave(moe_cluster *c, int src, const Moeserve__Cluster__V1__Leave *m)
{
    inst_t *from = moe_cluster_inst_of_rank(c, src);
    if (!from)
        return;
    int64_t now = moe_now_ns();
    int idx = (int)(from - c->inst);
    for (int i = next_of_instance(c, idx, -1); i >= 0; i = next_of_instance(c, idx, i)) {
        inst_t *in = &c->inst[i];
        if (in->leave_ns)
            continue;
        in->leave_ns = now;
        atomic_store(&in->mig.drain, true);
        MOE_LOG_I("%s instance %d (member %d) leaves (%s): draining it", moe_pool_name(in->def.pool),
                  i, in->lead, m->reason);
    }
    c->wake = true;
}

/* Whether a request still needs target idx (one walk of the table, only while idx leaves). */
static bool has_dependents(moe_cluster *c, int idx)
{
    for (int b = 0; b < N_BUCKETS; b++)
        for (const creq *r = c->buckets[b]; r; r = r->hnext)
            if (moe_cluster_req_depends_on(r, idx))
                return true;
    return false;
}

/* Leaving instances whose last request moved or finished (or whose drain timed out: what is left
 * goes on elsewhere) are told to shut down. */
static void check_leaving(moe_cluster *c, int64_t now)
{
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        if (!in->leave_ns || in->state == MOE_INSTANCE_UNREACHABLE)
            continue;
        bool late = (double)(now - in->leave_ns) * 1e-9 > c->o.drain_timeout_s;
        if (!late && (in->mig.out > 0 || in->mig.in > 0 || has_dependents(c, i)))
            continue;
        Moeserve__Cluster__V1__Shutdown m;
        moeserve__cluster__v1__shutdown__init(&m);
        m.reason = (char *)"left the cluster";
        if (moe_cluster_send(c, in->lead, TAG(SHUTDOWN), &m.base) != MOE_OK)
            MOE_LOG_W("shutdown of member %d: %s", in->lead, moe_error_message());
        MOE_LOG_I("%s instance %d (member %d) %s: shutting it down", moe_pool_name(in->def.pool),
                  i, in->lead, late ? "did not drain in time" : "is drained");
        moe_cluster_inst_lost(c, i, "left the cluster");
    }
}

/* ---- the inbox: what instances' ranks send ---- */

static bool in_ready(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    on_ready_msg(self, src, (const Moeserve__Cluster__V1__WorkerReady *)m);
    return false;
}

static bool in_heartbeat(void *self, int src, int tag, ProtobufCMessage *m)
{
    on_heartbeat(self, src, (const Moeserve__Cluster__V1__Heartbeat *)m, tag == TAG(BYE));
    return false;
}

static bool in_tokens(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    on_tokens(self, src, (const Moeserve__Cluster__V1__TokenBatch *)m);
    return false;
}

static bool in_seq_event(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    on_seq_event(self, src, (const Moeserve__Cluster__V1__SeqEvent *)m);
    return false;
}

static bool in_migrate_end(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    moe_cluster_mig_on_end(self, src, (const Moeserve__Cluster__V1__MigrateEnd *)m);
    return false;
}

static bool in_leave(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    on_leave(self, src, (const Moeserve__Cluster__V1__Leave *)m);
    return false;
}

static const moe_inbox_kind COORDINATOR_INBOX[] = {
    {TAG(WORKER_READY), &moeserve__cluster__v1__worker_ready__descriptor, in_ready},
    {TAG(HEARTBEAT), &moeserve__cluster__v1__heartbeat__descriptor, in_heartbeat},
    {TAG(BYE), &moeserve__cluster__v1__heartbeat__descriptor, in_heartbeat}, /* the last one */
    {TAG(TOKENS), &moeserve__cluster__v1__token_batch__descriptor, in_tokens},
    {TAG(SEQ_EVENT), &moeserve__cluster__v1__seq_event__descriptor, in_seq_event},
    {TAG(MIGRATE_END), &moeserve__cluster__v1__migrate_end__descriptor, in_migrate_end},
    {TAG(LEAVE), &moeserve__cluster__v1__leave__descriptor, in_leave},
};

static void handle_msg(moe_cluster *c, int src, int tag, const uint8_t *buf, size_t len)
{
    inst_t *in = moe_cluster_inst_of_rank(c, src);
    if (in && in->state != MOE_INSTANCE_UNREACHABLE) {
        pthread_mutex_lock(&c->mu);
        in->last_seen = moe_now_ns();
        pthread_mutex_unlock(&c->mu);
    }
    if (moe_inbox_deliver(COORDINATOR_INBOX, sizeof COORDINATOR_INBOX / sizeof *COORDINATOR_INBOX, c, src, tag,
                          buf, len) == MOE_INBOX_UNKNOWN)
        MOE_LOG_W("unexpected control tag %d from rank %d", tag, src);
}

/* Takes up to 256 waiting events (then the loop serves its inbox before taking more). */
static int drain_link(moe_cluster *c)
{
    int n = 0;
    moe_link_event ev;
    while (n < 256 && moe_link_poll(c->link, &ev)) {
        n++;
        switch (ev.kind) {
        case MOE_LINK_MSG:
            if (ensure_member(c, ev.src))
                handle_msg(c, ev.src, ev.tag, ev.buf, ev.len);
            break;
        case MOE_LINK_JOINED:
            on_joined(c, ev.src, ev.buf, ev.len);
            break;
        case MOE_LINK_LOST:
            on_member_lost(c, ev.src);
            break;
        }
    }
    return n;
}

/* ---- front end slots ---- */

static moe_status be_submit(void *ctx, const moe_gen_request *req, moe_frontend_req *stream,
                            uint64_t *handle)
{
    moe_cluster *c = ctx;
    creq *r = calloc(1, sizeof *r);
    if (!r)
        return moe_error(MOE_ERR_NOMEM, "out of memory for a request");
    moe_status st = MOE_OK;
    pthread_mutex_lock(&c->mu);
    if (c->draining || c->stopped)
        st =
            moe_error(MOE_ERR_UNAVAILABLE, "the server is shutting down and takes no new requests");
    else if (!c->ready)
        st = moe_error(MOE_ERR_UNAVAILABLE,
                       "the cluster is still starting (workers are loading the model)");
    else if (!c->usable)
        st = moe_error(MOE_ERR_UNAVAILABLE, "no %s instance is reachable",
                       c->disagg ? "prefill or decode" : "worker");
    else if (c->n_active >= c->o.max_requests)
        st = moe_error(MOE_ERR_FULL,
                       "%d requests are in flight, the server's limit (--max-requests %d)",
                       c->n_active, c->o.max_requests);
    else if (c->n_queued >= c->o.max_queue)
        st = moe_error(MOE_ERR_FULL, "%d requests are queued, the queue's limit (--max-queue %d)",
                       c->n_queued, c->o.max_queue);
    else if (c->cache_tokens > 0 && (int64_t)req->n_prompt + req->max_new_tokens > c->cache_tokens)
        st = moe_error(MOE_ERR_INVALID_ARG,
                       "GenerateRequest.max_new_tokens: a prompt of %u tokens + %u new tokens do "
                       "not fit the KV "
                       "cache of an instance (%d tokens; see --kv-blocks / --kv-mb)",
                       req->n_prompt, req->max_new_tokens, c->cache_tokens);
    if (st == MOE_OK &&
        !moe_grow((void **)&c->in_sub, &c->cap_in_sub, c->n_in_sub + 1, sizeof *c->in_sub))
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
    if (moe_grow((void **)&c->in_cancel, &c->cap_in_cancel, c->n_in_cancel + 1,
                         sizeof *c->in_cancel))
        c->in_cancel[c->n_in_cancel++] = handle;
    else
        MOE_LOG_E("out of memory: cancel of request %llu lost", (unsigned long long)handle);
    c->wake = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static moe_status be_tokenize(void *ctx, const char *text, size_t len, bool add_special,
                              int32_t *ids, size_t cap, size_t *n_out)
{
    moe_cluster *c = ctx;
    return moe_tokenizer_encode(c->o.tok, text, len, add_special, ids, cap, n_out);
}

void moe_cluster_snapshot(moe_cluster *c, moe_cluster_status *out)
{
    int64_t now = moe_now_ns();
    pthread_mutex_lock(&c->mu);
    snprintf(out->model, sizeof out->model, "%s", c->model_name);
    out->moe_layers = c->moe_layers;
    out->moe_experts = c->moe_experts;
    out->world_size = (uint32_t)c->o.world_size;
    out->n_instances =
        (uint32_t)(c->n_inst < MOE_FRONTEND_MAX_INSTANCES ? c->n_inst : MOE_FRONTEND_MAX_INSTANCES);
    moe_cluster_counters *k = &out->counters;
    for (uint32_t i = 0; i < out->n_instances; i++) {
        const inst_t *in = &c->inst[i];
        moe_instance_status *s = &out->instances[i];
        s->id = i;
        s->pool = in->def.pool;
        s->state = ((c->draining || atomic_load(&in->mig.drain)) && in->state == MOE_INSTANCE_READY)
                       ? MOE_INSTANCE_DRAINING
                       : in->state;
        s->ep_size = (uint32_t)in->def.ep_size;
        for (int j = 0; j < in->def.ep_size && j < MOE_FRONTEND_MAX_EP; j++)
            s->ranks[j] = in->def.ranks[j];
        s->kv_blocks_total = in->kv_total;
        s->kv_blocks_used = in->kv_used;
        s->kv_blocks_free = in->kv_total > in->kv_used ? in->kv_total - in->kv_used : 0;
        long committed = moe_cluster_inst_kv_committed(in);
        s->kv_blocks_committed = committed > 0 ? (uint32_t)committed : 0;
        s->kv_block_tokens = in->block_tokens;
        s->running = in->running;
        s->waiting = in->waiting;
        s->pending_prompt_tokens = in->pending_tokens;
        s->heartbeat_age_ms = in->last_seen ? (double)(now - in->last_seen) * 1e-6 : -1.0;
        s->expert_begin = in->expert_begin;
        s->expert_end = in->expert_end;
        s->ep_group_size = in->ep_group_size;
        memcpy(s->ep_group_ranks, in->ep_group_ranks, sizeof s->ep_group_ranks);
        s->expert_tokens = NULL;
        s->n_expert_tokens = 0;
        if (in->n_expert_tokens &&
            (s->expert_tokens = malloc(in->n_expert_tokens * sizeof *s->expert_tokens))) {
            memcpy(s->expert_tokens, in->expert_tokens, in->n_expert_tokens * sizeof *s->expert_tokens);
            s->n_expert_tokens = in->n_expert_tokens;
        }
        k->kv_transfers += in->ctr.kv_transfers;
        k->kv_transfer_bytes += in->ctr.kv_transfer_bytes;
        k->kv_transfer_retries += in->ctr.kv_transfer_retries;
        k->kv_transfer_recomputes += in->ctr.kv_transfer_recomputes;
        k->kv_checksum_failures += in->ctr.kv_checksum_failures;
        k->kv_transfer_timeouts += in->ctr.kv_transfer_timeouts;
        k->kv_lease_expirations += in->ctr.kv_lease_expirations;
        k->kv_transfers_layerwise += in->ctr.kv_transfers_layerwise;
        k->kv_pulls_waited += in->ctr.kv_pulls_waited;
        k->preemptions += in->ctr.preemptions;
        snprintf(s->host, sizeof s->host, "%s", in->host);
    }
    k->instance_joins = c->n_joins;
    k->instance_losses = c->n_losses;
    k->requests_resumed = c->n_resumed;
    k->prefills_shared = c->n_prefills_shared;
    moe_cluster_mig_snapshot(c, out);
    pthread_mutex_unlock(&c->mu);
}

static moe_status be_cluster_status(void *ctx, moe_cluster_status *out)
{
    moe_cluster_snapshot(ctx, out);
    return MOE_OK;
}

static moe_status be_drain_instance(void *ctx, uint32_t instance, bool undo,
                                    moe_instance_status *out)
{
    return moe_cluster_drain_instance(ctx, instance, undo, out);
}

static bool be_healthy(void *ctx)
{
    moe_cluster *c = ctx;
    pthread_mutex_lock(&c->mu);
    bool ok = c->ready && c->usable && !c->draining && !c->stopped;
    /* mpirun: one failure domain, so any unreachable rank means trouble. Elastic: lost instances
     * are gone for good and the rest serve. */
    for (int i = 0; ok && !c->elastic && i < c->n_inst; i++)
        ok = c->inst[i].state == MOE_INSTANCE_READY;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

void moe_cluster_backend(moe_cluster *c, moe_frontend_backend *out)
{
    *out = (moe_frontend_backend){.ctx = c,
                                  .submit = be_submit,
                                  .cancel = be_cancel,
                                  .tokenize = be_tokenize,
                                  .cluster_status = be_cluster_status,
                                  .healthy = be_healthy,
                                  .drain_instance = be_drain_instance};
}

/* ---- life cycle ---- */

moe_status moe_cluster_create(const moe_cluster_opts *opts, moe_cluster **out)
{
    if ((!opts->elastic && (opts->n_instances <= 0 || opts->world_size < 2)) || !opts->link ||
        opts->max_requests <= 0 ||
        opts->max_queue < 0 || opts->heartbeat_timeout_ms <= 0 || opts->startup_timeout_ms <= 0)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "cluster: %d instances over %d ranks, limits %d/%d, timeouts %d/%d ms",
                         opts->n_instances, opts->world_size, opts->max_requests, opts->max_queue,
                         opts->heartbeat_timeout_ms, opts->startup_timeout_ms);
    moe_cluster *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "cluster: out of memory");
    c->o = *opts;
    c->link = opts->link;
    c->elastic = opts->elastic;
    snprintf(c->model_name, sizeof c->model_name, "%s", opts->model_name ? opts->model_name : "");
    c->n_inst = opts->elastic ? 0 : opts->n_instances;
    /* Elastic: room for every instance that may join (targets are never moved: the front end
     * reads them under mu, requests name them by index). */
    c->inst = calloc((size_t)(opts->elastic ? MOE_FRONTEND_MAX_INSTANCES : c->n_inst), sizeof *c->inst);
    c->spares = calloc((size_t)(opts->n_spare ? opts->n_spare : 1), sizeof *c->spares);
    if (!c->inst || !c->spares || !ensure_member(c, opts->elastic ? 16 : opts->world_size - 1)) {
        moe_cluster_free(c);
        return moe_error(MOE_ERR_NOMEM, "cluster: out of memory");
    }
    for (int i = 0; i < c->n_inst; i++) {
        inst_t *in = &c->inst[i];
        in->def = opts->instances[i];
        atomic_init(&in->mig.drain, false);
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
    moe_cluster_mig_init(c);
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
            moe_cluster_req_fail(c, c->buckets[b], MOE_ERR_UNAVAILABLE,
                                 "the server is shutting down");
    for (int i = 0; i < c->n_in_sub; i++) {
        moe_frontend_error(c->in_sub[i]->stream, MOE_ERR_UNAVAILABLE,
                           "the server is shutting down");
        free(c->in_sub[i]);
    }
    moe_cluster_mig_free(c);
    free(c->lat);
    free(c->in_sub);
    free(c->in_cancel);
    for (int i = 0; c->inst && i < c->n_inst; i++)
        free(c->inst[i].expert_tokens);
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

/* The choices of one client request (prefill_group) are taken together, so that dispatch can
 * give them one prefill: members of a group not complete yet go back to the inbox (the others
 * are being submitted this moment), for at most 200 ms (a loaded machine can pause the
 * submitting thread for tens of ms). Not while cancels are pending (a cancel finds only requests
 * taken in). With mu held; returns how many of subs to take now. */
static int hold_incomplete_groups(moe_cluster *c, creq **subs, int ns)
{
    int64_t now = moe_now_ns();
    int keep = 0;
    for (int i = 0; i < ns; i++) {
        const moe_gen_request *q = subs[i]->req;
        uint32_t have = 0;
        for (int j = 0; q->prefill_group && j < ns; j++)
            have += subs[j]->req->prefill_group == q->prefill_group;
        bool hold = q->prefill_group && have < q->prefill_group_n &&
                    now - q->arrival_ns < 200 * 1000000LL &&
                    moe_grow((void **)&c->in_sub, &c->cap_in_sub, c->n_in_sub + 1, sizeof *c->in_sub);
        if (hold)
            c->in_sub[c->n_in_sub++] = subs[i];
        else
            subs[keep++] = subs[i];
    }
    return keep;
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
    if (ns && !c->n_in_cancel)
        ns = hold_incomplete_groups(c, subs, ns);
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
        r->hnext = c->buckets[CREQ_HANDLE(r->id) % N_BUCKETS];
        c->buckets[CREQ_HANDLE(r->id) % N_BUCKETS] = r;
        if (!r->dt || !r->stop) {
            moe_cluster_req_fail(c, r, MOE_ERR_NOMEM, "out of memory for the detokenizer");
            continue;
        }
        moe_cluster_sched_enqueue(c, r);
    }
    for (int i = 0; i < nc; i++) {
        creq *r = moe_cluster_req_find_handle(c, cancels[i]);
        if (r) {
            MOE_LOG_D("request %s cancelled by the client", r->req->request_id);
            moe_cluster_req_fail(c, r, MOE_ERR_CANCELLED, "cancelled");
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
static moe_status await_workers(moe_cluster *c)
{
    int64_t deadline = moe_now_ns() + (int64_t)c->o.startup_timeout_ms * 1000000;
    int64_t idle = 0;
    for (;;) {
        bool busy = drain_link(c) > 0;
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
                return moe_error(MOE_ERR_UNAVAILABLE,
                                 "rank %d (%s instance %d) failed to start; see its log",
                                 c->inst[i].lead, moe_pool_name(c->inst[i].def.pool), i);
        if (!missing)
            return MOE_OK;
        if (moe_now_ns() > deadline)
            return moe_error(MOE_ERR_UNAVAILABLE,
                             "%d worker rank(s) not ready after %d ms (first: rank %d)", missing,
                             c->o.startup_timeout_ms, first_missing);
        if (c->o.drain_flag && *c->o.drain_flag)
            return moe_error(MOE_ERR_CANCELLED, "interrupted while the workers were starting");
        moe_link_progress(c->link);
        idle = busy ? 0 : idle ? (idle * 2 > 20000000 ? 20000000 : idle * 2) : 100000;
        if (idle)
            moe_sleep_ns(idle);
    }
}

moe_status moe_cluster_run(moe_cluster *c)
{
    moe_status st = c->elastic ? MOE_OK : await_workers(c); /* elastic: instances come later */
    if (st != MOE_OK)
        return st;
    moe_cluster_inst_update_usable(c);
    pthread_mutex_lock(&c->mu);
    c->ready = true;
    pthread_mutex_unlock(&c->mu);
    if (c->o.on_ready)
        c->o.on_ready(c->o.on_ready_ctx, c);

    int64_t idle = 0, next_check = 0;
    for (;;) {
        bool busy = take_inbox(c);
        busy |= drain_link(c) > 0;
        moe_cluster_sched_dispatch(c);
        int64_t now = moe_now_ns();
        busy |= moe_cluster_mig_tick(c, now);
        moe_link_progress(c->link);
        /* Liveness is judged from what each member last said, over time this loop ran: after a
         * stall of the coordinator itself (CPU starvation, SIGSTOP, a VM pause) every member gets
         * a fresh window to speak before anyone is fenced. */
        if (c->last_turn && now - c->last_turn > 1000000000) {
            MOE_LOG_W("the coordinator loop stalled for %.1f s: members get a fresh heartbeat window",
                      (double)(now - c->last_turn) * 1e-9);
            for (int i = 0; i < c->n_inst; i++)
                if (c->inst[i].last_seen)
                    c->inst[i].last_seen = now;
        }
        c->last_turn = now;
        if (now >= next_check) {
            next_check = now + 20000000;
            for (int i = 0; i < c->n_inst; i++) {
                inst_t *in = &c->inst[i];
                double silent = (double)(now - in->last_seen) * 1e-9;
                bool watched = in->state == MOE_INSTANCE_READY ||
                               (c->elastic && in->state == MOE_INSTANCE_STARTING && in->ready_seen);
                if (watched && silent * 1000.0 > c->o.heartbeat_timeout_ms) {
                    char why[96];
                    snprintf(why, sizeof why, "stopped answering: no heartbeat for %.1f s", silent);
                    lose_instance(c, i, why);
                }
            }
            if (c->elastic)
                check_leaving(c, now);
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
                        moe_cluster_req_fail(c, c->buckets[b], MOE_ERR_UNAVAILABLE,
                                             "the server is shutting down");
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
         * grows to 250 us while requests are in flight (tokens arrive by the link, which has no
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
    return MOE_OK;
}

moe_status moe_cluster_shutdown_workers(moe_cluster *c, int timeout_ms)
{
    if (c->elastic) {
        /* Instances are failure domains of their own: they outlive this coordinator and rejoin
         * the next one. Only what is queued for them is flushed. */
        moe_link_flush(c->link, timeout_ms < 2000 ? timeout_ms : 2000);
        return MOE_OK;
    }
    Moeserve__Cluster__V1__Shutdown m;
    moeserve__cluster__v1__shutdown__init(&m);
    m.reason = (char *)"coordinator shutdown";
    for (int r = 1; r < c->o.world_size; r++) {
        inst_t *in = moe_cluster_inst_of_rank(c, r);
        if (in && in->state == MOE_INSTANCE_UNREACHABLE && in->ready_seen)
            continue; /* hung: it would never answer */
        if (moe_cluster_send(c, r, TAG(SHUTDOWN), &m.base) != MOE_OK)
            MOE_LOG_E("shutdown of rank %d: %s", r, moe_error_message());
    }
    int64_t deadline = moe_now_ns() + (int64_t)timeout_ms * 1000000;
    int missing;
    for (;;) {
        drain_link(c);
        moe_link_progress(c->link);
        missing = 0;
        for (int r = 1; r < c->o.world_size; r++) {
            inst_t *in = moe_cluster_inst_of_rank(c, r);
            missing +=
                !c->rank_bye[r] && !(in && in->state == MOE_INSTANCE_UNREACHABLE && in->ready_seen);
        }
        if (!missing || moe_now_ns() > deadline)
            break;
        moe_sleep_ns(200000);
    }
    missing = 0; /* hung ranks count again: they would block MPI_Finalize */
    for (int r = 1; r < c->o.world_size; r++)
        missing += !c->rank_bye[r];
    if (missing) {
        char list[256] = "";
        size_t off = 0;
        for (int r = 1; r < c->o.world_size && off < sizeof list - 8; r++)
            if (!c->rank_bye[r])
                off += (size_t)snprintf(list + off, sizeof list - off, "%s%d", off ? "," : "", r);
        return moe_error(MOE_ERR_UNAVAILABLE,
                         "rank(s) %s did not acknowledge the shutdown within %d ms", list,
                         timeout_ms);
    }
    return MOE_OK;
}
