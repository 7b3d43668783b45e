/* Loading a Hugging Face tokenizer.json: the file, the BPE model, the added tokens, the id
 * tables, the JSON field helpers the component parsers share, and the small lookups of
 * tokenizer.h. The pipeline components are parsed in tokenizer_config.c. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/file.h"
#include "common/tokenizer_internal.h"

moe_status tok_unsupported(const tok_loader *L, const char *path, const char *what)
{
    return moe_error(MOE_ERR_UNSUPPORTED, "%s: %s '%s' is not supported", L->name, path, what);
}

moe_status tok_bad(const tok_loader *L, const char *path, const char *why)
{
    return moe_error(MOE_ERR_FORMAT, "%s: %s: %s", L->name, path, why);
}

moe_status tok_nomem(const tok_loader *L)
{
    return moe_error(MOE_ERR_NOMEM, "%s: out of memory while loading the tokenizer", L->name);
}

char *tok_strndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* Optional bool field: absent or null -> dflt. */
moe_status tok_get_bool(const tok_loader *L, const cJSON *obj, const char *key, bool dflt,
                        bool *out, const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return MOE_OK;
    }
    if (!cJSON_IsBool(v)) {
        char p[256];
        snprintf(p, sizeof p, "%s.%s", path, key);
        return tok_bad(L, p, "expected true or false");
    }
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

/* Optional string field: absent or null -> NULL. Validated as UTF-8. */
moe_status tok_get_str(const tok_loader *L, const cJSON *obj, const char *key, const char **out,
                       const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = NULL;
    if (!v || cJSON_IsNull(v))
        return MOE_OK;
    char p[256];
    snprintf(p, sizeof p, "%s.%s", path, key);
    if (!cJSON_IsString(v) || !v->valuestring)
        return tok_bad(L, p, "expected a string");
    size_t n = strlen(v->valuestring);
    if (moe_utf8_check(v->valuestring, n) != n)
        return tok_bad(L, p, "not valid UTF-8");
    *out = v->valuestring;
    return MOE_OK;
}

moe_status tok_get_int(const tok_loader *L, const cJSON *obj, const char *key, long dflt, long lo,
                       long hi, long *out, const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return MOE_OK;
    }
    char p[256];
    snprintf(p, sizeof p, "%s.%s", path, key);
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < (double)lo || v->valuedouble > (double)hi)
        return tok_bad(L, p, "expected an integer in range");
    *out = (long)v->valuedouble;
    return MOE_OK;
}

const char *tok_type_of(const cJSON *obj)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(t) && t->valuestring ? t->valuestring : NULL;
}

/* ---- model ---- */

static moe_status add_merge(tok_loader *L, const char *a, size_t alen, const char *b, size_t blen,
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
        return tok_nomem(L);
    memcpy(m, a, alen);
    memcpy(m + alen, b + skip, blen - skip);
    int32_t im = tok_strmap_get(&tok->vocab, m, mlen);
    if (m != stackbuf)
        free(m);
    if (ia < 0 || ib < 0 || im < 0)
        return tok_bad(L, path, "merge of tokens that are not in the vocabulary");
    if (!tok_pairmap_put(&tok->merges, ia, ib, rank, im))
        return tok_nomem(L);
    return MOE_OK;
}

static moe_status parse_model(tok_loader *L, const cJSON *m)
{
    moe_tokenizer *tok = L->tok;
    moe_status st;
    if (!cJSON_IsObject(m))
        return tok_bad(L, "model", "missing");
    const char *type = tok_type_of(m);
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (type && strcmp(type, "BPE") != 0)
        return tok_unsupported(L, "model.type", type);
    if (!type && !merges)
        return tok_bad(L, "model.type", "missing");

    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dropout && !cJSON_IsNull(dropout) &&
        !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0.0))
        return tok_unsupported(L, "model.dropout", "non-zero dropout");
    const char *unk, *prefix, *suffix;
    if ((st = tok_get_str(L, m, "unk_token", &unk, "model")) ||
        (st = tok_get_str(L, m, "continuing_subword_prefix", &prefix, "model")) ||
        (st = tok_get_str(L, m, "end_of_word_suffix", &suffix, "model")) ||
        (st = tok_get_bool(L, m, "fuse_unk", false, &tok->fuse_unk, "model")) ||
        (st = tok_get_bool(L, m, "byte_fallback", false, &tok->byte_fallback, "model")) ||
        (st = tok_get_bool(L, m, "ignore_merges", false, &tok->ignore_merges, "model")))
        return st;
    if (prefix && *prefix) {
        tok->cont_prefix_len = strlen(prefix);
        if (!(tok->cont_prefix = tok_strndup(prefix, tok->cont_prefix_len)))
            return tok_nomem(L);
    }
    if (suffix && *suffix) {
        tok->eow_suffix_len = strlen(suffix);
        if (!(tok->eow_suffix = tok_strndup(suffix, tok->eow_suffix_len)))
            return tok_nomem(L);
    }

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    if (!cJSON_IsObject(vocab))
        return tok_bad(L, "model.vocab", "expected an object");
    size_t n = (size_t)cJSON_GetArraySize(vocab);
    tok->vocab_keys = calloc(n ? n : 1, sizeof *tok->vocab_keys);
    if (!tok->vocab_keys || !tok_strmap_init(&tok->vocab, n))
        return tok_nomem(L);
    for (const cJSON *e = vocab->child; e; e = e->next) {
        char p[300];
        snprintf(p, sizeof p, "model.vocab[\"%.200s\"]", e->string ? e->string : "");
        if (!e->string)
            return tok_bad(L, "model.vocab", "entry without a key");
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= TOK_MAX_ID ||
            e->valuedouble != floor(e->valuedouble))
            return tok_bad(L, p, "expected a token id (integer below 4194304)");
        size_t len = strlen(e->string);
        if (moe_utf8_check(e->string, len) != len)
            return tok_bad(L, p, "token is not valid UTF-8");
        char *key = tok_strndup(e->string, len);
        if (!key)
            return tok_nomem(L);
        tok->vocab_keys[tok->n_vocab++] = key;
        int32_t id = (int32_t)e->valuedouble;
        if (!tok_strmap_put(&tok->vocab, key, (uint32_t)len, id))
            return tok_nomem(L);
        if (id + 1 > tok->n_ids)
            tok->n_ids = id + 1;
    }

    if (merges && !cJSON_IsNull(merges)) {
        if (!cJSON_IsArray(merges))
            return tok_bad(L, "model.merges", "expected an array");
        if (!tok_pairmap_init(&tok->merges, (size_t)cJSON_GetArraySize(merges)))
            return tok_nomem(L);
        uint32_t rank = 0;
        for (const cJSON *e = merges->child; e; e = e->next, rank++) {
            char p[64];
            snprintf(p, sizeof p, "model.merges[%u]", rank);
            if (cJSON_IsString(e) && e->valuestring) {
                /* Legacy "a b" form: exactly one space, as HF requires. */
                const char *s = e->valuestring, *sp = strchr(s, ' ');
                if (!sp || strchr(sp + 1, ' '))
                    return tok_bad(L, p, "expected \"left right\" with one space");
                if ((st = add_merge(L, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), rank, p)))
                    return st;
            } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
                       cJSON_IsString(e->child->next)) {
                const char *a = e->child->valuestring, *b = e->child->next->valuestring;
                if ((st = add_merge(L, a, strlen(a), b, strlen(b), rank, p)))
                    return st;
            } else
                return tok_bad(L, p, "expected \"left right\" or [\"left\", \"right\"]");
        }
    } else if (!tok_pairmap_init(&tok->merges, 0))
        return tok_nomem(L);

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

static moe_status parse_added(tok_loader *L, const cJSON *arr)
{
    moe_tokenizer *tok = L->tok;
    if (!arr || cJSON_IsNull(arr))
        return MOE_OK;
    if (!cJSON_IsArray(arr))
        return tok_bad(L, "added_tokens", "expected an array");
    size_t n = (size_t)cJSON_GetArraySize(arr);
    tok->added = calloc(n ? n : 1, sizeof *tok->added);
    if (!tok->added || !tok_strmap_init(&tok->added_map, n))
        return tok_nomem(L);
    size_t i = 0;
    for (const cJSON *e = arr->child; e; e = e->next, i++) {
        char p[64];
        snprintf(p, sizeof p, "added_tokens[%zu]", i);
        tok_added a = {0};
        long id;
        const char *content;
        moe_status st;
        if ((st = tok_get_int(L, e, "id", -1, -1, TOK_MAX_ID - 1, &id, p)) ||
            (st = tok_get_str(L, e, "content", &content, p)) ||
            (st = tok_get_bool(L, e, "special", false, &a.special, p)) ||
            (st = tok_get_bool(L, e, "lstrip", false, &a.lstrip, p)) ||
            (st = tok_get_bool(L, e, "rstrip", false, &a.rstrip, p)) ||
            (st = tok_get_bool(L, e, "single_word", false, &a.single_word, p)) ||
            (st = tok_get_bool(L, e, "normalized", !a.special, &a.normalized, p)))
            return st;
        if (id < 0 || !content)
            return tok_bad(L, p, "expected an id and a content");
        if (!*content)
            continue; /* HF ignores empty added tokens */
        a.id = (int32_t)id;
        a.len = (uint32_t)strlen(content);
        if (!(a.content = tok_strndup(content, a.len)))
            return tok_nomem(L);
        tok->added[tok->n_added++] = a;
        if (!tok_strmap_put(&tok->added_map, a.content, a.len, a.id))
            return tok_nomem(L);
        if (a.id + 1 > tok->n_ids)
            tok->n_ids = a.id + 1;
    }
    return MOE_OK;
}

/* id -> string (added tokens override the vocabulary) and which ids decode as special. */
static moe_status build_id_tables(tok_loader *L)
{
    moe_tokenizer *tok = L->tok;
    size_t n = tok->n_ids ? (size_t)tok->n_ids : 1;
    tok->id_str = calloc(n, sizeof *tok->id_str);
    tok->id_len = calloc(n, sizeof *tok->id_len);
    tok->id_special = calloc(n, 1);
    if (!tok->id_str || !tok->id_len || !tok->id_special)
        return tok_nomem(L);
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
        return tok_nomem(L);
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].special &&
            !tok_strmap_put(&special, tok->added[i].content, tok->added[i].len, 1)) {
            tok_strmap_free(&special);
            return tok_nomem(L);
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
    tok_loader L = {tok, name};
    moe_status st = MOE_OK;
    if (!tok) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", name);
    }
    tok->unk_id = -1;
    if (!(tok->cache = tok_cache_create()) || !(tok->name = tok_strndup(name, strlen(name))) ||
        !(tok->post.items = calloc(1, sizeof *tok->post.items))) {
        st = tok_nomem(&L);
        goto done;
    }
    tok->post.n_items = 1; /* identity: just the sequence */
    L.name = tok->name;
    if (!cJSON_IsObject(root)) {
        st = tok_bad(&L, "(root)", "expected an object");
        goto done;
    }
    size_t cap_norm = 0, cap_pre = 0, cap_dec = 0;
    if ((st = parse_model(&L, cJSON_GetObjectItemCaseSensitive(root, "model"))) ||
        (st = parse_added(&L, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"))) ||
        (st = tok_parse_normalizer(&L, cJSON_GetObjectItemCaseSensitive(root, "normalizer"),
                                   "normalizer", &cap_norm)) ||
        (st = tok_parse_pretok(&L, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"),
                               "pre_tokenizer", &cap_pre)) ||
        (st = tok_parse_post(&L, cJSON_GetObjectItemCaseSensitive(root, "post_processor"),
                             "post_processor")) ||
        (st = tok_parse_decoder(&L, cJSON_GetObjectItemCaseSensitive(root, "decoder"), "decoder",
                                &cap_dec)))
        goto done;
    if (!cJSON_GetObjectItemCaseSensitive(root, "decoder") ||
        cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(root, "decoder"))) {
        /* No decoder: HF joins the tokens with spaces. */
        if (!(tok->decs = calloc(1, sizeof *tok->decs))) {
            st = tok_nomem(&L);
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
    char *text;
    size_t len;
    moe_status st = moe_read_file(path, (size_t)1 << 30, &text, &len);
    if (st != MOE_OK)
        return st;
    st = moe_tokenizer_parse(text, len, path, out);
    free(text);
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
    tok_free_items(tok->post.items, tok->post.n_items);
    tok_cache_free(tok->cache);
    free(tok);
}

int moe_tokenizer_vocab_size(const moe_tokenizer *tok)
{
    return tok->n_ids;
}

int moe_tokenizer_token_id(const moe_tokenizer *tok, const char *token)
{
    size_t n = strlen(token);
    int32_t id = tok_strmap_get(&tok->added_map, token, n);
    return id >= 0 ? id : tok_strmap_get(&tok->vocab, token, n);
}
