/* Tests of worker/kv_stage: KV block bytes read and written through the backend interface round
 * trip bitwise, with the transfer layer's per-block checksums (worker/kv_transfer.h) computed on
 * the sender's views and verified on the receiver's, on the three paths a worker can take:
 *  - direct: the CPU backend's pool is host memory; views are the blocks (zero copies);
 *  - staged: a backend whose memory the host may not address (host_ptr NULL, as on CUDA): views
 *    are a host buffer filled by download() and stored by upload(); this "device" is the CPU
 *    backend with host_ptr hidden and its copies counted, so the test can tell the path was taken;
 *  - forced: the CPU backend with `staged` set (MOE_TEST_KV_STAGING=1, what the integration
 *    tests use to run the staged path here).
 * Block contents are random bytes (NaN and denormal patterns included): equality is memcmp. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "worker/compute/backend.h"
#include "worker/kv_stage.h"
#include "worker/kv_transfer.h"
#include "mailbox_comm.h"

/* ---- a "device" backend: the CPU backend's ops, host_ptr hidden, transfers counted ---- */
static moe_backend_ops dev_ops;
static const moe_backend_ops *cpu_ops;
static int n_up, n_down;

static void *dev_host_ptr(moe_backend *be, void *p)
{
    (void)be;
    (void)p;
    return NULL;
}
static moe_status dev_upload(moe_backend *be, void *dst, const void *src, size_t n)
{
    n_up++;
    return cpu_ops->upload(be, dst, src, n);
}
static moe_status dev_download(moe_backend *be, void *dst, const void *src, size_t n)
{
    n_down++;
    return cpu_ops->download(be, dst, src, n);
}

/* The async copies really deferred until synchronize, as on a device: a stage that read a view
 * before waiting, or returned from upload before the copies ran, would see the wrong bytes. */
enum { MAX_PEND = 1024 };
static struct {
    void *dst;
    const void *src;
    size_t n;
} pend[MAX_PEND];
static int n_pend, n_sync;
static moe_status dev_defer(moe_backend *be, void *dst, const void *src, size_t n)
{
    (void)be;
    cr_assert_lt(n_pend, MAX_PEND);
    pend[n_pend].dst = dst;
    pend[n_pend].src = src;
    pend[n_pend++].n = n;
    return MOE_OK;
}
static moe_status dev_upload_async(moe_backend *be, void *dst, const void *src, size_t n)
{
    n_up++;
    return dev_defer(be, dst, src, n);
}
static moe_status dev_download_async(moe_backend *be, void *dst, const void *src, size_t n)
{
    n_down++;
    return dev_defer(be, dst, src, n);
}
static moe_status dev_synchronize(moe_backend *be)
{
    n_sync++;
    for (int i = 0; i < n_pend; i++)
        memcpy(pend[i].dst, pend[i].src, pend[i].n);
    n_pend = 0;
    return cpu_ops->synchronize(be);
}

typedef enum { PATH_DIRECT, PATH_STAGED, PATH_FORCED, PATH_COUNT } path;
static const char *const path_name[] = {"direct", "staged", "forced"};

static moe_backend *make_backend(path p)
{
    moe_backend *be;
    cr_assert_eq(moe_backend_cpu_create(NULL, &be), MOE_OK);
    if (p == PATH_STAGED) {
        cpu_ops = be->ops;
        dev_ops = *be->ops;
        dev_ops.host_ptr = dev_host_ptr;
        dev_ops.upload = dev_upload;
        dev_ops.download = dev_download;
        dev_ops.upload_async = dev_upload_async;
        dev_ops.download_async = dev_download_async;
        dev_ops.synchronize = dev_synchronize;
        be->ops = &dev_ops;
        be->host_memory = false;
    }
    return be;
}

static void free_backend(moe_backend *be)
{
    if (be->ops == &dev_ops)
        be->ops = cpu_ops; /* destroy through the CPU backend's own table */
    moe_backend_free(be);
}

/* Odd sizes: 3 layers, 2 KV heads, head_dim 5, 3 positions per block. */
static const moe_kv_layout lay = {.n_layers = 3, .n_kv_heads = 2, .head_dim = 5, .block_size = 3};
enum { POOL = 7, NB = 3 };
static const int src_blocks[NB] = {5, 1, 3}, dst_blocks[NB] = {6, 0, 4};

static void fill_random(unsigned char *p, size_t n, unsigned seed)
{
    uint64_t x = 0x9E3779B97F4A7C15ULL * (seed + 1);
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        p[i] = (unsigned char)(x >> 24);
    }
}

/* Sends stage `from`'s views (n views of `bytes`) to stage `to`'s over the mailbox comm with
 * checksums; returns the receiver's verdict. */
static moe_kv_xfer_result transfer(void *const *from, void *const *to, int n, size_t bytes,
                                   uint64_t *sums)
{
    mailbox mb = {0};
    moe_comm comm = {.ops = &mb_ops, .ctx = &mb};
    moe_kv_recv *r;
    moe_kv_send *s;
    cr_assert_eq(moe_kv_recv_start(&comm, to, n, bytes, 0, 77, moe_now_ns() + 2000000000LL, &r),
                 MOE_OK);
    cr_assert_eq(moe_kv_send_start(&comm, from, n, bytes, 1, 77, 1, NULL, sums, &s), MOE_OK);
    moe_kv_recv_set_checksums(r, sums, n);
    moe_kv_xfer_result res;
    while ((res = moe_kv_recv_poll(r, moe_now_ns())) == MOE_KV_XFER_PENDING)
        ;
    moe_kv_send_free(s);
    moe_kv_recv_free(r);
    cr_expect_eq(mb.n_live, 0, "requests leaked");
    mb_free(&mb);
    return res;
}

Test(kv_stage, whole_blocks_round_trip_bitwise_with_checksums)
{
    size_t bb = moe_kv_block_bytes(&lay);
    for (int p = 0; p < PATH_COUNT; p++) {
        moe_backend *be = make_backend((path)p);
        bool forced = p == PATH_FORCED;
        moe_kv_cache *a, *b;
        cr_assert_eq(moe_kv_create_on(be, &lay, POOL, &a), MOE_OK);
        cr_assert_eq(moe_kv_create_on(be, &lay, POOL, &b), MOE_OK);
        /* The sender's pool, written through the interface; `want` is the host model. */
        unsigned char *want = malloc(bb * NB), *got = malloc(bb * NB), *zero = calloc(1, bb);
        fill_random(want, bb * NB, (unsigned)p);
        for (int i = 0; i < NB; i++)
            cr_assert_eq(moe_kv_write(a, src_blocks[i], 0, want + (size_t)i * bb, bb), MOE_OK);
        n_up = n_down = n_sync = 0;
        moe_kv_stage sa = {0}, sb = {0};
        cr_assert_eq(moe_kv_stage_open(&sa, a, src_blocks, NB, 1, forced), MOE_OK);
        cr_assert_eq(moe_kv_stage_download(&sa, 0, 1), MOE_OK);
        void *const *va = moe_kv_stage_views(&sa, 0);
        for (int i = 0; i < NB; i++) {
            cr_expect_eq(memcmp(va[i], want + (size_t)i * bb, bb), 0, "%s: view %d", path_name[p],
                         i);
            /* zero-copy exactly where the host can address the pool */
            cr_expect_eq(va[i] == (void *)moe_kv_block_data(a, src_blocks[i]), p == PATH_DIRECT,
                         "%s: view %d aliasing", path_name[p], i);
        }
        cr_assert_eq(moe_kv_stage_open(&sb, b, dst_blocks, NB, 1, forced), MOE_OK);
        uint64_t sums[NB];
        cr_assert_eq(transfer(va, moe_kv_stage_views(&sb, 0), NB, bb, sums), MOE_KV_XFER_OK, "%s",
                     path_name[p]);
        for (int i = 0; i < NB; i++)
            cr_expect_eq(sums[i], moe_kv_checksum(want + (size_t)i * bb, bb), "%s: checksum %d",
                         path_name[p], i);
        cr_assert_eq(moe_kv_stage_upload(&sb), MOE_OK);
        if (p == PATH_STAGED)
            cr_expect(n_down == NB && n_up == NB && n_sync == 2,
                      "staged: %d downloads, %d uploads, %d synchronisations (want %d, %d, one per stage call)",
                      n_down, n_up, n_sync, NB, NB);
        /* The receiver's blocks, read back through the interface: the same bytes, others untouched.
         */
        for (int i = 0; i < NB; i++)
            cr_assert_eq(moe_kv_read(b, dst_blocks[i], 0, got + (size_t)i * bb, bb), MOE_OK);
        cr_expect_eq(memcmp(got, want, bb * NB), 0, "%s: blocks differ after the round trip",
                     path_name[p]);
        for (int i = 0; i < NB; i++)
            cr_expect_eq(moe_kv_checksum(got + (size_t)i * bb, bb), sums[i]);
        for (int blk = 0; blk < POOL; blk++) {
            if (blk == dst_blocks[0] || blk == dst_blocks[1] || blk == dst_blocks[2])
                continue;
            cr_assert_eq(moe_kv_read(b, blk, 0, got, bb), MOE_OK);
            cr_expect_eq(memcmp(got, zero, bb), 0, "%s: block %d written", path_name[p], blk);
        }
        moe_kv_stage_free(&sa);
        moe_kv_stage_free(&sb);
        moe_kv_free(a);
        moe_kv_free(b);
        free(want);
        free(got);
        free(zero);
        free_backend(be);
    }
}

/* The layer-by-layer push: one slice per layer, downloaded layer by layer as the forward pass
 * writes them, received slice-major, uploaded once; a corrupted slice is caught and not stored. */
Test(kv_stage, layer_slices_round_trip_and_a_corrupt_one_is_not_stored)
{
    size_t bb = moe_kv_block_bytes(&lay), lb = bb / (size_t)lay.n_layers;
    int L = lay.n_layers;
    for (int p = 0; p < PATH_COUNT; p++) {
        moe_backend *be = make_backend((path)p);
        bool forced = p == PATH_FORCED;
        moe_kv_cache *a, *b;
        cr_assert_eq(moe_kv_create_on(be, &lay, POOL, &a), MOE_OK);
        cr_assert_eq(moe_kv_create_on(be, &lay, POOL, &b), MOE_OK);
        unsigned char *want = malloc(bb * NB), *got = malloc(bb);
        fill_random(want, bb * NB, 10u + (unsigned)p);
        moe_kv_stage sa = {0}, sb = {0};
        cr_assert_eq(moe_kv_stage_open(&sa, a, src_blocks, NB, L, forced), MOE_OK);
        cr_assert_eq(moe_kv_stage_open(&sb, b, dst_blocks, NB, L, forced), MOE_OK);
        uint64_t sums[3 * NB];
        for (int l = 0; l < L; l++) {
            /* layer l's K/V appear in the pool, then its slices are downloaded */
            for (int i = 0; i < NB; i++)
                cr_assert_eq(moe_kv_write(a, src_blocks[i], (size_t)l * lb,
                                          want + (size_t)i * bb + (size_t)l * lb, lb),
                             MOE_OK);
            cr_assert_eq(moe_kv_stage_download(&sa, l, 1), MOE_OK);
        }
        cr_assert_eq(
            transfer(moe_kv_stage_views(&sa, 0), moe_kv_stage_views(&sb, 0), L * NB, lb, sums),
            MOE_KV_XFER_OK);
        cr_assert_eq(moe_kv_stage_upload(&sb), MOE_OK);
        for (int i = 0; i < NB; i++) {
            cr_assert_eq(moe_kv_read(b, dst_blocks[i], 0, got, bb), MOE_OK);
            cr_expect_eq(memcmp(got, want + (size_t)i * bb, bb), 0, "%s: block %d", path_name[p],
                         i);
        }
        /* a slice corrupted in flight: the receiver says CORRUPT and the caller never uploads */
        if (p != PATH_DIRECT) {
            moe_kv_cache *c;
            cr_assert_eq(moe_kv_create_on(be, &lay, POOL, &c), MOE_OK);
            moe_kv_stage sc = {0};
            cr_assert_eq(moe_kv_stage_open(&sc, c, dst_blocks, NB, L, forced), MOE_OK);
            ((unsigned char *)moe_kv_stage_views(&sa, 1)[2])[lb / 2] ^=
                0x01; /* the sender's view, after its checksum */
            mailbox mb = {0};
            moe_comm comm = {.ops = &mb_ops, .ctx = &mb};
            moe_kv_recv *r;
            moe_kv_send *s;
            uint64_t sums2[3 * NB];
            memcpy(sums2, sums, sizeof sums);
            cr_assert_eq(moe_kv_recv_start(&comm, moe_kv_stage_views(&sc, 0), L * NB, lb, 0, 5,
                                           moe_now_ns() + 2000000000LL, &r),
                         MOE_OK);
            cr_assert_eq(moe_kv_send_start(&comm, moe_kv_stage_views(&sa, 0), L * NB, lb, 1, 5, 1,
                                           NULL, sums2, &s),
                         MOE_OK);
            moe_kv_recv_set_checksums(r, sums, L * NB); /* the checksums of the intact bytes */
            moe_kv_xfer_result res;
            while ((res = moe_kv_recv_poll(r, moe_now_ns())) == MOE_KV_XFER_PENDING)
                ;
            cr_expect_eq(res, MOE_KV_XFER_CORRUPT, "%s", path_name[p]);
            cr_expect_eq(moe_kv_recv_bad_block(r), 1 * NB + 2);
            moe_kv_send_free(s);
            moe_kv_recv_free(r);
            mb_free(&mb);
            unsigned char *zero = calloc(1, bb);
            cr_assert_eq(moe_kv_read(c, dst_blocks[2], 0, got, bb), MOE_OK);
            cr_expect_eq(memcmp(got, zero, bb), 0, "%s: a block was stored before any upload",
                         path_name[p]);
            free(zero);
            moe_kv_stage_free(&sc);
            moe_kv_free(c);
        }
        moe_kv_stage_free(&sa);
        moe_kv_stage_free(&sb);
        moe_kv_free(a);
        moe_kv_free(b);
        free(want);
        free(got);
        free_backend(be);
    }
}

Test(kv_stage, bad_slicing_and_block_ids_are_refused)
{
    moe_backend *be = make_backend(PATH_DIRECT);
    moe_kv_cache *a;
    cr_assert_eq(moe_kv_create_on(be, &lay, POOL, &a), MOE_OK);
    moe_kv_stage st = {0};
    int bad[2] = {1, POOL};
    cr_expect_eq(moe_kv_stage_open(&st, a, bad, 2, 1, false), MOE_ERR_INVALID_ARG);
    cr_expect_eq(moe_kv_stage_open(&st, a, src_blocks, NB, 7, false),
                 MOE_ERR_INVALID_ARG); /* 7 does not divide */
    cr_expect_eq(moe_kv_stage_open(&st, a, src_blocks, NB, 0, false), MOE_ERR_INVALID_ARG);
    cr_assert_eq(moe_kv_stage_open(&st, a, src_blocks, NB, 3, false), MOE_OK);
    cr_expect_eq(moe_kv_stage_download(&st, 2, 2), MOE_ERR_RANGE);
    cr_assert_eq(moe_kv_stage_open(&st, a, NULL, 0, 1, false), MOE_OK); /* an empty sequence */
    cr_expect_eq(moe_kv_stage_download(&st, 0, 1), MOE_OK);
    moe_kv_stage_free(&st);
    moe_kv_free(a);
    free_backend(be);
}
