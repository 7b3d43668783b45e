/* moe-gen-model's tokenizer.json writer: a trained BPE model plus the normalizer, pre-tokenizer,
 * post-processor and decoder of its family, laid out as the `tokenizers` library saves them. */
#include <stdlib.h>
#include "tools/moe_gen_model/gen_model.h"

static void byte_level_step(moe_gen_json *j, bool add_prefix_space, bool trim_offsets,
                            bool use_regex)
{
    moe_gen_json_obj_begin(j);
    moe_gen_json_key(j, "type");
    moe_gen_json_str(j, "ByteLevel");
    moe_gen_json_key(j, "add_prefix_space");
    moe_gen_json_bool(j, add_prefix_space);
    moe_gen_json_key(j, "trim_offsets");
    moe_gen_json_bool(j, trim_offsets);
    moe_gen_json_key(j, "use_regex");
    moe_gen_json_bool(j, use_regex);
    moe_gen_json_obj_end(j);
}

static void typed(moe_gen_json *j, const char *type)
{
    moe_gen_json_obj_begin(j);
    moe_gen_json_key(j, "type");
    moe_gen_json_str(j, type);
    moe_gen_json_obj_end(j);
}

static void template_piece(moe_gen_json *j, const char *kind, const char *id, int type_id)
{
    moe_gen_json_obj_begin(j);
    moe_gen_json_key(j, kind);
    moe_gen_json_obj_begin(j);
    moe_gen_json_key(j, "id");
    moe_gen_json_str(j, id);
    moe_gen_json_key(j, "type_id");
    moe_gen_json_int(j, type_id);
    moe_gen_json_obj_end(j);
    moe_gen_json_obj_end(j);
}

/* The pipeline around the model: Qwen2 (NFC, regex Split, ByteLevel without regex), GPT-2 /
 * OLMoE (ByteLevel with its built-in regex), Llama / Mixtral (Metaspace, byte fallback, BOS
 * template). Field values follow the real models' tokenizer.json files. */
static void pipeline(moe_gen_json *j, const moe_gen_tokenizer *t)
{
    moe_gen_json_key(j, "normalizer");
    if (t->family == MOE_GEN_TOK_QWEN2)
        typed(j, "NFC");
    else
        moe_gen_json_null(j);

    moe_gen_json_key(j, "pre_tokenizer");
    switch (t->family) {
    case MOE_GEN_TOK_QWEN2:
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "Sequence");
        moe_gen_json_key(j, "pretokenizers");
        moe_gen_json_arr_begin(j);
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "Split");
        moe_gen_json_key(j, "pattern");
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "Regex");
        moe_gen_json_str(j, "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
                            "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
        moe_gen_json_obj_end(j);
        moe_gen_json_key(j, "behavior");
        moe_gen_json_str(j, "Isolated");
        moe_gen_json_key(j, "invert");
        moe_gen_json_bool(j, false);
        moe_gen_json_obj_end(j);
        byte_level_step(j, false, false, false);
        moe_gen_json_arr_end(j);
        moe_gen_json_obj_end(j);
        break;
    case MOE_GEN_TOK_GPT2:
        byte_level_step(j, false, true, true);
        break;
    case MOE_GEN_TOK_SP:
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "Metaspace");
        moe_gen_json_key(j, "replacement");
        moe_gen_json_str(j, "\xe2\x96\x81");
        moe_gen_json_key(j, "prepend_scheme");
        moe_gen_json_str(j, "first");
        moe_gen_json_key(j, "split");
        moe_gen_json_bool(j, false);
        moe_gen_json_obj_end(j);
        break;
    }

    moe_gen_json_key(j, "post_processor");
    switch (t->family) {
    case MOE_GEN_TOK_QWEN2:
        byte_level_step(j, false, false, false);
        break;
    case MOE_GEN_TOK_GPT2:
        byte_level_step(j, false, true, true);
        break;
    case MOE_GEN_TOK_SP:
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "TemplateProcessing");
        moe_gen_json_key(j, "single");
        moe_gen_json_arr_begin(j);
        template_piece(j, "SpecialToken", "<s>", 0);
        template_piece(j, "Sequence", "A", 0);
        moe_gen_json_arr_end(j);
        moe_gen_json_key(j, "pair");
        moe_gen_json_arr_begin(j);
        template_piece(j, "SpecialToken", "<s>", 0);
        template_piece(j, "Sequence", "A", 0);
        template_piece(j, "SpecialToken", "<s>", 1);
        template_piece(j, "Sequence", "B", 1);
        moe_gen_json_arr_end(j);
        moe_gen_json_key(j, "special_tokens");
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "<s>");
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "id");
        moe_gen_json_str(j, "<s>");
        moe_gen_json_key(j, "ids");
        moe_gen_json_arr_begin(j);
        moe_gen_json_int(j, t->bos_id);
        moe_gen_json_arr_end(j);
        moe_gen_json_key(j, "tokens");
        moe_gen_json_arr_begin(j);
        moe_gen_json_str(j, "<s>");
        moe_gen_json_arr_end(j);
        moe_gen_json_obj_end(j);
        moe_gen_json_obj_end(j);
        moe_gen_json_obj_end(j);
        break;
    }

    moe_gen_json_key(j, "decoder");
    switch (t->family) {
    case MOE_GEN_TOK_QWEN2:
        byte_level_step(j, false, false, false);
        break;
    case MOE_GEN_TOK_GPT2:
        byte_level_step(j, false, true, true);
        break;
    case MOE_GEN_TOK_SP:
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "Sequence");
        moe_gen_json_key(j, "decoders");
        moe_gen_json_arr_begin(j);
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "Replace");
        moe_gen_json_key(j, "pattern");
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "String");
        moe_gen_json_str(j, "\xe2\x96\x81");
        moe_gen_json_obj_end(j);
        moe_gen_json_key(j, "content");
        moe_gen_json_str(j, " ");
        moe_gen_json_obj_end(j);
        typed(j, "ByteFallback");
        typed(j, "Fuse");
        moe_gen_json_obj_begin(j);
        moe_gen_json_key(j, "type");
        moe_gen_json_str(j, "Strip");
        moe_gen_json_key(j, "content");
        moe_gen_json_str(j, " ");
        moe_gen_json_key(j, "start");
        moe_gen_json_int(j, 1);
        moe_gen_json_key(j, "stop");
        moe_gen_json_int(j, 0);
        moe_gen_json_obj_end(j);
        moe_gen_json_arr_end(j);
        moe_gen_json_obj_end(j);
        break;
    }
}

moe_status moe_gen_tok_write_json(const moe_gen_tokenizer *t, const char *path)
{
    moe_gen_json j;
    moe_gen_json_init(&j, false);
    moe_gen_json_obj_begin(&j);
    moe_gen_json_key(&j, "version");
    moe_gen_json_str(&j, "1.0");
    moe_gen_json_key(&j, "truncation");
    moe_gen_json_null(&j);
    moe_gen_json_key(&j, "padding");
    moe_gen_json_null(&j);

    /* added_tokens in id order, as the library writes them */
    int order[MOE_GEN_MAX_SPECIALS];
    for (int i = 0; i < t->n_special; i++)
        order[i] = i;
    for (int i = 1; i < t->n_special; i++)
        for (int k = i; k > 0 && t->special[order[k]].id < t->special[order[k - 1]].id; k--) {
            int tmp = order[k];
            order[k] = order[k - 1];
            order[k - 1] = tmp;
        }
    moe_gen_json_key(&j, "added_tokens");
    moe_gen_json_arr_begin(&j);
    for (int i = 0; i < t->n_special; i++) {
        moe_gen_json_obj_begin(&j);
        moe_gen_json_key(&j, "id");
        moe_gen_json_int(&j, t->special[order[i]].id);
        moe_gen_json_key(&j, "content");
        moe_gen_json_str(&j, t->special[order[i]].content);
        moe_gen_json_key(&j, "single_word");
        moe_gen_json_bool(&j, false);
        moe_gen_json_key(&j, "lstrip");
        moe_gen_json_bool(&j, false);
        moe_gen_json_key(&j, "rstrip");
        moe_gen_json_bool(&j, false);
        moe_gen_json_key(&j, "normalized");
        moe_gen_json_bool(&j, false);
        moe_gen_json_key(&j, "special");
        moe_gen_json_bool(&j, true);
        moe_gen_json_obj_end(&j);
    }
    moe_gen_json_arr_end(&j);

    pipeline(&j, t);

    bool sp = t->family == MOE_GEN_TOK_SP;
    moe_gen_json_key(&j, "model");
    moe_gen_json_obj_begin(&j);
    moe_gen_json_key(&j, "type");
    moe_gen_json_str(&j, "BPE");
    moe_gen_json_key(&j, "dropout");
    moe_gen_json_null(&j);
    moe_gen_json_key(&j, "unk_token");
    if (sp)
        moe_gen_json_str(&j, "<unk>");
    else
        moe_gen_json_null(&j);
    moe_gen_json_key(&j, "continuing_subword_prefix");
    moe_gen_json_null(&j);
    moe_gen_json_key(&j, "end_of_word_suffix");
    moe_gen_json_null(&j);
    moe_gen_json_key(&j, "fuse_unk");
    moe_gen_json_bool(&j, sp);
    moe_gen_json_key(&j, "byte_fallback");
    moe_gen_json_bool(&j, sp);
    moe_gen_json_key(&j, "ignore_merges");
    moe_gen_json_bool(&j, false);
    moe_gen_json_key(&j, "vocab");
    moe_gen_json_obj_begin(&j);
    for (int i = 0; i < t->n_vocab; i++) {
        moe_gen_json_key(&j, t->vocab[i]);
        moe_gen_json_int(&j, i);
    }
    moe_gen_json_obj_end(&j);
    moe_gen_json_key(&j, "merges");
    moe_gen_json_arr_begin(&j);
    for (int m = 0; m < t->n_merges; m++) {
        moe_gen_json_arr_begin(&j);
        moe_gen_json_str(&j, t->vocab[t->merges[m][0]]);
        moe_gen_json_str(&j, t->vocab[t->merges[m][1]]);
        moe_gen_json_arr_end(&j);
    }
    moe_gen_json_arr_end(&j);
    moe_gen_json_obj_end(&j);
    moe_gen_json_obj_end(&j);
    return moe_gen_json_finish(&j, path, false);
}
