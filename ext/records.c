/* The preadv path of record reads (records.h): runs of adjacent records read by one preadv, the
 * fields landed in place (or in scratch space) and converted. */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT (io.h) */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "records.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "pool.h"

/* Records that follow one another in a shard file and in a thread's part of the batch (sequential
 * orders, block shuffles) are read by one preadv of up to SF_RUN_BYTES and IOV_MAX iovecs instead
 * of one preadv each: one system call instead of dozens. Unless more than SF_RUN_MAX_SKIP
 * unrequested bytes lie between one record's requested bytes and the next one's (a small field
 * of large records): reading those into a discard buffer would cost more than the calls saved. */
#define SF_RUN_BYTES ((size_t)1 << 20)
#define SF_RUN_MAX_SKIP ((size_t)4096)

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
            sf_note_inexact(f->inexact, convert(f->cast, f->dst + r * f->dst_bytes, landing, f->count,
                                             &f->affine, 0));
    }
}

size_t sf_plan_record_reads(record_ctx *ctx, size_t n)
{
    size_t bytes = 0, converted_bytes = 0;
    for (size_t k = 0; k < ctx->n_fields; k++) {
        bytes += ctx->fields[k].src_bytes;
        if (ctx->fields[k].cast != SF_CAST_COPY)
            converted_bytes += ctx->fields[k].dst_bytes;
    }
    ctx->stream = sf_output_streamed(converted_bytes, n);
    /* The iovecs of one record as record_iovecs builds them: one per field with bytes, one per gap
     * before such a field; plus one for the skip from the previous record of a run. */
    size_t cursor = ctx->fields[0].src_offset;
    ctx->iovs_per_record = 1;
    for (size_t k = 0; k < ctx->n_fields; k++) {
        const sf_field_out *f = &ctx->fields[k];
        if (lands_in_scratch(ctx, f))
            ctx->scratch_bytes += f->src_bytes;
        if (f->src_bytes == 0)
            continue;
        if (f->src_offset > cursor) {
            ctx->iovs_per_record++;
            if (f->src_offset - cursor > ctx->discard_bytes)
                ctx->discard_bytes = f->src_offset - cursor;
        }
        ctx->iovs_per_record++;
        cursor = f->src_offset + f->src_bytes;
    }
    ctx->span_bytes = cursor - ctx->fields[0].src_offset;
    size_t skip = ctx->shards->record_bytes - ctx->span_bytes;
    ctx->max_run = 1;
    if (ctx->span_bytes > 0 && skip <= SF_RUN_MAX_SKIP && ctx->iovs_per_record <= IOV_MAX) {
        size_t by_iovecs = IOV_MAX / ctx->iovs_per_record;
        size_t by_bytes = SF_RUN_BYTES / ctx->shards->record_bytes;
        ctx->max_run = by_iovecs < by_bytes ? by_iovecs : by_bytes;
        if (ctx->max_run < 1)
            ctx->max_run = 1;
    }
    if (ctx->max_run > 1 && skip > ctx->discard_bytes)
        ctx->discard_bytes = skip;
    return bytes;
}

size_t sf_collect_run(const record_ctx *ctx, size_t item, size_t end, size_t *shard)
{
    const sf_shards *sh = ctx->shards;
    int64_t first = ctx->indices[row_of(ctx, item)];
    *shard = sf_shard_of(sh, first);
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

int sf_fit_run(const record_ctx *ctx, sf_run_buffers *buf, size_t records)
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

int sf_fit_bounce(sf_run_buffers *buf, size_t bytes)
{
    if (bytes <= buf->bounce_bytes)
        return 0;
    void *bounce = NULL;
    if (posix_memalign(&bounce, SF_DIRECT_ALIGN, bytes) != 0)
        return -1;
    free(buf->bounce);
    buf->bounce = bounce;
    buf->bounce_bytes = bytes;
    return 0;
}

void sf_scatter(const char *src, const struct iovec *iov, size_t count, const char *discard)
{
    for (size_t k = 0; k < count; k++) {
        if (iov[k].iov_base != discard)
            memcpy(iov[k].iov_base, src, iov[k].iov_len);
        src += iov[k].iov_len;
    }
}

/* The scratch space of record k of a run (NULL when no field lands in scratch). */
static char *run_scratch(const record_ctx *ctx, const sf_run_buffers *buf, size_t k)
{
    return buf->scratch ? buf->scratch + k * ctx->scratch_bytes : NULL;
}

size_t sf_run_iovecs(const record_ctx *ctx, size_t item, size_t stop, size_t s, const sf_run_buffers *buf,
                     off_t *at, size_t *total)
{
    const sf_shards *sh = ctx->shards;
    int64_t first = ctx->indices[row_of(ctx, item)];
    *at = (off_t)sh->header_bytes + (off_t)(first - sh->starts[s]) * (off_t)sh->record_bytes +
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
    *total = (stop - item - 1) * sh->record_bytes + ctx->span_bytes;
    return count;
}

void sf_run_failed(const record_ctx *ctx, size_t item, size_t s, off_t at, size_t done, int kind, sf_error *err)
{
    const sf_shards *sh = ctx->shards;
    int64_t first = ctx->indices[row_of(ctx, item)];
    /* Record j of the run is whole once j * record_bytes + span_bytes were read. */
    size_t failed = done < ctx->span_bytes ? 0 : (done - ctx->span_bytes) / sh->record_bytes + 1;
    sf_set_error(err, kind, SF_FILE_RECORDS, s, (int64_t)(at + (off_t)(failed * sh->record_bytes)),
                 first + (int64_t)failed);
}

void sf_convert_run(const record_ctx *ctx, size_t item, size_t stop, const sf_run_buffers *buf)
{
    for (size_t i = item; i < stop; i++)
        convert_record(ctx, row_of(ctx, i), run_scratch(ctx, buf, i - item));
}

/* Reads run [item, stop) of shard s (count iovecs, `total` bytes at `at`) with O_DIRECT into
 * buf->bounce and copies it into the iovecs' places. Returns SF_OK; the error kind (err filled,
 * bar SF_ERR_NOMEM, which names no record: sf_read_records_pread fills it, as for its own
 * buffers); or -1 when the file refused direct reads of this span (EINVAL): nothing failed, read
 * it through the page cache instead. */
static int read_run_direct(const record_ctx *ctx, size_t item, size_t s, sf_run_buffers *buf, size_t count,
                           off_t at, size_t total, sf_error *err)
{
    off_t start = 0;
    size_t bytes = 0;
    sf_direct_span(at, total, &start, &bytes);
    if (sf_fit_bounce(buf, bytes) != 0)
        return SF_ERR_NOMEM;
    size_t lead = (size_t)(at - start), done = 0;
    int rc = sf_pread_direct(sf_direct_fd(ctx->shards, s), buf->bounce, bytes, start, lead + total, &done);
    if (rc == SF_ERR_IO && errno == EINVAL)
        return -1;
    if (rc != SF_OK) {
        size_t run_done = done > lead ? done - lead : 0;
        sf_run_failed(ctx, item, s, at, run_done < total ? run_done : total, rc, err);
        return rc;
    }
    sf_scatter(buf->bounce + lead, buf->iov, count, buf->discard);
    return SF_OK;
}

/* Reads the run [item, stop) of shard s with one preadv (several if a signal or a short read cuts
 * it), or with O_DIRECT where shards->direct_fds says so, then converts its records. In the
 * page-cache pass, a run that is not wholly in the page cache is flagged for the blocking pass, all
 * of it. An error names the first record that was not read in full. Returns SF_OK or the error
 * kind (err filled, bar SF_ERR_NOMEM: see read_run_direct). */
static int read_run(const record_ctx *ctx, size_t item, size_t stop, size_t s, sf_run_buffers *buf,
                    sf_error *err)
{
    off_t at = 0;
    size_t total = 0;
    size_t count = sf_run_iovecs(ctx, item, stop, s, buf, &at, &total);
    if (count > 0) {
#ifdef SF_HAVE_NOWAIT
        if (ctx->missed) {
            if (!sf_preadv_cached(ctx->shards->fds[s], buf->iov, count, at, total)) {
                for (size_t i = item; i < stop; i++)
                    ctx->missed[row_of(ctx, i)] = 1;
                return SF_OK;
            }
        } else
#endif
        {
            int rc = sf_direct_fd(ctx->shards, s) >= 0 ? read_run_direct(ctx, item, s, buf, count, at, total, err) : -1;
            if (rc > 0)
                return rc;
            if (rc < 0) { /* through the page cache */
                size_t done = 0;
                rc = sf_preadv_full(ctx->shards->fds[s], buf->iov, (int)count, at, &done);
                if (rc != SF_OK) {
                    sf_run_failed(ctx, item, s, at, done, rc, err);
                    return rc;
                }
            }
        }
    }
    sf_convert_run(ctx, item, stop, buf);
    return SF_OK;
}

int sf_read_records_pread(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const record_ctx *ctx = vctx;
    sf_run_buffers buf = {NULL, NULL, NULL, 0, NULL, 0};
    buf.discard = ctx->discard_bytes ? malloc(ctx->discard_bytes) : NULL;
    int rc = SF_OK;
    if (ctx->discard_bytes && !buf.discard)
        rc = SF_ERR_NOMEM;
    size_t item = begin;
    while (rc == SF_OK && item < end) {
        size_t s = 0;
        size_t stop = sf_collect_run(ctx, item, end, &s);
        if (sf_fit_run(ctx, &buf, stop - item) != 0) {
            rc = SF_ERR_NOMEM;
            break;
        }
        rc = read_run(ctx, item, stop, s, &buf, err);
        item = stop;
    }
    if (rc == SF_ERR_NOMEM) /* here for every buffer, the bounce buffer of read_run_direct too */
        sf_out_of_memory(err, SF_FILE_RECORDS);
    free(buf.discard);
    free(buf.iov);
    free(buf.scratch);
    free(buf.bounce);
    return rc == SF_OK ? 0 : -1;
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
    return sf_read_records_pread(split->ctx, split->starts[begin], split->starts[end], err);
}

int sf_read_blocking(record_ctx *ctx, size_t items, size_t threads, sf_error *err)
{
    size_t *starts = malloc((items + 1) * sizeof *starts);
    if (!starts) {
        return sf_out_of_memory(err, SF_FILE_RECORDS);
    }
    size_t runs = 0;
    for (size_t item = 0; item < items; runs++) {
        size_t shard = 0;
        starts[runs] = item;
        item = sf_collect_run(ctx, item, items, &shard);
    }
    starts[runs] = items;
    run_split split = {ctx, starts};
    int rc = sf_parallel_for(runs, sf_pick_chunk(runs, threads, 1), threads, read_run_range, &split, err);
    free(starts);
    return rc;
}

