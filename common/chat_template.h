/* A model's chat template: the Jinja template of its tokenizer_config.json (or a file given with
 * --chat-template) with its bos/eos token strings, rendered over OpenAI-style messages the way
 * transformers' apply_chat_template does (common/jinja.h). */
#ifndef MOE_COMMON_CHAT_TEMPLATE_H
#define MOE_COMMON_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>
#include <cjson/cJSON.h>
#include "common/status.h"

typedef struct moe_chat_template moe_chat_template;

/* Loads DIR/tokenizer_config.json's chat_template (a string, or a list of {name, template}
 * where "default" is taken) and its bos_token/eos_token (strings or {"content": ...}), or, when
 * template_path is not NULL, the template from that file (tokens still from DIR when present).
 * MOE_ERR_NOT_FOUND when there is no template (the message names the file); MOE_ERR_FORMAT
 * (with the line) when the template does not compile; MOE_ERR_IO. */
moe_status moe_chat_template_load(const char *model_dir, const char *template_path,
                                  moe_chat_template **out);

/* From strings (bos/eos may be NULL: then undefined in the template, as in transformers). */
moe_status moe_chat_template_create(const char *source, const char *bos_token,
                                    const char *eos_token, moe_chat_template **out);

/* Renders `messages` (a JSON array of {role, content, ...}) with add_generation_prompt and the
 * variables of `extra` (a JSON object, e.g. tools or chat_template_kwargs; NULL for none) next
 * to messages, bos_token and eos_token. *out is malloc'd (caller frees). Fails like
 * moe_jinja_render: MOE_ERR_INVALID_ARG (the template raised or hit an error: the message says
 * what), MOE_ERR_RANGE (past max_bytes; 0 = the default). Thread-safe. */
moe_status moe_chat_template_render(const moe_chat_template *t, const cJSON *messages,
                                    const cJSON *extra, bool add_generation_prompt,
                                    size_t max_bytes, char **out, size_t *out_len);

/* The template's source text. */
const char *moe_chat_template_source(const moe_chat_template *t);

void moe_chat_template_free(moe_chat_template *t);

#endif
