/* The MPI backend of the comm vtable (worker/comm.h) and the MPI checking macro of the worker side.
 * Open MPI here has no progress thread: a non-blocking operation advances only inside MPI calls,
 * so whoever owns a request polls it (test) from its loop. */
#ifndef MOE_WORKER_COMM_MPI_H
#define MOE_WORKER_COMM_MPI_H

#include <mpi.h>
#include "common/status.h"
#include "worker/comm.h"

/* Wraps `comm` (borrowed: the caller keeps it alive and frees it after destroy). Every slot of the
 * vtable is implemented; isend/irecv/test/cancel may be called from one thread at a time.
 * cancel() on a receive cancels it; on a send it detaches the request (MPI cannot reliably cancel
 * a started send), so the send buffer must stay mapped, but nothing will read it once the peer
 * has cancelled its matching receive. */
moe_status moe_comm_mpi_create(MPI_Comm comm, moe_comm *out);

/* Turns an MPI error code into MOE_ERR_INTERNAL with the call, file and line; MOE_OK on success. */
moe_status moe_mpi_check_(int rc, const char *call, const char *file, int line);
#define MOE_MPI_CHECK(call) moe_mpi_check_((call), #call, __FILE__, __LINE__)

#endif
