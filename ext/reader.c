/* Batch reads of fixed-size records: which path a batch takes (see reader.h). The paths are in
 * records.c (preadv), mapped.c (memory map, SIGBUS guard) and checked.c (CRC32C per record); heap
 * reads in heap.c; I/O helpers in io.c. */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT (io.h) */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "reader.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "pool.h"
#include "records.h"
#include "uring.h"

/* Bytes of work below which a chunk is not worth handing to another thread (memory copies): waking
 * a pool thread costs tens of microseconds on a VM, as long as copying ~100 KiB from the page
 * cache. 256 KiB: a 133 KiB batch read on the caller alone took 62-71 us against 108-151 us split
 * in two 64 KiB chunks; 2 MiB and 9 MiB batches unchanged (benchmarks/RESULTS.md). */
#define SF_MAP_CHUNK_BYTES (256 * 1024)

/* The blocking pass: items [0, items) of ctx (ctx->rows) that wait for the disk, through io_uring
 * where the read I/O mode asks for it and it can be used (uring.h), else on `threads` threads of
 * blocking preadv. */
static int read_uncached(record_ctx *ctx, size_t items, size_t threads, sf_error *err)
{
    int mode = sf_read_io();
    if (mode == SF_READ_IO_AUTO || mode == SF_READ_IO_URING ||
        (mode == SF_READ_IO_DIRECT_URING && ctx->shards->direct_fds)) {
        int rc = sf_read_uring(ctx, items, err);
        if (rc <= 0)
            return rc;
    }
    return sf_read_blocking(ctx, items, threads, err);
}

/* More threads than CPUs only help records that wait for the disk; for records in the page cache
 * they only add thread switches. So a first pass `fn` on at most one thread per CPU reads what is
 * in the page cache without waiting (preadv2 RWF_NOWAIT; on the map path, until copies turn slow),
 * and only the rest of the batch goes to blocking preadv on all `threads`. `min_items`: the first
 * pass's smallest chunk. */
static int read_cached_first(record_ctx *ctx, sf_range_fn fn, size_t n, size_t min_items,
                             size_t cpus, size_t threads, size_t *uncached, sf_error *err)
{
    unsigned char *missed = calloc(n, 1);
    size_t *rows = malloc(n * sizeof *rows);
    int rc = -1;
    if (!missed || !rows) {
        sf_out_of_memory(err, SF_FILE_RECORDS);
        goto done;
    }
    ctx->missed = missed;
    rc = sf_parallel_for(n, sf_pick_chunk(n, cpus, min_items), cpus, fn, ctx, err);
    ctx->missed = NULL;
    if (rc != 0)
        goto done;
    size_t m = 0;
    for (size_t r = 0; r < n; r++)
        if (missed[r])
            rows[m++] = r;
    ctx->rows = rows;
    *uncached = m;
    if (m > 0)
        rc = read_uncached(ctx, m, threads, err);
    ctx->rows = NULL;
done:
    free(missed);
    free(rows);
    return rc;
}

int sf_read_records(const sf_shards *shards, const int64_t *indices, size_t n,
                    const sf_field_out *fields, size_t n_fields, int use_map, size_t threads,
                    size_t *uncached, sf_error *err)
{
    record_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.shards = shards;
    ctx.indices = indices;
    ctx.fields = fields;
    ctx.n_fields = n_fields;
    sf_error_clear(err);
    *uncached = 0;
    if (n_fields == 0 || n == 0)
        return 0;
    size_t bytes = sf_plan_record_reads(&ctx, n);
    size_t cpus = threads > 1 ? sf_cpu_count() : 1;
    if (cpus > threads)
        cpus = threads;
    /* Two passes whatever the thread count: a record of the map path that is not in the page
     * cache is read by one preadv, not one page fault per 4 KiB page; and the first pass's
     * RWF_NOWAIT misses have every disk read of the batch under way at once. */
    if (shards->checksums) {
        ctx.use_map = use_map;
        *uncached = n;
        size_t min_items = use_map ? SF_MAP_CHUNK_BYTES / shards->record_bytes : 1;
        size_t workers = use_map ? cpus : threads;
        int rc = sf_parallel_for(n, sf_pick_chunk(n, workers, min_items), workers, sf_read_records_checked, &ctx, err);
        /* The zero-filled tail of a cut page fails its checksum: say that the shard was cut. */
        if (use_map && (rc == 0 || err->kind == SF_ERR_CHECKSUM)) {
            sf_error cut;
            sf_error_clear(&cut);
            if (sf_check_mapped_sizes(&ctx, n, &cut) != 0) {
                *err = cut;
                rc = -1;
            }
        }
        return rc;
    }
    /* Direct reads skip the page-cache pass: a miss there (a preadv2 RWF_NOWAIT or a page fault)
     * starts a read of its pages into the page cache, which the direct read would then repeat. */
    if (shards->direct_fds) {
        *uncached = n;
        return read_uncached(&ctx, n, threads, err);
    }
    if (use_map) {
        size_t min_items = bytes ? SF_MAP_CHUNK_BYTES / bytes : n;
        int rc = read_cached_first(&ctx, sf_read_records_map, n, min_items, cpus, threads, uncached, err);
        return rc != 0 ? rc : sf_check_mapped_sizes(&ctx, n, err);
    }
#ifdef SF_HAVE_NOWAIT
    if (sf_read_io() != SF_READ_IO_URING)
        return read_cached_first(&ctx, sf_read_records_pread, n, 1, cpus, threads, uncached, err);
#endif
    *uncached = n;
    return read_uncached(&ctx, n, threads, err);
}

int sf_advise_records(const sf_shards *shards, const int64_t *indices, size_t n)
{
#ifdef POSIX_FADV_WILLNEED
    if (shards->direct_fds)
        return 0; /* direct reads would not find them in the page cache: the advice would read them twice */
    size_t r = 0;
    while (r < n) {
        size_t s = sf_shard_of(shards, indices[r]);
        size_t records = 1;
        while (r + records < n && indices[r + records] == indices[r] + (int64_t)records &&
               indices[r + records] < shards->starts[s + 1])
            records++;
        off_t at = (off_t)shards->header_bytes + (off_t)(indices[r] - shards->starts[s]) * (off_t)shards->record_bytes;
        int rc = posix_fadvise(shards->fds[s], at, (off_t)(records * shards->record_bytes), POSIX_FADV_WILLNEED);
        if (rc != 0)
            return rc;
        r += records;
    }
#else
    (void)shards;
    (void)indices;
    (void)n;
#endif
    return 0;
}
