/* Reads of compressed fixed-shape fields, decoded on the pool's threads straight into the batch
 * and converted there, and the writer's compression of samples; see reader.h and codec.h. */
#define _GNU_SOURCE 1
#define _DEFAULT_SOURCE 1
#include "reader.h"

#include <string.h>

#include "codec.h"
#include "io.h"
#include "pool.h"

typedef struct compressed_ctx {
    const sf_shards *shards;
    const int64_t *sample, *shard, *offsets, *lengths;
    const sf_compressed_out *field;
} compressed_ctx;

static int fail(sf_error *err, int kind, size_t shard, int64_t offset, int64_t sample, const char *why,
                long long found)
{
    sf_set_error(err, kind, SF_FILE_HEAP, shard, offset, sample);
    err->detail = why;
    err->found = found;
    return -1;
}

static int read_compressed_range(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const compressed_ctx *ctx = vctx;
    const sf_compressed_out *f = ctx->field;
    /* A conversion to a narrower element decodes into scratch; any other decodes into the tail of
     * the output row and converts in place (the rule of cast.h). */
    int narrowing = f->cast != SF_CAST_COPY && sf_cast_itemsize(f->cast) > sf_cast_out_itemsize(f->cast);
    const char *missing = sf_codec_unavailable(f->codec);
    if (missing)
        return fail(err, SF_ERR_CODEC, (size_t)ctx->shard[begin], ctx->offsets[begin], ctx->sample[begin], missing, -1);
    size_t most = sf_codec_bound(f->codec, f->raw_bytes);
    char *scratch = NULL;
    if (narrowing && !(scratch = sf_codec_scratch(1, f->raw_bytes)))
        return sf_out_of_memory(err, SF_FILE_HEAP);
    for (size_t r = begin; r < end; r++) {
        size_t s = (size_t)ctx->shard[r];
        int64_t at = ctx->offsets[r];
        size_t stored = (size_t)ctx->lengths[r];
        if (stored == 0 || stored > most)
            return fail(err, SF_ERR_CORRUPT, s, at, ctx->sample[r],
                        stored ? "longer than any frame of the field's size" : "empty", -1);
        char *frame = sf_codec_scratch(0, stored);
        if (!frame)
            return sf_out_of_memory(err, SF_FILE_HEAP);
        struct iovec iov = {frame, stored};
        size_t done = 0;
        int rc = sf_preadv_full(ctx->shards->heap_fds[s], &iov, 1, (off_t)at, &done);
        if (rc != SF_OK) {
            sf_set_error(err, rc, SF_FILE_HEAP, s, at, ctx->sample[r]);
            return -1;
        }
        char *out = f->dst + r * f->dst_bytes;
        char *landing = f->cast == SF_CAST_COPY ? out : narrowing ? scratch : out + f->dst_bytes - f->raw_bytes;
        long long found = -1;
        const char *why = NULL;
        rc = sf_codec_decompress(f->codec, landing, f->raw_bytes, frame, stored, f->ddicts ? f->ddicts[s] : NULL,
                                 f->dict_ids ? f->dict_ids[s] : 0, &found, &why);
        if (rc == SF_ERR_NOMEM)
            return sf_out_of_memory(err, SF_FILE_HEAP);
        if (rc != SF_OK)
            return fail(err, rc, s, at, ctx->sample[r], why, found);
        if (f->cast != SF_CAST_COPY)
            sf_note_inexact(f->inexact, sf_convert(f->cast, out, landing, f->count, &f->affine, 0));
    }
    return 0;
}

int sf_read_compressed(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                       const int64_t *offsets, const int64_t *lengths, size_t n,
                       const sf_compressed_out *field, size_t threads, sf_error *err)
{
    compressed_ctx ctx = {shards, sample, shard, offsets, lengths, field};
    sf_error_clear(err);
    if (n == 0)
        return 0;
    return sf_parallel_for(n, sf_pick_chunk(n, threads, 1), threads, read_compressed_range, &ctx, err);
}

typedef struct compress_ctx {
    int codec, level;
    const void *cdict;
    const char *src;
    size_t raw_bytes;
    char *dst;
    size_t bound;
    int64_t *lengths;
} compress_ctx;

static int compress_range(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const compress_ctx *ctx = vctx;
    for (size_t r = begin; r < end; r++) {
        size_t got = 0;
        const char *why = NULL;
        int rc = sf_codec_compress(ctx->codec, ctx->dst + r * ctx->bound, ctx->bound,
                                   ctx->src + r * ctx->raw_bytes, ctx->raw_bytes, ctx->level, ctx->cdict, &got, &why);
        if (rc == SF_ERR_NOMEM)
            return sf_out_of_memory(err, SF_FILE_HEAP);
        if (rc != SF_OK) {
            sf_set_error(err, rc, SF_FILE_HEAP, 0, -1, (int64_t)r);
            err->shard = -1;
            err->detail = why;
            return -1;
        }
        ctx->lengths[r] = (int64_t)got;
    }
    return 0;
}

int sf_compress_samples(int codec, int level, const void *cdict, const char *src, size_t n, size_t raw_bytes,
                        char *dst, size_t bound, int64_t *lengths, size_t threads, sf_error *err)
{
    compress_ctx ctx = {codec, level, cdict, src, raw_bytes, dst, bound, lengths};
    sf_error_clear(err);
    if (n == 0)
        return 0;
    return sf_parallel_for(n, sf_pick_chunk(n, threads, 1), threads, compress_range, &ctx, err);
}
