/* Fault-injection hooks for the tests (MOE_TEST_* environment variables) behind one gate: a hook
 * takes effect only when MOE_TEST_HOOKS=1 is set as well, and every hook read is logged loudly,
 * so that a variable left over in a shell (mpirun passes the environment on) can neither slow nor
 * corrupt a production run silently. */
#ifndef MOE_COMMON_TEST_HOOK_H
#define MOE_COMMON_TEST_HOOK_H

/* The value of test hook `name` (e.g. "MOE_TEST_CORRUPT_KV"), or NULL when it is unset or empty,
 * or when MOE_TEST_HOOKS=1 is not set (then a set hook is reported as ignored, with a warning).
 * An active hook is logged as a warning each time it is read: read hooks once, at start. */
const char *moe_test_hook(const char *name);
/* moe_test_hook as an int; dflt when it is not active. */
int moe_test_hook_int(const char *name, int dflt);

#endif
