/* The Jinja parser's shared state and token helpers, for common/jinja_parse.c (expressions) and
 * common/jinja_stmt.c (statements) only. */
#ifndef MOE_COMMON_JINJA_PARSER_H
#define MOE_COMMON_JINJA_PARSER_H

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

const jtok *jp_peek(const parser *P);
const jtok *jp_peek2(const parser *P);
const jtok *jp_next(parser *P); /* stays on TK_EOF */
bool jp_is_op(const jtok *t, int op);
bool jp_is_name(const jtok *t, const char *s);
moe_status jp_err(const parser *P, const char *fmt, const char *arg); /* "line N: ..." */
moe_status jp_nomem(void);
jnode *jp_mk(parser *P, jnode_kind k, int line);
bool jp_nv_push(nvec *v, jnode *n);
jnode **jp_nv_finish(parser *P, nvec *v, int *n); /* into the arena; frees the vector */
char *jp_dup_name(parser *P, const jtok *t);
moe_status jp_expect_op(parser *P, int op, const char *what);
moe_status jp_expect_block_end(parser *P);
moe_status jp_expr(parser *P, jnode **out);
/* Comma-separated expressions: one, or a tuple. `paren`: inside (), where () and (a,) count. */
moe_status jp_tuple(parser *P, bool condexpr, bool paren, jnode **out);

#endif
