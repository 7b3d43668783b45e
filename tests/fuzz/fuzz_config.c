/* libFuzzer target: arbitrary bytes as config.json through moe_model_config_parse. A NUL byte
 * splits the input: what follows it is generation_config.json. Accepted configs must satisfy the
 * invariants the engine relies on. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/model_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moe_log_threshold = MOE_LOG_ERROR; /* out-of-vocabulary eos warnings would flood the output */
    char *buf = malloc(size + 2);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    buf[size] = buf[size + 1] = '\0';
    const char *gen = NULL;
    size_t cut = strlen(buf);
    if (cut < size)
        gen = buf + cut + 1;

    moe_model_config c;
    if (moe_model_config_parse(buf, gen, "fuzz/config.json", &c) == MOE_OK) {
        if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.n_layers <= 0 ||
            c.n_layers > MOE_MAX_LAYERS || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
            c.n_heads % c.n_kv_heads || c.head_dim <= 0 || c.head_dim % 2 || c.n_experts <= 0 ||
            c.n_experts_per_tok <= 0 || c.n_experts_per_tok > c.n_experts || c.moe_ffn <= 0 ||
            c.n_eos < 0 || c.n_eos > MOE_MAX_EOS || !(c.rope_theta > 0) || !(c.rms_eps > 0) ||
            c.bos_token_id >= c.vocab_size || (unsigned)c.arch >= MOE_ARCH_COUNT)
            abort();
        for (int i = 0; i < c.n_eos; i++)
            if (c.eos_ids[i] < 0 || c.eos_ids[i] >= c.vocab_size)
                abort();
        for (int i = 0; i < c.n_layers; i++)
            if (!c.layer_is_moe[i] && c.dense_ffn <= 0)
                abort();
    }
    free(buf);
    return 0;
}
