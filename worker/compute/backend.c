/* Backend-independent parts of the compute interface: device and op names, creation by device. */
#include "worker/compute/backend.h"

#include <string.h>

moe_status moe_device_parse(const char *name, moe_device *out)
{
    if (name && strcmp(name, "cpu") == 0)
        *out = MOE_DEVICE_CPU;
    else if (name && strcmp(name, "cuda") == 0)
        *out = MOE_DEVICE_CUDA;
    else
        return moe_error(MOE_ERR_INVALID_ARG, "device '%s': expected cpu or cuda", name ? name : "(null)");
    return MOE_OK;
}

const char *moe_device_name(moe_device d) { return d == MOE_DEVICE_CUDA ? "cuda" : "cpu"; }

const char *moe_op_name(moe_op op)
{
    static const char *const names[MOE_OP_COUNT] = {
        "matmul", "embed", "rmsnorm", "rope", "kv_write", "attention", "router", "silu_mul",
        "axpy", "add_rows", "clamp", "gated_add", "gather", "scatter", "ep_pack", "ep_combine",
        "expert_sort", "matmul_grouped", "expert_combine"};
    return (unsigned)op < MOE_OP_COUNT ? names[op] : "unknown";
}

moe_status moe_backend_create(moe_device dev, int index, moe_threadpool_t *pool, moe_backend **out)
{
    if (dev == MOE_DEVICE_CUDA)
        return moe_backend_cuda_create(index, out);
    return moe_backend_cpu_create(pool, out);
}

void moe_backend_free(moe_backend *be)
{
    if (be)
        be->ops->destroy(be);
}
