/* libFuzzer target: arbitrary bytes as a chat template through moe_jinja_parse and, when it
 * compiles, moe_jinja_render over a fixed conversation. A NUL byte splits the input: what follows
 * it is the JSON variables instead (messages, tools...). Renders are bounded (memory, loop
 * iterations), so every input must finish quickly and cleanly. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/jinja.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char DEFAULT_VARS[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"sys\"}, {\"role\": \"user\", "
    "\"content\": \"Hi \\u00e9\"}, {\"role\": \"assistant\", \"content\": \"<think>r</think>a\", "
    "\"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": {\"x\": [1, 2.5, null]}}}]}],"
    " \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *src = (const char *)data;
    size_t tlen = size;
    const char *nul = memchr(data, 0, size);
    cJSON *vars = NULL;
    if (nul) {
        tlen = (size_t)(nul - src);
        vars = cJSON_ParseWithLength(nul + 1, size - tlen - 1);
    }
    if (!vars)
        vars = cJSON_Parse(DEFAULT_VARS);
    moe_jinja *t = NULL;
    if (moe_jinja_parse(src, tlen, &t) == MOE_OK) {
        char *out = NULL;
        size_t n = 0;
        if (moe_jinja_render(t, vars, NULL, 0, (size_t)16 << 20, &out, &n) == MOE_OK) {
            if (!out || strlen(out) > n)
                abort();
            free(out);
        } else if (out) {
            abort(); /* a failed render hands nothing back */
        }
        moe_jinja_free(t);
    } else if (t) {
        abort();
    }
    cJSON_Delete(vars);
    return 0;
}
