/* Log sink: stderr, one line per call, with time, rank and function. */
#include "common/log.h"

#include <stdarg.h>
#include <string.h>
#include <time.h>

moe_log_level moe_log_threshold = MOE_LOG_INFO;
static int log_rank = -1;

void moe_log_init(int rank)
{
    log_rank = rank;
    const char *env = getenv("MOE_LOG_LEVEL");
    if (!env)
        return;
    if (!strcmp(env, "error"))
        moe_log_threshold = MOE_LOG_ERROR;
    else if (!strcmp(env, "warn"))
        moe_log_threshold = MOE_LOG_WARN;
    else if (!strcmp(env, "info"))
        moe_log_threshold = MOE_LOG_INFO;
    else if (!strcmp(env, "debug"))
        moe_log_threshold = MOE_LOG_DEBUG;
}

void moe_log_write(moe_log_level level, const char *func, const char *fmt, ...)
{
    static const char *const names[] = {"E", "W", "I", "D"};
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%s %02d:%02d:%02d.%03ld ", names[level], tm.tm_hour,
                     tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    if (log_rank >= 0)
        n += snprintf(line + n, sizeof line - (size_t)n, "[rank %d] ", log_rank);
    n += snprintf(line + n, sizeof line - (size_t)n, "%s: ", func);
    va_list ap;
    va_start(ap, fmt);
    if (n < (int)sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    /* One fputs per line so that lines from threads and ranks do not interleave mid-line. */
    size_t len = strnlen(line, sizeof line - 2);
    line[len] = '\n';
    line[len + 1] = '\0';
    fputs(line, stderr);
}
