/* moe-plan: the cluster planner. `profile` measures this machine's costs with the real engine;
 * `simulate` replays a workload on a layout in a discrete-event model of the coordinator and the
 * engines and prints moe-bench's report; `search` ranks layouts by predicted goodput per rank. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/moe_bench/report.h"
#include "tools/moe_bench/workload.h"
#include "tools/moe_plan/calibrate.h"
#include "tools/moe_plan/probe.h"
#include "tools/moe_plan/profile.h"
#include "tools/moe_plan/search.h"
#include "tools/moe_plan/sim.h"

#define MAX_SWEEP 32

static void usage(FILE *f)
{
    fputs("usage: moe-plan profile --model DIR [--out FILE] [--threads T] [--batch-tokens N] [--max-seqs N]\n"
          "                        [--kv-block-size N] [--reps N] [--quick] [--note TEXT] [--quiet]\n"
          "                        [--share-max K]\n"
          "         measures step times (prefill vs prompt tokens and batch, decode vs batch and context)\n"
          "         with the real engine; under mpirun -np N >= 2 also the KV hand-off rate between two\n"
          "         ranks and the expert-parallel all-to-all over N ranks (MPI backend). Writes FILE\n"
          "         (default profile.json). Also how our own ranks on one host stretch each other:\n"
          "         a short and a long step timed alone and while 1..K more engines step back to back\n"
          "         in this process (default K 3; 0 skips), the curve --host-ranks uses.\n"
          "       moe-plan probe --out FILE [--seconds S] [--interval-ms M]\n"
          "         measures the CPU a process gets on this machine when it wakes to compute 1-64 ms\n"
          "         (wall / CPU per burst, a burst every M ms, default 200), until S seconds have\n"
          "         passed or SIGTERM; run it beside a live cluster (it takes ~7% of a core) and pass\n"
          "         the file to simulate/search with --availability\n"
          "       moe-plan calibrate --profile FILE --addr HOST:PORT [--requests N]\n"
          "         measures the fixed costs outside the engine (coordinator dispatch, token path,\n"
          "         per-step report) on a live cluster of the profiled model with N short probes\n"
          "         (default 10, 0.5 s apart) and writes them into FILE\n"
          "       moe-plan simulate --profile FILE --layout L [workload] [SLOs] [options]\n"
          "         L: pools of COUNTxEP: \"P=1x1,D=2x1\" (disaggregated), \"M=2x1\" (colocated)\n"
          "       moe-plan search --profile FILE --ranks N [workload] --slo-ttft-ms A --slo-tpot-ms B\n"
          "         ranks every layout of at most N worker ranks by goodput per rank\n",
          f);
    wl_usage(f);
    fputs("SLOs and sweep (simulate, search):\n"
          "  --slo-ttft-ms MS, --slo-tpot-ms MS   the SLOs (search needs both)\n"
          "  --sweep R1,R2,...|auto   simulate at each rate (auto: search the rate) and report the\n"
          "                       highest meeting --target attainment (DistServe's goodput)\n"
          "  --target F           attainment goal (default 0.9)\n"
          "engine and cluster (default: the profile's):\n"
          "  --batch-tokens N, --max-seqs N, --kv-blocks N, --kv-block-size N\n"
          "  --kv-transfer layer|block   the hand-off mode (default layer)\n"
          "  --max-requests N     admission limit (default 1024)\n"
          "  --cores N            the ranks share N cores (one machine; default: a core each)\n"
          "  --host-ranks N       N worker ranks per host (layout order) share the host's cores as\n"
          "                       processor sharing: a step's CPU time progresses at the rate the\n"
          "                       profile's sharing curve gives for the host's ranks busy at that\n"
          "                       moment (without a curve: busy ranks / --cores). Not with\n"
          "                       --availability; calibrate with --host-ranks 1 for it\n"
          "  --client-cpu-ms-per-token X  with --host-ranks: the coordinator and the client use X\n"
          "                       CPU ms per streamed token on the first host, one more sharer\n"
          "                       there for that share of the run (mean field; default 0: none)\n"
          "  --availability FILE  a `moe-plan probe` file: steps cost the profile's CPU times,\n"
          "                       stretched as the probe saw CPU bursts stretched (replaces --cores)\n"
          "  --availability-timed the probe ran beside the workload from its start: each step takes\n"
          "                       the ratio measured nearest its time (bursts of load stay together)\n"
          "  --dispatch-ms X, --token-path-ms X, --step-overhead-ms X   fixed costs outside the engine\n"
          "network model (for layouts larger than the profiled machine):\n"
          "  --link-gbps G        per-link bandwidth between instances and EP ranks, GB/s\n"
          "  --link-latency-us U  per-message latency (both flags replace the profile's rates)\n"
          "  --machine-ranks N    worker ranks the profiled machine runs for real (search: larger\n"
          "                       layouts are marked as network-model predictions; default 2)\n"
          "output:\n"
          "  --json               the summary as one JSON line\n"
          "  --jsonl FILE         requests, timeline and summaries as JSON lines (as moe-bench)\n"
          "  --timeline-ms MS     timeline period in --jsonl (default 250; 0 off)\n"
          "  --top N              search: layouts printed (default 5)\n",
          f);
}

typedef struct {
    const char *cmd, *profile, *layout, *jsonl_path, *addr, *avail;
    wl_opts wl;
    rp_slo slo;
    double target;
    double sweep[MAX_SWEEP];
    int n_sweep;
    bool sweep_auto, json, avail_timed;
    mp_sim_opts sim;
    double dispatch_ms, token_path_ms, step_overhead_ms;
    double link_gbps, link_latency_us;
    int ranks, machine_ranks, top;
    double timeline_ms;
    mp_profile_opts prof;
    mp_probe_opts probe;
} plan_opts;

static int parse_int_arg(const char *v, int lo, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > (1 << 24))
        return -1;
    *out = (int)x;
    return 1;
}

static int parse_num_arg(const char *v, double lo, double *out)
{
    char *end;
    double x = strtod(v, &end);
    if (*end || end == v || !(x >= lo))
        return -1;
    *out = x;
    return 1;
}

static int parse_args(int argc, char **argv, plan_opts *o)
{
    memset(o, 0, sizeof *o);
    wl_opts_default(&o->wl);
    o->target = 0.9;
    o->sim.max_requests = 1024;
    o->dispatch_ms = o->token_path_ms = o->step_overhead_ms = -1;
    o->machine_ranks = 2;
    o->top = 5;
    o->timeline_ms = 250;
    o->prof = (mp_profile_opts){.out = "profile.json", .max_batch_tokens = 512, .max_seqs = 64,
                                .block_size = 16, .reps = 5, .share_max = 3, .verbose = true};
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? -1 : 1;
    }
    o->cmd = argv[1];
    o->probe = (mp_probe_opts){.interval_ms = 200, .verbose = true};
    if (strcmp(o->cmd, "profile") && strcmp(o->cmd, "calibrate") && strcmp(o->cmd, "simulate") &&
        strcmp(o->cmd, "search") && strcmp(o->cmd, "probe")) {
        fprintf(stderr,
                "moe-plan: unknown command '%s' (profile, probe, calibrate, simulate or search; see --help)\n",
                o->cmd);
        return -1;
    }
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        }
        static const char *const flags[] = {"--json", "--quick", "--quiet", "--availability-timed"};
        bool flag = false;
        for (size_t k = 0; k < 4; k++)
            flag |= !strcmp(a, flags[k]);
        if (flag) {
            o->avail_timed |= !strcmp(a, "--availability-timed");
            o->json |= !strcmp(a, "--json");
            o->prof.quick |= !strcmp(a, "--quick");
            if (!strcmp(a, "--quiet"))
                o->prof.verbose = o->probe.verbose = false;
            continue;
        }
        if (!v) {
            fprintf(stderr, "moe-plan: %s needs a value\n", a);
            return -1;
        }
        int r = wl_parse_arg(a, v, &o->wl);
        if (!r)
            r = rp_parse_arg(a, v, &o->slo, &o->target);
        if (r) {
        } else if (!strcmp(a, "--profile")) {
            o->profile = v, r = 1;
        } else if (!strcmp(a, "--availability")) {
            o->avail = v, r = 1;
        } else if (!strcmp(a, "--seconds")) {
            r = parse_num_arg(v, 0, &o->probe.seconds);
        } else if (!strcmp(a, "--interval-ms")) {
            r = parse_num_arg(v, 1, &o->probe.interval_ms);
        } else if (!strcmp(a, "--addr")) {
            o->addr = v, r = 1;
        } else if (!strcmp(a, "--layout")) {
            o->layout = v, r = 1;
        } else if (!strcmp(a, "--model")) {
            o->prof.model_dir = v, r = 1;
        } else if (!strcmp(a, "--out")) {
            o->prof.out = v, r = 1;
        } else if (!strcmp(a, "--note")) {
            o->prof.note = v, r = 1;
        } else if (!strcmp(a, "--jsonl")) {
            o->jsonl_path = v, r = 1;
        } else if (!strcmp(a, "--sweep")) {
            o->sweep_auto = !strcmp(v, "auto");
            r = o->sweep_auto ? 1 : (o->n_sweep = rp_parse_rates(v, o->sweep, MAX_SWEEP)) > 0 ? 1 : -1;
        } else if (!strcmp(a, "--kv-transfer")) {
            r = !strcmp(v, "layer") || !strcmp(v, "block") ? 1 : -1;
            o->sim.kv_block_mode = !strcmp(v, "block");
        } else if (!strcmp(a, "--threads")) {
            r = parse_int_arg(v, 1, &o->prof.threads);
        } else if (!strcmp(a, "--reps")) {
            r = parse_int_arg(v, 1, &o->prof.reps);
            r = o->prof.reps > 16 ? -1 : r;
        } else if (!strcmp(a, "--batch-tokens")) {
            r = parse_int_arg(v, 1, &o->sim.max_batch_tokens);
            o->prof.max_batch_tokens = o->sim.max_batch_tokens;
        } else if (!strcmp(a, "--max-seqs")) {
            r = parse_int_arg(v, 1, &o->sim.max_seqs);
            o->prof.max_seqs = o->sim.max_seqs;
        } else if (!strcmp(a, "--kv-block-size")) {
            r = parse_int_arg(v, 1, &o->sim.block_size);
            o->prof.block_size = o->sim.block_size;
        } else if (!strcmp(a, "--kv-blocks")) {
            r = parse_int_arg(v, 1, &o->sim.kv_blocks);
        } else if (!strcmp(a, "--max-requests")) {
            r = parse_int_arg(v, 1, &o->sim.max_requests);
        } else if (!strcmp(a, "--cores")) {
            r = parse_int_arg(v, 1, &o->sim.cores);
        } else if (!strcmp(a, "--host-ranks")) {
            r = parse_int_arg(v, 1, &o->sim.host_ranks);
        } else if (!strcmp(a, "--client-cpu-ms-per-token")) {
            r = parse_num_arg(v, 0, &o->sim.client_cpu_ms_per_token);
        } else if (!strcmp(a, "--share-max")) {
            r = parse_int_arg(v, 0, &o->prof.share_max);
        } else if (!strcmp(a, "--ranks")) {
            r = parse_int_arg(v, 1, &o->ranks);
        } else if (!strcmp(a, "--machine-ranks")) {
            r = parse_int_arg(v, 1, &o->machine_ranks);
        } else if (!strcmp(a, "--top")) {
            r = parse_int_arg(v, 1, &o->top);
        } else if (!strcmp(a, "--dispatch-ms")) {
            r = parse_num_arg(v, 0, &o->dispatch_ms);
        } else if (!strcmp(a, "--token-path-ms")) {
            r = parse_num_arg(v, 0, &o->token_path_ms);
        } else if (!strcmp(a, "--step-overhead-ms")) {
            r = parse_num_arg(v, 0, &o->step_overhead_ms);
        } else if (!strcmp(a, "--link-gbps")) {
            r = parse_num_arg(v, 1e-6, &o->link_gbps);
        } else if (!strcmp(a, "--link-latency-us")) {
            r = parse_num_arg(v, 0, &o->link_latency_us);
        } else if (!strcmp(a, "--timeline-ms")) {
            r = parse_num_arg(v, 0, &o->timeline_ms);
        } else {
            fprintf(stderr, "moe-plan: unknown option %s (see --help)\n", a);
            return -1;
        }
        if (r < 0) {
            fprintf(stderr, "moe-plan: %s: bad value '%s'\n", a, v);
            return -1;
        }
        i++;
    }
    if (o->link_gbps > 0 || o->link_latency_us > 0) {
        o->sim.net = (mp_net){.gbps = o->link_gbps > 0 ? o->link_gbps : 12.5,
                              .latency_ms = o->link_latency_us * 1e-3, .set = true};
    }
    return 0;
}

static moe_status load_costs(const plan_opts *o, mp_costs *c)
{
    if (!o->profile)
        return moe_error(MOE_ERR_INVALID_ARG, "--profile FILE is required (write one with moe-plan profile)");
    moe_status st = mp_costs_load(o->profile, c);
    if (st != MOE_OK)
        return st;
    if (o->dispatch_ms >= 0)
        c->dispatch_ms = o->dispatch_ms;
    if (o->token_path_ms >= 0)
        c->token_path_ms = o->token_path_ms;
    if (o->step_overhead_ms >= 0)
        c->step_overhead_ms = o->step_overhead_ms;
    if (o->sim.host_ranks > 0) {
        /* Processor sharing stretches CPU times by our own ranks' concurrency as the profile measured
         * it; the probe's independent draws would count the same sharing twice. */
        if (o->avail)
            return moe_error(MOE_ERR_INVALID_ARG, "--host-ranks and --availability are two models of the same "
                                                  "sharing: give one");
        if (!c->has_cpu || (c->n_share == 0 && o->sim.cores == 0))
            return moe_error(MOE_ERR_INVALID_ARG, "--host-ranks: %s has no %s (profile again with this moe-plan, or "
                                                  "give --cores N)",
                             o->profile, c->has_cpu ? "sharing curve (share)" : "CPU times (step.ms_cpu)");
        c->cpu_steps = true;
    }
    if (!o->avail)
        return o->avail_timed ? moe_error(MOE_ERR_INVALID_ARG, "--availability-timed needs --availability FILE")
                              : MOE_OK;
    st = mp_avail_load(o->avail, c);
    if (st == MOE_OK && o->avail_timed && !c->av_has_t)
        st = moe_error(MOE_ERR_FORMAT, "--availability-timed: %s has no burst times (t_s)", o->avail);
    c->av_timed = o->avail_timed;
    return st;
}

static int simulate_cmd(plan_opts *o)
{
    mp_costs c;
    mp_layout l;
    moe_status st = load_costs(o, &c);
    if (st == MOE_OK && !o->layout)
        st = moe_error(MOE_ERR_INVALID_ARG, "--layout is required (e.g. \"P=1x1,D=1x1\" or \"M=2x1\")");
    if (st == MOE_OK)
        st = mp_layout_parse(o->layout, &l);
    FILE *jl = NULL;
    if (st == MOE_OK && o->jsonl_path && !(jl = fopen(o->jsonl_path, "w")))
        st = moe_error(MOE_ERR_IO, "--jsonl %s: %s", o->jsonl_path, strerror(errno));
    if (st != MOE_OK) {
        fprintf(stderr, "moe-plan: %s\n", moe_error_message());
        return 2;
    }
    char lay[64];
    mp_layout_format(&l, lay, sizeof lay);
    mp_run_ctx ctx = {.c = &c, .l = &l, .sim = o->sim, .wl = o->wl, .slo = o->slo, .jsonl = jl,
                      .timeline_s = o->timeline_ms * 1e-3};
    int rc = 0;
    if (!o->n_sweep && !o->sweep_auto) {
        rp_summary s;
        mp_sim_stats ss;
        if (mp_run_at(&ctx, -1, &s, &ss) != MOE_OK) {
            fprintf(stderr, "moe-plan: %s\n", moe_error_message());
            rc = 1;
        } else if (o->json) {
            rp_print_json(stdout, "summary", NULL, &s, &o->slo);
        } else {
            printf("moe-plan simulate: layout %s (%d worker ranks), %s, %d requests, profile %s%s\n", lay,
                   mp_layout_ranks(&l), ctx.source, s.requests, o->profile,
                   o->sim.net.set ? " (network model from the flags)" : "");
            rp_print_table(stdout, &s, &o->slo);
            printf("simulated: %ld steps, %ld KV hand-offs, %ld preemptions, %ld rejected\n", ss.steps, ss.handoffs,
                   ss.preemptions, ss.rejected);
        }
    } else {
        double rates[MAX_SWEEP], attain[MAX_SWEEP];
        int n = 0;
        double g;
        if (o->sweep_auto) {
            g = mp_goodput(&ctx, o->target, NULL);
        } else {
            for (; n < o->n_sweep; n++) {
                rp_summary s;
                if (mp_run_at(&ctx, o->sweep[n], &s, NULL) != MOE_OK) {
                    fprintf(stderr, "moe-plan: %s\n", moe_error_message());
                    rc = 1;
                    break;
                }
                rates[n] = o->sweep[n];
                attain[n] = s.attainment;
                char extra[48];
                snprintf(extra, sizeof extra, "\"rate\": %.4f", rates[n]);
                if (o->json)
                    rp_print_json(stdout, "summary", extra, &s, &o->slo);
                else
                    printf("rate %8.3f req/s: attainment %5.1f%%  TTFT p90 %9.2f ms  TPOT p90 %8.2f ms  goodput "
                           "%.3f req/s\n",
                           rates[n], 100 * s.attainment, s.ttft.p90, s.tpot.p90, s.goodput_rps);
            }
            g = rp_sweep_goodput(rates, attain, n, o->target);
        }
        printf("%s{\"type\": \"sweep\", \"layout\": \"%s\", \"target\": %.3f, \"goodput_rps\": %.4f, "
               "\"goodput_per_rank\": %.4f}\n",
               o->json ? "" : "sweep: ", lay, o->target, g, g / mp_layout_ranks(&l));
        if (jl)
            fprintf(jl, "{\"type\": \"sweep\", \"layout\": \"%s\", \"target\": %.3f, \"goodput_rps\": %.4f}\n", lay,
                    o->target, g);
    }
    if (jl)
        fclose(jl);
    return rc;
}

int main(int argc, char **argv)
{
    plan_opts o;
    int prc = parse_args(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    if (!strcmp(o.cmd, "profile")) {
        if (!o.prof.model_dir) {
            fprintf(stderr, "moe-plan profile: --model DIR is required\n");
            return 2;
        }
        return mp_profile_main(&o.prof);
    }
    if (!strcmp(o.cmd, "simulate"))
        return simulate_cmd(&o);
    if (!strcmp(o.cmd, "probe")) {
        o.probe.out = o.prof.out;
        return mp_probe_main(&o.probe);
    }
    if (!strcmp(o.cmd, "calibrate")) {
        mp_costs c;
        moe_status cs = o.addr ? load_costs(&o, &c)
                               : moe_error(MOE_ERR_INVALID_ARG, "calibrate needs --addr HOST:PORT and --profile FILE");
        if (cs == MOE_OK)
            cs = mp_calibrate(o.addr, o.wl.requests == 200 ? 10 : o.wl.requests, &c);
        if (cs == MOE_OK)
            cs = mp_costs_save(o.profile, &c);
        if (cs != MOE_OK) {
            fprintf(stderr, "moe-plan: %s\n", moe_error_message());
            return 1;
        }
        return 0;
    }
    mp_costs c;
    moe_status st = load_costs(&o, &c);
    if (st == MOE_OK && (o.ranks < 1 || o.slo.slo_ttft_ms <= 0 || o.slo.slo_tpot_ms <= 0))
        st = moe_error(MOE_ERR_INVALID_ARG, "search needs --ranks N, --slo-ttft-ms and --slo-tpot-ms");
    if (st != MOE_OK) {
        fprintf(stderr, "moe-plan: %s\n", moe_error_message());
        return 2;
    }
    mp_search_opts so = {.ranks = o.ranks, .machine_ranks = o.machine_ranks, .top = o.top, .target = o.target,
                         .sim = o.sim, .wl = o.wl, .slo = o.slo, .profile = o.profile};
    return mp_search(&c, &so, stdout) == MOE_OK ? 0 : 1;
}
