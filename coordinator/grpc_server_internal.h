/* Inside the gRPC front end: the call object, the server, and what its three files
 * (grpc_server.c: threads, call objects, lifecycle; grpc_unary.c: Tokenize, ClusterStatus, Drain,
 * Health/Check; grpc_generate.c: the Generate stream) call of each other. Not for use outside
 * those files. */
#ifndef MOE_COORDINATOR_GRPC_SERVER_INTERNAL_H
#define MOE_COORDINATOR_GRPC_SERVER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>

#include "coordinator/grpc_server.h"
#include "moeserve.pb-c.h"

enum call_kind { K_GENERATE, K_TOKENIZE, K_STATUS, K_HEALTH, K_DRAIN, K_UNKNOWN, K_COUNT };

/* The registered methods' paths, by kind. */
extern const char *const moe_grpc_method_path[K_UNKNOWN];

enum tag_kind { T_NEW, T_CLOSE, T_SEND, T_WAKE, T_UNARY, T_SHUTDOWN };

typedef struct {
    struct gcall *c; /* NULL for T_SHUTDOWN */
    enum tag_kind kind;
} cq_tag;

struct moe_grpc_server {
    moe_grpc_server_config cfg;
    char listen_addr[256];
    moe_frontend_backend be;
    grpc_server *server;
    grpc_completion_queue *cq;
    void *method[K_UNKNOWN];
    pthread_t *threads;
    int n_threads;
    int port;
    int64_t start_ns;
    atomic_bool draining;
    moe_frontend_lat lat; /* push -> gRPC send, per token */
    moe_fe_stats *stats;     /* cfg.stats or own_stats */
    moe_fe_stats *own_stats;

    pthread_mutex_t mu; /* guards the fields below */
    pthread_cond_t cv;
    int live_calls; /* call objects alive, pending request_call ones included */
    bool shutdown_started, shutdown_notified;
    cq_tag shutdown_tag;
};

/* One choice of a Generate call (GenerateRequest.n of them, one mostly): the stream the backend
 * holds and the events pushed to it and not yet sent. Guarded by its call's mu. */
struct gchoice {
    moe_frontend_req base; /* first: what the backend holds (frontend.h dispatches through it) */
    struct gcall *c;
    uint32_t index;
    moe_validated v;
    bool backend_holds, backend_done, submitted, cancel_sent;
    uint64_t handle;

    /* Events pushed and not yet sent. */
    uint32_t *p_ids, *p_idx;
    float *p_times;
    moe_token_logprobs *p_lp; /* when the request asked for logprobs */
    size_t p_n, p_cap;
    char *p_text;
    size_t p_text_len, p_text_cap;
    uint32_t next_index; /* index the next pushed token must have */
    bool have_finish, finish_sent;
    moe_finish_reason finish_reason;
    char *matched_stop;
    uint32_t completion_tokens; /* from the finish info, 0 = count */
    int64_t t_first_ns, t_last_ns, t_finish_ns;
};

struct gcall {
    moe_grpc_server *srv;
    enum call_kind kind;
    cq_tag t_new, t_close, t_send, t_wake, t_unary;

    /* Filled by request_call. */
    grpc_call *call;
    grpc_call_details details; /* K_UNKNOWN only */
    grpc_metadata_array req_md;
    grpc_byte_buffer *payload;
    gpr_timespec deadline;
    int cancelled_flag; /* RECV_CLOSE_ON_SERVER's output */
    int64_t arrival_ns;

    /* Batch resources alive until their batch completes. */
    grpc_byte_buffer *send_buf;
    grpc_slice status_details;
    bool have_status_details;

    /* Generate: request, written by the thread that handles the new call before it is shared. */
    Moeserve__V1__GenerateRequest *msg;
    struct gchoice *ch; /* (n_ch) choices; 0 until the request is decoded */
    uint32_t n_ch;
    bool admitted;
    moe_fe_track track; /* outcome and histograms (coordinator/fe_stats.h), Generate only */
    int key;            /* API key index (-1: none / open server) */
    bool key_held;      /* holds room under its key's limits (moe_auth_acquire) */

    pthread_mutex_t mu; /* guards everything below, and the choices */
    int refs;           /* gRPC side + one per choice the backend holds */
    int grpc_ops;       /* batches started and not completed */
    bool closed;        /* RECV_CLOSE completed */
    bool send_inflight, wake_pending, md_sent, final_started;
    bool cancel_pending; /* closed while choices were being submitted */
    uint32_t n_backend;  /* choices the backend holds */
    uint32_t rr;         /* the choice whose events go first at the next send (round robin) */
    bool have_error;
    grpc_status_code err_code;
    char *err_msg;
};

/* ---- call objects (grpc_server.c) ---- */

/* Frees a call object and everything it holds (the choices too). */
void moe_gcall_free(struct gcall *c);

/* Ends a critical section on c->mu: drops `drop` references (a handler's own), lets the gRPC
 * side go once the call is closed and no batch is outstanding, and frees the object when nobody
 * holds it. c must not be touched after this. */
void moe_gcall_unlock_and_release(struct gcall *c, int drop);

/* m packed into a new byte buffer (the caller destroys it). */
grpc_byte_buffer *moe_grpc_pack_message(const ProtobufCMessage *m);

/* The request message as one contiguous slice, or false when the client sent none. */
bool moe_grpc_read_payload(grpc_byte_buffer *payload, grpc_slice *out);

/* A unary call's whole reply in one batch (resp sent only with GRPC_STATUS_OK); the object goes
 * when the batch completes. */
void moe_gcall_unary_reply(struct gcall *c, grpc_status_code code, const char *details,
                           const ProtobufCMessage *resp);

/* Checks the request size limit; on failure replies (INVALID_ARGUMENT naming the limit) and
 * returns false. */
bool moe_gcall_check_size(struct gcall *c, const char *what);

/* ---- unary RPCs (grpc_unary.c): each replies and lets the object go ---- */
void moe_grpc_handle_health(struct gcall *c);
void moe_grpc_handle_tokenize(struct gcall *c);
void moe_grpc_handle_status(struct gcall *c);
void moe_grpc_handle_drain(struct gcall *c);

/* ---- Generate (grpc_generate.c): the call's completions ---- */
void moe_grpc_gen_start(struct gcall *c);              /* T_NEW, authorised */
void moe_grpc_gen_on_close(struct gcall *c);           /* T_CLOSE: RECV_CLOSE_ON_SERVER done */
void moe_grpc_gen_on_wake(struct gcall *c);            /* T_WAKE: the backend pushed events */
void moe_grpc_gen_on_send(struct gcall *c, bool ok);   /* T_SEND: a SEND batch completed */

#endif
