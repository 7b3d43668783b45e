/* Hugging Face tokenizer.json: BPE tokenizers of both families, byte-level (GPT-2 / Qwen2 /
 * OLMoE) and SentencePiece-style (Metaspace + byte fallback: Llama-2 / Mixtral), with added and
 * special tokens; and a streaming decoder that never emits a broken UTF-8 sequence. */
#ifndef MOE_COMMON_TOKENIZER_H
#define MOE_COMMON_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "common/status.h"

typedef struct moe_tokenizer moe_tokenizer;

/* Loads a tokenizer.json file. Unsupported models/normalizers/pre-tokenizers are refused with a
 * message naming the field. Thread-safe for concurrent encode/decode after load. */
moe_status moe_tokenizer_load(const char *path, moe_tokenizer **out);
moe_status moe_tokenizer_parse(const char *json, size_t len, const char *name, moe_tokenizer **out);
void moe_tokenizer_free(moe_tokenizer *tok);

int moe_tokenizer_vocab_size(const moe_tokenizer *tok);
/* Token id of a token string ("<s>", "<|endoftext|>"), -1 if none. */
int moe_tokenizer_token_id(const moe_tokenizer *tok, const char *token);

/* Encodes UTF-8 text. add_special: apply the post-processor template (e.g. BOS for Llama/Mixtral),
 * as HF's encode(add_special_tokens=True). Writes up to cap ids into ids and returns the number
 * of ids the text needs via *n_out (call again with a larger buffer if *n_out > cap). */
moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                bool add_special, int32_t *ids, size_t cap, size_t *n_out);

/* Decodes ids to text as HF decode(skip_special_tokens=skip_special) does. Writes up to cap bytes
 * (NUL-terminated if room); *n_out = bytes needed. */
moe_status moe_tokenizer_decode(const moe_tokenizer *tok, const int32_t *ids, size_t n,
                                bool skip_special, char *out, size_t cap, size_t *n_out);

/* Streaming decoder for one sequence: feed ids one at a time, get the new text that is now
 * complete. Holds back bytes of an incomplete UTF-8 sequence (byte-fallback / byte-level pieces)
 * and applies family-specific rules (leading-space strip of the first SentencePiece token). */
typedef struct moe_detok moe_detok;
moe_detok *moe_detok_create(const moe_tokenizer *tok, bool skip_special);
void moe_detok_free(moe_detok *d);
/* Appends the text completed by `id` to out (up to cap bytes, NUL-terminated); returns the number
 * of bytes written (0 when the token only extended a pending sequence). */
size_t moe_detok_push(moe_detok *d, int32_t id, char *out, size_t cap);
/* Flushes whatever is held back at the end of the stream (invalid bytes become U+FFFD). */
size_t moe_detok_finish(moe_detok *d, char *out, size_t cap);

#endif
