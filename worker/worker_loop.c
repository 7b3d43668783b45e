/* A worker rank's main loop: model load and warm-up, control messages from the coordinator and
 * peer workers, engine steps with one batched token report each, heartbeats; the KV pull protocol
 * it drives lives in worker/kv_pull.c. Polls MPI: Open MPI has no progress thread, so this loop
 * is what moves every non-blocking transfer; idle, it sleeps in short growing naps instead of
 * spinning a core. */
#include "worker/worker_loop.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/test_hook.h"
#include "ctrl/inbox.h"
#include "worker/comm_mpi.h"
#ifdef MOE_HAVE_NCCL
#include "worker/comm_nccl.h"
#endif
#include "worker/compute/backend.h"
#include "worker/eplb.h"
#include "worker/seq_state_pb.h"
#include "worker/worker_internal.h"

void moe_worker_engine_drop(worker *w, uint64_t id)
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
        w->ctr.preemptions = (uint64_t)st.preemptions;
    }
    uint32_t parked = 0, active = 0, waiting = 0, incoming = 0;
    for (int i = 0; i < w->n_parks; i++) {
        parked += w->parks[i].parked;
        active += w->parks[i].send != NULL;
    }
    for (int i = 0; i < w->n_pulls; i++) {
        /* Reserved for a layer-by-layer push while the prefill side still computes the prompt:
         * not running here yet, and not waiting for room either (that would make the migration
         * policy de-fragment for it); its blocks count as used. */
        bool prefilling = w->pulls[i].push && !w->pulls[i].offer;
        waiting += w->pulls[i].phase == PULL_WAIT_ROOM;
        incoming += (uint32_t)w->pulls[i].held_blocks;
        active += w->pulls[i].phase == PULL_RECEIVING;
        if (prefilling && l->running > 0)
            l->running--;
    }
    l->parked = parked;
    l->pulls_waiting = waiting;
    l->kv_blocks_incoming = incoming + (uint32_t)moe_mig_blocks_incoming(w->mig);
    l->transfers_active = active + (uint32_t)moe_mig_active(w->mig);
}

moe_status moe_worker_send_coord(worker *w, int tag, const ProtobufCMessage *m)
{
    return moe_link_send(w->o->link, MOE_LINK_COORDINATOR, tag, m);
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
    /* Expert load statistics: int64 counters sent as uint64 (they only grow from zero). */
    uint64_t *expert_tokens = NULL;
    if (w->eng) {
        const moe_model_config *c = &w->model->cfg;
        size_t n = (size_t)c->n_layers * (size_t)c->n_experts;
        const int64_t *load_tab = moe_engine_expert_load(w->eng);
        if (n && (expert_tokens = malloc(n * sizeof *expert_tokens))) {
            for (size_t i = 0; i < n; i++)
                expert_tokens[i] = (uint64_t)load_tab[i];
            hb.n_expert_tokens = n;
            hb.expert_tokens = expert_tokens;
        }
    }
    moe_status sent = moe_worker_send_coord(w, tag, &hb.base);
    free(expert_tokens);
    if (sent != MOE_OK)
        MOE_LOG_E("heartbeat: %s", moe_error_message());
    w->last_hb = moe_now_ns();
    w->next_hb = w->last_hb + moe_worker_ms_ns(w->o->heartbeat_ms);
    w->load_dirty = false;
}

/* The engine's layer hook, called on this (the loop) thread between layers of a step: a long step
 * (a ~500-token prefill on a loaded machine takes seconds) must not silence the heartbeat, or the
 * coordinator fences a healthy instance. Sends only when the periodic one is due, with the same
 * gate as the loop's; then lets the layer-by-layer KV push move its layer when it is on. */
static void step_layer_hook(void *ctx, int layer, const uint64_t *ids, int n)
{
    worker *w = ctx;
    if (!w->coord_lost && moe_now_ns() >= w->next_hb)
        send_heartbeat(w, TAG(HEARTBEAT));
    if (w->layer_delay_ms)
        moe_sleep_ns((int64_t)w->layer_delay_ms * 1000000);
    moe_worker_kv_trace(w, 0, "layer", layer);
    if (w->o->role == MOE_WORKER_PREFILL && w->o->kv_layerwise)
        moe_kv_push_layer_hook(ctx, layer, ids, n);
}

/* Between the matmul batches of a step (moe_engine_set_progress_hook): a push's slices need the
 * sender's MPI progress to leave (a rendezvous), and a prefill step's layer boundaries are 20-120
 * ms apart on a loaded machine; so every push in flight is advanced here too, with one test each
 * and at most every STEP_PROGRESS_NS (a test that finds nothing may yield the core). */
#define STEP_PROGRESS_NS 2000000
static void step_progress_hook(void *ctx)
{
    worker *w = ctx;
    if (moe_now_ns() - w->push_progress_ns < STEP_PROGRESS_NS)
        return;
    bool pushing = false;
    for (int i = 0; i < w->n_parks && !pushing; i++)
        pushing = w->parks[i].push_xfer && w->parks[i].send;
    if (pushing) {
        moe_worker_kv_trace(w, 0, "progress", 0);
        moe_kv_push_progress(w, true);
    }
}

void moe_worker_seq_event(worker *w, uint64_t id, Moeserve__Cluster__V1__SeqEvent__Kind kind,
                          moe_status code, const char *msg)
{
    pb_seq_event ev;
    moeserve__cluster__v1__seq_event__init(&ev);
    ev.seq_id = id;
    ev.kind = kind;
    ev.status = (int32_t)code;
    ev.message = (char *)(uintptr_t)(msg ? msg : "");
    if (moe_worker_send_coord(w, TAG(SEQ_EVENT), &ev.base) != MOE_OK)
        MOE_LOG_E("seq event: %s", moe_error_message());
}

void moe_worker_send_peer(worker *w, int peer, int tag, const ProtobufCMessage *m)
{
    if (moe_link_send(w->o->link, peer, tag, m) != MOE_OK)
        MOE_LOG_E("to member %d: %s", peer, moe_error_message());
}

/* ---- live migration's links to this loop (worker/migrate.c) ---- */

static void mig_send(void *ctx, int peer, int tag, const ProtobufCMessage *m)
{
    moe_worker_send_peer(ctx, peer, tag, m);
}

/* A sequence still in a KV pull (either side) cannot move yet. */
static bool mig_seq_busy(void *ctx, uint64_t id)
{
    worker *w = ctx;
    for (int i = 0; i < w->n_pulls; i++)
        if (w->pulls[i].seq_id == id)
            return true;
    return moe_kv_pull_find_park(w, id) != NULL;
}

static moe_status mig_start(worker *w)
{
    moe_mig_io io = {.ctx = w, .send = mig_send, .seq_busy = mig_seq_busy};
    moe_mig_opts mo = {.self_rank = w->rank,
                       .coordinator_rank = MOE_LINK_COORDINATOR,
                       .kv_timeout_ms = w->o->kv_timeout_ms,
                       .next_xfer = &w->next_xfer};
    moe_mig_test_hooks_from_env(&mo.hooks);
    return moe_mig_create(w->eng, w->o->data, &io, &mo, &w->mig);
}

/* ---- model, engine, warm-up ---- */

/* Expert parallelism: this rank maps only its share of the experts (contiguous ranges, see
 * worker/ep_placement.h) and exchanges tokens with the instance's other ranks in every MoE layer. */
static moe_status load_model_ep(worker *w, moe_engine_opts *eo)
{
    const moe_worker_opts *o = w->o;
    moe_model_config cfg;
    moe_status st = moe_model_config_load(o->model_dir, &cfg);
    if (st != MOE_OK)
        return st;
    if ((st = moe_ep_placement_contiguous(cfg.n_experts, w->ep_size, &w->place)) != MOE_OK)
        return st;
    bool *mask = calloc((size_t)cfg.n_experts, sizeof *mask);
    if (!mask)
        return moe_error(MOE_ERR_NOMEM, "worker: out of memory");
    for (int e = 0; e < cfg.n_experts; e++)
        mask[e] = moe_ep_placement_holds(&w->place, w->ep_rank, e);
    moe_model_load_opts lo = {.expert_mask = mask};
    st = moe_model_load(o->model_dir, &lo, &w->model);
    free(mask);
    if (st != MOE_OK)
        return st;
    /* The CUDA backend's expert rows live in device memory: NCCL moves them GPU to GPU (rank r of
     * the instance on GPU r of its host); the CPU backend keeps MPI. */
    if (eo->device == MOE_DEVICE_CUDA) {
#ifdef MOE_HAVE_NCCL
        eo->device_index = w->ep_rank;
        st = moe_comm_nccl_create(o->instance_comm, eo->device_index, &w->ep_comm);
#else
        st = moe_error(MOE_ERR_UNAVAILABLE, "worker: --device cuda with expert parallelism needs NCCL, and this "
                       "binary was built without it");
#endif
    } else {
        st = moe_comm_mpi_create(o->instance_comm, &w->ep_comm);
    }
    if (st != MOE_OK)
        return st;
    w->have_ep = true;
    eo->ep_comm = &w->ep_comm;
    eo->ep_placement = &w->place;
    MOE_LOG_I("rank %d: expert parallel %d/%d, experts [%d, %d)", w->rank, w->ep_rank, w->ep_size,
              w->place.range_begin[w->ep_rank], w->place.range_end[w->ep_rank]);
    return MOE_OK;
}

static moe_status load(worker *w)
{
    const moe_worker_opts *o = w->o;
    moe_engine_opts eo = o->engine;
    moe_status st = w->ep_size > 1 ? load_model_ep(w, &eo) : moe_model_load(o->model_dir, NULL, &w->model);
    if (st != MOE_OK)
        return st;
    if ((st = moe_engine_create(w->model, &eo, &w->eng)) != MOE_OK)
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
        moe_worker_seq_event(w, m->seq_id, EVENT(FAILED), MOE_ERR_UNAVAILABLE,
                             "worker has no model loaded");
        return;
    }
    moe_sampling_params sp = moe_sampling_from_pb(m->sampling);
    bool prefill_only = m->prefill_only && w->o->role == MOE_WORKER_PREFILL;
    if (prefill_only &&
        !moe_grow((void **)&w->parks, &w->cap_parks, w->n_parks + 1, sizeof *w->parks)) {
        moe_worker_seq_event(w, m->seq_id, EVENT(FAILED), MOE_ERR_NOMEM, "worker: out of memory");
        return;
    }
    moe_status st =
        m->n_generated
            ? moe_engine_add_resumed(w->eng, m->seq_id, m->prompt, (int)m->n_prompt, m->generated,
                                     (int)m->n_generated, &sp, (int)m->max_new_tokens,
                                     m->ignore_eos, prefill_only)
        : prefill_only ? moe_engine_add_prefill_only(w->eng, m->seq_id, m->prompt, (int)m->n_prompt,
                                                     &sp, (int)m->max_new_tokens, m->ignore_eos)
                       : moe_engine_add(w->eng, m->seq_id, m->prompt, (int)m->n_prompt, &sp,
                                        (int)m->max_new_tokens, m->ignore_eos);
    if (st != MOE_OK) {
        MOE_LOG_W("seq %llu refused: %s", (unsigned long long)m->seq_id, moe_error_message());
        moe_worker_seq_event(w, m->seq_id, EVENT(FAILED), st, moe_error_message());
        return;
    }
    if (prefill_only) {
        park_t *p = &w->parks[w->n_parks++];
        *p = (park_t){.seq_id = m->seq_id,
                      .decode_rank = (int)m->decode_rank,
                      .prefill_tokens = (int)(m->n_prompt + m->n_generated)};
        if (w->o->kv_layerwise && m->max_new_tokens > 1)
            moe_kv_push_reserve(w, p);
    }
    /* Siblings share its prefill; prefill-only ones are parked and offered one by one (the
     * whole-block pull: the layer-by-layer push belongs to the sequence that computes). */
    for (size_t k = 0; k < m->n_sibling_ids && !m->n_generated; k++) {
        uint64_t id = m->sibling_ids[k];
        moe_sampling_params ssp = sp;
        ssp.seed = k < m->n_sibling_seeds ? m->sibling_seeds[k] : sp.seed + k + 1;
        if (prefill_only &&
            !moe_grow((void **)&w->parks, &w->cap_parks, w->n_parks + 1, sizeof *w->parks)) {
            moe_worker_seq_event(w, id, EVENT(FAILED), MOE_ERR_NOMEM, "worker: out of memory");
            continue;
        }
        if ((st = moe_engine_add_sibling(w->eng, m->seq_id, id, &ssp)) != MOE_OK) {
            moe_worker_seq_event(w, id, EVENT(FAILED), st, moe_error_message());
            continue;
        }
        if (prefill_only)
            w->parks[w->n_parks++] = (park_t){.seq_id = id, .decode_rank = (int)m->decode_rank,
                                              .prefill_tokens = (int)m->n_prompt};
    }
    w->load_dirty = true;
}

/* ---- the inbox: control messages from the coordinator and from peers ---- */

static bool in_start(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)src, (void)tag;
    on_start(self, (const pb_start *)m);
    return false;
}

static bool in_free(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)src, (void)tag;
    worker *w = self;
    const pb_free *f = (const pb_free *)m;
    for (size_t i = 0; i < f->n_seq_ids; i++)
        if (!w->mig || !moe_mig_on_free(w->mig, f->seq_ids[i]))
            moe_kv_pull_free_seq(w, f->seq_ids[i]);
    return false;
}

static bool in_shutdown(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)src, (void)tag, (void)m;
    ((worker *)self)->shutdown = true;
    return false;
}

static bool in_offer(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    worker *w = self;
    w->n_starts++;
    maybe_hang(w);
    moe_kv_pull_on_offer(w, src, (pb_offer *)m);
    return true; /* the pull keeps it */
}

static bool in_pull(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    moe_kv_pull_on_pull(self, src, (const pb_pull *)m);
    return false;
}

static bool in_header(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)src, (void)tag;
    moe_kv_pull_on_header(self, (const pb_header *)m);
    return false;
}

static bool in_done(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)src, (void)tag;
    moe_kv_pull_on_done(self, (const pb_done *)m);
    return false;
}

static bool in_gone(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)src, (void)tag;
    moe_kv_pull_on_gone(self, (const pb_gone *)m);
    return false;
}

static bool in_reserve(void *self, int src, int tag, ProtobufCMessage *m)
{
    (void)tag;
    moe_kv_push_on_reserve(self, src, (pb_reserve *)m);
    return true; /* the push keeps it */
}

static const moe_inbox_kind WORKER_INBOX[] = {
    {TAG(START), &moeserve__cluster__v1__start_seq__descriptor, in_start},
    {TAG(FREE), &moeserve__cluster__v1__free_seqs__descriptor, in_free},
    {TAG(SHUTDOWN), NULL, in_shutdown},
    {TAG(KV_OFFER), &moeserve__cluster__v1__kv_offer__descriptor, in_offer},
    {TAG(KV_PULL), &moeserve__cluster__v1__kv_pull__descriptor, in_pull},
    {TAG(KV_HEADER), &moeserve__cluster__v1__kv_header__descriptor, in_header},
    {TAG(KV_DONE), &moeserve__cluster__v1__kv_done__descriptor, in_done},
    {TAG(KV_GONE), &moeserve__cluster__v1__kv_gone__descriptor, in_gone},
    {TAG(KV_RESERVE), &moeserve__cluster__v1__kv_reserve__descriptor, in_reserve},
};

/* This loop's kinds, then the migration module's (its own inbox). */
static void handle(worker *w, int src, int tag, const uint8_t *buf, size_t len)
{
    moe_inbox_result r =
        moe_inbox_deliver(WORKER_INBOX, sizeof WORKER_INBOX / sizeof *WORKER_INBOX, w, src, tag, buf, len);
    if (r == MOE_INBOX_UNKNOWN && w->mig && (r = moe_mig_deliver(w->mig, src, tag, buf, len)) != MOE_INBOX_UNKNOWN)
        w->load_dirty = true;
    if (r == MOE_INBOX_UNKNOWN)
        MOE_LOG_W("unexpected control tag %d from rank %d", tag, src);
}

/* The coordinator is gone (its connection failed): everything this rank held was for requests
 * the coordinator owned, so it is all dropped; the rank rejoins under a new member id. */
static void drop_everything(worker *w)
{
    while (w->n_parks)
        moe_kv_pull_remove_park(w, &w->parks[0]);
    while (w->n_pulls)
        moe_kv_pull_remove_pull(w, &w->pulls[0]);
    w->n_tombs = 0;
    if (w->eng)
        moe_engine_finish_all(w->eng);
    w->load_dirty = true;
}

/* Receives every control message waiting; returns how many. */
static int drain_control(worker *w)
{
    int n = 0;
    moe_link_event ev;
    while (!w->shutdown && !w->coord_lost && moe_link_poll(w->o->link, &ev)) {
        n++;
        if (ev.kind == MOE_LINK_MSG) {
            handle(w, ev.src, ev.tag, ev.buf, ev.len);
        } else if (ev.kind == MOE_LINK_LOST && ev.src == MOE_LINK_COORDINATOR) {
            MOE_LOG_W("rank %d: lost the coordinator; dropping every sequence, rejoining", w->rank);
            w->coord_lost = true;
        } else if (ev.kind == MOE_LINK_LOST) {
            /* Transfers with it fail through the data comm (its requests end in errors); the
             * coordinator reassigns its sequences. */
            MOE_LOG_I("rank %d: member %d is gone", w->rank, ev.src);
            for (size_t i = 0; i < w->n_group; i++)
                if (w->group[i] == (uint32_t)ev.src && ev.src != w->rank)
                    w->peer_lost = ev.src;
        }
    }
    return n;
}

/* ---- engine step ---- */

static void trace_open(worker *w)
{
    const char *prefix = getenv("MOE_STEP_TRACE");
    if (!prefix || !*prefix || !w->eng)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s.%d.jsonl", prefix, w->rank);
    if (!(w->step_trace = fopen(path, "w"))) {
        MOE_LOG_W("rank %d: MOE_STEP_TRACE: cannot write %s", w->rank, path);
        return;
    }
    setvbuf(w->step_trace, NULL, _IOLBF, 0); /* a line per step survives a killed rank */
    moe_engine_get_stats(w->eng, &w->trace_prev);
}

void moe_worker_kv_trace(worker *w, uint64_t seq, const char *ev, int arg)
{
    if (w->kv_trace)
        fprintf(w->kv_trace, "{\"rank\": %d, \"t_ns\": %lld, \"seq\": %llu, \"ev\": \"%s\", \"arg\": %d}\n",
                w->rank, (long long)moe_now_ns(), (unsigned long long)seq, ev, arg);
}

static void kv_trace_open(worker *w)
{
    const char *prefix = getenv("MOE_KV_TRACE");
    if (!prefix || !*prefix)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s.%d.jsonl", prefix, w->rank);
    if (!(w->kv_trace = fopen(path, "w")))
        MOE_LOG_W("rank %d: MOE_KV_TRACE: cannot write %s", w->rank, path);
    else
        setvbuf(w->kv_trace, NULL, _IOLBF, 0);
}

/* One line per engine step that computed tokens (prefill chunks without a token too): when it
 * started (monotonic ns, comparable across the ranks of one machine), how long it took, the CPU
 * time the process got meanwhile (wall minus CPU: waiting for a core the machine's other work
 * held) and what it computed (deltas of the engine's counters): the live counterpart of moe-plan's
 * step cost model. */
static void trace_step(worker *w, int64_t t0, int64_t t1, int64_t cpu_ns, int n_events)
{
    moe_engine_stats st;
    moe_engine_get_stats(w->eng, &st);
    const moe_engine_stats *p = &w->trace_prev;
    if (st.steps == p->steps)
        return; /* nothing computed (an empty step of an expert-parallel group is not traced) */
    fprintf(w->step_trace,
            "{\"rank\": %d, \"t0_ns\": %lld, \"step_ns\": %lld, \"prefill_tokens\": %lld, \"decode_tokens\": %lld, "
            "\"attn_positions\": %lld, \"cpu_ns\": %lld, \"events\": %d, \"running\": %d}\n",
            w->rank, (long long)t0, (long long)(t1 - t0), (long long)(st.prefill_tokens - p->prefill_tokens),
            (long long)(st.decode_tokens - p->decode_tokens), (long long)(st.attn_positions - p->attn_positions),
            (long long)cpu_ns, n_events, st.n_running);
    w->trace_prev = st;
}

static moe_status step(worker *w)
{
    int64_t c0 = w->step_trace ? moe_process_cpu_ns() : 0;
    int64_t t0 = moe_now_ns();
    int n = moe_engine_step(w->eng, w->events, w->cap_events);
    if (n < 0)
        return moe_error_context(MOE_ERR_INTERNAL, "engine step: ");
    if (w->step_trace) {
        int64_t t1 = moe_now_ns();
        trace_step(w, t0, t1, moe_process_cpu_ns() - c0, n);
    }
    if (w->mig)
        moe_mig_after_step(w->mig, w->events, n); /* finished or preempted: their moves abort */
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
        p->finish = e->finish == MOE_FINISH_EOS    ? MOESERVE__CLUSTER__V1__FINISH__FINISH_EOS
                    : e->finish == MOE_FINISH_NONE ? MOESERVE__CLUSTER__V1__FINISH__FINISH_NONE
                                                   : MOESERVE__CLUSTER__V1__FINISH__FINISH_LENGTH;
        p->parked = e->parked;
        if (e->has_lp)
            moe_token_logprobs_to_pb(&e->lp, p); /* borrows w->events until the send below */
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
    moe_status st = moe_worker_send_coord(w, TAG(TOKENS), &b.base);
    if (st == MOE_ERR_UNAVAILABLE) { /* the coordinator is gone: the LOST event follows */
        MOE_LOG_W("rank %d: tokens of this step: %s", w->rank, moe_error_message());
        return MOE_OK;
    }
    if (st != MOE_OK)
        return st;
    /* Offers after the token report: the first token reaches the client as early as possible. */
    for (int i = 0; i < n; i++) {
        const moe_token_event *e = &w->events[i];
        park_t *p = moe_kv_pull_find_park(w, e->seq_id);
        if (!p)
            continue;
        if (e->parked)
            moe_kv_pull_offer(w, p);
        else if (e->finish != MOE_FINISH_NONE) { /* finished on its first token: nothing to move */
            if (p->push_xfer) /* the decode side reserved for a push: let it go */
                moe_kv_pull_send_gone(w, p->decode_rank, p->seq_id, "finished on its first token");
            moe_kv_pull_remove_park(w, p);
        }
    }
    return MOE_OK;
}

/* ---- the loop ---- */

static void worker_free(worker *w)
{
    while (w->n_parks)
        moe_kv_pull_remove_park(w, &w->parks[0]);
    while (w->n_pulls)
        moe_kv_pull_remove_pull(w, &w->pulls[0]);
    free(w->parks);
    free(w->pulls);
    free(w->tombs);
    free(w->events);
    free(w->pev);
    free(w->pevp);
    moe_mig_free(w->mig);
    w->mig = NULL;
    moe_engine_free(w->eng);
    moe_model_free(w->model);
    if (w->step_trace)
        fclose(w->step_trace);
    w->step_trace = NULL;
    if (w->kv_trace)
        fclose(w->kv_trace);
    w->kv_trace = NULL;
    if (w->have_ep)
        w->ep_comm.ops->destroy(w->ep_comm.ctx);
    moe_ep_placement_free(&w->place);
}

/* Member ids of this rank's expert-parallel group, in group order (collective over the group). */
static moe_status group_ranks(worker *w, uint32_t *out, size_t *n)
{
    *n = 1;
    out[0] = (uint32_t)w->rank;
    if (w->ep_size <= 1)
        return MOE_OK;
    if (w->ep_size > MOE_WORKER_MAX_EP)
        return moe_error(MOE_ERR_RANGE, "ep group of %d ranks", w->ep_size);
    int self = w->rank, ranks[MOE_WORKER_MAX_EP];
    moe_status st = MOE_MPI_CHECK(MPI_Allgather(&self, 1, MPI_INT, ranks, 1, MPI_INT, w->o->instance_comm));
    if (st != MOE_OK)
        return st;
    for (int i = 0; i < w->ep_size; i++)
        out[i] = (uint32_t)ranks[i];
    *n = (size_t)w->ep_size;
    return MOE_OK;
}

/* EPLB, run by every rank of an expert-parallel group after the same step: the group's summed
 * expert loads (all layers) give every rank the same plan; each binds the replicas it gets
 * (zero-copy, from the mmaps) and switches its engine to the new placement. */
static moe_status eplb_replan(worker *w)
{
    const moe_model_config *c = &w->model->cfg;
    int E = c->n_experts;
    const int64_t *tab = moe_engine_expert_load(w->eng);
    int64_t *load = calloc((size_t)E, sizeof *load);
    bool *mask = calloc((size_t)E, sizeof *mask);
    moe_ep_placement plan = {0};
    moe_status st = MOE_OK;
    if (!load || !mask)
        st = moe_error(MOE_ERR_NOMEM, "eplb: out of memory");
    for (int l = 0; st == MOE_OK && l < c->n_layers; l++)
        for (int e = 0; e < E; e++)
            load[e] += tab[(size_t)l * E + e];
    if (st == MOE_OK)
        st = MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, load, E, MPI_INT64_T, MPI_SUM, w->o->instance_comm));
    if (st == MOE_OK)
        st = moe_ep_placement_contiguous(E, w->ep_size, &plan);
    double rank_load[MOE_WORKER_MAX_EP];
    double before = 0, after = 0;
    if (st == MOE_OK) {
        before = moe_eplb_rank_load(&w->place, load, rank_load);
        st = moe_eplb_plan(&plan, load, w->o->redundant_experts);
    }
    if (st == MOE_OK) {
        after = moe_eplb_rank_load(&plan, load, rank_load);
        for (int e = 0; e < E; e++)
            mask[e] = moe_ep_placement_holds(&plan, w->ep_rank, e);
        st = moe_model_bind_experts(w->model, mask);
    }
    if (st == MOE_OK)
        st = moe_engine_set_placement(w->eng, &plan);
    if (st == MOE_OK) {
        char held[256] = "";
        size_t n = 0;
        for (int e = 0; e < E && n < sizeof held - 8; e++)
            if (mask[e] && !(e >= plan.range_begin[w->ep_rank] && e < plan.range_end[w->ep_rank]))
                n += (size_t)snprintf(held + n, sizeof held - n, "%s%d", n ? "," : "", e);
        MOE_LOG_I("rank %d: EPLB: %d replicas placed; projected max/mean rank load %.2f -> %.2f; "
                  "replicas here: %s", w->rank, w->o->redundant_experts, before, after, n ? held : "none");
        moe_ep_placement_free(&w->place);
        w->place = plan;
        plan = (moe_ep_placement){0};
    }
    moe_ep_placement_free(&plan);
    free(load);
    free(mask);
    return st;
}

/* A peer that waits this long in the loop turn's all-reduce is taken for dead even when the link
 * has not said so (a rank stopped or cut off, or the coordinator fenced this instance first and
 * its LOST events stop): the group's steps end together at the last layer's all-to-all, so a
 * healthy peer arrives within the tail of one step (logits and sampling), well under this. */
#define GROUP_WAIT_LIMIT_NS (10 * 1000000000LL)

/* The loop turn's all-reduce over the expert-parallel group, made non-blocking so that a peer's
 * death is an error in the time the link takes to notice it, not a hang until mpirun kills the
 * job: while waiting, control messages are taken in (as the loop turn would) and a LOST event for
 * a member of the group ends the wait. The pending collective is then abandoned: the caller ends
 * the process without MPI_Finalize (moe_worker_run's contract). */
static moe_status group_allreduce(worker *w, int *v, int n)
{
    MPI_Request rq;
    moe_status st = MOE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, v, n, MPI_INT, MPI_SUM, w->o->instance_comm, &rq));
    if (st != MOE_OK)
        return st;
    int64_t t0 = moe_now_ns();
    for (int spin = 0;; spin++) {
        int done = 0;
        if ((st = MOE_MPI_CHECK(MPI_Test(&rq, &done, MPI_STATUS_IGNORE))) != MOE_OK || done)
            return st;
        if (spin < 64)
            continue;
        moe_link_progress(w->o->link);
        drain_control(w);
        if (w->peer_lost)
            return moe_error(MOE_ERR_UNAVAILABLE, "member %d of this expert-parallel instance is gone: the instance is lost",
                             w->peer_lost);
        if (moe_now_ns() - t0 > GROUP_WAIT_LIMIT_NS)
            return moe_error(MOE_ERR_UNAVAILABLE, "a rank of this expert-parallel instance has not answered for %lld s: the instance is lost",
                             GROUP_WAIT_LIMIT_NS / 1000000000LL);
        moe_sleep_ns(100000);
    }
}

/* Whether this step runs. Alone: when the engine has work. Expert parallel: when any rank of the
 * instance has work, agreed by an all-reduce every loop turn, so that all ranks step together (a
 * rank with nothing still serves its experts to the others). The same all-reduce agrees on leaving
 * and on rejoining a lost coordinator (*rejoin: every rank of the group has lost it). */
static bool should_step(worker *w, bool *leave, bool *rejoin, moe_status *err)
{
    *err = MOE_OK;
    /* Without a coordinator nobody would hear the tokens: the lost one's sequences are dropped. */
    int has = w->eng && !w->coord_lost && moe_engine_has_work(w->eng) ? 1 : 0;
    *leave = w->shutdown;
    *rejoin = w->coord_lost;
    if (w->ep_size <= 1)
        return has;
    /* A rank told to shut down keeps taking part in this all-reduce until every rank of the group
     * has been told, so nobody is left waiting in it. */
    int v[3] = {has, w->shutdown ? 1 : 0, w->coord_lost ? 1 : 0};
    if ((*err = group_allreduce(w, v, 3)) != MOE_OK) {
        MOE_LOG_E("rank %d: expert-parallel all-reduce: %s", w->rank, moe_error_message());
        *leave = true;
        return false;
    }
    *leave = v[1] == w->ep_size;
    *rejoin = v[2] == w->ep_size;
    return w->eng && v[0] > 0 && !*leave;
}

/* WorkerReady: what the coordinator needs to place requests here (sent after the load, and again
 * after every rejoin). Collective over an expert-parallel group (its member ids). */
static moe_status send_ready(worker *w, double warmup_ms)
{
    const moe_worker_opts *o = w->o;
    Moeserve__Cluster__V1__WorkerReady ready;
    moeserve__cluster__v1__worker_ready__init(&ready);
    uint32_t ep_group[MOE_WORKER_MAX_EP];
    ready.rank = (uint32_t)w->rank;
    ready.instance = (uint32_t)o->instance_id;
    ready.role = (Moeserve__Cluster__V1__Role)o->role;
    ready.ok = w->eng != NULL || o->role == MOE_WORKER_SPARE;
    ready.error = w->load_error;
    ready.warmup_ms = warmup_ms;
    if (w->eng) {
        ready.kv_blocks_total = (uint32_t)w->kv_total;
        ready.kv_block_tokens = (uint32_t)w->block_tokens;
        ready.kv_block_bytes = w->block_bytes;
        ready.weight_bytes = moe_model_weight_bytes(w->model);
        ready.max_batch_tokens = (uint32_t)o->engine.max_batch_tokens;
        ready.max_seqs = (uint32_t)o->engine.max_seqs;
        ready.n_layers = (uint32_t)w->model->cfg.n_layers;
        ready.n_experts = (uint32_t)w->model->cfg.n_experts;
        ready.expert_begin = (uint32_t)w->model->expert_begin;
        ready.expert_end = (uint32_t)w->model->expert_end;
    }
    if (o->role != MOE_WORKER_SPARE && group_ranks(w, ep_group, &ready.n_ep_group_ranks) == MOE_OK) {
        ready.ep_group_ranks = ep_group;
        memcpy(w->group, ep_group, ready.n_ep_group_ranks * sizeof ep_group[0]);
        w->n_group = ready.n_ep_group_ranks;
    }
    return moe_worker_send_coord(w, TAG(WORKER_READY), &ready.base);
}

/* Every rank of the group lost the coordinator: drop what it owned and join again (a new member
 * id), retrying once a second until a coordinator answers or the rank is told to leave. */
static moe_status rejoin(worker *w, double warmup_ms)
{
    drop_everything(w);
    if (w->mig) { /* its state names members of the old membership */
        moe_mig_free(w->mig);
        w->mig = NULL;
        moe_status st = mig_start(w);
        if (st != MOE_OK)
            return st;
    }
    for (;;) {
        moe_status st = w->o->rejoin(w->o->link);
        if (st == MOE_OK)
            break;
        if (w->o->leave_flag && *w->o->leave_flag) { /* nothing left to drain: leave now */
            MOE_LOG_I("rank %d: told to leave while the coordinator is away: leaving", w->rank);
            w->shutdown = true;
            return MOE_OK;
        }
        MOE_LOG_W("rank %d: rejoin: %s (retrying)", w->rank, moe_error_message());
        moe_sleep_ns(1000000000);
    }
    w->rank = moe_link_self(w->o->link);
    w->coord_lost = false;
    w->leave_sent = false;
    MOE_LOG_I("rejoined as member %d", w->rank);
    return send_ready(w, warmup_ms);
}

moe_status moe_worker_run(const moe_worker_opts *o)
{
    worker w = {.o = o};
    moeserve__cluster__v1__counters__init(&w.ctr);
    w.rank = moe_link_self(o->link);
    w.ep_size = 1;
    if (o->instance_comm != MPI_COMM_NULL && o->role != MOE_WORKER_SPARE) {
        MPI_Comm_size(o->instance_comm, &w.ep_size);
        MPI_Comm_rank(o->instance_comm, &w.ep_rank);
    }
    moe_kv_test_hooks_from_env(&w.hooks);
    w.hang_rank = moe_test_hook_int("MOE_TEST_HANG_RANK", -1);
    w.hang_after = moe_test_hook_int("MOE_TEST_HANG_AFTER", 1);
    w.pull_delay_ms = o->role == MOE_WORKER_DECODE ? moe_test_hook_int("MOE_TEST_PULL_DELAY_MS", 0) : 0;
    w.layer_delay_ms = moe_test_hook_int("MOE_TEST_LAYER_DELAY_MS", 0);
    w.data = *o->data;

    moe_status st = MOE_OK;
    double warmup_ms = 0;
    if (o->role != MOE_WORKER_SPARE) {
        int64_t t0 = moe_now_ns();
        st = load(&w);
        if (st != MOE_OK) {
            snprintf(w.load_error, sizeof w.load_error, "%s", moe_error_message());
            MOE_LOG_E("rank %d: %s", w.rank, w.load_error);
            moe_engine_free(w.eng);
            w.eng = NULL;
        } else {
            warmup_ms = (double)(moe_now_ns() - t0) * 1e-6;
            moe_engine_set_layer_hook(w.eng, step_layer_hook, &w);
            if (o->role == MOE_WORKER_PREFILL && o->kv_layerwise)
                moe_engine_set_progress_hook(w.eng, step_progress_hook, &w);
            if (o->role == MOE_WORKER_DECODE || o->role == MOE_WORKER_MIXED) {
                if ((st = mig_start(&w)) != MOE_OK) {
                    worker_free(&w);
                    return st;
                }
            }
        }
    }
    trace_open(&w);
    kv_trace_open(&w);
    if ((st = send_ready(&w, warmup_ms)) != MOE_OK) {
        worker_free(&w);
        return st;
    }

    int64_t idle_ns = 0;
    w.next_hb = moe_now_ns();
    st = MOE_OK;
    for (;;) {
        bool busy = drain_control(&w) > 0;
        if (w.shutdown && w.ep_size <= 1)
            break;
        if (o->leave_flag && *o->leave_flag && !w.leave_sent && !w.coord_lost) {
            Moeserve__Cluster__V1__Leave lv;
            moeserve__cluster__v1__leave__init(&lv);
            lv.reason = (char *)"signalled";
            if (moe_worker_send_coord(&w, TAG(LEAVE), &lv.base) == MOE_OK) {
                MOE_LOG_I("rank %d: leaving: asked the coordinator to drain this instance", w.rank);
                w.leave_sent = true;
            }
        }
        int64_t now = moe_now_ns();
        for (int i = 0; i < w.n_parks;) {
            int before = w.n_parks;
            busy |= moe_kv_pull_progress_park(&w, &w.parks[i], now);
            if (w.n_parks == before)
                i++;
        }
        for (int i = 0; i < w.n_pulls;) {
            int before = w.n_pulls;
            busy |= moe_kv_pull_progress_pull(&w, &w.pulls[i], now);
            if (w.n_pulls == before)
                i++;
        }
        if (w.mig && moe_mig_progress(w.mig, now)) {
            busy = true;
            w.load_dirty = true;
        }
        /* A final migration stage in flight: the sequence is paused; hold the engine steps and
         * poll so that the pause lasts loop turns, not engine steps (expert-parallel ranks must
         * step together and cannot hold). */
        bool hold = w.ep_size == 1 && moe_mig_hold(w.mig);
        bool leave = false, lost = false;
        moe_status group_st = MOE_OK;
        if (!hold && should_step(&w, &leave, &lost, &group_st)) {
            if ((st = step(&w)) != MOE_OK) {
                MOE_LOG_E("rank %d: %s", w.rank, moe_error_message());
                break;
            }
            /* Steps run in lock-step inside an expert-parallel group, so every rank reaches the
             * same step count here and re-plans together. */
            if (w.ep_size > 1 && o->redundant_experts > 0 && o->eplb_interval > 0 &&
                ++w.ep_steps % o->eplb_interval == 0 && (st = eplb_replan(&w)) != MOE_OK) {
                MOE_LOG_E("rank %d: %s", w.rank, moe_error_message());
                break;
            }
            busy = true;
        }
        if (group_st != MOE_OK) {
            st = group_st;
            break;
        }
        if (leave)
            break;
        if (lost) {
            if (!o->rejoin) {
                st = moe_error(MOE_ERR_UNAVAILABLE, "rank %d: the coordinator is gone", w.rank);
                break;
            }
            if ((st = rejoin(&w, warmup_ms)) != MOE_OK || w.shutdown)
                break;
            continue;
        }
        now = moe_now_ns();
        /* Load changes (frees) are reported promptly, but at most every 10 ms. */
        if (!w.coord_lost && (now >= w.next_hb || (w.load_dirty && now - w.last_hb >= 10000000)))
            send_heartbeat(&w, TAG(HEARTBEAT));
        moe_link_progress(o->link);
        bool transfers = false;
        for (int i = 0; i < w.n_parks && !transfers; i++)
            transfers = w.parks[i].send != NULL;
        for (int i = 0; i < w.n_pulls && !transfers; i++)
            transfers = w.pulls[i].phase == PULL_RECEIVING;
        transfers |= moe_mig_transferring(w.mig);
        if (busy) {
            idle_ns = 0;
        } else if (hold) {
            idle_ns = 0;
            moe_sleep_ns(20000); /* poll often, but leave the core to the peer (ranks may share cores) */
        } else {
            /* Nothing to do: nap, growing from 20 us to 2 ms (0.5 ms while bytes are moving). */
            int64_t cap = transfers ? 500000 : 2000000;
            idle_ns = idle_ns ? idle_ns * 2 : 20000;
            if (idle_ns > cap)
                idle_ns = cap;
            moe_sleep_ns(idle_ns);
        }
    }
    if (w.shutdown) {
        MOE_LOG_D("rank %d: shutting down", w.rank);
        send_heartbeat(&w, TAG(BYE));
    }
    moe_mig_free(w.mig); /* aborts moves in flight: the peers are told before the flush */
    w.mig = NULL;
    moe_link_flush(o->link, 5000);
    worker_free(&w);
    return st;
}
