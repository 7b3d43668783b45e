/* The front ends' request accounting: outcome counters that add up and the request histograms
 * (coordinator/fe_stats.h). One mutex guards everything: a snapshot is one consistent moment,
 * which is what makes the outcome identity checkable from outside. The lock is taken a few
 * times per request and once per push (not per token), far below the cost of the push itself. */
#include "coordinator/fe_stats.h"

#include "common/clock.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* Bucket bounds: vLLM's where the metric is vLLM's (so dashboards keep their buckets), with
 * finer low ends because small models on CPUs answer in milliseconds. */
static const double B_TTFT[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
                                2560.0};
static const double B_ITL[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                               0.3,   0.4,    0.5,   0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0,
                               40.0,  80.0};
static const double B_E2E[] = {0.01, 0.05, 0.1,  0.3,  0.5,  0.8,   1.0,   1.5,   2.0,   2.5,
                               5.0,  10.0, 15.0, 20.0, 30.0, 40.0,  50.0,  60.0,  120.0, 240.0,
                               480.0, 960.0, 1920.0, 7680.0};
static const double B_TOKENS[] = {1,    2,    5,    10,    20,    50,    100,   200,   500,
                                  1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000};

#define NB(a) ((int)(sizeof(a) / sizeof((a)[0])))

struct moe_fe_stats {
    pthread_mutex_t mu;
    moe_fe_stats_snapshot v;
};

moe_status moe_fe_stats_create(moe_fe_stats **out)
{
    moe_fe_stats *s = calloc(1, sizeof(*s));
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "front-end stats: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    const struct {
        const double *b;
        int n;
    } def[MOE_HIST_COUNT] = {
        [MOE_HIST_TTFT] = {B_TTFT, NB(B_TTFT)},       [MOE_HIST_ITL] = {B_ITL, NB(B_ITL)},
        [MOE_HIST_E2E] = {B_E2E, NB(B_E2E)},          [MOE_HIST_QUEUE] = {B_TTFT, NB(B_TTFT)},
        [MOE_HIST_PROMPT] = {B_TOKENS, NB(B_TOKENS)}, [MOE_HIST_GENERATION] = {B_TOKENS, NB(B_TOKENS)},
    };
    for (int k = 0; k < MOE_HIST_COUNT; k++) {
        s->v.hist[k].bounds = def[k].b;
        s->v.hist[k].n_bounds = def[k].n;
    }
    *out = s;
    return MOE_OK;
}

void moe_fe_stats_free(moe_fe_stats *s)
{
    if (!s)
        return;
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static void observe(moe_hist *h, double x, uint64_t times)
{
    int i = 0;
    while (i < h->n_bounds && x > h->bounds[i])
        i++;
    h->counts[i] += times;
    h->count += times;
    h->sum += x * (double)times;
}

moe_fe_track *moe_fe_track_new(void)
{
    moe_fe_track *t = calloc(1, sizeof(*t));
    if (t)
        atomic_init(&t->refs, 1);
    return t;
}

void moe_fe_track_hold(moe_fe_track *t)
{
    if (t)
        atomic_fetch_add(&t->refs, 1);
}

void moe_fe_track_drop(moe_fe_track *t)
{
    if (t && atomic_fetch_sub(&t->refs, 1) == 1)
        free(t);
}

void moe_fe_stats_received(moe_fe_stats *s, moe_fe_track *t, int64_t arrival_ns)
{
    if (!t)
        return;
    pthread_mutex_lock(&s->mu);
    if (!t->counted) {
        t->counted = true;
        t->arrival_ns = arrival_ns;
        s->v.received++;
        s->v.in_flight++;
    }
    pthread_mutex_unlock(&s->mu);
}

void moe_fe_stats_admitted(moe_fe_stats *s, moe_fe_track *t, uint32_t n_prompt)
{
    if (!t)
        return;
    const int64_t now = moe_now_ns();
    pthread_mutex_lock(&s->mu);
    if (t->counted && !t->admitted) {
        t->admitted = t->active = true;
        t->n_prompt = n_prompt;
        s->v.prompt_tokens += n_prompt;
        s->v.active_streams++;
        observe(&s->v.hist[MOE_HIST_QUEUE], (double)(now - t->arrival_ns) * 1e-9, 1);
    }
    pthread_mutex_unlock(&s->mu);
}

void moe_fe_stats_tokens(moe_fe_stats *s, moe_fe_track *t, size_t n, int64_t now)
{
    if (n == 0 || !t)
        return;
    pthread_mutex_lock(&s->mu);
    s->v.generated_tokens += n;
    size_t rest = n;
    if (t->n_generated == 0) {
        observe(&s->v.hist[MOE_HIST_TTFT], (double)(now - t->arrival_ns) * 1e-9, 1);
        t->first_ns = now;
        rest--;
    }
    if (rest > 0) {
        double gap = (double)(now - (t->n_generated ? t->last_ns : t->first_ns)) * 1e-9;
        observe(&s->v.hist[MOE_HIST_ITL], gap / (double)rest, rest);
    }
    t->n_generated += (uint32_t)n;
    t->last_ns = now;
    pthread_mutex_unlock(&s->mu);
}

bool moe_fe_stats_end(moe_fe_stats *s, moe_fe_track *t, moe_outcome o, moe_finish_reason reason)
{
    const int64_t now = moe_now_ns();
    bool set = false;
    if (!t)
        return false;
    pthread_mutex_lock(&s->mu);
    if (t->counted && t->outcome == MOE_OUTCOME_NONE && o > MOE_OUTCOME_NONE &&
        o < MOE_OUTCOME_COUNT) {
        t->outcome = (int)o;
        s->v.outcome[o]++;
        s->v.in_flight--;
        set = true;
        if (o == MOE_OUTCOME_FINISHED) {
            if ((int)reason >= 1 && (int)reason <= 3)
                s->v.finished_by_reason[reason]++;
            observe(&s->v.hist[MOE_HIST_E2E], (double)(now - t->arrival_ns) * 1e-9, 1);
            observe(&s->v.hist[MOE_HIST_PROMPT], (double)t->n_prompt, 1);
            observe(&s->v.hist[MOE_HIST_GENERATION], (double)t->n_generated, 1);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return set;
}

void moe_fe_stats_stream_closed(moe_fe_stats *s, moe_fe_track *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&s->mu);
    if (t->active) {
        t->active = false;
        s->v.active_streams--;
    }
    pthread_mutex_unlock(&s->mu);
}

void moe_fe_stats_refused(moe_fe_stats *s, moe_outcome o)
{
    moe_fe_track t;
    memset(&t, 0, sizeof(t));
    moe_fe_stats_received(s, &t, moe_now_ns());
    moe_fe_stats_end(s, &t, o, 0);
}

void moe_fe_stats_unauthenticated(moe_fe_stats *s)
{
    pthread_mutex_lock(&s->mu);
    s->v.unauthenticated++;
    pthread_mutex_unlock(&s->mu);
}

void moe_fe_stats_get(moe_fe_stats *s, moe_fe_stats_snapshot *out)
{
    pthread_mutex_lock(&s->mu);
    *out = s->v;
    pthread_mutex_unlock(&s->mu);
}

const char *moe_outcome_name(moe_outcome o)
{
    static const char *const names[MOE_OUTCOME_COUNT] = {
        [MOE_OUTCOME_NONE] = "none",
        [MOE_OUTCOME_FINISHED] = "finished",
        [MOE_OUTCOME_CANCELLED] = "cancelled",
        [MOE_OUTCOME_FAILED] = "failed",
        [MOE_OUTCOME_REJECTED_INVALID] = "rejected_invalid",
        [MOE_OUTCOME_REJECTED_BUSY] = "rejected_busy",
    };
    return (int)o >= 0 && o < MOE_OUTCOME_COUNT ? names[o] : "unknown";
}
