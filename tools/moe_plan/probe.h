/* `moe-plan probe`: measures how much CPU a process gets on this machine when it wakes up to
 * compute, the input the simulator needs on a shared machine (costs.h: availability). */
#ifndef MOE_TOOLS_PLAN_PROBE_H
#define MOE_TOOLS_PLAN_PROBE_H

#include <stdbool.h>

typedef struct {
    const char *out;    /* the JSON file written */
    double seconds;     /* stop after this long (0: at SIGTERM / SIGINT) */
    double interval_ms; /* mean sleep between bursts */
    bool verbose;
} mp_probe_opts;

/* Repeats: sleep (uniform in [0.5, 1.5] x interval), then spin until the process has had
 * c ms of CPU, c cycling over 1, 2, 4, ..., 64 ms, recording wall / CPU per burst and when it
 * began (the first 512 of each length); in its own session (as an mpirun rank: under autogroup scheduling each session is a group of its own).
 * Writes o->out at the end. Returns the process exit status. */
int mp_probe_main(const mp_probe_opts *o);

#endif
