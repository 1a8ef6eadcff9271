/* The fixed-size record reads shared by the read paths (internal to the core): the job of one
 * batch (record_ctx), the preadv path (records.c), the memory-map path (mapped.c) and checked reads
 * (checked.c). reader.c picks the path; reader.h documents what a caller sees. */
#ifndef SF_RECORDS_H
#define SF_RECORDS_H

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "reader.h"

/* Records are copied from the map one after another; asking for the one SF_PREFETCH_AHEAD places
 * later lets its cache (and TLB) misses overlap the copies in between. */
#define SF_PREFETCH_AHEAD 8
#define SF_PREFETCH_MAX_BYTES 512

typedef struct record_ctx {
    const sf_shards *shards;
    const int64_t *indices;
    const sf_field_out *fields;
    size_t n_fields;
    size_t span_bytes;      /* a record's bytes from the first requested byte to the last */
    size_t iovs_per_record; /* iovecs of one record in a run, the one for the skip before it included */
    size_t max_run;         /* most records one preadv reads (1: records are read one by one) */
    size_t discard_bytes;   /* unwanted bytes between fields or records (read into a discard buffer) */
    size_t scratch_bytes;   /* stored bytes of the fields of one record that land in a scratch buffer */
    int stream;            /* convert with non-temporal stores (sf_convert_stream) */
    const size_t *rows;    /* the batch rows to read, items [begin, end) index it; NULL: all rows */
    unsigned char *missed; /* non-NULL: page-cache pass: rows left for the blocking pass get a 1 */
    int slow;              /* map path, page-cache pass: a thread saw disk waits (atomic access) */
    int use_map;           /* checked reads: records come from the maps (else preadv) */
} record_ctx;

typedef int (*sf_convert_fn)(int, void *, const void *, size_t, const sf_affine *, size_t);

/* Fills the layout fields of ctx (shards, indices, fields and n_fields set) for a batch of n
 * records: stream, iovs_per_record, scratch_bytes, discard_bytes, span_bytes, max_run. Returns the
 * stored bytes of the requested fields of one record. */
size_t sf_plan_record_reads(record_ctx *ctx, size_t n);

/* The preadv path (records.c), an sf_range_fn over items [begin, end): records adjacent on disk in
 * runs of one preadv, others one by one; in the page-cache pass (ctx->missed set) with
 * RWF_NOWAIT, flagging what was not cached. */
int sf_read_records_pread(void *ctx, size_t begin, size_t end, sf_error *err);

/* A run: items [item, stop) of a range whose records follow one another in one shard file (record
 * k, k+1, k+2, ... in item order), read by one request. Returns stop (> item): at most
 * ctx->max_run records, and the run ends at the shard's end. *shard: the run's shard. */
size_t sf_collect_run(const record_ctx *ctx, size_t item, size_t end, size_t *shard);

/* Buffers for one run in flight: the discard buffer (ctx->discard_bytes, may be shared: nothing
 * reads it), iovecs and scratch space for up to `records` records. */
typedef struct sf_run_buffers {
    char *discard;
    struct iovec *iov;
    char *scratch;
    size_t records;
    char *bounce;           /* direct reads: SF_DIRECT_ALIGN-aligned, bounce_bytes long, or NULL */
    size_t bounce_bytes;
} sf_run_buffers;

/* Makes buf hold a run of `records` records (<= ctx->max_run). The buffers grow with the longest
 * run so far, at least doubling, so a batch of scattered records allocates what one record needs.
 * Returns 0, or -1 when out of memory (buf keeps what it had: free iov and scratch). */
int sf_fit_run(const record_ctx *ctx, sf_run_buffers *buf, size_t records);

/* Fills buf->iov with the iovecs that read run [item, stop) of shard s (sf_collect_run) and
 * returns how many (0: no bytes requested); *at: the file offset of the first byte, *total: the
 * bytes to read. */
size_t sf_run_iovecs(const record_ctx *ctx, size_t item, size_t stop, size_t s, const sf_run_buffers *buf,
                     off_t *at, size_t *total);

/* Direct reads. A dataset far larger than the memory the page cache may use gains little from
 * the cache: most reads of a random epoch miss it, and each miss read through it costs the kernel
 * an eviction and one more copy. With shards->direct_fds every record is read with O_DIRECT (no
 * page-cache pass: reader.c): the aligned span around the run (SF_DIRECT_ALIGN, which every
 * device's logical block size divides) into a bounce buffer, then copied into the iovecs' places
 * (sf_scatter). A file that refuses it (EINVAL: a file system without O_DIRECT, an alignment it
 * does not take) is read through the page cache instead, the same bytes and errors. */
#define SF_DIRECT_ALIGN ((size_t)4096)

/* The file descriptor for direct reads of shard s, or -1. */
static inline int sf_direct_fd(const sf_shards *shards, size_t s)
{
    return shards->direct_fds ? shards->direct_fds[s] : -1;
}

/* The aligned span [*start, *start + *bytes) of the file that holds bytes [at, at + total). */
static inline void sf_direct_span(off_t at, size_t total, off_t *start, size_t *bytes)
{
    const off_t align = (off_t)SF_DIRECT_ALIGN;
    *start = at / align * align;
    off_t end = (at + (off_t)total + align - 1) / align * align;
    *bytes = (size_t)(end - *start);
}

/* Makes buf->bounce hold `bytes` (aligned). It grows to the size asked, no more: a buffer kept
 * from one batch to the next (uring.c) is never larger than the largest span it read, and it is
 * seldom grown: runs of one length have spans of two sizes at most (at either alignment). Returns 0
 * or -1 (out of memory; buf keeps what it had). */
int sf_fit_bounce(sf_run_buffers *buf, size_t bytes);

/* Copies `src` into the places of iov[0..count) in order, skipping the discard buffer's. */
void sf_scatter(const char *src, const struct iovec *iov, size_t count, const char *discard);

/* Converts the cast fields of run [item, stop) once all its bytes were read into buf's iovecs. */
void sf_convert_run(const record_ctx *ctx, size_t item, size_t stop, const sf_run_buffers *buf);

/* Fills *err with `kind` (errno kept for SF_ERR_IO) for run [item, stop) of shard s read from
 * offset `at` when `done` bytes of it were read: the error names the first record not read whole. */
void sf_run_failed(const record_ctx *ctx, size_t item, size_t s, off_t at, size_t done, int kind, sf_error *err);

/* Blocking preadv of items [0, items) on `threads` threads, handed out in whole runs: a run of
 * adjacent records stays one read from the disk, not one per thread's share of it. */
int sf_read_blocking(record_ctx *ctx, size_t items, size_t threads, sf_error *err);

/* The memory-map path (mapped.c), an sf_range_fn: copies records [begin, end) of the batch from
 * the map. In the page-cache pass (ctx->missed set) it stops touching the map at the first sign
 * of disk reads: the rest of the chunk goes through the preadv page-cache pass, which reads what
 * is cached and flags the others. (A preadv2 RWF_NOWAIT that misses also starts the disk read, so
 * the blocking pass finds it under way.) */
int sf_read_records_map(void *ctx, size_t begin, size_t end, sf_error *err);

/* After a mapped batch: fails it with SF_ERR_EOF naming the first record (in batch order) whose
 * requested bytes are no longer all inside its shard file (mapped.c). */
int sf_check_mapped_sizes(const record_ctx *ctx, size_t n, sf_error *err);

/* Prefetches the requested bytes of mapped record `index` (mapped.c). */
void sf_prefetch_record(const record_ctx *ctx, int64_t index);

/* While the calling thread copies from the maps of `shards`, a SIGBUS at an address inside one of
 * them jumps to `jump` (set by sigsetjmp); sf_map_guard_leave ends that (mapped.c). */
void sf_map_guard_enter(const sf_shards *shards, sigjmp_buf *jump);
void sf_map_guard_leave(void);

/* Checked reads (checked.c), an sf_range_fn: items [begin, end), each record read whole (from the
 * map when ctx->use_map, else by preadv), its CRC32C compared with the stored one as its fields
 * are copied (reader.h). */
int sf_read_records_checked(void *ctx, size_t begin, size_t end, sf_error *err);

#endif
