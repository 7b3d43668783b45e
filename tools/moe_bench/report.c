/* The benchmark report: percentiles, throughput, SLO attainment and goodput from request records. */
#include "tools/moe_bench/report.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"

bool rp_record_add_itl(rp_record *r, float ms)
{
    if (!moe_grow((void **)&r->itl_ms, &r->cap_itl, r->n_itl + 1, sizeof *r->itl_ms))
        return false;
    r->itl_ms[r->n_itl++] = ms;
    return true;
}

void rp_records_free(rp_record *r, int n)
{
    for (int i = 0; r && i < n; i++)
        free(r[i].itl_ms);
    free(r);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, int n, double p)
{
    if (n == 0)
        return NAN;
    double k = p / 100.0 * (n - 1);
    int i = (int)floor(k);
    return i + 1 < n ? v[i] + (v[i + 1] - v[i]) * (k - i) : v[n - 1];
}

/* Sorts v in place. */
static rp_dist dist_of(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double mean = 0;
    for (int i = 0; i < n; i++)
        mean += v[i];
    return (rp_dist){.mean = n ? mean / n : NAN, .p50 = pct(v, n, 50), .p90 = pct(v, n, 90),
                     .p99 = pct(v, n, 99), .n = n};
}

static double req_tpot_ms(const rp_record *r)
{
    return r->n_tokens > 1 ? (r->t_last - r->t_first) * 1e3 / (r->n_tokens - 1) : 0;
}

void rp_summarize(const rp_record *r, int n, const rp_slo *slo, double offered_rate, rp_summary *s)
{
    memset(s, 0, sizeof *s);
    s->requests = n;
    s->offered_rate = offered_rate;
    size_t n_itl = 0;
    for (int i = 0; i < n; i++)
        n_itl += r[i].ok ? (size_t)r[i].n_itl : 0;
    double *ttft = calloc((size_t)n + 1, sizeof *ttft), *tpot = calloc((size_t)n + 1, sizeof *tpot),
           *e2e = calloc((size_t)n + 1, sizeof *e2e), *gap2 = calloc((size_t)n + 1, sizeof *gap2),
           *sttft = calloc((size_t)n + 1, sizeof *sttft), *itl = calloc(n_itl + 1, sizeof *itl);
    int n_ok = 0, n_tpot = 0, n_sttft = 0, ok_ttft = 0, ok_tpot = 0, ok_both = 0;
    size_t k_itl = 0;
    double t_begin = INFINITY, t_end = -INFINITY;
    for (int i = 0; i < n; i++) {
        const rp_record *q = &r[i];
        if (q->t_arrival < t_begin)
            t_begin = q->t_arrival;
        if (!q->ok || q->n_tokens < 1) {
            s->failed++;
            continue;
        }
        if (q->t_last > t_end)
            t_end = q->t_last;
        double t1 = (q->t_first - q->t_arrival) * 1e3, tp = req_tpot_ms(q);
        if (ttft)
            ttft[n_ok] = t1;
        if (e2e)
            e2e[n_ok] = (q->t_last - q->t_arrival) * 1e3;
        n_ok++;
        if (q->n_tokens > 1) {
            if (tpot)
                tpot[n_tpot] = tp;
            if (gap2)
                gap2[n_tpot] = (q->t_second - q->t_first) * 1e3;
            n_tpot++;
        }
        if (!isnan(q->server_ttft_ms) && sttft)
            sttft[n_sttft++] = q->server_ttft_ms;
        for (int k = 0; itl && k < q->n_itl; k++)
            itl[k_itl++] = q->itl_ms[k];
        bool a = slo->slo_ttft_ms <= 0 || t1 <= slo->slo_ttft_ms;
        bool b = slo->slo_tpot_ms <= 0 || tp <= slo->slo_tpot_ms;
        ok_ttft += a;
        ok_tpot += b;
        ok_both += a && b;
        s->in_tokens += q->n_in;
        s->out_tokens += q->n_tokens;
    }
    s->ok = n_ok;
    s->wall_s = n_ok ? t_end - t_begin : 0;
    double w = s->wall_s > 0 ? s->wall_s : NAN;
    s->req_per_s = n_ok / w;
    s->out_tok_per_s = (double)s->out_tokens / w;
    s->total_tok_per_s = (double)(s->out_tokens + s->in_tokens) / w;
    if (ttft && tpot && e2e && gap2 && sttft && itl) {
        s->ttft = dist_of(ttft, n_ok);
        s->tpot = dist_of(tpot, n_tpot);
        s->e2e = dist_of(e2e, n_ok);
        s->gap2 = dist_of(gap2, n_tpot);
        s->server_ttft = dist_of(sttft, n_sttft);
        s->itl = dist_of(itl, (int)k_itl);
    }
    s->attain_ttft = n ? (double)ok_ttft / n : 0;
    s->attain_tpot = n ? (double)ok_tpot / n : 0;
    s->attainment = n ? (double)ok_both / n : 0;
    s->goodput_rps = ok_both / w;
    free(ttft);
    free(tpot);
    free(e2e);
    free(gap2);
    free(sttft);
    free(itl);
}

static void table_row(FILE *f, const char *name, const rp_dist *d)
{
    if (d->n == 0)
        return;
    fprintf(f, "%-6s ms   mean %9.2f   p50 %9.2f   p90 %9.2f   p99 %9.2f\n", name, d->mean, d->p50, d->p90,
            d->p99);
}

void rp_print_table(FILE *f, const rp_summary *s, const rp_slo *slo)
{
    fprintf(f, "requests: %d (%d ok, %d failed) in %.2f s, offered %.3g req/s\n", s->requests, s->ok, s->failed,
            s->wall_s, s->offered_rate);
    fprintf(f, "throughput: %.2f req/s, %.1f output tok/s, %.1f total tok/s (%lld prompt + %lld output tokens)\n",
            s->req_per_s, s->out_tok_per_s, s->total_tok_per_s, s->in_tokens, s->out_tokens);
    table_row(f, "TTFT", &s->ttft);
    table_row(f, "sTTFT", &s->server_ttft);
    table_row(f, "TPOT", &s->tpot);
    table_row(f, "ITL", &s->itl);
    table_row(f, "T1-T2", &s->gap2);
    table_row(f, "E2E", &s->e2e);
    if (slo->slo_ttft_ms > 0 || slo->slo_tpot_ms > 0)
        fprintf(f, "SLO (TTFT <= %g ms, TPOT <= %g ms): attainment %.1f%% (TTFT %.1f%%, TPOT %.1f%%), "
                   "goodput %.3f req/s\n",
                slo->slo_ttft_ms, slo->slo_tpot_ms, 100 * s->attainment, 100 * s->attain_ttft,
                100 * s->attain_tpot, s->goodput_rps);
}

/* JSON has no NaN: empty distributions print null. */
static void json_num(FILE *f, double v)
{
    if (isfinite(v))
        fprintf(f, "%.4f", v);
    else
        fputs("null", f);
}

static void json_dist(FILE *f, const char *name, const rp_dist *d)
{
    fprintf(f, ", \"%s_ms\": {\"n\": %d, \"mean\": ", name, d->n);
    json_num(f, d->mean);
    fputs(", \"p50\": ", f);
    json_num(f, d->p50);
    fputs(", \"p90\": ", f);
    json_num(f, d->p90);
    fputs(", \"p99\": ", f);
    json_num(f, d->p99);
    fputc('}', f);
}

void rp_print_json(FILE *f, const char *type, const char *extra, const rp_summary *s, const rp_slo *slo)
{
    fprintf(f, "{\"type\": \"%s\"%s%s, \"requests\": %d, \"ok\": %d, \"failed\": %d, \"wall_s\": ", type,
            extra ? ", " : "", extra ? extra : "", s->requests, s->ok, s->failed);
    json_num(f, s->wall_s);
    fprintf(f, ", \"offered_rate\": %.4f, \"req_per_s\": ", s->offered_rate);
    json_num(f, s->req_per_s);
    fputs(", \"output_tok_per_s\": ", f);
    json_num(f, s->out_tok_per_s);
    fputs(", \"total_tok_per_s\": ", f);
    json_num(f, s->total_tok_per_s);
    fprintf(f, ", \"prompt_tokens\": %lld, \"output_tokens\": %lld", s->in_tokens, s->out_tokens);
    json_dist(f, "ttft", &s->ttft);
    json_dist(f, "server_ttft", &s->server_ttft);
    json_dist(f, "tpot", &s->tpot);
    json_dist(f, "itl", &s->itl);
    json_dist(f, "second_token_gap", &s->gap2);
    json_dist(f, "e2e", &s->e2e);
    fprintf(f, ", \"slo_ttft_ms\": %g, \"slo_tpot_ms\": %g, \"attainment\": %.4f, \"attain_ttft\": %.4f, "
               "\"attain_tpot\": %.4f, \"goodput_rps\": ",
            slo->slo_ttft_ms, slo->slo_tpot_ms, s->attainment, s->attain_ttft, s->attain_tpot);
    json_num(f, s->goodput_rps);
    fputs("}\n", f);
}

void rp_print_requests_jsonl(FILE *f, const rp_record *r, int n, const char *extra)
{
    for (int i = 0; i < n; i++) {
        const rp_record *q = &r[i];
        fprintf(f, "{\"type\": \"request\"%s%s, \"i\": %d, \"arrival_s\": %.6f, \"n_in\": %d, \"n_out\": %d, "
                   "\"n_tokens\": %d, \"ok\": %s",
                extra ? ", " : "", extra ? extra : "", i, q->t_arrival, q->n_in, q->n_out, q->n_tokens,
                q->ok ? "true" : "false");
        if (q->ok && q->n_tokens > 0) {
            fprintf(f, ", \"ttft_ms\": %.4f, \"e2e_ms\": %.4f, \"tpot_ms\": %.4f",
                    (q->t_first - q->t_arrival) * 1e3, (q->t_last - q->t_arrival) * 1e3, req_tpot_ms(q));
            /* The first-to-second token gap: in a disaggregated cluster the KV hand-off as the
             * user sees it (the summary's second_token_gap_ms is over these). */
            if (q->n_tokens > 1)
                fprintf(f, ", \"second_token_gap_ms\": %.4f", (q->t_second - q->t_first) * 1e3);
        } else if (q->error[0]) {
            fputs(", \"error\": \"", f);
            for (const char *c = q->error; *c; c++) {
                if (*c == '"' || *c == '\\')
                    fputc('\\', f);
                fputc((unsigned char)*c < 32 ? '?' : *c, f);
            }
            fputc('"', f);
        }
        fputs("}\n", f);
    }
}

int rp_parse_arg(const char *a, const char *v, rp_slo *slo, double *target)
{
    char *end;
    double x = strtod(v, &end);
    bool num = end != v && !*end;
    if (!strcmp(a, "--slo-ttft-ms"))
        slo->slo_ttft_ms = x;
    else if (!strcmp(a, "--slo-tpot-ms"))
        slo->slo_tpot_ms = x;
    else if (!strcmp(a, "--target"))
        *target = x;
    else
        return 0;
    return num && x > 0 && (strcmp(a, "--target") || x <= 1) ? 1 : -1;
}

int rp_parse_rates(const char *v, double *out, int cap)
{
    char *end;
    int n = 0;
    for (const char *p = v; *p;) {
        double r = strtod(p, &end);
        if (end == p || !(r > 0) || n == cap || (n && r <= out[n - 1]) || (*end && *end != ','))
            return -1;
        out[n++] = r;
        p = *end ? end + 1 : end;
    }
    return n ? n : -1;
}

double rp_sweep_goodput(const double *rates, const double *attain, int n, double target)
{
    for (int i = 0; i < n; i++) {
        if (attain[i] >= target)
            continue;
        if (i == 0)
            return 0;
        double a0 = attain[i - 1], a1 = attain[i];
        return rates[i - 1] + (a0 - target) / (a0 - a1) * (rates[i] - rates[i - 1]);
    }
    return n ? rates[n - 1] : 0;
}
