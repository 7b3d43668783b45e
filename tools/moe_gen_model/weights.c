/* moe-gen-model's weights: the HF tensor list of each architecture, deterministic pseudo-random
 * values streamed into safetensors files, and HF-style sharding with its index file. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "tools/moe_gen_model/gen_model.h"
#include "worker/safetensors.h"

/* ---------- values ---------- */

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Element i of a tensor: splitmix64 at counter i of the tensor's stream, turned into an
 * approximately standard normal value as the sum of four 16-bit uniforms (Irwin-Hall, std 1,
 * bounded by +-3.46). Integer arithmetic plus one exact int->float conversion and one rounding
 * multiply: the same bits on every IEEE machine, no libm involved. */
static float element_value(const moe_gen_tensor *t, uint64_t i)
{
    uint64_t z = mix64(t->key + (i + 1) * 0x9e3779b97f4a7c15ull);
    int32_t s = (int32_t)(z & 0xffff) + (int32_t)((z >> 16) & 0xffff) +
                (int32_t)((z >> 32) & 0xffff) + (int32_t)(z >> 48) - 2 * 65535;
    /* sqrt(3) / 65536: the sum of four U(0,1) has variance 1/3 */
    float n = (float)s * (1.7320508f / 65536.0f);
    switch (t->init) {
    case MOE_GEN_INIT_NORM:
        return 1.0f + 0.1f * n;
    case MOE_GEN_INIT_BIAS:
    case MOE_GEN_INIT_NORMAL:
    default:
        return n * t->scale;
    }
}

static void encode(const moe_gen_tensor *t, float v, uint8_t out[4])
{
    if (t->dtype == MOE_DT_F32) {
        union {
            float f;
            uint32_t u;
        } c = {.f = v};
        for (int b = 0; b < 4; b++)
            out[b] = (uint8_t)(c.u >> (8 * b));
    } else {
        uint16_t h = moe_f32_to_bf16(v);
        out[0] = (uint8_t)h;
        out[1] = (uint8_t)(h >> 8);
    }
}

/* Whether vocab row r is a token of the tokenizer (else padding). */
static bool row_is_token(const moe_gen_spec *s, int64_t r)
{
    if (s->tok_rows <= 0 || r < s->tok_rows)
        return true;
    for (int i = 0; i < s->n_tok_extra; i++)
        if (s->tok_extra[i] == r)
            return true;
    return false;
}

void moe_gen_tensor_fill(void *fill_ctx, void *dst, size_t n_bytes, size_t offset)
{
    const moe_gen_tensor *t = fill_ctx;
    const size_t es = t->dtype == MOE_DT_F32 ? 4 : 2;
    const uint64_t row_len = t->n_dims == 2 ? (uint64_t)t->shape[1] : 1;
    uint8_t *out = dst;
    size_t end = offset + n_bytes;
    for (size_t e = offset / es; e * es < end; e++) {
        uint8_t bytes[4];
        bool live = !t->rows_of || row_is_token(t->rows_of, (int64_t)(e / row_len));
        encode(t, live ? element_value(t, e) : 0.0f, bytes);
        size_t eb = e * es;
        size_t lo = eb < offset ? offset : eb, hi = eb + es > end ? end : eb + es;
        memcpy(out + (lo - offset), bytes + (lo - eb), hi - lo);
    }
}

/* ---------- the tensor list ---------- */

typedef struct {
    moe_gen_tensor *v;
    int n, cap;
    const moe_gen_spec *spec;
    bool oom;
} tlist;

static uint64_t name_key(uint64_t seed, const char *name)
{
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 1099511628211ull;
    }
    return mix64(h ^ mix64(seed + 0x9e3779b97f4a7c15ull));
}

static void add(tlist *l, int init, float scale, int64_t d0, int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* d1 = 0 makes a vector. */
static void add(tlist *l, int init, float scale, int64_t d0, int64_t d1, const char *fmt, ...)
{
    if (l->oom)
        return;
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 256;
        moe_gen_tensor *nv = realloc(l->v, sizeof *nv * (size_t)cap);
        if (!nv) {
            l->oom = true;
            return;
        }
        l->v = nv;
        l->cap = cap;
    }
    moe_gen_tensor *t = &l->v[l->n++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->n_dims = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->init = init;
    t->scale = scale;
    t->dtype = l->spec->dtype;
    t->key = name_key(l->spec->seed, t->name);
    t->n_bytes = (uint64_t)d0 * (uint64_t)(d1 > 0 ? d1 : 1) * (t->dtype == MOE_DT_F32 ? 4u : 2u);
}

static float inv_sqrt(int fan_in)
{
    return 1.0f / sqrtf((float)fan_in);
}

/* A SwiGLU MLP (gate/up/down, or Mixtral's w1/w3/w2) under `prefix`. */
static void add_mlp(tlist *l, const char *prefix, bool mixtral, int d, int ffn)
{
    const char *g = mixtral ? "w1" : "gate_proj", *u = mixtral ? "w3" : "up_proj",
               *dn = mixtral ? "w2" : "down_proj";
    add(l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), ffn, d, "%s.%s.weight", prefix, g);
    add(l, MOE_GEN_INIT_NORMAL, inv_sqrt(ffn), d, ffn, "%s.%s.weight", prefix, dn);
    add(l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), ffn, d, "%s.%s.weight", prefix, u);
}

moe_status moe_gen_tensor_list(const moe_gen_spec *s, moe_gen_tensor **out, int *n_out)
{
    tlist l = {.spec = s};
    const int d = s->hidden, q = s->heads * s->head_dim, kv = s->kv_heads * s->head_dim;
    const bool mixtral = s->arch == MOE_ARCH_MIXTRAL;

    /* Embedding rows have unit scale: the first RMSNorm rescales them anyway, and it keeps the
     * token's own signal comparable to what each layer adds to the residual stream. */
    add(&l, MOE_GEN_INIT_NORMAL, 1.0f, s->vocab, d, "model.embed_tokens.weight");
    if (!l.oom)
        l.v[l.n - 1].rows_of = s;
    for (int i = 0; i < s->n_layers; i++) {
        char pre[32], mlp[64], name[96];
        snprintf(pre, sizeof pre, "model.layers.%d", i);
        add(&l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), q, d, "%s.self_attn.q_proj.weight", pre);
        if (s->qkv_bias)
            add(&l, MOE_GEN_INIT_BIAS, 0.05f, q, 0, "%s.self_attn.q_proj.bias", pre);
        add(&l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), kv, d, "%s.self_attn.k_proj.weight", pre);
        if (s->qkv_bias)
            add(&l, MOE_GEN_INIT_BIAS, 0.05f, kv, 0, "%s.self_attn.k_proj.bias", pre);
        add(&l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), kv, d, "%s.self_attn.v_proj.weight", pre);
        if (s->qkv_bias)
            add(&l, MOE_GEN_INIT_BIAS, 0.05f, kv, 0, "%s.self_attn.v_proj.bias", pre);
        add(&l, MOE_GEN_INIT_NORMAL, inv_sqrt(q), d, q, "%s.self_attn.o_proj.weight", pre);
        if (s->qk_norm == 1) {
            add(&l, MOE_GEN_INIT_NORM, 0, q, 0, "%s.self_attn.q_norm.weight", pre);
            add(&l, MOE_GEN_INIT_NORM, 0, kv, 0, "%s.self_attn.k_norm.weight", pre);
        } else if (s->qk_norm == 2) {
            add(&l, MOE_GEN_INIT_NORM, 0, s->head_dim, 0, "%s.self_attn.q_norm.weight", pre);
            add(&l, MOE_GEN_INIT_NORM, 0, s->head_dim, 0, "%s.self_attn.k_norm.weight", pre);
        }
        snprintf(mlp, sizeof mlp, "%s.%s", pre, mixtral ? "block_sparse_moe" : "mlp");
        if (s->layer_is_moe[i]) {
            /* Router rows at 1/sqrt(d): logits of about unit spread over normalised inputs, so
             * different tokens pick different experts. */
            add(&l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), s->experts, d, "%s.gate.weight", mlp);
            for (int e = 0; e < s->experts; e++) {
                snprintf(name, sizeof name, "%s.experts.%d", mlp, e);
                add_mlp(&l, name, mixtral, d, s->moe_ffn);
            }
            if (s->shared_ffn > 0) {
                snprintf(name, sizeof name, "%s.shared_expert", mlp);
                add_mlp(&l, name, false, d, s->shared_ffn);
                add(&l, MOE_GEN_INIT_NORMAL, inv_sqrt(d), 1, d, "%s.shared_expert_gate.weight",
                    mlp);
            }
        } else {
            add_mlp(&l, mlp, false, d, s->dense_ffn);
        }
        add(&l, MOE_GEN_INIT_NORM, 0, d, 0, "%s.input_layernorm.weight", pre);
        add(&l, MOE_GEN_INIT_NORM, 0, d, 0, "%s.post_attention_layernorm.weight", pre);
    }
    add(&l, MOE_GEN_INIT_NORM, 0, d, 0, "model.norm.weight");
    /* Logits of about 4 standard deviations over the normalised final state: peaked like a
     * trained model's, and far above the 0 of the zero padding rows, which greedy decoding then
     * never picks and sampling almost never does. */
    add(&l, MOE_GEN_INIT_NORMAL, 4.0f * inv_sqrt(d), s->vocab, d, "lm_head.weight");
    if (!l.oom)
        l.v[l.n - 1].rows_of = s;
    if (l.oom) {
        free(l.v);
        return moe_error(MOE_ERR_NOMEM, "out of memory listing the tensors");
    }
    *out = l.v;
    *n_out = l.n;
    return MOE_OK;
}

/* ---------- files ---------- */

/* model-00001-of-00003.safetensors: HF's shard names (5-digit, 1-based). */
static bool is_shard_name(const char *n)
{
    unsigned a, b;
    char tail[32];
    return strlen(n) == strlen("model-00001-of-00001.safetensors") &&
           sscanf(n, "model-%5u-of-%5u.%31s", &a, &b, tail) == 3 &&
           strcmp(tail, "safetensors") == 0;
}

static moe_status remove_stale(const char *dir)
{
    DIR *dp = opendir(dir);
    if (!dp)
        return moe_error(MOE_ERR_IO, "--out %s: cannot list: %s", dir, strerror(errno));
    moe_status st = MOE_OK;
    struct dirent *de;
    while (st == MOE_OK && (de = readdir(dp)) != NULL) {
        if (strcmp(de->d_name, "model.safetensors") != 0 &&
            strcmp(de->d_name, "model.safetensors.index.json") != 0 && !is_shard_name(de->d_name))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (unlink(path) != 0 && errno != ENOENT)
            st = moe_error(MOE_ERR_IO, "%s: cannot remove the stale file: %s", path,
                           strerror(errno));
    }
    closedir(dp);
    return st;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp((*(const moe_gen_tensor *const *)a)->name,
                  (*(const moe_gen_tensor *const *)b)->name);
}

static moe_status write_index(const char *dir, const moe_gen_tensor *t, int n, const int *shard,
                              int n_shards, uint64_t total_size, uint64_t total_params)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    /* weight_map sorted by tensor name, like json.dumps(sort_keys=True) */
    const moe_gen_tensor **sorted = malloc(sizeof *sorted * (size_t)n);
    if (!sorted)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", path);
    for (int i = 0; i < n; i++)
        sorted[i] = &t[i];
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_tensor_name);
    moe_gen_json j;
    moe_gen_json_init(&j, true);
    moe_gen_json_obj_begin(&j);
    moe_gen_json_key(&j, "metadata");
    moe_gen_json_obj_begin(&j);
    moe_gen_json_key(&j, "total_parameters");
    moe_gen_json_int(&j, (long long)total_params);
    moe_gen_json_key(&j, "total_size");
    moe_gen_json_int(&j, (long long)total_size);
    moe_gen_json_obj_end(&j);
    moe_gen_json_key(&j, "weight_map");
    moe_gen_json_obj_begin(&j);
    for (int k = 0; k < n; k++) {
        char file[64];
        snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", shard[sorted[k] - t] + 1,
                 n_shards);
        moe_gen_json_key(&j, sorted[k]->name);
        moe_gen_json_str(&j, file);
    }
    moe_gen_json_obj_end(&j);
    moe_gen_json_obj_end(&j);
    free(sorted);
    return moe_gen_json_finish(&j, path, true);
}

moe_status moe_gen_write_weights(const moe_gen_spec *spec, const char *dir, uint64_t max_shard_size,
                                 int *n_shards_out)
{
    moe_gen_tensor *t = NULL;
    int n = 0;
    moe_status st = moe_gen_tensor_list(spec, &t, &n);
    if (st != MOE_OK)
        return st;
    int *shard = malloc(sizeof *shard * (size_t)n);
    moe_st_write_tensor *w = calloc((size_t)n, sizeof *w);
    if (!shard || !w) {
        st = moe_error(MOE_ERR_NOMEM, "out of memory planning the shards");
        goto done;
    }

    /* huggingface_hub's split_state_dict_into_shards: in order, start a new shard when the next
     * tensor would overflow the current one; a tensor larger than the limit gets a shard of its
     * own, numbered when it is met (before the shard being filled). */
    int n_shards = 0, current = -1;
    uint64_t current_size = 0, total = 0;
    for (int i = 0; i < n; i++) {
        uint64_t sz = t[i].n_bytes;
        total += sz;
        if (sz > max_shard_size) {
            shard[i] = n_shards++;
            continue;
        }
        if (current < 0 || current_size + sz > max_shard_size) {
            current = n_shards++;
            current_size = 0;
        }
        shard[i] = current;
        current_size += sz;
    }
    /* The open shard was numbered when it was opened; HF numbers it when it is closed. Renumber
     * by the order in which shards are closed: an oversized tensor's shard closes at once. */
    {
        int *closed_rank = malloc(sizeof *closed_rank * (size_t)(n_shards ? n_shards : 1));
        if (!closed_rank) {
            st = moe_error(MOE_ERR_NOMEM, "out of memory planning the shards");
            goto done;
        }
        int next = 0, open = -1;
        for (int i = 0; i < n; i++) {
            bool oversized = t[i].n_bytes > max_shard_size;
            if (oversized) {
                closed_rank[shard[i]] = next++;
            } else if (shard[i] != open) {
                if (open >= 0)
                    closed_rank[open] = next++;
                open = shard[i];
            }
        }
        if (open >= 0)
            closed_rank[open] = next++;
        for (int i = 0; i < n; i++)
            shard[i] = closed_rank[shard[i]];
        free(closed_rank);
    }

    st = remove_stale(dir);
    for (int s = 0; st == MOE_OK && s < n_shards; s++) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            if (shard[i] != s)
                continue;
            moe_st_write_tensor *x = &w[m++];
            x->name = t[i].name;
            x->dtype = t[i].dtype;
            x->n_dims = t[i].n_dims;
            x->shape[0] = t[i].shape[0];
            x->shape[1] = t[i].shape[1];
            x->data = NULL;
            x->fill = moe_gen_tensor_fill;
            x->fill_ctx = &t[i];
        }
        char path[4096];
        if (n_shards == 1)
            snprintf(path, sizeof path, "%s/model.safetensors", dir);
        else
            snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, s + 1, n_shards);
        st = moe_st_write_file(path, w, m, "{\"format\":\"pt\"}");
    }
    if (st == MOE_OK && n_shards > 1)
        st = write_index(dir, t, n, shard, n_shards, total, moe_gen_spec_params(spec));
    if (st == MOE_OK && n_shards_out)
        *n_shards_out = n_shards;
done:
    free(t);
    free(shard);
    free(w);
    return st;
}
