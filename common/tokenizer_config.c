/* Parsing the pipeline components of tokenizer.json (normalizer, pre_tokenizer, decoder,
 * post_processor) into tokenizer_internal.h's steps; nested Sequences are flattened and anything
 * unsupported is refused with a message naming its JSON field. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/tokenizer_internal.h"

/* A string holding exactly one character (Metaspace replacement, Strip content). */
static moe_status get_char(const tok_loader *L, const cJSON *obj, const char *key, const char *dflt,
                           char out[5], size_t *out_len, uint32_t *cp, const char *path)
{
    const char *s;
    moe_status st = tok_get_str(L, obj, key, &s, path);
    if (st)
        return st;
    if (!s)
        s = dflt;
    char p[256];
    snprintf(p, sizeof p, "%s.%s", path, key);
    size_t n = strlen(s);
    if (n == 0 || n > 4 || moe_utf8_seq_len((const unsigned char *)s, n) != n)
        return tok_bad(L, p, "expected a single character");
    memcpy(out, s, n);
    out[n] = '\0';
    *out_len = n;
    if (cp)
        moe_utf8_decode(s, cp);
    return MOE_OK;
}

/* {"String": "..."} or {"Regex": "..."} */
static moe_status get_pattern(const tok_loader *L, const cJSON *obj, const char **pat,
                              bool *literal, const char *path)
{
    char p[256];
    snprintf(p, sizeof p, "%s.pattern", path);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, "pattern");
    if (!cJSON_IsObject(v))
        return tok_bad(L, p, "expected {\"String\": ...} or {\"Regex\": ...}");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(v, "String");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(v, "Regex");
    if (cJSON_IsString(s) && s->valuestring) {
        *pat = s->valuestring;
        *literal = true;
    } else if (cJSON_IsString(r) && r->valuestring) {
        *pat = r->valuestring;
        *literal = false;
    } else
        return tok_bad(L, p, "expected {\"String\": ...} or {\"Regex\": ...}");
    size_t n = strlen(*pat);
    if (moe_utf8_check(*pat, n) != n)
        return tok_bad(L, p, "not valid UTF-8");
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

/* ---- the head every step kind shares ----
 * A null step is none; an object without "type" is an error naming PATH.type; a "Sequence" is
 * flattened: each item of its array `items` goes through `parse` (the caller's own parser). Returns
 * the step's type for the caller to parse, or NULL with *st set when nothing is left to do (done or
 * failed). */
typedef moe_status (*step_parser)(tok_loader *L, const cJSON *j, const char *path, size_t *cap);

static const char *step_head(tok_loader *L, const cJSON *j, const char *path, const char *items,
                             step_parser parse, size_t *cap, moe_status *st)
{
    *st = MOE_OK;
    if (!j || cJSON_IsNull(j))
        return NULL;
    char p[256];
    const char *type = tok_type_of(j);
    if (!cJSON_IsObject(j) || !type) {
        snprintf(p, sizeof p, "%s.type", path);
        *st = tok_bad(L, p, "missing");
        return NULL;
    }
    if (strcmp(type, "Sequence") != 0)
        return type;
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, items);
    snprintf(p, sizeof p, "%s.%s", path, items);
    if (!cJSON_IsArray(arr)) {
        *st = tok_bad(L, p, "expected an array");
        return NULL;
    }
    int i = 0;
    for (const cJSON *c = arr->child; c && *st == MOE_OK; c = c->next, i++) {
        snprintf(p, sizeof p, "%s.%s[%d]", path, items, i);
        *st = parse(L, c, p, cap);
    }
    return NULL;
}

/* ---- normalizers ---- */

moe_status tok_parse_normalizer(tok_loader *L, const cJSON *j, const char *path, size_t *cap)
{
    moe_tokenizer *tok = L->tok;
    moe_status head;
    const char *type = step_head(L, j, path, "normalizers", tok_parse_normalizer, cap, &head);
    if (!type)
        return head;
    char p[256];
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
        if ((st = tok_get_str(L, j, "prepend", &s, path)))
            return st;
        if (!s) {
            snprintf(p, sizeof p, "%s.prepend", path);
            return tok_bad(L, p, "missing");
        }
        n.str_len = strlen(s);
        if (!(n.str = tok_strndup(s, n.str_len)))
            return tok_nomem(L);
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat, *content;
        bool literal;
        n.type = TOK_NORM_REPLACE;
        if ((st = get_pattern(L, j, &pat, &literal, path)) ||
            (st = tok_get_str(L, j, "content", &content, path)))
            return st;
        if (!content) {
            snprintf(p, sizeof p, "%s.content", path);
            return tok_bad(L, p, "missing");
        }
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!*pat)
            return tok_bad(L, p, "empty pattern");
        if ((st = tok_regex_compile(&n.re, pat, strlen(pat), literal, L->name, p)))
            return st;
        n.str_len = strlen(content);
        if (!(n.str = tok_strndup(content, n.str_len))) {
            tok_regex_free(&n.re);
            return tok_nomem(L);
        }
    } else if (strcmp(type, "Strip") == 0) {
        n.type = TOK_NORM_STRIP;
        if ((st = tok_get_bool(L, j, "strip_left", true, &n.left, path)) ||
            (st = tok_get_bool(L, j, "strip_right", true, &n.right, path)))
            return st;
    } else {
        snprintf(p, sizeof p, "%s.type", path);
        return tok_unsupported(L, p, type);
    }
    if (!grow((void **)&tok->norms, cap, tok->n_norms, sizeof *tok->norms)) {
        free(n.str);
        tok_regex_free(&n.re);
        return tok_nomem(L);
    }
    tok->norms[tok->n_norms++] = n;
    return MOE_OK;
}

/* ---- pre-tokenizers ---- */

#define GPT2_PATTERN                                                                               \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

static moe_status parse_prepend_scheme(const tok_loader *L, const cJSON *j, int *scheme,
                                       const char *path)
{
    const char *s;
    moe_status st = tok_get_str(L, j, "prepend_scheme", &s, path);
    if (st)
        return st;
    if (!s) {
        /* Files written before prepend_scheme existed say add_prefix_space. */
        bool aps;
        if ((st = tok_get_bool(L, j, "add_prefix_space", true, &aps, path)))
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
        return tok_unsupported(L, p, s);
    return MOE_OK;
}

moe_status tok_parse_pretok(tok_loader *L, const cJSON *j, const char *path, size_t *cap)
{
    moe_tokenizer *tok = L->tok;
    moe_status head;
    const char *type = step_head(L, j, path, "pretokenizers", tok_parse_pretok, cap, &head);
    if (!type)
        return head;
    char p[256];
    tok_pretok t = {0};
    moe_status st = MOE_OK;
    if (strcmp(type, "Split") == 0) {
        const char *pat, *beh;
        bool literal;
        t.type = TOK_PRE_SPLIT;
        if ((st = get_pattern(L, j, &pat, &literal, path)) ||
            (st = tok_get_str(L, j, "behavior", &beh, path)) ||
            (st = tok_get_bool(L, j, "invert", false, &t.invert, path)))
            return st;
        snprintf(p, sizeof p, "%s.behavior", path);
        if (!beh)
            return tok_bad(L, p, "missing");
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
            return tok_unsupported(L, p, beh);
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!*pat)
            return tok_bad(L, p, "empty pattern");
        if ((st = tok_regex_compile(&t.re, pat, strlen(pat), literal, L->name, p)))
            return st;
    } else if (strcmp(type, "ByteLevel") == 0) {
        t.type = TOK_PRE_BYTELEVEL;
        if ((st = tok_get_bool(L, j, "add_prefix_space", true, &t.add_prefix_space, path)) ||
            (st = tok_get_bool(L, j, "use_regex", true, &t.use_regex, path)))
            return st;
        snprintf(p, sizeof p, "%s (GPT-2 pattern)", path);
        if (t.use_regex &&
            (st = tok_regex_compile(&t.re, GPT2_PATTERN, strlen(GPT2_PATTERN), false, L->name, p)))
            return st;
    } else if (strcmp(type, "Metaspace") == 0) {
        t.type = TOK_PRE_METASPACE;
        if ((st = get_char(L, j, "replacement", "\xE2\x96\x81", t.repl, &t.repl_len, &t.repl_cp,
                           path)) ||
            (st = parse_prepend_scheme(L, j, &t.prepend_scheme, path)) ||
            (st = tok_get_bool(L, j, "split", true, &t.split, path)))
            return st;
    } else if (strcmp(type, "Digits") == 0) {
        t.type = TOK_PRE_DIGITS;
        if ((st = tok_get_bool(L, j, "individual_digits", false, &t.individual_digits, path)))
            return st;
    } else {
        snprintf(p, sizeof p, "%s.type", path);
        return tok_unsupported(L, p, type);
    }
    if (!grow((void **)&tok->pretoks, cap, tok->n_pretoks, sizeof *tok->pretoks)) {
        tok_regex_free(&t.re);
        return tok_nomem(L);
    }
    tok->pretoks[tok->n_pretoks++] = t;
    return MOE_OK;
}

/* ---- decoders ---- */

moe_status tok_parse_decoder(tok_loader *L, const cJSON *j, const char *path, size_t *cap)
{
    moe_tokenizer *tok = L->tok;
    moe_status head;
    const char *type = step_head(L, j, path, "decoders", tok_parse_decoder, cap, &head);
    if (!type)
        return head;
    char p[256];
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
            (st = tok_get_int(L, j, "start", 0, 0, 1 << 20, &start, path)) ||
            (st = tok_get_int(L, j, "stop", 0, 0, 1 << 20, &stop, path)))
            return st;
        d.start = (int)start;
        d.stop = (int)stop;
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat, *content;
        bool literal;
        d.type = TOK_DEC_REPLACE;
        if ((st = get_pattern(L, j, &pat, &literal, path)) ||
            (st = tok_get_str(L, j, "content", &content, path)))
            return st;
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!literal)
            return tok_unsupported(L, p, "Regex");
        if (!*pat)
            return tok_bad(L, p, "empty pattern");
        if (!content) {
            snprintf(p, sizeof p, "%s.content", path);
            return tok_bad(L, p, "missing");
        }
        d.pattern_len = strlen(pat);
        d.content_len = strlen(content);
        d.pattern = tok_strndup(pat, d.pattern_len);
        d.content = tok_strndup(content, d.content_len);
        if (!d.pattern || !d.content) {
            free(d.pattern);
            free(d.content);
            return tok_nomem(L);
        }
    } else {
        snprintf(p, sizeof p, "%s.type", path);
        return tok_unsupported(L, p, type);
    }
    if (!grow((void **)&tok->decs, cap, tok->n_decs, sizeof *tok->decs)) {
        free(d.pattern);
        free(d.content);
        return tok_nomem(L);
    }
    tok->decs[tok->n_decs++] = d;
    return MOE_OK;
}

/* ---- post-processors: composed into one template for a single sequence ---- */

void tok_free_items(tok_tmpl_item *items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(items[i].ids);
    free(items);
}

/* Replaces the current template by `outer` with its sequence slot(s) substituted by the current
 * template: the composition of applying the current processor, then `outer`. Takes `outer`. */
static moe_status compose(tok_loader *L, tok_tmpl_item *outer, size_t n_outer)
{
    tok_post *post = &L->tok->post;
    size_t n = 0;
    for (size_t i = 0; i < n_outer; i++)
        n += outer[i].ids ? 1 : post->n_items;
    tok_tmpl_item *items = calloc(n ? n : 1, sizeof *items);
    if (!items) {
        tok_free_items(outer, n_outer);
        return tok_nomem(L);
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
                    tok_free_items(items, k);
                    tok_free_items(outer, n_outer);
                    return tok_nomem(L);
                }
                memcpy(items[k].ids, post->items[m].ids, post->items[m].n * sizeof(int32_t));
            }
        }
    }
    tok_free_items(outer, n_outer);
    tok_free_items(post->items, post->n_items);
    post->items = items;
    post->n_items = n;
    return MOE_OK;
}

/* One special token of Bert/RobertaProcessing: ["[CLS]", 101]; idv is the id element. */
static moe_status special_item(tok_loader *L, const cJSON *idv, tok_tmpl_item *it, const char *path)
{
    it->n = 1;
    it->ids = malloc(sizeof(int32_t));
    if (!it->ids)
        return tok_nomem(L);
    if (!cJSON_IsNumber(idv) || idv->valuedouble < 0 || idv->valuedouble >= TOK_MAX_ID ||
        idv->valuedouble != floor(idv->valuedouble))
        return tok_bad(L, path, "expected [token, id]");
    it->ids[0] = (int32_t)idv->valuedouble;
    return MOE_OK;
}

static moe_status parse_template(tok_loader *L, const cJSON *j, const char *path)
{
    char p[256];
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single");
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
    snprintf(p, sizeof p, "%s.single", path);
    if (!cJSON_IsArray(single))
        return tok_bad(L, p, "expected an array");
    size_t n = (size_t)cJSON_GetArraySize(single);
    tok_tmpl_item *items = calloc(n ? n : 1, sizeof *items);
    if (!items)
        return tok_nomem(L);
    moe_status st = MOE_OK;
    size_t i = 0;
    for (const cJSON *c = single->child; c && !st; c = c->next, i++) {
        snprintf(p, sizeof p, "%s.single[%zu]", path, i);
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(c, "SpecialToken");
        const cJSON *sq = cJSON_GetObjectItemCaseSensitive(c, "Sequence");
        if (cJSON_IsObject(sq)) {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(sq, "id");
            if (!cJSON_IsString(id) || strcmp(id->valuestring, "A") != 0)
                st = tok_bad(L, p, "a single-sequence template can only hold sequence A");
            continue; /* ids == NULL: the sequence slot */
        }
        const cJSON *id = cJSON_IsObject(sp) ? cJSON_GetObjectItemCaseSensitive(sp, "id") : NULL;
        if (!cJSON_IsString(id) || !id->valuestring) {
            st = tok_bad(L, p, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
            continue;
        }
        const cJSON *def = cJSON_IsObject(specials)
                               ? cJSON_GetObjectItemCaseSensitive(specials, id->valuestring)
                               : NULL;
        const cJSON *ids = def ? cJSON_GetObjectItemCaseSensitive(def, "ids") : NULL;
        if (!cJSON_IsArray(ids)) {
            char why[300];
            snprintf(why, sizeof why, "special token '%.200s' is missing from special_tokens",
                     id->valuestring);
            st = tok_bad(L, p, why);
            continue;
        }
        size_t m = (size_t)cJSON_GetArraySize(ids), k = 0;
        items[i].ids = malloc(m * sizeof(int32_t) + 1);
        items[i].n = m;
        if (!items[i].ids) {
            st = tok_nomem(L);
            continue;
        }
        for (const cJSON *v = ids->child; v; v = v->next, k++) {
            if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= TOK_MAX_ID ||
                v->valuedouble != floor(v->valuedouble)) {
                snprintf(p, sizeof p, "%s.special_tokens.%.100s.ids[%zu]", path, id->valuestring,
                         k);
                st = tok_bad(L, p, "expected a token id");
                break;
            }
            items[i].ids[k] = (int32_t)v->valuedouble;
        }
    }
    if (st) {
        tok_free_items(items, n);
        return st;
    }
    return compose(L, items, n);
}

/* tok_parse_post as a step_parser (post-processors collect no array). */
static moe_status post_item(tok_loader *L, const cJSON *j, const char *path, size_t *cap)
{
    (void)cap;
    return tok_parse_post(L, j, path);
}

moe_status tok_parse_post(tok_loader *L, const cJSON *j, const char *path)
{
    moe_status head;
    const char *type = step_head(L, j, path, "processors", post_item, NULL, &head);
    if (!type)
        return head;
    char p[256];
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
            return tok_nomem(L);
        snprintf(p, sizeof p, "%s.cls", path);
        moe_status st = special_item(L, cJSON_GetArrayItem(cls, 1), &items[0], p);
        snprintf(p, sizeof p, "%s.sep", path);
        if (!st)
            st = special_item(L, cJSON_GetArrayItem(sep, 1), &items[2], p);
        if (st) {
            tok_free_items(items, 3);
            return st;
        }
        return compose(L, items, 3);
    }
    snprintf(p, sizeof p, "%s.type", path);
    return tok_unsupported(L, p, type);
}
