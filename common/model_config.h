/* A model's architecture and hyper-parameters, read from a Hugging Face config.json (and
 * generation_config.json). Shared by the coordinator (limits, EOS) and the workers (shapes). */
#ifndef MOE_COMMON_MODEL_CONFIG_H
#define MOE_COMMON_MODEL_CONFIG_H

#include <stdbool.h>
#include "common/status.h"

typedef enum {
    MOE_ARCH_MIXTRAL = 0, /* MixtralForCausalLM */
    MOE_ARCH_QWEN2_MOE,   /* Qwen2MoeForCausalLM */
    MOE_ARCH_OLMOE,       /* OlmoeForCausalLM */
    MOE_ARCH_QWEN3_MOE,   /* Qwen3MoeForCausalLM */
    MOE_ARCH_COUNT
} moe_arch;

#define MOE_MAX_LAYERS 256
#define MOE_MAX_EOS 8

typedef struct {
    moe_arch arch;
    char arch_name[64];       /* "MixtralForCausalLM" */
    int vocab_size;
    int hidden_size;          /* d_model */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;             /* config head_dim, else hidden_size / n_heads */
    int max_position;         /* max_position_embeddings */
    float rms_eps;
    double rope_theta;
    bool tie_embeddings;      /* tie_word_embeddings */
    bool attn_bias;           /* q/k/v projections have bias (Qwen2-MoE: always) */
    int qk_norm;              /* 0 none, 1 over the whole projection (OLMoE), 2 per head (Qwen3) */
    float clip_qkv;           /* OLMoE clip_qkv; 0 = none */
    int sliding_window;       /* 0 = none; prompts longer than it are refused */

    /* MoE */
    int n_experts;            /* num_local_experts / num_experts */
    int n_experts_per_tok;    /* top-k */
    int moe_ffn;              /* per-expert intermediate size (moe_intermediate_size) */
    bool norm_topk_prob;      /* renormalise the top-k weights to sum 1 (Mixtral: always) */
    int dense_ffn;            /* intermediate_size of dense-MLP layers (0 if none) */
    int shared_expert_ffn;    /* Qwen2-MoE shared_expert_intermediate_size (0 = none) */
    bool layer_is_moe[MOE_MAX_LAYERS]; /* from decoder_sparse_step / mlp_only_layers */

    /* generation_config.json (falls back to config.json) */
    int bos_token_id;         /* -1 if none */
    int eos_ids[MOE_MAX_EOS];
    int n_eos;
} moe_model_config;

/* Tokens one request may hold, prompt and generated together: max_position_embeddings, or
 * sliding_window when smaller (sliding-window attention is not implemented, so a sequence must
 * fit in the window). The cluster's admission and moe-generate both refuse requests past it. */
static inline int moe_model_config_context_len(const moe_model_config *c)
{
    return (c->sliding_window > 0 && c->sliding_window < c->max_position) ? c->sliding_window
                                                                          : c->max_position;
}

/* Parses DIR/config.json and, if present, DIR/generation_config.json. Refuses unknown
 * architectures and unsupported features (rope_scaling, ...) with a message naming the file and
 * field. Returns MOE_OK and fills *cfg. */
moe_status moe_model_config_load(const char *dir, moe_model_config *cfg);
/* Same from JSON text already in memory (name is used in messages); generation_json may be NULL. */
moe_status moe_model_config_parse(const char *config_json, const char *generation_json,
                                  const char *name, moe_model_config *cfg);

const char *moe_arch_name(moe_arch a);

#endif
