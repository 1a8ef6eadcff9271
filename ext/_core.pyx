# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False, cdivision=True
"""shardfeed's native reader: batch reads of shard records on a pool of C threads.

Private module; use :func:`shardfeed.open`. Each read validates its arguments with the GIL held,
makes one ``nogil`` call that runs the whole batch on native threads (which never touch Python),
and turns the C status into a Python exception afterwards, in :meth:`ShardSet._raise`.

Parts of the module live in include files beside it: ``checksums.pxi`` (CRC32C of buffers),
``batch_memory.pxi`` (reusable output memory), ``buffers.pxi`` (buffers held for one call),
``field_plan.pxi`` (``Affine``, ``FieldRead``: the typed per-field plan of a read),
``compression.pxi`` (the codecs of compressed fields), ``read_io.pxi`` (the thread pool or
io_uring for the records that go to disk) and ``permutation.pxi`` (the epoch orders' Feistel
network).
"""

from native cimport *
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove
from posix.mman cimport MADV_RANDOM, MAP_FAILED, MAP_SHARED, PROT_READ, madvise, mmap, munmap
from posix.unistd cimport close as c_close

import errno as _errno
import os

import numpy as np

from shardfeed.errors import CodecUnavailableError, RecordChecksumError, ShardReadError

cdef extern from *:
    """
    #ifndef SF_SANITIZERS
    #define SF_SANITIZERS ""
    #endif
    """
    const char *SF_SANITIZERS

COMPILED = True
BLOCK = SF_BLOCK
# A conversion id is the stored kind | OUTPUT_KINDS[output dtype name] << CAST_OUT_SHIFT, or CAST_COPY
# where the stored bytes are the output (ext/cast.h, enum sf_cast).
CAST_COPY = SF_CAST_COPY
CAST_OUT_SHIFT = SF_CAST_OUT_SHIFT
STORED_KINDS = {
    "float16": SF_CAST_F16, "bfloat16": SF_CAST_BF16, "float32": SF_CAST_F32, "float64": SF_CAST_F64,
    "uint8": SF_CAST_U8, "bool": SF_CAST_U8, "int8": SF_CAST_I8, "uint16": SF_CAST_U16, "int16": SF_CAST_I16,
    "uint32": SF_CAST_U32, "int32": SF_CAST_I32, "uint64": SF_CAST_U64, "int64": SF_CAST_I64,
}
OUTPUT_KINDS = {"float32": SF_OUT_F32, "float16": SF_OUT_F16, "bfloat16": SF_OUT_BF16}
sf_crc32c_init()
BUILD_INFO = {
    "f16c": bool(sf_cast_has_f16c()),
    "crc32c_kernel": sf_crc32c_kernel().decode(),
    "crc32c_hardware": sf_crc32c_kernel() != b"table",
    "sanitizers": SF_SANITIZERS.decode(),
    "max_threads": SF_POOL_MAX_THREADS,
}

_fork_rc = sf_pool_init()
if _fork_rc != 0:
    raise OSError(_fork_rc, "pthread_atfork failed: the reader could not be made fork-safe")

# A batch larger than this is read in slices, with a check for signals (Ctrl-C) between them, so a
# KeyboardInterrupt does not wait for a whole huge batch: at most this many samples or about this
# many output bytes per slice (the training batches of a few hundred samples are one slice).
cdef size_t _SLICE_SAMPLES = 1 << 16
cdef size_t _SLICE_BYTES = 64 << 20


cdef inline size_t _slice_samples(size_t bytes_per_sample) nogil:
    cdef size_t by_bytes = _SLICE_BYTES // bytes_per_sample if bytes_per_sample else _SLICE_SAMPLES
    if by_bytes < 1:
        return 1
    return by_bytes if by_bytes < _SLICE_SAMPLES else _SLICE_SAMPLES


# One slice of a batch read (ShardSet._read_in_slices): items [start, start + count) of a job.
ctypedef int (*_slice_reader)(void *job, size_t start, size_t count, sf_error *err) noexcept nogil


cdef struct _RecordJob:
    const sf_shards *shards
    const int64_t *indices
    sf_field_out *fields
    size_t n_fields
    int use_map
    size_t threads
    size_t uncached


cdef int _read_record_slice(void *vjob, size_t start, size_t count, sf_error *err) noexcept nogil:
    cdef _RecordJob *job = <_RecordJob *>vjob
    cdef size_t k, uncached = 0
    cdef int rc = sf_read_records(job.shards, job.indices + start, count, job.fields, job.n_fields, job.use_map,
                                  job.threads, &uncached, err)
    job.uncached += uncached
    for k in range(job.n_fields):  # the next slice's rows
        job.fields[k].dst += count * job.fields[k].dst_bytes
    return rc


cdef struct _HeapJob:
    const sf_shards *shards
    const int64_t *samples
    const int64_t *shard
    const int64_t *offsets
    const int64_t *rows
    sf_heap_out *field
    size_t threads


cdef int _read_heap_slice(void *vjob, size_t start, size_t count, sf_error *err) noexcept nogil:
    cdef _HeapJob *job = <_HeapJob *>vjob
    cdef int rc = sf_read_heap(job.shards, job.samples + start, job.shard + start, job.offsets + start,
                               job.rows + start, count, job.field, job.threads, err)
    job.field.dst += count * job.field.max_rows * job.field.dst_row_bytes
    return rc


cdef struct _CompressedJob:
    const sf_shards *shards
    const int64_t *samples
    const int64_t *shard
    const int64_t *offsets
    const int64_t *lengths
    sf_compressed_out *field
    size_t threads


cdef int _read_compressed_slice(void *vjob, size_t start, size_t count, sf_error *err) noexcept nogil:
    cdef _CompressedJob *job = <_CompressedJob *>vjob
    cdef int rc = sf_read_compressed(job.shards, job.samples + start, job.shard + start, job.offsets + start,
                                     job.lengths + start, count, job.field, job.threads, err)
    job.field.dst += count * job.field.dst_bytes
    return rc


cdef struct _HeapCheckJob:
    const sf_shards *shards
    const int64_t *samples
    const int64_t *shard
    const int64_t *spans
    size_t n_spans
    const uint32_t *expected
    size_t threads


cdef int _check_heap_slice(void *vjob, size_t start, size_t count, sf_error *err) noexcept nogil:
    cdef _HeapCheckJob *job = <_HeapCheckJob *>vjob
    return sf_check_heap(job.shards, job.samples + start, job.shard + start, job.spans + 2 * start * job.n_spans,
                         job.n_spans, job.expected + start, count, job.threads, err)


def any_negative(const int64_t[::1] indices not None):
    """Whether any of ``indices`` is negative (a read's indices counted from the end): 0.28 us
    for a batch of 256 where ``np.minimum.reduce(indices) < 0`` takes 0.69 us."""
    cdef Py_ssize_t r
    cdef bint found = False
    with nogil:
        for r in range(indices.shape[0]):
            if indices[r] < 0:
                found = True
                break
    return found


def allow_f16c(bint allowed):
    """Switches the F16C float16 path on or off (off: the portable code); returns whether F16C is
    now in use. For tests; do not call while other threads read."""
    sf_cast_allow_f16c(allowed)
    return bool(sf_cast_has_f16c())


include "checksums.pxi"
include "compression.pxi"


def pool_size():
    """Native threads started so far in this process."""
    return sf_pool_size()


include "read_io.pxi"


include "batch_memory.pxi"
include "buffers.pxi"
include "field_plan.pxi"
include "permutation.pxi"


cdef class ShardSet:
    """The open files of one dataset. Takes ownership of the file descriptors it is given (they
    are closed by :meth:`close`, or when the object is freed, even if the constructor fails)."""

    cdef sf_shards c
    cdef int *fds
    cdef int *heap_fds
    cdef int *direct_fds     # per shard, its record file opened again with O_DIRECT, or -1
    cdef int64_t *starts
    cdef char **maps
    cdef size_t *map_bytes
    cdef const uint32_t **checksums
    cdef list _checksum_arrays  # keeps the arrays `checksums` points into
    cdef size_t n
    cdef int active          # reads in progress; changed only with the GIL held
    cdef readonly bint closed
    cdef readonly tuple paths
    cdef readonly tuple heap_paths
    cdef readonly int64_t num_samples
    cdef readonly bint mapped
    cdef readonly bint checked  # reads compare each record with its CRC32C
    cdef readonly int direct_shards  # shards whose records are read with O_DIRECT

    def __cinit__(self, record_fds, heap_fds, counts, paths, heap_paths, size_t header_bytes,
                  size_t record_bytes, bint use_map, checksums=None):
        cdef size_t n = len(record_fds)
        cdef size_t i
        self.n = n
        self.fds = <int *>PyMem_Calloc(n + 1, sizeof(int))
        self.heap_fds = <int *>PyMem_Calloc(n + 1, sizeof(int))
        self.direct_fds = <int *>PyMem_Calloc(n + 1, sizeof(int))
        self.starts = <int64_t *>PyMem_Calloc(n + 1, sizeof(int64_t))
        self.maps = <char **>PyMem_Calloc(n + 1, sizeof(char *))
        self.map_bytes = <size_t *>PyMem_Calloc(n + 1, sizeof(size_t))
        self.checksums = <const uint32_t **>PyMem_Calloc(n + 1, sizeof(uint32_t *))
        if not (self.fds and self.heap_fds and self.direct_fds and self.starts and self.maps and self.map_bytes
                and self.checksums):
            raise MemoryError()
        for i in range(n + 1):
            self.fds[i] = -1
            self.heap_fds[i] = -1
            self.direct_fds[i] = -1
        for i in range(n):
            self.fds[i] = record_fds[i]
            if heap_fds is not None:
                self.heap_fds[i] = heap_fds[i]
        self.paths = tuple(paths)
        self.heap_paths = tuple(heap_paths) if heap_paths is not None else ()
        cdef Py_ssize_t shard_count = <Py_ssize_t>n
        if len(counts) != shard_count or len(self.paths) != shard_count or (heap_fds is not None and (
                len(heap_fds) != shard_count or len(self.heap_paths) != shard_count)):
            raise ValueError("internal error: shard lists of different lengths")
        if record_bytes == 0:
            raise ValueError("internal error: record size 0")
        cdef int64_t total = 0, count
        for i in range(n):
            count = counts[i]
            if count < 0 or count > ((<int64_t>1 << 62) - total) // <int64_t>record_bytes:
                raise ValueError(f"{self.paths[i]}: sample count {count} overflows")
            total += count
            self.starts[i + 1] = total
        self.num_samples = total
        cdef uint32_t[::1] sums
        if checksums is not None:  # reads check every record (sf_read_records)
            self._checksum_arrays = [np.ascontiguousarray(a, dtype=np.uint32) for a in checksums]
            if len(self._checksum_arrays) != shard_count:
                raise ValueError("internal error: shard lists of different lengths")
            for i in range(n):
                sums = self._checksum_arrays[i]
                if sums.shape[0] != self.starts[i + 1] - self.starts[i]:
                    raise ValueError(f"{self.paths[i]}: {sums.shape[0]} record checksums for "
                                     f"{self.starts[i + 1] - self.starts[i]} records")
                self.checksums[i] = &sums[0] if sums.shape[0] else NULL
        self.checked = checksums is not None

        cdef void *base
        cdef size_t length
        if use_map:
            for i in range(n):
                length = header_bytes + <size_t>(self.starts[i + 1] - self.starts[i]) * record_bytes
                base = mmap(NULL, length, PROT_READ, MAP_SHARED, self.fds[i], 0)
                if base == MAP_FAILED:
                    raise OSError(errno, os.strerror(errno), self.paths[i])
                self.maps[i] = <char *>base
                self.map_bytes[i] = length
                # Default readahead pulls far more than a random record from disk.
                if madvise(base, length, MADV_RANDOM) != 0:
                    raise OSError(errno, "madvise(MADV_RANDOM) failed: " + os.strerror(errno), self.paths[i])
        self.mapped = use_map

        self.c.n_shards = n
        self.c.fds = self.fds
        self.c.heap_fds = self.heap_fds if heap_fds is not None else NULL
        self.c.starts = self.starts
        self.c.maps = <const char *const *>self.maps if use_map else NULL
        self.c.checksums = <const uint32_t *const *>self.checksums if checksums is not None else NULL
        self.c.header_bytes = header_bytes
        self.c.record_bytes = record_bytes
        self.c.direct_fds = NULL  # use_direct_reads

    def __dealloc__(self):
        self._release()
        PyMem_Free(self.fds)
        PyMem_Free(self.heap_fds)
        PyMem_Free(self.direct_fds)
        PyMem_Free(self.starts)
        PyMem_Free(self.maps)
        PyMem_Free(self.map_bytes)
        PyMem_Free(self.checksums)

    cdef void _release(self):
        """Unmaps and closes everything; only when no read is in progress."""
        cdef size_t i
        if self.fds == NULL or self.heap_fds == NULL or self.maps == NULL:
            return
        self._close_direct()
        for i in range(self.n):
            if self.maps[i] != NULL:
                munmap(self.maps[i], self.map_bytes[i])
                self.maps[i] = NULL
            if self.fds[i] >= 0:
                c_close(self.fds[i])
                self.fds[i] = -1
            if self.heap_fds[i] >= 0:
                c_close(self.heap_fds[i])
                self.heap_fds[i] = -1

    cdef void _close_direct(self):
        cdef size_t i
        self.c.direct_fds = NULL
        self.direct_shards = 0
        if self.direct_fds == NULL:
            return
        for i in range(self.n):
            if self.direct_fds[i] >= 0:
                c_close(self.direct_fds[i])
                self.direct_fds[i] = -1

    def use_direct_reads(self, bint enable):
        """With ``enable``, opens each record file again with O_DIRECT (the same file: through
        /proc/self/fd), and record reads go past the page cache (ext/records.h, "Direct reads");
        a file that refuses it keeps the page cache. Without, closes those. Returns how many shards
        read directly. Only before the first read: the Dataset calls it while it opens."""
        cdef size_t i
        cdef int fd
        if self.closed:
            raise ValueError("I/O operation on a closed dataset")
        if self.active:
            raise RuntimeError("internal error: direct reads switched while reads are in progress")
        self._close_direct()
        flag = getattr(os, "O_DIRECT", None)
        if not enable or flag is None:
            return 0
        for i in range(self.n):
            try:
                fd = os.open(f"/proc/self/fd/{self.fds[i]}", os.O_RDONLY | os.O_CLOEXEC | flag)
            except OSError:  # no /proc, or a file system without O_DIRECT: this shard stays buffered
                continue
            self.direct_fds[i] = fd
            self.direct_shards += 1
        if self.direct_shards:
            self.c.direct_fds = self.direct_fds
        return self.direct_shards

    def close(self):
        """Closes the files now, or when the reads in progress (in other threads) end."""
        self.closed = True
        if self.active == 0:
            self._release()

    cdef int _begin(self) except -1:
        if self.closed:
            raise ValueError("I/O operation on a closed dataset")
        self.active += 1
        return 0

    cdef void _end(self):
        self.active -= 1
        if self.closed and self.active == 0:
            self._release()

    cdef int _raise(self, sf_error *err, field=None) except -1:
        """The exception of a failed native call; ``field``: the compressed field being read."""
        if err.kind == SF_ERR_NOMEM:
            raise MemoryError("out of memory in a native batch read")
        paths = self.heap_paths if err.file_kind == SF_FILE_HEAP else self.paths
        path = paths[err.shard] if 0 <= err.shard < len(paths) else None
        where = f"sample {err.sample} at byte offset {err.offset}"
        detail = err.detail.decode("utf-8", "replace") if err.detail != NULL else ""
        if err.kind == SF_ERR_CHECKSUM:
            what = "variable-length rows" if err.file_kind == SF_FILE_HEAP else "record"
            raise RecordChecksumError(f"{path}: the {what} of {where} does not match its CRC32C checksum "
                                      "(damaged after it was written); `shardfeed verify` lists every "
                                      "damaged sample", path=path, sample=err.sample)
        if err.kind == SF_ERR_EOF:
            raise ShardReadError(_errno.EIO, f"file ended before the data of {where}: the shard is "
                                 "shorter than its manifest entry (truncated?)", path)
        if err.kind == SF_ERR_CODEC:
            raise CodecUnavailableError(f"field {field!r} is compressed, but {detail}")
        if err.kind == SF_ERR_CORRUPT:
            raise ShardReadError(_errno.EIO, f"the compressed bytes of field {field!r} of {where} do not decode "
                                 f"({detail}): damaged after they were written? `shardfeed verify` lists "
                                 "every damaged sample", path)
        if err.kind == SF_ERR_DICTIONARY:
            raise ShardReadError(_errno.EIO, f"the compressed frame of field {field!r} of {where} names "
                                 f"{'dictionary ' + str(err.found) if err.found > 0 else 'no dictionary'}, not the "
                                 "one the manifest gives its shard: a damaged record, or a dictionary file "
                                 "replaced by another; `shardfeed verify` checks every dictionary and frame", path)
        if err.kind == SF_ERR_SIZE:
            found = f"{err.found} bytes" if err.found >= 0 else "another size"
            raise ShardReadError(_errno.EIO, f"the compressed bytes of field {field!r} of {where} decode to "
                                 f"{found}, not the field's size ({detail}): a corrupt record", path)
        raise ShardReadError(err.err_no, f"{os.strerror(err.err_no)} (reading {where})", path)

    cdef int _read_in_slices(self, size_t n, size_t step, _slice_reader read_slice, void *job,
                             field=None) except -1:
        """Runs ``read_slice`` over items [0, n) in slices of ``step``, one ``nogil`` call each, with a
        check for signals (Ctrl-C) between them; raises the C status of a slice that failed."""
        cdef size_t start = 0, count
        cdef int rc = 0
        cdef sf_error err
        self._begin()
        try:
            while start < n and rc == 0:
                count = n - start if n - start < step else step
                with nogil:
                    rc = read_slice(job, start, count, &err)
                start += count
                if start < n:
                    PyErr_CheckSignals()
        finally:
            self._end()
        if rc != 0:
            self._raise(&err, field)
        return 0

    cdef _Int64Copy _private_indices(self, const int64_t[::1] indices):
        """A private copy of ``indices``, checked: the native threads read the copy, so another
        Python thread writing into the caller's array during the read (numpy releases the GIL for
        large operations) changes nothing they rely on."""
        cdef size_t n = indices.shape[0]
        cdef _Int64Copy copy = _Int64Copy(n)
        if n:
            memcpy(copy.data, &indices[0], n * sizeof(int64_t))
        self._check_indices(copy.data, n)
        return copy

    cdef int _check_indices(self, const int64_t *indices, size_t n) except -1:
        cdef size_t r
        cdef int64_t total = self.num_samples
        for r in range(n):
            if indices[r] < 0 or indices[r] >= total:
                raise IndexError(f"index {indices[r]} (position {r}) is out of range for a dataset "
                                 f"of {total} samples")
        return 0

    def read_records(self, const int64_t[::1] indices not None, list fields, bint use_map,
                     size_t threads, list inexact=None):
        """Reads the records ``indices`` into the output buffers described by ``fields``: a list
        of :class:`FieldRead`, sorted by src_offset, each ``out`` of ``len(indices)`` rows. Returns
        how many records were not in the page cache (all of them where that is not known).
        ``inexact``: a list with an entry per field, set to True where an integer value did not
        convert exactly (entries of other fields are left as they are)."""
        cdef size_t n = indices.shape[0], nf = len(fields), k, dst_bytes
        cdef size_t end = 0, sample_bytes = 0
        cdef int rc
        cdef _RecordJob job
        cdef Py_buffer *view
        cdef _Views views = _Views(3 * nf)
        cdef FieldRead field
        cdef _Int64Copy own  # the indices the native threads read
        cdef sf_field_out *outs = <sf_field_out *>PyMem_Calloc(nf if nf else 1, sizeof(sf_field_out))
        cdef int *flags = <int *>PyMem_Calloc(nf if nf else 1, sizeof(int))
        if outs == NULL or flags == NULL:
            PyMem_Free(outs)
            PyMem_Free(flags)
            raise MemoryError()
        try:
            if self.closed:
                raise ValueError("I/O operation on a closed dataset")
            if use_map and not self.mapped:
                raise ValueError("internal error: the shards are not mapped")
            own = self._private_indices(indices)
            if inexact is not None and <size_t>len(inexact) != nf:
                raise ValueError("internal error: one inexact entry per field")
            for k in range(nf):
                field = fields[k]
                if field.src_offset < end or field.src_offset + field.src_bytes > self.c.record_bytes:
                    raise ValueError(f"field {k}: bytes [{field.src_offset}, {field.src_offset + field.src_bytes}) "
                                     f"overlap another field or leave the {self.c.record_bytes}-byte record")
                end = field.src_offset + field.src_bytes
                dst_bytes = field.src_bytes if field.cast == SF_CAST_COPY else field.count * sf_cast_out_itemsize(field.cast)
                view = views.acquire(field.out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, k, " output")
                if <size_t>view.len != n * dst_bytes:
                    raise ValueError(f"field {k}: output has {view.len} bytes, expected {n * dst_bytes}")
                if field.cast != SF_CAST_COPY and (<size_t>view.buf) % sf_cast_out_itemsize(field.cast):
                    raise ValueError(f"field {k}: float output is not aligned")
                outs[k].cast = field.cast
                outs[k].src_offset = field.src_offset
                outs[k].src_bytes = field.src_bytes
                outs[k].count = field.count
                outs[k].dst = <char *>view.buf
                outs[k].dst_bytes = dst_bytes
                _fill_affine(&outs[k].affine, views, field.affine, k)
                outs[k].inexact = &flags[k]
                sample_bytes += dst_bytes
            if n == 0 or nf == 0:
                return 0
            if use_map:
                rc = sf_guard_mapped_reads()
                if rc != 0:
                    raise OSError(rc, "cannot install the SIGBUS handler for mapped reads: " + os.strerror(rc))
            job.shards = &self.c
            job.indices = own.data
            job.fields = outs
            job.n_fields = nf
            job.use_map = use_map
            job.threads = threads
            job.uncached = 0
            self._read_in_slices(n, _slice_samples(sample_bytes), _read_record_slice, &job)
            if inexact is not None:
                for k in range(nf):
                    if flags[k]:
                        inexact[k] = True
            return job.uncached
        finally:
            PyMem_Free(outs)
            PyMem_Free(flags)

    def advise(self, const int64_t[::1] indices not None):
        """Starts reading the records ``indices`` into the page cache without waiting
        (``POSIX_FADV_WILLNEED``). Advice: returns 0, or the errno value of a call that failed."""
        cdef int rc = 0
        cdef size_t n = indices.shape[0]
        cdef _Int64Copy own = self._private_indices(indices)
        if n == 0:
            return 0
        self._begin()
        try:
            with nogil:
                rc = sf_advise_records(&self.c, own.data, n)
        finally:
            self._end()
        return rc

    def read_heap(self, const int64_t[::1] samples not None, const int64_t[::1] shards not None,
                  const int64_t[::1] offsets not None, const int64_t[::1] rows not None, int cast,
                  size_t row_elems, size_t src_row_bytes, out, size_t max_rows, pad, Affine affine,
                  size_t threads, bint pad_first=False):
        """Reads variable-length rows: sample r has ``rows[r]`` rows at byte ``offsets[r]`` of heap
        file ``shards[r]``; ``out`` holds ``len(samples) * max_rows`` rows, padded with ``pad``
        after each sample's rows, or before them with ``pad_first``; ``affine``: an :class:`Affine`
        or None. Returns whether an integer
        value did not convert exactly."""
        cdef size_t n = samples.shape[0], r, dst_row_bytes
        cdef sf_heap_out field
        cdef _HeapJob job
        cdef int flag = 0
        cdef _Views views = _Views(4)
        if self.closed:
            raise ValueError("I/O operation on a closed dataset")
        if self.c.heap_fds == NULL:
            raise ValueError("internal error: this dataset has no heap files")
        if shards.shape[0] != samples.shape[0] or offsets.shape[0] != samples.shape[0] \
                or rows.shape[0] != samples.shape[0]:
            raise ValueError("internal error: heap read arrays of different lengths")
        if not sf_cast_valid(cast):
            raise ValueError(f"bad cast {cast}")
        if cast != SF_CAST_COPY and src_row_bytes != row_elems * sf_cast_itemsize(cast):
            raise ValueError(f"{src_row_bytes} bytes do not hold {row_elems} elements")
        # The native threads read private copies of the four arrays, checked here (as the indices
        # of read_records: the caller's arrays may change while they run).
        cdef _Int64Copy own = _Int64Copy(4 * n)
        cdef int64_t *own_samples = own.data
        cdef int64_t *own_shards = own.data + n
        cdef int64_t *own_offsets = own.data + 2 * n
        cdef int64_t *own_rows = own.data + 3 * n
        if n:
            memcpy(own_samples, &samples[0], n * sizeof(int64_t))
            memcpy(own_shards, &shards[0], n * sizeof(int64_t))
            memcpy(own_offsets, &offsets[0], n * sizeof(int64_t))
            memcpy(own_rows, &rows[0], n * sizeof(int64_t))
        for r in range(n):
            if own_shards[r] < 0 or <size_t>own_shards[r] >= self.n or own_rows[r] < 0 \
                    or <size_t>own_rows[r] > max_rows or own_offsets[r] < 0:
                raise ValueError(f"internal error: bad heap entry {r}")
        dst_row_bytes = src_row_bytes if cast == SF_CAST_COPY else row_elems * sf_cast_out_itemsize(cast)
        cdef Py_buffer *view = views.acquire(out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, "output")
        if <size_t>view.len != n * max_rows * dst_row_bytes:
            raise ValueError(f"output has {view.len} bytes, expected {n * max_rows * dst_row_bytes}")
        cdef Py_buffer *pad_view = views.acquire(pad, PyBUF_SIMPLE, "pad value")
        if <size_t>pad_view.len != (dst_row_bytes // row_elems if row_elems else <size_t>pad_view.len):
            raise ValueError("pad value is not one output element")
        if affine is not None and cast == SF_CAST_COPY:
            raise ValueError("an affine transform needs a float output")
        if cast != SF_CAST_COPY and (<size_t>view.buf) % sf_cast_out_itemsize(cast):
            raise ValueError("float output is not aligned")
        field.cast = cast
        field.row_elems = row_elems
        field.src_row_bytes = src_row_bytes
        field.dst = <char *>view.buf
        field.dst_row_bytes = dst_row_bytes
        field.max_rows = max_rows
        field.pad = pad_view.buf
        field.pad_bytes = pad_view.len
        field.pad_first = pad_first
        field.inexact = &flag
        _fill_affine(&field.affine, views, affine, "variable field")
        if n == 0:
            return False
        job.shards = &self.c
        job.samples = own_samples
        job.shard = own_shards
        job.offsets = own_offsets
        job.rows = own_rows
        job.field = &field
        job.threads = threads
        self._read_in_slices(n, _slice_samples(max_rows * dst_row_bytes), _read_heap_slice, &job)
        return bool(flag)

    def read_compressed(self, str field_name, str codec, const int64_t[::1] samples not None,
                        const int64_t[::1] shards not None, const int64_t[::1] offsets not None,
                        const int64_t[::1] lengths not None, int cast, size_t count, size_t raw_bytes, out,
                        Affine affine, size_t threads, FieldDictionaries dictionaries=None):
        """Reads compressed field ``field_name``: sample r's frame of ``codec`` is ``lengths[r]``
        bytes at byte ``offsets[r]`` of heap file ``shards[r]`` and decodes to ``raw_bytes`` bytes
        (``count`` stored elements), converted by ``cast`` into row r of ``out`` (C-contiguous,
        writable), with ``affine`` (an :class:`Affine` or None); each shard's frames with its
        dictionary in ``dictionaries`` (None: no shard has one). Returns whether an integer value
        did not convert exactly."""
        cdef size_t n = samples.shape[0], r, dst_bytes
        cdef sf_compressed_out field
        cdef _CompressedJob job
        cdef int flag = 0
        cdef _Views views = _Views(3)
        if self.closed:
            raise ValueError("I/O operation on a closed dataset")
        if self.c.heap_fds == NULL:
            raise ValueError("internal error: this dataset has no heap files")
        if shards.shape[0] != samples.shape[0] or offsets.shape[0] != samples.shape[0] \
                or lengths.shape[0] != samples.shape[0]:
            raise ValueError("internal error: compressed read arrays of different lengths")
        if not sf_cast_valid(cast) or (cast != SF_CAST_COPY and raw_bytes != count * sf_cast_itemsize(cast)):
            raise ValueError(f"bad cast {cast} for {count} elements in {raw_bytes} bytes")
        why = codec_unavailable(codec)
        if why is not None:
            raise CodecUnavailableError(f"field {field_name!r} is compressed with {codec}, but {why}")
        # Private copies, checked here (the caller's arrays may change while the threads run).
        cdef _Int64Copy own = _Int64Copy(4 * n)
        if n:
            memcpy(own.data, &samples[0], n * sizeof(int64_t))
            memcpy(own.data + n, &shards[0], n * sizeof(int64_t))
            memcpy(own.data + 2 * n, &offsets[0], n * sizeof(int64_t))
            memcpy(own.data + 3 * n, &lengths[0], n * sizeof(int64_t))
        for r in range(n):
            if own.data[n + r] < 0 or <size_t>own.data[n + r] >= self.n or own.data[2 * n + r] < 0 \
                    or own.data[3 * n + r] < 0:
                raise ValueError(f"internal error: bad compressed read entry {r}")
        dst_bytes = raw_bytes if cast == SF_CAST_COPY else count * sf_cast_out_itemsize(cast)
        cdef Py_buffer *view = views.acquire(out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, "output")
        if <size_t>view.len != n * dst_bytes:
            raise ValueError(f"output has {view.len} bytes, expected {n * dst_bytes}")
        if affine is not None and cast == SF_CAST_COPY:
            raise ValueError("an affine transform needs a float output")
        if cast != SF_CAST_COPY and (<size_t>view.buf) % sf_cast_out_itemsize(cast):
            raise ValueError("float output is not aligned")
        field.codec = _codec_id(codec)
        field.cast = cast
        field.count = count
        field.raw_bytes = raw_bytes
        field.dst = <char *>view.buf
        field.dst_bytes = dst_bytes
        field.inexact = &flag
        field.ddicts = NULL
        field.dict_ids = NULL
        if dictionaries is not None:
            if <size_t>len(dictionaries) != self.n:
                raise ValueError("internal error: dictionaries for another number of shards")
            field.ddicts = dictionaries.ddicts
            field.dict_ids = dictionaries.ids
        _fill_affine(&field.affine, views, affine, field_name)
        if n == 0:
            return False
        job.shards = &self.c
        job.samples = own.data
        job.shard = own.data + n
        job.offsets = own.data + 2 * n
        job.lengths = own.data + 3 * n
        job.field = &field
        job.threads = threads
        self._read_in_slices(n, _slice_samples(dst_bytes), _read_compressed_slice, &job, field_name)
        return bool(flag)

    def check_heap(self, const int64_t[::1] samples not None, const int64_t[::1] shards not None,
                   const int64_t[:, :, ::1] spans not None, const uint32_t[::1] expected not None,
                   size_t threads):
        """Checks the variable-length rows of each sample against its stored CRC32C: sample r's
        rows are the byte ranges ``spans[r, j] = (offset, bytes)`` of heap file ``shards[r]``, one
        per variable field in field order, and the CRC32C of them all must be ``expected[r]``.
        Raises :class:`RecordChecksumError` naming the first sample that fails."""
        cdef size_t n = samples.shape[0], n_spans = spans.shape[1], r, j
        cdef _HeapCheckJob job
        if self.closed:
            raise ValueError("I/O operation on a closed dataset")
        if self.c.heap_fds == NULL:
            raise ValueError("internal error: this dataset has no heap files")
        if shards.shape[0] != <Py_ssize_t>n or spans.shape[0] != <Py_ssize_t>n or expected.shape[0] != <Py_ssize_t>n \
                or spans.shape[2] != 2:
            raise ValueError("internal error: heap check arrays of different lengths")
        # Private copies, checked here (the caller's arrays may change while the threads run).
        cdef _Int64Copy own = _Int64Copy(2 * n + 2 * n * n_spans)
        cdef _Int64Copy own_expected = _Int64Copy(n)
        cdef uint32_t *own_sums = <uint32_t *>own_expected.data
        if n:
            memcpy(own.data, &samples[0], n * sizeof(int64_t))
            memcpy(own.data + n, &shards[0], n * sizeof(int64_t))
            if n_spans:
                memcpy(own.data + 2 * n, &spans[0, 0, 0], 2 * n * n_spans * sizeof(int64_t))
            memcpy(own_sums, &expected[0], n * sizeof(uint32_t))
        for r in range(n):
            if own.data[n + r] < 0 or <size_t>own.data[n + r] >= self.n:
                raise ValueError(f"internal error: bad heap check entry {r}")
            for j in range(2 * n_spans):
                if own.data[2 * n + 2 * r * n_spans + j] < 0:
                    raise ValueError(f"internal error: bad heap check entry {r}")
        if n == 0:
            return
        job.shards = &self.c
        job.samples = own.data
        job.shard = own.data + n
        job.spans = own.data + 2 * n
        job.n_spans = n_spans
        job.expected = own_sums
        job.threads = threads
        self._read_in_slices(n, _slice_samples(2 * n_spans * sizeof(int64_t)), _check_heap_slice, &job)


def output_streamed(size_t converted_bytes, size_t n):
    """Whether a read of ``n`` records whose converted fields take ``converted_bytes`` of output per
    record converts them with non-temporal stores (as ``convert(..., stream=True)``): the reads'
    own choice, for the benchmarks' copy ceiling."""
    if n == 0:
        raise ValueError("output_streamed: a batch of 0 records")
    return bool(sf_output_streamed(converted_bytes, n))


def convert(int cast, const unsigned char[::1] src not None, dst not None, Affine affine=None, bint stream=False):
    """Runs one conversion kernel from ``src`` (stored bytes) into ``dst`` (a writable, C-contiguous
    buffer of output elements: float32, float16 or bfloat16 as ``cast`` says), without the GIL;
    for tests and the benchmarks' copy ceiling. ``stream``: the variant that writes float32 output
    with non-temporal stores (what reads of large batches use). Returns whether some integer value
    was not converted exactly."""
    cdef size_t itemsize = sf_cast_itemsize(cast)
    cdef size_t out_itemsize = sf_cast_out_itemsize(cast)
    cdef size_t n
    cdef int inexact = 0
    cdef sf_affine c_affine
    cdef _Views views = _Views(3)
    if cast == SF_CAST_COPY or not sf_cast_valid(cast):
        raise ValueError("bad cast or sizes")
    cdef Py_buffer *out = views.acquire(dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, "dst")
    n = <size_t>out.len // out_itemsize
    if <size_t>out.len % out_itemsize or <size_t>src.shape[0] != n * itemsize or (<size_t>out.buf) % out_itemsize:
        raise ValueError("bad cast or sizes")
    _fill_affine(&c_affine, views, affine, "convert")
    if n:
        with nogil:
            if stream:
                inexact = sf_convert_stream(cast, out.buf, &src[0], n, &c_affine, 0)
            else:
                inexact = sf_convert(cast, out.buf, &src[0], n, &c_affine, 0)
    return bool(inexact)
