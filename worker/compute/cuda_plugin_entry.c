/* The CUDA plugin's exported entry points (everything else in libmoe_cuda.so is hidden, so the
 * program's symbols of the same names never interpose). See cuda_plugin.h. */
#include "worker/compute/cuda_plugin.h"

#ifdef MOE_HAVE_NCCL
#include "worker/comm_nccl.h"
#endif

#define MOE_PLUGIN_EXPORT __attribute__((visibility("default")))

MOE_PLUGIN_EXPORT unsigned moe_cuda_plugin_abi(void);
MOE_PLUGIN_EXPORT moe_status moe_cuda_plugin_backend_create(int gpu, moe_backend **out);

MOE_PLUGIN_EXPORT unsigned moe_cuda_plugin_abi(void) { return MOE_CUDA_PLUGIN_ABI; }

MOE_PLUGIN_EXPORT moe_status moe_cuda_plugin_backend_create(int gpu, moe_backend **out)
{
    return moe_backend_cuda_create(gpu, out);
}

#ifdef MOE_HAVE_NCCL
MOE_PLUGIN_EXPORT moe_status moe_cuda_plugin_comm_nccl_create(MPI_Comm mpi_comm, int device, moe_comm *out);

MOE_PLUGIN_EXPORT moe_status moe_cuda_plugin_comm_nccl_create(MPI_Comm mpi_comm, int device, moe_comm *out)
{
    return moe_comm_nccl_create(mpi_comm, device, out);
}
#endif
