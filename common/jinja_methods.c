/* Jinja tests, the str/dict methods templates call (Python's semantics: code-point indices,
 * Unicode whitespace), and the globals range, namespace, dict, raise_exception, strftime_now. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <utf8proc.h>

#include "common/jinja_internal.h"

/* ---------------------------------------------------------------------------------------------
 * Tests */

#define TESTS(X)                                                                                 \
    X(boolean) X(callable) X(defined) X(divisibleby) X(eq) X(equalto) X(even) X(false) X(float)  \
    X(ge) X(gt) X(in) X(integer) X(iterable) X(le) X(lower) X(lt) X(mapping) X(ne) X(none)       \
    X(number) X(odd) X(sameas) X(sequence) X(string) X(true) X(undefined) X(upper)

static const char *const TEST_NAMES[] = {
#define NAME(n) #n,
    TESTS(NAME)
#undef NAME
};

bool ja_test_known(const char *name, size_t len)
{
    return ja_find_name(TEST_NAMES, sizeof(TEST_NAMES) / sizeof(TEST_NAMES[0]), name, len) >= 0;
}

static bool case_is(jctx *c, jv v, bool upper, bool *out)
{
    if (v.k != JV_STR) {
        *out = false;
        return true;
    }
    bool cased = false, ok = true;
    size_t i = 0;
    while (i < v.s->len && ok) {
        uint32_t cp = ja_utf8_next(v.s->s, v.s->len, &i);
        utf8proc_int32_t lo = utf8proc_tolower((utf8proc_int32_t)cp);
        utf8proc_int32_t up = utf8proc_toupper((utf8proc_int32_t)cp);
        if (lo != up) {
            cased = true;
            ok = upper ? (utf8proc_int32_t)cp == up : (utf8proc_int32_t)cp == lo;
        }
    }
    (void)c;
    *out = ok && cased;
    return true;
}

bool ja_call_test(jctx *c, const char *name, size_t len, jv v, const jargs *a, bool *out)
{
#define IS(n) ja_name_is(name, len, n)
    const jv *arg = a->npos > 0 ? &a->pos[0] : NULL;
    if (IS("defined")) *out = v.k != JV_UNDEF;
    else if (IS("undefined")) *out = v.k == JV_UNDEF;
    else if (IS("none")) *out = v.k == JV_NONE;
    else if (IS("boolean")) *out = v.k == JV_BOOL;
    else if (IS("false")) *out = v.k == JV_BOOL && !v.b;
    else if (IS("true")) *out = v.k == JV_BOOL && v.b;
    else if (IS("integer")) *out = v.k == JV_INT;
    else if (IS("float")) *out = v.k == JV_FLOAT;
    else if (IS("number")) *out = v.k == JV_INT || v.k == JV_FLOAT || v.k == JV_BOOL;
    else if (IS("string")) *out = v.k == JV_STR;
    else if (IS("mapping")) *out = v.k == JV_DICT && !v.d->is_ns;
    else if (IS("iterable")) *out = v.k == JV_STR || v.k == JV_LIST || v.k == JV_DICT || v.k == JV_UNDEF;
    else if (IS("sequence")) *out = v.k == JV_STR || v.k == JV_LIST || (v.k == JV_DICT && !v.d->is_ns) || v.k == JV_UNDEF;
    else if (IS("callable")) *out = v.k == JV_MACRO || v.k == JV_FUNC;
    else if (IS("lower") || IS("upper")) return case_is(c, v, IS("upper"), out);
    else if (IS("odd") || IS("even") || IS("divisibleby")) {
        int64_t m = IS("divisibleby") ? (arg && ja_is_int(*arg) ? ja_as_int(*arg) : 0) : 2;
        if (!ja_is_int(v) || m == 0)
            return jx_fail(c, "test '%.*s' needs integers", (int)len, name);
        int64_t r = ja_as_int(v) % m;
        *out = IS("odd") ? r != 0 : r == 0;
    } else if (IS("sameas")) {
        if (!arg)
            return jx_fail(c, "sameas needs an argument");
        /* Python identity: singletons compare equal, other objects by their storage */
        if (v.k != arg->k) *out = false;
        else if (v.k == JV_NONE || v.k == JV_UNDEF) *out = true;
        else if (v.k == JV_BOOL) *out = v.b == arg->b;
        else if (v.k == JV_STR) *out = v.s == arg->s;
        else if (v.k == JV_LIST) *out = v.l == arg->l;
        else if (v.k == JV_DICT) *out = v.d == arg->d;
        else *out = jv_eq(v, *arg);
    } else if (IS("in")) {
        if (!arg)
            return jx_fail(c, "test 'in' needs an argument");
        if (arg->k == JV_STR)
            *out = v.k == JV_STR && memmem(arg->s->s, arg->s->len, v.s->s, v.s->len) != NULL;
        else if (arg->k == JV_LIST) {
            *out = false;
            for (int i = 0; i < arg->l->n && !*out; i++)
                *out = jv_eq(v, arg->l->items[i]);
        } else if (arg->k == JV_DICT)
            *out = v.k == JV_STR && jv_dict_get(arg->d, v.s->s, v.s->len);
        else
            return jx_fail(c, "test 'in': '%s' is not a container", jv_type_name(*arg));
    } else {
        if (!arg)
            return jx_fail(c, "test '%.*s' needs an argument", (int)len, name);
        if (IS("eq") || IS("equalto")) *out = jv_eq(v, *arg);
        else if (IS("ne")) *out = !jv_eq(v, *arg);
        else {
            int r;
            if (!jv_cmp(v, *arg, &r))
                return jx_fail(c, "test '%.*s': values cannot be compared", (int)len, name);
            *out = r != 2 && (IS("lt") ? r < 0 : IS("le") ? r <= 0 : IS("gt") ? r > 0 : r >= 0);
        }
    }
    return true;
#undef IS
}

/* ---------------------------------------------------------------------------------------------
 * Methods */

static size_t cp_index(const char *s, size_t byte_off) { return ja_utf8_count(s, byte_off); }

static bool do_split(jctx *c, jv s, const jargs *a, bool from_right, jv *out)
{
    const jv *sep = jx_arg(a, 0, "sep");
    const jv *maxv = jx_arg(a, 1, "maxsplit");
    int64_t maxsplit = (maxv && ja_is_int(*maxv)) ? ja_as_int(*maxv) : -1;
    ja_arena *ar = jx_arena(c);
    jlist *l = jv_list_new(ar, 8);
    if (!l)
        return ja_oom(c);
    const char *p = s.s->s;
    size_t n = s.s->len;
    jv piece;
    if (!sep || sep->k == JV_NONE) {
        if (from_right)
            return jx_fail(c, "rsplit() without a separator is not supported");
        size_t i = 0;
        while (i < n) {
            size_t k = i;
            while (k < n) { /* skip whitespace */
                size_t j = k;
                if (!ja_is_space(ja_utf8_next(p, n, &j)))
                    break;
                k = j;
            }
            if (k >= n)
                break;
            size_t e = k;
            if (maxsplit == 0) {
                /* the rest, with trailing whitespace removed */
                e = n;
                while (e > k) {
                    size_t b = e - 1;
                    while (b > k && ((unsigned char)p[b] & 0xC0) == 0x80)
                        b--;
                    size_t j = b;
                    if (!ja_is_space(ja_utf8_next(p, n, &j)))
                        break;
                    e = b;
                }
            } else {
                while (e < n) {
                    size_t j = e;
                    if (ja_is_space(ja_utf8_next(p, n, &j)))
                        break;
                    e = j;
                }
            }
            if (!ja_mkstr(c, p + k, e - k, &piece) || !jv_list_push(ar, l, piece))
                return ja_oom(c);
            if (maxsplit > 0)
                maxsplit--;
            i = e;
            if (maxsplit == 0 && e == n)
                break;
        }
        *out = ja_wrap_list(l);
        return true;
    }
    if (!ja_need_str(c, *sep, "split separator"))
        return false;
    if (sep->s->len == 0)
        return jx_fail(c, "empty separator");
    const char *q = sep->s->s;
    size_t ql = sep->s->len;
    if (!from_right) {
        size_t i = 0;
        for (;;) {
            const char *m = maxsplit != 0 ? memmem(p + i, n - i, q, ql) : NULL;
            size_t e = m ? (size_t)(m - p) : n;
            if (!ja_mkstr(c, p + i, e - i, &piece) || !jv_list_push(ar, l, piece))
                return ja_oom(c);
            if (!m)
                break;
            i = e + ql;
            if (maxsplit > 0)
                maxsplit--;
        }
    } else {
        /* from the right: collect then reverse */
        size_t end = n;
        for (;;) {
            const char *m = NULL;
            if (maxsplit != 0 && end >= ql)
                for (size_t k = end - ql + 1; k-- > 0;)
                    if (memcmp(p + k, q, ql) == 0) {
                        m = p + k;
                        break;
                    }
            size_t b = m ? (size_t)(m - p) + ql : 0;
            if (!ja_mkstr(c, p + b, end - b, &piece) || !jv_list_push(ar, l, piece))
                return ja_oom(c);
            if (!m)
                break;
            end = (size_t)(m - p);
            if (maxsplit > 0)
                maxsplit--;
        }
        for (int i = 0; i < l->n / 2; i++) {
            jv t = l->items[i];
            l->items[i] = l->items[l->n - 1 - i];
            l->items[l->n - 1 - i] = t;
        }
    }
    *out = ja_wrap_list(l);
    return true;
}

static bool affix(jctx *c, jv s, const jv *arg, bool suffix, bool *out)
{
    if (!arg)
        return jx_fail(c, "startswith/endswith need an argument");
    *out = false;
    int n = arg->k == JV_LIST ? arg->l->n : 1;
    for (int i = 0; i < n && !*out; i++) {
        jv x = arg->k == JV_LIST ? arg->l->items[i] : *arg;
        if (!ja_need_str(c, x, suffix ? "endswith" : "startswith"))
            return false;
        if (x.s->len <= s.s->len)
            *out = memcmp(suffix ? s.s->s + s.s->len - x.s->len : s.s->s, x.s->s, x.s->len) == 0;
    }
    return true;
}

bool ja_call_method(jctx *c, jv obj, const char *name, size_t len, const jargs *a, jv *out,
                    bool *handled)
{
    *handled = true;
#define IS(n) ja_name_is(name, len, n)
    const jv *a0 = a->npos > 0 ? &a->pos[0] : NULL;
    if (obj.k == JV_STR) {
        if (IS("strip") || IS("lstrip") || IS("rstrip"))
            return ja_strip(c, obj, a0, !IS("rstrip"), !IS("lstrip"), out);
        if (IS("split") || IS("rsplit"))
            return do_split(c, obj, a, IS("rsplit"), out);
        if (IS("startswith") || IS("endswith")) {
            bool r = false;
            if (!affix(c, obj, a0, IS("endswith"), &r))
                return false;
            *out = jv_bool(r);
            return true;
        }
        if (IS("upper")) return ja_case(c, obj, 1, out);
        if (IS("lower")) return ja_case(c, obj, 0, out);
        if (IS("capitalize")) return ja_case(c, obj, 2, out);
        if (IS("title")) return ja_case(c, obj, 3, out);
        if (IS("replace")) {
            if (a->npos < 2)
                return jx_fail(c, "replace() takes at least 2 arguments");
            return ja_replace(c, obj, a->pos[0], a->pos[1], a->npos > 2 ? &a->pos[2] : NULL, out);
        }
        if (IS("find") || IS("rfind") || IS("count")) {
            if (!a0 || !ja_need_str(c, *a0, "find/count"))
                return false;
            const char *p = obj.s->s;
            size_t n = obj.s->len, ql = a0->s->len;
            if (IS("count")) {
                int64_t k = 0;
                if (ql == 0)
                    k = (int64_t)ja_utf8_count(p, n) + 1;
                else
                    for (const char *m = p; (m = memmem(m, n - (size_t)(m - p), a0->s->s, ql)); m += ql)
                        k++;
                *out = jv_int(k);
                return true;
            }
            int64_t at = -1;
            if (IS("find")) {
                const char *m = memmem(p, n, a0->s->s, ql);
                if (m)
                    at = (int64_t)cp_index(p, (size_t)(m - p));
            } else if (ql <= n) {
                for (size_t k = n - ql + 1; k-- > 0;)
                    if (memcmp(p + k, a0->s->s, ql) == 0) {
                        at = (int64_t)cp_index(p, k);
                        break;
                    }
            }
            *out = jv_int(at);
            return true;
        }
        if (IS("join")) {
            jlist *l;
            if (!a0 || !ja_list_of(c, *a0, &l))
                return a0 ? false : jx_fail(c, "join() takes one argument");
            jbuf b = {0};
            for (int i = 0; i < l->n; i++) {
                if (l->items[i].k != JV_STR) {
                    free(b.p);
                    return jx_fail(c, "join: item %d is %s, not a string", i, jv_type_name(l->items[i]));
                }
                if (i)
                    jb_put(&b, obj.s->s, obj.s->len);
                jb_put(&b, l->items[i].s->s, l->items[i].s->len);
            }
            return ja_buf_done(c, &b, out);
        }
        if (IS("isdigit") || IS("isspace") || IS("isalpha")) {
            bool r = obj.s->len > 0;
            size_t i = 0;
            while (i < obj.s->len && r) {
                uint32_t cp = ja_utf8_next(obj.s->s, obj.s->len, &i);
                utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)cp);
                r = IS("isspace") ? ja_is_space(cp)
                    : IS("isdigit") ? cat == UTF8PROC_CATEGORY_ND
                                    : (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO);
            }
            *out = jv_bool(r);
            return true;
        }
    } else if (obj.k == JV_DICT && !obj.d->is_ns) {
        if (IS("items"))
            return ja_items(c, obj, out);
        if (IS("keys") || IS("values")) {
            jlist *l = jv_list_new(jx_arena(c), obj.d->n);
            if (!l)
                return ja_oom(c);
            for (int i = 0; i < obj.d->n; i++)
                l->items[i] = IS("keys") ? (jv){.k = JV_STR, .s = obj.d->keys[i]} : obj.d->vals[i];
            l->n = obj.d->n;
            *out = ja_wrap_list(l);
            return true;
        }
        if (IS("get")) {
            if (!a0)
                return jx_fail(c, "get() takes at least 1 argument");
            jv *p = a0->k == JV_STR ? jv_dict_get(obj.d, a0->s->s, a0->s->len) : NULL;
            *out = p ? *p : (a->npos > 1 ? a->pos[1] : jv_none());
            return true;
        }
    }
#undef IS
    *handled = false;
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * Globals */

static const char *const GLOBALS[] = {"range", "namespace", "dict", "raise_exception", "strftime_now"};

int ja_global_func(const char *name, size_t len)
{
    return ja_find_name(GLOBALS, sizeof(GLOBALS) / sizeof(GLOBALS[0]), name, len);
}

bool ja_call_global(jctx *c, int fn, const jargs *a, jv *out)
{
    ja_arena *ar = jx_arena(c);
    switch (fn) {
    case 0: { /* range */
        int64_t v[3] = {0, 0, 1};
        if (a->npos < 1 || a->npos > 3)
            return jx_fail(c, "range expected 1 to 3 arguments, got %d", a->npos);
        for (int i = 0; i < a->npos; i++)
            if (!ja_is_int(a->pos[i]))
                return jx_fail(c, "range: '%s' object cannot be interpreted as an integer",
                               jv_type_name(a->pos[i]));
        if (a->npos == 1)
            v[1] = ja_as_int(a->pos[0]);
        else
            for (int i = 0; i < a->npos; i++)
                v[i] = ja_as_int(a->pos[i]);
        if (v[2] == 0)
            return jx_fail(c, "range() arg 3 must not be zero");
        /* jinja2's sandbox refuses ranges over 100000 items (MAX_RANGE) */
        double count = ceil(((double)v[1] - (double)v[0]) / (double)v[2]);
        if (count > 100000)
            return jx_fail(c, "range too big (jinja2's sandbox allows 100000 items)");
        jlist *l = jv_list_new(ar, count > 0 ? (int)count : 1);
        if (!l)
            return ja_oom(c);
        for (int64_t i = v[0]; v[2] > 0 ? i < v[1] : i > v[1]; i += v[2])
            if (!jv_list_push(ar, l, jv_int(i)))
                return ja_oom(c);
        *out = ja_wrap_list(l);
        return true;
    }
    case 1:   /* namespace(**kw) or namespace(dict) */
    case 2: { /* dict(**kw) */
        jdict *d = jv_dict_new(ar, a->nkw + 4);
        if (!d)
            return ja_oom(c);
        d->is_ns = fn == 1;
        for (int i = 0; i < a->npos; i++) {
            if (a->pos[i].k != JV_DICT)
                return jx_fail(c, "%s() takes keyword arguments or a mapping", GLOBALS[fn]);
            for (int k = 0; k < a->pos[i].d->n; k++)
                if (!jv_dict_set(ar, d, a->pos[i].d->keys[k]->s, a->pos[i].d->keys[k]->len,
                                 a->pos[i].d->vals[k]))
                    return ja_oom(c);
        }
        for (int i = 0; i < a->nkw; i++)
            if (!jv_dict_set(ar, d, a->kwnames[i], strlen(a->kwnames[i]), a->kw[i]))
                return ja_oom(c);
        *out = (jv){.k = JV_DICT, .d = d};
        return true;
    }
    case 3: { /* raise_exception(message): the template refuses the conversation */
        jbuf b = {0};
        if (a->npos > 0)
            jv_to_str(&b, a->pos[0]);
        bool r = jx_fail(c, "%s", b.p ? b.p : "raise_exception() called");
        free(b.p);
        return r;
    }
    case 4: { /* strftime_now(format): transformers' helper, local time */
        if (a->npos < 1 || a->pos[0].k != JV_STR)
            return jx_fail(c, "strftime_now() takes a format string");
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        char buf[256];
        size_t n = strftime(buf, sizeof(buf), a->pos[0].s->s, &tm);
        return ja_mkstr(c, buf, n, out);
    }
    default: return jx_fail(c, "internal: unknown global function");
    }
}
