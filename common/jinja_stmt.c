/* The Jinja parser's statements: if/elif/else, for, set, macro, break/continue, generation, and
 * the body of a template (expressions: common/jinja_parse.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jinja_parser.h"

static moe_status parse_body(parser *P, jnode ***body, int *n, const char *const *ends,
                             int *which);

/* Names of a for/set target: a, b or (a, b). */
static moe_status parse_targets(parser *P, jnode *n)
{
    const char *names[16];
    int nn = 0;
    bool paren = jp_is_op(jp_peek(P), '(');
    if (paren)
        jp_next(P);
    for (;;) {
        const jtok *t = jp_next(P);
        if (t->kind != TK_NAME)
            return jp_err(P, "expected a variable name%s", "");
        if (nn == 16)
            return jp_err(P, "too many names to unpack%s", "");
        if (!(names[nn++] = jp_dup_name(P, t)))
            return jp_nomem();
        if (!jp_is_op(jp_peek(P), ','))
            break;
        jp_next(P);
    }
    if (paren) {
        moe_status st = jp_expect_op(P, ')', "')'");
        if (st != MOE_OK)
            return st;
    }
    n->names = ja_alloc(P->a, (size_t)nn * sizeof(char *));
    if (!n->names)
        return jp_nomem();
    memcpy(n->names, names, (size_t)nn * sizeof(char *));
    n->nnames = nn;
    return MOE_OK;
}

static moe_status parse_if_rest(parser *P, int line, jnode **out)
{
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    jnode *n = jp_mk(P, S_IF, line);
    if (!n)
        return jp_nomem();
    moe_status st;
    int which;
    if ((st = jp_expr(P, &n->a)) != MOE_OK || (st = jp_expect_block_end(P)) != MOE_OK ||
        (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK)
        return st;
    if (which == 0) {
        jnode *e;
        if ((st = parse_if_rest(P, jp_peek(P)->line, &e)) != MOE_OK)
            return st;
        n->list2 = ja_alloc(P->a, sizeof(jnode *));
        if (!n->list2)
            return jp_nomem();
        n->list2[0] = e;
        n->n2 = 1;
    } else if (which == 1) {
        static const char *const endif[] = {"endif", NULL};
        if ((st = jp_expect_block_end(P)) != MOE_OK ||
            (st = parse_body(P, &n->list2, &n->n2, endif, &which)) != MOE_OK ||
            (st = jp_expect_block_end(P)) != MOE_OK)
            return st;
    } else if ((st = jp_expect_block_end(P)) != MOE_OK) {
        return st;
    }
    *out = n;
    return MOE_OK;
}

static moe_status parse_for(parser *P, int line, jnode **out)
{
    static const char *const ends[] = {"else", "endfor", NULL};
    static const char *const endfor[] = {"endfor", NULL};
    jnode *n = jp_mk(P, S_FOR, line);
    if (!n)
        return jp_nomem();
    moe_status st;
    int which;
    if ((st = parse_targets(P, n)) != MOE_OK)
        return st;
    if (!jp_is_name(jp_peek(P), "in"))
        return jp_err(P, "expected 'in' in a for loop%s", "");
    jp_next(P);
    if ((st = jp_tuple(P, false, false, &n->a)) != MOE_OK)
        return st;
    if (jp_is_name(jp_peek(P), "if")) {
        jp_next(P);
        if ((st = jp_expr(P, &n->b)) != MOE_OK)
            return st;
    }
    if (jp_is_name(jp_peek(P), "recursive"))
        return jp_err(P, "recursive for loops are not supported%s", "");
    if ((st = jp_expect_block_end(P)) != MOE_OK ||
        (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK ||
        (st = jp_expect_block_end(P)) != MOE_OK)
        return st;
    if (which == 0 && ((st = parse_body(P, &n->list2, &n->n2, endfor, &which)) != MOE_OK ||
                       (st = jp_expect_block_end(P)) != MOE_OK))
        return st;
    *out = n;
    return MOE_OK;
}

static moe_status parse_set(parser *P, int line, jnode **out)
{
    jnode *n = jp_mk(P, S_SET, line);
    if (!n)
        return jp_nomem();
    moe_status st;
    /* set ns.attr = v */
    if (jp_peek(P)->kind == TK_NAME && jp_is_op(jp_peek2(P), '.')) {
        const jtok *obj = jp_next(P);
        jp_next(P);
        const jtok *attr = jp_next(P);
        if (attr->kind != TK_NAME)
            return jp_err(P, "expected an attribute name%s", "");
        n->str = jp_dup_name(P, obj);
        n->len = obj->len;
        n->names = ja_alloc(P->a, sizeof(char *));
        if (!n->str || !n->names || !(n->names[0] = jp_dup_name(P, attr)))
            return jp_nomem();
        n->nnames = 1;
        n->op = 1; /* attribute target */
    } else if ((st = parse_targets(P, n)) != MOE_OK) {
        return st;
    }
    if (jp_is_op(jp_peek(P), '=')) {
        jp_next(P);
        if ((st = jp_tuple(P, true, false, &n->a)) != MOE_OK || (st = jp_expect_block_end(P)) != MOE_OK)
            return st;
    } else {
        static const char *const ends[] = {"endset", NULL};
        int which;
        if (n->op == 1 || n->nnames != 1)
            return jp_err(P, "a block set takes one variable name%s", "");
        n->kind = S_SETBLOCK;
        if ((st = jp_expect_block_end(P)) != MOE_OK ||
            (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK ||
            (st = jp_expect_block_end(P)) != MOE_OK)
            return st;
    }
    *out = n;
    return MOE_OK;
}

static moe_status parse_macro(parser *P, int line, jnode **out)
{
    static const char *const ends[] = {"endmacro", NULL};
    jnode *n = jp_mk(P, S_MACRO, line);
    if (!n)
        return jp_nomem();
    const jtok *nm = jp_next(P);
    if (nm->kind != TK_NAME)
        return jp_err(P, "expected a macro name%s", "");
    n->str = nm->s;
    n->len = nm->len;
    moe_status st = jp_expect_op(P, '(', "'(' after the macro name");
    if (st != MOE_OK)
        return st;
    const char *names[32];
    jnode *defs[32];
    int nn = 0;
    while (!jp_is_op(jp_peek(P), ')')) {
        if (nn > 0 && (st = jp_expect_op(P, ',', "',' or ')'")) != MOE_OK)
            return st;
        const jtok *p = jp_next(P);
        if (p->kind != TK_NAME)
            return jp_err(P, "expected a parameter name%s", "");
        if (nn == 32)
            return jp_err(P, "too many macro parameters%s", "");
        if (!(names[nn] = jp_dup_name(P, p)))
            return jp_nomem();
        defs[nn] = NULL;
        if (jp_is_op(jp_peek(P), '=')) {
            jp_next(P);
            if ((st = jp_expr(P, &defs[nn])) != MOE_OK)
                return st;
        }
        nn++;
    }
    jp_next(P);
    n->names = ja_alloc(P->a, (size_t)(nn ? nn : 1) * sizeof(char *));
    n->list2 = ja_alloc(P->a, (size_t)(nn ? nn : 1) * sizeof(jnode *));
    if (!n->names || !n->list2)
        return jp_nomem();
    memcpy(n->names, names, (size_t)nn * sizeof(char *));
    memcpy(n->list2, defs, (size_t)nn * sizeof(jnode *));
    n->nnames = n->n2 = nn;
    int which;
    if ((st = jp_expect_block_end(P)) != MOE_OK ||
        (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK)
        return st;
    if (jp_peek(P)->kind == TK_NAME)
        jp_next(P); /* {% endmacro name %} */
    if ((st = jp_expect_block_end(P)) != MOE_OK)
        return st;
    *out = n;
    return MOE_OK;
}

static moe_status parse_statement(parser *P, jnode **out)
{
    const jtok *t = jp_next(P);
    if (t->kind != TK_NAME)
        return jp_err(P, "expected a tag name after '{%%'%s", "");
    if (jp_is_name(t, "if"))
        return parse_if_rest(P, t->line, out);
    if (jp_is_name(t, "for"))
        return parse_for(P, t->line, out);
    if (jp_is_name(t, "set"))
        return parse_set(P, t->line, out);
    if (jp_is_name(t, "macro"))
        return parse_macro(P, t->line, out);
    if (jp_is_name(t, "break") || jp_is_name(t, "continue")) {
        jnode *n = jp_mk(P, jp_is_name(t, "break") ? S_BREAK : S_CONTINUE, t->line);
        if (!n)
            return jp_nomem();
        *out = n;
        return jp_expect_block_end(P);
    }
    if (jp_is_name(t, "generation")) {
        /* transformers' AssistantTracker tag: renders its body unchanged */
        static const char *const ends[] = {"endgeneration", NULL};
        jnode *n = jp_mk(P, S_BLOCK, t->line);
        int which;
        if (!n)
            return jp_nomem();
        moe_status st;
        if ((st = jp_expect_block_end(P)) != MOE_OK ||
            (st = parse_body(P, &n->list, &n->n, ends, &which)) != MOE_OK)
            return st;
        *out = n;
        return jp_expect_block_end(P);
    }
    char b[64];
    snprintf(b, sizeof(b), "%.*s", (int)(t->len < 60 ? t->len : 60), t->s);
    return jp_err(P, "unknown or unsupported tag '%s'", b);
}

/* Statements until one of `ends` (a block tag whose name is consumed; *which = its index) or,
 * when ends is NULL, the end of the template. */
static moe_status parse_body(parser *P, jnode ***body, int *n, const char *const *ends, int *which)
{
    if (++P->depth > MAX_DEPTH)
        return jp_err(P, "blocks nested too deeply%s", "");
    nvec v = {0};
    moe_status st = MOE_OK;
    for (;;) {
        const jtok *t = jp_peek(P);
        jnode *s = NULL;
        if (t->kind == TK_EOF) {
            if (ends) {
                st = jp_err(P, "missing '{%% %s %%}' before the end of the template", ends[0]);
                goto fail;
            }
            break;
        }
        if (t->kind == TK_TEXT) {
            jp_next(P);
            if (!(s = jp_mk(P, S_TEXT, t->line))) {
                st = jp_nomem();
                goto fail;
            }
            s->str = t->s;
            s->len = t->len;
        } else if (t->kind == TK_VAR_BEGIN) {
            jp_next(P);
            if (!(s = jp_mk(P, S_OUT, t->line))) {
                st = jp_nomem();
                goto fail;
            }
            if ((st = jp_tuple(P, true, false, &s->a)) != MOE_OK)
                goto fail;
            if (jp_peek(P)->kind != TK_VAR_END) {
                st = jp_err(P, "expected '}}'%s", "");
                goto fail;
            }
            jp_next(P);
        } else if (t->kind == TK_BLOCK_BEGIN) {
            const jtok *nm = jp_peek2(P);
            int hit = -1;
            for (int k = 0; ends && ends[k]; k++)
                if (jp_is_name(nm, ends[k]))
                    hit = k;
            if (hit >= 0) {
                jp_next(P);
                jp_next(P);
                *which = hit;
                break;
            }
            jp_next(P);
            if ((st = parse_statement(P, &s)) != MOE_OK)
                goto fail;
        } else {
            st = jp_err(P, "unexpected token%s", "");
            goto fail;
        }
        if (!jp_nv_push(&v, s)) {
            st = jp_nomem();
            goto fail;
        }
    }
    *body = jp_nv_finish(P, &v, n);
    P->depth--;
    return *body ? MOE_OK : jp_nomem();
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
