/* moe-gen-model's command line and the run that writes a whole model directory. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "tools/moe_gen_model/gen_model.h"

void moe_gen_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s --arch ARCH --preset PRESET --out DIR [options]\n"
            "       %s --list-presets\n"
            "\n"
            "Writes a deterministic synthetic Mixture-of-Experts model in Hugging Face layout:\n"
            "config.json, generation_config.json, tokenizer.json (a BPE tokenizer trained on an\n"
            "embedded corpus), tokenizer_config.json and safetensors weights (sharded with\n"
            "model.safetensors.index.json when larger than --max-shard-size).\n"
            "\n"
            "  --arch ARCH            mixtral | qwen2_moe | olmoe | qwen3_moe\n"
            "  --preset PRESET        tiny | small | olmoe-1b-7b | qwen1.5-moe-a2.7b |\n"
            "                         qwen3-30b-a3b | mixtral-8x7b (see --list-presets)\n"
            "  --out DIR              output directory (created if missing)\n"
            "  --dtype bf16|f32       weight type (default bf16)\n"
            "  --seed S               weight seed (default 0); same arguments -> same bytes\n"
            "  --layers N             override the preset's layer count (1..%d)\n"
            "  --max-shard-size SIZE  bytes per safetensors shard: 5000000, 500MB, 2GiB, ...\n"
            "                         (default 5GB, as huggingface_hub)\n"
            "  --list-presets         print the presets and their sizes, then exit\n"
            "  --quiet                print nothing on success\n"
            "  --help                 this text\n",
            prog, prog, MOE_MAX_LAYERS);
}

bool moe_gen_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s)
        return false;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-')
        return false;
    static const struct {
        const char *suffix;
        uint64_t mult;
    } units[] = {
        {"", 1},
        {"B", 1},
        {"KB", 1000ull},
        {"MB", 1000ull * 1000},
        {"GB", 1000ull * 1000 * 1000},
        {"TB", 1000ull * 1000 * 1000 * 1000},
        {"KiB", 1ull << 10},
        {"MiB", 1ull << 20},
        {"GiB", 1ull << 30},
        {"TiB", 1ull << 40},
    };
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(end, units[i].suffix) == 0) {
            if (v > UINT64_MAX / units[i].mult)
                return false;
            *out = v * units[i].mult;
            return *out > 0;
        }
    }
    return false;
}

static bool parse_u64(const char *s, uint64_t *out)
{
    if (!s || !*s || s[0] == '-')
        return false;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

static const char *arch_list(void)
{
    return "mixtral, qwen2_moe, olmoe, qwen3_moe";
}

moe_status moe_gen_parse_args(int argc, char **argv, moe_gen_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->dtype = MOE_DT_BF16;
    opt->max_shard_size = MOE_GEN_DEFAULT_SHARD_SIZE;
    bool have_arch = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            opt->help = true;
            continue;
        }
        if (strcmp(a, "--list-presets") == 0) {
            opt->list_presets = true;
            continue;
        }
        if (strcmp(a, "--quiet") == 0 || strcmp(a, "-q") == 0) {
            opt->quiet = true;
            continue;
        }
        if (strncmp(a, "--", 2) != 0)
            return moe_error(MOE_ERR_INVALID_ARG, "unexpected argument '%s' (flags start with --)",
                             a);
        /* --flag VALUE or --flag=VALUE */
        char flag[64];
        const char *val = NULL;
        const char *eq = strchr(a, '=');
        size_t fl = eq ? (size_t)(eq - a) : strlen(a);
        if (fl >= sizeof flag)
            return moe_error(MOE_ERR_INVALID_ARG, "unknown flag %.40s...", a);
        memcpy(flag, a, fl);
        flag[fl] = '\0';
        static const char *const with_value[] = {"--arch", "--preset", "--out",           "--dtype",
                                                 "--seed", "--layers", "--max-shard-size"};
        bool known = false;
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
            known = known || strcmp(flag, with_value[k]) == 0;
        if (!known)
            return moe_error(MOE_ERR_INVALID_ARG, "unknown flag %s (see --help)", flag);
        if (eq) {
            val = eq + 1;
        } else {
            if (i + 1 >= argc)
                return moe_error(MOE_ERR_INVALID_ARG, "%s needs a value", flag);
            val = argv[++i];
        }

        if (strcmp(flag, "--arch") == 0) {
            if (!moe_gen_arch_parse(val, &opt->arch))
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "--arch: unknown architecture '%s' (one of %s)", val, arch_list());
            have_arch = true;
        } else if (strcmp(flag, "--preset") == 0) {
            opt->preset = moe_gen_preset_find(val);
            if (!opt->preset) {
                char names[256] = "";
                for (int p = 0; p < moe_gen_preset_count(); p++) {
                    strncat(names, p ? ", " : "", sizeof names - strlen(names) - 1);
                    strncat(names, moe_gen_preset_at(p)->name, sizeof names - strlen(names) - 1);
                }
                return moe_error(MOE_ERR_INVALID_ARG, "--preset: unknown preset '%s' (one of %s)",
                                 val, names);
            }
        } else if (strcmp(flag, "--out") == 0) {
            if (!*val)
                return moe_error(MOE_ERR_INVALID_ARG, "--out: empty directory name");
            opt->out_dir = val;
        } else if (strcmp(flag, "--dtype") == 0) {
            if (strcmp(val, "bf16") == 0 || strcmp(val, "bfloat16") == 0)
                opt->dtype = MOE_DT_BF16;
            else if (strcmp(val, "f32") == 0 || strcmp(val, "float32") == 0)
                opt->dtype = MOE_DT_F32;
            else
                return moe_error(MOE_ERR_INVALID_ARG, "--dtype: unknown dtype '%s' (bf16 or f32)",
                                 val);
        } else if (strcmp(flag, "--seed") == 0) {
            if (!parse_u64(val, &opt->seed))
                return moe_error(MOE_ERR_INVALID_ARG, "--seed: '%s' is not a non-negative integer",
                                 val);
        } else if (strcmp(flag, "--layers") == 0) {
            uint64_t n;
            if (!parse_u64(val, &n) || n < 1 || n > MOE_MAX_LAYERS)
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "--layers: '%s' is not a layer count in 1..%d", val,
                                 MOE_MAX_LAYERS);
            opt->layers = (int)n;
        } else if (strcmp(flag, "--max-shard-size") == 0) {
            if (!moe_gen_parse_size(val, &opt->max_shard_size))
                return moe_error(MOE_ERR_INVALID_ARG,
                                 "--max-shard-size: '%s' is not a size in bytes (e.g. 5000000, "
                                 "500MB, 2GiB)",
                                 val);
        }
    }
    if (opt->help || opt->list_presets)
        return MOE_OK;
    if (!have_arch)
        return moe_error(MOE_ERR_INVALID_ARG, "--arch is required (one of %s)", arch_list());
    if (!opt->preset)
        return moe_error(MOE_ERR_INVALID_ARG, "--preset is required (see --list-presets)");
    if (!opt->out_dir)
        return moe_error(MOE_ERR_INVALID_ARG, "--out is required");
    return MOE_OK;
}

/* mkdir -p */
static moe_status make_dirs(const char *dir)
{
    size_t n = strlen(dir);
    char *p = malloc(n + 1);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    memcpy(p, dir, n + 1);
    moe_status st = MOE_OK;
    for (size_t i = 1; i <= n && st == MOE_OK; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        char c = p[i];
        p[i] = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST)
            st = moe_error(MOE_ERR_IO, "--out %s: cannot create directory %s: %s", dir, p,
                           strerror(errno));
        p[i] = c;
    }
    free(p);
    if (st != MOE_OK)
        return st;
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return moe_error(MOE_ERR_IO, "--out %s: not a directory", dir);
    if (access(dir, W_OK | X_OK) != 0)
        return moe_error(MOE_ERR_IO, "--out %s: not writable: %s", dir, strerror(errno));
    return MOE_OK;
}

moe_status moe_gen_run(const moe_gen_options *opt)
{
    moe_gen_spec spec;
    moe_status st =
        moe_gen_spec_build(opt->arch, opt->preset, opt->layers, opt->dtype, opt->seed, &spec);
    if (st != MOE_OK)
        return st;
    if ((st = make_dirs(opt->out_dir)) != MOE_OK)
        return st;

    moe_gen_tokenizer *tok = NULL;
    if ((st = moe_gen_tok_train(spec.tok_family, spec.vocab, &tok)) != MOE_OK)
        return moe_error_context(st, "%s: ", opt->out_dir);
    moe_gen_spec_set_tokens(&spec, tok);
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer.json", opt->out_dir) >= sizeof path) {
        moe_gen_tok_free(tok);
        return moe_error(MOE_ERR_INVALID_ARG, "--out: path too long");
    }
    st = moe_gen_tok_write_json(tok, path);
    if (st == MOE_OK)
        st = moe_gen_write_configs(&spec, tok, opt->out_dir);
    int n_shards = 0;
    if (st == MOE_OK)
        st = moe_gen_write_weights(&spec, opt->out_dir, opt->max_shard_size, &n_shards);
    if (st == MOE_OK && !opt->quiet) {
        uint64_t params = moe_gen_spec_params(&spec);
        printf("moe-gen-model: wrote %s (%s, preset %s, %d layers, %s): %" PRIu64
               " parameters, %.1f MB of weights in %d file%s; tokenizer %d tokens + %d special, "
               "%d merges\n",
               opt->out_dir, moe_gen_arch_flag(spec.arch), spec.preset->name, spec.n_layers,
               spec.dtype == MOE_DT_F32 ? "f32" : "bf16", params,
               (double)params * (spec.dtype == MOE_DT_F32 ? 4.0 : 2.0) / 1e6, n_shards,
               n_shards == 1 ? "" : "s", tok->n_vocab, tok->n_special, tok->n_merges);
    }
    moe_gen_tok_free(tok);
    return st;
}
