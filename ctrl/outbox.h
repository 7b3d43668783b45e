/* The send side of the control link between the coordinator and the workers (and between
 * workers): protobuf-c messages packed and sent with MPI_Isend, each buffer kept until MPI_Test
 * says it left, so that two ranks sending large messages to each other never deadlock and no
 * sender ever blocks on a busy peer. Used by coordinator/cluster.c and worker/worker_loop.c.
 * Not thread-safe: owned by the one thread that makes MPI calls. */
#ifndef MOE_CTRL_OUTBOX_H
#define MOE_CTRL_OUTBOX_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct {
    MPI_Request r;
    uint8_t *buf;
} moe_outbox_msg;

/* Zero-initialise, then set comm. */
typedef struct {
    MPI_Comm comm;
    moe_outbox_msg *v;
    int n, cap;
} moe_outbox;

/* Copies len bytes and posts them to dest with tag (the message kind). RANGE over 2 GiB, NOMEM,
 * or the MPI error; nothing stays queued on failure. */
moe_status moe_outbox_send_bytes(moe_outbox *ob, int dest, int tag, const void *buf, size_t len);
/* Frees the buffers of the sends that completed; call from every loop turn (it also gives Open
 * MPI the chance to move bytes). */
void moe_outbox_progress(moe_outbox *ob);
/* Polls until every queued message has left or timeout_ms passed (shutdown). */
void moe_outbox_flush(moe_outbox *ob, int timeout_ms);
/* Detaches what is still queued (its buffers leak on purpose: MPI may still read them) and frees
 * the queue. */
void moe_outbox_free(moe_outbox *ob);

#endif
