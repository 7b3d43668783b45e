/* A loaded model: its config and pointers to every weight, bound by name and checked by shape and
 * dtype against the config before anything runs. Weights point into the safetensors mmaps
 * (zero-copy); only tiny vectors (norms, biases) are converted into owned f32, and matrices into
 * owned Q8/Q4 when moe_model_load_opts.quantize_experts / quantize_dense ask for it. */
#ifndef MOE_WORKER_MODEL_H
#define MOE_WORKER_MODEL_H

#include <stdbool.h>
#include "common/model_config.h"
#include "kernels/kernels.h"
#include "worker/safetensors.h"

/* A row-major matrix (rows = outputs, cols = inputs), as nn.Linear stores it. */
typedef struct {
    const void *data; /* NULL when absent (e.g. an expert not held by this rank) */
    moe_dtype dtype;
    int rows, cols;
} moe_weight;

typedef struct {
    const float *attn_norm;          /* (d) */
    moe_weight wq;                   /* (n_heads*head_dim, d) */
    moe_weight wk, wv;               /* (n_kv_heads*head_dim, d) */
    moe_weight wo;                   /* (d, n_heads*head_dim) */
    const float *bq, *bk, *bv;       /* biases or NULL */
    const float *q_norm, *k_norm;    /* qk_norm 1: (n_heads*head_dim)/(n_kv*head_dim); 2: (head_dim) */
    const float *ffn_norm;           /* (d) post_attention_layernorm */

    bool is_moe;
    moe_weight router;               /* (n_experts, d) */
    moe_weight *exp_gate;            /* [n_experts] (moe_ffn, d) */
    moe_weight *exp_up;              /* [n_experts] (moe_ffn, d) */
    moe_weight *exp_down;            /* [n_experts] (d, moe_ffn) */
    moe_weight sh_gate, sh_up;       /* Qwen2-MoE shared expert (shared_ffn, d) */
    moe_weight sh_down;              /* (d, shared_ffn) */
    moe_weight sh_expert_gate;       /* (1, d): sigmoid gate of the shared expert */

    moe_weight mlp_gate, mlp_up;     /* dense layers: (dense_ffn, d) */
    moe_weight mlp_down;             /* (d, dense_ffn) */
} moe_layer_weights;

/* Load-time quantization of matrices (moe_model_load_opts.quantize_experts / quantize_dense). */
typedef enum {
    MOE_QUANT_NONE = 0, /* keep the file's dtype (zero-copy) */
    MOE_QUANT_Q8,       /* MOE_DT_Q8: 34 bytes per 32 weights */
    MOE_QUANT_Q4,       /* MOE_DT_Q4: 18 bytes per 32 weights */
} moe_quant_mode;

typedef struct {
    /* Experts [expert_begin, expert_end) are bound; others stay NULL and are not touched (so
     * their pages are never faulted in). Default (0, 0) means all. */
    int expert_begin, expert_end;
    /* When non-NULL, [n_experts] flags: bind exactly the flagged experts (a rank's primary range
     * plus its EPLB replicas); overrides the range. */
    const bool *expert_mask;
    /* Quantize every bound routed expert's gate/up/down (not attention, router, shared expert,
     * dense MLPs, embeddings) into owned memory at load, on all online CPUs; matrices whose
     * input size is not a multiple of MOE_QK, or that hold inf/NaN, keep their dtype (logged).
     * Default MOE_QUANT_NONE. */
    moe_quant_mode quantize_experts;
    /* Quantize the dense matrices the same way: attention q/k/v/o, the shared expert's
     * gate/up/down, dense MLP layers and lm_head. Never the embedding table (only rows are
     * gathered from it; with tied embeddings lm_head becomes a separate quantized copy and the
     * lookup keeps the original), the router or the shared-expert gate (tiny, and they pick
     * experts: precision-sensitive), nor norms/biases. Same fallbacks as quantize_experts.
     * Default MOE_QUANT_NONE (zero-initialised opts keep the old behaviour). */
    moe_quant_mode quantize_dense;
    /* Keep the file pages of quantized/converted tensors mapped and resident (the behaviour
     * before they were released). Default false: after a matrix is quantized, and a vector
     * converted to f32, their pages are dropped (moe_st_release), so a quantized model's RSS is
     * its quantized bytes, not those plus the bf16 source. For tests and A/B measurements. */
    bool keep_source_pages;
} moe_model_load_opts;

/* Pre-quantized model directories (written by moe_model_save / moe-quantize): their safetensors
 * hold Q8/Q4 matrices ("MOE_Q8"/"MOE_Q4" tensors) and, in __metadata__, these string keys. A
 * model whose files hold a Q8/Q4 tensor loads only when its file says VERSION ==
 * MOE_QMETA_VERSION_NOW and GROUP == MOE_QK, and CHECKSUM<tensor name> gives the 16-hex-digit
 * moe_kv_checksum (XXH64) of the tensor's bytes; it loads with no float copy of those
 * matrices. Asking such a model for another Q format than it holds is refused (naming the file
 * and tensor); quantize_* equal to what it holds, or NONE, keeps what it holds. */
#define MOE_QMETA_VERSION "moe.quant.version"
#define MOE_QMETA_VERSION_NOW "1"
#define MOE_QMETA_GROUP "moe.quant.group_size"
#define MOE_QMETA_EXPERTS "moe.quant.experts" /* "q8", "q4" or "none" (informative) */
#define MOE_QMETA_DENSE "moe.quant.dense"     /* likewise */
#define MOE_QMETA_SOURCE "moe.quant.source_dtype" /* "BF16", "F16", "F32" (informative) */
#define MOE_QMETA_CHECKSUM "moe.quant.xxh64."

/* Parses a --quantize value into opts->quantize_experts and opts->quantize_dense: a comma list
 * of GROUP=FORMAT with GROUP experts|dense|all and FORMAT q8|q4|none (later items override
 * earlier ones: "all=q4,dense=q8"), or "none". Groups the spec does not name are set to none, so
 * "experts=q8" means exactly what it meant before dense quantization existed. Whitespace is not
 * allowed. MOE_ERR_INVALID_ARG (message names the spec and the item at fault) otherwise; opts
 * untouched then. */
moe_status moe_model_parse_quantize(const char *spec, moe_model_load_opts *opts);

typedef struct {
    moe_model_config cfg;
    char dir[4096];
    moe_st_set *st;
    moe_weight embed;                /* (vocab, d) */
    const float *final_norm;         /* (d) */
    moe_weight lm_head;              /* (vocab, d); the embedding when tied */
    moe_layer_weights *layers;       /* [n_layers] */
    int expert_begin, expert_end;    /* bounds of the bound experts (all of them inside) */
    bool *expert_bound;              /* [n_experts] which experts are bound */
    void *owned;                     /* converted buffers, freed by moe_model_free */
} moe_model;

/* Loads DIR (config.json, generation_config.json, safetensors). opts may be NULL. On error returns
 * a status whose message names the file and tensor/field at fault; *out is untouched. */
moe_status moe_model_load(const char *dir, const moe_model_load_opts *opts, moe_model **out);
void moe_model_free(moe_model *m);

/* Binds, in addition, every expert flagged in mask[n_experts] (zero-copy, from the same mmaps):
 * the replicas an EPLB plan gives this rank. Experts already bound are kept. UNSUPPORTED with
 * quantized experts. On failure the experts bound so far stay bound (harmless: unused). */
moe_status moe_model_bind_experts(moe_model *m, const bool *mask);

/* The matrix the model serves tensor `name` from (its moe_weight, with the dtype and bytes the
 * kernels read: a load-time quantized copy, a pre-quantized tensor, or the file's bytes), or NULL
 * when the model binds no matrix of that name (vectors, unbound experts). "lm_head.weight" of a
 * tied model is its separately quantized copy, or NULL while it is the embedding. */
const moe_weight *moe_model_matrix(const moe_model *m, const char *name);

/* Writes a pre-quantized copy of m's model to out_dir (created if missing; files of the same
 * names there are replaced): one model.safetensors holding every tensor of m's files, each
 * matrix in the dtype m serves it in (so a model loaded with quantize_* becomes a file that
 * loads with no float copy of those matrices), plus lm_head.weight when a tied lm_head was
 * quantized; the metadata keys above; and every other regular file of m's directory that is not
 * a safetensors file or index (config.json, tokenizer, ...) copied. m must bind every expert.
 * Errors name the file or tensor. */
moe_status moe_model_save(const moe_model *m, const char *out_dir);

/* Bytes of weights this rank maps and will read (for logs and the KV budget). */
size_t moe_model_weight_bytes(const moe_model *m);

#endif
