"""Opening a dataset and reading samples by index."""

from __future__ import annotations

import errno
import math
import os
from collections import abc
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, _preload
from .read_options import (
    CAST_COPY, INTEGER_DTYPES, STORED_KINDS, affine_layout, cast_values, conversion, exact, inexact_error, option_for,
    output_dtype, per_field, side,
)
from .errors import OutputSizeError, ShardFormatError, ShardReadError
from .format import (
    CHECKSUM_DTYPE, FILE_KIND_CHECKSUMS, FILE_KIND_HEAP, FILE_KIND_RECORDS, HEADER_BYTES, MANIFEST_NAME,
    MERGE_JOURNAL_NAME, Field, Manifest, ShardEntry, check_header, checksum_words, read_manifest,
)
from .fileio import file_system_path, open_regular

_MAX_OUTPUT_BYTES = 1 << 62  # more than numpy's sizes (intp) and BatchMemory can describe
_INT64 = np.dtype(np.int64)

# Records up to this size are copied from a read-only memory map (MADV_RANDOM) instead of one
# preadv() each. Page-cached, the map is 2-8x faster up to 1 KiB and 1.3-1.7x up to 64 KiB (no
# system call, one pass over the bytes); records that are not in the page cache are read by
# preadv on either path, so cold reads are the same. Above 64 KiB the gain is small or nil
# (none for uint8 images with a fused normalisation) and not worth the map's costs: mapped pages
# count in the RSS, and a shard truncated under a reader needs the SIGBUS guard (ext/mapped.c).
# Figures: benchmarks/RESULTS.md.
MMAP_MAX_RECORD_BYTES = 64 * 1024

# threads="auto": at least this many reader threads (the queue depth for cold reads; measured in
# benchmarks/RESULTS.md, "Thread count").
AUTO_MIN_THREADS = 16
# A new output array of at least this many bytes is made in reusable memory (see _empty).
BATCH_MEMORY_MIN_BYTES = 1 << 20
_default_threads: Optional[int] = None
_auto_threads: Optional[int] = None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """Native threads a batch read uses unless told otherwise (see :func:`set_num_threads`)."""
    global _auto_threads
    if _default_threads is not None:
        return _default_threads
    if _auto_threads is None:  # once: the affinity query is a system call
        _auto_threads = max(AUTO_MIN_THREADS, 2 * _cpu_count())
    return _auto_threads


def set_num_threads(threads: Union[None, str, int]) -> None:
    """Sets the default number of native reader threads; ``"auto"`` (or ``None``) restores the
    automatic choice: ``AUTO_MIN_THREADS``, or twice the CPUs if more. The threads are C threads
    that never hold the GIL. They are the reader's queue depth for records that are not in the
    page cache (cold random reads want many requests in flight: benchmarks/RESULTS.md); records
    that are in the page cache (found without waiting for the disk, on Linux) are read by at most
    one thread per CPU whatever this number, since more would only add thread switches."""
    global _default_threads
    _default_threads = _check_threads(threads)


def _check_threads(threads: Any) -> Optional[int]:
    """An explicit thread count, or None for the automatic choice ("auto" or None)."""
    if threads is None or (isinstance(threads, str) and threads == "auto"):
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= _core.BUILD_INFO["max_threads"]:
        raise ValueError(f"threads must be 'auto' or an int in [1, {_core.BUILD_INFO['max_threads']}], got {threads!r}")
    return int(threads)


class Batch(dict):
    """A dict of field name -> batch array; ``lengths`` maps each variable-length field to the
    number of valid (unpadded) rows of every sample (the first ones, or the last ones when read
    with ``padding="pre"``); ``uncached`` is how many of the batch's
    fixed-size records were not in the page cache when it was read (each field's record reads
    counted once; all of them on systems where the reader cannot tell)."""

    def __init__(self, *args: Any, lengths: Optional[Dict[str, np.ndarray]] = None, uncached: int = 0):
        super().__init__(*args)
        self.lengths: Dict[str, np.ndarray] = lengths or {}
        self.uncached = uncached

    def __reduce__(self):
        return (Batch, (dict(self),), {"lengths": self.lengths, "uncached": self.uncached})

    def samples(self) -> List[Dict[str, Any]]:
        """The batch as one dict per sample, as ``ds[i]`` gives it: each field's row (a view of
        the batch's array, no copy), variable-length fields cut to the sample's length."""
        names = list(self)
        count = len(self[names[0]]) if names else 0
        out = []
        for row in range(count):
            sample = {}
            for name in names:
                length = self.lengths.get(name)
                values = self[name]
                sample[name] = values[row] if length is None else values[row, :length[row]]
            out.append(sample)
        return out


def _open_file(path: str, size: int, kind: int, manifest: Manifest) -> int:
    """Opens a shard or heap file (a regular file, never through a link) and checks its size and header."""
    fd = open_regular(path, " shard")
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ShardFormatError(f"{path}: file is {actual} bytes, the manifest says {size} "
                                   f"({'truncated' if actual < size else 'extra data'})")
        check_header(path, os.pread(fd, HEADER_BYTES, 0), kind, manifest.schema)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _stored_checksums(path: str, shard: ShardEntry, manifest: Manifest) -> np.ndarray:
    """The stored checksum words of each sample of a shard (its ``.crc`` file, header and size
    checked), one row per sample: the record's CRC32C, then its variable-length rows' where the
    schema has variable fields; for ``open(..., verify=True)``."""
    if shard.checksums_file is None:
        raise ShardFormatError(f"{os.path.join(path, shard.file)}: this shard has no per-record checksums "
                               "(written by a shardfeed before format version 2), so verify=True cannot check "
                               "its reads; `shardfeed verify` checks its whole-file checksum")
    file = os.path.join(path, shard.checksums_file)
    fd = _open_file(file, shard.checksums_size, FILE_KIND_CHECKSUMS, manifest)
    try:
        data = bytearray(shard.checksums_size - HEADER_BYTES)
        view, at = memoryview(data), HEADER_BYTES
        while view:
            got = os.preadv(fd, [view], at)
            if got == 0:
                raise ShardReadError(errno.EIO, "file ended before its manifest size (truncated?)", file)
            view, at = view[got:], at + got
    except OSError as exc:
        if isinstance(exc, ShardReadError):
            raise
        raise ShardReadError(exc.errno, f"cannot read the record checksums: {exc.strerror}", file) from None
    finally:
        os.close(fd)
    return np.frombuffer(data, dtype=CHECKSUM_DTYPE).reshape(shard.num_samples, checksum_words(manifest.schema))


def _as_name_list(fields: Union[None, str, Sequence[str]], schema_fields: Mapping[str, Field]) -> List[str]:
    if fields is None:
        return list(schema_fields)
    names = [fields] if isinstance(fields, str) else list(fields)
    for name in names:
        if name not in schema_fields:
            raise KeyError(f"no field {name!r}; the dataset has {list(schema_fields)}")
    if len(set(names)) != len(names):
        raise ValueError(f"fields listed twice in {names}")
    return names


class Dataset:
    """A dataset opened for reading: ``len(ds)``, ``ds.fields``, ``ds.metadata``, ``ds[i]`` and
    :meth:`read` for batches. Thread-safe; pickles by path (the copy reopens the files)."""

    def __init__(self, path: "os.PathLike[str] | str", *, threads: Union[None, str, int] = "auto",
                 mmap: Union[str, bool] = "auto", verify: bool = False, preload: Union[str, bool] = "auto"):
        self.path = file_system_path(path, ShardReadError)
        self._preload_option = _preload.check_option(preload)
        self.preloading: Optional[_preload.BackgroundPreload] = None  # the background pass, if one started
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be True or False, got {verify!r}")
        self.verify_reads = verify
        self._threads = _check_threads(threads)
        if mmap not in ("auto", True, False):
            raise ValueError(f"mmap must be 'auto', True or False, got {mmap!r}")
        self._mmap_option = mmap
        if not os.path.isdir(self.path):
            raise ShardReadError(errno.ENOENT if not os.path.exists(self.path) else errno.ENOTDIR,
                                 "not a dataset directory", self.path)
        try:
            manifest = read_manifest(self.path)
        except FileNotFoundError:
            why = ("a merge into this directory did not finish: run the same shardfeed.merge again"
                   if os.path.lexists(os.path.join(self.path, MERGE_JOURNAL_NAME)) else
                   "not a shardfeed dataset, or its writer never committed")
            raise ShardReadError(errno.ENOENT, f"no {MANIFEST_NAME}: {why}",
                                 os.path.join(self.path, MANIFEST_NAME)) from None
        self._manifest = manifest
        self.schema = manifest.schema
        self.fields: Dict[str, Field] = dict(manifest.schema.fields)
        self.metadata: Dict[str, Any] = manifest.metadata
        self._record_bytes = manifest.schema.record_bytes
        counts = [s.num_samples for s in manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._heap_sizes = np.array([s.heap_size for s in manifest.shards], dtype=np.int64)
        self._heap_paths = [os.path.join(self.path, s.heap_file) for s in manifest.shards if s.heap_file]
        paths = [os.path.join(self.path, s.file) for s in manifest.shards]
        use_map = self._record_bytes <= MMAP_MAX_RECORD_BYTES if mmap == "auto" else bool(mmap)
        has_heap = bool(manifest.schema.variable_fields)
        words = [_stored_checksums(self.path, shard, manifest) for shard in manifest.shards] if verify else None
        checksums = [np.ascontiguousarray(w[:, 0], dtype=np.uint32) for w in words] if words is not None else None
        # verify=True with variable fields: the CRC32C of each sample's rows (all variable fields), in
        # dataset order, checked by read() before it reads any rows.
        self._row_checksums: Optional[np.ndarray] = None
        if words is not None and has_heap:
            self._row_checksums = np.concatenate([np.asarray(w[:, 1], dtype=np.uint32) for w in words] or
                                                 [np.zeros(0, np.uint32)])
        fds: List[int] = []
        heap_fds: List[int] = []
        try:
            for shard, shard_path in zip(manifest.shards, paths):
                fds.append(_open_file(shard_path, shard.size, FILE_KIND_RECORDS, manifest))
                if has_heap:
                    heap_path = os.path.join(self.path, shard.heap_file)
                    heap_fds.append(_open_file(heap_path, shard.heap_size, FILE_KIND_HEAP, manifest))
        except BaseException:
            for fd in fds + heap_fds:
                os.close(fd)
            raise
        # The ShardSet owns the descriptors from here on, even if it fails.
        self._shards = _core.ShardSet(fds, heap_fds if has_heap else None, counts, paths,
                                      self._heap_paths if has_heap else None, HEADER_BYTES,
                                      self._record_bytes, use_map, checksums)
        self._use_map = use_map
        # Per field, what read() needs on every call: (natural dtype, cast kernel, variable,
        # row shape, elements per row, offset and bytes in the record), so that a read does not
        # recompute Field properties.
        self._layout = {name: (f.natural_dtype, STORED_KINDS[f.dtype], f.variable, f.row_shape, f.count, f.offset,
                               f.record_bytes) for name, f in self.fields.items()}
        # (field, dtype option, affine) -> (output dtype, conversion id or None): see _conversion.
        self._conversions: Dict[Tuple[str, Any, bool], Tuple[np.dtype, Optional[int]]] = {}
        files = self._data_files()
        if files and _preload.background_wanted(
                self._preload_option, sum(size for _, size in files),
                _preload.memory_available() if self._preload_option == "auto" else None):
            self.preloading = _preload.start_background(self, files)

    # ---- basics -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._manifest.shards)

    @property
    def threads(self) -> int:
        return self._threads if self._threads is not None else get_num_threads()

    def __repr__(self) -> str:
        return f"<shardfeed.Dataset {self.path!r}: {len(self)} samples, {self.schema!r}>"

    def close(self) -> None:
        """Closes the shard files (reads running in other threads finish first) and stops the
        background preload."""
        if self.preloading is not None:
            self.preloading.stop()
        self._shards.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __reduce__(self):
        return (_reopen, (self.path, self._threads, self._mmap_option, self.verify_reads, self._preload_option))

    def preload(self) -> bool:
        """Reads every file of the dataset once, front to back, so that the operating system's
        page cache holds all of it and random reads are then served from memory: one sequential
        pass at the disk's bandwidth instead of a first epoch of random reads at its request rate
        (1 GiB of 128-byte records: 0.8-2 s instead of 75-90 s on the VM of benchmarks/RESULTS.md).
        Where the kernel caches file data in large folios (Linux 6.16+ on ext4, XFS), pages read in
        order are cached in 2 MiB units that the reader's memory maps use as huge pages, and
        page-cached random reads of small records run 1.3-1.5x faster than after random or
        write-order caching.

        Returns False without reading anything when the files are larger than the memory the
        process could give the page cache (``MemAvailable``, and its memory cgroup's limit): they
        would only evict one another, and random reads are the way to read them. The pages stay
        cached as long as the kernel keeps them, shared with every process that reads the files.
        Parts already cached are not read again (and keep the size they were cached in).

        ``open`` does this by default in the background for a dataset that fits (its ``preload``
        option, :attr:`preloading`); call this to wait for all of it before reading."""
        if self._shards.closed:
            raise ValueError("I/O operation on a closed dataset")
        files = self._data_files()
        available = _preload.memory_available()
        if available is not None and sum(size for _, size in files) > available:
            return False
        _preload.preload_files(files)
        return True

    def _data_files(self) -> List[Tuple[str, int]]:
        """(path, size) of every record and heap file, in shard order: what a preload reads."""
        files = [(os.path.join(self.path, s.file), s.size) for s in self._manifest.shards]
        return files + [(os.path.join(self.path, s.heap_file), s.heap_size) for s in self._manifest.shards
                        if s.heap_file]

    def verify(self) -> Any:
        """Checks every shard this dataset lists (checksums, sizes, headers, records) and returns a
        :class:`shardfeed.VerifyReport` naming the bad shards and, where the structure shows them,
        the bad samples. See :func:`shardfeed.verify`."""
        from .verification import verify_manifest
        return verify_manifest(self.path, self._manifest)

    def __getitem__(self, index: Any) -> Any:
        """``ds[i]``: one sample as a dict of arrays (variable fields unpadded); ``ds[a:b]``: a Batch."""
        if isinstance(index, slice):
            return self.read(np.arange(len(self), dtype=np.int64)[index])
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices must be integers or slices, not {type(index).__name__}")
        if not -len(self) <= int(index) < len(self):  # (before numpy, which cannot hold 2**63)
            raise IndexError(f"index {int(index)} is out of range for a dataset of {len(self)} samples")
        return self.read(np.array([index], dtype=np.int64)).samples()[0]

    def _getitems(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
        """grain's optional batched read (``RandomAccessDataSource._getitems``, used by
        ``grain.MapDataset.source(ds)``): the samples ``indices`` as ``ds[i]`` gives them, read
        with one :meth:`read`. A Dataset is a grain data source as it is: ``len``, a thread-safe,
        deterministic ``ds[i]``, a repr naming its path, and pickling by path."""
        return self.read(indices).samples()

    # ---- views and training (python/shardfeed/views.py, loader.py, keras.py, tf.py) -----------

    def split(self, parts: Any, *, seed: int = 0, shuffle: bool = True) -> Any:
        """Disjoint views, e.g. ``split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)``: see
        :meth:`shardfeed.Subset.split`. No data is copied."""
        from .views import Subset
        return Subset(self).split(parts, seed=seed, shuffle=shuffle)

    def subset(self, indices: Any) -> Any:
        """A view of the samples at ``indices``, in that order (:class:`shardfeed.Subset`)."""
        from .views import Subset
        return Subset(self).subset(indices)

    def head(self, n: int) -> Any:
        """A view of the first ``n`` samples, for smoke tests (:class:`shardfeed.Subset`)."""
        from .views import Subset
        return Subset(self).head(n)

    def shard(self, rank: int, world_size: int) -> Any:
        """Worker ``rank``'s disjoint, equal-length part of every epoch (:meth:`shardfeed.Subset.shard`)."""
        from .views import Subset
        return Subset(self).shard(rank, world_size)

    def batches(self, batch_size: int, **options: Any) -> Any:
        """A prefetching generator of ``(x, y)`` batches for Keras or a training loop, a new
        uniformly random order every epoch: see :func:`shardfeed.loader.batches`."""
        from .loader import batches
        return batches(self, batch_size, **options)

    def to_tf_dataset(self, batch_size: int, **options: Any) -> Any:
        """A ``tf.data.Dataset`` of whole batches: see :func:`shardfeed.tf.to_tf_dataset`."""
        from .tf import to_tf_dataset
        return to_tf_dataset(self, batch_size, **options)

    # ---- batch reads --------------------------------------------------------------------------

    def _indices(self, indices: Any) -> np.ndarray:
        if type(indices) is np.ndarray and indices.dtype == _INT64 and indices.ndim == 1:
            # The common case, checked with less Python work: int64 indices need no conversion
            # and only negative ones need wrapping (out-of-range ones are refused natively).
            array = indices if indices.flags.c_contiguous else np.ascontiguousarray(indices)
            if _core.any_negative(array):
                array = np.where(array < 0, array + len(self), array)
                array[array < 0] -= len(self)
            return array
        array = np.asarray(indices)
        if array.ndim != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {array.shape}")
        if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
            raise TypeError(f"indices must be integers, got {array.dtype}")
        if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise IndexError(f"index {int(array.max())} is out of range for a dataset of {len(self)} samples")
        array = np.ascontiguousarray(array, dtype=np.int64)
        if array.size and array.min() < 0:
            array = np.where(array < 0, array + len(self), array)
            array[array < 0] -= len(self)  # keep the original value in the IndexError message
        return array

    def _check_out(self, name: str, array: Any, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"out[{name!r}] must be a numpy array, got {type(array).__name__}")
        problems = []
        if array.dtype != dtype:
            problems.append(f"dtype {array.dtype} (expected {dtype})")
        if array.shape != shape:
            problems.append(f"shape {array.shape} (expected {shape})")
        if not array.flags.c_contiguous:
            problems.append("not C-contiguous")
        if not array.flags.writeable:
            problems.append("not writable")
        if not array.flags.aligned:
            problems.append("not aligned")
        if problems:
            raise ValueError(f"out[{name!r}]: {', '.join(problems)}")
        return array

    def _conversion(self, field: Field, dtype: Any, affine: bool) -> Tuple[np.dtype, Optional[int]]:
        """The output dtype and the conversion id (None: numpy converts a copy) of a field read with
        this dtype option, cached per dataset (computed once per option, not on every read)."""
        key = (field.name, dtype, affine)
        try:
            return self._conversions[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable option: not cached
            key = None
        out_dtype = output_dtype(field, dtype, affine)
        found = out_dtype, conversion(field, out_dtype, affine)
        if key is not None:
            self._conversions[key] = found
        return found

    def read(self, indices: Any, fields: Union[None, str, Sequence[str]] = None, *, dtype: Any = None,
             out: Optional[Mapping[str, np.ndarray]] = None, scale: Any = None, offset: Any = None,
             maxlen: Union[None, int, Mapping[str, int]] = None, pad_value: Any = 0,
             padding: Union[str, Mapping[str, str]] = "post", truncating: Union[str, Mapping[str, str]] = "post",
             lossy: Union[bool, Mapping[str, bool]] = False, threads: Union[None, str, int] = None) -> Batch:
        """Reads the samples ``indices`` (any order, duplicates allowed, negative counts from the end)
        and returns a :class:`Batch` of arrays with a leading batch dimension.

        ``fields``: a name or list of names (default: all). ``dtype``: ``None`` (each field's stored
        dtype; bfloat16 reads as float32), ``"auto"`` (float fields as float32, integer and bool
        fields as stored: ``shardfeed.read_options.AUTO_DTYPES``), or a dtype: float32, float16 and bfloat16 (the
        ``ml_dtypes`` dtype; ``"bfloat16"`` names it) are converted natively, in place, rounding to
        nearest even; others (another integer width, float64, bool) by numpy from the stored values.
        A dict gives a value per field. The table of what each choice gives is in
        docs/training.md, "Output dtypes".

        ``lossy``: a conversion that cannot give back a stored value exactly (int64 16777217 as
        float32, int16 2049 as float16, -1 as uint8, 1.5 as int32) raises
        :class:`shardfeed.ValueRangeError` naming the field and sample, unless ``lossy`` is True
        (or a dict ``{field: True}``). Narrowing floats (float64 to float32, float32 to float16) is
        a choice of precision, never refused: out-of-range values become infinities.

        ``scale``/``offset``: ``out = float32(stored) * scale + offset`` computed in float32 (no
        fused multiply-add), each a scalar or an array broadcastable to the field's shape (per
        channel), or a dict per field; the output is float32, or float16/bfloat16 when asked for
        (that float32 result rounded to nearest even). ``out``: dict of preallocated arrays to fill.

        Variable-length fields are padded with ``pad_value`` to the longest sample, or to
        ``maxlen`` (longer samples are truncated). ``padding="post"`` (the default) puts the pad
        rows after a sample's rows, ``"pre"`` before them; ``truncating="post"`` (the default)
        keeps a long sample's first ``maxlen`` rows, ``"pre"`` its last ones, as in
        ``keras.utils.pad_sequences`` (whose defaults are ``"pre"``). Each may be a dict per field.
        ``batch.lengths`` holds each sample's rows in the output: its stored length, at most
        ``maxlen``."""
        names = _as_name_list(fields, self.fields)
        index_array = self._indices(indices)
        n = len(index_array)
        several = len(names) > 1
        out = {} if out is None else out
        unknown = [k for k in out if k not in names]
        if unknown:
            raise KeyError(f"out has arrays for fields not being read: {unknown}")
        chosen = _check_threads(threads)
        thread_count = self.threads if chosen is None else chosen

        record_reads = []  # (_core.FieldRead, field name, output dtype, affine)
        checked = False  # whether a kernel may flag an inexact integer (integer sources only)
        variable = []
        converted_later = {}  # field -> (natural values read, output dtype, out array or None)
        results: Dict[str, np.ndarray] = {}
        for name in names:
            field = self.fields[name]
            field_scale = per_field(scale, name, several, "scale")
            field_offset = per_field(offset, name, several, "offset")
            affine = field_scale is not None or field_offset is not None
            natural, stored_cast, variable_field, row_shape, count, at, nbytes = self._layout[name]
            out_dtype, cast = self._conversion(field, dtype.get(name) if isinstance(dtype, abc.Mapping) else dtype, affine)
            params = affine_layout(field, field_scale, field_offset) if affine else None
            if variable_field:
                descriptors = np.empty((n, 2), dtype=np.uint64)
                record_reads.append((_core.FieldRead(CAST_COPY, at, nbytes, 2, descriptors), name, None, False))
                variable.append((field, descriptors, out_dtype, cast, params, affine))
                continue
            shape = (n,) + row_shape
            target = self._check_out(name, out[name], shape, out_dtype) if name in out else None
            if cast is None:  # numpy converts the values read as they are stored
                converted_later[name] = (_empty(shape, natural), out_dtype, target)
                cast, target = conversion(field, natural, False), converted_later[name][0]  # bfloat16: to float32
            elif target is None:
                target = _empty(shape, out_dtype)
            results[name] = target
            record_reads.append((_core.FieldRead(cast, at, nbytes, count, target, params), name, out_dtype, affine))
            checked = checked or (cast != CAST_COPY and field.dtype in INTEGER_DTYPES)
        if len(out) > 1:
            self._check_disjoint(out)
        row_descriptors = {field.name: descriptors for field, descriptors, *_ in variable}
        if variable and self._row_checksums is not None:  # the rows check needs every variable field's
            for field in self.schema.variable_fields:
                if field.name not in row_descriptors:
                    descriptors = row_descriptors[field.name] = np.empty((n, 2), dtype=np.uint64)
                    at, nbytes = self._layout[field.name][5:]
                    record_reads.append((_core.FieldRead(CAST_COPY, at, nbytes, 2, descriptors), field.name, None,
                                         False))
        if variable:  # the heap reads use the indices again: a private copy, like the native reads'
            index_array = index_array.copy()
        if len(record_reads) > 1:
            record_reads.sort(key=lambda read: (read[0].src_offset, read[0].src_bytes))  # a zero-size field first
        inexact = [False] * len(record_reads) if checked else None
        uncached = self._shards.read_records(index_array, [read[0] for read in record_reads], self._use_map,
                                             thread_count, inexact)
        if checked and any(inexact):
            for (_, name, out_dtype, affine), flagged in zip(record_reads, inexact):
                if flagged and not option_for(lossy, name):
                    raise self._inexact(self.fields[name], index_array, out_dtype, affine)
        for name, (values, out_dtype, target) in converted_later.items():
            converted = cast_values(self.fields[name], values, out_dtype, index_array, bool(option_for(lossy, name)))
            if target is None:
                target = converted
            else:
                target[...] = converted
            results[name] = target

        lengths: Dict[str, np.ndarray] = {}
        if variable and self._row_checksums is not None:
            self._check_rows(index_array, row_descriptors, thread_count)
        for field, descriptors, out_dtype, cast, params, affine in variable:
            name = field.name
            results[name], lengths[name] = self._read_variable(
                field, index_array, descriptors, out_dtype, cast, params, out.get(name), option_for(maxlen, name),
                pad_value.get(name, 0) if isinstance(pad_value, abc.Mapping) else pad_value, thread_count,
                side(padding, name, "padding"), side(truncating, name, "truncating"), bool(option_for(lossy, name)),
                affine)
        return Batch({name: results[name] for name in names}, lengths=lengths, uncached=uncached)

    def _inexact(self, field: Field, indices: np.ndarray, out_dtype: np.dtype, affine: bool, **variable: Any) -> Exception:
        """The error for a native conversion that flagged an inexact integer: the field is read
        again as stored to find the first such sample (error path only)."""
        check = np.dtype(np.float32) if affine else out_dtype
        values = self.read(indices, fields=field.name, **variable)[field.name]
        bad = ~exact(values, check)
        if not bad.any():  # cannot happen while the kernels and exact() agree
            return ValueError(f"field {field.name!r}: a value did not convert exactly to {out_dtype}")
        return inexact_error(field, values, bad, indices, out_dtype, check)

    def readahead(self, indices: Any) -> None:
        """Asks the kernel to start reading the records of ``indices`` from disk into the page
        cache, and returns without waiting: a later ``read`` of them finds them there or under way.
        The loader calls it for the next batch while it reads this one, once reads miss the page
        cache, so that the disk always has requests queued. Advice only: a system without
        ``posix_fadvise(POSIX_FADV_WILLNEED)``, or one that refuses it, reads nothing ahead.
        Variable-length rows (heap files) are not read ahead; bad indices raise as in ``read``."""
        self._shards.advise(self._indices(indices))

    def _check_disjoint(self, out: Mapping[str, np.ndarray]) -> None:
        arrays = list(out.items())
        for i, (a_name, a) in enumerate(arrays):
            for b_name, b in arrays[i + 1:]:
                if np.may_share_memory(a, b):
                    raise ValueError(f"out[{a_name!r}] and out[{b_name!r}] share memory")

    def _heap_rows(self, field: Field, indices: np.ndarray, shard: np.ndarray,
                   descriptors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The (offset, rows) of each sample's rows of a variable field, from its record
        descriptors; ShardFormatError where they leave the heap file."""
        offsets = descriptors[:, 0]
        rows = descriptors[:, 1]
        row_bytes = field.count * field.stored_dtype.itemsize
        heap_end = self._heap_sizes[shard].astype(np.uint64)
        with np.errstate(over="ignore"):
            bad = (offsets < HEADER_BYTES) | (offsets > heap_end) | (rows > (heap_end - offsets) // max(row_bytes, 1))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ShardFormatError(f"{self._heap_paths[shard[r]]}: sample {indices[r]} of field {field.name!r} "
                                   f"points at {rows[r]} rows at byte {offsets[r]}, outside the "
                                   f"{heap_end[r]}-byte heap file (corrupt record)")
        return offsets, rows

    def _check_rows(self, indices: np.ndarray, descriptors: Mapping[str, np.ndarray], threads: int) -> None:
        """verify=True: checks the variable-length rows of every sample read (all variable fields,
        as the checksum covers them together) against their stored CRC32C."""
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        fields = self.schema.variable_fields
        spans = np.empty((len(indices), len(fields), 2), dtype=np.int64)
        for j, field in enumerate(fields):
            offsets, rows = self._heap_rows(field, indices, shard, descriptors[field.name])
            spans[:, j, 0] = offsets
            spans[:, j, 1] = rows * np.uint64(field.count * field.stored_dtype.itemsize)
        self._shards.check_heap(indices, shard.astype(np.int64), spans, self._row_checksums[indices], threads)

    def _read_variable(self, field: Field, indices: np.ndarray, descriptors: np.ndarray, out_dtype: np.dtype,
                       cast: Optional[int], params: Optional[_core.Affine], out_array: Optional[np.ndarray],
                       maxlen: Optional[int],
                       pad_value: Any, threads: int, padding: str, truncating: str, lossy: bool,
                       affine: bool) -> Tuple[np.ndarray, np.ndarray]:
        n = len(indices)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        offsets, rows = self._heap_rows(field, indices, shard, descriptors)
        row_bytes = field.count * field.stored_dtype.itemsize
        if out_array is not None:
            if out_array.ndim < 2:
                raise ValueError(f"out[{field.name!r}] must have shape (batch, maxlen, ...)")
            maxlen = out_array.shape[1] if maxlen is None else maxlen
        if maxlen is None:
            max_rows = int(rows.max()) if n else 0
        elif isinstance(maxlen, bool) or not isinstance(maxlen, (int, np.integer)) or maxlen < 0:
            raise ValueError(f"maxlen for field {field.name!r} must be an int >= 0, got {maxlen!r}")
        else:
            max_rows = int(maxlen)
        shape = (n, max_rows) + field.row_shape
        nbytes = math.prod(shape) * out_dtype.itemsize
        if nbytes >= _MAX_OUTPUT_BYTES:
            raise OutputSizeError(f"field {field.name!r}: a batch of {n} samples padded to maxlen={max_rows} rows "
                                  f"of {field.row_shape} would take {nbytes} bytes, more than the {_MAX_OUTPUT_BYTES} "
                                  "bytes an output array may take", field=field.name, nbytes=nbytes,
                                  limit=_MAX_OUTPUT_BYTES)
        if out_array is not None:
            target = self._check_out(field.name, out_array, shape, out_dtype)
        else:
            target = None
        try:
            pad = np.array(pad_value, dtype=out_dtype)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"pad_value {pad_value!r} does not fit field {field.name!r} read as {out_dtype}: {exc}") from None
        if pad.ndim:
            raise ValueError(f"pad_value for field {field.name!r} must be a scalar")
        clipped = np.minimum(rows, np.uint64(max_rows)).astype(np.int64)
        starts = offsets.astype(np.int64)
        if truncating == "pre":  # keep the last rows: skip the first ones
            starts += (rows.astype(np.int64) - clipped) * row_bytes
        read_as = out_dtype if cast is not None else field.natural_dtype
        read_cast = cast if cast is not None else conversion(field, read_as, False)  # bfloat16: to float32
        landing = target if cast is not None and target is not None else _empty(shape, read_as)
        pad_bytes = pad.tobytes() if cast is not None else np.zeros((), read_as).tobytes()
        inexact = self._shards.read_heap(indices, shard.astype(np.int64), starts, clipped, read_cast,
                               field.count, row_bytes, landing, max_rows, pad_bytes, params, threads,
                               padding == "pre")
        if inexact and not lossy:
            raise self._inexact(field, indices, out_dtype, affine, maxlen=max_rows, truncating=truncating)
        if cast is not None:
            return landing, clipped
        converted = cast_values(field, landing, out_dtype, indices, lossy)  # padding: zeros, exact in any dtype
        rows_at = np.arange(max_rows)
        in_pad = rows_at >= clipped[:, None] if padding == "post" else rows_at < (max_rows - clipped)[:, None]
        converted[in_pad] = pad
        if target is None:
            return converted, clipped
        target[...] = converted
        return target, clipped


def _empty(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A new output array; one of at least ``BATCH_MEMORY_MIN_BYTES`` views a
    :class:`_core.BatchMemory` block, mapped once and reused after numpy frees the array."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < BATCH_MEMORY_MIN_BYTES:
        return np.empty(shape, dtype)
    return np.frombuffer(_core.BatchMemory(nbytes), dtype, nbytes // dtype.itemsize).reshape(shape)


def free_batch_memory() -> int:
    """Returns to the system the memory that :meth:`Dataset.read` keeps for reuse: output arrays of
    at least 1 MiB that numpy has freed (at most 8 of them, 256 MiB), which later reads of the same
    size would take back instead of new pages. Returns the bytes released. For a process that is
    done reading batches and needs the memory for something else; reading again refills the cache."""
    return _core.free_batch_memory()


def _reopen(path: str, threads: Optional[int], mmap: Union[str, bool], verify: bool = False,
            preload: Union[str, bool] = "auto") -> Dataset:
    return Dataset(path, threads=threads, mmap=mmap, verify=verify, preload=preload)


def open(path: "os.PathLike[str] | str", *, threads: Union[None, str, int] = "auto",
         mmap: Union[str, bool] = "auto", verify: bool = False, preload: Union[str, bool] = "auto") -> Dataset:
    """Opens a dataset directory for reading. ``threads``: native reader threads per batch, or
    ``"auto"`` (the default: :func:`get_num_threads`, see :func:`set_num_threads`). ``mmap``: copy records that are in the
    page cache from a read-only memory map instead of ``preadv`` — ``"auto"`` does for records of
    at most 64 KiB.

    ``verify=True``: every read compares each record it reads (whole, whichever fields are asked
    for) with the CRC32C stored when it was written, and raises :class:`RecordChecksumError` naming
    the shard and sample on a mismatch, before returning anything of the batch; for those who would
    rather stop than train on damaged data. A read of a variable-length field also checks each
    sample's rows, of all its variable-length fields (one checksum covers them together), before
    reading them. Costs: the checksums are read into memory at open (4 bytes per sample, 8 with
    variable-length fields), records are read one at a time and whole, each is checksummed as it is
    copied, and rows are read once more for their check (benchmarks/RESULTS.md, "Per-record
    checksums"). A dataset with shards written before per-record checksums (format version 1)
    cannot be opened with ``verify=True``.

    ``preload``: ``"auto"`` (the default) starts reading the dataset's files front to back into
    the page cache, on a background thread, when they fit in the memory the page cache may use
    (at most 80% of ``MemAvailable``, or of the process's memory cgroup limit where that is lower),
    so that a first epoch from disk runs at the disk's bandwidth instead of its request rate while
    reads are served as usual meanwhile; a dataset that does not fit is read by random reads only,
    as with ``False``. ``True`` starts the pass whatever the dataset's size. Parts already cached
    cost no reads. The pass is :attr:`Dataset.preloading` (``wait()``, ``done``, ``bytes_read``,
    ``error``); it stops when the dataset is closed or garbage collected (docs/training.md,
    "Datasets that fit in RAM")."""
    return Dataset(path, threads=threads, mmap=mmap, verify=verify, preload=preload)
