/* The test hooks' gate (common/test_hook.h): a MOE_TEST_* variable does nothing without
 * MOE_TEST_HOOKS=1. Each Criterion test runs in its own process, so setenv stays local. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "common/test_hook.h"

Test(test_hook, ignored_without_the_gate)
{
    unsetenv("MOE_TEST_HOOKS");
    setenv("MOE_TEST_PULL_DELAY_MS", "400", 1);
    cr_expect_null(moe_test_hook("MOE_TEST_PULL_DELAY_MS"));
    cr_expect_eq(moe_test_hook_int("MOE_TEST_PULL_DELAY_MS", 0), 0);
    setenv("MOE_TEST_HOOKS", "yes", 1); /* only "1" opens it */
    cr_expect_null(moe_test_hook("MOE_TEST_PULL_DELAY_MS"));
}

Test(test_hook, active_with_the_gate)
{
    setenv("MOE_TEST_HOOKS", "1", 1);
    setenv("MOE_TEST_PULL_DELAY_MS", "400", 1);
    cr_expect_str_eq(moe_test_hook("MOE_TEST_PULL_DELAY_MS"), "400");
    cr_expect_eq(moe_test_hook_int("MOE_TEST_PULL_DELAY_MS", 0), 400);
    setenv("MOE_TEST_PULL_DELAY_MS", "", 1);
    cr_expect_null(moe_test_hook("MOE_TEST_PULL_DELAY_MS"));
    unsetenv("MOE_TEST_HANG_RANK");
    cr_expect_eq(moe_test_hook_int("MOE_TEST_HANG_RANK", -1), -1);
}
