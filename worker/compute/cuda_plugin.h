/* The CUDA plugin's interface: libmoe_cuda.so holds the CUDA backend (backend_cuda.c, the kernels
 * of kernels/cuda/) and the NCCL comm (comm_nccl.c), and exports only the entry points below
 * (cuda_plugin_entry.c). The program loads it with dlopen the first time --device cuda asks for
 * the backend (cuda_plugin.c), so a CPU process never maps cuBLAS (~150 MiB resident otherwise).
 * docs/backends.md, "The CUDA plugin". */
#ifndef MOE_WORKER_COMPUTE_CUDA_PLUGIN_H
#define MOE_WORKER_COMPUTE_CUDA_PLUGIN_H

#include <mpi.h>

#include "worker/comm.h"
#include "worker/compute/backend.h"

/* Bumped whenever an entry point's signature or a struct the two sides share changes; the ABI
 * value also folds in those structs' sizes, so a plugin from another build is refused at load
 * with a message instead of running with the wrong layout. */
#define MOE_CUDA_PLUGIN_ABI_VERSION 1u
#define MOE_CUDA_PLUGIN_ABI                                                                        \
    (MOE_CUDA_PLUGIN_ABI_VERSION << 24 ^ (unsigned)sizeof(moe_backend_ops) << 12 ^                 \
     (unsigned)sizeof(moe_comm_ops) << 4 ^ (unsigned)sizeof(moe_backend))

/* The entry points' names and types (dlsym). */
#define MOE_CUDA_PLUGIN_SYM_ABI "moe_cuda_plugin_abi"
#define MOE_CUDA_PLUGIN_SYM_BACKEND "moe_cuda_plugin_backend_create"
#define MOE_CUDA_PLUGIN_SYM_NCCL "moe_cuda_plugin_comm_nccl_create"
typedef unsigned (*moe_cuda_plugin_abi_fn)(void);
typedef moe_status (*moe_cuda_plugin_backend_fn)(int gpu, moe_backend **out);
/* NULL in a plugin built without NCCL. */
typedef moe_status (*moe_cuda_plugin_nccl_fn)(MPI_Comm mpi_comm, int device, moe_comm *out);

/* The plugin's path once it is loaded, else NULL (tests, logs). Loads nothing. */
const char *moe_cuda_plugin_loaded_path(void);

#endif
