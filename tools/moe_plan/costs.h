/* moe-plan's cost model: what one engine step, a KV hand-off and an expert-parallel exchange cost on
 * a machine, fitted from the measurements of `moe-plan profile` and kept in its profile file
 * (JSON). The simulator asks it for durations only. */
#ifndef MOE_TOOLS_PLAN_COSTS_H
#define MOE_TOOLS_PLAN_COSTS_H

#include <stdbool.h>
#include "common/status.h"

#define MP_MAX_PTS 32
#define MP_MAX_A2A 64
#define MP_MAX_SAMPLES 256
#define MP_MAX_AV 8
#define MP_AV_SAMPLES 512
#define MP_MAX_SHARE 16 /* busy ranks of ours on one host the sharing curve covers */
#define MP_SHARE_LENS 4

typedef struct {
    int ep;
    double tokens; /* routed tokens per rank (before top-k) */
    double ms;     /* one all-to-all-v (dispatch or combine) */
} mp_a2a_pt;

/* A network between instances (and between the ranks of an expert-parallel instance when
 * it spans hosts): used where the profile has no measurement, and for layouts bigger than the
 * profiled machine. */
typedef struct {
    double gbps;       /* per-link bandwidth, GB/s (bytes) */
    double latency_ms; /* per message */
    bool set;          /* given on the command line: overrides the profile's measured rates */
} mp_net;

typedef struct {
    char model[256], cpu[128], note[256];
    int threads;
    /* Engine limits the profile ran with (the simulator's defaults). */
    int block_size, max_batch_tokens, max_seqs, kv_blocks;
    /* Model shape. */
    int n_layers, moe_layers, hidden, top_k, n_experts;
    double kv_bytes_per_token; /* K and V, all layers, f32 */
    double expert_frac;        /* share of a token's weight FLOPs in routed experts */
    /* Step time = T(n_tokens) + attn_ms * attention work (sum over the step's tokens of the
     * positions each attends to). T is piecewise linear through (tok[i], ms[i]). */
    int n_pts;
    double tok[MP_MAX_PTS], ms[MP_MAX_PTS];
    double attn_ms;
    /* The same fit of the CPU time the profiling process got during each step (wall time minus
     * the time it waited for a core): the engine's work, which other jobs on a shared machine
     * change little, where they change the wall time several-fold. has_cpu: the file has it. */
    double ms_cpu[MP_MAX_PTS];
    double attn_cpu_ms;
    bool has_cpu;
    /* The measurements the fit came from: (tokens, attention work, wall ms, CPU ms) per point,
     * kept in the file so that a reader can judge the fit (the simulator does not use them). */
    int n_samples;
    double samples[MP_MAX_SAMPLES][4];
    /* CPU availability on the machine the cluster runs on (`moe-plan probe`, see probe.h): for a
     * process that wakes up and needs av_cpu[i] ms of CPU, the wall/CPU ratios it saw. When set
     * (n_av > 0) a step costs its CPU time (ms_cpu) times a ratio drawn from the nearest bin:
     * the machine's other work, and our own ranks sharing its cores, stretch steps as measured
     * rather than as assumed. Not in the profile file: loaded with --availability. */
    int n_av;
    double av_cpu[MP_MAX_AV];
    int av_n[MP_MAX_AV];
    double av_ratio[MP_MAX_AV][MP_AV_SAMPLES];
    /* When each burst was measured (s from the probe's start, increasing; the file's t_s). With
     * av_timed (--availability-timed: the probe ran beside the workload from its start) a step
     * at simulated time t takes the ratio its bin measured nearest t: the machine's bursts of
     * contention land on the same stretch of the run, instead of being spread over every step. */
    float av_t[MP_MAX_AV][MP_AV_SAMPLES];
    bool av_has_t, av_timed;
    /* How our own ranks on one host stretch each other (`moe-plan profile` measures it with the
     * real engine: a step timed alone and while k more engines of ours step back to back in the
     * same process, i.e. the same scheduling group as mpirun's ranks, bench/RESULTS.md issue 14).
     * share[l][n-1]: wall time of a step needing share_cpu[l] ms of CPU while n of our ranks are
     * busy on the host (itself included), over that CPU time; n_share: the n measured (1..). The
     * machine's other jobs at the moment of the profile are in it too (share[l][0] is the stretch
     * of a lone step). Used by the simulator's processor sharing (mp_sim_opts.host_ranks). */
    int n_share, n_share_lens;
    int share_cpus; /* CPUs the measuring process could run on (0: not recorded) */
    double share_cpu[MP_SHARE_LENS];
    double share[MP_SHARE_LENS][MP_MAX_SHARE];
    /* Step costs are CPU times (ms_cpu) to be stretched by the simulator (the sharing curve, or
     * --cores as processor sharing): set by the caller for mp_sim_opts.host_ranks > 0. */
    bool cpu_steps;
    /* KV hand-off between instances on this machine: a copy rate and a per-message latency. */
    double xfer_gbps, xfer_latency_ms;
    /* Expert-parallel all-to-all, measured on this machine's comm backend (may be empty). */
    int n_a2a;
    mp_a2a_pt a2a[MP_MAX_A2A];
    /* Fixed costs outside the engine: coordinator -> worker dispatch, worker -> client token path,
     * per step (the worker loop's report). Not measured by `profile` (it runs no cluster): defaults
     * from bench/RESULTS.md's moe-bench runs, overridable. */
    double dispatch_ms, token_path_ms, step_overhead_ms;
    /* Per KV hand-off beyond moving its bytes: the offer, the decode side's import and resume
     * (measured by `moe-plan calibrate` on a disaggregated cluster; 0 otherwise). */
    double handoff_ms;
} mp_costs;

void mp_costs_init(mp_costs *c);
/* Reads a profile file. IO / NOT_FOUND, or FORMAT naming the missing or bad field. */
moe_status mp_costs_load(const char *path, mp_costs *c);
moe_status mp_costs_save(const char *path, const mp_costs *c);

/* One engine step's duration (ms) on one rank holding all experts: its wall time as profiled, or
 * with an availability curve loaded, its CPU time (to be stretched by mp_avail_ratio). */
double mp_step_ms(const mp_costs *c, int n_tokens, double attn_work);
/* Reads a `moe-plan probe` file into c's availability (and switches the step model to CPU time);
 * FORMAT when c's profile has no CPU times or the file is malformed. */
moe_status mp_avail_load(const char *path, mp_costs *c);
/* The wall/CPU ratio for a step needing cpu_ms of CPU: the draw-th (mod count) sample of the
 * nearest bin (log scale); the bin's mean when draw < 0; 1 without a curve. */
double mp_avail_ratio(const mp_costs *c, double cpu_ms, long draw);
/* With av_timed: the ratio the nearest bin measured nearest t_s; else mp_avail_ratio(draw). */
double mp_avail_ratio_at(const mp_costs *c, double cpu_ms, double t_s, long draw);
/* The wall/CPU stretch of a step needing cpu_ms of CPU while n_busy of our ranks step on its host
 * (itself included): the sharing curve interpolated in log(cpu_ms) between the measured lengths
 * (clamped at the ends); beyond the largest measured n, processor sharing of that point
 * (share(N) * n / N); without a curve, max(1, n_busy / cores) (cores <= 0: 1). */
double mp_share_ratio(const mp_costs *c, int n_busy, double cpu_ms, int cores);
/* One step of an expert-parallel instance of ep ranks whose ranks hold n[r] tokens and attention
 * work attn[r]: attention and dense parts per rank (the slowest sets the pace), the routed experts
 * split ep ways, and a dispatch + combine all-to-all per MoE layer. */
double mp_ep_step_ms(const mp_costs *c, const mp_net *net, int ep, const int *n, const double *attn);
/* The dispatch + combine all-to-alls of such a step (ms; 0 for ep 1): the part of it that is
 * measured as wall time (the profile's all-to-all points already carry the machine's load, so
 * the simulator does not stretch it by the availability curve again). */
double mp_ep_comm_ms(const mp_costs *c, const mp_net *net, int ep, const int *n);
/* One all-to-all-v with `tokens` routed tokens per rank over ep ranks (ms). */
double mp_a2a_ms(const mp_costs *c, const mp_net *net, int ep, double tokens);
/* Moving `bytes` of KV between two instances (ms): latency + bytes / rate. */
double mp_xfer_ms(const mp_costs *c, const mp_net *net, double bytes);

/* Attention work of a chunk of n tokens starting at position pos0: each attends to pos0+i+1. */
static inline double mp_attn_work(int pos0, int n) { return (double)n * pos0 + (double)n * (n + 1) / 2.0; }

#endif
