/* The MoE block: softmax router and top-k, experts computed per expert over the tokens routed to
 * it, Qwen2-MoE's gated shared expert; locally, or expert-parallel across an instance's ranks with
 * a dispatch all-to-all (token rows to the ranks holding their experts) and a combine all-to-all
 * (expert outputs back, weighted and summed in the source's order). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/forward_internal.h"

void moe_fwd_linear(moe_forward *f, float *y, const float *x, const moe_weight *w, int n_tok)
{
    moe_matmul(f->pool, y, x, w->data, w->dtype, n_tok, w->cols, w->rows);
}

void moe_fwd_swiglu(moe_forward *f, float *out, const float *in, int n, const moe_weight *gate,
                    const moe_weight *up, const moe_weight *down)
{
    int ffn = gate->rows;
    moe_fwd_linear(f, f->eg, in, gate, n);
    moe_fwd_linear(f, f->eu, in, up, n);
    for (int i = 0; i < n; i++)
        moe_silu_mul(f->eg + (size_t)i * ffn, f->eu + (size_t)i * ffn, ffn);
    moe_fwd_linear(f, out, f->eg, down, n);
}

/* Router: top_idx / top_w for every token (HF order: softmax over all experts in f32, top-k,
 * optional renormalisation). */
static void route(moe_forward *f, const moe_layer_weights *lw, int T)
{
    int E = f->n_exp, K = f->topk;
    if (T == 0)
        return;
    moe_fwd_linear(f, f->router, f->xb, &lw->router, T);
    for (int t = 0; t < T; t++) {
        float *p = f->router + (size_t)t * E;
        moe_softmax(p, E);
        int *idx = f->top_idx + (size_t)t * K;
        float *w = f->top_w + (size_t)t * K;
        moe_topk(p, E, K, idx, w);
        if (f->c->norm_topk_prob) {
            float s = 0.0f;
            for (int i = 0; i < K; i++)
                s += w[i];
            for (int i = 0; i < K; i++)
                w[i] /= s;
        }
    }
}

/* Runs every expert over its rows. rows: (n, stride) with row i for expert expert_of[i] (its first
 * d floats are the input); out: (n, d) in the same order. Grouped so each expert's weights are read
 * once for all its rows. */
static void run_experts(moe_forward *f, const moe_layer_weights *lw, int layer, const float *rows,
                        size_t stride, const int *expert_of, int n, float *out)
{
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
    for (int e = 0; e < E; e++) {
        int cnt = f->exp_off[e + 1] - f->exp_off[e];
        if (cnt == 0)
            continue;
        f->expert_tokens[(size_t)layer * E + e] += cnt;
        const int *idx = order + f->exp_off[e];
        for (int i = 0; i < cnt; i++)
            memcpy(f->eh + (size_t)i * d, rows + (size_t)idx[i] * stride, sizeof(float) * d);
        moe_fwd_swiglu(f, f->eo, f->eh, cnt, &lw->exp_gate[e], &lw->exp_up[e], &lw->exp_down[e]);
        for (int i = 0; i < cnt; i++)
            memcpy(out + (size_t)idx[i] * d, f->eo + (size_t)i * d, sizeof(float) * d);
    }
}

/* ---- local: every expert on this rank ---- */

static void local_experts(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    int d = f->d, K = f->topk, n = T * K;
    /* One row per (token, choice); rows and outputs use ep-free scratch: exp_w as weights,
     * sh_gate... no: the outputs of all n assignments need n x d floats, which f->ep_back holds. */
    int *expert_of = f->ep_send_tok; /* reused as scratch: [T*K] */
    for (int i = 0; i < n; i++)
        expert_of[i] = f->top_idx[i];
    /* Input row of assignment i is token i / K: gather into ep_send with stride d. */
    for (int i = 0; i < n; i++)
        memcpy(f->ep_send + (size_t)i * d, f->xb + (size_t)(i / K) * d, sizeof(float) * d);
    run_experts(f, lw, layer, f->ep_send, (size_t)d, expert_of, n, f->ep_back);
    for (int i = 0; i < n; i++)
        moe_axpy(f->moe_out + (size_t)(i / K) * d, f->top_w[i], f->ep_back + (size_t)i * d, d);
}

/* ---- expert parallel ---- */

static moe_status exchange(moe_forward *f, const void *send, const int *cnt_send, size_t send_row,
                           void *recv, const int *cnt_recv, size_t recv_row)
{
    int S = f->ep_size, so = 0, ro = 0;
    for (int p = 0; p < S; p++) {
        f->bytes_send[p] = (int)((size_t)cnt_send[p] * send_row);
        f->bytes_recv[p] = (int)((size_t)cnt_recv[p] * recv_row);
        f->off_send[p] = so;
        f->off_recv[p] = ro;
        so += f->bytes_send[p];
        ro += f->bytes_recv[p];
    }
    return f->ep->ops->alltoallv(f->ep->ctx, send, f->bytes_send, f->off_send, recv, f->bytes_recv,
                                 f->off_recv);
}

static moe_status ep_experts(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    int d = f->d, K = f->topk, S = f->ep_size, n = T * K;
    size_t row = (size_t)d + 1; /* hidden state + expert id (int bits in the last float) */
    const moe_ep_placement *pl = &f->place;

    /* Destination of each assignment: the least loaded holder of its expert in this step. */
    int *dest = f->ep_order; /* scratch [n] before it serves the receive side */
    memset(f->cnt_send, 0, sizeof(int) * (size_t)S);
    for (int i = 0; i < n; i++) {
        int e = f->top_idx[i], best = pl->holders[e * MOE_EP_MAX_HOLDERS];
        for (int h = 1; h < pl->n_holders[e]; h++) {
            int r = pl->holders[e * MOE_EP_MAX_HOLDERS + h];
            if (f->cnt_send[r] < f->cnt_send[best])
                best = r;
        }
        dest[i] = best;
        f->cnt_send[best]++;
    }
    int off[S + 1];
    off[0] = 0;
    for (int p = 0; p < S; p++)
        off[p + 1] = off[p] + f->cnt_send[p];
    int fill[S];
    memcpy(fill, off, sizeof(int) * (size_t)S);
    for (int i = 0; i < n; i++) {
        int slot = fill[dest[i]]++;
        float *r = f->ep_send + (size_t)slot * row;
        memcpy(r, f->xb + (size_t)(i / K) * d, sizeof(float) * d);
        int32_t e = f->top_idx[i];
        memcpy(r + d, &e, sizeof e);
        f->ep_send_tok[slot] = i / K;
        f->ep_send_w[slot] = f->top_w[i];
    }

    moe_status st = f->ep->ops->alltoall_int(f->ep->ctx, f->cnt_send, f->cnt_recv);
    if (st != MOE_OK)
        return st;
    int n_recv = 0;
    for (int p = 0; p < S; p++)
        n_recv += f->cnt_recv[p];
    if (n_recv > f->ep_cap_recv)
        return moe_error(MOE_ERR_INTERNAL, "expert parallel: %d rows received, room for %d", n_recv, f->ep_cap_recv);
    if ((st = exchange(f, f->ep_send, f->cnt_send, row * sizeof(float), f->ep_recv, f->cnt_recv,
                       row * sizeof(float))) != MOE_OK)
        return st;

    /* Compute the received rows with local experts. Expert ids are read back from the rows. */
    int *expert_of = f->exp_tok; /* scratch [>= n_recv]: sized for the receive capacity */
    for (int i = 0; i < n_recv; i++) {
        int32_t e;
        memcpy(&e, f->ep_recv + (size_t)i * row + d, sizeof e);
        if (e < 0 || e >= f->n_exp || !lw->exp_gate[e].data)
            return moe_error(MOE_ERR_INTERNAL, "expert parallel: rank %d got a row for expert %d it does not hold",
                             f->ep_rank, e);
        expert_of[i] = e;
    }
    run_experts(f, lw, layer, f->ep_recv, row, expert_of, n_recv, f->ep_out);

    /* Combine: outputs go back the way they came; each source adds them in its send order. */
    if ((st = exchange(f, f->ep_out, f->cnt_recv, (size_t)d * sizeof(float), f->ep_back, f->cnt_send,
                       (size_t)d * sizeof(float))) != MOE_OK)
        return st;
    for (int s = 0; s < n; s++)
        moe_axpy(f->moe_out + (size_t)f->ep_send_tok[s] * d, f->ep_send_w[s], f->ep_back + (size_t)s * d, d);
    return MOE_OK;
}

moe_status moe_fwd_moe_layer(moe_forward *f, const moe_layer_weights *lw, int layer, int T)
{
    int d = f->d;
    route(f, lw, T);
    memset(f->moe_out, 0, sizeof(float) * (size_t)T * d);
    if (f->ep) {
        moe_status st = ep_experts(f, lw, layer, T);
        if (st != MOE_OK)
            return st;
    } else {
        local_experts(f, lw, layer, T);
    }
    if (lw->sh_gate.data && T > 0) { /* Qwen2-MoE shared expert, scaled by sigmoid(shared_expert_gate(x)) */
        moe_fwd_swiglu(f, f->eo, f->xb, T, &lw->sh_gate, &lw->sh_up, &lw->sh_down);
        moe_fwd_linear(f, f->sh_gate, f->xb, &lw->sh_expert_gate, T);
        for (int t = 0; t < T; t++) {
            float g = 1.0f / (1.0f + expf(-f->sh_gate[t]));
            moe_axpy(f->moe_out + (size_t)t * d, g, f->eo + (size_t)t * d, d);
        }
    }
    for (int t = 0; t < T; t++)
        moe_axpy(f->x + (size_t)t * d, 1.0f, f->moe_out + (size_t)t * d, d);
    return MOE_OK;
}
