/* libFuzzer target: arbitrary bytes as an HTTP request body through the OpenAI front end's
 * parsing (coordinator/http_openai.c: the JSON with its NUL-escape handling, the NUL check, the
 * completion and chat field checks, the chat template) and then the shared validation
 * (coordinator/validate.c) with a fake tokenizer, and the response objects (logprobs included
 * when asked for). The first byte picks completion or chat. The
 * coordinator sources are compiled in here: the fuzz build instruments only the libraries it
 * links, and the coordinator's library would drag gRPC and MPI in. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/file.h"

#include "../../coordinator/frontend.c"
#include "../../coordinator/http_logprobs.c"
#include "../../coordinator/http_openai.c"
#include "../../coordinator/validate.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static moe_status fake_tokenize(void *ctx, const char *text, size_t len, bool add_special,
                                int32_t *ids, size_t cap, size_t *n_out)
{
    (void)ctx;
    *n_out = len / 2 + (add_special ? 1 : 0);
    for (size_t i = 0; i < *n_out && i < cap; i++)
        ids[i] = (int32_t)((unsigned char)text[i % (len ? len : 1)] % 100);
    return MOE_OK;
}

static moe_chat_template *g_tpl;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_tpl) {
        char *src = NULL;
        size_t n;
        if (moe_read_file(MOE_FUZZ_TEMPLATE, 1 << 20, &src, &n) != MOE_OK ||
            moe_chat_template_create(src, "<s>", "</s>", &g_tpl) != MOE_OK)
            abort();
        free(src);
    }
    if (size < 1)
        return 0;
    const bool chat = data[0] & 1;
    cJSON *body = NULL;
    bool marks = false;
    char param[64] = "";
    if (moe_http_parse_json((const char *)data + 1, size - 1, &body, &marks) != MOE_OK)
        return 0;
    if (!marks || moe_http_check_nul(body, param, sizeof(param)) == MOE_OK) {
        moe_http_gen g;
        if (moe_http_parse_gen(body, chat, g_tpl, NULL, &g) == MOE_OK) {
            moe_validate_limits lim;
            moe_validate_limits_default(&lim, 100, 256);
            moe_validated v;
            if (moe_validate_request(&lim, &g.api, fake_tokenize, NULL, &v) == MOE_OK) {
                if (v.req.n_prompt == 0 || v.req.n_prompt + v.req.max_new_tokens > 256)
                    abort();
                for (uint32_t i = 0; i < v.req.n_stop; i++)
                    if (!v.req.stop[i][0])
                        abort();
                moe_validated_free(&v);
            }
            /* the response with logprobs in the shape asked for (token strings: none without a
             * tokenizer), whole and as a chunk */
            moe_token_logprobs lps[2] = {{.logprob = -0.5f, .n_top = 2, .top_ids = {1, 2},
                                          .top_logprobs = {-0.5f, -1.5f}},
                                         {.logprob = -2.0f}};
            const int32_t ids[2] = {1, 3};
            moe_http_logprobs lp = {.ids = ids, .lp = lps, .n = 2};
            moe_http_choice ch = {"t", 1, "stop", g.api.logprobs ? &lp : NULL};
            moe_http_resp_info ri = {.id = "x", .model = "m", .chat = chat};
            char *j = moe_http_full_response(&ri, &ch, 1);
            free(j);
            j = moe_http_chunk(&ri, 0, "t", 1, false, NULL, ch.lp);
            free(j);
        }
        moe_http_gen_free(&g);
    }
    cJSON_Delete(body);
    return 0;
}
