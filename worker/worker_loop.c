/* A worker rank's main loop: control messages from the coordinator and peer workers, engine
 * steps with one batched token report each, heartbeats, and both sides of the KV pull (prefill:
 * park, offer, send on pull, free on done or lease expiry; decode: reserve, post receives, pull,
 * verify, retry once, recompute as the last resort). Polls MPI: Open MPI has no progress thread,
 * so this loop is what moves every non-blocking transfer; idle, it sleeps in short growing naps
 * instead of spinning a core. */
#include "worker/worker_loop.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cluster.pb-c.h"
#include "common/clock.h"
#include "common/log.h"
#include "worker/comm_mpi.h"
#include "worker/kv_transfer.h"
#include "worker/model.h"

typedef Moeserve__Cluster__V1__StartSeq pb_start;
typedef Moeserve__Cluster__V1__FreeSeqs pb_free;
typedef Moeserve__Cluster__V1__KvOffer pb_offer;
typedef Moeserve__Cluster__V1__KvPull pb_pull;
typedef Moeserve__Cluster__V1__KvHeader pb_header;
typedef Moeserve__Cluster__V1__KvDone pb_done;
typedef Moeserve__Cluster__V1__KvGone pb_gone;
typedef Moeserve__Cluster__V1__SeqState pb_state;
typedef Moeserve__Cluster__V1__Load pb_load;
typedef Moeserve__Cluster__V1__Counters pb_counters;
typedef Moeserve__Cluster__V1__SeqEvent pb_seq_event;

#define TAG(x) MOESERVE__CLUSTER__V1__TAG__TAG_##x
#define EVENT(x) MOESERVE__CLUSTER__V1__SEQ_EVENT__KIND__KIND_##x

/* ---- control link: protobuf messages over MPI, sent non-blocking, buffers kept until done ---- */
typedef struct {
    MPI_Request r;
    uint8_t *buf;
} out_msg;

typedef struct {
    MPI_Comm comm;
    out_msg *v;
    int n, cap;
} outbox;

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

static moe_status ob_send(outbox *ob, int dest, int tag, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    if (len > INT_MAX)
        return moe_error(MOE_ERR_RANGE, "control message %s of %zu bytes is too large", m->descriptor->name, len);
    if (!grow((void **)&ob->v, &ob->cap, ob->n + 1, sizeof *ob->v))
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "control message: out of memory");
    protobuf_c_message_pack(m, buf);
    out_msg *o = &ob->v[ob->n];
    moe_status st = MOE_MPI_CHECK(MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, ob->comm, &o->r));
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    o->buf = buf;
    ob->n++;
    return MOE_OK;
}

static void ob_progress(outbox *ob)
{
    for (int i = 0; i < ob->n;) {
        int flag = 0;
        MPI_Test(&ob->v[i].r, &flag, MPI_STATUS_IGNORE);
        if (flag) {
            free(ob->v[i].buf);
            ob->v[i] = ob->v[--ob->n];
        } else {
            i++;
        }
    }
}

static void nap(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    nanosleep(&ts, NULL);
}

/* Waits (polling) for every queued message to leave, up to timeout_ms. */
static void ob_flush(outbox *ob, int timeout_ms)
{
    int64_t end = moe_now_ns() + (int64_t)timeout_ms * 1000000;
    while (ob->n > 0 && moe_now_ns() < end) {
        ob_progress(ob);
        if (ob->n)
            nap(100000);
    }
    for (int i = 0; i < ob->n; i++) {
        MPI_Cancel(&ob->v[i].r);
        MPI_Request_free(&ob->v[i].r);
        /* the buffer leaks on purpose: MPI may still read it */
    }
    ob->n = 0;
}

/* ---- worker state ---- */

/* Prefill side: a prefill-only sequence from StartSeq until its KV is freed. */
typedef struct {
    uint64_t seq_id;
    int decode_rank;
    bool parked;            /* first token sampled, offer sent */
    bool freed;             /* coordinator freed it while blocks were in flight */
    int64_t lease_deadline; /* parked, no send in flight: freed at this time */
    moe_kv_send *send;
    int64_t send_deadline;
} park_t;

/* Decode side: an offered sequence until it is imported and resumed (or dropped). */
typedef enum { PULL_WAIT_ROOM = 0, PULL_RECEIVING } pull_phase;

typedef struct {
    uint64_t seq_id;
    int src;
    pb_offer *offer; /* owned (unpacked) */
    pull_phase phase;
    int attempt;
    uint32_t xfer_id;
    moe_kv_recv *recv;
    int64_t t0;          /* first pull sent */
    int64_t next_renew;
    int64_t not_before;  /* test hook: pull delay */
    bool cancelled;      /* freed while receiving: dropped once the receive ends */
    bool imported;
} pull_t;

/* Decode side: a seq freed before its offer arrived (the offer must then be refused). */
typedef struct {
    uint64_t seq_id;
    int64_t until;
} tomb_t;

typedef struct {
    const moe_worker_opts *o;
    int rank;
    moe_model *model;
    moe_engine *eng;
    char load_error[512];
    moe_comm data;
    bool have_data;
    outbox ob;
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
    int hang_rank, hang_after, n_starts;
    int pull_delay_ms;
    bool shutdown;
} worker;

static int64_t ms_ns(int ms) { return (int64_t)ms * 1000000; }

static park_t *find_park(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_parks; i++)
        if (w->parks[i].seq_id == id)
            return &w->parks[i];
    return NULL;
}

static void remove_park(worker *w, park_t *p)
{
    moe_kv_send_free(p->send);
    *p = w->parks[--w->n_parks];
}

static pull_t *find_pull(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_pulls; i++)
        if (w->pulls[i].seq_id == id)
            return &w->pulls[i];
    return NULL;
}

static void remove_pull(worker *w, pull_t *q)
{
    moe_kv_recv_free(q->recv);
    if (q->offer)
        protobuf_c_message_free_unpacked(&q->offer->base, NULL);
    *q = w->pulls[--w->n_pulls];
}

static void engine_drop(worker *w, uint64_t id)
{
    if (w->eng && moe_engine_finish(w->eng, id) == MOE_OK)
        w->load_dirty = true;
}

static void fill_load(worker *w, pb_load *l)
{
    moeserve__cluster__v1__load__init(l);
    if (w->eng) {
        moe_engine_stats st;
        moe_engine_get_stats(w->eng, &st);
        l->kv_blocks_total = (uint32_t)st.kv_blocks_total;
        l->kv_blocks_used = (uint32_t)st.kv_blocks_used;
        l->running = (uint32_t)st.n_running;
        l->waiting = (uint32_t)st.n_waiting;
        w->ctr.engine_steps = (uint64_t)st.steps;
        w->ctr.prefill_tokens = (uint64_t)st.prefill_tokens;
        w->ctr.decode_tokens = (uint64_t)st.decode_tokens;
    }
    uint32_t parked = 0, active = 0, waiting = 0;
    for (int i = 0; i < w->n_parks; i++) {
        parked += w->parks[i].parked;
        active += w->parks[i].send != NULL;
    }
    for (int i = 0; i < w->n_pulls; i++) {
        waiting += w->pulls[i].phase == PULL_WAIT_ROOM;
        active += w->pulls[i].phase == PULL_RECEIVING;
    }
    l->parked = parked;
    l->pulls_waiting = waiting;
    l->transfers_active = active;
}

static moe_status send_coord(worker *w, int tag, const ProtobufCMessage *m)
{
    return ob_send(&w->ob, w->o->coordinator_rank, tag, m);
}

static void send_heartbeat(worker *w, int tag)
{
    pb_load load;
    fill_load(w, &load);
    Moeserve__Cluster__V1__Heartbeat hb;
    moeserve__cluster__v1__heartbeat__init(&hb);
    hb.seq = ++w->hb_seq;
    hb.load = &load;
    hb.counters = &w->ctr;
    if (send_coord(w, tag, &hb.base) != MOE_OK)
        MOE_LOG_E("heartbeat: %s", moe_error_message());
    w->last_hb = moe_now_ns();
    w->next_hb = w->last_hb + ms_ns(w->o->heartbeat_ms);
    w->load_dirty = false;
}

static void send_seq_event(worker *w, uint64_t id, Moeserve__Cluster__V1__SeqEvent__Kind kind, moe_status code,
                           const char *msg)
{
    pb_seq_event ev;
    moeserve__cluster__v1__seq_event__init(&ev);
    ev.seq_id = id;
    ev.kind = kind;
    ev.status = (int32_t)code;
    ev.message = (char *)(uintptr_t)(msg ? msg : "");
    if (send_coord(w, TAG(SEQ_EVENT), &ev.base) != MOE_OK)
        MOE_LOG_E("seq event: %s", moe_error_message());
}

static void send_peer(worker *w, int peer, int tag, const ProtobufCMessage *m)
{
    if (ob_send(&w->ob, peer, tag, m) != MOE_OK)
        MOE_LOG_E("to rank %d: %s", peer, moe_error_message());
}

static void send_kv_done(worker *w, int peer, uint64_t id, bool received)
{
    pb_done d;
    moeserve__cluster__v1__kv_done__init(&d);
    d.seq_id = id;
    d.received = received;
    send_peer(w, peer, TAG(KV_DONE), &d.base);
}

static void send_kv_gone(worker *w, int peer, uint64_t id, const char *why)
{
    pb_gone g;
    moeserve__cluster__v1__kv_gone__init(&g);
    g.seq_id = id;
    g.reason = (char *)(uintptr_t)why;
    send_peer(w, peer, TAG(KV_GONE), &g.base);
}

/* ---- model, engine, warm-up ---- */

static moe_status load(worker *w)
{
    const moe_worker_opts *o = w->o;
    moe_status st = moe_model_load(o->model_dir, NULL, &w->model);
    if (st != MOE_OK)
        return st;
    if ((st = moe_engine_create(w->model, &o->engine, &w->eng)) != MOE_OK)
        return st;
    moe_engine_stats es;
    moe_engine_get_stats(w->eng, &es);
    w->kv_total = es.kv_blocks_total;
    w->last_free_blocks = es.kv_blocks_total;
    w->block_bytes = moe_engine_kv_block_bytes(w->eng);
    w->block_tokens = moe_engine_kv_block_size(w->eng);
    w->cap_events = o->engine.max_seqs > 0 ? o->engine.max_seqs : 64;
    w->events = calloc((size_t)w->cap_events, sizeof *w->events);
    w->pev = calloc((size_t)w->cap_events, sizeof *w->pev);
    w->pevp = calloc((size_t)w->cap_events, sizeof *w->pevp);
    if (!w->events || !w->pev || !w->pevp)
        return moe_error(MOE_ERR_NOMEM, "worker: out of memory");
    /* A real forward pass before saying ready: the health check promises one succeeded. */
    int vocab = w->model->cfg.vocab_size;
    int32_t toks[2] = {0, vocab > 1 ? 1 : 0};
    float *logits = malloc(2 * (size_t)vocab * sizeof *logits);
    if (!logits)
        return moe_error(MOE_ERR_NOMEM, "worker: out of memory for the warm-up");
    st = moe_engine_logits(w->eng, toks, 2, 0, logits);
    bool finite = true;
    for (size_t i = 0; st == MOE_OK && i < 2 * (size_t)vocab; i++)
        finite &= logits[i] == logits[i] && logits[i] - logits[i] == 0.0f;
    free(logits);
    if (st != MOE_OK)
        return moe_error_context(st, "warm-up forward pass: ");
    if (!finite)
        return moe_error(MOE_ERR_INTERNAL, "warm-up forward pass: logits are not finite");
    return MOE_OK;
}

/* ---- coordinator messages ---- */

static void maybe_hang(worker *w)
{
    if (w->rank != w->hang_rank || w->n_starts < w->hang_after)
        return;
    MOE_LOG_W("test hook MOE_TEST_HANG_RANK: rank %d stops answering now", w->rank);
    for (;;)
        sleep(1);
}

static void on_start(worker *w, const pb_start *m)
{
    w->n_starts++;
    maybe_hang(w);
    if (!w->eng) {
        send_seq_event(w, m->seq_id, EVENT(FAILED), MOE_ERR_UNAVAILABLE, "worker has no model loaded");
        return;
    }
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    if (m->sampling)
        sp = (moe_sampling_params){.temperature = m->sampling->temperature, .top_k = m->sampling->top_k,
                                   .top_p = m->sampling->top_p, .seed = m->sampling->seed};
    bool prefill_only = m->prefill_only && w->o->role == MOE_WORKER_PREFILL;
    if (prefill_only && !grow((void **)&w->parks, &w->cap_parks, w->n_parks + 1, sizeof *w->parks)) {
        send_seq_event(w, m->seq_id, EVENT(FAILED), MOE_ERR_NOMEM, "worker: out of memory");
        return;
    }
    moe_status st = prefill_only
                        ? moe_engine_add_prefill_only(w->eng, m->seq_id, m->prompt, (int)m->n_prompt, &sp,
                                                      (int)m->max_new_tokens, m->ignore_eos)
                        : moe_engine_add(w->eng, m->seq_id, m->prompt, (int)m->n_prompt, &sp,
                                         (int)m->max_new_tokens, m->ignore_eos);
    if (st != MOE_OK) {
        MOE_LOG_W("seq %llu refused: %s", (unsigned long long)m->seq_id, moe_error_message());
        send_seq_event(w, m->seq_id, EVENT(FAILED), st, moe_error_message());
        return;
    }
    if (prefill_only)
        w->parks[w->n_parks++] = (park_t){.seq_id = m->seq_id, .decode_rank = (int)m->decode_rank};
    w->load_dirty = true;
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
    if (grow((void **)&w->tombs, &w->cap_tombs, w->n_tombs + 1, sizeof *w->tombs))
        w->tombs[w->n_tombs++] = (tomb_t){.seq_id = id, .until = now + 60 * (int64_t)1000000000};
}

static bool take_tomb(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_tombs; i++) {
        if (w->tombs[i].seq_id == id) {
            w->tombs[i] = w->tombs[--w->n_tombs];
            return true;
        }
    }
    return false;
}

static void free_seq(worker *w, uint64_t id)
{
    park_t *p = find_park(w, id);
    if (p) {
        if (p->send) {
            p->freed = true; /* blocks in flight: freed when the sends end */
        } else {
            engine_drop(w, id);
            remove_park(w, p);
        }
        return;
    }
    pull_t *q = find_pull(w, id);
    if (q) {
        if (q->phase == PULL_RECEIVING) {
            q->cancelled = true; /* the prefill side is sending: let the receives end first */
            return;
        }
        send_kv_done(w, q->src, id, false);
        if (q->imported)
            engine_drop(w, id);
        remove_pull(w, q);
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
    const pb_state *s = of->state;
    *st = (moe_seq_state){.seq_id = s->seq_id, .tokens = s->tokens, .n_tokens = (int)s->n_tokens,
                          .n_prompt = (int)s->n_prompt, .n_generated = (int)s->n_generated,
                          .n_computed = recompute ? 0 : (int)s->n_computed,
                          .max_new_tokens = (int)s->max_new_tokens, .ignore_eos = s->ignore_eos};
    if (s->sampling)
        st->sp = (moe_sampling_params){.temperature = s->sampling->temperature, .top_k = s->sampling->top_k,
                                       .top_p = s->sampling->top_p, .seed = s->sampling->seed};
    for (size_t i = 0; i < 4 && i < s->n_rng; i++)
        st->rng.s[i] = s->rng[i];
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
    if (send_coord(w, TAG(SEQ_EVENT), &ev.base) != MOE_OK)
        MOE_LOG_E("seq event: %s", moe_error_message());
}

/* Last resort: the decode side computes the prompt (and the first token's K/V) itself. The
 * sampler state came with the offer, so the continuation is the same as after a transfer. */
static void recompute(worker *w, pull_t *q)
{
    uint64_t id = q->seq_id;
    if (q->imported)
        engine_drop(w, id);
    q->imported = false;
    moe_seq_state st;
    offer_state(q->offer, &st, true);
    const int *blocks;
    int nb;
    moe_status s = moe_engine_import(w->eng, &st, &blocks, &nb);
    if (s == MOE_OK)
        s = moe_engine_resume(w->eng, id);
    if (s != MOE_OK) {
        MOE_LOG_E("seq %llu: recompute failed: %s", (unsigned long long)id, moe_error_message());
        send_seq_event(w, id, EVENT(FAILED), s, moe_error_message());
        engine_drop(w, id);
    } else {
        MOE_LOG_W("seq %llu: KV not received from rank %d, recomputing its %d prompt tokens here",
                  (unsigned long long)id, q->src, st.n_prompt);
        w->ctr.kv_transfer_recomputes++;
        handed_off(w, q, true, 0);
    }
    remove_pull(w, q);
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
    void **ptrs = malloc((size_t)(nb ? nb : 1) * sizeof *ptrs);
    if (!ptrs) {
        recompute(w, q);
        return;
    }
    for (int i = 0; i < nb; i++)
        ptrs[i] = moe_engine_kv_block(w->eng, blocks[i]);
    uint32_t xfer = ++w->next_xfer;
    int64_t now = moe_now_ns();
    moe_status s = moe_kv_recv_start(&w->data, ptrs, nb, w->block_bytes, q->src, moe_kv_data_tag(xfer),
                                     now + ms_ns(w->o->kv_timeout_ms), &q->recv);
    free(ptrs);
    if (s != MOE_OK) {
        MOE_LOG_E("seq %llu: %s", (unsigned long long)q->seq_id, moe_error_message());
        send_kv_done(w, q->src, q->seq_id, false);
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
    send_peer(w, q->src, TAG(KV_PULL), &m.base);
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
        if (es.kv_blocks_used > 0)
            return false; /* wait for room: DistServe's pull slows prefill instead of failing */
    }
    if (s != MOE_OK) {
        MOE_LOG_W("seq %llu: cannot import: %s", (unsigned long long)q->seq_id, moe_error_message());
        send_seq_event(w, q->seq_id, EVENT(FAILED), s, moe_error_message());
        send_kv_done(w, q->src, q->seq_id, false);
        remove_pull(w, q);
        return true;
    }
    q->imported = true;
    w->load_dirty = true;
    if ((uint32_t)nb != q->offer->n_blocks || q->offer->block_bytes != w->block_bytes) {
        MOE_LOG_E("seq %llu: offer of %u blocks x %llu bytes does not match %d x %zu here",
                  (unsigned long long)q->seq_id, q->offer->n_blocks, (unsigned long long)q->offer->block_bytes,
                  nb, w->block_bytes);
        send_kv_done(w, q->src, q->seq_id, false);
        recompute(w, q);
        return true;
    }
    start_attempt(w, q, 1);
    return true;
}

static void on_offer(worker *w, int src, pb_offer *m)
{
    w->n_starts++;
    maybe_hang(w);
    uint64_t id = m->state ? m->state->seq_id : 0;
    if (!m->state || take_tomb(w, id) || !w->eng) {
        send_kv_done(w, src, id, false);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return;
    }
    if (!grow((void **)&w->pulls, &w->cap_pulls, w->n_pulls + 1, sizeof *w->pulls)) {
        send_seq_event(w, id, EVENT(FAILED), MOE_ERR_NOMEM, "worker: out of memory");
        send_kv_done(w, src, id, false);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return;
    }
    int64_t now = moe_now_ns();
    pull_t *q = &w->pulls[w->n_pulls++];
    *q = (pull_t){.seq_id = id, .src = src, .offer = m, .phase = PULL_WAIT_ROOM,
                  .next_renew = now + ms_ns((int)(m->lease_ms / 3 ? m->lease_ms / 3 : 1)),
                  .not_before = now + ms_ns(w->pull_delay_ms)};
    if (w->pull_delay_ms == 0)
        try_import(w, q);
}

static void on_header(worker *w, const pb_header *m)
{
    pull_t *q = find_pull(w, m->seq_id);
    if (q && q->phase == PULL_RECEIVING && q->xfer_id == m->xfer_id)
        moe_kv_recv_set_checksums(q->recv, m->checksums, (int)m->n_checksums);
}

static void on_gone(worker *w, const pb_gone *m)
{
    pull_t *q = find_pull(w, m->seq_id);
    if (!q)
        return;
    MOE_LOG_W("seq %llu: rank %d no longer holds its KV (%s)", (unsigned long long)m->seq_id, q->src, m->reason);
    moe_kv_recv_free(q->recv); /* it will never send: cancel the receives */
    q->recv = NULL;
    if (q->cancelled) {
        if (q->imported)
            engine_drop(w, q->seq_id);
        remove_pull(w, q);
        return;
    }
    recompute(w, q);
}

/* Advances one pull; returns true when it changed something. May remove q. */
static bool progress_pull(worker *w, pull_t *q, int64_t now)
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
        if ((uint32_t)free_blocks >= q->offer->n_blocks && try_import(w, q))
            return true;
        if (now >= q->next_renew && w->pull_delay_ms == 0) {
            pb_pull m;
    moeserve__cluster__v1__kv_pull__init(&m);
            m.seq_id = q->seq_id;
            m.renew_only = true;
            send_peer(w, q->src, TAG(KV_PULL), &m.base);
            q->next_renew = now + ms_ns((int)(q->offer->lease_ms / 3 ? q->offer->lease_ms / 3 : 1));
        }
        return false;
    }
    moe_kv_xfer_result r = moe_kv_recv_poll(q->recv, now);
    if (r == MOE_KV_XFER_PENDING)
        return false;
    uint64_t id = q->seq_id;
    if (r == MOE_KV_XFER_OK) {
        uint64_t bytes = (uint64_t)q->offer->n_blocks * w->block_bytes;
        moe_kv_recv_free(q->recv);
        q->recv = NULL;
        send_kv_done(w, q->src, id, true);
        if (q->cancelled) {
            engine_drop(w, id);
            remove_pull(w, q);
            return true;
        }
        w->ctr.kv_transfers++;
        w->ctr.kv_transfer_bytes += bytes;
        w->ctr.kv_transfer_ns += (uint64_t)(now - q->t0);
        if (moe_engine_resume(w->eng, id) != MOE_OK) {
            send_seq_event(w, id, EVENT(FAILED), MOE_ERR_INTERNAL, moe_error_message());
        } else {
            MOE_LOG_D("seq %llu: pulled %u blocks (%llu bytes) from rank %d in %.3f ms, attempt %d",
                      (unsigned long long)id, q->offer->n_blocks, (unsigned long long)bytes, q->src,
                      (double)(now - q->t0) * 1e-6, q->attempt);
            handed_off(w, q, false, bytes);
        }
        remove_pull(w, q);
        w->load_dirty = true;
        return true;
    }
    if (r == MOE_KV_XFER_CORRUPT) {
        w->ctr.kv_checksum_failures++;
        MOE_LOG_W("seq %llu: block %d from rank %d failed its checksum (attempt %d)", (unsigned long long)id,
                  moe_kv_recv_bad_block(q->recv), q->src, q->attempt);
    } else if (r == MOE_KV_XFER_TIMEOUT) {
        w->ctr.kv_transfer_timeouts++;
        MOE_LOG_W("seq %llu: KV from rank %d timed out after %d ms (attempt %d)", (unsigned long long)id, q->src,
                  w->o->kv_timeout_ms, q->attempt);
    } else {
        MOE_LOG_E("seq %llu: KV transfer from rank %d failed: %s", (unsigned long long)id, q->src,
                  moe_error_message());
    }
    moe_kv_recv_free(q->recv);
    q->recv = NULL;
    if (q->cancelled) {
        send_kv_done(w, q->src, id, false);
        engine_drop(w, id);
        remove_pull(w, q);
        return true;
    }
    if (q->attempt < MOE_KV_MAX_ATTEMPTS) {
        w->ctr.kv_transfer_retries++;
        start_attempt(w, q, q->attempt + 1);
    } else {
        send_kv_done(w, q->src, id, false);
        recompute(w, q);
    }
    return true;
}

/* ---- prefill side of the pull ---- */

static void offer(worker *w, park_t *p)
{
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb) != MOE_OK)
        return;
    int32_t *tokens = malloc((size_t)st.n_tokens * sizeof *tokens);
    if (!tokens) {
        send_seq_event(w, p->seq_id, EVENT(FAILED), MOE_ERR_NOMEM, "worker: out of memory");
        engine_drop(w, p->seq_id);
        remove_park(w, p);
        return;
    }
    memcpy(tokens, st.tokens, (size_t)st.n_tokens * sizeof *tokens);
    uint64_t rng[4];
    memcpy(rng, st.rng.s, sizeof rng);
    Moeserve__Cluster__V1__Sampling sp;
    moeserve__cluster__v1__sampling__init(&sp);
    sp.temperature = st.sp.temperature;
    sp.top_p = st.sp.top_p;
    sp.top_k = st.sp.top_k;
    sp.seed = st.sp.seed;
    pb_state s;
    moeserve__cluster__v1__seq_state__init(&s);
    s.seq_id = st.seq_id;
    s.n_tokens = (size_t)st.n_tokens;
    s.tokens = tokens;
    s.n_prompt = (uint32_t)st.n_prompt;
    s.n_generated = (uint32_t)st.n_generated;
    s.n_computed = (uint32_t)st.n_computed;
    s.max_new_tokens = (uint32_t)st.max_new_tokens;
    s.ignore_eos = st.ignore_eos;
    s.sampling = &sp;
    s.n_rng = 4;
    s.rng = rng;
    pb_offer m;
    moeserve__cluster__v1__kv_offer__init(&m);
    m.state = &s;
    m.n_blocks = (uint32_t)nb;
    m.block_bytes = w->block_bytes;
    m.lease_ms = (uint32_t)w->o->lease_ms;
    send_peer(w, p->decode_rank, TAG(KV_OFFER), &m.base);
    free(tokens);
    p->parked = true;
    p->lease_deadline = moe_now_ns() + ms_ns(w->o->lease_ms);
}

static void on_pull(worker *w, int src, const pb_pull *m)
{
    park_t *p = find_park(w, m->seq_id);
    if (!p || !p->parked || p->freed || src != p->decode_rank) {
        send_kv_gone(w, src, m->seq_id, !p || p->freed ? "freed (cancelled, or its lease expired)" : "not offered to you");
        return;
    }
    int64_t now = moe_now_ns();
    p->lease_deadline = now + ms_ns(w->o->lease_ms);
    if (m->renew_only)
        return;
    moe_kv_send_free(p->send); /* a retry replaces an attempt still in flight */
    p->send = NULL;
    moe_seq_state st;
    const int *blocks;
    int nb;
    moe_status s = moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb);
    void **ptrs = s == MOE_OK ? malloc((size_t)(nb ? nb : 1) * sizeof *ptrs) : NULL;
    uint64_t *sums = ptrs ? malloc((size_t)(nb ? nb : 1) * sizeof *sums) : NULL;
    if (sums) {
        for (int i = 0; i < nb; i++)
            ptrs[i] = moe_engine_kv_block(w->eng, blocks[i]);
        s = moe_kv_send_start(&w->data, ptrs, nb, w->block_bytes, src, moe_kv_data_tag(m->xfer_id), (int)m->attempt,
                              &w->hooks, sums, &p->send);
    }
    if (!sums || s != MOE_OK) {
        MOE_LOG_E("seq %llu: cannot send its KV: %s", (unsigned long long)m->seq_id,
                  sums ? moe_error_message() : "out of memory");
        send_kv_gone(w, src, m->seq_id, "the prefill side failed to send");
        engine_drop(w, p->seq_id);
        remove_park(w, p);
    } else {
        pb_header h;
    moeserve__cluster__v1__kv_header__init(&h);
        h.seq_id = m->seq_id;
        h.xfer_id = m->xfer_id;
        h.n_checksums = (size_t)nb;
        h.checksums = sums;
        send_peer(w, src, TAG(KV_HEADER), &h.base);
        p->send_deadline = now + ms_ns(w->o->kv_timeout_ms) * 2;
    }
    free(ptrs);
    free(sums);
}

static void on_done(worker *w, const pb_done *m)
{
    park_t *p = find_park(w, m->seq_id);
    if (!p)
        return;
    engine_drop(w, p->seq_id);
    remove_park(w, p); /* detaches sends still in flight; the receiver has what it wants */
}

/* Advances one parked sequence; returns true when it changed something. May remove p. */
static bool progress_park(worker *w, park_t *p, int64_t now)
{
    if (p->send) {
        bool done = false;
        if (moe_kv_send_poll(p->send, &done) != MOE_OK) {
            MOE_LOG_E("seq %llu: %s", (unsigned long long)p->seq_id, moe_error_message());
            done = true;
        }
        if (!done && now < p->send_deadline)
            return false;
        if (!done)
            MOE_LOG_W("seq %llu: blocks to rank %d still not taken after %d ms; abandoning the sends",
                      (unsigned long long)p->seq_id, p->decode_rank, 2 * w->o->kv_timeout_ms);
        moe_kv_send_free(p->send);
        p->send = NULL;
        p->lease_deadline = now + ms_ns(w->o->lease_ms); /* now waiting for the ack */
        if (!p->freed)
            return true;
    }
    if (p->freed) {
        engine_drop(w, p->seq_id);
        remove_park(w, p);
        return true;
    }
    if (p->parked && now >= p->lease_deadline) {
        MOE_LOG_W("seq %llu: lease expired, no pull from rank %d in %d ms; freeing its KV",
                  (unsigned long long)p->seq_id, p->decode_rank, w->o->lease_ms);
        w->ctr.kv_lease_expirations++;
        send_seq_event(w, p->seq_id, EVENT(LEASE_EXPIRED), MOE_ERR_TIMEOUT, "KV lease expired");
        engine_drop(w, p->seq_id);
        remove_park(w, p);
        return true;
    }
    return false;
}

/* ---- message dispatch ---- */

static bool handle(worker *w, int src, int tag, const uint8_t *buf, size_t len)
{
    const ProtobufCMessageDescriptor *d = NULL;
    switch (tag) {
    case TAG(START): d = &moeserve__cluster__v1__start_seq__descriptor; break;
    case TAG(FREE): d = &moeserve__cluster__v1__free_seqs__descriptor; break;
    case TAG(SHUTDOWN): w->shutdown = true; return true;
    case TAG(KV_OFFER): d = &moeserve__cluster__v1__kv_offer__descriptor; break;
    case TAG(KV_PULL): d = &moeserve__cluster__v1__kv_pull__descriptor; break;
    case TAG(KV_HEADER): d = &moeserve__cluster__v1__kv_header__descriptor; break;
    case TAG(KV_DONE): d = &moeserve__cluster__v1__kv_done__descriptor; break;
    case TAG(KV_GONE): d = &moeserve__cluster__v1__kv_gone__descriptor; break;
    default:
        MOE_LOG_W("unexpected control tag %d from rank %d", tag, src);
        return false;
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, buf);
    if (!m) {
        MOE_LOG_E("malformed %s (%zu bytes) from rank %d", d->name, len, src);
        return false;
    }
    switch (tag) {
    case TAG(START): on_start(w, (const pb_start *)m); break;
    case TAG(FREE): {
        const pb_free *f = (const pb_free *)m;
        for (size_t i = 0; i < f->n_seq_ids; i++)
            free_seq(w, f->seq_ids[i]);
        break;
    }
    case TAG(KV_OFFER): on_offer(w, src, (pb_offer *)m); return true; /* keeps m */
    case TAG(KV_PULL): on_pull(w, src, (const pb_pull *)m); break;
    case TAG(KV_HEADER): on_header(w, (const pb_header *)m); break;
    case TAG(KV_DONE): on_done(w, (const pb_done *)m); break;
    case TAG(KV_GONE): on_gone(w, (const pb_gone *)m); break;
    default: break;
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return true;
}

/* Receives every control message waiting; returns how many. */
static int drain_control(worker *w)
{
    int n = 0;
    uint8_t *buf = NULL;
    size_t cap = 0;
    while (!w->shutdown) {
        int flag = 0;
        MPI_Status stt;
        if (MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, w->o->ctrl, &flag, &stt) != MPI_SUCCESS || !flag)
            break;
        int count = 0;
        MPI_Get_count(&stt, MPI_BYTE, &count);
        if ((size_t)count > cap) {
            uint8_t *nb = realloc(buf, (size_t)count);
            if (!nb) {
                MOE_LOG_E("out of memory for a %d-byte control message", count);
                break;
            }
            buf = nb;
            cap = (size_t)count;
        }
        if (MPI_Recv(buf, count, MPI_BYTE, stt.MPI_SOURCE, stt.MPI_TAG, w->o->ctrl, MPI_STATUS_IGNORE) !=
            MPI_SUCCESS)
            break;
        handle(w, stt.MPI_SOURCE, stt.MPI_TAG, buf, (size_t)count);
        n++;
    }
    free(buf);
    return n;
}

/* ---- engine step ---- */

static moe_status step(worker *w)
{
    int64_t t0 = moe_now_ns();
    int n = moe_engine_step(w->eng, w->events, w->cap_events);
    if (n < 0)
        return moe_error_context(MOE_ERR_INTERNAL, "engine step: ");
    if (n == 0)
        return MOE_OK;
    int64_t t1 = moe_now_ns();
    for (int i = 0; i < n; i++) {
        const moe_token_event *e = &w->events[i];
        Moeserve__Cluster__V1__TokenEvent *p = &w->pev[i];
        moeserve__cluster__v1__token_event__init(p);
        p->seq_id = e->seq_id;
        p->token = e->token;
        p->index = (uint32_t)e->index;
        p->finish = e->finish == MOE_FINISH_EOS      ? MOESERVE__CLUSTER__V1__FINISH__FINISH_EOS
                    : e->finish == MOE_FINISH_NONE ? MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE
                                                   : MOESERVE__CLUSTER__V1__FINISH__FINISH_LENGTH;
        p->parked = e->parked;
        w->pevp[i] = p;
    }
    pb_load load;
    fill_load(w, &load);
    Moeserve__Cluster__V1__TokenBatch b;
    moeserve__cluster__v1__token_batch__init(&b);
    b.n_events = (size_t)n;
    b.events = w->pevp;
    b.load = &load;
    b.step_ns = t1 - t0;
    b.sent_ns = moe_now_ns();
    moe_status st = send_coord(w, TAG(TOKENS), &b.base);
    if (st != MOE_OK)
        return st;
    /* Offers after the token report: the first token reaches the client as early as possible. */
    for (int i = 0; i < n; i++) {
        const moe_token_event *e = &w->events[i];
        park_t *p = find_park(w, e->seq_id);
        if (!p)
            continue;
        if (e->parked)
            offer(w, p);
        else if (e->finish != MOE_FINISH_NONE)
            remove_park(w, p); /* finished on its first token: nothing to move */
    }
    return MOE_OK;
}

/* ---- the loop ---- */

static void worker_free(worker *w)
{
    while (w->n_parks)
        remove_park(w, &w->parks[0]);
    while (w->n_pulls)
        remove_pull(w, &w->pulls[0]);
    free(w->parks);
    free(w->pulls);
    free(w->tombs);
    free(w->events);
    free(w->pev);
    free(w->pevp);
    moe_engine_free(w->eng);
    moe_model_free(w->model);
    if (w->have_data)
        w->data.ops->destroy(w->data.ctx);
}

static int env_int(const char *name, int dflt)
{
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

moe_status moe_worker_run(const moe_worker_opts *o)
{
    worker w = {.o = o, .ob = {.comm = o->ctrl}};
    moeserve__cluster__v1__counters__init(&w.ctr);
    MPI_Comm_rank(o->ctrl, &w.rank);
    moe_kv_test_hooks_from_env(&w.hooks);
    w.hang_rank = env_int("MOE_TEST_HANG_RANK", -1);
    w.hang_after = env_int("MOE_TEST_HANG_AFTER", 1);
    w.pull_delay_ms = o->role == MOE_WORKER_DECODE ? env_int("MOE_TEST_PULL_DELAY_MS", 0) : 0;
    moe_status st = moe_comm_mpi_create(o->data, &w.data);
    if (st != MOE_OK)
        return st;
    w.have_data = true;

    Moeserve__Cluster__V1__WorkerReady ready;
    moeserve__cluster__v1__worker_ready__init(&ready);
    ready.rank = (uint32_t)w.rank;
    ready.instance = (uint32_t)o->instance_id;
    ready.role = (Moeserve__Cluster__V1__Role)o->role;
    ready.ok = true;
    ready.error = (char *)"";
    if (o->role != MOE_WORKER_SPARE) {
        int64_t t0 = moe_now_ns();
        st = load(&w);
        if (st != MOE_OK) {
            snprintf(w.load_error, sizeof w.load_error, "%s", moe_error_message());
            MOE_LOG_E("rank %d: %s", w.rank, w.load_error);
            moe_engine_free(w.eng);
            w.eng = NULL;
            ready.ok = false;
            ready.error = w.load_error;
        } else {
            ready.warmup_ms = (double)(moe_now_ns() - t0) * 1e-6;
            ready.kv_blocks_total = (uint32_t)w.kv_total;
            ready.kv_block_tokens = (uint32_t)w.block_tokens;
            ready.kv_block_bytes = w.block_bytes;
            ready.weight_bytes = moe_model_weight_bytes(w.model);
            ready.max_batch_tokens = (uint32_t)o->engine.max_batch_tokens;
            ready.max_seqs = (uint32_t)o->engine.max_seqs;
        }
    }
    if ((st = send_coord(&w, TAG(WORKER_READY), &ready.base)) != MOE_OK) {
        worker_free(&w);
        return st;
    }

    int64_t idle_ns = 0;
    w.next_hb = moe_now_ns();
    st = MOE_OK;
    while (!w.shutdown) {
        bool busy = drain_control(&w) > 0;
        if (w.shutdown)
            break;
        int64_t now = moe_now_ns();
        for (int i = 0; i < w.n_parks;) {
            int before = w.n_parks;
            busy |= progress_park(&w, &w.parks[i], now);
            if (w.n_parks == before)
                i++;
        }
        for (int i = 0; i < w.n_pulls;) {
            int before = w.n_pulls;
            busy |= progress_pull(&w, &w.pulls[i], now);
            if (w.n_pulls == before)
                i++;
        }
        if (w.eng && moe_engine_has_work(w.eng)) {
            if ((st = step(&w)) != MOE_OK) {
                MOE_LOG_E("rank %d: %s", w.rank, moe_error_message());
                break;
            }
            busy = true;
        }
        now = moe_now_ns();
        /* Load changes (frees) are reported promptly, but at most every 10 ms. */
        if (now >= w.next_hb || (w.load_dirty && now - w.last_hb >= 10000000))
            send_heartbeat(&w, TAG(HEARTBEAT));
        ob_progress(&w.ob);
        bool transfers = false;
        for (int i = 0; i < w.n_parks && !transfers; i++)
            transfers = w.parks[i].send != NULL;
        for (int i = 0; i < w.n_pulls && !transfers; i++)
            transfers = w.pulls[i].phase == PULL_RECEIVING;
        if (busy) {
            idle_ns = 0;
        } else {
            /* Nothing to do: nap, growing from 20 us to 2 ms (0.5 ms while bytes are moving). */
            int64_t cap = transfers ? 500000 : 2000000;
            idle_ns = idle_ns ? idle_ns * 2 : 20000;
            if (idle_ns > cap)
                idle_ns = cap;
            nap(idle_ns);
        }
    }
    if (w.shutdown) {
        MOE_LOG_D("rank %d: shutting down", w.rank);
        send_heartbeat(&w, TAG(BYE));
    }
    ob_flush(&w.ob, 5000);
    free(w.ob.v);
    worker_free(&w);
    return st;
}
