/* Decoding gRPC request messages for the protocol-neutral validation (coordinator/validate.h):
 * a GenerateRequest into a moe_api_request, and the check that no string field holds a NUL byte
 * (protobuf-c hands strings over NUL-terminated, so a NUL would silently cut them). */
#ifndef MOE_COORDINATOR_GRPC_REQUEST_H
#define MOE_COORDINATOR_GRPC_REQUEST_H

#include <stddef.h>
#include <stdint.h>
#include "common/status.h"
#include "coordinator/frontend.h"
#include "moeserve.pb-c.h"

/* Walks the top-level fields of the serialized message `buf` (of type `d`) and fails with
 * MOE_ERR_INVALID_ARG naming the first string field that holds a NUL byte
 * ("GenerateRequest.stop[1]: holds a NUL byte at offset 3 ..."). Malformed wire data is left to
 * the unpacker to refuse (MOE_OK here). */
moe_status moe_grpc_check_strings(const ProtobufCMessageDescriptor *d, const uint8_t *buf,
                                  size_t len);

/* A GenerateRequest as a moe_api_request: `req` borrows `msg`'s strings and the arrays below. */
typedef struct {
    moe_api_request req;
    int64_t *token_ids; /* owned */
    int64_t *stop_token_ids; /* owned */
    moe_api_str *stop;  /* owned */
} moe_grpc_generate;

/* Fills *out from msg (which must outlive it; strings already checked for NUL).
 * MOE_ERR_NOMEM. */
moe_status moe_grpc_generate_decode(const Moeserve__V1__GenerateRequest *msg,
                                    moe_grpc_generate *out);
void moe_grpc_generate_free(moe_grpc_generate *g);

#endif
