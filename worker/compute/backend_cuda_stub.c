/* The CUDA backend's entry point in a build without a CUDA toolkit (cmake/cuda.cmake found none,
 * or MOE_CUDA=OFF): asking for it is a clear error, never a crash. */
#include "worker/compute/backend.h"

moe_status moe_backend_cuda_create(int gpu, moe_backend **out)
{
    (void)out;
    return moe_error(MOE_ERR_UNAVAILABLE,
                     "device cuda (GPU %d): this binary was built without CUDA (no toolkit found at "
                     "configure time, or -DMOE_CUDA=OFF); rebuild with a CUDA toolkit or use --device cpu",
                     gpu);
}
