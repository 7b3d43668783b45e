/* Internals of the forward pass shared by forward.c (the layer loop, attention) and moe_layer.c
 * (routing, local experts, the expert-parallel exchange). Nobody outside these files includes it. */
#ifndef MOE_WORKER_FORWARD_INTERNAL_H
#define MOE_WORKER_FORWARD_INTERNAL_H

#include "worker/comm.h"
#include "worker/compute/backend.h"
#include "worker/ep_placement.h"
#include "worker/forward.h"

/* Exchange statistics, cumulative over the expert-parallel MoE layers run (benchmarks read them
 * through this header). bytes_*: payload rows (hidden states + expert id out, outputs back), the
 * rank's own share included in bytes_sent, excluded from bytes_remote; the row counts exchanged
 * first (one or two ints per peer) are not counted. */
typedef struct {
    int64_t layers;
    int64_t ns;        /* whole MoE block, routing and shared expert included */
    int64_t wait_ns;   /* blocked in exchange calls (blocking collectives, wait()) */
    int64_t expert_ns; /* routed-expert compute */
    int64_t bytes_sent, bytes_remote;
} moe_fwd_ep_stat;

/* Buffers marked B live in the backend's memory (worker/compute/backend.h), the rest in host
 * memory: per-row metadata the host computes (routing groups, positions, block slots). */
struct moe_forward {
    const moe_model *m;      /* the model as the backend sees it (moe_model_map) */
    const moe_model *m_host; /* the loaded model */
    const moe_model_config *c;
    moe_backend *be;
    bool be_owned;           /* created by moe_forward_create for its pool */
    bool host_mem;           /* the host can address backend memory (CPU backend) */
    int max_tokens, max_segs, max_ctx, block_size, max_blocks;
    int d, nh, nkv, hd, qdim, kvdim, ffn_max, n_exp, topk;
    moe_kv_geom geom;

    /* B unless said otherwise */
    float *x;       /* (T, d) residual stream */
    float *xb;      /* (T, d) normed input of the current sub-layer */
    float *q;       /* (T, qdim), in ep_back (moe_fwd_ep_alloc): dead outside attention */
    float *k, *v;   /* (T, kvdim), likewise */
    float *att;     /* (T, qdim) attention output; xb itself where qdim <= d */
    float *router;  /* (T, n_exp) */
    int32_t *top_idx; /* (T, topk) */
    float *top_w;   /* (T, topk) */
    int32_t *top_idx_h; /* H: top_idx as the host reads it (top_idx itself on the CPU backend) */
    float *top_w_h;     /* H: likewise */
    float *moe_out; /* (T, d); outside the MoE block: wo, dense FFN and final-norm rows */
    float *eh;      /* (S*T, d) received rows gathered per expert; expert parallelism only */
    float *eg, *eu; /* (S*T, ffn_max) */
    float *eo;      /* (S*T, d) their outputs; expert parallelism only */
    float *sh_gate; /* (T) shared-expert gate logits */
    float *logits_dev; /* (max_tokens, vocab) when the host cannot address backend memory */
    int *kv_dst;    /* H [T] block * block_size + slot of each token's K/V */
    moe_attn_seg *attn_segs; /* H [max_segs] */
    int *pk_row;    /* H [T*topk] source row of each packed/gathered row */
    int32_t *pk_tag; /* H [T*topk] expert id of each sent row */
    int *exp_count; /* H [n_exp] */
    int *exp_off;   /* H [n_exp + 1] */
    int *exp_tok;   /* H [ep_cap_recv] scratch: expert of each received row */
    int *tok_pos;   /* H [T] position of each token */
    int *tok_seg;   /* H [T] segment of each token */
    float *rope;    /* (max_ctx, hd): cos then sin halves */

    int64_t *expert_tokens; /* (n_layers, n_exp) assignments computed here, for load statistics */

    /* The routed experts without the host (moe_layer.c, docs/backends.md): on a device backend
     * with every expert local (or MOE_TEST_DEVICE_MOE=1 on the CPU), layers whose experts all
     * have one shape and dtype group, compute and combine on the backend from the router's B
     * outputs: no download inside the layer. NULL dx_off: not used. */
    bool *dx_layer;      /* H [n_layers] this layer's experts qualify */
    int32_t *dx_off;     /* (n_exp + 1) grouped row offsets per expert */
    int32_t *dx_src;     /* (T*topk) token of each grouped row */
    int32_t *dx_slot;    /* (T*topk) grouped row of each choice */
    float *dx_g, *dx_u;  /* (T*topk, moe_ffn) gate / up outputs; down goes to ep_back */
    int64_t *dx_tally;   /* (n_layers, n_exp) load statistics, copied into expert_tokens per step */
    int64_t *dx_tally_h; /* H its download */
    const void **dx_w;   /* H [n_exp] one matrix's weight pointers of the layer */

    /* Called after each layer's attention has written that layer's K/V (moe_forward_set_layer_hook). */
    void (*layer_hook)(void *ctx, int layer);
    void *layer_hook_ctx;
    bool layer_hook_reads_kv; /* this run's hook reads the layer's K/V: synchronise before it */
    /* Called between the experts' matmul batches and after each layer (moe_forward_set_progress_hook). */
    void (*progress_hook)(void *ctx);
    void *progress_hook_ctx;

    /* Expert parallelism (NULL ep: every expert is local). Buffers sized by moe_forward_set_ep. */
    const moe_comm *ep;
    moe_ep_placement place;
    int ep_rank, ep_size;
    int ep_cap_recv;   /* rows this rank can receive in one layer */
    float *ep_send;    /* (T*topk, d+1): rows grouped by destination; the last float holds the expert */
    float *ep_recv;    /* (ep_cap_recv, d+1) */
    float *ep_out;     /* (ep_cap_recv, d) expert outputs, in receive order */
    float *ep_back;    /* (T*topk, d) outputs returned to us, in send order (local path: in expert
                        * order, computed in place); q, k, v in attention; the shared expert's output */
    float *ep_recv_h;  /* H (ep_cap_recv, d+1) staging to read received expert ids, device only */
    int *ep_send_tok;  /* H [T*topk] token of each sent row */
    float *ep_send_w;  /* H [T*topk] its routing weight */
    int *ep_order;     /* H [ep_cap_recv] received rows sorted by expert */
    int *cnt_send, *cnt_recv;          /* H [ep_size] rows of the plain (not overlapped) exchange */

    /* Two-batch overlap (moe_forward_set_ep_overlap): the layer's routed rows split in two
     * micro-batches A and B whose exchanges run while the other's experts compute. Every exchange
     * in flight keeps its own count/offset arrays: MPI reads them until the operation completes. */
    int ep_overlap;          /* MOE_FWD_OVERLAP_* */
    int *tbo_cnt;            /* (4, ep_size) rows: A sent, B sent, A received, B received */
    int *tbo_cnt2;           /* (2, ep_size, 2) the counts exchange: sent, received, A/B per peer */
    int *tbo_xfer;           /* (4 exchanges, 4 arrays, ep_size): bytes/offsets, send then receive;
                              * the plain path uses the first (dispatch) and third (combine) */
    moe_comm_req *tbo_req[4]; /* in flight: dispatch A, dispatch B, combine A, combine B */
    moe_status tbo_err;      /* first failure seen while progressing tbo_req */
    int *tbo_where;          /* [T*topk] place in the A|B send order of each plain send slot */
    bool tbo_no_progress;    /* benchmarks only: skip the test() calls between matmuls, to measure
                              * what they buy (data then moves only inside the waits) */

    moe_fwd_ep_stat ep_stat;
};

/* The moe_matmul_batch entry for y(n_tok, w->rows) = x(n_tok, w->cols) * W^T. */
moe_matmul_desc moe_fwd_desc(float *y, const float *x, const moe_weight *w, int n_tok);
/* y(n_tok, w->rows) = x(n_tok, w->cols) * W^T, threaded. */
void moe_fwd_linear(moe_forward *f, float *y, const float *x, const moe_weight *w, int n_tok);
/* out(n, d) = down(silu(gate(in)) * up(in)); uses f->eg / f->eu as scratch. */
void moe_fwd_swiglu(moe_forward *f, float *out, const float *in, int n, const moe_weight *gate,
                    const moe_weight *up, const moe_weight *down);
/* The MoE block of `layer` on f->xb, added into the residual f->x (local or expert-parallel). */
moe_status moe_fwd_moe_layer(moe_forward *f, const moe_layer_weights *lw, int layer, int T);
/* The device MoE path's buffers (after the others; nothing when it does not apply), their free,
 * and the step's end: the device load statistics into expert_tokens (one small download). */
moe_status moe_fwd_dev_moe_alloc(moe_forward *f);
void moe_fwd_dev_moe_free(moe_forward *f);
moe_status moe_fwd_dev_moe_step_end(moe_forward *f);
moe_status moe_fwd_ep_alloc(moe_forward *f);
void moe_fwd_ep_free(moe_forward *f);
/* The two-batch-overlap arrays for f->ep_size ranks (moe_layer.c); moe_fwd_ep_alloc/free call them. */
moe_status moe_fwd_tbo_alloc(moe_forward *f);
void moe_fwd_tbo_free(moe_forward *f);

#endif
