/* Batch reads of fixed-size records and of variable-length heap rows, on the thread pool.
 * No Python API here: the Cython adapter validates everything before calling in. Implemented in
 * reader.c (which path a record batch takes), records.c (preadv), mapped.c (memory map and its
 * SIGBUS guard), checked.c (CRC32C per record), heap.c (variable-length rows) and io.c. */
#ifndef SF_READER_H
#define SF_READER_H

#include <stddef.h>
#include <stdint.h>
#include "cast.h"
#include "sf_error.h"

typedef struct sf_shards {
    size_t n_shards;
    const int *fds;            /* record file per shard */
    const int *heap_fds;       /* heap file per shard, or NULL when the schema has no variable fields */
    const int64_t *starts;     /* n_shards + 1 cumulative sample counts; starts[0] == 0 */
    const char *const *maps;   /* read-only map of each record file, or NULL */
    const uint32_t *const *checksums; /* per shard, the CRC32C of each of its records (docs/format.md),
                                       * or NULL: reads are not checked */
    size_t header_bytes;       /* bytes before the first record */
    size_t record_bytes;       /* bytes per record */
    const int *direct_fds;     /* per shard, the record file opened again with O_DIRECT (or -1: read
                                * through the page cache), records.h "Direct reads"; NULL: no direct
                                * reads, and a page-cache pass first */
} sf_shards;

/* One requested field of a record read. */
typedef struct sf_field_out {
    int cast;              /* conversion id (cast.h); SF_CAST_COPY keeps the stored bytes */
    size_t src_offset;     /* byte offset of the field in the record */
    size_t src_bytes;      /* stored bytes per sample */
    size_t count;          /* elements per sample */
    char *dst;             /* output base: row r starts at dst + r * dst_bytes */
    size_t dst_bytes;      /* output bytes per sample */
    sf_affine affine;      /* scale == NULL: none */
    int *inexact;          /* non-NULL: set to 1 when a value did not convert exactly (cast.h) */
} sf_field_out;

/* Installs the SIGBUS handler that turns a fault in a copy from a map (a shard truncated after it
 * was mapped) into SF_ERR_EOF; reinstalls it if another handler replaced it. Call before each read
 * with use_map, from one thread at a time. Returns 0 or an errno value. */
int sf_guard_mapped_reads(void);

/* Reads records `indices[0..n)` into each field's output row of the same position. Fields must be
 * sorted by src_offset and not overlap. A first pass on at most one thread per CPU (and at most
 * `threads`) takes the records that are in the page cache without waiting for the disk: copied
 * from shards->maps when use_map != 0, else preadv2(RWF_NOWAIT) on Linux. The records left are
 * read through io_uring (uring.h: up to SF_URING_DEPTH requests in flight, whatever `threads`)
 * where it can be used, else with blocking preadv on `threads` threads (sf_set_read_io chooses;
 * SF_READ_IO_URING also skips the preadv route's first pass). Consecutive items that are adjacent
 * records of one shard (k, k+1, ...) are read by one request per run (up to 1 MiB and IOV_MAX
 * iovecs) on the preadv and io_uring paths. With shards->direct_fds, there is no page-cache pass:
 * every record is read with O_DIRECT (records.h, "Direct reads"), where the file takes it.
 *
 * With shards->checksums set, every record is read whole, one at a time (from the map when
 * use_map != 0, else by one preadv into a scratch record), and its CRC32C computed as its fields
 * are copied from it (converted fields once it passed) and compared with the stored one: a
 * mismatch fails the read with SF_ERR_CHECKSUM naming the sample.
 *
 * *uncached: how many records the first pass left to the blocking pass (not in the page cache),
 * or n where there is no first pass. */
int sf_read_records(const sf_shards *shards, const int64_t *indices, size_t n,
                    const sf_field_out *fields, size_t n_fields, int use_map, size_t threads,
                    size_t *uncached, sf_error *err);

/* Asks the kernel to start reading records indices[0..n) (valid indices) into the page cache and
 * returns without waiting for them: posix_fadvise(POSIX_FADV_WILLNEED), one call per run of
 * adjacent records. Advice only (nothing where the call does not exist, nothing for direct reads,
 * which do not look in the page cache): returns 0, or the errno value of the first call that
 * failed, the records after it not advised. */
int sf_advise_records(const sf_shards *shards, const int64_t *indices, size_t n);

/* One variable-length field read: sample r has rows[r] rows (already clipped to max_rows) at byte
 * `offsets[r]` of heap file `shard[r]`. The max_rows - rows[r] other rows of its output are filled
 * with `pad`: after the rows, or before them with pad_first (keras' padding="pre"). */
typedef struct sf_heap_out {
    int cast;
    size_t row_elems;      /* elements per row (product of the trailing dimensions) */
    size_t src_row_bytes;  /* stored bytes per row */
    char *dst;             /* output base: sample r at dst + r * max_rows * dst_row_bytes */
    size_t dst_row_bytes;  /* output bytes per row */
    size_t max_rows;
    const void *pad;       /* one output element */
    size_t pad_bytes;      /* output element size */
    sf_affine affine;
    int *inexact;          /* as in sf_field_out */
    int pad_first;         /* 1: padding rows before the sample's rows */
} sf_heap_out;

/* Reads one variable-length field of samples [0, n) as `field` describes, on `threads` threads;
 * sample r's rows are at byte offsets[r] of heap file shard[r] (errors name sample[r]). */
int sf_read_heap(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                 const int64_t *offsets, const int64_t *rows, size_t n, const sf_heap_out *field,
                 size_t threads, sf_error *err);

/* One compressed fixed-shape field (compressed.c): sample r's stored bytes are lengths[r] bytes at
 * offsets[r] of heap file shard[r], one frame of `codec` that decodes to raw_bytes bytes (count
 * stored elements), converted by `cast` (SF_CAST_COPY: as stored) into dst + r * dst_bytes. */
typedef struct sf_compressed_out {
    int codec;             /* enum sf_codec (codec.h) */
    int cast;
    size_t count;          /* stored elements per sample */
    size_t raw_bytes;      /* decoded bytes per sample: count * stored itemsize */
    char *dst;
    size_t dst_bytes;      /* output bytes per sample */
    sf_affine affine;
    int *inexact;          /* as in sf_field_out */
    /* Each shard's decompression dictionary of the field (codec.h) and its id, NULL and 0 for a
     * shard whose frames use none; both arrays NULL where no shard has one. */
    const void *const *ddicts;
    const unsigned *dict_ids;
} sf_compressed_out;

/* Reads and decodes a compressed field of samples [0, n) on `threads` threads, each decoding
 * into the output (or, for a narrowing conversion, its own scratch) and converting in place. A
 * frame that does not decode fails with SF_ERR_CORRUPT, one of another size with SF_ERR_SIZE,
 * one whose header names another dictionary than its shard's with SF_ERR_DICTIONARY, naming
 * sample[r], its heap file and offset. */
int sf_read_compressed(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                       const int64_t *offsets, const int64_t *lengths, size_t n,
                       const sf_compressed_out *field, size_t threads, sf_error *err);

/* Compresses n samples of raw_bytes bytes each (src, contiguous) with `codec` at `level` (or with
 * the compression dictionary `cdict`, codec.h, where not NULL) on `threads` threads: sample r into
 * dst + r * bound (bound >= sf_codec_bound(codec, raw_bytes)), its compressed size into
 * lengths[r]. Fails with SF_ERR_CODEC, SF_ERR_NOMEM or SF_ERR_CORRUPT (the codec refused; detail
 * says why), naming the sample r. */
int sf_compress_samples(int codec, int level, const void *cdict, const char *src, size_t n, size_t raw_bytes,
                        char *dst, size_t bound, int64_t *lengths, size_t threads, sf_error *err);

/* Checks the variable-length rows of samples `sample[0..n)` against their stored CRC32C (the second
 * checksum word, docs/format.md): sample r's rows are the n_spans byte ranges spans[2 (r n_spans
 * + j)] (offset) and spans[2 (r n_spans + j) + 1] (bytes) of heap file shard[r], one per variable
 * field in field order, whose CRC32C, continued from one range to the next, must be expected[r].
 * A mismatch fails with SF_ERR_CHECKSUM naming the sample and its first range's offset. */
int sf_check_heap(const sf_shards *shards, const int64_t *sample, const int64_t *shard, const int64_t *spans,
                  size_t n_spans, const uint32_t *expected, size_t n, size_t threads, sf_error *err);

#endif
