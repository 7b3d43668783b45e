/* The requests of a benchmark run, shared by moe-bench (which sends them) and moe-plan (which
 * simulates them): arrival times from a Poisson or gamma process or a trace file, prompt and output
 * lengths from distributions or the trace, and the prompt token ids (prefix-sharing from Mooncake
 * hash_ids). Deterministic from the seed. */
#ifndef MOE_TOOLS_BENCH_WORKLOAD_H
#define MOE_TOOLS_BENCH_WORKLOAD_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include "common/status.h"

/* A length distribution: "N" fixed, "A-B" uniform integers, "exp:MEAN", "lognorm:MEAN:CV". */
typedef struct {
    enum { WL_DIST_FIXED, WL_DIST_UNIFORM, WL_DIST_EXP, WL_DIST_LOGNORM } kind;
    double a, b; /* fixed: a; uniform: [a, b]; exp: mean a; lognorm: mean a, coefficient of var b */
} wl_dist;

typedef struct {
    double t_s;         /* arrival, seconds from the start of the run */
    int n_in, n_out;    /* prompt tokens, output tokens (max_new_tokens, EOS ignored) */
    int n_hash;         /* Mooncake hash_ids (prefix blocks), 0 when none */
    uint64_t *hash_ids; /* [n_hash], owned by the workload */
} wl_request;

typedef struct {
    wl_request *req;
    int n;
    char source[256]; /* what made it, for the report: "poisson rate 2", "trace FILE" */
} wl_workload;

/* How to make one. Synthetic: `requests` arrivals at `rate` (0: all at time 0) with gamma
 * inter-arrival times of coefficient of variation `cv` (1 = Poisson). Trace: trace_path's rows;
 * rate > 0 rescales its timestamps to that mean rate, time_scale multiplies them otherwise;
 * len_scale multiplies both lengths (rounded, at least 1) and the hash block size; max_in / max_out
 * clip them (0: no clip); requests > 0 keeps the first that many rows. */
typedef struct {
    const char *trace_path; /* NULL: synthetic */
    int requests;
    double rate, cv, time_scale, len_scale;
    int max_in, max_out;
    wl_dist in_len, out_len;
    uint64_t seed;
    int hash_block; /* tokens per Mooncake hash id before len_scale (default 512) */
} wl_opts;

void wl_opts_default(wl_opts *o);
/* Parses a wl_dist; false (nothing set) when s is not one of the forms. */
bool wl_parse_dist(const char *s, wl_dist *d);

/* Command-line options shared by moe-bench and moe-plan: a (flag, value) pair. Returns 1 when it
 * was a workload option and its value parsed, 0 when the flag is not a workload option, -1 when
 * the value is bad. wl_usage prints their help lines. */
int wl_parse_arg(const char *flag, const char *v, wl_opts *o);
void wl_usage(FILE *f);

/* Builds the workload. Fails with IO / NOT_FOUND (trace unreadable), FORMAT (a trace line that is
 * neither JSON with timestamp/input_length/output_length nor a CSV timestamp,input,output row; the
 * message names the file and line) or INVALID_ARG (an empty trace). Free with wl_free. */
moe_status wl_build(const wl_opts *o, wl_workload *out);
void wl_free(wl_workload *w);
/* Makes the workload's mean arrival rate `rate` (timestamps scaled; the first stays at 0). */
void wl_set_rate(wl_workload *w, double rate);
/* Mean arrival rate over the run (n-1 gaps / span); 0 when all arrive at once. */
double wl_mean_rate(const wl_workload *w);

/* Writes request i's prompt: n_in ids in [0, vocab). Blocks of a hash id get the same ids in every
 * request that names it (shared prefixes), the rest is unique to (seed, i). */
void wl_prompt(const wl_workload *w, const wl_opts *o, int i, int vocab, uint32_t *ids);

/* The generator both tools use (xorshift64*). */
uint64_t wl_rng_next(uint64_t *s);
double wl_rng_unit(uint64_t *s);
/* Gamma(shape k, scale 1) by Marsaglia-Tsang (k < 1 by the k+1 boost). */
double wl_rng_gamma(uint64_t *s, double k);

#endif
