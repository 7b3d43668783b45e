/* moe-gen-model's presets (architecture-agnostic shapes) and how each --arch wires them. */
#include <stdio.h>
#include <string.h>
#include "tools/moe_gen_model/gen_model.h"

/* Real shapes are those of the published config.json files. */
/* clang-format off */
static const moe_gen_preset g_presets[] = {
    {.name = "tiny",
     .about = "a few hundred KB: the default model of the demo and the tests",
     .native_arch = -1,
     .hidden = 64, .layers = 2, .heads = 4, .kv_heads = 2, .head_dim = 0,
     .experts = 8, .top_k = 2, .moe_ffn = 64, .dense_ffn = 128, .shared_ffn = 128,
     .vocab = 512, .max_pos = 4096, .rope_theta = 10000.0, .rms_eps = 1e-6,
     .norm_topk_prob = -1, .qwen2_dense_layers = 1},
    {.name = "small",
     .about = "~200-260 MB in bf16: the benchmark model",
     .native_arch = -1,
     .hidden = 768, .layers = 6, .heads = 12, .kv_heads = 4, .head_dim = 0,
     .experts = 16, .top_k = 4, .moe_ffn = 384, .dense_ffn = 2048, .shared_ffn = 1536,
     .vocab = 8192, .max_pos = 8192, .rope_theta = 1000000.0, .rms_eps = 1e-6,
     .norm_topk_prob = -1, .qwen2_dense_layers = 0},
    {.name = "olmoe-1b-7b",
     .about = "allenai/OLMoE-1B-7B-0924",
     .native_arch = MOE_ARCH_OLMOE,
     .hidden = 2048, .layers = 16, .heads = 16, .kv_heads = 16, .head_dim = 0,
     .experts = 64, .top_k = 8, .moe_ffn = 1024, .dense_ffn = 1024, .shared_ffn = 0,
     .vocab = 50304, .max_pos = 4096, .rope_theta = 10000.0, .rms_eps = 1e-5,
     .norm_topk_prob = 0, .qwen2_dense_layers = 0},
    {.name = "qwen1.5-moe-a2.7b",
     .about = "Qwen/Qwen1.5-MoE-A2.7B",
     .native_arch = MOE_ARCH_QWEN2_MOE,
     .hidden = 2048, .layers = 24, .heads = 16, .kv_heads = 16, .head_dim = 0,
     .experts = 60, .top_k = 4, .moe_ffn = 1408, .dense_ffn = 5632, .shared_ffn = 5632,
     .vocab = 151936, .max_pos = 8192, .rope_theta = 1000000.0, .rms_eps = 1e-6,
     .norm_topk_prob = 0, .qwen2_dense_layers = 0},
    {.name = "qwen3-30b-a3b",
     .about = "Qwen/Qwen3-30B-A3B",
     .native_arch = MOE_ARCH_QWEN3_MOE,
     .hidden = 2048, .layers = 48, .heads = 32, .kv_heads = 4, .head_dim = 128,
     .experts = 128, .top_k = 8, .moe_ffn = 768, .dense_ffn = 6144, .shared_ffn = 0,
     .vocab = 151936, .max_pos = 40960, .rope_theta = 1000000.0, .rms_eps = 1e-6,
     .norm_topk_prob = 1, .qwen2_dense_layers = 0},
    {.name = "mixtral-8x7b",
     .about = "mistralai/Mixtral-8x7B-v0.1",
     .native_arch = MOE_ARCH_MIXTRAL,
     .hidden = 4096, .layers = 32, .heads = 32, .kv_heads = 8, .head_dim = 0,
     .experts = 8, .top_k = 2, .moe_ffn = 14336, .dense_ffn = 14336, .shared_ffn = 0,
     .vocab = 32000, .max_pos = 32768, .rope_theta = 1000000.0, .rms_eps = 1e-5,
     .norm_topk_prob = 1, .qwen2_dense_layers = 0},
};
/* clang-format on */

int moe_gen_preset_count(void)
{
    return (int)(sizeof g_presets / sizeof g_presets[0]);
}

const moe_gen_preset *moe_gen_preset_at(int i)
{
    return i >= 0 && i < moe_gen_preset_count() ? &g_presets[i] : NULL;
}

const moe_gen_preset *moe_gen_preset_find(const char *name)
{
    for (int i = 0; i < moe_gen_preset_count(); i++)
        if (strcmp(g_presets[i].name, name) == 0)
            return &g_presets[i];
    return NULL;
}

static const char *const g_arch_flags[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = "mixtral",
    [MOE_ARCH_QWEN2_MOE] = "qwen2_moe",
    [MOE_ARCH_OLMOE] = "olmoe",
    [MOE_ARCH_QWEN3_MOE] = "qwen3_moe",
};

bool moe_gen_arch_parse(const char *name, moe_arch *out)
{
    for (int a = 0; a < MOE_ARCH_COUNT; a++) {
        if (strcmp(name, g_arch_flags[a]) == 0) {
            *out = (moe_arch)a;
            return true;
        }
    }
    return false;
}

const char *moe_gen_arch_flag(moe_arch a)
{
    return (int)a >= 0 && a < MOE_ARCH_COUNT ? g_arch_flags[a] : "?";
}

moe_status moe_gen_spec_build(moe_arch arch, const moe_gen_preset *p, int n_layers, moe_dtype dtype,
                              uint64_t seed, moe_gen_spec *s)
{
    if (!p)
        return moe_error(MOE_ERR_INVALID_ARG, "--preset: no preset given");
    if ((int)arch < 0 || arch >= MOE_ARCH_COUNT)
        return moe_error(MOE_ERR_INVALID_ARG, "--arch: unknown architecture %d", (int)arch);
    if (dtype != MOE_DT_BF16 && dtype != MOE_DT_F32)
        return moe_error(MOE_ERR_INVALID_ARG, "--dtype: only bf16 and f32 are supported");
    if (n_layers < 0 || n_layers > MOE_MAX_LAYERS)
        return moe_error(MOE_ERR_INVALID_ARG, "--layers: %d is outside 1..%d", n_layers,
                         MOE_MAX_LAYERS);
    memset(s, 0, sizeof *s);
    s->arch = arch;
    s->preset = p;
    s->dtype = dtype;
    s->seed = seed;
    s->hidden = p->hidden;
    s->n_layers = n_layers > 0 ? n_layers : p->layers;
    s->heads = p->heads;
    s->kv_heads = p->kv_heads;
    s->head_dim = p->head_dim > 0 ? p->head_dim : p->hidden / p->heads;
    s->experts = p->experts;
    s->top_k = p->top_k;
    s->moe_ffn = p->moe_ffn;
    s->dense_ffn = p->dense_ffn;
    s->shared_ffn = 0;
    s->vocab = p->vocab;
    s->max_pos = p->max_pos;
    s->rope_theta = p->rope_theta;
    s->rms_eps = p->rms_eps;
    s->decoder_sparse_step = 1;

    switch (arch) {
    case MOE_ARCH_MIXTRAL:
        s->norm_topk_prob = true; /* Mixtral always renormalises; not a config field */
        s->write_head_dim = true;
        s->tok_family = MOE_GEN_TOK_SP;
        break;
    case MOE_ARCH_QWEN2_MOE:
        s->norm_topk_prob = p->norm_topk_prob < 0 ? false : p->norm_topk_prob != 0;
        s->qkv_bias = true;
        s->shared_ffn = p->shared_ffn > 0 ? p->shared_ffn : 4 * p->moe_ffn;
        /* Qwen2MoeAttention reads an optional head_dim; only written when it is not d/heads. */
        s->write_head_dim = s->head_dim * s->heads != s->hidden;
        for (int i = 0; i < p->qwen2_dense_layers && i < s->n_layers; i++)
            s->mlp_only[s->n_mlp_only++] = i;
        s->tok_family = MOE_GEN_TOK_QWEN2;
        break;
    case MOE_ARCH_OLMOE:
        s->norm_topk_prob = p->norm_topk_prob < 0 ? false : p->norm_topk_prob != 0;
        /* OLMoE's q_norm spans hidden_size, so its attention only works with head_dim = d/heads. */
        s->head_dim = p->hidden / p->heads;
        s->qk_norm = 1;
        s->tok_family = MOE_GEN_TOK_GPT2;
        break;
    case MOE_ARCH_QWEN3_MOE:
        s->norm_topk_prob = p->norm_topk_prob < 0 ? true : p->norm_topk_prob != 0;
        s->qk_norm = 2;
        s->write_head_dim = true;
        s->tok_family = MOE_GEN_TOK_QWEN2;
        break;
    default:
        return moe_error(MOE_ERR_INVALID_ARG, "--arch: unknown architecture %d", (int)arch);
    }
    for (int l = 0; l < s->n_layers; l++) {
        bool dense = false;
        for (int k = 0; k < s->n_mlp_only; k++)
            dense = dense || s->mlp_only[k] == l;
        s->layer_is_moe[l] = !dense && (l + 1) % s->decoder_sparse_step == 0;
    }
    if (s->heads <= 0 || s->kv_heads <= 0 || s->heads % s->kv_heads != 0)
        return moe_error(MOE_ERR_INVALID_ARG, "preset %s: heads %d not a multiple of kv_heads %d",
                         p->name, s->heads, s->kv_heads);
    if (s->top_k > s->experts)
        return moe_error(MOE_ERR_INVALID_ARG, "preset %s: top_k %d > experts %d", p->name, s->top_k,
                         s->experts);
    return MOE_OK;
}

void moe_gen_spec_set_tokens(moe_gen_spec *s, const moe_gen_tokenizer *t)
{
    s->tok_rows = t->n_vocab;
    s->n_tok_extra = 0;
    for (int i = 0; i < t->n_special && s->n_tok_extra < 4; i++)
        if (t->special[i].id >= t->n_vocab)
            s->tok_extra[s->n_tok_extra++] = t->special[i].id;
}

static uint64_t mlp_params(uint64_t d, uint64_t ffn)
{
    return 3 * d * ffn;
}

uint64_t moe_gen_spec_params(const moe_gen_spec *s)
{
    uint64_t d = (uint64_t)s->hidden, q = (uint64_t)s->heads * (uint64_t)s->head_dim,
             kv = (uint64_t)s->kv_heads * (uint64_t)s->head_dim;
    uint64_t total = 2 * (uint64_t)s->vocab * d + d; /* embed, lm_head, final norm */
    for (int l = 0; l < s->n_layers; l++) {
        uint64_t n = 2 * d * q + 2 * d * kv + 2 * d; /* q k v o, two norms */
        if (s->qkv_bias)
            n += q + 2 * kv;
        if (s->qk_norm == 1)
            n += q + kv;
        else if (s->qk_norm == 2)
            n += 2 * (uint64_t)s->head_dim;
        if (s->layer_is_moe[l]) {
            n += (uint64_t)s->experts * d +
                 (uint64_t)s->experts * mlp_params(d, (uint64_t)s->moe_ffn);
            if (s->shared_ffn > 0)
                n += mlp_params(d, (uint64_t)s->shared_ffn) + d;
        } else {
            n += mlp_params(d, (uint64_t)s->dense_ffn);
        }
        total += n;
    }
    return total;
}

static void human(double bytes, char *buf, size_t cap)
{
    const char *u[] = {"B", "KB", "MB", "GB", "TB"};
    int i = 0;
    while (bytes >= 1000.0 && i < 4) {
        bytes /= 1000.0;
        i++;
    }
    snprintf(buf, cap, "%.1f %s", bytes, u[i]);
}

void moe_gen_list_presets(FILE *f)
{
    fprintf(f, "Presets (shapes; --arch picks the wiring, --layers N shortens any of them):\n\n");
    fprintf(f, "%-18s %5s %6s %10s %9s %13s %7s  %s\n", "preset", "d", "layers", "heads/kv/hd",
            "experts", "ffn moe/dense", "vocab", "bf16 size per --arch");
    for (int i = 0; i < moe_gen_preset_count(); i++) {
        const moe_gen_preset *p = &g_presets[i];
        char heads[32], experts[32], ffn[32];
        snprintf(heads, sizeof heads, "%d/%d/%d", p->heads, p->kv_heads,
                 p->head_dim ? p->head_dim : p->hidden / p->heads);
        snprintf(experts, sizeof experts, "%d top-%d", p->experts, p->top_k);
        snprintf(ffn, sizeof ffn, "%d/%d", p->moe_ffn, p->dense_ffn);
        fprintf(f, "%-18s %5d %6d %10s %9s %13s %7d ", p->name, p->hidden, p->layers, heads,
                experts, ffn, p->vocab);
        for (int a = 0; a < MOE_ARCH_COUNT; a++) {
            moe_gen_spec s;
            char sz[32];
            if (moe_gen_spec_build((moe_arch)a, p, 0, MOE_DT_BF16, 0, &s) != MOE_OK)
                continue;
            human(2.0 * (double)moe_gen_spec_params(&s), sz, sizeof sz);
            fprintf(f, " %s%s=%s", a == p->native_arch ? "*" : "", g_arch_flags[a], sz);
        }
        fprintf(f, "\n%-18s %s\n", "", p->about);
    }
    fprintf(
        f,
        "\n* marks the architecture a real-model preset copies. Any preset works with any --arch:\n"
        "  - mixtral: per-expert ffn = the moe ffn; no dense layers, no shared expert.\n"
        "  - qwen2_moe: shared expert of the preset's size (4 x moe ffn if it has none), q/k/v\n"
        "    biases; tiny makes layer 0 dense (mlp_only_layers=[0]).\n"
        "  - olmoe: head_dim is forced to d/heads (its q_norm spans hidden_size).\n"
        "  - qwen3_moe: per-head q_norm/k_norm; head_dim as the preset says.\n"
        "  Special tokens take their real ids when the vocab is large enough for them (Qwen\n"
        "  151643.., OLMoE 50279), else the ids right after the trained tokenizer vocabulary.\n");
}
