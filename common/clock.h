/* Monotonic clock helpers. */
#ifndef MOE_COMMON_CLOCK_H
#define MOE_COMMON_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t moe_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleeps ns nanoseconds (idle naps of the worker and coordinator loops). */
static inline void moe_sleep_ns(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    nanosleep(&ts, NULL);
}

static inline double moe_now_s(void) { return (double)moe_now_ns() * 1e-9; }

/* CPU time this process has had (all its threads): a step's wall time minus this is the time it
 * waited for a core (moe-plan's step costs, the worker's step trace). */
static inline int64_t moe_process_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#endif
