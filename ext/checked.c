/* Checked record reads (records.h): every record read whole and compared with its stored CRC32C. */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT (io.h) */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "records.h"

#include <stdlib.h>
#include <string.h>

#include "crc32c.h"
#include "io.h"

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
            sf_note_inexact(f->inexact, sf_convert(f->cast, f->dst + r * f->dst_bytes, record + f->src_offset,
                                                f->count, &f->affine, 0));
    }
    return 0;
}

int sf_read_records_checked(void *vctx, size_t begin, size_t end, sf_error *err)
{
    const record_ctx *ctx = vctx;
    const sf_shards *sh = ctx->shards;
    char *volatile scratch = ctx->use_map ? NULL : malloc(sh->record_bytes); /* volatile: kept over sigsetjmp */
    if (!ctx->use_map && !scratch) {
        return sf_out_of_memory(err, SF_FILE_RECORDS);
    }
    sigjmp_buf jump;
    volatile size_t current = begin; /* the record being read, for the SIGBUS error */
    if (ctx->use_map) {
        if (sigsetjmp(jump, 0) != 0) {
            sf_map_guard_leave();
            int64_t index = ctx->indices[current];
            size_t s = sf_shard_of(sh, index);
            sf_set_error(err, SF_ERR_EOF, SF_FILE_RECORDS, s,
                      (int64_t)sh->header_bytes + (index - sh->starts[s]) * (int64_t)sh->record_bytes, index);
            return -1;
        }
        sf_map_guard_enter(sh, &jump);
    }
    int rc = 0;
    for (size_t r = begin; r < end; r++) {
        current = r;
        if (ctx->use_map && r + SF_PREFETCH_AHEAD < end)
            sf_prefetch_record(ctx, ctx->indices[r + SF_PREFETCH_AHEAD]);
        int64_t index = ctx->indices[r];
        size_t s = sf_shard_of(sh, index);
        size_t k = (size_t)(index - sh->starts[s]);
        off_t at = (off_t)sh->header_bytes + (off_t)k * (off_t)sh->record_bytes;
        const char *record = scratch;
        if (ctx->use_map) {
            record = sh->maps[s] + at;
        } else {
            struct iovec iov = {scratch, sh->record_bytes};
            size_t done = 0;
            int e = sf_preadv_full(sh->fds[s], &iov, 1, at, &done);
            if (e != SF_OK) {
                sf_set_error(err, e, SF_FILE_RECORDS, s, (int64_t)at, index);
                rc = -1;
                break;
            }
        }
        if (take_checked_record(ctx, r, record, sh->checksums[s][k]) != 0) {
            sf_set_error(err, SF_ERR_CHECKSUM, SF_FILE_RECORDS, s, (int64_t)at, index);
            rc = -1;
            break;
        }
    }
    if (ctx->use_map)
        sf_map_guard_leave();
    free(scratch);
    return rc;
}
