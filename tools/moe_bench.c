/* moe-bench: the cluster benchmark. Requests arrive as a Poisson or gamma (bursty) process at a
 * rate, or replay a trace (Mooncake JSONL, plain CSV), with prompt and output lengths from
 * distributions or the trace, each on its own stream; reports TTFT, TPOT, ITL and end-to-end
 * latency percentiles, throughput, SLO attainment and goodput, measured at the client; --sweep
 * runs several rates and finds the highest that meets a target attainment. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "tools/moe_bench/report.h"
#include "tools/moe_bench/run.h"
#include "tools/moe_bench/workload.h"

#define MAX_SWEEP 32

typedef struct {
    const char *addr;
    wl_opts wl;
    bench_cfg cfg;
    rp_slo slo;
    bool json;
    const char *jsonl_path;
    double sweep[MAX_SWEEP];
    int n_sweep;
    double target;
    double pause_s;
} bench_opts;

static void usage(FILE *f)
{
    fputs("usage: moe-bench [--addr HOST:PORT] [options]\n", f);
    wl_usage(f);
    fputs("SLOs and sweep:\n"
          "  --slo-ttft-ms MS     time-to-first-token SLO (default: none)\n"
          "  --slo-tpot-ms MS     time-per-output-token SLO (default: none)\n"
          "  --sweep R1,R2,...    run the workload at each rate (increasing) and report the highest\n"
          "                       rate meeting --target attainment (DistServe's goodput)\n"
          "  --target F           attainment goal of the sweep (default 0.9)\n"
          "  --pause-s S          idle time between sweep runs (default 2)\n"
          "client:\n"
          "  --addr HOST:PORT     server (default $MOE_SERVER_ADDR, else 127.0.0.1:50051)\n"
          "  --concurrency C      most streams open at once (default 256)\n"
          "  --vocab V            prompt ids drawn from [0, V) (default: the server's vocabulary)\n"
          "  --temperature T      default 0 (greedy)\n"
          "  --no-ignore-eos      stop at EOS (default: ignore it, so outputs have exact lengths)\n"
          "  --timeout-ms MS      per request (default 600000)\n"
          "output:\n"
          "  --json               the summary as one JSON line instead of the table\n"
          "  --jsonl FILE         JSON lines: every request (TTFT, TPOT, E2E and the first-to-second\n"
          "                       token gap: a disaggregated cluster's hand-off as the user sees it),\n"
          "                       the timeline, each run's summary and the sweep's answer\n"
          "                       (bench/plot.py draws them); the table's T1-T2 row is that gap\n"
          "  --status-ms MS       timeline period: ClusterStatus polled for queues and KV (default 250;\n"
          "                       0 off; needs --jsonl)\n"
          "  --no-progress        no progress line on stderr\n",
          f);
}

static int parse_args(int argc, char **argv, bench_opts *o)
{
    const char *env = getenv("MOE_SERVER_ADDR");
    *o = (bench_opts){.addr = env && *env ? env : "127.0.0.1:50051", .target = 0.9, .pause_s = 2};
    wl_opts_default(&o->wl);
    o->cfg = (bench_cfg){.concurrency = 256, .ignore_eos = true, .timeout_ms = 600000, .status_ms = 250,
                         .progress = true};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true;
        char *end = NULL;
        if (!strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
            continue;
        } else if (!strcmp(a, "--no-ignore-eos")) {
            o->cfg.ignore_eos = false;
            continue;
        } else if (!strcmp(a, "--no-progress")) {
            o->cfg.progress = false;
            continue;
        }
        if (!v) {
            fprintf(stderr, "moe-bench: %s needs a value\n", a);
            return -1;
        }
        int w = wl_parse_arg(a, v, &o->wl), r = w ? 0 : rp_parse_arg(a, v, &o->slo, &o->target);
        errno = 0;
        if (w || r)
            ok = w > 0 || r > 0;
        else if (!strcmp(a, "--addr"))
            o->addr = v;
        else if (!strcmp(a, "--concurrency"))
            ok = (o->cfg.concurrency = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(a, "--vocab"))
            ok = (o->cfg.vocab = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(a, "--temperature"))
            ok = (o->cfg.temperature = strtof(v, &end)) >= 0 && !*end;
        else if (!strcmp(a, "--timeout-ms"))
            ok = (o->cfg.timeout_ms = strtoll(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(a, "--sweep"))
            ok = (o->n_sweep = rp_parse_rates(v, o->sweep, MAX_SWEEP)) > 0;
        else if (!strcmp(a, "--pause-s"))
            ok = (o->pause_s = strtod(v, &end)) >= 0 && !*end;
        else if (!strcmp(a, "--jsonl"))
            o->jsonl_path = v;
        else if (!strcmp(a, "--status-ms"))
            ok = (o->cfg.status_ms = (int)strtol(v, &end, 10)) >= 0 && !*end;
        else {
            fprintf(stderr, "moe-bench: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (!ok || errno) {
            fprintf(stderr, "moe-bench: %s: bad value '%s'\n", a, v);
            return -1;
        }
        i++;
    }
    return 0;
}

/* One run at one rate (rate < 0: the workload's own arrival times). */
static int run_once(moe_rpc_client *cli, bench_opts *o, double rate, FILE *jl, double *attain)
{
    wl_opts wo = o->wl;
    if (rate >= 0)
        wo.rate = rate;
    wl_workload w;
    if (wl_build(&wo, &w) != MOE_OK) {
        fprintf(stderr, "moe-bench: %s\n", moe_error_message());
        return 2;
    }
    /* Every JSON line of the run carries its start on the monotonic clock (arrival_s counts from
     * it), which the workers' MOE_STEP_TRACE / MOE_KV_TRACE lines use too: a request's tokens can
     * be set against the engine steps and hand-off events of the same moment
     * (bench/plan_handoff.py). */
    char label[96];
    int len = snprintf(label, sizeof label, "\"clock0_ns\": %lld", (long long)moe_now_ns());
    if (rate >= 0)
        snprintf(label + len, sizeof label - (size_t)len, ", \"rate\": %.4f", rate);
    o->cfg.label = label;
    o->cfg.jsonl = jl;
    rp_record *rec = calloc((size_t)w.n, sizeof *rec);
    if (!rec) {
        wl_free(&w);
        fprintf(stderr, "moe-bench: out of memory\n");
        return 1;
    }
    moe_status st = bench_run(cli, &o->cfg, &w, &wo, rec);
    rp_summary s;
    rp_summarize(rec, w.n, &o->slo, wl_mean_rate(&w), &s);
    *attain = s.attainment;
    if (jl) {
        rp_print_requests_jsonl(jl, rec, w.n, o->cfg.label);
        rp_print_json(jl, "summary", o->cfg.label, &s, &o->slo);
        fflush(jl);
    }
    if (o->json) {
        rp_print_json(stdout, "summary", o->cfg.label, &s, &o->slo);
    } else {
        printf("moe-bench: %s, %d requests at %s, concurrency <= %d\n", w.source, w.n, o->addr,
               o->cfg.concurrency);
        rp_print_table(stdout, &s, &o->slo);
    }
    const char *first_err = NULL;
    for (int i = 0; i < w.n && !first_err; i++)
        if (!rec[i].ok)
            first_err = rec[i].error[0] ? rec[i].error : "no token";
    if (first_err && !o->json)
        printf("first error: %s\n", first_err);
    fflush(stdout);
    rp_records_free(rec, w.n);
    wl_free(&w);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-bench: %s\n", moe_error_message());
        return 1;
    }
    return s.failed ? 1 : 0;
}

int main(int argc, char **argv)
{
    bench_opts o;
    int prc = parse_args(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    FILE *jl = NULL;
    if (o.jsonl_path && !(jl = fopen(o.jsonl_path, "w"))) {
        fprintf(stderr, "moe-bench: --jsonl %s: %s\n", o.jsonl_path, strerror(errno));
        return 2;
    }
    moe_rpc_client *cli = moe_rpc_connect(o.addr);
    if (!cli) {
        fprintf(stderr, "moe-bench: out of memory\n");
        return 1;
    }
    if (!o.cfg.vocab && (o.cfg.vocab = bench_server_vocab(cli)) <= 0) {
        moe_rpc_close(cli);
        return 1;
    }
    int rc = 0;
    if (!o.n_sweep) {
        double a;
        rc = run_once(cli, &o, -1, jl, &a);
    } else {
        double attain[MAX_SWEEP];
        int n = 0;
        for (; n < o.n_sweep; n++) {
            if (n)
                moe_sleep_ns((int64_t)(o.pause_s * 1e9));
            int r = run_once(cli, &o, o.sweep[n], jl, &attain[n]);
            if (r == 2) {
                rc = 2;
                break;
            }
            rc |= r;
            if (attain[n] < o.target && n + 1 < o.n_sweep) { /* higher rates only do worse */
                n++;
                break;
            }
        }
        if (rc != 2) {
            double g = rp_sweep_goodput(o.sweep, attain, n, o.target);
            bool capped = n && attain[n - 1] >= o.target;
            printf("%s{\"type\": \"sweep\", \"target\": %.3f, \"goodput_rps\": %.4f, \"at_least\": %s}\n",
                   o.json ? "" : "sweep: ", o.target, g, capped ? "true" : "false");
            if (jl)
                fprintf(jl, "{\"type\": \"sweep\", \"target\": %.3f, \"goodput_rps\": %.4f, \"at_least\": %s}\n",
                        o.target, g, capped ? "true" : "false");
        }
    }
    if (jl)
        fclose(jl);
    moe_rpc_close(cli);
    return rc;
}
