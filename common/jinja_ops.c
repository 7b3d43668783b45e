/* Python's operators on Jinja values: arithmetic and concatenation of sequences (ints stay exact
 * and overflow is an error, not a wrap), `in`, and item access (negative indices, code points). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/jinja_internal.h"

#define DEFAULT_MAX_BYTES ((size_t)256 << 20)

bool ja_item(jctx *c, jv obj, jv key, jv *out)
{
    *out = jv_undef();
    if (obj.k == JV_LIST && (key.k == JV_INT || key.k == JV_BOOL)) {
        int64_t i = key.k == JV_INT ? key.i : key.b;
        if (i < 0)
            i += obj.l->n;
        if (i >= 0 && i < obj.l->n)
            *out = obj.l->items[i];
    } else if (obj.k == JV_DICT && key.k == JV_STR) {
        jv *p = jv_dict_get(obj.d, key.s->s, key.s->len);
        if (p)
            *out = *p;
    } else if (obj.k == JV_STR && (key.k == JV_INT || key.k == JV_BOOL)) {
        int64_t i = key.k == JV_INT ? key.i : key.b;
        int64_t len = (int64_t)ja_utf8_count(obj.s->s, obj.s->len);
        if (i < 0)
            i += len;
        if (i >= 0 && i < len) {
            size_t b0 = ja_utf8_offset(obj.s->s, obj.s->len, i);
            size_t b1 = b0 + ja_utf8_offset(obj.s->s + b0, obj.s->len - b0, 1);
            *out = jv_str(jx_arena(c), obj.s->s + b0, b1 - b0);
            if (out->k != JV_STR)
                return jx_oom(c);
        }
    }
    return true;
}

bool ja_arith(jctx *c, int op, jv x, jv y, jv *out)
{
    const bool nx = x.k == JV_INT || x.k == JV_BOOL || x.k == JV_FLOAT;
    const bool ny = y.k == JV_INT || y.k == JV_BOOL || y.k == JV_FLOAT;
    if (op == '+' && x.k == JV_STR && y.k == JV_STR) {
        jstr *s = ja_alloc(jx_arena(c), sizeof(jstr) + x.s->len + y.s->len + 1);
        if (!s)
            return jx_oom(c);
        memcpy(s->s, x.s->s, x.s->len);
        memcpy(s->s + x.s->len, y.s->s, y.s->len);
        s->len = x.s->len + y.s->len;
        *out = (jv){.k = JV_STR, .s = s};
        return true;
    }
    if (op == '+' && x.k == JV_LIST && y.k == JV_LIST && x.l->tuple == y.l->tuple) {
        jlist *l = jv_list_new(jx_arena(c), x.l->n + y.l->n);
        if (!l)
            return jx_oom(c);
        l->tuple = x.l->tuple;
        memcpy(l->items, x.l->items, (size_t)x.l->n * sizeof(jv));
        memcpy(l->items + x.l->n, y.l->items, (size_t)y.l->n * sizeof(jv));
        l->n = x.l->n + y.l->n;
        *out = (jv){.k = JV_LIST, .l = l};
        return true;
    }
    if (op == '*' && ((x.k == JV_STR && (y.k == JV_INT || y.k == JV_BOOL)) ||
                      (y.k == JV_STR && (x.k == JV_INT || x.k == JV_BOOL)))) {
        const jstr *s = x.k == JV_STR ? x.s : y.s;
        int64_t k = x.k == JV_STR ? (y.k == JV_INT ? y.i : y.b) : (x.k == JV_INT ? x.i : x.b);
        if (k < 0)
            k = 0;
        if (s->len && (uint64_t)k > (jx_arena(c)->limit ? jx_arena(c)->limit : DEFAULT_MAX_BYTES) / s->len)
            return jx_oom(c);
        jstr *r = ja_alloc(jx_arena(c), sizeof(jstr) + s->len * (size_t)k + 1);
        if (!r)
            return jx_oom(c);
        for (int64_t i = 0; i < k; i++)
            memcpy(r->s + (size_t)i * s->len, s->s, s->len);
        r->len = s->len * (size_t)k;
        *out = (jv){.k = JV_STR, .s = r};
        return true;
    }
    if (!nx || !ny) {
        static const char *const names[] = {['+'] = "+", ['-'] = "-", ['*'] = "*", ['/'] = "/",
                                            ['%'] = "%"};
        const char *on = op == OP_POW ? "**" : op == OP_FLOORDIV ? "//" : names[op];
        return jx_fail(c, "unsupported operand type(s) for %s: '%s' and '%s'", on,
                       jv_type_name(x), jv_type_name(y));
    }
    if (x.k != JV_FLOAT && y.k != JV_FLOAT && op != '/') {
        int64_t a = x.k == JV_INT ? x.i : x.b, b = y.k == JV_INT ? y.i : y.b, r = 0;
        bool ovf = false;
        switch (op) {
        case '+': ovf = __builtin_add_overflow(a, b, &r); break;
        case '-': ovf = __builtin_sub_overflow(a, b, &r); break;
        case '*': ovf = __builtin_mul_overflow(a, b, &r); break;
        case OP_FLOORDIV:
        case '%':
            if (b == 0)
                return jx_fail(c, "integer division or modulo by zero");
            if (a == INT64_MIN && b == -1) {
                ovf = true;
                break;
            }
            r = op == '%' ? a % b : a / b;
            if (op == '%' && r != 0 && ((r < 0) != (b < 0)))
                r += b;
            if (op == OP_FLOORDIV && (a % b != 0) && ((a < 0) != (b < 0)))
                r--;
            break;
        case OP_POW:
            if (b < 0) {
                *out = jv_float(pow((double)a, (double)b));
                return true;
            }
            r = 1;
            for (int64_t i = 0; i < b && !ovf; i++)
                ovf = __builtin_mul_overflow(r, a, &r);
            break;
        }
        if (ovf)
            return jx_fail(c, "integer overflow (beyond 64 bits)");
        *out = jv_int(r);
        return true;
    }
    double a = x.k == JV_FLOAT ? x.f : (double)(x.k == JV_INT ? x.i : x.b);
    double b = y.k == JV_FLOAT ? y.f : (double)(y.k == JV_INT ? y.i : y.b);
    if ((op == '/' || op == OP_FLOORDIV || op == '%') && b == 0.0)
        return jx_fail(c, "division by zero");
    double r = 0;
    switch (op) {
    case '+': r = a + b; break;
    case '-': r = a - b; break;
    case '*': r = a * b; break;
    case '/': r = a / b; break;
    case OP_FLOORDIV: r = floor(a / b); break;
    case '%': r = fmod(a, b); if (r != 0 && ((r < 0) != (b < 0))) r += b; break;
    case OP_POW: r = pow(a, b); break;
    }
    *out = jv_float(r);
    return true;
}

bool ja_in(jctx *c, jv x, jv y, bool *out)
{
    *out = false;
    switch (y.k) {
    case JV_UNDEF: return true;
    case JV_STR:
        if (x.k != JV_STR)
            return jx_fail(c, "'in <string>' requires string as left operand, not %s",
                           jv_type_name(x));
        *out = x.s->len == 0 || (x.s->len <= y.s->len &&
                                 memmem(y.s->s, y.s->len, x.s->s, x.s->len) != NULL);
        return true;
    case JV_LIST:
        for (int i = 0; i < y.l->n && !*out; i++)
            *out = jv_eq(x, y.l->items[i]);
        return true;
    case JV_DICT:
        *out = x.k == JV_STR && jv_dict_get(y.d, x.s->s, x.s->len) != NULL;
        return true;
    default: return jx_fail(c, "argument of type '%s' is not iterable", jv_type_name(y));
    }
}
