/* The shared vocabulary of sampling, defined once for every layer that carries it: the front ends
 * (coordinator/frontend.h), the scheduler, the wire (ctrl/sampling_pb.h converts to and from
 * cluster.proto's Sampling) and the engine's sampler (worker/sampler.h): a sequence's sampling
 * parameters, why a generation ended, and the log-probabilities of one sampled token. */
#ifndef MOE_COMMON_SAMPLING_H
#define MOE_COMMON_SAMPLING_H

#include <stdbool.h>
#include <stdint.h>

/* A zeroed struct is greedy decoding with every option off. */
typedef struct {
    float temperature; /* 0 = greedy (argmax, lowest id on ties) */
    int top_k;         /* 0 = off */
    float top_p;       /* in (0, 1]; 1 (or 0 in a zeroed struct) = off */
    uint64_t seed;     /* with the token index, fixes every draw (the client's, else the server's) */
    /* Penalties, vLLM's semantics (and OpenAI's for the first two). presence / frequency: over
     * the tokens generated so far, logit -= presence * (count > 0) + frequency * count; each in
     * [-2, 2], 0 = off. repetition (CTRL, Hugging Face's RepetitionPenaltyLogitsProcessor): over
     * prompt + generated tokens, logit > 0 ? logit / r : logit * r; > 0, 1 (or 0) = off.
     * Applied before temperature; they depend only on the sequence's tokens, which travel with
     * it (StartSeq.generated, SeqState.tokens), so a resumed or migrated sequence is penalised
     * exactly as it would have been where it started. */
    float presence_penalty, frequency_penalty, repetition_penalty;
    /* Log-probabilities of each sampled token: off, or the chosen token's and the top_logprobs
     * (0..MOE_MAX_TOP_LOGPROBS) most likely ones (see moe_token_logprobs for which logits). */
    bool logprobs;
    int top_logprobs;
} moe_sampling_params;

/* True when a and b sample alike but for their seeds (n choices of one request). */
bool moe_sampling_same_but_seed(const moe_sampling_params *a, const moe_sampling_params *b);

#define MOE_MAX_TOP_LOGPROBS 20

/* Log-probabilities of one sampled token: log-softmax over the whole vocabulary of the logits the
 * token was drawn from after the penalties and the temperature (greedy: temperature 1), before
 * top-k / top-p cut the candidates. That is vLLM's V0 sampler and its V1 `processed_logprobs`
 * mode (V1's default, `raw_logprobs`, uses the model's logits before penalties and temperature;
 * the two agree at temperature 1 without penalties). */
typedef struct {
    float logprob;                              /* of the sampled token */
    int n_top;                                  /* 0..MOE_MAX_TOP_LOGPROBS */
    int32_t top_ids[MOE_MAX_TOP_LOGPROBS];      /* most likely first (ties: lower id first) */
    float top_logprobs[MOE_MAX_TOP_LOGPROBS];
} moe_token_logprobs;

/* Why a generation ended. Values 1-3 are moeserve.v1.FinishReason's (the public API). */
typedef enum {
    MOE_FINISH_NONE = 0,      /* still running */
    MOE_FINISH_LENGTH = 1,    /* max_new_tokens (or the context) reached */
    MOE_FINISH_EOS = 2,       /* an EOS id of the model */
    MOE_FINISH_STOP = 3,      /* a stop string or stop token id (the caller's decision) */
    MOE_FINISH_CANCELLED = 4, /* cancelled by the caller */
} moe_finish_reason;

/* "none", "length", "eos", "stop", "cancelled" ("?" outside the enum). */
const char *moe_finish_name(moe_finish_reason r);

#endif
