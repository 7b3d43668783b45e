/* The HTTP front end's endpoints besides generation: GET /v1/models, POST /tokenize (a prompt,
 * or messages through the chat template) and POST /detokenize, in vLLM's shapes. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/http_internal.h"

enum MHD_Result moe_http_handle_models(moe_http_server *s, struct MHD_Connection *conn)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data"), *m = cJSON_CreateObject();
    cJSON_AddItemToArray(data, m);
    cJSON_AddStringToObject(m, "id", s->model);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)s->started);
    cJSON_AddStringToObject(m, "owned_by", "moeserve");
    cJSON_AddNumberToObject(m, "max_model_len", s->cfg.limits.context_len);
    return moe_http_reply_json(conn, 200, o);
}

enum MHD_Result moe_http_handle_tokenize(moe_http_server *s, struct MHD_Connection *conn,
                                       const cJSON *body)
{
    /* {"prompt": "..."} or {"messages": [...]} (through the chat template), as vLLM's */
    moe_http_gen g;
    const bool chat = cJSON_GetObjectItemCaseSensitive(body, "messages") != NULL;
    moe_status st = moe_http_parse_gen(body, chat, s->cfg.chat_template,
                                       s->cfg.chat_template_error, &g);
    if (st == MOE_OK && !g.api.has_text)
        st = moe_error(MOE_ERR_INVALID_ARG, "prompt: expected a string");
    if (st != MOE_OK) {
        enum MHD_Result r = moe_http_reply_error(conn, moe_http_status_from_moe(st), moe_error_message(),
                                        g.param[0] ? g.param : "prompt");
        moe_http_gen_free(&g);
        return r;
    }
    if (g.api.text.len > s->cfg.limits.max_prompt_bytes || memchr(g.api.text.s, 0, g.api.text.len)) {
        moe_http_gen_free(&g);
        return moe_http_reply_error(conn, 400, "prompt: too long or holds a NUL byte", "prompt");
    }
    size_t cap = g.api.text.len + 16, n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    st = ids ? s->be.tokenize(s->be.ctx, g.api.text.s, g.api.text.len, g.api.add_special_tokens,
                              ids, cap, &n)
             : MOE_ERR_NOMEM;
    if (st == MOE_OK && n > cap) {
        free(ids);
        cap = n;
        ids = malloc(cap * sizeof(int32_t));
        st = ids ? s->be.tokenize(s->be.ctx, g.api.text.s, g.api.text.len,
                                  g.api.add_special_tokens, ids, cap, &n)
                 : MOE_ERR_NOMEM;
    }
    moe_http_gen_free(&g);
    if (st != MOE_OK) {
        free(ids);
        return moe_http_reply_error(conn, moe_http_status_from_moe(st), moe_error_message(), "prompt");
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "count", (double)n);
    cJSON_AddNumberToObject(o, "max_model_len", s->cfg.limits.context_len);
    cJSON *t = cJSON_AddArrayToObject(o, "tokens");
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(t, cJSON_CreateNumber(ids[i]));
    free(ids);
    return moe_http_reply_json(conn, 200, o);
}

enum MHD_Result moe_http_handle_detokenize(moe_http_server *s, struct MHD_Connection *conn,
                                         const cJSON *body)
{
    if (!s->cfg.tokenizer)
        return moe_http_reply_error(conn, 501, "detokenize: no tokenizer configured", NULL);
    const cJSON *toks = cJSON_GetObjectItemCaseSensitive(body, "tokens");
    if (!cJSON_IsArray(toks))
        return moe_http_reply_error(conn, 400, "tokens: expected an array of token ids", "tokens");
    int n = cJSON_GetArraySize(toks), i = 0;
    int32_t *ids = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!ids)
        return moe_http_reply_error(conn, 500, "out of memory", NULL);
    const cJSON *e;
    cJSON_ArrayForEach(e, toks)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble != (double)(int32_t)e->valuedouble ||
            e->valuedouble < 0 || e->valuedouble >= s->cfg.limits.vocab_size) {
            free(ids);
            char m[160];
            snprintf(m, sizeof(m), "tokens[%d]: not a token id (vocabulary size %" PRId32 ")", i,
                     s->cfg.limits.vocab_size);
            return moe_http_reply_error(conn, 400, m, "tokens");
        }
        ids[i++] = (int32_t)e->valuedouble;
    }
    size_t need = 0;
    moe_status st = moe_tokenizer_decode(s->cfg.tokenizer, ids, (size_t)n, false, NULL, 0, &need);
    char *text = st == MOE_OK ? malloc(need + 1) : NULL;
    if (text)
        st = moe_tokenizer_decode(s->cfg.tokenizer, ids, (size_t)n, false, text, need + 1, &need);
    free(ids);
    if (st != MOE_OK || !text) {
        free(text);
        return moe_http_reply_error(conn, st == MOE_OK ? 500 : moe_http_status_from_moe(st),
                           st == MOE_OK ? "out of memory" : moe_error_message(), "tokens");
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "prompt", text);
    free(text);
    return moe_http_reply_json(conn, 200, o);
}
