/* I/O and threading helpers of the read paths (reader.c, records.c, mapped.c, checked.c, heap.c);
 * internal to the core. Every system call's result is checked: EINTR is retried, a short read
 * continues where it stopped, and end-of-file before the last byte is an error. */
#ifndef SF_IO_H
#define SF_IO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "reader.h"

#if defined(__linux__) && defined(RWF_NOWAIT)
#define SF_HAVE_NOWAIT 1
#endif

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Reads exactly the bytes described by iov[0..count) from fd at offset. Consumes the iov array.
 * Returns SF_OK, SF_ERR_IO (errno kept) or SF_ERR_EOF; *done_bytes is how many bytes were read
 * (all of them on SF_OK). */
int sf_preadv_full(int fd, struct iovec *iov, int count, off_t offset, size_t *done_bytes);

/* Reads file bytes [start, start + bytes) of an O_DIRECT descriptor into `bounce` until the first
 * `need` of them are in (the span may run past the end of the file). Returns SF_OK, SF_ERR_IO
 * (errno kept; EINVAL: the file refuses direct reads of this span) or SF_ERR_EOF; *done_bytes is
 * how many bytes were read. */
int sf_pread_direct(int fd, char *bounce, size_t bytes, off_t start, size_t need, size_t *done_bytes);

#ifdef SF_HAVE_NOWAIT
/* One attempt that never waits for the disk: 1 when all `total` bytes came from the page cache; 0
 * when they did not (not cached, partly cached, or any error: the blocking pass reads them again
 * and reports errors). */
int sf_preadv_cached(int fd, const struct iovec *iov, size_t count, off_t offset, size_t total);
#endif

/* The shard that holds sample `index` (a valid index; empty shards are skipped over). Inline: the
 * map path calls it for every record. */
static inline size_t sf_shard_of(const sf_shards *shards, int64_t index)
{
    /* First shard whose start is past index, minus one (empty shards are skipped over). */
    size_t lo = 0, hi = shards->n_shards;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (shards->starts[mid + 1] <= index)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Fills *err (errno too, for SF_ERR_IO). */
void sf_set_error(sf_error *err, int kind, int file_kind, size_t shard, int64_t offset, int64_t sample);

/* Fills *err for an allocation that failed (no shard, offset or sample) and returns -1. */
int sf_out_of_memory(sf_error *err, int file_kind);

/* Items per chunk for sf_parallel_for: about four chunks per thread, at least min_items. */
size_t sf_pick_chunk(size_t n, size_t threads, size_t min_items);

/* CPUs this process may run on. */
size_t sf_cpu_count(void);

/* Records that a conversion was not exact (any thread may; they only ever store 1). */
static inline void sf_note_inexact(int *flag, int inexact)
{
    if (inexact && flag)
        __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
}

#endif
