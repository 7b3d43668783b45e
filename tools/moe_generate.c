/* moe-generate: single-process generation from a prompt, streamed to stdout, with speed figures. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/stop.h"
#include "common/tokenizer.h"
#include "worker/compute/backend.h"
#include "worker/engine.h"
#include "worker/model.h"

#define MAX_STOPS 16

typedef struct {
    const char *model_dir;
    const char *prompt;
    const char *prompt_ids;
    int max_new_tokens;
    bool max_new_given; /* --max-new-tokens on the command line (else the default, clamped) */
    moe_sampling_params sp;
    int threads;
    int device; /* moe_device */
    int block_size;
    int batch_tokens;
    bool ignore_eos;
    bool no_special;
    bool print_ids;
    const char *stops[MAX_STOPS];
    int n_stops;
    moe_model_load_opts load;
} gen_args;

static void usage(FILE *f)
{
    fputs("usage: moe-generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [options]\n"
          "  --max-new-tokens N   tokens to generate (default 64)\n"
          "  --temperature T      0 = greedy (default 0)\n"
          "  --top-p P            nucleus sampling, in (0, 1] (default 1)\n"
          "  --top-k K            0 = off (default 0)\n"
          "  --seed S             sampling seed, 0 to 2^64-1 (default 0); token i's draw depends only on\n"
          "                       (S, i), as in the cluster\n"
          "  --stop STR           stop string (repeatable, up to 16)\n"
          "  --ignore-eos         keep going past end-of-sequence tokens\n"
          "  --no-special         do not add the tokenizer's special tokens (BOS) to the prompt\n"
          "  --threads N          kernel threads (default: all cores)\n"
          "  --device cpu|cuda    compute backend (default cpu; cuda: GPU 0, built but not yet\n"
          "                       run on a GPU, see docs/backends.md)\n"
          "  --kv-block-size N    KV cache block size in tokens (default 16)\n"
          "  --batch-tokens N     prefill chunk / step token budget (default 512)\n"
          "  --print-ids          print the generated token ids after the text\n"
          "  --quantize SPEC      quantize matrices at load (group-wise, 32 per f16 scale): a\n"
          "                       comma list of GROUP=q8|q4|none, GROUP experts (routed experts),\n"
          "                       dense (attention, shared expert, dense MLPs, lm_head) or all;\n"
          "                       e.g. experts=q4,dense=q8, all=q8 (see docs/kernels.md)\n",
          f);
}

static int parse_int(const char *flag, const char *v, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "moe-generate: %s: '%s' is not an integer in [%ld, %ld]\n", flag, v, lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* The whole 64-bit range: a seed the server drew for an unseeded request can be replayed here. */
static int parse_u64(const char *flag, const char *v, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || *end || end == v || v[0] == '-') {
        fprintf(stderr, "moe-generate: %s: '%s' is not an integer in [0, %llu]\n", flag, v,
                (unsigned long long)UINT64_MAX);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

static int parse_float(const char *flag, const char *v, double lo, double hi, float *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi)) {
        fprintf(stderr, "moe-generate: %s: '%s' is not a number in [%g, %g]\n", flag, v, lo, hi);
        return -1;
    }
    *out = (float)x;
    return 0;
}

static int parse_args(int argc, char **argv, gen_args *a)
{
    enum { O_MODEL = 1, O_PROMPT, O_IDS, O_MAXNEW, O_TEMP, O_TOPP, O_TOPK, O_SEED, O_STOP, O_IGNORE,
           O_NOSPECIAL, O_THREADS, O_BLOCK, O_BATCH, O_PRINTIDS, O_QUANT, O_DEVICE, O_HELP };
    static const struct option opts[] = {
        {"model", required_argument, 0, O_MODEL},       {"prompt", required_argument, 0, O_PROMPT},
        {"prompt-ids", required_argument, 0, O_IDS},    {"max-new-tokens", required_argument, 0, O_MAXNEW},
        {"temperature", required_argument, 0, O_TEMP},  {"top-p", required_argument, 0, O_TOPP},
        {"top-k", required_argument, 0, O_TOPK},        {"seed", required_argument, 0, O_SEED},
        {"stop", required_argument, 0, O_STOP},         {"ignore-eos", no_argument, 0, O_IGNORE},
        {"no-special", no_argument, 0, O_NOSPECIAL},    {"threads", required_argument, 0, O_THREADS},
        {"kv-block-size", required_argument, 0, O_BLOCK}, {"batch-tokens", required_argument, 0, O_BATCH},
        {"print-ids", no_argument, 0, O_PRINTIDS},      {"quantize", required_argument, 0, O_QUANT},
        {"device", required_argument, 0, O_DEVICE},     {"help", no_argument, 0, O_HELP},
        {0, 0, 0, 0}};
    *a = (gen_args){.max_new_tokens = 64, .sp = {.temperature = 0.0f, .top_p = 1.0f}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case O_MODEL: a->model_dir = optarg; break;
        case O_PROMPT: a->prompt = optarg; break;
        case O_IDS: a->prompt_ids = optarg; break;
        case O_MAXNEW:
            rc = parse_int("--max-new-tokens", optarg, 1, INT_MAX / 2, &a->max_new_tokens);
            a->max_new_given = true;
            break;
        case O_TEMP: rc = parse_float("--temperature", optarg, 0.0, 100.0, &a->sp.temperature); break;
        case O_TOPP:
            rc = parse_float("--top-p", optarg, 0.0, 1.0, &a->sp.top_p);
            if (!rc && a->sp.top_p <= 0.0f) {
                fprintf(stderr, "moe-generate: --top-p: must be in (0, 1]\n");
                rc = -1;
            }
            break;
        case O_TOPK: rc = parse_int("--top-k", optarg, 0, INT_MAX, &a->sp.top_k); break;
        case O_SEED: rc = parse_u64("--seed", optarg, &a->sp.seed); break;
        case O_STOP:
            if (a->n_stops == MAX_STOPS) {
                fprintf(stderr, "moe-generate: --stop: at most %d stop strings\n", MAX_STOPS);
                rc = -1;
            } else
                a->stops[a->n_stops++] = optarg;
            break;
        case O_IGNORE: a->ignore_eos = true; break;
        case O_NOSPECIAL: a->no_special = true; break;
        case O_THREADS: rc = parse_int("--threads", optarg, 1, 1024, &a->threads); break;
        case O_BLOCK: rc = parse_int("--kv-block-size", optarg, 1, 4096, &a->block_size); break;
        case O_BATCH: rc = parse_int("--batch-tokens", optarg, 1, 1 << 20, &a->batch_tokens); break;
        case O_PRINTIDS: a->print_ids = true; break;
        case O_QUANT:
            if (moe_model_parse_quantize(optarg, &a->load) != MOE_OK) {
                fprintf(stderr, "moe-generate: %s\n", moe_error_message());
                rc = -1;
            }
            break;
        case O_DEVICE: {
            moe_device dv = MOE_DEVICE_CPU;
            if (moe_device_parse(optarg, &dv) != MOE_OK) {
                fprintf(stderr, "moe-generate: --device: %s\n", moe_error_message());
                rc = -1;
            }
            a->device = (int)dv;
            break;
        }
        case O_HELP: usage(stdout); exit(0);
        default: usage(stderr); return -1;
        }
        if (rc)
            return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "moe-generate: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!a->model_dir || (!a->prompt == !a->prompt_ids)) {
        fprintf(stderr, "moe-generate: --model and exactly one of --prompt / --prompt-ids are required\n");
        usage(stderr);
        return -1;
    }
    return 0;
}

/* "1, 2,3" -> ids; returns the count or -1 with a message. */
static int parse_ids(const char *s, int32_t **out)
{
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    while (ids && *s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "moe-generate: --prompt-ids: bad token id near '%.16s'\n", s);
            free(ids);
            return -1;
        }
        if (n == cap) {
            int32_t *g = realloc(ids, (cap *= 2) * sizeof *ids);
            if (!g)
                break;
            ids = g;
        }
        ids[n++] = (int32_t)v;
        s = end;
        while (*s == ',' || *s == ' ')
            s++;
    }
    *out = ids;
    return ids ? (int)n : -1;
}

static int encode_prompt(const moe_tokenizer *tok, const gen_args *a, int32_t **ids)
{
    if (a->prompt_ids)
        return parse_ids(a->prompt_ids, ids);
    size_t len = strlen(a->prompt), need = 0;
    moe_status st = moe_tokenizer_encode(tok, a->prompt, len, !a->no_special, NULL, 0, &need);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-generate: --prompt: %s\n", moe_error_message());
        return -1;
    }
    *ids = malloc((need ? need : 1) * sizeof **ids);
    if (!*ids || moe_tokenizer_encode(tok, a->prompt, len, !a->no_special, *ids, need, &need) != MOE_OK) {
        fprintf(stderr, "moe-generate: --prompt: %s\n", moe_error_message());
        return -1;
    }
    return (int)need;
}

/* Streams one token's text through the detokenizer and the stop strings; true when a stop hit. */
static bool emit(moe_detok *dt, moe_stopper *stop, int32_t id, bool final)
{
    char piece[512];
    size_t n = id >= 0 ? moe_detok_push(dt, id, piece, sizeof piece) : 0;
    if (final)
        n += moe_detok_finish(dt, piece + n, sizeof piece - n);
    char *out = NULL;
    size_t out_len = 0;
    bool hit = moe_stopper_push(stop, piece, n, &out, &out_len);
    if (final && !hit)
        moe_stopper_flush(stop, &out, &out_len);
    if (out_len)
        fwrite(out, 1, out_len, stdout);
    fflush(stdout);
    free(out);
    return hit;
}

static int run(const gen_args *a)
{
    int rc = 1;
    moe_model *model = NULL;
    moe_tokenizer *tok = NULL;
    moe_engine *eng = NULL;
    moe_detok *dt = NULL;
    moe_stopper *stop = NULL;
    int32_t *prompt = NULL, *gen = NULL;
    char tok_path[4200];

    moe_status st = moe_model_load(a->model_dir, &a->load, &model);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-generate: %s\n", moe_error_message());
        goto out;
    }
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", a->model_dir);
    if ((st = moe_tokenizer_load(tok_path, &tok)) != MOE_OK) {
        fprintf(stderr, "moe-generate: %s\n", moe_error_message());
        goto out;
    }
    int n_prompt = encode_prompt(tok, a, &prompt);
    if (n_prompt < 0)
        goto out;
    /* The same limit the cluster's admission applies (coordinator/validate.c): refuse rather
     * than stop early at the context's end. */
    const int ctx = moe_model_config_context_len(&model->cfg);
    int max_new = a->max_new_tokens;
    if (!a->max_new_given && n_prompt < ctx && n_prompt + max_new > ctx)
        max_new = ctx - n_prompt; /* the default, clamped to the room, as the cluster's */
    if (n_prompt >= ctx || (long long)n_prompt + max_new > ctx) {
        fprintf(stderr,
                "moe-generate: prompt (%d tokens) + --max-new-tokens %d = %lld, over the context "
                "length of %d%s\n",
                n_prompt, max_new, (long long)n_prompt + max_new, ctx,
                ctx < model->cfg.max_position ? " (sliding_window)" : "");
        goto out;
    }
    moe_engine_opts eo = {.n_threads = a->threads, .block_size = a->block_size,
                          .max_batch_tokens = a->batch_tokens, .max_seqs = 1, .device = a->device};
    if ((st = moe_engine_create(model, &eo, &eng)) != MOE_OK ||
        (st = moe_engine_add(eng, 1, prompt, n_prompt, &a->sp, max_new, a->ignore_eos)) != MOE_OK) {
        fprintf(stderr, "moe-generate: %s\n", moe_error_message());
        goto out;
    }
    dt = moe_detok_create(tok, true);
    stop = moe_stopper_create(a->stops, a->n_stops);
    gen = malloc((size_t)max_new * sizeof *gen);
    if (!dt || !stop || !gen) {
        fprintf(stderr, "moe-generate: out of memory\n");
        goto out;
    }

    int64_t t0 = moe_now_ns(), t_first = 0;
    int n_gen = 0;
    moe_finish_reason fin = MOE_FINISH_NONE;
    while (fin == MOE_FINISH_NONE && moe_engine_has_work(eng)) {
        moe_token_event ev;
        int n = moe_engine_step(eng, &ev, 1);
        if (n < 0) {
            fprintf(stderr, "\nmoe-generate: %s\n", moe_error_message());
            goto out;
        }
        if (n == 0)
            continue;
        if (n_gen == 0)
            t_first = moe_now_ns();
        gen[n_gen++] = ev.token;
        fin = ev.finish;
        bool eos = fin == MOE_FINISH_EOS;
        if (emit(dt, stop, eos ? -1 : ev.token, fin != MOE_FINISH_NONE) && fin == MOE_FINISH_NONE) {
            fin = MOE_FINISH_STOP;
            moe_engine_finish(eng, 1);
        }
    }
    int64_t t_end = moe_now_ns();
    fputc('\n', stdout);
    if (a->print_ids) {
        printf("ids:");
        for (int i = 0; i < n_gen; i++)
            printf(" %d", gen[i]);
        putchar('\n');
    }
    double pre_s = (double)(t_first - t0) * 1e-9, dec_s = (double)(t_end - t_first) * 1e-9;
    fprintf(stderr, "prompt: %d tokens in %.3f s (%.1f tok/s) | generation: %d tokens in %.3f s (%.1f tok/s) | finish: %s\n",
            n_prompt, pre_s, pre_s > 0 ? n_prompt / pre_s : 0.0, n_gen, dec_s,
            dec_s > 0 && n_gen > 1 ? (n_gen - 1) / dec_s : 0.0, moe_finish_name(fin));
    rc = 0;
out:
    free(gen);
    free(prompt);
    moe_stopper_free(stop);
    moe_detok_free(dt);
    moe_engine_free(eng);
    moe_tokenizer_free(tok);
    moe_model_free(model);
    return rc;
}

int main(int argc, char **argv)
{
    moe_log_init(-1);
    gen_args a;
    if (parse_args(argc, argv, &a) != 0)
        return 2;
    return run(&a);
}
