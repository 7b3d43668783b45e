/* The live probe of `moe-plan calibrate`, sent with moe-bench's own run code. */
#include "tools/moe_plan/calibrate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "tools/moe_bench/report.h"
#include "tools/moe_bench/run.h"
#include "tools/moe_bench/workload.h"

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    if (n <= 0)
        return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

moe_status mp_calibrate(const char *addr, int requests, mp_costs *c)
{
    moe_rpc_client *cli = moe_rpc_connect(addr);
    if (!cli)
        return moe_error(MOE_ERR_NOMEM, "calibrate: out of memory");
    int vocab = bench_server_vocab(cli);
    if (vocab <= 0) {
        moe_rpc_close(cli);
        return moe_error(MOE_ERR_UNAVAILABLE, "calibrate: %s does not answer ClusterStatus", addr);
    }
    wl_opts wo;
    wl_opts_default(&wo);
    wo.requests = requests;
    wo.in_len = (wl_dist){WL_DIST_FIXED, 8, 0};
    wo.out_len = (wl_dist){WL_DIST_FIXED, 8, 0};
    wl_workload w = {0};
    moe_status st = wl_build(&wo, &w);
    rp_record *rec = st == MOE_OK ? calloc((size_t)w.n, sizeof *rec) : NULL;
    if (st == MOE_OK && !rec)
        st = moe_error(MOE_ERR_NOMEM, "calibrate: out of memory");
    /* Spaced 0.5 s apart: each runs alone (no queueing, one sequence per step) on a model whose
     * 8 + 8 tokens take well under that. */
    for (int i = 0; st == MOE_OK && i < w.n; i++)
        w.req[i].t_s = 0.5 * i;
    bench_cfg cfg = {.concurrency = 1, .vocab = vocab, .ignore_eos = true, .timeout_ms = 60000};
    if (st == MOE_OK)
        st = bench_run(cli, &cfg, &w, &wo, rec);
    if (st == MOE_OK) {
        rp_slo none = {0};
        rp_summary s;
        rp_summarize(rec, w.n, &none, 0, &s);
        if (s.failed || s.ok < 1) {
            st = moe_error(MOE_ERR_UNAVAILABLE, "calibrate: %d of %d probe requests failed", s.failed, w.n);
        } else {
            /* The engine's part of the probes as the simulator will cost it (with an availability
             * curve: CPU time stretched by the curve's mean; with processor sharing, --host-ranks:
             * by the sharing curve's lone-step stretch, each probe's steps running with no other
             * rank of ours busy): the rest is overhead. */
            double prefill = mp_step_ms(c, 8, mp_attn_work(0, 8)) - c->step_overhead_ms;
            double decode = mp_step_ms(c, 1, 12) - c->step_overhead_ms;
            prefill *= c->cpu_steps ? mp_share_ratio(c, 1, prefill, 0) : mp_avail_ratio(c, prefill, -1);
            decode *= c->cpu_steps ? mp_share_ratio(c, 1, decode, 0) : mp_avail_ratio(c, decode, -1);
            /* Decode-only time per token: second to last token (the first gap is the hand-off in a
             * disaggregated cluster), and that first gap; medians over the probes. Token messages
             * may carry several tokens, so per-message gaps (ITL) would understate them. */
            double *per = calloc((size_t)w.n, sizeof *per), *first = calloc((size_t)w.n, sizeof *first);
            int n_gap = 0;
            for (int i = 0; per && first && i < w.n; i++)
                if (rec[i].ok && rec[i].n_tokens > 2) {
                    per[n_gap] = (rec[i].t_last - rec[i].t_second) * 1e3 / (rec[i].n_tokens - 2);
                    first[n_gap++] = (rec[i].t_second - rec[i].t_first) * 1e3;
                }
            double gap = median(per, n_gap), gap1 = median(first, n_gap);
            free(per);
            free(first);
            double xfer = mp_xfer_ms(c, NULL, c->kv_bytes_per_token * 8 / (c->n_layers > 0 ? c->n_layers : 1));
            c->token_path_ms = fmax(0, s.ttft.p50 - s.server_ttft.p50);
            c->dispatch_ms = fmax(0, s.server_ttft.p50 - prefill);
            c->step_overhead_ms = fmax(0, gap - decode);
            c->handoff_ms = fmax(0, gap1 - gap - xfer);
            fprintf(stderr,
                    "moe-plan calibrate: %d probes: TTFT p50 %.3f ms (server %.3f), decode ms/token p50 %.3f, "
                    "first-to-second token p50 %.3f ms; dispatch %.3f ms, token path %.3f ms, step overhead "
                    "%.3f ms, hand-off %.3f ms\n",
                    s.ok, s.ttft.p50, s.server_ttft.p50, gap, gap1, c->dispatch_ms, c->token_path_ms,
                    c->step_overhead_ms, c->handoff_ms);
        }
    }
    if (rec)
        rp_records_free(rec, w.n);
    if (w.req)
        wl_free(&w);
    moe_rpc_close(cli);
    return st;
}
