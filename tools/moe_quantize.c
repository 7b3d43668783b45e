/* moe-quantize: writes a pre-quantized copy of a model directory once (Q8/Q4 matrices in
 * safetensors with the metadata that checks them), so serving loads it with no float copy. */
#include <stdio.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "worker/model.h"

static void usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s --quantize SPEC IN_DIR OUT_DIR\n"
            "  SPEC as moe-generate --quantize: a comma list of GROUP=q8|q4|none, GROUP experts,\n"
            "  dense or all (e.g. all=q4, experts=q4,dense=q8). OUT_DIR gets model.safetensors\n"
            "  (matrices in MOE_Q8/MOE_Q4, checksummed) and IN_DIR's config and tokenizer files;\n"
            "  load it like any model directory (docs/models.md, pre-quantized models).\n",
            prog);
}

int main(int argc, char **argv)
{
    const char *prog = argc > 0 ? argv[0] : "moe-quantize";
    const char *slash = strrchr(prog, '/');
    prog = slash ? slash + 1 : prog;
    moe_log_init(-1);
    const char *spec = NULL, *pos[2] = {NULL, NULL};
    int n_pos = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout, prog);
            return 0;
        }
        if (strcmp(argv[i], "--quantize") == 0 && i + 1 < argc) {
            spec = argv[++i];
        } else if (argv[i][0] == '-' || n_pos == 2) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[i]);
            usage(stderr, prog);
            return 2;
        } else {
            pos[n_pos++] = argv[i];
        }
    }
    if (!spec || n_pos != 2) {
        fprintf(stderr, "%s: %s\n", prog, !spec ? "--quantize SPEC is required" : "IN_DIR and OUT_DIR are required");
        usage(stderr, prog);
        return 2;
    }
    moe_model_load_opts o = {0};
    if (moe_model_parse_quantize(spec, &o) != MOE_OK) {
        fprintf(stderr, "%s: %s\n", prog, moe_error_message());
        return 2;
    }
    int64_t t0 = moe_now_ns();
    moe_model *m = NULL;
    moe_status s = moe_model_load(pos[0], &o, &m);
    if (s == MOE_OK)
        s = moe_model_save(m, pos[1]);
    if (s != MOE_OK) {
        fprintf(stderr, "%s: %s\n", prog, moe_error_message());
        moe_model_free(m);
        return 1;
    }
    fprintf(stderr, "%s: wrote %s (%.1f MiB of weights) in %.1f s\n", prog, pos[1],
            (double)moe_model_weight_bytes(m) / (1 << 20), (double)(moe_now_ns() - t0) / 1e9);
    moe_model_free(m);
    return 0;
}
