/* The coordinator's gRPC front end: serves moeserve.v1.Moeserve (Generate, Tokenize,
 * ClusterStatus) and grpc.health.v1.Health/Check with the gRPC C core, driven by completion-queue
 * threads, and hands validated requests to a backend (coordinator/frontend.h). */
#ifndef MOE_COORDINATOR_GRPC_SERVER_H
#define MOE_COORDINATOR_GRPC_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <grpc/grpc.h>
#include <grpc/status.h>
#include "common/status.h"
#include "coordinator/auth.h"
#include "coordinator/fe_stats.h"
#include "coordinator/frontend.h"
#include "coordinator/validate.h"

#define MOE_SERVER_VERSION "0.1.0"

typedef struct moe_grpc_server moe_grpc_server;

typedef struct {
    const char *listen_addr;  /* "HOST:PORT"; port 0 picks a free port (moe_grpc_server_port) */
    int n_threads;            /* completion-queue threads, >= 1 */
    size_t max_request_bytes; /* a request message larger than this gets INVALID_ARGUMENT naming
                                 the limit; gRPC itself refuses (RESOURCE_EXHAUSTED) messages over
                                 twice this size without reading them */
    moe_validate_limits limits;
    moe_fe_stats *stats; /* request accounting shared with the HTTP front end (borrowed, must
                            outlive the server); NULL: the server keeps its own */
    /* API keys (borrowed; NULL: open, no key needed). Every call but Health/Check needs metadata
     * `authorization: Bearer KEY` (else UNAUTHENTICATED); Drain needs an admin key (else
     * PERMISSION_DENIED). */
    const moe_auth *auth;
    /* TLS (NULL cert: plaintext); with client_ca, client certificates are required and
     * verified. */
    moe_tls_pem tls;
} moe_grpc_server_config;

/* listen_addr "0.0.0.0:50051", 2 threads, 4 MiB requests, limits from
 * moe_validate_limits_default(vocab_size, context_len). */
void moe_grpc_server_config_default(moe_grpc_server_config *cfg, int32_t vocab_size,
                                    uint32_t context_len);

/* Binds cfg->listen_addr (insecure credentials), starts the threads and serves until
 * moe_grpc_server_shutdown. `backend` is copied; its ctx must outlive the server. Calls
 * grpc_init() (balanced by moe_grpc_server_free). Fails with MOE_ERR_INVALID_ARG on a bad config
 * or required slot missing, MOE_ERR_IO when the address cannot be bound. */
moe_status moe_grpc_server_start(const moe_grpc_server_config *cfg,
                                 const moe_frontend_backend *backend, moe_grpc_server **out);

/* The port actually bound (useful with port 0). */
int moe_grpc_server_port(const moe_grpc_server *s);

/* Drains: Health answers NOT_SERVING, no new call is accepted, open calls may finish for up to
 * grace_s seconds; then the rest are cancelled (the backend gets cancel for each) and it waits,
 * up to grace_s more, for the backend's terminal calls. Idempotent. Not from a backend slot or a
 * completion-queue thread. */
void moe_grpc_server_shutdown(moe_grpc_server *s, double grace_s);

/* Shuts down (grace 0 if not done yet), joins the threads and frees the server. A request whose
 * backend never made its terminal call is leaked with a warning rather than freed under the
 * backend. NULL is a no-op. */
void moe_grpc_server_free(moe_grpc_server *s);

/* grpc status for a moe_status (as documented at moe_frontend_error). */
grpc_status_code moe_grpc_status_from_moe(moe_status s);
/* "INVALID_ARGUMENT" for GRPC_STATUS_INVALID_ARGUMENT; never NULL. */
const char *moe_grpc_status_name(grpc_status_code code);

/* The gRPC checking macro: logs a failed grpc_call_error with the expression, file and line, and
 * evaluates to true when the call succeeded. */
#define MOE_GRPC_OK(expr) moe_grpc_check_((expr), #expr, __FILE__, __LINE__)
bool moe_grpc_check_(grpc_call_error err, const char *expr, const char *file, int line);

#endif
