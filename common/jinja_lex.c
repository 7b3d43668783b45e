/* The Jinja lexer: template text -> tokens, with jinja2's whitespace control as transformers
 * configures it (trim_blocks, lstrip_blocks, keep_trailing_newline off, newlines normalized the
 * way jinja2's "\n".join(source.splitlines()) does). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"
#include "common/jinja_internal.h"
#include "common/utf8.h"

#define MAX_TOKENS (1 << 22)

typedef struct {
    const char *s;
    size_t n, i;
    int line;
    ja_arena *a;
    jtoks *out;
} lexer;

static moe_status lex_err(const lexer *L, const char *what)
{
    return moe_error(MOE_ERR_FORMAT, "chat template line %d: %s", L->line, what);
}

static jtok *push(lexer *L, int kind)
{
    if (L->out->n >= MAX_TOKENS ||
        !moe_grow((void **)&L->out->toks, &L->out->cap, L->out->n + 1, sizeof(jtok)))
        return NULL;
    jtok *t = &L->out->toks[L->out->n++];
    memset(t, 0, sizeof(*t));
    t->kind = kind;
    t->line = L->line;
    return t;
}

static void count_lines(lexer *L, const char *p, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (p[k] == '\n')
            L->line++;
}

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* The length of a line break (as str.splitlines sees it) at s[i], 0 if none. */
static size_t line_break(const unsigned char *s, size_t n, size_t i)
{
    unsigned char c = s[i];
    if (c == '\r')
        return (i + 1 < n && s[i + 1] == '\n') ? 2 : 1;
    if (c == '\n' || c == '\v' || c == '\f' || c == 0x1c || c == 0x1d || c == 0x1e)
        return 1;
    if (c == 0xC2 && i + 1 < n && s[i + 1] == 0x85)
        return 2;
    if (c == 0xE2 && i + 2 < n && s[i + 1] == 0x80 && (s[i + 2] == 0xA8 || s[i + 2] == 0xA9))
        return 3;
    return 0;
}

/* jinja2 reads "\n".join(source.splitlines()): every line break becomes "\n" and one final
 * break is dropped. */
static char *normalize(ja_arena *a, const char *src, size_t len, size_t *out_len)
{
    char *d = ja_alloc(a, len + 1);
    if (!d)
        return NULL;
    const unsigned char *s = (const unsigned char *)src;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t br = line_break(s, len, i);
        if (br) {
            if (i + br == len)
                break; /* the last line's break */
            d[o++] = '\n';
            i += br;
        } else {
            d[o++] = (char)s[i++];
        }
    }
    d[o] = '\0';
    *out_len = o;
    return d;
}

/* A string literal at L->i (the quote), unescaped like Python's unicode-escape codec. */
static moe_status lex_string(lexer *L)
{
    const char q = L->s[L->i];
    size_t j = L->i + 1;
    while (j < L->n && L->s[j] != q) {
        if (L->s[j] == '\\' && j + 1 < L->n)
            j++;
        j++;
    }
    if (j >= L->n)
        return lex_err(L, "unterminated string literal");
    const char *p = L->s + L->i + 1;
    size_t n = j - L->i - 1;
    char *d = ja_alloc(L->a, n * 4 + 1); /* \777-style escapes never grow; \U may (<= 4 bytes) */
    if (!d)
        return moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
    size_t o = 0;
    for (size_t k = 0; k < n; k++) {
        if (p[k] != '\\' || k + 1 >= n) {
            d[o++] = p[k];
            continue;
        }
        char e = p[++k];
        int digits = 0;
        switch (e) {
        case '\n': break;
        case '\\': d[o++] = '\\'; break;
        case '\'': d[o++] = '\''; break;
        case '"': d[o++] = '"'; break;
        case 'a': d[o++] = '\a'; break;
        case 'b': d[o++] = '\b'; break;
        case 'f': d[o++] = '\f'; break;
        case 'n': d[o++] = '\n'; break;
        case 'r': d[o++] = '\r'; break;
        case 't': d[o++] = '\t'; break;
        case 'v': d[o++] = '\v'; break;
        case 'x': digits = 2; break;
        case 'u': digits = 4; break;
        case 'U': digits = 8; break;
        default:
            if (e >= '0' && e <= '7') {
                uint32_t v = (uint32_t)(e - '0');
                for (int m = 0; m < 2 && k + 1 < n && p[k + 1] >= '0' && p[k + 1] <= '7'; m++)
                    v = v * 8 + (uint32_t)(p[++k] - '0');
                o += moe_utf8_encode(v, d + o);
            } else {
                d[o++] = '\\';
                d[o++] = e;
            }
        }
        if (digits) {
            uint32_t v = 0;
            for (int m = 0; m < digits; m++) {
                int h = k + 1 < n ? moe_hex_digit(p[k + 1]) : -1;
                if (h < 0)
                    return lex_err(L, "truncated \\x, \\u or \\U escape in a string literal");
                v = v * 16 + (uint32_t)h;
                k++;
            }
            if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
                return lex_err(L, "escape outside Unicode in a string literal");
            o += moe_utf8_encode(v, d + o);
        }
    }
    d[o] = '\0';
    jtok *t = push(L, TK_STRING);
    if (!t)
        return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
    t->s = d;
    t->len = o;
    count_lines(L, L->s + L->i, j + 1 - L->i);
    L->i = j + 1;
    return MOE_OK;
}

static bool is_digit(char c) { return c >= '0' && c <= '9'; }
static bool is_name0(char c) { return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

/* The end of a run of digits with jinja2's optional single underscores between them. */
static size_t digits_end(const lexer *L, size_t j)
{
    while (j < L->n && (is_digit(L->s[j]) ||
                        (L->s[j] == '_' && j + 1 < L->n && is_digit(L->s[j + 1]) && j > 0 &&
                         is_digit(L->s[j - 1]))))
        j++;
    return j;
}

static bool is_base_digit(char c, int base)
{
    if (base == 16)
        return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    return c >= '0' && c < '0' + base;
}

/* The end of a float literal as jinja2's float_re reads it (digits, then a fraction, an
 * exponent or both), or `start` when what is there is no float. */
static size_t float_end(const lexer *L, size_t start)
{
    if (start > 0 && L->s[start - 1] == '.') /* (?<!\.): `a.0.1` is two attribute steps */
        return start;
    size_t j = digits_end(L, start);
    bool is_float = false;
    if (j + 1 < L->n && L->s[j] == '.' && is_digit(L->s[j + 1])) {
        is_float = true;
        j = digits_end(L, j + 1);
    }
    if (j < L->n && (L->s[j] == 'e' || L->s[j] == 'E')) {
        size_t k = j + 1;
        if (k < L->n && (L->s[k] == '+' || L->s[k] == '-'))
            k++;
        if (k < L->n && is_digit(L->s[k])) {
            is_float = true;
            j = digits_end(L, k);
        }
    }
    return is_float ? j : start;
}

/* An integer literal as jinja2's integer_re reads it: 0b / 0o / 0x and their digits, a
 * decimal without leading zeros, or zeros alone (so `007` is `00` then `7`, a syntax error
 * there and here). Sets where its digits start and their base. */
static size_t int_end(const lexer *L, size_t start, size_t *digits_from, int *base)
{
    *digits_from = start;
    *base = 10;
    if (L->s[start] != '0')
        return digits_end(L, start);
    if (start + 2 < L->n) {
        char p = (char)(L->s[start + 1] | 0x20);
        int b = p == 'b' ? 2 : p == 'o' ? 8 : p == 'x' ? 16 : 0;
        size_t j = start + 2;
        if (b && j < L->n && L->s[j] == '_')
            j++;
        if (b && j < L->n && is_base_digit(L->s[j], b)) {
            while (j < L->n && (is_base_digit(L->s[j], b) ||
                                (L->s[j] == '_' && j + 1 < L->n && is_base_digit(L->s[j + 1], b))))
                j++;
            *digits_from = start + 2;
            *base = b;
            return j;
        }
    }
    size_t j = start + 1;
    while (j < L->n && (L->s[j] == '0' || (L->s[j] == '_' && j + 1 < L->n && L->s[j + 1] == '0')))
        j++;
    return j;
}

static moe_status lex_number(lexer *L)
{
    size_t from = L->i, j = float_end(L, L->i);
    bool is_float = j > L->i;
    int base = 10;
    if (!is_float)
        j = int_end(L, L->i, &from, &base);
    /* strtod / strtoull read the literal as written less its underscores, however long: a
     * copy bounded by the literal itself, never a fixed buffer that would cut digits off */
    char *text = malloc(j - from + 1);
    if (!text)
        return moe_error(MOE_ERR_NOMEM, "chat template: number literal");
    size_t len = 0;
    for (size_t c = from; c < j; c++)
        if (L->s[c] != '_')
            text[len++] = L->s[c];
    text[len] = '\0';
    jtok *t = push(L, is_float ? TK_FLOAT : TK_INT);
    moe_status st = MOE_OK;
    if (!t) {
        st = moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
    } else if (is_float) {
        t->fval = strtod(text, NULL);
    } else {
        errno = 0;
        unsigned long long v = strtoull(text, NULL, base);
        if (errno || v > INT64_MAX)
            st = lex_err(L, "integer literal out of range");
        else
            t->ival = (int64_t)v;
    }
    free(text);
    if (st == MOE_OK)
        L->i = j;
    return st;
}

static int two_char_op(char a, char b)
{
    if (a == '*' && b == '*') return OP_POW;
    if (a == '/' && b == '/') return OP_FLOORDIV;
    if (a == '=' && b == '=') return OP_EQ;
    if (a == '!' && b == '=') return OP_NE;
    if (a == '<' && b == '=') return OP_LE;
    if (a == '>' && b == '=') return OP_GE;
    return 0;
}

/* Tokens of one tag's inside, up to its end marker ("}}", "%}" or "#}" for `end`). Sets
 * *strip_after when the end was "-X}", *plus when "+X}". */
static moe_status lex_tag(lexer *L, char end, bool *strip_after, bool *plus)
{
    for (;;) {
        while (L->i < L->n && is_ws(L->s[L->i])) {
            if (L->s[L->i] == '\n')
                L->line++;
            L->i++;
        }
        if (L->i >= L->n)
            return lex_err(L, end == '}' ? "missing '}}'" : "missing '%}'");
        const char *p = L->s + L->i;
        size_t left = L->n - L->i;
        if ((p[0] == '-' || p[0] == '+') && left >= 3 && p[1] == end && p[2] == '}') {
            *strip_after = p[0] == '-';
            *plus = p[0] == '+';
            L->i += 3;
            return MOE_OK;
        }
        if (left >= 2 && p[0] == end && p[1] == '}') {
            L->i += 2;
            return MOE_OK;
        }
        moe_status st;
        if (p[0] == '\'' || p[0] == '"') {
            if ((st = lex_string(L)) != MOE_OK)
                return st;
        } else if (is_digit(p[0])) {
            if ((st = lex_number(L)) != MOE_OK)
                return st;
        } else if (is_name0(p[0])) {
            size_t j = 1;
            while (j < left && (is_name0(p[j]) || is_digit(p[j])))
                j++;
            jtok *t = push(L, TK_NAME);
            if (!t)
                return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
            t->s = p;
            t->len = j;
            L->i += j;
        } else {
            int op = left >= 2 ? two_char_op(p[0], p[1]) : 0;
            if (!op && !strchr("+-*/%~<>=()[]{},.:|", p[0])) {
                char m[64];
                snprintf(m, sizeof(m), "unexpected character '%c' (0x%02x)",
                         (p[0] >= 0x20 && p[0] < 0x7f) ? p[0] : '?', (unsigned char)p[0]);
                return lex_err(L, m);
            }
            jtok *t = push(L, TK_OP);
            if (!t)
                return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
            t->op = op ? op : (unsigned char)p[0];
            L->i += op ? 2 : 1;
        }
    }
}

moe_status ja_lex(const char *src, size_t len, ja_arena *a, jtoks *out)
{
    lexer L = {.a = a, .out = out, .line = 1};
    memset(out, 0, sizeof(*out));
    L.s = normalize(a, src, len, &L.n);
    if (!L.s)
        return moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
    bool strip_next = false;   /* the previous tag ended with '-' */
    bool line_starting = true; /* the previous token ended a line (jinja2's lstrip rule) */
    while (L.i < L.n) {
        /* Text up to the next tag. */
        size_t start = L.i, j = L.i;
        while (j + 1 < L.n && !(L.s[j] == '{' && (L.s[j + 1] == '{' || L.s[j + 1] == '%' ||
                                                   L.s[j + 1] == '#')))
            j++;
        if (j + 1 >= L.n)
            j = L.n;
        const char *text = L.s + start;
        size_t tlen = j - start;
        count_lines(&L, text, tlen);
        if (strip_next)
            while (tlen > 0 && is_ws(*text)) {
                text++;
                tlen--;
            }
        char kind = j < L.n ? L.s[j + 1] : 0;
        char sign = (j + 2 < L.n) ? L.s[j + 2] : 0;
        if (kind && sign == '-') {
            while (tlen > 0 && is_ws(text[tlen - 1]))
                tlen--;
        } else if (kind && kind != '{' && sign != '+') {
            /* lstrip_blocks: spaces and tabs alone between a line's start and a block tag go */
            size_t l = tlen;
            while (l > 0 && text[l - 1] != '\n')
                l--;
            if (l > 0 || line_starting) {
                bool ws = l < tlen;
                for (size_t k = l; k < tlen && ws; k++)
                    ws = is_ws(text[k]);
                if (ws)
                    tlen = l;
            }
        }
        if (tlen > 0) {
            jtok *t = push(&L, TK_TEXT);
            if (!t)
                return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
            t->s = text;
            t->len = tlen;
        }
        if (j >= L.n)
            break;
        L.i = j + 2 + ((sign == '-' || sign == '+') ? 1 : 0);
        bool strip_after = false, plus = false;
        if (kind == '#') {
            /* Comment: skip to "#}", honouring its own -/+ markers. */
            size_t k = L.i;
            while (k + 1 < L.n && !(L.s[k] == '#' && L.s[k + 1] == '}'))
                k++;
            if (k + 1 >= L.n)
                return lex_err(&L, "missing '#}'");
            count_lines(&L, L.s + L.i, k - L.i);
            strip_after = k > L.i && L.s[k - 1] == '-';
            plus = k > L.i && L.s[k - 1] == '+';
            L.i = k + 2;
        } else {
            jtok *t = push(&L, kind == '{' ? TK_VAR_BEGIN : TK_BLOCK_BEGIN);
            if (!t)
                return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
            moe_status st = lex_tag(&L, kind == '{' ? '}' : '%', &strip_after, &plus);
            if (st != MOE_OK)
                return st;
            t = push(&L, kind == '{' ? TK_VAR_END : TK_BLOCK_END);
            if (!t)
                return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
        }
        strip_next = strip_after;
        line_starting = false;
        /* trim_blocks: one newline right after a block or comment tag goes */
        if (kind != '{' && !strip_after && !plus && L.i < L.n && L.s[L.i] == '\n') {
            L.i++;
            L.line++;
            line_starting = true;
        }
    }
    if (!push(&L, TK_EOF))
        return moe_error(MOE_ERR_NOMEM, "chat template: too many tokens");
    return MOE_OK;
}
