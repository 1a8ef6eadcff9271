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
 * context. Returns SF_OK with *out_bytes, SF_ERR_CODEC, SF_ERR_NOMEM or SF_ERR_CORRUPT (*why: the
 * codec's static message). */
int sf_codec_compress(int codec, void *dst, size_t cap, const void *src, size_t n, int level,
                      size_t *out_bytes, const char **why);

/* Decompresses src[0..n), which must decode to exactly raw_bytes bytes, into dst (raw_bytes of
 * room; nothing is written past it). Returns SF_OK; SF_ERR_CORRUPT (the bytes are not a frame of
 * the codec, *why says why); SF_ERR_SIZE (a valid frame of another size, *found_bytes its size
 * where known, else -1); SF_ERR_CODEC; SF_ERR_NOMEM. */
int sf_codec_decompress(int codec, void *dst, size_t raw_bytes, const void *src, size_t n,
                        long long *found_bytes, const char **why);

/* This thread's scratch buffer `slot` (0 or 1) of at least `bytes` bytes, kept for the thread's
 * next calls; NULL when it cannot be allocated. */
void *sf_codec_scratch(int slot, size_t bytes);

#endif
