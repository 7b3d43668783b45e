/* Status names and the thread-local error message. */
#include "common/status.h"

#include <stdio.h>
#include <string.h>

#define MOE_ERROR_MAX 1024

static _Thread_local char error_message[MOE_ERROR_MAX];

static const char *const status_names[] = {
#define MOE_STATUS_NAME(name, text) #name,
    MOE_STATUS_LIST(MOE_STATUS_NAME)
#undef MOE_STATUS_NAME
};

static const char *const status_texts[] = {
#define MOE_STATUS_TEXT(name, text) text,
    MOE_STATUS_LIST(MOE_STATUS_TEXT)
#undef MOE_STATUS_TEXT
};

const char *moe_status_name(moe_status s)
{
    return (unsigned)s < MOE_STATUS_COUNT ? status_names[s] : "MOE_STATUS_UNKNOWN";
}

const char *moe_status_text(moe_status s)
{
    return (unsigned)s < MOE_STATUS_COUNT ? status_texts[s] : "unknown status";
}

moe_status moe_verror(moe_status s, const char *fmt, va_list ap)
{
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    return s;
}

moe_status moe_error(moe_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moe_verror(s, fmt, ap);
    va_end(ap);
    return s;
}

moe_status moe_error_context(moe_status s, const char *fmt, ...)
{
    char prefix[MOE_ERROR_MAX];
    char old[MOE_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, error_message, sizeof old);
    /* Truncation is fine: the message is for people and keeps its most specific start. */
    size_t n = strnlen(prefix, sizeof prefix - 1);
    memcpy(error_message, prefix, n);
    size_t m = strnlen(old, sizeof error_message - 1 - n);
    memcpy(error_message + n, old, m);
    error_message[n + m] = '\0';
    return s;
}

const char *moe_error_message(void) { return error_message; }

void moe_error_clear(void) { error_message[0] = '\0'; }
