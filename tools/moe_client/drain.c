/* moe-client drain INSTANCE: sends Drain, then watches ClusterStatus until the instance is empty
 * (its requests migrated away or finished), the path to scaling it down. */
#include "tools/moe_client/drain.h"

#include <inttypes.h>
#include <stdio.h>
#include <time.h>

#include "common/clock.h"
#include "moeserve.pb-c.h"

static int failed(const char *what, const char *addr, grpc_status_code code, const char *details)
{
    fprintf(stderr, "moe-client: %s on %s failed: status %d: %s\n", what, addr, (int)code,
            details[0] ? details : "(no details)");
    return 1;
}

/* The instance's row in a fresh ClusterStatus; NULL (status printed) on failure. */
static ProtobufCMessage *status(moe_rpc_client *c, const char *addr, uint32_t instance,
                                const Moeserve__V1__Instance **row)
{
    Moeserve__V1__ClusterStatusRequest req;
    moeserve__v1__cluster_status_request__init(&req);
    ProtobufCMessage *m = NULL;
    char details[1024] = "";
    grpc_status_code code = moe_rpc_unary(c, "/moeserve.v1.Moeserve/ClusterStatus", &req.base,
                                          10000, &moeserve__v1__cluster_status_response__descriptor,
                                          &m, details, sizeof details);
    if (code != GRPC_STATUS_OK) {
        failed("ClusterStatus", addr, code, details);
        return NULL;
    }
    const Moeserve__V1__ClusterStatusResponse *r = (const Moeserve__V1__ClusterStatusResponse *)m;
    *row = NULL;
    for (size_t i = 0; i < r->n_instances; i++)
        if (r->instances[i]->id == instance)
            *row = r->instances[i];
    return m;
}

int moe_client_drain(moe_rpc_client *c, const char *addr, uint32_t instance, bool undo,
                     bool no_wait, int64_t timeout_ms)
{
    Moeserve__V1__DrainRequest req;
    moeserve__v1__drain_request__init(&req);
    req.instance = instance;
    req.undo = undo;
    ProtobufCMessage *m = NULL;
    char details[1024] = "";
    grpc_status_code code = moe_rpc_unary(
        c, "/moeserve.v1.Moeserve/Drain", &req.base, timeout_ms < 30000 ? timeout_ms : 30000,
        &moeserve__v1__drain_response__descriptor, &m, details, sizeof details);
    if (code != GRPC_STATUS_OK)
        return failed("Drain", addr, code, details);
    const Moeserve__V1__Instance *in = ((const Moeserve__V1__DrainResponse *)m)->instance;
    if (in)
        printf("instance %" PRIu32 ": %s, %" PRIu32 " running, %" PRIu32 " KV blocks in use\n",
               in->id, undo ? "takes requests again" : "draining", in->running, in->kv_blocks_used);
    protobuf_c_message_free_unpacked(m, NULL);
    if (undo || no_wait)
        return 0;
    int64_t deadline = moe_now_ns() + timeout_ms * 1000000, next_print = 0;
    for (;;) {
        const Moeserve__V1__Instance *row;
        ProtobufCMessage *sm = status(c, addr, instance, &row);
        if (!sm)
            return 1;
        bool done = row && row->kv_blocks_used == 0 && row->running == 0 && row->waiting == 0;
        int64_t now = moe_now_ns();
        if (row && (done || now >= next_print)) {
            printf("instance %" PRIu32 ": %" PRIu32 " running, %" PRIu32 " waiting, %" PRIu32
                   " KV blocks in use%s\n",
                   row->id, row->running, row->waiting, row->kv_blocks_used,
                   done ? ": drained" : "");
            fflush(stdout);
            next_print = now + 1000000000;
        }
        protobuf_c_message_free_unpacked(sm, NULL);
        if (done)
            return 0;
        if (now > deadline) {
            fprintf(stderr,
                    "moe-client: instance %" PRIu32 " still holds requests after %" PRId64
                    " ms (it stays draining; see moe-client status)\n",
                    instance, timeout_ms);
            return 1;
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100000000};
        nanosleep(&ts, NULL);
    }
}
