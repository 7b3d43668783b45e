/* The front ends' request accounting (coordinator/fe_stats.c: one outcome per request, the
 * identity, histograms), the Prometheus text it renders (coordinator/metrics.c) and API keys
 * (coordinator/auth.c: file format, Bearer parsing, per-key limits). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "coordinator/auth.h"
#include "coordinator/fe_stats.h"
#include "coordinator/metrics.h"

static void identity(const moe_fe_stats_snapshot *v)
{
    uint64_t sum = v->in_flight;
    for (int o = MOE_OUTCOME_FINISHED; o < MOE_OUTCOME_COUNT; o++)
        sum += v->outcome[o];
    cr_assert_eq(v->received, sum);
}

Test(fe_stats, first_outcome_wins_and_identity_holds)
{
    moe_fe_stats *s;
    cr_assert_eq(moe_fe_stats_create(&s), MOE_OK);
    moe_fe_track t[4];
    memset(t, 0, sizeof(t));
    for (int i = 0; i < 4; i++)
        moe_fe_stats_received(s, &t[i], moe_now_ns());
    moe_fe_stats_received(s, &t[0], moe_now_ns()); /* twice: counted once */
    moe_fe_stats_admitted(s, &t[0], 5);
    moe_fe_stats_tokens(s, &t[0], 1, moe_now_ns());
    moe_fe_stats_tokens(s, &t[0], 3, moe_now_ns());
    cr_assert(moe_fe_stats_end(s, &t[0], MOE_OUTCOME_FINISHED, MOE_FINISH_EOS));
    /* the close after the finish (the old double count) changes nothing */
    cr_assert(!moe_fe_stats_end(s, &t[0], MOE_OUTCOME_CANCELLED, 0));
    cr_assert(moe_fe_stats_end(s, &t[1], MOE_OUTCOME_CANCELLED, 0));
    cr_assert(!moe_fe_stats_end(s, &t[1], MOE_OUTCOME_REJECTED_BUSY, 0));
    cr_assert(moe_fe_stats_end(s, &t[2], MOE_OUTCOME_REJECTED_INVALID, 0));
    moe_fe_track never;
    memset(&never, 0, sizeof(never));
    cr_assert(!moe_fe_stats_end(s, &never, MOE_OUTCOME_FAILED, 0)); /* not received: ignored */
    moe_fe_stats_snapshot v;
    moe_fe_stats_get(s, &v);
    identity(&v);
    cr_assert_eq(v.received, 4);
    cr_assert_eq(v.in_flight, 1);
    cr_assert_eq(v.outcome[MOE_OUTCOME_FINISHED], 1);
    cr_assert_eq(v.outcome[MOE_OUTCOME_CANCELLED], 1);
    cr_assert_eq(v.finished_by_reason[MOE_FINISH_EOS], 1);
    cr_assert_eq(v.generated_tokens, 4);
    cr_assert_eq(v.hist[MOE_HIST_TTFT].count, 1);
    cr_assert_eq(v.hist[MOE_HIST_ITL].count, 3);
    cr_assert_eq(v.hist[MOE_HIST_GENERATION].count, 1);
    cr_assert_float_eq(v.hist[MOE_HIST_GENERATION].sum, 4.0, 1e-9);
    cr_assert_eq(v.active_streams, 1);
    moe_fe_stats_stream_closed(s, &t[0]);
    moe_fe_stats_stream_closed(s, &t[0]);
    moe_fe_stats_get(s, &v);
    cr_assert_eq(v.active_streams, 0);
    moe_fe_stats_free(s);
}

Test(metrics, histogram_buckets_are_cumulative_and_labels_escaped)
{
    moe_fe_stats *s;
    cr_assert_eq(moe_fe_stats_create(&s), MOE_OK);
    moe_fe_track t;
    memset(&t, 0, sizeof(t));
    moe_fe_stats_received(s, &t, moe_now_ns());
    moe_fe_stats_admitted(s, &t, 3);
    moe_fe_stats_end(s, &t, MOE_OUTCOME_FINISHED, MOE_FINISH_LENGTH);
    moe_fe_stats_snapshot v;
    moe_fe_stats_get(s, &v);
    char *text = NULL;
    size_t len = 0;
    cr_assert_eq(moe_metrics_render(&v, NULL, "a\"b\\c", true, &text, &len), MOE_OK);
    cr_assert_eq(strlen(text), len);
    cr_assert(strstr(text, "moeserve_requests_received_total{model_name=\"a\\\"b\\\\c\"} 1\n"), "%s", text);
    cr_assert(strstr(text, "# TYPE moeserve_requests_total counter\n"));
    /* 3 prompt tokens: in le=5 and every bucket above, not in le=2 */
    cr_assert(strstr(text, "moeserve_request_prompt_tokens_bucket{model_name=\"a\\\"b\\\\c\",le=\"2\"} 0\n"));
    cr_assert(strstr(text, "moeserve_request_prompt_tokens_bucket{model_name=\"a\\\"b\\\\c\",le=\"5\"} 1\n"));
    cr_assert(strstr(text, "moeserve_request_prompt_tokens_bucket{model_name=\"a\\\"b\\\\c\",le=\"+Inf\"} 1\n"));
    free(text);
    moe_fe_stats_free(s);
}

static char *write_keys(const char *content)
{
    static char path[64];
    snprintf(path, sizeof(path), "/tmp/moe-keys-XXXXXX");
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, content, strlen(content)), (ssize_t)strlen(content));
    close(fd);
    return path;
}

Test(auth, keys_roles_and_limits)
{
    char *p = write_keys("# comment\n\nalice 0123456789abcdef max-requests=2 max-tokens=100\n"
                         "ops   fedcba9876543210XY admin priority  # trailing comment\n");
    moe_auth *a;
    cr_assert_eq(moe_auth_load(p, &a), MOE_OK, "%s", moe_error_message());
    unlink(p);
    cr_assert_eq(moe_auth_count(a), 2);
    int k;
    const char *h = "Bearer 0123456789abcdef";
    cr_assert_eq(moe_auth_check(a, h, strlen(h), &k), MOE_AUTH_USER);
    cr_assert_str_eq(moe_auth_name(a, k), "alice");
    h = "bearer   fedcba9876543210XY";
    cr_assert_eq(moe_auth_check(a, h, strlen(h), &k), MOE_AUTH_ADMIN);
    const char *bad[] = {"Bearer 0123456789abcde", "Bearer 0123456789abcdeF", "0123456789abcdef",
                         "Basic 0123456789abcdef", "Bearer ", ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(moe_auth_check(a, bad[i], strlen(bad[i]), &k), MOE_AUTH_NONE, "%s", bad[i]);
    cr_assert_eq(moe_auth_check(a, NULL, 0, &k), MOE_AUTH_NONE);
    cr_assert_eq(k, -1);
    /* a value not NUL-terminated: only len bytes count */
    char buf[40];
    memcpy(buf, "Bearer 0123456789abcdefZZZ", 26);
    cr_assert_eq(moe_auth_check(a, buf, 23, &k), MOE_AUTH_USER);
    cr_assert_eq(moe_auth_check(a, buf, 26, &k), MOE_AUTH_NONE);

    int alice = 0, ops = 1;
    cr_assert_eq(moe_auth_acquire(a, alice, 40, 0), MOE_OK);
    cr_assert_eq(moe_auth_acquire(a, alice, 40, 0), MOE_OK);
    cr_assert_eq(moe_auth_acquire(a, alice, 1, 0), MOE_ERR_FULL); /* 3rd request */
    cr_assert(strstr(moe_error_message(), "max-requests"));
    moe_auth_release(a, alice, 40);
    cr_assert_eq(moe_auth_acquire(a, alice, 61, 0), MOE_ERR_FULL); /* 40 + 61 > 100 */
    cr_assert(strstr(moe_error_message(), "max-tokens"));
    cr_assert_eq(moe_auth_acquire(a, alice, 60, 0), MOE_OK);
    cr_assert_eq(moe_auth_acquire(a, alice, 1, -1), MOE_ERR_PERMISSION);
    cr_assert_eq(moe_auth_acquire(a, ops, 1000, -1), MOE_OK);
    cr_assert_eq(moe_auth_acquire(NULL, -1, 1, -5), MOE_OK); /* open server: no policing */
    moe_auth_free(a);
}

Test(auth, bad_files_name_the_line)
{
    const char *cases[][2] = {
        {"alice short\n", ":1: key of alice is 5 bytes"},
        {"alice 0123456789abcdef\nbob 0123456789abcdef\n", ":2: bob: duplicate"},
        {"alice 0123456789abcdef root\n", ":1: unknown option `root`"},
        {"alice 0123456789abcdef max-requests=x\n", "expected a number"},
        {"# nothing\n", "no key in it"},
        {"lonely\n", ":1: expected `NAME KEY"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *p = write_keys(cases[i][0]);
        moe_auth *a = NULL;
        cr_assert_neq(moe_auth_load(p, &a), MOE_OK, "%s", cases[i][0]);
        cr_assert(strstr(moe_error_message(), cases[i][1]), "%s: %s", cases[i][0], moe_error_message());
        cr_assert_null(a);
        unlink(p);
    }
    moe_auth *a = NULL;
    cr_assert_eq(moe_auth_load("/nonexistent/keys", &a), MOE_ERR_IO);
}
