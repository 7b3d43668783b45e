/* A small gRPC C-core client for the moeserve.v1 API: connect, unary calls and server streams of
 * protobuf-c messages. Used by moe-client; any tool may compile tools/moe_client/client.c in. */
#ifndef MOE_TOOLS_CLIENT_H
#define MOE_TOOLS_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <grpc/grpc.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

typedef struct moe_rpc_client moe_rpc_client;
typedef struct moe_rpc_stream moe_rpc_stream;

/* How to reach a server started with --tls-cert / --api-key-file (all NULL: plaintext, no key).
 * ca_pem: trust this CA (else the system roots); cert_pem + key_pem: a client certificate (mTLS);
 * api_key: sent as metadata `authorization: Bearer KEY` on every call. Strings are copied. */
typedef struct {
    const char *ca_pem, *cert_pem, *key_pem, *api_key;
    bool tls;
} moe_rpc_security;

/* Opens a channel to "HOST:PORT" (calls grpc_init; the connection is made by the first call),
 * plaintext unless sec->tls (sec may be NULL). Returns NULL on allocation failure. */
moe_rpc_client *moe_rpc_connect_secure(const char *addr, const moe_rpc_security *sec);
/* moe_rpc_connect_secure(addr, NULL): plaintext, no key. */
moe_rpc_client *moe_rpc_connect(const char *addr);
void moe_rpc_close(moe_rpc_client *c);

/* Calls a unary method ("/pkg.Service/Method") with `req`, waiting at most timeout_ms. On OK,
 * *resp is the decoded response (free with protobuf_c_message_free_unpacked), or the call fails
 * with INTERNAL when the response does not decode. The status details go to details (may be NULL). */
grpc_status_code moe_rpc_unary(moe_rpc_client *c, const char *method, const ProtobufCMessage *req,
                               int64_t timeout_ms, const ProtobufCMessageDescriptor *resp_desc,
                               ProtobufCMessage **resp, char *details, size_t cap);

/* Starts a server-streaming call (sends `req` and half-closes). NULL on a local failure. */
moe_rpc_stream *moe_rpc_stream_open(moe_rpc_client *c, const char *method,
                                    const ProtobufCMessage *req, int64_t timeout_ms);
/* Next message, decoded with desc; NULL at the end of the stream (or when a message does not
 * decode: then close reports INTERNAL). Blocks until a message or the end arrives. */
ProtobufCMessage *moe_rpc_stream_next(moe_rpc_stream *s, const ProtobufCMessageDescriptor *desc);
/* Cancels the call (the server sees CANCELLED). */
void moe_rpc_stream_cancel(moe_rpc_stream *s);
/* Waits for the final status, copies its details, frees the stream. */
grpc_status_code moe_rpc_stream_close(moe_rpc_stream *s, char *details, size_t cap);

#endif
