/* The cluster link over UCX (see ctrl/link.h): the coordinator listens, ranks join with the
 * cluster token and reach each other directly; the same UCX worker carries the bulk KV bytes of
 * worker/comm_ucx.c. Every endpoint runs in UCX's peer-failure mode, so a dead peer is an error in
 * milliseconds (connection reset) rather than a hang; a hung peer is the heartbeats' business.
 *
 * The join: the rank connects to the coordinator's listener and sends Join (its hello bytes, its
 * UCX worker address, a client nonce); the coordinator answers with a challenge nonce; the rank
 * proves it holds the token with HMAC-SHA256(token, "moeserve-join" | both nonces), never sending
 * the token itself; the coordinator checks it, assigns a member id and tells every member the new
 * member's worker address (and tells the newcomer everyone else's), then raises MOE_LINK_JOINED.
 * A wrong token is refused, logged with the peer's address, and the connection closed. Members
 * connect to each other on first send, from the address the coordinator gave; a rank accepts
 * messages only from members the coordinator announced (anything else is dropped and logged). */
#ifndef MOE_CTRL_LINK_UCX_H
#define MOE_CTRL_LINK_UCX_H

#include <stdint.h>

#include "ctrl/link.h"

typedef struct {
    /* Coordinator: "ADDR:PORT" to listen on (port 0 picks one: moe_link_ucx_port tells it).
     * Rank: "HOST:PORT" of the coordinator's listener. */
    const char *addr;
    /* The shared cluster token (moe_link_read_token); required, at least 16 bytes. */
    const char *token;
    /* Rank only: opaque bytes handed to the coordinator's MOE_LINK_JOINED event (the instance's
     * description, a cluster.proto message) and how long a join may take. */
    const void *hello;
    size_t hello_len;
    int timeout_ms;
    /* Host label for status tables ("" or NULL: the peer address as seen by the coordinator). */
    const char *host;
} moe_link_ucx_opts;

/* Coordinator: listen. INVALID_ARG for a bad address or a short token, UNAVAILABLE when UCX
 * cannot listen there (the message names the address and UCX's reason). */
moe_status moe_link_ucx_listen(const moe_link_ucx_opts *o, moe_link **out);
/* The port the coordinator listens on. */
int moe_link_ucx_port(const moe_link *l);

/* Rank: join the coordinator at o->addr (blocks up to o->timeout_ms). UNAVAILABLE when nothing
 * answers there in time, PERMISSION when the coordinator refused the token. On success
 * moe_link_self is the new member id. */
moe_status moe_link_ucx_join(const moe_link_ucx_opts *o, moe_link **out);
/* Rank: after MOE_LINK_LOST of the coordinator (or to re-register), drop every connection and
 * join again under a new member id (same options). Sends to old member ids fail from here on. */
moe_status moe_link_ucx_rejoin(moe_link *l);

/* The UCX worker under the link and the endpoint to a member (created on first use), for
 * worker/comm_ucx.c. NULL when member is unknown or lost. The types are ucp_worker_h and
 * ucp_ep_h; void * keeps <ucp/api/ucp.h> out of this header. */
void *moe_link_ucx_worker(moe_link *l);
void *moe_link_ucx_ep(moe_link *l, int member);

/* Reads the cluster token: from the file named by path if path is set, else from the environment
 * variable MOESERVE_CLUSTER_TOKEN; trailing whitespace is dropped. INVALID_ARG when neither gives
 * at least 16 bytes (the message says where it looked). *out is malloc'd. */
moe_status moe_link_read_token(const char *path, char **out);

#endif
