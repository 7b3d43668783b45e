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

/* Zero-initialise, then set comm. The requests sit in one array (in posting order) so that one
 * MPI_Testsome tests them all: with mpi_yield_when_idle, which our oversubscribed launches set,
 * every MPI_Test that finds nothing yields the core, so one test per message per loop turn made a
 * rank with many sends in flight yield dozens of times a turn (the pattern bench/RESULTS.md's
 * hand-off trace found in the KV receives). */
typedef struct {
    MPI_Comm comm;
    MPI_Request *req;
    uint8_t **buf;  /* buf[i] is the copy req[i] sends */
    int *done;      /* MPI_Testsome's indices */
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
