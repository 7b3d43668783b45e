/* Stop-string matching with hold-back of partial matches across deltas. */
#include "common/stop.h"

#include <stdlib.h>
#include <string.h>

struct moe_stopper {
    char **stops;
    size_t *lens;
    int n;
    char *held; /* text not yet emitted: could be the start of a stop string */
    size_t held_len, held_cap;
};

moe_stopper *moe_stopper_create(const char *const *stops, int n)
{
    moe_stopper *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->stops = calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
    s->lens = calloc((size_t)(n > 0 ? n : 1), sizeof(size_t));
    if (!s->stops || !s->lens) {
        moe_stopper_free(s);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        if (!stops[i] || !stops[i][0])
            continue;
        if (!(s->stops[s->n] = strdup(stops[i]))) {
            moe_stopper_free(s);
            return NULL;
        }
        s->lens[s->n++] = strlen(stops[i]);
    }
    return s;
}

void moe_stopper_free(moe_stopper *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        free(s->stops[i]);
    free(s->stops);
    free(s->lens);
    free(s->held);
    free(s);
}

static void append(char **out, size_t *out_len, const char *p, size_t n)
{
    if (n == 0)
        return;
    char *grown = realloc(*out, *out_len + n + 1);
    if (!grown)
        return; /* the caller sees a shorter delta; nothing better to do without a status here */
    memcpy(grown + *out_len, p, n);
    *out_len += n;
    grown[*out_len] = '\0';
    *out = grown;
}

/* Longest suffix of text[0..len) that is a proper prefix of some stop string. */
static size_t partial_tail(const moe_stopper *s, const char *text, size_t len)
{
    size_t best = 0;
    for (int i = 0; i < s->n; i++) {
        size_t max = s->lens[i] - 1 < len ? s->lens[i] - 1 : len;
        for (size_t k = max; k > best; k--)
            if (!memcmp(text + len - k, s->stops[i], k)) {
                best = k;
                break;
            }
    }
    return best;
}

bool moe_stopper_push(moe_stopper *s, const char *delta, size_t len, char **out, size_t *out_len)
{
    if (s->n == 0) {
        append(out, out_len, delta, len);
        return false;
    }
    if (s->held_len + len + 1 > s->held_cap) {
        size_t cap = (s->held_len + len + 1) * 2;
        char *grown = realloc(s->held, cap);
        if (!grown) {
            append(out, out_len, delta, len);
            return false;
        }
        s->held = grown;
        s->held_cap = cap;
    }
    memcpy(s->held + s->held_len, delta, len);
    s->held_len += len;
    s->held[s->held_len] = '\0';

    /* The earliest match wins (as vLLM does); memmem because text may hold NUL bytes. */
    const char *first = NULL;
    for (int i = 0; i < s->n; i++) {
        const char *m = memmem(s->held, s->held_len, s->stops[i], s->lens[i]);
        if (m && (!first || m < first))
            first = m;
    }
    if (first) {
        append(out, out_len, s->held, (size_t)(first - s->held));
        s->held_len = 0;
        return true;
    }
    size_t keep = partial_tail(s, s->held, s->held_len);
    append(out, out_len, s->held, s->held_len - keep);
    memmove(s->held, s->held + s->held_len - keep, keep);
    s->held_len = keep;
    return false;
}

void moe_stopper_flush(moe_stopper *s, char **out, size_t *out_len)
{
    append(out, out_len, s->held, s->held_len);
    s->held_len = 0;
}
