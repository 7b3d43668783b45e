/* moe-gen-model's JSON output: a pretty-printing streaming writer whose bytes match Python's
 * json.dumps(indent=2) (config files) and serde_json's pretty printer (tokenizer.json). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "tools/moe_gen_model/gen_model.h"

static void jput(moe_gen_json *j, const char *s, size_t n)
{
    if (j->failed)
        return;
    if (j->len + n + 1 > j->cap) {
        size_t cap = j->cap ? j->cap : 4096;
        while (cap < j->len + n + 1)
            cap *= 2;
        char *nb = realloc(j->buf, cap);
        if (!nb) {
            j->failed = true;
            return;
        }
        j->buf = nb;
        j->cap = cap;
    }
    memcpy(j->buf + j->len, s, n);
    j->len += n;
    j->buf[j->len] = '\0';
}

static void jputs(moe_gen_json *j, const char *s)
{
    jput(j, s, strlen(s));
}

static void jindent(moe_gen_json *j)
{
    jput(j, "\n", 1);
    for (int i = 0; i < j->depth; i++)
        jput(j, "  ", 2);
}

/* Separator before a value (or key) inside the current container. */
static void jvalue_start(moe_gen_json *j)
{
    if (j->after_key) {
        j->after_key = false;
        return;
    }
    if (j->depth == 0)
        return;
    if (j->has_items[j->depth])
        jput(j, ",", 1);
    j->has_items[j->depth] = true;
    jindent(j);
}

void moe_gen_json_init(moe_gen_json *j, bool ascii)
{
    memset(j, 0, sizeof *j);
    j->ascii = ascii;
}

static void jopen(moe_gen_json *j, const char *c)
{
    jvalue_start(j);
    jputs(j, c);
    if (j->depth + 1 >= (int)(sizeof j->has_items / sizeof j->has_items[0])) {
        j->failed = true; /* deeper than anything we write: a programming error */
        return;
    }
    j->depth++;
    j->has_items[j->depth] = false;
}

static void jclose(moe_gen_json *j, const char *c)
{
    bool had = j->has_items[j->depth];
    j->depth--;
    if (had)
        jindent(j);
    jputs(j, c);
}

void moe_gen_json_obj_begin(moe_gen_json *j)
{
    jopen(j, "{");
}
void moe_gen_json_obj_end(moe_gen_json *j)
{
    jclose(j, "}");
}
void moe_gen_json_arr_begin(moe_gen_json *j)
{
    jopen(j, "[");
}
void moe_gen_json_arr_end(moe_gen_json *j)
{
    jclose(j, "]");
}

static void jescaped(moe_gen_json *j, const char *s, size_t n)
{
    jput(j, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    size_t run = 0; /* start of the bytes not yet written, copied verbatim in one go */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        const char *esc = NULL;
        char tmp[16];
        size_t len = 1;
        switch (c) {
        case '"':
            esc = "\\\"";
            break;
        case '\\':
            esc = "\\\\";
            break;
        case '\n':
            esc = "\\n";
            break;
        case '\r':
            esc = "\\r";
            break;
        case '\t':
            esc = "\\t";
            break;
        case '\b':
            esc = "\\b";
            break;
        case '\f':
            esc = "\\f";
            break;
        default:
            if (c < 0x20 || (j->ascii && c == 0x7f)) {
                snprintf(tmp, sizeof tmp, "\\u%04x", c);
                esc = tmp;
            } else if (j->ascii && c >= 0x80) {
                /* Decode one UTF-8 sequence; invalid bytes are written as U+FFFD. */
                uint32_t cp = 0xfffd;
                if ((c & 0xe0) == 0xc0 && i + 1 < n) {
                    cp = ((uint32_t)(c & 0x1f) << 6) | (p[i + 1] & 0x3f);
                    len = 2;
                } else if ((c & 0xf0) == 0xe0 && i + 2 < n) {
                    cp = ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(p[i + 1] & 0x3f) << 6) |
                         (p[i + 2] & 0x3f);
                    len = 3;
                } else if ((c & 0xf8) == 0xf0 && i + 3 < n) {
                    cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(p[i + 1] & 0x3f) << 12) |
                         ((uint32_t)(p[i + 2] & 0x3f) << 6) | (p[i + 3] & 0x3f);
                    len = 4;
                }
                if (cp >= 0x10000) {
                    cp -= 0x10000;
                    snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", (unsigned)(0xd800 + (cp >> 10)),
                             (unsigned)(0xdc00 + (cp & 0x3ff)));
                } else {
                    snprintf(tmp, sizeof tmp, "\\u%04x", (unsigned)cp);
                }
                esc = tmp;
            }
        }
        if (esc) {
            jput(j, s + run, i - run);
            jputs(j, esc);
            i += len - 1;
            run = i + 1;
        }
    }
    jput(j, s + run, n - run);
    jput(j, "\"", 1);
}

void moe_gen_json_key(moe_gen_json *j, const char *key)
{
    jvalue_start(j);
    jescaped(j, key, strlen(key));
    jput(j, ": ", 2);
    j->after_key = true;
}

void moe_gen_json_str(moe_gen_json *j, const char *s)
{
    moe_gen_json_strn(j, s, strlen(s));
}

void moe_gen_json_strn(moe_gen_json *j, const char *s, size_t n)
{
    jvalue_start(j);
    jescaped(j, s, n);
}

void moe_gen_json_int(moe_gen_json *j, long long v)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%lld", v);
    jvalue_start(j);
    jputs(j, tmp);
}

void moe_gen_format_double(double v, char *buf, size_t cap)
{
    if (isnan(v)) {
        snprintf(buf, cap, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, cap, v > 0 ? "Infinity" : "-Infinity");
        return;
    }
    if (v == 0) {
        snprintf(buf, cap, signbit(v) ? "-0.0" : "0.0");
        return;
    }
    /* Shortest digit string that reads back as v, like repr(). */
    char tmp[48];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, v);
        if (strtod(tmp, NULL) == v)
            break;
    }
    bool neg = tmp[0] == '-';
    const char *p = tmp + (neg ? 1 : 0);
    char digits[24];
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9')
            digits[nd++] = *p;
    int e = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = '\0';

    char out[64];
    size_t o = 0;
    if (neg)
        out[o++] = '-';
    if (e >= -4 && e < 16) {
        if (e >= 0) {
            for (int i = 0; i <= e; i++)
                out[o++] = i < nd ? digits[i] : '0';
            out[o++] = '.';
            if (nd > e + 1) {
                for (int i = e + 1; i < nd; i++)
                    out[o++] = digits[i];
            } else {
                out[o++] = '0';
            }
        } else {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -e - 1; i++)
                out[o++] = '0';
            for (int i = 0; i < nd; i++)
                out[o++] = digits[i];
        }
        out[o] = '\0';
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++)
                out[o++] = digits[i];
        }
        snprintf(out + o, sizeof out - o, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    }
    snprintf(buf, cap, "%s", out);
}

void moe_gen_json_double(moe_gen_json *j, double v)
{
    char tmp[64];
    moe_gen_format_double(v, tmp, sizeof tmp);
    jvalue_start(j);
    jputs(j, tmp);
}

void moe_gen_json_bool(moe_gen_json *j, bool v)
{
    jvalue_start(j);
    jputs(j, v ? "true" : "false");
}

void moe_gen_json_null(moe_gen_json *j)
{
    jvalue_start(j);
    jputs(j, "null");
}

static int cmp_child(const void *a, const void *b)
{
    const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;
    return strcmp(x->string, y->string);
}

void moe_gen_json_cjson(moe_gen_json *j, const struct cJSON *item, bool sort)
{
    if (cJSON_IsObject(item) || cJSON_IsArray(item)) {
        bool obj = cJSON_IsObject(item);
        int n = cJSON_GetArraySize(item);
        const cJSON **kids = malloc(sizeof *kids * (size_t)(n ? n : 1));
        if (!kids) {
            j->failed = true;
            return;
        }
        int k = 0;
        for (const cJSON *c = item->child; c; c = c->next)
            kids[k++] = c;
        if (obj && sort)
            qsort(kids, (size_t)k, sizeof *kids, cmp_child);
        if (obj)
            moe_gen_json_obj_begin(j);
        else
            moe_gen_json_arr_begin(j);
        for (int i = 0; i < k; i++) {
            if (obj)
                moe_gen_json_key(j, kids[i]->string);
            moe_gen_json_cjson(j, kids[i], sort);
        }
        if (obj)
            moe_gen_json_obj_end(j);
        else
            moe_gen_json_arr_end(j);
        free(kids);
    } else if (cJSON_IsString(item)) {
        moe_gen_json_str(j, item->valuestring);
    } else if (cJSON_IsRaw(item)) {
        jvalue_start(j);
        jputs(j, item->valuestring);
    } else if (cJSON_IsNumber(item)) {
        double v = item->valuedouble;
        if (v == floor(v) && fabs(v) < 9.0e15)
            moe_gen_json_int(j, (long long)v);
        else
            moe_gen_json_double(j, v);
    } else if (cJSON_IsBool(item)) {
        moe_gen_json_bool(j, cJSON_IsTrue(item));
    } else {
        moe_gen_json_null(j);
    }
}

void moe_gen_json_discard(moe_gen_json *j)
{
    free(j->buf);
    j->buf = NULL;
    j->len = j->cap = 0;
}

moe_status moe_gen_json_finish(moe_gen_json *j, const char *path, bool newline)
{
    if (newline)
        jput(j, "\n", 1);
    if (j->failed || j->depth != 0) {
        moe_gen_json_discard(j);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory building JSON", path);
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        int e = errno;
        moe_gen_json_discard(j);
        return moe_error(MOE_ERR_IO, "%s: cannot create: %s", path, strerror(e));
    }
    size_t w = fwrite(j->buf ? j->buf : "", 1, j->len, f);
    int e = errno;
    bool ok = w == j->len;
    if (fclose(f) != 0 && ok) {
        ok = false;
        e = errno;
    }
    moe_gen_json_discard(j);
    if (!ok)
        return moe_error(MOE_ERR_IO, "%s: write failed: %s", path, strerror(e));
    return MOE_OK;
}
