/* What every transport of the cluster link shares (ctrl/link.h): packing a message, freeing. */
#include "ctrl/link.h"

#include <limits.h>
#include <stdlib.h>

moe_status moe_link_send(moe_link *l, int dest, int tag, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    if (len > INT_MAX)
        return moe_error(MOE_ERR_RANGE, "control message %s of %zu bytes is too large",
                         m->descriptor->name, len);
    uint8_t small[512];
    uint8_t *buf = len <= sizeof small ? small : malloc(len);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "control message %s: out of memory", m->descriptor->name);
    protobuf_c_message_pack(m, buf);
    moe_status st = l->ops->send(l->ctx, dest, tag, buf, len);
    if (buf != small)
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
