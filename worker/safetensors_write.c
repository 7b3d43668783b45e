/* The safetensors writer: one file from a list of tensors, streaming each tensor's bytes through a
 * bounded staging buffer so multi-GB synthetic models never sit in memory. */
#include "worker/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Staging buffer for fill callbacks: big enough for few syscalls, small enough to not matter. */
#define ST_STAGE_BYTES ((size_t)1 << 20)

typedef struct {
    char *buf;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *p = realloc(b->buf, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->buf = p;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_fmt_i64(sbuf *b, int64_t v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    sb_put(b, tmp, (size_t)n);
}

/* JSON string literal with the escapes RFC 8259 requires; tensor names are normally plain ASCII. */
static void sb_json_string(sbuf *b, const char *s)
{
    sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            sb_put(b, esc, 2);
        } else if (*p < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            sb_put(b, esc, 6);
        } else {
            sb_put(b, (const char *)p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

static int cmp_name_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Validates the tensor list and computes each tensor's byte size. */
static moe_status st_write_check(const char *path, const moe_st_write_tensor *t, int n,
                                 size_t *sizes)
{
    for (int i = 0; i < n; i++) {
        if (!t[i].name || !t[i].name[0])
            return moe_error(MOE_ERR_INVALID_ARG, "%s: tensor #%d has no name", path, i);
        if (!moe_st_dtype_tag(t[i].dtype))
            return moe_error(MOE_ERR_UNSUPPORTED,
                             "%s: tensor %s: dtype %d cannot be stored in safetensors", path,
                             t[i].name, (int)t[i].dtype);
        if (t[i].n_dims < 0 || t[i].n_dims > MOE_ST_MAX_DIMS)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: tensor %s: n_dims %d outside [0, %d]", path,
                             t[i].name, t[i].n_dims, MOE_ST_MAX_DIMS);
        if (!t[i].data && !t[i].fill)
            return moe_error(MOE_ERR_INVALID_ARG, "%s: tensor %s: neither data nor fill given",
                             path, t[i].name);
        for (int d = 0; d < t[i].n_dims; d++)
            if (t[i].shape[d] < 0)
                return moe_error(MOE_ERR_INVALID_ARG, "%s: tensor %s: negative dimension %lld",
                                 path, t[i].name, (long long)t[i].shape[d]);
        uint64_t bytes;
        if (moe_st_tensor_bytes(t[i].dtype, t[i].n_dims, t[i].shape, &bytes) != 0 ||
            bytes > SIZE_MAX)
            return moe_error(t[i].dtype == MOE_DT_Q8 || t[i].dtype == MOE_DT_Q4 ? MOE_ERR_INVALID_ARG
                                                                            : MOE_ERR_RANGE,
                             "%s: tensor %s: %s", path, t[i].name,
                             t[i].dtype == MOE_DT_Q8 || t[i].dtype == MOE_DT_Q4
                                 ? "a quantized tensor must be [rows, k * 32]"
                                 : "size overflows");
        sizes[i] = bytes;
    }
    /* Duplicate names would make the header ambiguous (JSON object keys). */
    const char **names = malloc((size_t)(n > 0 ? n : 1) * sizeof *names);
    if (!names)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", path);
    for (int i = 0; i < n; i++)
        names[i] = t[i].name;
    qsort(names, (size_t)n, sizeof *names, cmp_name_ptr);
    for (int i = 1; i < n; i++) {
        if (strcmp(names[i - 1], names[i]) == 0) {
            moe_status s =
                moe_error(MOE_ERR_INVALID_ARG, "%s: tensor %s given twice", path, names[i]);
            free(names);
            return s;
        }
    }
    free(names);
    return MOE_OK;
}

/* The order tensors go into the data section: as given, unless that would misalign a 4-byte
 * tensor, in which case 4-byte tensors go first (stable within each size). NULL when out of
 * memory. */
static int *st_write_order(const moe_st_write_tensor *t, int n, const size_t *sizes)
{
    int *order = malloc((size_t)(n > 0 ? n : 1) * sizeof *order);
    if (!order)
        return NULL;
    size_t pos = 0;
    int aligned = 1;
    for (int i = 0; i < n; i++) {
        if (pos % moe_st_dtype_align(t[i].dtype))
            aligned = 0;
        pos += sizes[i];
        order[i] = i;
    }
    if (!aligned) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (moe_st_dtype_align(t[i].dtype) == 4)
                order[k++] = i;
        for (int i = 0; i < n; i++)
            if (moe_st_dtype_align(t[i].dtype) != 4)
                order[k++] = i;
    }
    return order;
}

static moe_status st_write_bytes(FILE *f, const char *path, const void *p, size_t n)
{
    if (n && fwrite(p, 1, n, f) != n)
        return moe_error(MOE_ERR_IO, "%s: write failed: %s", path, strerror(errno));
    return MOE_OK;
}

static moe_status st_write_body(FILE *f, const char *path, const moe_st_write_tensor *t, int n,
                                const size_t *sizes, const int *order, const char *header,
                                size_t header_len)
{
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
    moe_status s = st_write_bytes(f, path, len8, 8);
    if (s == MOE_OK)
        s = st_write_bytes(f, path, header, header_len);
    if (s != MOE_OK)
        return s;

    uint8_t *stage = NULL;
    for (int k = 0; k < n && s == MOE_OK; k++) {
        int i = order[k];
        if (t[i].data) {
            s = st_write_bytes(f, path, t[i].data, sizes[i]);
        } else {
            if (!stage && !(stage = malloc(ST_STAGE_BYTES))) {
                s = moe_error(MOE_ERR_NOMEM, "%s: out of memory for the staging buffer", path);
                break;
            }
            for (size_t off = 0; off < sizes[i] && s == MOE_OK; off += ST_STAGE_BYTES) {
                size_t chunk = sizes[i] - off < ST_STAGE_BYTES ? sizes[i] - off : ST_STAGE_BYTES;
                t[i].fill(t[i].fill_ctx, stage, chunk, off);
                s = st_write_bytes(f, path, stage, chunk);
            }
        }
    }
    free(stage);
    return s;
}

moe_status moe_st_write_file(const char *path, const moe_st_write_tensor *tensors, int n,
                             const char *metadata_json)
{
    if (!path || n < 0 || (n > 0 && !tensors))
        return moe_error(MOE_ERR_INVALID_ARG, "moe_st_write_file: bad arguments");
    size_t *sizes = calloc((size_t)(n > 0 ? n : 1), sizeof(size_t));
    if (!sizes)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", path);
    moe_status s = st_write_check(path, tensors, n, sizes);
    if (s != MOE_OK) {
        free(sizes);
        return s;
    }

    sbuf h = {0};
    sb_put(&h, "{", 1);
    int first = 1;
    if (metadata_json) {
        /* Re-printed through cJSON so a malformed string fails here, not in every reader. */
        cJSON *meta = cJSON_Parse(metadata_json);
        if (!meta || !cJSON_IsObject(meta)) {
            cJSON_Delete(meta);
            free(sizes);
            free(h.buf);
            return moe_error(MOE_ERR_INVALID_ARG, "%s: __metadata__ is not a JSON object", path);
        }
        /* The format's metadata is a string -> string map; the reference reader refuses more. */
        for (const cJSON *e = meta->child; e; e = e->next) {
            if (!cJSON_IsString(e)) {
                moe_status bad =
                    moe_error(MOE_ERR_INVALID_ARG, "%s: __metadata__ field %s is not a string",
                              path, e->string);
                cJSON_Delete(meta);
                free(sizes);
                free(h.buf);
                return bad;
            }
        }
        char *txt = cJSON_PrintUnformatted(meta);
        cJSON_Delete(meta);
        if (!txt) {
            free(sizes);
            free(h.buf);
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory", path);
        }
        sb_str(&h, "\"__metadata__\":");
        sb_str(&h, txt);
        cJSON_free(txt);
        first = 0;
    }
    /* Tensors are packed back to back: the reference reader (Python safetensors) refuses gaps.
     * The data section starts 8-aligned (header padding below), so every tensor is aligned for
     * its element type as long as no 2-byte tensor of odd length precedes a 4-byte one; only
     * then are the tensors laid out F32 first (stable), as the reference writer always does. */
    int *order = st_write_order(tensors, n, sizes);
    if (!order) {
        free(sizes);
        free(h.buf);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", path);
    }
    size_t pos = 0;
    for (int k = 0; k < n; k++) {
        int i = order[k];
        if (!first)
            sb_put(&h, ",", 1);
        first = 0;
        sb_json_string(&h, tensors[i].name);
        sb_str(&h, ":{\"dtype\":\"");
        sb_str(&h, moe_st_dtype_tag(tensors[i].dtype));
        sb_str(&h, "\",\"shape\":[");
        for (int d = 0; d < tensors[i].n_dims; d++) {
            if (d)
                sb_put(&h, ",", 1);
            sb_fmt_i64(&h, tensors[i].shape[d]);
        }
        sb_str(&h, "],\"data_offsets\":[");
        sb_fmt_i64(&h, (int64_t)pos);
        sb_put(&h, ",", 1);
        sb_fmt_i64(&h, (int64_t)(pos + sizes[i]));
        sb_str(&h, "]}");
        pos += sizes[i];
    }
    sb_put(&h, "}", 1);
    /* Pad with spaces (allowed by the format) so the data section starts 8-aligned in the file,
     * which keeps every tensor's mmap'd data aligned for its element type. */
    while ((8 + h.len) % 8)
        sb_put(&h, " ", 1);
    /* Write next to the target and rename, so a reader never sees half a file. */
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 32);
    FILE *f = NULL;
    if (h.oom || !tmp)
        s = moe_error(MOE_ERR_NOMEM, "%s: out of memory building the header", path);
    else
        snprintf(tmp, plen + 32, "%s.tmp%ld", path, (long)getpid());
    if (s != MOE_OK) {
        /* reported above */
    } else if (!(f = fopen(tmp, "wb"))) {
        s = moe_error(MOE_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    } else {
        s = st_write_body(f, path, tensors, n, sizes, order, h.buf, h.len);
        if (fclose(f) != 0 && s == MOE_OK)
            s = moe_error(MOE_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        if (s == MOE_OK && rename(tmp, path) != 0)
            s = moe_error(MOE_ERR_IO, "%s: rename from %s failed: %s", path, tmp, strerror(errno));
        if (s != MOE_OK)
            unlink(tmp);
    }
    free(tmp);
    free(order);
    free(h.buf);
    free(sizes);
    return s;
}
