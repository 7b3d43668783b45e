/* The gRPC front end over real sockets: an in-process server on 127.0.0.1:0 with a test backend
 * (defined here) that produces deterministic tokens from its own thread on timers, and a C-core
 * gRPC client. Streaming, concurrency, cancel, deadlines, validation, admission errors, health,
 * size limits, Tokenize, ClusterStatus and shutdown with open streams. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "common/clock.h"
#include "coordinator/frontend.h"
#include "coordinator/grpc_server.h"
#include "health.pb-c.h"
#include "moeserve.pb-c.h"

#define VOCAB 1000
#define CONTEXT 256
#define MAX_NEW 200
#define BOS 256

/* =============================================================================================
 * Test backend: byte tokenizer (id = byte, BOS = 256); request with a prompt of p tokens
 * generates token i = 'a' + (p + i) % 26, pushed k = 1 + p % 3 at a time every step_ns, then a
 * text-only push of "." and finish(LENGTH). priority 97: fails with UNAVAILABLE after 3 tokens. */

typedef struct seq {
    struct seq *next;
    uint64_t handle;
    moe_frontend_req *stream;
    const moe_gen_request *req;
    uint32_t emitted;
    int64_t due_ns;
    bool cancelled;
} seq;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    bool stop;
    seq *list;
    uint64_t next_handle;
    int capacity;
    int active;
    int64_t step_ns;
    atomic_bool healthy;
    atomic_bool workers_gone;
    atomic_bool paused; /* no tokens while set: holds streams open for as long as a test needs */
    int n_submits, n_cancels, n_terminal;
    char cancelled_ids[64][MOE_REQUEST_ID_MAX + 1];
    /* what each submit asked for, in order (the first 64) */
    uint64_t seeds[64], groups[64];
    uint32_t group_n[64];
    char submitted_ids[64][MOE_REQUEST_ID_MAX + 1];
} test_backend;

static test_backend tb;

static uint32_t expected_token(uint32_t n_prompt, uint32_t i) { return 'a' + (n_prompt + i) % 26; }

static void *backend_thread(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&tb.mu);
    while (!tb.stop) {
        int64_t now = moe_now_ns();
        int64_t next_due = now + 1000000000;
        for (seq **pp = &tb.list; *pp;) {
            seq *s = *pp;
            if (s->due_ns > now) {
                if (s->due_ns < next_due)
                    next_due = s->due_ns;
                pp = &s->next;
                continue;
            }
            const moe_gen_request *r = s->req;
            bool done = false;
            if (!s->cancelled && atomic_load(&tb.paused)) {
                s->due_ns = now + tb.step_ns;
                if (s->due_ns < next_due)
                    next_due = s->due_ns;
                pp = &s->next;
                continue;
            }
            if (s->cancelled) {
                moe_frontend_error(s->stream, MOE_ERR_CANCELLED, "cancelled");
                done = true;
            } else if (r->priority == 97 && s->emitted >= 3) {
                moe_frontend_error(s->stream, MOE_ERR_UNAVAILABLE, "test backend: worker rank 3 lost");
                done = true;
            } else {
                uint32_t k = 1 + r->n_prompt % 3;
                if (k > r->max_new_tokens - s->emitted)
                    k = r->max_new_tokens - s->emitted;
                int32_t ids[3];
                uint32_t idx[3];
                char text[4];
                for (uint32_t j = 0; j < k; j++) {
                    ids[j] = (int32_t)expected_token(r->n_prompt, s->emitted + j);
                    idx[j] = s->emitted + j;
                    text[j] = (char)ids[j];
                }
                cr_assert_eq(moe_frontend_push_tokens(s->stream, ids, idx, k, text, k), MOE_OK);
                s->emitted += k;
                if (s->emitted == r->max_new_tokens) {
                    cr_assert_eq(moe_frontend_push_tokens(s->stream, NULL, NULL, 0, ".", 1), MOE_OK);
                    moe_frontend_finish_info fi = {.reason = MOE_FINISH_LENGTH};
                    moe_frontend_finish(s->stream, &fi);
                    done = true;
                } else {
                    s->due_ns = now + tb.step_ns;
                    if (s->due_ns < next_due)
                        next_due = s->due_ns;
                }
            }
            if (done) {
                tb.n_terminal++;
                tb.active--;
                *pp = s->next;
                free(s);
                pthread_cond_broadcast(&tb.cv);
            } else {
                pp = &s->next;
            }
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t wait = next_due - moe_now_ns();
        if (wait > 0) {
            int64_t t = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + wait;
            ts.tv_sec = t / 1000000000;
            ts.tv_nsec = t % 1000000000;
            pthread_cond_timedwait(&tb.cv, &tb.mu, &ts);
        }
    }
    pthread_mutex_unlock(&tb.mu);
    return NULL;
}

static moe_status tb_submit(void *ctx, const moe_gen_request *req, moe_frontend_req *stream,
                            uint64_t *handle)
{
    (void)ctx;
    if (atomic_load(&tb.workers_gone))
        return moe_error(MOE_ERR_UNAVAILABLE, "test backend: no live workers");
    pthread_mutex_lock(&tb.mu);
    if (tb.active >= tb.capacity) {
        int active = tb.active;
        pthread_mutex_unlock(&tb.mu);
        return moe_error(MOE_ERR_FULL, "test backend: queue full (%d running)", active);
    }
    cr_assert_eq(moe_frontend_request(stream), req);
    seq *s = calloc(1, sizeof(*s));
    s->handle = ++tb.next_handle;
    s->stream = stream;
    s->req = req;
    s->due_ns = moe_now_ns() + tb.step_ns;
    s->next = tb.list;
    tb.list = s;
    tb.active++;
    if (tb.n_submits < 64) {
        tb.seeds[tb.n_submits] = req->sampling.seed;
        tb.groups[tb.n_submits] = req->prefill_group;
        tb.group_n[tb.n_submits] = req->prefill_group_n;
        snprintf(tb.submitted_ids[tb.n_submits], sizeof(tb.submitted_ids[0]), "%s",
                 req->request_id);
    }
    tb.n_submits++;
    *handle = s->handle;
    pthread_cond_broadcast(&tb.cv);
    pthread_mutex_unlock(&tb.mu);
    return MOE_OK;
}

static void tb_cancel(void *ctx, uint64_t handle)
{
    (void)ctx;
    pthread_mutex_lock(&tb.mu);
    for (seq *s = tb.list; s; s = s->next) {
        if (s->handle == handle && !s->cancelled) {
            s->cancelled = true;
            s->due_ns = 0;
            if (tb.n_cancels < 64)
                snprintf(tb.cancelled_ids[tb.n_cancels], sizeof(tb.cancelled_ids[0]), "%s",
                         s->req->request_id);
            tb.n_cancels++;
        }
    }
    pthread_cond_broadcast(&tb.cv);
    pthread_mutex_unlock(&tb.mu);
}

static moe_status tb_tokenize(void *ctx, const char *text, size_t len, bool add_special,
                              int32_t *ids, size_t cap, size_t *n_out)
{
    (void)ctx;
    size_t n = 0;
    if (add_special) {
        if (n < cap)
            ids[n] = BOS;
        n++;
    }
    for (size_t i = 0; i < len; i++, n++)
        if (n < cap)
            ids[n] = (unsigned char)text[i];
    *n_out = n;
    return MOE_OK;
}

static moe_status tb_status(void *ctx, moe_cluster_status *out)
{
    (void)ctx;
    snprintf(out->model, sizeof(out->model), "test-model");
    out->world_size = 5;
    out->n_instances = 3;
    const moe_pool_kind pools[3] = {MOE_POOL_PREFILL, MOE_POOL_DECODE, MOE_POOL_DECODE};
    const int ranks[3][2] = {{1, 0}, {2, 3}, {4, 0}};
    const uint32_t eps[3] = {1, 2, 1};
    for (int i = 0; i < 3; i++) {
        moe_instance_status *is = &out->instances[i];
        is->id = (uint32_t)i;
        is->pool = pools[i];
        is->state = MOE_INSTANCE_READY;
        is->ep_size = eps[i];
        for (uint32_t r = 0; r < eps[i]; r++)
            is->ranks[r] = ranks[i][r];
        is->kv_blocks_total = 100;
        is->kv_blocks_used = (uint32_t)(10 * i);
        is->kv_blocks_free = 100 - (uint32_t)(10 * i);
        is->kv_block_tokens = 16;
        is->running = (uint32_t)i;
        is->waiting = 1;
    }
    out->counters.kv_transfers = 7;
    out->counters.kv_transfer_recomputes = 2;
    out->counters.migrations = 3;
    return MOE_OK;
}

static bool tb_healthy(void *ctx)
{
    (void)ctx;
    return atomic_load(&tb.healthy);
}

static moe_grpc_server *srv;
static grpc_channel *chan;

static void start_server_with(size_t max_request_bytes, int capacity, int64_t step_ns)
{
    grpc_init();
    memset(&tb, 0, sizeof(tb));
    pthread_mutex_init(&tb.mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&tb.cv, &ca);
    tb.capacity = capacity;
    tb.step_ns = step_ns;
    atomic_store(&tb.healthy, true);
    cr_assert_eq(pthread_create(&tb.thread, NULL, backend_thread, NULL), 0);

    moe_grpc_server_config cfg;
    moe_grpc_server_config_default(&cfg, VOCAB, CONTEXT);
    cfg.listen_addr = "127.0.0.1:0";
    cfg.max_request_bytes = max_request_bytes;
    cfg.limits.max_new_tokens = MAX_NEW;
    moe_frontend_backend be = {
        .ctx = &tb, .submit = tb_submit, .cancel = tb_cancel, .tokenize = tb_tokenize,
        .cluster_status = tb_status, .healthy = tb_healthy,
    };
    moe_status st = moe_grpc_server_start(&cfg, &be, &srv);
    cr_assert_eq(st, MOE_OK, "%s", moe_error_message());
    int port = moe_grpc_server_port(srv);
    cr_assert_gt(port, 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    chan = grpc_channel_create(addr, creds, NULL);
    grpc_channel_credentials_release(creds);
}

static void start_server(void) { start_server_with(64 * 1024, 64, 1000000); }

static void stop_server(void)
{
    grpc_channel_destroy(chan);
    moe_grpc_server_free(srv);
    pthread_mutex_lock(&tb.mu);
    cr_expect_eq(tb.active, 0, "backend still holds %d requests", tb.active);
    tb.stop = true;
    pthread_cond_broadcast(&tb.cv);
    pthread_mutex_unlock(&tb.mu);
    pthread_join(tb.thread, NULL);
    grpc_shutdown();
}

/* Waits (bounded) until the backend has no request left: every cancel reached it. */
static bool backend_idle_within(double secs)
{
    int64_t until = moe_now_ns() + (int64_t)(secs * 1e9);
    pthread_mutex_lock(&tb.mu);
    while (tb.active > 0 && moe_now_ns() < until) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 5000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&tb.cv, &tb.mu, &ts);
    }
    bool idle = tb.active == 0;
    pthread_mutex_unlock(&tb.mu);
    return idle;
}

/* =============================================================================================
 * A small C-core client: one completion queue per call, pluck only. */

static gpr_timespec deadline_in(int64_t ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static void *pluck(grpc_completion_queue *cq, void *tag)
{
    grpc_event ev = grpc_completion_queue_pluck(cq, tag, deadline_in(20000), NULL);
    cr_assert_eq(ev.type, GRPC_OP_COMPLETE, "client batch did not complete");
    return ev.success ? tag : NULL;
}

typedef struct {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code status;
    grpc_slice details;
    bool got_md, status_pending;
} gstream;

static void stream_open(gstream *s, const char *method, const void *req, size_t n, int64_t timeout_ms)
{
    memset(s, 0, sizeof(*s));
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice m = grpc_slice_from_static_string(method);
    s->call = grpc_channel_create_call(chan, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, m, NULL,
                                       deadline_in(timeout_ms), NULL);
    cr_assert_not_null(s->call);
    grpc_metadata_array_init(&s->md_init);
    grpc_metadata_array_init(&s->md_trail);
    grpc_slice body = grpc_slice_from_copied_buffer(req, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    cr_assert_eq(grpc_call_start_batch(s->call, ops, 3, (void *)1, NULL), GRPC_CALL_OK);
    pluck(s->cq, (void *)1);
    grpc_byte_buffer_destroy(bb);
    grpc_op st;
    memset(&st, 0, sizeof(st));
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &s->md_trail;
    st.data.recv_status_on_client.status = &s->status;
    st.data.recv_status_on_client.status_details = &s->details;
    cr_assert_eq(grpc_call_start_batch(s->call, &st, 1, (void *)2, NULL), GRPC_CALL_OK);
    s->status_pending = true;
}

/* Next message as bytes, or false at the end of the stream. */
static bool stream_next_raw(gstream *s, grpc_slice *out)
{
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
    cr_assert_eq(grpc_call_start_batch(s->call, ops, n, (void *)3, NULL), GRPC_CALL_OK);
    pluck(s->cq, (void *)3);
    if (!recv)
        return false;
    grpc_byte_buffer_reader rd;
    grpc_byte_buffer_reader_init(&rd, recv);
    *out = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    grpc_byte_buffer_destroy(recv);
    return true;
}

static Moeserve__V1__GenerateResponse *stream_next(gstream *s)
{
    grpc_slice sl;
    if (!stream_next_raw(s, &sl))
        return NULL;
    Moeserve__V1__GenerateResponse *r = moeserve__v1__generate_response__unpack(
        NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
    grpc_slice_unref(sl);
    cr_assert_not_null(r, "response does not decode");
    return r;
}

/* Waits for the status; copies its details. Frees the call. */
static grpc_status_code stream_close(gstream *s, char *details, size_t cap)
{
    pluck(s->cq, (void *)2);
    if (details) {
        size_t n = GRPC_SLICE_LENGTH(s->details);
        if (n >= cap)
            n = cap - 1;
        memcpy(details, GRPC_SLICE_START_PTR(s->details), n);
        details[n] = '\0';
    }
    grpc_status_code code = s->status;
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->md_init);
    grpc_metadata_array_destroy(&s->md_trail);
    grpc_call_unref(s->call);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_pluck(s->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s->cq);
    return code;
}

/* Unary call with raw request bytes; *resp (if given) gets the response bytes on OK. */
static grpc_status_code unary_raw(const char *method, const void *req, size_t n, grpc_slice *resp,
                                  char *details, size_t cap)
{
    gstream s;
    stream_open(&s, method, req, n, 10000);
    grpc_slice body;
    bool got = stream_next_raw(&s, &body);
    grpc_status_code code = stream_close(&s, details, cap);
    if (got) {
        if (resp && code == GRPC_STATUS_OK)
            *resp = body;
        else
            grpc_slice_unref(body);
    }
    if (resp && code == GRPC_STATUS_OK)
        cr_assert(got, "%s: OK without a response message", method);
    return code;
}

static uint8_t *pack(const ProtobufCMessage *m, size_t *n)
{
    *n = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(*n ? *n : 1);
    protobuf_c_message_pack(m, b);
    return b;
}

#define GENERATE "/moeserve.v1.Moeserve/Generate"

typedef struct {
    char text[4096];
    uint32_t ids[4096];
    uint32_t idx[4096];
    size_t n_tokens;
    size_t n_messages;
    Moeserve__V1__FinishReason finish;
    uint32_t usage_prompt, usage_completion;
    bool have_timing;
    double ttft_ms;
    char request_id[MOE_REQUEST_ID_MAX + 1];
    grpc_status_code code;
    char details[512];
} gen_result;

/* One GenerateResponse into the result of its stream (or choice). */
static void gen_result_add(gen_result *out, const Moeserve__V1__GenerateResponse *r)
{
    out->n_messages++;
    cr_assert_eq(r->n_token_ids, r->n_token_indices);
    cr_assert_eq(r->n_token_ids, r->n_token_times_ms);
    cr_assert_eq(out->finish, 0, "message after the one with finish_reason");
    for (size_t i = 0; i < r->n_token_ids && out->n_tokens < 4096; i++) {
        out->ids[out->n_tokens] = r->token_ids[i];
        out->idx[out->n_tokens] = r->token_indices[i];
        out->n_tokens++;
    }
    strncat(out->text, r->text, sizeof(out->text) - strlen(out->text) - 1);
    snprintf(out->request_id, sizeof(out->request_id), "%s", r->request_id);
    out->finish = r->finish_reason;
    if (r->usage) {
        out->usage_prompt = r->usage->prompt_tokens;
        out->usage_completion = r->usage->completion_tokens;
    }
    if (r->timing) {
        out->have_timing = true;
        out->ttft_ms = r->timing->ttft_ms;
    }
}

/* Runs a whole Generate call; with cancel_after > 0 it cancels after that many messages. */
static void run_generate(const Moeserve__V1__GenerateRequest *req, int64_t timeout_ms,
                         size_t cancel_after, gen_result *out)
{
    memset(out, 0, sizeof(*out));
    size_t n;
    uint8_t *bytes = pack(&req->base, &n);
    gstream s;
    stream_open(&s, GENERATE, bytes, n, timeout_ms);
    free(bytes);
    Moeserve__V1__GenerateResponse *r;
    while ((r = stream_next(&s))) {
        gen_result_add(out, r);
        moeserve__v1__generate_response__free_unpacked(r, NULL);
        if (cancel_after && out->n_messages == cancel_after)
            grpc_call_cancel(s.call, NULL);
    }
    out->code = stream_close(&s, out->details, sizeof(out->details));
}

static void init_text_request(Moeserve__V1__GenerateRequest *req, char *text, uint32_t max_new)
{
    moeserve__v1__generate_request__init(req);
    req->prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    req->text = text;
    req->max_new_tokens = max_new;
}

/* Checks a completed stream against the backend's deterministic output. */
static void check_stream(const gen_result *g, uint32_t n_prompt, uint32_t max_new)
{
    cr_assert_eq(g->code, GRPC_STATUS_OK, "status %s: %s", moe_grpc_status_name(g->code),
                 g->details);
    cr_assert_eq(g->n_tokens, max_new);
    char want[4096];
    for (uint32_t i = 0; i < max_new; i++) {
        cr_assert_eq(g->idx[i], i, "token %u has index %u", i, g->idx[i]);
        cr_assert_eq(g->ids[i], expected_token(n_prompt, i));
        want[i] = (char)expected_token(n_prompt, i);
    }
    want[max_new] = '.';
    want[max_new + 1] = '\0';
    cr_assert_str_eq(g->text, want);
    cr_assert_eq(g->finish, MOESERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    cr_assert_eq(g->usage_prompt, n_prompt);
    cr_assert_eq(g->usage_completion, max_new);
    cr_assert(g->have_timing);
    cr_assert_gt(g->ttft_ms, 0.0);
}

/* =============================================================================================
 * Tests */

TestSuite(grpc_server, .timeout = 60);

Test(grpc_server, generate_streams_tokens_in_order)
{
    start_server();
    Moeserve__V1__GenerateRequest req;
    char text[] = "hello";
    init_text_request(&req, text, 40);
    req.request_id = "client-id-1";
    gen_result g;
    run_generate(&req, 10000, 0, &g);
    check_stream(&g, 6 /* BOS + 5 bytes */, 40);
    cr_assert_str_eq(g.request_id, "client-id-1");
    /* 40 tokens pushed 1 at a time (6 % 3 == 0) every ms: streamed, not one final message. */
    cr_assert_gt(g.n_messages, 5, "only %zu messages: not streamed", g.n_messages);

    /* Prompt as token ids, no BOS added; 2 tokens per push. */
    Moeserve__V1__TokenIds ids;
    moeserve__v1__token_ids__init(&ids);
    uint32_t prompt[4] = {5, 999, 0, 42};
    ids.n_ids = 4;
    ids.ids = prompt;
    moeserve__v1__generate_request__init(&req);
    req.prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    req.max_new_tokens = 17;
    run_generate(&req, 10000, 0, &g);
    check_stream(&g, 4, 17);
    cr_assert(strncmp(g.request_id, "req-", 4) == 0, "server-made id: %s", g.request_id);
    stop_server();
}

/* GenerateRequest.n: the n choices' messages, split by their index. */
typedef struct {
    gen_result ch[4];
    size_t n_messages;
    grpc_status_code code;
    char details[512];
} gen_n_result;

static void run_generate_n(const Moeserve__V1__GenerateRequest *req, gen_n_result *out)
{
    memset(out, 0, sizeof(*out));
    size_t n;
    uint8_t *bytes = pack(&req->base, &n);
    gstream s;
    stream_open(&s, GENERATE, bytes, n, 10000);
    free(bytes);
    Moeserve__V1__GenerateResponse *r;
    while ((r = stream_next(&s))) {
        out->n_messages++;
        cr_assert_lt(r->index, 4, "choice index %u", r->index);
        gen_result_add(&out->ch[r->index], r);
        moeserve__v1__generate_response__free_unpacked(r, NULL);
    }
    out->code = stream_close(&s, out->details, sizeof(out->details));
    for (int i = 0; i < 4; i++)
        out->ch[i].code = out->code;
}

Test(grpc_server, n_choices_in_one_call)
{
    start_server();
    Moeserve__V1__GenerateRequest req;
    Moeserve__V1__SamplingParams sp;
    char text[] = "hello";
    init_text_request(&req, text, 20);
    moeserve__v1__sampling_params__init(&sp);
    sp.seed_opt_case = MOESERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = 1000;
    req.sampling = &sp;
    req.request_id = "many";
    req.n = 3;
    gen_n_result g;
    run_generate_n(&req, &g);
    cr_assert_eq(g.code, GRPC_STATUS_OK, "%s", g.details);
    cr_assert_eq(tb.n_submits, 3);
    for (int i = 0; i < 3; i++) {
        check_stream(&g.ch[i], 6, 20); /* each choice whole, its own finish and usage */
        cr_assert_str_eq(g.ch[i].request_id, "many");
        cr_assert_eq(tb.seeds[i], moe_api_choice_seed(1000, (uint32_t)i));
        cr_assert_neq(tb.groups[i], 0);
        cr_assert_eq(tb.groups[i], tb.groups[0], "one prefill group");
        cr_assert_eq(tb.group_n[i], 3);
    }
    cr_assert_str_eq(tb.submitted_ids[0], "many");
    cr_assert_str_eq(tb.submitted_ids[2], "many-2");
    cr_assert_eq(g.ch[3].n_tokens, 0);

    /* n = 0 and 1: one choice, no group, index 0 */
    req.n = 1;
    run_generate_n(&req, &g);
    check_stream(&g.ch[0], 6, 20);
    cr_assert_eq(tb.groups[3], 0);
    cr_assert_eq(g.ch[1].n_tokens, 0);

    /* out of range, or with prefill_group: INVALID_ARGUMENT naming the field, nothing submitted */
    int before = tb.n_submits;
    req.n = 17;
    run_generate_n(&req, &g);
    cr_assert_eq(g.code, GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strncmp(g.details, "GenerateRequest.n = 17", 22) == 0, "%s", g.details);
    req.n = 2;
    req.prefill_group = 5;
    req.prefill_group_size = 2;
    run_generate_n(&req, &g);
    cr_assert_eq(g.code, GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strncmp(g.details, "GenerateRequest.n = 2", 21) == 0, "%s", g.details);
    cr_assert_eq(tb.n_submits, before);

    /* one failing choice fails the call and the others are cancelled (priority 97 fails every
     * choice after 3 tokens; the first failure wins) */
    req.prefill_group = 0;
    req.prefill_group_size = 0;
    req.n = 3;
    req.priority = 97;
    run_generate_n(&req, &g);
    cr_assert_eq(g.code, GRPC_STATUS_UNAVAILABLE, "%s", g.details);
    pthread_mutex_lock(&tb.mu);
    while (tb.active > 0)
        pthread_cond_wait(&tb.cv, &tb.mu);
    pthread_mutex_unlock(&tb.mu);
    stop_server();
}

Test(grpc_server, n_choices_refused_when_full)
{
    /* room for 2: the third choice is refused, the call gets RESOURCE_EXHAUSTED and the two
     * admitted choices are cancelled */
    start_server_with(64 * 1024, 2, 1000000);
    atomic_store(&tb.paused, true);
    Moeserve__V1__GenerateRequest req;
    char text[] = "hi";
    init_text_request(&req, text, 50);
    req.n = 3;
    gen_n_result g;
    run_generate_n(&req, &g);
    cr_assert_eq(g.code, GRPC_STATUS_RESOURCE_EXHAUSTED, "%s", g.details);
    pthread_mutex_lock(&tb.mu);
    while (tb.active > 0)
        pthread_cond_wait(&tb.cv, &tb.mu);
    cr_assert_eq(tb.n_cancels, 2);
    pthread_mutex_unlock(&tb.mu);
    atomic_store(&tb.paused, false);
    stop_server();
}

typedef struct {
    int i;
    gen_result g;
} par_arg;

static void *par_stream(void *arg)
{
    par_arg *a = arg;
    char text[64];
    int len = 1 + a->i % 13;
    memset(text, 'x', (size_t)len);
    text[len] = '\0';
    Moeserve__V1__GenerateRequest req;
    init_text_request(&req, text, (uint32_t)(10 + 3 * a->i));
    run_generate(&req, 20000, 0, &a->g);
    return NULL;
}

Test(grpc_server, thirty_two_concurrent_streams)
{
    start_server();
    enum { N = 32 };
    static par_arg args[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        args[i].i = i;
        cr_assert_eq(pthread_create(&th[i], NULL, par_stream, &args[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < N; i++)
        check_stream(&args[i].g, (uint32_t)(2 + i % 13), (uint32_t)(10 + 3 * i));
    cr_assert_eq(tb.n_submits, N);
    stop_server();
}

/* ClusterStatus as a decoded message. */
static Moeserve__V1__ClusterStatusResponse *cluster_status(void)
{
    Moeserve__V1__ClusterStatusRequest req;
    moeserve__v1__cluster_status_request__init(&req);
    size_t n;
    uint8_t *b = pack(&req.base, &n);
    grpc_slice resp;
    char details[256];
    grpc_status_code code =
        unary_raw("/moeserve.v1.Moeserve/ClusterStatus", b, n, &resp, details, sizeof(details));
    free(b);
    cr_assert_eq(code, GRPC_STATUS_OK, "%s", details);
    Moeserve__V1__ClusterStatusResponse *r = moeserve__v1__cluster_status_response__unpack(
        NULL, GRPC_SLICE_LENGTH(resp), GRPC_SLICE_START_PTR(resp));
    grpc_slice_unref(resp);
    cr_assert_not_null(r);
    return r;
}

Test(grpc_server, cancel_mid_stream_reaches_backend)
{
    start_server();
    Moeserve__V1__GenerateRequest req;
    char text[] = "cancel me";
    init_text_request(&req, text, 190);
    req.request_id = "to-cancel";
    gen_result g;
    run_generate(&req, 10000, 3, &g);
    cr_assert_eq(g.code, GRPC_STATUS_CANCELLED, "%s: %s", moe_grpc_status_name(g.code), g.details);
    cr_assert_lt(g.n_tokens, 190);
    cr_assert(backend_idle_within(5.0), "cancel did not reach the backend");
    cr_assert_eq(tb.n_cancels, 1);
    cr_assert_str_eq(tb.cancelled_ids[0], "to-cancel");

    /* The server serves on, and its books are balanced. */
    init_text_request(&req, text, 12);
    run_generate(&req, 10000, 0, &g);
    check_stream(&g, 10, 12);
    /* The client can see the end before the server's side of the call has wound down. */
    Moeserve__V1__ClusterStatusResponse *st;
    for (int tries = 0;; tries++) {
        st = cluster_status();
        if (st->totals->active_streams == 0 || tries == 200)
            break;
        moeserve__v1__cluster_status_response__free_unpacked(st, NULL);
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    cr_assert_eq(st->counters->requests_cancelled, 1);
    cr_assert_eq(st->counters->requests_finished, 1);
    cr_assert_eq(st->counters->requests_received, 2);
    cr_assert_eq(st->totals->active_streams, 0);
    moeserve__v1__cluster_status_response__free_unpacked(st, NULL);
    stop_server();
}

Test(grpc_server, client_drops_call_reaches_backend)
{
    start_server();
    /* The client lets go of a live call without reading the end (what a crashing client's
     * library does): the server sees the stream reset. */
    Moeserve__V1__GenerateRequest req;
    char text[] = "drop";
    init_text_request(&req, text, 190);
    req.request_id = "dropped";
    size_t n;
    uint8_t *bytes = pack(&req.base, &n);
    gstream s;
    stream_open(&s, GENERATE, bytes, n, 10000);
    free(bytes);
    Moeserve__V1__GenerateResponse *r = stream_next(&s);
    cr_assert_not_null(r);
    moeserve__v1__generate_response__free_unpacked(r, NULL);
    grpc_call_unref(s.call); /* unref of a live call cancels it */
    pluck(s.cq, (void *)2);
    grpc_slice_unref(s.details);
    grpc_metadata_array_destroy(&s.md_init);
    grpc_metadata_array_destroy(&s.md_trail);
    grpc_completion_queue_shutdown(s.cq);
    while (grpc_completion_queue_pluck(s.cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s.cq);
    cr_assert(backend_idle_within(5.0), "disconnect did not reach the backend");
    cr_assert_eq(tb.n_cancels, 1);
    cr_assert_str_eq(tb.cancelled_ids[0], "dropped");
    stop_server();
}

Test(grpc_server, deadline_expiry_reaches_backend)
{
    start_server();
    Moeserve__V1__GenerateRequest req;
    char text[] = "slow";
    init_text_request(&req, text, 190); /* 190 steps of 1 ms... */
    tb.step_ns = 5000000;               /* ...made 5 ms each: ~1 s, far past the deadline */
    req.request_id = "deadline";
    int64_t t0 = moe_now_ns();
    gen_result g;
    run_generate(&req, 150, 0, &g);
    double took_ms = (double)(moe_now_ns() - t0) * 1e-6;
    cr_assert_eq(g.code, GRPC_STATUS_DEADLINE_EXCEEDED, "%s: %s", moe_grpc_status_name(g.code),
                 g.details);
    cr_assert_gt(g.n_tokens, 0, "no token streamed before the deadline");
    cr_assert_lt(took_ms, 900.0);
    cr_assert(backend_idle_within(5.0), "deadline did not reach the backend");
    cr_assert_eq(tb.n_cancels, 1);
    cr_assert_str_eq(tb.cancelled_ids[0], "deadline");
    stop_server();
}

typedef struct {
    const char *field;
    void (*tweak)(Moeserve__V1__GenerateRequest *r);
} bad_case;

static char g_long_text[400];
static char *g_many_stops[17];
static char g_long_stop[300];
static char g_long_id[200];
static Moeserve__V1__SamplingParams g_sp;
static Moeserve__V1__TokenIds g_ids;
static uint32_t g_id_buf[300];
static uint32_t g_stop_ids[1] = {VOCAB};

static void t_empty_text(Moeserve__V1__GenerateRequest *r) { r->text = ""; }
static void t_no_prompt(Moeserve__V1__GenerateRequest *r)
{
    r->prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT__NOT_SET;
}
static void t_empty_ids(Moeserve__V1__GenerateRequest *r)
{
    r->prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    g_ids.n_ids = 0;
    r->token_ids = &g_ids;
}
static void t_bad_id(Moeserve__V1__GenerateRequest *r)
{
    r->prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    g_id_buf[0] = 1, g_id_buf[1] = VOCAB + 5;
    g_ids.n_ids = 2;
    g_ids.ids = g_id_buf;
    r->token_ids = &g_ids;
}
static void t_ids_too_long(Moeserve__V1__GenerateRequest *r)
{
    r->prompt_case = MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    g_ids.n_ids = CONTEXT;
    g_ids.ids = g_id_buf;
    r->token_ids = &g_ids;
}
static void t_text_too_long(Moeserve__V1__GenerateRequest *r) { r->text = g_long_text; }
static void t_max_over_limit(Moeserve__V1__GenerateRequest *r) { r->max_new_tokens = MAX_NEW + 1; }
static void t_past_context(Moeserve__V1__GenerateRequest *r)
{
    g_long_text[100] = '\0'; /* 101 tokens + 180 > 256 */
    r->text = g_long_text;
    r->max_new_tokens = 180;
}
static void t_neg_temp(Moeserve__V1__GenerateRequest *r)
{
    g_sp.temperature_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    g_sp.temperature = -0.5f;
    r->sampling = &g_sp;
}
static void t_top_p_zero(Moeserve__V1__GenerateRequest *r)
{
    g_sp.top_p_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TOP_P_OPT_TOP_P;
    g_sp.top_p = 0.0f;
    r->sampling = &g_sp;
}
static void t_top_p_big(Moeserve__V1__GenerateRequest *r)
{
    g_sp.top_p_opt_case = MOESERVE__V1__SAMPLING_PARAMS__TOP_P_OPT_TOP_P;
    g_sp.top_p = 1.5f;
    r->sampling = &g_sp;
}
static void t_top_k_neg(Moeserve__V1__GenerateRequest *r)
{
    g_sp.top_k = -1;
    r->sampling = &g_sp;
}
static void t_many_stops(Moeserve__V1__GenerateRequest *r)
{
    r->n_stop = 17;
    r->stop = g_many_stops;
}
static void t_long_stop(Moeserve__V1__GenerateRequest *r)
{
    r->n_stop = 1;
    r->stop = g_many_stops + 16; /* points at g_long_stop */
}
static void t_empty_stop(Moeserve__V1__GenerateRequest *r)
{
    r->n_stop = 1;
    r->stop = g_many_stops + 15; /* "" */
}
static void t_bad_stop_id(Moeserve__V1__GenerateRequest *r)
{
    r->n_stop_token_ids = 1;
    r->stop_token_ids = g_stop_ids;
}
static void t_long_id(Moeserve__V1__GenerateRequest *r) { r->request_id = g_long_id; }
static void t_bad_utf8(Moeserve__V1__GenerateRequest *r) { r->text = "ab\xC3("; }

static void *background_stream(void *arg)
{
    gen_result *g = arg;
    Moeserve__V1__GenerateRequest req;
    char text[] = "background";
    init_text_request(&req, text, 150);
    run_generate(&req, 20000, 0, g);
    return NULL;
}

Test(grpc_server, validation_errors_name_the_field)
{
    start_server();
    memset(g_long_text, 'y', sizeof(g_long_text) - 1);
    for (int i = 0; i < 15; i++)
        g_many_stops[i] = "stop";
    g_many_stops[15] = "";
    memset(g_long_stop, 's', sizeof(g_long_stop) - 1);
    g_many_stops[16] = g_long_stop;
    memset(g_long_id, 'i', sizeof(g_long_id) - 1);

    /* A long stream keeps going while the bad requests are refused. */
    static gen_result bg;
    pthread_t th;
    pthread_create(&th, NULL, background_stream, &bg);

    const bad_case cases[] = {
        {"GenerateRequest.text", t_empty_text},
        {"GenerateRequest.prompt", t_no_prompt},
        {"GenerateRequest.token_ids", t_empty_ids},
        {"GenerateRequest.token_ids.ids[1]", t_bad_id},
        {"GenerateRequest.token_ids", t_ids_too_long},
        {"GenerateRequest.text", t_text_too_long},
        {"GenerateRequest.max_new_tokens", t_max_over_limit},
        {"GenerateRequest.max_new_tokens", t_past_context},
        {"GenerateRequest.sampling.temperature", t_neg_temp},
        {"GenerateRequest.sampling.top_p", t_top_p_zero},
        {"GenerateRequest.sampling.top_p", t_top_p_big},
        {"GenerateRequest.sampling.top_k", t_top_k_neg},
        {"GenerateRequest.stop", t_many_stops},
        {"GenerateRequest.stop[0]", t_long_stop},
        {"GenerateRequest.stop[0]", t_empty_stop},
        {"GenerateRequest.stop_token_ids[0]", t_bad_stop_id},
        {"GenerateRequest.request_id", t_long_id},
        {"GenerateRequest.text", t_bad_utf8},
    };
    const char *limit_words[] = {NULL,  NULL,  NULL,  "1000", "255", "255", "200", "256", ">= 0",
                                 "(0, 1]", "(0, 1]", ">= 0", "16", "256", NULL, "1000", "128", NULL};
    const size_t n_cases = sizeof(cases) / sizeof(cases[0]);
    for (size_t i = 0; i < n_cases; i++) {
        memset(&g_sp, 0, sizeof(g_sp));
        moeserve__v1__sampling_params__init(&g_sp);
        moeserve__v1__token_ids__init(&g_ids);
        g_long_text[sizeof(g_long_text) - 1] = '\0';
        memset(g_long_text, 'y', sizeof(g_long_text) - 1);
        Moeserve__V1__GenerateRequest req;
        char text[] = "ok";
        init_text_request(&req, text, 10);
        cases[i].tweak(&req);
        gen_result g;
        run_generate(&req, 10000, 0, &g);
        cr_assert_eq(g.code, GRPC_STATUS_INVALID_ARGUMENT, "case %zu (%s): %s: %s", i,
                     cases[i].field, moe_grpc_status_name(g.code), g.details);
        cr_assert(strncmp(g.details, cases[i].field, strlen(cases[i].field)) == 0,
                  "case %zu: message \"%s\" does not name %s", i, g.details, cases[i].field);
        if (limit_words[i])
            cr_assert(strstr(g.details, limit_words[i]), "case %zu: message \"%s\" lacks the limit %s",
                      i, g.details, limit_words[i]);
        cr_assert_eq(g.n_messages, 0);
    }
    pthread_join(th, NULL);
    check_stream(&bg, 11, 150);
    cr_assert_eq(tb.n_submits, 1, "an invalid request reached the backend");
    Moeserve__V1__ClusterStatusResponse *st = cluster_status();
    cr_assert_eq(st->counters->requests_rejected_invalid, n_cases);
    moeserve__v1__cluster_status_response__free_unpacked(st, NULL);
    stop_server();
}

Test(grpc_server, malformed_and_oversized_requests)
{
    start_server_with(4096, 64, 1000000);
    char details[512];
    /* Field 1 (text) as a length-delimited field claiming 100 bytes that are not there. */
    const uint8_t junk[] = {0x0a, 0x64, 'a', 'b'};
    grpc_status_code code = unary_raw(GENERATE, junk, sizeof(junk), NULL, details, sizeof(details));
    cr_assert_eq(code, GRPC_STATUS_INVALID_ARGUMENT, "%s", details);
    cr_assert(strstr(details, "GenerateRequest"), "%s", details);

    /* Over our limit: INVALID_ARGUMENT that names it. */
    static char big[6000];
    memset(big, 'z', sizeof(big) - 1);
    Moeserve__V1__GenerateRequest req;
    init_text_request(&req, big, 10);
    gen_result g;
    run_generate(&req, 10000, 0, &g);
    cr_assert_eq(g.code, GRPC_STATUS_INVALID_ARGUMENT, "%s: %s", moe_grpc_status_name(g.code),
                 g.details);
    cr_assert(strstr(g.details, "max_request_bytes") && strstr(g.details, "4096"), "%s", g.details);

    /* Over twice the limit: gRPC refuses it before we read it. */
    static char huge[20000];
    memset(huge, 'z', sizeof(huge) - 1);
    init_text_request(&req, huge, 10);
    run_generate(&req, 10000, 0, &g);
    cr_assert_eq(g.code, GRPC_STATUS_RESOURCE_EXHAUSTED, "%s: %s", moe_grpc_status_name(g.code),
                 g.details);

    /* Tokenize has the same limit. */
    Moeserve__V1__TokenizeRequest treq;
    moeserve__v1__tokenize_request__init(&treq);
    treq.text = big;
    size_t n;
    uint8_t *b = pack(&treq.base, &n);
    code = unary_raw("/moeserve.v1.Moeserve/Tokenize", b, n, NULL, details, sizeof(details));
    free(b);
    cr_assert_eq(code, GRPC_STATUS_INVALID_ARGUMENT, "%s", details);

    char text[] = "still fine";
    init_text_request(&req, text, 8);
    run_generate(&req, 10000, 0, &g);
    check_stream(&g, 11, 8);
    cr_assert_eq(tb.n_submits, 1);
    stop_server();
}

static void *hold_stream(void *arg)
{
    gen_result *g = arg;
    Moeserve__V1__GenerateRequest req;
    char text[] = "held";
    init_text_request(&req, text, 100);
    run_generate(&req, 20000, 0, g);
    return NULL;
}

Test(grpc_server, admission_errors_propagate)
{
    start_server_with(64 * 1024, 2, 1000000);
    /* Two streams, held open, fill the backend; a third gets RESOURCE_EXHAUSTED with its
     * message. */
    atomic_store(&tb.paused, true);
    static gen_result held[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, hold_stream, &held[i]);
    int64_t until = moe_now_ns() + 5000000000;
    for (;;) {
        pthread_mutex_lock(&tb.mu);
        int active = tb.active;
        pthread_mutex_unlock(&tb.mu);
        if (active == 2 || moe_now_ns() > until)
            break;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    Moeserve__V1__GenerateRequest req;
    char text[] = "third";
    init_text_request(&req, text, 5);
    gen_result g;
    run_generate(&req, 10000, 0, &g);
    cr_assert_eq(g.code, GRPC_STATUS_RESOURCE_EXHAUSTED, "%s: %s", moe_grpc_status_name(g.code),
                 g.details);
    cr_assert(strstr(g.details, "queue full"), "%s", g.details);

    /* Workers gone: UNAVAILABLE. */
    atomic_store(&tb.workers_gone, true);
    run_generate(&req, 10000, 0, &g);
    cr_assert_eq(g.code, GRPC_STATUS_UNAVAILABLE, "%s", g.details);
    cr_assert(strstr(g.details, "no live workers"), "%s", g.details);
    atomic_store(&tb.workers_gone, false);

    atomic_store(&tb.paused, false);
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        check_stream(&held[i], 5, 100);
    }

    /* A failure after admission: the tokens so far, then the backend's status. */
    req.priority = 97;
    run_generate(&req, 10000, 0, &g);
    cr_assert_eq(g.code, GRPC_STATUS_UNAVAILABLE, "%s", g.details);
    cr_assert(strstr(g.details, "worker rank 3 lost"), "%s", g.details);
    cr_assert_eq(g.n_tokens, 3 * (1 + 6 % 3));
    cr_assert_eq(g.finish, 0);

    Moeserve__V1__ClusterStatusResponse *st = cluster_status();
    cr_assert_eq(st->counters->requests_rejected_busy, 2);
    cr_assert_eq(st->counters->requests_failed, 1);
    cr_assert_eq(st->counters->requests_finished, 2);
    moeserve__v1__cluster_status_response__free_unpacked(st, NULL);
    stop_server();
}

static int health_check(const char *service, int *status_out, char *details, size_t cap)
{
    Grpc__Health__V1__HealthCheckRequest req;
    grpc__health__v1__health_check_request__init(&req);
    char svc[128];
    snprintf(svc, sizeof(svc), "%s", service);
    req.service = svc;
    size_t n;
    uint8_t *b = pack(&req.base, &n);
    grpc_slice resp;
    grpc_status_code code =
        unary_raw("/grpc.health.v1.Health/Check", b, n, &resp, details, cap);
    free(b);
    if (code == GRPC_STATUS_OK) {
        Grpc__Health__V1__HealthCheckResponse *r = grpc__health__v1__health_check_response__unpack(
            NULL, GRPC_SLICE_LENGTH(resp), GRPC_SLICE_START_PTR(resp));
        grpc_slice_unref(resp);
        cr_assert_not_null(r);
        *status_out = r->status;
        grpc__health__v1__health_check_response__free_unpacked(r, NULL);
    }
    return code;
}

Test(grpc_server, health_follows_backend)
{
    start_server();
    atomic_store(&tb.healthy, false);
    int st = -1;
    char details[256];
    cr_assert_eq(health_check("", &st, details, sizeof(details)), GRPC_STATUS_OK, "%s", details);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
    atomic_store(&tb.healthy, true);
    cr_assert_eq(health_check("", &st, details, sizeof(details)), GRPC_STATUS_OK);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    cr_assert_eq(health_check("moeserve.v1.Moeserve", &st, details, sizeof(details)),
                 GRPC_STATUS_OK);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    cr_assert_eq(health_check("other.Service", &st, details, sizeof(details)),
                 GRPC_STATUS_NOT_FOUND);
    cr_assert(strstr(details, "other.Service"), "%s", details);

    /* Watch and unknown methods: UNIMPLEMENTED, promptly. */
    Grpc__Health__V1__HealthCheckRequest req;
    grpc__health__v1__health_check_request__init(&req);
    size_t n;
    uint8_t *b = pack(&req.base, &n);
    cr_assert_eq(unary_raw("/grpc.health.v1.Health/Watch", b, n, NULL, details, sizeof(details)),
                 GRPC_STATUS_UNIMPLEMENTED);
    cr_assert_eq(unary_raw("/moeserve.v1.Moeserve/Nope", b, n, NULL, details, sizeof(details)),
                 GRPC_STATUS_UNIMPLEMENTED);
    cr_assert(strstr(details, "/moeserve.v1.Moeserve/Nope"), "%s", details);
    free(b);
    stop_server();
}

Test(grpc_server, tokenize)
{
    start_server();
    Moeserve__V1__TokenizeRequest req;
    moeserve__v1__tokenize_request__init(&req);
    req.text = "abc";
    for (int with_special = 1; with_special >= 0; with_special--) {
        if (!with_special) {
            req.add_special_tokens_opt_case =
                MOESERVE__V1__TOKENIZE_REQUEST__ADD_SPECIAL_TOKENS_OPT_ADD_SPECIAL_TOKENS;
            req.add_special_tokens = 0;
        }
        size_t n;
        uint8_t *b = pack(&req.base, &n);
        grpc_slice resp;
        char details[256];
        cr_assert_eq(unary_raw("/moeserve.v1.Moeserve/Tokenize", b, n, &resp, details,
                               sizeof(details)),
                     GRPC_STATUS_OK, "%s", details);
        free(b);
        Moeserve__V1__TokenizeResponse *r = moeserve__v1__tokenize_response__unpack(
            NULL, GRPC_SLICE_LENGTH(resp), GRPC_SLICE_START_PTR(resp));
        grpc_slice_unref(resp);
        cr_assert_not_null(r);
        size_t off = with_special ? 1 : 0;
        cr_assert_eq(r->count, 3 + off);
        cr_assert_eq(r->n_token_ids, 3 + off);
        if (with_special)
            cr_assert_eq(r->token_ids[0], BOS);
        cr_assert_eq(r->token_ids[off + 0], 'a');
        cr_assert_eq(r->token_ids[off + 2], 'c');
        cr_assert_eq(r->max_model_len, CONTEXT);
        moeserve__v1__tokenize_response__free_unpacked(r, NULL);
    }
    stop_server();
}

Test(grpc_server, cluster_status_sums_pools)
{
    start_server();
    Moeserve__V1__ClusterStatusResponse *r = cluster_status();
    cr_assert_str_eq(r->model, "test-model");
    cr_assert_str_eq(r->server_version, MOE_SERVER_VERSION);
    cr_assert_eq(r->world_size, 5);
    cr_assert(r->serving);
    cr_assert_eq(r->max_model_len, CONTEXT);
    cr_assert_eq(r->vocab_size, VOCAB);
    cr_assert_eq(r->n_instances, 3);
    cr_assert_eq(r->instances[1]->n_ranks, 2);
    cr_assert_eq(r->instances[1]->ranks[1], 3);
    cr_assert_eq(r->instances[1]->pool, MOESERVE__V1__POOL_KIND__POOL_KIND_DECODE);
    cr_assert_eq(r->n_pools, 2);
    cr_assert_eq(r->pools[0]->kind, MOESERVE__V1__POOL_KIND__POOL_KIND_PREFILL);
    cr_assert_eq(r->pools[1]->kind, MOESERVE__V1__POOL_KIND__POOL_KIND_DECODE);
    cr_assert_eq(r->pools[1]->instances, 2);
    cr_assert_eq(r->pools[1]->ranks, 3);
    cr_assert_eq(r->pools[1]->ep_size, 2);
    cr_assert_eq(r->pools[1]->kv_blocks_used, 30);
    cr_assert_eq(r->pools[1]->running, 3);
    cr_assert_eq(r->totals->instances, 3);
    cr_assert_eq(r->totals->worker_ranks, 4);
    cr_assert_eq(r->totals->kv_blocks_total, 300);
    cr_assert_eq(r->totals->kv_blocks_free, 270);
    cr_assert_eq(r->totals->waiting, 3);
    cr_assert_eq(r->counters->kv_transfers, 7);
    cr_assert_eq(r->counters->kv_transfer_recomputes, 2);
    cr_assert_eq(r->counters->migrations, 3);
    moeserve__v1__cluster_status_response__free_unpacked(r, NULL);
    stop_server();
}

Test(grpc_server, shutdown_cancels_open_streams)
{
    start_server_with(64 * 1024, 64, 5000000);
    static gen_result g;
    pthread_t th;
    pthread_create(&th, NULL, hold_stream, &g); /* 100 tokens x 5 ms */
    int64_t until = moe_now_ns() + 5000000000;
    for (;;) {
        pthread_mutex_lock(&tb.mu);
        int emitted = tb.list ? (int)tb.list->emitted : 0;
        pthread_mutex_unlock(&tb.mu);
        if (emitted > 2 || moe_now_ns() > until)
            break;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    int64_t t0 = moe_now_ns();
    moe_grpc_server_shutdown(srv, 0.1);
    double took = (double)(moe_now_ns() - t0) * 1e-9;
    pthread_join(th, NULL);
    cr_assert_neq(g.code, GRPC_STATUS_OK);
    cr_assert_gt(g.n_tokens, 0);
    cr_assert_lt(took, 3.0);
    cr_assert_eq(tb.n_cancels, 1, "shutdown did not cancel the open stream in the backend");
    stop_server();
}
