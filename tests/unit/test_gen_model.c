/* Tests for moe-gen-model: every architecture's tiny model read back through the project's own
 * config, safetensors and tokenizer loaders; determinism; HF-style sharding; flag errors; the
 * JSON number format; the BPE trainer. The tool's sources are compiled in (they have no main). */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/unit/test_util.h"
#include "common/model_config.h"
#include "common/tokenizer.h"
#include "worker/safetensors.h"

#include "tools/moe_gen_model/gen_model.h"

static char g_root[512];

/* argv strings are never written to; this only satisfies the char ** type. */
static char *mut(const char *s)
{
    return (char *)(uintptr_t)s;
}


static void setup(void)
{
    char base[256];
    snprintf(base, sizeof base, "%s/test_gen_model", MOE_BINARY_DIR);
    mkdir(base, 0777);
    snprintf(g_root, sizeof g_root, "%s/run-XXXXXX", base);
    cr_assert_not_null(mkdtemp(g_root), "mkdtemp under %s", base);
}

static void teardown(void)
{
    moe_test_rm_rf(g_root);
}

TestSuite(gen_model, .init = setup, .fini = teardown, .timeout = 60);

/* Runs the tool with the given flags (NULL-terminated) and --quiet; returns its status. */
static moe_status run_tool(const char *first, ...)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)"moe-gen-model";
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 30; a = va_arg(ap, const char *))
        argv[argc++] = mut(a);
    va_end(ap);
    argv[argc++] = (char *)"--quiet";
    argv[argc] = NULL;
    moe_gen_options opt;
    moe_status st = moe_gen_parse_args(argc, argv, &opt);
    if (st != MOE_OK)
        return st;
    return moe_gen_run(&opt);
}

static void subdir(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", g_root, name);
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    cr_assert_not_null(b);
    cr_assert_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    b[n] = '\0';
    if (len)
        *len = (size_t)n;
    return b;
}

static cJSON *load_json(const char *dir, const char *name)
{
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    char *txt = slurp(p, NULL);
    cr_assert_not_null(txt, "%s missing", p);
    cJSON *j = cJSON_Parse(txt);
    cr_assert_not_null(j, "%s is not JSON", p);
    free(txt);
    return j;
}

static int json_int(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    cr_assert(cJSON_IsNumber(v), "field %s missing or not a number", key);
    return v->valueint;
}

static void expect_shape(const moe_st_set *set, const char *name, int64_t d0, int64_t d1,
                         moe_dtype dt)
{
    const moe_st_tensor *t = moe_st_find(set, name);
    cr_assert_not_null(t, "tensor %s missing", name);
    cr_assert_eq(t->dtype, dt, "%s dtype", name);
    if (d1 > 0) {
        cr_assert_eq(t->n_dims, 2, "%s n_dims", name);
        cr_assert_eq(t->shape[0], d0, "%s shape[0] %lld != %lld", name, (long long)t->shape[0],
                     (long long)d0);
        cr_assert_eq(t->shape[1], d1, "%s shape[1] %lld != %lld", name, (long long)t->shape[1],
                     (long long)d1);
    } else {
        cr_assert_eq(t->n_dims, 1, "%s n_dims", name);
        cr_assert_eq(t->shape[0], d0, "%s shape[0]", name);
    }
}

static double tensor_mean(const moe_st_tensor *t, double *std)
{
    size_t n = t->n_bytes / (t->dtype == MOE_DT_F32 ? 4 : 2);
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        double v = t->dtype == MOE_DT_F32 ? ((const float *)t->data)[i]
                                          : moe_bf16_to_f32(((const uint16_t *)t->data)[i]);
        s += v;
        s2 += v * v;
    }
    double m = s / (double)n;
    *std = sqrt(s2 / (double)n - m * m);
    return m;
}

/* Tensors common to every architecture, plus the count the spec says. */
static void check_common(const moe_st_set *set, const char *dir, int q, int kv)
{
    expect_shape(set, "model.embed_tokens.weight", 512, 64, MOE_DT_BF16);
    expect_shape(set, "lm_head.weight", 512, 64, MOE_DT_BF16);
    expect_shape(set, "model.norm.weight", 64, 0, MOE_DT_BF16);
    for (int l = 0; l < 2; l++) {
        char n[128];
        snprintf(n, sizeof n, "model.layers.%d.self_attn.q_proj.weight", l);
        expect_shape(set, n, q, 64, MOE_DT_BF16);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.k_proj.weight", l);
        expect_shape(set, n, kv, 64, MOE_DT_BF16);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.v_proj.weight", l);
        expect_shape(set, n, kv, 64, MOE_DT_BF16);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.o_proj.weight", l);
        expect_shape(set, n, 64, q, MOE_DT_BF16);
        snprintf(n, sizeof n, "model.layers.%d.input_layernorm.weight", l);
        expect_shape(set, n, 64, 0, MOE_DT_BF16);
        snprintf(n, sizeof n, "model.layers.%d.post_attention_layernorm.weight", l);
        expect_shape(set, n, 64, 0, MOE_DT_BF16);
    }
    /* value scales: unit-ish norms, 1/sqrt(fan_in) matrices, unit embeddings */
    double sd, m = tensor_mean(moe_st_find(set, "model.norm.weight"), &sd);
    cr_assert(fabs(m - 1.0) < 0.05 && sd > 0.02 && sd < 0.2, "%s: norm mean %g std %g", dir, m, sd);
    m = tensor_mean(moe_st_find(set, "model.layers.0.self_attn.q_proj.weight"), &sd);
    cr_assert(fabs(m) < 0.02 && fabs(sd - 0.125) < 0.01, "%s: q_proj mean %g std %g", dir, m, sd);
    m = tensor_mean(moe_st_find(set, "model.embed_tokens.weight"), &sd);
    cr_assert(fabs(m) < 0.02 && fabs(sd - 1.0) < 0.02, "%s: embed mean %g std %g", dir, m, sd);
}

static void open_and_count(const char *dir, const moe_gen_spec *spec, moe_st_set **set)
{
    moe_status st = moe_st_open_dir(dir, set);
    cr_assert_eq(st, MOE_OK, "moe_st_open_dir(%s): %s", dir, moe_error_message());
    moe_gen_tensor *t;
    int n;
    cr_assert_eq(moe_gen_tensor_list(spec, &t, &n), MOE_OK);
    cr_assert_eq(moe_st_count(*set), n, "%s: %d tensors, expected %d", dir, moe_st_count(*set), n);
    uint64_t params = 0;
    for (int i = 0; i < moe_st_count(*set); i++)
        params += moe_st_at(*set, i)->n_bytes / 2;
    cr_assert_eq(params, moe_gen_spec_params(spec), "%s: parameter count", dir);
    free(t);
}

static void build_spec(moe_arch a, moe_gen_spec *spec)
{
    cr_assert_eq(moe_gen_spec_build(a, moe_gen_preset_find("tiny"), 0, MOE_DT_BF16, 0, spec),
                 MOE_OK);
}

static void check_config_common(const char *dir, moe_arch arch, const char *cls,
                                const char *model_type, moe_model_config *mc)
{
    cJSON *c = load_json(dir, "config.json");
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(c, "architectures");
    cr_assert(cJSON_IsArray(archs) && cJSON_GetArraySize(archs) == 1);
    cr_assert_str_eq(cJSON_GetArrayItem(archs, 0)->valuestring, cls);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(c, "model_type")->valuestring, model_type);
    cr_assert_eq(json_int(c, "hidden_size"), 64);
    cr_assert_eq(json_int(c, "num_hidden_layers"), 2);
    cr_assert_eq(json_int(c, "num_attention_heads"), 4);
    cr_assert_eq(json_int(c, "num_key_value_heads"), 2);
    cr_assert_eq(json_int(c, "num_experts_per_tok"), 2);
    cr_assert_eq(json_int(c, "vocab_size"), 512);
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(c, "rope_parameters");
    cr_assert(cJSON_IsObject(rp));
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(rp, "rope_type")->valuestring, "default");
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(c, "dtype")->valuestring, "bfloat16");
    cJSON_Delete(c);

    moe_status st = moe_model_config_load(dir, mc);
    cr_assert_eq(st, MOE_OK, "moe_model_config_load(%s): %s", dir, moe_error_message());
    cr_assert_eq(mc->arch, arch);
    cr_assert_eq(mc->hidden_size, 64);
    cr_assert_eq(mc->n_layers, 2);
    cr_assert_eq(mc->n_experts, 8);
    cr_assert_eq(mc->n_experts_per_tok, 2);
    cr_assert_eq(mc->vocab_size, 512);
    cr_assert_eq(mc->head_dim, 16);
    cr_assert(mc->n_eos >= 1);

    /* The project's tokenizer loads tokenizer.json and the EOS ids name special tokens. */
    char p[1024];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    moe_tokenizer *tok = NULL;
    st = moe_tokenizer_load(p, &tok);
    cr_assert_eq(st, MOE_OK, "moe_tokenizer_load(%s): %s", p, moe_error_message());
    cr_assert(moe_tokenizer_vocab_size(tok) <= 512);
    const char *text = "Hello world! 机器学习 😀 def f(x):\n\treturn 42";
    int32_t ids[256];
    size_t n = 0;
    cr_assert_eq(moe_tokenizer_encode(tok, text, strlen(text), false, ids, 256, &n), MOE_OK, "%s",
                 moe_error_message());
    cr_assert(n > 5 && n < 256);
    char out[512];
    size_t m = 0;
    cr_assert_eq(moe_tokenizer_decode(tok, ids, n, false, out, sizeof out, &m), MOE_OK);
    cr_assert_str_eq(out, text, "%s: round trip", dir);
    moe_tokenizer_free(tok);
}

Test(gen_model, mixtral_tiny)
{
    char dir[600];
    subdir(dir, sizeof dir, "mixtral");
    cr_assert_eq(run_tool("--arch", "mixtral", "--preset", "tiny", "--out", dir, NULL), MOE_OK,
                 "%s", moe_error_message());
    moe_model_config mc;
    check_config_common(dir, MOE_ARCH_MIXTRAL, "MixtralForCausalLM", "mixtral", &mc);
    cr_assert_eq(mc.bos_token_id, 1);
    cr_assert_eq(mc.eos_ids[0], 2);
    cr_assert_eq(mc.moe_ffn, 64);
    cJSON *c = load_json(dir, "config.json");
    cr_assert_eq(json_int(c, "num_local_experts"), 8);
    cr_assert_eq(json_int(c, "intermediate_size"), 64);
    cJSON_Delete(c);

    moe_gen_spec spec;
    build_spec(MOE_ARCH_MIXTRAL, &spec);
    moe_st_set *set;
    open_and_count(dir, &spec, &set);
    check_common(set, dir, 64, 32);
    expect_shape(set, "model.layers.1.block_sparse_moe.gate.weight", 8, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.0.block_sparse_moe.experts.7.w1.weight", 64, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.0.block_sparse_moe.experts.7.w2.weight", 64, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.block_sparse_moe.experts.0.w3.weight", 64, 64, MOE_DT_BF16);
    cr_assert_null(moe_st_find(set, "model.layers.0.self_attn.q_norm.weight"));
    moe_st_close(set);
}

Test(gen_model, qwen2_moe_tiny)
{
    char dir[600];
    subdir(dir, sizeof dir, "qwen2");
    cr_assert_eq(run_tool("--arch", "qwen2_moe", "--preset", "tiny", "--out", dir, NULL), MOE_OK,
                 "%s", moe_error_message());
    moe_model_config mc;
    check_config_common(dir, MOE_ARCH_QWEN2_MOE, "Qwen2MoeForCausalLM", "qwen2_moe", &mc);
    /* layer 0 dense (mlp_only_layers=[0]), layer 1 MoE with a shared expert */
    cr_assert(!mc.layer_is_moe[0] && mc.layer_is_moe[1]);
    cr_assert(mc.attn_bias);
    cr_assert_eq(mc.shared_expert_ffn, 128);
    cr_assert_eq(mc.dense_ffn, 128);
    /* generation_config: <|im_end|> then <|endoftext|>, specials right after the learned vocab */
    cr_assert_eq(mc.n_eos, 2);
    cr_assert_eq(mc.eos_ids[0], 511);
    cr_assert_eq(mc.eos_ids[1], 509);
    cJSON *c = load_json(dir, "config.json");
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(c, "mlp_only_layers")), 1);
    cr_assert_eq(json_int(c, "decoder_sparse_step"), 1);
    cr_assert_eq(json_int(c, "shared_expert_intermediate_size"), 128);
    cr_assert_eq(json_int(c, "moe_intermediate_size"), 64);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "qkv_bias")));
    cJSON_Delete(c);

    moe_gen_spec spec;
    build_spec(MOE_ARCH_QWEN2_MOE, &spec);
    moe_st_set *set;
    open_and_count(dir, &spec, &set);
    check_common(set, dir, 64, 32);
    expect_shape(set, "model.layers.0.self_attn.q_proj.bias", 64, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.0.self_attn.k_proj.bias", 32, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.self_attn.v_proj.bias", 32, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.0.mlp.gate_proj.weight", 128, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.0.mlp.down_proj.weight", 64, 128, MOE_DT_BF16);
    cr_assert_null(moe_st_find(set, "model.layers.0.mlp.gate.weight"));
    expect_shape(set, "model.layers.1.mlp.gate.weight", 8, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.experts.5.up_proj.weight", 64, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.experts.5.down_proj.weight", 64, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.shared_expert.gate_proj.weight", 128, 64, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.shared_expert.down_proj.weight", 64, 128, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.shared_expert_gate.weight", 1, 64, MOE_DT_BF16);
    moe_st_close(set);
}

Test(gen_model, olmoe_tiny)
{
    char dir[600];
    subdir(dir, sizeof dir, "olmoe");
    cr_assert_eq(run_tool("--arch", "olmoe", "--preset", "tiny", "--out", dir, NULL), MOE_OK, "%s",
                 moe_error_message());
    moe_model_config mc;
    check_config_common(dir, MOE_ARCH_OLMOE, "OlmoeForCausalLM", "olmoe", &mc);
    cr_assert_eq(mc.qk_norm, 1);
    cr_assert_eq(mc.bos_token_id, -1);
    cJSON *c = load_json(dir, "config.json");
    cr_assert(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(c, "clip_qkv")));
    cr_assert_eq(json_int(c, "num_experts"), 8);
    cr_assert_eq(json_int(c, "intermediate_size"), 64);
    cJSON_Delete(c);

    moe_gen_spec spec;
    build_spec(MOE_ARCH_OLMOE, &spec);
    moe_st_set *set;
    open_and_count(dir, &spec, &set);
    check_common(set, dir, 64, 32);
    expect_shape(set, "model.layers.0.self_attn.q_norm.weight", 64, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.0.self_attn.k_norm.weight", 32, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.experts.3.gate_proj.weight", 64, 64, MOE_DT_BF16);
    cr_assert_null(moe_st_find(set, "model.layers.0.self_attn.q_proj.bias"));
    moe_st_close(set);
}

Test(gen_model, qwen3_moe_tiny)
{
    char dir[600];
    subdir(dir, sizeof dir, "qwen3");
    cr_assert_eq(run_tool("--arch", "qwen3_moe", "--preset", "tiny", "--out", dir, NULL), MOE_OK,
                 "%s", moe_error_message());
    moe_model_config mc;
    check_config_common(dir, MOE_ARCH_QWEN3_MOE, "Qwen3MoeForCausalLM", "qwen3_moe", &mc);
    cr_assert_eq(mc.qk_norm, 2);
    cr_assert(mc.norm_topk_prob);
    cr_assert(mc.layer_is_moe[0] && mc.layer_is_moe[1]);
    cJSON *c = load_json(dir, "config.json");
    cr_assert_eq(json_int(c, "head_dim"), 16);
    cr_assert_eq(json_int(c, "num_experts"), json_int(c, "num_local_experts"));
    cr_assert_eq(json_int(c, "eos_token_id"), 511); /* <|im_end|> */
    cJSON_Delete(c);

    moe_gen_spec spec;
    build_spec(MOE_ARCH_QWEN3_MOE, &spec);
    moe_st_set *set;
    open_and_count(dir, &spec, &set);
    check_common(set, dir, 64, 32);
    expect_shape(set, "model.layers.0.self_attn.q_norm.weight", 16, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.self_attn.k_norm.weight", 16, 0, MOE_DT_BF16);
    expect_shape(set, "model.layers.1.mlp.experts.7.down_proj.weight", 64, 64, MOE_DT_BF16);
    moe_st_close(set);
}

static bool same_file(const char *a, const char *b)
{
    size_t la, lb;
    char *x = slurp(a, &la), *y = slurp(b, &lb);
    bool same = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

Test(gen_model, deterministic)
{
    static const char *const files[] = {"config.json", "generation_config.json", "tokenizer.json",
                                        "tokenizer_config.json", "model.safetensors"};
    static const char *const archs[] = {"mixtral", "qwen2_moe"};
    for (int a = 0; a < 2; a++) {
        char d1[600], d2[600], d3[600];
        snprintf(d1, sizeof d1, "%s/%s-a", g_root, archs[a]);
        snprintf(d2, sizeof d2, "%s/%s-b", g_root, archs[a]);
        snprintf(d3, sizeof d3, "%s/%s-seed", g_root, archs[a]);
        cr_assert_eq(
            run_tool("--arch", archs[a], "--preset", "tiny", "--out", d1, "--seed", "7", NULL),
            MOE_OK);
        cr_assert_eq(
            run_tool("--arch", archs[a], "--preset", "tiny", "--out", d2, "--seed", "7", NULL),
            MOE_OK);
        cr_assert_eq(
            run_tool("--arch", archs[a], "--preset", "tiny", "--out", d3, "--seed", "8", NULL),
            MOE_OK);
        for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
            char p1[700], p2[700], p3[700];
            snprintf(p1, sizeof p1, "%s/%s", d1, files[f]);
            snprintf(p2, sizeof p2, "%s/%s", d2, files[f]);
            snprintf(p3, sizeof p3, "%s/%s", d3, files[f]);
            cr_assert(same_file(p1, p2), "%s differs between two identical runs", p1);
            /* the seed changes the weights only */
            bool weights = strcmp(files[f], "model.safetensors") == 0;
            cr_assert_eq(same_file(p1, p3), !weights, "%s vs seed 8", p1);
        }
    }
}

Test(gen_model, fill_is_chunking_independent)
{
    moe_gen_spec spec;
    build_spec(MOE_ARCH_OLMOE, &spec);
    moe_gen_tensor *t;
    int n;
    cr_assert_eq(moe_gen_tensor_list(&spec, &t, &n), MOE_OK);
    moe_gen_tensor *e = &t[0]; /* embed: 512 x 64 bf16 */
    size_t bytes = (size_t)e->n_bytes;
    uint8_t *whole = malloc(bytes), *pieces = malloc(bytes);
    moe_gen_tensor_fill(e, whole, bytes, 0);
    /* odd chunk sizes that split elements */
    for (size_t off = 0; off < bytes;) {
        size_t c = 1 + (off * 7919) % 333;
        if (c > bytes - off)
            c = bytes - off;
        moe_gen_tensor_fill(e, pieces + off, c, off);
        off += c;
    }
    cr_assert_eq(memcmp(whole, pieces, bytes), 0);
    free(whole);
    free(pieces);
    free(t);
}

Test(gen_model, sharded)
{
    char one[600], many[600];
    subdir(one, sizeof one, "single");
    subdir(many, sizeof many, "sharded");
    cr_assert_eq(run_tool("--arch", "qwen3_moe", "--preset", "tiny", "--out", one, NULL), MOE_OK);
    /* a stale single file from an earlier run must not survive next to the shards */
    cr_assert_eq(run_tool("--arch", "qwen3_moe", "--preset", "tiny", "--out", many, NULL), MOE_OK);
    cr_assert_eq(run_tool("--arch", "qwen3_moe", "--preset", "tiny", "--out", many,
                          "--max-shard-size", "100KB", NULL),
                 MOE_OK, "%s", moe_error_message());
    char p[700];
    snprintf(p, sizeof p, "%s/model.safetensors", many);
    cr_assert_neq(access(p, F_OK), 0, "stale %s left behind", p);

    cJSON *idx = load_json(many, "model.safetensors.index.json");
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(idx, "metadata");
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    cr_assert(cJSON_IsObject(meta) && cJSON_IsObject(wm));
    moe_gen_spec spec;
    build_spec(MOE_ARCH_QWEN3_MOE, &spec);
    double total = cJSON_GetObjectItemCaseSensitive(meta, "total_size")->valuedouble;
    cr_assert_eq((uint64_t)total, 2 * moe_gen_spec_params(&spec));
    /* every shard is named model-0000K-of-0000N and (bar single oversized tensors) <= 100 kB */
    int n_files = 0;
    char last[64] = "";
    for (const cJSON *e = wm->child; e; e = e->next) {
        unsigned k, nn;
        cr_assert_eq(sscanf(e->valuestring, "model-%5u-of-%5u.safetensors", &k, &nn), 2,
                     "bad shard name %s", e->valuestring);
        cr_assert(k >= 1 && k <= nn);
        if (strcmp(last, e->valuestring) != 0 && n_files < (int)nn)
            n_files = (int)nn;
        snprintf(last, sizeof last, "%s", e->valuestring);
    }
    cr_assert(n_files >= 4, "only %d shards", n_files);
    for (int k = 1; k <= n_files; k++) {
        struct stat sb;
        snprintf(p, sizeof p, "%s/model-%05d-of-%05d.safetensors", many, k, n_files);
        cr_assert_eq(stat(p, &sb), 0, "%s missing", p);
        cr_assert(sb.st_size < 100000 + 8192 || k == 1, "%s: %lld bytes", p, (long long)sb.st_size);
    }

    moe_st_set *a, *b;
    cr_assert_eq(moe_st_open_dir(one, &a), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_st_open_dir(many, &b), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(moe_st_count(a), moe_st_count(b));
    cr_assert_eq(cJSON_GetArraySize(wm), moe_st_count(b));
    for (int i = 0; i < moe_st_count(a); i++) {
        const moe_st_tensor *x = moe_st_at(a, i), *y = moe_st_find(b, x->name);
        cr_assert_not_null(y, "%s missing from the shards", x->name);
        cr_assert_eq(x->n_bytes, y->n_bytes);
        cr_assert_eq(memcmp(x->data, y->data, x->n_bytes), 0, "%s differs", x->name);
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(wm, x->name);
        cr_assert(cJSON_IsString(f) && strstr(y->file, f->valuestring), "%s: index says %s, in %s",
                  x->name, f ? f->valuestring : "?", y->file);
    }
    moe_st_close(a);
    moe_st_close(b);
    cJSON_Delete(idx);
}

Test(gen_model, f32_and_layers)
{
    char dir[600];
    subdir(dir, sizeof dir, "f32");
    cr_assert_eq(run_tool("--arch", "mixtral", "--preset", "tiny", "--out", dir, "--dtype", "f32",
                          "--layers", "3", "--seed", "0x10", NULL),
                 MOE_OK, "%s", moe_error_message());
    moe_model_config mc;
    cr_assert_eq(moe_model_config_load(dir, &mc), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(mc.n_layers, 3);
    cJSON *c = load_json(dir, "config.json");
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(c, "dtype")->valuestring, "float32");
    cJSON_Delete(c);
    moe_st_set *set;
    cr_assert_eq(moe_st_open_dir(dir, &set), MOE_OK, "%s", moe_error_message());
    expect_shape(set, "model.layers.2.block_sparse_moe.experts.1.w2.weight", 64, 64, MOE_DT_F32);
    cr_assert_null(moe_st_find(set, "model.layers.3.input_layernorm.weight"));
    moe_st_close(set);
}

Test(gen_model, bad_flags)
{
    char dir[600], file[600], under_file[700];
    subdir(dir, sizeof dir, "x");
    struct {
        const char *args[8];
        const char *needle;
    } cases[] = {
        {{"--arch", "llama", "--preset", "tiny", "--out", dir}, "--arch"},
        {{"--arch", "mixtral", "--preset", "huge", "--out", dir}, "--preset"},
        {{"--arch", "mixtral", "--preset", "tiny", "--out", dir, "--dtype", "f16"}, "--dtype"},
        {{"--arch", "mixtral", "--preset", "tiny"}, "--out"},
        {{"--preset", "tiny", "--out", dir}, "--arch"},
        {{"--arch", "mixtral", "--out", dir}, "--preset"},
        {{"--arch", "mixtral", "--preset", "tiny", "--out", dir, "--layers", "0"}, "--layers"},
        {{"--arch", "mixtral", "--preset", "tiny", "--out", dir, "--seed", "-1"}, "--seed"},
        {{"--arch", "mixtral", "--preset", "tiny", "--out", dir, "--max-shard-size", "5XB"},
         "--max-shard-size"},
        {{"--arch", "mixtral", "--preset", "tiny", "--out", dir, "--frobnicate"}, "--frobnicate"},
        {{"--arch", "mixtral", "--preset", "tiny", "--out"}, "--out"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *argv[12] = {(char *)"moe-gen-model"};
        int argc = 1;
        for (int k = 0; k < 8 && cases[i].args[k]; k++)
            argv[argc++] = mut(cases[i].args[k]);
        moe_gen_options opt;
        moe_status st = moe_gen_parse_args(argc, argv, &opt);
        cr_assert_eq(st, MOE_ERR_INVALID_ARG, "case %zu accepted", i);
        cr_assert_not_null(strstr(moe_error_message(), cases[i].needle),
                           "case %zu: message '%s' does not name %s", i, moe_error_message(),
                           cases[i].needle);
    }
    /* an --out that cannot be a directory (its parent is a regular file) */
    subdir(file, sizeof file, "plain-file");
    FILE *f = fopen(file, "w");
    cr_assert_not_null(f);
    fclose(f);
    snprintf(under_file, sizeof under_file, "%s/model", file);
    moe_status st = run_tool("--arch", "olmoe", "--preset", "tiny", "--out", under_file, NULL);
    cr_assert_eq(st, MOE_ERR_IO);
    cr_assert_not_null(strstr(moe_error_message(), "--out"), "%s", moe_error_message());

    moe_gen_options opt;
    char *help[] = {(char *)"moe-gen-model", (char *)"--help", NULL};
    cr_assert_eq(moe_gen_parse_args(2, help, &opt), MOE_OK);
    cr_assert(opt.help);
    char *list[] = {(char *)"moe-gen-model", (char *)"--list-presets", NULL};
    cr_assert_eq(moe_gen_parse_args(2, list, &opt), MOE_OK);
    cr_assert(opt.list_presets);
    char *eq[] = {(char *)"moe-gen-model",         (char *)"--arch=olmoe",
                  (char *)"--preset=small",        (char *)"--out=/tmp/x",
                  (char *)"--max-shard-size=2GiB", NULL};
    cr_assert_eq(moe_gen_parse_args(5, eq, &opt), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(opt.arch, MOE_ARCH_OLMOE);
    cr_assert_str_eq(opt.preset->name, "small");
    cr_assert_eq(opt.max_shard_size, 2ull << 30);
    cr_assert_eq(opt.dtype, MOE_DT_BF16);
}

Test(gen_model, sizes)
{
    uint64_t v;
    cr_assert(moe_gen_parse_size("5000000", &v) && v == 5000000);
    cr_assert(moe_gen_parse_size("5GB", &v) && v == 5000000000ull);
    cr_assert(moe_gen_parse_size("500MB", &v) && v == 500000000ull);
    cr_assert(moe_gen_parse_size("64KiB", &v) && v == 65536);
    cr_assert(moe_gen_parse_size("1TiB", &v) && v == 1ull << 40);
    cr_assert(!moe_gen_parse_size("0", &v));
    cr_assert(!moe_gen_parse_size("-5", &v));
    cr_assert(!moe_gen_parse_size("12 MB", &v));
    cr_assert(!moe_gen_parse_size("99999999999999999999", &v));
    cr_assert(!moe_gen_parse_size("", &v));
}

/* Python's repr(float), which config.json files carry. */
Test(gen_model, python_float_repr)
{
    struct {
        double v;
        const char *want;
    } cases[] = {
        {1e-05, "1e-05"},
        {1e-06, "1e-06"},
        {0.02, "0.02"},
        {0.001, "0.001"},
        {0.0001, "0.0001"},
        {1000000.0, "1000000.0"},
        {10000.0, "10000.0"},
        {0.0, "0.0"},
        {1e16, "1e+16"},
        {1.5e-07, "1.5e-07"},
        {123456789.125, "123456789.125"},
        {-2.5, "-2.5"},
        {0.1 + 0.2, "0.30000000000000004"},
        {1e22, "1e+22"},
        {9999999999999998.0, "9999999999999998.0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[64];
        moe_gen_format_double(cases[i].v, buf, sizeof buf);
        cr_assert_str_eq(buf, cases[i].want);
    }
}

Test(gen_model, json_escapes)
{
    moe_gen_json j;
    moe_gen_json_init(&j, true);
    moe_gen_json_obj_begin(&j);
    moe_gen_json_key(&j, "a");
    moe_gen_json_str(&j, "q\"b\\n\n\t\x01\x7f\xc3\xa9\xf0\x9f\x98\x80");
    moe_gen_json_key(&j, "e");
    moe_gen_json_arr_begin(&j);
    moe_gen_json_arr_end(&j);
    moe_gen_json_obj_end(&j);
    cr_assert_str_eq(j.buf,
                     "{\n  \"a\": \"q\\\"b\\\\n\\n\\t\\u0001\\u007f\\u00e9\\ud83d\\ude00\",\n"
                     "  \"e\": []\n}");
    moe_gen_json_discard(&j);
    moe_gen_json_init(&j, false); /* serde style: UTF-8 kept, DEL kept */
    moe_gen_json_str(&j, "\x7f\xc3\xa9\n");
    cr_assert_str_eq(j.buf, "\"\x7f\xc3\xa9\\n\"");
    moe_gen_json_discard(&j);
}

/* Every merge's halves and result are in the vocabulary, ids are dense, and a big config
 * vocabulary puts the specials at the real models' ids. */
static void check_bpe(const moe_gen_tokenizer *t)
{
    cr_assert(t->n_merges > 100);
    for (int m = 0; m < t->n_merges; m++) {
        const char *a = t->vocab[t->merges[m][0]], *b = t->vocab[t->merges[m][1]];
        char joined[512];
        snprintf(joined, sizeof joined, "%s%s", a, b);
        bool found = false;
        for (int i = 0; i < t->n_vocab && !found; i++)
            found = strcmp(t->vocab[i], joined) == 0;
        cr_assert(found, "merge %d (%s + %s) has no token", m, a, b);
    }
    for (int i = 0; i < t->n_vocab; i++)
        for (int k = i + 1; k < t->n_vocab; k++)
            cr_assert_str_neq(t->vocab[i], t->vocab[k], "tokens %d and %d are equal", i, k);
}

Test(gen_model, bpe_trainer)
{
    moe_gen_tokenizer *t = NULL;
    cr_assert_eq(moe_gen_tok_train(MOE_GEN_TOK_QWEN2, 512, &t), MOE_OK);
    cr_assert_eq(t->n_vocab, 509);
    cr_assert_str_eq(t->vocab[0], "!");          /* GPT-2 byte order */
    cr_assert_str_eq(t->vocab[188], "\xc4\x80"); /* byte 0 -> U+0100 */
    check_bpe(t);
    moe_gen_tok_free(t);

    cr_assert_eq(moe_gen_tok_train(MOE_GEN_TOK_SP, 512, &t), MOE_OK);
    cr_assert_eq(t->n_vocab, 512);
    cr_assert_str_eq(t->vocab[0], "<unk>");
    cr_assert_str_eq(t->vocab[3], "<0x00>");
    cr_assert_str_eq(t->vocab[258], "<0xFF>");
    check_bpe(t);
    moe_gen_tok_free(t);

    /* Qwen-sized vocab: the corpus runs out of merges first; specials at 151643.. */
    cr_assert_eq(moe_gen_tok_train(MOE_GEN_TOK_QWEN2, 151936, &t), MOE_OK);
    cr_assert(t->n_vocab > 1000 && t->n_vocab < 151643, "%d tokens", t->n_vocab);
    cr_assert_eq(t->special[0].id, 151643);
    cr_assert_eq(t->im_end_id, 151645);
    moe_gen_tok_free(t);

    cr_assert_eq(moe_gen_tok_train(MOE_GEN_TOK_GPT2, 50304, &t), MOE_OK);
    cr_assert_eq(t->eos_id, 50279);
    cr_assert_eq(t->pad_id, t->n_vocab);
    moe_gen_tok_free(t);

    cr_assert_eq(moe_gen_tok_train(MOE_GEN_TOK_SP, 200, &t), MOE_ERR_INVALID_ARG);
}

/* The real-model presets wire to their published shapes (checked without writing GBs). */
Test(gen_model, real_presets)
{
    moe_gen_spec s;
    cr_assert_eq(moe_gen_spec_build(MOE_ARCH_QWEN3_MOE, moe_gen_preset_find("qwen3-30b-a3b"), 0,
                                    MOE_DT_BF16, 0, &s),
                 MOE_OK);
    cr_assert_eq(s.n_layers, 48);
    cr_assert_eq(s.head_dim, 128);
    uint64_t p = moe_gen_spec_params(&s);
    cr_assert(p > 30000000000ull && p < 31000000000ull, "Qwen3-30B-A3B has %llu params",
              (unsigned long long)p);
    cr_assert_eq(moe_gen_spec_build(MOE_ARCH_MIXTRAL, moe_gen_preset_find("mixtral-8x7b"), 0,
                                    MOE_DT_BF16, 0, &s),
                 MOE_OK);
    p = moe_gen_spec_params(&s);
    cr_assert(p > 46000000000ull && p < 47000000000ull, "Mixtral-8x7B has %llu params",
              (unsigned long long)p);
    cr_assert_eq(moe_gen_spec_build(MOE_ARCH_OLMOE, moe_gen_preset_find("olmoe-1b-7b"), 0,
                                    MOE_DT_BF16, 0, &s),
                 MOE_OK);
    p = moe_gen_spec_params(&s);
    cr_assert(p > 6800000000ull && p < 7000000000ull, "OLMoE-1B-7B has %llu params",
              (unsigned long long)p);
    cr_assert_eq(moe_gen_spec_build(MOE_ARCH_QWEN2_MOE, moe_gen_preset_find("qwen1.5-moe-a2.7b"), 2,
                                    MOE_DT_BF16, 0, &s),
                 MOE_OK);
    cr_assert_eq(s.n_layers, 2);
    cr_assert_eq(s.shared_ffn, 5632);
    cr_assert_eq(s.n_mlp_only, 0);
    /* any preset with any arch: OLMoE forces head_dim = d / heads */
    cr_assert_eq(moe_gen_spec_build(MOE_ARCH_OLMOE, moe_gen_preset_find("qwen3-30b-a3b"), 1,
                                    MOE_DT_BF16, 0, &s),
                 MOE_OK);
    cr_assert_eq(s.head_dim, 64);
    cr_assert_eq(
        moe_gen_spec_build(MOE_ARCH_MIXTRAL, moe_gen_preset_find("tiny"), 300, MOE_DT_BF16, 0, &s),
        MOE_ERR_INVALID_ARG);
}

/* Vocab rows no token uses are zero in embed_tokens and lm_head (their logit is always 0); the
 * tokenizer's own rows, specials included, are not. */
Test(gen_model, padding_rows_are_zero)
{
    moe_gen_spec spec;
    build_spec(MOE_ARCH_QWEN2_MOE, &spec);
    spec.tok_rows = 100;
    spec.n_tok_extra = 1;
    spec.tok_extra[0] = 300;
    moe_gen_tensor *t;
    int n;
    cr_assert_eq(moe_gen_tensor_list(&spec, &t, &n), MOE_OK);
    const int idx[2] = {0, n - 1};
    cr_assert_str_eq(t[n - 1].name, "lm_head.weight");
    for (int k = 0; k < 2; k++) {
        moe_gen_tensor *x = &t[idx[k]];
        uint16_t *rows = malloc((size_t)x->n_bytes);
        moe_gen_tensor_fill(x, rows, (size_t)x->n_bytes, 0);
        for (int r = 0; r < 512; r++) {
            int nonzero = 0;
            for (int c = 0; c < 64; c++)
                nonzero += rows[r * 64 + c] != 0;
            bool token = r < 100 || r == 300;
            cr_assert(token ? nonzero > 50 : nonzero == 0, "%s row %d: %d non-zero", x->name, r,
                      nonzero);
        }
        free(rows);
    }
    free(t);
}
