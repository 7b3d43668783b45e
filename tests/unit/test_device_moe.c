/* The forward pass's device MoE path (worker/moe_layer.c device_experts: expert_sort,
 * matmul_grouped, expert_combine, no host round trip) run on the CPU backend through the test hook
 * MOE_TEST_DEVICE_MOE=1, against the host-grouped path the CPU always takes, on every HF fixture
 * model (f32, bf16, and the f32 models with Q8 / Q4 experts): a prefill of 61 tokens (above the
 * 48-token switch) then decode steps, the logits of both paths bit for bit, and the per-expert
 * load statistics equal. Both paths add each token's expert outputs in choice order and each
 * expert's GEMM is moe_matmul over the same rows (batch-invariant kernels), so the floats must
 * agree exactly. On a GPU the same path runs with the CUDA kernels (scripts/gpu-check.sh:
 * test_reference with MOE_REF_DEVICE=cuda). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/forward.h"
#include "worker/forward_internal.h"
#include "worker/kv_cache.h"
#include "worker/model.h"

#define FIXTURE_ROOT MOE_SOURCE_DIR "/tests/reference/fixtures/models"
#define N_PROMPT 61
#define N_DECODE 4
#define BLOCK 16

typedef struct {
    moe_threadpool_t *pool;
    moe_forward *f;
    moe_kv_cache *kv;
    moe_kv_seq seq;
} path;

static void path_open(path *p, const moe_model *m, bool device_moe)
{
    memset(p, 0, sizeof *p);
    setenv("MOE_TEST_HOOKS", "1", 1);
    if (device_moe)
        setenv("MOE_TEST_DEVICE_MOE", "1", 1);
    else
        unsetenv("MOE_TEST_DEVICE_MOE");
    p->pool = moe_threadpool_create(2);
    cr_assert(p->pool);
    moe_status st = moe_forward_create(m, p->pool, N_PROMPT, 1, N_PROMPT + N_DECODE, BLOCK, &p->f);
    cr_assert_eq(st, MOE_OK, "moe_forward_create: %s", moe_error_message());
    cr_assert_eq(p->f->dx_off != NULL, device_moe, "device MoE path %s", device_moe ? "not taken" : "taken unasked");
    moe_kv_layout lay = {.n_layers = m->cfg.n_layers, .n_kv_heads = m->cfg.n_kv_heads,
                         .head_dim = m->cfg.head_dim, .block_size = BLOCK};
    cr_assert_eq(moe_kv_create(&lay, (N_PROMPT + N_DECODE) / BLOCK + 2, &p->kv), MOE_OK);
}

static void path_close(path *p)
{
    moe_kv_seq_release(p->kv, &p->seq);
    moe_kv_free(p->kv);
    moe_forward_free(p->f);
    moe_threadpool_free(p->pool);
}

static void step(path *p, const int32_t *toks, int pos0, int n, float *logits)
{
    cr_assert_eq(moe_kv_seq_reserve(p->kv, &p->seq, pos0 + n), MOE_OK);
    moe_batch_seg seg = {.kv = &p->seq, .pos0 = pos0, .tok_begin = 0, .n = n};
    int row = n - 1;
    moe_batch b = {.tokens = toks + pos0, .n_tokens = n, .segs = &seg, .n_segs = 1, .logit_rows = &row,
                   .n_logit_rows = 1, .logits = logits};
    cr_assert_eq(moe_forward_run(p->f, p->kv, &b), MOE_OK, "moe_forward_run: %s", moe_error_message());
}

static void check_model(const char *name, moe_quant_mode q)
{
    moe_log_threshold = MOE_LOG_ERROR; /* the hook's warning, once per create */
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", FIXTURE_ROOT, name);
    moe_model_load_opts o = {.quantize_experts = q};
    moe_model *m = NULL;
    cr_assert_eq(moe_model_load(dir, &o, &m), MOE_OK, "%s: %s", name, moe_error_message());
    int vocab = m->cfg.vocab_size;
    int32_t toks[N_PROMPT + N_DECODE];
    for (int i = 0; i < N_PROMPT + N_DECODE; i++)
        toks[i] = (int32_t)((i * 7919 + 13) % vocab);
    path host, dev;
    path_open(&host, m, false);
    path_open(&dev, m, true);
    float *a = calloc((size_t)vocab, sizeof *a), *b = calloc((size_t)vocab, sizeof *b);
    cr_assert(a && b);
    for (int s = 0; s <= N_DECODE; s++) {
        int pos0 = s == 0 ? 0 : N_PROMPT + s - 1, n = s == 0 ? N_PROMPT : 1;
        step(&host, toks, pos0, n, a);
        step(&dev, toks, pos0, n, b);
        for (int i = 0; i < vocab; i++)
            cr_assert(memcmp(&a[i], &b[i], sizeof a[i]) == 0,
                      "%s (experts %s): step %d (%d tokens at %d): logit %d: device path %.9g, host path %.9g", name,
                      q == MOE_QUANT_NONE ? "as stored" : q == MOE_QUANT_Q8 ? "q8" : "q4", s, n, pos0, i,
                      (double)b[i], (double)a[i]);
    }
    size_t nt = (size_t)m->cfg.n_layers * (size_t)m->cfg.n_experts;
    const int64_t *ta = moe_forward_expert_tokens(host.f), *tb = moe_forward_expert_tokens(dev.f);
    int64_t total = 0;
    for (size_t i = 0; i < nt; i++) {
        cr_assert_eq(tb[i], ta[i], "%s: expert load statistic %zu: device path %lld, host path %lld", name, i,
                     (long long)tb[i], (long long)ta[i]);
        total += ta[i];
    }
    int moe_layers = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        moe_layers += m->layers[l].is_moe;
    cr_assert_eq(total, (int64_t)moe_layers * (N_PROMPT + N_DECODE) * m->cfg.n_experts_per_tok,
                 "%s: every choice counted once", name);
    free(a);
    free(b);
    path_close(&host);
    path_close(&dev);
    moe_model_free(m);
    unsetenv("MOE_TEST_DEVICE_MOE");
}

Test(device_moe, qwen3_bf16) { check_model("qwen3_moe_bf16", MOE_QUANT_NONE); }
Test(device_moe, qwen3_f32) { check_model("qwen3_moe_f32", MOE_QUANT_NONE); }
Test(device_moe, qwen2_f32_shared_expert) { check_model("qwen2_moe_f32", MOE_QUANT_NONE); }
Test(device_moe, olmoe_f32) { check_model("olmoe_f32", MOE_QUANT_NONE); }
Test(device_moe, mixtral_f32) { check_model("mixtral_f32", MOE_QUANT_NONE); }
Test(device_moe, qwen3_q8_experts) { check_model("qwen3_moe_f32", MOE_QUANT_Q8); }
Test(device_moe, olmoe_q4_experts) { check_model("olmoe_f32", MOE_QUANT_Q4); }
