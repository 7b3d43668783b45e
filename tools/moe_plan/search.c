/* Runs at a rate, goodput by rate search, and the layout search. */
#include "tools/moe_plan/search.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/grow.h"

moe_status mp_run_at(mp_run_ctx *x, double rate, rp_summary *s, mp_sim_stats *st)
{
    wl_opts wo = x->wl;
    if (rate >= 0)
        wo.rate = rate;
    wl_workload w;
    moe_status rc = wl_build(&wo, &w);
    if (rc != MOE_OK)
        return rc;
    snprintf(x->source, sizeof x->source, "%s", w.source);
    rp_record *rec = calloc((size_t)w.n, sizeof *rec);
    if (!rec) {
        wl_free(&w);
        return moe_error(MOE_ERR_NOMEM, "simulate: out of memory");
    }
    char label[48] = "";
    if (rate >= 0)
        snprintf(label, sizeof label, "\"rate\": %.4f", rate);
    mp_sim_opts so = x->sim;
    so.timeline = x->jsonl;
    so.timeline_s = x->jsonl ? x->timeline_s : 0;
    so.label = label[0] ? label : NULL;
    rc = mp_simulate(x->c, x->l, &so, &w, rec, st);
    if (rc == MOE_OK) {
        rp_summarize(rec, w.n, &x->slo, wl_mean_rate(&w), s);
        if (x->jsonl) {
            rp_print_requests_jsonl(x->jsonl, rec, w.n, so.label);
            rp_print_json(x->jsonl, "summary", so.label, s, &x->slo);
        }
    }
    rp_records_free(rec, w.n);
    wl_free(&w);
    return rc;
}

static double attain_at(mp_run_ctx *x, double rate, bool *err)
{
    rp_summary s;
    if (mp_run_at(x, rate, &s, NULL) != MOE_OK) {
        *err = true;
        return 0;
    }
    return s.attainment;
}

double mp_goodput(mp_run_ctx *x, double target, double *attain_out)
{
    FILE *keep = x->jsonl;
    x->jsonl = NULL; /* the search's many runs stay out of the JSON lines */
    bool err = false;
    double lo = 0, lo_att = 0, hi = 1.0 / 64;
    double a;
    while ((a = attain_at(x, hi, &err)) >= target && !err && hi < 1e6) {
        lo = hi;
        lo_att = a;
        hi *= 2;
    }
    for (int i = 0; i < 12 && !err && lo > 0; i++) {
        double mid = 0.5 * (lo + hi);
        if ((a = attain_at(x, mid, &err)) >= target) {
            lo = mid;
            lo_att = a;
        } else {
            hi = mid;
        }
    }
    x->jsonl = keep;
    if (attain_out)
        *attain_out = lo_att;
    return err ? 0 : lo;
}

typedef struct {
    mp_layout l;
    int ranks;
    double goodput, per_rank, attain_at_best;
} cand;

static int cmp_cand(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->per_rank != y->per_rank)
        return x->per_rank < y->per_rank ? 1 : -1;
    return x->ranks - y->ranks; /* equal per rank: the smaller layout first */
}

static bool ep_ok(const mp_costs *c, int e) { return e == 1 || (c->n_experts > 0 && c->n_experts % e == 0); }

static bool add_cand(cand **cs, int *n, int *cap, const mp_layout *l)
{
    if (!moe_grow((void **)cs, cap, *n + 1, sizeof **cs))
        return false;
    (*cs)[(*n)++] = (cand){.l = *l, .ranks = mp_layout_ranks(l)};
    return true;
}

moe_status mp_search(const mp_costs *c, const mp_search_opts *o, FILE *out)
{
    int cap = 0, n = 0;
    cand *cs = NULL;
    bool ok = true;
    int N = o->ranks;
    /* Every EP pair (powers of two), every prefill count, the rest of the ranks as decode; and
     * colocated instances filling the ranks. Fewer ranks than N are candidates too (per rank). */
    for (int e1 = 1; e1 <= N; e1 *= 2) {
        if (!ep_ok(c, e1))
            continue;
        for (int m = 1; m * e1 <= N; m++)
            ok &= add_cand(&cs, &n, &cap, &(mp_layout){.count = {0, 0, m}, .ep = {0, 0, e1}});
        for (int e2 = 1; e2 <= N; e2 *= 2) {
            if (!ep_ok(c, e2))
                continue;
            for (int p = 1; p * e1 + e2 <= N; p++)
                for (int d = 1; p * e1 + d * e2 <= N; d++)
                    ok &= add_cand(&cs, &n, &cap, &(mp_layout){.count = {p, d, 0}, .ep = {e1, e2, 0}});
        }
    }
    if (!ok) {
        free(cs);
        return moe_error(MOE_ERR_NOMEM, "search: out of memory");
    }
    fprintf(stderr, "moe-plan search: %d layouts of at most %d worker ranks\n", n, N);
    for (int i = 0; i < n; i++) {
        mp_run_ctx x = {.c = c, .l = &cs[i].l, .sim = o->sim, .wl = o->wl, .slo = o->slo};
        cs[i].goodput = mp_goodput(&x, o->target, NULL);
        cs[i].per_rank = cs[i].goodput / cs[i].ranks;
        if (isatty(2))
            fprintf(stderr, "\rmoe-plan search: %d/%d", i + 1, n);
    }
    if (isatty(2))
        fputc('\n', stderr);
    qsort(cs, (size_t)n, sizeof *cs, cmp_cand);
    int top = o->top < n ? o->top : n;
    double best_rate = n ? cs[0].goodput : 0;
    for (int i = 0; i < top; i++) {
        mp_run_ctx x = {.c = c, .l = &cs[i].l, .sim = o->sim, .wl = o->wl, .slo = o->slo};
        rp_summary s;
        cs[i].attain_at_best = best_rate > 0 && mp_run_at(&x, best_rate, &s, NULL) == MOE_OK ? s.attainment : 0;
    }
    fprintf(out, "moe-plan search: profile %s (%s), SLO TTFT <= %g ms, TPOT <= %g ms, goal %.0f%%, at most %d worker "
                 "ranks\n",
            o->profile, c->cpu, o->slo.slo_ttft_ms, o->slo.slo_tpot_ms, 100 * o->target, N);
    if (o->sim.net.set)
        fprintf(out, "network model: %.3g GB/s per link, %.3g us per message between instances and EP ranks (from "
                     "the flags)\n",
                o->sim.net.gbps, o->sim.net.latency_ms * 1e3);
    else
        fprintf(out, "network: the profile's measured hand-off rate (%.3g GB/s, %.3g ms) stands for every link%s\n",
                c->xfer_gbps, c->xfer_latency_ms, c->n_a2a ? "; all-to-all as measured" : "");
    fprintf(out, "%-4s %-22s %5s %12s %14s %22s\n", "rank", "layout", "ranks", "goodput r/s", "per rank r/s",
            "attainment at best's");
    for (int i = 0; i < top; i++) {
        char lay[64];
        mp_layout_format(&cs[i].l, lay, sizeof lay);
        bool model = cs[i].ranks > o->machine_ranks;
        fprintf(out, "%-4d %-22s %5d %12.3f %14.4f %21.1f%%%s\n", i + 1, lay, cs[i].ranks, cs[i].goodput,
                cs[i].per_rank, 100 * cs[i].attain_at_best,
                model ? "  (larger than the profiled machine: network-model prediction)" : "");
    }
    if (n) {
        char lay[64];
        mp_layout_format(&cs[0].l, lay, sizeof lay);
        fprintf(out, "best: {\"layout\": \"%s\", \"ranks\": %d, \"goodput_rps\": %.4f, \"goodput_per_rank\": %.4f}\n",
                lay, cs[0].ranks, cs[0].goodput, cs[0].per_rank);
    }
    free(cs);
    return MOE_OK;
}
