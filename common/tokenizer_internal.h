/* Internals of the tokenizer module (common/tokenizer*.c only): the loaded pipeline, hash maps,
 * an arena for per-call strings, UTF-8 helpers and the regex wrapper. Nobody else includes this. */
#ifndef MOE_COMMON_TOKENIZER_INTERNAL_H
#define MOE_COMMON_TOKENIZER_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "common/tokenizer.h"
#include "common/utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/* ---- byte buffers and arena ---- */

typedef struct {
    char *p;
    size_t len, cap;
} tok_buf;

/* All return false only when out of memory. */
bool tok_buf_reserve(tok_buf *b, size_t extra);
bool tok_buf_put(tok_buf *b, const void *s, size_t n);
void tok_buf_free(tok_buf *b);

/* Bump allocator for the strings of one encode call: freed all at once. */
typedef struct tok_arena_chunk tok_arena_chunk;
typedef struct {
    tok_arena_chunk *head;
} tok_arena;
void *tok_arena_alloc(tok_arena *a, size_t n); /* NULL when out of memory */
void tok_arena_free(tok_arena *a);

/* ---- Unicode predicates (UTF-8 itself: common/utf8.h) ---- */

/* Unicode White_Space, as Rust's char::is_whitespace and Oniguruma's \s. */
bool tok_is_white_space(uint32_t cp);
/* Rust regex \w: alphabetic, marks, decimal digits, connector punctuation, ZWJ/ZWNJ. */
bool tok_is_word_char(uint32_t cp);
/* Rust char::is_numeric: general categories Nd, Nl, No. */
bool tok_is_numeric(uint32_t cp);

/* The GPT-2 byte <-> printable code point table of byte-level BPE. */
extern const uint16_t tok_byte_to_cp[256];
/* Byte for code point cp, or -1 when cp is not one of the 256 byte-level code points. */
int tok_cp_to_byte(uint32_t cp);

/* ---- hash maps ---- */

/* String -> int32, open addressing; keys are borrowed and must outlive the map. */
typedef struct {
    const char **keys;
    uint32_t *lens;
    int32_t *vals;
    uint32_t cap, n; /* cap is a power of two */
} tok_strmap;
bool tok_strmap_init(tok_strmap *m, size_t expected);
void tok_strmap_free(tok_strmap *m);
/* Inserts or overwrites. False only when out of memory. */
bool tok_strmap_put(tok_strmap *m, const char *key, uint32_t len, int32_t val);
/* Value for key, or -1. */
int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len);

/* (left id, right id) -> (merge rank, merged id). */
typedef struct {
    uint64_t *keys; /* UINT64_MAX marks an empty slot */
    uint32_t *ranks;
    int32_t *ids;
    uint32_t cap, n;
} tok_pairmap;
bool tok_pairmap_init(tok_pairmap *m, size_t expected);
void tok_pairmap_free(tok_pairmap *m);
bool tok_pairmap_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t id);
/* True, with rank and id set, when (a, b) merges. */
bool tok_pairmap_get(const tok_pairmap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *id);

/* ---- regex (PCRE2 with Oniguruma's meaning of \s) ---- */

typedef struct {
    pcre2_code *code;
    bool jit;
} tok_regex;

/* Compiles an Oniguruma-style pattern (tokenizer.json "Regex") or, with literal, a plain string.
 * On failure returns MOE_ERR_UNSUPPORTED with a message naming `field`. */
moe_status tok_regex_compile(tok_regex *re, const char *pattern, size_t len, bool literal,
                             const char *name, const char *field);
void tok_regex_free(tok_regex *re);
/* Finds the first match in s[0..n) at or after start. Returns 1 (match: ms, me set), 0 (none),
 * or -1 (matching error, e.g. resource limit). md comes from pcre2_match_data_create. */
int tok_regex_find(const tok_regex *re, const char *s, size_t n, size_t start, size_t *ms,
                   size_t *me, pcre2_match_data *md);

/* ---- the loaded pipeline ---- */

enum {
    TOK_NORM_NFC,
    TOK_NORM_NFKC,
    TOK_NORM_NFD,
    TOK_NORM_NFKD,
    TOK_NORM_PREPEND,
    TOK_NORM_REPLACE,
    TOK_NORM_STRIP
};

typedef struct {
    int type;
    char *str; /* Prepend: the prefix; Replace: the content */
    size_t str_len;
    tok_regex re;     /* Replace: the pattern */
    bool left, right; /* Strip */
} tok_norm;

enum { TOK_PRE_SPLIT, TOK_PRE_BYTELEVEL, TOK_PRE_METASPACE, TOK_PRE_DIGITS };
enum {
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_MERGED_PREV,
    TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS
};
enum { TOK_PREPEND_FIRST, TOK_PREPEND_ALWAYS, TOK_PREPEND_NEVER };

typedef struct {
    int type;
    tok_regex re; /* Split's pattern; ByteLevel's GPT-2 pattern when use_regex */
    int behavior; /* Split */
    bool invert;  /* Split */
    bool add_prefix_space, use_regex; /* ByteLevel */
    char repl[5];                     /* Metaspace replacement, UTF-8 */
    size_t repl_len;
    uint32_t repl_cp;
    int prepend_scheme;
    bool split;             /* Metaspace */
    bool individual_digits; /* Digits */
} tok_pretok;

enum {
    TOK_DEC_BYTELEVEL,
    TOK_DEC_METASPACE,
    TOK_DEC_REPLACE,
    TOK_DEC_BYTEFALLBACK,
    TOK_DEC_FUSE,
    TOK_DEC_STRIP,
    TOK_DEC_JOIN /* no decoder: HF joins the tokens with spaces */
};

typedef struct {
    int type;
    char *pattern, *content; /* Replace */
    size_t pattern_len, content_len;
    char ch[5]; /* Strip content / Metaspace replacement, UTF-8 */
    size_t ch_len;
    int start, stop;    /* Strip */
    int prepend_scheme; /* Metaspace */
} tok_dec;

/* One element of a post-processor template for a single sequence: the sequence itself
 * (ids == NULL) or a run of special-token ids. */
typedef struct {
    int32_t *ids;
    size_t n;
} tok_tmpl_item;

typedef struct {
    tok_tmpl_item *items;
    size_t n_items;
} tok_post;

typedef struct {
    char *content;
    uint32_t len;
    char *ncontent; /* normalized=true: the normalized content, what HF matches and decodes */
    uint32_t nlen;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added;

/* Byte trie over added-token contents, for leftmost-longest matching. */
typedef struct {
    uint8_t byte;
    int32_t child, sibling;
    int32_t added; /* index into tok->added of the token ending here, or -1 */
} tok_trie_node;

typedef struct {
    tok_trie_node *nodes; /* nodes[0] is the root */
    size_t n, cap;
    uint8_t first[32]; /* bitmap of first bytes, to skip positions quickly */
} tok_trie;

/* Per-pre-token BPE result cache, shared by threads under a mutex. */
typedef struct {
    pthread_mutex_t mu;
    char **keys;
    uint32_t *key_lens;
    int32_t **vals; /* vals[i][0] = count, then ids */
    uint32_t cap, n;
} tok_cache;

struct moe_tokenizer {
    char *name;

    /* model: BPE */
    int32_t n_ids; /* max id + 1 over vocab and added tokens */
    char **id_str; /* id -> token string (added tokens override the vocab), or NULL */
    uint32_t *id_len;
    uint8_t *id_special; /* 1 when the id decodes to a special added token's content */
    char **vocab_keys;   /* owned vocab strings */
    size_t n_vocab;
    tok_strmap vocab;
    tok_pairmap merges;
    int32_t unk_id; /* -1 without unk_token */
    bool fuse_unk, byte_fallback, ignore_merges;
    char *cont_prefix, *eow_suffix;
    size_t cont_prefix_len, eow_suffix_len;
    int32_t byte_ids[256]; /* "<0xNN>" ids, -1 where absent */

    /* added tokens */
    tok_added *added;
    size_t n_added;
    tok_strmap added_map; /* content -> id */
    tok_trie trie_raw, trie_norm;

    /* pipeline (nested Sequences are flattened) */
    tok_norm *norms;
    size_t n_norms;
    tok_pretok *pretoks;
    size_t n_pretoks;
    tok_dec *decs;
    size_t n_decs;
    tok_post post;

    tok_cache *cache; /* behind a pointer: mutable through a const tokenizer */
};

/* ---- loading (tokenizer.c: helpers; tokenizer_config.c: components) ---- */

/* Ids beyond this are refused: real vocabularies stay far below, and the id table is dense. */
#define TOK_MAX_ID (1 << 22)

typedef struct {
    moe_tokenizer *tok;
    const char *name; /* for messages: "NAME: FIELD: what is wrong" */
} tok_loader;

/* Each sets the error message ("NAME: PATH ..." ) and returns its status. */
moe_status tok_unsupported(const tok_loader *L, const char *path, const char *what);
moe_status tok_bad(const tok_loader *L, const char *path, const char *why);
moe_status tok_nomem(const tok_loader *L);
char *tok_strndup(const char *s, size_t n); /* NULL when out of memory */
/* Optional fields of obj (absent or null gives dflt / NULL); PATH.KEY names them in errors. */
moe_status tok_get_bool(const tok_loader *L, const cJSON *obj, const char *key, bool dflt,
                        bool *out, const char *path);
moe_status tok_get_str(const tok_loader *L, const cJSON *obj, const char *key, const char **out,
                       const char *path);
moe_status tok_get_int(const tok_loader *L, const cJSON *obj, const char *key, long dflt, long lo,
                       long hi, long *out, const char *path);
const char *tok_type_of(const cJSON *obj); /* obj.type, or NULL */

/* Append the steps of one JSON component (null: none) to L->tok; *cap is the array capacity. */
moe_status tok_parse_normalizer(tok_loader *L, const cJSON *j, const char *path, size_t *cap);
moe_status tok_parse_pretok(tok_loader *L, const cJSON *j, const char *path, size_t *cap);
moe_status tok_parse_decoder(tok_loader *L, const cJSON *j, const char *path, size_t *cap);
/* Composes the processor into L->tok->post. */
moe_status tok_parse_post(tok_loader *L, const cJSON *j, const char *path);
void tok_free_items(tok_tmpl_item *items, size_t n);

/* ---- BPE (tokenizer_bpe.c) ---- */

typedef struct {
    int32_t *v;
    size_t n, cap;
} tok_ids;
bool tok_ids_push(tok_ids *ids, int32_t id); /* false when out of memory */

typedef struct {
    int32_t id, prev, next;
    uint32_t len; /* bytes covered; 0: merged into its left neighbour */
} tok_bpe_sym;

typedef struct {
    uint32_t rank, pos;
    int32_t id;
} tok_bpe_merge;

/* Per-call scratch of the BPE merge, reused across pre-tokens. */
typedef struct {
    tok_bpe_sym *syms;
    size_t syms_cap;
    tok_bpe_merge *heap;
    size_t heap_cap;
    tok_buf tmp;
} tok_bpe_scratch;
void tok_bpe_scratch_free(tok_bpe_scratch *sc);

/* Appends the ids of one pre-token (valid UTF-8) to out, through the shared cache. */
moe_status tok_bpe_encode(const moe_tokenizer *tok, tok_bpe_scratch *sc, const char *s, size_t n,
                          tok_ids *out);

/* tokenizer_encode.c: builds both added-token tries and sets tok_added.ncontent (needs the
 * normalizers loaded). */
moe_status tok_build_tries(moe_tokenizer *tok);
void tok_trie_free(tok_trie *t);
/* Applies the normalizers to s[0..n) into out (cleared first). */
moe_status tok_normalize(const moe_tokenizer *tok, const char *s, size_t n, tok_buf *out);
tok_cache *tok_cache_create(void); /* NULL when out of memory */
void tok_cache_free(tok_cache *c);

#endif
