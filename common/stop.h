/* Stop strings over a stream of text deltas: finds the first stop string in the generated text and
 * holds back any tail that could still become one, so a client never sees text past a stop. */
#ifndef MOE_COMMON_STOP_H
#define MOE_COMMON_STOP_H

#include <stdbool.h>
#include <stddef.h>

typedef struct moe_stopper moe_stopper;

/* Copies the n strings (empty strings are ignored). Returns NULL on allocation failure. */
moe_stopper *moe_stopper_create(const char *const *stops, int n);
void moe_stopper_free(moe_stopper *s);

/* Feeds a text delta. Appends to *out (grown with realloc; *out_len updated) the text that is now
 * safe to emit. Returns true when a stop string matched: the text before it has been emitted and
 * the rest must be dropped (the sequence is finished). */
bool moe_stopper_push(moe_stopper *s, const char *delta, size_t len, char **out, size_t *out_len);
/* End of stream without a match: emits what was held back. */
void moe_stopper_flush(moe_stopper *s, char **out, size_t *out_len);

#endif
