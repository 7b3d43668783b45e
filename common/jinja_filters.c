/* Jinja filters the chat templates call (jinja2's, with transformers' tojson: non-ASCII kept,
 * keys in order, optional indent). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <utf8proc.h>

#include "common/jinja_internal.h"

/* select/reject/selectattr/rejectattr */
static bool do_select(jctx *c, jv seq, const jargs *a, bool by_attr, bool keep, jv *out)
{
    jlist *in, *res;
    if (!ja_list_of(c, seq, &in))
        return false;
    if (!(res = jv_list_new(jx_arena(c), in->n)))
        return ja_oom(c);
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
        jv x = attr ? ja_attr_path(in->items[i], attr) : in->items[i];
        bool r = false;
        if (test) {
            if (!jx_apply_test(c, test->s, test->len, x, &targs, &r))
                return false;
        } else {
            r = jv_truthy(x);
        }
        if (r == keep && !jv_list_push(jx_arena(c), res, in->items[i]))
            return ja_oom(c);
    }
    *out = ja_wrap_list(res);
    return true;
}

static bool do_map(jctx *c, jv seq, const jargs *a, jv *out)
{
    jlist *in, *res;
    if (!ja_list_of(c, seq, &in))
        return false;
    if (!(res = jv_list_new(jx_arena(c), in->n)))
        return ja_oom(c);
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
            x = ja_attr_path(in->items[i], attr->s);
            if (x.k == JV_UNDEF && def)
                x = *def;
        } else if (!jx_apply_filter(c, a->pos[0].s->s, a->pos[0].s->len, in->items[i], &fargs, &x)) {
            return false;
        }
        if (!jv_list_push(jx_arena(c), res, x))
            return ja_oom(c);
    }
    *out = ja_wrap_list(res);
    return true;
}

static bool do_join(jctx *c, jv seq, const jargs *a, jv *out)
{
    jlist *in;
    if (!ja_list_of(c, seq, &in))
        return false;
    const jv *sep = jx_arg(a, 0, "d");
    const jv *attr = jx_arg(a, 1, "attribute");
    jbuf b = {0};
    for (int i = 0; i < in->n; i++) {
        if (i && sep)
            jv_to_str(&b, *sep);
        jv_to_str(&b, (attr && attr->k == JV_STR) ? ja_attr_path(in->items[i], attr->s)
                                                   : in->items[i]);
    }
    return ja_buf_done(c, &b, out);
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
        a = ja_attr_path(a, attr);
        b = ja_attr_path(b, attr);
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
    if (!ja_list_of(c, seq, &in))
        return false;
    if (!(res = jv_list_new(jx_arena(c), in->n)))
        return ja_oom(c);
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
    *out = ja_wrap_list(res);
    return true;
}

static bool do_tojson(jctx *c, jv v, const jargs *a, jv *out)
{
    const jv *ind = jx_arg(a, 0, "indent");
    int indent = (ind && ja_is_int(*ind)) ? (int)ja_as_int(*ind) : -1;
    if (indent > 64)
        indent = 64;
    jbuf b = {0};
    jv_to_json(&b, v, indent, 0);
    return ja_buf_done(c, &b, out);
}

static bool do_indent(jctx *c, jv v, const jargs *a, jv *out)
{
    jv s;
    if (!ja_to_str(c, v, &s))
        return false;
    const jv *w = jx_arg(a, 0, "width");
    const jv *first = jx_arg(a, 1, "first");
    const jv *blank = jx_arg(a, 2, "blank");
    jv pad;
    if (w && w->k == JV_STR) {
        pad = *w;
    } else {
        int64_t n = (w && ja_is_int(*w)) ? ja_as_int(*w) : 4;
        if (n < 0)
            n = 0;
        if (n > 256)
            n = 256;
        char sp[257];
        memset(sp, ' ', (size_t)n);
        if (!ja_mkstr(c, sp, (size_t)n, &pad))
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
    return ja_buf_done(c, &b, out);
}

static bool do_number(jctx *c, jv v, const jargs *a, bool want_float, jv *out)
{
    const jv *def = jx_arg(a, 0, "default");
    jv d = def ? *def : (want_float ? jv_float(0.0) : jv_int(0));
    (void)c;
    if (v.k == JV_INT || v.k == JV_BOOL)
        *out = want_float ? jv_float((double)ja_as_int(v)) : jv_int(ja_as_int(v));
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


bool ja_filter_known(const char *name, size_t len)
{
    return ja_find_name(FILTER_NAMES, sizeof(FILTER_NAMES) / sizeof(FILTER_NAMES[0]), name, len) >= 0;
}


static bool min_max(jctx *c, jv v, bool want_max, jv *out)
{
    jlist *l;
    if (!ja_list_of(c, v, &l))
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
#define IS(n) ja_name_is(name, len, n)
    if (IS("default") || IS("d")) {
        const jv *def = jx_arg(a, 0, "default_value");
        const jv *boolean = jx_arg(a, 1, "boolean");
        bool use = v.k == JV_UNDEF || (boolean && jv_truthy(*boolean) && !jv_truthy(v));
        if (use)
            return def ? (*out = *def, true) : ja_mkstr(c, "", 0, out);
        *out = v;
        return true;
    }
    if (IS("trim")) {
        jv s;
        return ja_to_str(c, v, &s) && ja_strip(c, s, jx_arg(a, 0, "chars"), true, true, out);
    }
    if (IS("length") || IS("count")) {
        *out = jv_int(length_of(v));
        return true;
    }
    if (IS("tojson"))
        return do_tojson(c, v, a, out);
    if (IS("upper"))
        return ja_case(c, v, 1, out);
    if (IS("lower"))
        return ja_case(c, v, 0, out);
    if (IS("capitalize"))
        return ja_case(c, v, 2, out);
    if (IS("title"))
        return ja_case(c, v, 3, out);
    if (IS("replace")) {
        if (a->npos < 2)
            return jx_fail(c, "replace: expected (old, new[, count])");
        return ja_replace(c, v, a->pos[0], a->pos[1], jx_arg(a, 2, "count"), out);
    }
    if (IS("items"))
        return ja_items(c, v, out);
    if (IS("select") || IS("reject"))
        return do_select(c, v, a, false, IS("select"), out);
    if (IS("selectattr") || IS("rejectattr"))
        return do_select(c, v, a, true, IS("selectattr"), out);
    if (IS("map"))
        return do_map(c, v, a, out);
    if (IS("join"))
        return do_join(c, v, a, out);
    if (IS("string"))
        return ja_to_str(c, v, out);
    if (IS("safe")) {
        *out = v;
        return true;
    }
    if (IS("int") || IS("float"))
        return do_number(c, v, a, IS("float"), out);
    if (IS("abs")) {
        if (v.k == JV_FLOAT)
            *out = jv_float(fabs(v.f));
        else if (ja_is_int(v))
            *out = jv_int(ja_as_int(v) < 0 ? -ja_as_int(v) : ja_as_int(v));
        else
            return jx_fail(c, "abs: bad operand type '%s'", jv_type_name(v));
        return true;
    }
    if (IS("round")) {
        const jv *prec = jx_arg(a, 0, "precision");
        double x = v.k == JV_FLOAT ? v.f : ja_is_int(v) ? (double)ja_as_int(v) : NAN;
        if (isnan(x) && v.k != JV_FLOAT)
            return jx_fail(c, "round: expected a number");
        double m = pow(10.0, (prec && ja_is_int(*prec)) ? (double)ja_as_int(*prec) : 0.0);
        *out = jv_float(round(x * m) / m);
        return true;
    }
    if (IS("indent"))
        return do_indent(c, v, a, out);
    if (IS("wordcount")) {
        jv s;
        if (!ja_to_str(c, v, &s))
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
    if (!ja_list_of(c, v, &l))
        return false;
    if (IS("list")) {
        jlist *r = jv_list_new(ar, l->n);
        if (!r)
            return ja_oom(c);
        memcpy(r->items, l->items, (size_t)l->n * sizeof(jv));
        r->n = l->n;
        *out = ja_wrap_list(r);
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
            return ja_buf_done(c, &b, out);
        }
        jlist *r = jv_list_new(ar, l->n);
        if (!r)
            return ja_oom(c);
        for (int i = 0; i < l->n; i++)
            r->items[i] = l->items[l->n - 1 - i];
        r->n = l->n;
        *out = ja_wrap_list(r);
        return true;
    }
    if (IS("unique")) {
        jlist *r = jv_list_new(ar, l->n);
        if (!r)
            return ja_oom(c);
        for (int i = 0; i < l->n; i++) {
            bool seen = false;
            for (int k = 0; k < r->n && !seen; k++)
                seen = jv_eq(r->items[k], l->items[i]);
            if (!seen && !jv_list_push(ar, r, l->items[i]))
                return ja_oom(c);
        }
        *out = ja_wrap_list(r);
        return true;
    }
    if (IS("sum")) {
        jv acc = jv_int(0);
        for (int i = 0; i < l->n; i++) {
            jv x = l->items[i];
            if (acc.k == JV_INT && ja_is_int(x) && !__builtin_add_overflow(acc.i, ja_as_int(x), &acc.i))
                continue;
            double d = x.k == JV_FLOAT ? x.f : ja_is_int(x) ? (double)ja_as_int(x) : NAN;
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
