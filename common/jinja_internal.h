/* Internals of the Jinja engine (common/jinja.h), shared by its lexer, parser, values, builtins and
 * evaluator; nobody outside common/jinja*.c includes this. */
#ifndef MOE_COMMON_JINJA_INTERNAL_H
#define MOE_COMMON_JINJA_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "common/jinja.h"
#include "common/status.h"

/* ---------------------------------------------------------------------------------------------
 * Arena: every AST node of a template and every value of a render lives in one, freed at once. */

typedef struct ja_block ja_block;
typedef struct {
    ja_block *head;
    size_t used_total; /* bytes handed out */
    size_t limit;      /* 0 = none; ja_alloc fails past it */
} ja_arena;

void *ja_alloc(ja_arena *a, size_t n); /* zeroed; NULL when out of memory or past the limit */
void ja_free_all(ja_arena *a);

/* ---------------------------------------------------------------------------------------------
 * Values (Python's, as Jinja sees them). Lists, dicts and strings are immutable once built,
 * except namespaces (is_ns), which `set ns.attr` changes in place. */

typedef enum {
    JV_UNDEF, JV_NONE, JV_BOOL, JV_INT, JV_FLOAT, JV_STR, JV_LIST, JV_DICT, JV_MACRO, JV_FUNC,
} jv_kind;

typedef struct jstr {
    size_t len;
    char s[]; /* len bytes of UTF-8 and a NUL */
} jstr;

typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jnode jnode;

typedef struct {
    jv_kind k;
    union {
        bool b;
        int64_t i;
        double f;
        jstr *s;
        jlist *l;
        jdict *d;
        const jnode *m; /* JV_MACRO: its S_MACRO node */
        int fn;         /* JV_FUNC: index into the global function table */
    };
} jv;

struct jlist {
    int n, cap;
    bool tuple; /* printed (a, b) */
    jv *items;
};

struct jdict {
    int n, cap;
    bool is_ns; /* a namespace() object */
    jstr **keys; /* string keys only: chat contexts come from JSON */
    jv *vals;
};

/* ---------------------------------------------------------------------------------------------
 * AST */

typedef enum {
    /* expressions */
    N_LIT, N_NAME, N_ATTR, N_ITEM, N_SLICE, N_CALL, N_FILTER, N_TEST, N_NEG, N_POS, N_NOT,
    N_BIN, N_AND, N_OR, N_COND, N_LIST, N_TUPLE, N_DICT, N_CMP, N_IN, N_CONCAT,
    /* statements */
    S_TEXT, S_OUT, S_IF, S_FOR, S_SET, S_SETBLOCK, S_MACRO, S_BREAK, S_CONTINUE, S_BLOCK,
} jnode_kind;

struct jnode {
    jnode_kind kind;
    int line;
    int op;           /* N_BIN/N_CMP: the operator token code; N_IN/N_TEST: 1 = negated */
    const char *str;  /* N_NAME, N_ATTR, N_FILTER, N_TEST, S_TEXT, S_MACRO, S_SET(BLOCK) name */
    size_t len;
    jnode *a, *b, *c, *d;   /* operands; S_FOR: a = iterable, b = filter condition */
    jnode **list;           /* call/filter args, list/dict items, statement bodies */
    int n;
    jnode **list2;          /* kwarg values, dict values, else bodies */
    int n2;
    const char **names;     /* kwarg names, loop targets, macro parameters, set targets */
    int nnames;
    jv lit;                 /* N_LIT */
};

struct moe_jinja {
    ja_arena arena;
    jnode **body;
    int n_body;
};

/* ---------------------------------------------------------------------------------------------
 * Lexer */

enum {
    TK_EOF, TK_TEXT, TK_VAR_BEGIN, TK_VAR_END, TK_BLOCK_BEGIN, TK_BLOCK_END, TK_NAME, TK_STRING,
    TK_INT, TK_FLOAT, TK_OP,
};

/* Operator codes (TK_OP): the character itself for one-character operators, these for two. */
enum { OP_POW = 256, OP_FLOORDIV, OP_EQ, OP_NE, OP_LE, OP_GE };

typedef struct {
    int kind;
    int op;          /* TK_OP */
    const char *s;   /* TK_TEXT, TK_NAME, TK_STRING (unescaped, in the arena) */
    size_t len;
    int64_t ival;
    double fval;
    int line;
} jtok;

typedef struct {
    jtok *toks;
    int n, cap;
} jtoks;

/* Splits src into tokens (text with whitespace control applied as transformers configures
 * jinja2: trim_blocks, lstrip_blocks, no trailing newline kept). Strings go into `a`. */
moe_status ja_lex(const char *src, size_t len, ja_arena *a, jtoks *out);

/* Parser: tokens -> statements (in the arena). */
moe_status ja_parse(const jtoks *t, ja_arena *a, jnode ***body, int *n_body);

/* ---------------------------------------------------------------------------------------------
 * Values: constructors, Python's str()/repr()/json, truthiness, comparison */

typedef struct {
    char *p;
    size_t len, cap;
    size_t limit;
    bool failed;
} jbuf;

void jb_put(jbuf *b, const char *s, size_t n);
static inline void jb_puts(jbuf *b, const char *s);

jv jv_undef(void);
jv jv_none(void);
jv jv_bool(bool b);
jv jv_int(int64_t i);
jv jv_float(double f);
jv jv_str(ja_arena *a, const char *s, size_t n); /* k == JV_UNDEF when out of memory */
jlist *jv_list_new(ja_arena *a, int cap);
bool jv_list_push(ja_arena *a, jlist *l, jv v);
jdict *jv_dict_new(ja_arena *a, int cap);
bool jv_dict_set(ja_arena *a, jdict *d, const char *k, size_t klen, jv v);
jv *jv_dict_get(const jdict *d, const char *k, size_t klen);
jv jv_from_json(ja_arena *a, const void *cjson); /* cJSON * */

bool jv_truthy(jv v);
void jv_to_str(jbuf *b, jv v);   /* Python str() (undefined: "") */
void jv_repr(jbuf *b, jv v);     /* Python repr() */
void jv_to_json(jbuf *b, jv v, int indent, int depth); /* json.dumps(ensure_ascii=False) */
bool jv_eq(jv a, jv b);
/* <0, 0, >0; false when Python would raise TypeError (unorderable). */
bool jv_cmp(jv a, jv b, int *out);
const char *jv_type_name(jv v);
size_t ja_utf8_count(const char *s, size_t n); /* code points */
/* Byte offset of code point `cp` (clamped to n). */
size_t ja_utf8_offset(const char *s, size_t n, int64_t cp);
bool ja_is_space(uint32_t cp); /* Python's str.isspace() for one code point */

static inline void jb_puts(jbuf *b, const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    jb_put(b, s, n);
}

/* ---------------------------------------------------------------------------------------------
 * Evaluator and builtins */

typedef struct jctx jctx;

/* Arguments of a filter, test, method or global function call. */
typedef struct {
    jv *pos;
    int npos;
    const char **kwnames;
    jv *kw;
    int nkw;
} jargs;

/* Sets the render's error (with the current line) and returns false: the builtins' way to fail. */
bool jx_fail(jctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
ja_arena *jx_arena(jctx *c);
bool jx_oom(jctx *c); /* the render's memory limit was hit: MOE_ERR_RANGE */
/* common/jinja_ops.c: Python's binary operators (op: '+', '-', '*', '/', '%', OP_POW,
 * OP_FLOORDIV), `x in y`, and obj[key] (undefined when absent). */
bool ja_arith(jctx *c, int op, jv x, jv y, jv *out);
bool ja_in(jctx *c, jv x, jv y, bool *out);
bool ja_item(jctx *c, jv obj, jv key, jv *out);
/* A keyword argument, else positional `pos`, else NULL. */
const jv *jx_arg(const jargs *a, int pos, const char *name);
/* Calls a filter/test by name on v (used by select/map). */
bool jx_apply_filter(jctx *c, const char *name, size_t len, jv v, const jargs *args, jv *out);
bool jx_apply_test(jctx *c, const char *name, size_t len, jv v, const jargs *args, bool *out);

bool ja_filter_known(const char *name, size_t len);
bool ja_test_known(const char *name, size_t len);
bool ja_call_filter(jctx *c, const char *name, size_t len, jv v, const jargs *args, jv *out);
bool ja_call_test(jctx *c, const char *name, size_t len, jv v, const jargs *args, bool *out);
/* obj.name(args) for str/dict methods; *handled false when obj has no such method. */
bool ja_call_method(jctx *c, jv obj, const char *name, size_t len, const jargs *args, jv *out,
                    bool *handled);
/* Global functions: range, namespace, dict, raise_exception, strftime_now. -1 if none. */
int ja_global_func(const char *name, size_t len);
bool ja_call_global(jctx *c, int fn, const jargs *args, jv *out);

/* Shared by the builtins (common/jinja_strings.c): each fails through jx_fail like them. */
bool ja_oom(jctx *c);
bool ja_is_int(jv v);       /* int or bool */
int64_t ja_as_int(jv v);
bool ja_mkstr(jctx *c, const char *s, size_t n, jv *out);
bool ja_buf_done(jctx *c, jbuf *b, jv *out); /* the buffer as a string value; frees it */
bool ja_to_str(jctx *c, jv v, jv *out);      /* str(v) */
bool ja_need_str(jctx *c, jv v, const char *what);
uint32_t ja_utf8_next(const char *s, size_t n, size_t *i); /* U+FFFD on bad bytes */
void ja_put_cp(jbuf *b, uint32_t cp);
/* str.strip/lstrip/rstrip(chars): chars NULL or None = Unicode whitespace */
bool ja_strip(jctx *c, jv v, const jv *chars, bool left, bool right, jv *out);
bool ja_case(jctx *c, jv v, int mode, jv *out); /* 0 lower, 1 upper, 2 capitalize, 3 title */
bool ja_replace(jctx *c, jv v, jv old, jv new_, const jv *count, jv *out);
bool ja_list_of(jctx *c, jv v, jlist **out);    /* what iterating v yields */
jv ja_wrap_list(jlist *l);
bool ja_items(jctx *c, jv v, jv *out);          /* dict.items() as (key, value) tuples */
jv ja_attr_path(jv v, const jstr *path);        /* "a.b.0" as jinja2's attrgetter */
int ja_find_name(const char *const *names, size_t n_names, const char *s, size_t len);
bool ja_name_is(const char *name, size_t len, const char *want);

#endif
