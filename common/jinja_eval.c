/* The Jinja evaluator: runs a parsed template over a context, with jinja2's scoping (a for loop
 * body gets a fresh scope each iteration, if does not scope, macros see the template's top
 * level), its undefined-value rules and Python's operators; plus moe_jinja_parse/render/free. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jinja_internal.h"

#define MAX_STEPS 4000000 /* loop iterations + macro calls per render */
#define MAX_CALL_DEPTH 64 /* nested macro calls */
#define DEFAULT_MAX_BYTES ((size_t)256 << 20)

typedef struct frame {
    struct frame *parent;
    jdict *vars;
} frame;

struct jctx {
    ja_arena *a;
    jdict *globals; /* the caller's variables */
    frame *root;    /* the template's top level (macros' parent scope) */
    int line;
    int64_t steps;
    int depth;
    int loop_ctl; /* 1 = break, 2 = continue pending */
    bool failed;
    moe_status st;
    char err[512];
};

bool jx_fail(jctx *c, const char *fmt, ...)
{
    if (c->failed)
        return false;
    char m[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof(m), fmt, ap);
    va_end(ap);
    snprintf(c->err, sizeof(c->err), "chat template line %d: %s", c->line, m);
    c->failed = true;
    c->st = MOE_ERR_INVALID_ARG;
    return false;
}

bool jx_oom(jctx *c)
{
    if (!c->failed) {
        snprintf(c->err, sizeof(c->err),
                 "chat template: rendering needs more than its memory limit of %zu bytes",
                 c->a->limit);
        c->failed = true;
        c->st = MOE_ERR_RANGE;
    }
    return false;
}

ja_arena *jx_arena(jctx *c) { return c->a; }

const jv *jx_arg(const jargs *a, int pos, const char *name)
{
    for (int i = 0; i < a->nkw; i++)
        if (strcmp(a->kwnames[i], name) == 0)
            return &a->kw[i];
    return pos >= 0 && pos < a->npos ? &a->pos[pos] : NULL;
}

bool jx_apply_filter(jctx *c, const char *name, size_t len, jv v, const jargs *args, jv *out)
{
    if (!ja_filter_known(name, len))
        return jx_fail(c, "no filter named '%.*s'", (int)(len < 60 ? len : 60), name);
    return ja_call_filter(c, name, len, v, args, out);
}

bool jx_apply_test(jctx *c, const char *name, size_t len, jv v, const jargs *args, bool *out)
{
    if (!ja_test_known(name, len))
        return jx_fail(c, "no test named '%.*s'", (int)(len < 60 ? len : 60), name);
    return ja_call_test(c, name, len, v, args, out);
}

static jv lookup(jctx *c, const frame *f, const char *name, size_t len)
{
    for (; f; f = f->parent) {
        jv *v = jv_dict_get(f->vars, name, len);
        if (v)
            return *v;
    }
    if (c->globals) {
        jv *v = jv_dict_get(c->globals, name, len);
        if (v)
            return *v;
    }
    int fn = ja_global_func(name, len);
    if (fn >= 0)
        return (jv){.k = JV_FUNC, .fn = fn};
    return jv_undef();
}

static bool ev(jctx *c, frame *f, const jnode *n, jv *out);
static bool ex_body(jctx *c, frame *f, jnode *const *body, int nb, jbuf *out);

static bool need_defined(jctx *c, const jnode *n, jv v)
{
    if (v.k != JV_UNDEF)
        return true;
    if (n->kind == N_NAME)
        return jx_fail(c, "'%.*s' is undefined", (int)n->len, n->str);
    if (n->kind == N_ATTR)
        return jx_fail(c, "no attribute '%.*s' (undefined)", (int)n->len, n->str);
    return jx_fail(c, "an undefined value is used here");
}

static bool eval_args(jctx *c, frame *f, const jnode *n, jargs *a)
{
    memset(a, 0, sizeof(*a));
    a->npos = n->n;
    a->nkw = n->n2;
    a->kwnames = (const char **)n->names;
    a->pos = ja_alloc(c->a, (size_t)(n->n + 1) * sizeof(jv));
    a->kw = ja_alloc(c->a, (size_t)(n->n2 + 1) * sizeof(jv));
    if (!a->pos || !a->kw)
        return jx_oom(c);
    for (int i = 0; i < n->n; i++)
        if (!ev(c, f, n->list[i], &a->pos[i]))
            return false;
    for (int i = 0; i < n->n2; i++)
        if (!ev(c, f, n->list2[i], &a->kw[i]))
            return false;
    return true;
}

static bool new_frame(jctx *c, frame *parent, frame **out)
{
    frame *f = ja_alloc(c->a, sizeof(*f));
    if (!f || !(f->vars = jv_dict_new(c->a, 8)))
        return jx_oom(c);
    f->parent = parent;
    *out = f;
    return true;
}

static bool buf_to_str(jctx *c, jbuf *b, jv *out)
{
    if (b->failed) {
        free(b->p);
        return jx_oom(c);
    }
    *out = jv_str(c->a, b->p ? b->p : "", b->len);
    free(b->p);
    return out->k == JV_STR || jx_oom(c);
}

static bool call_macro(jctx *c, const jnode *m, const jargs *a, jv *out)
{
    if (++c->steps > MAX_STEPS)
        return jx_fail(c, "too many loop iterations or macro calls (over %d)", MAX_STEPS);
    if (c->depth >= MAX_CALL_DEPTH)
        return jx_fail(c, "macro calls nested deeper than %d", MAX_CALL_DEPTH);
    if (a->npos > m->nnames)
        return jx_fail(c, "macro '%.*s' takes at most %d arguments (%d given)", (int)m->len,
                       m->str, m->nnames, a->npos);
    frame *f;
    if (!new_frame(c, c->root, &f))
        return false;
    for (int i = 0; i < m->nnames; i++) {
        jv v = jv_undef();
        const jv *given = jx_arg(a, i, m->names[i]);
        if (given)
            v = *given;
        else if (m->list2[i] && !ev(c, f, m->list2[i], &v))
            return false;
        if (!jv_dict_set(c->a, f->vars, m->names[i], strlen(m->names[i]), v))
            return jx_oom(c);
    }
    for (int i = 0; i < a->nkw; i++) {
        bool known = false;
        for (int k = 0; k < m->nnames; k++)
            known |= strcmp(m->names[k], a->kwnames[i]) == 0;
        if (!known)
            return jx_fail(c, "macro '%.*s' takes no keyword argument '%s'", (int)m->len, m->str,
                           a->kwnames[i]);
    }
    jbuf b = {.limit = c->a->limit};
    c->depth++;
    const int line = c->line;
    bool ok = ex_body(c, f, m->list, m->n, &b);
    c->line = line;
    c->depth--;
    c->loop_ctl = 0;
    if (!ok) {
        free(b.p);
        return false;
    }
    return buf_to_str(c, &b, out);
}

static bool ev_call(jctx *c, frame *f, const jnode *n, jv *out)
{
    jargs a;
    const jnode *callee = n->a;
    if (callee->kind == N_ATTR) {
        jv obj;
        if (!ev(c, f, callee->a, &obj) || !need_defined(c, callee->a, obj))
            return false;
        if (!eval_args(c, f, n, &a))
            return false;
        bool handled = false;
        if (!ja_call_method(c, obj, callee->str, callee->len, &a, out, &handled))
            return false;
        if (handled)
            return true;
        jv fnv = jv_undef();
        if (obj.k == JV_DICT) {
            jv *p = jv_dict_get(obj.d, callee->str, callee->len);
            if (p)
                fnv = *p;
        }
        if (fnv.k == JV_MACRO)
            return call_macro(c, fnv.m, &a, out);
        return jx_fail(c, "'%s' object has no callable attribute '%.*s'", jv_type_name(obj),
                       (int)callee->len, callee->str);
    }
    jv fnv;
    if (!ev(c, f, callee, &fnv) || !need_defined(c, callee, fnv) || !eval_args(c, f, n, &a))
        return false;
    if (fnv.k == JV_MACRO)
        return call_macro(c, fnv.m, &a, out);
    if (fnv.k == JV_FUNC)
        return ja_call_global(c, fnv.fn, &a, out);
    return jx_fail(c, "'%s' object is not callable", jv_type_name(fnv));
}

/* Python's slice indices for a sequence of length len. */
static bool slice_bounds(jctx *c, frame *f, const jnode *n, int64_t len, int64_t *start,
                         int64_t *stop, int64_t *step)
{
    jv v[3] = {jv_none(), jv_none(), jv_none()};
    const jnode *parts[3] = {n->b, n->c, n->d};
    for (int i = 0; i < 3; i++) {
        if (parts[i] && !ev(c, f, parts[i], &v[i]))
            return false;
        if (v[i].k != JV_NONE && v[i].k != JV_UNDEF && v[i].k != JV_INT && v[i].k != JV_BOOL)
            return jx_fail(c, "slice indices must be integers or None");
    }
    *step = (v[2].k == JV_INT || v[2].k == JV_BOOL) ? (v[2].k == JV_INT ? v[2].i : v[2].b) : 1;
    if (*step == 0)
        return jx_fail(c, "slice step cannot be zero");
    for (int i = 0; i < 2; i++) {
        int64_t *dst = i == 0 ? start : stop;
        if (v[i].k != JV_INT && v[i].k != JV_BOOL) {
            /* defaults: the whole sequence in the step's direction (-1: before the first) */
            *dst = i == 0 ? (*step > 0 ? 0 : len - 1) : (*step > 0 ? len : -1);
            continue;
        }
        int64_t x = v[i].k == JV_INT ? v[i].i : v[i].b;
        if (x < 0) {
            x += len;
            if (x < 0)
                x = *step < 0 ? -1 : 0;
        } else if (x >= len) {
            x = *step < 0 ? len - 1 : len;
        }
        *dst = x;
    }
    return true;
}

static bool ev_slice(jctx *c, frame *f, const jnode *n, jv *out)
{
    jv obj;
    if (!ev(c, f, n->a, &obj) || !need_defined(c, n->a, obj))
        return false;
    int64_t start, stop, step;
    if (obj.k == JV_LIST) {
        if (!slice_bounds(c, f, n, obj.l->n, &start, &stop, &step))
            return false;
        jlist *l = jv_list_new(c->a, 8);
        if (!l)
            return jx_oom(c);
        l->tuple = obj.l->tuple;
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
            if (!jv_list_push(c->a, l, obj.l->items[i]))
                return jx_oom(c);
        *out = (jv){.k = JV_LIST, .l = l};
        return true;
    }
    if (obj.k == JV_STR) {
        const char *s = obj.s->s;
        size_t bl = obj.s->len;
        int64_t len = (int64_t)ja_utf8_count(s, bl);
        if (!slice_bounds(c, f, n, len, &start, &stop, &step))
            return false;
        if (step == 1) {
            if (stop < start)
                stop = start;
            size_t b0 = ja_utf8_offset(s, bl, start), b1 = ja_utf8_offset(s, bl, stop);
            *out = jv_str(c->a, s + b0, b1 - b0);
            return out->k == JV_STR || jx_oom(c);
        }
        jbuf b = {.limit = c->a->limit};
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
            size_t b0 = ja_utf8_offset(s, bl, i), b1 = ja_utf8_offset(s + b0, bl - b0, 1) + b0;
            jb_put(&b, s + b0, b1 - b0);
        }
        return buf_to_str(c, &b, out);
    }
    return jx_fail(c, "'%s' object cannot be sliced", jv_type_name(obj));
}




static bool ev(jctx *c, frame *f, const jnode *n, jv *out)
{
    if (c->failed)
        return false;
    c->line = n->line;
    jv x, y;
    switch (n->kind) {
    case N_LIT: *out = n->lit; return true;
    case N_NAME: *out = lookup(c, f, n->str, n->len); return true;
    case N_ATTR:
        if (!ev(c, f, n->a, &x) || !need_defined(c, n->a, x))
            return false;
        *out = jv_undef();
        if (x.k == JV_DICT) {
            jv *p = jv_dict_get(x.d, n->str, n->len);
            if (p)
                *out = *p;
        }
        return true;
    case N_ITEM:
        if (!ev(c, f, n->a, &x) || !need_defined(c, n->a, x) || !ev(c, f, n->b, &y))
            return false;
        return ja_item(c, x, y, out);
    case N_SLICE: return ev_slice(c, f, n, out);
    case N_CALL: return ev_call(c, f, n, out);
    case N_FILTER: {
        jargs a;
        if (!ev(c, f, n->a, &x) || !eval_args(c, f, n, &a))
            return false;
        c->line = n->line;
        return ja_call_filter(c, n->str, n->len, x, &a, out);
    }
    case N_TEST: {
        jargs a;
        bool r;
        if (!ev(c, f, n->a, &x) || !eval_args(c, f, n, &a))
            return false;
        c->line = n->line;
        if (!ja_call_test(c, n->str, n->len, x, &a, &r))
            return false;
        *out = jv_bool(n->op ? !r : r);
        return true;
    }
    case N_NEG:
    case N_POS:
        if (!ev(c, f, n->a, &x) || !need_defined(c, n->a, x))
            return false;
        if (x.k == JV_BOOL)
            x = jv_int(x.b);
        if (x.k == JV_INT) {
            if (n->kind == N_NEG && x.i == INT64_MIN)
                return jx_fail(c, "integer overflow (beyond 64 bits)");
            *out = jv_int(n->kind == N_NEG ? -x.i : x.i);
        } else if (x.k == JV_FLOAT) {
            *out = jv_float(n->kind == N_NEG ? -x.f : x.f);
        } else {
            return jx_fail(c, "bad operand type for unary %c: '%s'", n->kind == N_NEG ? '-' : '+',
                           jv_type_name(x));
        }
        return true;
    case N_NOT:
        if (!ev(c, f, n->a, &x))
            return false;
        *out = jv_bool(!jv_truthy(x));
        return true;
    case N_AND:
    case N_OR:
        if (!ev(c, f, n->a, &x))
            return false;
        if (jv_truthy(x) == (n->kind == N_OR)) {
            *out = x;
            return true;
        }
        return ev(c, f, n->b, out);
    case N_COND:
        if (!ev(c, f, n->b, &x))
            return false;
        if (jv_truthy(x))
            return ev(c, f, n->a, out);
        if (n->c)
            return ev(c, f, n->c, out);
        *out = jv_undef();
        return true;
    case N_BIN:
        if (!ev(c, f, n->a, &x) || !need_defined(c, n->a, x) || !ev(c, f, n->b, &y) ||
            !need_defined(c, n->b, y))
            return false;
        c->line = n->line;
        return ja_arith(c, n->op, x, y, out);
    case N_CONCAT: {
        if (!ev(c, f, n->a, &x) || !ev(c, f, n->b, &y))
            return false;
        jbuf b = {.limit = c->a->limit};
        jv_to_str(&b, x);
        jv_to_str(&b, y);
        return buf_to_str(c, &b, out);
    }
    case N_CMP: {
        if (!ev(c, f, n->a, &x) || !ev(c, f, n->b, &y))
            return false;
        c->line = n->line;
        if (n->op == OP_EQ || n->op == OP_NE) {
            bool e = jv_eq(x, y);
            *out = jv_bool(n->op == OP_EQ ? e : !e);
            return true;
        }
        int r;
        if (!jv_cmp(x, y, &r))
            return jx_fail(c, "'%s' not supported between instances of '%s' and '%s'",
                           n->op == '<' ? "<" : n->op == '>' ? ">" : n->op == OP_LE ? "<=" : ">=",
                           jv_type_name(x), jv_type_name(y));
        bool v = r != 2 && (n->op == '<' ? r < 0 : n->op == '>' ? r > 0 : n->op == OP_LE ? r <= 0 : r >= 0);
        *out = jv_bool(v);
        return true;
    }
    case N_IN: {
        bool r;
        if (!ev(c, f, n->a, &x) || !ev(c, f, n->b, &y) || !ja_in(c, x, y, &r))
            return false;
        *out = jv_bool(n->op ? !r : r);
        return true;
    }
    case N_LIST:
    case N_TUPLE: {
        jlist *l = jv_list_new(c->a, n->n);
        if (!l)
            return jx_oom(c);
        l->tuple = n->kind == N_TUPLE;
        for (int i = 0; i < n->n; i++) {
            if (!ev(c, f, n->list[i], &x))
                return false;
            if (!jv_list_push(c->a, l, x))
                return jx_oom(c);
        }
        *out = (jv){.k = JV_LIST, .l = l};
        return true;
    }
    case N_DICT: {
        jdict *d = jv_dict_new(c->a, n->n);
        if (!d)
            return jx_oom(c);
        for (int i = 0; i < n->n; i++) {
            if (!ev(c, f, n->list[i], &x) || !ev(c, f, n->list2[i], &y))
                return false;
            if (x.k != JV_STR)
                return jx_fail(c, "dict literal keys must be strings here, not %s", jv_type_name(x));
            if (!jv_dict_set(c->a, d, x.s->s, x.s->len, y))
                return jx_oom(c);
        }
        *out = (jv){.k = JV_DICT, .d = d};
        return true;
    }
    default: return jx_fail(c, "internal: not an expression");
    }
}

/* The items a for loop walks over. */
static bool iter_items(jctx *c, jv v, jlist **out)
{
    if (v.k == JV_LIST) {
        *out = v.l;
        return true;
    }
    jlist *l = jv_list_new(c->a, 8);
    if (!l)
        return jx_oom(c);
    *out = l;
    if (v.k == JV_UNDEF)
        return true;
    if (v.k == JV_DICT) {
        for (int i = 0; i < v.d->n; i++)
            if (!jv_list_push(c->a, l, (jv){.k = JV_STR, .s = v.d->keys[i]}))
                return jx_oom(c);
        return true;
    }
    if (v.k == JV_STR) {
        size_t i = 0;
        while (i < v.s->len) {
            size_t k = i + ja_utf8_offset(v.s->s + i, v.s->len - i, 1);
            jv ch = jv_str(c->a, v.s->s + i, k - i);
            if (ch.k != JV_STR || !jv_list_push(c->a, l, ch))
                return jx_oom(c);
            i = k;
        }
        return true;
    }
    return jx_fail(c, "'%s' object is not iterable", jv_type_name(v));
}

static bool bind_targets(jctx *c, frame *f, const jnode *n, jv v)
{
    if (n->nnames == 1)
        return jv_dict_set(c->a, f->vars, n->names[0], strlen(n->names[0]), v) || jx_oom(c);
    jlist *items;
    if (v.k == JV_LIST)
        items = v.l;
    else if (!iter_items(c, v, &items))
        return false;
    if (items->n != n->nnames)
        return jx_fail(c, "cannot unpack %d values into %d names", items->n, n->nnames);
    for (int i = 0; i < n->nnames; i++)
        if (!jv_dict_set(c->a, f->vars, n->names[i], strlen(n->names[i]), items->items[i]))
            return jx_oom(c);
    return true;
}

static bool set_loop(jctx *c, frame *f, jlist *items, int i)
{
    jdict *d = jv_dict_new(c->a, 10);
    if (!d)
        return jx_oom(c);
    const int len = items->n;
    struct {
        const char *k;
        jv v;
    } kv[] = {
        {"index", jv_int(i + 1)},        {"index0", jv_int(i)},
        {"revindex", jv_int(len - i)},   {"revindex0", jv_int(len - i - 1)},
        {"first", jv_bool(i == 0)},      {"last", jv_bool(i == len - 1)},
        {"length", jv_int(len)},
        {"previtem", i > 0 ? items->items[i - 1] : jv_undef()},
        {"nextitem", i + 1 < len ? items->items[i + 1] : jv_undef()},
    };
    for (size_t k = 0; k < sizeof(kv) / sizeof(kv[0]); k++)
        if (kv[k].v.k != JV_UNDEF && !jv_dict_set(c->a, d, kv[k].k, strlen(kv[k].k), kv[k].v))
            return jx_oom(c);
    return jv_dict_set(c->a, f->vars, "loop", 4, (jv){.k = JV_DICT, .d = d}) || jx_oom(c);
}

static bool ex_for(jctx *c, frame *f, const jnode *n, jbuf *out)
{
    jv it;
    jlist *all;
    if (!ev(c, f, n->a, &it) || !iter_items(c, it, &all))
        return false;
    jlist *items = all;
    if (n->b) { /* for x in xs if cond: the loop sees only the items that pass */
        if (!(items = jv_list_new(c->a, all->n)))
            return jx_oom(c);
        for (int i = 0; i < all->n; i++) {
            frame *g;
            jv ok;
            if (++c->steps > MAX_STEPS)
                return jx_fail(c, "too many loop iterations or macro calls (over %d)", MAX_STEPS);
            if (!new_frame(c, f, &g) || !bind_targets(c, g, n, all->items[i]) || !ev(c, g, n->b, &ok))
                return false;
            if (jv_truthy(ok) && !jv_list_push(c->a, items, all->items[i]))
                return jx_oom(c);
        }
    }
    for (int i = 0; i < items->n; i++) {
        if (++c->steps > MAX_STEPS)
            return jx_fail(c, "too many loop iterations or macro calls (over %d)", MAX_STEPS);
        frame *g;
        if (!new_frame(c, f, &g) || !bind_targets(c, g, n, items->items[i]) ||
            !set_loop(c, g, items, i) || !ex_body(c, g, n->list, n->n, out))
            return false;
        int ctl = c->loop_ctl;
        c->loop_ctl = 0;
        if (ctl == 1)
            break;
    }
    if (items->n == 0)
        return ex_body(c, f, n->list2, n->n2, out);
    return true;
}

static bool ex_set(jctx *c, frame *f, const jnode *n, jbuf *out)
{
    (void)out;
    jv v;
    if (n->kind == S_SETBLOCK) {
        jbuf b = {.limit = c->a->limit};
        if (!ex_body(c, f, n->list, n->n, &b)) {
            free(b.p);
            return false;
        }
        if (!buf_to_str(c, &b, &v))
            return false;
        return jv_dict_set(c->a, f->vars, n->names[0], strlen(n->names[0]), v) || jx_oom(c);
    }
    if (!ev(c, f, n->a, &v))
        return false;
    c->line = n->line;
    if (n->op == 1) {
        jv ns = lookup(c, f, n->str, n->len);
        if (ns.k != JV_DICT || !ns.d->is_ns)
            return jx_fail(c, "cannot assign attribute on non-namespace object '%.*s'",
                           (int)n->len, n->str);
        return jv_dict_set(c->a, ns.d, n->names[0], strlen(n->names[0]), v) || jx_oom(c);
    }
    return bind_targets(c, f, n, v);
}

static bool ex_body(jctx *c, frame *f, jnode *const *body, int nb, jbuf *out)
{
    for (int i = 0; i < nb && !c->loop_ctl; i++) {
        const jnode *s = body[i];
        c->line = s->line;
        jv v;
        switch (s->kind) {
        case S_TEXT: jb_put(out, s->str, s->len); break;
        case S_OUT:
            if (!ev(c, f, s->a, &v))
                return false;
            jv_to_str(out, v);
            break;
        case S_IF:
            if (!ev(c, f, s->a, &v))
                return false;
            if (!(jv_truthy(v) ? ex_body(c, f, s->list, s->n, out)
                               : ex_body(c, f, s->list2, s->n2, out)))
                return false;
            break;
        case S_FOR:
            if (!ex_for(c, f, s, out))
                return false;
            break;
        case S_SET:
        case S_SETBLOCK:
            if (!ex_set(c, f, s, out))
                return false;
            break;
        case S_MACRO:
            if (!jv_dict_set(c->a, f->vars, s->str, s->len, (jv){.k = JV_MACRO, .m = s}))
                return jx_oom(c);
            break;
        case S_BREAK: c->loop_ctl = 1; break;
        case S_CONTINUE: c->loop_ctl = 2; break;
        case S_BLOCK:
            if (!ex_body(c, f, s->list, s->n, out))
                return false;
            break;
        default: return jx_fail(c, "internal: not a statement");
        }
        if (out->failed)
            return jx_oom(c);
    }
    return !c->failed;
}

/* ---------------------------------------------------------------------------------------------
 * Public API */

moe_status moe_jinja_parse(const char *src, size_t len, moe_jinja **out)
{
    *out = NULL;
    moe_jinja *t = calloc(1, sizeof(*t));
    if (!t)
        return moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
    jtoks toks;
    moe_status st = ja_lex(src, len, &t->arena, &toks);
    if (st == MOE_OK)
        st = ja_parse(&toks, &t->arena, &t->body, &t->n_body);
    free(toks.toks);
    if (st != MOE_OK) {
        moe_jinja_free(t);
        return st;
    }
    *out = t;
    return MOE_OK;
}

moe_status moe_jinja_render(const moe_jinja *t, const cJSON *vars, const moe_jinja_var *more,
                            int n_more, size_t max_bytes, char **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    ja_arena a = {.limit = max_bytes ? max_bytes : DEFAULT_MAX_BYTES};
    jctx c = {.a = &a};
    jbuf b = {.limit = a.limit};
    moe_status st = MOE_OK;
    if (vars) {
        jv g = jv_from_json(&a, vars);
        if (g.k != JV_DICT) {
            st = cJSON_IsObject(vars) ? moe_error(MOE_ERR_RANGE, "chat template: the variables "
                                                  "exceed the render's memory limit")
                                      : moe_error(MOE_ERR_INVALID_ARG, "chat template: the "
                                                  "variables must be a JSON object");
            goto out;
        }
        c.globals = g.d;
    } else if (!(c.globals = jv_dict_new(&a, n_more))) {
        st = moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
        goto out;
    }
    for (int i = 0; i < n_more; i++) {
        jv v = jv_from_json(&a, more[i].value);
        if ((v.k == JV_UNDEF && more[i].value) ||
            !jv_dict_set(&a, c.globals, more[i].name, strlen(more[i].name), v)) {
            st = moe_error(MOE_ERR_RANGE, "chat template: variable %s exceeds the render's "
                           "memory limit", more[i].name);
            goto out;
        }
    }
    if (!new_frame(&c, NULL, &c.root) || !ex_body(&c, c.root, t->body, t->n_body, &b)) {
        st = moe_error(c.st ? c.st : MOE_ERR_INTERNAL, "%s", c.err);
        goto out;
    }
    if (b.failed) {
        st = moe_error(MOE_ERR_RANGE, "chat template: the output exceeds %zu bytes", a.limit);
        goto out;
    }
    *out = b.p ? b.p : strdup("");
    b.p = NULL;
    *out_len = b.len;
    if (!*out)
        st = moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
out:
    free(b.p);
    ja_free_all(&a);
    return st;
}

void moe_jinja_free(moe_jinja *t)
{
    if (!t)
        return;
    ja_free_all(&t->arena);
    free(t);
}
