/* The backend's push calls (coordinator/frontend.h), dispatched to the front end that owns the
 * stream (gRPC or HTTP), and the gRPC API's field names for validation messages. */
#include "coordinator/frontend.h"

const moe_api_names moe_api_names_grpc = {
    .request_id = "GenerateRequest.request_id",
    .text = "GenerateRequest.text",
    .token_ids = "GenerateRequest.token_ids",
    .token_ids_item = "GenerateRequest.token_ids.ids",
    .prompt = "GenerateRequest.prompt",
    .max_new_tokens = "GenerateRequest.max_new_tokens",
    .temperature = "GenerateRequest.sampling.temperature",
    .top_p = "GenerateRequest.sampling.top_p",
    .top_k = "GenerateRequest.sampling.top_k",
    .seed = "GenerateRequest.sampling.seed",
    .stop = "GenerateRequest.stop",
    .stop_token_ids = "GenerateRequest.stop_token_ids",
    .presence_penalty = "GenerateRequest.sampling.presence_penalty",
    .frequency_penalty = "GenerateRequest.sampling.frequency_penalty",
    .repetition_penalty = "GenerateRequest.sampling.repetition_penalty",
    .top_logprobs = "GenerateRequest.sampling.top_logprobs",
};

moe_status moe_frontend_push_tokens(moe_frontend_req *r, const int32_t *ids,
                                    const uint32_t *indices, size_t n, const char *text,
                                    size_t text_len)
{
    return r->ops->push_tokens(r, ids, indices, NULL, n, text, text_len);
}

moe_status moe_frontend_push_tokens_lp(moe_frontend_req *r, const int32_t *ids,
                                       const uint32_t *indices, const moe_token_logprobs *lp,
                                       size_t n, const char *text, size_t text_len)
{
    return r->ops->push_tokens(r, ids, indices, lp, n, text, text_len);
}

void moe_frontend_finish(moe_frontend_req *r, const moe_frontend_finish_info *info)
{
    r->ops->finish(r, info);
}

void moe_frontend_error(moe_frontend_req *r, moe_status code, const char *message)
{
    r->ops->error(r, code, message);
}

const moe_gen_request *moe_frontend_request(const moe_frontend_req *r) { return r->ops->request(r); }
