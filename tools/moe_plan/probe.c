/* The CPU availability probe: the machine's other work (and our own ranks) measured the way an
 * engine step meets it, as bursts of CPU after a sleep. */
#include "tools/moe_plan/probe.h"

#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "tools/moe_plan/costs.h"

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static double cpu_ms(void) { return (double)moe_process_cpu_ns() * 1e-6; }

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define N_BINS 7

int mp_probe_main(const mp_probe_opts *o)
{
    static double ratios[N_BINS][MP_AV_SAMPLES], when[N_BINS][MP_AV_SAMPLES];
    int n[N_BINS] = {0};
    long total = 0;
    (void)setsid(); /* its own scheduling group, as a rank (fails harmlessly when it leads one) */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    char load[64] = "";
    FILE *la = fopen("/proc/loadavg", "r");
    if (la) {
        if (!fgets(load, sizeof load, la))
            load[0] = 0;
        load[strcspn(load, "\n")] = 0;
        fclose(la);
    }
    uint64_t rng = 88172645463325252ULL;
    int64_t t_start = moe_now_ns();
    int64_t t_end = o->seconds > 0 ? t_start + (int64_t)(o->seconds * 1e9) : INT64_MAX;
    volatile double sink = 0;
    for (int b = 0; !stop && moe_now_ns() < t_end; b = (b + 1) % N_BINS) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        double nap = o->interval_ms * (0.5 + (double)(rng % 1000) / 1000.0);
        moe_sleep_ns((int64_t)(nap * 1e6));
        if (stop)
            break;
        double want = (double)(1 << b), c0 = cpu_ms();
        int64_t t0 = moe_now_ns();
        while (cpu_ms() - c0 < want)
            for (int i = 0; i < 1000; i++)
                sink += i * 1e-9;
        double wall = (double)(moe_now_ns() - t0) * 1e-6, got = cpu_ms() - c0;
        if (n[b] < MP_AV_SAMPLES) { /* a time series: the first ~10 minutes of bursts */
            when[b][n[b]] = (double)(t0 - t_start) * 1e-9;
            ratios[b][n[b]++] = wall / got;
        }
        total++;
    }
    FILE *f = fopen(o->out, "w");
    if (!f) {
        fprintf(stderr, "moe-plan probe: cannot write %s\n", o->out);
        return 1;
    }
    fprintf(f, "{\"type\": \"availability\", \"interval_ms\": %.1f, \"bursts\": %ld, \"loadavg_start\": \"%s\", \"bins\": [",
            o->interval_ms, total, load);
    for (int b = 0; b < N_BINS; b++) {
        double s[MP_AV_SAMPLES], mean = 0;
        memcpy(s, ratios[b], sizeof s);
        qsort(s, (size_t)n[b], sizeof *s, cmp_d);
        for (int i = 0; i < n[b]; i++)
            mean += s[i] / n[b];
        fprintf(f, "%s\n  {\"cpu_ms\": %d, \"n\": %d, \"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, \"ratios\": [",
                b ? "," : "", 1 << b, n[b], mean, n[b] ? s[n[b] / 2] : 0, n[b] ? s[n[b] * 9 / 10] : 0);
        for (int i = 0; i < n[b]; i++) /* in the order measured, with when (t_s) */
            fprintf(f, "%s%.3f", i ? ", " : "", ratios[b][i]);
        fprintf(f, "], \"t_s\": [");
        for (int i = 0; i < n[b]; i++)
            fprintf(f, "%s%.3f", i ? ", " : "", when[b][i]);
        fprintf(f, "]}");
    }
    fprintf(f, "\n]}\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "moe-plan probe: cannot write %s\n", o->out);
        return 1;
    }
    if (o->verbose)
        fprintf(stderr, "moe-plan probe: %ld bursts, wrote %s\n", total, o->out);
    return 0;
}
