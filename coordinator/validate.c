/* Request validation for the public APIs: every limit check and default of a generation request,
 * whichever front end decoded it. */
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

#define NAMES(in) ((in)->names ? (in)->names : &moe_api_names_grpc)

/* A NUL inside a string would silently cut it where C code reads it: refuse it instead. */
static moe_status check_no_nul(const char *field, const moe_api_str *v)
{
    const char *z = v->len ? memchr(v->s, '\0', v->len) : NULL;
    if (z)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "%s: holds a NUL byte at offset %zu (NUL is not allowed in strings)",
                         field, (size_t)(z - v->s));
    return MOE_OK;
}

/* A penalty: absent is `off`; present must be finite and in [lo, hi] (lo_open: > lo). */
static moe_status check_penalty(bool has, double v, double off, double lo, bool lo_open, double hi,
                                const char *name, float *out)
{
    *out = (float)off;
    if (!has)
        return MOE_OK;
    if (!isfinite(v) || (lo_open ? v <= lo : v < lo) || v > hi)
        return moe_error(MOE_ERR_INVALID_ARG, "%s = %g: must be in %c%g, %g]", name, v,
                         lo_open ? '(' : '[', lo, hi);
    *out = (float)v;
    return MOE_OK;
}

static moe_status check_sampling(const moe_api_request *in, moe_gen_request *r)
{
    const moe_api_names *nm = NAMES(in);
    moe_sampling_params *sp = &r->sampling;
    *sp = (moe_sampling_params){.temperature = 1.0f, .top_p = 1.0f, .top_k = 0};
    sp->seed = in->has_seed ? in->seed : random_u64();
    if (in->has_temperature) {
        if (!isfinite(in->temperature) || in->temperature < 0.0 || in->temperature > 1e6)
            return moe_error(MOE_ERR_INVALID_ARG, "%s = %g: must be >= 0 (0 = greedy)",
                             nm->temperature, in->temperature);
        sp->temperature = (float)in->temperature;
    }
    if (in->has_top_p) {
        /* NaN fails both comparisons, hence the negated form. */
        if (!(in->top_p > 0.0 && in->top_p <= 1.0))
            return moe_error(MOE_ERR_INVALID_ARG, "%s = %g: must be in (0, 1]", nm->top_p,
                             in->top_p);
        sp->top_p = (float)in->top_p;
    }
    if (in->top_k < 0 || in->top_k > INT32_MAX)
        return moe_error(MOE_ERR_INVALID_ARG, "%s = %" PRId64 ": must be >= 0 (0 = off)",
                         nm->top_k, in->top_k);
    sp->top_k = (int32_t)in->top_k;
    /* OpenAI's ranges for presence / frequency; repetition as vLLM: > 0 (1 = off), capped. */
    moe_status st;
    if ((st = check_penalty(in->has_presence_penalty, in->presence_penalty, 0.0, -2.0, false, 2.0,
                            nm->presence_penalty, &sp->presence_penalty)) != MOE_OK ||
        (st = check_penalty(in->has_frequency_penalty, in->frequency_penalty, 0.0, -2.0, false,
                            2.0, nm->frequency_penalty, &sp->frequency_penalty)) != MOE_OK ||
        (st = check_penalty(in->has_repetition_penalty, in->repetition_penalty, 1.0, 0.0, true,
                            100.0, nm->repetition_penalty, &sp->repetition_penalty)) != MOE_OK)
        return st;
    if (in->top_logprobs < 0 || in->top_logprobs > MOE_MAX_TOP_LOGPROBS)
        return moe_error(MOE_ERR_INVALID_ARG, "%s = %" PRId64 ": must be in [0, %d]",
                         nm->top_logprobs, in->top_logprobs, MOE_MAX_TOP_LOGPROBS);
    sp->logprobs = in->logprobs || in->top_logprobs > 0;
    sp->top_logprobs = (int)in->top_logprobs;
    return MOE_OK;
}

static moe_status check_request_id(const moe_api_request *in, moe_gen_request *r)
{
    const char *field = NAMES(in)->request_id;
    const moe_api_str *id = &in->request_id;
    if (id->len == 0) {
        snprintf(r->request_id, sizeof(r->request_id), "req-%016" PRIx64, random_u64());
        return MOE_OK;
    }
    if (id->len > MOE_REQUEST_ID_MAX)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: %zu bytes, over the limit of %d bytes", field,
                         id->len, MOE_REQUEST_ID_MAX);
    /* Ids go into log lines and status messages: keep them one printable line. */
    for (size_t i = 0; i < id->len; i++) {
        unsigned char c = (unsigned char)id->s[i];
        if (c < 0x20 || c > 0x7E)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: byte %zu (0x%02x) is not printable ASCII",
                             field, i, c);
    }
    memcpy(r->request_id, id->s, id->len);
    r->request_id[id->len] = '\0';
    return MOE_OK;
}

static moe_status check_stops(const moe_validate_limits *lim, const moe_api_request *in,
                              moe_validated *v)
{
    const moe_api_names *nm = NAMES(in);
    if (in->n_stop > lim->max_stop)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: %zu stop strings, over the limit of %" PRIu32,
                         nm->stop, in->n_stop, lim->max_stop);
    size_t total = 0;
    for (size_t i = 0; i < in->n_stop; i++) {
        const moe_api_str *st = &in->stop[i];
        char field[160];
        snprintf(field, sizeof(field), "%s[%zu]", nm->stop, i);
        if (st->len == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "%s is empty", field);
        if (st->len > lim->max_stop_bytes)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: %zu bytes, over the limit of %" PRIu32 " bytes",
                             field, st->len, lim->max_stop_bytes);
        moe_status s = check_no_nul(field, st);
        if (s != MOE_OK)
            return s;
        long bad = moe_validate_utf8(st->s, st->len);
        if (bad >= 0)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: invalid UTF-8 at byte %ld", field, bad);
        total += st->len + 1;
    }
    if (in->n_stop > 0) {
        /* one block: the pointer table, then the strings */
        v->stop_buf = malloc(in->n_stop * sizeof(char *) + total);
        if (!v->stop_buf)
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory", nm->stop);
        char *p = (char *)(v->stop_buf + in->n_stop);
        for (size_t i = 0; i < in->n_stop; i++) {
            memcpy(p, in->stop[i].s, in->stop[i].len);
            p[in->stop[i].len] = '\0';
            v->stop_buf[i] = p;
            p += in->stop[i].len + 1;
        }
    }
    v->req.stop = (const char *const *)v->stop_buf;
    v->req.n_stop = (uint32_t)in->n_stop;

    if (in->n_stop_token_ids > lim->max_stop_token_ids)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: %zu ids, over the limit of %" PRIu32,
                         nm->stop_token_ids, in->n_stop_token_ids, lim->max_stop_token_ids);
    if (in->n_stop_token_ids > 0) {
        v->stop_ids_buf = malloc(in->n_stop_token_ids * sizeof(int32_t));
        if (!v->stop_ids_buf)
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory", nm->stop_token_ids);
        for (size_t i = 0; i < in->n_stop_token_ids; i++) {
            int64_t id = in->stop_token_ids[i];
            if (id < 0 || id >= lim->vocab_size)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "%s[%zu] = %" PRId64 ": not a token id (vocabulary size %" PRId32 ")",
                                 nm->stop_token_ids, i, id, lim->vocab_size);
            v->stop_ids_buf[i] = (int32_t)id;
        }
    }
    v->req.stop_token_ids = v->stop_ids_buf;
    v->req.n_stop_token_ids = (uint32_t)in->n_stop_token_ids;
    return MOE_OK;
}

static moe_status check_prompt(const moe_validate_limits *lim, const moe_api_request *in,
                               moe_validate_tokenize_fn tokenize, void *tok_ctx, moe_validated *v)
{
    const moe_api_names *nm = NAMES(in);
    /* A prompt must leave room for at least one generated token. */
    const size_t max_prompt = lim->context_len > 0 ? lim->context_len - 1 : 0;
    size_t n = 0;

    if (in->has_token_ids) {
        n = in->n_token_ids;
        if (n == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: empty prompt", nm->token_ids);
        if (n > max_prompt)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "%s: prompt is %zu tokens, over the limit of %zu (context length "
                             "%" PRIu32 " minus 1 token to generate)",
                             nm->token_ids, n, max_prompt, lim->context_len);
        v->prompt_buf = malloc(n * sizeof(int32_t));
        if (!v->prompt_buf)
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory", nm->token_ids);
        for (size_t i = 0; i < n; i++) {
            if (in->token_ids[i] < 0 || in->token_ids[i] >= lim->vocab_size)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "%s[%zu] = %" PRId64 ": not a token id (vocabulary size %" PRId32 ")",
                                 nm->token_ids_item, i, in->token_ids[i], lim->vocab_size);
            v->prompt_buf[i] = (int32_t)in->token_ids[i];
        }
    } else if (in->has_text) {
        const char *text = in->text.s ? in->text.s : "";
        size_t len = in->text.len;
        if (len == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: empty prompt", nm->text);
        if (len > lim->max_prompt_bytes)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: %zu bytes, over the limit of %" PRIu32 " bytes",
                             nm->text, len, lim->max_prompt_bytes);
        moe_status st = check_no_nul(nm->text, &in->text);
        if (st != MOE_OK)
            return st;
        long bad = moe_validate_utf8(text, len);
        if (bad >= 0)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: invalid UTF-8 at byte %ld", nm->text, bad);
        /* One more than allowed is enough to tell "too long" from "fits"; *n_out gives the real
         * count for the message. */
        size_t cap = max_prompt + 1;
        v->prompt_buf = malloc(cap * sizeof(int32_t));
        if (!v->prompt_buf)
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory", nm->text);
        st = tokenize(tok_ctx, text, len, in->add_special_tokens, v->prompt_buf, cap, &n);
        if (st != MOE_OK)
            return moe_error_context(st, "%s: tokenizing: ", nm->text);
        if (n == 0)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: prompt tokenizes to 0 tokens", nm->text);
        if (n > max_prompt)
            return moe_error(MOE_ERR_INVALID_ARG,
                             "%s: prompt is %zu tokens, over the limit of %zu (context length "
                             "%" PRIu32 " minus 1 token to generate)",
                             nm->text, n, max_prompt, lim->context_len);
        for (size_t i = 0; i < n; i++) {
            /* A tokenizer bigger than the model's embedding would be a deployment error; refuse
             * the request rather than index past the embedding table. */
            if (v->prompt_buf[i] < 0 || v->prompt_buf[i] >= lim->vocab_size)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "%s: token %zu of the prompt has id %" PRId32
                                 ", outside the model's vocabulary of %" PRId32,
                                 nm->text, i, v->prompt_buf[i], lim->vocab_size);
        }
    } else {
        return moe_error(MOE_ERR_INVALID_ARG, "%s: empty prompt (set text or token_ids)",
                         nm->prompt);
    }
    v->req.prompt = v->prompt_buf;
    v->req.n_prompt = (uint32_t)n;
    return MOE_OK;
}

/* With n_prompt 0 (before tokenizing) only the limits that do not need the prompt are checked. */
static moe_status check_max_new(const moe_validate_limits *lim, const moe_api_request *in,
                                moe_gen_request *r)
{
    const char *field = NAMES(in)->max_new_tokens;
    const uint32_t room = lim->context_len - r->n_prompt;
    int64_t m = in->max_new_tokens;
    if (m < 0)
        return moe_error(MOE_ERR_INVALID_ARG, "%s = %" PRId64 ": must be >= 1 (0 = the default)",
                         field, m);
    if (m == 0) {
        m = lim->default_max_new_tokens < room ? lim->default_max_new_tokens : room;
        if (m == 0)
            m = 1;
    } else if (m > lim->max_new_tokens) {
        return moe_error(MOE_ERR_INVALID_ARG, "%s = %" PRId64 ": over the limit of %" PRIu32, field,
                         m, lim->max_new_tokens);
    } else if (r->n_prompt > 0 && m > room) {
        return moe_error(MOE_ERR_INVALID_ARG,
                         "%s = %" PRId64 ": prompt (%" PRIu32 " tokens) + %s = %" PRIu64
                         ", over the context length of %" PRIu32,
                         field, m, r->n_prompt, field, (uint64_t)r->n_prompt + (uint64_t)m,
                         lim->context_len);
    }
    r->max_new_tokens = (uint32_t)m;
    return MOE_OK;
}

moe_status moe_validate_request(const moe_validate_limits *lim, const moe_api_request *in,
                                moe_validate_tokenize_fn tokenize, void *tok_ctx,
                                moe_validated *out)
{
    memset(out, 0, sizeof(*out));
    moe_gen_request *r = &out->req;
    moe_status st;
    /* Cheap checks first: a request that fails them costs no tokenization. */
    if ((st = check_no_nul(NAMES(in)->request_id, &in->request_id)) != MOE_OK ||
        (st = check_request_id(in, r)) != MOE_OK || (st = check_sampling(in, r)) != MOE_OK ||
        (st = check_stops(lim, in, out)) != MOE_OK || (st = check_max_new(lim, in, r)) != MOE_OK ||
        (st = check_prompt(lim, in, tokenize, tok_ctx, out)) != MOE_OK ||
        (st = check_max_new(lim, in, r)) != MOE_OK) {
        moe_validated_free(out);
        return st;
    }
    r->ignore_eos = in->ignore_eos;
    r->include_stop_str_in_output = in->include_stop_str_in_output;
    r->priority = in->priority;
    if (in->prefill_group) {
        if (in->prefill_group_n < 2 || in->prefill_group_n > MOE_API_MAX_N) {
            moe_validated_free(out);
            return moe_error(MOE_ERR_INVALID_ARG, "%s = %" PRId64 ": must be in [2, %d] with a group",
                             NAMES(in)->prefill_group, in->prefill_group_n, MOE_API_MAX_N);
        }
        /* the top bit keeps clients' keys apart from the HTTP front end's own (pointers) */
        r->prefill_group = in->prefill_group | (1ull << 63);
        r->prefill_group_n = (uint32_t)in->prefill_group_n;
    }
    return MOE_OK;
}

moe_status moe_validate_choice(const moe_validate_limits *lim, const moe_api_request *in,
                               uint32_t i, uint32_t n, uint64_t group,
                               moe_validate_tokenize_fn tokenize, void *tok_ctx,
                               moe_validated *out)
{
    moe_api_request choice = *in;
    choice.seed = moe_api_choice_seed(in->seed, i);
    moe_status st = moe_validate_request(lim, &choice, tokenize, tok_ctx, out);
    if (st == MOE_OK && n > 1) {
        out->req.prefill_group = group;
        out->req.prefill_group_n = n;
    }
    return st;
}

void moe_validated_free(moe_validated *v)
{
    if (!v)
        return;
    free(v->prompt_buf);
    free(v->stop_ids_buf);
    free(v->stop_buf);
    memset(v, 0, sizeof(*v));
}
