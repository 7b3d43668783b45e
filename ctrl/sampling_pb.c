/* Sampling parameters and token log-probabilities <-> cluster.proto (ctrl/sampling_pb.h). */
#include "ctrl/sampling_pb.h"

#include <stdint.h>

void moe_sampling_to_pb(const moe_sampling_params *sp, Moeserve__Cluster__V1__Sampling *out)
{
    moeserve__cluster__v1__sampling__init(out);
    out->temperature = sp->temperature;
    out->top_p = sp->top_p;
    out->top_k = sp->top_k;
    out->seed = sp->seed;
    out->presence_penalty = sp->presence_penalty;
    out->frequency_penalty = sp->frequency_penalty;
    out->repetition_penalty = sp->repetition_penalty;
    out->logprobs = sp->logprobs;
    out->top_logprobs = sp->top_logprobs > 0 ? (uint32_t)sp->top_logprobs : 0;
}

moe_sampling_params moe_sampling_from_pb(const Moeserve__Cluster__V1__Sampling *sp)
{
    if (!sp)
        return (moe_sampling_params){.temperature = 0.0f, .top_p = 1.0f};
    return (moe_sampling_params){
        .temperature = sp->temperature,
        .top_k = sp->top_k,
        .top_p = sp->top_p,
        .seed = sp->seed,
        .presence_penalty = sp->presence_penalty,
        .frequency_penalty = sp->frequency_penalty,
        .repetition_penalty = sp->repetition_penalty,
        .logprobs = sp->logprobs,
        .top_logprobs = sp->top_logprobs > MOE_MAX_TOP_LOGPROBS ? MOE_MAX_TOP_LOGPROBS
                                                                 : (int)sp->top_logprobs,
    };
}

void moe_token_logprobs_to_pb(const moe_token_logprobs *lp, Moeserve__Cluster__V1__TokenEvent *e)
{
    e->has_logprobs = true;
    e->logprob = lp->logprob;
    e->n_top_ids = e->n_top_logprobs = (size_t)lp->n_top;
    e->top_ids = (int32_t *)(uintptr_t)lp->top_ids;        /* only read by pack */
    e->top_logprobs = (float *)(uintptr_t)lp->top_logprobs;
}

bool moe_token_logprobs_from_pb(const Moeserve__Cluster__V1__TokenEvent *e, moe_token_logprobs *lp)
{
    if (!e->has_logprobs)
        return false;
    size_t n = e->n_top_ids < e->n_top_logprobs ? e->n_top_ids : e->n_top_logprobs;
    if (n > MOE_MAX_TOP_LOGPROBS)
        n = MOE_MAX_TOP_LOGPROBS;
    lp->logprob = e->logprob;
    lp->n_top = (int)n;
    for (size_t i = 0; i < n; i++) {
        lp->top_ids[i] = e->top_ids[i];
        lp->top_logprobs[i] = e->top_logprobs[i];
    }
    return true;
}
