/* Internals of the UCX cluster link, shared by its two files: link_ucx.c (the worker, endpoints,
 * sends, the receive queue, losses) and link_ucx_join.c (listening, the join handshake, the
 * member directory, the token). Nobody outside ctrl/link_ucx*.c includes this. */
#ifndef MOE_CTRL_LINK_UCX_INTERNAL_H
#define MOE_CTRL_LINK_UCX_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <ucp/api/ucp.h>

#include "ctrl/link_ucx.h"

#define UL_AM_ID 7              /* the one Active Message id of the link */
#define UL_MAGIC 0x4d4f454cu    /* "MOEL": drops stray traffic of another program */
#define UL_NONCE 32             /* bytes of each join nonce */
#define UL_MAC 32               /* HMAC-SHA256 */
#define UL_HOLD_MS 5000         /* how long a message may wait for its sender's announcement */
#define UL_HOLD_MAX 256         /* and how many may wait */

/* What an Active Message carries (ul_hdr.kind). Everything but UL_MSG is the link's own. */
enum {
    UL_MSG = 1,     /* a control message for the caller: tag, payload */
    UL_JOIN,        /* rank -> coordinator: client nonce | worker address | host | hello */
    UL_CHALLENGE,   /* coordinator -> rank: server nonce */
    UL_PROOF,       /* rank -> coordinator: HMAC-SHA256(token, "moeserve-join" | cnonce | snonce) */
    UL_WELCOME,     /* coordinator -> rank: the directory; hdr.dest is the new member id */
    UL_REFUSE,      /* coordinator -> rank: a reason (text); the connection closes after it */
    UL_ANNOUNCE,    /* coordinator -> members: one directory entry (a new member) */
    UL_GONE,        /* coordinator -> members: member (int32) is lost or fenced */
};

#define UL_KEY 16 /* a member's key: random, chosen at its join, known to members only */

typedef struct {
    uint32_t magic;
    uint32_t kind;
    int32_t src, dest, tag;
    /* The sender's member key: a rank believes a message from another rank only if it carries
     * the key the coordinator announced for that rank (its endpoint does not tell who sent). */
    uint8_t key[UL_KEY];
} ul_hdr;

typedef struct ul_link ul_link;

/* One UCX endpoint and what we know of the peer behind it. Freed once its close completes. */
typedef struct ul_peer {
    ul_link *L;
    ucp_ep_h ep;
    int member;            /* -1 while a joining rank has not been welcomed (coordinator) */
    bool failed;           /* UCX reported an error on it; handled at the next progress */
    bool closed;           /* ucp_ep_close_nbx called */
    void *close_req;
    /* Coordinator, during a join: */
    int hs;                /* 0 waiting for Join, 1 challenge sent */
    int64_t hs_deadline_ns;
    uint8_t cnonce[UL_NONCE], snonce[UL_NONCE];
    uint8_t key[UL_KEY];   /* the joining rank's member key */
    uint8_t *addr;         /* the joining rank's worker address */
    size_t addr_len;
    char *host;            /* its host label, or the address it connected from */
    uint8_t *hello;
    size_t hello_len;
    char from[64];         /* the address it connected from (logs) */
    struct ul_peer *next;
} ul_peer;

typedef enum { UL_M_NONE = 0, UL_M_ACTIVE, UL_M_LOST } ul_mstate;

typedef struct {
    ul_mstate state;
    uint8_t *addr; /* worker address (ranks; the coordinator is reached by its listener) */
    size_t addr_len;
    char *host;
    uint8_t key[UL_KEY];
    ul_peer *peer; /* endpoint to it: NULL until first use (rank to rank) */
} ul_member;

typedef struct ul_event {
    moe_link_event ev;
    uint8_t *owned;
    bool ready; /* false while a rendezvous payload is still arriving */
    bool drop;  /* fenced sender, failed receive, or an old epoch: skipped by poll */
    int64_t hold_until_ns; /* held (sender not announced yet): dropped after this */
    uint8_t key[UL_KEY];   /* the key a held message came with, checked at the announcement */
    struct ul_event *next;
} ul_event;

struct ul_link {
    bool coordinator;
    int self;
    ucp_context_h ctx;
    ucp_worker_h worker;
    ucp_listener_h listener;
    int port;
    char *token;
    size_t token_len;
    moe_link_ucx_opts opts; /* what rejoin needs; its strings and hello point at own_* */
    char *own_addr, *own_host;
    uint8_t *own_hello;
    uint8_t key[UL_KEY];    /* our member key (new at every join) */
    uint8_t *waddr;         /* our worker address */
    size_t waddr_len;
    ul_member *m;           /* [n_m] indexed by member id */
    int n_m, cap_m;
    int next_id;            /* coordinator: the next member id (never reused) */
    ul_peer *peers;         /* every endpoint, live or closing */
    bool any_failed;
    ul_event *head, *tail, *given; /* queue; given = handed out by the last poll */
    /* Rank: messages from a member the coordinator has not announced yet (its announcement can
     * trail its first message), held until it is announced or UL_HOLD_MS passed. */
    ul_event *held, *held_tail;
    int n_held;
    int n_sends;            /* sends not yet completed */
    /* Rank, during a join: */
    ul_peer *coord;
    int join_state;         /* 0 waiting, 1 welcomed, -1 refused, -2 connection failed */
    char join_reason[160];
    uint8_t cnonce[UL_NONCE];
};

/* link_ucx.c */
moe_status ul_create(const moe_link_ucx_opts *o, bool coordinator, ul_link **out);
void ul_destroy(void *ctx);
void ul_progress(void *ctx);
ul_peer *ul_peer_new(ul_link *L, int member);
ucp_err_handler_t ul_err_handler(ul_peer *p);
void ul_peer_close(ul_peer *p);       /* force: drops what is queued */
void ul_peer_close_flush(ul_peer *p); /* lets queued sends leave first (a refusal) */
moe_status ul_wrap(ul_link *L, moe_link **out);
moe_status ul_send_raw(ul_link *L, ul_peer *p, uint32_t kind, int dest, int tag, const void *buf,
                       size_t len);
moe_status ul_push_event(ul_link *L, moe_link_event_kind kind, int src, int tag, const void *buf,
                         size_t len);
ul_member *ul_member_at(ul_link *L, int id, bool grow);
void ul_member_lost(ul_link *L, int id, bool fenced);
void ul_release_held(ul_link *L, int member); /* it was announced: check and queue its messages */
void ul_close_all(ul_link *L, bool force); /* every endpoint; clears the directory */

/* link_ucx_join.c */
void ul_on_join_msg(ul_link *L, ul_peer *p, const ul_hdr *h, const uint8_t *buf, size_t len);
void ul_join_tick(ul_link *L);
moe_status ul_join_run(ul_link *L);
moe_status ul_listen_start(ul_link *L, const char *addr);
moe_status ul_parse_sockaddr(const char *addr, bool passive, struct sockaddr_storage *ss,
                             socklen_t *len);

#endif
