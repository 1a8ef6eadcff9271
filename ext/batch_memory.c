/* Batch memory: page-aligned anonymous blocks and the cache that keeps freed ones; see
 * batch_memory.h. */
#define _DEFAULT_SOURCE 1 /* MAP_ANONYMOUS */
#define _DARWIN_C_SOURCE 1
#include "batch_memory.h"

#include <sys/mman.h>
#include <unistd.h>

static void *cached_data[SF_BATCH_CACHE_SLOTS];
static size_t cached_bytes[SF_BATCH_CACHE_SLOTS];
static size_t cached_count, cached_total;

size_t sf_batch_size(size_t nbytes)
{
    static size_t page;
    if (page == 0) {
        long size = sysconf(_SC_PAGESIZE);
        page = size > 0 ? (size_t)size : 4096;
    }
    return nbytes ? (nbytes + page - 1) / page * page : page;
}

/* Takes cached block i out of the cache and returns it. */
static void *take(size_t i)
{
    void *data = cached_data[i];
    cached_total -= cached_bytes[i];
    for (size_t j = i + 1; j < cached_count; j++) {
        cached_data[j - 1] = cached_data[j];
        cached_bytes[j - 1] = cached_bytes[j];
    }
    cached_count--;
    return data;
}

void *sf_batch_alloc(size_t nbytes)
{
    size_t size = sf_batch_size(nbytes);
    for (size_t i = cached_count; i-- > 0;)
        if (cached_bytes[i] == size)
            return take(i);
    void *data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return data == MAP_FAILED ? NULL : data;
}

void sf_batch_release(void *data, size_t nbytes)
{
    size_t size = sf_batch_size(nbytes);
    if (size > SF_BATCH_CACHE_BYTES) {
        munmap(data, size);
        return;
    }
    while (cached_count == SF_BATCH_CACHE_SLOTS || cached_total + size > SF_BATCH_CACHE_BYTES) {
        size_t oldest = cached_bytes[0];
        munmap(take(0), oldest);
    }
    cached_data[cached_count] = data;
    cached_bytes[cached_count] = size;
    cached_count++;
    cached_total += size;
}

size_t sf_batch_cached(size_t *sizes)
{
    for (size_t i = 0; sizes && i < cached_count; i++)
        sizes[i] = cached_bytes[i];
    return cached_count;
}

size_t sf_batch_free_cached(void)
{
    size_t freed = cached_total;
    while (cached_count > 0) {
        cached_count--;
        munmap(cached_data[cached_count], cached_bytes[cached_count]);
    }
    cached_total = 0;
    return freed;
}
