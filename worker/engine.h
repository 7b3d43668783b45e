/* The per-instance inference engine: continuous batching with chunked prefill over a paged KV
 * cache. One step() runs one forward pass over a batch that mixes prefill chunks and decode
 * tokens under a token budget, then samples. Single-threaded API (the kernels use the pool). */
#ifndef MOE_WORKER_ENGINE_H
#define MOE_WORKER_ENGINE_H

#include <stdbool.h>
#include <stdint.h>
#include "common/status.h"
#include "worker/comm.h"
#include "worker/ep_placement.h"
#include "worker/model.h"
#include "worker/sampler.h"

typedef struct moe_engine moe_engine;

/* Two-batch overlap of the expert-parallel exchange (moe_engine_opts.ep_overlap): each MoE layer's
 * routed rows go in two micro-batches, one's all-to-all in flight while the other's experts run;
 * results are the same floats as without. Data moves during compute on MPI and NCCL only. */
typedef enum {
    MOE_EP_OVERLAP_OFF = 0,
    MOE_EP_OVERLAP_EXPERTS = 1, /* halves of each rank's experts: every expert's weights read once */
    MOE_EP_OVERLAP_TOKENS = 2,  /* halves of the tokens (DeepSeek's): experts hit by both read twice */
} moe_ep_overlap_mode;

typedef struct {
    int n_threads;          /* kernel threads (incl. caller); 0 = all cores */
    int block_size;         /* KV tokens per block; 0 = 16 */
    int n_kv_blocks;        /* KV capacity in blocks; 0 = from kv_budget_bytes */
    size_t kv_budget_bytes; /* used when n_kv_blocks == 0; 0 = enough for max_seqs x context */
    int max_batch_tokens;   /* token budget of one step (prefill chunks + decodes); 0 = 512 */
    int max_seqs;           /* most sequences running at once; 0 = 64 */
    /* Expert parallelism (NULL: all experts local). The model must hold this rank's experts of
     * the placement; every rank of the group steps together (see moe_engine_step). */
    const moe_comm *ep_comm;
    const moe_ep_placement *ep_placement;
    /* Two-batch overlap of the MoE exchange with expert compute: a moe_ep_overlap_mode (true
     * means MOE_EP_OVERLAP_EXPERTS); the same on every rank of the group. Off by default until it
     * measures faster (docs/expert-parallel.md, bench/RESULTS.md). */
    int ep_overlap;
    /* Compute backend the forward pass and the KV cache run on (a moe_device of
     * worker/compute/backend.h): MOE_DEVICE_CPU (0, default) or MOE_DEVICE_CUDA (GPU 0; create
     * fails with MOE_ERR_UNAVAILABLE and a message saying why when there is none). */
    int device;
    int device_index; /* which GPU for MOE_DEVICE_CUDA (default 0) */
} moe_engine_opts;

/* One sampled token. index counts generated tokens of that sequence from 0. */
typedef struct {
    uint64_t seq_id;
    int32_t token;
    int index;
    moe_finish_reason finish; /* != NONE on the sequence's last event */
    bool parked;              /* a prefill-only sequence stopped after its first token (see below) */
    bool has_lp;              /* the sequence asked for logprobs: lp holds them */
    moe_token_logprobs lp;
} moe_token_event;

typedef struct {
    int kv_blocks_total, kv_blocks_used;
    int n_waiting, n_running;
    int64_t steps, prefill_tokens, decode_tokens;
    int64_t preemptions; /* sequences whose KV was taken back (recomputed later) */
    /* Attention work done so far: the sum over every computed token of the positions it attended
     * to (a chunk of n at position p adds n*p + n(n+1)/2); moe-plan's cost model uses it. */
    int64_t attn_positions;
} moe_engine_stats;

/* model must outlive the engine. */
moe_status moe_engine_create(const moe_model *model, const moe_engine_opts *opts, moe_engine **out);
void moe_engine_free(moe_engine *e);

/* Queues a sequence. The prompt is copied. Fails with INVALID_ARG (empty prompt, id outside the
 * vocabulary, prompt not shorter than the context, past a sliding window, duplicate seq_id) or
 * FULL (it could never fit the cache). Generation stops at the context length (LENGTH). */
moe_status moe_engine_add(moe_engine *e, uint64_t seq_id, const int32_t *prompt, int n_prompt,
                          const moe_sampling_params *sp, int max_new_tokens, bool ignore_eos);
/* Ends a sequence now (cancel, stop string): frees its KV. NOT_FOUND if unknown. */
moe_status moe_engine_finish(moe_engine *e, uint64_t seq_id);
/* Ends every sequence (the coordinator that owned them is gone): the KV is all free again. */
void moe_engine_finish_all(moe_engine *e);

/* Runs one step. Writes up to cap events (one per sequence that produced a token). Returns the
 * number of events, or -1 with moe_error_message() set. Finished sequences are freed inside.
 * Expert-parallel engines: every rank of the group must call it the same number of times (agree
 * with an allreduce of moe_engine_has_work); a rank with nothing runs an empty step that serves
 * its experts to the others. */
int moe_engine_step(moe_engine *e, moe_token_event *events, int cap);
/* True while some sequence can take a step (parked/paused ones do not count). */
bool moe_engine_has_work(const moe_engine *e);
void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *st);
/* Replaces the expert placement of an expert-parallel engine (every rank of the group, between
 * the same two steps): the model must already hold this rank's experts of the new placement. */
moe_status moe_engine_set_placement(moe_engine *e, const moe_ep_placement *place);
/* Rows computed by each expert held here: (n_layers, n_experts), cumulative. */
const int64_t *moe_engine_expert_load(const moe_engine *e);

/* ---- moving sequences between engines (disaggregated prefill -> decode, live migration) ----
 * A sequence's state is its tokens (prompt + generated), how many positions have K/V in the cache
 * (n_computed; the last sampled token has none yet), the sampling parameters (the seed and
 * n_generated fix every later draw), and its KV blocks. */
typedef struct {
    uint64_t seq_id;
    const int32_t *tokens; /* borrowed from the engine on export; copied on import */
    int n_tokens, n_prompt, n_generated, n_computed;
    int max_new_tokens;
    bool ignore_eos;
    moe_sampling_params sp;
} moe_seq_state;

/* Like moe_engine_add, but the sequence stops after its first sampled token and is parked: it keeps
 * its KV, takes no further steps, and its event has parked = true (unless it finished outright). */
moe_status moe_engine_add_prefill_only(moe_engine *e, uint64_t seq_id, const int32_t *prompt,
                                       int n_prompt, const moe_sampling_params *sp, int max_new_tokens,
                                       bool ignore_eos);
/* Adds seq_id as a sibling of parent_id (n > 1 choices of one prompt): the same prompt,
 * max_new_tokens, ignore_eos and prefill-only mode, its own sampling (seed). It takes no step
 * until the parent samples its first token; then it shares the parent's prompt KV (full blocks
 * by reference, moe_kv_seq_fork) and samples its first token from the same logits: the prompt is
 * prefilled once. Its tokens are those it would generate alone. Should the parent end first, it
 * prefills the prompt itself. NOT_FOUND (no parent), INVALID_ARG (the parent already sampled,
 * duplicate id). */
moe_status moe_engine_add_sibling(moe_engine *e, uint64_t parent_id, uint64_t seq_id,
                                  const moe_sampling_params *sp);
/* Resumes a sequence whose first n_generated tokens were already generated and streamed on an
 * instance that was lost: prompt + generated are computed from scratch and the next token drawn
 * has index n_generated (sampling draws depend only on (seed, index), so a seeded sequence goes on
 * as it would have). prefill_only as moe_engine_add_prefill_only. INVALID_ARG as moe_engine_add,
 * and when n_generated is not below max_new_tokens or ids fall outside the vocabulary. */
moe_status moe_engine_add_resumed(moe_engine *e, uint64_t seq_id, const int32_t *prompt, int n_prompt,
                                  const int32_t *generated, int n_generated,
                                  const moe_sampling_params *sp, int max_new_tokens, bool ignore_eos,
                                  bool prefill_only);
/* Stops / restarts stepping a running sequence (KV kept). NOT_FOUND if unknown. */
moe_status moe_engine_pause(moe_engine *e, uint64_t seq_id);
moe_status moe_engine_resume(moe_engine *e, uint64_t seq_id);
/* Borrowed view of a sequence's state and block table; valid until the next call that changes the
 * engine. NOT_FOUND if unknown. */
moe_status moe_engine_export(const moe_engine *e, uint64_t seq_id, moe_seq_state *st,
                             const int **blocks, int *n_blocks);
/* Creates a paused sequence from st (tokens copied) and reserves blocks for st->n_computed
 * positions; *blocks / *n_blocks name them, in position order, for the caller to fill with
 * moe_engine_kv_block. FULL when the cache has no room (nothing kept). Commit with
 * moe_engine_resume, or drop with moe_engine_finish. */
moe_status moe_engine_import(moe_engine *e, const moe_seq_state *st, const int **blocks, int *n_blocks);
/* Grows an imported (paused) sequence to n_computed positions (migration stages). FULL: unchanged. */
moe_status moe_engine_import_extend(moe_engine *e, uint64_t seq_id, const moe_seq_state *st,
                                    const int **blocks, int *n_blocks);
/* One KV block as a contiguous buffer of moe_engine_kv_block_bytes bytes. Backend memory: the
 * host may dereference it (and moe_engine_kv_layer's) only when moe_engine_kv_host_access says so
 * (always on the CPU backend); otherwise go through moe_engine_kv_read / _write. */
float *moe_engine_kv_block(moe_engine *e, int block);
bool moe_engine_kv_host_access(const moe_engine *e);
/* The engine's KV cache, for worker/kv_stage.h (transfers of block bytes); owned by the engine. */
struct moe_kv_cache *moe_engine_kv_cache(moe_engine *e);
/* Bytes [off, off + n) of a block to / from host memory, on any backend (staged through host
 * memory on a device). */
moe_status moe_engine_kv_read(moe_engine *e, int block, size_t off, void *dst, size_t n);
moe_status moe_engine_kv_write(moe_engine *e, int block, size_t off, const void *src, size_t n);
size_t moe_engine_kv_block_bytes(const moe_engine *e);
int moe_engine_kv_block_size(const moe_engine *e);

/* ---- layer-by-layer KV hand-off (disaggregated prefill, docs/serving.md) ----
 * fn(ctx, layer, seq_ids, n) is called inside moe_engine_step once per layer of every non-empty
 * step, right after that layer's attention wrote its K/V. seq_ids are the step's prefill-only
 * sequences whose prompt completes in this step (n may be 0: the call can still advance transfers
 * in flight). From that call on, layer `layer` of every block of those sequences (their
 * moe_engine_export block table, already reserved) holds its final K/V and stays unchanged while
 * they are parked, so it may leave while later layers compute. fn may only call moe_engine_export,
 * moe_engine_kv_layer, moe_engine_get_stats and the size getters (the worker also sends its
 * heartbeat from it, so that a long step does not silence it). NULL fn disables. */
typedef void (*moe_engine_layer_hook)(void *ctx, int layer, const uint64_t *seq_ids, int n_seqs);
void moe_engine_set_layer_hook(moe_engine *e, moe_engine_layer_hook fn, void *ctx);
/* fn(ctx) inside a step, between the matmul batches of each layer's experts and after each layer
 * (worker/forward.h moe_forward_set_progress_hook): the worker's KV sends move on during a long
 * prefill. fn must not call into the engine. NULL fn disables. */
void moe_engine_set_progress_hook(moe_engine *e, void (*fn)(void *ctx), void *ctx);
/* One layer's K and V inside a block: moe_engine_kv_layer_bytes contiguous bytes (the block is
 * layer-major, see worker/kv_cache.h). */
float *moe_engine_kv_layer(moe_engine *e, int block, int layer);
size_t moe_engine_kv_layer_bytes(const moe_engine *e);
int moe_engine_kv_layers(const moe_engine *e);

/* Test and tool helper: runs `tokens` through a fresh sequence in chunks of `chunk` tokens
 * (0 = all at once) and writes the logits of every position (n x vocab) into logits. Frees the
 * sequence afterwards. */
moe_status moe_engine_logits(moe_engine *e, const int32_t *tokens, int n, int chunk, float *logits);

#endif
