/* Tests of worker/kv_transfer: XXH64 against the reference implementation's values, and block
 * transfers over an in-process mailbox comm (delivery, checksum failure and the corruption hook,
 * retry, timeout, cancelled receives). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "worker/kv_transfer.h"
#include "mailbox_comm.h"

Test(kv_checksum, matches_reference_xxh64)
{
    /* Values from libxxhash 0.8.1 (XXH64, seed 0). */
    cr_expect_eq(moe_kv_checksum("", 0), 0xef46db3751d8e999ULL);
    cr_expect_eq(moe_kv_checksum("a", 1), 0xd24ec4f1a98c6e5bULL);
    cr_expect_eq(moe_kv_checksum("abc", 3), 0x44bc2cf5ad770999ULL);
    cr_expect_eq(moe_kv_checksum("Hello, World!", 13), 0xc49aacf8080fe47fULL);
    static const struct {
        size_t n;
        uint64_t h;
    } want[] = {{31, 0xa2aa5f33cc4a6119ULL},   {32, 0x23c3c17ef790fd97ULL},
                {33, 0x50a7cfc7ba588784ULL},   {100, 0xa61f8d4c170fe531ULL},
                {1000, 0x5f235fa033f1a3fbULL}, {4099, 0x6243e90ade852967ULL}};
    unsigned char buf[4099];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)((i * 7 + 3) & 255);
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++)
        cr_expect_eq(moe_kv_checksum(buf, want[k].n), want[k].h, "length %zu", want[k].n);
}

Test(kv_checksum, every_single_bit_flip_is_detected)
{
    enum { N = 256 };
    unsigned char buf[N];
    for (int i = 0; i < N; i++)
        buf[i] = (unsigned char)(i * 31);
    uint64_t h = moe_kv_checksum(buf, N);
    for (int bit = 0; bit < N * 8; bit++) {
        buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        cr_assert_neq(moe_kv_checksum(buf, N), h, "bit %d", bit);
        buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
    }
}

Test(kv_transfer, data_tags_stay_in_mpi_range)
{
    for (uint32_t x = 0; x < 100000; x += 7) {
        int t = moe_kv_data_tag(x);
        cr_assert(t >= MOE_KV_TAG_BASE && t < MOE_KV_TAG_BASE + MOE_KV_TAG_SPAN && t <= 32767);
    }
    cr_expect_neq(moe_kv_data_tag(1), moe_kv_data_tag(2));
}

/* ---- over the mailbox comm (mailbox_comm.h): rank 0 sends, rank 1 receives ---- */

enum { NB = 5, BB = 4096 };

typedef struct {
    mailbox mb;
    moe_comm comm;
    unsigned char src[NB][BB], dst[NB][BB];
    void *sp[NB], *dp[NB];
    uint64_t sums[NB];
} rig;

static void rig_init(rig *g)
{
    memset(g, 0, sizeof *g);
    g->comm = (moe_comm){.ops = &mb_ops, .ctx = &g->mb};
    for (int b = 0; b < NB; b++) {
        for (int i = 0; i < BB; i++)
            g->src[b][i] = (unsigned char)(b * 131 + i * 17);
        g->sp[b] = g->src[b];
        g->dp[b] = g->dst[b];
    }
}

/* One attempt end to end; returns the receiver's verdict. */
static moe_kv_xfer_result attempt(rig *g, int tag, int attempt_no, const moe_kv_test_hooks *hooks,
                                  int *bad)
{
    moe_kv_recv *r;
    moe_kv_send *s;
    memset(g->dst, 0, sizeof g->dst);
    cr_assert_eq(
        moe_kv_recv_start(&g->comm, g->dp, NB, BB, 0, tag, moe_now_ns() + 2000000000LL, &r),
        MOE_OK);
    cr_assert_eq(moe_kv_send_start(&g->comm, g->sp, NB, BB, 1, tag, attempt_no, hooks, g->sums, &s),
                 MOE_OK);
    moe_kv_recv_set_checksums(r, g->sums, NB);
    moe_kv_xfer_result res;
    while ((res = moe_kv_recv_poll(r, moe_now_ns())) == MOE_KV_XFER_PENDING)
        ;
    bool done = false;
    cr_assert_eq(moe_kv_send_poll(s, &done), MOE_OK);
    cr_expect(done, "sends still pending after the receiver finished");
    *bad = moe_kv_recv_bad_block(r);
    moe_kv_send_free(s);
    moe_kv_recv_free(r);
    return res;
}

Test(kv_transfer, blocks_arrive_intact)
{
    static rig g;
    rig_init(&g);
    int bad;
    cr_assert_eq(attempt(&g, 101, 1, NULL, &bad), MOE_KV_XFER_OK);
    cr_expect_eq(bad, -1);
    cr_expect_eq(memcmp(g.src, g.dst, sizeof g.src), 0);
    for (int b = 0; b < NB; b++)
        cr_expect_eq(g.sums[b], moe_kv_checksum(g.src[b], BB));
    cr_expect_eq(g.mb.n_live, 0, "requests leaked: %d", g.mb.n_live);
    mb_free(&g.mb);
}

Test(kv_transfer, corruption_hook_is_detected_then_retry_succeeds)
{
    static rig g;
    rig_init(&g);
    unsigned char before[NB][BB];
    memcpy(before, g.src, sizeof before);
    moe_kv_test_hooks h = {.corrupt_attempts = 1};
    int bad;
    cr_assert_eq(attempt(&g, 102, 1, &h, &bad), MOE_KV_XFER_CORRUPT);
    cr_expect(bad >= 0 && bad < NB);
    cr_expect_eq(memcmp(before, g.src, sizeof before), 0, "the sender's own KV was modified");
    cr_assert_eq(attempt(&g, 103, 2, &h, &bad), MOE_KV_XFER_OK, "the retry must not be corrupted");
    cr_expect_eq(memcmp(g.src, g.dst, sizeof g.src), 0);
    h.corrupt_attempts = -1;
    cr_expect_eq(attempt(&g, 104, 2, &h, &bad), MOE_KV_XFER_CORRUPT,
                 "'all' corrupts every attempt");
    cr_expect_eq(g.mb.n_live, 0);
    mb_free(&g.mb);
}

Test(kv_transfer, wrong_checksum_count_is_corrupt)
{
    static rig g;
    rig_init(&g);
    moe_kv_recv *r;
    moe_kv_send *s;
    cr_assert_eq(moe_kv_recv_start(&g.comm, g.dp, NB, BB, 0, 7, moe_now_ns() + 1000000000LL, &r),
                 MOE_OK);
    cr_assert_eq(moe_kv_send_start(&g.comm, g.sp, NB, BB, 1, 7, 1, NULL, g.sums, &s), MOE_OK);
    moe_kv_recv_set_checksums(r, g.sums, NB - 1);
    moe_kv_xfer_result res;
    while ((res = moe_kv_recv_poll(r, moe_now_ns())) == MOE_KV_XFER_PENDING)
        ;
    cr_expect_eq(res, MOE_KV_XFER_CORRUPT);
    moe_kv_send_free(s);
    moe_kv_recv_free(r);
    mb_free(&g.mb);
}

Test(kv_transfer, missing_sender_times_out_and_receives_are_cancelled)
{
    static rig g;
    rig_init(&g);
    moe_kv_recv *r;
    int64_t t0 = moe_now_ns();
    cr_assert_eq(moe_kv_recv_start(&g.comm, g.dp, NB, BB, 0, 9, t0 + 50000000LL, &r), MOE_OK);
    moe_kv_xfer_result res;
    while ((res = moe_kv_recv_poll(r, moe_now_ns())) == MOE_KV_XFER_PENDING)
        ;
    cr_expect_eq(res, MOE_KV_XFER_TIMEOUT);
    cr_expect(moe_now_ns() - t0 >= 50000000LL);
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_TIMEOUT, "a verdict is final");
    moe_kv_recv_free(r);
    cr_expect_eq(g.mb.n_live, 0, "receives left posted: %d", g.mb.n_live);
    mb_free(&g.mb);
}

Test(kv_transfer, blocks_without_checksums_stay_pending)
{
    static rig g;
    rig_init(&g);
    moe_kv_recv *r;
    moe_kv_send *s;
    cr_assert_eq(moe_kv_recv_start(&g.comm, g.dp, NB, BB, 0, 11, moe_now_ns() + 60000000000LL, &r),
                 MOE_OK);
    cr_assert_eq(moe_kv_send_start(&g.comm, g.sp, NB, BB, 1, 11, 1, NULL, g.sums, &s), MOE_OK);
    for (int i = 0; i < 10; i++)
        cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_PENDING,
                     "verified without the header");
    moe_kv_recv_set_checksums(r, g.sums, NB);
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_OK);
    moe_kv_send_free(s);
    moe_kv_recv_free(r);
    mb_free(&g.mb);
}

Test(kv_transfer, hooks_from_environment)
{
    moe_kv_test_hooks h;
    unsetenv("MOE_TEST_CORRUPT_KV");
    moe_kv_test_hooks_from_env(&h);
    cr_expect_eq(h.corrupt_attempts, 0);
    setenv("MOE_TEST_HOOKS", "1", 1);
    setenv("MOE_TEST_CORRUPT_KV", "1", 1);
    moe_kv_test_hooks_from_env(&h);
    cr_expect_eq(h.corrupt_attempts, 1);
    setenv("MOE_TEST_CORRUPT_KV", "all", 1);
    moe_kv_test_hooks_from_env(&h);
    cr_expect_eq(h.corrupt_attempts, -1);
    unsetenv("MOE_TEST_CORRUPT_KV");
}

/* Layer by layer: a send created empty and appended to batch by batch (one batch per layer) fills
 * receives posted all at once, in order; the receive has no deadline until the sender is done,
 * then a moved deadline times out what never came. */
Test(kv_transfer, appended_batches_fill_receives_in_order)
{
    static rig g;
    rig_init(&g);
    moe_kv_recv *r;
    moe_kv_send *s;
    cr_assert_eq(moe_kv_recv_start(&g.comm, g.dp, NB, BB, 0, 105, INT64_MAX, &r), MOE_OK);
    cr_assert_eq(moe_kv_send_start(&g.comm, NULL, 0, BB, 1, 105, 1, NULL, g.sums, &s), MOE_OK);
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_PENDING);
    cr_assert_eq(moe_kv_send_append(s, g.sp, 2, g.sums), MOE_OK);
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_PENDING);
    cr_expect_eq(memcmp(g.src, g.dst, 2 * BB), 0, "the first batch landed");
    cr_assert_eq(moe_kv_send_append(s, g.sp + 2, NB - 2, g.sums + 2), MOE_OK);
    moe_kv_recv_set_checksums(r, g.sums, NB);
    cr_assert_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_OK);
    cr_expect_eq(memcmp(g.src, g.dst, sizeof g.src), 0);
    bool done = false;
    cr_assert_eq(moe_kv_send_poll(s, &done), MOE_OK);
    cr_expect(done);
    moe_kv_send_free(s);
    moe_kv_recv_free(r);

    /* the corruption hook hits the first non-empty batch only */
    moe_kv_test_hooks h = {.corrupt_attempts = 1};
    cr_assert_eq(moe_kv_recv_start(&g.comm, g.dp, NB, BB, 0, 106, INT64_MAX, &r), MOE_OK);
    cr_assert_eq(moe_kv_send_start(&g.comm, NULL, 0, BB, 1, 106, 1, &h, g.sums, &s), MOE_OK);
    cr_assert_eq(moe_kv_send_append(s, g.sp, 3, g.sums), MOE_OK);
    cr_assert_eq(moe_kv_send_append(s, g.sp + 3, NB - 3, g.sums + 3), MOE_OK);
    moe_kv_recv_set_checksums(r, g.sums, NB);
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns()), MOE_KV_XFER_CORRUPT);
    cr_expect_eq(moe_kv_recv_bad_block(r), 1);
    moe_kv_send_free(s);
    moe_kv_recv_free(r);

    /* nothing sent: pending forever until the deadline is set */
    cr_assert_eq(moe_kv_recv_start(&g.comm, g.dp, NB, BB, 0, 107, INT64_MAX, &r), MOE_OK);
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns() + 3600 * 1000000000LL), MOE_KV_XFER_PENDING);
    moe_kv_recv_set_deadline(r, moe_now_ns());
    cr_expect_eq(moe_kv_recv_poll(r, moe_now_ns() + 1), MOE_KV_XFER_TIMEOUT);
    moe_kv_recv_free(r);
    cr_expect_eq(g.mb.n_live, 0, "requests leaked: %d", g.mb.n_live);
    mb_free(&g.mb);
}
