# C declarations of the native reader (ext/*.h), shared by _core.pyx.

from libc.stdint cimport int64_t, uint32_t


cdef extern from "sf_error.h":
    ctypedef struct sf_error:
        int kind
        int err_no
        int file_kind
        int64_t shard
        int64_t offset
        int64_t sample
        const char *detail
        int64_t found
    enum:
        SF_OK
        SF_ERR_IO
        SF_ERR_EOF
        SF_ERR_NOMEM
        SF_ERR_CHECKSUM
        SF_ERR_CODEC
        SF_ERR_CORRUPT
        SF_ERR_SIZE
        SF_ERR_DICTIONARY
        SF_FILE_RECORDS
        SF_FILE_HEAP


cdef extern from "cast.h":
    ctypedef struct sf_affine:
        const float *scale
        const float *offset
        size_t inner
        size_t period
    enum:
        SF_CAST_COPY
        SF_CAST_F16
        SF_CAST_BF16
        SF_CAST_F32
        SF_CAST_F64
        SF_CAST_U8
        SF_CAST_I8
        SF_CAST_U16
        SF_CAST_I16
        SF_CAST_U32
        SF_CAST_I32
        SF_CAST_U64
        SF_CAST_I64
        SF_CAST_COUNT
        SF_BLOCK
    enum:
        SF_OUT_F32
        SF_OUT_F16
        SF_OUT_BF16
        SF_CAST_OUT_SHIFT
    int sf_cast_valid(int cast)
    size_t sf_cast_itemsize(int cast)
    size_t sf_cast_out_itemsize(int cast)
    int sf_cast_has_f16c()
    void sf_cast_allow_f16c(int allowed)
    int sf_convert(int cast, void *dst, const void *src, size_t n, const sf_affine *affine,
                   size_t first) nogil
    int sf_convert_stream(int cast, void *dst, const void *src, size_t n, const sf_affine *affine,
                          size_t first) nogil
    int sf_output_streamed(size_t converted_bytes, size_t n)


cdef extern from "pool.h":
    int sf_pool_init()
    size_t sf_pool_size()
    enum:
        SF_POOL_MAX_THREADS


cdef extern from "reader.h":
    ctypedef struct sf_shards:
        size_t n_shards
        const int *fds
        const int *heap_fds
        const int64_t *starts
        const char *const *maps
        const uint32_t *const *checksums
        size_t header_bytes
        size_t record_bytes
        const int *direct_fds

    ctypedef struct sf_field_out:
        int cast
        size_t src_offset
        size_t src_bytes
        size_t count
        char *dst
        size_t dst_bytes
        sf_affine affine
        int *inexact

    ctypedef struct sf_heap_out:
        int cast
        size_t row_elems
        size_t src_row_bytes
        char *dst
        size_t dst_row_bytes
        size_t max_rows
        const void *pad
        size_t pad_bytes
        sf_affine affine
        int *inexact
        int pad_first

    int sf_guard_mapped_reads()
    int sf_read_records(const sf_shards *shards, const int64_t *indices, size_t n,
                        const sf_field_out *fields, size_t n_fields, int use_map, size_t threads,
                        size_t *uncached, sf_error *err) nogil
    int sf_advise_records(const sf_shards *shards, const int64_t *indices, size_t n) nogil
    int sf_read_heap(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                     const int64_t *offsets, const int64_t *rows, size_t n,
                     const sf_heap_out *field, size_t threads, sf_error *err) nogil
    ctypedef struct sf_compressed_out:
        int codec
        int cast
        size_t count
        size_t raw_bytes
        char *dst
        size_t dst_bytes
        sf_affine affine
        int *inexact
        const void *const *ddicts
        const unsigned *dict_ids

    int sf_read_compressed(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                           const int64_t *offsets, const int64_t *lengths, size_t n,
                           const sf_compressed_out *field, size_t threads, sf_error *err) nogil
    int sf_compress_samples(int codec, int level, const void *cdict, const char *src, size_t n, size_t raw_bytes,
                            char *dst, size_t bound, int64_t *lengths, size_t threads, sf_error *err) nogil
    int sf_check_heap(const sf_shards *shards, const int64_t *sample, const int64_t *shard,
                      const int64_t *spans, size_t n_spans, const uint32_t *expected, size_t n,
                      size_t threads, sf_error *err) nogil


cdef extern from "codec.h":
    enum:
        SF_CODEC_ZSTD
    const char *sf_codec_unavailable(int codec) nogil
    const char *sf_codec_library(int codec)
    size_t sf_codec_bound(int codec, size_t raw_bytes)
    int sf_codec_decompress(int codec, void *dst, size_t raw_bytes, const void *src, size_t n,
                            const void *ddict, unsigned dict_id, long long *found_bytes, const char **why) nogil
    const char *sf_codec_dictionaries_unavailable(int codec)
    int sf_codec_train(int codec, void *dst, size_t capacity, const void *samples, const size_t *sizes,
                       unsigned n, size_t *out_bytes, const char **why) nogil
    unsigned sf_codec_dictionary_id(int codec, const void *dict, size_t n)
    void *sf_codec_ddict_create(int codec, const void *dict, size_t n, const char **why) nogil
    void sf_codec_ddict_free(int codec, void *ddict)
    void *sf_codec_cdict_create(int codec, const void *dict, size_t n, int level, const char **why) nogil
    void sf_codec_cdict_free(int codec, void *cdict)


cdef extern from "uring.h":
    enum:
        SF_READ_IO_AUTO
        SF_READ_IO_POOL
        SF_READ_IO_URING
        SF_READ_IO_DIRECT_URING
        SF_URING_DEPTH
    void sf_set_read_io(int mode)
    int sf_read_io()
    int sf_uring_compiled()
    size_t sf_uring_runs()
    int sf_uring_probe() nogil
    int sf_uring_init()
    size_t sf_uring_free_kept()


cdef extern from "crc32c.h":
    void sf_crc32c_init()
    uint32_t sf_crc32c(uint32_t crc, const void *data, size_t n) nogil
    uint32_t sf_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n) nogil
    uint32_t sf_crc32c_portable(uint32_t crc, const void *data, size_t n) nogil
    void sf_crc32c_records(const void *data, size_t record_bytes, size_t count, uint32_t *out) nogil
    const char *sf_crc32c_kernel()
    const char *sf_crc32c_kernel_name(size_t k)
    int sf_crc32c_use(const char *name)


cdef extern from "batch_memory.h":
    enum:
        SF_BATCH_CACHE_SLOTS
    size_t SF_BATCH_CACHE_BYTES
    size_t sf_batch_size(size_t nbytes)
    void *sf_batch_alloc(size_t nbytes)
    void sf_batch_release(void *data, size_t nbytes)
    size_t sf_batch_cached(size_t *sizes)
    size_t sf_batch_free_cached()


from libc.stdint cimport uint64_t

cdef extern from "permutation.h":
    enum:
        SF_PERMUTATION_MAX_ROUNDS
    ctypedef struct sf_permutation:
        uint64_t n
        uint64_t b
        int rounds
        uint64_t add[SF_PERMUTATION_MAX_ROUNDS]
        uint64_t mul[SF_PERMUTATION_MAX_ROUNDS]
        uint64_t modulus[SF_PERMUTATION_MAX_ROUNDS]
    void sf_permute(const sf_permutation *perm, const int64_t *positions, int64_t *out, size_t count) nogil
