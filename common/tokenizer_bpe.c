/* The BPE model, as HF's BPE::merge_word and Word::merge_all: characters (with byte fallback,
 * unk fusing, subword prefix/suffix) merged lowest rank first through a heap, ties broken by
 * position; plus the per-pre-token result cache shared by all threads. */
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/tokenizer_internal.h"

static moe_status oom(const moe_tokenizer *tok)
{
    return moe_error(MOE_ERR_NOMEM, "%s: out of memory while encoding", tok->name);
}

bool tok_ids_push(tok_ids *iv, int32_t id)
{
    if (iv->n == iv->cap) {
        size_t c = iv->cap ? iv->cap * 2 : 64;
        int32_t *v = realloc(iv->v, c * sizeof *v);
        if (!v)
            return false;
        iv->v = v;
        iv->cap = c;
    }
    iv->v[iv->n++] = id;
    return true;
}

void tok_bpe_scratch_free(tok_bpe_scratch *sc)
{
    free(sc->syms);
    free(sc->heap);
    tok_buf_free(&sc->tmp);
    memset(sc, 0, sizeof *sc);
}

static void heap_push(tok_bpe_merge *h, size_t *n, tok_bpe_merge m)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p].rank < m.rank || (h[p].rank == m.rank && h[p].pos <= m.pos))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = m;
}

static tok_bpe_merge heap_pop(tok_bpe_merge *h, size_t *n)
{
    tok_bpe_merge top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const tok_bpe_merge *best = &last;
        if (l < *n &&
            (h[l].rank < best->rank || (h[l].rank == best->rank && h[l].pos < best->pos))) {
            m = l;
            best = &h[l];
        }
        if (r < *n && (h[r].rank < best->rank || (h[r].rank == best->rank && h[r].pos < best->pos)))
            m = r;
        if (m == i)
            break;
        h[i] = h[m];
        i = m;
    }
    if (*n > 0)
        h[i] = last;
    return top;
}

static bool sym_add(tok_bpe_scratch *c, size_t *ns, int32_t id, uint32_t len)
{
    if (*ns == c->syms_cap) {
        size_t cap = c->syms_cap ? c->syms_cap * 2 : 64;
        tok_bpe_sym *s = realloc(c->syms, cap * sizeof *s);
        if (!s)
            return false;
        c->syms = s;
        c->syms_cap = cap;
    }
    int32_t i = (int32_t)*ns;
    c->syms[i] = (tok_bpe_sym){id, i - 1, -1, len};
    if (i > 0)
        c->syms[i - 1].next = i;
    (*ns)++;
    return true;
}

static moe_status unk_missing(const moe_tokenizer *tok)
{
    return moe_error(MOE_ERR_FORMAT, "%s: model.unk_token is needed but not in the vocabulary",
                     tok->name);
}

/* HF BPE::merge_word + Word::merge_all for one pre-token. */
static moe_status bpe_word(const moe_tokenizer *tok, tok_bpe_scratch *c, const char *s, size_t n,
                           tok_ids *out)
{
    if (tok->ignore_merges) {
        int32_t id = tok_strmap_get(&tok->vocab, s, n);
        if (id >= 0)
            return tok_ids_push(out, id) ? MOE_OK : oom(tok);
    }
    size_t ns = 0;
    int32_t unk = -1;
    uint32_t unk_len = 0;
    bool affix = tok->cont_prefix || tok->eow_suffix;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t l = moe_utf8_decode(s + i, &cp);
        const char *sym = s + i;
        size_t sym_len = l;
        if (affix) {
            c->tmp.len = 0;
            if ((i > 0 && tok->cont_prefix &&
                 !tok_buf_put(&c->tmp, tok->cont_prefix, tok->cont_prefix_len)) ||
                !tok_buf_put(&c->tmp, s + i, l) ||
                (i + l == n && tok->eow_suffix &&
                 !tok_buf_put(&c->tmp, tok->eow_suffix, tok->eow_suffix_len)))
                return oom(tok);
            sym = c->tmp.p;
            sym_len = c->tmp.len;
        }
        i += l;
        int32_t id = tok_strmap_get(&tok->vocab, sym, sym_len);
        if (id >= 0) {
            if (unk >= 0) {
                if (!sym_add(c, &ns, unk, unk_len))
                    return oom(tok);
                unk = -1;
            }
            if (!sym_add(c, &ns, id, (uint32_t)l))
                return oom(tok);
            continue;
        }
        if (tok->byte_fallback) {
            bool all = true;
            for (size_t k = 0; k < sym_len && all; k++)
                all = tok->byte_ids[(unsigned char)sym[k]] >= 0;
            if (all) {
                /* As HF: a pending unk is not flushed before the byte tokens. */
                for (size_t k = 0; k < sym_len; k++)
                    if (!sym_add(c, &ns, tok->byte_ids[(unsigned char)sym[k]], 1))
                        return oom(tok);
                continue;
            }
        }
        if (tok->unk_id == -1)
            continue; /* no unk token: HF drops the character */
        if (tok->unk_id < 0)
            return unk_missing(tok);
        if (unk >= 0 && tok->fuse_unk)
            unk_len += (uint32_t)l;
        else {
            if (unk >= 0 && !sym_add(c, &ns, unk, unk_len))
                return oom(tok);
            unk = tok->unk_id;
            unk_len = (uint32_t)l;
        }
    }
    if (unk >= 0 && !sym_add(c, &ns, unk, unk_len))
        return oom(tok);

    if (ns > 1) {
        if (c->heap_cap < ns * 2) {
            tok_bpe_merge *h = realloc(c->heap, ns * 2 * sizeof *h);
            if (!h)
                return oom(tok);
            c->heap = h;
            c->heap_cap = ns * 2;
        }
        size_t hn = 0;
        tok_bpe_sym *sy = c->syms;
        uint32_t rank;
        int32_t nid;
        for (size_t i = 0; i + 1 < ns; i++)
            if (tok_pairmap_get(&tok->merges, sy[i].id, sy[i + 1].id, &rank, &nid))
                heap_push(c->heap, &hn, (tok_bpe_merge){rank, (uint32_t)i, nid});
        while (hn > 0) {
            tok_bpe_merge top = heap_pop(c->heap, &hn);
            tok_bpe_sym *cur = &sy[top.pos];
            if (cur->len == 0 || cur->next < 0)
                continue;
            int32_t next_pos = cur->next;
            tok_bpe_sym right = sy[next_pos];
            if (!tok_pairmap_get(&tok->merges, cur->id, right.id, &rank, &nid) || nid != top.id)
                continue;
            cur->id = top.id;
            cur->len += right.len;
            cur->next = right.next;
            sy[next_pos].len = 0;
            if (right.next >= 0)
                sy[right.next].prev = (int32_t)top.pos;
            /* Each merge adds at most two entries and removes one: the heap never exceeds 2n. */
            if (hn + 2 > c->heap_cap) {
                tok_bpe_merge *h = realloc(c->heap, (c->heap_cap * 2 + 2) * sizeof *h);
                if (!h)
                    return oom(tok);
                c->heap = h;
                c->heap_cap = c->heap_cap * 2 + 2;
            }
            if (cur->prev >= 0 &&
                tok_pairmap_get(&tok->merges, sy[cur->prev].id, cur->id, &rank, &nid))
                heap_push(c->heap, &hn, (tok_bpe_merge){rank, (uint32_t)cur->prev, nid});
            if (cur->next >= 0 &&
                tok_pairmap_get(&tok->merges, cur->id, sy[cur->next].id, &rank, &nid))
                heap_push(c->heap, &hn, (tok_bpe_merge){rank, top.pos, nid});
        }
    }
    for (size_t i = 0; i < ns; i++)
        if (c->syms[i].len && !tok_ids_push(out, c->syms[i].id))
            return oom(tok);
    return MOE_OK;
}

/* ---- cache of pre-token -> ids ---- */

#define CACHE_CAP 16384  /* slots; filled to 3/4 and then left alone, as HF's cache */
#define CACHE_MAX_KEY 64 /* longer pre-tokens are rare and cheap to skip */

tok_cache *tok_cache_create(void)
{
    tok_cache *c = calloc(1, sizeof *c);
    if (c && pthread_mutex_init(&c->mu, NULL) != 0) {
        free(c);
        return NULL;
    }
    return c;
}

void tok_cache_free(tok_cache *c)
{
    if (!c)
        return;
    for (uint32_t i = 0; i < c->cap; i++) {
        free(c->keys[i]);
        free(c->vals[i]);
    }
    free(c->keys);
    free(c->key_lens);
    free(c->vals);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static uint32_t cache_hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h ^ (h >> 15);
}

/* Appends the cached ids of s to out; false on a miss (or when the lock is busy). */
static bool cache_get(tok_cache *c, const char *s, size_t n, tok_ids *out, bool *oom_flag)
{
    if (n > CACHE_MAX_KEY || pthread_mutex_trylock(&c->mu) != 0)
        return false;
    bool hit = false;
    if (c->cap) {
        uint32_t i = cache_hash(s, n) & (c->cap - 1);
        while (c->keys[i]) {
            if (c->key_lens[i] == n && memcmp(c->keys[i], s, n) == 0) {
                const int32_t *v = c->vals[i];
                hit = true;
                for (int32_t k = 0; k < v[0]; k++)
                    if (!tok_ids_push(out, v[1 + k])) {
                        *oom_flag = true;
                        break;
                    }
                break;
            }
            i = (i + 1) & (c->cap - 1);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return hit;
}

static void cache_put(tok_cache *c, const char *s, size_t n, const int32_t *ids, size_t k)
{
    if (n > CACHE_MAX_KEY || pthread_mutex_trylock(&c->mu) != 0)
        return;
    if (!c->cap) {
        c->keys = calloc(CACHE_CAP, sizeof *c->keys);
        c->key_lens = calloc(CACHE_CAP, sizeof *c->key_lens);
        c->vals = calloc(CACHE_CAP, sizeof *c->vals);
        if (c->keys && c->key_lens && c->vals)
            c->cap = CACHE_CAP;
        else {
            free(c->keys);
            free(c->key_lens);
            free(c->vals);
            c->keys = NULL;
            c->key_lens = NULL;
            c->vals = NULL;
        }
    }
    if (c->cap && c->n < c->cap / 4 * 3) {
        uint32_t i = cache_hash(s, n) & (c->cap - 1);
        while (c->keys[i] && !(c->key_lens[i] == n && memcmp(c->keys[i], s, n) == 0))
            i = (i + 1) & (c->cap - 1);
        if (!c->keys[i]) {
            char *key = malloc(n + 1);
            int32_t *val = malloc((k + 1) * sizeof *val);
            if (key && val) {
                memcpy(key, s, n);
                val[0] = (int32_t)k;
                memcpy(val + 1, ids, k * sizeof *ids);
                c->keys[i] = key;
                c->key_lens[i] = (uint32_t)n;
                c->vals[i] = val;
                c->n++;
            } else {
                free(key);
                free(val);
            }
        }
    }
    pthread_mutex_unlock(&c->mu);
}

moe_status tok_bpe_encode(const moe_tokenizer *tok, tok_bpe_scratch *sc, const char *s, size_t n,
                          tok_ids *out)
{
    if (n == 0)
        return MOE_OK;
    tok_cache *cache = tok->cache;
    bool oom_flag = false;
    if (cache && cache_get(cache, s, n, out, &oom_flag))
        return oom_flag ? oom(tok) : MOE_OK;
    size_t before = out->n;
    moe_status st = bpe_word(tok, sc, s, n, out);
    if (!st && cache)
        cache_put(cache, s, n, out->v + before, out->n - before);
    return st;
}
