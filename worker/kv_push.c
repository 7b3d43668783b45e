/* Layer-by-layer KV hand-off between a prefill and a decode worker (DistServe's "a layer's KV can
 * leave while later layers compute"): when a prefill starts, the prefill side asks its decode rank
 * to reserve (KvReserve); a decode rank with room reserves the blocks, posts one receive per
 * (layer, block) slice, layer-major, and accepts (KvPull with layerwise). From then on the
 * prefill side posts each layer's slices from inside the engine step, right after that layer's
 * attention wrote them (moe_engine_set_layer_hook), so that when the first token is sampled only
 * the last layer is still on its way. The KvOffer after the prefill carries the final state
 * (first token, sampler), the KvHeader the slices' checksums. Anything that goes wrong falls back
 * to the pull of worker/kv_pull.c: no room -> no accept -> the offer is pulled as usual; a failed
 * push -> attempt 2 is a whole-block pull; then the decode side recomputes. */
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "worker/seq_state_pb.h"
#include "worker/worker_internal.h"

/* ---- prefill side ---- */

/* Blocks that hold the prefilled positions' K/V (what the decode side reserves and the push sends
 * per layer): the prompt, and for a resumed sequence the tokens it had already generated. */
static int prefill_blocks(const worker *w, const park_t *p)
{
    return (p->prefill_tokens + w->block_tokens - 1) / w->block_tokens;
}

void moe_kv_push_reserve(worker *w, park_t *p)
{
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (!w->eng || moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb) != MOE_OK)
        return;
    st.n_tokens = p->prefill_tokens; /* before the token this prefill samples */
    st.n_generated = p->prefill_tokens - st.n_prompt;
    st.n_computed = p->prefill_tokens; /* what the decode side will hold once the push landed */
    moe_seq_state_pb s;
    moe_seq_state_to_pb(&st, &s);
    pb_reserve m;
    moeserve__cluster__v1__kv_reserve__init(&m);
    m.state = &s.s;
    m.n_blocks = (uint32_t)prefill_blocks(w, p);
    m.block_bytes = w->block_bytes;
    m.n_layers = (uint32_t)moe_engine_kv_layers(w->eng);
    moe_worker_send_peer(w, p->decode_rank, TAG(KV_RESERVE), &m.base);
    moe_worker_kv_trace(w, p->seq_id, "reserve_sent", (int)m.n_blocks);
}

/* Posts layer `layer`'s slices of every block of p's sequence. False when the push cannot go on
 * (the decode side's receives then time out and it pulls or recomputes). */
static bool push_layer(worker *w, park_t *p, int layer)
{
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb) != MOE_OK || nb != p->push_blocks)
        return false;
    /* Runs inside the engine step: the views (one slice per layer of each block) are opened once
     * per push, at its first layer; each layer then downloads its own slices (a no-op on a host
     * pool, where the views are the blocks), after the layer's K/V writes on the backend. */
    int layers = moe_engine_kv_layers(w->eng);
    moe_status s = layer == 0 ? moe_kv_stage_open(&p->stage, moe_engine_kv_cache(w->eng), blocks,
                                                  nb, layers, w->hooks.force_staging)
                              : MOE_OK;
    if (s == MOE_OK && (p->stage.n_slices != layers || p->stage.nb != nb))
        s = moe_error(MOE_ERR_INTERNAL, "layer %d pushed before layer 0", layer);
    if (s == MOE_OK)
        s = moe_kv_stage_download(&p->stage, layer, 1);
    if (s == MOE_OK)
        s = moe_kv_send_append(p->send, moe_kv_stage_views(&p->stage, layer), nb,
                               p->push_sums + (size_t)layer * (size_t)nb);
    if (s != MOE_OK) {
        MOE_LOG_E("seq %llu: layer %d: %s", (unsigned long long)p->seq_id, layer,
                  moe_error_message());
        return false;
    }
    p->push_layers = layer + 1;
    moe_worker_kv_trace(w, p->seq_id, "post", layer);
    return true;
}

void moe_kv_push_stop(park_t *p)
{
    moe_kv_send_free(p->send); /* detached: a receiver still waiting times out, then pulls */
    p->send = NULL;
    free(p->push_sums);
    p->push_sums = NULL;
    p->push_xfer = 0;
}

void moe_kv_push_on_accept(worker *w, int src, const pb_pull *m)
{
    park_t *p = moe_kv_pull_find_park(w, m->seq_id);
    if (!p || src != p->decode_rank || p->push_xfer || !w->eng) {
        moe_kv_pull_send_gone(w, src, m->seq_id,
                              !p ? "freed (finished, cancelled or failed)" : "no push expected from you");
        return;
    }
    moe_seq_state st;
    const int *blocks;
    int nb;
    if (moe_engine_export(w->eng, p->seq_id, &st, &blocks, &nb) != MOE_OK) {
        moe_kv_pull_send_gone(w, src, m->seq_id, "not in the engine");
        return;
    }
    int layers = moe_engine_kv_layers(w->eng);
    p->push_blocks = prefill_blocks(w, p);
    p->push_sums = calloc((size_t)layers * (size_t)(p->push_blocks ? p->push_blocks : 1),
                          sizeof *p->push_sums);
    moe_status s = p->push_sums ? moe_kv_send_start(&w->data, NULL, 0, moe_engine_kv_layer_bytes(w->eng),
                                                    src, moe_kv_data_tag(m->xfer_id), 1, &w->hooks,
                                                    NULL, &p->send)
                                : MOE_ERR_NOMEM;
    if (s != MOE_OK) {
        free(p->push_sums);
        p->push_sums = NULL;
        p->send = NULL;
        return; /* the decode side's receives time out after the offer; it pulls then */
    }
    p->push_xfer = m->xfer_id;
    p->push_layers = 0;
    moe_worker_kv_trace(w, p->seq_id, "accept", p->parked);
    p->send_deadline = INT64_MAX; /* until parked: the prefill may take a while */
    if (p->parked)
        moe_kv_push_after_park(w, p); /* the accept came after the prefill: push it all now */
}

void moe_kv_push_layer_hook(void *ctx, int layer, const uint64_t *ids, int n)
{
    worker *w = ctx;
    for (int i = 0; i < n; i++) {
        park_t *p = moe_kv_pull_find_park(w, ids[i]);
        if (p && p->push_xfer && p->push_layers == layer && !push_layer(w, p, layer))
            moe_kv_push_stop(p);
    }
    moe_kv_push_progress(w, false);
}

void moe_kv_push_progress(worker *w, bool one_test)
{
    /* Open MPI moves bytes only inside MPI calls: a rendezvous slice's data leaves once the
     * sender's progress sees the receiver's answer. */
    w->push_progress_ns = moe_now_ns();
    for (int i = 0; i < w->n_parks; i++) {
        park_t *p = &w->parks[i];
        bool done = false;
        if (p->push_xfer && p->send &&
            (one_test ? moe_kv_send_progress(p->send) : moe_kv_send_poll(p->send, &done)) != MOE_OK)
            moe_kv_push_stop(p);
        else if (p->push_xfer && p->send && done && p->push_layers == moe_engine_kv_layers(w->eng) &&
                 !p->traced_left) {
            p->traced_left = true;
            moe_worker_kv_trace(w, p->seq_id, "left", 1);
        }
    }
}

void moe_kv_push_after_park(worker *w, park_t *p)
{
    if (!p->push_xfer || !p->send)
        return;
    int layers = moe_engine_kv_layers(w->eng);
    while (p->push_layers < layers)
        if (!push_layer(w, p, p->push_layers)) {
            moe_kv_push_stop(p);
            return;
        }
    pb_header h;
    moeserve__cluster__v1__kv_header__init(&h);
    h.seq_id = p->seq_id;
    h.xfer_id = p->push_xfer;
    h.n_checksums = (size_t)layers * (size_t)p->push_blocks;
    h.checksums = p->push_sums;
    moe_worker_send_peer(w, p->decode_rank, TAG(KV_HEADER), &h.base);
    moe_worker_kv_trace(w, p->seq_id, "header", (int)h.n_checksums);
    p->send_deadline = moe_now_ns() + moe_worker_ms_ns(w->o->kv_timeout_ms) * 2;
}

/* ---- decode side ---- */

void moe_kv_push_on_reserve(worker *w, int src, pb_reserve *m)
{
    const pb_state *s = m->state;
    uint64_t id = s ? s->seq_id : 0;
    bool ok = s && w->eng && w->pull_delay_ms == 0 && !moe_kv_pull_has_tomb(w, id) &&
              m->block_bytes == w->block_bytes && m->n_layers > 0 &&
              (int)m->n_layers == moe_engine_kv_layers(w->eng) &&
              m->block_bytes % m->n_layers == 0;
    moe_engine_stats es;
    if (ok) {
        moe_engine_get_stats(w->eng, &es);
        /* Room now, and not the last of it: running sequences must still be able to grow. */
        ok = (int64_t)es.kv_blocks_total - es.kv_blocks_used >= (int64_t)m->n_blocks + es.n_running;
    }
    if (ok)
        for (int i = 0; i < w->n_pulls && ok; i++)
            ok = w->pulls[i].seq_id != id;
    if (ok && !moe_grow((void **)&w->pulls, &w->cap_pulls, w->n_pulls + 1, sizeof *w->pulls))
        ok = false;
    moe_seq_state st = {0};
    const int *blocks = NULL;
    int nb = 0;
    if (ok) {
        moe_seq_state_from_pb(s, &st);
        ok = moe_engine_import(w->eng, &st, &blocks, &nb) == MOE_OK;
        if (ok && (uint32_t)nb != m->n_blocks) {
            moe_worker_engine_drop(w, id);
            ok = false;
        }
    }
    /* Declined: no answer; the offer after the prefill is pulled as usual. */
    if (!ok) {
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return;
    }
    int layers = (int)m->n_layers;
    size_t slice = (size_t)(m->block_bytes / m->n_layers);
    protobuf_c_message_free_unpacked(&m->base, NULL);
    /* One view per (layer, block) slice, layer-major as the prefill side sends them; uploaded once
     * the whole push verified (worker/kv_pull.c), in place on a host pool. */
    moe_kv_stage stage = {0};
    uint32_t xfer = ++w->next_xfer;
    moe_kv_recv *recv = NULL;
    moe_status rs = moe_kv_stage_open(&stage, moe_engine_kv_cache(w->eng), blocks, nb, layers,
                                      w->hooks.force_staging);
    if (rs == MOE_OK && stage.slice_bytes != slice)
        rs = moe_error(MOE_ERR_INTERNAL, "kv push: slices of %zu bytes, %zu expected",
                       stage.slice_bytes, slice);
    /* No deadline until the offer says the prefill is done. */
    if (rs == MOE_OK)
        rs = moe_kv_recv_start(&w->data, moe_kv_stage_views(&stage, 0), layers * nb, slice, src,
                               moe_kv_data_tag(xfer), INT64_MAX, &recv);
    if (rs != MOE_OK) {
        moe_kv_stage_free(&stage);
        moe_worker_engine_drop(w, id);
        return;
    }
    moe_kv_recv_set_waiting(recv, true); /* until the offer: the prefill still computes */
    w->pulls[w->n_pulls++] = (pull_t){.seq_id = id,
                                      .src = src,
                                      .phase = PULL_RECEIVING,
                                      .attempt = 1,
                                      .xfer_id = xfer,
                                      .recv = recv,
                                      .imported = true,
                                      .held_blocks = nb,
                                      .push = true,
                                      .stage = stage};
    w->load_dirty = true;
    moe_worker_kv_trace(w, id, "reserve_in", layers * nb);
    pb_pull a;
    moeserve__cluster__v1__kv_pull__init(&a);
    a.seq_id = id;
    a.xfer_id = xfer;
    a.attempt = 1;
    a.layerwise = true;
    moe_worker_send_peer(w, src, TAG(KV_PULL), &a.base);
}
