/* Stop strings: matches across deltas, hold-back of partial matches, earliest match wins. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "common/stop.h"

static char *feed(const char *const *stops, int n_stops, const char *const *deltas, int n, bool *hit)
{
    moe_stopper *s = moe_stopper_create(stops, n_stops);
    char *out = NULL;
    size_t len = 0;
    *hit = false;
    for (int i = 0; i < n && !*hit; i++)
        *hit = moe_stopper_push(s, deltas[i], strlen(deltas[i]), &out, &len);
    if (!*hit)
        moe_stopper_flush(s, &out, &len);
    moe_stopper_free(s);
    if (!out)
        out = calloc(1, 1);
    return out;
}

Test(stop, match_split_across_deltas)
{
    const char *stops[] = {"END"};
    const char *d[] = {"hello E", "N", "D and more"};
    bool hit;
    char *out = feed(stops, 1, d, 3, &hit);
    cr_assert(hit);
    cr_assert_str_eq(out, "hello ");
    free(out);
}

Test(stop, partial_match_is_held_then_released)
{
    const char *stops[] = {"STOP"};
    moe_stopper *s = moe_stopper_create(stops, 1);
    char *out = NULL;
    size_t len = 0;
    cr_assert_not(moe_stopper_push(s, "abc ST", 6, &out, &len));
    cr_assert_eq(len, 4, "'ST' must be held back");
    cr_assert_not(moe_stopper_push(s, "x", 1, &out, &len));
    cr_assert_str_eq(out, "abc STx");
    moe_stopper_free(s);
    free(out);
}

Test(stop, earliest_of_several_wins_and_no_stops_pass_through)
{
    const char *stops[] = {"world", "lo w"};
    const char *d[] = {"hello world"};
    bool hit;
    char *out = feed(stops, 2, d, 1, &hit);
    cr_assert(hit);
    cr_assert_str_eq(out, "hel");
    free(out);
    out = feed(NULL, 0, d, 1, &hit);
    cr_assert_not(hit);
    cr_assert_str_eq(out, "hello world");
    free(out);
}
