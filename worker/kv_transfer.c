/* KV block transfer: per-block non-blocking sends/receives over the comm vtable, XXH64 checksums
 * verified on arrival, deadlines, and the corruption test hook. */
#include "worker/kv_transfer.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/test_hook.h"

/* ---- XXH64 (public algorithm by Yann Collet), little-endian reads ---- */
#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t rd64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t rd32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t xround(uint64_t acc, uint64_t in)
{
    return rotl64(acc + in * P2, 31) * P1;
}

static inline uint64_t xmerge(uint64_t acc, uint64_t v)
{
    return (acc ^ xround(0, v)) * P1 + P4;
}

uint64_t moe_kv_checksum(const void *data, size_t len)
{
    const unsigned char *p = data, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = (uint64_t)0 - P1;
        const unsigned char *limit = end - 32;
        do {
            v1 = xround(v1, rd64(p));
            v2 = xround(v2, rd64(p + 8));
            v3 = xround(v3, rd64(p + 16));
            v4 = xround(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1);
        h = xmerge(h, v2);
        h = xmerge(h, v3);
        h = xmerge(h, v4);
    } else {
        h = P5;
    }
    h += (uint64_t)len;
    for (; p + 8 <= end; p += 8)
        h = rotl64(h ^ xround(0, rd64(p)), 27) * P1 + P4;
    if (p + 4 <= end) {
        h = rotl64(h ^ ((uint64_t)rd32(p) * P1), 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; p++)
        h = rotl64(h ^ ((uint64_t)*p * P5), 11) * P1;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

int moe_kv_data_tag(uint32_t xfer_id)
{
    return MOE_KV_TAG_BASE + (int)(xfer_id % MOE_KV_TAG_SPAN);
}

void moe_kv_test_hooks_from_env(moe_kv_test_hooks *h)
{
    *h = (moe_kv_test_hooks){0};
    h->force_staging = moe_test_hook_int("MOE_TEST_KV_STAGING", 0) != 0;
    const char *v = moe_test_hook("MOE_TEST_CORRUPT_KV");
    if (!v || !*v || !strcmp(v, "0"))
        return;
    h->corrupt_attempts = !strcmp(v, "all") ? -1 : atoi(v);
    if (h->corrupt_attempts != 0)
        MOE_LOG_W("test hook MOE_TEST_CORRUPT_KV=%s: KV blocks will be corrupted in flight", v);
}

const char *moe_kv_xfer_result_name(moe_kv_xfer_result r)
{
    static const char *const names[] = {"pending", "ok", "checksum mismatch", "timeout",
                                        "comm error"};
    return (unsigned)r < sizeof names / sizeof names[0] ? names[r] : "unknown";
}

/* ---- sender ---- */

struct moe_kv_send {
    moe_comm *comm;
    int peer, tag;
    size_t block_bytes;
    bool corrupt;        /* test hook: corrupt one buffer of the next non-empty batch */
    int n, cap;
    moe_comm_req **reqs; /* [n]; NULL once complete */
    int first_pending;   /* requests before it are complete */
    void *scratch;       /* the corrupted copy in flight (test hook) */
};

void moe_kv_send_free(moe_kv_send *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        if (s->reqs[i])
            s->comm->ops->cancel(s->comm->ctx, s->reqs[i]);
    free(s->reqs);
    free(s->scratch);
    free(s);
}

moe_status moe_kv_send_start(moe_comm *comm, void *const *blocks, int n_blocks, size_t block_bytes,
                             int peer, int tag, int attempt, const moe_kv_test_hooks *hooks,
                             uint64_t *checksums, moe_kv_send **out)
{
    if (n_blocks < 0 || block_bytes == 0 || block_bytes > (size_t)INT32_MAX)
        return moe_error(MOE_ERR_INVALID_ARG, "kv send: %d blocks of %zu bytes", n_blocks,
                         block_bytes);
    moe_kv_send *s = calloc(1, sizeof *s);
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "kv send: out of memory");
    *s = (moe_kv_send){.comm = comm, .peer = peer, .tag = tag, .block_bytes = block_bytes};
    s->corrupt = hooks && (hooks->corrupt_attempts < 0 ||
                           (hooks->corrupt_attempts > 0 && attempt <= hooks->corrupt_attempts));
    moe_status st = moe_kv_send_append(s, blocks, n_blocks, checksums);
    if (st != MOE_OK) {
        moe_kv_send_free(s);
        return st;
    }
    *out = s;
    return MOE_OK;
}

moe_status moe_kv_send_append(moe_kv_send *s, void *const *blocks, int n_blocks,
                              uint64_t *checksums)
{
    if (n_blocks <= 0)
        return MOE_OK;
    if (s->n + n_blocks > s->cap) {
        int cap = s->cap ? s->cap : 16;
        while (cap < s->n + n_blocks)
            cap *= 2;
        moe_comm_req **r = realloc(s->reqs, (size_t)cap * sizeof *r);
        if (!r)
            return moe_error(MOE_ERR_NOMEM, "kv send: out of memory");
        s->reqs = r;
        s->cap = cap;
    }
    for (int i = 0; i < n_blocks; i++)
        checksums[i] = moe_kv_checksum(blocks[i], s->block_bytes);
    int bad = -1;
    if (s->corrupt) {
        s->corrupt = false;
        bad = n_blocks / 2;
        if (!(s->scratch = malloc(s->block_bytes)))
            return moe_error(MOE_ERR_NOMEM, "kv send: out of memory");
        memcpy(s->scratch, blocks[bad], s->block_bytes);
        ((unsigned char *)s->scratch)[s->block_bytes / 3] ^= 0x10;
        MOE_LOG_W("test hook: corrupting buffer %d of %d on its way to rank %d", s->n + bad,
                  s->n + n_blocks, s->peer);
    }
    for (int i = 0; i < n_blocks; i++) {
        const void *src = i == bad ? s->scratch : blocks[i];
        s->reqs[s->n] = NULL;
        moe_status st = s->comm->ops->isend(s->comm->ctx, src, (int)s->block_bytes, s->peer,
                                            s->tag, &s->reqs[s->n]);
        if (st != MOE_OK) {
            s->reqs[s->n] = NULL;
            return st;
        }
        s->n++;
    }
    return MOE_OK;
}

/* A test that finds nothing to do may give the core away: with mpi_yield_when_idle, which
 * oversubscribed ranks need, Open MPI calls sched_yield in it. Testing each of dozens of requests
 * that cannot progress yet, every loop turn, made a decode rank with a batch to step yield dozens
 * of times per turn and wait 50-110 ms for a core on a loaded machine (bench/RESULTS.md, issue
 * 14, session 6). Where a transfer is known to wait for its peer, one test drives the whole
 * transport (Open MPI's progress engine is global): moe_kv_send_progress, and a receive marked
 * waiting. Otherwise a poll tests every pending request, as many progress calls as a bulk
 * transfer (a migration stage) needs to move at speed. */
moe_status moe_kv_send_progress(moe_kv_send *s)
{
    while (s->first_pending < s->n && !s->reqs[s->first_pending])
        s->first_pending++;
    if (s->first_pending == s->n)
        return MOE_OK;
    bool d = false;
    moe_status st = s->comm->ops->test(s->comm->ctx, s->reqs[s->first_pending], &d);
    if (st == MOE_OK && d)
        s->reqs[s->first_pending++] = NULL;
    return st;
}

moe_status moe_kv_send_poll(moe_kv_send *s, bool *done)
{
    bool all = true;
    for (int i = 0; i < s->n; i++) {
        if (!s->reqs[i])
            continue;
        bool d = false;
        moe_status st = s->comm->ops->test(s->comm->ctx, s->reqs[i], &d);
        if (st != MOE_OK)
            return st;
        if (d)
            s->reqs[i] = NULL;
        else
            all = false;
    }
    *done = all;
    return MOE_OK;
}

/* ---- receiver ---- */
struct moe_kv_recv {
    moe_comm *comm;
    int n;
    size_t block_bytes;
    void **blocks;
    moe_comm_req **reqs;
    int n_pending;
    uint64_t *sums;
    bool have_sums, sums_ok;
    int64_t deadline;
    moe_kv_xfer_result result;
    int bad_block;
    int first_pending; /* receives before it are done (they complete in order, mostly) */
    bool waiting;      /* the sender is not expected to be done soon: test only the first pending */
};

void moe_kv_recv_free(moe_kv_recv *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n; i++)
        if (r->reqs[i])
            r->comm->ops->cancel(r->comm->ctx, r->reqs[i]);
    free(r->reqs);
    free(r->blocks);
    free(r->sums);
    free(r);
}

moe_status moe_kv_recv_start(moe_comm *comm, void *const *blocks, int n_blocks, size_t block_bytes,
                             int peer, int tag, int64_t deadline_ns, moe_kv_recv **out)
{
    if (n_blocks < 0 || block_bytes == 0 || block_bytes > (size_t)INT32_MAX)
        return moe_error(MOE_ERR_INVALID_ARG, "kv recv: %d blocks of %zu bytes", n_blocks,
                         block_bytes);
    size_t nb = (size_t)(n_blocks ? n_blocks : 1);
    moe_kv_recv *r = calloc(1, sizeof *r);
    if (!r || !(r->reqs = calloc(nb, sizeof *r->reqs)) ||
        !(r->blocks = calloc(nb, sizeof *r->blocks)) || !(r->sums = calloc(nb, sizeof *r->sums))) {
        if (r) {
            free(r->reqs);
            free(r->blocks);
        }
        free(r);
        return moe_error(MOE_ERR_NOMEM, "kv recv: out of memory");
    }
    r->comm = comm;
    r->block_bytes = block_bytes;
    r->deadline = deadline_ns;
    r->bad_block = -1;
    for (int i = 0; i < n_blocks; i++) {
        r->blocks[i] = blocks[i];
        moe_status st =
            comm->ops->irecv(comm->ctx, blocks[i], (int)block_bytes, peer, tag, &r->reqs[i]);
        r->n = i + 1;
        if (st != MOE_OK) {
            r->reqs[i] = NULL;
            moe_kv_recv_free(r);
            return st;
        }
    }
    r->n = n_blocks;
    r->n_pending = n_blocks;
    *out = r;
    return MOE_OK;
}

void moe_kv_recv_set_checksums(moe_kv_recv *r, const uint64_t *checksums, int n)
{
    r->have_sums = true;
    r->sums_ok = n == r->n;
    if (r->sums_ok && n > 0)
        memcpy(r->sums, checksums, (size_t)n * sizeof *r->sums);
}

moe_kv_xfer_result moe_kv_recv_poll(moe_kv_recv *r, int64_t now_ns)
{
    if (r->result != MOE_KV_XFER_PENDING)
        return r->result;
    while (r->first_pending < r->n && !r->reqs[r->first_pending])
        r->first_pending++;
    for (int i = r->first_pending; i < r->n && r->n_pending > 0; i++) {
        if (!r->reqs[i])
            continue;
        bool d = false;
        if (r->comm->ops->test(r->comm->ctx, r->reqs[i], &d) != MOE_OK) {
            r->reqs[i] = NULL; /* released or not, it is unusable now */
            return r->result = MOE_KV_XFER_ERROR;
        }
        if (d) {
            r->reqs[i] = NULL;
            r->n_pending--;
        } else if (r->waiting) {
            break; /* see moe_kv_send_progress */
        }
    }
    if (r->n_pending == 0 && r->have_sums) {
        if (!r->sums_ok) {
            r->bad_block = 0;
            return r->result = MOE_KV_XFER_CORRUPT;
        }
        for (int i = 0; i < r->n; i++) {
            if (moe_kv_checksum(r->blocks[i], r->block_bytes) != r->sums[i]) {
                r->bad_block = i;
                return r->result = MOE_KV_XFER_CORRUPT;
            }
        }
        return r->result = MOE_KV_XFER_OK;
    }
    if (now_ns >= r->deadline)
        return r->result = MOE_KV_XFER_TIMEOUT;
    return MOE_KV_XFER_PENDING;
}

int moe_kv_recv_pending(const moe_kv_recv *r)
{
    return r->n_pending;
}

void moe_kv_recv_set_waiting(moe_kv_recv *r, bool waiting)
{
    r->waiting = waiting;
}

void moe_kv_recv_set_deadline(moe_kv_recv *r, int64_t deadline_ns)
{
    r->deadline = deadline_ns;
}

int moe_kv_recv_bad_block(const moe_kv_recv *r)
{
    return r->bad_block;
}
