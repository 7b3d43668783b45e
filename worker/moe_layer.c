/* The MoE block: softmax router and top-k, experts computed per expert over the tokens routed to
 * it, Qwen2-MoE's gated shared expert; locally, or expert-parallel across an instance's ranks with
 * a dispatch all-to-all (token rows to the ranks holding their experts) and a combine all-to-all
 * (expert outputs back, weighted and summed in the source's order), plain or as two overlapped
 * micro-batches (two-batch overlap). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/test_hook.h"
#include "worker/forward_internal.h"

void moe_fwd_linear(moe_forward *f, float *y, const float *x, const moe_weight *w, int n_tok)
{
    const moe_matmul_desc d = moe_fwd_desc(y, x, w, n_tok);
    f->be->ops->matmul_batch(f->be, &d, 1);
}

moe_matmul_desc moe_fwd_desc(float *y, const float *x, const moe_weight *w, int n_tok)
{
    return (moe_matmul_desc){y, x, w->data, w->dtype, n_tok, w->cols, w->rows};
}

void moe_fwd_swiglu(moe_forward *f, float *out, const float *in, int n, const moe_weight *gate,
                    const moe_weight *up, const moe_weight *down)
{
    int ffn = gate->rows;
    /* gate and up in one batch (one synchronisation, x quantized once) */
    const moe_matmul_desc gu[2] = {moe_fwd_desc(f->eg, in, gate, n), moe_fwd_desc(f->eu, in, up, n)};
    f->be->ops->matmul_batch(f->be, gu, 2);
    f->be->ops->silu_mul(f->be, f->eg, f->eu, (size_t)n * ffn);
    moe_fwd_linear(f, out, f->eg, down, n);
}

/* Router: top_idx / top_w for every token (HF order: softmax over all experts in f32, top-k,
 * optional renormalisation), then their host views: the host groups the rows per expert. On a
 * device backend that download is the one synchronisation of a MoE layer (docs/backends.md),
 * skipped when the experts run on the backend (on_backend: device_experts). */
static moe_status route(moe_forward *f, const moe_layer_weights *lw, int T, bool on_backend)
{
    int E = f->n_exp, K = f->topk;
    if (T == 0)
        return MOE_OK;
    moe_fwd_linear(f, f->router, f->xb, &lw->router, T);
    f->be->ops->router(f->be, f->router, T, E, K, f->c->norm_topk_prob, f->top_idx, f->top_w);
    if (f->host_mem || on_backend)
        return MOE_OK;
    size_t n = (size_t)T * K;
    moe_status st = f->be->ops->download(f->be, f->top_idx_h, f->top_idx, n * sizeof(int32_t));
    return st != MOE_OK ? st : f->be->ops->download(f->be, f->top_w_h, f->top_w, n * sizeof(float));
}

/* ---- expert parallel ---- */

moe_status moe_fwd_tbo_alloc(moe_forward *f)
{
    moe_fwd_tbo_free(f);
    size_t S = (size_t)f->ep_size;
    f->tbo_cnt = calloc(4 * S, sizeof(int));
    f->tbo_cnt2 = calloc(4 * S, sizeof(int));
    f->tbo_xfer = calloc(16 * S, sizeof(int));
    f->tbo_where = calloc((size_t)f->max_tokens * (size_t)f->topk, sizeof(int));
    if (!f->tbo_cnt || !f->tbo_cnt2 || !f->tbo_xfer || !f->tbo_where)
        return moe_error(MOE_ERR_NOMEM, "forward: cannot allocate overlap arrays for %zu ranks", S);
    return MOE_OK;
}

void moe_fwd_tbo_free(moe_forward *f)
{
    free(f->tbo_cnt);
    free(f->tbo_cnt2);
    free(f->tbo_xfer);
    free(f->tbo_where);
    f->tbo_cnt = f->tbo_cnt2 = f->tbo_xfer = f->tbo_where = NULL;
}

enum { X_DISPATCH_A, X_DISPATCH_B, X_COMBINE_A, X_COMBINE_B };

/* One exchange's arrays in f->tbo_xfer: send bytes, send offsets, receive bytes, receive offsets.
 */
typedef struct {
    int *bs, *os, *br, *orr;
} xfer_t;

/* Fills exchange x's byte counts and offsets from row counts, and adds its payload to the
 * statistics. */
static xfer_t layout(moe_forward *f, int x, const int *cnt_send, size_t send_row,
                     const int *cnt_recv, size_t recv_row)
{
    int S = f->ep_size, so = 0, ro = 0;
    int *base = f->tbo_xfer + (size_t)x * 4 * S;
    xfer_t t = {base, base + S, base + 2 * S, base + 3 * S};
    for (int p = 0; p < S; p++) {
        t.bs[p] = (int)((size_t)cnt_send[p] * send_row);
        t.br[p] = (int)((size_t)cnt_recv[p] * recv_row);
        t.os[p] = so;
        t.orr[p] = ro;
        so += t.bs[p];
        ro += t.br[p];
        f->ep_stat.bytes_sent += t.bs[p];
        if (p != f->ep_rank)
            f->ep_stat.bytes_remote += t.bs[p];
    }
    return t;
}

/* On a device backend the rows to send are written by ops still queued on its stream, which the
 * comm (NCCL's own stream) does not wait for: let them land first. */
static moe_status ready_to_send(moe_forward *f)
{
    return f->host_mem ? MOE_OK : f->be->ops->synchronize(f->be);
}

static moe_status exchange(moe_forward *f, int x, const void *send, const int *cnt_send,
                           size_t send_row, void *recv, const int *cnt_recv, size_t recv_row)
{
    xfer_t t = layout(f, x, cnt_send, send_row, cnt_recv, recv_row);
    moe_status st = ready_to_send(f);
    if (st != MOE_OK)
        return st;
    int64_t t0 = moe_now_ns();
    st = f->ep->ops->alltoallv(f->ep->ctx, send, t.bs, t.os, recv, t.br, t.orr);
    f->ep_stat.wait_ns += moe_now_ns() - t0;
    return st;
}

/* Posts exchange x without waiting; f->tbo_req[x] holds it until it completes. */
static moe_status post(moe_forward *f, int x, const void *send, const int *cnt_send,
                       size_t send_row, void *recv, const int *cnt_recv, size_t recv_row)
{
    xfer_t t = layout(f, x, cnt_send, send_row, cnt_recv, recv_row);
    moe_status st = ready_to_send(f);
    if (st != MOE_OK)
        return st;
    return f->ep->ops->ialltoallv(f->ep->ctx, send, t.bs, t.os, recv, t.br, t.orr, &f->tbo_req[x]);
}

static moe_status await(moe_forward *f, int x)
{
    if (!f->tbo_req[x])
        return MOE_OK; /* completed while progressing */
    int64_t t0 = moe_now_ns();
    moe_status st;
    if (f->ep->ops->wait) {
        st = f->ep->ops->wait(f->ep->ctx, f->tbo_req[x]);
    } else {
        bool done = false;
        while ((st = f->ep->ops->test(f->ep->ctx, f->tbo_req[x], &done)) == MOE_OK && !done) {
        }
    }
    f->tbo_req[x] = NULL;
    f->ep_stat.wait_ns += moe_now_ns() - t0;
    return st;
}

/* Advances the exchanges in flight: Open MPI moves the data of a non-blocking collective only
 * inside MPI calls (no progress thread), so the expert loop calls this between matmuls; the
 * caller's transfers too (moe_forward_set_progress_hook). */
static void progress(moe_forward *f)
{
    if (f->progress_hook)
        f->progress_hook(f->progress_hook_ctx);
    if (f->tbo_no_progress)
        return;
    for (int x = 0; x < 4; x++) {
        if (!f->tbo_req[x])
            continue;
        bool done = false;
        moe_status st = f->ep->ops->test(f->ep->ctx, f->tbo_req[x], &done);
        if (st != MOE_OK && f->tbo_err == MOE_OK)
            f->tbo_err = st;
        if (done || st != MOE_OK)
            f->tbo_req[x] = NULL; /* test released it */
    }
}

/* Runs every expert over its rows. rows: (n, stride) with row i for expert expert_of[i] (its first
 * d floats are the input), or, where row_of is given, row row_of[i] for assignment i (the local
 * path reads the token rows in place rather than copying each token top_k times first: at a
 * 2048-token prefill that copy was T*K*d floats, 128 MiB on OLMoE); out: (n, d). Grouped so each
 * expert's weights are read once for all its rows. Progresses the exchanges in flight between
 * matmuls.
 * at NULL: out in assignment order, each expert's rows gathered into eh, its outputs computed in
 * eo and scattered (the expert-parallel paths send out in that order). at given: out in expert
 * order, at[i] the row of assignment i: each expert's rows are gathered straight into their
 * place in out and its down projection overwrites them there (gate and up have read them by
 * then), so eh and eo are never touched (32 MiB less resident at a 2048-token OLMoE prefill) and
 * the scatter copy goes. The floats are the same either way: rows are computed independently. */
static void run_experts(moe_forward *f, const moe_layer_weights *lw, int layer, const float *rows_in,
                        size_t stride, const int *row_of, const int *expert_of, int n, float *out,
                        int *at)
{
    int64_t t0 = moe_now_ns();
    int E = f->n_exp, d = f->d;
    memset(f->exp_count, 0, sizeof(int) * (size_t)E);
    for (int i = 0; i < n; i++)
        f->exp_count[expert_of[i]]++;
    f->exp_off[0] = 0;
    for (int e = 0; e < E; e++)
        f->exp_off[e + 1] = f->exp_off[e] + f->exp_count[e];
    memset(f->exp_count, 0, sizeof(int) * (size_t)E);
    int *order = f->ep_order ? f->ep_order : f->exp_tok;
    for (int i = 0; i < n; i++) {
        int e = expert_of[i];
        order[f->exp_off[e] + f->exp_count[e]++] = i;
    }
    /* The gather's source rows in expert order; exp_tok is free as scratch where row_of is given
     * (only the local path gives it, and there expert_of is not exp_tok). */
    const int *src = order;
    if (row_of) {
        for (int i = 0; i < n; i++)
            f->exp_tok[i] = row_of[order[i]];
        src = f->exp_tok;
    }
    /* Experts go in groups, each in two pool runs: gate and up of every expert of the group,
     * then every down. At decode a step has a handful of rows per expert and each matrix is a few
     * tens of microseconds of work, so one run per matrix would spend much of the step in pool
     * synchronisation and idle tails. A group is as many experts as eh/eg/eu/eo hold rows for
     * (S*T: all of them unless every token chose this rank's experts top_k times over) and one
     * batch takes. Each matrix's outputs are bit-identical to running it alone. */
    enum { GMAX = MOE_MATMUL_BATCH_MAX / 2 };
    const int cap = f->ep_size * f->max_tokens, fm = f->ffn_max;
    for (int e = 0; e < E;) {
        moe_matmul_desc gu[2 * GMAX], dn[GMAX];
        int ge[GMAX], goff[GMAX], ng = 0, rows = 0;
        for (; e < E && ng < GMAX; e++) {
            int cnt = f->exp_off[e + 1] - f->exp_off[e];
            if (cnt == 0)
                continue;
            if (rows + cnt > cap) /* cnt <= cap: at most one row per token of each source */
                break;
            f->expert_tokens[(size_t)layer * E + e] += cnt;
            float *xin = at ? out + (size_t)f->exp_off[e] * d : f->eh + (size_t)rows * d;
            float *y = at ? xin : f->eo + (size_t)rows * d;
            f->be->ops->gather(f->be, xin, (size_t)d, rows_in, stride, src + f->exp_off[e], cnt, d);
            gu[2 * ng] = moe_fwd_desc(f->eg + (size_t)rows * fm, xin, &lw->exp_gate[e], cnt);
            gu[2 * ng + 1] = moe_fwd_desc(f->eu + (size_t)rows * fm, xin, &lw->exp_up[e], cnt);
            dn[ng] = moe_fwd_desc(y, f->eg + (size_t)rows * fm, &lw->exp_down[e], cnt);
            ge[ng] = e;
            goff[ng++] = rows;
            rows += cnt;
        }
        f->be->ops->matmul_batch(f->be, gu, 2 * ng);
        progress(f);
        for (int g = 0; g < ng; g++) /* each expert's (cnt, ffn) block is contiguous */
            f->be->ops->silu_mul(f->be, f->eg + (size_t)goff[g] * fm, f->eu + (size_t)goff[g] * fm,
                                 (size_t)gu[2 * g].n_tok * gu[2 * g].n_out);
        f->be->ops->matmul_batch(f->be, dn, ng);
        progress(f);
        for (int g = 0; g < ng && !at; g++)
            f->be->ops->scatter(f->be, out, (size_t)d, f->eo + (size_t)goff[g] * d, (size_t)d,
                                order + f->exp_off[ge[g]], dn[g].n_tok, d);
    }
    for (int j = 0; at && j < n; j++)
        at[order[j]] = j;
    f->ep_stat.expert_ns += moe_now_ns() - t0;
}

/* ---- the routed experts on the backend, no host round trip (device backends, EP off) ---- */

/* Whether a layer's experts can run through matmul_grouped: every expert present, gate/up
 * (ffn, d) and down (d, ffn) of one dtype per matrix, which the backend supports. */
static bool dev_layer_fits(const moe_forward *f, const moe_layer_weights *lw)
{
    const moe_weight *g0 = &lw->exp_gate[0], *u0 = &lw->exp_up[0], *d0 = &lw->exp_down[0];
    int ffn = g0->rows;
    for (int e = 0; e < f->n_exp; e++) {
        const moe_weight *g = &lw->exp_gate[e], *u = &lw->exp_up[e], *dn = &lw->exp_down[e];
        if (!g->data || !u->data || !dn->data || g->rows != ffn || g->cols != f->d || u->rows != ffn ||
            u->cols != f->d || dn->rows != f->d || dn->cols != ffn || g->dtype != g0->dtype ||
            u->dtype != u0->dtype || dn->dtype != d0->dtype)
            return false;
    }
    const moe_backend *be = f->be;
    return ffn <= f->ffn_max && be->ops->supports(be, MOE_OP_MATMUL_GROUPED, g0->dtype) &&
           be->ops->supports(be, MOE_OP_MATMUL_GROUPED, u0->dtype) &&
           be->ops->supports(be, MOE_OP_MATMUL_GROUPED, d0->dtype);
}

moe_status moe_fwd_dev_moe_alloc(moe_forward *f)
{
    int L = f->c->n_layers, E = f->n_exp;
    bool want = !f->host_mem || moe_test_hook_int("MOE_TEST_DEVICE_MOE", 0) != 0;
    if (!want || E <= 0)
        return MOE_OK;
    bool any = false;
    f->dx_layer = calloc((size_t)L, sizeof *f->dx_layer);
    if (!f->dx_layer)
        return moe_error(MOE_ERR_NOMEM, "forward: out of memory");
    for (int l = 0; l < L; l++)
        any |= f->dx_layer[l] = f->m->layers[l].is_moe && dev_layer_fits(f, &f->m->layers[l]);
    if (!any)
        return MOE_OK;
    moe_backend *be = f->be;
    size_t n = (size_t)f->max_tokens * (size_t)f->topk, ffn = (size_t)f->ffn_max;
    f->dx_off = be->ops->alloc(be, sizeof(int32_t) * ((size_t)E + 1));
    f->dx_src = be->ops->alloc(be, sizeof(int32_t) * n);
    f->dx_slot = be->ops->alloc(be, sizeof(int32_t) * n);
    f->dx_g = be->ops->alloc(be, sizeof(float) * n * ffn);
    f->dx_u = be->ops->alloc(be, sizeof(float) * n * ffn);
    f->dx_tally = be->ops->alloc(be, sizeof(int64_t) * (size_t)L * (size_t)E);
    f->dx_tally_h = calloc((size_t)L * (size_t)E, sizeof(int64_t));
    f->dx_w = calloc((size_t)E, sizeof *f->dx_w);
    if (!f->dx_off || !f->dx_src || !f->dx_slot || !f->dx_g || !f->dx_u || !f->dx_tally ||
        !f->dx_tally_h || !f->dx_w)
        return moe_error(MOE_ERR_NOMEM, "forward: %s backend cannot hold the grouped expert rows (%zu x %zu)",
                         be->name, n, ffn);
    MOE_LOG_I("forward: routed experts grouped on the %s backend (no host round trip per layer)", be->name);
    return MOE_OK;
}

void moe_fwd_dev_moe_free(moe_forward *f)
{
    void *dev[] = {f->dx_off, f->dx_src, f->dx_slot, f->dx_g, f->dx_u, f->dx_tally};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i])
            f->be->ops->free(f->be, dev[i]);
    free(f->dx_layer);
    free(f->dx_tally_h);
    free((void *)f->dx_w);
    f->dx_off = f->dx_src = f->dx_slot = NULL;
    f->dx_g = f->dx_u = NULL;
    f->dx_tally = f->dx_tally_h = NULL;
    f->dx_layer = NULL;
    f->dx_w = NULL;
}

moe_status moe_fwd_dev_moe_step_end(moe_forward *f)
{
    if (!f->dx_off || f->ep)
        return MOE_OK;
    int L = f->c->n_layers, E = f->n_exp;
    moe_status st = f->be->ops->download(f->be, f->dx_tally_h, f->dx_tally,
                                         sizeof(int64_t) * (size_t)L * (size_t)E);
    if (st != MOE_OK)
        return st;
    for (int l = 0; l < L; l++)
        if (f->dx_layer[l])
            memcpy(f->expert_tokens + (size_t)l * E, f->dx_tally_h + (size_t)l * E, sizeof(int64_t) * (size_t)E);
    return MOE_OK;
}

static bool on_backend(const moe_forward *f, int layer)
{
    return f->dx_off && !f->ep && f->dx_layer[layer];
}

/* The expert-parallel-free MoE block on the backend: choices grouped per expert (expert_sort),
 * gate and up over the grouped rows read straight from xb (matmul_grouped with x_row), SwiGLU over
 * all rows at once, down, and the outputs added per token in choice order (expert_combine: the
 * sums of local_experts' ep_combine). Row counts never leave the backend. */
static void device_experts(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    moe_backend *be = f->be;
    const moe_backend_ops *o = be->ops;
    int E = f->n_exp, K = f->topk, d = f->d, ffn = lw->exp_gate[0].rows;
    int64_t t0 = moe_now_ns();
    o->expert_sort(be, f->top_idx, T, K, E, f->dx_off, f->dx_src, f->dx_slot, f->dx_tally + (size_t)layer * E);
    /* each token picks an expert at most once: T rows bound every expert's count */
    for (int e = 0; e < E; e++)
        f->dx_w[e] = lw->exp_gate[e].data;
    o->matmul_grouped(be, f->dx_g, f->xb, f->dx_src, f->dx_w, lw->exp_gate[0].dtype, f->dx_off, E, d, ffn, T);
    for (int e = 0; e < E; e++)
        f->dx_w[e] = lw->exp_up[e].data;
    o->matmul_grouped(be, f->dx_u, f->xb, f->dx_src, f->dx_w, lw->exp_up[0].dtype, f->dx_off, E, d, ffn, T);
    o->silu_mul(be, f->dx_g, f->dx_u, (size_t)T * K * ffn);
    for (int e = 0; e < E; e++)
        f->dx_w[e] = lw->exp_down[e].data;
    o->matmul_grouped(be, f->ep_back, f->dx_g, NULL, f->dx_w, lw->exp_down[0].dtype, f->dx_off, E, ffn, d, T);
    o->expert_combine(be, f->moe_out, f->ep_back, f->dx_slot, f->top_w, T, K, d);
    f->ep_stat.expert_ns += moe_now_ns() - t0;
}

/* ---- local: every expert on this rank ---- */

static void local_experts(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    int d = f->d, K = f->topk, n = T * K;
    /* One assignment per (token, choice), its input token pk_row[i] read from xb in place; the
     * outputs in expert order in the expert-parallel back buffer (T*K x d), added up per token
     * in choice order through at. */
    int *expert_of = f->ep_send_tok; /* reused as scratch: [T*K] */
    int *at = f->tbo_where;          /* likewise: the two-batch overlap needs expert parallelism */
    for (int i = 0; i < n; i++) {
        expert_of[i] = f->top_idx_h[i];
        f->pk_row[i] = i / K;
    }
    run_experts(f, lw, layer, f->xb, (size_t)d, f->pk_row, expert_of, n, f->ep_back, at);
    f->be->ops->ep_combine(f->be, f->moe_out, f->ep_back, f->pk_row, f->top_w_h, at, n, d);
}

/* Packs the n assignments into send slots grouped by destination rank (dest[i]), in assignment
 * order within a rank; cnt[S] gets the rows per destination. The plain exchange's layout; its slot
 * order is also the order in which every path adds the outputs up (ep_experts). */
static void pack(moe_forward *f, const int *dest, int n, int *cnt)
{
    int S = f->ep_size, d = f->d, K = f->topk;
    memset(cnt, 0, sizeof(int) * (size_t)S);
    for (int i = 0; i < n; i++)
        cnt[dest[i]]++;
    int fill[S];
    for (int p = 0, o = 0; p < S; p++) {
        fill[p] = o;
        o += cnt[p];
    }
    for (int i = 0; i < n; i++) {
        int sl = fill[dest[i]]++;
        f->pk_row[sl] = i / K;
        f->pk_tag[sl] = f->top_idx_h[i];
        f->ep_send_tok[sl] = i / K;
        f->ep_send_w[sl] = f->top_w_h[i];
    }
    f->be->ops->ep_pack(f->be, f->ep_send, f->xb, f->pk_row, f->pk_tag, n, d);
}

/* Micro-batch (0: A, 1: B) of assignment i sent to rank r. By token: the first half of the tokens
 * is A. By expert: the first half of r's primary experts is A (replicas: by parity), so each
 * expert's weights are read once per layer, not once per micro-batch. */
static int half_of(const moe_forward *f, int i, int r, int nA)
{
    if (f->ep_overlap == MOE_FWD_OVERLAP_TOKENS)
        return i >= nA;
    int e = f->top_idx_h[i], b = f->place.range_begin[r], end = f->place.range_end[r];
    if (e >= b && e < end)
        return e >= b + (end - b + 1) / 2;
    return e & 1;
}

/* Packs for the overlapped exchange: micro-batch A's rows first, then B's, each grouped by
 * destination rank; sA/sB[S] get their rows per destination. ep_send_tok / ep_send_w stay in the
 * plain layout's slot order and tbo_where[plain slot] names the row's place in A|B order, so the
 * outputs are added up in exactly the plain exchange's order. */
static void pack_halves(moe_forward *f, const int *dest, int n, int nA, int *sA, int *sB)
{
    int S = f->ep_size, d = f->d, K = f->topk;
    int *half = f->exp_tok; /* scratch [n] until the receive side needs it */
    memset(sA, 0, sizeof(int) * (size_t)S);
    memset(sB, 0, sizeof(int) * (size_t)S);
    for (int i = 0; i < n; i++) {
        half[i] = half_of(f, i, dest[i], nA);
        (half[i] ? sB : sA)[dest[i]]++;
    }
    int fillA[S], fillB[S], fillP[S], totA = 0;
    for (int p = 0; p < S; p++)
        totA += sA[p];
    for (int p = 0, oa = 0, ob = totA, op = 0; p < S; p++) {
        fillA[p] = oa;
        fillB[p] = ob;
        fillP[p] = op;
        oa += sA[p];
        ob += sB[p];
        op += sA[p] + sB[p];
    }
    for (int i = 0; i < n; i++) {
        int p = dest[i], sl = half[i] ? fillB[p]++ : fillA[p]++, plain = fillP[p]++;
        f->pk_row[sl] = i / K;
        f->pk_tag[sl] = f->top_idx_h[i];
        f->ep_send_tok[plain] = i / K;
        f->ep_send_w[plain] = f->top_w_h[i];
        f->tbo_where[plain] = sl;
    }
    f->be->ops->ep_pack(f->be, f->ep_send, f->xb, f->pk_row, f->pk_tag, n, d);
}

/* Reads the expert ids back from n received rows starting at row r0 into expert_of[r0..]. */
static moe_status read_experts(moe_forward *f, const moe_layer_weights *lw, int r0, int n,
                               int *expert_of)
{
    size_t row = (size_t)f->d + 1;
    const float *recv = f->ep_recv;
    if (!f->host_mem && n > 0) { /* device memory: the ids come back with their rows */
        moe_status st = f->be->ops->download(f->be, f->ep_recv_h + (size_t)r0 * row,
                                             f->ep_recv + (size_t)r0 * row, sizeof(float) * row * n);
        if (st != MOE_OK)
            return st;
        recv = f->ep_recv_h;
    }
    for (int i = r0; i < r0 + n; i++) {
        int32_t e;
        memcpy(&e, recv + (size_t)i * row + f->d, sizeof e);
        if (e < 0 || e >= f->n_exp || !lw->exp_gate[e].data)
            return moe_error(MOE_ERR_INTERNAL,
                             "expert parallel: rank %d got a row for expert %d it does not hold",
                             f->ep_rank, e);
        expert_of[i] = e;
    }
    return MOE_OK;
}

static int sum(const int *v, int n)
{
    int s = 0;
    for (int i = 0; i < n; i++)
        s += v[i];
    return s;
}

/* Dispatch, compute and combine in one go: every exchange blocks. */
static moe_status ep_plain(moe_forward *f, const moe_layer_weights *lw, int layer, const int *dest,
                           int n)
{
    int d = f->d, S = f->ep_size;
    size_t row = (size_t)d + 1;
    pack(f, dest, n, f->cnt_send);
    int64_t t0 = moe_now_ns();
    moe_status st = f->ep->ops->alltoall_int(f->ep->ctx, f->cnt_send, f->cnt_recv);
    f->ep_stat.wait_ns += moe_now_ns() - t0;
    if (st != MOE_OK)
        return st;
    int n_recv = sum(f->cnt_recv, S);
    if (n_recv > f->ep_cap_recv)
        return moe_error(MOE_ERR_INTERNAL, "expert parallel: %d rows received, room for %d", n_recv,
                         f->ep_cap_recv);
    if ((st = exchange(f, X_DISPATCH_A, f->ep_send, f->cnt_send, row * sizeof(float), f->ep_recv,
                       f->cnt_recv, row * sizeof(float))) != MOE_OK ||
        (st = read_experts(f, lw, 0, n_recv, f->exp_tok)) != MOE_OK)
        return st;
    run_experts(f, lw, layer, f->ep_recv, row, NULL, f->exp_tok, n_recv, f->ep_out, NULL);
    /* Combine: outputs go back the way they came. */
    return exchange(f, X_COMBINE_A, f->ep_out, f->cnt_recv, (size_t)d * sizeof(float), f->ep_back,
                    f->cnt_send, (size_t)d * sizeof(float));
}

/* Waits for every exchange still in flight (after a failure: the peers read and write our buffers
 * until then). */
static void drain(moe_forward *f)
{
    for (int x = 0; x < 4; x++)
        if (f->tbo_req[x])
            (void)await(f, x);
}

/* Two-batch overlap: the routed rows split in micro-batches A and B (half_of). Both dispatches are
 * posted at once; A computes while B's rows travel, then B computes while A's outputs travel back.
 * The caller adds the outputs up in the plain exchange's order (tbo_where), so the results are the
 * same floats as ep_plain's. */
static moe_status ep_overlapped(moe_forward *f, const moe_layer_weights *lw, int layer,
                                const int *dest, int T)
{
    int d = f->d, S = f->ep_size, K = f->topk, n = T * K;
    size_t row = (size_t)d + 1, rowb = row * sizeof(float), outb = (size_t)d * sizeof(float);
    int *sA = f->tbo_cnt, *sB = sA + S, *rA = sB + S, *rB = rA + S;
    pack_halves(f, dest, n, (T + 1) / 2 * K, sA, sB);
    int nA = sum(sA, S); /* rows of A sent: B's start in ep_send and ep_back */

    /* Both micro-batches' counts in one exchange: two ints per peer. */
    int *c2s = f->tbo_cnt2, *c2r = c2s + 2 * S, *cb = f->tbo_xfer, *co = cb + S;
    for (int p = 0; p < S; p++) {
        c2s[2 * p] = sA[p];
        c2s[2 * p + 1] = sB[p];
        cb[p] = 2 * (int)sizeof(int);
        co[p] = p * 2 * (int)sizeof(int);
    }
    int64_t t0 = moe_now_ns();
    moe_status st = f->ep->ops->alltoallv(f->ep->ctx, c2s, cb, co, c2r, cb, co);
    f->ep_stat.wait_ns += moe_now_ns() - t0;
    if (st != MOE_OK)
        return st;
    for (int p = 0; p < S; p++) {
        rA[p] = c2r[2 * p];
        rB[p] = c2r[2 * p + 1];
    }
    int nrA = sum(rA, S), nrB = sum(rB, S);
    if (nrA + nrB > f->ep_cap_recv)
        return moe_error(MOE_ERR_INTERNAL, "expert parallel: %d rows received, room for %d",
                         nrA + nrB, f->ep_cap_recv);

    f->tbo_err = MOE_OK;
    float *recvB = f->ep_recv + (size_t)nrA * row, *outB = f->ep_out + (size_t)nrA * d;
    if ((st = post(f, X_DISPATCH_A, f->ep_send, sA, rowb, f->ep_recv, rA, rowb)) != MOE_OK ||
        (st = post(f, X_DISPATCH_B, f->ep_send + (size_t)nA * row, sB, rowb, recvB, rB, rowb)) !=
            MOE_OK ||
        (st = await(f, X_DISPATCH_A)) != MOE_OK ||
        (st = read_experts(f, lw, 0, nrA, f->exp_tok)) != MOE_OK)
        goto fail;
    run_experts(f, lw, layer, f->ep_recv, row, NULL, f->exp_tok, nrA, f->ep_out, NULL);
    if ((st = f->tbo_err) != MOE_OK ||
        (st = post(f, X_COMBINE_A, f->ep_out, rA, outb, f->ep_back, sA, outb)) != MOE_OK ||
        (st = await(f, X_DISPATCH_B)) != MOE_OK ||
        (st = read_experts(f, lw, nrA, nrB, f->exp_tok)) != MOE_OK)
        goto fail;
    run_experts(f, lw, layer, recvB, row, NULL, f->exp_tok + nrA, nrB, outB, NULL);
    if ((st = f->tbo_err) != MOE_OK ||
        (st = post(f, X_COMBINE_B, outB, rB, outb, f->ep_back + (size_t)nA * d, sB, outb)) !=
            MOE_OK ||
        (st = await(f, X_COMBINE_A)) != MOE_OK || (st = await(f, X_COMBINE_B)) != MOE_OK)
        goto fail;
    return f->tbo_err;
fail:
    drain(f);
    return st;
}

static moe_status ep_experts(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    int d = f->d, n = T * f->topk;
    const moe_ep_placement *pl = &f->place;

    /* Destination of each assignment: the least loaded holder of its expert in this step (counted
     * over the whole step, so the overlapped path routes exactly like the plain one). */
    int *dest = f->ep_order; /* scratch [n]; run_experts reuses it after packing */
    memset(f->cnt_send, 0, sizeof(int) * (size_t)f->ep_size);
    for (int i = 0; i < n; i++) {
        int e = f->top_idx_h[i], best = pl->holders[e * MOE_EP_MAX_HOLDERS];
        for (int h = 1; h < pl->n_holders[e]; h++) {
            int r = pl->holders[e * MOE_EP_MAX_HOLDERS + h];
            if (f->cnt_send[r] < f->cnt_send[best])
                best = r;
        }
        dest[i] = best;
        f->cnt_send[best]++;
    }
    bool overlap = f->ep_overlap != MOE_FWD_OVERLAP_OFF && f->ep->ops->ialltoallv;
    moe_status st =
        overlap ? ep_overlapped(f, lw, layer, dest, T) : ep_plain(f, lw, layer, dest, n);
    if (st != MOE_OK)
        return st;
    /* Each source adds the returned outputs, weighted, in the plain exchange's send order. */
    f->be->ops->ep_combine(f->be, f->moe_out, f->ep_back, f->ep_send_tok, f->ep_send_w,
                           overlap ? f->tbo_where : NULL, n, d);
    return MOE_OK;
}

moe_status moe_fwd_moe_layer(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    int d = f->d;
    int64_t t0 = moe_now_ns();
    moe_backend *be = f->be;
    bool dev = on_backend(f, layer);
    moe_status st = route(f, lw, T, dev);
    if (st != MOE_OK)
        return st;
    be->ops->zero(be, f->moe_out, sizeof(float) * (size_t)T * d);
    if (f->ep) {
        st = ep_experts(f, lw, layer, T);
        if (st != MOE_OK)
            return st;
        f->ep_stat.layers++;
    } else if (dev) {
        if (T > 0)
            device_experts(f, lw, layer, T);
    } else {
        local_experts(f, lw, layer, T);
    }
    if (lw->sh_gate.data &&
        T > 0) { /* Qwen2-MoE shared expert, scaled by sigmoid(shared_expert_gate(x)) */
        /* into ep_back: the routed outputs there have been added into moe_out */
        moe_fwd_swiglu(f, f->ep_back, f->xb, T, &lw->sh_gate, &lw->sh_up, &lw->sh_down);
        moe_fwd_linear(f, f->sh_gate, f->xb, &lw->sh_expert_gate, T);
        be->ops->gated_add(be, f->moe_out, f->sh_gate, f->ep_back, T, d);
    }
    be->ops->axpy(be, f->x, 1.0f, f->moe_out, (size_t)T * d);
    if (f->ep)
        f->ep_stat.ns += moe_now_ns() - t0;
    return MOE_OK;
}
