/* The backend's push calls (coordinator/frontend.h), dispatched to the front end that owns the
 * stream (gRPC or HTTP), and the gRPC API's field names for validation messages. */
#include "coordinator/frontend.h"

#include <pthread.h>

#include "common/log.h"

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
    .prefill_group = "GenerateRequest.prefill_group_size",
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

moe_status moe_frontend_lat_init(moe_frontend_lat *l)
{
    l->n = 0;
    l->mu = malloc(sizeof(pthread_mutex_t));
    l->us = calloc(MOE_FRONTEND_LAT_RING, sizeof(float));
    if (!l->mu || !l->us) {
        free(l->mu);
        free(l->us);
        l->mu = NULL;
        l->us = NULL;
        return moe_error(MOE_ERR_NOMEM, "front end: out of memory");
    }
    pthread_mutex_init(l->mu, NULL);
    return MOE_OK;
}

void moe_frontend_lat_add(moe_frontend_lat *l, double us, size_t n)
{
    if (!l->us)
        return;
    pthread_mutex_lock(l->mu);
    for (size_t i = 0; i < n; i++)
        l->us[l->n++ % MOE_FRONTEND_LAT_RING] = (float)us;
    pthread_mutex_unlock(l->mu);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

void moe_frontend_lat_log(moe_frontend_lat *l, const char *name)
{
    if (!l->us)
        return;
    size_t n = l->n < MOE_FRONTEND_LAT_RING ? (size_t)l->n : MOE_FRONTEND_LAT_RING;
    if (n) {
        qsort(l->us, n, sizeof(float), cmp_float);
        MOE_LOG_I("%s front end: push -> transport over the last %zu tokens: p50 %.0f us, p90 %.0f "
                  "us, p99 %.0f us, max %.0f us",
                  name, n, l->us[n / 2], l->us[n * 9 / 10], l->us[n * 99 / 100], l->us[n - 1]);
    }
}

void moe_frontend_lat_free(moe_frontend_lat *l)
{
    if (!l->us)
        return;
    pthread_mutex_destroy(l->mu);
    free(l->mu);
    free(l->us);
    l->mu = NULL;
    l->us = NULL;
}
