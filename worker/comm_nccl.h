/* The NCCL backend of the comm vtable (worker/comm.h), built when a CUDA toolkit with NCCL is
 * found (MOE_HAVE_NCCL). One GPU per rank: two ranks cannot share a GPU. */
#ifndef MOE_WORKER_COMM_NCCL_H
#define MOE_WORKER_COMM_NCCL_H

#include <mpi.h>
#include "common/status.h"
#include "worker/comm.h"

/* Creates an NCCL communicator over the ranks of mpi_comm (collective over it): rank 0 makes the
 * unique id, MPI_Bcast shares it, every rank binds `device` and calls ncclCommInitRank. Buffers may
 * be device or host memory: host buffers are staged through device memory (correct, not fast: a
 * CPU engine should use the MPI backend). UNAVAILABLE when no GPU is visible. */
moe_status moe_comm_nccl_create(MPI_Comm mpi_comm, int device, moe_comm *out);

/* Turns a CUDA / NCCL error into MOE_ERR_INTERNAL naming the call, file and line. */
moe_status moe_cuda_check_(int rc, const char *call, const char *file, int line);
#define MOE_CUDA_CHECK(call) moe_cuda_check_((int)(call), #call, __FILE__, __LINE__)

#endif
