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

#endif
