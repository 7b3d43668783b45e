/* Encoding text to ids, step for step as HF tokenizers does it: added tokens split out first
 * (raw, then on the normalized text), normalizers, pre-tokenizers, the BPE model
 * (tokenizer_bpe.c), then the post-processor template. Also the added-token tries. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "common/status.h"
#include "common/tokenizer_internal.h"

/* ---- small vectors ---- */

typedef struct {
    const char *s;
    size_t n;
    bool first; /* starts at offset 0 of the original text (Metaspace prepend_scheme "first") */
    int32_t id; /* >= 0: an added token, already final */
} piece;

typedef struct {
    piece *v;
    size_t n, cap;
} piece_vec;

typedef struct {
    size_t s, e;
    bool match;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} span_vec;

/* Everything one encode call allocates; freed at the end of the call. */
typedef struct {
    const moe_tokenizer *tok;
    tok_arena arena;
    pcre2_match_data *md;
    span_vec spans;
    tok_bpe_scratch bpe;
} enc_ctx;

static bool piece_push(piece_vec *pv, piece p)
{
    if (pv->n == pv->cap) {
        size_t c = pv->cap ? pv->cap * 2 : 16;
        piece *v = realloc(pv->v, c * sizeof *v);
        if (!v)
            return false;
        pv->v = v;
        pv->cap = c;
    }
    pv->v[pv->n++] = p;
    return true;
}

static bool span_push(span_vec *sv, size_t s, size_t e, bool match)
{
    if (sv->n == sv->cap) {
        size_t c = sv->cap ? sv->cap * 2 : 32;
        span *v = realloc(sv->v, c * sizeof *v);
        if (!v)
            return false;
        sv->v = v;
        sv->cap = c;
    }
    sv->v[sv->n++] = (span){s, e, match};
    return true;
}

static moe_status oom(const moe_tokenizer *tok)
{
    return moe_error(MOE_ERR_NOMEM, "%s: out of memory while encoding", tok->name);
}

static char *arena_dup(enc_ctx *c, const char *s, size_t n)
{
    char *p = tok_arena_alloc(&c->arena, n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- added-token tries ---- */

void tok_trie_free(tok_trie *t)
{
    free(t->nodes);
    memset(t, 0, sizeof *t);
}

static bool trie_insert(tok_trie *t, const char *s, size_t n, int32_t added)
{
    if (!t->nodes) {
        t->cap = 64;
        if (!(t->nodes = malloc(t->cap * sizeof *t->nodes)))
            return false;
        t->nodes[0] = (tok_trie_node){0, -1, -1, -1};
        t->n = 1;
    }
    t->first[(unsigned char)s[0] >> 3] |= (uint8_t)(1u << ((unsigned char)s[0] & 7));
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = (uint8_t)s[i];
        int32_t c = t->nodes[node].child;
        while (c >= 0 && t->nodes[c].byte != b)
            c = t->nodes[c].sibling;
        if (c < 0) {
            if (t->n == t->cap) {
                tok_trie_node *nn = realloc(t->nodes, t->cap * 2 * sizeof *nn);
                if (!nn)
                    return false;
                t->nodes = nn;
                t->cap *= 2;
            }
            c = (int32_t)t->n++;
            t->nodes[c] = (tok_trie_node){b, -1, t->nodes[node].child, -1};
            t->nodes[node].child = c;
        }
        node = c;
    }
    if (t->nodes[node].added < 0) /* first one wins, like the first pattern of a matcher */
        t->nodes[node].added = added;
    return true;
}

/* Leftmost-longest match at or after `from`: returns true with [*ms, *me) and the added index. */
static bool trie_find(const tok_trie *t, const char *s, size_t n, size_t from, size_t *ms,
                      size_t *me, int32_t *added)
{
    if (!t->nodes)
        return false;
    for (size_t pos = from; pos < n; pos++) {
        unsigned char b0 = (unsigned char)s[pos];
        if (!(t->first[b0 >> 3] & (1u << (b0 & 7))))
            continue;
        int32_t node = 0, best = -1;
        size_t best_end = 0;
        for (size_t i = pos; i < n; i++) {
            int32_t c = t->nodes[node].child;
            while (c >= 0 && t->nodes[c].byte != (uint8_t)s[i])
                c = t->nodes[c].sibling;
            if (c < 0)
                break;
            node = c;
            if (t->nodes[node].added >= 0) {
                best = t->nodes[node].added;
                best_end = i + 1;
            }
        }
        if (best >= 0) {
            *ms = pos;
            *me = best_end;
            *added = best;
            return true;
        }
    }
    return false;
}

moe_status tok_build_tries(moe_tokenizer *tok)
{
    tok_buf nb = {0};
    /* HF builds its matchers from the special tokens first, then the others. */
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < tok->n_added; i++) {
            tok_added *a = &tok->added[i];
            if (a->special != (pass == 0))
                continue;
            if (!a->normalized) {
                if (!trie_insert(&tok->trie_raw, a->content, a->len, (int32_t)i))
                    goto nomem;
                continue;
            }
            moe_status st = tok_normalize(tok, a->content, a->len, &nb);
            if (st) {
                tok_buf_free(&nb);
                return moe_error_context(st, "%s: added token '%s': ", tok->name, a->content);
            }
            if (nb.len == 0)
                continue;
            if (!(a->ncontent = malloc(nb.len + 1)))
                goto nomem;
            memcpy(a->ncontent, nb.p, nb.len + 1);
            a->nlen = (uint32_t)nb.len;
            if (!trie_insert(&tok->trie_norm, nb.p, nb.len, (int32_t)i))
                goto nomem;
        }
    tok_buf_free(&nb);
    return MOE_OK;
nomem:
    tok_buf_free(&nb);
    return moe_error(MOE_ERR_NOMEM, "%s: out of memory building the added-token matcher",
                     tok->name);
}

static size_t prev_char_start(const char *s, size_t i)
{
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    return i > 0 ? i - 1 : 0;
}

/* HF AddedVocabulary::find_matches: splits s into text and added-token pieces, honouring
 * single_word, lstrip and rstrip. */
static moe_status split_added(enc_ctx *c, const tok_trie *t, const piece *in, piece_vec *out)
{
    const moe_tokenizer *tok = c->tok;
    const char *s = in->s;
    size_t n = in->n, from = 0, start_offset = 0, ms, me;
    int32_t ai;
    while (from < n && trie_find(t, s, n, from, &ms, &me, &ai)) {
        const tok_added *a = &tok->added[ai];
        size_t start = ms, stop = me;
        from = me;
        if (a->single_word) {
            uint32_t cp;
            bool start_ok = start == 0, stop_ok = stop == n;
            if (!start_ok) {
                moe_utf8_decode(s + prev_char_start(s, start), &cp);
                start_ok = !tok_is_word_char(cp);
            }
            if (!stop_ok) {
                moe_utf8_decode(s + stop, &cp);
                stop_ok = !tok_is_word_char(cp);
            }
            if (!start_ok || !stop_ok)
                continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t p = prev_char_start(s, ns);
                uint32_t cp;
                moe_utf8_decode(s + p, &cp);
                if (!tok_is_white_space(cp))
                    break;
                ns = p;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->rstrip) {
            while (stop < n) {
                uint32_t cp;
                size_t l = moe_utf8_decode(s + stop, &cp);
                if (!tok_is_white_space(cp))
                    break;
                stop += l;
            }
        }
        if (start_offset < start && !piece_push(out, (piece){s + start_offset, start - start_offset,
                                                             in->first && start_offset == 0, -1}))
            return oom(tok);
        if (!piece_push(out, (piece){s + start, stop - start, false, a->id}))
            return oom(tok);
        start_offset = stop;
    }
    if (start_offset < n && !piece_push(out, (piece){s + start_offset, n - start_offset,
                                                     in->first && start_offset == 0, -1}))
        return oom(tok);
    return MOE_OK;
}

/* ---- pattern matching: HF Pattern::find_matches semantics ---- */

/* Fills c->spans with pieces covering s[0..n): the matches of re (Oniguruma-style iteration:
 * an empty match right after the previous match is skipped) and the text between them. */
static moe_status regex_spans(enc_ctx *c, const tok_regex *re, const char *s, size_t n, bool invert)
{
    c->spans.n = 0;
    if (n == 0)
        return span_push(&c->spans, 0, 0, invert) ? MOE_OK : oom(c->tok);
    size_t last_end = 0, prev = 0, ms, me;
    bool have_last = false;
    size_t last_match_end = 0;
    while (last_end <= n) {
        int r = tok_regex_find(re, s, n, last_end, &ms, &me, c->md);
        if (r < 0)
            return moe_error(MOE_ERR_INTERNAL, "%s: regex matching failed (resource limit?)",
                             c->tok->name);
        if (r == 0)
            break;
        if (ms == me && have_last && last_match_end == me) {
            if (last_end >= n)
                break;
            size_t l = moe_utf8_seq_len((const unsigned char *)s + last_end, n - last_end);
            last_end += l ? l : 1;
            continue;
        }
        last_end = me;
        last_match_end = me;
        have_last = true;
        if (prev != ms && !span_push(&c->spans, prev, ms, invert))
            return oom(c->tok);
        if (!span_push(&c->spans, ms, me, !invert))
            return oom(c->tok);
        prev = me;
        if (ms == me && last_end >= n)
            break;
    }
    if (prev != n && !span_push(&c->spans, prev, n, invert))
        return oom(c->tok);
    return MOE_OK;
}

/* Spans for a per-character predicate (each matching character is its own match). */
static moe_status char_spans(enc_ctx *c, const char *s, size_t n,
                             bool (*pred)(uint32_t, const void *), const void *arg)
{
    c->spans.n = 0;
    if (n == 0)
        return span_push(&c->spans, 0, 0, false) ? MOE_OK : oom(c->tok);
    size_t last = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t l = moe_utf8_decode(s + i, &cp);
        if (pred(cp, arg)) {
            if (last < i && !span_push(&c->spans, last, i, false))
                return oom(c->tok);
            if (!span_push(&c->spans, i, i + l, true))
                return oom(c->tok);
            last = i + l;
        }
        i += l;
    }
    if (last < n && !span_push(&c->spans, last, n, false))
        return oom(c->tok);
    return MOE_OK;
}

/* HF NormalizedString::split: turns c->spans into pieces of `in` according to the behavior;
 * empty pieces are dropped (as PreTokenizedString::split does). */
static moe_status apply_behavior(enc_ctx *c, const piece *in, int behavior, piece_vec *out)
{
    span *v = c->spans.v;
    size_t n = c->spans.n, k = 0;
    bool prev_match = false;
    switch (behavior) {
    case TOK_SPLIT_ISOLATED:
        for (size_t i = 0; i < n; i++)
            v[i].match = false;
        k = n;
        break;
    case TOK_SPLIT_REMOVED:
        k = n; /* match == true means removed */
        break;
    case TOK_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < n; i++) {
            bool m = v[i].match;
            if (k > 0 && m == prev_match)
                v[k - 1].e = v[i].e;
            else
                v[k++] = (span){v[i].s, v[i].e, false};
            prev_match = m;
        }
        break;
    case TOK_SPLIT_MERGED_PREV:
        for (size_t i = 0; i < n; i++) {
            bool m = v[i].match;
            if (k > 0 && m && !prev_match)
                v[k - 1].e = v[i].e;
            else
                v[k++] = (span){v[i].s, v[i].e, false};
            prev_match = m;
        }
        break;
    case TOK_SPLIT_MERGED_NEXT: {
        /* Walk backwards, then the kept spans are in reverse order at the end of the array. */
        size_t w = n;
        for (size_t i = n; i-- > 0;) {
            bool m = v[i].match;
            span cur = v[i];
            if (w < n && m && !prev_match)
                v[w].s = cur.s;
            else
                v[--w] = (span){cur.s, cur.e, false};
            prev_match = m;
        }
        memmove(v, v + w, (n - w) * sizeof *v);
        k = n - w;
        break;
    }
    default:
        break;
    }
    for (size_t i = 0; i < k; i++) {
        if (v[i].match || v[i].e == v[i].s)
            continue;
        if (!piece_push(out,
                        (piece){in->s + v[i].s, v[i].e - v[i].s, in->first && v[i].s == 0, -1}))
            return oom(c->tok);
    }
    return MOE_OK;
}

/* ---- normalizers ---- */

static moe_status replace_all(enc_ctx *c, const tok_regex *re, const char *s, size_t n,
                              const char *with, size_t with_len, tok_buf *out)
{
    moe_status st = regex_spans(c, re, s, n, false);
    if (st)
        return st;
    out->len = 0;
    for (size_t i = 0; i < c->spans.n; i++) {
        const span *sp = &c->spans.v[i];
        bool ok = sp->match ? tok_buf_put(out, with, with_len)
                            : tok_buf_put(out, s + sp->s, sp->e - sp->s);
        if (!ok)
            return oom(c->tok);
    }
    if (!tok_buf_put(out, "", 0))
        return oom(c->tok);
    return MOE_OK;
}

static moe_status normalize_with(enc_ctx *c, const char *s, size_t n, tok_buf *out)
{
    const moe_tokenizer *tok = c->tok;
    tok_buf a = {0}, b = {0};
    if (!tok_buf_put(&a, s, n))
        return oom(tok);
    for (size_t i = 0; i < tok->n_norms; i++) {
        const tok_norm *nm = &tok->norms[i];
        b.len = 0;
        switch (nm->type) {
        case TOK_NORM_NFC:
        case TOK_NORM_NFKC:
        case TOK_NORM_NFD:
        case TOK_NORM_NFKD: {
            if (a.len == 0)
                continue;
            int opt = UTF8PROC_STABLE;
            if (nm->type == TOK_NORM_NFC || nm->type == TOK_NORM_NFKC)
                opt |= UTF8PROC_COMPOSE;
            else
                opt |= UTF8PROC_DECOMPOSE;
            if (nm->type == TOK_NORM_NFKC || nm->type == TOK_NORM_NFKD)
                opt |= UTF8PROC_COMPAT;
            utf8proc_uint8_t *dst = NULL;
            utf8proc_ssize_t r =
                utf8proc_map((const utf8proc_uint8_t *)a.p, (utf8proc_ssize_t)a.len, &dst,
                             (utf8proc_option_t)opt);
            if (r < 0) {
                free(dst);
                tok_buf_free(&a);
                tok_buf_free(&b);
                return moe_error(MOE_ERR_INVALID_ARG, "%s: unicode normalization failed: %s",
                                 tok->name, utf8proc_errmsg(r));
            }
            bool ok = tok_buf_put(&b, dst, (size_t)r);
            free(dst);
            if (!ok)
                goto nomem;
            break;
        }
        case TOK_NORM_PREPEND:
            if (a.len == 0)
                continue;
            if (!tok_buf_put(&b, nm->str, nm->str_len) || !tok_buf_put(&b, a.p, a.len))
                goto nomem;
            break;
        case TOK_NORM_REPLACE: {
            moe_status st = replace_all(c, &nm->re, a.p, a.len, nm->str, nm->str_len, &b);
            if (st) {
                tok_buf_free(&a);
                tok_buf_free(&b);
                return st;
            }
            break;
        }
        case TOK_NORM_STRIP: {
            size_t lo = 0, hi = a.len;
            uint32_t cp;
            if (nm->left)
                while (lo < hi) {
                    size_t l = moe_utf8_decode(a.p + lo, &cp);
                    if (!tok_is_white_space(cp))
                        break;
                    lo += l;
                }
            if (nm->right)
                while (hi > lo) {
                    size_t p = prev_char_start(a.p, hi);
                    moe_utf8_decode(a.p + p, &cp);
                    if (!tok_is_white_space(cp))
                        break;
                    hi = p;
                }
            if (!tok_buf_put(&b, a.p + lo, hi - lo))
                goto nomem;
            break;
        }
        default:
            continue;
        }
        tok_buf t = a;
        a = b;
        b = t;
    }
    tok_buf_free(&b);
    tok_buf_free(out);
    *out = a;
    if (!out->p && !tok_buf_put(out, "", 0))
        return oom(tok);
    return MOE_OK;
nomem:
    tok_buf_free(&a);
    tok_buf_free(&b);
    return oom(tok);
}

static void ctx_free(enc_ctx *c)
{
    tok_arena_free(&c->arena);
    pcre2_match_data_free(c->md);
    free(c->spans.v);
    tok_bpe_scratch_free(&c->bpe);
}

static moe_status ctx_init(enc_ctx *c, const moe_tokenizer *tok)
{
    memset(c, 0, sizeof *c);
    c->tok = tok;
    /* 64 pairs is plenty: we only read the whole-match offsets. */
    c->md = pcre2_match_data_create(64, NULL);
    return c->md ? MOE_OK : oom(tok);
}

moe_status tok_normalize(const moe_tokenizer *tok, const char *s, size_t n, tok_buf *out)
{
    enc_ctx c;
    moe_status st = ctx_init(&c, tok);
    if (!st)
        st = normalize_with(&c, s, n, out);
    ctx_free(&c);
    return st;
}

/* ---- pre-tokenizers ---- */

static bool is_cp(uint32_t cp, const void *arg)
{
    return cp == *(const uint32_t *)arg;
}
static bool is_numeric(uint32_t cp, const void *arg)
{
    (void)arg;
    return tok_is_numeric(cp);
}

static moe_status byte_map(enc_ctx *c, const piece *in, piece_vec *out)
{
    /* Every byte becomes one code point below 324: at most 2 UTF-8 bytes each. */
    char *d = tok_arena_alloc(&c->arena, in->n * 2 + 1);
    if (!d)
        return oom(c->tok);
    size_t k = 0;
    for (size_t i = 0; i < in->n; i++)
        k += moe_utf8_encode(tok_byte_to_cp[(unsigned char)in->s[i]], d + k);
    d[k] = '\0';
    return piece_push(out, (piece){d, k, in->first, -1}) ? MOE_OK : oom(c->tok);
}

static moe_status pretok_one(enc_ctx *c, const tok_pretok *p, const piece *in, piece_vec *out)
{
    moe_status st;
    switch (p->type) {
    case TOK_PRE_SPLIT:
        if ((st = regex_spans(c, &p->re, in->s, in->n, p->invert)))
            return st;
        return apply_behavior(c, in, p->behavior, out);
    case TOK_PRE_DIGITS:
        if ((st = char_spans(c, in->s, in->n, is_numeric, NULL)))
            return st;
        return apply_behavior(
            c, in, p->individual_digits ? TOK_SPLIT_ISOLATED : TOK_SPLIT_CONTIGUOUS, out);
    case TOK_PRE_BYTELEVEL: {
        piece src = *in;
        if (p->add_prefix_space && (in->n == 0 || in->s[0] != ' ')) {
            char *d = tok_arena_alloc(&c->arena, in->n + 2);
            if (!d)
                return oom(c->tok);
            d[0] = ' ';
            memcpy(d + 1, in->s, in->n);
            d[in->n + 1] = '\0';
            src.s = d;
            src.n = in->n + 1;
        }
        if (!p->use_regex)
            return byte_map(c, &src, out);
        piece_vec parts = {0};
        if ((st = regex_spans(c, &p->re, src.s, src.n, false)) ||
            (st = apply_behavior(c, &src, TOK_SPLIT_ISOLATED, &parts))) {
            free(parts.v);
            return st;
        }
        for (size_t i = 0; i < parts.n && !st; i++)
            st = byte_map(c, &parts.v[i], out);
        free(parts.v);
        return st;
    }
    case TOK_PRE_METASPACE: {
        size_t spaces = 0;
        for (size_t i = 0; i < in->n; i++)
            spaces += in->s[i] == ' ';
        bool prepend = false;
        if (p->prepend_scheme == TOK_PREPEND_ALWAYS)
            prepend = true;
        else if (p->prepend_scheme == TOK_PREPEND_FIRST)
            prepend = in->first;
        char *d = tok_arena_alloc(&c->arena, in->n + (spaces + 1) * p->repl_len + 1);
        if (!d)
            return oom(c->tok);
        size_t k = 0;
        for (size_t i = 0; i < in->n; i++) {
            if (in->s[i] == ' ') {
                memcpy(d + k, p->repl, p->repl_len);
                k += p->repl_len;
            } else
                d[k++] = in->s[i];
        }
        d[k] = '\0';
        /* The prefix test is on the text after replacement: " x" already starts with it. */
        bool starts = k >= p->repl_len && memcmp(d, p->repl, p->repl_len) == 0;
        if (prepend && !starts) {
            memmove(d + p->repl_len, d, k + 1);
            memcpy(d, p->repl, p->repl_len);
            k += p->repl_len;
        }
        piece np = {d, k, in->first, -1};
        if (!p->split)
            return piece_push(out, np) ? MOE_OK : oom(c->tok);
        if ((st = char_spans(c, d, k, is_cp, &p->repl_cp)))
            return st;
        return apply_behavior(c, &np, TOK_SPLIT_MERGED_NEXT, out);
    }
    default:
        return piece_push(out, *in) ? MOE_OK : oom(c->tok);
    }
}

/* ---- the whole pipeline ---- */

static moe_status encode_pieces(enc_ctx *c, const char *text, size_t len, tok_ids *ids)
{
    const moe_tokenizer *tok = c->tok;
    piece_vec a = {0}, b = {0};
    moe_status st = MOE_OK;
    tok_buf norm = {0};
    piece whole = {text, len, true, -1};

    /* 1. added tokens matched on the raw text */
    if ((st = split_added(c, &tok->trie_raw, &whole, &a)))
        goto out;
    /* 2. normalize the text pieces, then match the normalized added tokens */
    for (size_t i = 0; i < a.n; i++) {
        piece p = a.v[i];
        if (p.id >= 0) {
            if (!piece_push(&b, p)) {
                st = oom(tok);
                goto out;
            }
            continue;
        }
        if (tok->n_norms > 0) {
            if ((st = normalize_with(c, p.s, p.n, &norm)))
                goto out;
            if (!(p.s = arena_dup(c, norm.p, norm.len))) {
                st = oom(tok);
                goto out;
            }
            p.n = norm.len;
        }
        if ((st = split_added(c, &tok->trie_norm, &p, &b)))
            goto out;
    }
    /* 3. pre-tokenizers, each over all pieces */
    for (size_t k = 0; k < tok->n_pretoks; k++) {
        piece_vec t = a;
        a = b;
        b = t;
        b.n = 0;
        for (size_t i = 0; i < a.n; i++) {
            if (a.v[i].id >= 0)
                st = piece_push(&b, a.v[i]) ? MOE_OK : oom(tok);
            else if (a.v[i].n > 0)
                st = pretok_one(c, &tok->pretoks[k], &a.v[i], &b);
            if (st)
                goto out;
        }
    }
    /* 4. the model */
    for (size_t i = 0; i < b.n; i++) {
        if (b.v[i].id >= 0)
            st = tok_ids_push(ids, b.v[i].id) ? MOE_OK : oom(tok);
        else
            st = tok_bpe_encode(tok, &c->bpe, b.v[i].s, b.v[i].n, ids);
        if (st)
            goto out;
    }
out:
    free(a.v);
    free(b.v);
    tok_buf_free(&norm);
    return st;
}

moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                bool add_special, int32_t *ids, size_t cap, size_t *n_out)
{
    *n_out = 0;
    if (!text && len)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: encode: NULL text", tok->name);
    if (!text)
        text = "";
    size_t bad = moe_utf8_check(text, len);
    if (bad != len)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: encode: text is not valid UTF-8 (byte %zu)",
                         tok->name, bad);
    enc_ctx c;
    moe_status st = ctx_init(&c, tok);
    tok_ids seq = {0}, all = {0};
    if (!st)
        st = encode_pieces(&c, text, len, &seq);
    const tok_ids *res = &seq;
    if (!st && add_special) {
        for (size_t i = 0; i < tok->post.n_items && !st; i++) {
            const tok_tmpl_item *it = &tok->post.items[i];
            const int32_t *src = it->ids ? it->ids : seq.v;
            size_t n = it->ids ? it->n : seq.n;
            for (size_t k = 0; k < n && !st; k++)
                if (!tok_ids_push(&all, src[k]))
                    st = oom(tok);
        }
        res = &all;
    }
    if (!st) {
        *n_out = res->n;
        if (ids && res->n)
            memcpy(ids, res->v, (res->n < cap ? res->n : cap) * sizeof *ids);
    }
    free(seq.v);
    free(all.v);
    ctx_free(&c);
    return st;
}
