/* Tests for common/tokenizer.h: every record of the HF fixtures (ids with and without special
 * tokens, decodes both ways), the streaming decoder, buffer contracts, threads, and bad input. */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/tokenizer.h"

#define FIXTURES MOE_SOURCE_DIR "/tests/reference/fixtures/tokenizers"

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    cr_assert(p);
    cr_assert_eq(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    p[n] = '\0';
    if (len)
        *len = (size_t)n;
    return p;
}

static moe_tokenizer *load_fixture(const char *name)
{
    char path[512];
    snprintf(path, sizeof path, FIXTURES "/%s/tokenizer.json", name);
    moe_tokenizer *tok = NULL;
    moe_status st = moe_tokenizer_load(path, &tok);
    cr_assert_eq(st, MOE_OK, "loading %s: %s", path, moe_error_message());
    cr_assert_not_null(tok);
    return tok;
}

static cJSON *expected_for(const char *name, cJSON **root)
{
    char *text = slurp(FIXTURES "/expected.json", NULL);
    *root = cJSON_Parse(text);
    free(text);
    cr_assert_not_null(*root, "expected.json does not parse");
    cJSON *t = cJSON_GetObjectItem(cJSON_GetObjectItem(*root, "tokenizers"), name);
    cr_assert_not_null(t, "expected.json has no tokenizer %s", name);
    return t;
}

/* A record's string field, stored plain or, when it holds NUL, hex-encoded as FIELD_hex. */
static char *field(const cJSON *rec, const char *key, size_t *len)
{
    const cJSON *v = cJSON_GetObjectItem(rec, key);
    if (cJSON_IsString(v)) {
        *len = strlen(v->valuestring);
        char *s = malloc(*len + 1);
        memcpy(s, v->valuestring, *len + 1);
        return s;
    }
    char hk[64];
    snprintf(hk, sizeof hk, "%s_hex", key);
    v = cJSON_GetObjectItem(rec, hk);
    cr_assert(cJSON_IsString(v), "record lacks %s", key);
    size_t n = strlen(v->valuestring) / 2;
    char *s = malloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        unsigned b;
        sscanf(v->valuestring + 2 * i, "%2x", &b);
        s[i] = (char)b;
    }
    s[n] = '\0';
    *len = n;
    return s;
}

static int32_t *ids_of(const cJSON *arr, size_t *n)
{
    *n = (size_t)cJSON_GetArraySize(arr);
    int32_t *v = malloc((*n + 1) * sizeof *v);
    size_t i = 0;
    for (const cJSON *e = arr ? arr->child : NULL; e; e = e->next)
        v[i++] = (int32_t)e->valuedouble;
    return v;
}

static bool valid_utf8(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t need = c < 0x80                 ? 1
                      : c >= 0xC2 && c <= 0xDF ? 2
                      : c >= 0xE0 && c <= 0xEF ? 3
                      : c >= 0xF0 && c <= 0xF4 ? 4
                                               : 0;
        if (!need || i + need > n)
            return false;
        for (size_t k = 1; k < need; k++)
            if ((u[i + k] & 0xC0) != 0x80)
                return false;
        if ((c == 0xE0 && u[i + 1] < 0xA0) || (c == 0xED && u[i + 1] > 0x9F) ||
            (c == 0xF0 && u[i + 1] < 0x90) || (c == 0xF4 && u[i + 1] > 0x8F))
            return false;
        i += need;
    }
    return true;
}

static char *decode_all(const moe_tokenizer *tok, const int32_t *ids, size_t n, bool skip,
                        size_t *len)
{
    size_t need = 0;
    cr_assert_eq(moe_tokenizer_decode(tok, ids, n, skip, NULL, 0, &need), MOE_OK);
    char *s = malloc(need + 1);
    size_t got = 0;
    cr_assert_eq(moe_tokenizer_decode(tok, ids, n, skip, s, need + 1, &got), MOE_OK);
    cr_assert_eq(got, need);
    cr_assert_eq(s[need], '\0');
    *len = need;
    return s;
}

/* Streams ids through moe_detok with an output buffer of `cap` bytes: every chunk must be valid
 * UTF-8 and the concatenation must be exactly `want`. */
static void check_stream(const moe_tokenizer *tok, const int32_t *ids, size_t n, bool skip,
                         const char *want, size_t want_len, size_t cap, const char *what)
{
    moe_detok *d = moe_detok_create(tok, skip);
    cr_assert_not_null(d);
    char *acc = malloc(want_len + 64);
    size_t k = 0;
    char *buf = malloc(cap);
    for (size_t i = 0; i <= n; i++) {
        size_t w = i < n ? moe_detok_push(d, ids[i], buf, cap) : moe_detok_finish(d, buf, cap);
        /* A small buffer leaves text queued: keep draining (finish may be called again). */
        for (;;) {
            cr_assert(w < cap, "%s: wrote %zu bytes into a buffer of %zu", what, w, cap);
            cr_assert_eq(buf[w], '\0', "%s: chunk not NUL-terminated", what);
            cr_assert(valid_utf8(buf, w), "%s: chunk %zu is not valid UTF-8", what, i);
            cr_assert(k + w <= want_len, "%s: streamed more than the full decode", what);
            memcpy(acc + k, buf, w);
            k += w;
            if (w == 0)
                break;
            w = i < n ? moe_detok_push(d, -1, buf, cap) : moe_detok_finish(d, buf, cap);
        }
    }
    cr_assert_eq(k, want_len, "%s: streamed %zu bytes, full decode has %zu", what, k, want_len);
    cr_assert(memcmp(acc, want, want_len) == 0, "%s: streamed text differs from the full decode",
              what);
    free(buf);
    free(acc);
    moe_detok_free(d);
}

static void check_ids(const moe_tokenizer *tok, const char *text, size_t len, bool special,
                      const cJSON *want, const char *what)
{
    size_t n_want;
    int32_t *w = ids_of(want, &n_want);
    size_t n = 0;
    moe_status st = moe_tokenizer_encode(tok, text, len, special, NULL, 0, &n);
    cr_assert_eq(st, MOE_OK, "%s: %s", what, moe_error_message());
    int32_t *got = malloc((n + 1) * sizeof *got);
    size_t n2 = 0;
    cr_assert_eq(moe_tokenizer_encode(tok, text, len, special, got, n, &n2), MOE_OK);
    cr_assert_eq(n2, n);
    cr_assert_eq(n, n_want, "%s: %zu ids, HF has %zu", what, n, n_want);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(got[i], w[i], "%s: id %zu is %d, HF has %d", what, i, got[i], w[i]);
    free(got);
    free(w);
}

static void check_decode(const moe_tokenizer *tok, const int32_t *ids, size_t n, const cJSON *rec,
                         bool skip, const char *what)
{
    size_t want_len, len;
    char *want = field(rec, skip ? "decode_skip" : "decode", &want_len);
    char *got = decode_all(tok, ids, n, skip, &len);
    cr_assert(len == want_len && memcmp(got, want, len) == 0,
              "%s (skip=%d): decoded '%s', HF has '%s'", what, skip, got, want);
    check_stream(tok, ids, n, skip, want, want_len, 64, what);
    check_stream(tok, ids, n, skip, want, want_len, 5, what); /* forces queued, split output */
    free(want);
    free(got);
}

static void check_fixture(const char *name)
{
    cJSON *root;
    const cJSON *exp = expected_for(name, &root);
    moe_tokenizer *tok = load_fixture(name);
    cr_assert_eq(moe_tokenizer_vocab_size(tok), cJSON_GetObjectItem(exp, "vocab_size")->valueint);

    int i = 0;
    const cJSON *rec;
    cJSON_ArrayForEach(rec, cJSON_GetObjectItem(exp, "records"))
    {
        char what[128];
        size_t len;
        char *text = field(rec, "text", &len);
        snprintf(what, sizeof what, "%s record %d", name, i++);
        check_ids(tok, text, len, false, cJSON_GetObjectItem(rec, "ids"), what);
        check_ids(tok, text, len, true, cJSON_GetObjectItem(rec, "ids_special"), what);
        size_t n;
        int32_t *ids = ids_of(cJSON_GetObjectItem(rec, "ids_special"), &n);
        check_decode(tok, ids, n, rec, false, what);
        check_decode(tok, ids, n, rec, true, what);
        free(ids);
        free(text);
    }
    cr_assert_gt(i, 30, "too few records for %s", name);
    i = 0;
    cJSON_ArrayForEach(rec, cJSON_GetObjectItem(exp, "decodes"))
    {
        char what[128];
        snprintf(what, sizeof what, "%s decode case %d", name, i++);
        size_t n;
        int32_t *ids = ids_of(cJSON_GetObjectItem(rec, "ids"), &n);
        check_decode(tok, ids, n, rec, false, what);
        check_decode(tok, ids, n, rec, true, what);
        free(ids);
    }
    cr_assert_gt(i, 10);
    moe_tokenizer_free(tok);
    cJSON_Delete(root);
}

Test(tokenizer_fixtures, qwen2)
{
    check_fixture("qwen2");
}
Test(tokenizer_fixtures, gpt2)
{
    check_fixture("gpt2");
}
Test(tokenizer_fixtures, sentencepiece)
{
    check_fixture("sentencepiece");
}
Test(tokenizer_fixtures, sentencepiece_legacy)
{
    check_fixture("sentencepiece_legacy");
}
Test(tokenizer_fixtures, options)
{
    check_fixture("options");
}

/* ---- API contracts ---- */

Test(tokenizer_api, token_ids_and_vocab)
{
    moe_tokenizer *q = load_fixture("qwen2");
    int eot = moe_tokenizer_token_id(q, "<|endoftext|>");
    int ims = moe_tokenizer_token_id(q, "<|im_start|>");
    cr_assert_geq(eot, 0);
    cr_assert_eq(ims, eot + 1);
    cr_assert_eq(moe_tokenizer_token_id(q, "<|no such token|>"), -1);
    cr_assert_eq(moe_tokenizer_vocab_size(q), moe_tokenizer_token_id(q, "<|im_end|>") + 1);
    int32_t ids[4];
    size_t n;
    cr_assert_eq(moe_tokenizer_encode(q, "<|im_start|>", 12, false, ids, 4, &n), MOE_OK);
    cr_assert_eq(n, 1);
    cr_assert_eq(ids[0], ims);
    moe_tokenizer_free(q);

    moe_tokenizer *sp = load_fixture("sentencepiece");
    cr_assert_eq(moe_tokenizer_token_id(sp, "<unk>"), 0);
    cr_assert_eq(moe_tokenizer_token_id(sp, "<s>"), 1);
    cr_assert_eq(moe_tokenizer_token_id(sp, "</s>"), 2);
    cr_assert_eq(moe_tokenizer_token_id(sp, "<0x41>"), 3 + 0x41);
    /* BOS only with add_special. */
    cr_assert_eq(moe_tokenizer_encode(sp, "", 0, true, ids, 4, &n), MOE_OK);
    cr_assert_eq(n, 1);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(moe_tokenizer_encode(sp, "", 0, false, ids, 4, &n), MOE_OK);
    cr_assert_eq(n, 0);
    moe_tokenizer_free(sp);
}

Test(tokenizer_api, encode_reports_needed_size)
{
    moe_tokenizer *g = load_fixture("gpt2");
    const char *text =
        "Short buffers must not overflow, and the count says how many ids are needed.";
    size_t n_all = 0, n = 0;
    cr_assert_eq(moe_tokenizer_encode(g, text, strlen(text), false, NULL, 0, &n_all), MOE_OK);
    cr_assert_gt(n_all, 8);
    int32_t *all = malloc(n_all * sizeof *all);
    cr_assert_eq(moe_tokenizer_encode(g, text, strlen(text), false, all, n_all, &n), MOE_OK);
    int32_t small[5 + 1];
    small[5] = 0x7eadbeef;
    cr_assert_eq(moe_tokenizer_encode(g, text, strlen(text), false, small, 5, &n), MOE_OK);
    cr_assert_eq(n, n_all);
    cr_assert_eq(small[5], 0x7eadbeef, "wrote past cap");
    for (int i = 0; i < 5; i++)
        cr_assert_eq(small[i], all[i]);
    /* Only the first len bytes count, even without a NUL. */
    cr_assert_eq(moe_tokenizer_encode(g, "Short buffers", 5, false, small, 5, &n), MOE_OK);
    size_t n5;
    cr_assert_eq(moe_tokenizer_encode(g, "Short", 5, false, NULL, 0, &n5), MOE_OK);
    cr_assert_eq(n, n5);
    free(all);
    moe_tokenizer_free(g);
}

Test(tokenizer_api, decode_reports_needed_size)
{
    moe_tokenizer *g = load_fixture("gpt2");
    const char *text = "decode into a buffer that is too small";
    int32_t ids[64];
    size_t n, need, got;
    cr_assert_eq(moe_tokenizer_encode(g, text, strlen(text), false, ids, 64, &n), MOE_OK);
    cr_assert_eq(moe_tokenizer_decode(g, ids, n, false, NULL, 0, &need), MOE_OK);
    cr_assert_eq(need, strlen(text));
    char buf[11];
    memset(buf, 'X', sizeof buf);
    cr_assert_eq(moe_tokenizer_decode(g, ids, n, false, buf, 10, &got), MOE_OK);
    cr_assert_eq(got, need);
    cr_assert(memcmp(buf, text, 10) == 0);
    cr_assert_eq(buf[10], 'X', "wrote past cap");
    moe_tokenizer_free(g);
}

Test(tokenizer_api, invalid_utf8_text_is_refused)
{
    moe_tokenizer *q = load_fixture("qwen2");
    int32_t ids[8];
    size_t n = 99;
    moe_status st = moe_tokenizer_encode(q, "ab\xC3(", 4, false, ids, 8, &n);
    cr_assert_eq(st, MOE_ERR_INVALID_ARG);
    cr_assert_eq(n, 0);
    cr_assert(strstr(moe_error_message(), "UTF-8"), "message: %s", moe_error_message());
    cr_assert(strstr(moe_error_message(), "byte 2"), "message: %s", moe_error_message());
    /* Overlong and surrogate encodings are invalid too. */
    cr_assert_eq(moe_tokenizer_encode(q, "\xC0\xAF", 2, false, ids, 8, &n), MOE_ERR_INVALID_ARG);
    cr_assert_eq(moe_tokenizer_encode(q, "\xED\xA0\x80", 3, false, ids, 8, &n),
                 MOE_ERR_INVALID_ARG);
    moe_tokenizer_free(q);
}

/* ---- streaming ---- */

Test(tokenizer_stream, holds_back_incomplete_utf8)
{
    moe_tokenizer *q = load_fixture("qwen2");
    /* A 4-byte emoji that byte-level BPE (with this small vocabulary) splits into pieces. */
    const char *text = "ok \xF0\x9F\xA6\x9C!";
    int32_t ids[32];
    size_t n;
    cr_assert_eq(moe_tokenizer_encode(q, text, strlen(text), false, ids, 32, &n), MOE_OK);
    cr_assert_gt(n, 3);
    moe_detok *d = moe_detok_create(q, false);
    char out[64], acc[64] = "";
    size_t k = 0;
    int zero_pushes = 0;
    for (size_t i = 0; i < n; i++) {
        size_t w = moe_detok_push(d, ids[i], out, sizeof out);
        zero_pushes += w == 0;
        cr_assert(valid_utf8(out, w));
        memcpy(acc + k, out, w);
        k += w;
    }
    k += moe_detok_finish(d, acc + k, sizeof acc - k);
    cr_assert_gt(zero_pushes, 0, "some piece of the emoji must have been held back");
    cr_assert_str_eq(acc, text);
    moe_detok_free(d);
    moe_tokenizer_free(q);
}

Test(tokenizer_stream, broken_bytes_flush_as_replacement)
{
    moe_tokenizer *sp = load_fixture("sentencepiece");
    int e4 = moe_tokenizer_token_id(sp, "<0xE4>"), bd = moe_tokenizer_token_id(sp, "<0xBD>");
    cr_assert_geq(e4, 0);
    int32_t ids[2] = {e4, bd};
    moe_detok *d = moe_detok_create(sp, true);
    char out[32];
    cr_assert_eq(moe_detok_push(d, ids[0], out, sizeof out), 0);
    cr_assert_eq(moe_detok_push(d, ids[1], out, sizeof out), 0);
    /* HF turns every byte of an invalid byte-fallback run into U+FFFD. */
    size_t w = moe_detok_finish(d, out, sizeof out);
    cr_assert_str_eq(out, "\xEF\xBF\xBD\xEF\xBF\xBD");
    cr_assert_eq(w, 6);
    cr_assert_eq(moe_detok_finish(d, out, sizeof out), 0, "finish is idempotent");
    moe_detok_free(d);
    size_t len;
    char *full = decode_all(sp, ids, 2, true, &len);
    cr_assert_str_eq(full, "\xEF\xBF\xBD\xEF\xBF\xBD");
    free(full);
    moe_tokenizer_free(sp);
}

Test(tokenizer_stream, sentencepiece_first_space_stripped)
{
    moe_tokenizer *sp = load_fixture("sentencepiece");
    const char *text = "Hello world";
    int32_t ids[32];
    size_t n;
    cr_assert_eq(moe_tokenizer_encode(sp, text, strlen(text), true, ids, 32, &n), MOE_OK);
    cr_assert_eq(ids[0], 1);
    moe_detok *d = moe_detok_create(sp, true);
    char acc[64];
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += moe_detok_push(d, ids[i], acc + k, sizeof acc - k);
    k += moe_detok_finish(d, acc + k, sizeof acc - k);
    cr_assert_str_eq(acc, "Hello world");
    moe_detok_free(d);
    moe_tokenizer_free(sp);
}

Test(tokenizer_stream, tiny_buffers_never_split_characters)
{
    moe_tokenizer *q = load_fixture("qwen2");
    const char *text = "多字节文字と絵文字😀😀 mixed";
    int32_t ids[128];
    size_t n;
    cr_assert_eq(moe_tokenizer_encode(q, text, strlen(text), false, ids, 128, &n), MOE_OK);
    /* Five bytes (a 4-byte character and the NUL) always make progress. */
    for (size_t cap = 5; cap <= 8; cap++)
        check_stream(q, ids, n, false, text, strlen(text), cap, "tiny buffer");
    moe_tokenizer_free(q);
}

/* ---- long input, round trips, threads ---- */

static char *long_text(size_t n)
{
    static const char *words[] = {"expert ", "routing ", "多专家 ", "\n\t",
                                  "1234 ",   "😀 ",       "it's ",   "   "};
    char *s = malloc(n + 16);
    size_t k = 0;
    unsigned r = 7;
    while (k < n) {
        r = r * 1103515245u + 12345u;
        const char *w = words[(r >> 16) % 8];
        size_t l = strlen(w);
        memcpy(s + k, w, l);
        k += l;
    }
    s[k] = '\0';
    return s;
}

Test(tokenizer_long, round_trip_64k, .timeout = 30)
{
    const char *names[] = {"qwen2", "gpt2", "sentencepiece", "sentencepiece_legacy"};
    char *text = long_text(64 * 1024);
    size_t len = strlen(text);
    for (size_t t = 0; t < 4; t++) {
        moe_tokenizer *tok = load_fixture(names[t]);
        size_t n = 0;
        cr_assert_eq(moe_tokenizer_encode(tok, text, len, false, NULL, 0, &n), MOE_OK);
        int32_t *ids = malloc(n * sizeof *ids);
        cr_assert_eq(moe_tokenizer_encode(tok, text, len, false, ids, n, &n), MOE_OK);
        cr_assert_lt(n, len, "%s: BPE should merge something", names[t]);
        size_t dl;
        char *back = decode_all(tok, ids, n, false, &dl);
        cr_assert(dl == len && memcmp(back, text, len) == 0, "%s: decode(encode(x)) != x",
                  names[t]);
        free(back);
        free(ids);
        moe_tokenizer_free(tok);
    }
    free(text);
}

typedef struct {
    const moe_tokenizer *tok;
    const char *text;
    const int32_t *want;
    size_t n_want;
    int ok;
} thread_arg;

static void *encode_loop(void *p)
{
    thread_arg *a = p;
    int32_t *ids = malloc(a->n_want * sizeof *ids + 4);
    a->ok = 1;
    for (int it = 0; it < 20; it++) {
        size_t n;
        if (moe_tokenizer_encode(a->tok, a->text, strlen(a->text), true, ids, a->n_want, &n) !=
                MOE_OK ||
            n != a->n_want || memcmp(ids, a->want, n * sizeof *ids) != 0)
            a->ok = 0;
    }
    free(ids);
    return NULL;
}

Test(tokenizer_threads, concurrent_encode_is_consistent)
{
    moe_tokenizer *q = load_fixture("qwen2");
    char *text = long_text(8 * 1024);
    size_t n;
    cr_assert_eq(moe_tokenizer_encode(q, text, strlen(text), true, NULL, 0, &n), MOE_OK);
    int32_t *want = malloc(n * sizeof *want);
    cr_assert_eq(moe_tokenizer_encode(q, text, strlen(text), true, want, n, &n), MOE_OK);
    pthread_t th[4];
    thread_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg){q, text, want, n, 0};
        cr_assert_eq(pthread_create(&th[i], NULL, encode_loop, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(args[i].ok, 1, "thread %d saw different ids", i);
    }
    free(want);
    free(text);
    moe_tokenizer_free(q);
}

/* ---- bad input ---- */

static char *fixture_with(const char *name, const char *from, const char *to)
{
    char path[512];
    snprintf(path, sizeof path, FIXTURES "/%s/tokenizer.json", name);
    size_t len;
    char *src = slurp(path, &len);
    char *at = strstr(src, from);
    cr_assert_not_null(at, "fixture %s lacks '%s'", name, from);
    size_t fl = strlen(from), tl = strlen(to);
    char *out = malloc(len - fl + tl + 1);
    size_t pre = (size_t)(at - src);
    memcpy(out, src, pre);
    memcpy(out + pre, to, tl);
    memcpy(out + pre + tl, at + fl, len - pre - fl + 1);
    free(src);
    return out;
}

static void expect_refused(const char *json, moe_status want, const char *needle1,
                           const char *needle2)
{
    moe_tokenizer *tok = (moe_tokenizer *)0x1;
    moe_status st = moe_tokenizer_parse(json, strlen(json), "bad.json", &tok);
    cr_assert_eq(st, want, "status %s, want %s (%s)", moe_status_name(st), moe_status_name(want),
                 moe_error_message());
    cr_assert_null(tok);
    const char *msg = moe_error_message();
    cr_assert(strstr(msg, "bad.json"), "message does not name the file: %s", msg);
    cr_assert(strstr(msg, needle1), "message lacks '%s': %s", needle1, msg);
    if (needle2)
        cr_assert(strstr(msg, needle2), "message lacks '%s': %s", needle2, msg);
}

Test(tokenizer_bad, malformed_json)
{
    expect_refused("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}", MOE_ERR_FORMAT,
                   "malformed JSON", NULL);
    expect_refused("", MOE_ERR_FORMAT, "malformed JSON", NULL);
    expect_refused("[1, 2, 3]", MOE_ERR_FORMAT, "expected an object", NULL);
    expect_refused("{}", MOE_ERR_FORMAT, "model", NULL);
}

Test(tokenizer_bad, unsupported_model_type)
{
    expect_refused("{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}",
                   MOE_ERR_UNSUPPORTED, "model.type", "'Unigram' is not supported");
    expect_refused("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", MOE_ERR_UNSUPPORTED,
                   "model.type", "WordPiece");
}

Test(tokenizer_bad, unsupported_components_name_their_field)
{
    char *j = fixture_with("qwen2", "{\"type\":\"NFC\"}", "{\"type\":\"Lowercase\"}");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "normalizer.type", "Lowercase");
    free(j);
    j = fixture_with("qwen2", "{\"type\":\"ByteLevel\",\"add_prefix_space\":false",
                     "{\"type\":\"Whitespace\",\"add_prefix_space\":false");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "pre_tokenizer.pretokenizers[1].type", "Whitespace");
    free(j);
    j = fixture_with("sentencepiece", "{\"type\":\"Fuse\"}", "{\"type\":\"CTC\"}");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "decoder.decoders[2].type", "CTC");
    free(j);
    j = fixture_with("qwen2", "\"post_processor\":{\"type\":\"ByteLevel\"",
                     "\"post_processor\":{\"type\":\"Mystery\"");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "post_processor.type", "Mystery");
    free(j);
    j = fixture_with("qwen2", "\"Isolated\"", "\"Sideways\"");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "pre_tokenizer.pretokenizers[0].behavior", "Sideways");
    free(j);
    j = fixture_with("qwen2", "\"dropout\":null", "\"dropout\":0.1");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "model.dropout", NULL);
    free(j);
}

Test(tokenizer_bad, broken_regex_and_merges)
{
    char *j = fixture_with("qwen2", "{\"Regex\":\"", "{\"Regex\":\"(unclosed");
    expect_refused(j, MOE_ERR_UNSUPPORTED, "pre_tokenizer.pretokenizers[0].pattern",
                   "does not compile");
    free(j);
    j = fixture_with("gpt2", "\"merges\":[[", "\"merges\":[[\"no-such-token\",\"x\"],[");
    expect_refused(j, MOE_ERR_FORMAT, "model.merges[0]", "not in the vocabulary");
    free(j);
    j = fixture_with("sentencepiece_legacy", "\"merges\":[\"", "\"merges\":[\"a b c\",\"");
    expect_refused(j, MOE_ERR_FORMAT, "model.merges[0]", "one space");
    free(j);
    j = fixture_with("gpt2", "\"vocab\":{", "\"vocab\":{\"bad id\":-3,");
    expect_refused(j, MOE_ERR_FORMAT, "model.vocab", "bad id");
    free(j);
}

Test(tokenizer_bad, missing_file)
{
    moe_tokenizer *tok = NULL;
    cr_assert_eq(moe_tokenizer_load(FIXTURES "/does-not-exist.json", &tok), MOE_ERR_NOT_FOUND);
    cr_assert_null(tok);
    cr_assert(strstr(moe_error_message(), "does-not-exist.json"));
}
