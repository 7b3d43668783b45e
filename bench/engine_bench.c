/* engine_bench: end-to-end engine speed on one model: decode tokens/s at given batch sizes (only
 * decode steps timed, after every sequence's prefill) and prefill tokens/s for one long prompt,
 * with the bytes and FLOPs each figure needs for its roofline. Prints `name=value` lines that
 * bench/run.sh parses.
 *
 *   engine_bench --model DIR [--threads N] [--batch 1,16] [--prompt 32] [--decode-tokens 32]
 *                [--warmup 2] [--prefill 512] [--no-touch]
 *
 * Bytes per decode step are counted from the weights the step really read: the dense parts
 * (attention, router, norms, lm_head, the embedding rows) plus the gate/up/down matrices of every
 * expert that the step's tokens were routed to (from the engine's per-expert load counters), plus
 * the f32 K/V the attention read. At batch 1 the expert part is exactly top-k per layer, which is
 * also printed from the config alone (active_weight_bytes_per_token) as a cross-check. */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "worker/engine.h"
#include "worker/model.h"

/* --callgrind-decode: collect only the timed decode steps (run under valgrind --tool=callgrind
 * --collect-atstart=no). Without valgrind the client requests are a few no-op instructions. */
#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define BENCH_TOGGLE_COLLECT() CALLGRIND_TOGGLE_COLLECT
#endif
#endif
#ifndef BENCH_TOGGLE_COLLECT
#define BENCH_TOGGLE_COLLECT() ((void)0)
#endif

#define MAX_BATCHES 8

typedef struct {
    const char *model_dir;
    int threads;
    int batches[MAX_BATCHES], n_batches;
    int steps[MAX_BATCHES], n_steps; /* timed decode steps per batch size (last one repeats) */
    int prompt_len, warmup, prefill_len; /* prefill_len: the longest of prefill_lens */
    int prefill_lens[MAX_BATCHES], n_prefill;
    int touch;
    int callgrind;
    moe_model_load_opts load;
    const char *quantize;
} bench_args;

/* ---- bytes and FLOPs from the model ---- */

/* Bytes a matrix occupies (and a step streams), scales of quantized blocks included. */
static double weight_bytes(const moe_weight *w)
{
    if (!w->data)
        return 0;
    return (double)w->rows * (double)moe_dtype_row_bytes(w->dtype, (size_t)w->cols);
}

static double weight_params(const moe_weight *w)
{
    return w->data ? (double)w->rows * (double)w->cols : 0;
}

typedef struct {
    double dense_bytes;   /* per step, independent of the batch: attention, router, shared expert,
                             dense MLPs, norms, lm_head, final norm */
    double dense_params;  /* multiply-adds per token of those, lm_head excluded */
    double lm_head_params;
    double expert_bytes;  /* one expert's gate+up+down (all experts have the same shape) */
    double expert_params;
    double embed_row_bytes;
    double kv_bytes_per_pos; /* f32 K and V of one position over all layers */
    double attn_flops_per_ctx; /* per query token and context position over all layers */
} model_cost;

static void model_cost_compute(const moe_model *m, model_cost *mc)
{
    const moe_model_config *c = &m->cfg;
    memset(mc, 0, sizeof *mc);
    double d = c->hidden_size, q_dim = (double)c->n_heads * c->head_dim,
           kv_dim = (double)c->n_kv_heads * c->head_dim;
    for (int l = 0; l < c->n_layers; l++) {
        const moe_layer_weights *L = &m->layers[l];
        const moe_weight *dense[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->router, &L->sh_gate,
                                     &L->sh_up, &L->sh_down, &L->sh_expert_gate, &L->mlp_gate,
                                     &L->mlp_up, &L->mlp_down};
        for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) {
            if (!L->is_moe && dense[i] == &L->router)
                continue;
            mc->dense_bytes += weight_bytes(dense[i]);
            mc->dense_params += weight_params(dense[i]);
        }
        /* f32 vectors held in memory: the two RMSNorm weights, q/k norms, biases */
        double vec = 2 * d;
        if (c->qk_norm == 1)
            vec += q_dim + kv_dim;
        else if (c->qk_norm == 2)
            vec += 2.0 * c->head_dim;
        if (c->attn_bias)
            vec += q_dim + 2 * kv_dim;
        mc->dense_bytes += 4 * vec;
        if (L->is_moe && mc->expert_bytes == 0) {
            for (int e = m->expert_begin; e < m->expert_end; e++) {
                if (!L->exp_gate[e].data)
                    continue;
                mc->expert_bytes = weight_bytes(&L->exp_gate[e]) + weight_bytes(&L->exp_up[e]) +
                                   weight_bytes(&L->exp_down[e]);
                mc->expert_params = weight_params(&L->exp_gate[e]) + weight_params(&L->exp_up[e]) +
                                    weight_params(&L->exp_down[e]);
                break;
            }
        }
        mc->kv_bytes_per_pos += 2 * kv_dim * sizeof(float);
        /* q.k and p.v: 2 FLOPs each per head dimension and context position */
        mc->attn_flops_per_ctx += 4 * q_dim;
    }
    mc->dense_bytes += weight_bytes(&m->lm_head) + 4 * d; /* + final norm */
    mc->lm_head_params = weight_params(&m->lm_head);
    mc->embed_row_bytes = weight_bytes(&m->embed) / (m->embed.rows > 0 ? m->embed.rows : 1);
}

static int n_moe_layers(const moe_model *m)
{
    int n = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        n += m->layers[l].is_moe;
    return n;
}

/* Reads one byte per page of a matrix. */
static size_t touch_one(const moe_weight *w, size_t page, volatile unsigned char *sink)
{
    size_t n = (size_t)weight_bytes(w);
    const unsigned char *p = w->data;
    for (size_t off = 0; off < n; off += page)
        *sink ^= p[off];
    return n;
}

/* Reads one byte per page of every matrix the forward pass uses (the bound ones, quantized copies
 * where the experts were quantized at load, not the file's bf16 originals), so the timed runs
 * neither fault pages in from disk nor take minor faults on the mmap. Returns the bytes walked. */
static size_t touch_weights(const moe_model *m)
{
    long pg = sysconf(_SC_PAGESIZE);
    size_t page = pg > 0 ? (size_t)pg : 4096, total = 0;
    volatile unsigned char sink = 0;
    total += touch_one(&m->embed, page, &sink);
    total += touch_one(&m->lm_head, page, &sink);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const moe_layer_weights *L = &m->layers[l];
        const moe_weight *dense[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->router, &L->sh_gate, &L->sh_up,
                                     &L->sh_down, &L->sh_expert_gate, &L->mlp_gate, &L->mlp_up, &L->mlp_down};
        for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++)
            total += touch_one(dense[i], page, &sink);
        if (!L->is_moe)
            continue;
        for (int e = 0; e < m->cfg.n_experts; e++) {
            total += touch_one(&L->exp_gate[e], page, &sink);
            total += touch_one(&L->exp_up[e], page, &sink);
            total += touch_one(&L->exp_down[e], page, &sink);
        }
    }
    return total;
}

/* ---- runs ---- */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static int32_t next_token(int vocab)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (int32_t)(g_rng % (uint64_t)vocab);
}

static void fill_prompt(int32_t *p, int n, const moe_model_config *c)
{
    for (int i = 0; i < n; i++) {
        int32_t t;
        do {
            t = next_token(c->vocab_size);
        } while (c->n_eos > 0 && t == c->eos_ids[0]);
        p[i] = t;
    }
}

/* ---- how much of the machine other work took while we timed ----
 * The CPUs' busy time (from /proc/stat) minus our own CPU time, over the CPUs' total time, for
 * one timed window. On a shared machine this says which figures were measured under contention. */
typedef struct {
    double busy, total; /* jiffies of all CPUs */
    double own;         /* our CPU seconds */
} cpu_snap;

static void cpu_snap_take(cpu_snap *c)
{
    memset(c, 0, sizeof *c);
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        unsigned long long v[8] = {0};
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                   &v[5], &v[6], &v[7]) == 8) {
            c->busy = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]);
            c->total = c->busy + (double)(v[3] + v[4]);
        }
        fclose(f);
    }
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        c->own = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec * 1e-6;
}

/* Others' share of the CPUs between a and b (0 when /proc/stat is unreadable). */
static double cpu_others_share(const cpu_snap *a, const cpu_snap *b)
{
    double tot = b->total - a->total;
    if (tot <= 0)
        return 0;
    long hz = sysconf(_SC_CLK_TCK);
    double v = ((b->busy - a->busy) - (b->own - a->own) * (double)(hz > 0 ? hz : 100)) / tot;
    return v < 0 ? 0 : v > 1 ? 1 : v;
}

/* Steps until no sequence can step (or an error); returns 0 or -1. */
static int drain(moe_engine *e, moe_token_event *ev, int cap)
{
    while (moe_engine_has_work(e))
        if (moe_engine_step(e, ev, cap) < 0)
            return -1;
    return 0;
}

/* One decode round at batch B: B sequences with prompt_len-token prompts are prefilled (untimed),
 * then `warmup` untimed and `n_steps` timed decode steps. Writes the timed seconds, our process's
 * CPU seconds over them and the number of (layer, expert) matrices the timed steps read. */
static int decode_round(moe_engine *e, const moe_model *m, const bench_args *a, int B, int n_steps,
                        double *secs_out, double *cpu_out, double *expert_reads_out,
                        double *others_out)
{
    const moe_model_config *c = &m->cfg;
    int L = c->n_layers, E = c->n_experts;
    int32_t *prompt = malloc((size_t)a->prompt_len * sizeof *prompt);
    moe_token_event *ev = malloc((size_t)B * sizeof *ev);
    int64_t *before = malloc((size_t)L * E * sizeof *before);
    int *started = calloc((size_t)B, sizeof *started);
    if (!prompt || !ev || !before || !started) {
        fprintf(stderr, "engine_bench: out of memory\n");
        free(prompt), free(ev), free(before), free(started);
        return -1;
    }
    moe_sampling_params sp = {.temperature = 0, .top_k = 0, .top_p = 1, .seed = 1};
    int rc = -1;
    for (int s = 0; s < B; s++) {
        fill_prompt(prompt, a->prompt_len, c);
        /* +1: the step that samples the last timed token */
        if (moe_engine_add(e, (uint64_t)s + 1, prompt, a->prompt_len, &sp,
                           a->warmup + n_steps + 2, true) != MOE_OK) {
            fprintf(stderr, "engine_bench: add: %s\n", moe_error_message());
            goto out;
        }
    }
    /* Prefill: step until every sequence has produced its first token. */
    int n_started = 0;
    while (n_started < B) {
        int n = moe_engine_step(e, ev, B);
        if (n < 0)
            goto step_err;
        for (int i = 0; i < n; i++) {
            int s = (int)ev[i].seq_id - 1;
            if (s >= 0 && s < B && !started[s]) {
                started[s] = 1;
                n_started++;
            }
        }
        if (n == 0 && !moe_engine_has_work(e))
            break;
    }
    for (int i = 0; i < a->warmup; i++)
        if (moe_engine_step(e, ev, B) < 0)
            goto step_err;

    /* Timed decode steps; expert counters tell which experts each step read. */
    double expert_reads = 0;
    long tokens = 0;
    int64_t t_total = 0;
    cpu_snap c0, c1;
    cpu_snap_take(&c0);
    if (a->callgrind)
        BENCH_TOGGLE_COLLECT();
    for (int i = 0; i < n_steps; i++) {
        memcpy(before, moe_engine_expert_load(e), (size_t)L * E * sizeof *before);
        int64_t t0 = moe_now_ns();
        int n = moe_engine_step(e, ev, B);
        t_total += moe_now_ns() - t0;
        if (n < 0)
            goto step_err;
        if (n != B) {
            fprintf(stderr, "engine_bench: decode step %d produced %d tokens, expected %d\n", i, n, B);
            goto out;
        }
        tokens += n;
        const int64_t *after = moe_engine_expert_load(e);
        for (int k = 0; k < L * E; k++)
            expert_reads += after[k] != before[k];
    }
    if (a->callgrind)
        BENCH_TOGGLE_COLLECT();
    cpu_snap_take(&c1);
    *others_out = cpu_others_share(&c0, &c1);
    *secs_out = (double)t_total * 1e-9;
    *cpu_out = c1.own - c0.own;
    *expert_reads_out = expert_reads;
    (void)tokens;
    rc = 0;
    goto out;
step_err:
    fprintf(stderr, "engine_bench: step: %s\n", moe_error_message());
out:
    /* Free whatever is left so the next run starts with an empty cache. */
    for (int s = 0; s < B; s++)
        (void)moe_engine_finish(e, (uint64_t)s + 1);
    (void)drain(e, ev, B);
    free(prompt), free(ev), free(before), free(started);
    return rc;
}

/* Decode at batch B, best of `rounds` rounds (fresh sequences each), with the bytes and FLOPs of
 * a step. */
static int bench_decode(moe_engine *e, const moe_model *m, const model_cost *mc, const bench_args *a,
                        int B, int n_steps, int rounds)
{
    const moe_model_config *c = &m->cfg;
    double secs = 0, expert_reads = 0, others = 0, cpu = 0;
    for (int r = 0; r < rounds; r++) {
        double s, x, o, u;
        if (decode_round(e, m, a, B, n_steps, &s, &u, &x, &o) != 0)
            return -1;
        if (r == 0 || s < secs) {
            secs = s;
            expert_reads = x;
            others = o;
        }
        /* the least process CPU time of the rounds: immune to time sharing, unlike secs */
        if (r == 0 || u < cpu)
            cpu = u;
    }
    double ctx_mean = a->prompt_len + a->warmup + 1 + (n_steps - 1) / 2.0;
    double w_bytes_step = mc->dense_bytes + expert_reads / n_steps * mc->expert_bytes + B * mc->embed_row_bytes;
    double kv_bytes_step = B * ctx_mean * mc->kv_bytes_per_pos;
    double flops_tok = 2 * (mc->dense_params + mc->lm_head_params +
                            (double)c->n_experts_per_tok * n_moe_layers(m) * mc->expert_params) +
                       ctx_mean * mc->attn_flops_per_ctx;
    printf("decode_b%d_steps=%d\n", B, n_steps);
    printf("decode_b%d_rounds=%d\n", B, rounds);
    printf("decode_b%d_seconds=%.4f\n", B, secs);
    printf("decode_b%d_tok_s=%.3f\n", B, (double)B * n_steps / secs);
    printf("decode_b%d_ms_per_step=%.3f\n", B, secs * 1e3 / n_steps);
    printf("decode_b%d_experts_per_step=%.2f\n", B, expert_reads / n_steps);
    printf("decode_b%d_weight_bytes_per_step=%.0f\n", B, w_bytes_step);
    printf("decode_b%d_kv_bytes_per_step=%.0f\n", B, kv_bytes_step);
    printf("decode_b%d_flops_per_token=%.0f\n", B, flops_tok);
    printf("decode_b%d_others_cpu=%.3f\n", B, others);
    /* our CPU time (all threads, best round): what a kernel A/B compares on a shared machine,
     * where the wall-clock figures above swing with the others' load */
    printf("decode_b%d_cpu_ms_per_token=%.4f\n", B, cpu * 1e3 / ((double)B * n_steps));
    printf("decode_b%d_cpu_ms_per_step=%.3f\n", B, cpu * 1e3 / n_steps);
    return 0;
}

/* Prefill of one prompt_len-token prompt: time from add to its first sampled token (one step when
 * the batch budget holds the whole prompt). Best of `reps`. */
static int bench_prefill(moe_engine *e, const moe_model *m, const model_cost *mc, int n, int reps,
                         bool legacy)
{
    const moe_model_config *c = &m->cfg;
    int32_t *prompt = malloc((size_t)n * sizeof *prompt);
    if (!prompt)
        return -1;
    fill_prompt(prompt, n, c);
    moe_sampling_params sp = {.temperature = 0, .top_k = 0, .top_p = 1, .seed = 1};
    double best = 0, others = 0, cpu = 0;
    int steps = 0;
    for (int r = 0; r < reps; r++) {
        cpu_snap c0, c1;
        cpu_snap_take(&c0);
        uint64_t id = 1000 + (uint64_t)r;
        moe_token_event ev;
        int64_t t0 = moe_now_ns();
        if (moe_engine_add(e, id, prompt, n, &sp, 1, true) != MOE_OK) {
            fprintf(stderr, "engine_bench: add: %s\n", moe_error_message());
            free(prompt);
            return -1;
        }
        int got = 0;
        steps = 0;
        while (!got) {
            int k = moe_engine_step(e, &ev, 1);
            if (k < 0) {
                fprintf(stderr, "engine_bench: step: %s\n", moe_error_message());
                free(prompt);
                return -1;
            }
            steps++;
            got = k > 0;
        }
        double s = (double)(moe_now_ns() - t0) * 1e-9;
        cpu_snap_take(&c1);
        if (r == 0 || s < best) {
            best = s;
            others = cpu_others_share(&c0, &c1);
        }
        if (r == 0 || c1.own - c0.own < cpu)
            cpu = c1.own - c0.own;
        (void)moe_engine_finish(e, id);
    }
    /* Every prompt token runs the dense parts and top-k experts; attention over a causal context
     * of (i+1) positions; the lm_head runs once, for the last position. */
    double flops = 2 * (double)n *
                       (mc->dense_params + (double)c->n_experts_per_tok * n_moe_layers(m) * mc->expert_params) +
                   mc->attn_flops_per_ctx * (double)n * (n + 1) / 2.0 + 2 * mc->lm_head_params;
    /* prefill_p<N>_*: one set per prompt length; the first length also as plain prefill_* */
    for (int k = legacy ? 0 : 1; k < 2; k++) {
        char pre[32];
        if (k == 0)
            snprintf(pre, sizeof pre, "prefill");
        else
            snprintf(pre, sizeof pre, "prefill_p%d", n);
        printf("%s_tokens=%d\n", pre, n);
        printf("%s_steps=%d\n", pre, steps);
        printf("%s_seconds=%.4f\n", pre, best);
        printf("%s_tok_s=%.3f\n", pre, n / best);
        printf("%s_flops_per_token=%.0f\n", pre, flops / n);
        printf("%s_gflops=%.2f\n", pre, flops / best * 1e-9);
        printf("%s_others_cpu=%.3f\n", pre, others);
        printf("%s_cpu_ms_per_token=%.4f\n", pre, cpu * 1e3 / n);
    }
    free(prompt);
    return 0;
}

static void usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s --model DIR [options]\n"
            "  --threads N         kernel threads including the caller (default: all cores)\n"
            "  --batch LIST        decode batch sizes, comma separated (default 1,16; '' = none)\n"
            "  --prompt N          prompt tokens of each decoding sequence (default 32)\n"
            "  --decode-tokens LIST timed decode steps, one per batch size (default 32; the last\n"
            "                      value repeats for the remaining batch sizes)\n"
            "  --warmup N          untimed decode steps before them (default 2)\n"
            "  --prefill LIST      prompt lengths of the prefill runs, comma separated (default\n"
            "                      512; 0 = skip)\n"
            "  --prefill-reps N    prefill repetitions, best kept (default 1)\n"
            "  --rounds N          decode rounds per batch size, best kept (default 1)\n"
            "  --no-touch          do not pre-fault the weights before timing\n"
            "  --keep-source-pages keep the bf16 pages of quantized matrices resident (the old\n"
            "                      load; for RSS A/B)\n"
            "  --callgrind-decode  toggle callgrind collection around the timed decode steps\n"
            "  --quantize SPEC     quantize at load: comma list of experts|dense|all=q8|q4|none\n"
            "                      (e.g. all=q8, experts=q4,dense=q8; see docs/kernels.md)\n",
            prog);
}

/* VmRSS of this process in bytes (0 when /proc is unreadable). */
static size_t rss_now(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kb = strtoull(line + 6, NULL, 10);
    if (f)
        fclose(f);
    return kb * 1024;
}

/* "1,16" -> {1, 16}; values in [1, max]. */
static int parse_list(const char *s, int *out, int *n, int max)
{
    *n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > max || *n == MAX_BATCHES)
            return -1;
        out[(*n)++] = (int)v;
        if (*end && *end != ',')
            return -1;
        s = *end == ',' ? end + 1 : end;
    }
    return 0;
}

int main(int argc, char **argv)
{
    bench_args a = {.threads = 0, .prompt_len = 32, .warmup = 2, .prefill_len = 512, .touch = 1,
                    .prefill_lens = {512}, .n_prefill = 1,
                    .batches = {1, 16}, .n_batches = 2, .steps = {32}, .n_steps = 1};
    int prefill_reps = 1, rounds = 1;
    enum { O_MODEL = 1, O_THREADS, O_BATCH, O_PROMPT, O_DECODE, O_WARMUP, O_PREFILL, O_REPS, O_NOTOUCH, O_CALLGRIND, O_ROUNDS, O_QUANT, O_KEEP, O_HELP };
    static const struct option opts[] = {
        {"model", required_argument, 0, O_MODEL},        {"threads", required_argument, 0, O_THREADS},
        {"batch", required_argument, 0, O_BATCH},        {"prompt", required_argument, 0, O_PROMPT},
        {"decode-tokens", required_argument, 0, O_DECODE}, {"warmup", required_argument, 0, O_WARMUP},
        {"prefill", required_argument, 0, O_PREFILL},    {"prefill-reps", required_argument, 0, O_REPS},
        {"no-touch", no_argument, 0, O_NOTOUCH},         {"help", no_argument, 0, O_HELP},
        {"callgrind-decode", no_argument, 0, O_CALLGRIND}, {"rounds", required_argument, 0, O_ROUNDS},
        {"quantize", required_argument, 0, O_QUANT},
        {"keep-source-pages", no_argument, 0, O_KEEP},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case O_MODEL: a.model_dir = optarg; break;
        case O_THREADS: a.threads = atoi(optarg); break;
        case O_BATCH:
            if (parse_list(optarg, a.batches, &a.n_batches, 1024) != 0) {
                fprintf(stderr, "engine_bench: --batch: bad list '%s'\n", optarg);
                return 2;
            }
            break;
        case O_PROMPT: a.prompt_len = atoi(optarg); break;
        case O_DECODE:
            if (parse_list(optarg, a.steps, &a.n_steps, 1 << 20) != 0 || a.n_steps == 0) {
                fprintf(stderr, "engine_bench: --decode-tokens: bad list '%s'\n", optarg);
                return 2;
            }
            break;
        case O_WARMUP: a.warmup = atoi(optarg); break;
        case O_PREFILL:
            a.n_prefill = 0;
            if (strcmp(optarg, "0") != 0 &&
                parse_list(optarg, a.prefill_lens, &a.n_prefill, 1 << 20) != 0) {
                fprintf(stderr, "engine_bench: --prefill: bad list '%s'\n", optarg);
                return 2;
            }
            a.prefill_len = 0;
            for (int i = 0; i < a.n_prefill; i++)
                a.prefill_len = a.prefill_lens[i] > a.prefill_len ? a.prefill_lens[i] : a.prefill_len;
            break;
        case O_KEEP: a.load.keep_source_pages = true; break;
        case O_REPS: prefill_reps = atoi(optarg); break;
        case O_ROUNDS: rounds = atoi(optarg); break;
        case O_QUANT:
            if (moe_model_parse_quantize(optarg, &a.load) != MOE_OK) {
                fprintf(stderr, "engine_bench: --quantize: %s\n", moe_error_message());
                return 2;
            }
            a.quantize = optarg;
            break;
        case O_NOTOUCH: a.touch = 0; break;
        case O_CALLGRIND: a.callgrind = 1; break;
        case O_HELP: usage(stdout, argv[0]); return 0;
        default: usage(stderr, argv[0]); return 2;
        }
    }
    if (!a.model_dir || a.prompt_len < 1 || a.warmup < 0 || a.prefill_len < 0 ||
        prefill_reps < 1 || rounds < 1) {
        usage(stderr, argv[0]);
        return 2;
    }
    moe_log_init(-1);

    moe_model *m = NULL;
    size_t rss_start = rss_now();
    int64_t t0 = moe_now_ns();
    if (moe_model_load(a.model_dir, &a.load, &m) != MOE_OK) {
        fprintf(stderr, "engine_bench: %s\n", moe_error_message());
        return 1;
    }
    const moe_model_config *c = &m->cfg;
    double load_s = (double)(moe_now_ns() - t0) * 1e-9;
    size_t rss_load = rss_now();
    t0 = moe_now_ns();
    size_t touched = a.touch ? touch_weights(m) : 0;
    double touch_s = (double)(moe_now_ns() - t0) * 1e-9;
    size_t rss_touch = rss_now();

    model_cost mc;
    model_cost_compute(m, &mc);
    int max_b = 1;
    for (int i = 0; i < a.n_batches; i++)
        max_b = a.batches[i] > max_b ? a.batches[i] : max_b;
    int max_steps = 1;
    for (int i = 0; i < a.n_steps; i++)
        max_steps = a.steps[i] > max_steps ? a.steps[i] : max_steps;
    int seq_len = a.prompt_len + a.warmup + max_steps + 4;
    int bs = 16;
    int blocks = max_b * ((seq_len + bs - 1) / bs + 1);
    int pf_blocks = (a.prefill_len + 4 + bs - 1) / bs + 1;
    blocks = blocks > pf_blocks ? blocks : pf_blocks;
    int budget = a.prefill_len > max_b * a.prompt_len ? a.prefill_len : max_b * a.prompt_len;
    if (budget < max_b)
        budget = max_b;
    moe_engine_opts eo = {.n_threads = a.threads, .block_size = bs, .n_kv_blocks = blocks,
                          .max_batch_tokens = budget, .max_seqs = max_b};
    moe_engine *e = NULL;
    if (moe_engine_create(m, &eo, &e) != MOE_OK) {
        fprintf(stderr, "engine_bench: %s\n", moe_error_message());
        moe_model_free(m);
        return 1;
    }
    int threads = a.threads > 0 ? a.threads : (int)sysconf(_SC_NPROCESSORS_ONLN);

    double active = mc.dense_bytes + (double)c->n_experts_per_tok * n_moe_layers(m) * mc.expert_bytes +
                    mc.embed_row_bytes;
    printf("# engine_bench: %s (%s), %d threads, kernels %s\n", a.model_dir, c->arch_name, threads,
           moe_isa_name(moe_kernels_isa()));
    printf("model=%s\n", a.model_dir);
    printf("arch=%s\n", c->arch_name);
    printf("n_layers=%d\nn_moe_layers=%d\nn_experts=%d\ntop_k=%d\n", c->n_layers, n_moe_layers(m), c->n_experts,
           c->n_experts_per_tok);
    printf("threads=%d\n", threads);
    printf("kernels_isa=%s\n", moe_isa_name(moe_kernels_isa()));
    printf("weight_dtype=%s\n", moe_dtype_name(m->layers[0].wq.dtype));
    printf("quantize=%s\n", a.quantize ? a.quantize : "none");
    for (int l = 0; l < c->n_layers; l++) {
        if (m->layers[l].is_moe) {
            for (int x = m->expert_begin; x < m->expert_end; x++) {
                if (m->layers[l].exp_gate[x].data) {
                    printf("expert_dtype=%s\n", moe_dtype_name(m->layers[l].exp_gate[x].dtype));
                    break;
                }
            }
            break;
        }
    }
    printf("weights_bytes_total=%zu\n", moe_model_weight_bytes(m));
    printf("load_seconds=%.3f\n", load_s);
    printf("touch_bytes=%zu\n", touched);
    printf("touch_seconds=%.3f\n", touch_s);
    printf("rss_start_bytes=%zu\n", rss_start);
    printf("rss_after_load_bytes=%zu\n", rss_load);
    printf("rss_after_touch_bytes=%zu\n", rss_touch);
    printf("active_weight_bytes_per_token=%.0f\n", active);
    printf("kv_bytes_per_position=%.0f\n", mc.kv_bytes_per_pos);
    fflush(stdout);

    int rc = 0;
    for (int i = 0; i < a.n_batches && rc == 0; i++) {
        rc = bench_decode(e, m, &mc, &a, a.batches[i], a.steps[i < a.n_steps ? i : a.n_steps - 1], rounds);
        fflush(stdout);
    }
    for (int i = 0; rc == 0 && i < a.n_prefill; i++) {
        rc = bench_prefill(e, m, &mc, a.prefill_lens[i], prefill_reps, i == 0);
        fflush(stdout);
    }
    moe_engine_free(e);
    moe_model_free(m);
    /* Our own CPU time: the driver subtracts it from the machine's busy time over the run to tell
     * how much other work competed with the timing. */
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        printf("peak_rss_bytes=%lld\n", (long long)ru.ru_maxrss * 1024); /* the whole run's peak */
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        printf("cpu_seconds=%.3f\n", (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 +
                                         (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6);
    return rc == 0 ? 0 : 1;
}
