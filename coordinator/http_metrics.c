/* GET /metrics on the HTTP port: the Prometheus exposition (coordinator/metrics.c) of the
 * shared request accounting and the backend's cluster snapshot. */
#include <stdlib.h>

#include "coordinator/http_internal.h"
#include "coordinator/metrics.h"

enum MHD_Result moe_http_handle_metrics(moe_http_server *s, struct MHD_Connection *conn)
{
    moe_fe_stats_snapshot *fs = malloc(sizeof(*fs));
    moe_cluster_status *cs = calloc(1, sizeof(*cs));
    char *text = NULL;
    size_t len = 0;
    moe_status st = fs && cs ? MOE_OK : moe_error(MOE_ERR_NOMEM, "/metrics: out of memory");
    if (st == MOE_OK) {
        moe_fe_stats_get(s->stats, fs);
        bool have_cs = s->be.cluster_status && s->be.cluster_status(s->be.ctx, cs) == MOE_OK;
        st = moe_metrics_render(fs, have_cs ? cs : NULL, s->model, s->be.healthy(s->be.ctx),
                                &text, &len);
        moe_cluster_status_release(cs);
    }
    free(fs);
    free(cs);
    if (st != MOE_OK)
        return moe_http_reply_error(conn, 500, moe_error_message(), NULL);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, MOE_METRICS_CONTENT_TYPE);
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}
