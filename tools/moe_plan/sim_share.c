/* Processor sharing of a host's cores among the simulated ranks on it (mp_sim_opts.host_ranks):
 * a step's CPU work progresses at 1 / the stretch the profile's sharing curve gives for the number
 * of the host's ranks in a step, re-paced whenever a step there starts or ends. */
#include "tools/moe_plan/sim_internal.h"

/* Processor sharing: brings group i's step up to now at its old rate, takes the rate its hosts
 * give now (the most loaded of its ranks' hosts sets the pace) and moves its end when the rate
 * changed. A step already in its all-to-all part (work done) keeps its end. */
static bool update_rate(sim *s, int i)
{
    group_t *gr = &s->groups[i];
    if (gr->rate > 0 && gr->work > 0) {
        gr->work -= (s->now - gr->t_last) * gr->rate;
        if (gr->work < 1e-15)
            gr->work = 0;
    }
    gr->t_last = s->now;
    if (gr->rate > 0 && gr->work <= 0)
        return true;
    double stretch = 1;
    for (int k = 0; k < gr->ep; k++) {
        int host = s->ranks[gr->first + k].host, n = s->host_busy[host];
        double r = mp_share_ratio(s->c, n, gr->work0 * 1e3, s->o->cores);
        if (host == 0 && s->client_busy > 0)
            r += s->client_busy * (mp_share_ratio(s->c, n + 1, gr->work0 * 1e3, s->o->cores) - r);
        if (r > stretch)
            stretch = r;
    }
    double rate = 1 / stretch;
    if (rate == gr->rate)
        return true;
    gr->rate = rate;
    gr->t_end = s->now + gr->work / rate + gr->comm;
    return mp_sim_push(s, gr->t_end, EV_STEP_END, i, ++gr->gen);
}

static bool on_host(const sim *s, int g, int host)
{
    for (int k = 0; k < s->groups[g].ep; k++)
        if (s->ranks[s->groups[g].first + k].host == host)
            return true;
    return false;
}

/* A step of group g started or ended: every busy step on g's hosts changes pace. */
bool mp_sim_reshare(sim *s, int g)
{
    const group_t *gr = &s->groups[g];
    for (int i = 0; i < s->n_groups; i++) {
        if (!s->groups[i].busy)
            continue;
        bool shares = false;
        for (int k = 0; k < gr->ep && !shares; k++)
            shares = on_host(s, i, s->ranks[gr->first + k].host);
        if (shares && !update_rate(s, i))
            return false;
    }
    return true;
}

