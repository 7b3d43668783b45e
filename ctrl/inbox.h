/* An inbox: the control-message kinds a loop takes, as one table of (tag, message type, handler),
 * so that a kind is added by one row and each message is unpacked in one place. The worker loop,
 * the worker's migration module and the coordinator each keep their own table (issue 10: one inbox
 * with a table of kinds and handlers instead of each loop switching twice on the tag). */
#ifndef MOE_CTRL_INBOX_H
#define MOE_CTRL_INBOX_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Handles message m (of the row's type; NULL when the row has none: the tag alone is the message)
 * from member src; returns true when it keeps m (it frees it later), false to let the inbox free
 * it now. `self` is the table owner's state. */
typedef bool (*moe_inbox_handler)(void *self, int src, int tag, ProtobufCMessage *m);

typedef struct {
    int tag;
    const ProtobufCMessageDescriptor *type; /* NULL: no body to unpack */
    moe_inbox_handler handle;
} moe_inbox_kind;

typedef enum {
    MOE_INBOX_HANDLED = 0,
    MOE_INBOX_UNKNOWN,   /* no row has this tag (the caller may try another inbox, or log it) */
    MOE_INBOX_MALFORMED, /* the body is not a message of the row's type: logged with the sender */
} moe_inbox_result;

/* Unpacks buf as the message of tag's row and calls its handler. */
moe_inbox_result moe_inbox_deliver(const moe_inbox_kind *kinds, size_t n_kinds, void *self, int src,
                                   int tag, const uint8_t *buf, size_t len);

#endif
