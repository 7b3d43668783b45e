/* The benchmark report, one definition for measured runs (moe-bench) and simulated ones
 * (moe-plan simulate): per-request records -> TTFT/TPOT/ITL/E2E percentiles, throughput, SLO
 * attainment and goodput; printed as a table or written as JSON lines; and the rate sweep's
 * answer (the highest rate that meets a target attainment, DistServe's goodput). */
#ifndef MOE_TOOLS_BENCH_REPORT_H
#define MOE_TOOLS_BENCH_REPORT_H

#include <stdbool.h>
#include <stdio.h>

/* One request, times in seconds from the start of the run. A request that failed or produced no
 * token has ok = false (it counts against attainment). */
typedef struct {
    double t_arrival, t_first, t_second, t_last;
    int n_in, n_out, n_tokens;
    bool ok;
    double server_ttft_ms; /* measured only (NAN otherwise): the coordinator's own TTFT */
    float *itl_ms;         /* gaps between token-carrying messages after the first, [n_itl] */
    int n_itl, cap_itl;
    char error[120];
} rp_record;

/* Appends one gap; false when out of memory (the gap is dropped). */
bool rp_record_add_itl(rp_record *r, float ms);
void rp_records_free(rp_record *r, int n);

typedef struct {
    double slo_ttft_ms, slo_tpot_ms; /* <= 0: not set (always met) */
} rp_slo;

typedef struct {
    double mean, p50, p90, p99;
    int n;
} rp_dist;

typedef struct {
    int requests, ok, failed;
    double wall_s, offered_rate; /* offered: arrivals per second of the workload */
    double req_per_s, out_tok_per_s, total_tok_per_s;
    long long in_tokens, out_tokens;
    rp_dist ttft, tpot, itl, e2e, gap2, server_ttft;
    /* Fractions of all requests: TTFT within its SLO, TPOT within its SLO, both. */
    double attain_ttft, attain_tpot, attainment;
    double goodput_rps; /* requests meeting both SLOs per second of the run */
} rp_summary;

/* Summarizes n records. The percentiles use linear interpolation between order statistics. */
void rp_summarize(const rp_record *r, int n, const rp_slo *slo, double offered_rate, rp_summary *s);
/* A few lines of text: the run's header line is the caller's. */
void rp_print_table(FILE *f, const rp_summary *s, const rp_slo *slo);
/* One JSON object on one line (with a newline): {"type": TYPE, <extra>, ...the summary...}.
 * extra is pre-formatted JSON members without braces ("\"rate\": 2") or NULL. */
void rp_print_json(FILE *f, const char *type, const char *extra, const rp_summary *s, const rp_slo *slo);
/* One JSON line per request: {"type": "request", "i": ..., "arrival_s": ..., "ttft_ms": ..., "e2e_ms",
 * "tpot_ms", and "second_token_gap_ms" (first to second token) when it has two tokens or more}. */
void rp_print_requests_jsonl(FILE *f, const rp_record *r, int n, const char *extra);

/* Shared options: --slo-ttft-ms, --slo-tpot-ms, --target (attainment goal, (0, 1]). Returns 1 when
 * the flag was one of them and its value parsed, 0 when not one of them, -1 for a bad value. */
int rp_parse_arg(const char *flag, const char *v, rp_slo *slo, double *target);
/* "R1,R2,..." increasing positive rates into out[cap]; their count, or -1. */
int rp_parse_rates(const char *v, double *out, int cap);

/* The sweep's answer: the highest rate whose attainment is at least target, interpolated linearly
 * between the highest passing rate and the next rate (which fails) when there is one. rates must
 * be increasing. Returns 0 when even the lowest rate fails. */
double rp_sweep_goodput(const double *rates, const double *attain, int n, double target);

#endif
