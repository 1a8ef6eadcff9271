/* The memory-map path of record reads (records.h) and its SIGBUS guard (sf_guard_mapped_reads,
 * reader.h). */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT (io.h) */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "records.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "io.h"

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

void sf_map_guard_enter(const sf_shards *shards, sigjmp_buf *jump)
{
    guard_shards = shards;
    guard_jump = jump;
}

void sf_map_guard_leave(void)
{
    guard_jump = NULL;
    guard_shards = NULL;
}

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
    size_t s = sf_shard_of(sh, index);
    return sh->maps[s] + sh->header_bytes + (size_t)(index - sh->starts[s]) * sh->record_bytes;
}

/* Prefetches the requested bytes of a record (from its first requested field to its last), not
 * the whole record: a prefetch waits for a free line-fill buffer, and lines nobody reads (the rest
 * of a record whose small label field is read alone) held the loop up on them. */
void sf_prefetch_record(const record_ctx *ctx, int64_t index)
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
    size_t s = sf_shard_of(sh, index);
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

/* One function of 84 lines, on purpose: the sigsetjmp target must stay in the frame that copies
 * from the maps, and the page-cache pass, the gathering and the copies share its loop's state. */
int sf_read_records_map(void *vctx, size_t begin, size_t end, sf_error *err)
{
    record_ctx *ctx = vctx;
    const sf_shards *sh = ctx->shards;
    sigjmp_buf jump;
    volatile size_t current = begin; /* the record being copied, for the SIGBUS error */
    if (sigsetjmp(jump, 0) != 0) {
        guard_jump = NULL;
        guard_shards = NULL;
        int64_t index = ctx->indices[current];
        size_t s = sf_shard_of(sh, index);
        int64_t at = (int64_t)sh->header_bytes + (index - sh->starts[s]) * (int64_t)sh->record_bytes;
        sf_set_error(err, SF_ERR_EOF, SF_FILE_RECORDS, s, at, index);
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
                    sf_note_inexact(g->inexact, convert(g->cast, g->dst + held * g->dst_bytes, gathered,
                                                     (r - held) * g->count, &g->affine, 0));
#ifdef SF_HAVE_NOWAIT
                guard_jump = NULL;
                return sf_read_records_pread(ctx, r, end, err);
#else
                memset(ctx->missed + r, 1, end - r);
                break;
#endif
            }
        }
        if (r + SF_PREFETCH_AHEAD < end)
            sf_prefetch_record(ctx, ctx->indices[r + SF_PREFETCH_AHEAD]);
        current = r;
        const char *record = map_record(sh, ctx->indices[r]);
        if (group) {
            memcpy(gathered + (r - held) * g->src_bytes, record + g->src_offset, g->src_bytes);
            if (r + 1 - held == group || r + 1 == end) {
                sf_note_inexact(g->inexact, convert(g->cast, g->dst + held * g->dst_bytes, gathered,
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
                sf_note_inexact(f->inexact,
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
int sf_check_mapped_sizes(const record_ctx *ctx, size_t n, sf_error *err)
{
    const sf_shards *sh = ctx->shards;
    size_t span_end = sh->checksums ? sh->record_bytes : ctx->fields[0].src_offset + ctx->span_bytes;
    unsigned char *seen = calloc(sh->n_shards / 8 + 1, 1);
    if (!seen) {
        return sf_out_of_memory(err, SF_FILE_RECORDS);
    }
    int rc = 0;
    for (size_t r = 0; r < n && rc == 0; r++) {
        size_t s = sf_shard_of(sh, ctx->indices[r]);
        if (seen[s / 8] & (1u << (s % 8)))
            continue;
        seen[s / 8] |= (unsigned char)(1u << (s % 8));
        struct stat st;
        if (fstat(sh->fds[s], &st) != 0) {
            sf_set_error(err, SF_ERR_IO, SF_FILE_RECORDS, s, -1, ctx->indices[r]);
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
                sf_set_error(err, SF_ERR_EOF, SF_FILE_RECORDS, s, (int64_t)at, index);
                rc = -1;
                break;
            }
        }
    }
    free(seen);
    return rc;
}
