/* The UCX data backend of worker/comm.h: KV bytes between instances, point to point over the
 * cluster link's UCX worker (ctrl/link_ucx.h). */
#ifndef MOE_WORKER_COMM_UCX_H
#define MOE_WORKER_COMM_UCX_H

#include "ctrl/link.h"
#include "worker/comm.h"

/* A comm whose peers are the link's *member ids*: isend/irecv/test/cancel move bytes with UCX's
 * TAG API (the 64-bit tag is the sending member's id and the caller's tag; a receive matches
 * exactly one source and tag). rank() is this member's id (it changes after a rejoin: make a new
 * comm then), size() is 0 (not a group) and the collectives, barrier and ialltoallv return
 * UNSUPPORTED: this comm only moves KV between instances.
 *
 * Failures, unlike MPI: isend/irecv to a member that is unknown or lost fail at once with
 * UNAVAILABLE; an operation in flight whose peer is lost (its connection failed, or the link
 * fenced it) makes test() return UNAVAILABLE within milliseconds. When test() returns an error
 * the request is released (as when it returns done). A received size other than `bytes` is
 * FORMAT. cancel() returns once UCX no longer writes the receive buffer (it waits for the
 * cancel's completion); a send that a live peer has not taken is detached after 200 ms and
 * logged (UCX cannot recall a send).
 *
 * link must be a UCX link (moe_link_ucx_join/listen) and outlive the comm; the comm makes its
 * calls on the link's thread only (test() progresses the link). Free with ops->destroy. */
moe_status moe_comm_ucx_create(moe_link *link, moe_comm *out);

#endif
