/* Levelled logging: every line carries the time, the rank and the function. */
#ifndef MOE_COMMON_LOG_H
#define MOE_COMMON_LOG_H

#include <stdio.h>
#include <stdlib.h>

typedef enum { MOE_LOG_ERROR = 0, MOE_LOG_WARN, MOE_LOG_INFO, MOE_LOG_DEBUG } moe_log_level;

/* Lines above this level are dropped before their arguments are evaluated. Set from
 * MOE_LOG_LEVEL (error|warn|info|debug) by moe_log_init, default info. */
extern moe_log_level moe_log_threshold;

/* Reads MOE_LOG_LEVEL and remembers the rank to print (-1: single process). Call once in main. */
void moe_log_init(int rank);
void moe_log_write(moe_log_level level, const char *func, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define MOE_LOG(level, ...)                                       \
    do {                                                          \
        if ((level) <= moe_log_threshold)                         \
            moe_log_write((level), __func__, __VA_ARGS__);        \
    } while (0)
#define MOE_LOG_E(...) MOE_LOG(MOE_LOG_ERROR, __VA_ARGS__)
#define MOE_LOG_W(...) MOE_LOG(MOE_LOG_WARN, __VA_ARGS__)
#define MOE_LOG_I(...) MOE_LOG(MOE_LOG_INFO, __VA_ARGS__)
#define MOE_LOG_D(...) MOE_LOG(MOE_LOG_DEBUG, __VA_ARGS__)

/* Programmer errors only (never user input): always on, aborts with the condition and place. */
#define MOE_ASSERT(cond)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: %s: assertion failed: %s\n", __FILE__, __LINE__,       \
                    __func__, #cond);                                                      \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

#endif
