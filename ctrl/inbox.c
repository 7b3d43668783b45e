/* One inbox's dispatch: the row for the tag, its message unpacked, its handler called. */
#include "ctrl/inbox.h"

#include "common/log.h"

moe_inbox_result moe_inbox_deliver(const moe_inbox_kind *kinds, size_t n_kinds, void *self, int src,
                                   int tag, const uint8_t *buf, size_t len)
{
    const moe_inbox_kind *k = NULL;
    for (size_t i = 0; i < n_kinds && !k; i++) /* a dozen rows: a scan is as fast as a lookup */
        if (kinds[i].tag == tag)
            k = &kinds[i];
    if (!k)
        return MOE_INBOX_UNKNOWN;
    ProtobufCMessage *m = NULL;
    if (k->type && !(m = protobuf_c_message_unpack(k->type, NULL, len, buf))) {
        MOE_LOG_E("malformed %s (%zu bytes) from member %d", k->type->name, len, src);
        return MOE_INBOX_MALFORMED;
    }
    if (!k->handle(self, src, tag, m) && m)
        protobuf_c_message_free_unpacked(m, NULL);
    return MOE_INBOX_HANDLED;
}
