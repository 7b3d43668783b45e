/* Names of the shared sampling vocabulary (common/sampling.h). */
#include "common/sampling.h"

const char *moe_finish_name(moe_finish_reason r)
{
    static const char *const names[] = {"none", "length", "eos", "stop", "cancelled"};
    return (unsigned)r < sizeof names / sizeof names[0] ? names[r] : "?";
}

bool moe_sampling_same_but_seed(const moe_sampling_params *a, const moe_sampling_params *b)
{
    return a->temperature == b->temperature && a->top_k == b->top_k && a->top_p == b->top_p &&
           a->presence_penalty == b->presence_penalty &&
           a->frequency_penalty == b->frequency_penalty &&
           a->repetition_penalty == b->repetition_penalty && a->logprobs == b->logprobs &&
           a->top_logprobs == b->top_logprobs;
}
