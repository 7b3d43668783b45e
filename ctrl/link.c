/* The transport-independent half of the cluster link (ctrl/link.h): packing a control message
 * for the send slot, and freeing a link. Shared by the MPI and UCX transports. */
#include "ctrl/link.h"

#include <limits.h>
#include <stdlib.h>

moe_status moe_link_send(moe_link *l, int dest, int tag, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    if (len > INT_MAX)
        return moe_error(MOE_ERR_RANGE, "control message %s of %zu bytes to member %d is too large",
                         m->descriptor->name, len, dest);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "control message %s: out of memory", m->descriptor->name);
    protobuf_c_message_pack(m, buf);
    /* The send slot copies: the packed bytes are ours to free whatever it says. */
    moe_status st = l->ops->send(l->ctx, dest, tag, buf, len);
    free(buf);
    return st;
}

void moe_link_free(moe_link *l)
{
    if (!l)
        return;
    l->ops->destroy(l->ctx);
    free(l);
}
