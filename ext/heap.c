/* Reads and checks of variable-length rows (heap files); see reader.h. */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT (io.h) */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "reader.h"

#include <stdlib.h>
#include <string.h>

#include "crc32c.h"
#include "io.h"
#include "pool.h"

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
            return sf_out_of_memory(err, SF_FILE_HEAP);
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
            rc = sf_preadv_full(ctx->shards->heap_fds[s], &iov, 1, (off_t)ctx->offsets[r], &done);
            if (rc != SF_OK) {
                sf_set_error(err, rc, SF_FILE_HEAP, s, ctx->offsets[r], ctx->sample[r]);
                break;
            }
            if (f->cast != SF_CAST_COPY)
                sf_note_inexact(f->inexact,
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
    return sf_parallel_for(n, sf_pick_chunk(n, threads, 1), threads, read_heap_range, &ctx, err);
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
        return sf_out_of_memory(err, SF_FILE_HEAP);
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
                int e = sf_preadv_full(ctx->shards->heap_fds[s], &iov, 1, (off_t)at, &done);
                if (e != SF_OK) {
                    sf_set_error(err, e, SF_FILE_HEAP, s, at + (int64_t)done, ctx->sample[r]);
                    rc = -1;
                    break;
                }
                crc = sf_crc32c(crc, chunk, bytes);
                at += (int64_t)bytes;
                left -= bytes;
            }
        }
        if (rc == 0 && crc != ctx->expected[r]) {
            sf_set_error(err, SF_ERR_CHECKSUM, SF_FILE_HEAP, s, ctx->n_spans ? span[0] : 0, ctx->sample[r]);
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
    return sf_parallel_for(n, sf_pick_chunk(n, threads, 1), threads, check_heap_range, &ctx, err);
}
