/* The contract between the front ends (gRPC: coordinator/grpc_server.c; HTTP/OpenAI:
 * coordinator/http_server.c) and the backend behind them (the scheduler that drives the cluster,
 * or a test double): the request as a front end decoded it (moe_api_request, validated once by
 * coordinator/validate.c for both), the backend vtable the servers call, and the functions the
 * backend calls, from any thread, to stream events to a request (dispatched to the front end
 * that owns the request). Plain C: no gRPC, protobuf or HTTP type crosses this interface. */
#ifndef MOE_COORDINATOR_FRONTEND_H
#define MOE_COORDINATOR_FRONTEND_H

#include "common/pool.h"
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include "common/sampling.h"
#include "common/status.h"

/* ---------------------------------------------------------------------------------------------
 * Requests as a front end decoded them, before validation: protocol-neutral. Strings carry their
 * length (a NUL inside is refused by validation, naming the field); numbers are wide enough to
 * hold what a client sent, so that validation (not a cast) refuses out-of-range values. */

typedef struct {
    const char *s;
    size_t len;
} moe_api_str;

/* A front end's TLS material, PEM text (borrowed). cert NULL: plaintext. client_ca: every client
 * must present a certificate it signed (mTLS). */
typedef struct {
    const char *cert, *key, *client_ca;
} moe_tls_pem;

/* The field names errors name, per protocol ("GenerateRequest.sampling.top_p" / "top_p"). */
typedef struct {
    const char *request_id, *text, *token_ids, *token_ids_item /* + "[i]" */, *prompt,
        *max_new_tokens, *temperature, *top_p, *top_k, *seed, *stop, *stop_token_ids,
        *presence_penalty, *frequency_penalty, *repetition_penalty, *top_logprobs, *prefill_group;
} moe_api_names;

extern const moe_api_names moe_api_names_grpc;

/* Choices of one client request (HTTP n, GenerateRequest.n, prefill_group_size): at most this
 * many, sharing one prefill of the prompt. */
#define MOE_API_MAX_N 16

/* The seed choice i of a request samples with, when the request gave `seed` (both front ends, so
 * that HTTP n, gRPC n and n single requests with these seeds give the same outputs). */
static inline uint64_t moe_api_choice_seed(uint64_t seed, uint32_t i)
{
    return seed + i;
}

typedef struct {
    const moe_api_names *names; /* NULL: moe_api_names_grpc */
    moe_api_str request_id;     /* len 0: the server makes one */
    bool has_text;              /* a text prompt, else token ids (has_token_ids) */
    bool has_token_ids;
    moe_api_str text;
    bool add_special_tokens;    /* text prompts: apply the tokenizer's BOS template */
    const int64_t *token_ids;   /* (n_token_ids) */
    size_t n_token_ids;
    int64_t max_new_tokens;     /* 0: the server default */
    bool has_temperature, has_top_p, has_seed;
    double temperature, top_p;
    int64_t top_k;              /* 0: off */
    uint64_t seed;
    bool has_presence_penalty, has_frequency_penalty, has_repetition_penalty;
    double presence_penalty, frequency_penalty, repetition_penalty;
    bool logprobs;              /* return each token's log-probability */
    int64_t top_logprobs;       /* and this many most likely tokens' (0..MOE_MAX_TOP_LOGPROBS) */
    const moe_api_str *stop;    /* (n_stop) */
    size_t n_stop;
    const int64_t *stop_token_ids; /* (n_stop_token_ids) */
    size_t n_stop_token_ids;
    bool ignore_eos, include_stop_str_in_output;
    int32_t priority;
    uint64_t prefill_group;     /* 0: none; else choices of one prompt, prefill_group_n of them */
    int64_t prefill_group_n;
} moe_api_request;

/* ---------------------------------------------------------------------------------------------
 * Requests as the backend sees them: validated, tokenized, defaults resolved. */

#define MOE_REQUEST_ID_MAX 128 /* bytes of a request id, without the NUL */

typedef struct {
    char request_id[MOE_REQUEST_ID_MAX + 1]; /* the client's id, else one made by the server */
    const int32_t *prompt;                  /* (n_prompt) token ids, each in [0, vocab) */
    uint32_t n_prompt;                      /* >= 1; n_prompt + max_new_tokens <= context */
    uint32_t max_new_tokens;                /* >= 1, resolved (never "default") */
    /* temperature >= 0 (0 = greedy), top_p in (0, 1], top_k >= 0 (0 = off), seed (the
     * client's, else drawn by the server), penalties in range, logprobs (common/sampling.h) */
    moe_sampling_params sampling;
    const char *const *stop;                /* (n_stop) NUL-terminated, non-empty UTF-8 strings */
    uint32_t n_stop;
    const int32_t *stop_token_ids;          /* (n_stop_token_ids) each in [0, vocab) */
    uint32_t n_stop_token_ids;
    bool ignore_eos;
    bool include_stop_str_in_output;
    int32_t priority;                       /* lower is served first */
    /* 0: none. Requests with the same non-zero value are choices of one client request (HTTP
     * n > 1): the same prompt and options but the seed. The backend may prefill their prompt
     * once for all those it holds at once (the cluster does when they are queued together). */
    uint64_t prefill_group;
    uint32_t prefill_group_n; /* how many requests the group has */
    uint32_t client;                        /* fair-share class: the API key's index + 1; 0 = no
                                               key. The scheduler shares its queue fairly
                                               between classes of one priority. */
    int64_t arrival_ns;                     /* moe_now_ns() when the front end received it */
    int64_t deadline_ns;                    /* moe_now_ns() clock; 0 = none. The front end
                                               cancels at the deadline by itself; this is for
                                               scheduling decisions only. */
} moe_gen_request;

/* Why a generation ended normally: MOE_FINISH_LENGTH, _EOS or _STOP (common/sampling.h, whose
 * values are moeserve.v1.FinishReason's). */
typedef struct {
    moe_finish_reason reason;
    const char *matched_stop;    /* MOE_FINISH_STOP: the stop string, or the token id in decimal;
                                    NULL otherwise. Copied. */
    uint32_t completion_tokens;  /* 0: the front end uses the number of tokens pushed */
} moe_frontend_finish_info;

/* ---------------------------------------------------------------------------------------------
 * Cluster snapshot for ClusterStatus. The backend fills instances and cluster counters; the
 * front end adds pool and total sums, its own request counters, health and uptime. */

#define MOE_FRONTEND_MAX_INSTANCES 256
#define MOE_FRONTEND_MAX_EP 64


typedef enum { /* values match moeserve.v1.InstanceState */
    MOE_INSTANCE_STARTING = 1,
    MOE_INSTANCE_READY = 2,
    MOE_INSTANCE_DRAINING = 3,
    MOE_INSTANCE_UNREACHABLE = 4,
} moe_instance_state;

typedef struct {
    uint32_t id;
    moe_pool_kind pool;
    moe_instance_state state;
    uint32_t ep_size;                     /* ranks in use: ranks[0..ep_size) */
    int32_t ranks[MOE_FRONTEND_MAX_EP];
    uint32_t kv_blocks_total, kv_blocks_used, kv_blocks_free;
    /* used plus promised (hand-offs not done, migrations coming in), each counted once: what
     * placement and the migration policy compare with kv_blocks_total */
    uint32_t kv_blocks_committed;
    uint32_t kv_block_tokens;
    uint32_t running, waiting;
    uint64_t pending_prompt_tokens;
    double heartbeat_age_ms;
    /* Expert parallelism: the experts this rank maps, [expert_begin, expert_end), and the ranks of
     * its expert-parallel group (ep_group_ranks[0..ep_group_size); itself alone without EP). */
    uint32_t expert_begin, expert_end;
    uint32_t ep_group_size;
    int32_t ep_group_ranks[MOE_FRONTEND_MAX_EP];
    /* Routed rows per (layer, expert) computed on this rank, layer-major (moe_layers x moe_experts
     * of the status). malloc'd by the backend, released by moe_cluster_status_release; NULL when
     * none reported yet. */
    uint64_t *expert_tokens;
    uint32_t n_expert_tokens;
    char host[64]; /* where it runs ("" when unknown) */
} moe_instance_status;

typedef struct {
    uint64_t kv_transfers, kv_transfer_bytes, kv_transfer_retries, kv_transfer_recomputes;
    uint64_t kv_checksum_failures, kv_transfer_timeouts, kv_lease_expirations;
    uint64_t migrations, migrations_aborted, preemptions;
    uint64_t kv_transfers_layerwise; /* of kv_transfers: pushed layer by layer */
    uint64_t kv_pulls_waited;        /* offers that waited on the decode side for free blocks */
    uint64_t instance_joins, instance_losses, requests_resumed; /* elastic clusters */
    uint64_t prefills_shared; /* choices (n > 1) started on another choice's prefill */
} moe_cluster_counters;

/* Live migrations (docs/migration.md): outcomes, costs and what triggered them. */
typedef struct {
    uint64_t started, completed, aborted;
    /* aborted, by reason: destination out of blocks; the request finished or was cancelled on
     * the source meanwhile; preempted on the source; a transfer failed (checksum, comm); a peer
     * did not answer in time; anything else (not migratable, shutdown, test hooks) */
    uint64_t aborted_dest_full, aborted_seq_gone, aborted_preempted, aborted_transfer;
    uint64_t aborted_timeout, aborted_other;
    uint64_t bytes, blocks, stages; /* of completed migrations */
    /* pause (sequence paused on the source -> resumed on the destination), completed ones;
     * p50/p99 over the last 1024 */
    double pause_ms_total, pause_ms_max, pause_ms_p50, pause_ms_p99;
    /* started, by trigger: load balance, de-fragmentation (queued demand), priority headroom,
     * drain, the forced test/bench hook */
    uint64_t by_balance, by_defrag, by_priority, by_drain, by_forced;
    uint32_t in_flight;
} moe_migration_counters;

typedef struct {
    char model[128];          /* model name (directory base name or config name) */
    uint32_t world_size;      /* MPI ranks, coordinator included */
    uint32_t n_instances;     /* <= MOE_FRONTEND_MAX_INSTANCES */
    moe_instance_status instances[MOE_FRONTEND_MAX_INSTANCES];
    moe_cluster_counters counters;
    moe_migration_counters migration;
    uint32_t moe_layers, moe_experts; /* shape of each instance's expert_tokens */
} moe_cluster_status;

/* Frees what the backend allocated inside a status (not the status itself). */
static inline void moe_cluster_status_release(moe_cluster_status *st)
{
    for (uint32_t i = 0; i < st->n_instances && i < MOE_FRONTEND_MAX_INSTANCES; i++) {
        free(st->instances[i].expert_tokens);
        st->instances[i].expert_tokens = NULL;
        st->instances[i].n_expert_tokens = 0;
    }
}

/* ---------------------------------------------------------------------------------------------
 * The backend vtable. Every slot is called from a gRPC completion-queue thread, possibly from
 * several threads at once, never while the front end holds a lock: a slot may call the push
 * functions below (even for the request it is being asked about). Slots must not block for long
 * (no waiting on the cluster): they stall every stream served by that thread. */

typedef struct moe_frontend_req moe_frontend_req; /* one generation stream, owned by a front end */

typedef struct {
    void *ctx; /* passed to every slot */

    /* Admits a request. On MOE_OK the backend stores *handle (its own id for cancel) and takes a
     * reference to `stream`: from then on it must call exactly one of moe_frontend_finish or
     * moe_frontend_error for it, eventually, even after cancel; that call releases the reference.
     * It may push events from any thread, even before submit returns. `req` and everything it
     * points to stay valid until that terminal call.
     * On failure it keeps nothing, pushes nothing, and sets moe_error's message (sent to the
     * client): MOE_ERR_FULL (queues full) -> RESOURCE_EXHAUSTED, MOE_ERR_UNAVAILABLE (workers
     * gone, draining) -> UNAVAILABLE, MOE_ERR_INVALID_ARG -> INVALID_ARGUMENT. Required. */
    moe_status (*submit)(void *ctx, const moe_gen_request *req, moe_frontend_req *stream,
                         uint64_t *handle);

    /* Asks the backend to stop a request it admitted (client cancel, disconnect, deadline): free
     * its KV on every rank, then make the terminal call (its content is ignored: the client is
     * gone). Asynchronous: returns at once. Called at most once per request, maybe after the
     * backend already made its terminal call: then it must ignore the handle. Required. */
    void (*cancel)(void *ctx, uint64_t handle);

    /* Tokenizes UTF-8 text like moe_tokenizer_encode (common/tokenizer.h): writes up to cap ids
     * and sets *n_out to the number the text needs (call again with more room if larger).
     * add_special: apply the tokenizer's special-token template (BOS). Used for text prompts and
     * the Tokenize RPC. Required. */
    moe_status (*tokenize)(void *ctx, const char *text, size_t len, bool add_special,
                           int32_t *ids, size_t cap, size_t *n_out);

    /* Fills *out (zeroed by the caller) with a consistent snapshot. Must be quick: read cached
     * state, don't ask the workers. NULL: ClusterStatus reports only the front end's part. */
    moe_status (*cluster_status)(void *ctx, moe_cluster_status *out);

    /* True once a real forward pass succeeded on the cluster and it can take requests; false
     * while loading, after a rank is lost, or while draining. Health/Check answers SERVING only
     * when this is true. Required. */
    bool (*healthy)(void *ctx);

    /* Drains one instance (the Drain RPC, `moe-client drain`): it takes no new requests and its
     * running ones move to other instances (live migration), until it holds no KV; undo = true
     * makes it take requests again. Returns at once (the drain goes on in the background) with
     * the instance's current row in *out. MOE_ERR_NOT_FOUND: no such instance;
     * MOE_ERR_INVALID_ARG: it cannot be drained (the last one of its pool taking requests).
     * NULL: the RPC answers UNIMPLEMENTED. */
    moe_status (*drain_instance)(void *ctx, uint32_t instance, bool undo,
                                 moe_instance_status *out);
} moe_frontend_backend;

/* ---------------------------------------------------------------------------------------------
 * Events the backend pushes to an admitted request. Thread-safe: any thread, concurrently for
 * different requests; the calls for one request must be ordered by the backend (one thread at a
 * time, or its own ordering). None of them blocks on the network: events are queued and the
 * completion-queue threads send them (several pushes can share one message when the client reads
 * slower than the backend produces). After a cancel, pushes are accepted and dropped. */

/* New tokens: ids[i] has index indices[i] among the generated tokens. Indices must continue the
 * stream exactly (first push: 0, then one more than the last index pushed, contiguous within the
 * push); `text` is the UTF-8 text these tokens completed (the backend detokenizes and holds back
 * incomplete sequences), may be empty. n may be 0 to push text alone (the detokenizer's final
 * flush). Fails with MOE_ERR_INVALID_ARG (nothing queued, message says why) on an index that
 * does not continue the stream, or after the terminal call; MOE_ERR_NOMEM if out of memory. */
moe_status moe_frontend_push_tokens(moe_frontend_req *r, const int32_t *ids,
                                    const uint32_t *indices, size_t n, const char *text,
                                    size_t text_len);
/* The same with each token's log-probabilities (lp: n entries, copied; NULL: none), for requests
 * whose sampling asked for them. */
moe_status moe_frontend_push_tokens_lp(moe_frontend_req *r, const int32_t *ids,
                                       const uint32_t *indices, const moe_token_logprobs *lp,
                                       size_t n, const char *text, size_t text_len);

/* Terminal: the generation ended normally. Queues the last message (finish reason, usage,
 * timing) and an OK status. Releases the backend's reference: `r` must not be used afterwards. */
void moe_frontend_finish(moe_frontend_req *r, const moe_frontend_finish_info *info);

/* Terminal: the request failed after admission. Sends the status mapped from `code`
 * (MOE_ERR_FULL -> RESOURCE_EXHAUSTED, MOE_ERR_UNAVAILABLE -> UNAVAILABLE, MOE_ERR_TIMEOUT ->
 * DEADLINE_EXCEEDED, MOE_ERR_INVALID_ARG/RANGE/FORMAT -> INVALID_ARGUMENT, MOE_ERR_CANCELLED ->
 * CANCELLED, others -> INTERNAL) with `message` (NULL: the status's text) after the tokens
 * already pushed. Releases the backend's reference: `r` must not be used afterwards. */
void moe_frontend_error(moe_frontend_req *r, moe_status code, const char *message);

/* The request this stream carries (the one given to submit); valid until the terminal call.
 * Handy for backends that keep only the stream pointer. */
const moe_gen_request *moe_frontend_request(const moe_frontend_req *r);

/* ---------------------------------------------------------------------------------------------
 * For the front ends only: each one's stream object starts with a moe_frontend_req whose ops
 * implement the four calls above for that protocol (coordinator/frontend.c dispatches). */

typedef struct {
    moe_status (*push_tokens)(moe_frontend_req *r, const int32_t *ids, const uint32_t *indices,
                              const moe_token_logprobs *lp, size_t n, const char *text,
                              size_t text_len);
    void (*finish)(moe_frontend_req *r, const moe_frontend_finish_info *info);
    void (*error)(moe_frontend_req *r, moe_status code, const char *message);
    const moe_gen_request *(*request)(const moe_frontend_req *r);
} moe_frontend_ops;

struct moe_frontend_req {
    const moe_frontend_ops *ops;
};

/* The latency a front end adds to each streamed token: from the backend's push to the moment the
 * token's bytes are handed to the transport (gRPC core's send, libmicrohttpd's reader), kept over
 * the last MOE_FRONTEND_LAT_RING tokens and logged at shutdown (bench/RESULTS.md reads the line).
 * Thread-safe. */
#define MOE_FRONTEND_LAT_RING 8192
typedef struct {
    void *mu;        /* pthread_mutex_t *, from moe_frontend_lat_init */
    float *us;       /* [MOE_FRONTEND_LAT_RING] microseconds */
    uint64_t n;      /* recorded since start */
} moe_frontend_lat;

moe_status moe_frontend_lat_init(moe_frontend_lat *l);
/* n tokens that waited us microseconds each. */
void moe_frontend_lat_add(moe_frontend_lat *l, double us, size_t n);
/* One info line "NAME front end: push -> transport over the last N tokens: p50 .. p90 .. p99 ..
 * max" (nothing when none). No adds may run concurrently. */
void moe_frontend_lat_log(moe_frontend_lat *l, const char *name);
void moe_frontend_lat_free(moe_frontend_lat *l);

#endif
