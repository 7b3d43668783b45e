/* Internals of the HTTP front end shared by its server (http_server.c: connections, streams,
 * routing) and its OpenAI protocol code (http_openai.c: request parsing, response JSON). */
#ifndef MOE_COORDINATOR_HTTP_INTERNAL_H
#define MOE_COORDINATOR_HTTP_INTERNAL_H

#include <stdbool.h>
#include <pthread.h>
#include <cjson/cJSON.h>
#include <microhttpd.h>
#include "coordinator/http_server.h"

extern const moe_api_names moe_api_names_http;

typedef struct hstream hstream;

struct moe_http_server {
    moe_http_server_config cfg;
    char model[256];
    moe_frontend_backend be;
    moe_fe_stats *stats, *own_stats; /* cfg.stats or own_stats (coordinator/fe_stats.h) */
    struct MHD_Daemon *d;
    int port;
    long long started;
    pthread_mutex_t mu; /* guards the list and the flags below */
    pthread_cond_t cv;
    moe_frontend_lat lat; /* push -> libmicrohttpd, per streamed token */
    hstream *streams; /* alive, for shutdown */
    int n_streams;
    bool stopping;
};

/* Responses (application/json); the helpers copy what they send. */
enum MHD_Result moe_http_reply(struct MHD_Connection *conn, int status, const char *json);
enum MHD_Result moe_http_reply_error(struct MHD_Connection *conn, int status, const char *msg,
                                     const char *param);
enum MHD_Result moe_http_reply_json(struct MHD_Connection *conn, int status, cJSON *o); /* frees o */

/* GET /v1/models, POST /tokenize, POST /detokenize (coordinator/http_endpoints.c) */
enum MHD_Result moe_http_handle_models(moe_http_server *s, struct MHD_Connection *conn);
enum MHD_Result moe_http_handle_tokenize(moe_http_server *s, struct MHD_Connection *conn,
                                         const cJSON *body);
enum MHD_Result moe_http_handle_detokenize(moe_http_server *s, struct MHD_Connection *conn,
                                           const cJSON *body);

/* API keys and client certificates (coordinator/http_auth.c): true when the request may go on
 * (*key: the API key's index, -1 none); otherwise it queued the 401/403 in *reply. */
bool moe_http_authorized(moe_http_server *s, struct MHD_Connection *conn, const char *url,
                         int *key, enum MHD_Result *reply);

/* GET /metrics: Prometheus text (coordinator/http_metrics.c) */
enum MHD_Result moe_http_handle_metrics(moe_http_server *s, struct MHD_Connection *conn);

/* A parsed /v1/completions or /v1/chat/completions body. `api` borrows from the cJSON tree and
 * the buffers below. */
#define MOE_HTTP_MAX_N MOE_API_MAX_N /* choices per request (n) */

typedef struct {
    moe_api_request api;
    int n;                   /* choices: that many independent generations of the prompt */
    bool chat, stream, include_usage;
    bool echo;               /* completions: each choice's text starts with the prompt's */
    const char *model;       /* as requested (NULL: not given) */
    moe_api_str *stops;      /* owned */
    int64_t *ids;            /* owned: a token-id prompt */
    int64_t *stop_ids;       /* owned */
    char *rendered;          /* owned: a chat prompt rendered by the template */
    char param[64];          /* on failure: the field at fault, for the error's "param" */
} moe_http_gen;

/* Parses a JSON body (already parsed into `body`) into *out. `nul_marks`: the body had \u0000
 * escapes (replaced by a marker before parsing, see moe_http_parse_json): any string holding
 * the marker is refused as holding a NUL. Chat: renders the messages with `tpl` (NULL: 400
 * naming tpl_error). Fails with MOE_ERR_INVALID_ARG (out->param names the field) or what the
 * template returns. */
moe_status moe_http_parse_gen(const cJSON *body, bool chat, const moe_chat_template *tpl,
                              const char *tpl_error, moe_http_gen *out);
void moe_http_gen_free(moe_http_gen *g);

/* Parses a body that may hold \u0000 escapes: they are replaced by a private-use marker first
 * (cJSON would cut strings at a decoded NUL) and *nul_marks says whether any were; a raw NUL or
 * malformed JSON fails with MOE_ERR_INVALID_ARG and the byte offset. */
moe_status moe_http_parse_json(const char *body, size_t len, cJSON **out, bool *nul_marks);
/* The first string (value or key) in the tree that holds the marker: MOE_ERR_INVALID_ARG
 * "PATH: holds a NUL byte" with path like messages[1].content, and `param` set. */
moe_status moe_http_check_nul(const cJSON *tree, char *param, size_t cap);

/* {"error": {"message", "type", "param", "code"}} as a malloc'd string. */
char *moe_http_error_json(int http_status, const char *message, const char *param);
/* The HTTP status for a moe_status (400, 404, 413, 429, 503, 504, 500). */
int moe_http_status_from_moe(moe_status s);

/* OpenAI response objects (malloc'd JSON strings). `finish`: NULL while streaming. */
typedef struct {
    const char *id;
    const char *model;
    long long created;
    bool chat;
    uint32_t prompt_tokens, completion_tokens;
} moe_http_resp_info;

/* The log-probabilities of n generated tokens of one choice, in OpenAI's shape: completions
 * {tokens, token_logprobs, top_logprobs, text_offset}, chat {content: [{token, logprob, bytes,
 * top_logprobs}]}. Token strings are each id decoded alone by tok; text_offset starts at
 * `offset` (the characters of the choice's token strings before these). */
typedef struct {
    const moe_tokenizer *tok;
    const int32_t *ids;            /* (n) */
    const moe_token_logprobs *lp;  /* (n) */
    size_t n;
    size_t offset;
} moe_http_logprobs;

typedef struct {
    const char *text;
    size_t len;
    const char *finish;
    const moe_http_logprobs *lp; /* NULL: "logprobs": null */
} moe_http_choice;

char *moe_http_full_response(const moe_http_resp_info *ri, const moe_http_choice *choices, int n);
/* One SSE chunk's JSON for choice `index`: text delta (len may be 0), role (chat's first chunk
 * of a choice), finish reason, the delta's tokens' logprobs (NULL: null). */
char *moe_http_chunk(const moe_http_resp_info *ri, int index, const char *text, size_t len,
                     bool role, const char *finish, const moe_http_logprobs *lp);
/* The characters the token strings of lp's tokens take (what the next chunk's offset adds). */
size_t moe_http_logprobs_text_len(const moe_http_logprobs *lp);
/* A choice's "logprobs" object: chat {"content": [...], "refusal": null}, completions the four
 * parallel arrays (coordinator/http_logprobs.c). */
cJSON *moe_http_logprobs_json(const moe_http_logprobs *lp, bool chat);
/* The final usage chunk (stream_options.include_usage): choices [] and usage. */
char *moe_http_usage_chunk(const moe_http_resp_info *ri);
const char *moe_http_finish_name(moe_finish_reason f);

#endif
