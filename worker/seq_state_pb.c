/* moe_seq_state and its sampling parameters <-> cluster.proto SeqState (worker/seq_state_pb.h). */
#include "worker/seq_state_pb.h"

void moe_seq_state_to_pb(const moe_seq_state *st, moe_seq_state_pb *b)
{
    moe_sampling_to_pb(&st->sp, &b->sp);
    Moeserve__Cluster__V1__SeqState *s = &b->s;
    moeserve__cluster__v1__seq_state__init(s);
    s->seq_id = st->seq_id;
    s->n_tokens = (size_t)st->n_tokens;
    s->tokens = (int32_t *)(uintptr_t)st->tokens; /* only read by pack */
    s->n_prompt = (uint32_t)st->n_prompt;
    s->n_generated = (uint32_t)st->n_generated;
    s->n_computed = (uint32_t)st->n_computed;
    s->max_new_tokens = (uint32_t)st->max_new_tokens;
    s->ignore_eos = st->ignore_eos;
    s->sampling = &b->sp;
}

void moe_seq_state_from_pb(const Moeserve__Cluster__V1__SeqState *s, moe_seq_state *st)
{
    *st = (moe_seq_state){.seq_id = s->seq_id,
                          .tokens = s->tokens,
                          .n_tokens = (int)s->n_tokens,
                          .n_prompt = (int)s->n_prompt,
                          .n_generated = (int)s->n_generated,
                          .n_computed = (int)s->n_computed,
                          .max_new_tokens = (int)s->max_new_tokens,
                          .ignore_eos = s->ignore_eos,
                          .sp = moe_sampling_from_pb(s->sampling)};
}
