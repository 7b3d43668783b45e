/* moe-gen-model: writes a deterministic synthetic MoE model in Hugging Face layout (see
 * docs/gen-model.md). The work is in tools/moe_gen_model/. */
#include <stdio.h>
#include <string.h>
#include "common/status.h"
#include "tools/moe_gen_model/gen_model.h"

int main(int argc, char **argv)
{
    const char *prog = argc > 0 ? argv[0] : "moe-gen-model";
    const char *slash = strrchr(prog, '/');
    prog = slash ? slash + 1 : prog;
    moe_gen_options opt;
    moe_status st = moe_gen_parse_args(argc, argv, &opt);
    if (st != MOE_OK) {
        fprintf(stderr, "%s: %s\n", prog, moe_error_message());
        fprintf(stderr, "run '%s --help' for usage\n", prog);
        return 2;
    }
    if (opt.help) {
        moe_gen_usage(stdout, prog);
        return 0;
    }
    if (opt.list_presets) {
        moe_gen_list_presets(stdout);
        return 0;
    }
    st = moe_gen_run(&opt);
    if (st != MOE_OK) {
        fprintf(stderr, "%s: %s\n", prog, moe_error_message());
        return 1;
    }
    return 0;
}
