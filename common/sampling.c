/* Names of the shared sampling vocabulary (common/sampling.h). */
#include "common/sampling.h"

const char *moe_finish_name(moe_finish_reason r)
{
    static const char *const names[] = {"none", "length", "eos", "stop", "cancelled"};
    return (unsigned)r < sizeof names / sizeof names[0] ? names[r] : "?";
}
