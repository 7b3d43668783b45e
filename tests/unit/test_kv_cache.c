/* Paged KV cache: block accounting, reference counts, all-or-nothing reservation, layout. */
#include <criterion/criterion.h>

#include "worker/kv_cache.h"

static const moe_kv_layout lay = {.n_layers = 3, .n_kv_heads = 2, .head_dim = 4, .block_size = 5};

Test(kv_cache, block_size_and_layout)
{
    cr_assert_eq(moe_kv_block_floats(&lay), 3u * 2 * 2 * 5 * 4);
    moe_kv_cache *kv;
    cr_assert_eq(moe_kv_create(&lay, 4, &kv), MOE_OK);
    int b = moe_kv_block_alloc(kv);
    float *base = moe_kv_block_data(kv, b);
    /* K of layer l sits at l * (2 * kv_heads * block * head_dim); V right after K. */
    cr_assert_eq(moe_kv_block_k(kv, b, 0), base);
    cr_assert_eq(moe_kv_block_v(kv, b, 0), base + 2 * 5 * 4);
    cr_assert_eq(moe_kv_block_k(kv, b, 2), base + 2 * (2 * 2 * 5 * 4));
    cr_assert_eq(moe_kv_block_data(kv, b + 1 < 4 ? b + 1 : b - 1) - base,
                 (b + 1 < 4 ? 1 : -1) * (long)moe_kv_block_floats(&lay));
    moe_kv_free(kv);
}

Test(kv_cache, reserve_is_all_or_nothing_and_release_returns_blocks)
{
    moe_kv_cache *kv;
    cr_assert_eq(moe_kv_create(&lay, 4, &kv), MOE_OK);
    moe_kv_seq a = {0}, b = {0};
    cr_assert_eq(moe_kv_seq_reserve(kv, &a, 11), MOE_OK); /* 3 blocks of 5 */
    cr_assert_eq(a.n_blocks, 3);
    cr_assert_eq(moe_kv_free_blocks(kv), 1);
    cr_assert_eq(moe_kv_seq_reserve(kv, &a, 15), MOE_OK); /* still 3 */
    cr_assert_eq(moe_kv_free_blocks(kv), 1);
    cr_assert_eq(moe_kv_seq_reserve(kv, &b, 6), MOE_ERR_FULL); /* needs 2, 1 free */
    cr_assert_eq(b.n_blocks, 0, "a failed reservation must leave the table unchanged");
    cr_assert_eq(moe_kv_free_blocks(kv), 1);
    cr_assert_eq(moe_kv_seq_reserve(kv, &b, 5), MOE_OK);
    cr_assert_eq(moe_kv_used_blocks(kv), 4);
    moe_kv_seq_release(kv, &a);
    moe_kv_seq_release(kv, &b);
    cr_assert_eq(moe_kv_used_blocks(kv), 0);
    cr_assert_eq(a.n_blocks, 0);
    moe_kv_free(kv);
}

Test(kv_cache, refcounts_keep_shared_blocks_alive)
{
    moe_kv_cache *kv;
    cr_assert_eq(moe_kv_create(&lay, 2, &kv), MOE_OK);
    int b = moe_kv_block_alloc(kv);
    moe_kv_block_ref(kv, b);
    cr_assert_eq(moe_kv_block_refcount(kv, b), 2);
    moe_kv_block_unref(kv, b);
    cr_assert_eq(moe_kv_free_blocks(kv), 1);
    moe_kv_block_unref(kv, b);
    cr_assert_eq(moe_kv_free_blocks(kv), 2);
    cr_assert_geq(moe_kv_block_alloc(kv), 0);
    cr_assert_geq(moe_kv_block_alloc(kv), 0);
    cr_assert_eq(moe_kv_block_alloc(kv), -1);
    moe_kv_free(kv);
}

Test(kv_cache, bad_layout_is_refused)
{
    moe_kv_cache *kv = NULL;
    moe_kv_layout bad = lay;
    bad.block_size = 0;
    cr_assert_eq(moe_kv_create(&bad, 4, &kv), MOE_ERR_INVALID_ARG);
    cr_assert_eq(moe_kv_create(&lay, 0, &kv), MOE_ERR_INVALID_ARG);
    cr_assert_null(kv);
}
