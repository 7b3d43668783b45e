/* moe-gen-model internals: presets, the model spec an architecture wires from a preset, and the
 * writers of a synthetic Hugging Face model directory (config JSON, weights, BPE tokenizer).
 * Shared by tools/moe_gen_model.c (the CLI) and tests/unit/test_gen_model.c. */
#ifndef MOE_TOOLS_GEN_MODEL_H
#define MOE_TOOLS_GEN_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "common/model_config.h"
#include "common/status.h"
#include "kernels/kernels.h"

/* huggingface_hub's default shard size ("5GB", decimal); transformers 5 itself defaults to 50GB,
 * but 5 GB shards keep every file comfortably mmap-able and copyable. */
#define MOE_GEN_DEFAULT_SHARD_SIZE 5000000000ull
/* The transformers release whose save format (rope_parameters, layer_types, dtype, ...) the
 * JSON files follow; written as "transformers_version" like save_pretrained does. */
#define MOE_GEN_HF_VERSION "5.24.0"

/* ---------------- presets ---------------- */

/* Shape data, independent of the architecture; --arch decides the wiring. Fields marked "0 =
 * derived" are filled in by moe_gen_spec_build. */
typedef struct {
    const char *name;  /* "tiny" */
    const char *about; /* one line for --list-presets */
    int native_arch;   /* moe_arch whose real model this copies; -1 for tiny/small */
    int hidden;        /* d_model */
    int layers;
    int heads;
    int kv_heads;
    int head_dim; /* 0 = hidden / heads */
    int experts;
    int top_k;
    int moe_ffn;    /* per-expert intermediate size */
    int dense_ffn;  /* intermediate_size of dense-MLP layers (Qwen2/3-MoE) */
    int shared_ffn; /* Qwen2-MoE shared expert; 0 = 4 * moe_ffn when wired as Qwen2-MoE */
    int vocab;      /* config vocab_size (the embedding; the tokenizer may be smaller) */
    int max_pos;
    double rope_theta;
    double rms_eps;
    int norm_topk_prob;     /* -1 = the architecture's own default */
    int qwen2_dense_layers; /* Qwen2-MoE only: the first N layers are dense (mlp_only_layers) */
} moe_gen_preset;

int moe_gen_preset_count(void);
const moe_gen_preset *moe_gen_preset_at(int i);
/* NULL if no preset has that name. */
const moe_gen_preset *moe_gen_preset_find(const char *name);

/* "mixtral" -> MOE_ARCH_MIXTRAL; returns false for an unknown name. */
bool moe_gen_arch_parse(const char *name, moe_arch *out);
/* The --arch spelling ("qwen2_moe") of an architecture. */
const char *moe_gen_arch_flag(moe_arch a);

/* ---------------- the wired model ---------------- */

typedef enum {
    MOE_GEN_TOK_QWEN2 = 0, /* byte-level, NFC + Qwen2 Split regex + ByteLevel(use_regex=false) */
    MOE_GEN_TOK_GPT2,      /* byte-level, ByteLevel(use_regex=true) (OLMoE / GPT-NeoX) */
    MOE_GEN_TOK_SP,        /* SentencePiece-style BPE: Metaspace, byte fallback (Llama / Mixtral) */
} moe_gen_tok_family;

typedef struct {
    moe_arch arch;
    const moe_gen_preset *preset;
    moe_dtype dtype; /* MOE_DT_BF16 or MOE_DT_F32 */
    uint64_t seed;

    int hidden, n_layers, heads, kv_heads, head_dim;
    bool write_head_dim; /* config.json carries "head_dim" */
    int experts, top_k, moe_ffn, dense_ffn, shared_ffn;
    int vocab, max_pos;
    double rope_theta, rms_eps;
    bool norm_topk_prob;
    bool qkv_bias; /* Qwen2-MoE */
    int qk_norm;   /* 0 none, 1 whole projection (OLMoE), 2 per head (Qwen3-MoE) */
    int decoder_sparse_step;
    int n_mlp_only;
    int mlp_only[MOE_MAX_LAYERS];
    bool layer_is_moe[MOE_MAX_LAYERS];
    moe_gen_tok_family tok_family;
    /* Token ids the tokenizer uses: [0, tok_rows) plus tok_extra (its special tokens). The other
     * rows of embed_tokens / lm_head are padding and written as zeros, so their logit is always
     * 0 and never competes with real tokens. tok_rows = 0: every row is a token. */
    int tok_rows;
    int n_tok_extra;
    int tok_extra[4];
} moe_gen_spec;

/* Wires `preset` as architecture `arch`. n_layers > 0 overrides the preset's layer count (at most
 * MOE_MAX_LAYERS). Fails with MOE_ERR_INVALID_ARG naming the field when the combination can't be
 * built (e.g. --layers out of range). */
moe_status moe_gen_spec_build(moe_arch arch, const moe_gen_preset *preset, int n_layers,
                              moe_dtype dtype, uint64_t seed, moe_gen_spec *spec);

struct moe_gen_tokenizer_s;
/* Records which ids tok uses (see tok_rows). */
void moe_gen_spec_set_tokens(moe_gen_spec *spec, const struct moe_gen_tokenizer_s *tok);

/* Total number of parameters the spec's safetensors hold. */
uint64_t moe_gen_spec_params(const moe_gen_spec *spec);

/* Writes the --list-presets table. */
void moe_gen_list_presets(FILE *f);

/* ---------------- tokenizer ---------------- */

#define MOE_GEN_MAX_SPECIALS 4

typedef struct moe_gen_tokenizer_s {
    moe_gen_tok_family family;
    int n_vocab;  /* model vocab entries: ids 0..n_vocab-1 */
    char **vocab; /* token strings by id (UTF-8, already in the model's alphabet) */
    int n_merges;
    int (*merges)[2]; /* left, right token ids, in priority order */
    int n_special;
    struct {
        const char *content; /* static string */
        int id;
    } special[MOE_GEN_MAX_SPECIALS];
    int bos_id, eos_id, pad_id, unk_id; /* -1 = none */
    int im_end_id;                      /* Qwen family: <|im_end|>, else -1 */
} moe_gen_tokenizer;

/* Trains a BPE tokenizer of `family` on the embedded corpus so that the model vocabulary plus
 * the special tokens fit in config_vocab ids (fewer when the corpus supports fewer merges).
 * Special tokens take their real models' ids when config_vocab is large enough for them (Qwen:
 * 151643.., OLMoE: <|endoftext|> 50279; Mixtral's <unk> <s> </s> are always 0 1 2), else the ids
 * right after the learned vocabulary. Deterministic. Caller frees with moe_gen_tok_free. */
moe_status moe_gen_tok_train(moe_gen_tok_family family, int config_vocab, moe_gen_tokenizer **out);
void moe_gen_tok_free(moe_gen_tokenizer *tok);
/* Writes tokenizer.json as the `tokenizers` library serializes it (pretty, UTF-8). */
moe_status moe_gen_tok_write_json(const moe_gen_tokenizer *tok, const char *path);

/* The embedded training corpus: n documents of UTF-8 text. */
int moe_gen_corpus_count(void);
const char *moe_gen_corpus_doc(int i);

/* ---------------- JSON output ---------------- */

/* A growable text buffer with a streaming, pretty-printing JSON writer (2-space indent, ": "
 * separators: both Python's json.dumps(indent=2) and serde_json's pretty printer look like this).
 * ascii=true escapes non-ASCII as \uXXXX (Python's default), false writes UTF-8 (serde). Errors
 * (allocation) are sticky and reported by moe_gen_json_finish. */
typedef struct {
    char *buf;
    size_t len, cap;
    int depth;
    bool ascii;
    bool failed;
    bool after_key;
    bool has_items[64];
} moe_gen_json;

void moe_gen_json_init(moe_gen_json *j, bool ascii);
void moe_gen_json_obj_begin(moe_gen_json *j);
void moe_gen_json_obj_end(moe_gen_json *j);
void moe_gen_json_arr_begin(moe_gen_json *j);
void moe_gen_json_arr_end(moe_gen_json *j);
void moe_gen_json_key(moe_gen_json *j, const char *key);
void moe_gen_json_str(moe_gen_json *j, const char *s);
void moe_gen_json_strn(moe_gen_json *j, const char *s, size_t n);
void moe_gen_json_int(moe_gen_json *j, long long v);
/* Python repr() of a float: 1e-05, 0.02, 1000000.0. */
void moe_gen_json_double(moe_gen_json *j, double v);
void moe_gen_json_bool(moe_gen_json *j, bool v);
void moe_gen_json_null(moe_gen_json *j);
/* Writes a cJSON tree (keys sorted like Python's sort_keys=True when sort is true). Numbers
 * written with cJSON_CreateNumber print as integers when integral; floats must be cJSON raw
 * items holding moe_gen_format_double text. */
struct cJSON;
void moe_gen_json_cjson(moe_gen_json *j, const struct cJSON *item, bool sort);
/* Appends a final newline when `newline`, writes the buffer to path and frees it. */
moe_status moe_gen_json_finish(moe_gen_json *j, const char *path, bool newline);
void moe_gen_json_discard(moe_gen_json *j);

/* Formats v as Python's repr(float) does into buf (at least 32 bytes). */
void moe_gen_format_double(double v, char *buf, size_t cap);

/* ---------------- HF JSON files ---------------- */

/* The chat template tokenizer_config.json carries for arch (tools/moe_gen_model/chat_templates.c:
 * the family's real one), malloc'd (caller frees); NULL for none or out of memory. */
char *moe_gen_chat_template(moe_arch arch);

/* config.json, generation_config.json and tokenizer_config.json for spec + tok into dir. */
moe_status moe_gen_write_configs(const moe_gen_spec *spec, const moe_gen_tokenizer *tok,
                                 const char *dir);
/* Builds config.json's tree (caller deletes with cJSON_Delete); NULL on allocation failure. */
struct cJSON *moe_gen_config_tree(const moe_gen_spec *spec, const moe_gen_tokenizer *tok);

/* ---------------- weights ---------------- */

typedef struct {
    char name[128];
    int n_dims;
    int64_t shape[2];
    int init; /* MOE_GEN_INIT_* */
    float scale;
    uint64_t key; /* PRNG stream of this tensor (seed x name) */
    moe_dtype dtype;
    uint64_t n_bytes;
    const moe_gen_spec *rows_of; /* non-NULL: a vocab-row tensor, padding rows are zero */
} moe_gen_tensor;

enum { MOE_GEN_INIT_NORMAL = 0, MOE_GEN_INIT_NORM, MOE_GEN_INIT_BIAS };

/* Lists every tensor of the spec in module order (HF state_dict order). *out is malloc'd; the
 * vocab-row tensors point at spec, which must outlive the list. */
moe_status moe_gen_tensor_list(const moe_gen_spec *spec, moe_gen_tensor **out, int *n_out);
/* The streaming fill callback of moe_st_write_tensor for a moe_gen_tensor (as fill_ctx). The
 * value of element i depends only on (tensor key, i): chunking never changes the bytes. */
void moe_gen_tensor_fill(void *fill_ctx, void *dst, size_t n_bytes, size_t offset);
/* Writes model.safetensors, or model-0000K-of-0000N.safetensors shards plus
 * model.safetensors.index.json when the weights exceed max_shard_size bytes (HF's greedy
 * in-order split; a tensor larger than the limit gets a shard of its own). Removes stale
 * model*.safetensors / index files of an earlier run first. *n_shards_out may be NULL. */
moe_status moe_gen_write_weights(const moe_gen_spec *spec, const char *dir, uint64_t max_shard_size,
                                 int *n_shards_out);

/* ---------------- the tool ---------------- */

typedef struct {
    moe_arch arch;
    const moe_gen_preset *preset;
    const char *out_dir;
    moe_dtype dtype;
    uint64_t seed;
    int layers; /* 0 = preset's */
    uint64_t max_shard_size;
    bool list_presets;
    bool help;
    bool quiet;
} moe_gen_options;

/* Parses argv (argv[0] is the program name). On a bad flag returns MOE_ERR_INVALID_ARG with a
 * message naming the flag. --help / --list-presets set their flags and skip the required-flag
 * checks. */
moe_status moe_gen_parse_args(int argc, char **argv, moe_gen_options *opt);
/* Parses "5000000", "5GB", "500MB", "2GiB", "64KiB" into bytes. */
bool moe_gen_parse_size(const char *s, uint64_t *out);
void moe_gen_usage(FILE *f, const char *prog);
/* Generates the whole model directory (created if missing). */
moe_status moe_gen_run(const moe_gen_options *opt);

#endif
