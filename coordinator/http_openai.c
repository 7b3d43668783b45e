/* The OpenAI protocol of the HTTP front end: completion and chat request bodies into the
 * protocol-neutral moe_api_request (types checked field by field, as OpenAI answers: 400 naming
 * the field; unknown fields ignored), chat messages through the model's template, and the
 * response, chunk and error objects. */
#include "coordinator/http_internal.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const moe_api_names moe_api_names_http = {
    .request_id = "X-Request-Id",
    .text = "prompt",
    .token_ids = "prompt",
    .token_ids_item = "prompt",
    .prompt = "prompt",
    .max_new_tokens = "max_tokens",
    .temperature = "temperature",
    .top_p = "top_p",
    .top_k = "top_k",
    .seed = "seed",
    .stop = "stop",
    .stop_token_ids = "stop_token_ids",
    .presence_penalty = "presence_penalty",
    .frequency_penalty = "frequency_penalty",
    .repetition_penalty = "repetition_penalty",
    .top_logprobs = "top_logprobs",
    .prefill_group = "n",
};

/* U+F0000 (plane 15 private use) stands in for \u0000 while cJSON parses. */
#define NUL_MARK "\xF3\xB0\x80\x80"
#define NUL_MARK_ESC "\\uDB80\\uDC00"

static moe_status bad(moe_http_gen *g, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static moe_status bad(moe_http_gen *g, const char *param, const char *fmt, ...)
{
    char m[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof(m), fmt, ap);
    va_end(ap);
    if (g)
        snprintf(g->param, sizeof(g->param), "%s", param);
    return moe_error(MOE_ERR_INVALID_ARG, "%s", m);
}

static const char *type_name(const cJSON *v)
{
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "null";
}

/* Present and not null. */
static const cJSON *field(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return (v && !cJSON_IsNull(v)) ? v : NULL;
}

static moe_status get_int(const cJSON *o, const char *key, moe_http_gen *g, bool *has, int64_t *out)
{
    const cJSON *v = field(o, key);
    *has = v != NULL;
    if (!v)
        return MOE_OK;
    if (!cJSON_IsNumber(v))
        return bad(g, key, "%s: expected an integer, got %s", key, type_name(v));
    double d = v->valuedouble;
    if (d != floor(d) || !(fabs(d) < 9.2e18))
        return bad(g, key, "%s = %g: expected an integer", key, d);
    *out = (int64_t)d;
    return MOE_OK;
}

static moe_status get_num(const cJSON *o, const char *key, moe_http_gen *g, bool *has, double *out)
{
    const cJSON *v = field(o, key);
    *has = v != NULL;
    if (!v)
        return MOE_OK;
    if (!cJSON_IsNumber(v))
        return bad(g, key, "%s: expected a number, got %s", key, type_name(v));
    *out = v->valuedouble;
    return MOE_OK;
}

static moe_status get_bool(const cJSON *o, const char *key, moe_http_gen *g, bool dflt, bool *out)
{
    const cJSON *v = field(o, key);
    *out = dflt;
    if (!v)
        return MOE_OK;
    if (!cJSON_IsBool(v))
        return bad(g, key, "%s: expected a boolean, got %s", key, type_name(v));
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

static moe_api_str str_of(const cJSON *v)
{
    return (moe_api_str){.s = v->valuestring, .len = strlen(v->valuestring)};
}

static moe_status parse_prompt(const cJSON *body, moe_http_gen *g)
{
    const cJSON *p = field(body, "prompt");
    moe_api_request *r = &g->api;
    if (!p)
        return bad(g, "prompt", "prompt: required");
    if (cJSON_IsString(p)) {
        r->has_text = true;
        r->text = str_of(p);
        return MOE_OK;
    }
    if (!cJSON_IsArray(p))
        return bad(g, "prompt", "prompt: expected a string, an array of strings or of token ids, "
                                "got %s", type_name(p));
    int n = cJSON_GetArraySize(p);
    if (n == 0)
        return bad(g, "prompt", "prompt: empty array");
    const cJSON *first = cJSON_GetArrayItem(p, 0);
    if (cJSON_IsString(first) || cJSON_IsArray(first)) {
        if (n > 1)
            return bad(g, "prompt", "prompt: %d prompts in one request are not supported (send "
                                    "one per request)", n);
        if (cJSON_IsString(first)) {
            r->has_text = true;
            r->text = str_of(first);
            return MOE_OK;
        }
        p = first;
        n = cJSON_GetArraySize(p);
        if (n == 0)
            return bad(g, "prompt", "prompt[0]: empty array");
    }
    g->ids = malloc((size_t)n * sizeof(int64_t));
    if (!g->ids)
        return moe_error(MOE_ERR_NOMEM, "prompt: out of memory");
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, p)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) ||
            !(fabs(e->valuedouble) < 9.2e18))
            return bad(g, "prompt", "prompt[%d]: expected a token id (an integer), got %s", i,
                       cJSON_IsNumber(e) ? "a fraction" : type_name(e));
        g->ids[i++] = (int64_t)e->valuedouble;
    }
    r->has_token_ids = true;
    r->token_ids = g->ids;
    r->n_token_ids = (size_t)n;
    return MOE_OK;
}

/* messages, normalized for the template: content parts joined (as vLLM's "string" content
 * format does), roles and contents type-checked. */
static moe_status normalize_messages(const cJSON *msgs, moe_http_gen *g, cJSON **out)
{
    *out = NULL;
    if (!msgs)
        return bad(g, "messages", "messages: required");
    if (!cJSON_IsArray(msgs))
        return bad(g, "messages", "messages: expected an array, got %s", type_name(msgs));
    if (cJSON_GetArraySize(msgs) == 0)
        return bad(g, "messages", "messages: empty array");
    cJSON *copy = cJSON_Duplicate(msgs, 1);
    if (!copy)
        return moe_error(MOE_ERR_NOMEM, "messages: out of memory");
    int i = 0;
    cJSON *m;
    cJSON_ArrayForEach(m, copy)
    {
        char where[64];
        snprintf(where, sizeof(where), "messages[%d]", i);
        if (!cJSON_IsObject(m)) {
            cJSON_Delete(copy);
            return bad(g, "messages", "%s: expected an object, got %s", where, type_name(m));
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role)) {
            cJSON_Delete(copy);
            return bad(g, "messages", "%s.role: expected a string, got %s", where,
                       role ? type_name(role) : "nothing");
        }
        cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (cJSON_IsArray(content)) {
            size_t total = 0;
            const cJSON *part;
            int k = 0;
            cJSON_ArrayForEach(part, content)
            {
                const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
                const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
                if (!cJSON_IsObject(part) || !cJSON_IsString(type) ||
                    strcmp(type->valuestring, "text") != 0 || !cJSON_IsString(text)) {
                    cJSON_Delete(copy);
                    return bad(g, "messages", "%s.content[%d]: only {\"type\": \"text\", \"text\": "
                                              "...} parts are supported", where, k);
                }
                total += strlen(text->valuestring) + 1;
                k++;
            }
            char *joined = malloc(total + 1), *o = joined;
            if (!joined) {
                cJSON_Delete(copy);
                return moe_error(MOE_ERR_NOMEM, "messages: out of memory");
            }
            k = 0;
            cJSON_ArrayForEach(part, content)
            {
                const char *t = cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring;
                if (k++)
                    *o++ = '\n';
                size_t l = strlen(t);
                memcpy(o, t, l);
                o += l;
            }
            *o = '\0';
            cJSON_ReplaceItemInObjectCaseSensitive(m, "content", cJSON_CreateString(joined));
            free(joined);
        } else if (content && !cJSON_IsString(content) && !cJSON_IsNull(content)) {
            cJSON_Delete(copy);
            return bad(g, "messages", "%s.content: expected a string or an array of content "
                                      "parts, got %s", where, type_name(content));
        }
        i++;
    }
    *out = copy;
    return MOE_OK;
}

static moe_status parse_chat(const cJSON *body, const moe_chat_template *tpl,
                             const char *tpl_error, moe_http_gen *g)
{
    if (!tpl)
        return bad(g, "messages", "chat is not available for this model: %s",
                   tpl_error ? tpl_error : "it has no chat template");
    cJSON *msgs;
    moe_status st = normalize_messages(field(body, "messages"), g, &msgs);
    if (st != MOE_OK)
        return st;
    bool gen;
    if ((st = get_bool(body, "add_generation_prompt", g, true, &gen)) != MOE_OK) {
        cJSON_Delete(msgs);
        return st;
    }
    /* The template's other variables: tools, and chat_template_kwargs (vLLM's extension, e.g.
     * enable_thinking), which win. */
    cJSON *extra = cJSON_CreateObject();
    const cJSON *tools = field(body, "tools");
    const cJSON *kw = field(body, "chat_template_kwargs");
    if (kw && !cJSON_IsObject(kw)) {
        cJSON_Delete(msgs);
        cJSON_Delete(extra);
        return bad(g, "chat_template_kwargs", "chat_template_kwargs: expected an object, got %s",
                   type_name(kw));
    }
    if (tools)
        cJSON_AddItemToObject(extra, "tools", cJSON_Duplicate(tools, 1));
    const cJSON *e;
    cJSON_ArrayForEach(e, kw)
    {
        cJSON_DeleteItemFromObjectCaseSensitive(extra, e->string);
        cJSON_AddItemToObject(extra, e->string, cJSON_Duplicate(e, 1));
    }
    size_t len;
    st = moe_chat_template_render(tpl, msgs, extra, gen, 0, &g->rendered, &len);
    cJSON_Delete(msgs);
    cJSON_Delete(extra);
    if (st != MOE_OK) {
        snprintf(g->param, sizeof(g->param), "messages");
        return st;
    }
    g->api.has_text = true;
    g->api.text = (moe_api_str){g->rendered, len};
    return MOE_OK;
}

static moe_status parse_stop(const cJSON *body, moe_http_gen *g)
{
    const cJSON *s = field(body, "stop");
    if (!s)
        return MOE_OK;
    if (cJSON_IsString(s)) {
        g->stops = malloc(sizeof(moe_api_str));
        if (!g->stops)
            return moe_error(MOE_ERR_NOMEM, "stop: out of memory");
        g->stops[0] = str_of(s);
        g->api.n_stop = 1;
    } else if (cJSON_IsArray(s)) {
        int n = cJSON_GetArraySize(s), i = 0;
        g->stops = malloc((size_t)(n ? n : 1) * sizeof(moe_api_str));
        if (!g->stops)
            return moe_error(MOE_ERR_NOMEM, "stop: out of memory");
        const cJSON *e;
        cJSON_ArrayForEach(e, s)
        {
            if (!cJSON_IsString(e))
                return bad(g, "stop", "stop[%d]: expected a string, got %s", i, type_name(e));
            g->stops[i++] = str_of(e);
        }
        g->api.n_stop = (size_t)n;
    } else {
        return bad(g, "stop", "stop: expected a string or an array of strings, got %s",
                   type_name(s));
    }
    g->api.stop = g->stops;
    const cJSON *ids = field(body, "stop_token_ids");
    if (ids) {
        if (!cJSON_IsArray(ids))
            return bad(g, "stop_token_ids", "stop_token_ids: expected an array of integers");
        int n = cJSON_GetArraySize(ids), i = 0;
        g->stop_ids = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
        if (!g->stop_ids)
            return moe_error(MOE_ERR_NOMEM, "stop_token_ids: out of memory");
        const cJSON *e;
        cJSON_ArrayForEach(e, ids)
        {
            if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble))
                return bad(g, "stop_token_ids", "stop_token_ids[%d]: expected an integer", i);
            g->stop_ids[i++] = (int64_t)e->valuedouble;
        }
        g->api.stop_token_ids = g->stop_ids;
        g->api.n_stop_token_ids = (size_t)n;
    }
    return MOE_OK;
}

/* n, best_of, logprobs, penalties, echo: accepted, or refused by name when not supported (rather
 * than ignored, so that a client never gets silently different results). */
static moe_status parse_choices_and_sampling(const cJSON *body, moe_http_gen *g)
{
    bool has;
    int64_t iv;
    moe_status st;
    if ((st = get_int(body, "n", g, &has, &iv)) != MOE_OK)
        return st;
    if (has && (iv < 1 || iv > MOE_HTTP_MAX_N))
        return bad(g, "n", "n = %" PRId64 ": must be in [1, %d]", iv, MOE_HTTP_MAX_N);
    g->n = has ? (int)iv : 1;
    if ((st = get_int(body, "best_of", g, &has, &iv)) != MOE_OK)
        return st;
    if (has && iv != 1)
        return bad(g, "best_of", "best_of = %" PRId64 ": only 1 is supported", iv);
    moe_api_request *r = &g->api;
    if (g->chat) { /* chat: logprobs a boolean, top_logprobs how many */
        if ((st = get_bool(body, "logprobs", g, false, &r->logprobs)) != MOE_OK ||
            (st = get_int(body, "top_logprobs", g, &has, &iv)) != MOE_OK)
            return st;
        if (has && !r->logprobs && iv > 0)
            return bad(g, "top_logprobs", "top_logprobs: requires logprobs: true");
        r->top_logprobs = has ? iv : 0;
    } else { /* completions: logprobs is the number of top tokens (0: the chosen one only) */
        if ((st = get_int(body, "logprobs", g, &has, &iv)) != MOE_OK)
            return st;
        if (has && (iv < 0 || iv > MOE_MAX_TOP_LOGPROBS))
            return bad(g, "logprobs", "logprobs = %" PRId64 ": must be in [0, %d]", iv,
                       MOE_MAX_TOP_LOGPROBS);
        r->logprobs = has;
        r->top_logprobs = has ? iv : 0;
    }
    /* ranges are validation's (shared with gRPC), which names the field */
    if ((st = get_num(body, "presence_penalty", g, &r->has_presence_penalty,
                      &r->presence_penalty)) != MOE_OK ||
        (st = get_num(body, "frequency_penalty", g, &r->has_frequency_penalty,
                      &r->frequency_penalty)) != MOE_OK ||
        (st = get_num(body, "repetition_penalty", g, &r->has_repetition_penalty,
                      &r->repetition_penalty)) != MOE_OK)
        return st;
    /* echo (completions): the prompt's text before each choice's. Prompt logprobs (echo with
     * logprobs) would need the engine's logits at every prompt position, which it does not
     * compute: refused by name rather than answered without them. */
    if ((st = get_bool(body, "echo", g, false, &g->echo)) != MOE_OK)
        return st;
    if (g->echo && g->chat)
        return bad(g, "echo", "echo: only on /v1/completions");
    if (g->echo && r->logprobs)
        return bad(g, "echo", "echo with logprobs: the prompt tokens' log-probabilities are not "
                              "supported; send echo without logprobs, or logprobs without echo");
    return MOE_OK;
}

moe_status moe_http_parse_gen(const cJSON *body, bool chat, const moe_chat_template *tpl,
                              const char *tpl_error, moe_http_gen *g)
{
    memset(g, 0, sizeof(*g));
    g->chat = chat;
    moe_api_request *r = &g->api;
    r->names = &moe_api_names_http;
    if (!cJSON_IsObject(body))
        return bad(g, "", "request body: expected a JSON object");
    moe_status st;
    const cJSON *model = field(body, "model");
    if (model && !cJSON_IsString(model))
        return bad(g, "model", "model: expected a string, got %s", type_name(model));
    g->model = model ? model->valuestring : NULL;
    const cJSON *user = field(body, "user");
    if (user && !cJSON_IsString(user))
        return bad(g, "user", "user: expected a string, got %s", type_name(user));
    if ((st = parse_choices_and_sampling(body, g)) != MOE_OK)
        return st;

    bool has;
    int64_t iv;
    const char *mt = field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if ((st = get_int(body, mt, g, &has, &iv)) != MOE_OK)
        return st;
    if (has && iv < 1)
        return bad(g, mt, "%s = %" PRId64 ": must be >= 1", mt, iv);
    r->max_new_tokens = has ? iv : 0;
    if ((st = get_num(body, "temperature", g, &r->has_temperature, &r->temperature)) != MOE_OK ||
        (st = get_num(body, "top_p", g, &r->has_top_p, &r->top_p)) != MOE_OK ||
        (st = get_int(body, "top_k", g, &has, &iv)) != MOE_OK)
        return st;
    r->top_k = (has && iv != -1) ? iv : 0; /* -1: off, as vLLM */
    if ((st = get_int(body, "seed", g, &r->has_seed, &iv)) != MOE_OK)
        return st;
    r->seed = (uint64_t)iv;
    if ((st = get_int(body, "priority", g, &has, &iv)) != MOE_OK)
        return st;
    if (has && (iv < INT32_MIN || iv > INT32_MAX))
        return bad(g, "priority", "priority = %" PRId64 ": out of range", iv);
    r->priority = has ? (int32_t)iv : 0;
    if ((st = get_bool(body, "ignore_eos", g, false, &r->ignore_eos)) != MOE_OK ||
        (st = get_bool(body, "include_stop_str_in_output", g, false,
                       &r->include_stop_str_in_output)) != MOE_OK ||
        (st = get_bool(body, "add_special_tokens", g, !chat, &r->add_special_tokens)) != MOE_OK ||
        (st = get_bool(body, "stream", g, false, &g->stream)) != MOE_OK)
        return st;
    const cJSON *so = field(body, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so))
            return bad(g, "stream_options", "stream_options: expected an object, got %s",
                       type_name(so));
        if (!g->stream)
            return bad(g, "stream_options", "stream_options: only allowed with stream: true");
        if ((st = get_bool(so, "include_usage", g, false, &g->include_usage)) != MOE_OK)
            return st;
    }
    if ((st = parse_stop(body, g)) != MOE_OK)
        return st;
    return chat ? parse_chat(body, tpl, tpl_error, g) : parse_prompt(body, g);
}

void moe_http_gen_free(moe_http_gen *g)
{
    free(g->stops);
    free(g->ids);
    free(g->stop_ids);
    free(g->rendered);
    memset(g, 0, sizeof(*g));
}

/* ---------------------------------------------------------------------------------------------
 * JSON in, with NULs found */

moe_status moe_http_parse_json(const char *body, size_t len, cJSON **out, bool *nul_marks)
{
    *out = NULL;
    *nul_marks = false;
    const char *raw = memchr(body, '\0', len);
    if (raw)
        return moe_error(MOE_ERR_INVALID_ARG, "request body: a raw NUL byte at offset %zu",
                         (size_t)(raw - body));
    /* \u0000 preceded by an even run of backslashes is an escaped NUL */
    bool any = false;
    for (size_t i = 0; i < len && !any; i++) {
        if (body[i] != '\\')
            continue;
        size_t run = 1;
        while (i + run < len && body[i + run] == '\\')
            run++;
        any = run % 2 == 1 && i + run + 5 <= len && body[i + run] == 'u' &&
              memcmp(body + i + run + 1, "0000", 4) == 0;
        i += run - 1;
    }
    char *copy = NULL;
    size_t o = 0;
    if (any && !(copy = malloc(len * 3 + 1)))
        return moe_error(MOE_ERR_NOMEM, "request body: out of memory");
    if (copy) {
        /* second pass: build the copy with every escaped NUL replaced */
        o = 0;
        for (size_t i = 0; i < len;) {
            if (body[i] == '\\') {
                size_t run = 1;
                while (i + run < len && body[i + run] == '\\')
                    run++;
                if (run % 2 == 1 && i + run + 5 <= len && body[i + run] == 'u' &&
                    memcmp(body + i + run + 1, "0000", 4) == 0) {
                    memcpy(copy + o, body + i, run - 1); /* the escaped backslash pairs */
                    o += run - 1;
                    memcpy(copy + o, NUL_MARK_ESC, strlen(NUL_MARK_ESC));
                    o += strlen(NUL_MARK_ESC);
                    i += run + 5;
                    *nul_marks = true;
                    continue;
                }
                memcpy(copy + o, body + i, run);
                o += run;
                i += run;
                continue;
            }
            copy[o++] = body[i++];
        }
        copy[o] = '\0';
    }
    const char *src = copy ? copy : body;
    size_t slen = copy ? o : len;
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(src, slen, &end, 0);
    size_t at = end ? (size_t)(end - src) : 0;
    while (j && at < slen && (src[at] == ' ' || src[at] == '\t' || src[at] == '\n' || src[at] == '\r'))
        at++;
    if (!j || at < slen) {
        cJSON_Delete(j);
        free(copy);
        return moe_error(MOE_ERR_INVALID_ARG, "request body: not valid JSON (near byte %zu)", at);
    }
    free(copy);
    *out = j;
    return MOE_OK;
}

static moe_status check_nul_at(const cJSON *v, char *path, size_t cap, size_t plen)
{
    if (cJSON_IsString(v) && strstr(v->valuestring, NUL_MARK))
        return moe_error(MOE_ERR_INVALID_ARG,
                         "%s: holds a NUL byte (NUL is not allowed in strings)", path);
    int i = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, v)
    {
        if (cJSON_IsObject(v)) {
            if (strstr(c->string, NUL_MARK))
                return moe_error(MOE_ERR_INVALID_ARG, "a key under %s holds a NUL byte",
                                 plen ? path : "the body");
            snprintf(path + plen, cap - plen, "%s%s", plen ? "." : "", c->string);
        } else {
            snprintf(path + plen, cap - plen, "[%d]", i);
        }
        i++;
        moe_status st = check_nul_at(c, path, cap, strlen(path));
        if (st != MOE_OK)
            return st;
        path[plen] = '\0';
    }
    return MOE_OK;
}

moe_status moe_http_check_nul(const cJSON *tree, char *param, size_t cap)
{
    char path[512] = "";
    moe_status st = check_nul_at(tree, path, sizeof(path), 0);
    if (st != MOE_OK) {
        /* the top-level field is the OpenAI "param" */
        size_t n = strcspn(path, ".[");
        snprintf(param, cap, "%.*s", (int)n, path);
    }
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * JSON out */

int moe_http_status_from_moe(moe_status s)
{
    switch (s) {
    case MOE_ERR_INVALID_ARG:
    case MOE_ERR_RANGE:
    case MOE_ERR_FORMAT: return 400;
    case MOE_ERR_NOT_FOUND: return 404;
    case MOE_ERR_FULL: return 429;
    case MOE_ERR_UNAVAILABLE: return 503;
    case MOE_ERR_TIMEOUT: return 504;
    case MOE_ERR_UNSUPPORTED: return 501;
    default: return 500;
    }
}

char *moe_http_error_json(int status, const char *message, const char *param)
{
    const char *type = status == 429   ? "rate_limit_error"
                       : status == 503 ? "service_unavailable"
                       : status >= 500 ? "server_error"
                                       : "invalid_request_error";
    const char *code = status == 400   ? "invalid_value"
                       : status == 404 ? "not_found"
                       : status == 405 ? "method_not_allowed"
                       : status == 413 ? "request_too_large"
                       : status == 429 ? "rate_limit_exceeded"
                       : status == 503 ? "unavailable"
                                       : "internal_error";
    cJSON *o = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "message", message ? message : "");
    cJSON_AddStringToObject(e, "type", type);
    if (param && param[0])
        cJSON_AddStringToObject(e, "param", param);
    else
        cJSON_AddNullToObject(e, "param");
    cJSON_AddStringToObject(e, "code", code);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

const char *moe_http_finish_name(moe_finish_reason f)
{
    return f == MOE_FINISH_LENGTH ? "length" : "stop"; /* OpenAI's: EOS and stops are "stop" */
}

static cJSON *text_item(const char *text, size_t len)
{
    /* cJSON strings are NUL-terminated: copy the exact span */
    char *t = malloc(len + 1);
    if (!t)
        return NULL;
    memcpy(t, text, len);
    t[len] = '\0';
    cJSON *s = cJSON_CreateString(t);
    free(t);
    return s;
}

static void add_logprobs(cJSON *c, const moe_http_logprobs *lp, bool chat)
{
    if (lp)
        cJSON_AddItemToObject(c, "logprobs", moe_http_logprobs_json(lp, chat));
    else
        cJSON_AddNullToObject(c, "logprobs");
}

static cJSON *envelope(const moe_http_resp_info *ri, const char *object)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", ri->id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddNumberToObject(o, "created", (double)ri->created);
    cJSON_AddStringToObject(o, "model", ri->model);
    return o;
}

static void add_usage(cJSON *o, const moe_http_resp_info *ri)
{
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", ri->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", ri->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", (double)ri->prompt_tokens + ri->completion_tokens);
}

static char *finish_print(cJSON *o)
{
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

char *moe_http_full_response(const moe_http_resp_info *ri, const moe_http_choice *ch, int n)
{
    cJSON *o = envelope(ri, ri->chat ? "chat.completion" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < n; i++) {
        cJSON *c = cJSON_CreateObject();
        cJSON_AddItemToArray(choices, c);
        cJSON_AddNumberToObject(c, "index", i);
        if (ri->chat) {
            cJSON *m = cJSON_AddObjectToObject(c, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            cJSON_AddItemToObject(m, "content", text_item(ch[i].text, ch[i].len));
        } else {
            cJSON_AddItemToObject(c, "text", text_item(ch[i].text, ch[i].len));
        }
        add_logprobs(c, ch[i].lp, ri->chat);
        cJSON_AddStringToObject(c, "finish_reason", ch[i].finish);
    }
    add_usage(o, ri);
    return finish_print(o);
}

char *moe_http_chunk(const moe_http_resp_info *ri, int index, const char *text, size_t len,
                     bool role, const char *finish, const moe_http_logprobs *lp)
{
    cJSON *o = envelope(ri, ri->chat ? "chat.completion.chunk" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices"), *c = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, c);
    cJSON_AddNumberToObject(c, "index", index);
    if (ri->chat) {
        cJSON *d = cJSON_AddObjectToObject(c, "delta");
        if (role)
            cJSON_AddStringToObject(d, "role", "assistant");
        if (len > 0 || role)
            cJSON_AddItemToObject(d, "content", text_item(text, len));
    } else {
        cJSON_AddItemToObject(c, "text", text_item(text, len));
    }
    add_logprobs(c, lp, ri->chat);
    if (finish)
        cJSON_AddStringToObject(c, "finish_reason", finish);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    return finish_print(o);
}

char *moe_http_usage_chunk(const moe_http_resp_info *ri)
{
    cJSON *o = envelope(ri, ri->chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddArrayToObject(o, "choices");
    add_usage(o, ri);
    return finish_print(o);
}
