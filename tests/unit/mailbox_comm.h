/* An in-process mailbox comm for unit tests: one process plays both ranks of a point-to-point
 * transfer (sends and receives match by tag, in posting order; the peer is ignored). Static
 * functions: each test file is its own binary. */
#ifndef MOE_TESTS_MAILBOX_COMM_H
#define MOE_TESTS_MAILBOX_COMM_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "worker/comm.h"

typedef struct mb_req {
    bool is_send, done, cancelled;
    void *buf;
    int bytes, tag;
    struct mb_req *next;
} mb_req;

typedef struct {
    mb_req *sends; /* posted sends not matched yet, in order */
    mb_req *recvs;
    int n_live; /* requests not yet released */
} mailbox;

static void mb_match(mailbox *m)
{
    for (mb_req *r = m->recvs; r; r = r->next) {
        if (r->done || r->cancelled)
            continue;
        for (mb_req *s = m->sends; s; s = s->next) {
            if (s->done || s->cancelled || s->tag != r->tag)
                continue;
            memcpy(r->buf, s->buf, (size_t)(s->bytes < r->bytes ? s->bytes : r->bytes));
            s->done = r->done = true;
            break;
        }
    }
}

static moe_status mb_post(void *ctx, bool send, void *buf, int bytes, int tag, moe_comm_req **out)
{
    mailbox *m = ctx;
    mb_req *r = calloc(1, sizeof *r);
    r->is_send = send;
    r->buf = buf;
    r->bytes = bytes;
    r->tag = tag;
    mb_req **list = send ? &m->sends : &m->recvs;
    while (*list)
        list = &(*list)->next;
    *list = r;
    m->n_live++;
    *out = (moe_comm_req *)r;
    return MOE_OK;
}

static moe_status mb_isend(void *ctx, const void *buf, int bytes, int peer, int tag,
                           moe_comm_req **req)
{
    (void)peer;
    return mb_post(ctx, true, (void *)(uintptr_t)buf, bytes, tag, req);
}

static moe_status mb_irecv(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    (void)peer;
    return mb_post(ctx, false, buf, bytes, tag, req);
}

static moe_status mb_test(void *ctx, moe_comm_req *req, bool *done)
{
    mailbox *m = ctx;
    mb_match(m);
    mb_req *r = (mb_req *)req;
    *done = r->done;
    if (r->done) {
        r->cancelled = true; /* released: stays in the list, ignored */
        m->n_live--;
    }
    return MOE_OK;
}

static void mb_cancel(void *ctx, moe_comm_req *req)
{
    mailbox *m = ctx;
    ((mb_req *)req)->cancelled = true;
    m->n_live--;
}

static const moe_comm_ops mb_ops = {
    .name = "mailbox", .isend = mb_isend, .irecv = mb_irecv, .test = mb_test, .cancel = mb_cancel};

static void mb_free_list(mb_req *r)
{
    while (r) {
        mb_req *n = r->next;
        free(r);
        r = n;
    }
}

static void mb_free(mailbox *m)
{
    mb_free_list(m->sends);
    mb_free_list(m->recvs);
}

#endif
