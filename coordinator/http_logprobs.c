/* The log-probabilities of generated tokens in OpenAI's two shapes (completions' parallel arrays,
 * chat's content list), with each token's string, bytes and text offset. */
#include "coordinator/http_internal.h"

#include <stdlib.h>
#include <string.h>

/* One id decoded alone (special tokens kept, as vLLM's logprobs show them); "" on failure. */
static char *token_str(const moe_tokenizer *tok, int32_t id)
{
    size_t need = 0;
    char *t = NULL;
    if (tok && moe_tokenizer_decode(tok, &id, 1, false, NULL, 0, &need) == MOE_OK &&
        (t = malloc(need + 1)) &&
        moe_tokenizer_decode(tok, &id, 1, false, t, need + 1, &need) == MOE_OK)
        return t;
    free(t);
    return strdup("");
}

static cJSON *bytes_of(const char *s)
{
    cJSON *a = cJSON_CreateArray();
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(*p));
    return a;
}

/* Characters (code points), as OpenAI's and vLLM's text_offset count them. */
static size_t chars_of(const char *s)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; p && *p; p++)
        n += (*p & 0xC0) != 0x80;
    return n;
}

size_t moe_http_logprobs_text_len(const moe_http_logprobs *lp)
{
    size_t n = 0;
    for (size_t i = 0; lp && i < lp->n; i++) {
        char *t = token_str(lp->tok, lp->ids[i]);
        n += chars_of(t);
        free(t);
    }
    return n;
}

cJSON *moe_http_logprobs_json(const moe_http_logprobs *lp, bool chat)
{
    cJSON *o = cJSON_CreateObject();
    if (chat) {
        cJSON *content = cJSON_AddArrayToObject(o, "content");
        for (size_t i = 0; i < lp->n; i++) {
            const moe_token_logprobs *t = &lp->lp[i];
            cJSON *e = cJSON_CreateObject();
            char *s = token_str(lp->tok, lp->ids[i]);
            cJSON_AddStringToObject(e, "token", s);
            cJSON_AddNumberToObject(e, "logprob", t->logprob);
            cJSON_AddItemToObject(e, "bytes", bytes_of(s));
            free(s);
            cJSON *top = cJSON_AddArrayToObject(e, "top_logprobs");
            for (int k = 0; k < t->n_top; k++) {
                cJSON *x = cJSON_CreateObject();
                char *ts = token_str(lp->tok, t->top_ids[k]);
                cJSON_AddStringToObject(x, "token", ts);
                cJSON_AddNumberToObject(x, "logprob", t->top_logprobs[k]);
                cJSON_AddItemToObject(x, "bytes", bytes_of(ts));
                free(ts);
                cJSON_AddItemToArray(top, x);
            }
            cJSON_AddItemToArray(content, e);
        }
        cJSON_AddNullToObject(o, "refusal");
        return o;
    }
    cJSON *tokens = cJSON_AddArrayToObject(o, "tokens");
    cJSON *tlp = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *top = cJSON_AddArrayToObject(o, "top_logprobs");
    cJSON *off = cJSON_AddArrayToObject(o, "text_offset");
    size_t at = lp->offset;
    for (size_t i = 0; i < lp->n; i++) {
        const moe_token_logprobs *t = &lp->lp[i];
        char *s = token_str(lp->tok, lp->ids[i]);
        cJSON_AddItemToArray(tokens, cJSON_CreateString(s));
        cJSON_AddItemToArray(tlp, cJSON_CreateNumber(t->logprob));
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)at));
        at += chars_of(s);
        free(s);
        /* {token string: logprob}; two ids decoding alike keep the likelier (listed first) */
        cJSON *m = cJSON_CreateObject();
        for (int k = 0; k < t->n_top; k++) {
            char *ts = token_str(lp->tok, t->top_ids[k]);
            if (!cJSON_GetObjectItemCaseSensitive(m, ts))
                cJSON_AddNumberToObject(m, ts, t->top_logprobs[k]);
            free(ts);
        }
        cJSON_AddItemToArray(top, m);
    }
    return o;
}

