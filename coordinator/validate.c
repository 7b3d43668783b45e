/* Request validation for the public API: every limit check and default of a GenerateRequest. */
#include "coordinator/validate.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

void moe_validate_limits_default(moe_validate_limits *lim, int32_t vocab_size,
                                 uint32_t context_len)
{
    memset(lim, 0, sizeof(*lim));
    lim->vocab_size = vocab_size;
    lim->context_len = context_len;
    lim->max_new_tokens = context_len;
    lim->default_max_new_tokens = context_len < 256 ? context_len : 256;
    lim->max_prompt_bytes = 1u << 20;
    lim->max_stop = 16;
    lim->max_stop_bytes = 256;
    lim->max_stop_token_ids = 64;
}

long moe_validate_utf8(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) {
            n = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            n = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            n = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return (long)i;
        }
        if (len - i < n)
            return (long)i;
        for (size_t k = 1; k < n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return (long)i;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return (long)i;
        i += n;
    }
    return -1;
}

/* Seeds and request ids only need to differ between requests, not to be secret; getrandom can
 * only fail on exotic kernels, where a clock-and-counter mix is still unique enough. */
static uint64_t random_u64(void)
{
    uint64_t v;
    if (getrandom(&v, sizeof(v), 0) == (ssize_t)sizeof(v))
        return v;
    static _Atomic uint64_t counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    v = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (++counter * 0x9E3779B97F4A7C15ull);
    return v;
}

static moe_status check_sampling(const Moeserve__V1__SamplingParams *sp, moe_gen_request *r)
{
    r->temperature = 1.0f;
    r->top_p = 1.0f;
    r->top_k = 0;
    r->seed = random_u64();
    if (!sp)
        return MOE_OK;
    if (sp->temperature_opt_case == MOESERVE__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE) {
        if (!isfinite(sp->temperature) || sp->temperature < 0.0f)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.sampling.temperature = %g: must be >= 0 (0 = greedy)",
                             (double)sp->temperature);
        r->temperature = sp->temperature;
    }
    if (sp->top_p_opt_case == MOESERVE__V1__SAMPLING_PARAMS__TOP_P_OPT_TOP_P) {
        /* NaN fails both comparisons, hence the negated form. */
        if (!(sp->top_p > 0.0f && sp->top_p <= 1.0f))
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.sampling.top_p = %g: must be in (0, 1]",
                             (double)sp->top_p);
        r->top_p = sp->top_p;
    }
    if (sp->top_k < 0)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.sampling.top_k = %" PRId32 ": must be >= 0 (0 = off)",
                         sp->top_k);
    r->top_k = sp->top_k;
    if (sp->seed_opt_case == MOESERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED)
        r->seed = sp->seed;
    return MOE_OK;
}

static moe_status check_request_id(const char *id, moe_gen_request *r)
{
    size_t len = id ? strlen(id) : 0;
    if (len == 0) {
        snprintf(r->request_id, sizeof(r->request_id), "req-%016" PRIx64, random_u64());
        return MOE_OK;
    }
    if (len > MOE_REQUEST_ID_MAX)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.request_id: %zu bytes, over the limit of %d bytes", len,
                         MOE_REQUEST_ID_MAX);
    /* Ids go into log lines and status messages: keep them one printable line. */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)id[i];
        if (c < 0x20 || c > 0x7E)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.request_id: byte %zu (0x%02x) is not printable ASCII",
                             i, c);
    }
    memcpy(r->request_id, id, len + 1);
    return MOE_OK;
}

static moe_status check_stops(const moe_validate_limits *lim,
                              const Moeserve__V1__GenerateRequest *msg, moe_validated *v)
{
    if (msg->n_stop > lim->max_stop)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.stop: %zu stop strings, over the limit of %" PRIu32,
                         msg->n_stop, lim->max_stop);
    for (size_t i = 0; i < msg->n_stop; i++) {
        size_t len = strlen(msg->stop[i]);
        if (len == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "GenerateRequest.stop[%zu] is empty", i);
        if (len > lim->max_stop_bytes)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.stop[%zu]: %zu bytes, over the limit of %" PRIu32
                             " bytes",
                             i, len, lim->max_stop_bytes);
        long bad = moe_validate_utf8(msg->stop[i], len);
        if (bad >= 0)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.stop[%zu]: invalid UTF-8 at byte %ld", i, bad);
    }
    v->req.stop = (const char *const *)msg->stop;
    v->req.n_stop = (uint32_t)msg->n_stop;

    if (msg->n_stop_token_ids > lim->max_stop_token_ids)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.stop_token_ids: %zu ids, over the limit of %" PRIu32,
                         msg->n_stop_token_ids, lim->max_stop_token_ids);
    if (msg->n_stop_token_ids > 0) {
        v->stop_ids_buf = malloc(msg->n_stop_token_ids * sizeof(int32_t));
        if (!v->stop_ids_buf)
            return moe_error(MOE_ERR_NOMEM, "GenerateRequest.stop_token_ids: out of memory");
        for (size_t i = 0; i < msg->n_stop_token_ids; i++) {
            uint32_t id = msg->stop_token_ids[i];
            if (id >= (uint32_t)lim->vocab_size)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "GenerateRequest.stop_token_ids[%zu] = %" PRIu32
                                 ": not a token id (vocabulary size %" PRId32 ")",
                                 i, id, lim->vocab_size);
            v->stop_ids_buf[i] = (int32_t)id;
        }
    }
    v->req.stop_token_ids = v->stop_ids_buf;
    v->req.n_stop_token_ids = (uint32_t)msg->n_stop_token_ids;
    return MOE_OK;
}

static moe_status check_prompt(const moe_validate_limits *lim,
                               const Moeserve__V1__GenerateRequest *msg,
                               moe_validate_tokenize_fn tokenize, void *tok_ctx, moe_validated *v)
{
    /* A prompt must leave room for at least one generated token. */
    const size_t max_prompt = lim->context_len > 0 ? lim->context_len - 1 : 0;
    size_t n = 0;

    if (msg->prompt_case == MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS) {
        const Moeserve__V1__TokenIds *t = msg->token_ids;
        n = t ? t->n_ids : 0;
        if (n == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "GenerateRequest.token_ids: empty prompt");
        if (n > max_prompt)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.token_ids: prompt is %zu tokens, over the limit of "
                             "%zu (context length %" PRIu32 " minus 1 token to generate)",
                             n, max_prompt, lim->context_len);
        v->prompt_buf = malloc(n * sizeof(int32_t));
        if (!v->prompt_buf)
            return moe_error(MOE_ERR_NOMEM, "GenerateRequest.token_ids: out of memory");
        for (size_t i = 0; i < n; i++) {
            if (t->ids[i] >= (uint32_t)lim->vocab_size)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "GenerateRequest.token_ids.ids[%zu] = %" PRIu32
                                 ": not a token id (vocabulary size %" PRId32 ")",
                                 i, t->ids[i], lim->vocab_size);
            v->prompt_buf[i] = (int32_t)t->ids[i];
        }
    } else if (msg->prompt_case == MOESERVE__V1__GENERATE_REQUEST__PROMPT_TEXT) {
        const char *text = msg->text ? msg->text : "";
        size_t len = strlen(text);
        if (len == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "GenerateRequest.text: empty prompt");
        if (len > lim->max_prompt_bytes)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.text: %zu bytes, over the limit of %" PRIu32 " bytes",
                             len, lim->max_prompt_bytes);
        long bad = moe_validate_utf8(text, len);
        if (bad >= 0)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.text: invalid UTF-8 at byte %ld", bad);
        bool add_special = msg->add_special_tokens_opt_case !=
                               MOESERVE__V1__GENERATE_REQUEST__ADD_SPECIAL_TOKENS_OPT_ADD_SPECIAL_TOKENS ||
                           msg->add_special_tokens;
        /* One more than allowed is enough to tell "too long" from "fits"; *n_out gives the real
         * count for the message. */
        size_t cap = max_prompt + 1;
        v->prompt_buf = malloc(cap * sizeof(int32_t));
        if (!v->prompt_buf)
            return moe_error(MOE_ERR_NOMEM, "GenerateRequest.text: out of memory");
        moe_status st = tokenize(tok_ctx, text, len, add_special, v->prompt_buf, cap, &n);
        if (st != MOE_OK)
            return moe_error_context(st, "GenerateRequest.text: tokenizing: ");
        if (n == 0)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.text: prompt tokenizes to 0 tokens");
        if (n > max_prompt)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "GenerateRequest.text: prompt is %zu tokens, over the limit of %zu "
                             "(context length %" PRIu32 " minus 1 token to generate)",
                             n, max_prompt, lim->context_len);
        for (size_t i = 0; i < n; i++) {
            /* A tokenizer bigger than the model's embedding would be a deployment error; refuse
             * the request rather than index past the embedding table. */
            if (v->prompt_buf[i] < 0 || v->prompt_buf[i] >= lim->vocab_size)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "GenerateRequest.text: token %zu of the prompt has id %" PRId32
                                 ", outside the model's vocabulary of %" PRId32,
                                 i, v->prompt_buf[i], lim->vocab_size);
        }
    } else {
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.prompt: empty prompt (set text or token_ids)");
    }
    v->req.prompt = v->prompt_buf;
    v->req.n_prompt = (uint32_t)n;
    return MOE_OK;
}

static moe_status check_max_new(const moe_validate_limits *lim,
                                const Moeserve__V1__GenerateRequest *msg, moe_gen_request *r)
{
    const uint32_t room = lim->context_len - r->n_prompt; /* >= 1 after check_prompt */
    uint32_t m = msg->max_new_tokens;
    if (m == 0) {
        m = lim->default_max_new_tokens < room ? lim->default_max_new_tokens : room;
        if (m == 0)
            m = 1;
    } else if (m > lim->max_new_tokens) {
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.max_new_tokens = %" PRIu32 ": over the limit of %" PRIu32,
                         m, lim->max_new_tokens);
    } else if (m > room) {
        return moe_error(MOE_ERR_INVALID_ARG,
                         "GenerateRequest.max_new_tokens = %" PRIu32 ": prompt (%" PRIu32
                         " tokens) + max_new_tokens = %" PRIu64 ", over the context length of %" PRIu32,
                         m, r->n_prompt, (uint64_t)r->n_prompt + m, lim->context_len);
    }
    r->max_new_tokens = m;
    return MOE_OK;
}

moe_status moe_validate_generate(const moe_validate_limits *lim,
                                 const Moeserve__V1__GenerateRequest *msg,
                                 moe_validate_tokenize_fn tokenize, void *tok_ctx,
                                 moe_validated *out)
{
    memset(out, 0, sizeof(*out));
    moe_gen_request *r = &out->req;
    moe_status st;
    /* Cheap checks first: a request that fails them costs no tokenization. */
    if ((st = check_request_id(msg->request_id, r)) != MOE_OK ||
        (st = check_sampling(msg->sampling, r)) != MOE_OK ||
        (st = check_stops(lim, msg, out)) != MOE_OK ||
        (msg->max_new_tokens > lim->max_new_tokens &&
         (st = check_max_new(lim, msg, r)) != MOE_OK) ||
        (st = check_prompt(lim, msg, tokenize, tok_ctx, out)) != MOE_OK ||
        (st = check_max_new(lim, msg, r)) != MOE_OK) {
        moe_validated_free(out);
        return st;
    }
    r->ignore_eos = msg->ignore_eos;
    r->include_stop_str_in_output = msg->include_stop_str_in_output;
    r->priority = msg->priority;
    return MOE_OK;
}

void moe_validated_free(moe_validated *v)
{
    if (!v)
        return;
    free(v->prompt_buf);
    free(v->stop_ids_buf);
    memset(v, 0, sizeof(*v));
}
