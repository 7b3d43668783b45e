/* moe-gen-model's config.json, generation_config.json and tokenizer_config.json: the fields and
 * formatting transformers' configuration classes save (json.dumps(indent=2, sort_keys=True)). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tools/moe_gen_model/gen_model.h"

static void add_float(cJSON *o, const char *key, double v)
{
    char buf[64];
    moe_gen_format_double(v, buf, sizeof buf);
    cJSON_AddRawToObject(o, key, buf);
}

static void add_id(cJSON *o, const char *key, int id)
{
    if (id >= 0)
        cJSON_AddNumberToObject(o, key, id);
    else
        cJSON_AddNullToObject(o, key);
}

static const char *arch_class(moe_arch a)
{
    switch (a) {
    case MOE_ARCH_MIXTRAL:
        return "MixtralForCausalLM";
    case MOE_ARCH_QWEN2_MOE:
        return "Qwen2MoeForCausalLM";
    case MOE_ARCH_OLMOE:
        return "OlmoeForCausalLM";
    case MOE_ARCH_QWEN3_MOE:
        return "Qwen3MoeForCausalLM";
    default:
        return "?";
    }
}

/* config.json's eos: Qwen3 (an instruct-style model) ends turns with <|im_end|>; the others
 * with their end-of-text token. */
static int config_eos(const moe_gen_spec *s, const moe_gen_tokenizer *t)
{
    return s->arch == MOE_ARCH_QWEN3_MOE && t->im_end_id >= 0 ? t->im_end_id : t->eos_id;
}

cJSON *moe_gen_config_tree(const moe_gen_spec *s, const moe_gen_tokenizer *t)
{
    cJSON *c = cJSON_CreateObject();
    if (!c)
        return NULL;
    cJSON *archs = cJSON_AddArrayToObject(c, "architectures");
    cJSON_AddItemToArray(archs, cJSON_CreateString(arch_class(s->arch)));
    cJSON_AddStringToObject(c, "model_type", moe_gen_arch_flag(s->arch));
    add_float(c, "attention_dropout", 0.0);
    add_id(c, "bos_token_id", s->arch == MOE_ARCH_OLMOE ? -1 : t->bos_id);
    add_id(c, "eos_token_id", config_eos(s, t));
    add_id(c, "pad_token_id", s->arch == MOE_ARCH_OLMOE ? t->pad_id : -1);
    cJSON_AddStringToObject(c, "dtype", s->dtype == MOE_DT_F32 ? "float32" : "bfloat16");
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "hidden_size", s->hidden);
    add_float(c, "initializer_range", 0.02);
    cJSON_AddNumberToObject(c, "max_position_embeddings", s->max_pos);
    cJSON_AddNumberToObject(c, "num_attention_heads", s->heads);
    cJSON_AddNumberToObject(c, "num_experts_per_tok", s->top_k);
    cJSON_AddNumberToObject(c, "num_hidden_layers", s->n_layers);
    cJSON_AddNumberToObject(c, "num_key_value_heads", s->kv_heads);
    cJSON_AddBoolToObject(c, "output_router_logits", false);
    add_float(c, "rms_norm_eps", s->rms_eps);
    cJSON *rope = cJSON_AddObjectToObject(c, "rope_parameters");
    add_float(rope, "rope_theta", s->rope_theta);
    cJSON_AddStringToObject(rope, "rope_type", "default");
    /* transformers 4.x and most other readers take the top-level rope_theta; 5.x reads
     * rope_parameters (and drops this key when it re-saves). */
    add_float(c, "rope_theta", s->rope_theta);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", false);
    cJSON_AddStringToObject(c, "transformers_version", MOE_GEN_HF_VERSION);
    cJSON_AddBoolToObject(c, "use_cache", true);
    cJSON_AddNumberToObject(c, "vocab_size", s->vocab);
    if (s->write_head_dim)
        cJSON_AddNumberToObject(c, "head_dim", s->head_dim);

    switch (s->arch) {
    case MOE_ARCH_MIXTRAL:
        cJSON_AddNumberToObject(c, "intermediate_size", s->moe_ffn);
        cJSON_AddNumberToObject(c, "num_local_experts", s->experts);
        add_float(c, "router_aux_loss_coef", 0.001);
        add_float(c, "router_jitter_noise", 0.0);
        cJSON_AddNullToObject(c, "sliding_window");
        break;
    case MOE_ARCH_QWEN2_MOE: {
        cJSON_AddNumberToObject(c, "decoder_sparse_step", s->decoder_sparse_step);
        cJSON_AddNumberToObject(c, "intermediate_size", s->dense_ffn);
        cJSON *lt = cJSON_AddArrayToObject(c, "layer_types");
        for (int l = 0; l < s->n_layers; l++)
            cJSON_AddItemToArray(lt, cJSON_CreateString("full_attention"));
        cJSON_AddNumberToObject(c, "max_window_layers", s->n_layers);
        cJSON *mo = cJSON_AddArrayToObject(c, "mlp_only_layers");
        for (int k = 0; k < s->n_mlp_only; k++)
            cJSON_AddItemToArray(mo, cJSON_CreateNumber(s->mlp_only[k]));
        cJSON_AddNumberToObject(c, "moe_intermediate_size", s->moe_ffn);
        cJSON_AddBoolToObject(c, "norm_topk_prob", s->norm_topk_prob);
        cJSON_AddNumberToObject(c, "num_experts", s->experts);
        cJSON_AddBoolToObject(c, "qkv_bias", true);
        add_float(c, "router_aux_loss_coef", 0.001);
        cJSON_AddNumberToObject(c, "shared_expert_intermediate_size", s->shared_ffn);
        cJSON_AddNumberToObject(c, "sliding_window", 0);
        cJSON_AddBoolToObject(c, "use_sliding_window", false);
        break;
    }
    case MOE_ARCH_OLMOE:
        cJSON_AddBoolToObject(c, "attention_bias", false);
        cJSON_AddNullToObject(c, "clip_qkv");
        cJSON_AddNumberToObject(c, "intermediate_size", s->moe_ffn);
        cJSON_AddBoolToObject(c, "norm_topk_prob", s->norm_topk_prob);
        cJSON_AddNumberToObject(c, "num_experts", s->experts);
        add_float(c, "router_aux_loss_coef", 0.01);
        break;
    case MOE_ARCH_QWEN3_MOE: {
        cJSON_AddBoolToObject(c, "attention_bias", false);
        cJSON_AddNumberToObject(c, "decoder_sparse_step", s->decoder_sparse_step);
        cJSON_AddNumberToObject(c, "intermediate_size", s->dense_ffn);
        cJSON *mo = cJSON_AddArrayToObject(c, "mlp_only_layers");
        for (int k = 0; k < s->n_mlp_only; k++)
            cJSON_AddItemToArray(mo, cJSON_CreateNumber(s->mlp_only[k]));
        cJSON_AddNumberToObject(c, "moe_intermediate_size", s->moe_ffn);
        cJSON_AddBoolToObject(c, "norm_topk_prob", s->norm_topk_prob);
        /* 5.x saves num_local_experts; the published checkpoints (and 4.x) say num_experts. */
        cJSON_AddNumberToObject(c, "num_local_experts", s->experts);
        cJSON_AddNumberToObject(c, "num_experts", s->experts);
        add_float(c, "router_aux_loss_coef", 0.001);
        cJSON_AddNullToObject(c, "sliding_window");
        cJSON_AddBoolToObject(c, "use_sliding_window", false);
        break;
    }
    default:
        break;
    }
    return c;
}

static moe_status write_tree(const cJSON *tree, const char *dir, const char *name, bool ascii)
{
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path)
        return moe_error(MOE_ERR_INVALID_ARG, "--out: path too long: %s/%s", dir, name);
    moe_gen_json j;
    moe_gen_json_init(&j, ascii);
    moe_gen_json_cjson(&j, tree, true);
    return moe_gen_json_finish(&j, path, true);
}

static cJSON *generation_tree(const moe_gen_spec *s, const moe_gen_tokenizer *t)
{
    cJSON *g = cJSON_CreateObject();
    if (!g)
        return NULL;
    if (s->arch != MOE_ARCH_OLMOE)
        cJSON_AddNumberToObject(g, "bos_token_id", t->bos_id);
    if (t->im_end_id >= 0) {
        /* chat models stop at the end of the turn or of the text */
        cJSON *eos = cJSON_AddArrayToObject(g, "eos_token_id");
        cJSON_AddItemToArray(eos, cJSON_CreateNumber(t->im_end_id));
        cJSON_AddItemToArray(eos, cJSON_CreateNumber(t->eos_id));
    } else {
        cJSON_AddNumberToObject(g, "eos_token_id", t->eos_id);
    }
    if (t->pad_id >= 0)
        cJSON_AddNumberToObject(g, "pad_token_id", t->pad_id);
    cJSON_AddStringToObject(g, "transformers_version", MOE_GEN_HF_VERSION);
    return g;
}

static const char *special_name(const moe_gen_tokenizer *t, int id)
{
    for (int i = 0; i < t->n_special; i++)
        if (t->special[i].id == id)
            return t->special[i].content;
    return NULL;
}

static void add_token(cJSON *o, const char *key, const moe_gen_tokenizer *t, int id)
{
    const char *n = id >= 0 ? special_name(t, id) : NULL;
    if (n)
        cJSON_AddStringToObject(o, key, n);
    else
        cJSON_AddNullToObject(o, key);
}

static cJSON *tokenizer_config_tree(const moe_gen_spec *s, const moe_gen_tokenizer *t)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    bool sp = t->family == MOE_GEN_TOK_SP;
    cJSON_AddBoolToObject(o, "add_bos_token", sp);
    cJSON_AddBoolToObject(o, "add_eos_token", false);
    add_token(o, "bos_token", t, s->arch == MOE_ARCH_OLMOE ? -1 : (sp ? t->bos_id : -1));
    add_token(o, "eos_token", t, config_eos(s, t));
    add_token(o, "pad_token", t, t->pad_id);
    add_token(o, "unk_token", t, t->unk_id);
    char *tpl = moe_gen_chat_template(s->arch);
    if (tpl)
        cJSON_AddStringToObject(o, "chat_template", tpl);
    free(tpl);
    cJSON_AddBoolToObject(o, "clean_up_tokenization_spaces", false);
    cJSON_AddNumberToObject(o, "model_max_length", s->max_pos);
    /* The generic fast tokenizer loads tokenizer.json as is, whatever the model family. */
    cJSON_AddStringToObject(o, "tokenizer_class", "PreTrainedTokenizerFast");
    return o;
}

moe_status moe_gen_write_configs(const moe_gen_spec *s, const moe_gen_tokenizer *t, const char *dir)
{
    cJSON *trees[3] = {moe_gen_config_tree(s, t), generation_tree(s, t),
                       tokenizer_config_tree(s, t)};
    static const char *const names[3] = {"config.json", "generation_config.json",
                                         "tokenizer_config.json"};
    moe_status st = MOE_OK;
    for (int i = 0; i < 3; i++) {
        if (st == MOE_OK && !trees[i])
            st = moe_error(MOE_ERR_NOMEM, "%s/%s: out of memory", dir, names[i]);
        if (st == MOE_OK)
            st = write_tree(trees[i], dir, names[i], i < 2);
    }
    for (int i = 0; i < 3; i++)
        cJSON_Delete(trees[i]);
    return st;
}
