/* Whole-file reads of the small text files a model directory holds (config.json, tokenizer.json,
 * model.safetensors.index.json). */
#ifndef MOE_COMMON_FILE_H
#define MOE_COMMON_FILE_H

#include <stddef.h>
#include "common/status.h"

/* Reads path into a malloc'd, NUL-terminated buffer (*out, *len bytes before the NUL; len may be
 * NULL). Fails with NOT_FOUND (absent), IO (cannot open or read, or larger than max_bytes) or
 * NOMEM, with a message naming the file. The caller frees *out. */
moe_status moe_read_file(const char *path, size_t max_bytes, char **out, size_t *len);

#endif
