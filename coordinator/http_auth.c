/* The HTTP front end's gate: client certificates (mTLS) and API keys, checked once per request
 * before its body is read. */
#include <stdlib.h>
#include <string.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "coordinator/http_internal.h"

/* libmicrohttpd asks for client certificates when given a trust store but does not insist:
 * a request without a verified one is refused here. */
static bool client_cert_ok(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (!ci || !ci->tls_session)
        return false;
    gnutls_session_t ses = (gnutls_session_t)ci->tls_session;
    unsigned int n = 0;
    if (!gnutls_certificate_get_peers(ses, &n) || n == 0)
        return false;
    unsigned int verdict = 1;
    return gnutls_certificate_verify_peers2(ses, &verdict) == 0 && verdict == 0;
}

bool moe_http_authorized(moe_http_server *s, struct MHD_Connection *conn, const char *url,
                         int *key, enum MHD_Result *reply)
{
    *key = -1;
    if (s->cfg.tls.cert && s->cfg.tls.client_ca && !client_cert_ok(conn)) {
        *reply = moe_http_reply_error(conn, 403, "a client certificate signed by the server's "
                                      "--tls-client-ca is required", NULL);
        return false;
    }
    if (!s->cfg.auth || strcmp(url, "/health") == 0) /* probes carry no key */
        return true;
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (moe_auth_check(s->cfg.auth, v, v ? strlen(v) : 0, key) != MOE_AUTH_NONE)
        return true;
    moe_fe_stats_unauthenticated(s->stats);
    const char *msg = v ? "Incorrect API key provided" : "Missing API key: send `Authorization: Bearer KEY`";
    char *j = moe_http_error_json(401, msg, NULL);
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(j), j, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(j);
        *reply = MHD_NO;
        return false;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    *reply = MHD_queue_response(conn, 401, r);
    MHD_destroy_response(r);
    return false;
}
