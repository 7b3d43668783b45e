/* Tests for config.json parsing: the four architectures, their defaults, and every refusal. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/model_config.h"

TestSuite(model_config, .timeout = 30);

#define BASE                                                                                       \
    "\"vocab_size\":64,\"hidden_size\":32,\"num_hidden_layers\":4,\"num_attention_heads\":4,"      \
    "\"num_key_value_heads\":2,\"hidden_act\":\"silu\",\"rms_norm_eps\":1e-6,"
static const char *const MIXTRAL =
    "{\"architectures\":[\"MixtralForCausalLM\"]," BASE
    "\"intermediate_size\":16,\"num_local_experts\":4,\"num_experts_per_tok\":2,"
    "\"rope_theta\":1000000.0,\"sliding_window\":null,\"bos_token_id\":1,\"eos_token_id\":2}";
static const char *const QWEN2 =
    "{\"architectures\":[\"Qwen2MoeForCausalLM\"]," BASE
    "\"intermediate_size\":48,\"moe_intermediate_size\":16,\"shared_expert_intermediate_size\":24,"
    "\"num_experts\":4,\"num_experts_per_tok\":2,\"decoder_sparse_step\":2,\"mlp_only_layers\":[3],"
    "\"use_sliding_window\":false,\"sliding_window\":4096,\"rope_theta\":1000000.0}";
static const char *const OLMOE =
    "{\"architectures\":[\"OlmoeForCausalLM\"]," BASE
    "\"intermediate_size\":16,\"num_experts\":4,\"num_experts_per_tok\":2,\"clip_qkv\":8.0,"
    "\"norm_topk_prob\":false,\"eos_token_id\":50,\"pad_token_id\":1}";
static const char *const QWEN3 =
    "{\"architectures\":[\"Qwen3MoeForCausalLM\"]," BASE
    "\"intermediate_size\":48,\"moe_intermediate_size\":16,\"num_experts\":4,\"num_experts_per_"
    "tok\":2,"
    "\"head_dim\":16,\"norm_topk_prob\":true,\"mlp_only_layers\":[0],\"attention_bias\":false,"
    "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":500000.0},"
    "\"tie_word_embeddings\":true,\"use_sliding_window\":true,\"sliding_window\":64}";

static moe_model_config parse_ok(const char *json, const char *gen)
{
    moe_model_config c;
    moe_status s = moe_model_config_parse(json, gen, "m/config.json", &c);
    cr_assert_eq(s, MOE_OK, "%s", moe_error_message());
    return c;
}

/* `json` with `from` replaced by `to` (first occurrence; from must be there). */
static char *edit(const char *json, const char *from, const char *to)
{
    const char *p = strstr(json, from);
    cr_assert_not_null(p, "test bug: \"%s\" not in config", from);
    size_t n = strlen(json) - strlen(from) + strlen(to) + 1;
    char *out = malloc(n);
    snprintf(out, n, "%.*s%s%s", (int)(p - json), json, to, p + strlen(from));
    return out;
}

static void expect_error(const char *json, const char *gen, moe_status st, const char *what)
{
    moe_model_config c;
    memset(&c, 0x5a, sizeof c);
    moe_status s = moe_model_config_parse(json, gen, "m/config.json", &c);
    cr_assert_eq(s, st, "status %s, expected %s: %s", moe_status_name(s), moe_status_name(st),
                 moe_error_message());
    cr_assert(strstr(moe_error_message(), "m/config.json") ||
                  strstr(moe_error_message(), "m/generation_config.json"),
              "message lacks the file: %s", moe_error_message());
    cr_assert(strstr(moe_error_message(), what), "message lacks \"%s\": %s", what,
              moe_error_message());
    cr_assert_eq(c.vocab_size, 0x5a5a5a5a, "cfg must be untouched on error");
}

static void expect_edit_error(const char *json, const char *from, const char *to, moe_status st,
                              const char *what)
{
    char *j = edit(json, from, to);
    expect_error(j, NULL, st, what);
    free(j);
}

Test(model_config, mixtral)
{
    moe_model_config c = parse_ok(MIXTRAL, NULL);
    cr_assert_eq(c.arch, MOE_ARCH_MIXTRAL);
    cr_assert_str_eq(c.arch_name, "MixtralForCausalLM");
    cr_assert_str_eq(moe_arch_name(c.arch), "MixtralForCausalLM");
    cr_assert_eq(c.vocab_size, 64);
    cr_assert_eq(c.hidden_size, 32);
    cr_assert_eq(c.n_layers, 4);
    cr_assert_eq(c.n_heads, 4);
    cr_assert_eq(c.n_kv_heads, 2);
    cr_assert_eq(c.head_dim, 8);
    cr_assert_eq(c.n_experts, 4);
    cr_assert_eq(c.n_experts_per_tok, 2);
    cr_assert_eq(c.moe_ffn, 16);
    cr_assert_eq(c.dense_ffn, 0);
    cr_assert_eq(c.shared_expert_ffn, 0);
    cr_assert(c.norm_topk_prob);
    cr_assert_not(c.attn_bias);
    cr_assert_eq(c.qk_norm, 0);
    cr_assert_eq(c.sliding_window, 0);
    cr_assert_not(c.tie_embeddings);
    cr_assert_float_eq(c.rope_theta, 1e6, 1e-6);
    cr_assert_float_eq(c.rms_eps, 1e-6f, 1e-12);
    cr_assert_eq(c.max_position, 131072, "Mixtral's class default");
    for (int i = 0; i < 4; i++)
        cr_assert(c.layer_is_moe[i]);
    cr_assert_eq(c.bos_token_id, 1);
    cr_assert_eq(c.n_eos, 1);
    cr_assert_eq(c.eos_ids[0], 2);

    char *j = edit(MIXTRAL, "\"sliding_window\":null", "\"sliding_window\":32");
    cr_assert_eq(parse_ok(j, NULL).sliding_window, 32);
    free(j);
}

Test(model_config, qwen2_moe_layout_and_shared_expert)
{
    moe_model_config c = parse_ok(QWEN2, NULL);
    cr_assert_eq(c.arch, MOE_ARCH_QWEN2_MOE);
    cr_assert_eq(c.moe_ffn, 16);
    cr_assert_eq(c.dense_ffn, 48);
    cr_assert_eq(c.shared_expert_ffn, 24);
    cr_assert(c.attn_bias, "Qwen2-MoE has q/k/v biases by default");
    cr_assert_not(c.norm_topk_prob, "default false");
    cr_assert_eq(c.sliding_window, 0, "use_sliding_window false");
    /* decoder_sparse_step 2: layers 1 and 3 are MoE, but 3 is in mlp_only_layers */
    cr_assert_not(c.layer_is_moe[0]);
    cr_assert(c.layer_is_moe[1]);
    cr_assert_not(c.layer_is_moe[2]);
    cr_assert_not(c.layer_is_moe[3]);
    cr_assert_eq(c.bos_token_id, -1);
    cr_assert_eq(c.n_eos, 0);
    cr_assert_eq(c.max_position, 32768);

    char *j = edit(QWEN2, "\"decoder_sparse_step\":2,\"mlp_only_layers\":[3],", "");
    moe_model_config d = parse_ok(j, NULL);
    for (int i = 0; i < 4; i++)
        cr_assert(d.layer_is_moe[i], "defaults: step 1, no mlp-only layers");
    cr_assert_eq(d.dense_ffn, 0, "no dense layer: no dense ffn");
    free(j);
    j = edit(QWEN2, "\"use_sliding_window\":false", "\"use_sliding_window\":true");
    cr_assert_eq(parse_ok(j, NULL).sliding_window, 4096);
    free(j);
    j = edit(QWEN2, "\"rope_theta\"", "\"qkv_bias\":false,\"rope_theta\"");
    cr_assert_not(parse_ok(j, NULL).attn_bias);
    free(j);
}

Test(model_config, olmoe)
{
    moe_model_config c = parse_ok(OLMOE, NULL);
    cr_assert_eq(c.arch, MOE_ARCH_OLMOE);
    cr_assert_eq(c.qk_norm, 1);
    cr_assert_float_eq(c.clip_qkv, 8.0f, 1e-6);
    cr_assert_eq(c.moe_ffn, 16);
    cr_assert_not(c.norm_topk_prob);
    cr_assert_float_eq(c.rope_theta, 1e4, 1e-9);
    cr_assert_eq(c.max_position, 4096);
    cr_assert_eq(c.n_eos, 1);
    cr_assert_eq(c.eos_ids[0], 50);
    char *j = edit(OLMOE, "\"clip_qkv\":8.0", "\"clip_qkv\":null");
    cr_assert_float_eq(parse_ok(j, NULL).clip_qkv, 0.0f, 0);
    free(j);
    /* an out-of-vocabulary eos (OLMoE's class default is 50279) is dropped, not fatal */
    j = edit(OLMOE, "\"eos_token_id\":50", "\"eos_token_id\":50279");
    cr_assert_eq(parse_ok(j, NULL).n_eos, 0);
    free(j);
}

Test(model_config, qwen3_moe)
{
    moe_model_config c = parse_ok(QWEN3, NULL);
    cr_assert_eq(c.arch, MOE_ARCH_QWEN3_MOE);
    cr_assert_eq(c.head_dim, 16, "head_dim field wins over hidden/heads");
    cr_assert_eq(c.qk_norm, 2);
    cr_assert(c.norm_topk_prob);
    cr_assert(c.tie_embeddings);
    cr_assert_not(c.attn_bias);
    cr_assert_float_eq(c.rope_theta, 5e5, 1e-6);
    cr_assert_eq(c.sliding_window, 64);
    cr_assert_not(c.layer_is_moe[0]);
    cr_assert(c.layer_is_moe[1]);
    cr_assert_eq(c.dense_ffn, 48);
    /* transformers 5 saves Qwen3-MoE's expert count as num_local_experts */
    char *j = edit(QWEN3, "\"num_experts\"", "\"num_local_experts\"");
    cr_assert_eq(parse_ok(j, NULL).n_experts, 4);
    free(j);
}

Test(model_config, model_type_fallback)
{
    char *j = edit(OLMOE, "\"architectures\":[\"OlmoeForCausalLM\"]", "\"model_type\":\"olmoe\"");
    moe_model_config c = parse_ok(j, NULL);
    cr_assert_eq(c.arch, MOE_ARCH_OLMOE);
    cr_assert_str_eq(c.arch_name, "OlmoeForCausalLM");
    free(j);
}

Test(model_config, generation_config_overrides_ids)
{
    moe_model_config c = parse_ok(MIXTRAL, "{\"bos_token_id\":5,\"eos_token_id\":[7,8,9]}");
    cr_assert_eq(c.bos_token_id, 5);
    cr_assert_eq(c.n_eos, 3);
    cr_assert_eq(c.eos_ids[0], 7);
    cr_assert_eq(c.eos_ids[2], 9);
    c = parse_ok(MIXTRAL, "{\"do_sample\":true}");
    cr_assert_eq(c.bos_token_id, 1, "falls back to config.json");
    cr_assert_eq(c.eos_ids[0], 2);
    expect_error(MIXTRAL, "{\"eos_token_id\":\"x\"}", MOE_ERR_FORMAT,
                 "m/generation_config.json: field eos_token_id");
    expect_error(MIXTRAL, "{\"eos_token_id\":[1,2,3,4,5,6,7,8,9]}", MOE_ERR_UNSUPPORTED,
                 "field eos_token_id");
    expect_error(MIXTRAL, "{\"eos_token_id\":", MOE_ERR_FORMAT, "m/generation_config.json");
}

Test(model_config, refuses_unknown_architecture)
{
    expect_edit_error(MIXTRAL, "MixtralForCausalLM", "LlamaForCausalLM", MOE_ERR_UNSUPPORTED,
                      "field architectures: unknown architecture \"LlamaForCausalLM\"");
    expect_edit_error(MIXTRAL, "\"architectures\":[\"MixtralForCausalLM\"]",
                      "\"model_type\":\"llama\"", MOE_ERR_UNSUPPORTED, "field model_type");
    expect_edit_error(MIXTRAL, "\"architectures\":[\"MixtralForCausalLM\"],", "", MOE_ERR_FORMAT,
                      "architectures");
    expect_edit_error(MIXTRAL, "[\"MixtralForCausalLM\"]", "\"MixtralForCausalLM\"", MOE_ERR_FORMAT,
                      "field architectures");
}

Test(model_config, refuses_rope_scaling)
{
    expect_edit_error(MIXTRAL, "\"rope_theta\"",
                      "\"rope_scaling\":{\"type\":\"linear\",\"factor\":2.0},\"rope_theta\"",
                      MOE_ERR_UNSUPPORTED, "field rope_scaling");
    expect_edit_error(QWEN3, "\"rope_type\":\"default\"", "\"rope_type\":\"yarn\",\"factor\":4.0",
                      MOE_ERR_UNSUPPORTED, "field rope_parameters");
    expect_edit_error(MIXTRAL, "\"rope_theta\"", "\"partial_rotary_factor\":0.5,\"rope_theta\"",
                      MOE_ERR_UNSUPPORTED, "partial_rotary_factor");
    /* null and an explicit default are fine */
    char *j = edit(MIXTRAL, "\"rope_theta\"", "\"rope_scaling\":null,\"rope_theta\"");
    parse_ok(j, NULL);
    free(j);
    j = edit(MIXTRAL, "\"rope_theta\"",
             "\"rope_scaling\":{\"rope_type\":\"default\"},\"rope_theta\"");
    cr_assert_float_eq(parse_ok(j, NULL).rope_theta, 1e6, 1e-6);
    free(j);
}

Test(model_config, refuses_bad_activation_and_sizes)
{
    expect_edit_error(MIXTRAL, "\"silu\"", "\"gelu\"", MOE_ERR_UNSUPPORTED, "field hidden_act");
    expect_edit_error(MIXTRAL, "\"hidden_size\":32,", "", MOE_ERR_FORMAT,
                      "required field hidden_size is missing");
    expect_edit_error(MIXTRAL, "\"intermediate_size\":16", "\"intermediate_size\":0", MOE_ERR_RANGE,
                      "field intermediate_size");
    expect_edit_error(MIXTRAL, "\"vocab_size\":64", "\"vocab_size\":-3", MOE_ERR_RANGE,
                      "field vocab_size");
    expect_edit_error(MIXTRAL, "\"vocab_size\":64", "\"vocab_size\":\"64\"", MOE_ERR_FORMAT,
                      "field vocab_size");
    expect_edit_error(MIXTRAL, "\"hidden_size\":32", "\"hidden_size\":32.5", MOE_ERR_FORMAT,
                      "field hidden_size");
    expect_edit_error(MIXTRAL, "\"num_key_value_heads\":2", "\"num_key_value_heads\":3",
                      MOE_ERR_FORMAT, "num_key_value_heads (3) does not divide");
    expect_edit_error(MIXTRAL, "\"num_attention_heads\":4", "\"num_attention_heads\":6",
                      MOE_ERR_FORMAT, "num_attention_heads (6) does not divide hidden_size");
    expect_edit_error(MIXTRAL, "\"num_hidden_layers\":4", "\"num_hidden_layers\":257",
                      MOE_ERR_UNSUPPORTED, "field num_hidden_layers");
    expect_edit_error(MIXTRAL, "\"num_experts_per_tok\":2", "\"num_experts_per_tok\":5",
                      MOE_ERR_RANGE, "field num_experts_per_tok");
    expect_edit_error(MIXTRAL, "\"num_local_experts\":4,", "", MOE_ERR_FORMAT, "num_local_experts");
    expect_edit_error(QWEN2, "\"shared_expert_intermediate_size\":24,", "", MOE_ERR_FORMAT,
                      "shared_expert_intermediate_size");
    expect_edit_error(QWEN2, "\"moe_intermediate_size\":16", "\"moe_intermediate_size\":-1",
                      MOE_ERR_RANGE, "moe_intermediate_size");
    expect_edit_error(QWEN2, "\"mlp_only_layers\":[3]", "\"mlp_only_layers\":[4]", MOE_ERR_RANGE,
                      "mlp_only_layers[0]");
    expect_edit_error(QWEN2, "\"decoder_sparse_step\":2", "\"decoder_sparse_step\":0",
                      MOE_ERR_RANGE, "decoder_sparse_step");
    expect_edit_error(QWEN3, "\"head_dim\":16", "\"head_dim\":7", MOE_ERR_FORMAT, "field head_dim");
    expect_edit_error(QWEN3, "\"attention_bias\":false", "\"attention_bias\":true",
                      MOE_ERR_UNSUPPORTED, "field attention_bias");
    expect_edit_error(QWEN3, "\"num_experts\"", "\"num_local_experts\":8,\"num_experts\"",
                      MOE_ERR_FORMAT, "disagree");
    expect_edit_error(OLMOE, "\"clip_qkv\":8.0", "\"clip_qkv\":-1", MOE_ERR_RANGE, "clip_qkv");
    expect_edit_error(OLMOE, "\"hidden_act\"", "\"head_dim\":16,\"hidden_act\"", MOE_ERR_FORMAT,
                      "head_dim");
    expect_edit_error(MIXTRAL, "\"rms_norm_eps\":1e-6", "\"rms_norm_eps\":0", MOE_ERR_RANGE,
                      "rms_norm_eps");
    /* positive as a double, zero as the float it is stored in (found by fuzz_config) */
    expect_edit_error(MIXTRAL, "\"rms_norm_eps\":1e-6", "\"rms_norm_eps\":1e-61", MOE_ERR_RANGE,
                      "rms_norm_eps");
}

Test(model_config, refuses_malformed_json)
{
    /* cJSON would read the first copy, transformers the last: refuse */
    expect_edit_error(MIXTRAL, "\"hidden_size\":32,", "\"hidden_size\":32,\"hidden_size\":64,",
                      MOE_ERR_FORMAT, "field hidden_size appears twice");
    expect_error("{\"architectures\":[\"MixtralForCausalLM\"", NULL, MOE_ERR_FORMAT,
                 "not valid JSON");
    expect_error("[]", NULL, MOE_ERR_FORMAT, "not a JSON object");
    expect_error("", NULL, MOE_ERR_FORMAT, "m/config.json");
}

Test(model_config, load_from_directory)
{
    char dir[] = "/tmp/moe-cfg-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char path[256], gpath[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    snprintf(gpath, sizeof gpath, "%s/generation_config.json", dir);
    moe_model_config c;
    cr_assert_eq(moe_model_config_load(dir, &c), MOE_ERR_NOT_FOUND);
    cr_assert(strstr(moe_error_message(), path), "%s", moe_error_message());

    FILE *f = fopen(path, "w");
    fputs(MIXTRAL, f);
    fclose(f);
    cr_assert_eq(moe_model_config_load(dir, &c), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(c.eos_ids[0], 2);
    f = fopen(gpath, "w");
    fputs("{\"eos_token_id\": [3, 4]}", f);
    fclose(f);
    cr_assert_eq(moe_model_config_load(dir, &c), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(c.n_eos, 2);
    cr_assert_eq(c.eos_ids[1], 4);

    f = fopen(gpath, "w");
    fputs("{\"eos_token_id\": true}", f);
    fclose(f);
    cr_assert_eq(moe_model_config_load(dir, &c), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), gpath) && strstr(moe_error_message(), "eos_token_id"),
              "%s", moe_error_message());
    f = fopen(path, "w");
    fputs("{\"architectures\": [\"GPT2LMHeadModel\"]}", f);
    fclose(f);
    cr_assert_eq(moe_model_config_load(dir, &c), MOE_ERR_UNSUPPORTED);
    cr_assert(strstr(moe_error_message(), path) && strstr(moe_error_message(), "GPT2LMHeadModel"),
              "%s", moe_error_message());
    unlink(path);
    unlink(gpath);
    rmdir(dir);
}
