/* The gate of the tests' fault-injection hooks (common/test_hook.h). */
#include "common/test_hook.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"

const char *moe_test_hook(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return NULL;
    const char *gate = getenv("MOE_TEST_HOOKS");
    if (!gate || strcmp(gate, "1")) {
        MOE_LOG_W("%s=%s is set but test hooks are off (MOE_TEST_HOOKS=1 enables them): ignored",
                  name, v);
        return NULL;
    }
    MOE_LOG_W("TEST HOOK ACTIVE: %s=%s (fault injection; never set this in production)", name, v);
    return v;
}

int moe_test_hook_int(const char *name, int dflt)
{
    const char *v = moe_test_hook(name);
    return v ? atoi(v) : dflt;
}
