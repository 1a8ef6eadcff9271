/* A persistent pool of native threads that runs one parallel-for at a time per caller.
 *
 * Threads never touch Python. Several callers (Python threads that released the GIL) may submit
 * at once; each submitter also works on its own job, so a job always finishes even when the pool
 * has no threads (after fork, or when pthread_create fails). */
#ifndef SF_POOL_H
#define SF_POOL_H

#include <stddef.h>
#include "sf_error.h"

/* Processes items [begin, end). Returns 0, or -1 after filling *err. */
typedef int (*sf_range_fn)(void *ctx, size_t begin, size_t end, sf_error *err);

/* Runs fn over [0, n) in chunks of `chunk` items on at most `max_threads` threads (the caller
 * included). Returns 0, or -1 with *err holding the first failure; once a chunk failed, chunks not
 * yet started are skipped. */
int sf_parallel_for(size_t n, size_t chunk, size_t max_threads, sf_range_fn fn, void *ctx,
                    sf_error *err);

/* Number of pool threads currently alive (not counting callers). */
size_t sf_pool_size(void);

/* Installs the fork handler. Call once at module import. Returns 0 or an errno value. */
int sf_pool_init(void);

#define SF_POOL_MAX_THREADS 256

#endif
