/* common/sampling.h's sampling parameters and token log-probabilities <-> their cluster.proto
 * wire forms (Sampling, TokenEvent's logprob fields): one conversion for the coordinator's
 * StartSeq, the worker's StartSeq / SeqState / TokenBatch and the migration messages. */
#ifndef MOE_CTRL_SAMPLING_PB_H
#define MOE_CTRL_SAMPLING_PB_H

#include "cluster.pb-c.h"
#include "common/sampling.h"

/* Fills *out (initialised here) from sp; it borrows nothing. */
void moe_sampling_to_pb(const moe_sampling_params *sp, Moeserve__Cluster__V1__Sampling *out);
/* The parameters from their wire form; NULL means greedy with every option off. Out-of-range
 * top_logprobs are clamped to MOE_MAX_TOP_LOGPROBS. */
moe_sampling_params moe_sampling_from_pb(const Moeserve__Cluster__V1__Sampling *sp);

/* Sets e's logprob fields from lp; e borrows lp's arrays (lp must outlive the pack). */
void moe_token_logprobs_to_pb(const moe_token_logprobs *lp, Moeserve__Cluster__V1__TokenEvent *e);
/* False when e carries none; else fills *lp (at most MOE_MAX_TOP_LOGPROBS entries kept). */
bool moe_token_logprobs_from_pb(const Moeserve__Cluster__V1__TokenEvent *e, moe_token_logprobs *lp);

#endif
