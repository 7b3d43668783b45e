/* Jinja values: the arena they live in, their constructors, and Python's semantics for them
 * (truthiness, str(), repr(), json.dumps, ==, ordering), which the output must match byte for
 * byte. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "common/jinja_internal.h"

/* ---------------------------------------------------------------------------------------------
 * Arena */

struct ja_block {
    ja_block *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

void *ja_alloc(ja_arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (n == 0)
        n = 16;
    if (a->limit && (a->used_total + n > a->limit || n > a->limit))
        return NULL;
    ja_block *b = a->head;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        b = malloc(sizeof(*b) + cap);
        if (!b)
            return NULL;
        b->used = 0;
        b->cap = cap;
        b->next = a->head;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    a->used_total += n;
    memset(p, 0, n);
    return p;
}

void ja_free_all(ja_arena *a)
{
    ja_block *b = a->head;
    while (b) {
        ja_block *nx = b->next;
        free(b);
        b = nx;
    }
    a->head = NULL;
    a->used_total = 0;
}

/* ---------------------------------------------------------------------------------------------
 * Output buffer */

void jb_put(jbuf *b, const char *s, size_t n)
{
    if (b->failed || n == 0)
        return;
    if (b->limit && b->len + n > b->limit) {
        b->failed = true;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

/* ---------------------------------------------------------------------------------------------
 * Constructors */

jv jv_undef(void) { return (jv){.k = JV_UNDEF}; }
jv jv_none(void) { return (jv){.k = JV_NONE}; }
jv jv_bool(bool b) { return (jv){.k = JV_BOOL, .b = b}; }
jv jv_int(int64_t i) { return (jv){.k = JV_INT, .i = i}; }
jv jv_float(double f) { return (jv){.k = JV_FLOAT, .f = f}; }

jv jv_str(ja_arena *a, const char *s, size_t n)
{
    jstr *p = ja_alloc(a, sizeof(jstr) + n + 1);
    if (!p)
        return jv_undef();
    p->len = n;
    if (n)
        memcpy(p->s, s, n);
    p->s[n] = '\0';
    return (jv){.k = JV_STR, .s = p};
}

jlist *jv_list_new(ja_arena *a, int cap)
{
    jlist *l = ja_alloc(a, sizeof(*l));
    if (!l)
        return NULL;
    l->cap = cap > 0 ? cap : 4;
    l->items = ja_alloc(a, (size_t)l->cap * sizeof(jv));
    return l->items ? l : NULL;
}

bool jv_list_push(ja_arena *a, jlist *l, jv v)
{
    if (l->n == l->cap) {
        jv *it = ja_alloc(a, (size_t)l->cap * 2 * sizeof(jv));
        if (!it)
            return false;
        memcpy(it, l->items, (size_t)l->n * sizeof(jv));
        l->items = it;
        l->cap *= 2;
    }
    l->items[l->n++] = v;
    return true;
}

jdict *jv_dict_new(ja_arena *a, int cap)
{
    jdict *d = ja_alloc(a, sizeof(*d));
    if (!d)
        return NULL;
    d->cap = cap > 0 ? cap : 4;
    d->keys = ja_alloc(a, (size_t)d->cap * sizeof(jstr *));
    d->vals = ja_alloc(a, (size_t)d->cap * sizeof(jv));
    return d->keys && d->vals ? d : NULL;
}

jv *jv_dict_get(const jdict *d, const char *k, size_t klen)
{
    for (int i = 0; i < d->n; i++)
        if (d->keys[i]->len == klen && memcmp(d->keys[i]->s, k, klen) == 0)
            return &d->vals[i];
    return NULL;
}

bool jv_dict_set(ja_arena *a, jdict *d, const char *k, size_t klen, jv v)
{
    jv *old = jv_dict_get(d, k, klen);
    if (old) {
        *old = v;
        return true;
    }
    if (d->n == d->cap) {
        jstr **keys = ja_alloc(a, (size_t)d->cap * 2 * sizeof(jstr *));
        jv *vals = ja_alloc(a, (size_t)d->cap * 2 * sizeof(jv));
        if (!keys || !vals)
            return false;
        memcpy(keys, d->keys, (size_t)d->n * sizeof(jstr *));
        memcpy(vals, d->vals, (size_t)d->n * sizeof(jv));
        d->keys = keys;
        d->vals = vals;
        d->cap *= 2;
    }
    jv ks = jv_str(a, k, klen);
    if (ks.k != JV_STR)
        return false;
    d->keys[d->n] = ks.s;
    d->vals[d->n++] = v;
    return true;
}

jv jv_from_json(ja_arena *a, const void *p)
{
    const cJSON *j = p;
    if (!j)
        return jv_undef();
    if (cJSON_IsNull(j))
        return jv_none();
    if (cJSON_IsBool(j))
        return jv_bool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        /* cJSON keeps no int/float distinction: integral values within 2^53 are ints */
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            return jv_int((int64_t)d);
        return jv_float(d);
    }
    if (cJSON_IsString(j))
        return jv_str(a, j->valuestring, strlen(j->valuestring));
    if (cJSON_IsArray(j)) {
        jlist *l = jv_list_new(a, cJSON_GetArraySize(j));
        if (!l)
            return jv_undef();
        for (const cJSON *c = j->child; c; c = c->next)
            if (!jv_list_push(a, l, jv_from_json(a, c)))
                return jv_undef();
        return (jv){.k = JV_LIST, .l = l};
    }
    if (cJSON_IsObject(j)) {
        jdict *d = jv_dict_new(a, cJSON_GetArraySize(j));
        if (!d)
            return jv_undef();
        for (const cJSON *c = j->child; c; c = c->next)
            if (!jv_dict_set(a, d, c->string, strlen(c->string), jv_from_json(a, c)))
                return jv_undef();
        return (jv){.k = JV_DICT, .d = d};
    }
    return jv_undef();
}

/* ---------------------------------------------------------------------------------------------
 * Python semantics */

bool jv_truthy(jv v)
{
    switch (v.k) {
    case JV_UNDEF:
    case JV_NONE: return false;
    case JV_BOOL: return v.b;
    case JV_INT: return v.i != 0;
    case JV_FLOAT: return v.f != 0.0;
    case JV_STR: return v.s->len > 0;
    case JV_LIST: return v.l->n > 0;
    case JV_DICT: return v.d->is_ns || v.d->n > 0;
    default: return true;
    }
}

const char *jv_type_name(jv v)
{
    static const char *const names[] = {"Undefined", "NoneType", "bool", "int", "float",
                                        "str", "list", "dict", "Macro", "function"};
    if (v.k == JV_LIST && v.l->tuple)
        return "tuple";
    if (v.k == JV_DICT && v.d->is_ns)
        return "Namespace";
    return names[v.k];
}

/* repr(float): the shortest digits that read back the same, in Python's layout (exponent from
 * 1e16 and below 1e-4, "1e+16", "1e-05", "1.0"). */
static void put_float(jbuf *b, double f)
{
    if (isnan(f)) {
        jb_puts(b, "nan");
        return;
    }
    if (isinf(f)) {
        jb_puts(b, f < 0 ? "-inf" : "inf");
        return;
    }
    char e[64];
    for (int p = 0; p < 17; p++) {
        snprintf(e, sizeof(e), "%.*e", p, f);
        if (strtod(e, NULL) == f)
            break;
    }
    /* e = [-]D[.DDD]e[+-]XX */
    char digits[32];
    int nd = 0;
    const char *q = e;
    bool neg = *q == '-';
    if (neg)
        q++;
    for (; *q && *q != 'e'; q++)
        if (*q != '.')
            digits[nd++] = *q;
    int exp = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    char out[64];
    int o = 0;
    if (neg)
        out[o++] = '-';
    if (exp >= 16 || exp < -4) {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++)
                out[o++] = digits[i];
        }
        o += snprintf(out + o, sizeof(out) - (size_t)o, "e%c%02d", exp < 0 ? '-' : '+',
                      exp < 0 ? -exp : exp);
    } else if (exp < 0) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = 0; i < -exp - 1; i++)
            out[o++] = '0';
        for (int i = 0; i < nd; i++)
            out[o++] = digits[i];
    } else {
        for (int i = 0; i <= exp; i++)
            out[o++] = i < nd ? digits[i] : '0';
        out[o++] = '.';
        if (nd > exp + 1)
            for (int i = exp + 1; i < nd; i++)
                out[o++] = digits[i];
        else
            out[o++] = '0';
    }
    jb_put(b, out, (size_t)o);
}

static void put_int(jbuf *b, int64_t i)
{
    char t[32];
    int n = snprintf(t, sizeof(t), "%lld", (long long)i);
    jb_put(b, t, (size_t)n);
}

/* Python's repr of a str: single quotes unless the text has ' and no ", escapes for control
 * characters, backslash and the quote; printable non-ASCII kept. */
static void put_str_repr(jbuf *b, const jstr *s)
{
    bool has_sq = memchr(s->s, '\'', s->len) != NULL, has_dq = memchr(s->s, '"', s->len) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    jb_put(b, &q, 1);
    size_t run = 0;
    for (size_t i = 0; i < s->len; i++) {
        unsigned char c = (unsigned char)s->s[i];
        const char *esc = NULL;
        char tmp[8];
        if (c == '\\')
            esc = "\\\\";
        else if (c == (unsigned char)q)
            esc = q == '\'' ? "\\'" : "\\\"";
        else if (c == '\n')
            esc = "\\n";
        else if (c == '\r')
            esc = "\\r";
        else if (c == '\t')
            esc = "\\t";
        else if (c < 0x20 || c == 0x7f) {
            snprintf(tmp, sizeof(tmp), "\\x%02x", c);
            esc = tmp;
        }
        if (esc) {
            jb_put(b, s->s + i - run, run);
            run = 0;
            jb_puts(b, esc);
        } else {
            run++;
        }
    }
    jb_put(b, s->s + s->len - run, run);
    jb_put(b, &q, 1);
}

void jv_repr(jbuf *b, jv v)
{
    switch (v.k) {
    case JV_STR: put_str_repr(b, v.s); return;
    case JV_LIST: {
        jb_puts(b, v.l->tuple ? "(" : "[");
        for (int i = 0; i < v.l->n; i++) {
            if (i)
                jb_puts(b, ", ");
            jv_repr(b, v.l->items[i]);
        }
        if (v.l->tuple && v.l->n == 1)
            jb_puts(b, ",");
        jb_puts(b, v.l->tuple ? ")" : "]");
        return;
    }
    case JV_DICT:
        if (v.d->is_ns) {
            jb_puts(b, "<Namespace ");
        } else {
            jb_puts(b, "{");
        }
        for (int i = 0; i < v.d->n; i++) {
            if (i)
                jb_puts(b, ", ");
            jv k = {.k = JV_STR, .s = v.d->keys[i]};
            jv_repr(b, k);
            jb_puts(b, ": ");
            jv_repr(b, v.d->vals[i]);
        }
        jb_puts(b, v.d->is_ns ? ">" : "}");
        return;
    default: jv_to_str(b, v);
    }
}

void jv_to_str(jbuf *b, jv v)
{
    switch (v.k) {
    case JV_UNDEF: return;
    case JV_NONE: jb_puts(b, "None"); return;
    case JV_BOOL: jb_puts(b, v.b ? "True" : "False"); return;
    case JV_INT: put_int(b, v.i); return;
    case JV_FLOAT: put_float(b, v.f); return;
    case JV_STR: jb_put(b, v.s->s, v.s->len); return;
    case JV_MACRO: jb_puts(b, "<Macro>"); return;
    case JV_FUNC: jb_puts(b, "<function>"); return;
    default: jv_repr(b, v);
    }
}

static void json_str(jbuf *b, const char *s, size_t n)
{
    jb_puts(b, "\"");
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) {
                snprintf(tmp, sizeof(tmp), "\\u%04x", c);
                esc = tmp;
            }
        }
        if (esc) {
            jb_put(b, s + i - run, run);
            run = 0;
            jb_puts(b, esc);
        } else {
            run++;
        }
    }
    jb_put(b, s + n - run, run);
    jb_puts(b, "\"");
}

static void json_nl(jbuf *b, int indent, int depth)
{
    jb_puts(b, "\n");
    for (int i = 0; i < indent * depth; i++)
        jb_puts(b, " ");
}

void jv_to_json(jbuf *b, jv v, int indent, int depth)
{
    const char *item_sep = indent >= 0 ? "," : ", ";
    switch (v.k) {
    case JV_NONE:
    case JV_UNDEF: jb_puts(b, "null"); return;
    case JV_BOOL: jb_puts(b, v.b ? "true" : "false"); return;
    case JV_INT: put_int(b, v.i); return;
    case JV_FLOAT:
        if (isnan(v.f))
            jb_puts(b, "NaN");
        else if (isinf(v.f))
            jb_puts(b, v.f < 0 ? "-Infinity" : "Infinity");
        else
            put_float(b, v.f);
        return;
    case JV_STR: json_str(b, v.s->s, v.s->len); return;
    case JV_LIST:
        if (v.l->n == 0) {
            jb_puts(b, "[]");
            return;
        }
        jb_puts(b, "[");
        for (int i = 0; i < v.l->n; i++) {
            if (i)
                jb_puts(b, item_sep);
            if (indent >= 0)
                json_nl(b, indent, depth + 1);
            jv_to_json(b, v.l->items[i], indent, depth + 1);
        }
        if (indent >= 0)
            json_nl(b, indent, depth);
        jb_puts(b, "]");
        return;
    case JV_DICT:
        if (v.d->n == 0) {
            jb_puts(b, "{}");
            return;
        }
        jb_puts(b, "{");
        for (int i = 0; i < v.d->n; i++) {
            if (i)
                jb_puts(b, item_sep);
            if (indent >= 0)
                json_nl(b, indent, depth + 1);
            json_str(b, v.d->keys[i]->s, v.d->keys[i]->len);
            jb_puts(b, ": ");
            jv_to_json(b, v.d->vals[i], indent, depth + 1);
        }
        if (indent >= 0)
            json_nl(b, indent, depth);
        jb_puts(b, "}");
        return;
    default: jb_puts(b, "null");
    }
}

static bool is_num(jv v) { return v.k == JV_INT || v.k == JV_FLOAT || v.k == JV_BOOL; }
static double num(jv v) { return v.k == JV_FLOAT ? v.f : v.k == JV_INT ? (double)v.i : v.b; }
static int64_t inum(jv v) { return v.k == JV_INT ? v.i : v.b; }

bool jv_eq(jv a, jv b)
{
    if (is_num(a) && is_num(b)) {
        if (a.k != JV_FLOAT && b.k != JV_FLOAT)
            return inum(a) == inum(b);
        return num(a) == num(b);
    }
    if (a.k != b.k)
        return false;
    switch (a.k) {
    case JV_UNDEF:
    case JV_NONE: return true;
    case JV_STR: return a.s->len == b.s->len && memcmp(a.s->s, b.s->s, a.s->len) == 0;
    case JV_LIST:
        if (a.l->n != b.l->n || a.l->tuple != b.l->tuple)
            return false;
        for (int i = 0; i < a.l->n; i++)
            if (!jv_eq(a.l->items[i], b.l->items[i]))
                return false;
        return true;
    case JV_DICT:
        if (a.d->is_ns || b.d->is_ns)
            return a.d == b.d;
        if (a.d->n != b.d->n)
            return false;
        for (int i = 0; i < a.d->n; i++) {
            jv *o = jv_dict_get(b.d, a.d->keys[i]->s, a.d->keys[i]->len);
            if (!o || !jv_eq(a.d->vals[i], *o))
                return false;
        }
        return true;
    case JV_MACRO: return a.m == b.m;
    case JV_FUNC: return a.fn == b.fn;
    default: return false;
    }
}

bool jv_cmp(jv a, jv b, int *out)
{
    if (is_num(a) && is_num(b)) {
        if (a.k != JV_FLOAT && b.k != JV_FLOAT) {
            int64_t x = inum(a), y = inum(b);
            *out = x < y ? -1 : x > y;
        } else {
            double x = num(a), y = num(b);
            if (isnan(x) || isnan(y)) {
                *out = 2; /* every comparison false */
                return true;
            }
            *out = x < y ? -1 : x > y;
        }
        return true;
    }
    if (a.k == JV_STR && b.k == JV_STR) {
        /* UTF-8 byte order is code point order */
        size_t n = a.s->len < b.s->len ? a.s->len : b.s->len;
        int c = memcmp(a.s->s, b.s->s, n);
        *out = c ? (c < 0 ? -1 : 1) : (a.s->len < b.s->len ? -1 : a.s->len > b.s->len);
        return true;
    }
    if (a.k == JV_LIST && b.k == JV_LIST) {
        for (int i = 0; i < a.l->n && i < b.l->n; i++) {
            if (jv_eq(a.l->items[i], b.l->items[i]))
                continue;
            return jv_cmp(a.l->items[i], b.l->items[i], out);
        }
        *out = a.l->n < b.l->n ? -1 : a.l->n > b.l->n;
        return true;
    }
    return false;
}

size_t ja_utf8_count(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

size_t ja_utf8_offset(const char *s, size_t n, int64_t cp)
{
    size_t i = 0;
    for (int64_t k = 0; k < cp && i < n; k++) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80)
            i++;
    }
    return i;
}

bool ja_is_space(uint32_t cp)
{
    if (cp < 0x80)
        return cp == ' ' || (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x1f);
    const utf8proc_property_t *p = utf8proc_get_property((utf8proc_int32_t)cp);
    return p->category == UTF8PROC_CATEGORY_ZS || p->bidi_class == UTF8PROC_BIDI_CLASS_WS ||
           p->bidi_class == UTF8PROC_BIDI_CLASS_B || p->bidi_class == UTF8PROC_BIDI_CLASS_S;
}
