/* Loading a Hugging Face tokenizer.json into the pipeline of tokenizer_internal.h: BPE model,
 * added tokens, normalizers, pre-tokenizers, post-processor and decoder; everything else is
 * refused with a message naming the JSON field. Also the small lookups of tokenizer.h. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/tokenizer_internal.h"

/* Ids beyond this are refused: real vocabularies stay far below, and the id table is dense. */
#define TOK_MAX_ID (1 << 22)

typedef struct {
    moe_tokenizer *tok;
    const char *name;
} loader;

static moe_status unsupported(const loader *L, const char *path, const char *what)
{
    return moe_error(MOE_ERR_UNSUPPORTED, "%s: %s '%s' is not supported", L->name, path, what);
}

static moe_status bad(const loader *L, const char *path, const char *why)
{
    return moe_error(MOE_ERR_FORMAT, "%s: %s: %s", L->name, path, why);
}

static moe_status nomem(const loader *L)
{
    return moe_error(MOE_ERR_NOMEM, "%s: out of memory while loading the tokenizer", L->name);
}

static char *dup_n(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* Optional bool field: absent or null -> dflt. */
static moe_status get_bool(const loader *L, const cJSON *obj, const char *key, bool dflt, bool *out,
                           const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return MOE_OK;
    }
    if (!cJSON_IsBool(v)) {
        char p[256];
        snprintf(p, sizeof p, "%s.%s", path, key);
        return bad(L, p, "expected true or false");
    }
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

/* Optional string field: absent or null -> NULL. Validated as UTF-8. */
static moe_status get_str(const loader *L, const cJSON *obj, const char *key, const char **out,
                          const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = NULL;
    if (!v || cJSON_IsNull(v))
        return MOE_OK;
    char p[256];
    snprintf(p, sizeof p, "%s.%s", path, key);
    if (!cJSON_IsString(v) || !v->valuestring)
        return bad(L, p, "expected a string");
    size_t n = strlen(v->valuestring);
    if (tok_utf8_check(v->valuestring, n) != n)
        return bad(L, p, "not valid UTF-8");
    *out = v->valuestring;
    return MOE_OK;
}

static moe_status get_int(const loader *L, const cJSON *obj, const char *key, long dflt, long lo,
                          long hi, long *out, const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return MOE_OK;
    }
    char p[256];
    snprintf(p, sizeof p, "%s.%s", path, key);
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < (double)lo ||
        v->valuedouble > (double)hi)
        return bad(L, p, "expected an integer in range");
    *out = (long)v->valuedouble;
    return MOE_OK;
}

/* A string holding exactly one character (Metaspace replacement, Strip content). */
static moe_status get_char(const loader *L, const cJSON *obj, const char *key, const char *dflt,
                           char out[5], size_t *out_len, uint32_t *cp, const char *path)
{
    const char *s;
    moe_status st = get_str(L, obj, key, &s, path);
    if (st)
        return st;
    if (!s)
        s = dflt;
    char p[256];
    snprintf(p, sizeof p, "%s.%s", path, key);
    size_t n = strlen(s);
    if (n == 0 || n > 4 || tok_utf8_seq_len((const unsigned char *)s, n) != n)
        return bad(L, p, "expected a single character");
    memcpy(out, s, n);
    out[n] = '\0';
    *out_len = n;
    if (cp)
        tok_utf8_decode(s, cp);
    return MOE_OK;
}

static const char *type_of(const cJSON *obj)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(t) && t->valuestring ? t->valuestring : NULL;
}

/* {"String": "..."} or {"Regex": "..."} */
static moe_status get_pattern(const loader *L, const cJSON *obj, const char **pat, bool *literal,
                              const char *path)
{
    char p[256];
    snprintf(p, sizeof p, "%s.pattern", path);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, "pattern");
    if (!cJSON_IsObject(v))
        return bad(L, p, "expected {\"String\": ...} or {\"Regex\": ...}");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(v, "String");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(v, "Regex");
    if (cJSON_IsString(s) && s->valuestring) {
        *pat = s->valuestring;
        *literal = true;
    } else if (cJSON_IsString(r) && r->valuestring) {
        *pat = r->valuestring;
        *literal = false;
    } else
        return bad(L, p, "expected {\"String\": ...} or {\"Regex\": ...}");
    size_t n = strlen(*pat);
    if (tok_utf8_check(*pat, n) != n)
        return bad(L, p, "not valid UTF-8");
    return MOE_OK;
}

static bool grow(void **arr, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap)
        return true;
    size_t c = *cap ? *cap * 2 : 4;
    void *p = realloc(*arr, c * elem);
    if (!p)
        return false;
    memset((char *)p + *cap * elem, 0, (c - *cap) * elem);
    *arr = p;
    *cap = c;
    return true;
}

/* ---- normalizers ---- */

static moe_status parse_normalizer(loader *L, const cJSON *j, const char *path, size_t *cap)
{
    moe_tokenizer *tok = L->tok;
    if (!j || cJSON_IsNull(j))
        return MOE_OK;
    char p[256];
    const char *type = type_of(j);
    if (!cJSON_IsObject(j) || !type) {
        snprintf(p, sizeof p, "%s.type", path);
        return bad(L, p, "missing");
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, "normalizers");
        snprintf(p, sizeof p, "%s.normalizers", path);
        if (!cJSON_IsArray(arr))
            return bad(L, p, "expected an array");
        int i = 0;
        for (const cJSON *c = arr->child; c; c = c->next, i++) {
            snprintf(p, sizeof p, "%s.normalizers[%d]", path, i);
            moe_status st = parse_normalizer(L, c, p, cap);
            if (st)
                return st;
        }
        return MOE_OK;
    }
    tok_norm n = {0};
    moe_status st = MOE_OK;
    if (strcmp(type, "NFC") == 0)
        n.type = TOK_NORM_NFC;
    else if (strcmp(type, "NFKC") == 0)
        n.type = TOK_NORM_NFKC;
    else if (strcmp(type, "NFD") == 0)
        n.type = TOK_NORM_NFD;
    else if (strcmp(type, "NFKD") == 0)
        n.type = TOK_NORM_NFKD;
    else if (strcmp(type, "Prepend") == 0) {
        const char *s;
        n.type = TOK_NORM_PREPEND;
        if ((st = get_str(L, j, "prepend", &s, path)))
            return st;
        if (!s) {
            snprintf(p, sizeof p, "%s.prepend", path);
            return bad(L, p, "missing");
        }
        n.str_len = strlen(s);
        if (!(n.str = dup_n(s, n.str_len)))
            return nomem(L);
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat, *content;
        bool literal;
        n.type = TOK_NORM_REPLACE;
        if ((st = get_pattern(L, j, &pat, &literal, path)) || (st = get_str(L, j, "content", &content, path)))
            return st;
        if (!content) {
            snprintf(p, sizeof p, "%s.content", path);
            return bad(L, p, "missing");
        }
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!*pat)
            return bad(L, p, "empty pattern");
        if ((st = tok_regex_compile(&n.re, pat, strlen(pat), literal, L->name, p)))
            return st;
        n.str_len = strlen(content);
        if (!(n.str = dup_n(content, n.str_len))) {
            tok_regex_free(&n.re);
            return nomem(L);
        }
    } else if (strcmp(type, "Strip") == 0) {
        n.type = TOK_NORM_STRIP;
        if ((st = get_bool(L, j, "strip_left", true, &n.left, path)) ||
            (st = get_bool(L, j, "strip_right", true, &n.right, path)))
            return st;
    } else {
        snprintf(p, sizeof p, "%s.type", path);
        return unsupported(L, p, type);
    }
    if (!grow((void **)&tok->norms, cap, tok->n_norms, sizeof *tok->norms)) {
        free(n.str);
        tok_regex_free(&n.re);
        return nomem(L);
    }
    tok->norms[tok->n_norms++] = n;
    return MOE_OK;
}

/* ---- pre-tokenizers ---- */

#define GPT2_PATTERN "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

static moe_status parse_prepend_scheme(const loader *L, const cJSON *j, int *scheme, const char *path)
{
    const char *s;
    moe_status st = get_str(L, j, "prepend_scheme", &s, path);
    if (st)
        return st;
    if (!s) {
        /* Files written before prepend_scheme existed say add_prefix_space. */
        bool aps;
        if ((st = get_bool(L, j, "add_prefix_space", true, &aps, path)))
            return st;
        *scheme = aps ? TOK_PREPEND_ALWAYS : TOK_PREPEND_NEVER;
        return MOE_OK;
    }
    char p[256];
    snprintf(p, sizeof p, "%s.prepend_scheme", path);
    if (strcmp(s, "first") == 0)
        *scheme = TOK_PREPEND_FIRST;
    else if (strcmp(s, "always") == 0)
        *scheme = TOK_PREPEND_ALWAYS;
    else if (strcmp(s, "never") == 0)
        *scheme = TOK_PREPEND_NEVER;
    else
        return unsupported(L, p, s);
    return MOE_OK;
}

static moe_status parse_pretok(loader *L, const cJSON *j, const char *path, size_t *cap)
{
    moe_tokenizer *tok = L->tok;
    if (!j || cJSON_IsNull(j))
        return MOE_OK;
    char p[256];
    const char *type = type_of(j);
    if (!cJSON_IsObject(j) || !type) {
        snprintf(p, sizeof p, "%s.type", path);
        return bad(L, p, "missing");
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, "pretokenizers");
        snprintf(p, sizeof p, "%s.pretokenizers", path);
        if (!cJSON_IsArray(arr))
            return bad(L, p, "expected an array");
        int i = 0;
        for (const cJSON *c = arr->child; c; c = c->next, i++) {
            snprintf(p, sizeof p, "%s.pretokenizers[%d]", path, i);
            moe_status st = parse_pretok(L, c, p, cap);
            if (st)
                return st;
        }
        return MOE_OK;
    }
    tok_pretok t = {0};
    moe_status st = MOE_OK;
    if (strcmp(type, "Split") == 0) {
        const char *pat, *beh;
        bool literal;
        t.type = TOK_PRE_SPLIT;
        if ((st = get_pattern(L, j, &pat, &literal, path)) || (st = get_str(L, j, "behavior", &beh, path)) ||
            (st = get_bool(L, j, "invert", false, &t.invert, path)))
            return st;
        snprintf(p, sizeof p, "%s.behavior", path);
        if (!beh)
            return bad(L, p, "missing");
        if (strcmp(beh, "Removed") == 0)
            t.behavior = TOK_SPLIT_REMOVED;
        else if (strcmp(beh, "Isolated") == 0)
            t.behavior = TOK_SPLIT_ISOLATED;
        else if (strcmp(beh, "MergedWithPrevious") == 0)
            t.behavior = TOK_SPLIT_MERGED_PREV;
        else if (strcmp(beh, "MergedWithNext") == 0)
            t.behavior = TOK_SPLIT_MERGED_NEXT;
        else if (strcmp(beh, "Contiguous") == 0)
            t.behavior = TOK_SPLIT_CONTIGUOUS;
        else
            return unsupported(L, p, beh);
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!*pat)
            return bad(L, p, "empty pattern");
        if ((st = tok_regex_compile(&t.re, pat, strlen(pat), literal, L->name, p)))
            return st;
    } else if (strcmp(type, "ByteLevel") == 0) {
        t.type = TOK_PRE_BYTELEVEL;
        if ((st = get_bool(L, j, "add_prefix_space", true, &t.add_prefix_space, path)) ||
            (st = get_bool(L, j, "use_regex", true, &t.use_regex, path)))
            return st;
        snprintf(p, sizeof p, "%s (GPT-2 pattern)", path);
        if (t.use_regex && (st = tok_regex_compile(&t.re, GPT2_PATTERN, strlen(GPT2_PATTERN), false, L->name, p)))
            return st;
    } else if (strcmp(type, "Metaspace") == 0) {
        t.type = TOK_PRE_METASPACE;
        if ((st = get_char(L, j, "replacement", "\xE2\x96\x81", t.repl, &t.repl_len, &t.repl_cp, path)) ||
            (st = parse_prepend_scheme(L, j, &t.prepend_scheme, path)) ||
            (st = get_bool(L, j, "split", true, &t.split, path)))
            return st;
    } else if (strcmp(type, "Digits") == 0) {
        t.type = TOK_PRE_DIGITS;
        if ((st = get_bool(L, j, "individual_digits", false, &t.individual_digits, path)))
            return st;
    } else {
        snprintf(p, sizeof p, "%s.type", path);
        return unsupported(L, p, type);
    }
    if (!grow((void **)&tok->pretoks, cap, tok->n_pretoks, sizeof *tok->pretoks)) {
        tok_regex_free(&t.re);
        return nomem(L);
    }
    tok->pretoks[tok->n_pretoks++] = t;
    return MOE_OK;
}

/* ---- decoders ---- */

static moe_status parse_decoder(loader *L, const cJSON *j, const char *path, size_t *cap)
{
    moe_tokenizer *tok = L->tok;
    if (!j || cJSON_IsNull(j))
        return MOE_OK;
    char p[256];
    const char *type = type_of(j);
    if (!cJSON_IsObject(j) || !type) {
        snprintf(p, sizeof p, "%s.type", path);
        return bad(L, p, "missing");
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, "decoders");
        snprintf(p, sizeof p, "%s.decoders", path);
        if (!cJSON_IsArray(arr))
            return bad(L, p, "expected an array");
        int i = 0;
        for (const cJSON *c = arr->child; c; c = c->next, i++) {
            snprintf(p, sizeof p, "%s.decoders[%d]", path, i);
            moe_status st = parse_decoder(L, c, p, cap);
            if (st)
                return st;
        }
        return MOE_OK;
    }
    tok_dec d = {0};
    moe_status st = MOE_OK;
    if (strcmp(type, "ByteLevel") == 0)
        d.type = TOK_DEC_BYTELEVEL;
    else if (strcmp(type, "ByteFallback") == 0)
        d.type = TOK_DEC_BYTEFALLBACK;
    else if (strcmp(type, "Fuse") == 0)
        d.type = TOK_DEC_FUSE;
    else if (strcmp(type, "Metaspace") == 0) {
        d.type = TOK_DEC_METASPACE;
        if ((st = get_char(L, j, "replacement", "\xE2\x96\x81", d.ch, &d.ch_len, NULL, path)) ||
            (st = parse_prepend_scheme(L, j, &d.prepend_scheme, path)))
            return st;
    } else if (strcmp(type, "Strip") == 0) {
        long start, stop;
        d.type = TOK_DEC_STRIP;
        if ((st = get_char(L, j, "content", " ", d.ch, &d.ch_len, NULL, path)) ||
            (st = get_int(L, j, "start", 0, 0, 1 << 20, &start, path)) ||
            (st = get_int(L, j, "stop", 0, 0, 1 << 20, &stop, path)))
            return st;
        d.start = (int)start;
        d.stop = (int)stop;
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat, *content;
        bool literal;
        d.type = TOK_DEC_REPLACE;
        if ((st = get_pattern(L, j, &pat, &literal, path)) || (st = get_str(L, j, "content", &content, path)))
            return st;
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!literal)
            return unsupported(L, p, "Regex");
        if (!*pat)
            return bad(L, p, "empty pattern");
        if (!content) {
            snprintf(p, sizeof p, "%s.content", path);
            return bad(L, p, "missing");
        }
        d.pattern_len = strlen(pat);
        d.content_len = strlen(content);
        d.pattern = dup_n(pat, d.pattern_len);
        d.content = dup_n(content, d.content_len);
        if (!d.pattern || !d.content) {
            free(d.pattern);
            free(d.content);
            return nomem(L);
        }
    } else {
        snprintf(p, sizeof p, "%s.type", path);
        return unsupported(L, p, type);
    }
    if (!grow((void **)&tok->decs, cap, tok->n_decs, sizeof *tok->decs)) {
        free(d.pattern);
        free(d.content);
        return nomem(L);
    }
    tok->decs[tok->n_decs++] = d;
    return MOE_OK;
}

/* ---- post-processors: composed into one template for a single sequence ---- */

static void free_items(tok_tmpl_item *items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(items[i].ids);
    free(items);
}

/* Replaces the current template by `outer` with its sequence slot(s) substituted by the current
 * template: the composition of applying the current processor, then `outer`. Takes `outer`. */
static moe_status compose(loader *L, tok_tmpl_item *outer, size_t n_outer)
{
    tok_post *post = &L->tok->post;
    size_t n = 0;
    for (size_t i = 0; i < n_outer; i++)
        n += outer[i].ids ? 1 : post->n_items;
    tok_tmpl_item *items = calloc(n ? n : 1, sizeof *items);
    if (!items) {
        free_items(outer, n_outer);
        return nomem(L);
    }
    size_t k = 0;
    for (size_t i = 0; i < n_outer; i++) {
        if (outer[i].ids) {
            items[k++] = outer[i];
            outer[i].ids = NULL;
            continue;
        }
        for (size_t m = 0; m < post->n_items; m++, k++) {
            items[k].n = post->items[m].n;
            if (post->items[m].ids) {
                items[k].ids = malloc(post->items[m].n * sizeof(int32_t) + 1);
                if (!items[k].ids) {
                    free_items(items, k);
                    free_items(outer, n_outer);
                    return nomem(L);
                }
                memcpy(items[k].ids, post->items[m].ids, post->items[m].n * sizeof(int32_t));
            }
        }
    }
    free_items(outer, n_outer);
    free_items(post->items, post->n_items);
    post->items = items;
    post->n_items = n;
    return MOE_OK;
}

static moe_status special_item(loader *L, const char *token, const cJSON *idv, tok_tmpl_item *it,
                               const char *path)
{
    it->n = 1;
    it->ids = malloc(sizeof(int32_t));
    if (!it->ids)
        return nomem(L);
    if (!cJSON_IsNumber(idv) || idv->valuedouble < 0 || idv->valuedouble >= TOK_MAX_ID ||
        idv->valuedouble != floor(idv->valuedouble))
        return bad(L, path, "expected [token, id]");
    it->ids[0] = (int32_t)idv->valuedouble;
    (void)token;
    return MOE_OK;
}

static moe_status parse_template(loader *L, const cJSON *j, const char *path)
{
    char p[256];
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single");
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
    snprintf(p, sizeof p, "%s.single", path);
    if (!cJSON_IsArray(single))
        return bad(L, p, "expected an array");
    size_t n = (size_t)cJSON_GetArraySize(single);
    tok_tmpl_item *items = calloc(n ? n : 1, sizeof *items);
    if (!items)
        return nomem(L);
    moe_status st = MOE_OK;
    size_t i = 0;
    for (const cJSON *c = single->child; c && !st; c = c->next, i++) {
        snprintf(p, sizeof p, "%s.single[%zu]", path, i);
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(c, "SpecialToken");
        const cJSON *sq = cJSON_GetObjectItemCaseSensitive(c, "Sequence");
        if (cJSON_IsObject(sq)) {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(sq, "id");
            if (!cJSON_IsString(id) || strcmp(id->valuestring, "A") != 0)
                st = bad(L, p, "a single-sequence template can only hold sequence A");
            continue; /* ids == NULL: the sequence slot */
        }
        const cJSON *id = cJSON_IsObject(sp) ? cJSON_GetObjectItemCaseSensitive(sp, "id") : NULL;
        if (!cJSON_IsString(id) || !id->valuestring) {
            st = bad(L, p, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
            continue;
        }
        const cJSON *def = cJSON_IsObject(specials) ? cJSON_GetObjectItemCaseSensitive(specials, id->valuestring) : NULL;
        const cJSON *ids = def ? cJSON_GetObjectItemCaseSensitive(def, "ids") : NULL;
        if (!cJSON_IsArray(ids)) {
            char why[300];
            snprintf(why, sizeof why, "special token '%.200s' is missing from special_tokens", id->valuestring);
            st = bad(L, p, why);
            continue;
        }
        size_t m = (size_t)cJSON_GetArraySize(ids), k = 0;
        items[i].ids = malloc(m * sizeof(int32_t) + 1);
        items[i].n = m;
        if (!items[i].ids) {
            st = nomem(L);
            continue;
        }
        for (const cJSON *v = ids->child; v; v = v->next, k++) {
            if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= TOK_MAX_ID ||
                v->valuedouble != floor(v->valuedouble)) {
                snprintf(p, sizeof p, "%s.special_tokens.%.100s.ids[%zu]", path, id->valuestring, k);
                st = bad(L, p, "expected a token id");
                break;
            }
            items[i].ids[k] = (int32_t)v->valuedouble;
        }
    }
    if (st) {
        free_items(items, n);
        return st;
    }
    return compose(L, items, n);
}

static moe_status parse_post(loader *L, const cJSON *j, const char *path)
{
    if (!j || cJSON_IsNull(j))
        return MOE_OK;
    char p[256];
    const char *type = type_of(j);
    if (!cJSON_IsObject(j) || !type) {
        snprintf(p, sizeof p, "%s.type", path);
        return bad(L, p, "missing");
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, "processors");
        snprintf(p, sizeof p, "%s.processors", path);
        if (!cJSON_IsArray(arr))
            return bad(L, p, "expected an array");
        int i = 0;
        for (const cJSON *c = arr->child; c; c = c->next, i++) {
            snprintf(p, sizeof p, "%s.processors[%d]", path, i);
            moe_status st = parse_post(L, c, p);
            if (st)
                return st;
        }
        return MOE_OK;
    }
    if (strcmp(type, "ByteLevel") == 0)
        return MOE_OK; /* only trims offsets, which we do not report */
    if (strcmp(type, "TemplateProcessing") == 0)
        return parse_template(L, j, path);
    if (strcmp(type, "BertProcessing") == 0 || strcmp(type, "RobertaProcessing") == 0) {
        /* single: cls $A sep */
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(j, "cls");
        const cJSON *sep = cJSON_GetObjectItemCaseSensitive(j, "sep");
        tok_tmpl_item *items = calloc(3, sizeof *items);
        if (!items)
            return nomem(L);
        snprintf(p, sizeof p, "%s.cls", path);
        moe_status st = special_item(L, NULL, cJSON_GetArrayItem(cls, 1), &items[0], p);
        snprintf(p, sizeof p, "%s.sep", path);
        if (!st)
            st = special_item(L, NULL, cJSON_GetArrayItem(sep, 1), &items[2], p);
        if (st) {
            free_items(items, 3);
            return st;
        }
        return compose(L, items, 3);
    }
    snprintf(p, sizeof p, "%s.type", path);
    return unsupported(L, p, type);
}

/* ---- model ---- */

static moe_status add_merge(loader *L, const char *a, size_t alen, const char *b, size_t blen,
                            uint32_t rank, const char *path)
{
    moe_tokenizer *tok = L->tok;
    int32_t ia = tok_strmap_get(&tok->vocab, a, alen);
    int32_t ib = tok_strmap_get(&tok->vocab, b, blen);
    size_t skip = tok->cont_prefix_len <= blen ? tok->cont_prefix_len : blen;
    char stackbuf[256];
    size_t mlen = alen + blen - skip;
    char *m = mlen < sizeof stackbuf ? stackbuf : malloc(mlen + 1);
    if (!m)
        return nomem(L);
    memcpy(m, a, alen);
    memcpy(m + alen, b + skip, blen - skip);
    int32_t im = tok_strmap_get(&tok->vocab, m, mlen);
    if (m != stackbuf)
        free(m);
    if (ia < 0 || ib < 0 || im < 0)
        return bad(L, path, "merge of tokens that are not in the vocabulary");
    if (!tok_pairmap_put(&tok->merges, ia, ib, rank, im))
        return nomem(L);
    return MOE_OK;
}

static moe_status parse_model(loader *L, const cJSON *m)
{
    moe_tokenizer *tok = L->tok;
    moe_status st;
    if (!cJSON_IsObject(m))
        return bad(L, "model", "missing");
    const char *type = type_of(m);
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (type && strcmp(type, "BPE") != 0)
        return unsupported(L, "model.type", type);
    if (!type && !merges)
        return bad(L, "model.type", "missing");

    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0.0))
        return unsupported(L, "model.dropout", "non-zero dropout");
    const char *unk, *prefix, *suffix;
    if ((st = get_str(L, m, "unk_token", &unk, "model")) ||
        (st = get_str(L, m, "continuing_subword_prefix", &prefix, "model")) ||
        (st = get_str(L, m, "end_of_word_suffix", &suffix, "model")) ||
        (st = get_bool(L, m, "fuse_unk", false, &tok->fuse_unk, "model")) ||
        (st = get_bool(L, m, "byte_fallback", false, &tok->byte_fallback, "model")) ||
        (st = get_bool(L, m, "ignore_merges", false, &tok->ignore_merges, "model")))
        return st;
    if (prefix && *prefix) {
        tok->cont_prefix_len = strlen(prefix);
        if (!(tok->cont_prefix = dup_n(prefix, tok->cont_prefix_len)))
            return nomem(L);
    }
    if (suffix && *suffix) {
        tok->eow_suffix_len = strlen(suffix);
        if (!(tok->eow_suffix = dup_n(suffix, tok->eow_suffix_len)))
            return nomem(L);
    }

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    if (!cJSON_IsObject(vocab))
        return bad(L, "model.vocab", "expected an object");
    size_t n = (size_t)cJSON_GetArraySize(vocab);
    tok->vocab_keys = calloc(n ? n : 1, sizeof *tok->vocab_keys);
    if (!tok->vocab_keys || !tok_strmap_init(&tok->vocab, n))
        return nomem(L);
    for (const cJSON *e = vocab->child; e; e = e->next) {
        char p[300];
        snprintf(p, sizeof p, "model.vocab[\"%.200s\"]", e->string ? e->string : "");
        if (!e->string)
            return bad(L, "model.vocab", "entry without a key");
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= TOK_MAX_ID ||
            e->valuedouble != floor(e->valuedouble))
            return bad(L, p, "expected a token id (integer below 4194304)");
        size_t len = strlen(e->string);
        if (tok_utf8_check(e->string, len) != len)
            return bad(L, p, "token is not valid UTF-8");
        char *key = dup_n(e->string, len);
        if (!key)
            return nomem(L);
        tok->vocab_keys[tok->n_vocab++] = key;
        int32_t id = (int32_t)e->valuedouble;
        if (!tok_strmap_put(&tok->vocab, key, (uint32_t)len, id))
            return nomem(L);
        if (id + 1 > tok->n_ids)
            tok->n_ids = id + 1;
    }

    if (merges && !cJSON_IsNull(merges)) {
        if (!cJSON_IsArray(merges))
            return bad(L, "model.merges", "expected an array");
        if (!tok_pairmap_init(&tok->merges, (size_t)cJSON_GetArraySize(merges)))
            return nomem(L);
        uint32_t rank = 0;
        for (const cJSON *e = merges->child; e; e = e->next, rank++) {
            char p[64];
            snprintf(p, sizeof p, "model.merges[%u]", rank);
            if (cJSON_IsString(e) && e->valuestring) {
                /* Legacy "a b" form: exactly one space, as HF requires. */
                const char *s = e->valuestring, *sp = strchr(s, ' ');
                if (!sp || strchr(sp + 1, ' '))
                    return bad(L, p, "expected \"left right\" with one space");
                if ((st = add_merge(L, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), rank, p)))
                    return st;
            } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
                       cJSON_IsString(e->child->next)) {
                const char *a = e->child->valuestring, *b = e->child->next->valuestring;
                if ((st = add_merge(L, a, strlen(a), b, strlen(b), rank, p)))
                    return st;
            } else
                return bad(L, p, "expected \"left right\" or [\"left\", \"right\"]");
        }
    } else if (!tok_pairmap_init(&tok->merges, 0))
        return nomem(L);

    tok->unk_id = -1;
    if (unk) {
        tok->unk_id = tok_strmap_get(&tok->vocab, unk, strlen(unk));
        if (tok->unk_id < 0)
            tok->unk_id = -2; /* configured but absent: an error only if it is ever needed */
    }
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof s, "<0x%02X>", b);
        tok->byte_ids[b] = tok_strmap_get(&tok->vocab, s, 6);
    }
    return MOE_OK;
}

static moe_status parse_added(loader *L, const cJSON *arr)
{
    moe_tokenizer *tok = L->tok;
    if (!arr || cJSON_IsNull(arr))
        return MOE_OK;
    if (!cJSON_IsArray(arr))
        return bad(L, "added_tokens", "expected an array");
    size_t n = (size_t)cJSON_GetArraySize(arr);
    tok->added = calloc(n ? n : 1, sizeof *tok->added);
    if (!tok->added || !tok_strmap_init(&tok->added_map, n))
        return nomem(L);
    size_t i = 0;
    for (const cJSON *e = arr->child; e; e = e->next, i++) {
        char p[64];
        snprintf(p, sizeof p, "added_tokens[%zu]", i);
        tok_added a = {0};
        long id;
        const char *content;
        moe_status st;
        if ((st = get_int(L, e, "id", -1, -1, TOK_MAX_ID - 1, &id, p)) ||
            (st = get_str(L, e, "content", &content, p)) ||
            (st = get_bool(L, e, "special", false, &a.special, p)) ||
            (st = get_bool(L, e, "lstrip", false, &a.lstrip, p)) ||
            (st = get_bool(L, e, "rstrip", false, &a.rstrip, p)) ||
            (st = get_bool(L, e, "single_word", false, &a.single_word, p)) ||
            (st = get_bool(L, e, "normalized", !a.special, &a.normalized, p)))
            return st;
        if (id < 0 || !content)
            return bad(L, p, "expected an id and a content");
        if (!*content)
            continue; /* HF ignores empty added tokens */
        a.id = (int32_t)id;
        a.len = (uint32_t)strlen(content);
        if (!(a.content = dup_n(content, a.len)))
            return nomem(L);
        tok->added[tok->n_added++] = a;
        if (!tok_strmap_put(&tok->added_map, a.content, a.len, a.id))
            return nomem(L);
        if (a.id + 1 > tok->n_ids)
            tok->n_ids = a.id + 1;
    }
    return MOE_OK;
}

/* id -> string (added tokens override the vocabulary) and which ids decode as special. */
static moe_status build_id_tables(loader *L)
{
    moe_tokenizer *tok = L->tok;
    size_t n = tok->n_ids ? (size_t)tok->n_ids : 1;
    tok->id_str = calloc(n, sizeof *tok->id_str);
    tok->id_len = calloc(n, sizeof *tok->id_len);
    tok->id_special = calloc(n, 1);
    if (!tok->id_str || !tok->id_len || !tok->id_special)
        return nomem(L);
    for (size_t i = 0; i < tok->n_vocab; i++) {
        const char *k = tok->vocab_keys[i];
        size_t len = strlen(k);
        int32_t id = tok_strmap_get(&tok->vocab, k, len);
        if (id >= 0 && !tok->id_str[id]) {
            tok->id_str[id] = tok->vocab_keys[i];
            tok->id_len[id] = (uint32_t)len;
        }
    }
    for (size_t i = 0; i < tok->n_added; i++) {
        const tok_added *a = &tok->added[i];
        /* HF decodes a normalized added token as its normalized form. */
        tok->id_str[a->id] = a->ncontent ? a->ncontent : a->content;
        tok->id_len[a->id] = a->ncontent ? a->nlen : a->len;
    }
    /* HF skips a token when its *content* is a special token's content. */
    tok_strmap special;
    if (!tok_strmap_init(&special, tok->n_added))
        return nomem(L);
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].special && !tok_strmap_put(&special, tok->added[i].content, tok->added[i].len, 1)) {
            tok_strmap_free(&special);
            return nomem(L);
        }
    if (special.n)
        for (int32_t id = 0; id < tok->n_ids; id++)
            if (tok->id_str[id] && tok_strmap_get(&special, tok->id_str[id], tok->id_len[id]) == 1)
                tok->id_special[id] = 1;
    tok_strmap_free(&special);
    return MOE_OK;
}

moe_status moe_tokenizer_parse(const char *json, size_t len, const char *name, moe_tokenizer **out)
{
    *out = NULL;
    if (!name)
        name = "tokenizer.json";
    if (!json)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: no JSON text", name);
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        long off = at && at >= json && at <= json + len ? (long)(at - json) : -1;
        return moe_error(MOE_ERR_FORMAT, "%s: malformed JSON near byte %ld", name, off);
    }
    moe_tokenizer *tok = calloc(1, sizeof *tok);
    loader L = {tok, name};
    moe_status st = MOE_OK;
    if (!tok) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", name);
    }
    tok->unk_id = -1;
    if (!(tok->cache = tok_cache_create()) || !(tok->name = dup_n(name, strlen(name))) ||
        !(tok->post.items = calloc(1, sizeof *tok->post.items))) {
        st = nomem(&L);
        goto done;
    }
    tok->post.n_items = 1; /* identity: just the sequence */
    L.name = tok->name;
    if (!cJSON_IsObject(root)) {
        st = bad(&L, "(root)", "expected an object");
        goto done;
    }
    size_t cap_norm = 0, cap_pre = 0, cap_dec = 0;
    if ((st = parse_model(&L, cJSON_GetObjectItemCaseSensitive(root, "model"))) ||
        (st = parse_added(&L, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"))) ||
        (st = parse_normalizer(&L, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer", &cap_norm)) ||
        (st = parse_pretok(&L, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), "pre_tokenizer", &cap_pre)) ||
        (st = parse_post(&L, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), "post_processor")) ||
        (st = parse_decoder(&L, cJSON_GetObjectItemCaseSensitive(root, "decoder"), "decoder", &cap_dec)))
        goto done;
    if (!cJSON_GetObjectItemCaseSensitive(root, "decoder") ||
        cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(root, "decoder"))) {
        /* No decoder: HF joins the tokens with spaces. */
        if (!(tok->decs = calloc(1, sizeof *tok->decs))) {
            st = nomem(&L);
            goto done;
        }
        tok->decs[0].type = TOK_DEC_JOIN;
        tok->n_decs = 1;
    }
    if ((st = tok_build_tries(tok)) || (st = build_id_tables(&L)))
        goto done;
done:
    cJSON_Delete(root);
    if (st) {
        moe_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return MOE_OK;
}

moe_status moe_tokenizer_load(const char *path, moe_tokenizer **out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_error(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    tok_buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (!tok_buf_put(&b, chunk, n)) {
            fclose(f);
            tok_buf_free(&b);
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory reading the file", path);
        }
    bool err = ferror(f);
    fclose(f);
    if (err) {
        tok_buf_free(&b);
        return moe_error(MOE_ERR_IO, "%s: read error", path);
    }
    moe_status st = moe_tokenizer_parse(b.p ? b.p : "", b.len, path, out);
    tok_buf_free(&b);
    return st;
}

void moe_tokenizer_free(moe_tokenizer *tok)
{
    if (!tok)
        return;
    free(tok->name);
    free(tok->id_str);
    free(tok->id_len);
    free(tok->id_special);
    for (size_t i = 0; i < tok->n_vocab; i++)
        free(tok->vocab_keys[i]);
    free(tok->vocab_keys);
    tok_strmap_free(&tok->vocab);
    tok_pairmap_free(&tok->merges);
    free(tok->cont_prefix);
    free(tok->eow_suffix);
    for (size_t i = 0; i < tok->n_added; i++) {
        free(tok->added[i].content);
        free(tok->added[i].ncontent);
    }
    free(tok->added);
    tok_strmap_free(&tok->added_map);
    tok_trie_free(&tok->trie_raw);
    tok_trie_free(&tok->trie_norm);
    for (size_t i = 0; i < tok->n_norms; i++) {
        free(tok->norms[i].str);
        tok_regex_free(&tok->norms[i].re);
    }
    free(tok->norms);
    for (size_t i = 0; i < tok->n_pretoks; i++)
        tok_regex_free(&tok->pretoks[i].re);
    free(tok->pretoks);
    for (size_t i = 0; i < tok->n_decs; i++) {
        free(tok->decs[i].pattern);
        free(tok->decs[i].content);
    }
    free(tok->decs);
    free_items(tok->post.items, tok->post.n_items);
    tok_cache_free(tok->cache);
    free(tok);
}

int moe_tokenizer_vocab_size(const moe_tokenizer *tok) { return tok->n_ids; }

int moe_tokenizer_token_id(const moe_tokenizer *tok, const char *token)
{
    size_t n = strlen(token);
    int32_t id = tok_strmap_get(&tok->added_map, token, n);
    return id >= 0 ? id : tok_strmap_get(&tok->vocab, token, n);
}
