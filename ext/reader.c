/* Record and heap reads; see reader.h. Every system call's result is checked: EINTR is retried,
 * a short read continues where it stopped, and end-of-file before the last byte is an error. */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT, sched_getaffinity */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "reader.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include "crc32c.h"
#include "pool.h"

#if defined(__linux__) && defined(RWF_NOWAIT)
#define SF_HAVE_NOWAIT 1
#endif

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Records that follow one another in a shard file and in a thread's part of the batch (sequential
 * orders, block shuffles) are read by one preadv of up to SF_RUN_BYTES and IOV_MAX iovecs instead
 * of one preadv each: one system call instead of dozens. Unless more than SF_RUN_MAX_SKIP
 * unrequested bytes lie between one record's requested bytes and the next one's (a small field
 * of large records): reading those into a discard buffer would cost more than the calls saved. */
#define SF_RUN_BYTES ((size_t)1 << 20)
#define SF_RUN_MAX_SKIP ((size_t)4096)

/* Bytes of work below which a chunk is not worth handing to another thread (memory copies): waking
 * a pool thread costs tens of microseconds on a VM, as long as copying ~100 KiB from the page
 * cache. 256 KiB: a 133 KiB batch read on the caller alone took 62-71 us against 108-151 us split
 * in two 64 KiB chunks; 2 MiB and 9 MiB batches unchanged (benchmarks/RESULTS.md). */
#define SF_MAP_CHUNK_BYTES (256 * 1024)

/* Converted output of a batch from this size on is written with non-temporal stores: it does not
 * fit in the cache anyway, and not reading every output line into the cache first makes the
 * conversion up to ~1.7x faster (benchmarks/RESULTS.md). Smaller batches stay in the cache, where
 * the caller reads them next. */
#define SF_STREAM_MIN_BYTES ((size_t)16 << 20)

/* Reads exactly the bytes described by iov[0..count) from fd at offset. Consumes the iov array.
 * Returns SF_OK, SF_ERR_IO (errno kept) or SF_ERR_EOF; *done_bytes is how many bytes were read
 * (all of them on SF_OK). */
static int preadv_full(int fd, struct iovec *iov, int count, off_t offset, size_t *done_bytes)
{
    *done_bytes = 0;
    while (count > 0) {
        ssize_t got = preadv(fd, iov, count > IOV_MAX ? IOV_MAX : count, offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return SF_ERR_IO;
        }
        if (got == 0)
            return SF_ERR_EOF;
        offset += got;
        *done_bytes += (size_t)got;
        size_t left = (size_t)got;
        while (count > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            count--;
        }
        if (left > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return SF_OK;
}

static size_t shard_of(const sf_shards *shards, int64_t index)
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

static void set_error(sf_error *err, int kind, int file_kind, size_t shard, int64_t offset,
                      int64_t sample)
{
    err->kind = kind;
    err->err_no = kind == SF_ERR_IO ? errno : 0;
    err->file_kind = file_kind;
    err->shard = (int64_t)shard;
    err->offset = offset;
    err->sample = sample;
}

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

/* Records that a conversion was not exact (any thread may; they only ever store 1). */
static inline void note_inexact(int *flag, int inexact)
{
    if (inexact && flag)
        __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
}

/* Where the stored bytes of a cast field land before conversion: the tail of the output slot when
 * the stored element is not wider than float32, else a scratch buffer. Streaming conversions read
 * from scratch too: the tail of the output slot would first be pulled into the cache. */
static int lands_in_scratch(const record_ctx *ctx, const sf_field_out *f)
{
    return f->cast != SF_CAST_COPY &&
           (ctx->stream || sf_cast_itemsize(f->cast) > sf_cast_out_itemsize(f->cast));
}

/* The batch row that item `item` of a range reads. */
static size_t row_of(const record_ctx *ctx, size_t item)
{
    return ctx->rows ? ctx->rows[item] : item;
}

/* Where field f of batch row r lands: its output slot, the tail of it (converted in place), or
 * `scratch` past the *scratch_used bytes that earlier fields of the record took. */
static char *landing_of(const record_ctx *ctx, const sf_field_out *f, size_t r, char *scratch,
                        size_t *scratch_used)
{
    char *row = f->dst + r * f->dst_bytes;
    if (f->cast == SF_CAST_COPY)
        return row;
    if (!lands_in_scratch(ctx, f))
        return row + (f->dst_bytes - f->src_bytes);
    char *landing = scratch + *scratch_used;
    *scratch_used += f->src_bytes;
    return landing;
}

/* Fills iov with the iovecs that land the requested bytes of batch row r (the gaps between fields
 * go to `discard`), from the record's first requested byte on; returns how many. */
static size_t record_iovecs(const record_ctx *ctx, size_t r, char *scratch, char *discard,
                            struct iovec *iov)
{
    size_t count = 0, scratch_used = 0;
    size_t cursor = ctx->fields[0].src_offset;
    for (size_t k = 0; k < ctx->n_fields; k++) {
        const sf_field_out *f = &ctx->fields[k];
        char *landing = landing_of(ctx, f, r, scratch, &scratch_used);
        if (f->src_bytes == 0)
            continue;
        if (f->src_offset > cursor) {
            iov[count].iov_base = discard;
            iov[count++].iov_len = f->src_offset - cursor;
        }
        iov[count].iov_base = landing;
        iov[count++].iov_len = f->src_bytes;
        cursor = f->src_offset + f->src_bytes;
    }
    return count;
}

/* Converts the cast fields of batch row r from where record_iovecs landed them. */
static void convert_record(const record_ctx *ctx, size_t r, char *scratch)
{
    sf_convert_fn convert = ctx->stream ? sf_convert_stream : sf_convert;
    size_t scratch_used = 0;
    for (size_t k = 0; k < ctx->n_fields; k++) {
        const sf_field_out *f = &ctx->fields[k];
        char *landing = landing_of(ctx, f, r, scratch, &scratch_used);
        if (f->cast != SF_CAST_COPY)
            note_inexact(f->inexact, convert(f->cast, f->dst + r * f->dst_bytes, landing, f->count,
                                             &f->affine, 0));
    }
}

#ifdef SF_HAVE_NOWAIT
/* One attempt that never waits for the disk: 1 when all `total` bytes came from the page cache; 0
 * when they did not (not cached, partly cached, or any error: the blocking pass reads them again
 * and reports errors). */
static int preadv_cached(int fd, const struct iovec *iov, size_t count, off_t offset, size_t total)
{
    if (count > IOV_MAX)
        return 0;
    ssize_t got = preadv2(fd, iov, (int)count, offset, RWF_NOWAIT);
    return got >= 0 && (size_t)got == total;
}
#endif

/* A run: items [item, stop) of a range whose records follow one another in one shard file (record
 * k, k+1, k+2, ... in item order), read by one preadv. Returns stop (> item): at most
 * ctx->max_run records, and the run ends at the shard's end. *shard: the run's shard. */
static size_t collect_run(const record_ctx *ctx, size_t item, size_t end, size_t *shard)
{
    const sf_shards *sh = ctx->shards;
    int64_t first = ctx->indices[row_of(ctx, item)];
    *shard = shard_of(sh, first);
    int64_t shard_end = sh->starts[*shard + 1];
    size_t stop = item + 1;
    while (stop < end && stop - item < ctx->max_run) {
        int64_t next = first + (int64_t)(stop - item);
        if (next >= shard_end || ctx->indices[row_of(ctx, stop)] != next)
            break;
        stop++;
    }
    return stop;
}

/* Per-thread buffers of the preadv path: the discard buffer, and iovecs and scratch space for a run
 * of up to `records` records. */
typedef struct run_buffers {
    char *discard;
    struct iovec *iov;
    char *scratch;
    size_t records;
} run_buffers;

/* Makes buf hold a run of `records` records (<= ctx->max_run). The buffers grow with the longest
 * run so far, at least doubling, so a batch of scattered records allocates what one record needs.
 * Returns 0, or -1 when out of memory. */
static int fit_run(const record_ctx *ctx, run_buffers *buf, size_t records)
{
    if (records <= buf->records)
        return 0;
    size_t doubled = 2 * buf->records < ctx->max_run ? 2 * buf->records : ctx->max_run;
    if (records < doubled)
        records = doubled;
    struct iovec *iov = realloc(buf->iov, sizeof *iov * records * ctx->iovs_per_record);
    if (!iov)
        return -1;
    buf->iov = iov;
    if (ctx->scratch_bytes) {
        char *scratch = realloc(buf->scratch, records * ctx->scratch_bytes);
        if (!scratch)
            return -1;
        buf->scratch = scratch;
    }
    buf->records = records;
    return 0;
}

/* The scratch space of record k of a run (NULL when no field lands in scratch). */
static char *run_scratch(const record_ctx *ctx, const run_buffers *buf, size_t k)
{
    return buf->scratch ? buf->scratch + k * ctx->scratch_bytes : NULL;
}

/* Reads the run [item, stop) of shard s with one preadv (several if a signal or a short read cuts
 * it), then converts its records. In the page-cache pass, a run that is not wholly in the page
 * cache is flagged for the blocking pass, all of it. An error names the first record that was not
 * read in full. Returns SF_OK or the error kind (err filled). */
static int read_run(const record_ctx *ctx, size_t item, size_t stop, size_t s, const run_buffers *buf,
                    sf_error *err)
{
    const sf_shards *sh = ctx->shards;
    int64_t first = ctx->indices[row_of(ctx, item)];
    off_t at = (off_t)sh->header_bytes + (off_t)(first - sh->starts[s]) * (off_t)sh->record_bytes +
               (off_t)ctx->fields[0].src_offset;
    size_t skip = sh->record_bytes - ctx->span_bytes; /* from one record's span to the next one's */
    size_t count = 0;
    for (size_t i = item; i < stop; i++) {
        if (i > item && skip > 0) {
            buf->iov[count].iov_base = buf->discard;
            buf->iov[count++].iov_len = skip;
        }
        count += record_iovecs(ctx, row_of(ctx, i), run_scratch(ctx, buf, i - item), buf->discard,
                               buf->iov + count);
    }
    size_t total = (stop - item - 1) * sh->record_bytes + ctx->span_bytes;
    if (count > 0) {
#ifdef SF_HAVE_NOWAIT
        if (ctx->missed) {
            if (!preadv_cached(sh->fds[s], buf->iov, count, at, total)) {
                for (size_t i = item; i < stop; i++)
                    ctx->missed[row_of(ctx, i)] = 1;
                return SF_OK;
            }
        } else
#endif
        {
            size_t done = 0;
            int rc = preadv_full(sh->fds[s], buf->iov, (int)count, at, &done);
            if (rc != SF_OK) {
                /* Record j of the run is whole once j * record_bytes + span_bytes were read. */
                size_t failed = done < ctx->span_bytes ? 0 : (done - ctx->span_bytes) / sh->record_bytes + 1;
                set_error(err, rc, SF_FILE_RECORDS, s, (int64_t)(at + (off_t)(failed * sh->record_bytes)),
                          first + (int64_t)failed);
                return rc;
            }
        }
    }
    for (size_t i = item; i < stop; i++)
        convert_record(ctx, row_of(ctx, i), run_scratch(ctx, buf, i - item));
    return SF_OK;
}

/* Reads items [begin, end): records adjacent on disk in runs (see collect_run), others one by one. */
static int read_records_pread(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const record_ctx *ctx = vctx;
    run_buffers buf = {NULL, NULL, NULL, 0};
    buf.discard = ctx->discard_bytes ? malloc(ctx->discard_bytes) : NULL;
    int rc = SF_OK;
    if (ctx->discard_bytes && !buf.discard)
        rc = SF_ERR_NOMEM;
    size_t item = begin;
    while (rc == SF_OK && item < end) {
        size_t s = 0;
        size_t stop = collect_run(ctx, item, end, &s);
        if (fit_run(ctx, &buf, stop - item) != 0) {
            rc = SF_ERR_NOMEM;
            break;
        }
        rc = read_run(ctx, item, stop, s, &buf, err);
        item = stop;
    }
    if (rc == SF_ERR_NOMEM) {
        set_error(err, SF_ERR_NOMEM, SF_FILE_RECORDS, 0, -1, -1);
        err->shard = -1;
    }
    free(buf.discard);
    free(buf.iov);
    free(buf.scratch);
    return rc == SF_OK ? 0 : -1;
}

/* A mapped shard that shrinks after it was opened (truncated by someone else) turns a copy from
 * the map into SIGBUS. While a thread copies from a map, guard_jump points at its recovery point
 * and guard_shards at the shards it copies from: a fault at an address inside one of their maps
 * makes the handler jump back there, and the read fails with SF_ERR_EOF, as on the preadv path.
 *
 * Any other SIGBUS (a fault elsewhere, or one sent with kill) is not the reader's. The handler then
 * steps out of the chain: it puts back the action that was installed before it (handler, SIG_DFL
 * or SIG_IGN, with its flags) and lets the signal happen again, so that action sees it once with
 * its own siginfo: a fault re-runs the faulting instruction on return; a sent signal is raised
 * again. Handlers installed after ours and chained to it (faulthandler saves ours as its previous
 * action) form a cycle once sf_guard_mapped_reads puts ours back in front: ours -> faulthandler ->
 * ours. `forwarding` breaks it: when the handler runs again for a signal it already handed on
 * (before any mapped read re-armed it), the chain has been walked, and the default action ends it.
 * Without that, each handler called the other: thousands of tracebacks, then a stack overflow. */
#if defined(__GNUC__) || defined(__clang__)
static __thread sigjmp_buf *guard_jump __attribute__((tls_model("initial-exec")));
static __thread const sf_shards *guard_shards __attribute__((tls_model("initial-exec")));
#else
static _Thread_local sigjmp_buf *guard_jump;
static _Thread_local const sf_shards *guard_shards;
#endif
static struct sigaction previous_bus;
static volatile sig_atomic_t forwarding;

/* Whether addr lies in one of the shard maps (async-signal-safe: reads only). */
static int in_shard_maps(const sf_shards *sh, const void *addr)
{
    const char *at = addr;
    for (size_t s = 0; sh != NULL && sh->maps != NULL && s < sh->n_shards; s++) {
        const char *map = sh->maps[s];
        size_t bytes = sh->header_bytes + (size_t)(sh->starts[s + 1] - sh->starts[s]) * sh->record_bytes;
        if (map != NULL && at >= map && at < map + bytes)
            return 1;
    }
    return 0;
}

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    (void)context;
    sigjmp_buf *jump = guard_jump;
    int fault = info != NULL && info->si_code > 0; /* raised by the kernel, not sent by a process */
    if (jump != NULL && fault && in_shard_maps(guard_shards, info->si_addr))
        siglongjmp(*jump, 1);
    int cycle = forwarding;
    forwarding = 1;
    struct sigaction next = previous_bus;
    if (cycle) {
        memset(&next, 0, sizeof next);
        next.sa_handler = SIG_DFL;
    }
    sigaction(sig, &next, NULL);
    if (!fault || cycle)
        raise(sig);
}

int sf_guard_mapped_reads(void)
{
    struct sigaction current;
    if (sigaction(SIGBUS, NULL, &current) != 0)
        return errno;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus)
        return 0;
    struct sigaction mine;
    memset(&mine, 0, sizeof mine);
    mine.sa_sigaction = on_sigbus;
    /* SA_NODEFER: the handler leaves by siglongjmp, so SIGBUS must not stay blocked. */
    mine.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (sigemptyset(&mine.sa_mask) != 0 || sigaction(SIGBUS, &mine, &previous_bus) != 0)
        return errno;
    forwarding = 0;
    return 0;
}

/* Records are copied from the map one after another; asking for the one SF_PREFETCH_AHEAD places
 * later lets its cache (and TLB) misses overlap the copies in between. */
#define SF_PREFETCH_AHEAD 8
#define SF_PREFETCH_MAX_BYTES 512

/* A page fault that reads the disk cannot be avoided once a mapped record is touched, so the
 * page-cache pass of the map path checks the first record of each chunk with a one-byte
 * RWF_NOWAIT read and then watches the clock: when the second record, or a group of SF_MAP_GROUP
 * records, takes longer than SF_MAP_SLOW_NS plus 1 ns per record byte (copies from the page cache
 * run at several GB/s; one read from disk takes tens of microseconds or more) and the thread's
 * count of major page faults went up (not just a preemption), the pass stops using the map for
 * the batch. */
#define SF_MAP_GROUP 8

/* Small records of a single converted field are gathered from the map into a scratch buffer of
 * this many bytes (on the stack, so it stays in L1/L2) and converted by one call per group into
 * their consecutive output rows: a tight copy loop keeps more cache misses in flight than a
 * conversion per record does. */
#define SF_GATHER_BYTES 8192
#define SF_MAP_SLOW_NS 20000

/* Major page faults (reads from disk) of the calling thread so far, or -1 when unknown. */
static long major_faults(void)
{
#if defined(__linux__) && defined(RUSAGE_THREAD)
    struct rusage usage;
    if (getrusage(RUSAGE_THREAD, &usage) == 0)
        return usage.ru_majflt;
#endif
    return -1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static const char *map_record(const sf_shards *sh, int64_t index)
{
    size_t s = shard_of(sh, index);
    return sh->maps[s] + sh->header_bytes + (size_t)(index - sh->starts[s]) * sh->record_bytes;
}

/* Prefetches the requested bytes of a record (from its first requested field to its last), not
 * the whole record: a prefetch waits for a free line-fill buffer, and lines nobody reads (the rest
 * of a record whose small label field is read alone) held the loop up on them. */
static void prefetch_record(const record_ctx *ctx, int64_t index)
{
#if defined(__GNUC__) || defined(__clang__)
    size_t bytes = ctx->span_bytes < SF_PREFETCH_MAX_BYTES ? ctx->span_bytes : SF_PREFETCH_MAX_BYTES;
    if (bytes == 0)
        return;
    const char *first = map_record(ctx->shards, index) + ctx->fields[0].src_offset;
    for (size_t at = 0; at < bytes; at += 64)
        __builtin_prefetch(first + at);
    __builtin_prefetch(first + bytes - 1);
#else
    (void)ctx;
    (void)index;
#endif
}

/* 0 when the first byte of the record is known not to be in the page cache: a cold chunk of the
 * map path then goes to preadv without first waiting for one page fault. */
static int first_page_cached(const sf_shards *sh, int64_t index)
{
#ifdef SF_HAVE_NOWAIT
    size_t s = shard_of(sh, index);
    off_t at = (off_t)sh->header_bytes + (off_t)(index - sh->starts[s]) * (off_t)sh->record_bytes;
    char byte;
    struct iovec iov = {&byte, 1};
    return preadv2(sh->fds[s], &iov, 1, at, RWF_NOWAIT) == 1;
#else
    (void)sh;
    (void)index;
    return 1;
#endif
}

/* Copies records [begin, end) of the batch from the map. In the page-cache pass (ctx->missed set)
 * it stops touching the map at the first sign of disk reads: the rest of the chunk goes through
 * the preadv page-cache pass, which reads what is cached and flags the others. (A preadv2
 * RWF_NOWAIT that misses also starts the disk read, so the blocking pass finds it under way.) */
static int read_records_map(void *vctx, size_t begin, size_t end, sf_error *err)
{
    record_ctx *ctx = vctx;
    const sf_shards *sh = ctx->shards;
    sigjmp_buf jump;
    volatile size_t current = begin; /* the record being copied, for the SIGBUS error */
    if (sigsetjmp(jump, 0) != 0) {
        guard_jump = NULL;
        guard_shards = NULL;
        int64_t index = ctx->indices[current];
        size_t s = shard_of(sh, index);
        int64_t at = (int64_t)sh->header_bytes + (index - sh->starts[s]) * (int64_t)sh->record_bytes;
        set_error(err, SF_ERR_EOF, SF_FILE_RECORDS, s, at, index);
        return -1;
    }
    guard_shards = sh;
    guard_jump = &jump;
    sf_convert_fn convert = ctx->stream ? sf_convert_stream : sf_convert;
    /* Gathering needs consecutive items to be consecutive, contiguous output rows, and an affine
     * pattern that repeats whole within a record (the group is converted with first = 0). */
    const sf_field_out *g = &ctx->fields[0];
    size_t group = 0; /* records per gathered group; 0: convert record by record */
    if (ctx->n_fields == 1 && !ctx->rows && g->cast != SF_CAST_COPY &&
        g->src_bytes != 0 && g->src_bytes <= SF_GATHER_BYTES / 8 &&
        g->dst_bytes == g->count * sf_cast_out_itemsize(g->cast) &&
        (!g->affine.scale || g->count % (g->affine.inner * g->affine.period) == 0))
        group = SF_GATHER_BYTES / g->src_bytes;
    char gathered[SF_GATHER_BYTES];
    size_t held = begin; /* records [held, r) are gathered and not yet converted */
    uint64_t since = ctx->missed ? now_ns() : 0;
    long faults = ctx->missed ? major_faults() : -1;
    size_t checked = begin; /* records before this one were timed already */
    for (size_t r = begin; r < end; r++) {
        if (ctx->missed && (r == begin || r == begin + 1 || (r - begin) % SF_MAP_GROUP == 0)) {
            if (r == begin) {
                if (!first_page_cached(sh, ctx->indices[r]))
                    __atomic_store_n(&ctx->slow, 1, __ATOMIC_RELAXED);
            } else {
                uint64_t t = now_ns();
                if (t - since > SF_MAP_SLOW_NS + (r - checked) * sh->record_bytes &&
                    (faults < 0 || major_faults() != faults))
                    __atomic_store_n(&ctx->slow, 1, __ATOMIC_RELAXED);
                since = t;
                checked = r;
            }
            if (__atomic_load_n(&ctx->slow, __ATOMIC_RELAXED)) {
                if (group && r > held)
                    note_inexact(g->inexact, convert(g->cast, g->dst + held * g->dst_bytes, gathered,
                                                     (r - held) * g->count, &g->affine, 0));
#ifdef SF_HAVE_NOWAIT
                guard_jump = NULL;
                return read_records_pread(ctx, r, end, err);
#else
                memset(ctx->missed + r, 1, end - r);
                break;
#endif
            }
        }
        if (r + SF_PREFETCH_AHEAD < end)
            prefetch_record(ctx, ctx->indices[r + SF_PREFETCH_AHEAD]);
        current = r;
        const char *record = map_record(sh, ctx->indices[r]);
        if (group) {
            memcpy(gathered + (r - held) * g->src_bytes, record + g->src_offset, g->src_bytes);
            if (r + 1 - held == group || r + 1 == end) {
                note_inexact(g->inexact, convert(g->cast, g->dst + held * g->dst_bytes, gathered,
                                                 (r + 1 - held) * g->count, &g->affine, 0));
                held = r + 1;
            }
            continue;
        }
        for (size_t k = 0; k < ctx->n_fields; k++) {
            const sf_field_out *f = &ctx->fields[k];
            char *row = f->dst + r * f->dst_bytes;
            if (f->cast == SF_CAST_COPY)
                memcpy(row, record + f->src_offset, f->src_bytes);
            else
                note_inexact(f->inexact,
                             convert(f->cast, row, record + f->src_offset, f->count, &f->affine, 0));
        }
    }
    guard_jump = NULL;
    return 0;
}

/* A shard cut inside a page after it was mapped: the pages wholly past the new end raise SIGBUS
 * (the guard above), but the rest of the page that holds the new end reads as zeros, with no
 * fault. So after a mapped batch, each shard it read from is fstat()ed once, and the first record
 * (in batch order) whose requested bytes are not all inside the file fails the read with
 * SF_ERR_EOF, as on the preadv path. Checking after the copies is what makes it exact: a cut
 * before or during a copy shows in the size; data copied before a later cut was whole. One fstat
 * per distinct shard of the batch (measured in benchmarks/RESULTS.md, "Truncation check"). */
static int check_mapped_sizes(const record_ctx *ctx, size_t n, sf_error *err)
{
    const sf_shards *sh = ctx->shards;
    size_t span_end = sh->checksums ? sh->record_bytes : ctx->fields[0].src_offset + ctx->span_bytes;
    unsigned char *seen = calloc(sh->n_shards / 8 + 1, 1);
    if (!seen) {
        set_error(err, SF_ERR_NOMEM, SF_FILE_RECORDS, 0, -1, -1);
        err->shard = -1;
        return -1;
    }
    int rc = 0;
    for (size_t r = 0; r < n && rc == 0; r++) {
        size_t s = shard_of(sh, ctx->indices[r]);
        if (seen[s / 8] & (1u << (s % 8)))
            continue;
        seen[s / 8] |= (unsigned char)(1u << (s % 8));
        struct stat st;
        if (fstat(sh->fds[s], &st) != 0) {
            set_error(err, SF_ERR_IO, SF_FILE_RECORDS, s, -1, ctx->indices[r]);
            rc = -1;
            break;
        }
        off_t whole = (off_t)sh->header_bytes + (off_t)(sh->starts[s + 1] - sh->starts[s]) * (off_t)sh->record_bytes;
        if (st.st_size >= whole)
            continue;
        for (size_t q = r; q < n; q++) { /* the first record of shard s the batch read that was cut */
            int64_t index = ctx->indices[q];
            if (index < sh->starts[s] || index >= sh->starts[s + 1])
                continue;
            off_t at = (off_t)sh->header_bytes + (off_t)(index - sh->starts[s]) * (off_t)sh->record_bytes;
            if (at + (off_t)span_end > st.st_size) {
                set_error(err, SF_ERR_EOF, SF_FILE_RECORDS, s, (int64_t)at, index);
                rc = -1;
                break;
            }
        }
    }
    free(seen);
    return rc;
}

/* Checks the whole record at `record` against its stored CRC32C and takes batch row r's fields
 * from it: copied fields in the same pass as the checksum (sf_crc32c_copy), while the record is in
 * the cache; converted fields once it passed. 0, or -1 on a mismatch (copied fields may have been
 * written: the read fails). */
static int take_checked_record(const record_ctx *ctx, size_t r, const char *record, uint32_t expected)
{
    uint32_t crc = 0;
    size_t at = 0;
    for (size_t k = 0; k < ctx->n_fields; k++) {
        const sf_field_out *f = &ctx->fields[k];
        crc = sf_crc32c(crc, record + at, f->src_offset - at);
        if (f->cast == SF_CAST_COPY)
            crc = sf_crc32c_copy(crc, f->dst + r * f->dst_bytes, record + f->src_offset, f->src_bytes);
        else
            crc = sf_crc32c(crc, record + f->src_offset, f->src_bytes);
        at = f->src_offset + f->src_bytes;
    }
    if (sf_crc32c(crc, record + at, ctx->shards->record_bytes - at) != expected)
        return -1;
    for (size_t k = 0; k < ctx->n_fields; k++) {
        const sf_field_out *f = &ctx->fields[k];
        if (f->cast != SF_CAST_COPY)
            note_inexact(f->inexact, sf_convert(f->cast, f->dst + r * f->dst_bytes, record + f->src_offset,
                                                f->count, &f->affine, 0));
    }
    return 0;
}

/* Checked reads (shards->checksums, see reader.h): items [begin, end), one whole record at a time,
 * from the map or into a scratch record by preadv; what is returned is what was checked. */
static int read_records_checked(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const record_ctx *ctx = vctx;
    const sf_shards *sh = ctx->shards;
    char *volatile scratch = ctx->use_map ? NULL : malloc(sh->record_bytes); /* volatile: kept over sigsetjmp */
    if (!ctx->use_map && !scratch) {
        set_error(err, SF_ERR_NOMEM, SF_FILE_RECORDS, 0, -1, -1);
        err->shard = -1;
        return -1;
    }
    sigjmp_buf jump;
    volatile size_t current = begin; /* the record being read, for the SIGBUS error */
    if (ctx->use_map) {
        if (sigsetjmp(jump, 0) != 0) {
            guard_jump = NULL;
            guard_shards = NULL;
            int64_t index = ctx->indices[current];
            size_t s = shard_of(sh, index);
            set_error(err, SF_ERR_EOF, SF_FILE_RECORDS, s,
                      (int64_t)sh->header_bytes + (index - sh->starts[s]) * (int64_t)sh->record_bytes, index);
            return -1;
        }
        guard_shards = sh;
        guard_jump = &jump;
    }
    int rc = 0;
    for (size_t r = begin; r < end; r++) {
        current = r;
        if (ctx->use_map && r + SF_PREFETCH_AHEAD < end)
            prefetch_record(ctx, ctx->indices[r + SF_PREFETCH_AHEAD]);
        int64_t index = ctx->indices[r];
        size_t s = shard_of(sh, index);
        size_t k = (size_t)(index - sh->starts[s]);
        off_t at = (off_t)sh->header_bytes + (off_t)k * (off_t)sh->record_bytes;
        const char *record = scratch;
        if (ctx->use_map) {
            record = sh->maps[s] + at;
        } else {
            struct iovec iov = {scratch, sh->record_bytes};
            size_t done = 0;
            int e = preadv_full(sh->fds[s], &iov, 1, at, &done);
            if (e != SF_OK) {
                set_error(err, e, SF_FILE_RECORDS, s, (int64_t)at, index);
                rc = -1;
                break;
            }
        }
        if (take_checked_record(ctx, r, record, sh->checksums[s][k]) != 0) {
            set_error(err, SF_ERR_CHECKSUM, SF_FILE_RECORDS, s, (int64_t)at, index);
            rc = -1;
            break;
        }
    }
    if (ctx->use_map) {
        guard_jump = NULL;
        guard_shards = NULL;
    }
    free(scratch);
    return rc;
}

static size_t pick_chunk(size_t n, size_t threads, size_t min_items)
{
    size_t parts = threads > 1 ? threads * 4 : 1;
    size_t chunk = n / parts + (n % parts != 0);
    if (chunk < min_items)
        chunk = min_items;
    return chunk ? chunk : 1;
}

/* CPUs this process may run on. */
static size_t cpu_count(void)
{
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return (size_t)CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (size_t)n : 1;
}

/* The items of a blocking pass cut into runs (collect_run): item starts[j] begins run j, and
 * starts[runs] is the item count. */
typedef struct run_split {
    record_ctx *ctx;
    const size_t *starts;
} run_split;

static int read_run_range(void *vsplit, size_t begin, size_t end, sf_error *err)
{
    const run_split *split = vsplit;
    return read_records_pread(split->ctx, split->starts[begin], split->starts[end], err);
}

/* Blocking preadv of items [0, items) on `threads` threads, handed out in whole runs: a run of
 * adjacent records stays one read from the disk, not one per thread's share of it. */
static int read_blocking(record_ctx *ctx, size_t items, size_t threads, sf_error *err)
{
    size_t *starts = malloc((items + 1) * sizeof *starts);
    if (!starts) {
        set_error(err, SF_ERR_NOMEM, SF_FILE_RECORDS, 0, -1, -1);
        err->shard = -1;
        return -1;
    }
    size_t runs = 0;
    for (size_t item = 0; item < items; runs++) {
        size_t shard = 0;
        starts[runs] = item;
        item = collect_run(ctx, item, items, &shard);
    }
    starts[runs] = items;
    run_split split = {ctx, starts};
    int rc = sf_parallel_for(runs, pick_chunk(runs, threads, 1), threads, read_run_range, &split, err);
    free(starts);
    return rc;
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
        set_error(err, SF_ERR_NOMEM, SF_FILE_RECORDS, 0, -1, -1);
        err->shard = -1;
        goto done;
    }
    ctx->missed = missed;
    rc = sf_parallel_for(n, pick_chunk(n, cpus, min_items), cpus, fn, ctx, err);
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
        rc = read_blocking(ctx, m, threads, err);
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
    size_t bytes = 0, converted_bytes = 0;
    for (size_t k = 0; k < n_fields; k++) {
        bytes += fields[k].src_bytes;
        if (fields[k].cast != SF_CAST_COPY)
            converted_bytes += fields[k].dst_bytes;
    }
    ctx.stream = converted_bytes >= SF_STREAM_MIN_BYTES / n;
    /* The iovecs of one record as record_iovecs builds them: one per field with bytes, one per gap
     * before such a field; plus one for the skip from the previous record of a run. */
    size_t cursor = fields[0].src_offset;
    ctx.iovs_per_record = 1;
    for (size_t k = 0; k < n_fields; k++) {
        const sf_field_out *f = &fields[k];
        if (lands_in_scratch(&ctx, f))
            ctx.scratch_bytes += f->src_bytes;
        if (f->src_bytes == 0)
            continue;
        if (f->src_offset > cursor) {
            ctx.iovs_per_record++;
            if (f->src_offset - cursor > ctx.discard_bytes)
                ctx.discard_bytes = f->src_offset - cursor;
        }
        ctx.iovs_per_record++;
        cursor = f->src_offset + f->src_bytes;
    }
    ctx.span_bytes = cursor - fields[0].src_offset;
    size_t skip = shards->record_bytes - ctx.span_bytes;
    ctx.max_run = 1;
    if (ctx.span_bytes > 0 && skip <= SF_RUN_MAX_SKIP && ctx.iovs_per_record <= IOV_MAX) {
        size_t by_iovecs = IOV_MAX / ctx.iovs_per_record;
        size_t by_bytes = SF_RUN_BYTES / shards->record_bytes;
        ctx.max_run = by_iovecs < by_bytes ? by_iovecs : by_bytes;
        if (ctx.max_run < 1)
            ctx.max_run = 1;
    }
    if (ctx.max_run > 1 && skip > ctx.discard_bytes)
        ctx.discard_bytes = skip;
    size_t cpus = threads > 1 ? cpu_count() : 1;
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
        int rc = sf_parallel_for(n, pick_chunk(n, workers, min_items), workers, read_records_checked, &ctx, err);
        /* The zero-filled tail of a cut page fails its checksum: say that the shard was cut. */
        if (use_map && (rc == 0 || err->kind == SF_ERR_CHECKSUM)) {
            sf_error cut;
            sf_error_clear(&cut);
            if (check_mapped_sizes(&ctx, n, &cut) != 0) {
                *err = cut;
                rc = -1;
            }
        }
        return rc;
    }
    if (use_map) {
        size_t min_items = bytes ? SF_MAP_CHUNK_BYTES / bytes : n;
        int rc = read_cached_first(&ctx, read_records_map, n, min_items, cpus, threads, uncached, err);
        return rc != 0 ? rc : check_mapped_sizes(&ctx, n, err);
    }
#ifdef SF_HAVE_NOWAIT
    return read_cached_first(&ctx, read_records_pread, n, 1, cpus, threads, uncached, err);
#endif
    *uncached = n;
    return read_blocking(&ctx, n, threads, err);
}

int sf_advise_records(const sf_shards *shards, const int64_t *indices, size_t n)
{
#ifdef POSIX_FADV_WILLNEED
    size_t r = 0;
    while (r < n) {
        size_t s = shard_of(shards, indices[r]);
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

typedef struct heap_ctx {
    const sf_shards *shards;
    const int64_t *sample, *shard, *offsets, *rows;
    const sf_heap_out *field;
} heap_ctx;

static void fill_pad(char *dst, size_t elems, const void *pad, size_t pad_bytes)
{
    for (size_t i = 0; i < elems; i++)
        memcpy(dst + i * pad_bytes, pad, pad_bytes);
}

static int read_heap_range(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const heap_ctx *ctx = vctx;
    const sf_heap_out *f = ctx->field;
    int wide = f->cast != SF_CAST_COPY && sf_cast_itemsize(f->cast) > sf_cast_out_itemsize(f->cast);
    char *scratch = NULL;
    if (wide && f->max_rows > 0) {
        scratch = malloc(f->max_rows * f->src_row_bytes);
        if (!scratch) {
            set_error(err, SF_ERR_NOMEM, SF_FILE_HEAP, 0, -1, -1);
            err->shard = -1;
            return -1;
        }
    }
    int rc = SF_OK;
    for (size_t r = begin; r < end; r++) {
        size_t rows = (size_t)ctx->rows[r];
        size_t s = (size_t)ctx->shard[r];
        char *slot = f->dst + r * f->max_rows * f->dst_row_bytes;
        size_t pad_bytes = (f->max_rows - rows) * f->dst_row_bytes;
        char *out = f->pad_first ? slot + pad_bytes : slot; /* where the rows go */
        size_t src_bytes = rows * f->src_row_bytes;
        char *landing = f->cast == SF_CAST_COPY ? out
                        : wide                  ? scratch
                                                : out + rows * (f->dst_row_bytes - f->src_row_bytes);
        if (src_bytes > 0) {
            struct iovec iov = {landing, src_bytes};
            size_t done = 0;
            rc = preadv_full(ctx->shards->heap_fds[s], &iov, 1, (off_t)ctx->offsets[r], &done);
            if (rc != SF_OK) {
                set_error(err, rc, SF_FILE_HEAP, s, ctx->offsets[r], ctx->sample[r]);
                break;
            }
            if (f->cast != SF_CAST_COPY)
                note_inexact(f->inexact,
                             sf_convert(f->cast, out, landing, rows * f->row_elems, &f->affine, 0));
        }
        fill_pad(f->pad_first ? slot : out + rows * f->dst_row_bytes, (f->max_rows - rows) * f->row_elems,
                 f->pad, f->pad_bytes);
    }
    free(scratch);
    return rc == SF_OK ? 0 : -1;
}

int sf_read_heap(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                 const int64_t *offsets, const int64_t *rows, size_t n, const sf_heap_out *field,
                 size_t threads, sf_error *err)
{
    heap_ctx ctx = {shards, sample, shard, offsets, rows, field};
    sf_error_clear(err);
    if (n == 0)
        return 0;
    return sf_parallel_for(n, pick_chunk(n, threads, 1), threads, read_heap_range, &ctx, err);
}

typedef struct heap_check_ctx {
    const sf_shards *shards;
    const int64_t *sample, *shard, *spans;
    size_t n_spans;
    const uint32_t *expected;
} heap_check_ctx;

/* Bytes of a sample's rows read at a time by the check (a per-thread buffer). */
#define SF_CHECK_CHUNK_BYTES ((size_t)64 << 10)

static int check_heap_range(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const heap_check_ctx *ctx = vctx;
    char *chunk = malloc(SF_CHECK_CHUNK_BYTES);
    if (!chunk) {
        set_error(err, SF_ERR_NOMEM, SF_FILE_HEAP, 0, -1, -1);
        err->shard = -1;
        return -1;
    }
    int rc = 0;
    for (size_t r = begin; r < end && rc == 0; r++) {
        size_t s = (size_t)ctx->shard[r];
        const int64_t *span = ctx->spans + 2 * r * ctx->n_spans;
        uint32_t crc = 0;
        for (size_t j = 0; j < ctx->n_spans && rc == 0; j++) {
            int64_t at = span[2 * j];
            for (size_t left = (size_t)span[2 * j + 1]; left > 0;) {
                size_t bytes = left < SF_CHECK_CHUNK_BYTES ? left : SF_CHECK_CHUNK_BYTES, done = 0;
                struct iovec iov = {chunk, bytes};
                int e = preadv_full(ctx->shards->heap_fds[s], &iov, 1, (off_t)at, &done);
                if (e != SF_OK) {
                    set_error(err, e, SF_FILE_HEAP, s, at + (int64_t)done, ctx->sample[r]);
                    rc = -1;
                    break;
                }
                crc = sf_crc32c(crc, chunk, bytes);
                at += (int64_t)bytes;
                left -= bytes;
            }
        }
        if (rc == 0 && crc != ctx->expected[r]) {
            set_error(err, SF_ERR_CHECKSUM, SF_FILE_HEAP, s, ctx->n_spans ? span[0] : 0, ctx->sample[r]);
            rc = -1;
        }
    }
    free(chunk);
    return rc;
}

int sf_check_heap(const sf_shards *shards, const int64_t *sample, const int64_t *shard, const int64_t *spans,
                  size_t n_spans, const uint32_t *expected, size_t n, size_t threads, sf_error *err)
{
    heap_check_ctx ctx = {shards, sample, shard, spans, n_spans, expected};
    sf_error_clear(err);
    if (n == 0)
        return 0;
    return sf_parallel_for(n, pick_chunk(n, threads, 1), threads, check_heap_range, &ctx, err);
}
