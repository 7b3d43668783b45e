/* Chat templates: finding a model's template and its special-token strings in
 * tokenizer_config.json, and rendering messages through the Jinja engine. */
#include "common/chat_template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/file.h"
#include "common/jinja.h"

#define MAX_CONFIG_BYTES ((size_t)64 << 20)

struct moe_chat_template {
    moe_jinja *jinja;
    char *source;
    char *bos, *eos; /* NULL: not defined */
};

moe_status moe_chat_template_create(const char *source, const char *bos_token,
                                    const char *eos_token, moe_chat_template **out)
{
    *out = NULL;
    moe_chat_template *t = calloc(1, sizeof(*t));
    if (!t)
        return moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
    t->source = strdup(source);
    t->bos = bos_token ? strdup(bos_token) : NULL;
    t->eos = eos_token ? strdup(eos_token) : NULL;
    if (!t->source || (bos_token && !t->bos) || (eos_token && !t->eos)) {
        moe_chat_template_free(t);
        return moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
    }
    moe_status st = moe_jinja_parse(source, strlen(source), &t->jinja);
    if (st != MOE_OK) {
        moe_chat_template_free(t);
        return st;
    }
    *out = t;
    return MOE_OK;
}

/* A special token as tokenizer_config.json writes it: "..." or {"content": "...", ...}. */
static const char *token_string(const cJSON *cfg, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(v))
        v = cJSON_GetObjectItemCaseSensitive(v, "content");
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char *config_template(const cJSON *cfg)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (cJSON_IsString(v))
        return v->valuestring;
    if (cJSON_IsArray(v)) { /* [{"name": "default", "template": ...}, {"name": "tool_use", ...}] */
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            const cJSON *n = cJSON_GetObjectItemCaseSensitive(e, "name");
            const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(e, "template");
            if (cJSON_IsString(n) && strcmp(n->valuestring, "default") == 0 && cJSON_IsString(tpl))
                return tpl->valuestring;
        }
    }
    return NULL;
}

moe_status moe_chat_template_load(const char *model_dir, const char *template_path,
                                  moe_chat_template **out)
{
    *out = NULL;
    char path[4096];
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", model_dir ? model_dir : ".");
    char *text = NULL, *file_tpl = NULL;
    size_t len = 0;
    cJSON *cfg = NULL;
    moe_status st = MOE_OK;
    if (model_dir) {
        st = moe_read_file(path, MAX_CONFIG_BYTES, &text, &len);
        if (st == MOE_OK) {
            cfg = cJSON_ParseWithLength(text, len);
            if (!cfg) {
                st = moe_error(MOE_ERR_FORMAT, "%s: not valid JSON", path);
                goto out;
            }
        } else if (!template_path) {
            st = moe_error(MOE_ERR_NOT_FOUND,
                           "the model has no chat template: %s cannot be read (%s)", path,
                           moe_error_message());
            goto out;
        }
        st = MOE_OK;
    }
    const char *src = NULL;
    if (template_path) {
        size_t tl;
        if ((st = moe_read_file(template_path, MAX_CONFIG_BYTES, &file_tpl, &tl)) != MOE_OK) {
            st = moe_error_context(st, "--chat-template: ");
            goto out;
        }
        if (strlen(file_tpl) != tl) {
            st = moe_error(MOE_ERR_FORMAT, "%s: the template holds a NUL byte", template_path);
            goto out;
        }
        src = file_tpl;
    } else {
        src = config_template(cfg);
        if (!src) {
            st = moe_error(MOE_ERR_NOT_FOUND,
                           "the model has no chat template: %s has no \"chat_template\" (give one "
                           "with --chat-template FILE)",
                           path);
            goto out;
        }
    }
    st = moe_chat_template_create(src, cfg ? token_string(cfg, "bos_token") : NULL,
                                  cfg ? token_string(cfg, "eos_token") : NULL, out);
    if (st != MOE_OK)
        st = moe_error_context(st, "%s: ", template_path ? template_path : path);
out:
    cJSON_Delete(cfg);
    free(text);
    free(file_tpl);
    return st;
}

moe_status moe_chat_template_render(const moe_chat_template *t, const cJSON *messages,
                                    const cJSON *extra, bool add_generation_prompt,
                                    size_t max_bytes, char **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    /* messages goes in by reference (it may be large); the rest are small values */
    cJSON *own = cJSON_CreateObject();
    if (!own)
        return moe_error(MOE_ERR_NOMEM, "chat template: out of memory");
    if (t->bos)
        cJSON_AddStringToObject(own, "bos_token", t->bos);
    if (t->eos)
        cJSON_AddStringToObject(own, "eos_token", t->eos);
    cJSON_AddBoolToObject(own, "add_generation_prompt", add_generation_prompt);
    moe_jinja_var more[4] = {{"messages", messages}};
    int n = 1;
    const cJSON *e;
    cJSON_ArrayForEach(e, own) more[n++] = (moe_jinja_var){e->string, e};
    moe_status st = moe_jinja_render(t->jinja, cJSON_IsObject(extra) ? extra : NULL, more, n,
                                     max_bytes, out, out_len);
    cJSON_Delete(own);
    return st;
}

const char *moe_chat_template_source(const moe_chat_template *t) { return t->source; }

void moe_chat_template_free(moe_chat_template *t)
{
    if (!t)
        return;
    moe_jinja_free(t->jinja);
    free(t->source);
    free(t->bos);
    free(t->eos);
    free(t);
}
