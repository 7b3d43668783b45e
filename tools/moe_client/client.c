/* gRPC C-core client plumbing for moe-client: one completion queue per call, pluck only (the
 * calls are driven by the thread that makes them). */
#include "tools/moe_client/client.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

struct moe_rpc_client {
    grpc_channel *ch;
    char *auth; /* "Bearer KEY" or NULL */
};

struct moe_rpc_stream {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code status;
    grpc_slice details;
    bool got_md, decode_failed, status_started;
};

enum { TAG_SEND = 1, TAG_STATUS = 2, TAG_RECV = 3 };

moe_rpc_client *moe_rpc_connect(const char *addr) { return moe_rpc_connect_secure(addr, NULL); }

moe_rpc_client *moe_rpc_connect_secure(const char *addr, const moe_rpc_security *sec)
{
    moe_rpc_client *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    grpc_init();
    /* Responses can be large (ClusterStatus of a big cluster); requests are bounded server-side. */
    grpc_arg arg = {.type = GRPC_ARG_INTEGER,
                    .key = (char *)(uintptr_t)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                    .value.integer = 64 << 20};
    grpc_channel_args args = {.num_args = 1, .args = &arg};
    grpc_channel_credentials *creds;
    if (sec && sec->tls) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = sec->key_pem, .cert_chain = sec->cert_pem};
        creds = grpc_ssl_credentials_create(sec->ca_pem, sec->cert_pem ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    if (sec && sec->api_key) {
        size_t n = strlen(sec->api_key) + 8;
        if ((c->auth = malloc(n)))
            snprintf(c->auth, n, "Bearer %s", sec->api_key);
    }
    c->ch = grpc_channel_create(addr, creds, &args);
    grpc_channel_credentials_release(creds);
    return c;
}

void moe_rpc_close(moe_rpc_client *c)
{
    if (!c)
        return;
    grpc_channel_destroy(c->ch);
    free(c->auth);
    free(c);
    grpc_shutdown();
}

static bool pluck(grpc_completion_queue *cq, intptr_t tag)
{
    grpc_event ev = grpc_completion_queue_pluck(cq, (void *)tag, gpr_inf_future(GPR_CLOCK_REALTIME),
                                                NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

moe_rpc_stream *moe_rpc_stream_open(moe_rpc_client *c, const char *method,
                                    const ProtobufCMessage *req, int64_t timeout_ms)
{
    moe_rpc_stream *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline =
        timeout_ms > 0 ? gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                                      gpr_time_from_millis(timeout_ms, GPR_TIMESPAN))
                       : gpr_inf_future(GPR_CLOCK_REALTIME);
    grpc_slice m = grpc_slice_from_copied_string(method);
    s->call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, m, NULL,
                                       deadline, NULL);
    grpc_slice_unref(m);
    grpc_metadata_array_init(&s->md_init);
    grpc_metadata_array_init(&s->md_trail);

    size_t n = protobuf_c_message_get_packed_size(req);
    grpc_slice body = grpc_slice_malloc(n);
    protobuf_c_message_pack(req, GRPC_SLICE_START_PTR(body));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);

    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    grpc_metadata md = {.key = grpc_slice_from_static_string("authorization"),
                        .value = c->auth ? grpc_slice_from_copied_string(c->auth) : grpc_empty_slice()};
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->auth) {
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &md;
    }
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    grpc_call_error e1 = grpc_call_start_batch(s->call, ops, 3, (void *)(intptr_t)TAG_SEND, NULL);
    grpc_op st;
    memset(&st, 0, sizeof(st));
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &s->md_trail;
    st.data.recv_status_on_client.status = &s->status;
    st.data.recv_status_on_client.status_details = &s->details;
    grpc_call_error e2 = grpc_call_start_batch(s->call, &st, 1, (void *)(intptr_t)TAG_STATUS, NULL);
    s->status_started = e2 == GRPC_CALL_OK;
    if (e1 == GRPC_CALL_OK)
        pluck(s->cq, TAG_SEND); /* a failed send shows in the status */
    grpc_byte_buffer_destroy(bb);
    grpc_slice_unref(md.value);
    if (e1 != GRPC_CALL_OK || e2 != GRPC_CALL_OK) {
        grpc_call_cancel(s->call, NULL);
        moe_rpc_stream_close(s, NULL, 0);
        return NULL;
    }
    return s;
}

ProtobufCMessage *moe_rpc_stream_next(moe_rpc_stream *s, const ProtobufCMessageDescriptor *desc)
{
    if (s->decode_failed)
        return NULL;
    grpc_byte_buffer *recv = NULL;
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    if (!s->got_md) {
        ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
        s->got_md = true;
    }
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n++].data.recv_message.recv_message = &recv;
    if (grpc_call_start_batch(s->call, ops, n, (void *)(intptr_t)TAG_RECV, NULL) != GRPC_CALL_OK)
        return NULL;
    pluck(s->cq, TAG_RECV);
    if (!recv)
        return NULL;
    grpc_byte_buffer_reader rd;
    ProtobufCMessage *m = NULL;
    if (grpc_byte_buffer_reader_init(&rd, recv)) {
        grpc_slice sl = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
        m = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
        grpc_slice_unref(sl);
    }
    grpc_byte_buffer_destroy(recv);
    if (!m) {
        s->decode_failed = true;
        grpc_call_cancel(s->call, NULL);
    }
    return m;
}

void moe_rpc_stream_cancel(moe_rpc_stream *s) { grpc_call_cancel(s->call, NULL); }

grpc_status_code moe_rpc_stream_close(moe_rpc_stream *s, char *details, size_t cap)
{
    if (s->status_started)
        pluck(s->cq, TAG_STATUS);
    else
        s->status = GRPC_STATUS_INTERNAL; /* details stay the empty slice calloc made */
    grpc_status_code code = s->decode_failed ? GRPC_STATUS_INTERNAL : s->status;
    if (details && cap > 0) {
        const char *src = s->decode_failed ? "a response message did not decode"
                                           : (const char *)GRPC_SLICE_START_PTR(s->details);
        size_t len = s->decode_failed ? strlen(src) : GRPC_SLICE_LENGTH(s->details);
        if (len >= cap)
            len = cap - 1;
        memcpy(details, src, len);
        details[len] = '\0';
    }
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->md_init);
    grpc_metadata_array_destroy(&s->md_trail);
    grpc_call_unref(s->call);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_pluck(s->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s->cq);
    free(s);
    return code;
}

grpc_status_code moe_rpc_unary(moe_rpc_client *c, const char *method, const ProtobufCMessage *req,
                               int64_t timeout_ms, const ProtobufCMessageDescriptor *resp_desc,
                               ProtobufCMessage **resp, char *details, size_t cap)
{
    *resp = NULL;
    moe_rpc_stream *s = moe_rpc_stream_open(c, method, req, timeout_ms);
    if (!s) {
        if (details && cap > 0)
            snprintf(details, cap, "could not start the call");
        return GRPC_STATUS_INTERNAL;
    }
    ProtobufCMessage *m = moe_rpc_stream_next(s, resp_desc);
    grpc_status_code code = moe_rpc_stream_close(s, details, cap);
    if (code == GRPC_STATUS_OK && !m) {
        if (details && cap > 0)
            snprintf(details, cap, "OK without a response message");
        code = GRPC_STATUS_INTERNAL;
    }
    if (code != GRPC_STATUS_OK && m) {
        protobuf_c_message_free_unpacked(m, NULL);
        m = NULL;
    }
    *resp = m;
    return code;
}
