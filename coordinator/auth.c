/* API keys (coordinator/auth.h). */
#include "coordinator/auth.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define KEY_MIN 16
#define KEY_MAX 256

typedef struct {
    char name[64];
    char key[KEY_MAX + 1];
    size_t len;
    bool admin, priority;
    uint64_t max_requests, max_tokens; /* 0: no limit */
} auth_key;

typedef struct {
    _Atomic uint64_t open, tokens;
} auth_use;

struct moe_auth {
    auth_key *k;
    auth_use *use; /* [n]: what each key holds now (mutable behind a const table) */
    int n;
};

void moe_auth_free(moe_auth *a)
{
    if (!a)
        return;
    if (a->k)
        memset(a->k, 0, sizeof(*a->k) * (size_t)a->n); /* no keys left in freed memory */
    free(a->k);
    free(a->use);
    free(a);
}

int moe_auth_count(const moe_auth *a) { return a ? a->n : 0; }

static moe_status parse_line(const char *path, int lineno, char *line, auth_key *out, bool *empty)
{
    char *hash = strchr(line, '#');
    if (hash)
        *hash = '\0';
    char *save = NULL, *f[8] = {0};
    int nf = 0;
    for (char *t = strtok_r(line, " \t\r\n", &save); t; t = strtok_r(NULL, " \t\r\n", &save))
        if (nf < 8)
            f[nf++] = t;
        else
            return moe_error(MOE_ERR_FORMAT, "%s:%d: too many fields", path, lineno);
    *empty = nf == 0;
    if (nf == 0)
        return MOE_OK;
    if (nf < 2)
        return moe_error(MOE_ERR_FORMAT, "%s:%d: expected `NAME KEY [OPTION...]`", path, lineno);
    for (int i = 2; i < nf; i++) {
        char *end = NULL;
        if (strcmp(f[i], "admin") == 0) {
            out->admin = true;
        } else if (strcmp(f[i], "priority") == 0) {
            out->priority = true;
        } else if (strncmp(f[i], "max-requests=", 13) == 0) {
            out->max_requests = strtoull(f[i] + 13, &end, 10);
        } else if (strncmp(f[i], "max-tokens=", 11) == 0) {
            out->max_tokens = strtoull(f[i] + 11, &end, 10);
        } else {
            return moe_error(MOE_ERR_FORMAT,
                             "%s:%d: unknown option `%s` (admin, priority, max-requests=N, "
                             "max-tokens=N)", path, lineno, f[i]);
        }
        if (end && (*end || end == strchr(f[i], '=') + 1))
            return moe_error(MOE_ERR_FORMAT, "%s:%d: `%s`: expected a number", path, lineno, f[i]);
    }
    size_t kl = strlen(f[1]);
    if (strlen(f[0]) >= sizeof(out->name))
        return moe_error(MOE_ERR_FORMAT, "%s:%d: name longer than %zu bytes", path, lineno,
                         sizeof(out->name) - 1);
    if (kl < KEY_MIN || kl > KEY_MAX)
        return moe_error(MOE_ERR_FORMAT, "%s:%d: key of %s is %zu bytes: must be %d to %d", path,
                         lineno, f[0], kl, KEY_MIN, KEY_MAX);
    for (size_t i = 0; i < kl; i++)
        if (!isgraph((unsigned char)f[1][i]))
            return moe_error(MOE_ERR_FORMAT, "%s:%d: key of %s holds a non-printable byte", path,
                             lineno, f[0]);
    snprintf(out->name, sizeof(out->name), "%s", f[0]);
    memcpy(out->key, f[1], kl + 1);
    out->len = kl;
    return MOE_OK;
}

moe_status moe_auth_load(const char *path, moe_auth **out)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f)
        return moe_error(MOE_ERR_IO, "--api-key-file %s: cannot open it", path);
    moe_auth *a = calloc(1, sizeof(*a));
    int cap = 0;
    char line[1024];
    int lineno = 0;
    moe_status st = a ? MOE_OK : moe_error(MOE_ERR_NOMEM, "--api-key-file: out of memory");
    while (st == MOE_OK && fgets(line, sizeof(line), f)) {
        lineno++;
        auth_key k;
        bool empty;
        memset(&k, 0, sizeof(k));
        if ((st = parse_line(path, lineno, line, &k, &empty)) != MOE_OK || empty)
            continue;
        for (int i = 0; i < a->n && st == MOE_OK; i++)
            if (strcmp(a->k[i].name, k.name) == 0 ||
                (a->k[i].len == k.len && memcmp(a->k[i].key, k.key, k.len) == 0))
                st = moe_error(MOE_ERR_FORMAT, "%s:%d: %s: duplicate name or key (line of %s)",
                               path, lineno, k.name, a->k[i].name);
        if (st != MOE_OK)
            break;
        if (a->n == cap) {
            int nc = cap ? cap * 2 : 8;
            auth_key *nk = realloc(a->k, sizeof(*nk) * (size_t)nc);
            if (!nk) {
                st = moe_error(MOE_ERR_NOMEM, "--api-key-file: out of memory");
                break;
            }
            a->k = nk;
            cap = nc;
        }
        a->k[a->n++] = k;
        memset(&k, 0, sizeof(k));
    }
    fclose(f);
    if (st == MOE_OK && a->n == 0)
        st = moe_error(MOE_ERR_FORMAT, "--api-key-file %s: no key in it", path);
    if (st == MOE_OK && !(a->use = calloc((size_t)a->n, sizeof(*a->use))))
        st = moe_error(MOE_ERR_NOMEM, "--api-key-file: out of memory");
    if (st != MOE_OK) {
        moe_auth_free(a);
        return st;
    }
    *out = a;
    return MOE_OK;
}

/* Equal in time independent of the position of the first difference. */
static bool same(const char *a, size_t la, const char *b, size_t lb)
{
    unsigned char d = la != lb;
    size_t n = la < lb ? la : lb;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

moe_auth_role moe_auth_check(const moe_auth *a, const char *value, size_t len, int *key)
{
    if (key)
        *key = -1;
    if (!a || !value)
        return MOE_AUTH_NONE;
    if (len < 7 || strncasecmp(value, "bearer ", 7) != 0)
        return MOE_AUTH_NONE;
    value += 7;
    len -= 7;
    while (len > 0 && value[0] == ' ')
        value++, len--;
    moe_auth_role role = MOE_AUTH_NONE;
    for (int i = 0; i < a->n; i++) /* every key compared: the time says nothing about which */
        if (same(a->k[i].key, a->k[i].len, value, len) && role == MOE_AUTH_NONE) {
            role = a->k[i].admin ? MOE_AUTH_ADMIN : MOE_AUTH_USER;
            if (key)
                *key = i;
        }
    return role;
}

const char *moe_auth_name(const moe_auth *a, int key)
{
    return a && key >= 0 && key < a->n ? a->k[key].name : "-";
}

moe_status moe_auth_acquire(const moe_auth *a, int key, uint64_t tokens, int32_t priority)
{
    if (!a || key < 0 || key >= a->n)
        return MOE_OK;
    const auth_key *k = &a->k[key];
    auth_use *u = &a->use[key];
    if (priority < 0 && !k->priority)
        return moe_error(MOE_ERR_PERMISSION,
                         "priority = %d: priorities above the default (< 0) are not allowed for "
                         "key %s (option `priority` in --api-key-file)", (int)priority, k->name);
    uint64_t open = atomic_fetch_add(&u->open, 1) + 1;
    uint64_t held = atomic_fetch_add(&u->tokens, tokens) + tokens;
    if ((k->max_requests && open > k->max_requests) || (k->max_tokens && held > k->max_tokens)) {
        atomic_fetch_sub(&u->open, 1);
        atomic_fetch_sub(&u->tokens, tokens);
        if (k->max_requests && open > k->max_requests)
            return moe_error(MOE_ERR_FULL, "key %s: %" PRIu64 " requests open, its limit "
                             "(max-requests)", k->name, k->max_requests);
        return moe_error(MOE_ERR_FULL, "key %s: %" PRIu64 " tokens (prompt + max_new_tokens) "
                         "would be open, over its limit of %" PRIu64 " (max-tokens)", k->name,
                         held, k->max_tokens);
    }
    return MOE_OK;
}

void moe_auth_release(const moe_auth *a, int key, uint64_t tokens)
{
    if (!a || key < 0 || key >= a->n)
        return;
    atomic_fetch_sub(&a->use[key].open, 1);
    atomic_fetch_sub(&a->use[key].tokens, tokens);
}
