/* Compression codecs of compressed fields (docs/format.md, "Compressed fields"), loaded at run time.
 *
 * No build-time dependency: zstd is found with dlopen() on first use (libzstd.so.1, or the file
 * SHARDFEED_ZSTD_LIBRARY names) and the few functions of its stable ABI used here are declared in
 * codec.c, so the wheel builds and installs where no zstd headers exist, and everything but the
 * compressed fields works where the library is missing. Each thread keeps its own zstd contexts and
 * scratch buffers (a thread-specific key), so the pool's threads reuse them batch after batch. */
#ifndef SF_CODEC_H
#define SF_CODEC_H

#include <stddef.h>

enum sf_codec { SF_CODEC_ZSTD = 1, SF_CODEC_COUNT };

/* NULL when `codec` can be used in this process, else why not (a static message naming the
 * library). Loads the library on the first call; thread-safe. */
const char *sf_codec_unavailable(int codec);

/* The library file a codec is loaded from (the default name, or SHARDFEED_ZSTD_LIBRARY). */
const char *sf_codec_library(int codec);

/* The largest compressed size of `raw_bytes` bytes (0: codec unavailable). */
size_t sf_codec_bound(int codec, size_t raw_bytes);

/* Compresses src[0..n) into dst (capacity cap >= sf_codec_bound) at `level` with this thread's
 * context, or with the compression dictionary `cdict` (sf_codec_cdict_create; its level, not
 * `level`) where it is not NULL. Returns SF_OK with *out_bytes, SF_ERR_CODEC, SF_ERR_NOMEM or
 * SF_ERR_CORRUPT (*why: the codec's static message). */
int sf_codec_compress(int codec, void *dst, size_t cap, const void *src, size_t n, int level,
                      const void *cdict, size_t *out_bytes, const char **why);

/* Decompresses src[0..n), which must decode to exactly raw_bytes bytes, into dst (raw_bytes of
 * room; nothing is written past it), with the decompression dictionary `ddict` (NULL: none) whose
 * id is `dict_id` (0 with none). Returns SF_OK; SF_ERR_CORRUPT (the bytes are not a frame of the
 * codec, *why says why); SF_ERR_DICTIONARY (the frame's header names another dictionary than
 * dict_id, *found_bytes its id: checked before decoding, so a frame is never decoded with a
 * dictionary it was not written with); SF_ERR_SIZE (a valid frame of another size, *found_bytes its
 * size where known, else -1); SF_ERR_CODEC; SF_ERR_NOMEM. */
int sf_codec_decompress(int codec, void *dst, size_t raw_bytes, const void *src, size_t n,
                        const void *ddict, unsigned dict_id, long long *found_bytes, const char **why);

/* ---- trained dictionaries (docs/format.md, "Compression dictionaries") ----------------------
 * Their functions are looked up with the others but are optional: a library without them still
 * compresses and decodes frames without a dictionary. */

/* NULL when `codec`'s dictionary functions can be used here, else why not (a static message). */
const char *sf_codec_dictionaries_unavailable(int codec);

/* Trains a dictionary of at most `capacity` bytes into dst from the n samples that lie one after
 * another in `samples`, sample k sizes[k] bytes. Returns SF_OK with *out_bytes; SF_ERR_CODEC (the
 * functions are missing, or training failed, e.g. too few samples: *why says why); SF_ERR_NOMEM. */
int sf_codec_train(int codec, void *dst, size_t capacity, const void *samples, const size_t *sizes,
                   unsigned n, size_t *out_bytes, const char **why);

/* The dictionary id in the header of dictionary dict[0..n) (0: not a dictionary of the codec's
 * format: raw content, which shardfeed does not use). */
unsigned sf_codec_dictionary_id(int codec, const void *dict, size_t n);

/* A decompression dictionary made from dict[0..n) (copied), shared read-only by every thread;
 * NULL with *why where it cannot be made. Freed by sf_codec_ddict_free. */
void *sf_codec_ddict_create(int codec, const void *dict, size_t n, const char **why);
void sf_codec_ddict_free(int codec, void *ddict);

/* A compression dictionary made from dict[0..n) (copied) for `level`, shared read-only by every
 * thread; NULL with *why where it cannot be made. Freed by sf_codec_cdict_free. */
void *sf_codec_cdict_create(int codec, const void *dict, size_t n, int level, const char **why);
void sf_codec_cdict_free(int codec, void *cdict);

/* This thread's scratch buffer `slot` (0 or 1) of at least `bytes` bytes, kept for the thread's
 * next calls; NULL when it cannot be allocated. */
void *sf_codec_scratch(int slot, size_t bytes);

#endif
