/* The runtime against Hugging Face transformers: loads each tiny model of
 * tests/reference/fixtures/models (built, saved and run by transformers, see that README) and checks
 * logits, greedy continuations, batching, KV block sizes and chunked prefill against HF's results. */
#include <criterion/criterion.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/compute/backend.h"
#include "worker/engine.h"
#include "worker/model.h"

#define FIXTURE_ROOT MOE_SOURCE_DIR "/tests/reference/fixtures/models"
#define MAX_CASES 8
#define N_GREEDY 32

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the reference logits are little-endian float32 files read as they are"
#endif

/* f32 weights: HF and the runtime do the same f32 arithmetic in a different order (blocked dot
 * products, FMA, attention by blocks); that moves logits of magnitude <= ~20 by ~1e-6..1e-5. The
 * generator made sure no router choice or greedy token is closer than that to a tie. */
static const double F32_ABS_TOL = 1e-4;
/* bf16 weights: the reference is HF computing in f32 on the very same bf16 weights (upcast is
 * exact), which is what the runtime does too: kernels.h keeps activations and accumulation in f32.
 * So the only legitimate difference is again summation order, scaled by the logits: 1e-3 x
 * max(1, max|ref|) (~6e-3 here) leaves ~1000x headroom over that (the runtime measured 5e-6) yet
 * stays 5x..250x below what computing in bf16 does (HF in bf16 differs from this reference by
 * 0.03..1.5: a rounded activation flips routers), so a runtime that silently rounds activations or
 * the KV cache to bf16 fails here, by design. The
 * generator checked that every greedy step of this fixture has a margin above this tolerance. */
static const double BF16_REL_TOL = 1e-3;

typedef struct {
    char name[32];
    int n_prompt;
    int32_t *prompt;
    float *logits; /* (n_prompt, vocab) HF reference */
    int32_t greedy[N_GREEDY];
    double greedy_min_margin;
} ref_case;

typedef struct {
    char name[64];
    char dir[512];
    bool bf16;
    int vocab;
    int n_cases;
    ref_case cases[MAX_CASES];
    moe_model *model;
} fixture;

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    cr_assert_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    cr_assert_geq(n, 0);
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n, "short read of %s", path);
    buf[n] = '\0';
    fclose(f);
    if (len)
        *len = (size_t)n;
    return buf;
}

static const cJSON *member(const cJSON *obj, const char *key, const char *where)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    cr_assert_not_null(v, "%s: no field %s", where, key);
    return v;
}

static int read_ids(const cJSON *arr, int32_t *out, int cap, const char *where)
{
    cr_assert(cJSON_IsArray(arr), "%s is not an array", where);
    int n = cJSON_GetArraySize(arr);
    cr_assert_leq(n, cap, "%s: %d ids, room for %d", where, n, cap);
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr)
    {
        cr_assert(cJSON_IsNumber(it), "%s[%d] is not a number", where, i);
        out[i++] = (int32_t)it->valuedouble;
    }
    return n;
}

/* Loads NAME's cases.json, its reference logits and the model itself. */
static void fixture_load(fixture *fx, const char *name)
{
    memset(fx, 0, sizeof *fx);
    moe_log_threshold = MOE_LOG_WARN;
    snprintf(fx->name, sizeof fx->name, "%s", name);
    snprintf(fx->dir, sizeof fx->dir, "%s/%s", FIXTURE_ROOT, name);
    char path[1024];
    snprintf(path, sizeof path, "%s/cases.json", fx->dir);
    char *text = read_all(path, NULL);
    cJSON *root = cJSON_Parse(text);
    cr_assert_not_null(root, "%s: malformed JSON", path);

    const char *dtype = member(root, "weights_dtype", path)->valuestring;
    cr_assert_not_null(dtype);
    fx->bf16 = strcmp(dtype, "bfloat16") == 0;
    fx->vocab = member(root, "vocab_size", path)->valueint;
    cr_assert_eq(member(root, "greedy_new_tokens", path)->valueint, N_GREEDY);
    /* The generator's tolerance and this file's must be the same numbers. */
    const cJSON *tol = member(root, "tolerance", path);
    if (fx->bf16)
        cr_assert_float_eq(member(tol, "logits_rel", path)->valuedouble, BF16_REL_TOL, 1e-12);
    else
        cr_assert_float_eq(member(tol, "logits_max_abs", path)->valuedouble, F32_ABS_TOL, 1e-12);

    moe_status st = moe_model_load(fx->dir, NULL, &fx->model);
    cr_assert_eq(st, MOE_OK, "%s: moe_model_load: %s: %s", name, moe_status_name(st), moe_error_message());
    cr_assert_eq(fx->model->cfg.vocab_size, fx->vocab, "%s: vocab", name);
    cr_assert_str_eq(fx->model->cfg.arch_name, member(root, "architecture", path)->valuestring);

    const cJSON *cases = member(root, "cases", path), *c;
    cJSON_ArrayForEach(c, cases)
    {
        cr_assert_lt(fx->n_cases, MAX_CASES);
        ref_case *rc = &fx->cases[fx->n_cases++];
        snprintf(rc->name, sizeof rc->name, "%s", member(c, "name", path)->valuestring);
        const cJSON *ids = member(c, "prompt_ids", path);
        int n = cJSON_GetArraySize(ids);
        cr_assert_gt(n, 0);
        rc->prompt = malloc((size_t)n * sizeof *rc->prompt);
        rc->n_prompt = read_ids(ids, rc->prompt, n, rc->name);
        cr_assert_eq(read_ids(member(c, "greedy_ids", path), rc->greedy, N_GREEDY, rc->name), N_GREEDY);
        rc->greedy_min_margin = member(c, "greedy_min_margin", path)->valuedouble;

        const cJSON *shape = member(c, "logits_shape", path);
        cr_assert_eq(cJSON_GetArrayItem(shape, 0)->valueint, rc->n_prompt);
        cr_assert_eq(cJSON_GetArrayItem(shape, 1)->valueint, fx->vocab);
        snprintf(path, sizeof path, "%s/%s", fx->dir, member(c, "logits_file", path)->valuestring);
        size_t len;
        rc->logits = (float *)read_all(path, &len);
        cr_assert_eq(len, (size_t)rc->n_prompt * (size_t)fx->vocab * sizeof(float), "%s: size", path);
    }
    cr_assert_geq(fx->n_cases, 2, "%s: a batch needs several prompts", name);
    cJSON_Delete(root);
    free(text);
}

static void fixture_free(fixture *fx)
{
    for (int i = 0; i < fx->n_cases; i++) {
        free(fx->cases[i].prompt);
        free(fx->cases[i].logits);
    }
    moe_model_free(fx->model);
}

/* MOE_REF_DEVICE=cuda runs every case on the CUDA backend (scripts/gpu-check.sh); the
 * tolerances stay those above: a backend must meet them. Default: the CPU backend. */
static int ref_device(void)
{
    const char *v = getenv("MOE_REF_DEVICE");
    moe_device d = MOE_DEVICE_CPU;
    if (v && *v)
        cr_assert_eq(moe_device_parse(v, &d), MOE_OK, "MOE_REF_DEVICE: %s", moe_error_message());
    return (int)d;
}

static moe_engine *engine_new(const fixture *fx, int block_size, int max_batch_tokens, int n_threads)
{
    moe_engine_opts o = {.n_threads = n_threads, .block_size = block_size,
                         .max_batch_tokens = max_batch_tokens, .max_seqs = 8, .device = ref_device()};
    moe_engine *e = NULL;
    moe_status st = moe_engine_create(fx->model, &o, &e);
    cr_assert_eq(st, MOE_OK, "%s: moe_engine_create(block %d, batch %d): %s", fx->name, block_size,
                 max_batch_tokens, moe_error_message());
    return e;
}

static double case_tol(const fixture *fx, const ref_case *rc)
{
    if (!fx->bf16)
        return F32_ABS_TOL;
    double m = 1.0;
    for (size_t i = 0; i < (size_t)rc->n_prompt * (size_t)fx->vocab; i++)
        m = fmax(m, fabs(rc->logits[i]));
    return BF16_REL_TOL * m;
}

/* Asserts |got - want| <= tol everywhere and names the worst position and token otherwise. */
static void expect_logits_close(const fixture *fx, const ref_case *rc, const float *got,
                                const float *want, double tol, const char *what)
{
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < (size_t)rc->n_prompt * (size_t)fx->vocab; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) { /* catches NaN too */
            worst = isnan(d) ? INFINITY : d;
            at = i;
        }
    }
    cr_log_info("%s %s %s: max |diff| %.3g (tolerance %.3g)", fx->name, rc->name, what, worst, tol);
    cr_expect_leq(worst, tol, "%s %s %s: max |diff| %.3g > %.3g at position %zu token %zu (got %.6f want %.6f)",
                  fx->name, rc->name, what, worst, tol, at / (size_t)fx->vocab, at % (size_t)fx->vocab,
                  (double)got[at], (double)want[at]);
}

static float *engine_logits(const fixture *fx, moe_engine *e, const ref_case *rc, int chunk)
{
    float *out = calloc((size_t)rc->n_prompt * (size_t)fx->vocab, sizeof *out);
    cr_assert_not_null(out);
    moe_status st = moe_engine_logits(e, rc->prompt, rc->n_prompt, chunk, out);
    cr_assert_eq(st, MOE_OK, "%s %s: moe_engine_logits(chunk %d): %s", fx->name, rc->name, chunk,
                 moe_error_message());
    return out;
}

/* Runs the cases whose bit is set in `mask` together through add/step with greedy sampling and
 * ignore_eos, and writes each one's 32 tokens into out[case]. Checks the event stream as it goes:
 * one event per sequence per step at most, indices in order, LENGTH on exactly the last token. */
static void run_greedy(const fixture *fx, moe_engine *e, unsigned mask, int32_t out[][N_GREEDY])
{
    const moe_sampling_params greedy = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 1};
    int got[MAX_CASES] = {0};
    bool done[MAX_CASES] = {0};
    for (int i = 0; i < fx->n_cases; i++) {
        if (!(mask & (1u << i)))
            continue;
        const ref_case *rc = &fx->cases[i];
        moe_status st = moe_engine_add(e, 100 + (uint64_t)i, rc->prompt, rc->n_prompt, &greedy, N_GREEDY, true);
        cr_assert_eq(st, MOE_OK, "%s %s: moe_engine_add: %s", fx->name, rc->name, moe_error_message());
    }
    moe_token_event ev[MAX_CASES + 1];
    int steps = 0;
    while (moe_engine_has_work(e)) {
        cr_assert_lt(++steps, 4096, "%s: engine never finishes", fx->name);
        int n = moe_engine_step(e, ev, MAX_CASES + 1);
        cr_assert_geq(n, 0, "%s: moe_engine_step: %s", fx->name, moe_error_message());
        for (int k = 0; k < n; k++) {
            cr_assert_geq(ev[k].seq_id, 100u);
            int i = (int)(ev[k].seq_id - 100);
            cr_assert_lt(i, fx->n_cases);
            cr_assert(mask & (1u << i), "%s: event for a sequence never added", fx->name);
            cr_assert(!done[i], "%s %s: event after the last one", fx->name, fx->cases[i].name);
            cr_assert_eq(ev[k].index, got[i], "%s %s: event index %d, expected %d", fx->name,
                         fx->cases[i].name, ev[k].index, got[i]);
            out[i][got[i]++] = ev[k].token;
            bool last = got[i] == N_GREEDY;
            cr_assert_eq(ev[k].finish, last ? MOE_FINISH_LENGTH : MOE_FINISH_NONE,
                         "%s %s: token %d finishes with %s", fx->name, fx->cases[i].name, got[i] - 1,
                         moe_finish_name(ev[k].finish));
            done[i] = last;
        }
    }
    for (int i = 0; i < fx->n_cases; i++)
        if (mask & (1u << i))
            cr_assert_eq(got[i], N_GREEDY, "%s %s: %d tokens, expected %d", fx->name, fx->cases[i].name,
                         got[i], N_GREEDY);
    moe_engine_stats s;
    moe_engine_get_stats(e, &s);
    cr_assert_eq(s.kv_blocks_used, 0, "%s: KV blocks still held after every sequence finished", fx->name);
}

/* Expects tokens equal to `want` (HF's, or another run's); names the first difference. */
static void expect_tokens(const fixture *fx, const ref_case *rc, const int32_t *got, const int32_t *want,
                          const char *what)
{
    for (int t = 0; t < N_GREEDY; t++)
        if (got[t] != want[t]) {
            cr_expect_fail("%s %s %s: greedy token %d is %d, expected %d (HF min margin on the path %.3g)",
                           fx->name, rc->name, what, t, got[t], want[t], rc->greedy_min_margin);
            return;
        }
}

static unsigned all_cases(const fixture *fx) { return (1u << fx->n_cases) - 1u; }

/* ---- the checks, each run for every fixture ---- */

static void check_logits(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    moe_engine *e = engine_new(&fx, 64, 0, 1);
    for (int i = 0; i < fx.n_cases; i++) {
        const ref_case *rc = &fx.cases[i];
        float *got = engine_logits(&fx, e, rc, 0);
        expect_logits_close(&fx, rc, got, rc->logits, case_tol(&fx, rc), "logits vs HF");
        free(got);
    }
    moe_engine_free(e);
    fixture_free(&fx);
}

/* Prefill in chunks of 3 and 7 tokens equals prefill at once (and HF). */
static void check_chunked_logits(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    moe_engine *e = engine_new(&fx, 64, 0, 1);
    for (int i = 0; i < fx.n_cases; i++) {
        const ref_case *rc = &fx.cases[i];
        float *whole = engine_logits(&fx, e, rc, 0);
        static const int chunks[] = {3, 7};
        for (int c = 0; c < 2; c++) {
            float *part = engine_logits(&fx, e, rc, chunks[c]);
            char what[64];
            snprintf(what, sizeof what, "chunk %d vs whole prefill", chunks[c]);
            expect_logits_close(&fx, rc, part, whole, case_tol(&fx, rc), what);
            snprintf(what, sizeof what, "chunk %d vs HF", chunks[c]);
            expect_logits_close(&fx, rc, part, rc->logits, case_tol(&fx, rc), what);
            free(part);
        }
        free(whole);
    }
    moe_engine_free(e);
    fixture_free(&fx);
}

/* KV blocks of 1 and 2 tokens give the logits blocks of 64 give. */
static void check_block_size_logits(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    moe_engine *big = engine_new(&fx, 64, 0, 1);
    static const int sizes[] = {1, 2};
    for (int b = 0; b < 2; b++) {
        moe_engine *small = engine_new(&fx, sizes[b], 0, 1);
        for (int i = 0; i < fx.n_cases; i++) {
            const ref_case *rc = &fx.cases[i];
            float *want = engine_logits(&fx, big, rc, 0);
            float *got = engine_logits(&fx, small, rc, 5); /* chunks also cross block boundaries */
            char what[64];
            snprintf(what, sizeof what, "block %d vs block 64", sizes[b]);
            expect_logits_close(&fx, rc, got, want, case_tol(&fx, rc), what);
            free(got);
            free(want);
        }
        moe_engine_free(small);
    }
    moe_engine_free(big);
    fixture_free(&fx);
}

/* One sequence at a time: HF's 32-token greedy continuation exactly. */
static void check_greedy_single(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    moe_engine *e = engine_new(&fx, 64, 0, 1);
    int32_t got[MAX_CASES][N_GREEDY];
    for (int i = 0; i < fx.n_cases; i++) {
        run_greedy(&fx, e, 1u << i, got);
        expect_tokens(&fx, &fx.cases[i], got[i], fx.cases[i].greedy, "alone");
    }
    moe_engine_free(e);
    fixture_free(&fx);
}

/* All prompts in one continuous batch (two kernel threads) equal one at a time, and HF. */
static void check_greedy_batch(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    int32_t single[MAX_CASES][N_GREEDY], batch[MAX_CASES][N_GREEDY];
    moe_engine *e = engine_new(&fx, 64, 0, 2);
    for (int i = 0; i < fx.n_cases; i++)
        run_greedy(&fx, e, 1u << i, single);
    run_greedy(&fx, e, all_cases(&fx), batch);
    for (int i = 0; i < fx.n_cases; i++) {
        expect_tokens(&fx, &fx.cases[i], batch[i], single[i], "batched vs alone");
        expect_tokens(&fx, &fx.cases[i], batch[i], fx.cases[i].greedy, "batched vs HF");
    }
    moe_engine_free(e);
    fixture_free(&fx);
}

/* A batch on KV blocks of 1 and 2 tokens equals HF (and so blocks of 64). */
static void check_greedy_block_sizes(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    static const int sizes[] = {1, 2, 64};
    for (int b = 0; b < 3; b++) {
        int32_t got[MAX_CASES][N_GREEDY];
        moe_engine *e = engine_new(&fx, sizes[b], 0, 1);
        run_greedy(&fx, e, all_cases(&fx), got);
        char what[32];
        snprintf(what, sizeof what, "block %d", sizes[b]);
        for (int i = 0; i < fx.n_cases; i++)
            expect_tokens(&fx, &fx.cases[i], got[i], fx.cases[i].greedy, what);
        moe_engine_free(e);
    }
    fixture_free(&fx);
}

/* A step budget of 3 or 7 tokens chops the prompts into chunks that share steps with other
 * sequences' chunks and decodes: the tokens must not change. */
static void check_greedy_chunked_prefill(const char *name)
{
    fixture fx;
    fixture_load(&fx, name);
    static const int budgets[] = {3, 7};
    for (int b = 0; b < 2; b++) {
        int32_t got[MAX_CASES][N_GREEDY];
        moe_engine *e = engine_new(&fx, 16, budgets[b], 1);
        run_greedy(&fx, e, all_cases(&fx), got);
        moe_engine_stats s;
        moe_engine_get_stats(e, &s);
        int total_prompt = 0;
        for (int i = 0; i < fx.n_cases; i++)
            total_prompt += fx.cases[i].n_prompt;
        cr_assert_eq(s.prefill_tokens, total_prompt, "%s: prefill token count", fx.name);
        char what[48];
        snprintf(what, sizeof what, "step budget %d", budgets[b]);
        for (int i = 0; i < fx.n_cases; i++)
            expect_tokens(&fx, &fx.cases[i], got[i], fx.cases[i].greedy, what);
        moe_engine_free(e);
    }
    fixture_free(&fx);
}

/* Every fixture directory is listed here, so a new one cannot go untested. */
static const char *const FIXTURES[] = {"mixtral_f32", "qwen2_moe_f32", "olmoe_f32", "qwen3_moe_f32",
                                       "qwen3_moe_bf16"};

#define FIXTURE_TESTS(fx)                                                          \
    Test(reference_##fx, logits, .timeout = 60) { check_logits(#fx); }             \
    Test(reference_##fx, chunked_logits, .timeout = 60) { check_chunked_logits(#fx); } \
    Test(reference_##fx, block_size_logits, .timeout = 60) { check_block_size_logits(#fx); } \
    Test(reference_##fx, greedy_single, .timeout = 60) { check_greedy_single(#fx); } \
    Test(reference_##fx, greedy_batch, .timeout = 60) { check_greedy_batch(#fx); } \
    Test(reference_##fx, greedy_block_sizes, .timeout = 60) { check_greedy_block_sizes(#fx); } \
    Test(reference_##fx, greedy_chunked_prefill, .timeout = 60) { check_greedy_chunked_prefill(#fx); }

FIXTURE_TESTS(mixtral_f32)
FIXTURE_TESTS(qwen2_moe_f32)
FIXTURE_TESTS(olmoe_f32)
FIXTURE_TESTS(qwen3_moe_f32)
FIXTURE_TESTS(qwen3_moe_bf16)

Test(reference, every_fixture_is_tested)
{
    DIR *d = opendir(FIXTURE_ROOT);
    cr_assert_not_null(d, "cannot open %s", FIXTURE_ROOT);
    int n_dirs = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        n_dirs++;
        bool listed = false;
        for (size_t i = 0; i < sizeof FIXTURES / sizeof FIXTURES[0]; i++)
            listed |= strcmp(de->d_name, FIXTURES[i]) == 0;
        cr_expect(listed, "fixture %s has no tests in test_reference.c", de->d_name);
    }
    closedir(d);
    cr_assert_eq(n_dirs, (int)(sizeof FIXTURES / sizeof FIXTURES[0]));
}
