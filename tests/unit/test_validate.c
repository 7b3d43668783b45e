/* Protocol-neutral validation (coordinator/validate.c) and the gRPC NUL check
 * (coordinator/grpc_request.c): a NUL byte inside any string is refused naming the field, on
 * both APIs' names; the wire walker finds NULs protobuf-c would hide. Wire bytes are written by
 * hand from the protobuf encoding rules (tag = field << 3 | wire type). */
#include <criterion/criterion.h>
#include <string.h>

#include "coordinator/grpc_request.h"
#include "coordinator/validate.h"

static moe_status fake_tokenize(void *ctx, const char *text, size_t len, bool add_special,
                                int32_t *ids, size_t cap, size_t *n_out)
{
    (void)ctx;
    (void)text;
    (void)add_special;
    *n_out = len; /* one token per byte */
    for (size_t i = 0; i < len && i < cap; i++)
        ids[i] = (int32_t)i % 100;
    return MOE_OK;
}

static const moe_api_names HTTP_NAMES = {
    .request_id = "request_id", .text = "prompt", .token_ids = "prompt", .token_ids_item = "prompt",
    .prompt = "prompt", .max_new_tokens = "max_tokens", .temperature = "temperature",
    .top_p = "top_p", .top_k = "top_k", .seed = "seed", .stop = "stop",
    .stop_token_ids = "stop_token_ids", .presence_penalty = "presence_penalty",
    .frequency_penalty = "frequency_penalty", .repetition_penalty = "repetition_penalty",
    .top_logprobs = "top_logprobs", .prefill_group = "n",
};

static moe_validate_limits lim(void)
{
    moe_validate_limits l;
    moe_validate_limits_default(&l, 100, 64);
    return l;
}

Test(validate, nul_in_text_refused_naming_the_field)
{
    moe_validate_limits l = lim();
    moe_api_request r = {.names = &HTTP_NAMES, .has_text = true, .text = {"ab\0cd", 5}};
    moe_validated v;
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "prompt: holds a NUL byte at offset 2"),
              "%s", moe_error_message());
}

Test(validate, nul_in_stop_and_request_id_refused)
{
    moe_validate_limits l = lim();
    moe_api_str stops[2] = {{"ok", 2}, {"w\0never", 7}};
    moe_api_request r = {.has_text = true, .text = {"hello", 5}, .stop = stops, .n_stop = 2};
    moe_validated v;
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "GenerateRequest.stop[1]: holds a NUL byte at offset 1"),
              "%s", moe_error_message());
    moe_api_request r2 = {.has_text = true, .text = {"hello", 5}, .request_id = {"id\0x", 4}};
    cr_assert_eq(moe_validate_request(&l, &r2, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "GenerateRequest.request_id: holds a NUL"), "%s",
              moe_error_message());
}

Test(validate, stops_are_copied_whole)
{
    moe_validate_limits l = lim();
    char buf[] = "w never";
    moe_api_str stops[1] = {{buf, 7}};
    moe_api_request r = {.has_text = true, .text = {"hello", 5}, .stop = stops, .n_stop = 1};
    moe_validated v;
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_OK, "%s",
                 moe_error_message());
    buf[0] = 'X'; /* the validated request owns its copy */
    cr_assert_str_eq(v.req.stop[0], "w never");
    cr_assert_eq(v.req.n_prompt, 5);
    cr_assert_eq(v.req.max_new_tokens, 59); /* default clamped to the context room */
    moe_validated_free(&v);
}

Test(validate, negative_and_out_of_range_numbers)
{
    moe_validate_limits l = lim();
    int64_t ids[2] = {3, -1};
    moe_api_request r = {.names = &HTTP_NAMES, .has_token_ids = true, .token_ids = ids,
                         .n_token_ids = 2};
    moe_validated v;
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "prompt[1] = -1: not a token id"), "%s",
              moe_error_message());
    ids[1] = 4;
    r.max_new_tokens = -5;
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "max_tokens = -5"), "%s", moe_error_message());
    r.max_new_tokens = 63; /* 2 + 63 > 64 */
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "over the context length of 64"), "%s",
              moe_error_message());
    r.max_new_tokens = 62;
    r.top_k = (int64_t)1 << 40;
    cr_assert_eq(moe_validate_request(&l, &r, fake_tokenize, NULL, &v), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "top_k"), "%s", moe_error_message());
}

Test(validate, choices_derive_seeds_and_share_a_group)
{
    moe_validate_limits l = lim();
    moe_api_request r = {.has_text = true, .text = {"hello", 5}, .has_seed = true, .seed = 40};
    moe_validated v;
    for (uint32_t i = 0; i < 3; i++) {
        cr_assert_eq(moe_validate_choice(&l, &r, i, 3, 77, fake_tokenize, NULL, &v), MOE_OK);
        cr_assert_eq(v.req.sampling.seed, 40 + i);
        cr_assert_eq(v.req.prefill_group, 77);
        cr_assert_eq(v.req.prefill_group_n, 3);
        moe_validated_free(&v);
    }
    cr_assert_eq(r.seed, 40, "the request itself is left alone");
    /* one choice: no group; unseeded: each choice draws its own seed */
    cr_assert_eq(moe_validate_choice(&l, &r, 0, 1, 77, fake_tokenize, NULL, &v), MOE_OK);
    cr_assert_eq(v.req.prefill_group, 0);
    cr_assert_eq(v.req.sampling.seed, 40);
    moe_validated_free(&v);
    r.has_seed = false;
    uint64_t seeds[2];
    for (uint32_t i = 0; i < 2; i++) {
        cr_assert_eq(moe_validate_choice(&l, &r, i, 2, 9, fake_tokenize, NULL, &v), MOE_OK);
        seeds[i] = v.req.sampling.seed;
        moe_validated_free(&v);
    }
    cr_assert_neq(seeds[0], seeds[1]);
}

Test(grpc_request, wire_nul_found_in_repeated_and_plain_strings)
{
    /* GenerateRequest{text = "hi" (1), stop = ["ok", "w\0n"] (5), request_id = "r" (9)} */
    const uint8_t msg[] = {0x0a, 2, 'h', 'i', 0x2a, 2, 'o', 'k', 0x2a, 3, 'w', 0, 'n',
                           0x4a, 1, 'r'};
    cr_assert_eq(moe_grpc_check_strings(&moeserve__v1__generate_request__descriptor, msg,
                                        sizeof(msg)),
                 MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "GenerateRequest.stop[1]: holds a NUL byte at offset 1"),
              "%s", moe_error_message());
    const uint8_t ok[] = {0x0a, 2, 'h', 'i', 0x2a, 2, 'o', 'k', 0x4a, 1, 'r'};
    cr_assert_eq(moe_grpc_check_strings(&moeserve__v1__generate_request__descriptor, ok,
                                        sizeof(ok)),
                 MOE_OK);
    const uint8_t txt[] = {0x0a, 3, 'a', 0, 'b'};
    cr_assert_eq(moe_grpc_check_strings(&moeserve__v1__generate_request__descriptor, txt,
                                        sizeof(txt)),
                 MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "GenerateRequest.text: holds a NUL"), "%s",
              moe_error_message());
    /* a truncated length is left to the unpacker */
    const uint8_t bad[] = {0x0a, 50, 'a'};
    cr_assert_eq(moe_grpc_check_strings(&moeserve__v1__generate_request__descriptor, bad,
                                        sizeof(bad)),
                 MOE_OK);
}
