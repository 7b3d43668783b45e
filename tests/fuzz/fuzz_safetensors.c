/* libFuzzer target: arbitrary bytes as a safetensors file image through moe_st_parse. Beyond
 * "no crash, no sanitizer report", every accepted tensor must lie inside the buffer and be found
 * by its name. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "worker/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moe_st_set *set = NULL;
    if (moe_st_parse(data, size, "fuzz.safetensors", &set) != MOE_OK) {
        if (set || !moe_error_message()[0])
            abort(); /* a failure must leave no set and say why */
        return 0;
    }
    for (int i = 0; i < moe_st_count(set); i++) {
        const moe_st_tensor *t = moe_st_at(set, i);
        const uint8_t *p = t->data;
        if (p < data || p + t->n_bytes > data + size)
            abort();
        if (moe_st_find(set, t->name) != t)
            abort();
        size_t es = t->dtype == MOE_DT_F32 ? 4 : 2, n = es;
        for (int d = 0; d < t->n_dims; d++)
            n *= (size_t)t->shape[d];
        if (n != t->n_bytes)
            abort();
        volatile uint8_t sink = 0;
        if (t->n_bytes)
            sink ^= p[0] ^ p[t->n_bytes - 1]; /* touch both ends: ASan checks they are in bounds */
        (void)sink;
    }
    moe_st_close(set);
    return 0;
}
