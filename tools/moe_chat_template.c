/* moe-chat-template: renders a chat template (a model's, or a file) over messages, to see the
 * prompt a chat request becomes; with a JSON array of cases it renders each and prints a JSON
 * array of results (how tests/reference/chat_template_test.py compares it with jinja2). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/chat_template.h"
#include "common/file.h"
#include "common/jinja.h"

static void usage(void)
{
    fprintf(stderr,
            "usage: moe-chat-template (--model DIR | --template FILE [--bos S] [--eos S])\n"
            "                         [--no-generation-prompt] MESSAGES_JSON\n"
            "       moe-chat-template --template FILE --cases CASES_JSON\n"
            "  MESSAGES_JSON: a file with a JSON array of {role, content} (- for stdin);\n"
            "  the rendered prompt goes to stdout.\n"
            "  CASES_JSON: a JSON array of variable objects (messages, add_generation_prompt,\n"
            "  bos_token, ...), each rendered with the raw template; prints a JSON array of\n"
            "  {\"ok\": true, \"text\": ...} or {\"ok\": false, \"error\": ...}.\n");
}

static char *read_input(const char *path, size_t *len)
{
    char *text = NULL;
    if (strcmp(path, "-") == 0) {
        size_t cap = 1 << 16, n = 0;
        text = malloc(cap);
        size_t r;
        while (text && (r = fread(text + n, 1, cap - n - 1, stdin)) > 0) {
            n += r;
            if (cap - n < 2) {
                char *t = realloc(text, cap * 2);
                if (!t) {
                    free(text);
                    return NULL;
                }
                text = t;
                cap *= 2;
            }
        }
        if (text)
            text[n] = '\0';
        *len = n;
        return text;
    }
    if (moe_read_file(path, (size_t)1 << 30, &text, len) != MOE_OK) {
        fprintf(stderr, "moe-chat-template: %s\n", moe_error_message());
        return NULL;
    }
    return text;
}

static int run_cases(const char *tpl_path, const char *cases_path)
{
    size_t tl, cl;
    char *tpl = read_input(tpl_path, &tl), *cases_text = NULL;
    if (!tpl)
        return 1;
    moe_jinja *j = NULL;
    cJSON *cases = NULL, *results = cJSON_CreateArray();
    int rc = 1;
    moe_status parse_st = moe_jinja_parse(tpl, tl, &j);
    char parse_err[1024];
    snprintf(parse_err, sizeof(parse_err), "%s", moe_error_message());
    if (!(cases_text = read_input(cases_path, &cl)))
        goto out;
    cases = cJSON_ParseWithLength(cases_text, cl);
    if (!cJSON_IsArray(cases)) {
        fprintf(stderr, "moe-chat-template: %s: expected a JSON array of cases\n", cases_path);
        goto out;
    }
    const cJSON *c;
    cJSON_ArrayForEach(c, cases)
    {
        cJSON *r = cJSON_CreateObject();
        char *out = NULL;
        size_t n = 0;
        moe_status st = parse_st;
        if (st == MOE_OK)
            st = moe_jinja_render(j, c, NULL, 0, 0, &out, &n);
        cJSON_AddBoolToObject(r, "ok", st == MOE_OK);
        if (st == MOE_OK)
            cJSON_AddStringToObject(r, "text", out);
        else
            cJSON_AddStringToObject(r, "error", parse_st != MOE_OK ? parse_err : moe_error_message());
        free(out);
        cJSON_AddItemToArray(results, r);
    }
    char *s = cJSON_PrintUnformatted(results);
    if (s) {
        fputs(s, stdout);
        fputc('\n', stdout);
        free(s);
        rc = 0;
    }
out:
    cJSON_Delete(cases);
    cJSON_Delete(results);
    moe_jinja_free(j);
    free(tpl);
    free(cases_text);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *tpl = NULL, *bos = NULL, *eos = NULL, *cases = NULL, *msgs = NULL;
    bool gen = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--model") == 0 && i + 1 < argc)
            model = argv[++i];
        else if (strcmp(a, "--template") == 0 && i + 1 < argc)
            tpl = argv[++i];
        else if (strcmp(a, "--bos") == 0 && i + 1 < argc)
            bos = argv[++i];
        else if (strcmp(a, "--eos") == 0 && i + 1 < argc)
            eos = argv[++i];
        else if (strcmp(a, "--cases") == 0 && i + 1 < argc)
            cases = argv[++i];
        else if (strcmp(a, "--no-generation-prompt") == 0)
            gen = false;
        else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            return 0;
        } else if (a[0] != '-' || strcmp(a, "-") == 0)
            msgs = a;
        else {
            usage();
            return 2;
        }
    }
    if (cases && tpl)
        return run_cases(tpl, cases);
    if ((!model && !tpl) || !msgs) {
        usage();
        return 2;
    }
    moe_chat_template *t = NULL;
    moe_status st;
    if (model) {
        st = moe_chat_template_load(model, tpl, &t);
    } else {
        size_t n;
        char *src = read_input(tpl, &n);
        if (!src)
            return 1;
        st = moe_chat_template_create(src, bos, eos, &t);
        free(src);
    }
    if (st != MOE_OK) {
        fprintf(stderr, "moe-chat-template: %s\n", moe_error_message());
        return 1;
    }
    size_t ml;
    char *mtext = read_input(msgs, &ml);
    cJSON *m = mtext ? cJSON_ParseWithLength(mtext, ml) : NULL;
    free(mtext);
    int rc = 1;
    if (!cJSON_IsArray(m)) {
        fprintf(stderr, "moe-chat-template: %s: expected a JSON array of messages\n", msgs);
    } else {
        char *out;
        size_t n;
        if (moe_chat_template_render(t, m, NULL, gen, 0, &out, &n) == MOE_OK) {
            fwrite(out, 1, n, stdout);
            free(out);
            rc = 0;
        } else {
            fprintf(stderr, "moe-chat-template: %s\n", moe_error_message());
        }
    }
    cJSON_Delete(m);
    moe_chat_template_free(t);
    return rc;
}
