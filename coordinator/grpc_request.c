/* gRPC request decoding: protobuf-c messages into the protocol-neutral request, and the NUL
 * check protobuf-c's NUL-terminated strings need (done on the wire bytes, where lengths are
 * still known). */
#include "coordinator/grpc_request.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80))
            return true;
    }
    return false;
}

moe_status moe_grpc_check_strings(const ProtobufCMessageDescriptor *d, const uint8_t *buf,
                                  size_t len)
{
    const uint8_t *p = buf, *end = buf + len;
    unsigned seen[64] = {0}; /* occurrences per field index, for repeated fields' [i] */
    while (p < end) {
        uint64_t key, l;
        if (!varint(&p, end, &key))
            return MOE_OK;
        switch (key & 7) {
        case 0:
            if (!varint(&p, end, &l))
                return MOE_OK;
            break;
        case 1:
            if (end - p < 8)
                return MOE_OK;
            p += 8;
            break;
        case 5:
            if (end - p < 4)
                return MOE_OK;
            p += 4;
            break;
        case 2: {
            if (!varint(&p, end, &l) || l > (uint64_t)(end - p))
                return MOE_OK;
            const ProtobufCFieldDescriptor *f =
                protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3));
            if (f && f->type == PROTOBUF_C_TYPE_STRING) {
                size_t fi = (size_t)(f - d->fields);
                unsigned idx = fi < 64 ? seen[fi]++ : 0;
                const uint8_t *z = memchr(p, 0, (size_t)l);
                if (z) {
                    char field[160];
                    if (f->label == PROTOBUF_C_LABEL_REPEATED)
                        snprintf(field, sizeof(field), "%s.%s[%u]", d->short_name, f->name, idx);
                    else
                        snprintf(field, sizeof(field), "%s.%s", d->short_name, f->name);
                    return moe_error(MOE_ERR_INVALID_ARG,
                                     "%s: holds a NUL byte at offset %zu (NUL is not allowed in "
                                     "strings)",
                                     field, (size_t)(z - p));
                }
            }
            p += l;
            break;
        }
        default: return MOE_OK; /* groups or garbage: the unpacker decides */
        }
    }
    return MOE_OK;
}

static moe_api_str str_of(const char *s)
{
    return (moe_api_str){.s = s ? s : "", .len = s ? strlen(s) : 0};
}

moe_status moe_grpc_generate_decode(const Moeserve__V1__GenerateRequest *msg,
                                    moe_grpc_generate *out)
{
    memset(out, 0, sizeof(*out));
    moe_api_request *r = &out->req;
    r->names = &moe_api_names_grpc;
    r->request_id = str_of(msg->request_id);
    if (msg->prompt_case == MOESERVE__V1__GENERATE_REQUEST__PROMPT_TEXT) {
        r->has_text = true;
        r->text = str_of(msg->text);
    } else if (msg->prompt_case == MOESERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS) {
        r->has_token_ids = true;
        const Moeserve__V1__TokenIds *t = msg->token_ids;
        r->n_token_ids = t ? t->n_ids : 0;
        if (r->n_token_ids) {
            out->token_ids = malloc(r->n_token_ids * sizeof(int64_t));
            if (!out->token_ids)
                return moe_error(MOE_ERR_NOMEM, "GenerateRequest.token_ids: out of memory");
            for (size_t i = 0; i < r->n_token_ids; i++)
                out->token_ids[i] = t->ids[i];
        }
        r->token_ids = out->token_ids;
    }
    r->add_special_tokens = msg->add_special_tokens_opt_case !=
                                MOESERVE__V1__GENERATE_REQUEST__ADD_SPECIAL_TOKENS_OPT_ADD_SPECIAL_TOKENS ||
                            msg->add_special_tokens;
    r->max_new_tokens = msg->max_new_tokens;
    const Moeserve__V1__SamplingParams *sp = msg->sampling;
    if (sp) {
        r->has_temperature =
            sp->temperature_opt_case == MOESERVE__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
        r->temperature = sp->temperature;
        r->has_top_p = sp->top_p_opt_case == MOESERVE__V1__SAMPLING_PARAMS__TOP_P_OPT_TOP_P;
        r->top_p = sp->top_p;
        r->top_k = sp->top_k;
        r->has_seed = sp->seed_opt_case == MOESERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        r->seed = sp->seed;
        r->has_presence_penalty = sp->presence_penalty_opt_case ==
                                  MOESERVE__V1__SAMPLING_PARAMS__PRESENCE_PENALTY_OPT_PRESENCE_PENALTY;
        r->presence_penalty = sp->presence_penalty;
        r->has_frequency_penalty =
            sp->frequency_penalty_opt_case ==
            MOESERVE__V1__SAMPLING_PARAMS__FREQUENCY_PENALTY_OPT_FREQUENCY_PENALTY;
        r->frequency_penalty = sp->frequency_penalty;
        r->has_repetition_penalty =
            sp->repetition_penalty_opt_case ==
            MOESERVE__V1__SAMPLING_PARAMS__REPETITION_PENALTY_OPT_REPETITION_PENALTY;
        r->repetition_penalty = sp->repetition_penalty;
        r->logprobs = sp->logprobs;
        r->top_logprobs = sp->top_logprobs;
    }
    r->n_stop = msg->n_stop;
    if (msg->n_stop) {
        out->stop = malloc(msg->n_stop * sizeof(moe_api_str));
        if (!out->stop)
            return moe_error(MOE_ERR_NOMEM, "GenerateRequest.stop: out of memory");
        for (size_t i = 0; i < msg->n_stop; i++)
            out->stop[i] = str_of(msg->stop[i]);
    }
    r->stop = out->stop;
    r->n_stop_token_ids = msg->n_stop_token_ids;
    if (msg->n_stop_token_ids) {
        out->stop_token_ids = malloc(msg->n_stop_token_ids * sizeof(int64_t));
        if (!out->stop_token_ids)
            return moe_error(MOE_ERR_NOMEM, "GenerateRequest.stop_token_ids: out of memory");
        for (size_t i = 0; i < msg->n_stop_token_ids; i++)
            out->stop_token_ids[i] = msg->stop_token_ids[i];
    }
    r->stop_token_ids = out->stop_token_ids;
    r->ignore_eos = msg->ignore_eos;
    r->include_stop_str_in_output = msg->include_stop_str_in_output;
    r->priority = msg->priority;
    r->prefill_group = msg->prefill_group;
    r->prefill_group_n = msg->prefill_group_size;
    return MOE_OK;
}

void moe_grpc_generate_free(moe_grpc_generate *g)
{
    free(g->token_ids);
    free(g->stop_token_ids);
    free(g->stop);
    memset(g, 0, sizeof(*g));
}
