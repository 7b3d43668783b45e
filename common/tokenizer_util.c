/* Tokenizer plumbing: buffers, arena, UTF-8 and Unicode predicates, the byte-level table, the
 * vocabulary and merge hash maps, and the PCRE2 wrapper that gives \s Oniguruma's meaning. */
#include "common/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "common/status.h"

/* ---- buffers ---- */

bool tok_buf_reserve(tok_buf *b, size_t extra)
{
    if (b->cap - b->len > extra)
        return true;
    size_t need = b->len + extra + 1;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return false;
    b->p = p;
    b->cap = cap;
    return true;
}

bool tok_buf_put(tok_buf *b, const void *s, size_t n)
{
    if (!tok_buf_reserve(b, n))
        return false;
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return true;
}

void tok_buf_free(tok_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

struct tok_arena_chunk {
    tok_arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
};

void *tok_arena_alloc(tok_arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    tok_arena_chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        c = malloc(sizeof *c + cap);
        if (!c)
            return NULL;
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    return p;
}

void tok_arena_free(tok_arena *a)
{
    while (a->head) {
        tok_arena_chunk *n = a->head->next;
        free(a->head);
        a->head = n;
    }
}

bool tok_is_white_space(uint32_t cp)
{
    if (cp <= 0x20)
        return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
    if (cp < 0x85)
        return false;
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
           cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

bool tok_is_word_char(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
               cp == '_';
    if (cp == 0x200C || cp == 0x200D)
        return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

bool tok_is_numeric(uint32_t cp)
{
    if (cp < 0x80)
        return cp >= '0' && cp <= '9';
    utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

/* ---- byte-level table (GPT-2's bytes_to_unicode) ---- */

/* clang-format off */
const uint16_t tok_byte_to_cp[256] = {
    256, 257, 258, 259, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 270, 271, 272, 273, 274,
    275, 276, 277, 278, 279, 280, 281, 282, 283, 284, 285, 286, 287, 288, 33, 34, 35, 36, 37, 38,
    39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
    63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86,
    87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108,
    109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 289,
    290, 291, 292, 293, 294, 295, 296, 297, 298, 299, 300, 301, 302, 303, 304, 305, 306, 307, 308,
    309, 310, 311, 312, 313, 314, 315, 316, 317, 318, 319, 320, 321, 322, 161, 162, 163, 164, 165,
    166, 167, 168, 169, 170, 171, 172, 323, 174, 175, 176, 177, 178, 179, 180, 181, 182, 183, 184,
    185, 186, 187, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200, 201, 202, 203,
    204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 220, 221, 222,
    223, 224, 225, 226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 238, 239, 240, 241,
    242, 243, 244, 245, 246, 247, 248, 249, 250, 251, 252, 253, 254, 255};

static const int16_t cp_to_byte_table[324] = {
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
    48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71,
    72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95,
    96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115,
    116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172, -1, 174, 175, 176, 177, 178, 179,
    180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198,
    199, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217,
    218, 219, 220, 221, 222, 223, 224, 225, 226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236,
    237, 238, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250, 251, 252, 253, 254, 255,
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31, 32, 127, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 138, 139,
    140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158,
    159, 160, 173};

/* clang-format on */

int tok_cp_to_byte(uint32_t cp)
{
    return cp < 324 ? cp_to_byte_table[cp] : -1;
}

/* ---- hash maps ---- */

static uint64_t hash_bytes(const char *s, size_t n)
{
    /* FNV-1a, then a final mix so that the low bits (the slot index) are well spread. */
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 31;
    h *= 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    return h;
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint32_t pow2_cap(size_t expected)
{
    uint32_t cap = 16;
    while (cap < expected * 2 && cap < (1u << 30))
        cap *= 2;
    return cap;
}

bool tok_strmap_init(tok_strmap *m, size_t expected)
{
    memset(m, 0, sizeof *m);
    m->cap = pow2_cap(expected);
    m->keys = calloc(m->cap, sizeof *m->keys);
    m->lens = calloc(m->cap, sizeof *m->lens);
    m->vals = calloc(m->cap, sizeof *m->vals);
    return m->keys && m->lens && m->vals;
}

void tok_strmap_free(tok_strmap *m)
{
    free(m->keys);
    free(m->lens);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static bool strmap_grow(tok_strmap *m)
{
    tok_strmap bigger;
    if (!tok_strmap_init(&bigger, (size_t)m->cap))
        return tok_strmap_free(&bigger), false;
    for (uint32_t i = 0; i < m->cap; i++)
        if (m->keys[i])
            tok_strmap_put(&bigger, m->keys[i], m->lens[i], m->vals[i]);
    tok_strmap_free(m);
    *m = bigger;
    return true;
}

bool tok_strmap_put(tok_strmap *m, const char *key, uint32_t len, int32_t val)
{
    if ((m->n + 1) * 4 > (uint64_t)m->cap * 3 && !strmap_grow(m))
        return false;
    uint32_t mask = m->cap - 1;
    uint32_t i = (uint32_t)hash_bytes(key, len) & mask;
    while (m->keys[i]) {
        if (m->lens[i] == len && memcmp(m->keys[i], key, len) == 0) {
            m->vals[i] = val;
            return true;
        }
        i = (i + 1) & mask;
    }
    m->keys[i] = key;
    m->lens[i] = len;
    m->vals[i] = val;
    m->n++;
    return true;
}

int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len)
{
    if (!m->cap)
        return -1;
    uint32_t mask = m->cap - 1;
    uint32_t i = (uint32_t)hash_bytes(key, len) & mask;
    while (m->keys[i]) {
        if (m->lens[i] == len && memcmp(m->keys[i], key, len) == 0)
            return m->vals[i];
        i = (i + 1) & mask;
    }
    return -1;
}

bool tok_pairmap_init(tok_pairmap *m, size_t expected)
{
    memset(m, 0, sizeof *m);
    m->cap = pow2_cap(expected);
    m->keys = malloc((size_t)m->cap * sizeof *m->keys);
    m->ranks = malloc((size_t)m->cap * sizeof *m->ranks);
    m->ids = malloc((size_t)m->cap * sizeof *m->ids);
    if (!m->keys || !m->ranks || !m->ids)
        return false;
    memset(m->keys, 0xFF, (size_t)m->cap * sizeof *m->keys);
    return true;
}

void tok_pairmap_free(tok_pairmap *m)
{
    free(m->keys);
    free(m->ranks);
    free(m->ids);
    memset(m, 0, sizeof *m);
}

bool tok_pairmap_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t id)
{
    if ((m->n + 1) * 4 > (uint64_t)m->cap * 3) {
        tok_pairmap bigger;
        if (!tok_pairmap_init(&bigger, (size_t)m->cap)) {
            tok_pairmap_free(&bigger);
            return false;
        }
        for (uint32_t i = 0; i < m->cap; i++)
            if (m->keys[i] != UINT64_MAX)
                tok_pairmap_put(&bigger, (int32_t)(m->keys[i] >> 32), (int32_t)(uint32_t)m->keys[i],
                                m->ranks[i], m->ids[i]);
        tok_pairmap_free(m);
        *m = bigger;
    }
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint32_t mask = m->cap - 1;
    uint32_t i = (uint32_t)hash_u64(key) & mask;
    while (m->keys[i] != UINT64_MAX && m->keys[i] != key)
        i = (i + 1) & mask;
    if (m->keys[i] == UINT64_MAX)
        m->n++;
    m->keys[i] = key;
    m->ranks[i] = rank;
    m->ids[i] = id;
    return true;
}

bool tok_pairmap_get(const tok_pairmap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *id)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint32_t mask = m->cap - 1;
    uint32_t i = (uint32_t)hash_u64(key) & mask;
    while (m->keys[i] != UINT64_MAX) {
        if (m->keys[i] == key) {
            *rank = m->ranks[i];
            *id = m->ids[i];
            return true;
        }
        i = (i + 1) & mask;
    }
    return false;
}

/* ---- regex ---- */

/* Oniguruma's \s (what HF tokenizers run) is Unicode White_Space; PCRE2's differs (it adds
 * U+180E), so \s and \S are spelled out as explicit classes before compiling. */
#define WS_RANGES                                                                                  \
    "\\t-\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}"   \
    "\\x{3000}"

static bool rewrite_pattern(const char *p, size_t n, tok_buf *out)
{
    bool in_class = false;
    size_t class_start = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\\' && i + 1 < n) {
            char e = p[i + 1];
            bool ok;
            if (e == 's')
                ok = in_class ? tok_buf_put(out, WS_RANGES, strlen(WS_RANGES))
                              : tok_buf_put(out, "[" WS_RANGES "]", strlen(WS_RANGES) + 2);
            else if (e == 'S' && !in_class)
                ok = tok_buf_put(out, "[^" WS_RANGES "]", strlen(WS_RANGES) + 3);
            else
                ok = tok_buf_put(out, p + i, 2);
            if (!ok)
                return false;
            i++;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = true;
            class_start = i;
        } else if (in_class && c == '[' && i + 1 < n && p[i + 1] == ':') {
            /* POSIX class such as [:alpha:] inside a bracket expression: copy it whole. */
            const char *end = NULL;
            for (size_t j = i + 2; j + 1 < n; j++)
                if (p[j] == ':' && p[j + 1] == ']') {
                    end = p + j + 2;
                    break;
                }
            if (end) {
                if (!tok_buf_put(out, p + i, (size_t)(end - (p + i))))
                    return false;
                i = (size_t)(end - p) - 1;
                continue;
            }
        } else if (in_class && c == ']') {
            /* A ']' right after '[' or '[^' is a literal member, not the end. */
            bool literal =
                i == class_start + 1 || (i == class_start + 2 && p[class_start + 1] == '^');
            if (!literal)
                in_class = false;
        }
        if (!tok_buf_put(out, &c, 1))
            return false;
    }
    return true;
}

moe_status tok_regex_compile(tok_regex *re, const char *pattern, size_t len, bool literal,
                             const char *name, const char *field)
{
    memset(re, 0, sizeof *re);
    tok_buf pat = {0};
    uint32_t opts = PCRE2_UTF | PCRE2_UCP;
    if (literal) {
        opts = PCRE2_UTF | PCRE2_LITERAL; /* UCP is not allowed with LITERAL, nor needed */
        if (!tok_buf_put(&pat, pattern, len))
            return moe_error(MOE_ERR_NOMEM, "%s: %s: out of memory", name, field);
    } else if (!rewrite_pattern(pattern, len, &pat)) {
        tok_buf_free(&pat);
        return moe_error(MOE_ERR_NOMEM, "%s: %s: out of memory", name, field);
    }
    int err = 0;
    PCRE2_SIZE off = 0;
    re->code = pcre2_compile((PCRE2_SPTR)(pat.p ? pat.p : ""), pat.len, opts, &err, &off, NULL);
    tok_buf_free(&pat);
    if (!re->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: %s: regex '%.200s' does not compile: %s", name,
                         field, pattern, (const char *)msg);
    }
    /* JIT is an optimisation only: without it (no JIT support, no executable memory) the
     * interpreter gives the same matches. */
    re->jit = pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE) == 0;
    return MOE_OK;
}

void tok_regex_free(tok_regex *re)
{
    pcre2_code_free(re->code);
    re->code = NULL;
}

int tok_regex_find(const tok_regex *re, const char *s, size_t n, size_t start, size_t *ms,
                   size_t *me, pcre2_match_data *md)
{
    /* Callers pass valid UTF-8 split at character boundaries, so the UTF check is skipped. */
    int rc = re->jit
                 ? pcre2_jit_match(re->code, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, md, NULL)
                 : pcre2_match(re->code, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0)
        return -1;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1];
    if (*me < *ms) /* \K tricks can report an end before the start; treat as empty */
        *me = *ms;
    return 1;
}
