/* Decoding ids to text. Every HF decoder is written as a streaming stage (events: token begins,
 * text of the current token, token ends, stream ends), so the streaming decoder (moe_detok_*) and
 * the one-shot moe_tokenizer_decode run the very same code: concatenated stream output equals
 * the full decode by construction, and no stage lets a partial UTF-8 sequence through. */
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/tokenizer_internal.h"

#define REPLACEMENT_CHAR "\xEF\xBF\xBD"

typedef struct {
    const tok_dec *d;
    size_t n_tokens; /* tokens begun so far at this stage */
    bool started;    /* Fuse/ByteLevel/Join: the single output token has begun */
    tok_buf buf;     /* Replace: held-back text; ByteLevel: current token; ByteFallback: run */
    tok_buf out;     /* scratch for the text emitted by one call */
    /* Strip */
    int lead_left, trail_pending;
    bool lead_done;
    /* ByteFallback: the current token while it may still be "<0xNN>" */
    char head[8];
    size_t head_len;
    bool passing;
    /* ByteLevel: bytes of an incomplete UTF-8 sequence */
    unsigned char pend[4];
    int npend;
} dstage;

struct moe_detok {
    const moe_tokenizer *tok;
    bool skip_special;
    bool finished;
    bool oom;
    dstage *st;
    size_t n;
    tok_buf q; /* decoded text not yet handed out */
    size_t q_pos;
};

static void ev_begin(moe_detok *d, size_t i);
static void ev_text(moe_detok *d, size_t i, const char *s, size_t n);
static void ev_end(moe_detok *d, size_t i);
static void ev_finish(moe_detok *d, size_t i);

static void put(moe_detok *d, tok_buf *b, const void *s, size_t n)
{
    if (!tok_buf_put(b, s, n))
        d->oom = true;
}

/* Emits b's text to stage i and clears b. */
static void flush_out(moe_detok *d, size_t i, tok_buf *b)
{
    if (b->len) {
        ev_text(d, i, b->p, b->len);
        b->len = 0;
    }
}

/* ---- ByteFallback ---- */

/* HF: len 6, "<0x" .. ">", and u8::from_str_radix of the two middle bytes (which takes "+H"). */
static int byte_token(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    if (s[3] == '+')
        return moe_hex_digit(s[4]);
    int hi = moe_hex_digit(s[3]), lo = moe_hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static void bf_flush_run(moe_detok *d, size_t i, dstage *s)
{
    if (!s->buf.len)
        return;
    if (moe_utf8_check(s->buf.p, s->buf.len) == s->buf.len) {
        ev_begin(d, i + 1);
        ev_text(d, i + 1, s->buf.p, s->buf.len);
        ev_end(d, i + 1);
    } else
        /* HF: a run that is not valid UTF-8 becomes one U+FFFD per byte, all of it. */
        for (size_t k = 0; k < s->buf.len; k++) {
            ev_begin(d, i + 1);
            ev_text(d, i + 1, REPLACEMENT_CHAR, 3);
            ev_end(d, i + 1);
        }
    s->buf.len = 0;
}

/* ---- ByteLevel: bytes -> text, lossy like Rust's String::from_utf8_lossy ---- */

static void bl_bytes(moe_detok *d, dstage *s, const unsigned char *b, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        unsigned char c = b[k];
        if (s->npend == 0) {
            if (c < 0x80)
                put(d, &s->out, &c, 1);
            else if ((c >= 0xC2 && c <= 0xDF) || (c >= 0xE0 && c <= 0xEF) ||
                     (c >= 0xF0 && c <= 0xF4))
                s->pend[s->npend++] = c;
            else
                put(d, &s->out, REPLACEMENT_CHAR, 3);
            continue;
        }
        unsigned lead = s->pend[0], lo = 0x80, hi = 0xBF;
        int need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
        if (s->npend == 1) {
            if (lead == 0xE0)
                lo = 0xA0;
            else if (lead == 0xED)
                hi = 0x9F;
            else if (lead == 0xF0)
                lo = 0x90;
            else if (lead == 0xF4)
                hi = 0x8F;
        }
        if (c < lo || c > hi) {
            /* The pending bytes are a maximal invalid subpart: one U+FFFD, then retry c. */
            put(d, &s->out, REPLACEMENT_CHAR, 3);
            s->npend = 0;
            k--;
            continue;
        }
        s->pend[s->npend++] = c;
        if (s->npend == need) {
            put(d, &s->out, s->pend, (size_t)need);
            s->npend = 0;
        }
    }
}

static void bl_token(moe_detok *d, size_t i, dstage *s)
{
    /* Map every character back to its byte; if any character is not one of the 256, HF
     * passes the token's raw bytes through instead. */
    const char *t = s->buf.p ? s->buf.p : "";
    size_t n = s->buf.len;
    bool all = true;
    for (size_t k = 0; k < n && all;) {
        uint32_t cp;
        k += moe_utf8_decode(t + k, &cp);
        all = tok_cp_to_byte(cp) >= 0;
    }
    if (all) {
        unsigned char tmp[256];
        size_t m = 0;
        for (size_t k = 0; k < n;) {
            uint32_t cp;
            k += moe_utf8_decode(t + k, &cp);
            tmp[m++] = (unsigned char)tok_cp_to_byte(cp);
            if (m == sizeof tmp) {
                bl_bytes(d, s, tmp, m);
                m = 0;
            }
        }
        bl_bytes(d, s, tmp, m);
    } else
        bl_bytes(d, s, (const unsigned char *)t, n);
    s->buf.len = 0;
    if (s->out.len) {
        if (!s->started) {
            s->started = true;
            ev_begin(d, i + 1);
        }
        flush_out(d, i + 1, &s->out);
    }
}

/* ---- events ---- */

static void ev_begin(moe_detok *d, size_t i)
{
    if (i == d->n)
        return;
    dstage *s = &d->st[i];
    s->n_tokens++;
    switch (s->d->type) {
    case TOK_DEC_JOIN:
    case TOK_DEC_FUSE:
        if (!s->started) {
            s->started = true;
            ev_begin(d, i + 1);
        } else if (s->d->type == TOK_DEC_JOIN)
            ev_text(d, i + 1, " ", 1);
        break;
    case TOK_DEC_BYTELEVEL:
        s->buf.len = 0;
        break;
    case TOK_DEC_BYTEFALLBACK:
        s->head_len = 0;
        s->passing = false;
        break;
    case TOK_DEC_STRIP:
        s->lead_left = s->d->start;
        s->lead_done = false;
        s->trail_pending = 0;
        ev_begin(d, i + 1);
        break;
    case TOK_DEC_REPLACE:
        s->buf.len = 0;
        ev_begin(d, i + 1);
        break;
    default: /* Metaspace */
        ev_begin(d, i + 1);
        break;
    }
}

static void replace_scan(moe_detok *d, size_t i, dstage *s, bool final)
{
    const tok_dec *dc = s->d;
    if (!s->buf.len)
        return;
    const char *h = s->buf.p;
    size_t n = s->buf.len, pl = dc->pattern_len, k = 0, emit_from = 0;
    while (k + pl <= n) {
        if (memcmp(h + k, dc->pattern, pl) == 0) {
            put(d, &s->out, h + emit_from, k - emit_from);
            put(d, &s->out, dc->content, dc->content_len);
            k += pl;
            emit_from = k;
        } else
            k++;
    }
    size_t keep = 0;
    if (!final) {
        /* Hold back the longest tail that could still grow into the pattern. */
        size_t maxk = n - emit_from < pl ? n - emit_from : pl - 1;
        for (size_t t = maxk; t > 0; t--)
            if (memcmp(h + n - t, dc->pattern, t) == 0) {
                keep = t;
                break;
            }
    }
    put(d, &s->out, h + emit_from, n - keep - emit_from);
    if (keep)
        memmove(s->buf.p, h + n - keep, keep);
    s->buf.len = keep;
    flush_out(d, i + 1, &s->out);
}

static void ev_text(moe_detok *d, size_t i, const char *t, size_t n)
{
    if (n == 0)
        return;
    if (i == d->n) {
        put(d, &d->q, t, n);
        return;
    }
    dstage *s = &d->st[i];
    const tok_dec *dc = s->d;
    switch (dc->type) {
    case TOK_DEC_JOIN:
    case TOK_DEC_FUSE:
        ev_text(d, i + 1, t, n);
        break;
    case TOK_DEC_BYTELEVEL:
        put(d, &s->buf, t, n);
        break;
    case TOK_DEC_BYTEFALLBACK:
        if (s->passing) {
            ev_text(d, i + 1, t, n);
        } else if (s->head_len + n <= 6) {
            memcpy(s->head + s->head_len, t, n);
            s->head_len += n;
        } else {
            /* Longer than "<0xNN>": an ordinary token, which ends the byte run. */
            bf_flush_run(d, i, s);
            s->passing = true;
            ev_begin(d, i + 1);
            ev_text(d, i + 1, s->head, s->head_len);
            ev_text(d, i + 1, t, n);
        }
        break;
    case TOK_DEC_METASPACE: {
        bool drop = s->n_tokens == 1 && dc->prepend_scheme != TOK_PREPEND_NEVER;
        size_t from = 0;
        for (size_t k = 0; k + dc->ch_len <= n;) {
            if (memcmp(t + k, dc->ch, dc->ch_len) == 0) {
                put(d, &s->out, t + from, k - from);
                if (!drop)
                    put(d, &s->out, " ", 1);
                k += dc->ch_len;
                from = k;
            } else
                k++;
        }
        put(d, &s->out, t + from, n - from);
        flush_out(d, i + 1, &s->out);
        break;
    }
    case TOK_DEC_REPLACE:
        put(d, &s->buf, t, n);
        replace_scan(d, i, s, false);
        break;
    case TOK_DEC_STRIP:
        for (size_t k = 0; k < n;) {
            size_t l = moe_utf8_seq_len((const unsigned char *)t + k, n - k);
            if (!l)
                l = 1;
            bool is_c = l == dc->ch_len && memcmp(t + k, dc->ch, l) == 0;
            if (!s->lead_done) {
                if (is_c && s->lead_left > 0) {
                    s->lead_left--;
                    k += l;
                    continue;
                }
                s->lead_done = true;
            }
            if (dc->stop > 0 && is_c) {
                if (s->trail_pending < dc->stop)
                    s->trail_pending++;
                else
                    put(d, &s->out, dc->ch, dc->ch_len); /* the oldest held one is not trailing */
            } else {
                for (; s->trail_pending > 0; s->trail_pending--)
                    put(d, &s->out, dc->ch, dc->ch_len);
                put(d, &s->out, t + k, l);
            }
            k += l;
        }
        flush_out(d, i + 1, &s->out);
        break;
    default:
        break;
    }
}

static void ev_end(moe_detok *d, size_t i)
{
    if (i == d->n)
        return;
    dstage *s = &d->st[i];
    switch (s->d->type) {
    case TOK_DEC_JOIN:
    case TOK_DEC_FUSE:
        break;
    case TOK_DEC_BYTELEVEL:
        bl_token(d, i, s);
        break;
    case TOK_DEC_BYTEFALLBACK:
        if (s->passing) {
            ev_end(d, i + 1);
            break;
        }
        {
            int b = byte_token(s->head, s->head_len);
            if (b >= 0) {
                unsigned char c = (unsigned char)b;
                put(d, &s->buf, &c, 1);
                break;
            }
        }
        bf_flush_run(d, i, s);
        ev_begin(d, i + 1);
        ev_text(d, i + 1, s->head, s->head_len);
        ev_end(d, i + 1);
        break;
    case TOK_DEC_REPLACE:
        replace_scan(d, i, s, true);
        ev_end(d, i + 1);
        break;
    case TOK_DEC_STRIP:
        s->trail_pending = 0; /* held trailing characters are dropped */
        ev_end(d, i + 1);
        break;
    default:
        ev_end(d, i + 1);
        break;
    }
}

static void ev_finish(moe_detok *d, size_t i)
{
    if (i == d->n)
        return;
    dstage *s = &d->st[i];
    switch (s->d->type) {
    case TOK_DEC_JOIN:
        if (s->started)
            ev_end(d, i + 1);
        break;
    case TOK_DEC_FUSE:
    case TOK_DEC_BYTELEVEL:
        /* HF returns exactly one token from these, even for no input. */
        if (s->d->type == TOK_DEC_BYTELEVEL && s->npend) {
            put(d, &s->out, REPLACEMENT_CHAR, 3);
            s->npend = 0;
        }
        if (!s->started) {
            s->started = true;
            ev_begin(d, i + 1);
        }
        flush_out(d, i + 1, &s->out);
        ev_end(d, i + 1);
        break;
    case TOK_DEC_BYTEFALLBACK:
        bf_flush_run(d, i, s);
        break;
    default:
        break;
    }
    ev_finish(d, i + 1);
}

/* ---- public API ---- */

static bool detok_init(moe_detok *d, const moe_tokenizer *tok, bool skip_special)
{
    memset(d, 0, sizeof *d);
    d->tok = tok;
    d->skip_special = skip_special;
    d->n = tok->n_decs;
    d->st = calloc(d->n ? d->n : 1, sizeof *d->st);
    if (!d->st)
        return false;
    for (size_t i = 0; i < d->n; i++)
        d->st[i].d = &tok->decs[i];
    return true;
}

static void detok_release(moe_detok *d)
{
    for (size_t i = 0; i < d->n; i++) {
        tok_buf_free(&d->st[i].buf);
        tok_buf_free(&d->st[i].out);
    }
    free(d->st);
    tok_buf_free(&d->q);
}

static void detok_feed(moe_detok *d, int32_t id)
{
    const moe_tokenizer *tok = d->tok;
    if (d->finished || id < 0 || id >= tok->n_ids || !tok->id_str[id])
        return; /* HF silently skips ids it does not know */
    if (d->skip_special && tok->id_special[id])
        return;
    ev_begin(d, 0);
    ev_text(d, 0, tok->id_str[id], tok->id_len[id]);
    ev_end(d, 0);
}

/* Hands out queued text: at most cap-1 bytes, cut at a character boundary, NUL-terminated. */
static size_t drain(moe_detok *d, char *out, size_t cap)
{
    if (!out || cap == 0)
        return 0;
    size_t avail = d->q.len - d->q_pos, take = avail < cap - 1 ? avail : cap - 1;
    const char *q = d->q.p ? d->q.p + d->q_pos : "";
    if (take < avail)
        while (take > 0 && ((unsigned char)q[take] & 0xC0) == 0x80)
            take--;
    memcpy(out, q, take);
    out[take] = '\0';
    d->q_pos += take;
    if (d->q_pos == d->q.len)
        d->q_pos = d->q.len = 0;
    return take;
}

moe_detok *moe_detok_create(const moe_tokenizer *tok, bool skip_special)
{
    moe_detok *d = malloc(sizeof *d);
    if (!d)
        return NULL;
    if (!detok_init(d, tok, skip_special)) {
        free(d);
        return NULL;
    }
    return d;
}

void moe_detok_free(moe_detok *d)
{
    if (!d)
        return;
    detok_release(d);
    free(d);
}

size_t moe_detok_push(moe_detok *d, int32_t id, char *out, size_t cap)
{
    detok_feed(d, id);
    return drain(d, out, cap);
}

size_t moe_detok_finish(moe_detok *d, char *out, size_t cap)
{
    if (!d->finished) {
        d->finished = true;
        ev_finish(d, 0);
    }
    return drain(d, out, cap);
}

moe_status moe_tokenizer_decode(const moe_tokenizer *tok, const int32_t *ids, size_t n,
                                bool skip_special, char *out, size_t cap, size_t *n_out)
{
    *n_out = 0;
    moe_detok d;
    if (!detok_init(&d, tok, skip_special))
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory while decoding", tok->name);
    for (size_t i = 0; i < n; i++)
        detok_feed(&d, ids[i]);
    d.finished = true;
    ev_finish(&d, 0);
    if (d.oom) {
        detok_release(&d);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory while decoding", tok->name);
    }
    size_t len = d.q.len;
    *n_out = len;
    if (out && cap) {
        size_t k = len < cap ? len : cap;
        if (k)
            memcpy(out, d.q.p, k);
        if (len < cap)
            out[len] = '\0';
    }
    detok_release(&d);
    return MOE_OK;
}
