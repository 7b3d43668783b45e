/* libFuzzer target for common/tokenizer.h. The first input byte picks a mode:
 *   0: the rest is a tokenizer.json; if it loads, encode and decode a short text with it;
 *   1, 2: the rest is text for a built-in byte-level (1) or SentencePiece-style (2) tokenizer:
 *         encode it, decode the ids, and decode the raw bytes read as ids.
 * Besides memory errors it aborts when decode(encode(x)) != x where that must hold, or when the
 * streaming decoder's output differs from the full decode or splits a UTF-8 character. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "fuzz_tokenizer: check failed at line %d: %s\n", __LINE__, #c);        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

typedef struct {
    char *p;
    size_t len, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        CHECK(b->p);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

/* GPT-2's byte -> code point table, rebuilt here so the target needs no files. */
static unsigned byte_cp(unsigned b)
{
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)
        return b;
    unsigned n = 0;
    for (unsigned x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174))
            n++;
    return 256 + n;
}

static void sb_cp(sbuf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    }
    if (cp == '"' || cp == '\\')
        sb_put(b, "\\", 1);
    sb_put(b, u, n);
}

/* A byte-level tokenizer: 256 byte tokens, a few merges, Qwen2's Split, added tokens. */
static char *byte_level_json(void)
{
    sbuf b = {0};
    sb_str(&b,
           "{\"added_tokens\":[{\"id\":300,\"content\":\"<|endoftext|>\",\"special\":true,"
           "\"normalized\":false},"
           "{\"id\":301,\"content\":\"<tool>\",\"special\":false,\"lstrip\":true,\"rstrip\":true,"
           "\"normalized\":false}],"
           "\"normalizer\":{\"type\":\"NFC\"},"
           "\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
           "\"pattern\":{\"Regex\":"
           "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| "
           "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"},"
           "\"behavior\":\"Isolated\",\"invert\":false},{\"type\":\"ByteLevel\",\"add_prefix_"
           "space\":false,\"use_regex\":false}]},"
           "\"post_processor\":{\"type\":\"ByteLevel\"},\"decoder\":{\"type\":\"ByteLevel\"},"
           "\"model\":{\"type\":\"BPE\",\"vocab\":{");
    for (unsigned i = 0; i < 256; i++) {
        char num[32];
        sb_str(&b, i ? ",\"" : "\"");
        sb_cp(&b, byte_cp(i));
        snprintf(num, sizeof num, "\":%u", i);
        sb_str(&b, num);
    }
    sb_str(&b,
           ",\"\xC4\xA0t\":256,\"he\":257,\"\xC4\xA0the\":258,\"in\":259,\"\xC4\xA0\xC4\xA0\":260,"
           "\"\xC3\xA4\xC2\xBD\":261,\"\xC3\xA4\xC2\xBD\xC5\x82\":262},"
           "\"merges\":[\"\xC4\xA0 t\",\"h e\",\"\xC4\xA0t he\",\"i n\",\"\xC4\xA0 \xC4\xA0\","
           "[\"\xC3\xA4\",\"\xC2\xBD\"],[\"\xC3\xA4\xC2\xBD\",\"\xC5\x82\"]]}}");
    return b.p;
}

/* A SentencePiece-style tokenizer: <unk>, <s>, </s>, the 256 byte tokens, a few pieces. */
static char *sentencepiece_json(void)
{
    sbuf b = {0};
    sb_str(&b, "{\"added_tokens\":[{\"id\":0,\"content\":\"<unk>\",\"special\":true},{\"id\":1,"
               "\"content\":\"<s>\",\"special\":true},"
               "{\"id\":2,\"content\":\"</s>\",\"special\":true}],"
               "\"pre_tokenizer\":{\"type\":\"Metaspace\",\"replacement\":\"\xE2\x96\x81\","
               "\"prepend_scheme\":\"first\",\"split\":false},"
               "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{"
               "\"id\":\"<s>\",\"type_id\":0}},"
               "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"special_tokens\":{\"<s>\":{\"id\":"
               "\"<s>\",\"ids\":[1],\"tokens\":[\"<s>\"]}}},"
               "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":"
               "{\"String\":\"\xE2\x96\x81\"},\"content\":\" \"},"
               "{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},{\"type\":\"Strip\",\"content\":\" "
               "\",\"start\":1,\"stop\":0}]},"
               "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_"
               "fallback\":true,"
               "\"vocab\":{\"<unk>\":0,\"<s>\":1,\"</s>\":2");
    for (unsigned i = 0; i < 256; i++) {
        char t[32];
        snprintf(t, sizeof t, ",\"<0x%02X>\":%u", i, 3 + i);
        sb_str(&b, t);
    }
    sb_str(&b, ",\"\xE2\x96\x81\":259,\"a\":260,\"b\":261,\"e\":262,\"t\":263,\"\xE2\x96\x81t\":"
               "264,\"e\xE2\x96\x81\":265,"
               "\"\xE4\xBD\xA0\":266},\"merges\":[[\"\xE2\x96\x81\",\"t\"],\"e \xE2\x96\x81\"]}}");
    return b.p;
}

static int utf8_ok(const char *s, size_t n)
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
            return 0;
        for (size_t k = 1; k < need; k++)
            if ((u[i + k] & 0xC0) != 0x80)
                return 0;
        if ((c == 0xE0 && u[i + 1] < 0xA0) || (c == 0xED && u[i + 1] > 0x9F) ||
            (c == 0xF0 && u[i + 1] < 0x90) || (c == 0xF4 && u[i + 1] > 0x8F))
            return 0;
        i += need;
    }
    return 1;
}

/* Full decode, then the streaming decoder with a small buffer: same bytes, valid chunks. */
static char *decode_both(const moe_tokenizer *tok, const int32_t *ids, size_t n, int skip,
                         size_t *len)
{
    size_t need = 0, got = 0;
    CHECK(moe_tokenizer_decode(tok, ids, n, skip, NULL, 0, &need) == MOE_OK);
    char *full = malloc(need + 1);
    CHECK(full);
    CHECK(moe_tokenizer_decode(tok, ids, n, skip, full, need + 1, &got) == MOE_OK && got == need);
    CHECK(utf8_ok(full, need));

    moe_detok *d = moe_detok_create(tok, skip);
    CHECK(d);
    char buf[7];
    size_t k = 0;
    for (size_t i = 0; i <= n; i++) {
        size_t w = i < n ? moe_detok_push(d, ids[i], buf, sizeof buf)
                         : moe_detok_finish(d, buf, sizeof buf);
        while (w > 0) {
            CHECK(utf8_ok(buf, w) && k + w <= need && memcmp(full + k, buf, w) == 0);
            k += w;
            w = i < n ? moe_detok_push(d, -1, buf, sizeof buf)
                      : moe_detok_finish(d, buf, sizeof buf);
        }
    }
    CHECK(k == need);
    moe_detok_free(d);
    *len = need;
    return full;
}

static void exercise(const moe_tokenizer *tok, const char *text, size_t len, int round_trip)
{
    size_t n = 0;
    moe_status st = moe_tokenizer_encode(tok, text, len, 0, NULL, 0, &n);
    if (st != MOE_OK) {
        CHECK(st == MOE_ERR_INVALID_ARG || st == MOE_ERR_FORMAT || st == MOE_ERR_INTERNAL ||
              st == MOE_ERR_NOMEM);
        return;
    }
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    CHECK(ids);
    size_t n2 = 0;
    CHECK(moe_tokenizer_encode(tok, text, len, 0, ids, n, &n2) == MOE_OK && n2 == n);
    int vs = moe_tokenizer_vocab_size(tok);
    for (size_t i = 0; i < n; i++)
        CHECK(ids[i] >= 0 && ids[i] < vs);
    size_t dl;
    char *back = decode_both(tok, ids, n, 0, &dl);
    if (round_trip)
        CHECK(dl == len && memcmp(back, text, len) == 0);
    free(back);
    back = decode_both(tok, ids, n, 1, &dl);
    free(back);
    CHECK(moe_tokenizer_encode(tok, text, len, 1, NULL, 0, &n2) == MOE_OK);
    free(ids);
}

static int nfc_stable_no_specials(const char *s, size_t n)
{
    /* Round trips hold for byte-level BPE unless NFC changes the text or an added token with
     * lstrip/rstrip eats spaces: keep to ASCII letters, digits, punctuation, space, newline. */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80 || c == '<' || (c < 0x20 && c != '\n'))
            return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static moe_tokenizer *builtin[2];
    if (!builtin[0]) {
        char *j = byte_level_json();
        CHECK(moe_tokenizer_parse(j, strlen(j), "fuzz-byte-level", &builtin[0]) == MOE_OK);
        free(j);
        j = sentencepiece_json();
        CHECK(moe_tokenizer_parse(j, strlen(j), "fuzz-sentencepiece", &builtin[1]) == MOE_OK);
        free(j);
    }
    if (size == 0)
        return 0;
    int mode = data[0] % 3;
    const char *rest = (const char *)data + 1;
    size_t n = size - 1;
    if (mode == 0) {
        moe_tokenizer *tok = NULL;
        moe_status st = moe_tokenizer_parse(rest, n, "fuzz.json", &tok);
        if (st != MOE_OK) {
            CHECK(tok == NULL && moe_error_message()[0] != '\0');
            return 0;
        }
        exercise(tok, "Hello, world! 12345 \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80\n\tend", 36,
                 0);
        int32_t ids[8] = {0, 1, 2, 3, 255, 256, 257, -1};
        size_t dl;
        free(decode_both(tok, ids, 8, 0, &dl));
        moe_tokenizer_free(tok);
        return 0;
    }
    const moe_tokenizer *tok = builtin[mode - 1];
    exercise(tok, rest, n, mode == 1 && nfc_stable_no_specials(rest, n));
    /* The raw bytes as ids too: every id, valid or not, must decode safely. */
    size_t k = n / 2;
    int32_t *ids = malloc((k + 1) * sizeof *ids);
    CHECK(ids);
    for (size_t i = 0; i < k; i++)
        ids[i] =
            (int32_t)(((unsigned)(unsigned char)rest[2 * i] << 8 | (unsigned char)rest[2 * i + 1]) %
                      320) -
            4;
    size_t dl;
    free(decode_both(tok, ids, k, data[0] & 8, &dl));
    free(ids);
    return 0;
}
