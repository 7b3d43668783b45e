/* API keys (coordinator/auth.h). */
#include "coordinator/auth.h"

#include <ctype.h>
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
    bool admin;
} auth_key;

struct moe_auth {
    auth_key *k;
    int n;
};

void moe_auth_free(moe_auth *a)
{
    if (!a)
        return;
    if (a->k)
        memset(a->k, 0, sizeof(*a->k) * (size_t)a->n); /* no keys left in freed memory */
    free(a->k);
    free(a);
}

int moe_auth_count(const moe_auth *a) { return a ? a->n : 0; }

static moe_status parse_line(const char *path, int lineno, char *line, auth_key *out, bool *empty)
{
    char *hash = strchr(line, '#');
    if (hash)
        *hash = '\0';
    char *save = NULL, *f[4] = {0};
    int nf = 0;
    for (char *t = strtok_r(line, " \t\r\n", &save); t; t = strtok_r(NULL, " \t\r\n", &save))
        if (nf < 4)
            f[nf++] = t;
        else
            nf++;
    *empty = nf == 0;
    if (nf == 0)
        return MOE_OK;
    if (nf < 2 || nf > 3 || (nf == 3 && strcmp(f[2], "admin") != 0))
        return moe_error(MOE_ERR_FORMAT, "%s:%d: expected `NAME KEY [admin]`", path, lineno);
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
    out->admin = nf == 3;
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

moe_auth_role moe_auth_check(const moe_auth *a, const char *value, size_t len, const char **name)
{
    if (name)
        *name = NULL;
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
            if (name)
                *name = a->k[i].name;
        }
    return role;
}
