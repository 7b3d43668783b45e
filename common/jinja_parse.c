/* The Jinja parser: tokens -> statement and expression nodes, with jinja2's grammar and operator
 * precedence (jinja2/parser.py: condexpr < or < and < not < compare < + - < ~ < * / // % < ** <
 * unary < filters/tests < postfix < primary). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"
#include "common/jinja_internal.h"

#define MAX_DEPTH 200 /* nesting of expressions and blocks: deeper templates are refused */

typedef struct {
    const jtoks *t;
    int i;
    ja_arena *a;
    int depth;
} parser;

typedef struct {
    jnode **v;
    int n, cap;
} nvec;

static const jtok *peek(const parser *P) { return &P->t->toks[P->i]; }
static const jtok *peek2(const parser *P)
{
    return P->i + 1 < P->t->n ? &P->t->toks[P->i + 1] : &P->t->toks[P->t->n - 1];
}
static const jtok *next(parser *P)
{
    const jtok *t = &P->t->toks[P->i];
    if (t->kind != TK_EOF)
        P->i++;
    return t;
}

static bool is_op(const jtok *t, int op) { return t->kind == TK_OP && t->op == op; }
static bool is_name(const jtok *t, const char *s)
{
    return t->kind == TK_NAME && t->len == strlen(s) && memcmp(t->s, s, t->len) == 0;
}

static moe_status perr(const parser *P, const char *fmt, const char *arg)
{
    char m[256];
    snprintf(m, sizeof(m), fmt, arg ? arg : "");
    return moe_error(MOE_ERR_FORMAT, "chat template line %d: %s", peek(P)->line, m);
}

static moe_status nomem(void) { return moe_error(MOE_ERR_NOMEM, "chat template: out of memory"); }

static jnode *mk(parser *P, jnode_kind k, int line)
{
    jnode *n = ja_alloc(P->a, sizeof(*n));
    if (n) {
        n->kind = k;
        n->line = line;
    }
    return n;
}

static bool nv_push(nvec *v, jnode *n)
{
    if (!moe_grow((void **)&v->v, &v->cap, v->n + 1, sizeof(jnode *)))
        return false;
    v->v[v->n++] = n;
    return true;
}

/* Moves the vector into the arena (and frees it). */
static jnode **nv_finish(parser *P, nvec *v, int *n)
{
    jnode **out = ja_alloc(P->a, (size_t)(v->n ? v->n : 1) * sizeof(jnode *));
    if (out && v->n)
        memcpy(out, v->v, (size_t)v->n * sizeof(jnode *));
    *n = v->n;
    free(v->v);
    v->v = NULL;
    v->n = v->cap = 0;
    return out;
}

static char *dup_name(parser *P, const jtok *t)
{
    char *s = ja_alloc(P->a, t->len + 1);
    if (s)
        memcpy(s, t->s, t->len);
    return s;
}

static moe_status expect_op(parser *P, int op, const char *what)
{
    if (!is_op(peek(P), op))
        return perr(P, "expected %s", what);
    next(P);
    return MOE_OK;
}

static moe_status expect_block_end(parser *P)
{
    if (peek(P)->kind != TK_BLOCK_END)
        return perr(P, "expected '%%}'%s", "");
    next(P);
    return MOE_OK;
}

static moe_status parse_expr(parser *P, jnode **out);
static moe_status parse_or(parser *P, jnode **out);
static moe_status parse_unary(parser *P, bool with_filter, jnode **out);
static moe_status parse_primary(parser *P, jnode **out);
static moe_status parse_postfix(parser *P, jnode **io);

/* Call arguments after '(' up to ')': positional into n->list, keyword into names/list2. */
static moe_status parse_args(parser *P, jnode *n)
{
    nvec pos = {0}, kw = {0};
    const char **names = NULL;
    int nn = 0, ncap = 0;
    moe_status st = MOE_OK;
    next(P); /* ( */
    while (!is_op(peek(P), ')')) {
        if (pos.n + kw.n > 0 && (st = expect_op(P, ',', "',' or ')' in a call")) != MOE_OK)
            goto out;
        if (is_op(peek(P), ')'))
            break;
        jnode *e;
        if (peek(P)->kind == TK_NAME && is_op(peek2(P), '=')) {
            const char *nm = dup_name(P, next(P));
            next(P);
            if (!nm || !moe_grow((void **)&names, &ncap, nn + 1, sizeof(char *))) {
                st = nomem();
                goto out;
            }
            names[nn++] = nm;
            if ((st = parse_expr(P, &e)) != MOE_OK)
                goto out;
            if (!nv_push(&kw, e)) {
                st = nomem();
                goto out;
            }
        } else {
            if (kw.n > 0) {
                st = perr(P, "positional argument after a keyword argument%s", "");
                goto out;
            }
            if ((st = parse_expr(P, &e)) != MOE_OK)
                goto out;
            if (!nv_push(&pos, e)) {
                st = nomem();
                goto out;
            }
        }
    }
    next(P); /* ) */
    n->list = nv_finish(P, &pos, &n->n);
    n->list2 = nv_finish(P, &kw, &n->n2);
    n->nnames = nn;
    n->names = ja_alloc(P->a, (size_t)(nn ? nn : 1) * sizeof(char *));
    if (!n->list || !n->list2 || !n->names) {
        st = nomem();
        goto out;
    }
    if (nn)
        memcpy(n->names, names, (size_t)nn * sizeof(char *));
out:
    free(pos.v);
    free(kw.v);
    free(names);
    return st;
}

/* Comma-separated expressions: one, or a tuple. `paren`: inside (), where () and (a,) count. */
static moe_status parse_tuple(parser *P, bool condexpr, bool paren, jnode **out)
{
    const int line = peek(P)->line;
    nvec items = {0};
    bool comma = false;
    moe_status st = MOE_OK;
    for (;;) {
        if (items.n > 0) {
            if (!is_op(peek(P), ','))
                break;
            next(P);
            comma = true;
        }
        const jtok *t = peek(P);
        if (t->kind == TK_BLOCK_END || t->kind == TK_VAR_END || is_op(t, ')') ||
            (items.n > 0 && is_name(t, "if") && !condexpr))
            break;
        if (paren && items.n == 0 && is_op(t, ')'))
            break;
        jnode *e;
        st = condexpr ? parse_expr(P, &e) : parse_or(P, &e);
        if (st != MOE_OK)
            goto fail;
        if (!nv_push(&items, e)) {
            st = nomem();
            goto fail;
        }
    }
    if (items.n == 1 && !comma) {
        *out = items.v[0];
        free(items.v);
        return MOE_OK;
    }
    if (items.n == 0 && !paren) {
        st = perr(P, "expected an expression%s", "");
        goto fail;
    }
    jnode *n = mk(P, N_TUPLE, line);
    if (!n) {
        st = nomem();
        goto fail;
    }
    n->list = nv_finish(P, &items, &n->n);
    *out = n;
    return n->list ? MOE_OK : nomem();
fail:
    free(items.v);
    return st;
}

static moe_status parse_list_or_dict(parser *P, bool dict, jnode **out)
{
    const int line = next(P)->line; /* [ or { */
    nvec keys = {0}, vals = {0};
    const int close = dict ? '}' : ']';
    moe_status st = MOE_OK;
    while (!is_op(peek(P), close)) {
        if (keys.n > 0 && (st = expect_op(P, ',', dict ? "',' or '}'" : "',' or ']'")) != MOE_OK)
            goto out;
        if (is_op(peek(P), close))
            break;
        jnode *k, *v = NULL;
        if ((st = parse_expr(P, &k)) != MOE_OK)
            goto out;
        if (dict) {
            if ((st = expect_op(P, ':', "':' in a dict literal")) != MOE_OK ||
                (st = parse_expr(P, &v)) != MOE_OK)
                goto out;
        }
        if (!nv_push(&keys, k) || (dict && !nv_push(&vals, v))) {
            st = nomem();
            goto out;
        }
    }
    next(P);
    jnode *n = mk(P, dict ? N_DICT : N_LIST, line);
    if (!n) {
        st = nomem();
        goto out;
    }
    n->list = nv_finish(P, &keys, &n->n);
    n->list2 = nv_finish(P, &vals, &n->n2);
    *out = n;
    if (!n->list || !n->list2)
        st = nomem();
out:
    free(keys.v);
    free(vals.v);
    return st;
}

static moe_status parse_primary(parser *P, jnode **out)
{
    const jtok *t = peek(P);
    jnode *n;
    if (t->kind == TK_NAME) {
        next(P);
        if (!(n = mk(P, N_LIT, t->line)))
            return nomem();
        if (is_name(t, "true") || is_name(t, "True"))
            n->lit = jv_bool(true);
        else if (is_name(t, "false") || is_name(t, "False"))
            n->lit = jv_bool(false);
        else if (is_name(t, "none") || is_name(t, "None"))
            n->lit = jv_none();
        else {
            n->kind = N_NAME;
            n->str = t->s;
            n->len = t->len;
        }
    } else if (t->kind == TK_STRING) {
        /* adjacent literals concatenate */
        size_t total = 0;
        int j = P->i;
        while (P->t->toks[j].kind == TK_STRING)
            total += P->t->toks[j++].len;
        char *s = ja_alloc(P->a, total + 1);
        if (!s || !(n = mk(P, N_LIT, t->line)))
            return nomem();
        size_t o = 0;
        while (peek(P)->kind == TK_STRING) {
            const jtok *x = next(P);
            memcpy(s + o, x->s, x->len);
            o += x->len;
        }
        n->lit = jv_str(P->a, s, total);
        if (n->lit.k != JV_STR)
            return nomem();
    } else if (t->kind == TK_INT || t->kind == TK_FLOAT) {
        next(P);
        if (!(n = mk(P, N_LIT, t->line)))
            return nomem();
        n->lit = t->kind == TK_INT ? jv_int(t->ival) : jv_float(t->fval);
    } else if (is_op(t, '(')) {
        next(P);
        moe_status st = parse_tuple(P, true, true, &n);
        if (st != MOE_OK)
            return st;
        if ((st = expect_op(P, ')', "')'")) != MOE_OK)
            return st;
    } else if (is_op(t, '[') || is_op(t, '{')) {
        moe_status st = parse_list_or_dict(P, is_op(t, '{'), &n);
        if (st != MOE_OK)
            return st;
    } else {
        return perr(P, "unexpected %s", t->kind == TK_BLOCK_END ? "'%}'"
                                        : t->kind == TK_VAR_END ? "'}}'"
                                        : t->kind == TK_EOF     ? "end of template"
                                                                : "token");
    }
    *out = n;
    return MOE_OK;
}

/* a[...] after '[': an index or a slice */
static moe_status parse_subscript(parser *P, jnode *obj, jnode **out)
{
    const int line = next(P)->line;
    jnode *parts[3] = {NULL, NULL, NULL};
    int np = 0;
    bool slice = false;
    moe_status st;
    for (;;) {
        if (!is_op(peek(P), ':') && !is_op(peek(P), ']')) {
            if ((st = parse_expr(P, &parts[np])) != MOE_OK)
                return st;
        }
        if (is_op(peek(P), ':')) {
            slice = true;
            next(P);
            if (++np > 2)
                return perr(P, "too many ':' in a slice%s", "");
            continue;
        }
        break;
    }
    if ((st = expect_op(P, ']', "']'")) != MOE_OK)
        return st;
    jnode *n = mk(P, slice ? N_SLICE : N_ITEM, line);
    if (!n)
        return nomem();
    n->a = obj;
    n->b = parts[0];
    n->c = parts[1];
    n->d = parts[2];
    if (!slice && !parts[0])
        return perr(P, "empty subscript%s", "");
    *out = n;
    return MOE_OK;
}

static moe_status parse_postfix(parser *P, jnode **io)
{
    for (;;) {
        const jtok *t = peek(P);
        moe_status st;
        if (is_op(t, '.')) {
            next(P);
            const jtok *nm = next(P);
            jnode *n;
            if (nm->kind == TK_NAME) {
                if (!(n = mk(P, N_ATTR, nm->line)))
                    return nomem();
                n->str = nm->s;
                n->len = nm->len;
                n->a = *io;
            } else if (nm->kind == TK_INT) {
                jnode *k = mk(P, N_LIT, nm->line);
                if (!k || !(n = mk(P, N_ITEM, nm->line)))
                    return nomem();
                k->lit = jv_int(nm->ival);
                n->a = *io;
                n->b = k;
            } else {
                return perr(P, "expected a name after '.'%s", "");
            }
            *io = n;
        } else if (is_op(t, '[')) {
            if ((st = parse_subscript(P, *io, io)) != MOE_OK)
                return st;
        } else if (is_op(t, '(')) {
            jnode *n = mk(P, N_CALL, t->line);
            if (!n)
                return nomem();
            n->a = *io;
            if ((st = parse_args(P, n)) != MOE_OK)
                return st;
            *io = n;
        } else {
            return MOE_OK;
        }
    }
}

static moe_status parse_filter_test(parser *P, jnode **io)
{
    for (;;) {
        const jtok *t = peek(P);
        moe_status st;
        if (is_op(t, '|')) {
            next(P);
            const jtok *nm = next(P);
            if (nm->kind != TK_NAME)
                return perr(P, "expected a filter name after '|'%s", "");
            if (!ja_filter_known(nm->s, nm->len)) {
                char b[64];
                snprintf(b, sizeof(b), "%.*s", (int)(nm->len < 60 ? nm->len : 60), nm->s);
                return perr(P, "no filter named '%s'", b);
            }
            jnode *n = mk(P, N_FILTER, nm->line);
            if (!n)
                return nomem();
            n->str = nm->s;
            n->len = nm->len;
            n->a = *io;
            if (is_op(peek(P), '(')) {
                if ((st = parse_args(P, n)) != MOE_OK)
                    return st;
            }
            *io = n;
        } else if (is_name(t, "is")) {
            next(P);
            bool neg = false;
            if (is_name(peek(P), "not")) {
                next(P);
                neg = true;
            }
            const jtok *nm = next(P);
            if (nm->kind != TK_NAME)
                return perr(P, "expected a test name after 'is'%s", "");
            if (!ja_test_known(nm->s, nm->len)) {
                char b[64];
                snprintf(b, sizeof(b), "%.*s", (int)(nm->len < 60 ? nm->len : 60), nm->s);
                return perr(P, "no test named '%s'", b);
            }
            jnode *n = mk(P, N_TEST, nm->line);
            if (!n)
                return nomem();
            n->str = nm->s;
            n->len = nm->len;
            n->op = neg;
            n->a = *io;
            const jtok *x = peek(P);
            if (is_op(x, '(')) {
                if ((st = parse_args(P, n)) != MOE_OK)
                    return st;
            } else if ((x->kind == TK_NAME || x->kind == TK_STRING || x->kind == TK_INT ||
                        x->kind == TK_FLOAT || is_op(x, '[') || is_op(x, '{')) &&
                       !is_name(x, "else") && !is_name(x, "or") && !is_name(x, "and")) {
                if (is_name(x, "is"))
                    return perr(P, "cannot chain tests with 'is'%s", "");
                jnode *arg;
                if ((st = parse_primary(P, &arg)) != MOE_OK || (st = parse_postfix(P, &arg)) != MOE_OK)
                    return st;
                n->list = ja_alloc(P->a, sizeof(jnode *));
                if (!n->list)
                    return nomem();
                n->list[0] = arg;
                n->n = 1;
            }
            *io = n;
        } else if (is_op(t, '(')) {
            if ((st = parse_postfix(P, io)) != MOE_OK)
                return st;
        } else {
            return MOE_OK;
        }
    }
}

static moe_status parse_unary(parser *P, bool with_filter, jnode **out)
{
    if (++P->depth > MAX_DEPTH)
        return perr(P, "expression nested too deeply%s", "");
    const jtok *t = peek(P);
    moe_status st;
    if (is_op(t, '-') || is_op(t, '+')) {
        next(P);
        jnode *n = mk(P, is_op(t, '-') ? N_NEG : N_POS, t->line);
        if (!n)
            return nomem();
        if ((st = parse_unary(P, false, &n->a)) != MOE_OK)
            return st;
        *out = n;
    } else if ((st = parse_primary(P, out)) != MOE_OK) {
        return st;
    }
    if ((st = parse_postfix(P, out)) != MOE_OK)
        return st;
    if (with_filter && (st = parse_filter_test(P, out)) != MOE_OK)
        return st;
    P->depth--;
    return MOE_OK;
}

static moe_status bin(parser *P, jnode_kind k, int op, int line, jnode *a, jnode *b, jnode **out)
{
    jnode *n = mk(P, k, line);
    if (!n)
        return nomem();
    n->op = op;
    n->a = a;
    n->b = b;
    *out = n;
    return MOE_OK;
}

static moe_status parse_pow(parser *P, jnode **out)
{
    moe_status st = parse_unary(P, true, out);
    while (st == MOE_OK && is_op(peek(P), OP_POW)) {
        int line = next(P)->line;
        jnode *r;
        if ((st = parse_unary(P, true, &r)) == MOE_OK)
            st = bin(P, N_BIN, OP_POW, line, *out, r, out);
    }
    return st;
}

static moe_status parse_math2(parser *P, jnode **out)
{
    moe_status st = parse_pow(P, out);
    for (;;) {
        const jtok *t = peek(P);
        if (st != MOE_OK || !(is_op(t, '*') || is_op(t, '/') || is_op(t, '%') || is_op(t, OP_FLOORDIV)))
            return st;
        next(P);
        jnode *r;
        if ((st = parse_pow(P, &r)) == MOE_OK)
            st = bin(P, N_BIN, t->op, t->line, *out, r, out);
    }
}

static moe_status parse_concat(parser *P, jnode **out)
{
    moe_status st = parse_math2(P, out);
    while (st == MOE_OK && is_op(peek(P), '~')) {
        int line = next(P)->line;
        jnode *r;
        if ((st = parse_math2(P, &r)) == MOE_OK)
            st = bin(P, N_CONCAT, '~', line, *out, r, out);
    }
    return st;
}

static moe_status parse_math1(parser *P, jnode **out)
{
    moe_status st = parse_concat(P, out);
    for (;;) {
        const jtok *t = peek(P);
        if (st != MOE_OK || !(is_op(t, '+') || is_op(t, '-')))
            return st;
        next(P);
        jnode *r;
        if ((st = parse_concat(P, &r)) == MOE_OK)
            st = bin(P, N_BIN, t->op, t->line, *out, r, out);
    }
}

static moe_status parse_compare(parser *P, jnode **out)
{
    jnode *left;
    moe_status st = parse_math1(P, &left);
    jnode *acc = NULL;
    while (st == MOE_OK) {
        const jtok *t = peek(P);
        jnode_kind k;
        int op;
        if (t->kind == TK_OP && (t->op == OP_EQ || t->op == OP_NE || t->op == '<' ||
                                 t->op == '>' || t->op == OP_LE || t->op == OP_GE)) {
            next(P);
            k = N_CMP;
            op = t->op;
        } else if (is_name(t, "in")) {
            next(P);
            k = N_IN;
            op = 0;
        } else if (is_name(t, "not") && is_name(peek2(P), "in")) {
            next(P);
            next(P);
            k = N_IN;
            op = 1;
        } else {
            break;
        }
        jnode *right, *cmp = NULL;
        if ((st = parse_math1(P, &right)) != MOE_OK || (st = bin(P, k, op, t->line, left, right, &cmp)) != MOE_OK)
            return st;
        /* a < b < c is (a < b) and (b < c), as in Python */
        if (acc)
            st = bin(P, N_AND, 0, t->line, acc, cmp, &acc);
        else
            acc = cmp;
        left = right;
    }
    *out = acc ? acc : left;
    return st;
}

static moe_status parse_not(parser *P, jnode **out)
{
    if (is_name(peek(P), "not")) {
        int line = next(P)->line;
        if (++P->depth > MAX_DEPTH)
            return perr(P, "expression nested too deeply%s", "");
        jnode *a;
        moe_status st = parse_not(P, &a);
        P->depth--;
        return st != MOE_OK ? st : bin(P, N_NOT, 0, line, a, NULL, out);
    }
    return parse_compare(P, out);
}

static moe_status parse_and(parser *P, jnode **out)
{
    moe_status st = parse_not(P, out);
    while (st == MOE_OK && is_name(peek(P), "and")) {
        int line = next(P)->line;
        jnode *r;
        if ((st = parse_not(P, &r)) == MOE_OK)
            st = bin(P, N_AND, 0, line, *out, r, out);
    }
    return st;
}

static moe_status parse_or(parser *P, jnode **out)
{
    moe_status st = parse_and(P, out);
    while (st == MOE_OK && is_name(peek(P), "or")) {
        int line = next(P)->line;
        jnode *r;
        if ((st = parse_and(P, &r)) == MOE_OK)
            st = bin(P, N_OR, 0, line, *out, r, out);
    }
    return st;
}

static moe_status parse_expr(parser *P, jnode **out)
{
    if (++P->depth > MAX_DEPTH)
        return perr(P, "expression nested too deeply%s", "");
    moe_status st = parse_or(P, out);
    while (st == MOE_OK && is_name(peek(P), "if")) {
        int line = next(P)->line;
        jnode *n = mk(P, N_COND, line);
        if (!n)
            return nomem();
        n->a = *out;
        if ((st = parse_or(P, &n->b)) != MOE_OK)
            return st;
        if (is_name(peek(P), "else")) {
            next(P);
            if ((st = parse_expr(P, &n->c)) != MOE_OK)
                return st;
        }
        *out = n;
    }
    P->depth--;
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Statements */

static moe_status parse_body(parser *P, jnode ***body, int *n, const char *const *ends,
                             int *which);

/* Names of a for/set target: a, b or (a, b). */
static moe_status parse_targets(parser *P, jnode *n)
{
    const char *names[16];
    int nn = 0;
    bool paren = is_op(peek(P), '(');
    if (paren)
        next(P);
    for (;;) {
        const jtok *t = next(P);
        if (t->kind != TK_NAME)
            return perr(P, "expected a variable name%s", "");
        if (nn == 16)
            return perr(P, "too many names to unpack%s", "");
        if (!(names[nn++] = dup_name(P, t)))
            return nomem();
        if (!is_op(peek(P), ','))
            break;
        next(P);
    }
    if (paren) {
        moe_status st = expect_op(P, ')', "')'");
        if (st != MOE_OK)
            return st;
    }
    n->names = ja_alloc(P->a, (size_t)nn * sizeof(char *));
    if (!n->names)
        return nomem();
    memcpy(n->names, names, (size_t)nn * sizeof(char *));
    n->nnames = nn;
    return MOE_OK;
}

static moe_status parse_if_rest(parser *P, int line, jnode **out)
{
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    jnode *n = mk(P, S_IF, line);
    if (!n)
        return nomem();
    moe_status st;
    int which;
    if ((st = parse_expr(P, &n->a)) != MOE_OK || (st = expect_block_end(P)) != MOE_OK ||
        (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK)
        return st;
    if (which == 0) {
        jnode *e;
        if ((st = parse_if_rest(P, peek(P)->line, &e)) != MOE_OK)
            return st;
        n->list2 = ja_alloc(P->a, sizeof(jnode *));
        if (!n->list2)
            return nomem();
        n->list2[0] = e;
        n->n2 = 1;
    } else if (which == 1) {
        static const char *const endif[] = {"endif", NULL};
        if ((st = expect_block_end(P)) != MOE_OK ||
            (st = parse_body(P, &n->list2, &n->n2, endif, &which)) != MOE_OK ||
            (st = expect_block_end(P)) != MOE_OK)
            return st;
    } else if ((st = expect_block_end(P)) != MOE_OK) {
        return st;
    }
    *out = n;
    return MOE_OK;
}

static moe_status parse_for(parser *P, int line, jnode **out)
{
    static const char *const ends[] = {"else", "endfor", NULL};
    static const char *const endfor[] = {"endfor", NULL};
    jnode *n = mk(P, S_FOR, line);
    if (!n)
        return nomem();
    moe_status st;
    int which;
    if ((st = parse_targets(P, n)) != MOE_OK)
        return st;
    if (!is_name(peek(P), "in"))
        return perr(P, "expected 'in' in a for loop%s", "");
    next(P);
    if ((st = parse_tuple(P, false, false, &n->a)) != MOE_OK)
        return st;
    if (is_name(peek(P), "if")) {
        next(P);
        if ((st = parse_expr(P, &n->b)) != MOE_OK)
            return st;
    }
    if (is_name(peek(P), "recursive"))
        return perr(P, "recursive for loops are not supported%s", "");
    if ((st = expect_block_end(P)) != MOE_OK ||
        (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK ||
        (st = expect_block_end(P)) != MOE_OK)
        return st;
    if (which == 0 && ((st = parse_body(P, &n->list2, &n->n2, endfor, &which)) != MOE_OK ||
                       (st = expect_block_end(P)) != MOE_OK))
        return st;
    *out = n;
    return MOE_OK;
}

static moe_status parse_set(parser *P, int line, jnode **out)
{
    jnode *n = mk(P, S_SET, line);
    if (!n)
        return nomem();
    moe_status st;
    /* set ns.attr = v */
    if (peek(P)->kind == TK_NAME && is_op(peek2(P), '.')) {
        const jtok *obj = next(P);
        next(P);
        const jtok *attr = next(P);
        if (attr->kind != TK_NAME)
            return perr(P, "expected an attribute name%s", "");
        n->str = dup_name(P, obj);
        n->len = obj->len;
        n->names = ja_alloc(P->a, sizeof(char *));
        if (!n->str || !n->names || !(n->names[0] = dup_name(P, attr)))
            return nomem();
        n->nnames = 1;
        n->op = 1; /* attribute target */
    } else if ((st = parse_targets(P, n)) != MOE_OK) {
        return st;
    }
    if (is_op(peek(P), '=')) {
        next(P);
        if ((st = parse_tuple(P, true, false, &n->a)) != MOE_OK || (st = expect_block_end(P)) != MOE_OK)
            return st;
    } else {
        static const char *const ends[] = {"endset", NULL};
        int which;
        if (n->op == 1 || n->nnames != 1)
            return perr(P, "a block set takes one variable name%s", "");
        n->kind = S_SETBLOCK;
        if ((st = expect_block_end(P)) != MOE_OK ||
            (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK ||
            (st = expect_block_end(P)) != MOE_OK)
            return st;
    }
    *out = n;
    return MOE_OK;
}

static moe_status parse_macro(parser *P, int line, jnode **out)
{
    static const char *const ends[] = {"endmacro", NULL};
    jnode *n = mk(P, S_MACRO, line);
    if (!n)
        return nomem();
    const jtok *nm = next(P);
    if (nm->kind != TK_NAME)
        return perr(P, "expected a macro name%s", "");
    n->str = nm->s;
    n->len = nm->len;
    moe_status st = expect_op(P, '(', "'(' after the macro name");
    if (st != MOE_OK)
        return st;
    const char *names[32];
    jnode *defs[32];
    int nn = 0;
    while (!is_op(peek(P), ')')) {
        if (nn > 0 && (st = expect_op(P, ',', "',' or ')'")) != MOE_OK)
            return st;
        const jtok *p = next(P);
        if (p->kind != TK_NAME)
            return perr(P, "expected a parameter name%s", "");
        if (nn == 32)
            return perr(P, "too many macro parameters%s", "");
        if (!(names[nn] = dup_name(P, p)))
            return nomem();
        defs[nn] = NULL;
        if (is_op(peek(P), '=')) {
            next(P);
            if ((st = parse_expr(P, &defs[nn])) != MOE_OK)
                return st;
        }
        nn++;
    }
    next(P);
    n->names = ja_alloc(P->a, (size_t)(nn ? nn : 1) * sizeof(char *));
    n->list2 = ja_alloc(P->a, (size_t)(nn ? nn : 1) * sizeof(jnode *));
    if (!n->names || !n->list2)
        return nomem();
    memcpy(n->names, names, (size_t)nn * sizeof(char *));
    memcpy(n->list2, defs, (size_t)nn * sizeof(jnode *));
    n->nnames = n->n2 = nn;
    int which;
    if ((st = expect_block_end(P)) != MOE_OK ||
        (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK)
        return st;
    if (peek(P)->kind == TK_NAME)
        next(P); /* {% endmacro name %} */
    if ((st = expect_block_end(P)) != MOE_OK)
        return st;
    *out = n;
    return MOE_OK;
}

static moe_status parse_statement(parser *P, jnode **out)
{
    const jtok *t = next(P);
    if (t->kind != TK_NAME)
        return perr(P, "expected a tag name after '{%%'%s", "");
    if (is_name(t, "if"))
        return parse_if_rest(P, t->line, out);
    if (is_name(t, "for"))
        return parse_for(P, t->line, out);
    if (is_name(t, "set"))
        return parse_set(P, t->line, out);
    if (is_name(t, "macro"))
        return parse_macro(P, t->line, out);
    if (is_name(t, "break") || is_name(t, "continue")) {
        jnode *n = mk(P, is_name(t, "break") ? S_BREAK : S_CONTINUE, t->line);
        if (!n)
            return nomem();
        *out = n;
        return expect_block_end(P);
    }
    if (is_name(t, "generation")) {
        /* transformers' AssistantTracker tag: renders its body unchanged */
        static const char *const ends[] = {"endgeneration", NULL};
        jnode *n = mk(P, S_BLOCK, t->line);
        int which;
        if (!n)
            return nomem();
        moe_status st;
        if ((st = expect_block_end(P)) != MOE_OK ||
            (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK)
            return st;
        *out = n;
        return expect_block_end(P);
    }
    char b[64];
    snprintf(b, sizeof(b), "%.*s", (int)(t->len < 60 ? t->len : 60), t->s);
    return perr(P, "unknown or unsupported tag '%s'", b);
}

/* Statements until one of `ends` (a block tag whose name is consumed; *which = its index) or,
 * when ends is NULL, the end of the template. */
static moe_status parse_body(parser *P, jnode ***body, int *n, const char *const *ends, int *which)
{
    if (++P->depth > MAX_DEPTH)
        return perr(P, "blocks nested too deeply%s", "");
    nvec v = {0};
    moe_status st = MOE_OK;
    for (;;) {
        const jtok *t = peek(P);
        jnode *s = NULL;
        if (t->kind == TK_EOF) {
            if (ends) {
                st = perr(P, "missing '{%% %s %%}' before the end of the template", ends[0]);
                goto fail;
            }
            break;
        }
        if (t->kind == TK_TEXT) {
            next(P);
            if (!(s = mk(P, S_TEXT, t->line))) {
                st = nomem();
                goto fail;
            }
            s->str = t->s;
            s->len = t->len;
        } else if (t->kind == TK_VAR_BEGIN) {
            next(P);
            if (!(s = mk(P, S_OUT, t->line))) {
                st = nomem();
                goto fail;
            }
            if ((st = parse_tuple(P, true, false, &s->a)) != MOE_OK)
                goto fail;
            if (peek(P)->kind != TK_VAR_END) {
                st = perr(P, "expected '}}'%s", "");
                goto fail;
            }
            next(P);
        } else if (t->kind == TK_BLOCK_BEGIN) {
            const jtok *nm = peek2(P);
            int hit = -1;
            for (int k = 0; ends && ends[k]; k++)
                if (is_name(nm, ends[k]))
                    hit = k;
            if (hit >= 0) {
                next(P);
                next(P);
                *which = hit;
                break;
            }
            next(P);
            if ((st = parse_statement(P, &s)) != MOE_OK)
                goto fail;
        } else {
            st = perr(P, "unexpected token%s", "");
            goto fail;
        }
        if (!nv_push(&v, s)) {
            st = nomem();
            goto fail;
        }
    }
    *body = nv_finish(P, &v, n);
    P->depth--;
    return *body ? MOE_OK : nomem();
fail:
    free(v.v);
    return st;
}

moe_status ja_parse(const jtoks *t, ja_arena *a, jnode ***body, int *n_body)
{
    parser P = {.t = t, .a = a};
    int which;
    return parse_body(&P, body, n_body, NULL, &which);
}
