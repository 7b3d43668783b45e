/* Read-only, zero-copy access to safetensors files: one file or a sharded set with
 * model.safetensors.index.json. Files are mmap'd; tensor data pointers point into the maps. */
#ifndef MOE_WORKER_SAFETENSORS_H
#define MOE_WORKER_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "common/status.h"
#include "kernels/kernels.h"

#define MOE_ST_MAX_DIMS 4

typedef struct {
    const char *name;      /* owned by the set */
    const char *file;      /* path of the file it lives in (owned by the set) */
    moe_dtype dtype;       /* F32, BF16, F16, or Q8/Q4 ("MOE_Q8"/"MOE_Q4", see below); other
                            * dtypes are refused at open */
    int n_dims;
    int64_t shape[MOE_ST_MAX_DIMS];
    const void *data;      /* into the mmap; valid until moe_st_close */
    size_t n_bytes;
} moe_st_tensor;

typedef struct moe_st_set moe_st_set;

/* Opens every safetensors file of model directory `dir` (model.safetensors, or the shards named
 * by model.safetensors.index.json). Validates each header completely: JSON well formed, header
 * length inside the file, dtypes known, shape x dtype size == byte range, ranges inside the data
 * section, no overlaps, index entries pointing at existing tensors. Errors name file and tensor. */
moe_status moe_st_open_dir(const char *dir, moe_st_set **out);
/* Opens one file (for tools and fuzzing). */
moe_status moe_st_open_file(const char *path, moe_st_set **out);
/* Parses a header from memory: buf = the whole file image. For the fuzzer; same checks. */
moe_status moe_st_parse(const uint8_t *buf, size_t len, const char *name, moe_st_set **out);
void moe_st_close(moe_st_set *set);

/* The safetensors dtype tag of dt: "F32", "BF16", "F16", and for our group-quantized rows
 * (kernels.h) "MOE_Q8" / "MOE_Q4"; NULL for a dtype a file cannot hold. A Q8/Q4 tensor is 2-D,
 * shape [rows, cols] counts weights (cols a multiple of MOE_QK), and its bytes are rows x
 * moe_dtype_row_bytes(dt, cols): the blocks of each row, rows back to back. These two tags are
 * ours: other safetensors readers refuse such files (docs/models.md, pre-quantized models). */
const char *moe_st_dtype_tag(moe_dtype dt);
/* The alignment a tensor's data needs: 4 for F32, 2 otherwise (Q8/Q4 blocks begin with an f16). */
size_t moe_st_dtype_align(moe_dtype dt);
/* Bytes of a tensor of dtype dt and shape[n_dims]: 0 and *bytes set, or -1 on overflow, a
 * negative dimension, or a Q8/Q4 shape that is not [rows, k * MOE_QK]. */
int moe_st_tensor_bytes(moe_dtype dt, int n_dims, const int64_t *shape, uint64_t *bytes);

/* The value of `key` in the __metadata__ of `file` (a path as moe_st_tensor.file gives it, or an
 * equal string); NULL when the file has no such string entry. Valid until moe_st_close. */
const char *moe_st_meta(const moe_st_set *set, const char *file, const char *key);

/* Drops this process's resident pages of [p, p + n) (widened to whole pages) when the range lies
 * in one of the set's mmaps: madvise(MADV_DONTNEED) of a private, read-only file mapping, so
 * nothing is lost and a later read faults the bytes in again from the file. Used after a
 * tensor's bytes were copied out (quantized or converted at load): their pages stop counting in
 * the RSS. A pointer outside every map (moe_st_parse's buffer) is left alone. Returns the bytes
 * released (0 when none). Thread-safe (madvise only). */
size_t moe_st_release(const moe_st_set *set, const void *p, size_t n);

/* NULL if absent. */
const moe_st_tensor *moe_st_find(const moe_st_set *set, const char *name);
int moe_st_count(const moe_st_set *set);
const moe_st_tensor *moe_st_at(const moe_st_set *set, int i);

/* Writer (used by moe-gen-model and tests): writes one safetensors file from n tensors.
 * Tensors are written in the given order, data aligned to 8 bytes, with __metadata__ if given.
 * A tensor's bytes come from `data`, or, when data is NULL, from fill(fill_ctx, dst, n_bytes, offset)
 * (offset = where dst starts inside the tensor; called repeatedly in order)
 * which writes them into a bounded staging buffer: multi-GB models stream to disk without being
 * held in memory. */
typedef struct {
    const char *name;
    moe_dtype dtype;
    int n_dims;
    int64_t shape[MOE_ST_MAX_DIMS];
    const void *data;
    void (*fill)(void *fill_ctx, void *dst, size_t n_bytes, size_t offset);
    void *fill_ctx;
} moe_st_write_tensor;
moe_status moe_st_write_file(const char *path, const moe_st_write_tensor *tensors, int n,
                             const char *metadata_json);

#endif
