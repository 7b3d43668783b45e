/* moe-gen-model's BPE trainer: pre-tokenizes the embedded corpus the way each tokenizer family
 * does (Qwen2 regex / GPT-2 regex over byte-level symbols, or SentencePiece-style Metaspace
 * words over characters) and learns merges greedily, most frequent pair first. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>
#include "tools/moe_gen_model/gen_model.h"

/* Pairs seen fewer times than this are never merged (the corpus "supports" no more merges). */
#define BPE_MIN_FREQUENCY 2
/* Real ids of special tokens, used when the config vocabulary is large enough to hold them. */
#define QWEN2_ENDOFTEXT_ID 151643
#define OLMOE_EOS_ID 50279

static const char QWEN2_PATTERN[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char METASPACE[] = "\xe2\x96\x81"; /* U+2581 "▁" */

/* ---------- a string -> int map (open addressing, FNV-1a) ---------- */

typedef struct {
    char **keys; /* owned */
    int *vals;
    size_t cap; /* power of two */
    size_t n;
} strmap;

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static void strmap_free(strmap *m)
{
    for (size_t i = 0; i < m->cap; i++)
        free(m->keys ? m->keys[i] : NULL);
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static bool strmap_grow(strmap *m)
{
    size_t cap = m->cap ? m->cap * 2 : 1024;
    char **keys = calloc(cap, sizeof *keys);
    int *vals = calloc(cap, sizeof *vals);
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return false;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->keys[i])
            continue;
        size_t h = (size_t)fnv1a(m->keys[i], strlen(m->keys[i])) & (cap - 1);
        while (keys[h])
            h = (h + 1) & (cap - 1);
        keys[h] = m->keys[i];
        vals[h] = m->vals[i];
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = cap;
    return true;
}

/* Slot of key (n bytes), or of the empty slot where it would go. */
static size_t strmap_slot(const strmap *m, const char *key, size_t n)
{
    size_t h = (size_t)fnv1a(key, n) & (m->cap - 1);
    while (m->keys[h] && (strlen(m->keys[h]) != n || memcmp(m->keys[h], key, n) != 0))
        h = (h + 1) & (m->cap - 1);
    return h;
}

/* -1 if absent. */
static int strmap_get(const strmap *m, const char *key, size_t n)
{
    if (!m->cap)
        return -1;
    size_t h = strmap_slot(m, key, n);
    return m->keys[h] ? m->vals[h] : -1;
}

/* Inserts key -> val if absent; returns the stored value, or -2 on allocation failure. */
static int strmap_put(strmap *m, const char *key, size_t n, int val)
{
    if ((m->n + 1) * 2 > m->cap && !strmap_grow(m))
        return -2;
    size_t h = strmap_slot(m, key, n);
    if (m->keys[h])
        return m->vals[h];
    char *k = malloc(n + 1);
    if (!k)
        return -2;
    memcpy(k, key, n);
    k[n] = '\0';
    m->keys[h] = k;
    m->vals[h] = val;
    m->n++;
    return val;
}

/* ---------- the trainer's state ---------- */

typedef struct {
    int *syms;
    int len;
    int64_t count;
} bpe_word;

typedef struct {
    moe_gen_tok_family family;
    /* unique pre-tokenized words (raw UTF-8 pieces) and their counts */
    strmap word_ids;
    char **word_text; /* borrowed from word_ids' keys */
    int64_t *word_count;
    int n_words, cap_words;
    /* symbols: strings in the model's alphabet */
    strmap sym_ids;
    char **sym_str; /* owned copies */
    int n_sym, cap_sym;
    int n_alphabet; /* symbols 0..n_alphabet-1 are single characters / bytes */
    /* training words */
    bpe_word *words;
    int n_train;
    int (*merges)[2];
    int n_merges, cap_merges;
} bpe_state;

static void bpe_free(bpe_state *b)
{
    strmap_free(&b->word_ids);
    free(b->word_text);
    free(b->word_count);
    strmap_free(&b->sym_ids);
    for (int i = 0; i < b->n_sym; i++)
        free(b->sym_str[i]);
    free(b->sym_str);
    for (int i = 0; i < b->n_train; i++)
        free(b->words[i].syms);
    free(b->words);
    free(b->merges);
}

static moe_status add_word(bpe_state *b, const char *s, size_t n)
{
    if (n == 0)
        return MOE_OK;
    int id = strmap_put(&b->word_ids, s, n, b->n_words);
    if (id == -2)
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    if (id == b->n_words) {
        if (b->n_words == b->cap_words) {
            int cap = b->cap_words ? b->cap_words * 2 : 1024;
            int64_t *c = realloc(b->word_count, sizeof *c * (size_t)cap);
            if (c)
                b->word_count = c;
            char **wt = c ? realloc(b->word_text, sizeof *wt * (size_t)cap) : NULL;
            if (!wt)
                return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
            b->word_text = wt;
            b->cap_words = cap;
        }
        /* the map owns the text; its key pointers survive rehashing */
        b->word_text[b->n_words] = b->word_ids.keys[strmap_slot(&b->word_ids, s, n)];
        b->word_count[b->n_words++] = 0;
    }
    b->word_count[id]++;
    return MOE_OK;
}

/* Symbol id of s (interned); -1 on allocation failure. */
static int intern_sym(bpe_state *b, const char *s, size_t n)
{
    int id = strmap_get(&b->sym_ids, s, n);
    if (id >= 0)
        return id;
    if (b->n_sym == b->cap_sym) {
        int cap = b->cap_sym ? b->cap_sym * 2 : 1024;
        char **ns = realloc(b->sym_str, sizeof *ns * (size_t)cap);
        if (!ns)
            return -1;
        b->sym_str = ns;
        b->cap_sym = cap;
    }
    char *copy = malloc(n + 1);
    if (!copy)
        return -1;
    memcpy(copy, s, n);
    copy[n] = '\0';
    if (strmap_put(&b->sym_ids, s, n, b->n_sym) < 0) {
        free(copy);
        return -1;
    }
    b->sym_str[b->n_sym] = copy;
    return b->n_sym++;
}

/* Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes). */
static size_t utf8_len(unsigned char c)
{
    if (c >= 0xf0 && c < 0xf8)
        return 4;
    if (c >= 0xe0)
        return c < 0xf0 ? 3 : 1;
    if (c >= 0xc0)
        return 2;
    return 1;
}

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100.. in
 * order. order[i] = the byte whose symbol gets id i (GPT-2's vocabulary order). */
static void byte_level_table(uint32_t cp_of_byte[256], int order[256])
{
    int n = 0, extra = 0;
    bool printable[256] = {false};
    for (int c = 33; c <= 126; c++)
        printable[c] = true;
    for (int c = 161; c <= 172; c++)
        printable[c] = true;
    for (int c = 174; c <= 255; c++)
        printable[c] = true;
    for (int c = 0; c < 256; c++)
        if (printable[c]) {
            cp_of_byte[c] = (uint32_t)c;
            order[n++] = c;
        }
    for (int c = 0; c < 256; c++)
        if (!printable[c]) {
            cp_of_byte[c] = 256u + (uint32_t)extra++;
            order[n++] = c;
        }
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    out[0] = (char)(0xe0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[2] = (char)(0x80 | (cp & 0x3f));
    return 3;
}

/* Splits text with pattern, keeping matches and the gaps between them (HF Split "Isolated"). */
static moe_status split_regex(bpe_state *b, const pcre2_code *re, pcre2_match_data *md,
                              const char *text, size_t len)
{
    size_t off = 0;
    while (off < len) {
        int rc = pcre2_match(re, (PCRE2_SPTR)text, len, off, 0, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) {
            moe_status st = add_word(b, text + off, len - off);
            if (st != MOE_OK)
                return st;
            break;
        }
        if (rc < 0)
            return moe_error(MOE_ERR_INTERNAL, "tokenizer training: regex match failed (%d)", rc);
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t s = ov[0], e = ov[1];
        moe_status st = add_word(b, text + off, s - off); /* the gap, if any */
        if (st == MOE_OK)
            st = add_word(b, text + s, e - s);
        if (st != MOE_OK)
            return st;
        off = e > s ? e : s + utf8_len((unsigned char)text[s]);
    }
    return MOE_OK;
}

static moe_status pretokenize_byte_level(bpe_state *b)
{
    const char *pat = b->family == MOE_GEN_TOK_QWEN2 ? QWEN2_PATTERN : GPT2_PATTERN;
    int err;
    PCRE2_SIZE eoff;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                                   &err, &eoff, NULL);
    if (!re)
        return moe_error(MOE_ERR_INTERNAL,
                         "tokenizer training: pattern does not compile (%d at %zu)", err,
                         (size_t)eoff);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    moe_status st = md ? MOE_OK : moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    for (int d = 0; st == MOE_OK && d < moe_gen_corpus_count(); d++) {
        const char *doc = moe_gen_corpus_doc(d);
        char *norm = NULL;
        if (b->family == MOE_GEN_TOK_QWEN2) { /* the Qwen2 tokenizer normalizes to NFC first */
            norm = (char *)utf8proc_NFC((const utf8proc_uint8_t *)doc);
            if (!norm) {
                st = moe_error(MOE_ERR_NOMEM, "tokenizer training: NFC of document %d failed", d);
                break;
            }
        }
        const char *text = norm ? norm : doc;
        st = split_regex(b, re, md, text, strlen(text));
        free(norm);
    }
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    if (st != MOE_OK)
        return st;

    /* The alphabet: all 256 byte symbols, in GPT-2's vocabulary order. */
    uint32_t cp_of_byte[256];
    int order[256], sym_of_byte[256];
    byte_level_table(cp_of_byte, order);
    for (int i = 0; i < 256; i++) {
        char u[4];
        size_t n = utf8_encode(cp_of_byte[order[i]], u);
        int id = intern_sym(b, u, n);
        if (id < 0)
            return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
        sym_of_byte[order[i]] = id;
    }
    b->n_alphabet = 256;

    b->words = calloc((size_t)(b->n_words ? b->n_words : 1), sizeof *b->words);
    if (!b->words)
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    for (int w = 0; w < b->n_words; w++) {
        const char *s = b->word_text[w];
        size_t n = strlen(s);
        bpe_word *bw = &b->words[b->n_train++];
        bw->syms = malloc(sizeof(int) * n);
        if (!bw->syms)
            return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
        for (size_t i = 0; i < n; i++)
            bw->syms[i] = sym_of_byte[(unsigned char)s[i]];
        bw->len = (int)n;
        bw->count = b->word_count[w];
    }
    return MOE_OK;
}

typedef struct {
    const char *s; /* one UTF-8 character (not NUL-terminated) */
    size_t n;
    int64_t count;
} char_count;

static int cmp_char_count(const void *x, const void *y)
{
    const char_count *a = x, *b = y;
    if (a->count != b->count)
        return a->count > b->count ? -1 : 1;
    /* UTF-8 byte order is code point order */
    size_t n = a->n < b->n ? a->n : b->n;
    int c = memcmp(a->s, b->s, n);
    return c ? c : (a->n < b->n ? -1 : a->n > b->n);
}

/* SentencePiece-style words: "▁" + text with spaces replaced, cut before every "▁" (Metaspace
 * split), over characters; the alphabet keeps the `max_alphabet` most frequent characters and the
 * others (left to byte fallback) cut words apart. */
static moe_status pretokenize_sp(bpe_state *b, int max_alphabet)
{
    for (int d = 0; d < moe_gen_corpus_count(); d++) {
        const char *doc = moe_gen_corpus_doc(d);
        size_t n = strlen(doc), cap = 3 * n + 4, o = 0;
        char *t = malloc(cap);
        if (!t)
            return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
        memcpy(t, METASPACE, 3);
        o = 3;
        for (size_t i = 0; i < n; i++) {
            if (doc[i] == ' ') {
                memcpy(t + o, METASPACE, 3);
                o += 3;
            } else {
                t[o++] = doc[i];
            }
        }
        size_t start = 0;
        moe_status st = MOE_OK;
        for (size_t i = 3; i <= o && st == MOE_OK; i++) {
            if (i == o || (i + 3 <= o && memcmp(t + i, METASPACE, 3) == 0)) {
                st = add_word(b, t + start, i - start);
                start = i;
            }
        }
        free(t);
        if (st != MOE_OK)
            return st;
    }

    /* Character frequencies, then the alphabet. */
    strmap chars = {0};
    char_count *cc = NULL;
    int n_cc = 0, cap_cc = 0;
    moe_status st = MOE_OK;
    for (int w = 0; w < b->n_words && st == MOE_OK; w++) {
        const char *s = b->word_text[w];
        size_t n = strlen(s);
        for (size_t i = 0; i < n;) {
            size_t l = utf8_len((unsigned char)s[i]);
            if (i + l > n)
                l = n - i;
            int id = strmap_put(&chars, s + i, l, n_cc);
            if (id == -2) {
                st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
                break;
            }
            if (id == n_cc) {
                if (n_cc == cap_cc) {
                    cap_cc = cap_cc ? cap_cc * 2 : 256;
                    char_count *ncc = realloc(cc, sizeof *cc * (size_t)cap_cc);
                    if (!ncc) {
                        st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
                        break;
                    }
                    cc = ncc;
                }
                cc[n_cc++] = (char_count){.s = s + i, .n = l, .count = 0};
            }
            cc[id].count += b->word_count[w];
            i += l;
        }
    }
    if (st == MOE_OK) {
        qsort(cc, (size_t)n_cc, sizeof *cc, cmp_char_count);
        int n_alpha = n_cc < max_alphabet ? n_cc : max_alphabet;
        for (int i = 0; i < n_alpha; i++)
            if (intern_sym(b, cc[i].s, cc[i].n) < 0) {
                st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
                break;
            }
        b->n_alphabet = b->n_sym;
    }
    free(cc);
    strmap_free(&chars);
    if (st != MOE_OK)
        return st;

    /* Words as symbol sequences; characters outside the alphabet split a word in two. */
    int cap_train = b->n_words * 2 + 16;
    b->words = calloc((size_t)cap_train, sizeof *b->words);
    if (!b->words)
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    int *tmp = malloc(sizeof(int) * 4096);
    if (!tmp)
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    for (int w = 0; w < b->n_words && st == MOE_OK; w++) {
        const char *s = b->word_text[w];
        size_t n = strlen(s);
        int len = 0;
        for (size_t i = 0; i <= n && st == MOE_OK;) {
            int id = -1;
            size_t l = 1;
            if (i < n) {
                l = utf8_len((unsigned char)s[i]);
                if (i + l > n)
                    l = n - i;
                id = strmap_get(&b->sym_ids, s + i, l);
            }
            if (id >= 0 && len < 4096) {
                tmp[len++] = id;
            } else if (len > 0) {
                if (b->n_train == cap_train) {
                    cap_train *= 2;
                    bpe_word *nw = realloc(b->words, sizeof *nw * (size_t)cap_train);
                    if (!nw) {
                        st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
                        break;
                    }
                    b->words = nw;
                }
                bpe_word *bw = &b->words[b->n_train];
                bw->syms = malloc(sizeof(int) * (size_t)len);
                if (!bw->syms) {
                    st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
                    break;
                }
                memcpy(bw->syms, tmp, sizeof(int) * (size_t)len);
                bw->len = len;
                bw->count = b->word_count[w];
                b->n_train++;
                len = 0;
                if (id >= 0)
                    tmp[len++] = id;
            }
            i += l;
        }
    }
    free(tmp);
    return st;
}

/* ---------- merge learning ---------- */

typedef struct {
    uint64_t key; /* (left << 32) | right, UINT64_MAX = empty */
    int64_t count;
} pair_slot;

static moe_status learn_merges(bpe_state *b, int max_symbols)
{
    size_t total = 0;
    for (int w = 0; w < b->n_train; w++)
        total += (size_t)b->words[w].len;
    size_t cap = 1024;
    while (cap < total * 2 + 16)
        cap *= 2;
    pair_slot *tab = malloc(sizeof *tab * cap);
    size_t *used = malloc(sizeof *used * (total + 1));
    if (!tab || !used) {
        free(tab);
        free(used);
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    }
    for (size_t i = 0; i < cap; i++)
        tab[i].key = UINT64_MAX;

    moe_status st = MOE_OK;
    while (b->n_sym < max_symbols) {
        /* Count every adjacent pair, weighted by word frequency. */
        size_t n_used = 0;
        for (int w = 0; w < b->n_train; w++) {
            const bpe_word *bw = &b->words[w];
            for (int i = 0; i + 1 < bw->len; i++) {
                uint64_t key = ((uint64_t)(uint32_t)bw->syms[i] << 32) | (uint32_t)bw->syms[i + 1];
                size_t h = (size_t)((key * 0x9e3779b97f4a7c15ull) >> 20) & (cap - 1);
                while (tab[h].key != UINT64_MAX && tab[h].key != key)
                    h = (h + 1) & (cap - 1);
                if (tab[h].key == UINT64_MAX) {
                    tab[h].key = key;
                    tab[h].count = 0;
                    used[n_used++] = h;
                }
                tab[h].count += bw->count;
            }
        }
        /* Most frequent pair; ties go to the smaller (left, right) ids, for determinism. */
        uint64_t best = UINT64_MAX;
        int64_t best_count = 0;
        for (size_t u = 0; u < n_used; u++) {
            const pair_slot *p = &tab[used[u]];
            if (p->count > best_count || (p->count == best_count && p->key < best)) {
                best = p->key;
                best_count = p->count;
            }
        }
        for (size_t u = 0; u < n_used; u++)
            tab[used[u]].key = UINT64_MAX;
        if (best_count < BPE_MIN_FREQUENCY)
            break;

        int a = (int)(best >> 32), c = (int)(best & 0xffffffffu);
        size_t la = strlen(b->sym_str[a]), lc = strlen(b->sym_str[c]);
        char *joined = malloc(la + lc + 1);
        if (!joined) {
            st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
            break;
        }
        memcpy(joined, b->sym_str[a], la);
        memcpy(joined + la, b->sym_str[c], lc + 1);
        int merged = intern_sym(b, joined, la + lc);
        free(joined);
        if (merged < 0) {
            st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
            break;
        }
        if (b->n_merges == b->cap_merges) {
            int ncap = b->cap_merges ? b->cap_merges * 2 : 1024;
            int(*nm)[2] = realloc(b->merges, sizeof *nm * (size_t)ncap);
            if (!nm) {
                st = moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
                break;
            }
            b->merges = nm;
            b->cap_merges = ncap;
        }
        b->merges[b->n_merges][0] = a;
        b->merges[b->n_merges][1] = c;
        b->n_merges++;

        /* Apply the merge left to right in every word, as the BPE model will when encoding. */
        for (int w = 0; w < b->n_train; w++) {
            bpe_word *bw = &b->words[w];
            int o = 0;
            for (int i = 0; i < bw->len; i++) {
                if (i + 1 < bw->len && bw->syms[i] == a && bw->syms[i + 1] == c) {
                    bw->syms[o++] = merged;
                    i++;
                } else {
                    bw->syms[o++] = bw->syms[i];
                }
            }
            bw->len = o;
        }
    }
    free(tab);
    free(used);
    return st;
}

/* ---------- public ---------- */

void moe_gen_tok_free(moe_gen_tokenizer *tok)
{
    if (!tok)
        return;
    for (int i = 0; i < tok->n_vocab; i++)
        free(tok->vocab[i]);
    free(tok->vocab);
    free(tok->merges);
    free(tok);
}

static moe_status take_vocab(moe_gen_tokenizer *t, int id, const char *s)
{
    t->vocab[id] = strdup(s);
    return t->vocab[id] ? MOE_OK : moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
}

moe_status moe_gen_tok_train(moe_gen_tok_family family, int config_vocab, moe_gen_tokenizer **out)
{
    *out = NULL;
    moe_gen_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    t->family = family;
    t->bos_id = t->eos_id = t->pad_id = t->unk_id = t->im_end_id = -1;

    /* How many model-vocabulary entries fit, and where the specials go. */
    int model_budget;
    bool fixed = false;
    int n_fixed_sp = 0; /* SentencePiece: <unk> <s> </s> + 256 byte tokens precede the pieces */
    switch (family) {
    case MOE_GEN_TOK_QWEN2:
        fixed = config_vocab >= QWEN2_ENDOFTEXT_ID + 3;
        model_budget = fixed ? QWEN2_ENDOFTEXT_ID : config_vocab - 3;
        break;
    case MOE_GEN_TOK_GPT2:
        fixed = config_vocab >= OLMOE_EOS_ID + 1;
        model_budget = fixed ? OLMOE_EOS_ID : config_vocab - 2;
        break;
    case MOE_GEN_TOK_SP:
        n_fixed_sp = 3 + 256;
        model_budget = config_vocab;
        break;
    default:
        free(t);
        return moe_error(MOE_ERR_INVALID_ARG, "tokenizer: unknown family %d", (int)family);
    }
    int min_vocab = family == MOE_GEN_TOK_SP ? n_fixed_sp + 64 : 256 + 16;
    if (model_budget < min_vocab) {
        free(t);
        return moe_error(MOE_ERR_INVALID_ARG,
                         "tokenizer: vocab_size %d is too small (needs at least %d ids)",
                         config_vocab, min_vocab + (config_vocab - model_budget));
    }

    bpe_state b = {.family = family};
    moe_status st;
    if (family == MOE_GEN_TOK_SP) {
        /* Small vocabularies keep half their pieces for merges; big ones take every character. */
        int pieces = model_budget - n_fixed_sp;
        st = pretokenize_sp(&b, pieces / 2);
        if (st == MOE_OK)
            st = learn_merges(&b, pieces);
    } else {
        st = pretokenize_byte_level(&b);
        if (st == MOE_OK)
            st = learn_merges(&b, model_budget);
    }
    if (st != MOE_OK) {
        bpe_free(&b);
        free(t);
        return st;
    }

    /* Lay the vocabulary out: byte-level = alphabet then merges (GPT-2 order); SentencePiece =
     * <unk> <s> </s>, <0x00>..<0xFF>, merged pieces, then single characters (Llama order). */
    int *final_id = malloc(sizeof(int) * (size_t)(b.n_sym ? b.n_sym : 1));
    t->n_vocab = n_fixed_sp + b.n_sym;
    t->vocab = calloc((size_t)t->n_vocab, sizeof *t->vocab);
    t->merges = malloc(sizeof *t->merges * (size_t)(b.n_merges ? b.n_merges : 1));
    if (!final_id || !t->vocab || !t->merges) {
        free(final_id);
        bpe_free(&b);
        moe_gen_tok_free(t);
        return moe_error(MOE_ERR_NOMEM, "tokenizer training: out of memory");
    }
    if (family == MOE_GEN_TOK_SP) {
        static const char *const sp_special[3] = {"<unk>", "<s>", "</s>"};
        for (int i = 0; i < 3 && st == MOE_OK; i++)
            st = take_vocab(t, i, sp_special[i]);
        for (int i = 0; i < 256 && st == MOE_OK; i++) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", i);
            st = take_vocab(t, 3 + i, name);
        }
        int n_pieces = b.n_sym - b.n_alphabet;
        for (int s = 0; s < b.n_sym; s++)
            final_id[s] =
                s >= b.n_alphabet ? n_fixed_sp + (s - b.n_alphabet) : n_fixed_sp + n_pieces + s;
    } else {
        for (int s = 0; s < b.n_sym; s++)
            final_id[s] = s;
    }
    for (int s = 0; s < b.n_sym && st == MOE_OK; s++)
        st = take_vocab(t, final_id[s], b.sym_str[s]);
    for (int m = 0; m < b.n_merges; m++) {
        t->merges[m][0] = final_id[b.merges[m][0]];
        t->merges[m][1] = final_id[b.merges[m][1]];
    }
    t->n_merges = b.n_merges;
    free(final_id);
    bpe_free(&b);
    if (st != MOE_OK) {
        moe_gen_tok_free(t);
        return st;
    }

    /* Special tokens (added_tokens). */
    int next = t->n_vocab;
#define ADD_SPECIAL(str, idv)                                                                      \
    do {                                                                                           \
        t->special[t->n_special].content = (str);                                                  \
        t->special[t->n_special].id = (idv);                                                       \
        t->n_special++;                                                                            \
    } while (0)
    switch (family) {
    case MOE_GEN_TOK_QWEN2: {
        int base = fixed ? QWEN2_ENDOFTEXT_ID : next;
        ADD_SPECIAL("<|endoftext|>", base);
        ADD_SPECIAL("<|im_start|>", base + 1);
        ADD_SPECIAL("<|im_end|>", base + 2);
        t->bos_id = base;
        t->eos_id = base;
        t->pad_id = base;
        t->im_end_id = base + 2;
        break;
    }
    case MOE_GEN_TOK_GPT2: {
        int eos = fixed ? OLMOE_EOS_ID : next++;
        int pad = next;
        ADD_SPECIAL("<|endoftext|>", eos);
        ADD_SPECIAL("<|padding|>", pad);
        t->eos_id = eos;
        t->pad_id = pad;
        break;
    }
    case MOE_GEN_TOK_SP:
        ADD_SPECIAL("<unk>", 0);
        ADD_SPECIAL("<s>", 1);
        ADD_SPECIAL("</s>", 2);
        t->unk_id = 0;
        t->bos_id = 1;
        t->eos_id = 2;
        break;
    }
#undef ADD_SPECIAL
    *out = t;
    return MOE_OK;
}
