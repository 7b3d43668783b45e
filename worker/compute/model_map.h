/* A model's weights as a backend sees them. */
#ifndef MOE_WORKER_COMPUTE_MODEL_MAP_H
#define MOE_WORKER_COMPUTE_MODEL_MAP_H

#include "worker/compute/backend.h"
#include "worker/model.h"

/* *out = m with every weight, norm and bias pointer in be's memory. When be can read host memory
 * (host_ptr non-NULL: the CPU backend) *out is m itself and nothing is copied; otherwise a copy of
 * the structure whose tensors are uploaded to be (the embedding table too: the lookup runs on the
 * device). Release with moe_model_unmap. */
moe_status moe_model_map(moe_backend *be, const moe_model *m, const moe_model **out);
void moe_model_unmap(moe_backend *be, const moe_model *host, const moe_model *mapped);

#endif
