/* A small Jinja2 engine for the models' chat templates (tokenizer_config.json's chat_template).
 *
 * Why our own: no C Jinja library is packaged in Debian (checked: apt-cache search jinja finds
 * only Python's jinja2 and C++ projects' vendored copies), and chat templates use a small,
 * known part of the language. Semantics follow Python jinja2 3.x configured the way transformers
 * renders chat templates (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
 * loopcontrols, a `tojson` that keeps non-ASCII and key order, raise_exception): the output is
 * meant to be byte for byte what transformers' apply_chat_template produces, and
 * tests/reference/chat_template_test.py checks that against jinja2 itself.
 *
 * Covered: {{ }}, {% %}, {# #} with -/+ whitespace control; if/elif/else, for (tuple targets,
 * `if` filter, else, loop.*), break/continue, set (names, tuples, namespace attributes, blocks),
 * macros with defaults and keyword arguments, {% generation %}; literals, lists, dicts,
 * tuples, attribute/item access, slicing, calls, the operators and precedence of jinja2,
 * `a if b else c`; the filters, tests, string/dict methods and globals (range, namespace, dict,
 * raise_exception, strftime_now) chat templates call. Not covered: template inheritance,
 * includes, call blocks, autoescape. */
#ifndef MOE_COMMON_JINJA_H
#define MOE_COMMON_JINJA_H

#include <stddef.h>
#include <cjson/cJSON.h>
#include "common/status.h"

typedef struct moe_jinja moe_jinja;

/* Compiles a template. MOE_ERR_FORMAT with "line N: ..." on a syntax error or an unknown filter
 * or test; MOE_ERR_NOMEM. The template does not keep `src`. Free with moe_jinja_free. */
moe_status moe_jinja_parse(const char *src, size_t len, moe_jinja **out);

/* Renders with the variables of `vars` (a cJSON object: messages, add_generation_prompt,
 * bos_token...; NULL for none) and then more[0..n_more) (which win over vars' of the same name). `max_bytes` bounds the memory the render may use (values and
 * output; 0 = 256 MiB) and so the output; a render also stops after a fixed number of loop
 * iterations and macro calls (a template that loops forever fails instead of hanging).
 * On MOE_OK *out is a malloc'd NUL-terminated string of *out_len bytes (the caller frees it).
 * Fails with MOE_ERR_INVALID_ARG and "line N: ..." when the template raises (raise_exception:
 * the message is the template's own) or hits an error jinja2 would raise (undefined
 * attribute of an undefined value, type errors), MOE_ERR_RANGE past the limits. Thread-safe:
 * one template may be rendered by several threads at once. */
typedef struct {
    const char *name;
    const cJSON *value;
} moe_jinja_var;

moe_status moe_jinja_render(const moe_jinja *t, const cJSON *vars, const moe_jinja_var *more,
                            int n_more, size_t max_bytes, char **out, size_t *out_len);

void moe_jinja_free(moe_jinja *t);

#endif
