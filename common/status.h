/* Status codes and the per-thread error message that says what went wrong and where. */
#ifndef MOE_COMMON_STATUS_H
#define MOE_COMMON_STATUS_H

#include <stdarg.h>

/* X-macro table: (enum name, short human name). */
#define MOE_STATUS_LIST(X)                          \
    X(MOE_OK, "ok")                                 \
    X(MOE_ERR_INVALID_ARG, "invalid argument")      \
    X(MOE_ERR_IO, "i/o error")                      \
    X(MOE_ERR_FORMAT, "malformed input")            \
    X(MOE_ERR_UNSUPPORTED, "unsupported")           \
    X(MOE_ERR_NOMEM, "out of memory")               \
    X(MOE_ERR_RANGE, "out of range")                \
    X(MOE_ERR_FULL, "resource exhausted")           \
    X(MOE_ERR_NOT_FOUND, "not found")               \
    X(MOE_ERR_TIMEOUT, "timed out")                 \
    X(MOE_ERR_CANCELLED, "cancelled")               \
    X(MOE_ERR_UNAVAILABLE, "unavailable")           \
    X(MOE_ERR_INTERNAL, "internal error")           \
    /* appended, not inserted: the numbers travel in cluster messages */ \
    X(MOE_ERR_PERMISSION, "permission denied")

typedef enum {
#define MOE_STATUS_ENUM(name, text) name,
    MOE_STATUS_LIST(MOE_STATUS_ENUM)
#undef MOE_STATUS_ENUM
        MOE_STATUS_COUNT
} moe_status;

/* "MOE_ERR_FORMAT" for MOE_ERR_FORMAT; never NULL. */
const char *moe_status_name(moe_status s);
/* "malformed input" for MOE_ERR_FORMAT; never NULL. */
const char *moe_status_text(moe_status s);

/* Sets this thread's error message (printf-style) and returns `s`, so that a failing path reads
 * `return moe_error(MOE_ERR_FORMAT, "%s: tensor %s: ...", path, name);`. Thread-safe: the message
 * is thread-local. */
moe_status moe_error(moe_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
moe_status moe_verror(moe_status s, const char *fmt, va_list ap);

/* Prepends context to the current message ("loading DIR: " + old message) and returns `s`. */
moe_status moe_error_context(moe_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* This thread's last message ("" if none). Valid until the next moe_error* call on this thread. */
const char *moe_error_message(void);
void moe_error_clear(void);

#endif
