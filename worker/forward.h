/* The model's forward pass over one flattened batch of tokens from several sequences, writing
 * K/V into the paged cache and producing logits for chosen rows. All buffers are sized at
 * create; a run allocates nothing. Internal to worker/ (the engine drives it). */
#ifndef MOE_WORKER_FORWARD_H
#define MOE_WORKER_FORWARD_H

#include <stdbool.h>
#include <stdint.h>
#include "common/status.h"
#include "kernels/kernels.h"
#include "worker/comm.h"
#include "worker/compute/backend.h"
#include "worker/ep_placement.h"
#include "worker/kv_cache.h"
#include "worker/model.h"

typedef struct moe_forward moe_forward;

/* One sequence's slice of the batch: tokens [tok_begin, tok_begin + n) of the batch sit at
 * positions [pos0, pos0 + n) of the sequence whose block table is kv (already reserved for
 * pos0 + n positions). */
typedef struct {
    const moe_kv_seq *kv;
    int pos0;
    int tok_begin;
    int n;
} moe_batch_seg;

typedef struct {
    const int32_t *tokens;     /* [n_tokens] */
    int n_tokens;
    const moe_batch_seg *segs; /* [n_segs], covering the tokens in order */
    int n_segs;
    const int *logit_rows;     /* [n_logit_rows] batch token indices whose logits are wanted */
    int n_logit_rows;
    float *logits;             /* out: (n_logit_rows, vocab) */
} moe_batch;

/* max_tokens: most tokens in one batch; max_segs: most sequences in one batch; max_ctx: longest
 * sequence (positions); block_size: the KV cache's. pool may be NULL (single thread). */
moe_status moe_forward_create(const moe_model *m, moe_threadpool_t *pool, int max_tokens,
                              int max_segs, int max_ctx, int block_size, moe_forward **out);
/* The same on backend be (not owned; must outlive f): the model's tensors are mapped into its
 * memory (moe_model_map) and every op of the pass runs there. kv must then be a cache created on
 * be (moe_kv_create_on). moe_forward_create above is this on a CPU backend over pool. */
moe_status moe_forward_create_on(const moe_model *m, moe_backend *be, int max_tokens, int max_segs,
                                 int max_ctx, int block_size, moe_forward **out);
void moe_forward_free(moe_forward *f);
moe_backend *moe_forward_backend(const moe_forward *f);

/* Makes the MoE layers expert-parallel over comm's group with this placement (copied). The model
 * must have been loaded with (at least) the experts the placement gives this rank. Every rank of
 * the group must then call moe_forward_run for every step, with n_tokens == 0 when it has nothing
 * (it still serves its experts to the others). comm must outlive f. */
moe_status moe_forward_set_ep(moe_forward *f, const moe_comm *comm, const moe_ep_placement *place);
/* Two-batch overlap of the expert-parallel exchange with expert compute: each MoE layer's routed
 * rows go in two micro-batches, one's all-to-all in flight while the other's experts run. Results
 * equal the plain exchange's (same floats). Only where the comm has ialltoallv (else ignored);
 * only MPI and NCCL move data while computing (loopback copies inside the waits). Every rank of
 * the group must use the same mode. The values are moe_engine_opts.ep_overlap's. */
enum {
    MOE_FWD_OVERLAP_OFF = 0,     /* default */
    MOE_FWD_OVERLAP_EXPERTS = 1, /* split by experts: the first half of each rank's experts, then the
                                  * rest; every expert's weights are read once per layer */
    MOE_FWD_OVERLAP_TOKENS = 2,  /* split by tokens (DeepSeek's): the first half of the tokens, then
                                  * the rest; an expert hit by both halves is read twice */
};
void moe_forward_set_ep_overlap(moe_forward *f, int mode);
/* The expert-parallel group's comm, NULL when not expert parallel. */
const moe_comm *moe_forward_ep_comm(const moe_forward *f);
/* Rows each expert computed on this rank so far: (n_layers, n_experts), for load statistics. */
const int64_t *moe_forward_expert_tokens(const moe_forward *f);

/* Calls fn(ctx, layer) inside moe_forward_run once per layer, right after that layer's attention
 * wrote its K/V into the cache (before the layer's MLP/MoE part), so that a layer's KV can leave
 * while later layers compute. Not called for empty batches. NULL fn disables. */
void moe_forward_set_layer_hook(moe_forward *f, void (*fn)(void *ctx, int layer), void *ctx);
/* Whether the hook of the next runs reads the layer's K/V from the cache: then the backend is
 * synchronised before each call (a device backend's kernels must have landed); a hook that reads
 * none (the worker's heartbeat) costs no synchronisation. Off until set. */
void moe_forward_layer_hook_reads_kv(moe_forward *f, bool reads);
/* Calls fn(ctx) inside moe_forward_run between the matmul batches of each layer's experts and at
 * the end of each layer: a caller's non-blocking transfers can move during a long step (Open MPI
 * has no progress thread). fn must not touch the forward. NULL fn disables. */
void moe_forward_set_progress_hook(moe_forward *f, void (*fn)(void *ctx), void *ctx);

/* Runs the batch. Requires n_tokens <= max_tokens, n_segs <= max_segs, positions < max_ctx. */
moe_status moe_forward_run(moe_forward *f, moe_kv_cache *kv, const moe_batch *b);

#endif
