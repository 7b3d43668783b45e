/* Validation of public API requests against the served model's limits, once for both front ends:
 * turns a decoded moe_api_request (coordinator/frontend.h) into a moe_gen_request (tokenized,
 * defaults resolved) or an MOE_ERR_INVALID_ARG whose message names the field (in the request's
 * protocol), the value and the limit. */
#ifndef MOE_COORDINATOR_VALIDATE_H
#define MOE_COORDINATOR_VALIDATE_H

#include <stdint.h>
#include "common/status.h"
#include "coordinator/frontend.h"

typedef struct {
    int32_t vocab_size;              /* token ids must be in [0, vocab_size) */
    uint32_t context_len;            /* prompt + generated tokens of one request (max_model_len) */
    uint32_t max_new_tokens;         /* largest max_new_tokens accepted */
    uint32_t default_max_new_tokens; /* used when a request sends 0; clamped to the context room */
    uint32_t max_prompt_bytes;       /* of a text prompt, checked before tokenizing */
    uint32_t max_stop;               /* stop strings per request */
    uint32_t max_stop_bytes;         /* bytes per stop string */
    uint32_t max_stop_token_ids;     /* stop token ids per request */
} moe_validate_limits;

/* Sets every limit from the model's vocabulary size and context length: max_new_tokens =
 * context_len, default_max_new_tokens = min(256, context_len), max_prompt_bytes = 1 MiB, 16 stop
 * strings of at most 256 bytes, 64 stop token ids. Adjust fields afterwards as needed. */
void moe_validate_limits_default(moe_validate_limits *lim, int32_t vocab_size,
                                 uint32_t context_len);

/* A validated request: `req` points into the buffers below, which it owns (nothing of the
 * moe_api_request it came from). */
typedef struct {
    moe_gen_request req;
    int32_t *prompt_buf;   /* owned */
    int32_t *stop_ids_buf; /* owned */
    char **stop_buf;       /* owned: n_stop NUL-terminated copies, in one allocation */
} moe_validated;

/* Typed like moe_frontend_backend.tokenize. */
typedef moe_status (*moe_validate_tokenize_fn)(void *ctx, const char *text, size_t len,
                                               bool add_special, int32_t *ids, size_t cap,
                                               size_t *n_out);

/* Checks `in` against `lim`, tokenizes a text prompt with `tokenize(tok_ctx, ...)` and fills
 * *out (req.arrival_ns and req.deadline_ns are left 0 for the caller). Defaults: temperature 1,
 * top_p 1, random seed, request id "req-<16 hex digits>" when empty, max_new_tokens
 * min(default_max_new_tokens, context room) when 0. Checks, each failing with MOE_ERR_INVALID_ARG
 * and a message that starts with the field's name (in->names): no or empty prompt, a NUL byte in
 * any string, text over max_prompt_bytes or not UTF-8, token id outside [0, vocab_size), prompt
 * that leaves no room in the context, max_new_tokens < 0, over the limit or past the context,
 * temperature < 0 or not finite, top_p outside (0, 1], top_k < 0 or over 2^31, too many / empty
 * / too long / non-UTF-8 stop strings, too many or out-of-vocabulary stop token ids, request_id
 * too long or not printable ASCII. A tokenizer failure is returned as is. *out owns copies of
 * everything it needs. On failure *out holds nothing to free. Thread-safe. */
moe_status moe_validate_request(const moe_validate_limits *lim, const moe_api_request *in,
                                moe_validate_tokenize_fn tokenize, void *tok_ctx,
                                moe_validated *out);
void moe_validated_free(moe_validated *v);

/* Choice i (0-based) of a request for n choices (HTTP n, GenerateRequest.n), validated as
 * moe_validate_request does, both front ends' one derivation: a seeded request's choice samples
 * with moe_api_choice_seed(seed, i) (an unseeded one draws its own), and with n > 1 every choice
 * is of the prefill group `group` (non-zero, the front end's key for the request; n of them) so
 * that the backend may prefill their prompt once. The front end names the choices' ids. */
moe_status moe_validate_choice(const moe_validate_limits *lim, const moe_api_request *in,
                               uint32_t i, uint32_t n, uint64_t group,
                               moe_validate_tokenize_fn tokenize, void *tok_ctx,
                               moe_validated *out);

/* Returns the byte offset of the first invalid UTF-8 sequence in s[0..len), or -1 if valid
 * (overlongs, surrogates and code points past U+10FFFF are invalid). */
long moe_validate_utf8(const char *s, size_t len);

#endif
