/* The coordinator's HTTP front end: the OpenAI-compatible API (POST /v1/completions,
 * /v1/chat/completions with Server-Sent Events streaming, GET /v1/models) plus POST /tokenize,
 * /detokenize and GET /health, served by libmicrohttpd on its own threads and feeding the same
 * backend (coordinator/frontend.h) and validation (coordinator/validate.h) as gRPC.
 *
 * Why libmicrohttpd over libevent's evhttp (both in Debian): it parses HTTP/1.0 and 1.1
 * (keep-alive, pipelining, chunked uploads, Expect: 100-continue) with limits on header size,
 * connections and idle time built in, and runs its own threads (one per connection here, so a
 * streamed response can wait for the backend without an event loop of ours); evhttp would need
 * our own event-loop thread, cross-thread wake-ups and its looser request limits. */
#ifndef MOE_COORDINATOR_HTTP_SERVER_H
#define MOE_COORDINATOR_HTTP_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include "common/chat_template.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/auth.h"
#include "coordinator/fe_stats.h"
#include "coordinator/frontend.h"
#include "coordinator/validate.h"

typedef struct moe_http_server moe_http_server;

typedef struct {
    const char *listen_addr;   /* "HOST:PORT" (IPv4 dotted or [IPv6]); port 0 picks a free one */
    const char *model_name;    /* the id /v1/models lists and requests must name */
    size_t max_body_bytes;     /* larger request bodies get 413 */
    unsigned max_connections;  /* more are refused by libmicrohttpd */
    unsigned idle_timeout_s;   /* a connection idle this long (slow clients) is closed */
    moe_validate_limits limits;
    const moe_chat_template *chat_template; /* NULL: chat requests get 400 naming the template */
    const char *chat_template_error;        /* why there is none (shown in that 400) */
    const moe_tokenizer *tokenizer;         /* for /detokenize; NULL: 501 */
    moe_fe_stats *stats; /* request accounting shared with gRPC (borrowed, outlives the server);
                            NULL: the server keeps its own */
    /* API keys (borrowed; NULL: open). Every path but GET /health needs `Authorization: Bearer
     * KEY`, else 401. */
    const moe_auth *auth;
    /* HTTPS (NULL cert: plain HTTP); with client_ca a request without a certificate it signed
     * gets 403. */
    moe_tls_pem tls;
} moe_http_server_config;

/* listen_addr NULL (must be set), 8 MiB bodies, 1024 connections, 60 s idle timeout, limits
 * from moe_validate_limits_default(vocab_size, context_len). */
void moe_http_server_config_default(moe_http_server_config *cfg, int32_t vocab_size,
                                    uint32_t context_len);

/* Binds and starts serving. `backend` is copied; its ctx, the template and the tokenizer must
 * outlive the server. MOE_ERR_INVALID_ARG on a bad address or config, MOE_ERR_IO when it cannot
 * bind. */
moe_status moe_http_server_start(const moe_http_server_config *cfg,
                                 const moe_frontend_backend *backend, moe_http_server **out);

int moe_http_server_port(const moe_http_server *s);

/* Stops accepting, cancels the open generations (the backend gets cancel for each) and waits up
 * to grace_s for their terminal calls, then stops the threads and frees the server. NULL: no-op. */
void moe_http_server_free(moe_http_server *s, double grace_s);

#endif
