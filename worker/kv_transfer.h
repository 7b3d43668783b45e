/* KV block transfer between ranks: one non-blocking message per KV block over a comm backend,
 * each block verified on arrival against a 64-bit checksum the sender computed on its copy, with
 * a deadline; plus the retry policy (one retry, then the receiver recomputes the prompt) and a
 * test hook that corrupts a block in flight. The pull protocol (offer, pull, header, done) is the
 * worker loop's; this module moves and checks bytes.
 *
 * Checksum: XXH64 (seed 0). Why not CRC32C: XXH64 runs near memory bandwidth in portable C (no
 * ISA dispatch, same code on any CPU and later on the host side of GPU transfers), and 64 bits
 * make an undetected corruption of a block (2^-64) negligible at any transfer rate; the failure
 * model is accidental damage (bad staging buffer, truncated or misrouted message), not an
 * adversary, so a cryptographic hash would only cost time. */
#ifndef MOE_WORKER_KV_TRANSFER_H
#define MOE_WORKER_KV_TRANSFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "common/status.h"
#include "worker/comm.h"

/* XXH64 of data[0..len) with seed 0. */
uint64_t moe_kv_checksum(const void *data, size_t len);

/* Attempts per pull: the first, then one retry; after that the receiver recomputes. */
#define MOE_KV_MAX_ATTEMPTS 2

/* Data tags used on the data communicator: MOE_KV_TAG_BASE + xfer_id % MOE_KV_TAG_SPAN (within
 * MPI's guaranteed tag range 0..32767). xfer_id is allocated by the receiver, so two transfers in
 * flight between the same pair never share a tag unless 32000 of them are pending. */
#define MOE_KV_TAG_BASE 100
#define MOE_KV_TAG_SPAN 32000
int moe_kv_data_tag(uint32_t xfer_id);

/* Test hooks, read from the environment by moe_kv_test_hooks_from_env:
 *   MOE_TEST_CORRUPT_KV=1    the sender flips one bit of one block on each sequence's first
 *                            attempt (the retry succeeds);
 *   MOE_TEST_CORRUPT_KV=all  on every attempt (the receiver ends up recomputing).
 * The corruption is applied to a copy in flight; the sender's own KV is never touched.
 *   MOE_TEST_KV_STAGING=1    the hand-off stages KV blocks through host buffers even on a host
 *                            pool (worker/kv_stage.h), the path a device backend takes. */
typedef struct {
    int corrupt_attempts; /* corrupt attempts 1..corrupt_attempts; 0 off; -1 every attempt */
    bool force_staging;
} moe_kv_test_hooks;
void moe_kv_test_hooks_from_env(moe_kv_test_hooks *h);

typedef enum {
    MOE_KV_XFER_PENDING = 0,
    MOE_KV_XFER_OK,      /* every block arrived and matches its checksum */
    MOE_KV_XFER_CORRUPT, /* a block's checksum differs (moe_kv_recv_bad_block says which) */
    MOE_KV_XFER_TIMEOUT, /* the deadline passed first */
    MOE_KV_XFER_ERROR,   /* the comm backend failed (moe_error_message) */
} moe_kv_xfer_result;

const char *moe_kv_xfer_result_name(moe_kv_xfer_result r);

/* ---- sender ---- */
typedef struct moe_kv_send moe_kv_send;

/* Computes the checksum of each of the n_blocks blocks (block_bytes each) into checksums[] and
 * posts one isend per block to `peer` with `tag`. The blocks must stay unchanged and mapped until
 * moe_kv_send_poll says done or the send is freed. `attempt` (1-based) and `hooks` (may be NULL)
 * drive the corruption hook. On failure nothing is left posted. */
moe_status moe_kv_send_start(moe_comm *comm, void *const *blocks, int n_blocks, size_t block_bytes,
                             int peer, int tag, int attempt, const moe_kv_test_hooks *hooks,
                             uint64_t *checksums, moe_kv_send **out);
/* Posts n_blocks more sends of the same size to the same peer and tag (layer-by-layer transfer:
 * a layer's slices leave as soon as they are final), their checksums into checksums[]. Created
 * with n_blocks 0, a send is a batch to append to; the corruption hook hits the first non-empty
 * batch. On failure the sends already posted stay (free the sender). */
moe_status moe_kv_send_append(moe_kv_send *s, void *const *blocks, int n_blocks,
                              uint64_t *checksums);
/* Advances the sends; *done once every block has left (the receiver may still be verifying). */
moe_status moe_kv_send_poll(moe_kv_send *s, bool *done);
/* Drives the transport with one test (the first pending send): for a caller that polls often
 * while the transfer waits for its peer (a prefill step's progress hook). */
moe_status moe_kv_send_progress(moe_kv_send *s);
/* Frees the sender; outstanding sends are abandoned (see moe_comm cancel). NULL is a no-op. */
void moe_kv_send_free(moe_kv_send *s);

/* ---- receiver ---- */
typedef struct moe_kv_recv moe_kv_recv;

/* Posts one irecv per block into blocks[i] from `peer` with `tag`; the transfer times out at
 * deadline_ns (moe_now_ns clock). Post receives before telling the sender to go, so that its
 * sends always find a match. */
moe_status moe_kv_recv_start(moe_comm *comm, void *const *blocks, int n_blocks, size_t block_bytes,
                             int peer, int tag, int64_t deadline_ns, moe_kv_recv **out);
/* The sender's checksums (n must equal n_blocks, else the transfer is CORRUPT). Copied. */
void moe_kv_recv_set_checksums(moe_kv_recv *r, const uint64_t *checksums, int n);
/* Advances the receives; once every block and the checksums are in, verifies each block and
 * returns OK or CORRUPT (final: later polls return the same). TIMEOUT once now_ns passes the
 * deadline with something missing. */
moe_kv_xfer_result moe_kv_recv_poll(moe_kv_recv *r, int64_t now_ns);
/* Receives still outstanding (a debug trace's progress count). */
int moe_kv_recv_pending(const moe_kv_recv *r);
/* Waiting: the sender is not expected to finish soon (a layer-by-layer push before its offer:
 * the prefill still computes), so polls test receives in order only up to the first pending one
 * (each test that finds nothing may yield the core). Off by default. */
void moe_kv_recv_set_waiting(moe_kv_recv *r, bool waiting);
/* Moves the deadline (a layer-by-layer receive has none until the sender's prompt is done). */
void moe_kv_recv_set_deadline(moe_kv_recv *r, int64_t deadline_ns);
/* The first block that failed verification, -1 if none. */
int moe_kv_recv_bad_block(const moe_kv_recv *r);
/* Frees the receiver, cancelling receives still outstanding. NULL is a no-op. */
void moe_kv_recv_free(moe_kv_recv *r);

#endif
