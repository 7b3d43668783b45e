/* Tests for moe_model_load: tiny models of all four architectures written with moe_st_write_file,
 * loaded and checked; then every broken model directory we must refuse, with a precise message. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/unit/test_util.h"
#include "worker/model.h"

enum { V = 64, D = 32, L = 3, H = 4, KV = 2, E = 4, K = 2, FFN = 16, DENSE = 48, SHARED = 24 };

static char dir[256];


static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/moe-model-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void)
{
    moe_test_rm_rf(dir);
}

TestSuite(model_load, .init = setup, .fini = teardown, .timeout = 60);

/* ---- a tiny-model generator (independent of model.c: names spelled out from the HF layout) ----
 */

typedef struct {
    char name[128];
    moe_dtype dt;
    int nd;
    int64_t shape[2];
    int seed;
} spec;

typedef struct {
    spec t[512];
    int n;
} spec_list;

typedef struct {
    moe_dtype mat_dt, vec_dt;
    const char *drop;    /* tensor left out */
    const char *reshape; /* tensor whose dims are swapped */
    int shards;          /* 0/1: model.safetensors; else model-0000i-of-0000n + index */
    bool tie;
    int expert_limit; /* write only experts < this (0: all) */
} gen_opts;

static void add(spec_list *s, moe_dtype dt, int nd, int64_t r, int64_t c, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static void add(spec_list *s, moe_dtype dt, int nd, int64_t r, int64_t c, const char *fmt, ...)
{
    cr_assert_lt(s->n, 512);
    spec *t = &s->t[s->n];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->dt = dt;
    t->nd = nd;
    t->shape[0] = r;
    t->shape[1] = c;
    t->seed = s->n + 1;
    s->n++;
}

static int head_dim_of(moe_arch a)
{
    return a == MOE_ARCH_QWEN3_MOE ? 16 : D / H;
}
static bool layer_moe(moe_arch a, int l)
{
    /* the configs below: Qwen2-MoE mlp_only_layers [1], Qwen3-MoE decoder_sparse_step 1 and
     * mlp_only_layers [0]; Mixtral/OLMoE all MoE */
    if (a == MOE_ARCH_QWEN2_MOE)
        return l != 1;
    if (a == MOE_ARCH_QWEN3_MOE)
        return l != 0;
    return true;
}

static void specs_for(moe_arch a, const gen_opts *o, spec_list *s)
{
    const moe_dtype m = o->mat_dt, v = o->vec_dt;
    const int hd = head_dim_of(a), qd = H * hd, kvd = KV * hd;
    s->n = 0;
    add(s, m, 2, V, D, "model.embed_tokens.weight");
    add(s, v, 1, D, 0, "model.norm.weight");
    if (!o->tie)
        add(s, m, 2, V, D, "lm_head.weight");
    for (int l = 0; l < L; l++) {
        add(s, v, 1, D, 0, "model.layers.%d.input_layernorm.weight", l);
        add(s, v, 1, D, 0, "model.layers.%d.post_attention_layernorm.weight", l);
        add(s, m, 2, qd, D, "model.layers.%d.self_attn.q_proj.weight", l);
        add(s, m, 2, kvd, D, "model.layers.%d.self_attn.k_proj.weight", l);
        add(s, m, 2, kvd, D, "model.layers.%d.self_attn.v_proj.weight", l);
        add(s, m, 2, D, qd, "model.layers.%d.self_attn.o_proj.weight", l);
        if (a == MOE_ARCH_QWEN2_MOE) {
            add(s, v, 1, qd, 0, "model.layers.%d.self_attn.q_proj.bias", l);
            add(s, v, 1, kvd, 0, "model.layers.%d.self_attn.k_proj.bias", l);
            add(s, v, 1, kvd, 0, "model.layers.%d.self_attn.v_proj.bias", l);
        }
        if (a == MOE_ARCH_OLMOE) {
            add(s, v, 1, qd, 0, "model.layers.%d.self_attn.q_norm.weight", l);
            add(s, v, 1, kvd, 0, "model.layers.%d.self_attn.k_norm.weight", l);
        }
        if (a == MOE_ARCH_QWEN3_MOE) {
            add(s, v, 1, hd, 0, "model.layers.%d.self_attn.q_norm.weight", l);
            add(s, v, 1, hd, 0, "model.layers.%d.self_attn.k_norm.weight", l);
        }
        if (!layer_moe(a, l)) {
            add(s, m, 2, DENSE, D, "model.layers.%d.mlp.gate_proj.weight", l);
            add(s, m, 2, DENSE, D, "model.layers.%d.mlp.up_proj.weight", l);
            add(s, m, 2, D, DENSE, "model.layers.%d.mlp.down_proj.weight", l);
            continue;
        }
        int n_exp = o->expert_limit ? o->expert_limit : E;
        if (a == MOE_ARCH_MIXTRAL) {
            add(s, m, 2, E, D, "model.layers.%d.block_sparse_moe.gate.weight", l);
            for (int e = 0; e < n_exp; e++) {
                add(s, m, 2, FFN, D, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e);
                add(s, m, 2, D, FFN, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e);
                add(s, m, 2, FFN, D, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e);
            }
            continue;
        }
        add(s, m, 2, E, D, "model.layers.%d.mlp.gate.weight", l);
        for (int e = 0; e < n_exp; e++) {
            add(s, m, 2, FFN, D, "model.layers.%d.mlp.experts.%d.gate_proj.weight", l, e);
            add(s, m, 2, FFN, D, "model.layers.%d.mlp.experts.%d.up_proj.weight", l, e);
            add(s, m, 2, D, FFN, "model.layers.%d.mlp.experts.%d.down_proj.weight", l, e);
        }
        if (a == MOE_ARCH_QWEN2_MOE) {
            add(s, m, 2, SHARED, D, "model.layers.%d.mlp.shared_expert.gate_proj.weight", l);
            add(s, m, 2, SHARED, D, "model.layers.%d.mlp.shared_expert.up_proj.weight", l);
            add(s, m, 2, D, SHARED, "model.layers.%d.mlp.shared_expert.down_proj.weight", l);
            add(s, m, 2, 1, D, "model.layers.%d.mlp.shared_expert_gate.weight", l);
        }
    }
}

/* Value of element i of the tensor with this seed: small, exact in BF16 and F16. */
static float value_of(int seed, size_t i)
{
    return (float)((int)((seed * 31 + i * 7) % 17) - 8) / 8.0f;
}

typedef struct {
    int seed;
    moe_dtype dt;
} fill_ctx;

static void fill(void *ctx, void *dst, size_t n_bytes, size_t offset)
{
    const fill_ctx *f = ctx;
    size_t es = f->dt == MOE_DT_F32 ? 4 : 2;
    for (size_t k = 0; k < n_bytes / es; k++) {
        float x = value_of(f->seed, offset / es + k);
        if (f->dt == MOE_DT_F32)
            ((float *)dst)[k] = x;
        else
            ((uint16_t *)dst)[k] = f->dt == MOE_DT_BF16 ? moe_f32_to_bf16(x) : moe_f32_to_f16(x);
    }
}

static void write_text(const char *name, const char *text)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

static void write_config(moe_arch a, bool tie)
{
    char cfg[2048];
    const char *arch_fields = "";
    switch (a) {
    case MOE_ARCH_MIXTRAL:
        arch_fields = "\"architectures\":[\"MixtralForCausalLM\"],\"intermediate_size\":16,"
                      "\"num_local_experts\":4,\"sliding_window\":null,\"rope_theta\":1000000.0,";
        break;
    case MOE_ARCH_QWEN2_MOE:
        arch_fields = "\"architectures\":[\"Qwen2MoeForCausalLM\"],\"intermediate_size\":48,"
                      "\"moe_intermediate_size\":16,\"shared_expert_intermediate_size\":24,"
                      "\"num_experts\":4,\"mlp_only_layers\":[1],\"decoder_sparse_step\":1,";
        break;
    case MOE_ARCH_OLMOE:
        arch_fields = "\"architectures\":[\"OlmoeForCausalLM\"],\"intermediate_size\":16,"
                      "\"num_experts\":4,\"clip_qkv\":null,\"attention_bias\":false,";
        break;
    case MOE_ARCH_QWEN3_MOE:
        arch_fields = "\"architectures\":[\"Qwen3MoeForCausalLM\"],\"intermediate_size\":48,"
                      "\"moe_intermediate_size\":16,\"num_local_experts\":4,\"head_dim\":16,"
                      "\"mlp_only_layers\":[0],\"norm_topk_prob\":true,"
                      "\"rope_parameters\":{\"rope_theta\":1000000.0,\"rope_type\":\"default\"},";
        break;
    default:
        cr_assert_fail("bad arch");
    }
    snprintf(cfg, sizeof cfg,
             "{%s\"vocab_size\":64,\"hidden_size\":32,\"num_hidden_layers\":3,"
             "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"num_experts_per_tok\":2,"
             "\"hidden_act\":\"silu\",\"max_position_embeddings\":256,\"rms_norm_eps\":1e-06,"
             "\"tie_word_embeddings\":%s,\"bos_token_id\":1,\"eos_token_id\":2}",
             arch_fields, tie ? "true" : "false");
    write_text("config.json", cfg);
    write_text("generation_config.json", "{\"bos_token_id\":1,\"eos_token_id\":[2,3]}");
}

/* Empties the model directory so a test can write a different model into it. */
static void clear_dir(void)
{
    DIR *d = opendir(dir);
    cr_assert_not_null(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
}

static void write_model(moe_arch a, const gen_opts *o)
{
    static spec_list s; /* big: keep it off the stack */
    clear_dir();
    specs_for(a, o, &s);
    write_config(a, o->tie);
    static moe_st_write_tensor w[512];
    static fill_ctx fc[512];
    int n = 0;
    for (int i = 0; i < s.n; i++) {
        if (o->drop && strcmp(s.t[i].name, o->drop) == 0)
            continue;
        moe_st_write_tensor *t = &w[n];
        memset(t, 0, sizeof *t);
        t->name = s.t[i].name;
        t->dtype = s.t[i].dt;
        t->n_dims = s.t[i].nd;
        t->shape[0] = s.t[i].shape[0];
        t->shape[1] = s.t[i].shape[1];
        if (o->reshape && strcmp(s.t[i].name, o->reshape) == 0) {
            t->shape[0] = s.t[i].shape[1];
            t->shape[1] = s.t[i].shape[0];
        }
        fc[n].seed = s.t[i].seed;
        fc[n].dt = s.t[i].dt;
        t->fill = fill;
        t->fill_ctx = &fc[n];
        n++;
    }
    char path[512];
    if (o->shards <= 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        cr_assert_eq(moe_st_write_file(path, w, n, "{\"format\":\"pt\"}"), MOE_OK, "%s",
                     moe_error_message());
        return;
    }
    /* shard i gets tensors [i*n/shards, (i+1)*n/shards) */
    static char index[65536];
    size_t k = (size_t)snprintf(index, sizeof index, "{\"metadata\":{},\"weight_map\":{");
    bool first = true;
    for (int sh = 0; sh < o->shards; sh++) {
        int b = sh * n / o->shards, e = (sh + 1) * n / o->shards;
        char fname[64];
        snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", sh + 1, o->shards);
        snprintf(path, sizeof path, "%s/%s", dir, fname);
        cr_assert_eq(moe_st_write_file(path, w + b, e - b, NULL), MOE_OK, "%s",
                     moe_error_message());
        for (int i = b; i < e; i++) {
            k += (size_t)snprintf(index + k, sizeof index - k, "%s\"%s\":\"%s\"", first ? "" : ",",
                                  w[i].name, fname);
            first = false;
        }
    }
    snprintf(index + k, sizeof index - k, "}}");
    write_text("model.safetensors.index.json", index);
}

static moe_model *load_ok(const moe_model_load_opts *opts)
{
    moe_model *m = NULL;
    moe_status s = moe_model_load(dir, opts, &m);
    cr_assert_eq(s, MOE_OK, "%s", moe_error_message());
    cr_assert_not_null(m);
    return m;
}

static void expect_load_error(moe_status st, const char *a, const char *b)
{
    moe_model *m = (moe_model *)(uintptr_t)0x1;
    moe_status s = moe_model_load(dir, NULL, &m);
    cr_assert_eq(s, st, "status %s, expected %s: %s", moe_status_name(s), moe_status_name(st),
                 moe_error_message());
    cr_assert_eq(m, (moe_model *)(uintptr_t)0x1, "*out must be untouched on error");
    cr_assert(strstr(moe_error_message(), a), "message lacks \"%s\": %s", a, moe_error_message());
    cr_assert(strstr(moe_error_message(), b), "message lacks \"%s\": %s", b, moe_error_message());
}

/* Element 0..n of a weight as float, whatever its dtype. */
static float weight_at(const moe_weight *w, size_t i)
{
    if (w->dtype == MOE_DT_F32)
        return ((const float *)w->data)[i];
    uint16_t h = ((const uint16_t *)w->data)[i];
    return w->dtype == MOE_DT_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
}

static int seed_of(moe_arch a, const gen_opts *o, const char *name)
{
    static spec_list s;
    specs_for(a, o, &s);
    for (int i = 0; i < s.n; i++)
        if (strcmp(s.t[i].name, name) == 0)
            return s.t[i].seed;
    cr_assert_fail("no tensor %s", name);
    return 0;
}

/* Checks every binding of a loaded model against the generator's layout and values. */
static void check_model(const moe_model *m, moe_arch a, const gen_opts *o, int eb, int ee)
{
    const moe_model_config *c = &m->cfg;
    const int hd = head_dim_of(a);
    cr_assert_eq(c->arch, a);
    cr_assert_eq(c->head_dim, hd);
    cr_assert_eq(c->n_eos, 2, "eos from generation_config.json");
    cr_assert_eq(c->eos_ids[1], 3);
    cr_assert_str_eq(m->dir, dir);
    cr_assert_eq(m->expert_begin, eb);
    cr_assert_eq(m->expert_end, ee);
    cr_assert_eq(m->embed.rows, V);
    cr_assert_eq(m->embed.cols, D);
    cr_assert_eq(m->embed.dtype, o->mat_dt);
    cr_assert_eq(weight_at(&m->embed, 5), value_of(seed_of(a, o, "model.embed_tokens.weight"), 5));
    cr_assert_eq(m->final_norm[3], value_of(seed_of(a, o, "model.norm.weight"), 3));
    if (o->tie) {
        cr_assert_eq(m->lm_head.data, m->embed.data);
    } else {
        cr_assert_neq(m->lm_head.data, m->embed.data);
        cr_assert_eq(weight_at(&m->lm_head, V * D - 1),
                     value_of(seed_of(a, o, "lm_head.weight"), V * D - 1));
    }
    /* matrices are zero-copy: they point at the safetensors data */
    const moe_st_tensor *t = moe_st_find(m->st, "model.layers.0.self_attn.q_proj.weight");
    cr_assert_not_null(t);
    cr_assert_eq(m->layers[0].wq.data, t->data);

    char name[160];
    for (int l = 0; l < L; l++) {
        const moe_layer_weights *lw = &m->layers[l];
        cr_assert_eq(lw->wq.rows, H * hd);
        cr_assert_eq(lw->wq.cols, D);
        cr_assert_eq(lw->wk.rows, KV * hd);
        cr_assert_eq(lw->wo.rows, D);
        cr_assert_eq(lw->wo.cols, H * hd);
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        cr_assert_eq(lw->ffn_norm[D - 1], value_of(seed_of(a, o, name), D - 1));
        snprintf(name, sizeof name, "model.layers.%d.self_attn.v_proj.weight", l);
        cr_assert_eq(weight_at(&lw->wv, 17), value_of(seed_of(a, o, name), 17));
        if (a == MOE_ARCH_QWEN2_MOE) {
            snprintf(name, sizeof name, "model.layers.%d.self_attn.k_proj.bias", l);
            cr_assert_not_null(lw->bk);
            cr_assert_eq(lw->bk[KV * hd - 1], value_of(seed_of(a, o, name), KV * hd - 1));
        } else {
            cr_assert_null(lw->bq);
        }
        if (a == MOE_ARCH_OLMOE || a == MOE_ARCH_QWEN3_MOE) {
            int kn = a == MOE_ARCH_OLMOE ? KV * hd : hd;
            snprintf(name, sizeof name, "model.layers.%d.self_attn.k_norm.weight", l);
            cr_assert_eq(lw->k_norm[kn - 1], value_of(seed_of(a, o, name), kn - 1));
            cr_assert_not_null(lw->q_norm);
        } else {
            cr_assert_null(lw->q_norm);
        }
        cr_assert_eq(lw->is_moe, layer_moe(a, l));
        if (!lw->is_moe) {
            cr_assert_eq(lw->mlp_down.rows, D);
            cr_assert_eq(lw->mlp_down.cols, DENSE);
            snprintf(name, sizeof name, "model.layers.%d.mlp.up_proj.weight", l);
            cr_assert_eq(weight_at(&lw->mlp_up, 100), value_of(seed_of(a, o, name), 100));
            cr_assert_null(lw->exp_gate);
            continue;
        }
        cr_assert_eq(lw->router.rows, E);
        for (int e = 0; e < E; e++) {
            if (e < eb || e >= ee) {
                cr_assert_null(lw->exp_gate[e].data, "expert %d is not this rank's", e);
                cr_assert_null(lw->exp_down[e].data);
                continue;
            }
            cr_assert_eq(lw->exp_gate[e].rows, FFN);
            cr_assert_eq(lw->exp_down[e].cols, FFN);
            snprintf(name, sizeof name,
                     a == MOE_ARCH_MIXTRAL ? "model.layers.%d.block_sparse_moe.experts.%d.w3.weight"
                                           : "model.layers.%d.mlp.experts.%d.up_proj.weight",
                     l, e);
            cr_assert_eq(weight_at(&lw->exp_up[e], 33), value_of(seed_of(a, o, name), 33), "%s",
                         name);
        }
        if (a == MOE_ARCH_QWEN2_MOE) {
            cr_assert_eq(lw->sh_down.cols, SHARED);
            cr_assert_eq(lw->sh_expert_gate.rows, 1);
            cr_assert_eq(lw->sh_expert_gate.cols, D);
        } else {
            cr_assert_null(lw->sh_gate.data);
        }
    }
}

static size_t expected_bytes(moe_arch a, const gen_opts *o, int eb, int ee)
{
    static spec_list s;
    specs_for(a, o, &s);
    size_t total = 0;
    for (int i = 0; i < s.n; i++) {
        const char *p = strstr(s.t[i].name, ".experts.");
        if (p && (atoi(p + 9) < eb || atoi(p + 9) >= ee))
            continue;
        total += (size_t)s.t[i].shape[0] * (size_t)(s.t[i].nd == 2 ? s.t[i].shape[1] : 1) *
                 (s.t[i].dt == MOE_DT_F32 ? 4 : 2);
    }
    return total;
}

static void round_trip(moe_arch a, gen_opts o)
{
    write_model(a, &o);
    moe_model *m = load_ok(NULL);
    check_model(m, a, &o, 0, E);
    cr_assert_eq(moe_model_weight_bytes(m), expected_bytes(a, &o, 0, E));
    moe_model_free(m);
}

Test(model_load, mixtral_bf16)
{
    round_trip(MOE_ARCH_MIXTRAL, (gen_opts){.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16});
}
Test(model_load, qwen2_moe_f32)
{
    round_trip(MOE_ARCH_QWEN2_MOE, (gen_opts){.mat_dt = MOE_DT_F32, .vec_dt = MOE_DT_F32});
}
Test(model_load, olmoe_f16)
{
    round_trip(MOE_ARCH_OLMOE, (gen_opts){.mat_dt = MOE_DT_F16, .vec_dt = MOE_DT_BF16});
}
Test(model_load, qwen3_moe_tied_sharded)
{
    round_trip(MOE_ARCH_QWEN3_MOE,
               (gen_opts){.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_F32, .tie = true, .shards = 3});
}
Test(model_load, mixtral_sharded)
{
    round_trip(MOE_ARCH_MIXTRAL,
               (gen_opts){.mat_dt = MOE_DT_F16, .vec_dt = MOE_DT_F16, .shards = 2});
}

Test(model_load, expert_range_binds_only_its_experts)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16};
    write_model(MOE_ARCH_QWEN2_MOE, &o);
    moe_model_load_opts lo = {.expert_begin = 1, .expert_end = 3};
    moe_model *m = load_ok(&lo);
    check_model(m, MOE_ARCH_QWEN2_MOE, &o, 1, 3);
    size_t part = moe_model_weight_bytes(m);
    cr_assert_eq(part, expected_bytes(MOE_ARCH_QWEN2_MOE, &o, 1, 3));
    cr_assert_lt(part, expected_bytes(MOE_ARCH_QWEN2_MOE, &o, 0, E));
    moe_model_free(m);

    /* experts outside the range are never looked at: a file without them loads */
    gen_opts half = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16, .expert_limit = 2};
    write_model(MOE_ARCH_MIXTRAL, &half);
    lo = (moe_model_load_opts){.expert_begin = 0, .expert_end = 2};
    m = load_ok(&lo);
    check_model(m, MOE_ARCH_MIXTRAL, &half, 0, 2);
    moe_model_free(m);
    /* but all experts are required by default */
    expect_load_error(MOE_ERR_NOT_FOUND, "model.layers.0.block_sparse_moe.experts.2.w1.weight",
                      "missing");

    lo = (moe_model_load_opts){.expert_begin = 3, .expert_end = 5};
    moe_model *bad = NULL;
    cr_assert_eq(moe_model_load(dir, &lo, &bad), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "expert range [3, 5)"), "%s", moe_error_message());
    cr_assert_null(bad);
}

Test(model_load, refuses_wrong_shape)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16,
                  .vec_dt = MOE_DT_BF16,
                  .shards = 3,
                  .reshape = "model.layers.2.mlp.experts.3.up_proj.weight"};
    write_model(MOE_ARCH_OLMOE, &o);
    expect_load_error(
        MOE_ERR_FORMAT,
        "/model-00003-of-00003.safetensors: tensor model.layers.2.mlp.experts.3.up_proj.weight",
        "has shape [32, 16], expected [16, 32]");
    gen_opts v = {.mat_dt = MOE_DT_BF16,
                  .vec_dt = MOE_DT_BF16,
                  .reshape = "model.layers.1.self_attn.q_norm.weight"};
    write_model(MOE_ARCH_QWEN3_MOE, &v);
    /* a 1-D tensor "reshaped" becomes [0] (an empty tensor): still refused by its shape */
    expect_load_error(MOE_ERR_FORMAT,
                      "model.safetensors: tensor model.layers.1.self_attn.q_norm.weight",
                      "expected [16]");
}

Test(model_load, refuses_missing_tensor)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16,
                  .vec_dt = MOE_DT_BF16,
                  .drop = "model.layers.0.mlp.shared_expert_gate.weight"};
    write_model(MOE_ARCH_QWEN2_MOE, &o);
    expect_load_error(MOE_ERR_NOT_FOUND, dir,
                      "tensor model.layers.0.mlp.shared_expert_gate.weight is missing");
    gen_opts p = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16, .drop = "lm_head.weight"};
    write_model(MOE_ARCH_MIXTRAL, &p);
    expect_load_error(MOE_ERR_NOT_FOUND, dir, "tensor lm_head.weight is missing");
    gen_opts q = {.mat_dt = MOE_DT_BF16,
                  .vec_dt = MOE_DT_BF16,
                  .drop = "model.layers.2.self_attn.v_proj.bias"};
    write_model(MOE_ARCH_QWEN2_MOE, &q);
    expect_load_error(MOE_ERR_NOT_FOUND, dir,
                      "tensor model.layers.2.self_attn.v_proj.bias is missing");
}

/* Replaces `from` with `to` (same length) in the file's header. */
static void patch(const char *file, const char *from, const char *to)
{
    cr_assert_eq(strlen(from), strlen(to));
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r+b");
    cr_assert_not_null(f);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    char *p = NULL;
    for (size_t i = 8; i + strlen(from) <= n && !p; i++)
        if (memcmp(buf + i, from, strlen(from)) == 0)
            p = buf + i;
    cr_assert_not_null(p, "test bug: \"%s\" not in %s", from, file);
    fseek(f, p - buf, SEEK_SET);
    fwrite(to, 1, strlen(to), f);
    fclose(f);
}

Test(model_load, refuses_wrong_dtype)
{
    gen_opts o = {.mat_dt = MOE_DT_F32, .vec_dt = MOE_DT_F32};
    write_model(MOE_ARCH_MIXTRAL, &o);
    patch("model.safetensors", "\"model.layers.1.self_attn.k_proj.weight\":{\"dtype\":\"F32\"",
          "\"model.layers.1.self_attn.k_proj.weight\":{\"dtype\":\"I32\"");
    expect_load_error(MOE_ERR_UNSUPPORTED,
                      "/model.safetensors: tensor model.layers.1.self_attn.k_proj.weight",
                      "dtype I32 is not supported");
    /* I64 in an F32 slot: 8 bytes per element no longer matches the byte range */
    write_model(MOE_ARCH_MIXTRAL, &o);
    patch("model.safetensors", "\"model.norm.weight\":{\"dtype\":\"F32\"",
          "\"model.norm.weight\":{\"dtype\":\"I64\"");
    expect_load_error(MOE_ERR_UNSUPPORTED, "/model.safetensors: tensor model.norm.weight", "I64");
}

Test(model_load, refuses_truncated_and_corrupt_files)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16, .shards = 2};
    write_model(MOE_ARCH_MIXTRAL, &o);
    char path[512];
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    cr_assert_eq(truncate(path, size - 100), 0);
    expect_load_error(MOE_ERR_FORMAT, "model-00002-of-00002.safetensors: tensor ",
                      "outside the data section");
    cr_assert_eq(truncate(path, 64), 0);
    expect_load_error(MOE_ERR_FORMAT, "model-00002-of-00002.safetensors: header length",
                      "runs past the end");

    write_model(MOE_ARCH_MIXTRAL, &o);
    patch("model-00001-of-00002.safetensors", "\"model.embed_tokens.weight\":{",
          "\"model.embed_tokens.weight\" {");
    expect_load_error(MOE_ERR_FORMAT, "model-00001-of-00002.safetensors", "not valid JSON");
}

Test(model_load, refuses_bad_offsets)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16};
    write_model(MOE_ARCH_OLMOE, &o);
    /* the writer lays tensors out in order: embed at [0, 4096), norm right after. Point the norm
     * (64 bytes) into the embedding. */
    patch("model.safetensors", "\"data_offsets\":[4096,4160]", "\"data_offsets\":[4000,4064]");
    expect_load_error(MOE_ERR_FORMAT, "model.safetensors: tensor model.norm.weight overlaps",
                      "model.embed_tokens.weight");
    write_model(MOE_ARCH_OLMOE, &o);
    patch("model.safetensors", "\"data_offsets\":[4096,4160]", "\"data_offsets\":[4096,9160]");
    expect_load_error(MOE_ERR_FORMAT, "model.safetensors: tensor model.norm.weight",
                      "data_offsets");
    write_model(MOE_ARCH_OLMOE, &o);
    patch("model.safetensors", "\"data_offsets\":[4096,4160]", "\"data_offsets\":[4096,4128]");
    expect_load_error(MOE_ERR_FORMAT, "model.safetensors: tensor model.norm.weight", "needs 64");
}

Test(model_load, refuses_bad_config)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16};
    write_model(MOE_ARCH_MIXTRAL, &o);
    char cfgpath[512];
    snprintf(cfgpath, sizeof cfgpath, "%s/config.json", dir);
    write_text("config.json", "{\"architectures\": [\"MixtralForCausalLM\"], \"vocab_size\": ");
    expect_load_error(MOE_ERR_FORMAT, cfgpath, "not valid JSON");
    write_text("config.json", "{\"architectures\": [\"DeepseekV3ForCausalLM\"]}");
    expect_load_error(MOE_ERR_UNSUPPORTED, cfgpath, "DeepseekV3ForCausalLM");
    write_config(MOE_ARCH_MIXTRAL, false);
    write_text("generation_config.json", "{\"eos_token_id\": {}}");
    char gpath[512];
    snprintf(gpath, sizeof gpath, "%s/generation_config.json", dir);
    expect_load_error(MOE_ERR_FORMAT, gpath, "eos_token_id");
    /* a config that disagrees with the weights: the shapes say so */
    write_model(MOE_ARCH_MIXTRAL, &o);
    patch("config.json", "\"intermediate_size\":16", "\"intermediate_size\":17");
    expect_load_error(MOE_ERR_FORMAT, "tensor model.layers.0.block_sparse_moe.experts.0.w1.weight",
                      "has shape [16, 32], expected [17, 32]");
}

Test(model_load, refuses_unsupported_rope_scaling)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16};
    write_model(MOE_ARCH_QWEN3_MOE, &o);
    patch("config.json", "\"rope_type\":\"default\"", "\"rope_type\":\"dynamic\"");
    char cfgpath[512];
    snprintf(cfgpath, sizeof cfgpath, "%s/config.json", dir);
    expect_load_error(MOE_ERR_UNSUPPORTED, cfgpath, "rope_parameters");
}

Test(model_load, refuses_broken_shard_index)
{
    gen_opts o = {.mat_dt = MOE_DT_BF16, .vec_dt = MOE_DT_BF16, .shards = 2};
    write_model(MOE_ARCH_QWEN2_MOE, &o);
    char p[512];
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", dir);
    cr_assert_eq(unlink(p), 0);
    expect_load_error(MOE_ERR_NOT_FOUND, "model-00002-of-00002.safetensors", "cannot open");

    write_model(MOE_ARCH_QWEN2_MOE, &o);
    patch("model.safetensors.index.json", "\"model.norm.weight\"", "\"model.norm.weighX\"");
    expect_load_error(MOE_ERR_NOT_FOUND, "tensor model.norm.weighX",
                      "model.safetensors.index.json");
}

Test(model_load, no_model_dir)
{
    moe_test_rm_rf(dir);
    cr_assert_not_null(mkdtemp(strcpy(dir, "/tmp/moe-model-XXXXXX")));
    expect_load_error(MOE_ERR_NOT_FOUND, dir, "config.json");
}
