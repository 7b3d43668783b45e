/* Jinja builtins the chat templates call: filters (jinja2's, with transformers' tojson), tests,
 * the str/dict methods templates use (Python's semantics: code-point indices, Unicode
 * whitespace), and the globals range, namespace, dict, raise_exception and strftime_now. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <utf8proc.h>

#include "common/jinja_internal.h"

static bool oom(jctx *c) { return jx_fail(c, "out of memory while rendering"); }

static bool is_int(jv v) { return v.k == JV_INT || v.k == JV_BOOL; }
static int64_t as_int(jv v) { return v.k == JV_INT ? v.i : v.b; }

static bool mkstr(jctx *c, const char *s, size_t n, jv *out)
{
    *out = jv_str(jx_arena(c), s, n);
    return out->k == JV_STR || oom(c);
}

static bool buf_done(jctx *c, jbuf *b, jv *out)
{
    bool ok = !b->failed && mkstr(c, b->p ? b->p : "", b->len, out);
    free(b->p);
    return ok || (b->failed && oom(c));
}

/* str(v) as a jstr (strings themselves are returned as they are). */
static bool to_str(jctx *c, jv v, jv *out)
{
    if (v.k == JV_STR) {
        *out = v;
        return true;
    }
    jbuf b = {0};
    jv_to_str(&b, v);
    return buf_done(c, &b, out);
}

static bool need_str(jctx *c, jv v, const char *what)
{
    return v.k == JV_STR || jx_fail(c, "%s: expected a string, got %s", what, jv_type_name(v));
}

static uint32_t utf8_next(const char *s, size_t n, size_t *i)
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

static void put_cp(jbuf *b, uint32_t cp)
{
    utf8proc_uint8_t t[4];
    utf8proc_ssize_t k = utf8proc_encode_char((utf8proc_int32_t)cp, t);
    jb_put(b, (const char *)t, (size_t)k);
}

static bool in_chars(uint32_t cp, const jstr *chars)
{
    size_t i = 0;
    while (i < chars->len)
        if (utf8_next(chars->s, chars->len, &i) == cp)
            return true;
    return false;
}

/* str.strip/lstrip/rstrip(chars) */
static bool do_strip(jctx *c, jv v, const jv *chars, bool left, bool right, jv *out)
{
    if (!need_str(c, v, "strip"))
        return false;
    if (chars && chars->k != JV_NONE && chars->k != JV_UNDEF && !need_str(c, *chars, "strip chars"))
        return false;
    const jstr *cs = (chars && chars->k == JV_STR) ? chars->s : NULL;
    const char *s = v.s->s;
    size_t n = v.s->len, b = 0, e = n;
    if (left)
        while (b < e) {
            size_t k = b;
            uint32_t cp = utf8_next(s, n, &k);
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
            uint32_t cp = utf8_next(s, n, &j);
            if (cs ? !in_chars(cp, cs) : !ja_is_space(cp))
                break;
            e = k;
        }
    return mkstr(c, s + b, e - b, out);
}

static bool do_case(jctx *c, jv v, int mode, jv *out) /* 0 lower, 1 upper, 2 capitalize, 3 title */
{
    jv s;
    if (!to_str(c, v, &s))
        return false;
    jbuf b = {0};
    size_t i = 0;
    bool word_start = true;
    while (i < s.s->len) {
        uint32_t cp = utf8_next(s.s->s, s.s->len, &i);
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
        put_cp(&b, r);
    }
    return buf_done(c, &b, out);
}

static bool do_replace(jctx *c, jv v, jv old, jv new_, const jv *count, jv *out)
{
    jv s;
    if (!to_str(c, v, &s) || !need_str(c, old, "replace") || !need_str(c, new_, "replace"))
        return false;
    int64_t left = (count && is_int(*count)) ? as_int(*count) : -1;
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
            utf8_next(p, n, &k);
            jb_put(&b, p + i, k - i);
            i = k;
        }
        if (i < n)
            jb_put(&b, p + i, n - i);
        return buf_done(c, &b, out);
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
    return buf_done(c, &b, out);
}

static bool list_of(jctx *c, jv v, jlist **out)
{
    ja_arena *a = jx_arena(c);
    if (v.k == JV_LIST) {
        *out = v.l;
        return true;
    }
    jlist *l = jv_list_new(a, 8);
    if (!l)
        return oom(c);
    *out = l;
    if (v.k == JV_UNDEF)
        return true;
    if (v.k == JV_DICT) {
        for (int i = 0; i < v.d->n; i++)
            if (!jv_list_push(a, l, (jv){.k = JV_STR, .s = v.d->keys[i]}))
                return oom(c);
        return true;
    }
    if (v.k == JV_STR) {
        size_t i = 0;
        while (i < v.s->len) {
            size_t k = i;
            utf8_next(v.s->s, v.s->len, &k);
            jv ch;
            if (!mkstr(c, v.s->s + i, k - i, &ch) || !jv_list_push(a, l, ch))
                return oom(c);
            i = k;
        }
        return true;
    }
    return jx_fail(c, "'%s' object is not iterable", jv_type_name(v));
}

static jv wrap_list(jlist *l) { return (jv){.k = JV_LIST, .l = l}; }

static bool do_items(jctx *c, jv v, jv *out)
{
    ja_arena *a = jx_arena(c);
    jlist *l = jv_list_new(a, v.k == JV_DICT ? v.d->n : 1);
    if (!l)
        return oom(c);
    if (v.k == JV_DICT) {
        for (int i = 0; i < v.d->n; i++) {
            jlist *t = jv_list_new(a, 2);
            if (!t)
                return oom(c);
            t->tuple = true;
            t->items[0] = (jv){.k = JV_STR, .s = v.d->keys[i]};
            t->items[1] = v.d->vals[i];
            t->n = 2;
            if (!jv_list_push(a, l, wrap_list(t)))
                return oom(c);
        }
    } else if (v.k != JV_UNDEF) {
        return jx_fail(c, "items: expected a mapping, got %s", jv_type_name(v));
    }
    *out = wrap_list(l);
    return true;
}

/* An attribute path "a.b" of v, as jinja2's make_attrgetter (dots walk, digits index lists). */
static jv get_attr_path(jv v, const jstr *path)
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

/* select/reject/selectattr/rejectattr */
static bool do_select(jctx *c, jv seq, const jargs *a, bool by_attr, bool keep, jv *out)
{
    jlist *in, *res;
    if (!list_of(c, seq, &in))
        return false;
    if (!(res = jv_list_new(jx_arena(c), in->n)))
        return oom(c);
    int first = 0;
    const jstr *attr = NULL;
    if (by_attr) {
        if (a->npos < 1 || a->pos[0].k != JV_STR)
            return jx_fail(c, "selectattr/rejectattr: expected an attribute name");
        attr = a->pos[0].s;
        first = 1;
    }
    const jstr *test = NULL;
    if (a->npos > first) {
        if (a->pos[first].k != JV_STR)
            return jx_fail(c, "select: the test name must be a string");
        test = a->pos[first].s;
    }
    jargs targs = {.pos = a->pos + first + 1, .npos = a->npos > first + 1 ? a->npos - first - 1 : 0};
    for (int i = 0; i < in->n; i++) {
        jv x = attr ? get_attr_path(in->items[i], attr) : in->items[i];
        bool r = false;
        if (test) {
            if (!jx_apply_test(c, test->s, test->len, x, &targs, &r))
                return false;
        } else {
            r = jv_truthy(x);
        }
        if (r == keep && !jv_list_push(jx_arena(c), res, in->items[i]))
            return oom(c);
    }
    *out = wrap_list(res);
    return true;
}

static bool do_map(jctx *c, jv seq, const jargs *a, jv *out)
{
    jlist *in, *res;
    if (!list_of(c, seq, &in))
        return false;
    if (!(res = jv_list_new(jx_arena(c), in->n)))
        return oom(c);
    const jv *attr = jx_arg(a, -1, "attribute");
    const jv *def = jx_arg(a, -1, "default");
    if (attr && attr->k != JV_STR)
        return jx_fail(c, "map: attribute must be a string");
    if (!attr && (a->npos < 1 || a->pos[0].k != JV_STR))
        return jx_fail(c, "map: expected a filter name or attribute=");
    jargs fargs = {.pos = a->pos + 1, .npos = a->npos > 1 ? a->npos - 1 : 0};
    for (int i = 0; i < in->n; i++) {
        jv x;
        if (attr) {
            x = get_attr_path(in->items[i], attr->s);
            if (x.k == JV_UNDEF && def)
                x = *def;
        } else if (!jx_apply_filter(c, a->pos[0].s->s, a->pos[0].s->len, in->items[i], &fargs, &x)) {
            return false;
        }
        if (!jv_list_push(jx_arena(c), res, x))
            return oom(c);
    }
    *out = wrap_list(res);
    return true;
}

static bool do_join(jctx *c, jv seq, const jargs *a, jv *out)
{
    jlist *in;
    if (!list_of(c, seq, &in))
        return false;
    const jv *sep = jx_arg(a, 0, "d");
    const jv *attr = jx_arg(a, 1, "attribute");
    jbuf b = {0};
    for (int i = 0; i < in->n; i++) {
        if (i && sep)
            jv_to_str(&b, *sep);
        jv_to_str(&b, (attr && attr->k == JV_STR) ? get_attr_path(in->items[i], attr->s)
                                                   : in->items[i]);
    }
    return buf_done(c, &b, out);
}

static int64_t length_of(jv v)
{
    switch (v.k) {
    case JV_STR: return (int64_t)ja_utf8_count(v.s->s, v.s->len);
    case JV_LIST: return v.l->n;
    case JV_DICT: return v.d->n;
    default: return 0;
    }
}

/* sort order of two items (by attribute when given); *bad when Python would raise */
static int sort_cmp(jv a, jv b, const jstr *attr, bool *bad)
{
    if (attr) {
        a = get_attr_path(a, attr);
        b = get_attr_path(b, attr);
    }
    int r;
    if (!jv_cmp(a, b, &r)) {
        *bad = true;
        return 0;
    }
    return r == 2 ? 0 : r;
}

static bool do_sort(jctx *c, jv seq, const jargs *a, jv *out)
{
    jlist *in, *res;
    if (!list_of(c, seq, &in))
        return false;
    if (!(res = jv_list_new(jx_arena(c), in->n)))
        return oom(c);
    memcpy(res->items, in->items, (size_t)in->n * sizeof(jv));
    res->n = in->n;
    const jv *rev = jx_arg(a, 0, "reverse");
    const jv *attr = jx_arg(a, 2, "attribute");
    const jstr *key = (attr && attr->k == JV_STR) ? attr->s : NULL;
    const bool r = rev && jv_truthy(*rev);
    bool bad = false;
    /* insertion sort: stable like Python's (reverse keeps equal items in order too), and the
     * lists chat templates sort are short */
    jv *p = res->items;
    for (int i = 1; i < res->n; i++) {
        jv k = p[i];
        int j = i - 1;
        while (j >= 0 && sort_cmp(p[j], k, key, &bad) * (r ? -1 : 1) > 0) {
            p[j + 1] = p[j];
            j--;
        }
        p[j + 1] = k;
    }
    if (bad)
        return jx_fail(c, "sort: items cannot be compared");
    *out = wrap_list(res);
    return true;
}

static bool do_tojson(jctx *c, jv v, const jargs *a, jv *out)
{
    const jv *ind = jx_arg(a, 0, "indent");
    int indent = (ind && is_int(*ind)) ? (int)as_int(*ind) : -1;
    if (indent > 64)
        indent = 64;
    jbuf b = {0};
    jv_to_json(&b, v, indent, 0);
    return buf_done(c, &b, out);
}

static bool do_indent(jctx *c, jv v, const jargs *a, jv *out)
{
    jv s;
    if (!to_str(c, v, &s))
        return false;
    const jv *w = jx_arg(a, 0, "width");
    const jv *first = jx_arg(a, 1, "first");
    const jv *blank = jx_arg(a, 2, "blank");
    jv pad;
    if (w && w->k == JV_STR) {
        pad = *w;
    } else {
        int64_t n = (w && is_int(*w)) ? as_int(*w) : 4;
        if (n < 0)
            n = 0;
        if (n > 256)
            n = 256;
        char sp[257];
        memset(sp, ' ', (size_t)n);
        if (!mkstr(c, sp, (size_t)n, &pad))
            return false;
    }
    jbuf b = {0};
    const char *p = s.s->s, *end = p + s.s->len;
    bool first_line = true;
    while (p <= end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        bool do_pad = first_line ? (first && jv_truthy(*first)) : (n > 0 || (blank && jv_truthy(*blank)));
        if (do_pad)
            jb_put(&b, pad.s->s, pad.s->len);
        jb_put(&b, p, n);
        if (!nl)
            break;
        jb_put(&b, "\n", 1);
        p = nl + 1;
        first_line = false;
    }
    return buf_done(c, &b, out);
}

static bool do_number(jctx *c, jv v, const jargs *a, bool want_float, jv *out)
{
    const jv *def = jx_arg(a, 0, "default");
    jv d = def ? *def : (want_float ? jv_float(0.0) : jv_int(0));
    (void)c;
    if (v.k == JV_INT || v.k == JV_BOOL)
        *out = want_float ? jv_float((double)as_int(v)) : jv_int(as_int(v));
    else if (v.k == JV_FLOAT)
        *out = want_float ? v : (isfinite(v.f) ? jv_int((int64_t)v.f) : d);
    else if (v.k == JV_STR) {
        char *e;
        if (want_float) {
            double x = strtod(v.s->s, &e);
            *out = (e != v.s->s && *e == '\0') ? jv_float(x) : d;
        } else {
            long long x = strtoll(v.s->s, &e, 10);
            *out = (e != v.s->s && *e == '\0') ? jv_int(x) : d;
        }
    } else
        *out = d;
    return true;
}

#define FILTERS(X)                                                                               \
    X(abs) X(capitalize) X(count) X(d) X(default) X(first) X(float) X(indent) X(int) X(items)     \
    X(join) X(last) X(length) X(list) X(lower) X(map) X(max) X(min) X(reject) X(rejectattr)      \
    X(replace) X(reverse) X(round) X(safe) X(select) X(selectattr) X(sort) X(string) X(sum)      \
    X(title) X(tojson) X(trim) X(unique) X(upper) X(wordcount)

static const char *const FILTER_NAMES[] = {
#define NAME(n) #n,
    FILTERS(NAME)
#undef NAME
};

static int find_name(const char *const *names, size_t n_names, const char *s, size_t len)
{
    for (size_t i = 0; i < n_names; i++)
        if (strlen(names[i]) == len && memcmp(names[i], s, len) == 0)
            return (int)i;
    return -1;
}

bool ja_filter_known(const char *name, size_t len)
{
    return find_name(FILTER_NAMES, sizeof(FILTER_NAMES) / sizeof(FILTER_NAMES[0]), name, len) >= 0;
}

static bool is_filter(const char *name, size_t len, const char *want)
{
    return strlen(want) == len && memcmp(name, want, len) == 0;
}

static bool min_max(jctx *c, jv v, bool want_max, jv *out)
{
    jlist *l;
    if (!list_of(c, v, &l))
        return false;
    *out = jv_undef();
    for (int i = 0; i < l->n; i++) {
        int r;
        if (i == 0) {
            *out = l->items[0];
            continue;
        }
        if (!jv_cmp(l->items[i], *out, &r))
            return jx_fail(c, "min/max: items cannot be compared");
        if (r != 2 && (want_max ? r > 0 : r < 0))
            *out = l->items[i];
    }
    return true;
}

bool ja_call_filter(jctx *c, const char *name, size_t len, jv v, const jargs *a, jv *out)
{
    ja_arena *ar = jx_arena(c);
#define IS(n) is_filter(name, len, n)
    if (IS("default") || IS("d")) {
        const jv *def = jx_arg(a, 0, "default_value");
        const jv *boolean = jx_arg(a, 1, "boolean");
        bool use = v.k == JV_UNDEF || (boolean && jv_truthy(*boolean) && !jv_truthy(v));
        if (use)
            return def ? (*out = *def, true) : mkstr(c, "", 0, out);
        *out = v;
        return true;
    }
    if (IS("trim")) {
        jv s;
        return to_str(c, v, &s) && do_strip(c, s, jx_arg(a, 0, "chars"), true, true, out);
    }
    if (IS("length") || IS("count")) {
        *out = jv_int(length_of(v));
        return true;
    }
    if (IS("tojson"))
        return do_tojson(c, v, a, out);
    if (IS("upper"))
        return do_case(c, v, 1, out);
    if (IS("lower"))
        return do_case(c, v, 0, out);
    if (IS("capitalize"))
        return do_case(c, v, 2, out);
    if (IS("title"))
        return do_case(c, v, 3, out);
    if (IS("replace")) {
        if (a->npos < 2)
            return jx_fail(c, "replace: expected (old, new[, count])");
        return do_replace(c, v, a->pos[0], a->pos[1], jx_arg(a, 2, "count"), out);
    }
    if (IS("items"))
        return do_items(c, v, out);
    if (IS("select") || IS("reject"))
        return do_select(c, v, a, false, IS("select"), out);
    if (IS("selectattr") || IS("rejectattr"))
        return do_select(c, v, a, true, IS("selectattr"), out);
    if (IS("map"))
        return do_map(c, v, a, out);
    if (IS("join"))
        return do_join(c, v, a, out);
    if (IS("string"))
        return to_str(c, v, out);
    if (IS("safe")) {
        *out = v;
        return true;
    }
    if (IS("int") || IS("float"))
        return do_number(c, v, a, IS("float"), out);
    if (IS("abs")) {
        if (v.k == JV_FLOAT)
            *out = jv_float(fabs(v.f));
        else if (is_int(v))
            *out = jv_int(as_int(v) < 0 ? -as_int(v) : as_int(v));
        else
            return jx_fail(c, "abs: bad operand type '%s'", jv_type_name(v));
        return true;
    }
    if (IS("round")) {
        const jv *prec = jx_arg(a, 0, "precision");
        double x = v.k == JV_FLOAT ? v.f : is_int(v) ? (double)as_int(v) : NAN;
        if (isnan(x) && v.k != JV_FLOAT)
            return jx_fail(c, "round: expected a number");
        double m = pow(10.0, (prec && is_int(*prec)) ? (double)as_int(*prec) : 0.0);
        *out = jv_float(round(x * m) / m);
        return true;
    }
    if (IS("indent"))
        return do_indent(c, v, a, out);
    if (IS("wordcount")) {
        jv s;
        if (!to_str(c, v, &s))
            return false;
        int64_t words = 0;
        bool in_word = false;
        for (size_t i = 0; i < s.s->len; i++) {
            unsigned char ch = (unsigned char)s.s->s[i];
            bool w = ch == '_' || ch >= 0x80 || (ch >= '0' && ch <= '9') ||
                     ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'z');
            if (w && !in_word)
                words++;
            in_word = w;
        }
        *out = jv_int(words);
        return true;
    }
    if (IS("sort"))
        return do_sort(c, v, a, out);
    if (IS("max") || IS("min"))
        return min_max(c, v, IS("max"), out);
    jlist *l;
    if (!list_of(c, v, &l))
        return false;
    if (IS("list")) {
        jlist *r = jv_list_new(ar, l->n);
        if (!r)
            return oom(c);
        memcpy(r->items, l->items, (size_t)l->n * sizeof(jv));
        r->n = l->n;
        *out = wrap_list(r);
        return true;
    }
    if (IS("first") || IS("last")) {
        *out = l->n ? l->items[IS("first") ? 0 : l->n - 1] : jv_undef();
        return true;
    }
    if (IS("reverse")) {
        if (v.k == JV_STR) {
            jbuf b = {0};
            for (int i = l->n - 1; i >= 0; i--)
                jv_to_str(&b, l->items[i]);
            return buf_done(c, &b, out);
        }
        jlist *r = jv_list_new(ar, l->n);
        if (!r)
            return oom(c);
        for (int i = 0; i < l->n; i++)
            r->items[i] = l->items[l->n - 1 - i];
        r->n = l->n;
        *out = wrap_list(r);
        return true;
    }
    if (IS("unique")) {
        jlist *r = jv_list_new(ar, l->n);
        if (!r)
            return oom(c);
        for (int i = 0; i < l->n; i++) {
            bool seen = false;
            for (int k = 0; k < r->n && !seen; k++)
                seen = jv_eq(r->items[k], l->items[i]);
            if (!seen && !jv_list_push(ar, r, l->items[i]))
                return oom(c);
        }
        *out = wrap_list(r);
        return true;
    }
    if (IS("sum")) {
        jv acc = jv_int(0);
        for (int i = 0; i < l->n; i++) {
            jv x = l->items[i];
            if (acc.k == JV_INT && is_int(x) && !__builtin_add_overflow(acc.i, as_int(x), &acc.i))
                continue;
            double d = x.k == JV_FLOAT ? x.f : is_int(x) ? (double)as_int(x) : NAN;
            if (isnan(d) && x.k != JV_FLOAT)
                return jx_fail(c, "sum: unsupported item type '%s'", jv_type_name(x));
            acc = jv_float((acc.k == JV_FLOAT ? acc.f : (double)acc.i) + d);
        }
        *out = acc;
        return true;
    }
#undef IS
    return jx_fail(c, "filter '%.*s' is not implemented", (int)len, name);
}

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
    return find_name(TEST_NAMES, sizeof(TEST_NAMES) / sizeof(TEST_NAMES[0]), name, len) >= 0;
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
        uint32_t cp = utf8_next(v.s->s, v.s->len, &i);
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
#define IS(n) is_filter(name, len, n)
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
        int64_t m = IS("divisibleby") ? (arg && is_int(*arg) ? as_int(*arg) : 0) : 2;
        if (!is_int(v) || m == 0)
            return jx_fail(c, "test '%.*s' needs integers", (int)len, name);
        int64_t r = as_int(v) % m;
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
    int64_t maxsplit = (maxv && is_int(*maxv)) ? as_int(*maxv) : -1;
    ja_arena *ar = jx_arena(c);
    jlist *l = jv_list_new(ar, 8);
    if (!l)
        return oom(c);
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
                if (!ja_is_space(utf8_next(p, n, &j)))
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
                    if (!ja_is_space(utf8_next(p, n, &j)))
                        break;
                    e = b;
                }
            } else {
                while (e < n) {
                    size_t j = e;
                    if (ja_is_space(utf8_next(p, n, &j)))
                        break;
                    e = j;
                }
            }
            if (!mkstr(c, p + k, e - k, &piece) || !jv_list_push(ar, l, piece))
                return oom(c);
            if (maxsplit > 0)
                maxsplit--;
            i = e;
            if (maxsplit == 0 && e == n)
                break;
        }
        *out = wrap_list(l);
        return true;
    }
    if (!need_str(c, *sep, "split separator"))
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
            if (!mkstr(c, p + i, e - i, &piece) || !jv_list_push(ar, l, piece))
                return oom(c);
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
            if (!mkstr(c, p + b, end - b, &piece) || !jv_list_push(ar, l, piece))
                return oom(c);
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
    *out = wrap_list(l);
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
        if (!need_str(c, x, suffix ? "endswith" : "startswith"))
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
#define IS(n) is_filter(name, len, n)
    const jv *a0 = a->npos > 0 ? &a->pos[0] : NULL;
    if (obj.k == JV_STR) {
        if (IS("strip") || IS("lstrip") || IS("rstrip"))
            return do_strip(c, obj, a0, !IS("rstrip"), !IS("lstrip"), out);
        if (IS("split") || IS("rsplit"))
            return do_split(c, obj, a, IS("rsplit"), out);
        if (IS("startswith") || IS("endswith")) {
            bool r = false;
            if (!affix(c, obj, a0, IS("endswith"), &r))
                return false;
            *out = jv_bool(r);
            return true;
        }
        if (IS("upper")) return do_case(c, obj, 1, out);
        if (IS("lower")) return do_case(c, obj, 0, out);
        if (IS("capitalize")) return do_case(c, obj, 2, out);
        if (IS("title")) return do_case(c, obj, 3, out);
        if (IS("replace")) {
            if (a->npos < 2)
                return jx_fail(c, "replace() takes at least 2 arguments");
            return do_replace(c, obj, a->pos[0], a->pos[1], a->npos > 2 ? &a->pos[2] : NULL, out);
        }
        if (IS("find") || IS("rfind") || IS("count")) {
            if (!a0 || !need_str(c, *a0, "find/count"))
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
            if (!a0 || !list_of(c, *a0, &l))
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
            return buf_done(c, &b, out);
        }
        if (IS("isdigit") || IS("isspace") || IS("isalpha")) {
            bool r = obj.s->len > 0;
            size_t i = 0;
            while (i < obj.s->len && r) {
                uint32_t cp = utf8_next(obj.s->s, obj.s->len, &i);
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
            return do_items(c, obj, out);
        if (IS("keys") || IS("values")) {
            jlist *l = jv_list_new(jx_arena(c), obj.d->n);
            if (!l)
                return oom(c);
            for (int i = 0; i < obj.d->n; i++)
                l->items[i] = IS("keys") ? (jv){.k = JV_STR, .s = obj.d->keys[i]} : obj.d->vals[i];
            l->n = obj.d->n;
            *out = wrap_list(l);
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
    return find_name(GLOBALS, sizeof(GLOBALS) / sizeof(GLOBALS[0]), name, len);
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
            if (!is_int(a->pos[i]))
                return jx_fail(c, "range: '%s' object cannot be interpreted as an integer",
                               jv_type_name(a->pos[i]));
        if (a->npos == 1)
            v[1] = as_int(a->pos[0]);
        else
            for (int i = 0; i < a->npos; i++)
                v[i] = as_int(a->pos[i]);
        if (v[2] == 0)
            return jx_fail(c, "range() arg 3 must not be zero");
        /* jinja2's sandbox refuses ranges over 100000 items (MAX_RANGE) */
        double count = ceil(((double)v[1] - (double)v[0]) / (double)v[2]);
        if (count > 100000)
            return jx_fail(c, "range too big (jinja2's sandbox allows 100000 items)");
        jlist *l = jv_list_new(ar, count > 0 ? (int)count : 1);
        if (!l)
            return oom(c);
        for (int64_t i = v[0]; v[2] > 0 ? i < v[1] : i > v[1]; i += v[2])
            if (!jv_list_push(ar, l, jv_int(i)))
                return oom(c);
        *out = wrap_list(l);
        return true;
    }
    case 1:   /* namespace(**kw) or namespace(dict) */
    case 2: { /* dict(**kw) */
        jdict *d = jv_dict_new(ar, a->nkw + 4);
        if (!d)
            return oom(c);
        d->is_ns = fn == 1;
        for (int i = 0; i < a->npos; i++) {
            if (a->pos[i].k != JV_DICT)
                return jx_fail(c, "%s() takes keyword arguments or a mapping", GLOBALS[fn]);
            for (int k = 0; k < a->pos[i].d->n; k++)
                if (!jv_dict_set(ar, d, a->pos[i].d->keys[k]->s, a->pos[i].d->keys[k]->len,
                                 a->pos[i].d->vals[k]))
                    return oom(c);
        }
        for (int i = 0; i < a->nkw; i++)
            if (!jv_dict_set(ar, d, a->kwnames[i], strlen(a->kwnames[i]), a->kw[i]))
                return oom(c);
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
        return mkstr(c, buf, n, out);
    }
    default: return jx_fail(c, "internal: unknown global function");
    }
}
