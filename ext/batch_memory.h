/* Memory for large batch output arrays, kept for reuse when they are freed.
 *
 * A new array above glibc's mmap threshold (which adapts up to 32 MiB) is mapped fresh, and the
 * kernel faults in and zeroes every page of it on first write: for a 38 MiB batch of float32
 * images that is most of the CPU time of a read from disk (benchmarks/RESULTS.md, "Batch
 * memory"). A block given back goes to a small cache instead, and the next block of the same size
 * takes it back, its pages already mapped. The cache holds at most SF_BATCH_CACHE_SLOTS blocks and
 * SF_BATCH_CACHE_BYTES bytes; the oldest blocks are unmapped to make room (munmap of a whole
 * mapping this file made cannot fail).
 *
 * Not thread-safe: callers serialise every call (the Cython adapter holds the GIL, which
 * allocation from Python and tp_dealloc both do). */
#ifndef SF_BATCH_MEMORY_H
#define SF_BATCH_MEMORY_H

#include <stddef.h>

#define SF_BATCH_CACHE_SLOTS 8
#define SF_BATCH_CACHE_BYTES ((size_t)256 << 20)

/* The bytes a block for `nbytes` takes: whole pages, at least one. */
size_t sf_batch_size(size_t nbytes);

/* A page-aligned, writable block of sf_batch_size(nbytes) bytes: the most recently cached block
 * of that size, or a new anonymous mapping; NULL with errno set when the mapping fails. */
void *sf_batch_alloc(size_t nbytes);

/* Gives back a block from sf_batch_alloc(nbytes): cached, or unmapped if it alone exceeds the cap. */
void sf_batch_release(void *data, size_t nbytes);

/* How many blocks are cached; sizes[0..count) gets their sizes in bytes, oldest first (sizes may
 * be NULL). */
size_t sf_batch_cached(size_t *sizes);

/* Unmaps every cached block; returns the bytes unmapped. */
size_t sf_batch_free_cached(void);

#endif
