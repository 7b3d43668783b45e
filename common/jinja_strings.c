/* Jinja builtins' shared pieces: Python's string semantics the filters and methods both need
 * (code points, Unicode whitespace and case, strip/replace), iteration as a list, attribute
 * paths, and name lookup in the builtin tables. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "common/jinja_internal.h"

bool ja_oom(jctx *c) { return jx_fail(c, "out of memory while rendering"); }

bool ja_is_int(jv v) { return v.k == JV_INT || v.k == JV_BOOL; }
int64_t ja_as_int(jv v) { return v.k == JV_INT ? v.i : v.b; }

bool ja_mkstr(jctx *c, const char *s, size_t n, jv *out)
{
    *out = jv_str(jx_arena(c), s, n);
    return out->k == JV_STR || ja_oom(c);
}

bool ja_buf_done(jctx *c, jbuf *b, jv *out)
{
    bool ok = !b->failed && ja_mkstr(c, b->p ? b->p : "", b->len, out);
    free(b->p);
    return ok || (b->failed && ja_oom(c));
}

/* str(v) as a jstr (strings themselves are returned as they are). */
bool ja_to_str(jctx *c, jv v, jv *out)
{
    if (v.k == JV_STR) {
        *out = v;
        return true;
    }
    jbuf b = {0};
    jv_to_str(&b, v);
    return ja_buf_done(c, &b, out);
}

bool ja_need_str(jctx *c, jv v, const char *what)
{
    return v.k == JV_STR || jx_fail(c, "%s: expected a string, got %s", what, jv_type_name(v));
}

uint32_t ja_utf8_next(const char *s, size_t n, size_t *i)
{
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + *i, (utf8proc_ssize_t)(n - *i), &cp);
    if (k <= 0) {
        (*i)++;
        return 0xFFFD;
    }
    *i += (size_t)k;
    return (uint32_t)cp;
}

void ja_put_cp(jbuf *b, uint32_t cp)
{
    utf8proc_uint8_t t[4];
    utf8proc_ssize_t k = utf8proc_encode_char((utf8proc_int32_t)cp, t);
    jb_put(b, (const char *)t, (size_t)k);
}

static bool in_chars(uint32_t cp, const jstr *chars)
{
    size_t i = 0;
    while (i < chars->len)
        if (ja_utf8_next(chars->s, chars->len, &i) == cp)
            return true;
    return false;
}

/* str.strip/lstrip/rstrip(chars) */
bool ja_strip(jctx *c, jv v, const jv *chars, bool left, bool right, jv *out)
{
    if (!ja_need_str(c, v, "strip"))
        return false;
    if (chars && chars->k != JV_NONE && chars->k != JV_UNDEF && !ja_need_str(c, *chars, "strip chars"))
        return false;
    const jstr *cs = (chars && chars->k == JV_STR) ? chars->s : NULL;
    const char *s = v.s->s;
    size_t n = v.s->len, b = 0, e = n;
    if (left)
        while (b < e) {
            size_t k = b;
            uint32_t cp = ja_utf8_next(s, n, &k);
            if (cs ? !in_chars(cp, cs) : !ja_is_space(cp))
                break;
            b = k;
        }
    if (right)
        while (e > b) {
            size_t k = e - 1;
            while (k > b && ((unsigned char)s[k] & 0xC0) == 0x80)
                k--;
            size_t j = k;
            uint32_t cp = ja_utf8_next(s, n, &j);
            if (cs ? !in_chars(cp, cs) : !ja_is_space(cp))
                break;
            e = k;
        }
    return ja_mkstr(c, s + b, e - b, out);
}

bool ja_case(jctx *c, jv v, int mode, jv *out) /* 0 lower, 1 upper, 2 capitalize, 3 title */
{
    jv s;
    if (!ja_to_str(c, v, &s))
        return false;
    jbuf b = {0};
    size_t i = 0;
    bool word_start = true;
    while (i < s.s->len) {
        uint32_t cp = ja_utf8_next(s.s->s, s.s->len, &i);
        uint32_t r;
        if (mode == 0)
            r = (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp);
        else if (mode == 1)
            r = (uint32_t)utf8proc_toupper((utf8proc_int32_t)cp);
        else {
            r = word_start ? (uint32_t)utf8proc_totitle((utf8proc_int32_t)cp)
                           : (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp);
            if (mode == 2)
                word_start = false;
            else /* jinja2's title: a word starts after spaces, '-', '(', '{', '[', '<' */
                word_start = ja_is_space(cp) || cp == '-' || cp == '(' || cp == '{' || cp == '[' ||
                             cp == '<';
        }
        ja_put_cp(&b, r);
    }
    return ja_buf_done(c, &b, out);
}

bool ja_replace(jctx *c, jv v, jv old, jv new_, const jv *count, jv *out)
{
    jv s;
    if (!ja_to_str(c, v, &s) || !ja_need_str(c, old, "replace") || !ja_need_str(c, new_, "replace"))
        return false;
    int64_t left = (count && ja_is_int(*count)) ? ja_as_int(*count) : -1;
    jbuf b = {0};
    const char *p = s.s->s;
    size_t n = s.s->len;
    if (old.s->len == 0) { /* Python inserts `new` around every code point */
        size_t i = 0;
        while (left != 0) {
            jb_put(&b, new_.s->s, new_.s->len);
            if (left > 0)
                left--;
            if (i >= n)
                break;
            size_t k = i;
            ja_utf8_next(p, n, &k);
            jb_put(&b, p + i, k - i);
            i = k;
        }
        if (i < n)
            jb_put(&b, p + i, n - i);
        return ja_buf_done(c, &b, out);
    }
    size_t i = 0;
    while (left != 0) {
        const char *m = memmem(p + i, n - i, old.s->s, old.s->len);
        if (!m)
            break;
        jb_put(&b, p + i, (size_t)(m - (p + i)));
        jb_put(&b, new_.s->s, new_.s->len);
        i = (size_t)(m - p) + old.s->len;
        if (left > 0)
            left--;
    }
    jb_put(&b, p + i, n - i);
    return ja_buf_done(c, &b, out);
}

bool ja_list_of(jctx *c, jv v, jlist **out)
{
    ja_arena *a = jx_arena(c);
    if (v.k == JV_LIST) {
        *out = v.l;
        return true;
    }
    jlist *l = jv_list_new(a, 8);
    if (!l)
        return ja_oom(c);
    *out = l;
    if (v.k == JV_UNDEF)
        return true;
    if (v.k == JV_DICT) {
        for (int i = 0; i < v.d->n; i++)
            if (!jv_list_push(a, l, (jv){.k = JV_STR, .s = v.d->keys[i]}))
                return ja_oom(c);
        return true;
    }
    if (v.k == JV_STR) {
        size_t i = 0;
        while (i < v.s->len) {
            size_t k = i;
            ja_utf8_next(v.s->s, v.s->len, &k);
            jv ch;
            if (!ja_mkstr(c, v.s->s + i, k - i, &ch) || !jv_list_push(a, l, ch))
                return ja_oom(c);
            i = k;
        }
        return true;
    }
    return jx_fail(c, "'%s' object is not iterable", jv_type_name(v));
}

jv ja_wrap_list(jlist *l) { return (jv){.k = JV_LIST, .l = l}; }

bool ja_items(jctx *c, jv v, jv *out)
{
    ja_arena *a = jx_arena(c);
    jlist *l = jv_list_new(a, v.k == JV_DICT ? v.d->n : 1);
    if (!l)
        return ja_oom(c);
    if (v.k == JV_DICT) {
        for (int i = 0; i < v.d->n; i++) {
            jlist *t = jv_list_new(a, 2);
            if (!t)
                return ja_oom(c);
            t->tuple = true;
            t->items[0] = (jv){.k = JV_STR, .s = v.d->keys[i]};
            t->items[1] = v.d->vals[i];
            t->n = 2;
            if (!jv_list_push(a, l, ja_wrap_list(t)))
                return ja_oom(c);
        }
    } else if (v.k != JV_UNDEF) {
        return jx_fail(c, "items: expected a mapping, got %s", jv_type_name(v));
    }
    *out = ja_wrap_list(l);
    return true;
}

/* An attribute path "a.b" of v, as jinja2's make_attrgetter (dots walk, digits index lists). */
jv ja_attr_path(jv v, const jstr *path)
{
    const char *p = path->s, *end = p + path->len;
    while (p <= end) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        size_t n = dot ? (size_t)(dot - p) : (size_t)(end - p);
        if (v.k == JV_DICT) {
            jv *x = jv_dict_get(v.d, p, n);
            v = x ? *x : jv_undef();
        } else if (v.k == JV_LIST && n > 0 && n < 18) {
            char t[20];
            memcpy(t, p, n);
            t[n] = '\0';
            char *e;
            long long i = strtoll(t, &e, 10);
            v = (*e == '\0' && i >= 0 && i < v.l->n) ? v.l->items[i] : jv_undef();
        } else {
            return jv_undef();
        }
        if (!dot)
            break;
        p = dot + 1;
    }
    return v;
}

int ja_find_name(const char *const *names, size_t n_names, const char *s, size_t len)
{
    for (size_t i = 0; i < n_names; i++)
        if (strlen(names[i]) == len && memcmp(names[i], s, len) == 0)
            return (int)i;
    return -1;
}

bool ja_name_is(const char *name, size_t len, const char *want)
{
    return strlen(want) == len && memcmp(name, want, len) == 0;
}
