/* The Jinja parser's expressions (statements: common/jinja_stmt.c): tokens -> expression nodes,
 * with jinja2's grammar and operator precedence (jinja2/parser.py: condexpr < or < and < not <
 * compare < + - < ~ < * / // % < ** < unary < filters/tests < postfix < primary). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"
#include "common/jinja_parser.h"

const jtok *jp_peek(const parser *P) { return &P->t->toks[P->i]; }
const jtok *jp_peek2(const parser *P)
{
    return P->i + 1 < P->t->n ? &P->t->toks[P->i + 1] : &P->t->toks[P->t->n - 1];
}
const jtok *jp_next(parser *P)
{
    const jtok *t = &P->t->toks[P->i];
    if (t->kind != TK_EOF)
        P->i++;
    return t;
}

bool jp_is_op(const jtok *t, int op) { return t->kind == TK_OP && t->op == op; }
bool jp_is_name(const jtok *t, const char *s)
{
    return t->kind == TK_NAME && t->len == strlen(s) && memcmp(t->s, s, t->len) == 0;
}

moe_status jp_err(const parser *P, const char *fmt, const char *arg)
{
    char m[256];
    snprintf(m, sizeof(m), fmt, arg ? arg : "");
    return moe_error(MOE_ERR_FORMAT, "chat template line %d: %s", jp_peek(P)->line, m);
}

moe_status jp_nomem(void) { return moe_error(MOE_ERR_NOMEM, "chat template: out of memory"); }

jnode *jp_mk(parser *P, jnode_kind k, int line)
{
    jnode *n = ja_alloc(P->a, sizeof(*n));
    if (n) {
        n->kind = k;
        n->line = line;
    }
    return n;
}

bool jp_nv_push(nvec *v, jnode *n)
{
    if (!moe_grow((void **)&v->v, &v->cap, v->n + 1, sizeof(jnode *)))
        return false;
    v->v[v->n++] = n;
    return true;
}

/* Moves the vector into the arena (and frees it). */
jnode **jp_nv_finish(parser *P, nvec *v, int *n)
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

char *jp_dup_name(parser *P, const jtok *t)
{
    char *s = ja_alloc(P->a, t->len + 1);
    if (s)
        memcpy(s, t->s, t->len);
    return s;
}

moe_status jp_expect_op(parser *P, int op, const char *what)
{
    if (!jp_is_op(jp_peek(P), op))
        return jp_err(P, "expected %s", what);
    jp_next(P);
    return MOE_OK;
}

moe_status jp_expect_block_end(parser *P)
{
    if (jp_peek(P)->kind != TK_BLOCK_END)
        return jp_err(P, "expected '%%}'%s", "");
    jp_next(P);
    return MOE_OK;
}

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
    jp_next(P); /* ( */
    while (!jp_is_op(jp_peek(P), ')')) {
        if (pos.n + kw.n > 0 && (st = jp_expect_op(P, ',', "',' or ')' in a call")) != MOE_OK)
            goto out;
        if (jp_is_op(jp_peek(P), ')'))
            break;
        jnode *e;
        if (jp_peek(P)->kind == TK_NAME && jp_is_op(jp_peek2(P), '=')) {
            const char *nm = jp_dup_name(P, jp_next(P));
            jp_next(P);
            if (!nm || !moe_grow((void **)&names, &ncap, nn + 1, sizeof(char *))) {
                st = jp_nomem();
                goto out;
            }
            names[nn++] = nm;
            if ((st = jp_expr(P, &e)) != MOE_OK)
                goto out;
            if (!jp_nv_push(&kw, e)) {
                st = jp_nomem();
                goto out;
            }
        } else {
            if (kw.n > 0) {
                st = jp_err(P, "positional argument after a keyword argument%s", "");
                goto out;
            }
            if ((st = jp_expr(P, &e)) != MOE_OK)
                goto out;
            if (!jp_nv_push(&pos, e)) {
                st = jp_nomem();
                goto out;
            }
        }
    }
    jp_next(P); /* ) */
    n->list = jp_nv_finish(P, &pos, &n->n);
    n->list2 = jp_nv_finish(P, &kw, &n->n2);
    n->nnames = nn;
    n->names = ja_alloc(P->a, (size_t)(nn ? nn : 1) * sizeof(char *));
    if (!n->list || !n->list2 || !n->names) {
        st = jp_nomem();
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
moe_status jp_tuple(parser *P, bool condexpr, bool paren, jnode **out)
{
    const int line = jp_peek(P)->line;
    nvec items = {0};
    bool comma = false;
    moe_status st = MOE_OK;
    for (;;) {
        if (items.n > 0) {
            if (!jp_is_op(jp_peek(P), ','))
                break;
            jp_next(P);
            comma = true;
        }
        const jtok *t = jp_peek(P);
        if (t->kind == TK_BLOCK_END || t->kind == TK_VAR_END || jp_is_op(t, ')') ||
            (items.n > 0 && jp_is_name(t, "if") && !condexpr))
            break;
        if (paren && items.n == 0 && jp_is_op(t, ')'))
            break;
        jnode *e;
        st = condexpr ? jp_expr(P, &e) : parse_or(P, &e);
        if (st != MOE_OK)
            goto fail;
        if (!jp_nv_push(&items, e)) {
            st = jp_nomem();
            goto fail;
        }
    }
    if (items.n == 1 && !comma) {
        *out = items.v[0];
        free(items.v);
        return MOE_OK;
    }
    if (items.n == 0 && !paren) {
        st = jp_err(P, "expected an expression%s", "");
        goto fail;
    }
    jnode *n = jp_mk(P, N_TUPLE, line);
    if (!n) {
        st = jp_nomem();
        goto fail;
    }
    n->list = jp_nv_finish(P, &items, &n->n);
    *out = n;
    return n->list ? MOE_OK : jp_nomem();
fail:
    free(items.v);
    return st;
}

static moe_status parse_list_or_dict(parser *P, bool dict, jnode **out)
{
    const int line = jp_next(P)->line; /* [ or { */
    nvec keys = {0}, vals = {0};
    const int close = dict ? '}' : ']';
    moe_status st = MOE_OK;
    while (!jp_is_op(jp_peek(P), close)) {
        if (keys.n > 0 && (st = jp_expect_op(P, ',', dict ? "',' or '}'" : "',' or ']'")) != MOE_OK)
            goto out;
        if (jp_is_op(jp_peek(P), close))
            break;
        jnode *k, *v = NULL;
        if ((st = jp_expr(P, &k)) != MOE_OK)
            goto out;
        if (dict) {
            if ((st = jp_expect_op(P, ':', "':' in a dict literal")) != MOE_OK ||
                (st = jp_expr(P, &v)) != MOE_OK)
                goto out;
        }
        if (!jp_nv_push(&keys, k) || (dict && !jp_nv_push(&vals, v))) {
            st = jp_nomem();
            goto out;
        }
    }
    jp_next(P);
    jnode *n = jp_mk(P, dict ? N_DICT : N_LIST, line);
    if (!n) {
        st = jp_nomem();
        goto out;
    }
    n->list = jp_nv_finish(P, &keys, &n->n);
    n->list2 = jp_nv_finish(P, &vals, &n->n2);
    *out = n;
    if (!n->list || !n->list2)
        st = jp_nomem();
out:
    free(keys.v);
    free(vals.v);
    return st;
}

static moe_status parse_primary(parser *P, jnode **out)
{
    const jtok *t = jp_peek(P);
    jnode *n;
    if (t->kind == TK_NAME) {
        jp_next(P);
        if (!(n = jp_mk(P, N_LIT, t->line)))
            return jp_nomem();
        if (jp_is_name(t, "true") || jp_is_name(t, "True"))
            n->lit = jv_bool(true);
        else if (jp_is_name(t, "false") || jp_is_name(t, "False"))
            n->lit = jv_bool(false);
        else if (jp_is_name(t, "none") || jp_is_name(t, "None"))
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
        if (!s || !(n = jp_mk(P, N_LIT, t->line)))
            return jp_nomem();
        size_t o = 0;
        while (jp_peek(P)->kind == TK_STRING) {
            const jtok *x = jp_next(P);
            memcpy(s + o, x->s, x->len);
            o += x->len;
        }
        n->lit = jv_str(P->a, s, total);
        if (n->lit.k != JV_STR)
            return jp_nomem();
    } else if (t->kind == TK_INT || t->kind == TK_FLOAT) {
        jp_next(P);
        if (!(n = jp_mk(P, N_LIT, t->line)))
            return jp_nomem();
        n->lit = t->kind == TK_INT ? jv_int(t->ival) : jv_float(t->fval);
    } else if (jp_is_op(t, '(')) {
        jp_next(P);
        moe_status st = jp_tuple(P, true, true, &n);
        if (st != MOE_OK)
            return st;
        if ((st = jp_expect_op(P, ')', "')'")) != MOE_OK)
            return st;
    } else if (jp_is_op(t, '[') || jp_is_op(t, '{')) {
        moe_status st = parse_list_or_dict(P, jp_is_op(t, '{'), &n);
        if (st != MOE_OK)
            return st;
    } else {
        return jp_err(P, "unexpected %s", t->kind == TK_BLOCK_END ? "'%}'"
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
    const int line = jp_next(P)->line;
    jnode *parts[3] = {NULL, NULL, NULL};
    int np = 0;
    bool slice = false;
    moe_status st;
    for (;;) {
        if (!jp_is_op(jp_peek(P), ':') && !jp_is_op(jp_peek(P), ']')) {
            if ((st = jp_expr(P, &parts[np])) != MOE_OK)
                return st;
        }
        if (jp_is_op(jp_peek(P), ':')) {
            slice = true;
            jp_next(P);
            if (++np > 2)
                return jp_err(P, "too many ':' in a slice%s", "");
            continue;
        }
        break;
    }
    if ((st = jp_expect_op(P, ']', "']'")) != MOE_OK)
        return st;
    jnode *n = jp_mk(P, slice ? N_SLICE : N_ITEM, line);
    if (!n)
        return jp_nomem();
    n->a = obj;
    n->b = parts[0];
    n->c = parts[1];
    n->d = parts[2];
    if (!slice && !parts[0])
        return jp_err(P, "empty subscript%s", "");
    *out = n;
    return MOE_OK;
}

static moe_status parse_postfix(parser *P, jnode **io)
{
    for (;;) {
        const jtok *t = jp_peek(P);
        moe_status st;
        if (jp_is_op(t, '.')) {
            jp_next(P);
            const jtok *nm = jp_next(P);
            jnode *n;
            if (nm->kind == TK_NAME) {
                if (!(n = jp_mk(P, N_ATTR, nm->line)))
                    return jp_nomem();
                n->str = nm->s;
                n->len = nm->len;
                n->a = *io;
            } else if (nm->kind == TK_INT) {
                jnode *k = jp_mk(P, N_LIT, nm->line);
                if (!k || !(n = jp_mk(P, N_ITEM, nm->line)))
                    return jp_nomem();
                k->lit = jv_int(nm->ival);
                n->a = *io;
                n->b = k;
            } else {
                return jp_err(P, "expected a name after '.'%s", "");
            }
            *io = n;
        } else if (jp_is_op(t, '[')) {
            if ((st = parse_subscript(P, *io, io)) != MOE_OK)
                return st;
        } else if (jp_is_op(t, '(')) {
            jnode *n = jp_mk(P, N_CALL, t->line);
            if (!n)
                return jp_nomem();
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
        const jtok *t = jp_peek(P);
        moe_status st;
        if (jp_is_op(t, '|')) {
            jp_next(P);
            const jtok *nm = jp_next(P);
            if (nm->kind != TK_NAME)
                return jp_err(P, "expected a filter name after '|'%s", "");
            if (!ja_filter_known(nm->s, nm->len)) {
                char b[64];
                snprintf(b, sizeof(b), "%.*s", (int)(nm->len < 60 ? nm->len : 60), nm->s);
                return jp_err(P, "no filter named '%s'", b);
            }
            jnode *n = jp_mk(P, N_FILTER, nm->line);
            if (!n)
                return jp_nomem();
            n->str = nm->s;
            n->len = nm->len;
            n->a = *io;
            if (jp_is_op(jp_peek(P), '(')) {
                if ((st = parse_args(P, n)) != MOE_OK)
                    return st;
            }
            *io = n;
        } else if (jp_is_name(t, "is")) {
            jp_next(P);
            bool neg = false;
            if (jp_is_name(jp_peek(P), "not")) {
                jp_next(P);
                neg = true;
            }
            const jtok *nm = jp_next(P);
            if (nm->kind != TK_NAME)
                return jp_err(P, "expected a test name after 'is'%s", "");
            if (!ja_test_known(nm->s, nm->len)) {
                char b[64];
                snprintf(b, sizeof(b), "%.*s", (int)(nm->len < 60 ? nm->len : 60), nm->s);
                return jp_err(P, "no test named '%s'", b);
            }
            jnode *n = jp_mk(P, N_TEST, nm->line);
            if (!n)
                return jp_nomem();
            n->str = nm->s;
            n->len = nm->len;
            n->op = neg;
            n->a = *io;
            const jtok *x = jp_peek(P);
            if (jp_is_op(x, '(')) {
                if ((st = parse_args(P, n)) != MOE_OK)
                    return st;
            } else if ((x->kind == TK_NAME || x->kind == TK_STRING || x->kind == TK_INT ||
                        x->kind == TK_FLOAT || jp_is_op(x, '[') || jp_is_op(x, '{')) &&
                       !jp_is_name(x, "else") && !jp_is_name(x, "or") && !jp_is_name(x, "and")) {
                if (jp_is_name(x, "is"))
                    return jp_err(P, "cannot chain tests with 'is'%s", "");
                jnode *arg;
                if ((st = parse_primary(P, &arg)) != MOE_OK || (st = parse_postfix(P, &arg)) != MOE_OK)
                    return st;
                n->list = ja_alloc(P->a, sizeof(jnode *));
                if (!n->list)
                    return jp_nomem();
                n->list[0] = arg;
                n->n = 1;
            }
            *io = n;
        } else if (jp_is_op(t, '(')) {
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
        return jp_err(P, "expression nested too deeply%s", "");
    const jtok *t = jp_peek(P);
    moe_status st;
    if (jp_is_op(t, '-') || jp_is_op(t, '+')) {
        jp_next(P);
        jnode *n = jp_mk(P, jp_is_op(t, '-') ? N_NEG : N_POS, t->line);
        if (!n)
            return jp_nomem();
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
    jnode *n = jp_mk(P, k, line);
    if (!n)
        return jp_nomem();
    n->op = op;
    n->a = a;
    n->b = b;
    *out = n;
    return MOE_OK;
}

static moe_status parse_pow(parser *P, jnode **out)
{
    moe_status st = parse_unary(P, true, out);
    while (st == MOE_OK && jp_is_op(jp_peek(P), OP_POW)) {
        int line = jp_next(P)->line;
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
        const jtok *t = jp_peek(P);
        if (st != MOE_OK || !(jp_is_op(t, '*') || jp_is_op(t, '/') || jp_is_op(t, '%') || jp_is_op(t, OP_FLOORDIV)))
            return st;
        jp_next(P);
        jnode *r;
        if ((st = parse_pow(P, &r)) == MOE_OK)
            st = bin(P, N_BIN, t->op, t->line, *out, r, out);
    }
}

static moe_status parse_concat(parser *P, jnode **out)
{
    moe_status st = parse_math2(P, out);
    while (st == MOE_OK && jp_is_op(jp_peek(P), '~')) {
        int line = jp_next(P)->line;
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
        const jtok *t = jp_peek(P);
        if (st != MOE_OK || !(jp_is_op(t, '+') || jp_is_op(t, '-')))
            return st;
        jp_next(P);
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
        const jtok *t = jp_peek(P);
        jnode_kind k;
        int op;
        if (t->kind == TK_OP && (t->op == OP_EQ || t->op == OP_NE || t->op == '<' ||
                                 t->op == '>' || t->op == OP_LE || t->op == OP_GE)) {
            jp_next(P);
            k = N_CMP;
            op = t->op;
        } else if (jp_is_name(t, "in")) {
            jp_next(P);
            k = N_IN;
            op = 0;
        } else if (jp_is_name(t, "not") && jp_is_name(jp_peek2(P), "in")) {
            jp_next(P);
            jp_next(P);
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
    if (jp_is_name(jp_peek(P), "not")) {
        int line = jp_next(P)->line;
        if (++P->depth > MAX_DEPTH)
            return jp_err(P, "expression nested too deeply%s", "");
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
    while (st == MOE_OK && jp_is_name(jp_peek(P), "and")) {
        int line = jp_next(P)->line;
        jnode *r;
        if ((st = parse_not(P, &r)) == MOE_OK)
            st = bin(P, N_AND, 0, line, *out, r, out);
    }
    return st;
}

static moe_status parse_or(parser *P, jnode **out)
{
    moe_status st = parse_and(P, out);
    while (st == MOE_OK && jp_is_name(jp_peek(P), "or")) {
        int line = jp_next(P)->line;
        jnode *r;
        if ((st = parse_and(P, &r)) == MOE_OK)
            st = bin(P, N_OR, 0, line, *out, r, out);
    }
    return st;
}

moe_status jp_expr(parser *P, jnode **out)
{
    if (++P->depth > MAX_DEPTH)
        return jp_err(P, "expression nested too deeply%s", "");
    moe_status st = parse_or(P, out);
    while (st == MOE_OK && jp_is_name(jp_peek(P), "if")) {
        int line = jp_next(P)->line;
        jnode *n = jp_mk(P, N_COND, line);
        if (!n)
            return jp_nomem();
        n->a = *out;
        if ((st = parse_or(P, &n->b)) != MOE_OK)
            return st;
        if (jp_is_name(jp_peek(P), "else")) {
            jp_next(P);
            if ((st = jp_expr(P, &n->c)) != MOE_OK)
                return st;
        }
        *out = n;
    }
    P->depth--;
    return st;
}
