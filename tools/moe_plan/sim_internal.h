/* The simulator's state, shared by its files (sim.c: events, engine, coordinator, hand-off;
 * sim_share.c: processor sharing of a host's cores). Not an interface: sim.h is. */
#ifndef MOE_TOOLS_PLAN_SIM_INTERNAL_H
#define MOE_TOOLS_PLAN_SIM_INTERNAL_H

#include "tools/moe_plan/sim.h"

enum { EV_ARRIVE, EV_START, EV_STEP_END, EV_HANDOFF, EV_FIRST_SEEN, EV_TIMELINE, EV_KICK, EV_RESERVE, EV_ACCEPT };

typedef struct {
    double t;
    long order; /* FIFO among equal times */
    int kind, a;
    int gen; /* EV_STEP_END: the group's schedule it belongs to (processor sharing moves ends) */
} event;

typedef struct {
    int req;
    int n_tokens, n_computed, n_generated, blocks;
    bool paused, prefill_only;
    int chunk;    /* tokens in the step in flight (0: not in it) */
    bool layered; /* its final prefill chunk ran with the push accepted: layers left as computed */
} eseq;

typedef struct {
    mp_pool pool;
    int group, host;
    eseq *seqs; /* arrival order */
    int n_seqs, cap_seqs;
    int kv_total, kv_used;
    /* the coordinator's view */
    long pending_tokens;
    int n_pending, reserved;
    /* Control messages that reached the rank during a step: a worker takes them in at its next
     * loop turn, after the step (worker/worker_loop.c drains, then steps). Request ids, by kind. */
    int *inbox[2], n_inbox[2], cap_inbox[2];
} rank_t;

enum { IN_RESERVE, IN_ACCEPT };

typedef struct {
    int first, ep; /* ranks [first, first + ep) */
    bool busy;
    double t_end; /* when the step in flight ends (with processor sharing: as scheduled now) */
    /* Processor sharing (mp_sim_opts.host_ranks): the step's CPU work left (s) as of t_last,
     * progressing at `rate` CPU s per s; its total (for the curve's length), its all-to-all time
     * (after the work, not stretched), when it began, and its schedule's generation. */
    double work, work0, rate, comm, t_last, t_start;
    int gen;
} group_t;

enum { RQ_QUEUED, RQ_PREFILL, RQ_XFER, RQ_DECODE, RQ_DONE };

/* The layer-by-layer push's handshake (worker/kv_push.c): the prefill side sends KvReserve when it
 * takes the start in, the decode side answers at its next loop turn (accepts with room), and the
 * prefill side takes the accept in at its next loop turn. Only the final prefill chunk's step
 * pushes layers as they are computed, and only when the accept was in before that step began;
 * otherwise every layer moves once the accept is in after the prefill. */
enum { RES_NONE, RES_SENT, RES_ACCEPTED, RES_DECLINED };

typedef struct {
    int state, pi, di, reserved;
    int res;         /* RES_*: the push handshake (RES_NONE: no push, e.g. whole-block mode) */
    bool accept_in;  /* the prefill side has taken the accept in */
    bool pull;       /* no decode reservation: whole blocks move after the prefill */
    bool counted;    /* in its prefill rank's pending counters */
    double t_ready;  /* pull mode: when the prefill finished (waiting for decode room since) */
} sreq;

typedef struct {
    const mp_costs *c;
    const mp_sim_opts *o;
    const wl_workload *w;
    rp_record *rec;
    mp_sim_stats st;
    int mbt, max_seqs, bs;
    bool disagg;
    rank_t *ranks;
    int n_ranks, cap_ranks;
    group_t *groups;
    int n_groups, cap_groups;
    sreq *rq;
    int *queue, q_head, q_len; /* FIFO of request ids (every request has priority 0) */
    int in_flight, done;
    int *pulls, n_pulls, cap_pulls; /* pull-mode requests waiting for decode room */
    event *heap;
    int n_heap, cap_heap;
    long order;
    double now;
    bool ps;        /* processor sharing among a host's ranks */
    int *host_busy; /* ranks in a step, per host */
    double client_busy; /* the coordinator and client's share of a participant on host 0 (mp_sim_opts) */
} sim;

/* Queues an event (gen: the group's schedule generation, EV_STEP_END; else 0); false: no memory. */
bool mp_sim_push(sim *s, double t, int kind, int a, int gen);
/* Processor sharing: a step of group g started or ended (its hosts' busy counts updated): every
 * busy step on g's hosts is brought up to now and re-paced (sim_share.c). False: no memory. */
bool mp_sim_reshare(sim *s, int g);

#endif
