/* The safetensors reader: mmaps one file or a sharded set, validates every header entry, and
 * gives zero-copy, name-indexed access to the tensors. */
#include "worker/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file.h"

/* The reference implementation refuses headers above 100 MB; so do we (bounds the copy below). */
#define ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

typedef struct {
    void *addr;
    size_t len;
} st_map;

typedef struct {
    const char *file; /* the set's own path string: compared by pointer */
    char *key, *val;
} st_meta;

struct moe_st_set {
    moe_st_tensor *t;
    int n, cap;
    char **files; /* owned paths; tensors' .file point at these */
    int n_files, cap_files;
    st_map *maps;
    int n_maps, cap_maps;
    int *slots; /* open-addressing name index: tensor index or -1; size n_slots (power of 2) */
    size_t n_slots;
    st_meta *meta; /* every file's __metadata__ strings, sorted by (file, key) in set_index */
    int n_meta, cap_meta;
};

/* Makes room for `need` elements of `elem` bytes in *p (capacity *cap, doubled as needed).
 * Returns 0, or -1 with *p unchanged when out of memory. */
#define ST_GROW(p, cap, need) st_grow((void *)&(p), &(cap), (need), sizeof *(p))
static int st_grow(void *pp, int *cap, int need, size_t elem)
{
    if (need <= *cap)
        return 0;
    int c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *old;
    memcpy(&old, pp, sizeof old);
    void *q = realloc(old, (size_t)c * elem);
    if (!q)
        return -1;
    memcpy(pp, &q, sizeof q);
    *cap = c;
    return 0;
}

static uint64_t hash_name(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static moe_st_set *set_new(void)
{
    return calloc(1, sizeof(moe_st_set));
}

void moe_st_close(moe_st_set *set)
{
    if (!set)
        return;
    for (int i = 0; i < set->n; i++)
        free((void *)(uintptr_t)set->t[i].name); /* owned; const only for callers */
    free(set->t);
    for (int i = 0; i < set->n_files; i++)
        free(set->files[i]);
    free(set->files);
    for (int i = 0; i < set->n_maps; i++)
        munmap(set->maps[i].addr, set->maps[i].len);
    free(set->maps);
    free(set->slots);
    for (int i = 0; i < set->n_meta; i++) {
        free(set->meta[i].key);
        free(set->meta[i].val);
    }
    free(set->meta);
    free(set);
}

static const char *set_add_file(moe_st_set *set, const char *path)
{
    if (ST_GROW(set->files, set->cap_files, set->n_files + 1))
        return NULL;
    char *p = strdup(path);
    if (!p)
        return NULL;
    set->files[set->n_files++] = p;
    return p;
}

/* Builds (or rebuilds) the name index; refuses a name present twice (in two shards, or
 * twice in one header: cJSON keeps duplicate keys). */
static int cmp_meta(const void *a, const void *b)
{
    const st_meta *x = a, *y = b;
    if (x->file != y->file)
        return (uintptr_t)x->file < (uintptr_t)y->file ? -1 : 1;
    return strcmp(x->key, y->key);
}

static moe_status set_index(moe_st_set *set)
{
    if (set->n_meta > 1)
        qsort(set->meta, (size_t)set->n_meta, sizeof *set->meta, cmp_meta);
    size_t ns = 16;
    while (ns < (size_t)set->n * 2)
        ns *= 2;
    int *slots = malloc(ns * sizeof *slots);
    if (!slots)
        return moe_error(MOE_ERR_NOMEM, "out of memory indexing %d tensors", set->n);
    memset(slots, 0xff, ns * sizeof *slots);
    for (int i = 0; i < set->n; i++) {
        size_t h = (size_t)hash_name(set->t[i].name) & (ns - 1);
        while (slots[h] >= 0) {
            const moe_st_tensor *o = &set->t[slots[h]];
            if (strcmp(o->name, set->t[i].name) == 0) {
                free(slots);
                if (o->file == set->t[i].file)
                    return moe_error(MOE_ERR_FORMAT, "%s: tensor %s appears twice in the header",
                                     o->file, o->name);
                return moe_error(MOE_ERR_FORMAT, "%s: tensor %s is also in %s", set->t[i].file,
                                 o->name, o->file);
            }
            h = (h + 1) & (ns - 1);
        }
        slots[h] = i;
    }
    free(set->slots);
    set->slots = slots;
    set->n_slots = ns;
    return MOE_OK;
}

const moe_st_tensor *moe_st_find(const moe_st_set *set, const char *name)
{
    if (!set || !set->slots || !name)
        return NULL;
    size_t h = (size_t)hash_name(name) & (set->n_slots - 1);
    while (set->slots[h] >= 0) {
        const moe_st_tensor *t = &set->t[set->slots[h]];
        if (strcmp(t->name, name) == 0)
            return t;
        h = (h + 1) & (set->n_slots - 1);
    }
    return NULL;
}

const char *moe_st_meta(const moe_st_set *set, const char *file, const char *key)
{
    if (!set || !file || !key || !set->n_meta)
        return NULL;
    const char *own = NULL; /* the set's copy of the path: meta entries hold that pointer */
    for (int i = 0; i < set->n_files && !own; i++)
        if (set->files[i] == file || strcmp(set->files[i], file) == 0)
            own = set->files[i];
    if (!own)
        return NULL;
    st_meta k = {.file = own, .key = (char *)(uintptr_t)key};
    const st_meta *e = bsearch(&k, set->meta, (size_t)set->n_meta, sizeof k, cmp_meta);
    return e ? e->val : NULL;
}

size_t moe_st_release(const moe_st_set *set, const void *p, size_t n)
{
    if (!set || !p || !n)
        return 0;
    const uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < set->n_maps; i++) {
        const uintptr_t m0 = (uintptr_t)set->maps[i].addr, m1 = m0 + set->maps[i].len;
        if (a < m0 || a >= m1)
            continue;
        const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
        uintptr_t b = a - (a - m0) % pg; /* maps start on a page */
        uintptr_t e = n < m1 - a ? a + n : m1; /* madvise rounds the length up to a page */
        /* MAP_PRIVATE, PROT_READ and never written: dropping the pages loses nothing, a later
         * read faults them in again from the file. */
        if (madvise((void *)b, e - b, MADV_DONTNEED) != 0)
            return 0;
        return e - b;
    }
    return 0; /* not in a map (moe_st_parse's caller-owned buffer): never touched */
}

int moe_st_count(const moe_st_set *set)
{
    return set ? set->n : 0;
}

const moe_st_tensor *moe_st_at(const moe_st_set *set, int i)
{
    return set && i >= 0 && i < set->n ? &set->t[i] : NULL;
}

/* A JSON number that is an exact non-negative integer below 2^53 (what doubles hold exactly). */
static int json_u53(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j))
        return 0;
    double v = j->valuedouble;
    if (!(v >= 0.0) || v > 9007199254740992.0 || v != floor(v))
        return 0;
    *out = (uint64_t)v;
    return 1;
}

const char *moe_st_dtype_tag(moe_dtype dt)
{
    switch (dt) {
    case MOE_DT_F32:
        return "F32";
    case MOE_DT_BF16:
        return "BF16";
    case MOE_DT_F16:
        return "F16";
    case MOE_DT_Q8:
        return "MOE_Q8";
    case MOE_DT_Q4:
        return "MOE_Q4";
    default:
        return NULL;
    }
}

size_t moe_st_dtype_align(moe_dtype dt)
{
    return dt == MOE_DT_F32 ? 4 : 2; /* Q8/Q4 blocks start with a 2-byte f16 scale */
}

int moe_st_tensor_bytes(moe_dtype dt, int n_dims, const int64_t *shape, uint64_t *bytes)
{
    const bool q = dt == MOE_DT_Q8 || dt == MOE_DT_Q4;
    if (q && n_dims != 2)
        return -1;
    uint64_t total = q ? 1 : dt == MOE_DT_F32 ? 4 : 2;
    for (int d = 0; d < n_dims; d++) {
        if (shape[d] < 0)
            return -1;
        uint64_t v = (uint64_t)shape[d];
        if (q && d == 1) { /* a row of blocks: the last dimension counts weights */
            if (v % MOE_QK)
                return -1;
            v = v / MOE_QK * (dt == MOE_DT_Q8 ? sizeof(moe_block_q8) : sizeof(moe_block_q4));
        }
        if (v && total > UINT64_MAX / v)
            return -1;
        total *= v;
    }
    *bytes = total;
    return 0;
}

/* dtype tag -> our dtype; returns 0 for a dtype safetensors knows but we do not serve, -1 for an
 * unknown tag. */
static int parse_dtype(const char *s, moe_dtype *dt)
{
    for (int d = 0; d < MOE_DT_COUNT; d++) {
        const char *tag = moe_st_dtype_tag((moe_dtype)d);
        if (tag && strcmp(s, tag) == 0) {
            *dt = (moe_dtype)d;
            return 1;
        }
    }
    static const char *const known[] = {
        "F64",  "I64",     "U64",     "I32",     "U32",     "I16",     "U16", "I8", "U8",
        "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",  "C64"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(s, known[i]) == 0)
            return 0;
    return -1;
}

typedef struct {
    uint64_t begin, end;
    int idx;
} st_range;

static int cmp_range(const void *a, const void *b)
{
    const st_range *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Appends one tensor described by header entry `e` (already known to be an object). */
static moe_status add_entry(moe_st_set *set, const cJSON *e, const char *file, const uint8_t *data,
                            uint64_t data_len, st_range *range)
{
    const char *name = e->string;
    const cJSON *jdt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *jshape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *joff = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(jdt))
        return moe_error(MOE_ERR_FORMAT, "%s: tensor %s: field dtype missing or not a string", file,
                         name);
    if (!cJSON_IsArray(jshape))
        return moe_error(MOE_ERR_FORMAT, "%s: tensor %s: field shape missing or not an array", file,
                         name);
    if (!cJSON_IsArray(joff) || cJSON_GetArraySize(joff) != 2)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor %s: field data_offsets is not [begin, end]",
                         file, name);

    moe_dtype dt;
    int k = parse_dtype(jdt->valuestring, &dt);
    if (k == 0)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "%s: tensor %s: dtype %s is not supported (F32, BF16, F16, MOE_Q8, "
                         "MOE_Q4 only)",
                         file, name, jdt->valuestring);
    if (k < 0)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor %s: unknown dtype \"%s\"", file, name,
                         jdt->valuestring);

    int nd = cJSON_GetArraySize(jshape);
    if (nd > MOE_ST_MAX_DIMS)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: tensor %s: %d dimensions (at most %d)", file,
                         name, nd, MOE_ST_MAX_DIMS);
    int64_t shape[MOE_ST_MAX_DIMS] = {0};
    int d = 0;
    for (const cJSON *j = jshape->child; j; j = j->next, d++) {
        uint64_t v;
        if (!json_u53(j, &v))
            return moe_error(MOE_ERR_FORMAT,
                             "%s: tensor %s: shape[%d] is not a non-negative integer", file, name,
                             d);
        shape[d] = (int64_t)v;
    }
    uint64_t need;
    if (moe_st_tensor_bytes(dt, nd, shape, &need) != 0) {
        if (dt == MOE_DT_Q8 || dt == MOE_DT_Q4)
            return moe_error(MOE_ERR_FORMAT,
                             "%s: tensor %s: a %s tensor must be 2-D with a last dimension that "
                             "is a multiple of %d",
                             file, name, jdt->valuestring, MOE_QK);
        return moe_error(MOE_ERR_FORMAT, "%s: tensor %s: shape is too large", file, name);
    }
    size_t esize = moe_st_dtype_align(dt);

    uint64_t b, en;
    if (!json_u53(joff->child, &b) || !json_u53(joff->child->next, &en))
        return moe_error(MOE_ERR_FORMAT,
                         "%s: tensor %s: data_offsets are not non-negative integers", file, name);
    if (b > en)
        return moe_error(MOE_ERR_FORMAT,
                         "%s: tensor %s: data_offsets [%llu, %llu] end before they begin", file,
                         name, (unsigned long long)b, (unsigned long long)en);
    if (en > data_len)
        return moe_error(
            MOE_ERR_FORMAT,
            "%s: tensor %s: data_offsets [%llu, %llu] outside the data section (%llu bytes)", file,
            name, (unsigned long long)b, (unsigned long long)en, (unsigned long long)data_len);
    if (en - b != need)
        return moe_error(MOE_ERR_FORMAT,
                         "%s: tensor %s: data_offsets cover %llu bytes but shape x %s needs %llu",
                         file, name, (unsigned long long)(en - b), jdt->valuestring,
                         (unsigned long long)need);
    /* Reading a misaligned float is undefined behaviour; the reference writer pads the header and
     * orders tensors so this never happens in real files. */
    if (((uintptr_t)(data + b)) % esize)
        return moe_error(
            MOE_ERR_UNSUPPORTED,
            "%s: tensor %s: data at offset %llu is not aligned to its %zu-byte elements", file,
            name, (unsigned long long)b, esize);

    if (ST_GROW(set->t, set->cap, set->n + 1))
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", file);
    char *nm = strdup(name);
    if (!nm)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", file);
    moe_st_tensor *t = &set->t[set->n];
    t->name = nm;
    t->file = file;
    t->dtype = dt;
    t->n_dims = nd;
    memcpy(t->shape, shape, sizeof shape);
    t->data = data + b;
    t->n_bytes = (size_t)(en - b);
    range->begin = b;
    range->end = en;
    range->idx = set->n;
    set->n++;
    return MOE_OK;
}

/* Keeps the string entries of a __metadata__ object (the format allows only strings; other values
 * are ignored, as before this reader looked at metadata at all). */
static moe_status add_meta(moe_st_set *set, const cJSON *meta, const char *file)
{
    if (!cJSON_IsObject(meta))
        return MOE_OK;
    for (const cJSON *e = meta->child; e; e = e->next) {
        if (!cJSON_IsString(e))
            continue;
        if (ST_GROW(set->meta, set->cap_meta, set->n_meta + 1))
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory for __metadata__", file);
        st_meta *m = &set->meta[set->n_meta];
        m->file = file;
        m->key = strdup(e->string);
        m->val = strdup(e->valuestring);
        if (!m->key || !m->val) {
            free(m->key);
            free(m->val);
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory for __metadata__", file);
        }
        set->n_meta++;
    }
    return MOE_OK;
}

/* Parses one file image and appends its tensors. `file` is owned by the set already. */
static moe_status set_add_image(moe_st_set *set, const uint8_t *buf, size_t len, const char *file)
{
    if (len < 8)
        return moe_error(MOE_ERR_FORMAT,
                         "%s: file is %zu bytes, shorter than the 8-byte header length", file, len);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)buf[i] << (8 * i);
    if (hlen > len - 8)
        return moe_error(MOE_ERR_FORMAT,
                         "%s: header length %llu runs past the end of the file (%zu bytes)", file,
                         (unsigned long long)hlen, len);
    if (hlen > ST_MAX_HEADER)
        return moe_error(MOE_ERR_FORMAT, "%s: header length %llu exceeds the 100 MB limit", file,
                         (unsigned long long)hlen);
    if (hlen < 2)
        return moe_error(MOE_ERR_FORMAT, "%s: header length %llu is too short for a JSON object",
                         file, (unsigned long long)hlen);

    /* Copy the header so cJSON sees a NUL-terminated string and never reads past the map. */
    char *txt = malloc((size_t)hlen + 1);
    if (!txt)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory for a %llu-byte header", file,
                         (unsigned long long)hlen);
    memcpy(txt, buf + 8, (size_t)hlen);
    txt[hlen] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(txt, &end, 0);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        long off = at && at >= txt && at <= txt + hlen ? (long)(at - txt) : -1;
        free(txt);
        return moe_error(MOE_ERR_FORMAT, "%s: header is not valid JSON (near byte %ld)", file, off);
    }
    /* The format pads the header with spaces; tolerate NULs too, refuse anything else. */
    for (const char *p = end; p && p < txt + hlen; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
            cJSON_Delete(root);
            free(txt);
            return moe_error(MOE_ERR_FORMAT, "%s: header has trailing bytes after the JSON object",
                             file);
        }
    }
    free(txt);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_FORMAT, "%s: header is not a JSON object", file);
    }

    const uint8_t *data = buf + 8 + hlen;
    uint64_t data_len = (uint64_t)len - 8 - hlen;
    int n_entries = cJSON_GetArraySize(root);
    st_range *ranges = malloc((size_t)(n_entries > 0 ? n_entries : 1) * sizeof *ranges);
    if (!ranges) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", file);
    }
    int n_ranges = 0;
    moe_status s = MOE_OK;
    for (const cJSON *e = root->child; e && s == MOE_OK; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) {
            s = add_meta(set, e, file);
            continue;
        }
        if (!cJSON_IsObject(e)) {
            s = moe_error(MOE_ERR_FORMAT, "%s: tensor %s: header entry is not an object", file,
                          e->string);
            break;
        }
        s = add_entry(set, e, file, data, data_len, &ranges[n_ranges]);
        if (s == MOE_OK)
            n_ranges++;
    }
    if (s == MOE_OK) {
        /* Sorted by begin, each tensor must end before the next one starts (empty tensors
         * occupy nothing and cannot overlap). */
        qsort(ranges, (size_t)n_ranges, sizeof *ranges, cmp_range);
        uint64_t prev_end = 0;
        int prev = -1;
        for (int i = 0; i < n_ranges; i++) {
            if (ranges[i].begin == ranges[i].end)
                continue;
            if (prev >= 0 && ranges[i].begin < prev_end) {
                s = moe_error(MOE_ERR_FORMAT,
                              "%s: tensor %s overlaps tensor %s in the data section", file,
                              set->t[ranges[i].idx].name, set->t[prev].name);
                break;
            }
            prev_end = ranges[i].end;
            prev = ranges[i].idx;
        }
    }
    free(ranges);
    cJSON_Delete(root);
    return s;
}

moe_status moe_st_parse(const uint8_t *buf, size_t len, const char *name, moe_st_set **out)
{
    if (!buf && len)
        return moe_error(MOE_ERR_INVALID_ARG, "moe_st_parse: NULL buffer");
    moe_st_set *set = set_new();
    const char *file = set ? set_add_file(set, name ? name : "<memory>") : NULL;
    if (!file) {
        moe_st_close(set);
        return moe_error(MOE_ERR_NOMEM, "out of memory opening %s", name ? name : "<memory>");
    }
    moe_status s = set_add_image(set, buf ? buf : (const uint8_t *)"", len, file);
    if (s == MOE_OK)
        s = set_index(set);
    if (s != MOE_OK) {
        moe_st_close(set);
        return s;
    }
    *out = set;
    return MOE_OK;
}

/* mmaps `path` read-only and appends its tensors. The map is private and not populated: only the
 * header pages are touched here; weights fault in when (and if) the engine reads them. */
static moe_status set_add_path(moe_st_set *set, const char *path)
{
    const char *file = set_add_file(set, path);
    if (!file)
        return moe_error(MOE_ERR_NOMEM, "out of memory opening %s", path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_error(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: cannot open: %s",
                         path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return moe_error(MOE_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moe_error(MOE_ERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size < 8) {
        close(fd);
        return moe_error(MOE_ERR_FORMAT,
                         "%s: file is %lld bytes, shorter than the 8-byte header length", path,
                         (long long)st.st_size);
    }
    size_t len = (size_t)st.st_size;
    void *addr = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (addr == MAP_FAILED)
        return moe_error(MOE_ERR_IO, "%s: mmap of %zu bytes failed: %s", path, len, strerror(e));
    if (ST_GROW(set->maps, set->cap_maps, set->n_maps + 1)) {
        munmap(addr, len);
        return moe_error(MOE_ERR_NOMEM, "out of memory opening %s", path);
    }
    set->maps[set->n_maps].addr = addr;
    set->maps[set->n_maps].len = len;
    set->n_maps++;
    moe_status s = set_add_image(set, addr, len, file);
    /* The header was copied and parsed: its pages are not needed again. */
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)((const uint8_t *)addr)[i] << (8 * i);
    if (s == MOE_OK)
        moe_st_release(set, addr, (size_t)(8 + hlen));
    return s;
}

moe_status moe_st_open_file(const char *path, moe_st_set **out)
{
    moe_st_set *set = set_new();
    if (!set)
        return moe_error(MOE_ERR_NOMEM, "out of memory opening %s", path);
    moe_status s = set_add_path(set, path);
    if (s == MOE_OK)
        s = set_index(set);
    if (s != MOE_OK) {
        moe_st_close(set);
        return s;
    }
    *out = set;
    return MOE_OK;
}

static char *read_text(const char *path, moe_status *st)
{
    char *buf;
    *st = moe_read_file(path, (size_t)1 << 30, &buf, NULL);
    return *st == MOE_OK ? buf : NULL;
}

/* Opens the shards named by DIR/model.safetensors.index.json and checks the index against them:
 * every indexed tensor is in the file the index names, and every tensor is indexed. */
static moe_status open_sharded(moe_st_set *set, const char *dir, const char *index_path)
{
    moe_status s;
    char *txt = read_text(index_path, &s);
    if (!txt)
        return s;
    cJSON *root = cJSON_Parse(txt);
    free(txt);
    if (!root)
        return moe_error(MOE_ERR_FORMAT, "%s: not valid JSON", index_path);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_FORMAT, "%s: field weight_map missing or not an object",
                         index_path);
    }
    s = MOE_OK;
    size_t plen = strlen(dir) + 1;
    char *path = NULL;
    /* Distinct shard names, in first-seen order (an index lists a few shards many times). */
    const char **names = NULL;
    int n_names = 0, cap_names = 0;
    for (const cJSON *e = wm->child; e && s == MOE_OK; e = e->next) {
        if (!cJSON_IsString(e) || !e->valuestring[0]) {
            s = moe_error(MOE_ERR_FORMAT, "%s: weight_map: tensor %s: file is not a string",
                          index_path, e->string);
            break;
        }
        const char *fn = e->valuestring;
        /* A shard is a file of this directory; anything else would let an index reach out. */
        if (strchr(fn, '/') || strcmp(fn, ".") == 0 || strcmp(fn, "..") == 0) {
            s = moe_error(MOE_ERR_FORMAT,
                          "%s: weight_map: tensor %s: file \"%s\" is not a plain name", index_path,
                          e->string, fn);
            break;
        }
        int seen = 0;
        for (int i = 0; i < n_names && !seen; i++)
            seen = strcmp(names[i], fn) == 0;
        if (seen)
            continue;
        if (ST_GROW(names, cap_names, n_names + 1)) {
            s = moe_error(MOE_ERR_NOMEM, "%s: out of memory", index_path);
            break;
        }
        names[n_names++] = fn;
    }
    for (int i = 0; i < n_names && s == MOE_OK; i++) {
        size_t need = plen + strlen(names[i]) + 1;
        char *np = realloc(path, need);
        if (!np) {
            s = moe_error(MOE_ERR_NOMEM, "%s: out of memory", index_path);
            break;
        }
        path = np;
        snprintf(path, need, "%s/%s", dir, names[i]);
        s = set_add_path(set, path);
        if (s != MOE_OK)
            moe_error_context(s, "%s names shard %s: ", index_path, names[i]);
    }
    if (s == MOE_OK && n_names == 0)
        s = moe_error(MOE_ERR_FORMAT, "%s: weight_map is empty", index_path);
    if (s == MOE_OK)
        s = set_index(set);
    /* Mark what the index covers (by tensor index: a name lookup per tensor in the cJSON object
     * would be quadratic, and big MoE checkpoints have tens of thousands of tensors). */
    unsigned char *listed = NULL;
    if (s == MOE_OK && !(listed = calloc((size_t)(set->n > 0 ? set->n : 1), 1)))
        s = moe_error(MOE_ERR_NOMEM, "%s: out of memory", index_path);
    for (const cJSON *e = wm->child; e && s == MOE_OK; e = e->next) {
        const moe_st_tensor *t = moe_st_find(set, e->string);
        if (!t) {
            s = moe_error(MOE_ERR_NOT_FOUND, "%s: tensor %s is indexed in %s but not present there",
                          index_path, e->string, e->valuestring);
            break;
        }
        const char *base = strrchr(t->file, '/');
        base = base ? base + 1 : t->file;
        if (strcmp(base, e->valuestring) != 0)
            s = moe_error(MOE_ERR_FORMAT, "%s: tensor %s is indexed in %s but lives in %s",
                          index_path, e->string, e->valuestring, t->file);
        listed[t - set->t] = 1;
    }
    for (int i = 0; i < set->n && s == MOE_OK; i++) {
        if (!listed[i])
            s = moe_error(MOE_ERR_FORMAT, "%s: tensor %s is not listed in %s", set->t[i].file,
                          set->t[i].name, index_path);
    }
    free(listed);
    free(path);
    free(names);
    cJSON_Delete(root);
    return s;
}

moe_status moe_st_open_dir(const char *dir, moe_st_set **out)
{
    size_t need = strlen(dir) + 40;
    char *path = malloc(need);
    moe_st_set *set = set_new();
    if (!path || !set) {
        free(path);
        free(set);
        return moe_error(MOE_ERR_NOMEM, "out of memory opening %s", dir);
    }
    moe_status s;
    snprintf(path, need, "%s/model.safetensors.index.json", dir);
    if (access(path, F_OK) == 0) {
        s = open_sharded(set, dir, path);
    } else {
        snprintf(path, need, "%s/model.safetensors", dir);
        if (access(path, F_OK) != 0)
            s = moe_error(MOE_ERR_NOT_FOUND,
                          "%s: no model.safetensors or model.safetensors.index.json", dir);
        else if ((s = set_add_path(set, path)) == MOE_OK)
            s = set_index(set);
    }
    free(path);
    if (s != MOE_OK) {
        moe_st_close(set);
        return s;
    }
    *out = set;
    return MOE_OK;
}
