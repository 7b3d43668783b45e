/* Hugging Face config.json / generation_config.json -> moe_model_config, for the four MoE
 * architectures we serve; defaults follow transformers' configuration_*.py for each. */
#include "common/file.h"
#include "common/model_config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

static const struct {
    const char *arch;       /* "architectures" entry */
    const char *model_type; /* fallback when "architectures" is absent */
} arch_names[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = {"MixtralForCausalLM", "mixtral"},
    [MOE_ARCH_QWEN2_MOE] = {"Qwen2MoeForCausalLM", "qwen2_moe"},
    [MOE_ARCH_OLMOE] = {"OlmoeForCausalLM", "olmoe"},
    [MOE_ARCH_QWEN3_MOE] = {"Qwen3MoeForCausalLM", "qwen3_moe"},
};

/* Per-architecture defaults for optional fields, from transformers' config classes. */
static const struct {
    double rope_theta;
    double rms_eps;
    int max_position;
} arch_defaults[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = {1e6, 1e-5, 4096 * 32},
    [MOE_ARCH_QWEN2_MOE] = {1e4, 1e-6, 32768},
    [MOE_ARCH_OLMOE] = {1e4, 1e-5, 4096},
    [MOE_ARCH_QWEN3_MOE] = {1e4, 1e-6, 32768},
};

const char *moe_arch_name(moe_arch a)
{
    return (unsigned)a < MOE_ARCH_COUNT ? arch_names[a].arch : "unknown";
}

/* JSON null and absence both mean "not given" in HF configs. */
static const cJSON *field(const cJSON *obj, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    return j && !cJSON_IsNull(j) ? j : NULL;
}

/* An integer-valued JSON number that fits an int. */
static int json_int(const cJSON *j, int *out)
{
    if (!cJSON_IsNumber(j))
        return 0;
    double v = j->valuedouble;
    if (!(v >= -2147483648.0 && v <= 2147483647.0) || v != floor(v))
        return 0;
    *out = (int)v;
    return 1;
}

/* Reads integer field `key`: *out = default when absent and !required. */
static moe_status get_int(const cJSON *obj, const char *name, const char *key, int required,
                          int dflt, int *out)
{
    const cJSON *j = field(obj, key);
    if (!j) {
        if (required)
            return moe_error(MOE_ERR_FORMAT, "%s: required field %s is missing", name, key);
        *out = dflt;
        return MOE_OK;
    }
    if (!json_int(j, out))
        return moe_error(MOE_ERR_FORMAT, "%s: field %s is not an integer", name, key);
    return MOE_OK;
}

static moe_status get_pos_int(const cJSON *obj, const char *name, const char *key, int required,
                              int dflt, int *out)
{
    moe_status s = get_int(obj, name, key, required, dflt, out);
    if (s == MOE_OK && *out <= 0)
        return moe_error(MOE_ERR_RANGE, "%s: field %s is %d, must be positive", name, key, *out);
    return s;
}

static moe_status get_num(const cJSON *obj, const char *name, const char *key, double dflt,
                          double *out)
{
    const cJSON *j = field(obj, key);
    if (!j) {
        *out = dflt;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble))
        return moe_error(MOE_ERR_FORMAT, "%s: field %s is not a finite number", name, key);
    *out = j->valuedouble;
    return MOE_OK;
}

static moe_status get_bool(const cJSON *obj, const char *name, const char *key, bool dflt,
                           bool *out)
{
    const cJSON *j = field(obj, key);
    if (!j) {
        *out = dflt;
        return MOE_OK;
    }
    if (!cJSON_IsBool(j))
        return moe_error(MOE_ERR_FORMAT, "%s: field %s is not true/false", name, key);
    *out = cJSON_IsTrue(j);
    return MOE_OK;
}

static moe_status find_arch(const cJSON *root, const char *name, moe_model_config *c)
{
    const cJSON *archs = field(root, "architectures");
    if (archs) {
        if (!cJSON_IsArray(archs) || !cJSON_IsString(archs->child))
            return moe_error(MOE_ERR_FORMAT, "%s: field architectures is not a list of names",
                             name);
        const char *a = archs->child->valuestring;
        for (int i = 0; i < MOE_ARCH_COUNT; i++) {
            if (strcmp(a, arch_names[i].arch) == 0) {
                c->arch = (moe_arch)i;
                snprintf(c->arch_name, sizeof c->arch_name, "%s", a);
                return MOE_OK;
            }
        }
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: field architectures: unknown architecture \"%s\" (supported: "
                         "MixtralForCausalLM, Qwen2MoeForCausalLM, OlmoeForCausalLM, "
                         "Qwen3MoeForCausalLM)",
                         name, a);
    }
    const cJSON *mt = field(root, "model_type");
    if (!mt)
        return moe_error(MOE_ERR_FORMAT,
                         "%s: neither field architectures nor model_type is present", name);
    if (!cJSON_IsString(mt))
        return moe_error(MOE_ERR_FORMAT, "%s: field model_type is not a string", name);
    for (int i = 0; i < MOE_ARCH_COUNT; i++) {
        if (strcmp(mt->valuestring, arch_names[i].model_type) == 0) {
            c->arch = (moe_arch)i;
            snprintf(c->arch_name, sizeof c->arch_name, "%s", arch_names[i].arch);
            return MOE_OK;
        }
    }
    return moe_error(MOE_ERR_UNSUPPORTED, "%s: field model_type: unknown architecture \"%s\"", name,
                     mt->valuestring);
}

/* A RoPE description is fine when it asks for plain RoPE; every scaling variant (linear, dynamic,
 * yarn, longrope, llama3, ...) changes the frequencies and is refused rather than ignored. */
static moe_status check_rope_dict(const cJSON *r, const char *name, const char *key, double *theta)
{
    if (!cJSON_IsObject(r))
        return moe_error(MOE_ERR_FORMAT, "%s: field %s is not an object", name, key);
    for (const cJSON *e = r->child; e; e = e->next) {
        if (cJSON_IsObject(e))
            return moe_error(MOE_ERR_UNSUPPORTED,
                             "%s: field %s.%s: per-layer-type RoPE parameters are not supported",
                             name, key, e->string);
    }
    const cJSON *type = field(r, "rope_type");
    if (!type)
        type = field(r, "type");
    if (type && (!cJSON_IsString(type) || strcmp(type->valuestring, "default") != 0))
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: field %s: RoPE type \"%s\" is not supported (only plain RoPE)", name,
                         key, cJSON_IsString(type) ? type->valuestring : "?");
    const cJSON *prf = field(r, "partial_rotary_factor");
    if (prf && !(cJSON_IsNumber(prf) && prf->valuedouble == 1.0))
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: field %s.partial_rotary_factor: partial RoPE is not supported", name,
                         key);
    const cJSON *th = field(r, "rope_theta");
    if (th) {
        if (!cJSON_IsNumber(th) || !isfinite(th->valuedouble))
            return moe_error(MOE_ERR_FORMAT, "%s: field %s.rope_theta is not a number", name, key);
        *theta = th->valuedouble;
    }
    return MOE_OK;
}

static moe_status parse_rope(const cJSON *root, const char *name, moe_model_config *c)
{
    double theta;
    moe_status s = get_num(root, name, "rope_theta", arch_defaults[c->arch].rope_theta, &theta);
    if (s != MOE_OK)
        return s;
    const cJSON *rs = field(root, "rope_scaling");
    if (rs && (s = check_rope_dict(rs, name, "rope_scaling", &theta)) != MOE_OK)
        return s;
    /* transformers >= 5 writes rope_parameters {rope_type, rope_theta}; it wins over rope_theta. */
    const cJSON *rp = field(root, "rope_parameters");
    if (rp && (s = check_rope_dict(rp, name, "rope_parameters", &theta)) != MOE_OK)
        return s;
    const cJSON *prf = field(root, "partial_rotary_factor");
    if (prf && !(cJSON_IsNumber(prf) && prf->valuedouble == 1.0))
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: field partial_rotary_factor: partial RoPE is not supported", name);
    if (!(theta > 0))
        return moe_error(MOE_ERR_RANGE, "%s: field rope_theta is %g, must be positive", name,
                         theta);
    c->rope_theta = theta;
    return MOE_OK;
}

/* Expert count: HF maps num_experts <-> num_local_experts per architecture, and save_pretrained
 * may write either spelling, so accept both (and refuse them disagreeing). */
static moe_status parse_n_experts(const cJSON *root, const char *name, moe_model_config *c)
{
    int a = 0, b = 0;
    moe_status s = get_int(root, name, "num_local_experts", 0, 0, &a);
    if (s == MOE_OK)
        s = get_int(root, name, "num_experts", 0, 0, &b);
    if (s != MOE_OK)
        return s;
    bool has_a = field(root, "num_local_experts") != NULL,
         has_b = field(root, "num_experts") != NULL;
    const char *key = c->arch == MOE_ARCH_MIXTRAL ? "num_local_experts" : "num_experts";
    if (!has_a && !has_b)
        return moe_error(MOE_ERR_FORMAT, "%s: required field %s is missing", name, key);
    if (has_a && has_b && a != b)
        return moe_error(MOE_ERR_FORMAT,
                         "%s: fields num_local_experts (%d) and num_experts (%d) disagree", name, a,
                         b);
    c->n_experts = has_a ? a : b;
    if (c->n_experts <= 0)
        return moe_error(MOE_ERR_RANGE, "%s: field %s is %d, must be positive", name, key,
                         c->n_experts);
    return MOE_OK;
}

/* Which layers are MoE (Qwen2-MoE / Qwen3-MoE): layer i is MoE iff i is not in mlp_only_layers
 * and (i + 1) % decoder_sparse_step == 0; the others use the dense MLP. */
static moe_status parse_sparse_layout(const cJSON *root, const char *name, moe_model_config *c)
{
    int step;
    moe_status s = get_pos_int(root, name, "decoder_sparse_step", 0, 1, &step);
    if (s != MOE_OK)
        return s;
    for (int i = 0; i < c->n_layers; i++)
        c->layer_is_moe[i] = (i + 1) % step == 0;
    const cJSON *mlp_only = field(root, "mlp_only_layers");
    if (mlp_only) {
        if (!cJSON_IsArray(mlp_only))
            return moe_error(MOE_ERR_FORMAT, "%s: field mlp_only_layers is not a list", name);
        int k = 0;
        for (const cJSON *e = mlp_only->child; e; e = e->next, k++) {
            int li;
            if (!json_int(e, &li))
                return moe_error(MOE_ERR_FORMAT, "%s: field mlp_only_layers[%d] is not an integer",
                                 name, k);
            if (li < 0 || li >= c->n_layers)
                return moe_error(
                    MOE_ERR_RANGE,
                    "%s: field mlp_only_layers[%d] = %d is not a layer (num_hidden_layers %d)",
                    name, k, li, c->n_layers);
            c->layer_is_moe[li] = false;
        }
    }
    bool any_dense = false;
    for (int i = 0; i < c->n_layers; i++)
        any_dense |= !c->layer_is_moe[i];
    if (any_dense)
        return get_pos_int(root, name, "intermediate_size", 1, 0, &c->dense_ffn);
    c->dense_ffn = 0;
    return MOE_OK;
}

static moe_status parse_arch_specific(const cJSON *root, const char *name, moe_model_config *c)
{
    moe_status s = MOE_OK;
    bool use_sw = false;
    int sw = 0;
    switch (c->arch) {
    case MOE_ARCH_MIXTRAL:
        s = get_pos_int(root, name, "intermediate_size", 1, 0, &c->moe_ffn);
        c->norm_topk_prob = true; /* Mixtral always renormalises its top-k weights */
        for (int i = 0; i < c->n_layers; i++)
            c->layer_is_moe[i] = true;
        if (s == MOE_OK && (s = get_int(root, name, "sliding_window", 0, 0, &sw)) == MOE_OK)
            use_sw = sw != 0;
        break;
    case MOE_ARCH_OLMOE: {
        s = get_pos_int(root, name, "intermediate_size", 1, 0, &c->moe_ffn);
        if (s == MOE_OK)
            s = get_bool(root, name, "norm_topk_prob", false, &c->norm_topk_prob);
        c->qk_norm = 1;
        double clip = 0;
        if (s == MOE_OK)
            s = get_num(root, name, "clip_qkv", 0, &clip);
        if (s == MOE_OK && (clip < 0 || clip > 3.0e38))
            return moe_error(MOE_ERR_RANGE, "%s: field clip_qkv is %g, must be positive or null",
                             name, clip);
        c->clip_qkv = (float)clip;
        for (int i = 0; i < c->n_layers; i++)
            c->layer_is_moe[i] = true;
        break;
    }
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_MOE:
        s = get_pos_int(root, name, "moe_intermediate_size", 1, 0, &c->moe_ffn);
        if (s == MOE_OK)
            s = get_bool(root, name, "norm_topk_prob", false, &c->norm_topk_prob);
        if (s == MOE_OK)
            s = parse_sparse_layout(root, name, c);
        if (s == MOE_OK && c->arch == MOE_ARCH_QWEN2_MOE)
            s = get_pos_int(root, name, "shared_expert_intermediate_size", 1, 0,
                            &c->shared_expert_ffn);
        if (s == MOE_OK)
            s = get_bool(root, name, "use_sliding_window", false, &use_sw);
        /* Both classes default the window to 4096 when the key is absent; an explicit null
         * means full attention. Only used when use_sliding_window is on. */
        if (s == MOE_OK && use_sw)
            s = get_int(root, name, "sliding_window", 0,
                        cJSON_GetObjectItemCaseSensitive(root, "sliding_window") ? 0 : 4096, &sw);
        if (use_sw && sw == 0)
            use_sw = false;
        if (c->arch == MOE_ARCH_QWEN3_MOE)
            c->qk_norm = 2;
        break;
    default:
        return moe_error(MOE_ERR_INTERNAL, "%s: architecture %d has no parser", name, (int)c->arch);
    }
    if (s != MOE_OK)
        return s;
    if (use_sw && sw < 0)
        return moe_error(MOE_ERR_RANGE, "%s: field sliding_window is %d, must not be negative",
                         name, sw);
    c->sliding_window = use_sw ? sw : 0;

    /* Attention biases: Qwen2-MoE has q/k/v biases (qkv_bias, default true). OLMoE and Qwen3-MoE
     * name it attention_bias, which also puts a bias on o_proj: our layer weights have no slot
     * for that, so refuse it instead of silently computing something else. */
    if (c->arch == MOE_ARCH_QWEN2_MOE)
        return get_bool(root, name, "qkv_bias", true, &c->attn_bias);
    bool ab = false;
    s = get_bool(root, name, "attention_bias", false, &ab);
    if (s == MOE_OK && ab)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: field attention_bias: true (an o_proj bias) is not supported", name);
    c->attn_bias = false;
    return s;
}

/* bos/eos: generation_config.json when it says, else config.json. eos may be an id or a list. */
static moe_status parse_special_ids(const cJSON *root, const cJSON *gen, const char *name,
                                    const char *gen_name, moe_model_config *c)
{
    const cJSON *bos = gen ? field(gen, "bos_token_id") : NULL;
    const char *bos_src = gen_name;
    if (!bos) {
        bos = field(root, "bos_token_id");
        bos_src = name;
    }
    c->bos_token_id = -1;
    if (bos && (!json_int(bos, &c->bos_token_id) || c->bos_token_id < 0))
        return moe_error(MOE_ERR_FORMAT, "%s: field bos_token_id is not a token id", bos_src);
    if (c->bos_token_id >= c->vocab_size) {
        MOE_LOG_W("%s: bos_token_id %d is outside the vocabulary (%d); ignored", bos_src,
                  c->bos_token_id, c->vocab_size);
        c->bos_token_id = -1;
    }

    const cJSON *eos = gen ? field(gen, "eos_token_id") : NULL;
    const char *eos_src = gen_name;
    if (!eos) {
        eos = field(root, "eos_token_id");
        eos_src = name;
    }
    c->n_eos = 0;
    if (!eos)
        return MOE_OK;
    const cJSON *one = eos;
    if (cJSON_IsArray(eos)) {
        if (cJSON_GetArraySize(eos) > MOE_MAX_EOS)
            return moe_error(MOE_ERR_UNSUPPORTED,
                             "%s: field eos_token_id lists %d ids (at most %d)", eos_src,
                             cJSON_GetArraySize(eos), MOE_MAX_EOS);
        one = eos->child;
    }
    for (int k = 0; one; k++) {
        int id;
        if (!json_int(one, &id) || id < 0)
            return moe_error(MOE_ERR_FORMAT,
                             "%s: field eos_token_id is not a token id or a list of them", eos_src);
        /* transformers only warns about these (OLMoE's class default eos is 50279 whatever the
         * vocabulary); an id the model can never emit cannot stop anything, so drop it. */
        if (id >= c->vocab_size)
            MOE_LOG_W("%s: eos_token_id %d is outside the vocabulary (%d); ignored", eos_src, id,
                      c->vocab_size);
        else
            c->eos_ids[c->n_eos++] = id;
        one = cJSON_IsArray(eos) ? one->next : NULL;
    }
    return MOE_OK;
}

static moe_status parse_root(const cJSON *root, const cJSON *gen, const char *name,
                             const char *gen_name, moe_model_config *c)
{
    moe_status s = find_arch(root, name, c);
    if (s != MOE_OK)
        return s;
    const cJSON *act = field(root, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: field hidden_act: \"%s\" is not supported (silu only)", name,
                         cJSON_IsString(act) ? act->valuestring : "?");

    if ((s = get_pos_int(root, name, "vocab_size", 1, 0, &c->vocab_size)) != MOE_OK ||
        (s = get_pos_int(root, name, "hidden_size", 1, 0, &c->hidden_size)) != MOE_OK ||
        (s = get_pos_int(root, name, "num_hidden_layers", 1, 0, &c->n_layers)) != MOE_OK ||
        (s = get_pos_int(root, name, "num_attention_heads", 1, 0, &c->n_heads)) != MOE_OK)
        return s;
    if (c->n_layers > MOE_MAX_LAYERS)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: field num_hidden_layers is %d (at most %d)",
                         name, c->n_layers, MOE_MAX_LAYERS);
    /* Class defaults when absent: Mixtral 8, Qwen2-MoE 16, Qwen3-MoE 4, OLMoE = attention heads. */
    static const int kv_default[MOE_ARCH_COUNT] = {8, 16, 0, 4};
    int kv_dflt = kv_default[c->arch] ? kv_default[c->arch] : c->n_heads;
    if ((s = get_pos_int(root, name, "num_key_value_heads", 0, kv_dflt, &c->n_kv_heads)) != MOE_OK)
        return s;
    if (c->n_heads % c->n_kv_heads != 0)
        return moe_error(
            MOE_ERR_FORMAT,
            "%s: field num_key_value_heads (%d) does not divide num_attention_heads (%d)", name,
            c->n_kv_heads, c->n_heads);
    if (field(root, "head_dim")) {
        if ((s = get_pos_int(root, name, "head_dim", 1, 0, &c->head_dim)) != MOE_OK)
            return s;
    } else {
        if (c->hidden_size % c->n_heads != 0)
            return moe_error(MOE_ERR_FORMAT,
                             "%s: field num_attention_heads (%d) does not divide hidden_size (%d)",
                             name, c->n_heads, c->hidden_size);
        c->head_dim = c->hidden_size / c->n_heads;
    }
    if (c->head_dim % 2 != 0)
        return moe_error(MOE_ERR_FORMAT, "%s: field head_dim is %d, RoPE needs it even", name,
                         c->head_dim);
    /* OLMoE sizes q_norm by hidden_size and k_norm by (hidden_size / heads) * kv_heads, which
     * only matches the projections when head_dim is hidden_size / heads. */
    if (c->arch == MOE_ARCH_OLMOE && c->head_dim * c->n_heads != c->hidden_size)
        return moe_error(
            MOE_ERR_FORMAT,
            "%s: field head_dim: OLMoE needs head_dim x num_attention_heads == hidden_size", name);

    if ((s = get_pos_int(root, name, "max_position_embeddings", 0,
                         arch_defaults[c->arch].max_position, &c->max_position)) != MOE_OK)
        return s;
    double eps;
    if ((s = get_num(root, name, "rms_norm_eps", arch_defaults[c->arch].rms_eps, &eps)) != MOE_OK)
        return s;
    /* checked as the float it is stored in: 1e-61 is positive as a double but 0 as a float */
    if (!(eps > 0 && eps < 1) || !((float)eps > 0))
        return moe_error(MOE_ERR_RANGE, "%s: field rms_norm_eps is %g, must be in (0, 1)", name,
                         eps);
    c->rms_eps = (float)eps;
    if ((s = get_bool(root, name, "tie_word_embeddings", false, &c->tie_embeddings)) != MOE_OK ||
        (s = parse_rope(root, name, c)) != MOE_OK ||
        (s = parse_n_experts(root, name, c)) != MOE_OK ||
        (s = get_pos_int(root, name, "num_experts_per_tok", 1, 0, &c->n_experts_per_tok)) != MOE_OK)
        return s;
    if (c->n_experts_per_tok > c->n_experts)
        return moe_error(MOE_ERR_RANGE,
                         "%s: field num_experts_per_tok (%d) exceeds the expert count (%d)", name,
                         c->n_experts_per_tok, c->n_experts);
    if ((s = parse_arch_specific(root, name, c)) != MOE_OK)
        return s;
    return parse_special_ids(root, gen, name, gen_name, c);
}

/* cJSON keeps both copies of a repeated key and returns the first; Python's json keeps the
 * last. Refuse rather than read a different model than transformers would. */
static moe_status check_dup_keys(const cJSON *obj, const char *name)
{
    for (const cJSON *a = obj->child; a; a = a->next)
        for (const cJSON *b = a->next; b; b = b->next)
            if (strcmp(a->string, b->string) == 0)
                return moe_error(MOE_ERR_FORMAT, "%s: field %s appears twice", name, a->string);
    return MOE_OK;
}

static moe_status parse_json(const char *text, const char *name, cJSON **out)
{
    cJSON *j = cJSON_Parse(text);
    if (!j) {
        const char *at = cJSON_GetErrorPtr();
        long off = at && at >= text ? (long)(at - text) : -1;
        return moe_error(MOE_ERR_FORMAT, "%s: not valid JSON (near byte %ld)", name, off);
    }
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return moe_error(MOE_ERR_FORMAT, "%s: not a JSON object", name);
    }
    moe_status s = check_dup_keys(j, name);
    if (s != MOE_OK) {
        cJSON_Delete(j);
        return s;
    }
    *out = j;
    return MOE_OK;
}

/* Name used for generation_config.json messages: the sibling of `name` when it is a path to
 * config.json, else a description. */
static void gen_name_for(const char *name, char *buf, size_t n)
{
    size_t len = strlen(name);
    const char *tail = "config.json";
    size_t tl = strlen(tail);
    if (len >= tl && strcmp(name + len - tl, tail) == 0 && (len == tl || name[len - tl - 1] == '/'))
        snprintf(buf, n, "%.*sgeneration_config.json", (int)(len - tl), name);
    else
        snprintf(buf, n, "%s (generation config)", name);
}

moe_status moe_model_config_parse(const char *config_json, const char *generation_json,
                                  const char *name, moe_model_config *cfg)
{
    if (!name)
        name = "config.json";
    if (!config_json || !cfg)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: no config text", name);
    char gen_name[4200];
    gen_name_for(name, gen_name, sizeof gen_name);
    cJSON *root = NULL, *gen = NULL;
    moe_status s = parse_json(config_json, name, &root);
    if (s == MOE_OK && generation_json)
        s = parse_json(generation_json, gen_name, &gen);
    moe_model_config c;
    memset(&c, 0, sizeof c);
    if (s == MOE_OK)
        s = parse_root(root, gen, name, gen_name, &c);
    cJSON_Delete(root);
    cJSON_Delete(gen);
    if (s == MOE_OK)
        *cfg = c;
    return s;
}

/* Whole small text file; NULL with *st = NOT_FOUND when absent. Configs are kilobytes: 64 MB
 * means something else was put there. */
static char *slurp(const char *path, moe_status *st)
{
    char *buf;
    *st = moe_read_file(path, (size_t)64 << 20, &buf, NULL);
    return *st == MOE_OK ? buf : NULL;
}

moe_status moe_model_config_load(const char *dir, moe_model_config *cfg)
{
    if (!dir || !cfg)
        return moe_error(MOE_ERR_INVALID_ARG, "moe_model_config_load: no directory");
    size_t n = strlen(dir) + 32;
    char *path = malloc(n), *gpath = malloc(n);
    if (!path || !gpath) {
        free(path);
        free(gpath);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", dir);
    }
    snprintf(path, n, "%s/config.json", dir);
    snprintf(gpath, n, "%s/generation_config.json", dir);
    moe_status s;
    char *text = slurp(path, &s);
    char *gtext = NULL;
    if (text) {
        gtext = slurp(gpath, &s);
        if (!gtext && s == MOE_ERR_NOT_FOUND)
            s = MOE_OK; /* optional */
    }
    if (s == MOE_OK)
        s = moe_model_config_parse(text, gtext, path, cfg);
    free(text);
    free(gtext);
    free(path);
    free(gpath);
    return s;
}
