/* Tests for the safetensors reader and writer: round trips, and every malformed header we refuse.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/unit/test_util.h"
#include "worker/safetensors.h"

static char tmpdir[256];


static void setup(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moe-st-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void teardown(void)
{
    moe_test_rm_rf(tmpdir);
}

TestSuite(safetensors, .init = setup, .fini = teardown, .timeout = 30);

/* A file image: 8-byte length, the header padded with spaces to 8 bytes, then data_len bytes of
 * data (byte i = i & 0xff). Caller frees. */
static uint8_t *image(const char *header, size_t data_len, size_t *len)
{
    size_t hl = strlen(header);
    size_t padded = (hl + 7) & ~(size_t)7;
    *len = 8 + padded + data_len;
    uint8_t *b = malloc(*len);
    cr_assert_not_null(b);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(b + 8, header, hl);
    memset(b + 8 + hl, ' ', padded - hl);
    for (size_t i = 0; i < data_len; i++)
        b[8 + padded + i] = (uint8_t)i;
    return b;
}

static void write_bytes(const char *path, const uint8_t *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(b, 1, n, f), n);
    fclose(f);
}

/* Parses header+data from memory and expects failure with `status`, the message naming `name`
 * and containing `what` (a tensor or field). */
static void expect_parse_error(const char *header, size_t data_len, moe_status status,
                               const char *what)
{
    size_t len;
    uint8_t *b = image(header, data_len, &len);
    moe_st_set *set = NULL;
    moe_status s = moe_st_parse(b, len, "mem.safetensors", &set);
    cr_assert_eq(s, status, "status %s, expected %s: %s", moe_status_name(s),
                 moe_status_name(status), moe_error_message());
    cr_assert_null(set);
    cr_assert(strstr(moe_error_message(), "mem.safetensors"), "message lacks the file: %s",
              moe_error_message());
    cr_assert(strstr(moe_error_message(), what), "message lacks \"%s\": %s", what,
              moe_error_message());
    free(b);
}

static void fill_counter(void *ctx, void *dst, size_t n, size_t off)
{
    int *calls = ctx;
    (*calls)++;
    for (size_t i = 0; i < n; i++)
        ((uint8_t *)dst)[i] = (uint8_t)((off + i) * 7 + 3);
}

Test(safetensors, write_then_read_round_trip)
{
    float a[6] = {1, -2, 3.5f, 4, 5, 6};
    uint16_t h[3] = {0x3f80, 0x4000, 0xc040};
    int calls = 0;
    /* 3 MiB + 5 bytes through the fill callback: several staging chunks, odd tail. */
    moe_st_write_tensor t[3] = {
        {.name = "a", .dtype = MOE_DT_F32, .n_dims = 2, .shape = {2, 3}, .data = a},
        {.name = "h.bf16", .dtype = MOE_DT_BF16, .n_dims = 1, .shape = {3}, .data = h},
        {.name = "big",
         .dtype = MOE_DT_F16,
         .n_dims = 3,
         .shape = {3, 1024, 512 + 1},
         .fill = fill_counter,
         .fill_ctx = &calls},
    };
    char path[300];
    snprintf(path, sizeof path, "%s/x.safetensors", tmpdir);
    cr_assert_eq(moe_st_write_file(path, t, 3, "{\"format\":\"pt\"}"), MOE_OK, "%s",
                 moe_error_message());
    cr_assert_geq(calls, 4);

    moe_st_set *set;
    cr_assert_eq(moe_st_open_file(path, &set), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_st_count(set), 3);
    const moe_st_tensor *ta = moe_st_find(set, "a");
    cr_assert_not_null(ta);
    cr_assert_eq(ta->dtype, MOE_DT_F32);
    cr_assert_eq(ta->n_dims, 2);
    cr_assert_eq(ta->shape[0], 2);
    cr_assert_eq(ta->shape[1], 3);
    cr_assert_eq(ta->n_bytes, sizeof a);
    cr_assert_eq(memcmp(ta->data, a, sizeof a), 0);
    cr_assert_str_eq(ta->file, path);
    cr_assert_eq((uintptr_t)ta->data % 4, 0);

    const moe_st_tensor *th = moe_st_find(set, "h.bf16");
    cr_assert_not_null(th);
    cr_assert_eq(th->dtype, MOE_DT_BF16);
    cr_assert_eq(memcmp(th->data, h, sizeof h), 0);

    const moe_st_tensor *tb = moe_st_find(set, "big");
    cr_assert_not_null(tb);
    cr_assert_eq(tb->n_dims, 3);
    cr_assert_eq(tb->shape[2], 513);
    cr_assert_eq(tb->n_bytes, (size_t)3 * 1024 * 513 * 2);
    const uint8_t *p = tb->data;
    for (size_t i = 0; i < tb->n_bytes; i += 4099)
        cr_assert_eq(p[i], (uint8_t)(i * 7 + 3), "byte %zu", i);
    cr_assert_eq(p[tb->n_bytes - 1], (uint8_t)((tb->n_bytes - 1) * 7 + 3));

    cr_assert_null(moe_st_find(set, "nope"));
    cr_assert_null(moe_st_at(set, 3));
    cr_assert_not_null(moe_st_at(set, 0));
    moe_st_close(set);
}

Test(safetensors, writer_keeps_data_packed_and_aligned)
{
    /* An odd-length BF16 tensor before an F32 one would misalign the F32 data if written in the
     * given order; the writer must still pack without gaps (the reference reader refuses gaps). */
    uint16_t odd[3] = {1, 2, 3};
    float f[2] = {1.5f, 2.5f};
    moe_st_write_tensor t[2] = {
        {.name = "odd", .dtype = MOE_DT_BF16, .n_dims = 1, .shape = {3}, .data = odd},
        {.name = "f", .dtype = MOE_DT_F32, .n_dims = 1, .shape = {2}, .data = f},
    };
    char path[300];
    snprintf(path, sizeof path, "%s/a.safetensors", tmpdir);
    cr_assert_eq(moe_st_write_file(path, t, 2, NULL), MOE_OK, "%s", moe_error_message());
    moe_st_set *set;
    cr_assert_eq(moe_st_open_file(path, &set), MOE_OK, "%s", moe_error_message());
    const moe_st_tensor *tf = moe_st_find(set, "f"), *to = moe_st_find(set, "odd");
    cr_assert_eq((uintptr_t)tf->data % 4, 0);
    cr_assert_eq(memcmp(tf->data, f, sizeof f), 0);
    cr_assert_eq(memcmp(to->data, odd, sizeof odd), 0);
    /* packed: the two ranges are adjacent and fill the data section */
    const uint8_t *lo = (const uint8_t *)(tf->data < to->data ? tf->data : to->data);
    const uint8_t *hi = (const uint8_t *)(tf->data < to->data ? to->data : tf->data);
    size_t lo_bytes = tf->data < to->data ? tf->n_bytes : to->n_bytes;
    cr_assert_eq(lo + lo_bytes, hi);
    size_t hi_bytes = tf->data < to->data ? to->n_bytes : tf->n_bytes;
    cr_assert_eq((size_t)(hi + hi_bytes - lo), sizeof odd + sizeof f);
    moe_st_close(set);
}

Test(safetensors, writer_refuses_bad_input)
{
    char path[300];
    snprintf(path, sizeof path, "%s/w.safetensors", tmpdir);
    float a[1] = {0};
    moe_st_write_tensor dup[2] = {
        {.name = "x", .dtype = MOE_DT_F32, .n_dims = 1, .shape = {1}, .data = a},
        {.name = "x", .dtype = MOE_DT_F32, .n_dims = 1, .shape = {1}, .data = a},
    };
    cr_assert_eq(moe_st_write_file(path, dup, 2, NULL), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "tensor x"), "%s", moe_error_message());
    /* Q8/Q4 are stored ("MOE_Q8"/"MOE_Q4", pre-quantized models) but only as [rows, k * 32] */
    moe_st_write_tensor q = {.name = "q", .dtype = MOE_DT_Q8, .n_dims = 1, .shape = {1}, .data = a};
    cr_assert_eq(moe_st_write_file(path, &q, 1, NULL), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "tensor q") && strstr(moe_error_message(), "k * 32"),
              "%s", moe_error_message());
    moe_st_write_tensor bad = {.name = "b", .dtype = MOE_DT_COUNT, .n_dims = 1, .shape = {1}, .data = a};
    cr_assert_eq(moe_st_write_file(path, &bad, 1, NULL), MOE_ERR_UNSUPPORTED);
    cr_assert(strstr(moe_error_message(), "tensor b"), "%s", moe_error_message());
    moe_st_write_tensor nodata = {.name = "n", .dtype = MOE_DT_F32, .n_dims = 1, .shape = {1}};
    cr_assert_eq(moe_st_write_file(path, &nodata, 1, NULL), MOE_ERR_INVALID_ARG);
    moe_st_write_tensor ok = {
        .name = "k", .dtype = MOE_DT_F32, .n_dims = 1, .shape = {1}, .data = a};
    cr_assert_eq(moe_st_write_file(path, &ok, 1, "{\"n\": 3}"), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "__metadata__"), "%s", moe_error_message());
    cr_assert_eq(access(path, F_OK), -1, "a refused write must leave no file");
}

Test(safetensors, parse_accepts_metadata_empty_tensors_and_padding)
{
    size_t len;
    uint8_t *b = image("{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"e\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[8,8]},"
                       "\"s\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[0,2]},"
                       "\"v\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                       8, &len);
    moe_st_set *set;
    cr_assert_eq(moe_st_parse(b, len, "m", &set), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_st_count(set), 3);
    cr_assert_null(moe_st_find(set, "__metadata__"));
    cr_assert_eq(moe_st_find(set, "e")->n_bytes, 0);
    cr_assert_eq(moe_st_find(set, "s")->n_dims, 0);
    cr_assert_eq(moe_st_find(set, "v")->data, b + len - 4);
    moe_st_close(set);
    free(b);
}

Test(safetensors, refuses_short_file)
{
    expect_parse_error("", 0, MOE_ERR_FORMAT, "header");
}

Test(safetensors, refuses_header_length_past_end)
{
    size_t len;
    uint8_t *b = image("{}", 0, &len);
    b[0] = 200; /* header claims 200 bytes, file has 8 */
    moe_st_set *set = NULL;
    cr_assert_eq(moe_st_parse(b, len, "mem.safetensors", &set), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), "mem.safetensors: header length 200 runs past the end"),
              "%s", moe_error_message());
    b[0] = 0;
    b[7] = 0x80; /* huge: must not overflow anything */
    cr_assert_eq(moe_st_parse(b, len, "mem.safetensors", &set), MOE_ERR_FORMAT);
    cr_assert_null(set);
    free(b);
    uint8_t tiny[5] = {0};
    cr_assert_eq(moe_st_parse(tiny, sizeof tiny, "mem.safetensors", &set), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), "mem.safetensors"), "%s", moe_error_message());
}

Test(safetensors, refuses_malformed_json)
{
    expect_parse_error("{\"a\":{\"dtype\":\"F32\",", 0, MOE_ERR_FORMAT, "not valid JSON");
    expect_parse_error("[1,2]", 0, MOE_ERR_FORMAT, "not a JSON object");
    expect_parse_error("{} x", 0, MOE_ERR_FORMAT, "trailing");
    expect_parse_error("{\"a\":5}", 0, MOE_ERR_FORMAT, "tensor a");
}

Test(safetensors, refuses_bad_fields)
{
    expect_parse_error("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, MOE_ERR_FORMAT,
                       "tensor w: field dtype");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, MOE_ERR_FORMAT,
                       "tensor w: field shape");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
                       MOE_ERR_FORMAT, "tensor w: field data_offsets");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
                       MOE_ERR_FORMAT, "tensor w: shape[0]");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
                       MOE_ERR_FORMAT, "tensor w: shape[0]");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}",
                       4, MOE_ERR_UNSUPPORTED, "tensor w: 5 dimensions");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                       "\"data_offsets\":[0,4]}}",
                       4, MOE_ERR_FORMAT, "tensor w: shape is too large");
}

Test(safetensors, refuses_unsupported_and_unknown_dtypes)
{
    expect_parse_error("{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16,
                       MOE_ERR_UNSUPPORTED, "tensor ids: dtype I64 is not supported");
    expect_parse_error("{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 8,
                       MOE_ERR_UNSUPPORTED, "tensor w: dtype F8_E4M3");
    expect_parse_error("{\"w\":{\"dtype\":\"Q9\",\"shape\":[2],\"data_offsets\":[0,2]}}", 8,
                       MOE_ERR_FORMAT, "tensor w: unknown dtype");
}

Test(safetensors, refuses_offsets_out_of_range)
{
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8,
                       MOE_ERR_FORMAT, "tensor w: data_offsets [0, 16] outside the data section");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8,
                       MOE_ERR_FORMAT, "tensor w: data_offsets [8, 4] end before they begin");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8,
                       MOE_ERR_FORMAT, "tensor w: data_offsets");
    expect_parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 16,
                       MOE_ERR_FORMAT,
                       "tensor w: data_offsets cover 8 bytes but shape x F32 needs 12");
}

Test(safetensors, refuses_overlapping_tensors)
{
    expect_parse_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                       16, MOE_ERR_FORMAT, "tensor b overlaps tensor a");
    /* same range twice is an overlap too */
    expect_parse_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]}}",
                       16, MOE_ERR_FORMAT, "overlaps");
}

Test(safetensors, refuses_duplicate_and_misaligned_tensors)
{
    expect_parse_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                       8, MOE_ERR_FORMAT, "tensor a appears twice");
    expect_parse_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]}}", 8,
                       MOE_ERR_UNSUPPORTED, "tensor a: data at offset 2 is not aligned");
}

Test(safetensors, open_file_errors_name_the_path)
{
    char path[300];
    snprintf(path, sizeof path, "%s/missing.safetensors", tmpdir);
    moe_st_set *set = NULL;
    cr_assert_eq(moe_st_open_file(path, &set), MOE_ERR_NOT_FOUND);
    cr_assert(strstr(moe_error_message(), path), "%s", moe_error_message());

    /* truncated: a valid file cut in the data section */
    size_t len;
    uint8_t *b =
        image("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, &len);
    snprintf(path, sizeof path, "%s/trunc.safetensors", tmpdir);
    write_bytes(path, b, len - 5);
    cr_assert_eq(moe_st_open_file(path, &set), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), path) && strstr(moe_error_message(), "tensor w"), "%s",
              moe_error_message());
    /* truncated inside the header */
    write_bytes(path, b, 20);
    cr_assert_eq(moe_st_open_file(path, &set), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), path) && strstr(moe_error_message(), "header length"),
              "%s", moe_error_message());
    write_bytes(path, b, 3);
    cr_assert_eq(moe_st_open_file(path, &set), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), path), "%s", moe_error_message());
    cr_assert_null(set);
    free(b);
}

/* --- sharded sets --- */

static void write_shard(const char *name, const char *tensor_a, const char *tensor_b)
{
    float v[2] = {1, 2};
    moe_st_write_tensor t[2] = {
        {.name = tensor_a, .dtype = MOE_DT_F32, .n_dims = 1, .shape = {2}, .data = v},
        {.name = tensor_b, .dtype = MOE_DT_F32, .n_dims = 1, .shape = {2}, .data = v},
    };
    char path[400];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    cr_assert_eq(moe_st_write_file(path, t, tensor_b ? 2 : 1, NULL), MOE_OK, "%s",
                 moe_error_message());
}

static void write_index(const char *weight_map)
{
    char path[400];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmpdir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "{\"metadata\":{\"total_size\":32},\"weight_map\":{%s}}", weight_map);
    fclose(f);
}

static void expect_dir_error(moe_status status, const char *a, const char *b)
{
    moe_st_set *set = NULL;
    moe_status s = moe_st_open_dir(tmpdir, &set);
    cr_assert_eq(s, status, "status %s: %s", moe_status_name(s), moe_error_message());
    cr_assert_null(set);
    cr_assert(strstr(moe_error_message(), a), "message lacks \"%s\": %s", a, moe_error_message());
    cr_assert(strstr(moe_error_message(), b), "message lacks \"%s\": %s", b, moe_error_message());
}

Test(safetensors, sharded_ok)
{
    write_shard("s1.safetensors", "a", "b");
    write_shard("s2.safetensors", "c", NULL);
    write_index("\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\",\"c\":\"s2.safetensors\"");
    moe_st_set *set;
    cr_assert_eq(moe_st_open_dir(tmpdir, &set), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_st_count(set), 3);
    cr_assert(strstr(moe_st_find(set, "c")->file, "/s2.safetensors"));
    cr_assert(strstr(moe_st_find(set, "a")->file, "/s1.safetensors"));
    cr_assert_eq(((const float *)moe_st_find(set, "c")->data)[1], 2.0f);
    moe_st_close(set);
}

Test(safetensors, single_file_dir_and_empty_dir)
{
    expect_dir_error(MOE_ERR_NOT_FOUND, tmpdir, "model.safetensors");
    write_shard("model.safetensors", "x", NULL);
    moe_st_set *set;
    cr_assert_eq(moe_st_open_dir(tmpdir, &set), MOE_OK, "%s", moe_error_message());
    cr_assert_not_null(moe_st_find(set, "x"));
    moe_st_close(set);
}

Test(safetensors, sharded_index_names_missing_file)
{
    write_shard("s1.safetensors", "a", NULL);
    write_index("\"a\":\"s1.safetensors\",\"b\":\"s9.safetensors\"");
    expect_dir_error(MOE_ERR_NOT_FOUND, "s9.safetensors", "model.safetensors.index.json");
}

Test(safetensors, sharded_index_names_missing_tensor)
{
    write_shard("s1.safetensors", "a", NULL);
    write_index("\"a\":\"s1.safetensors\",\"ghost\":\"s1.safetensors\"");
    expect_dir_error(MOE_ERR_NOT_FOUND, "tensor ghost", "s1.safetensors");
}

Test(safetensors, sharded_tensor_in_wrong_file)
{
    write_shard("s1.safetensors", "a", NULL);
    write_shard("s2.safetensors", "b", NULL);
    write_index("\"a\":\"s2.safetensors\",\"b\":\"s2.safetensors\"");
    /* s1 is not named by the index, so "a" is simply not where the index says */
    expect_dir_error(MOE_ERR_NOT_FOUND, "tensor a", "s2.safetensors");
    write_index("\"a\":\"s2.safetensors\",\"b\":\"s1.safetensors\"");
    expect_dir_error(MOE_ERR_FORMAT, "tensor a", "lives in");
}

Test(safetensors, sharded_unindexed_and_duplicate_tensors)
{
    write_shard("s1.safetensors", "a", "extra");
    write_index("\"a\":\"s1.safetensors\"");
    expect_dir_error(MOE_ERR_FORMAT, "tensor extra", "s1.safetensors");
    write_shard("s2.safetensors", "a", NULL);
    write_index("\"a\":\"s1.safetensors\",\"extra\":\"s2.safetensors\"");
    expect_dir_error(MOE_ERR_FORMAT, "tensor a", "s2.safetensors");
}

Test(safetensors, sharded_bad_index)
{
    write_shard("s1.safetensors", "a", NULL);
    char path[400];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmpdir);
    FILE *f = fopen(path, "w");
    fputs("{\"weight_map\": {\"a\": \"s1.safetensors\"", f);
    fclose(f);
    expect_dir_error(MOE_ERR_FORMAT, "model.safetensors.index.json", "JSON");
    f = fopen(path, "w");
    fputs("{\"metadata\": {}}", f);
    fclose(f);
    expect_dir_error(MOE_ERR_FORMAT, "model.safetensors.index.json", "weight_map");
    write_index("\"a\":\"../s1.safetensors\"");
    expect_dir_error(MOE_ERR_FORMAT, "tensor a", "../s1.safetensors");
    write_index("\"a\":7");
    expect_dir_error(MOE_ERR_FORMAT, "tensor a", "model.safetensors.index.json");
}

Test(safetensors, sharded_bad_shard_names_shard_and_tensor)
{
    size_t len;
    uint8_t *b =
        image("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, &len);
    char path[400];
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", tmpdir);
    write_bytes(path, b, len - 4);
    free(b);
    write_shard("model-00001-of-00002.safetensors", "a", NULL);
    write_index(
        "\"a\":\"model-00001-of-00002.safetensors\",\"w\":\"model-00002-of-00002.safetensors\"");
    expect_dir_error(MOE_ERR_FORMAT, "model-00002-of-00002.safetensors: tensor w", "outside");
}
