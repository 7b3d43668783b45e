/* Writing a pre-quantized model directory (moe_model_save): the tensors of a loaded model in the
 * dtypes it serves them in, the metadata that lets a later load check them, and the directory's
 * other files copied. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "worker/kv_transfer.h" /* moe_kv_checksum */
#include "worker/model.h"

static bool is_q(moe_dtype dt)
{
    return dt == MOE_DT_Q8 || dt == MOE_DT_Q4;
}

/* Copies src to dst (a config or tokenizer file: small). */
static moe_status copy_file(const char *src, const char *dst)
{
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return moe_error(MOE_ERR_IO, "%s: cannot open: %s", src, strerror(errno));
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        int e = errno;
        close(in);
        return moe_error(MOE_ERR_IO, "%s: cannot create: %s", dst, strerror(e));
    }
    moe_status s = MOE_OK;
    char buf[1 << 16];
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            s = moe_error(MOE_ERR_IO, "%s: read failed: %s", src, strerror(errno));
            break;
        }
        for (ssize_t off = 0; off < n && s == MOE_OK;) {
            ssize_t w = write(out, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                s = moe_error(MOE_ERR_IO, "%s: write failed: %s", dst, strerror(errno));
            else
                off += w;
        }
        if (s != MOE_OK)
            break;
    }
    close(in);
    if (close(out) != 0 && s == MOE_OK)
        s = moe_error(MOE_ERR_IO, "%s: write failed: %s", dst, strerror(errno));
    return s;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Every regular file of the model directory except its weights (config, tokenizer, ...). */
static moe_status copy_side_files(const char *dir, const char *out_dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return moe_error(MOE_ERR_IO, "%s: cannot list: %s", dir, strerror(errno));
    moe_status s = MOE_OK;
    struct dirent *e;
    char src[8192], dst[8192];
    while (s == MOE_OK && (e = readdir(d))) {
        if (e->d_name[0] == '.' || ends_with(e->d_name, ".safetensors") ||
            strcmp(e->d_name, "model.safetensors.index.json") == 0)
            continue;
        snprintf(src, sizeof src, "%s/%s", dir, e->d_name);
        snprintf(dst, sizeof dst, "%s/%s", out_dir, e->d_name);
        struct stat st;
        if (stat(src, &st) == 0 && S_ISREG(st.st_mode))
            s = copy_file(src, dst);
    }
    closedir(d);
    return s;
}

/* What a group of matrices is held in: "q8", "q4" or "none" (informative metadata). */
static const char *group_format(const moe_weight *w)
{
    return w && w->data && is_q(w->dtype) ? moe_dtype_name(w->dtype) : "none";
}

moe_status moe_model_save(const moe_model *m, const char *out_dir)
{
    if (!m || !out_dir)
        return moe_error(MOE_ERR_INVALID_ARG, "moe_model_save: no model or directory");
    for (int e = 0; e < m->cfg.n_experts; e++)
        if (!m->expert_bound[e])
            return moe_error(MOE_ERR_INVALID_ARG,
                             "%s: expert %d is not bound: load every expert to save the model",
                             m->dir, e);
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST)
        return moe_error(MOE_ERR_IO, "%s: cannot create: %s", out_dir, strerror(errno));
    char src_real[4096], dst_real[4096];
    if (realpath(m->dir, src_real) && realpath(out_dir, dst_real) &&
        strcmp(src_real, dst_real) == 0)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: is the model's own directory", out_dir);

    const moe_st_set *set = m->st;
    int n_src = moe_st_count(set);
    bool extra_lm = m->cfg.tie_embeddings && moe_model_matrix(m, "lm_head.weight") &&
                    !moe_st_find(set, "lm_head.weight");
    int n = n_src + (extra_lm ? 1 : 0);
    moe_st_write_tensor *wt = calloc((size_t)(n > 0 ? n : 1), sizeof *wt);
    cJSON *meta = cJSON_CreateObject();
    if (!wt || !meta) {
        free(wt);
        cJSON_Delete(meta);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", out_dir);
    }
    char grp[16], key[512], hex[17];
    snprintf(grp, sizeof grp, "%d", MOE_QK);
    const char *source = NULL;
    bool ok = cJSON_AddStringToObject(meta, "format", "pt") &&
              cJSON_AddStringToObject(meta, MOE_QMETA_VERSION, MOE_QMETA_VERSION_NOW) &&
              cJSON_AddStringToObject(meta, MOE_QMETA_GROUP, grp);
    for (int i = 0; i < n && ok; i++) {
        const moe_st_tensor *t = i < n_src ? moe_st_at(set, i) : NULL;
        const char *name = t ? t->name : "lm_head.weight";
        const moe_weight *w = moe_model_matrix(m, name);
        moe_st_write_tensor *o = &wt[i];
        o->name = name;
        if (w && is_q(w->dtype)) {
            o->dtype = w->dtype;
            o->n_dims = 2;
            o->shape[0] = w->rows;
            o->shape[1] = w->cols;
            o->data = w->data;
            size_t bytes = moe_dtype_row_bytes(w->dtype, (size_t)w->cols) * (size_t)w->rows;
            snprintf(key, sizeof key, "%s%s", MOE_QMETA_CHECKSUM, name);
            snprintf(hex, sizeof hex, "%016llx",
                     (unsigned long long)moe_kv_checksum(w->data, bytes));
            ok = cJSON_AddStringToObject(meta, key, hex) != NULL;
            if (t && !source)
                source = moe_st_dtype_tag(t->dtype);
        } else {
            o->dtype = t->dtype;
            o->n_dims = t->n_dims;
            memcpy(o->shape, t->shape, sizeof o->shape);
            o->data = t->data;
        }
    }
    /* Informative: what the groups hold and what the quantized matrices were made from. */
    const moe_layer_weights *l0 = &m->layers[0];
    const moe_weight *any_exp = NULL;
    for (int l = 0; l < m->cfg.n_layers && !any_exp; l++)
        if (m->layers[l].is_moe)
            any_exp = &m->layers[l].exp_gate[0];
    ok = ok && cJSON_AddStringToObject(meta, MOE_QMETA_EXPERTS, group_format(any_exp)) &&
         cJSON_AddStringToObject(meta, MOE_QMETA_DENSE, group_format(&l0->wq)) &&
         cJSON_AddStringToObject(meta, MOE_QMETA_SOURCE, source ? source : "none");
    char *meta_txt = ok ? cJSON_PrintUnformatted(meta) : NULL;
    cJSON_Delete(meta);
    moe_status s;
    if (!meta_txt) {
        s = moe_error(MOE_ERR_NOMEM, "%s: out of memory building the metadata", out_dir);
    } else {
        char path[8192];
        snprintf(path, sizeof path, "%s/model.safetensors", out_dir);
        s = moe_st_write_file(path, wt, n, meta_txt);
        /* A sharded set left there from an earlier save of another model would win at load. */
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", out_dir);
        if (s == MOE_OK)
            unlink(path);
    }
    cJSON_free(meta_txt);
    free(wt);
    if (s == MOE_OK)
        s = copy_side_files(m->dir, out_dir);
    return s;
}
