/* Conversion between the engine's movable sequence state (moe_seq_state) and its wire form
 * (cluster.proto SeqState), shared by the KV pull and push (prefill -> decode) and live migration
 * (decode -> decode). */
#ifndef MOE_WORKER_SEQ_STATE_PB_H
#define MOE_WORKER_SEQ_STATE_PB_H

#include <stdint.h>
#include "cluster.pb-c.h"
#include "ctrl/sampling_pb.h"
#include "worker/engine.h"

/* The message and the sub-messages it points to, on the caller's stack. */
typedef struct {
    Moeserve__Cluster__V1__SeqState s;
    Moeserve__Cluster__V1__Sampling sp;
} moe_seq_state_pb;

/* Fills b from st; b->s borrows st->tokens (read only, by pack) and must not outlive them. */
void moe_seq_state_to_pb(const moe_seq_state *st, moe_seq_state_pb *b);
/* Fills st from s; st->tokens borrows s->tokens. A missing sampling means greedy. */
void moe_seq_state_from_pb(const Moeserve__Cluster__V1__SeqState *s, moe_seq_state *st);

#endif
