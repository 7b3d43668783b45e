/* moe-plan's simulator on hand-computable cases (fixed step costs: exact TTFT, TPOT, waiting,
 * chunking and hand-off times), and the workload/report code moe-bench shares with it. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tools/moe_bench/report.h"
#include "tools/moe_bench/workload.h"
#include "common/clock.h"
#include "tools/moe_plan/sim.h"
#include "worker/engine.h"
#include "worker/model.h"

/* T(n) = A + B n exactly (two points, linear between), attention k per position, fixed overheads. */
#define A_MS 2.0
#define B_MS 0.5
#define DISP_MS 0.25
#define PATH_MS 0.125

static mp_costs costs(double attn_ms)
{
    mp_costs c;
    mp_costs_init(&c);
    c.n_pts = 2;
    c.tok[0] = 1;
    c.ms[0] = A_MS + B_MS;
    c.tok[1] = 4096;
    c.ms[1] = A_MS + B_MS * 4096;
    c.attn_ms = attn_ms;
    c.dispatch_ms = DISP_MS;
    c.token_path_ms = PATH_MS;
    c.step_overhead_ms = 0;
    c.n_layers = 4;
    c.kv_bytes_per_token = 1000;
    c.xfer_gbps = 1; /* 1 byte per ns */
    c.xfer_latency_ms = 0.5;
    c.kv_blocks = 1000;
    return c;
}

static double T(int n) { return A_MS + B_MS * n; }

static rp_record *run(const mp_costs *c, const char *layout, wl_request *req, int n, int mbt)
{
    mp_layout l;
    cr_assert_eq(mp_layout_parse(layout, &l), MOE_OK, "%s", moe_error_message());
    wl_workload w = {.req = req, .n = n};
    mp_sim_opts o = {.max_requests = 1024, .max_batch_tokens = mbt};
    rp_record *rec = calloc((size_t)n, sizeof *rec);
    cr_assert_eq(mp_simulate(c, &l, &o, &w, rec, NULL), MOE_OK, "%s", moe_error_message());
    return rec;
}

#define EPS 1e-9

Test(plan_sim, one_request_colocated_exact_ttft_tpot)
{
    double k = 0.001;
    mp_costs c = costs(k);
    wl_request r = {.t_s = 1.0, .n_in = 100, .n_out = 5};
    rp_record *rec = run(&c, "M=1x1", &r, 1, 512);
    cr_assert(rec[0].ok);
    cr_assert_eq(rec[0].n_tokens, 5);
    /* Prefill: one step of 100 tokens, each attending to 1..100 positions. */
    double t_first = DISP_MS + T(100) + k * 5050 + PATH_MS;
    cr_assert_float_eq((rec[0].t_first - 1.0) * 1e3, t_first, EPS);
    /* Decode step j (j = 1..4) computes position 99 + j, attending to 100 + j positions. */
    double t = DISP_MS + T(100) + k * 5050;
    for (int j = 1; j <= 4; j++)
        t += T(1) + k * (100 + j);
    cr_assert_float_eq((rec[0].t_last - 1.0) * 1e3, t + PATH_MS, EPS);
    double tpot = (t + PATH_MS - t_first) / 4;
    cr_assert_float_eq((rec[0].t_last - rec[0].t_first) * 1e3 / 4, tpot, EPS);
    cr_assert_eq(rec[0].n_itl, 4);
    cr_assert_float_eq(rec[0].itl_ms[0], T(1) + k * 101, 1e-4);
    rp_records_free(rec, 1);
}

Test(plan_sim, one_request_disaggregated_layer_handoff)
{
    mp_costs c = costs(0);
    wl_request r = {.t_s = 0, .n_in = 200, .n_out = 3};
    rp_record *rec = run(&c, "P=1x1,D=1x1", &r, 1, 512);
    cr_assert(rec[0].ok);
    double prefill_end = DISP_MS + T(200);
    cr_assert_float_eq(rec[0].t_first * 1e3, prefill_end + PATH_MS, EPS);
    /* Layer by layer, as worker/kv_push.c does it: the worker sends KvReserve when it takes the
     * start in and steps the prefill in the same loop turn; the decode side's accept (2 message
     * latencies later) arrives during that one-step prefill and is taken in after it, so no layer
     * left during the step: all 4 layers' KV (200 x 1000 bytes at 1 GB/s) move after it, plus one
     * message latency; then one decode step per token. */
    double handoff = 0.5 + 200.0 * 1000 / 1e9 * 1e3;
    cr_assert_float_eq(rec[0].t_second * 1e3, prefill_end + handoff + T(1) + PATH_MS, EPS);
    cr_assert_float_eq(rec[0].t_last * 1e3, prefill_end + handoff + 2 * T(1) + PATH_MS, EPS);
    rp_records_free(rec, 1);
}

/* A prompt over the budget prefills in two chunks: the accept is taken in after the first chunk's
 * step, so the second (final) chunk's step pushes each layer as it is computed and only the last
 * of the 4 layers (600 x 1000 / 4 bytes) is left after it. */
Test(plan_sim, chunked_prefill_pushes_layers_during_its_final_chunk)
{
    mp_costs c = costs(0);
    wl_request r = {.t_s = 0, .n_in = 600, .n_out = 2};
    rp_record *rec = run(&c, "P=1x1,D=1x1", &r, 1, 512);
    cr_assert(rec[0].ok);
    double prefill_end = DISP_MS + T(512) + T(88);
    cr_assert_float_eq(rec[0].t_first * 1e3, prefill_end + PATH_MS, EPS);
    double handoff = 0.5 + 600.0 * 1000 / 4 / 1e9 * 1e3;
    cr_assert_float_eq(rec[0].t_second * 1e3, prefill_end + handoff + T(1) + PATH_MS, EPS);
    rp_records_free(rec, 1);
}

/* The decode side takes a KvReserve in only between its steps. Request 0 (16 tokens, 200 out)
 * decodes on D in steps of T(1) = 2.5 ms from d0 on; request 1 (1 token, 2 out) is timed so that
 * its reserve reaches D 0.1 ms into one of those steps: D answers 2.4 ms later, at the step's
 * end, and the accept reaches the prefill side after request 1's 2.5 ms prefill has ended, so its
 * KV moves from then on (one latency + 1 KB); its first decode step on D is the one after the
 * step in flight at that time, in a batch of 2. */
Test(plan_sim, decode_side_answers_the_reserve_after_its_step)
{
    mp_costs c = costs(0);
    /* Request 0: prefill [DISP, DISP + T(16)], then its accept (taken in after the prefill) and
     * 16 KB: decode steps from d0. */
    double d0 = DISP_MS + T(16) + 0.5 + 16.0 * 1000 / 1e9 * 1e3;
    double reserve_at = d0 + 40 * T(1) + 0.1, start1 = reserve_at - 0.5;
    wl_request r[2] = {{.t_s = 0, .n_in = 16, .n_out = 200}, {.t_s = (start1 - DISP_MS) * 1e-3, .n_in = 1, .n_out = 2}};
    rp_record *rec = run(&c, "P=1x1,D=1x1", r, 2, 512);
    cr_assert(rec[0].ok && rec[1].ok);
    double answer = d0 + 41 * T(1), accept_in = answer + 0.5;
    cr_assert_gt(accept_in, start1 + T(1)); /* after the prefill */
    double handoff_end = accept_in + 0.5 + 1.0 * 1000 / 1e9 * 1e3;
    double next = d0 + ceil((handoff_end - d0) / T(1)) * T(1);
    cr_assert_float_eq(rec[1].t_first * 1e3, start1 + T(1) + PATH_MS, 1e-6);
    cr_assert_float_eq(rec[1].t_second * 1e3, next + T(2) + PATH_MS, 1e-6);
    rp_records_free(rec, 2);
}

/* With a probed availability curve a step costs its CPU time times the ratio of the bin nearest
 * its length (log scale): here a 26 ms prefill takes the 64 ms bin's 1.5, a 1.25 ms decode step
 * the 1 ms bin's 3. The curve comes through the file format moe-plan probe writes. */
Test(plan_sim, availability_stretches_cpu_times_by_the_nearest_bin)
{
    mp_costs c = costs(0);
    cr_assert_neq(mp_avail_load("/nonexistent", &c), MOE_OK); /* no CPU times: refused */
    for (int i = 0; i < c.n_pts; i++)
        c.ms_cpu[i] = c.ms[i] / 2;
    c.attn_cpu_ms = 0;
    c.has_cpu = true;
    char path[] = "/tmp/test_plan_avail_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs("{\"type\": \"availability\", \"bins\": [{\"cpu_ms\": 1, \"ratios\": [3, 3, 3]}, {\"cpu_ms\": 2, \"ratios\": []},\n"
          " {\"cpu_ms\": 8, \"ratios\": [0.98]}, {\"cpu_ms\": 64, \"ratios\": [1.5, 1.5]}]}\n", f);
    fclose(f);
    cr_assert_eq(mp_avail_load(path, &c), MOE_OK, "%s", moe_error_message());
    unlink(path);
    cr_assert_eq(c.n_av, 3); /* the empty bin is dropped */
    cr_assert_float_eq(mp_avail_ratio(&c, 8, -1), 1, EPS); /* 0.98 (clock rounding) reads as 1 */
    wl_request r = {.t_s = 0, .n_in = 100, .n_out = 3};
    rp_record *rec = run(&c, "M=1x1", &r, 1, 512);
    cr_assert(rec[0].ok);
    double prefill = T(100) / 2 * 1.5, decode = T(1) / 2 * 3;
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + prefill + PATH_MS, EPS);
    cr_assert_float_eq(rec[0].t_last * 1e3, DISP_MS + prefill + 2 * decode + PATH_MS, EPS);
    rp_records_free(rec, 1);
}

/* --availability-timed: the ratio of the burst measured nearest the step's time. */
Test(plan_sim, timed_availability_takes_the_nearest_burst_in_time)
{
    mp_costs c = costs(0);
    c.has_cpu = true;
    char path[] = "/tmp/test_plan_avail_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs("{\"bins\": [{\"cpu_ms\": 1, \"ratios\": [2, 4, 8], \"t_s\": [0, 10, 20]}]}\n", f);
    fclose(f);
    cr_assert_eq(mp_avail_load(path, &c), MOE_OK, "%s", moe_error_message());
    unlink(path);
    cr_assert(c.av_has_t);
    cr_assert_float_eq(mp_avail_ratio_at(&c, 1, 4.9, 1), 4, EPS); /* untimed: the draw-th sample */
    c.av_timed = true;
    cr_assert_float_eq(mp_avail_ratio_at(&c, 1, 4.9, 1), 2, EPS);
    cr_assert_float_eq(mp_avail_ratio_at(&c, 1, 5.1, 0), 4, EPS);
    cr_assert_float_eq(mp_avail_ratio_at(&c, 1, 99, 0), 8, EPS);
    cr_assert_float_eq(mp_avail_ratio_at(&c, 1, -1, 0), 2, EPS);
}

Test(plan_sim, whole_block_handoff_moves_all_layers)
{
    mp_costs c = costs(0);
    mp_layout l;
    mp_layout_parse("P=1x1,D=1x1", &l);
    wl_request r = {.t_s = 0, .n_in = 200, .n_out = 2};
    wl_workload w = {.req = &r, .n = 1};
    mp_sim_opts o = {.max_requests = 1024, .kv_block_mode = true};
    rp_record rec[1];
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    double handoff = 0.5 + 200.0 * 1000 / 1e9 * 1e3;
    cr_assert_float_eq(rec[0].t_second * 1e3, DISP_MS + T(200) + handoff + T(1) + PATH_MS, EPS);
    free(rec[0].itl_ms);
}

/* Two prompts arriving together on one instance with a 512-token budget: the first fills 400,
 * the second gets a 112-token chunk, then its remaining 288 share the next step with the first's
 * decode (running sequences are scheduled first). */
Test(plan_sim, two_requests_chunked_prefill_exact_waiting)
{
    mp_costs c = costs(0);
    wl_request r[2] = {{.t_s = 0, .n_in = 400, .n_out = 3}, {.t_s = 0, .n_in = 400, .n_out = 2}};
    rp_record *rec = run(&c, "M=1x1", r, 2, 512);
    cr_assert(rec[0].ok && rec[1].ok);
    double s1 = DISP_MS + T(512), s2 = s1 + T(1 + 288), s3 = s2 + T(2);
    cr_assert_float_eq(rec[0].t_first * 1e3, s1 + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_first * 1e3, s2 + PATH_MS, EPS);
    cr_assert_float_eq(rec[0].t_second * 1e3, s2 + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_last * 1e3, s3 + PATH_MS, EPS);
    cr_assert_float_eq(rec[0].t_last * 1e3, s3 + PATH_MS, EPS);
    rp_records_free(rec, 2);
}

/* The coordinator places the second prompt on the instance with fewer pending prompt tokens; the
 * third, with both instances at 500 pending, goes to the first (ties keep the lower index) and is
 * dispatched at once (the gate admits 4 batches pending). Instance 0 then steps 500 + a 12-token
 * chunk of the third, and the third's remaining 488 next; instance 1 steps its 500 alone. */
Test(plan_sim, placement_least_pending_tokens)
{
    mp_costs c = costs(0);
    wl_request r[3] = {{.t_s = 0, .n_in = 500, .n_out = 1},
                       {.t_s = 0, .n_in = 500, .n_out = 1},
                       {.t_s = 0, .n_in = 500, .n_out = 1}};
    rp_record *rec = run(&c, "M=2x1", r, 3, 512);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + T(512) + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_first * 1e3, DISP_MS + T(500) + PATH_MS, EPS);
    cr_assert_float_eq(rec[2].t_first * 1e3, DISP_MS + T(512) + T(488) + PATH_MS, EPS);
    rp_records_free(rec, 3);
}

/* --cores: a step that starts while more ranks step than there are cores is slowed in proportion
 * (fixed at its start): two instances on one core, the second to start takes twice as long. */
Test(plan_sim, shared_cores_slow_concurrent_steps)
{
    mp_costs c = costs(0);
    mp_layout l;
    mp_layout_parse("M=2x1", &l);
    wl_request r[2] = {{.t_s = 0, .n_in = 100, .n_out = 1}, {.t_s = 0, .n_in = 100, .n_out = 1}};
    wl_workload w = {.req = r, .n = 2};
    mp_sim_opts o = {.max_requests = 1024, .cores = 1};
    rp_record rec[2];
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + T(100) + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_first * 1e3, DISP_MS + 2 * T(100) + PATH_MS, EPS);
    o.cores = 2;
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    cr_assert_float_eq(rec[1].t_first * 1e3, DISP_MS + T(100) + PATH_MS, EPS);
}

/* The processor-sharing tests' costs: CPU times half the wall model (T(100) / 2 = 26 ms for a
 * 100-token prefill), and a curve of one length: a lone step stretched 1.25x, two of our ranks
 * busy 3x each. */
static mp_costs shared_host_costs(void)
{
    mp_costs c = costs(0);
    for (int i = 0; i < c.n_pts; i++)
        c.ms_cpu[i] = c.ms[i] / 2;
    c.attn_cpu_ms = 0;
    c.has_cpu = true;
    c.cpu_steps = true;
    c.n_share = 2;
    c.n_share_lens = 1;
    c.share_cpu[0] = 5;
    c.share[0][0] = 1.25;
    c.share[0][1] = 3;
    return c;
}

/* --host-ranks: ranks on one host share its cores as processor sharing by the profile's measured
 * curve. CPU times are half the wall model, T(100) / 2 = 26 ms for a 100-token prefill; the curve:
 * a lone step stretched 1.25x, two of our ranks busy 3x each. Request 0 starts its step at d
 * (dispatch), request 1 (placed on the other rank: fewer pending tokens) at 10 + d ms. Step 0 runs
 * alone for 10 ms (8 ms of CPU at 1 / 1.25), then both at 1 / 3: its remaining 18 ms of CPU take
 * 54 ms, so it ends at 64 + d; step 1 has had 18 ms of CPU by then, and its last 8 ms take 10 ms
 * alone: it ends at 74 + d. On separate hosts (one rank per host) both run alone: 32.5 ms. */
Test(plan_sim, host_sharing_is_processor_sharing_by_the_measured_curve)
{
    mp_costs c = shared_host_costs();
    mp_layout l;
    mp_layout_parse("M=2x1", &l);
    wl_request r[2] = {{.t_s = 0, .n_in = 100, .n_out = 1}, {.t_s = 0.010, .n_in = 100, .n_out = 1}};
    wl_workload w = {.req = r, .n = 2};
    mp_sim_opts o = {.max_requests = 1024, .host_ranks = 2};
    rp_record rec[2];
    memset(rec, 0, sizeof rec);
    mp_sim_stats st;
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, &st), MOE_OK, "%s", moe_error_message());
    cr_assert(rec[0].ok && rec[1].ok);
    cr_assert_float_eq(T(100) / 2, 26, EPS);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + 64 + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_first * 1e3, DISP_MS + 74 + PATH_MS, EPS);
    cr_assert_float_eq(st.busy_s[MP_POOL_MIXED] * 1e3, 64 + (74 - 10), EPS);
    o.host_ranks = 1;
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + 32.5 + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_first * 1e3, 10 + DISP_MS + 32.5 + PATH_MS, EPS);
    /* The curve: beyond its last point, processor sharing of it (3 busy: 3 x 3 / 2); between two
     * lengths, linear in log CPU ms; without a curve, n / cores. */
    cr_assert_float_eq(mp_share_ratio(&c, 3, 26, 0), 4.5, EPS);
    c.n_share_lens = 2;
    c.share_cpu[1] = 80;
    c.share[1][0] = 2.25;
    c.share[1][1] = 5;
    cr_assert_float_eq(mp_share_ratio(&c, 1, 20, 0), 1.75, EPS); /* log 20 is halfway from log 5 to log 80 */
    cr_assert_float_eq(mp_share_ratio(&c, 2, 1000, 0), 5, EPS);
    c.n_share = 0;
    cr_assert_float_eq(mp_share_ratio(&c, 3, 26, 2), 1.5, EPS);
    cr_assert_float_eq(mp_share_ratio(&c, 1, 26, 2), 1, EPS);
}

/* The coordinator and the client as a mean-field sharer of the first host (--client-cpu-ms-per-
 * token): one worker rank on a host of 2, a lone step stretched 1.25x, two busy 3x. Two one-token
 * requests of 100 prompt tokens arrive 10 ms apart: 2 tokens x 2.5 CPU ms over a 10 ms arrival
 * span keep the client busy half the time (u = 0.5), so request 0's step (26 ms of CPU) runs at
 * 1 / (1.25 + 0.5 x (3 - 1.25)) = 1 / 2.125: 55.25 ms, against 32.5 ms without the client. The
 * second rank's host (host_ranks 1: each rank its own host, the second not the client's) is
 * unaffected. */
Test(plan_sim, client_cpu_is_a_mean_field_sharer_of_the_first_host)
{
    mp_costs c = shared_host_costs();
    mp_layout l;
    mp_layout_parse("M=1x1", &l);
    wl_request r[2] = {{.t_s = 0, .n_in = 100, .n_out = 1}, {.t_s = 0.010, .n_in = 100, .n_out = 1}};
    wl_workload w = {.req = r, .n = 2};
    mp_sim_opts o = {.max_requests = 1024, .host_ranks = 2, .client_cpu_ms_per_token = 2.5};
    rp_record rec[2];
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK, "%s", moe_error_message());
    cr_assert(rec[0].ok && rec[1].ok);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + 55.25 + PATH_MS, EPS);
    o.client_cpu_ms_per_token = 0;
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + 32.5 + PATH_MS, EPS);
    /* More client work than a core: at most one sharer (u = 1: 3x, 78 ms). */
    o.client_cpu_ms_per_token = 50;
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + 78 + PATH_MS, EPS);
    /* Two ranks on hosts of one: request 1 goes to the second rank, on host 1, away from the
     * client: alone, 32.5 ms after its dispatch at 10 ms; request 0 on host 0 still shares. */
    mp_layout_parse("M=2x1", &l);
    o.host_ranks = 1;
    o.client_cpu_ms_per_token = 2.5;
    memset(rec, 0, sizeof rec);
    cr_assert_eq(mp_simulate(&c, &l, &o, &w, rec, NULL), MOE_OK);
    cr_assert_float_eq(rec[0].t_first * 1e3, DISP_MS + 55.25 + PATH_MS, EPS);
    cr_assert_float_eq(rec[1].t_first * 1e3, 10 + DISP_MS + 32.5 + PATH_MS, EPS);
}

/* The sharing curve survives the profile file. */
Test(plan_sim, share_curve_round_trips_through_the_profile_file)
{
    mp_costs c = costs(0), d;
    c.n_share = 3;
    c.n_share_lens = 2;
    c.share_cpu[0] = 4;
    c.share_cpu[1] = 90;
    double v[2][3] = {{1.1, 2.5, 4}, {1.5, 3.5, 6.25}};
    memcpy(c.share[0], v[0], sizeof v[0]);
    memcpy(c.share[1], v[1], sizeof v[1]);
    char path[] = "/tmp/test_plan_share_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    cr_assert_eq(mp_costs_save(path, &c), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(mp_costs_load(path, &d), MOE_OK, "%s", moe_error_message());
    unlink(path);
    cr_assert_eq(d.n_share, 3);
    cr_assert_eq(d.n_share_lens, 2);
    for (int l = 0; l < 2; l++) {
        cr_assert_float_eq(d.share_cpu[l], c.share_cpu[l], EPS);
        for (int n = 0; n < 3; n++)
            cr_assert_float_eq(d.share[l][n], v[l][n], EPS);
    }
}

Test(plan_sim, kv_cache_too_small_is_an_error_per_request)
{
    mp_costs c = costs(0);
    c.kv_blocks = 4; /* 64 tokens */
    wl_request r[2] = {{.t_s = 0, .n_in = 100, .n_out = 2}, {.t_s = 0, .n_in = 10, .n_out = 2}};
    rp_record *rec = run(&c, "M=1x1", r, 2, 512);
    cr_assert(!rec[0].ok);
    cr_assert(strstr(rec[0].error, "KV cache"), "%s", rec[0].error);
    cr_assert(rec[1].ok);
    rp_records_free(rec, 2);
}

Test(plan_sim, layout_parse)
{
    mp_layout l;
    cr_assert_eq(mp_layout_parse("P=1x2,D=3x1", &l), MOE_OK);
    cr_assert_eq(mp_layout_ranks(&l), 5);
    char buf[64];
    mp_layout_format(&l, buf, sizeof buf);
    cr_assert_str_eq(buf, "P=1x2,D=3x1");
    cr_assert_eq(mp_layout_parse("M=2", &l), MOE_OK);
    cr_assert_eq(l.ep[MP_POOL_MIXED], 1);
    cr_assert_neq(mp_layout_parse("P=1x1", &l), MOE_OK);
    cr_assert_neq(mp_layout_parse("M=1x1,D=1x1", &l), MOE_OK);
    cr_assert_neq(mp_layout_parse("Q=1", &l), MOE_OK);
}

/* ---- shared workload and report code ---- */

static char *write_tmp(const char *text)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/test_plan_sim_%d.txt", (int)getpid());
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

Test(plan_workload, mooncake_jsonl_and_csv)
{
    wl_opts o;
    wl_opts_default(&o);
    o.requests = 0;
    o.trace_path = write_tmp("{\"timestamp\": 1000, \"input_length\": 600, \"output_length\": 10, \"hash_ids\": [7, 8]}\n"
                             "{\"timestamp\": 0, \"input_length\": 520, \"output_length\": 3, \"hash_ids\": [7, 9]}\n");
    wl_workload w;
    cr_assert_eq(wl_build(&o, &w), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(w.n, 2);
    cr_assert_float_eq(w.req[1].t_s, 1.0, EPS); /* sorted by time, from 0 */
    cr_assert_eq(w.req[0].n_in, 520);
    /* Shared hash id 7: the first 512 prompt ids agree, the rest do not. */
    uint32_t *a = malloc(600 * sizeof *a), *b = malloc(600 * sizeof *b);
    wl_prompt(&w, &o, 0, 1000, a);
    wl_prompt(&w, &o, 1, 1000, b);
    cr_assert_eq(memcmp(a, b, 512 * sizeof *a), 0);
    cr_assert_neq(memcmp(a + 512, b + 512, 8 * sizeof *a), 0);
    free(a);
    free(b);
    wl_free(&w);
    o.trace_path = write_tmp("timestamp,input_tokens,output_tokens\n0,10,2\n500,20,4\n");
    o.len_scale = 0.5;
    cr_assert_eq(wl_build(&o, &w), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(w.n, 2);
    cr_assert_eq(w.req[1].n_in, 10);
    cr_assert_eq(w.req[1].n_out, 2);
    wl_set_rate(&w, 4); /* one gap: 0.25 s */
    cr_assert_float_eq(w.req[1].t_s, 0.25, EPS);
    wl_free(&w);
    o.trace_path = write_tmp("0,10,2\n5,x,4\n");
    cr_assert_eq(wl_build(&o, &w), MOE_ERR_FORMAT);
    cr_assert(strstr(moe_error_message(), ":2:"), "%s", moe_error_message());
    unlink(o.trace_path);
}

/* Gamma inter-arrival times: sample mean 1/rate and coefficient of variation cv (20000 draws:
 * standard error of the mean ~cv/141, of the CV a few percent). */
Test(plan_workload, gamma_arrivals_rate_and_cv)
{
    double cvs[] = {0.5, 1.0, 2.0};
    for (int k = 0; k < 3; k++) {
        wl_opts o;
        wl_opts_default(&o);
        o.requests = 20001;
        o.rate = 4;
        o.cv = cvs[k];
        wl_workload w;
        cr_assert_eq(wl_build(&o, &w), MOE_OK);
        double m = 0, v = 0;
        for (int i = 1; i < w.n; i++)
            m += w.req[i].t_s - w.req[i - 1].t_s;
        m /= w.n - 1;
        for (int i = 1; i < w.n; i++) {
            double d = w.req[i].t_s - w.req[i - 1].t_s - m;
            v += d * d;
        }
        double cv = sqrt(v / (w.n - 2)) / m;
        cr_assert(fabs(m - 0.25) < 0.25 * 0.05, "cv %g: mean gap %g", cvs[k], m);
        cr_assert(fabs(cv - cvs[k]) < 0.08 * cvs[k], "cv %g: measured %g", cvs[k], cv);
        wl_free(&w);
    }
}

Test(plan_report, attainment_goodput_and_sweep)
{
    rp_record r[4] = {
        {.t_arrival = 0, .t_first = 0.1, .t_last = 0.5, .n_tokens = 5, .ok = true},  /* TTFT 100, TPOT 100 */
        {.t_arrival = 1, .t_first = 1.3, .t_last = 1.4, .n_tokens = 2, .ok = true},  /* TTFT 300, TPOT 100 */
        {.t_arrival = 2, .t_first = 2.05, .t_last = 4.05, .n_tokens = 3, .ok = true}, /* 50, 1000 */
        {.t_arrival = 3, .ok = false},
    };
    rp_slo slo = {.slo_ttft_ms = 200, .slo_tpot_ms = 150};
    rp_summary s;
    rp_summarize(r, 4, &slo, 1.0, &s);
    cr_assert_eq(s.ok, 3);
    cr_assert_eq(s.failed, 1);
    cr_assert_float_eq(s.attain_ttft, 0.5, EPS);
    cr_assert_float_eq(s.attain_tpot, 0.5, EPS);
    cr_assert_float_eq(s.attainment, 0.25, EPS);
    cr_assert_float_eq(s.wall_s, 4.05, EPS);
    cr_assert_float_eq(s.goodput_rps, 1 / 4.05, EPS);
    cr_assert_float_eq(s.ttft.p50, 100, 1e-6);
    double rates[] = {1, 2, 4}, att[] = {1.0, 0.95, 0.5};
    /* 0.95 at 2, 0.5 at 4: 0.9 is crossed at 2 + 0.05 / 0.45 x 2. */
    cr_assert_float_eq(rp_sweep_goodput(rates, att, 3, 0.9), 2 + 0.05 / 0.45 * 2, 1e-9);
    cr_assert_float_eq(rp_sweep_goodput(rates, att, 2, 0.9), 2, EPS);
    double low[] = {0.5};
    cr_assert_float_eq(rp_sweep_goodput(rates, low, 1, 0.9), 0, EPS);
}

/* ---- the simulator against the real engine: replay of measured step durations ----
 * The real engine (tiny model) serves a bursty workload in virtual time: requests join at the
 * first step boundary after they arrive, the clock advances by each step's measured duration.
 * The simulator, given the same durations step by step (its step_ms_fn), must schedule the same
 * steps (token counts) and deliver every token at the same time: batching, chunking under the
 * budget, the sequence limit and preemption by recompute (a small KV cache) are then the engine's
 * own, whatever the machine's load does to the durations. */

#define RP_MAX_STEPS 8192

typedef struct {
    int n_tok[RP_MAX_STEPS];
    double ms[RP_MAX_STEPS];
    int n, next, mismatches;
} replay;

static double replay_step(void *ctx, int group, int n_tokens, double attn)
{
    (void)group;
    (void)attn;
    replay *r = ctx;
    if (r->next >= r->n)
        return r->mismatches++, 1.0;
    if (r->n_tok[r->next] != n_tokens)
        r->mismatches++;
    return r->ms[r->next++];
}

Test(plan_sim, replay_of_the_real_engine_is_exact, .timeout = 120)
{
    moe_model *m;
    cr_assert_eq(moe_model_load(MOE_BINARY_DIR "/models/tiny", NULL, &m), MOE_OK, "%s", moe_error_message());
    const int mbt = 32, max_seqs = 6, kv_blocks = 24, bs = 16;
    moe_engine_opts eo = {.n_threads = 1, .max_batch_tokens = mbt, .max_seqs = max_seqs,
                          .n_kv_blocks = kv_blocks, .block_size = bs};
    moe_engine *e;
    cr_assert_eq(moe_engine_create(m, &eo, &e), MOE_OK, "%s", moe_error_message());
    wl_opts o;
    wl_opts_default(&o);
    o.requests = 60;
    o.rate = 2000; /* per virtual second: tiny-model steps take ~0.1-1 ms */
    o.cv = 2;
    wl_parse_dist("4-100", &o.in_len);
    wl_parse_dist("1-24", &o.out_len);
    o.seed = 3;
    wl_workload w;
    cr_assert_eq(wl_build(&o, &w), MOE_OK);
    rp_record *real = calloc((size_t)w.n, sizeof *real);
    replay *rp = calloc(1, sizeof *rp);
    moe_token_event ev[64];
    uint32_t ids[128];
    int32_t prompt[128];
    double vt = 0;
    int next = 0, done = 0;
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    while (done < w.n) {
        while (next < w.n && w.req[next].t_s <= vt) {
            wl_prompt(&w, &o, next, m->cfg.vocab_size, ids);
            for (int k = 0; k < w.req[next].n_in; k++)
                prompt[k] = (int32_t)ids[k];
            cr_assert_eq(moe_engine_add(e, (uint64_t)next, prompt, w.req[next].n_in, &sp, w.req[next].n_out, true),
                         MOE_OK, "%s", moe_error_message());
            next++;
        }
        if (!moe_engine_has_work(e)) {
            cr_assert_lt(next, w.n);
            vt = w.req[next].t_s;
            continue;
        }
        moe_engine_stats a, b;
        moe_engine_get_stats(e, &a);
        int64_t t0 = moe_now_ns();
        int n_ev = moe_engine_step(e, ev, 64);
        double ms = (double)(moe_now_ns() - t0) * 1e-6;
        cr_assert_geq(n_ev, 0);
        moe_engine_get_stats(e, &b);
        cr_assert_lt(rp->n, RP_MAX_STEPS);
        rp->n_tok[rp->n] = (int)(b.prefill_tokens + b.decode_tokens - a.prefill_tokens - a.decode_tokens);
        rp->ms[rp->n++] = ms;
        vt += ms * 1e-3;
        for (int k = 0; k < n_ev; k++) {
            rp_record *r = &real[ev[k].seq_id];
            if (r->n_tokens == 0)
                r->t_first = vt;
            r->t_last = vt;
            r->n_tokens++;
            if (ev[k].finish != MOE_FINISH_NONE)
                done++;
        }
    }
    moe_engine_stats fin;
    moe_engine_get_stats(e, &fin);
    moe_engine_free(e);
    moe_model_free(m);

    mp_costs c = costs(0);
    c.dispatch_ms = c.token_path_ms = 0;
    c.kv_blocks = kv_blocks;
    c.block_size = bs;
    mp_layout l;
    mp_layout_parse("M=1x1", &l);
    mp_sim_opts so = {.max_requests = 1024, .max_batch_tokens = mbt, .max_seqs = max_seqs,
                      .gate_batches = 1 << 20, /* the engine alone: no coordinator queue */
                      .step_ms_fn = replay_step, .step_ctx = rp};
    rp_record *sim = calloc((size_t)w.n, sizeof *sim);
    mp_sim_stats st;
    cr_assert_eq(mp_simulate(&c, &l, &so, &w, sim, &st), MOE_OK, "%s", moe_error_message());
    cr_assert_eq(rp->mismatches, 0, "%d of %d steps differ in token count", rp->mismatches, rp->n);
    cr_assert_eq(rp->next, rp->n, "simulated %d steps, the engine ran %d", rp->next, rp->n);
    cr_assert_eq(st.preemptions, fin.preemptions, "preemptions: simulated %ld, engine %lld", st.preemptions,
                 (long long)fin.preemptions);
    cr_assert_gt(fin.preemptions, 0, "the workload should exercise preemption");
    for (int i = 0; i < w.n; i++) {
        cr_assert(sim[i].ok, "request %d: %s", i, sim[i].error);
        cr_assert_eq(sim[i].n_tokens, real[i].n_tokens, "request %d", i);
        cr_assert_float_eq(sim[i].t_first, real[i].t_first, 1e-9, "request %d: TTFT", i);
        cr_assert_float_eq(sim[i].t_last, real[i].t_last, 1e-9, "request %d: last token", i);
    }
    rp_records_free(sim, w.n);
    free(real);
    free(rp);
    wl_free(&w);
}
