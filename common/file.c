/* Whole-file reads. */
#include "common/file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

moe_status moe_read_file(const char *path, size_t max_bytes, char **out, size_t *len)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_error(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: cannot open: %s", path,
                         strerror(errno));
    size_t cap = 1 << 14, n = 0;
    char *buf = malloc(cap);
    moe_status st = MOE_OK;
    while (buf && st == MOE_OK) {
        if (n + 1 >= cap) {
            if (cap > max_bytes) {
                st = moe_error(MOE_ERR_IO, "%s: larger than %zu bytes", path, max_bytes);
                break;
            }
            char *grown = realloc(buf, cap * 2);
            if (!grown)
                break;
            buf = grown;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    if (st == MOE_OK && !buf)
        st = moe_error(MOE_ERR_NOMEM, "%s: out of memory reading the file", path);
    else if (st == MOE_OK && n + 1 >= cap && cap > max_bytes)
        st = moe_error(MOE_ERR_IO, "%s: larger than %zu bytes", path, max_bytes);
    else if (st == MOE_OK && ferror(f))
        st = moe_error(MOE_ERR_IO, "%s: read error", path);
    fclose(f);
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    if (n > max_bytes) {
        free(buf);
        return moe_error(MOE_ERR_IO, "%s: larger than %zu bytes", path, max_bytes);
    }
    buf[n] = '\0';
    *out = buf;
    if (len)
        *len = n;
    return MOE_OK;
}
