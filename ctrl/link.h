/* The cluster's message link: how the coordinator and the instances' ranks (the *members*) send
 * each other control messages (cluster.proto, the tag names the kind) and learn that a peer is
 * gone. Members are small integers: 0 is the coordinator; every joined rank gets a new id that is
 * never reused within one coordinator run, so a fenced member's late messages cannot be mistaken
 * for its successor's (the id is the epoch).
 *
 * Two transports sit behind it:
 *  - MPI (ctrl/link_mpi.c): every process a rank of one mpirun job, member id = world rank. The
 *    convenience launch `mpirun -np N moe-serve`: one failure domain.
 *  - UCX (ctrl/link_ucx.c): the coordinator listens on --cluster-listen; each rank of an instance
 *    (its own process or its own `mpirun -np E` job, on any host) joins over the network with the
 *    cluster token, and ranks reach each other directly. Each instance is its own failure domain.
 *
 * Not thread-safe: one thread owns a link and makes every call on it. Nothing progresses between
 * calls: call moe_link_poll (or moe_link_progress) from every loop turn. */
#ifndef MOE_CTRL_LINK_H
#define MOE_CTRL_LINK_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#define MOE_LINK_COORDINATOR 0 /* the coordinator's member id on every transport */

typedef struct moe_link moe_link;

typedef enum {
    MOE_LINK_MSG = 1,    /* a control message: src, tag, buf/len */
    MOE_LINK_JOINED = 2, /* coordinator only: a rank passed the token check and joined as src;
                          * buf/len is its hello (the bytes it gave moe_link_ucx_join) */
    MOE_LINK_LOST = 3,   /* member src is gone: its connection failed or closed, or this side
                          * fenced it (moe_link_fence). On a rank, src 0 means the coordinator is
                          * lost: the rank must rejoin (moe_link_ucx_rejoin) to be reachable again */
} moe_link_event_kind;

typedef struct {
    moe_link_event_kind kind;
    int src;
    int tag;            /* MOE_LINK_MSG only */
    const uint8_t *buf; /* valid until the next moe_link_poll or moe_link_free */
    size_t len;
} moe_link_event;

/* Slot by slot, what a transport provides (link_mpi.c, link_ucx.c). */
typedef struct {
    const char *name; /* "mpi", "ucx" */
    /* Copies buf and queues it for dest; never blocks on a slow peer. A message to a member that
     * is unknown or lost fails with UNAVAILABLE naming it (a later send may succeed once it is
     * known). */
    moe_status (*send)(void *ctx, int dest, int tag, const void *buf, size_t len);
    /* The next event, or false when none is waiting. Also moves queued bytes. */
    bool (*poll)(void *ctx, moe_link_event *ev);
    /* Moves queued bytes without taking events (between engine steps). */
    void (*progress)(void *ctx);
    /* Polls until every queued send has left or timeout_ms passed (shutdown). */
    void (*flush)(void *ctx, int timeout_ms);
    /* Drops member m now: its connection is closed, its messages from here on are discarded, and
     * a LOST event for it follows (once). Coordinator: broadcasts the loss to every member so that
     * their sends to m fail fast. UNSUPPORTED on MPI (one failure domain). */
    moe_status (*fence)(void *ctx, int member);
    int (*self)(void *ctx);
    /* The host (name or address) member m joined from, for status tables ("" when unknown). */
    const char *(*host)(void *ctx, int member);
    void (*destroy)(void *ctx);
} moe_link_ops;

struct moe_link {
    const moe_link_ops *ops;
    void *ctx;
};

/* Packs m (protobuf-c) and sends it: the send slot's contract. RANGE over 2 GiB. */
moe_status moe_link_send(moe_link *l, int dest, int tag, const ProtobufCMessage *m);

static inline bool moe_link_poll(moe_link *l, moe_link_event *ev) { return l->ops->poll(l->ctx, ev); }
static inline void moe_link_progress(moe_link *l) { l->ops->progress(l->ctx); }
static inline void moe_link_flush(moe_link *l, int timeout_ms) { l->ops->flush(l->ctx, timeout_ms); }
static inline moe_status moe_link_fence(moe_link *l, int member) { return l->ops->fence(l->ctx, member); }
static inline int moe_link_self(const moe_link *l) { return l->ops->self(l->ctx); }
static inline const char *moe_link_host(const moe_link *l, int member) { return l->ops->host(l->ctx, member); }
/* Frees the link and everything queued on it (NULL is fine). */
void moe_link_free(moe_link *l);

#endif
